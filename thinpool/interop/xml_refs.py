"""thin_dump 1.x ``<def>``/``<ref>`` splicing, resolved safely.

A ``<def name=…>`` groups mapping rows at superblock level; ``<ref name=…/>`` splices a def into a
device (or another def).  Nesting multiplies: 40 defs that each splice the previous one twice describe
2^40 rows in 3 KB.  :class:`RefResolver` therefore *counts* each device's rows (exact integers, no
arrays) before materialising any row index, and refuses a device whose expansion holds more rows than
the document has (some def is spliced in twice, which would duplicate its mappings -- named, with the
line of the second ``<ref>``) or more rows than its ``mapped_blocks`` (every row maps at least one
block).  Only then are the row indexes built, each def once.
"""

from __future__ import annotations

from typing import Any, Callable, NoReturn, Protocol

import numpy as np

__all__ = ["RefResolver"]


class Group(Protocol):
    """A device or a def as the XML reader records it: ``items`` are ``("rows", first, end)`` ranges
    of row indexes and ``("ref", name, line)`` splices, in document order."""

    kind: str
    name: str
    line: int
    attrs: dict
    items: list[tuple]


class RefResolver:
    """Row indexes of devices whose items may splice defs; ``fail(message, line)`` raises."""

    def __init__(self, defs: dict[str, Any], n_rows: int, fail: Callable[[str, int | None], NoReturn]) -> None:
        self.defs = defs
        self.n_rows = n_rows
        self.fail = fail
        self._counted: dict[str, int] = {}
        self._resolved: dict[str, np.ndarray] = {}

    def _ref(self, item: tuple, chain: tuple[str, ...]) -> str:
        _, ref, ref_line = item
        if ref not in self.defs:
            self.fail(f"<ref name={ref!r}> names no <def>", ref_line)
        if ref in chain:
            self.fail(f"<ref name={ref!r}> is circular", ref_line)
        return ref

    def count_rows(self, group: Group, chain: tuple[str, ...] = ()) -> int:
        """Rows ``group`` expands to, counted without materialising anything."""
        total = 0
        for item in group.items:
            if item[0] == "rows":
                total += item[2] - item[1]
                continue
            ref = self._ref(item, chain)
            if ref not in self._counted:
                self._counted[ref] = self.count_rows(self.defs[ref], chain + (ref,))
            total += self._counted[ref]
        return total

    def _repeated_def(self, group: Group) -> tuple[str, int]:
        """The first def (holding rows) that the expansion of ``group`` splices in twice, and the line
        of the second ``<ref>`` (iterative: each def is walked once)."""
        seen: set[str] = set()
        stack = [iter(group.items)]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                continue
            if item[0] != "ref" or not self._counted.get(item[1]):
                continue
            if item[1] in seen:
                return item[1], item[2]
            seen.add(item[1])
            stack.append(iter(self.defs[item[1]].items))
        raise AssertionError("unreachable")  # pragma: no cover - only called when a row repeats

    def device_rows(self, group: Group) -> np.ndarray:
        """The row indexes of device ``group`` in order, after the checks described in the module doc."""
        dev_id = group.attrs["dev_id"]
        try:
            total = self.count_rows(group)
        except RecursionError:
            self.fail(f"device {dev_id}: <def>/<ref> nesting is too deep", group.line)
        if total > self.n_rows:
            name, line = self._repeated_def(group)
            self.fail(f"device {dev_id}: <def name={name!r}> is spliced into it more than once (again by the "
                      f"<ref> at line {line}), so its mappings would be duplicated; the device's refs expand "
                      f"to {total} mapping rows but the document holds only {self.n_rows}", line)
        if total > group.attrs["mapped_blocks"]:  # each row maps at least one block
            self.fail(f"device {dev_id}: mapped_blocks=\"{group.attrs['mapped_blocks']}\" but its mappings "
                      f"(with their <ref>s) are {total} rows of at least one block each", group.line)
        return self._rows_of(group, ())

    def _rows_of(self, group: Group, chain: tuple[str, ...]) -> np.ndarray:
        parts = []
        for item in group.items:
            if item[0] == "rows":
                parts.append(np.arange(item[1], item[2], dtype=np.int64))
                continue
            ref = self._ref(item, chain)
            if ref not in self._resolved:
                self._resolved[ref] = self._rows_of(self.defs[ref], chain + (ref,))
            parts.append(self._resolved[ref])
        if not parts:
            return np.zeros(0, np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
