"""What a replay does along a trace besides the I/O: intervals (:class:`Every`, every N records or T
seconds of trace time) and the volumes a replay drives with their snapshot schedules and offset
mapping (:class:`Target`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument
from ..thin import Thin


@dataclass(frozen=True)
class Every:
    """An interval along a trace: every ``ios`` records, or every ``seconds`` of trace time."""

    ios: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, value: Any, what: str) -> "Every | None":
        """``10000`` / ``"10000"`` (I/Os) or ``"30s"`` / ``"1.5s"`` (trace seconds); None stays None."""
        if value is None or isinstance(value, Every):
            return value
        if isinstance(value, bool):
            raise InvalidArgument(f"{what}: expected a number of I/Os or seconds like '30s', got {value!r}")
        if isinstance(value, int):
            if value < 1:
                raise InvalidArgument(f"{what}: must be at least 1 I/O, got {value}")
            return cls(ios=value)
        if isinstance(value, str):
            text = value.strip()
            if text.endswith("s"):
                try:
                    sec = float(text[:-1])
                except ValueError:
                    sec = float("nan")
                if math.isfinite(sec) and sec > 0:
                    return cls(seconds=sec)
            elif text.replace("_", "").isascii() and text.replace("_", "").isdigit():
                digits = text.replace("_", "").lstrip("0")
                if len(digits) > 19:  # past 2^63 (and Python refuses int() of over 4,300 digits)
                    raise InvalidArgument(f"{what}: {text[:40]}... is too large ({len(digits)} digits)")
                return cls.parse(int(digits or "0"), what)
        raise InvalidArgument(f"{what}: expected a number of I/Os or seconds like '30s', got {value!r}")

    def as_text(self) -> str:
        return f"{self.ios}" if self.ios is not None else f"{self.seconds:g}s"


@dataclass
class Target:
    """One pool volume a trace drives, with its snapshot schedule and offset mapping."""

    thin: Thin
    snapshot_every: Every | None = None
    keep: int | None = None
    wrap: bool = False
    offset_scale: float = 1.0
    taken: list[str] = field(default_factory=list)
    ios: int = 0
    snaps: int = 0

def check_keep(keep: Any) -> int | None:
    """``keep`` (how many scheduled snapshots to keep): None (all) or a non-negative int."""
    if keep is None:
        return None
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise InvalidArgument(f"keep must be a non-negative number of snapshots, got {keep!r}")
    return keep

