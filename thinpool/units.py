"""Parsing and printing sizes (binary units, as LVM)."""

from __future__ import annotations

import functools
import re

from .errors import InvalidArgument, shown

_UNITS = {
    "": 1, "b": 1,
    "s": 512,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
    "p": 1 << 50, "pb": 1 << 50, "pib": 1 << 50,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$", re.ASCII)
#: most digits a size's whole part may have (leading zeros aside): 2**64 has 20; a longer number is no
#: size any caller accepts, and Python refuses to convert one of more than 4,300 digits at all
MAX_SIZE_DIGITS = 24
#: most digits its fraction may have (trailing zeros aside): a fraction of more than 50 digits times
#: any unit (at most 2**50) is never a whole number of bytes
MAX_FRACTION_DIGITS = 50


def parse_size(value: int | str, what: str = "size") -> int:
    """Return a byte count from an int or a string such as ``"64K"``, ``"64KiB"``, ``"10G"``, ``"8s"``.

    Units are binary (K = KiB = 1024), as in LVM; ``s`` is a 512-byte sector.
    Raises :class:`InvalidArgument` naming *what* and the bad value.
    """
    if isinstance(value, bool):
        raise InvalidArgument(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(f"{what} must not be negative: {value}")
        return value
    if not isinstance(value, str):
        raise InvalidArgument(f"{what}: expected an int or a size string, got {type(value).__name__}")
    m = _SIZE_RE.match(value)
    if not m:
        raise InvalidArgument(f"{what}: malformed size {shown(value, 60)} (examples: 4096, 64K, 64KiB, 10G)")
    number, unit = m.groups()
    mult = _UNITS.get(unit.lower())
    if mult is None:
        raise InvalidArgument(f"{what}: unknown unit {shown(unit, 60)} in {shown(value, 60)} (use K, M, G, T, P or KiB, MiB, ...)")
    whole, _, fraction = number.partition(".")
    if len(whole.lstrip("0")) > MAX_SIZE_DIGITS:
        raise InvalidArgument(f"{what}: {shown(value, 60)} is too large (a size has at most {MAX_SIZE_DIGITS} digits)")
    fraction = fraction.rstrip("0")
    if len(fraction) > MAX_FRACTION_DIGITS:
        raise InvalidArgument(f"{what}: {shown(value, 60)} is not a whole number of bytes")
    number = f"{whole.lstrip('0') or '0'}.{fraction}" if fraction else whole.lstrip("0") or "0"
    if "." in number:
        from fractions import Fraction  # only here: importing it costs every CLI start ~4 ms
        result = Fraction(number) * mult  # exact: no rounding through float
        if result.denominator != 1:
            raise InvalidArgument(f"{what}: {shown(value, 60)} is not a whole number of bytes")
        return int(result)
    return int(number) * mult


@functools.lru_cache(maxsize=4096)  # listings repeat a handful of sizes thousands of times
def format_size(nbytes: int) -> str:
    """Human size with binary units, e.g. ``64.0KiB``, ``1.5GiB`` (``0B`` for zero)."""
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)}B" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}PiB"


def _decimal_units(nbytes: int) -> tuple[float, str]:
    n = float(nbytes)
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n /= 1000
        i += 1
    return n, units[i]


def format_go_human_size(nbytes: int) -> str:
    """go-units ``HumanSize`` (SI units, 4 significant digits), as ``docker info`` prints: ``65.54 kB``."""
    n, unit = _decimal_units(nbytes)
    return f"{n:.4g} {unit}"


def format_docker_size(nbytes: int) -> str:
    """Size as Docker prints it (decimal units, 3 significant digits): ``103MB``, ``2.78kB``, ``0B``."""
    n, unit = _decimal_units(nbytes)
    text = f"{n:.3g}"
    if "e" in text:
        text = str(int(round(n)))
    return f"{text}{unit}"
