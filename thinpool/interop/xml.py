"""``thin_dump`` XML over the IR: a byte-exact writer and a strict, line-aware reader.

Writer (:func:`dump_xml`) — the output is byte-identical to ``thin_dump`` of
thin-provisioning-tools 0.9.0 for the same metadata: no XML declaration, two-space indent,
the tools' attribute order, ``uuid=""`` always, ``flags`` and ``version`` always, devices in
dev-id order, mappings in virtual-block order, consecutive virtual blocks that map to
consecutive data blocks *with equal time* merged into one ``range_mapping`` (a run of one is a
``single_mapping``), an empty device written as an open and a close line.

Reader (:func:`load_xml`) — accepts what either generation of ``thin_dump`` emits: the 0.9.0
element set and the 1.x one (``<def name=…>`` groups of mappings at superblock level, spliced
into devices by ``<ref name=…/>``; a ``metadata_snap`` superblock attribute; ``flags`` and
``version`` optional).  It is deliberately stricter than either ``thin_restore`` and refuses,
with an :class:`~thinpool.errors.InvalidArgument` naming the line, anything it would otherwise
have to guess about (see :func:`load_xml`).

Both sides share one event vocabulary, after thin-provisioning-tools' ``ir.rs``
``MetadataVisitor``: superblock begin/end, def begin/end, device begin/end, map (a run) and
ref.  The reader's expat callbacks are those events; the writer produces them from
:func:`mapping_runs`, which finds runs with numpy so that no per-mapping Python work happens.
"""

from __future__ import annotations

import os
from typing import NoReturn, TextIO

import numpy as np
from xml.parsers import expat

from ..errors import DuplicateDevice, InvalidArgument
from .ir import MAX_DEV_ID, Device, Metadata, Superblock
from .xml_refs import RefResolver

__all__ = ["dump_xml", "load_xml", "mapping_runs", "DuplicateDevice"]

U64_MAX = (1 << 64) - 1
U32_LIMIT = 1 << 32
MIN_BLOCK_SECTORS = 128
MAX_BLOCK_SECTORS = 2097152


# ----------------------------------------------------------------------------------------------
# runs


def mapping_runs(dev: Device, *, split_on_time: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return a device's mappings as runs ``(vbegin, dbegin, length, time)`` (uint64 ×3, uint32).

    A run is a maximal stretch where each mapping's virtual and data blocks are one more than
    the previous mapping's and (when *split_on_time*, as ``thin_dump`` does) its time is equal.
    With ``split_on_time=False`` time is ignored (as ``thin_delta`` does); the returned time is
    then the run's first mapping's.
    """
    v, d, t = dev.vblocks, dev.dblocks, dev.times
    n = len(v)
    if n == 0:
        empty = np.zeros(0, np.uint64)
        return empty, empty.copy(), empty.copy(), np.zeros(0, np.uint32)
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    nb = brk[1:]
    np.not_equal(v[1:], v[:-1] + np.uint64(1), out=nb)
    nb |= d[1:] != d[:-1] + np.uint64(1)
    if split_on_time:
        nb |= t[1:] != t[:-1]
    starts = np.flatnonzero(brk)
    lengths = np.diff(np.append(starts, n)).astype(np.uint64)
    return v[starts], d[starts], lengths, t[starts]


def _check_device(dev: Device) -> None:
    n = len(dev.vblocks)
    if len(dev.dblocks) != n or len(dev.times) != n:
        raise InvalidArgument(
            f"device {dev.dev_id}: vblocks/dblocks/times lengths differ ({n}, {len(dev.dblocks)}, {len(dev.times)})"
        )
    if n > 1 and not bool(np.all(dev.vblocks[1:] > dev.vblocks[:-1])):
        raise InvalidArgument(f"device {dev.dev_id}: virtual blocks are not strictly increasing")


# ----------------------------------------------------------------------------------------------
# writer


def _device_lines(dev: Device) -> list[str]:
    lines = [
        f'  <device dev_id="{dev.dev_id}" mapped_blocks="{dev.mapped_blocks}" transaction="{dev.transaction}"'
        f' creation_time="{dev.creation_time}" snap_time="{dev.snap_time}">'
    ]
    vb, db, ln, tm = mapping_runs(dev)
    if len(vb):
        lines += [
            f'    <single_mapping origin_block="{v}" data_block="{d}" time="{t}"/>'
            if n == 1
            else f'    <range_mapping origin_begin="{v}" data_begin="{d}" length="{n}" time="{t}"/>'
            for v, d, n, t in zip(vb.tolist(), db.tolist(), ln.tolist(), tm.tolist())
        ]
    lines.append("  </device>")
    return lines


def dump_xml(md: Metadata, out: TextIO | None = None, *, emit_metadata_snap: bool = False) -> str | None:
    """Write *md* as ``thin_dump`` 0.9.0 would print it; return the text, or write it to *out*.

    The output is byte-for-byte what ``thin_dump`` 0.9.0 prints for binary metadata holding the
    same superblock, devices and mappings (``uuid`` is always ``""``, as the tool prints it).
    0.9.0 never prints ``metadata_snap``; pass ``emit_metadata_snap=True`` to add it after
    ``nr_data_blocks`` as the 1.x tools do (``thin_restore`` then stores it as the held root).

    Returns the XML as a string when *out* is None, else writes to *out* and returns None.
    Raises :class:`InvalidArgument` if the IR is inconsistent (devices not sorted by dev id,
    unequal array lengths, virtual blocks not strictly increasing).
    """
    sb = md.superblock
    snap = ""
    if emit_metadata_snap and sb.metadata_snap is not None:
        snap = f' metadata_snap="{sb.metadata_snap}"'
    head = (
        f'<superblock uuid="" time="{sb.time}" transaction="{sb.transaction}" flags="{sb.flags}"'
        f' version="{sb.version}" data_block_size="{sb.data_block_size}" nr_data_blocks="{sb.nr_data_blocks}"{snap}>\n'
    )
    prev = None
    for dev in md.devices:
        if prev is not None and dev.dev_id <= prev:
            raise InvalidArgument(f"devices are not sorted by dev_id ({prev} then {dev.dev_id})")
        prev = dev.dev_id
        _check_device(dev)

    if out is None:
        parts = [head]
        for dev in md.devices:
            lines = _device_lines(dev)
            lines.append("")
            parts.append("\n".join(lines))
        parts.append("</superblock>\n")
        return "".join(parts)
    out.write(head)
    for dev in md.devices:
        lines = _device_lines(dev)
        lines.append("")
        out.write("\n".join(lines))
    out.write("</superblock>\n")
    return None


# ----------------------------------------------------------------------------------------------
# reader

_SB_REQUIRED = ("uuid", "time", "transaction", "data_block_size", "nr_data_blocks")
_SB_OPTIONAL = ("flags", "version", "metadata_snap")
_DEV_ATTRS = ("dev_id", "mapped_blocks", "transaction", "creation_time", "snap_time")
_SINGLE_ATTRS = ("origin_block", "data_block", "time")
_RANGE_ATTRS = ("origin_begin", "data_begin", "length", "time")
_LIMITS = {"time": U32_LIMIT, "creation_time": U32_LIMIT, "snap_time": U32_LIMIT, "flags": U32_LIMIT,
           "version": U32_LIMIT, "data_block_size": U32_LIMIT, "dev_id": MAX_DEV_ID + 1}
_MAPPING_TAGS = ("single_mapping", "range_mapping")
_GROUP_TAGS = ("device", "def")


class _Located(Exception):
    """Raised inside a re-parse once the wanted event has been reached."""


class _Group:
    """A device or a def: its attributes, its line and its items (row ranges and refs)."""

    __slots__ = ("kind", "name", "line", "attrs", "items", "open_row")

    def __init__(self, kind: str, name: str, line: int, attrs: dict, row: int) -> None:
        self.kind = kind
        self.name = name
        self.line = line
        self.attrs = attrs
        self.items: list[tuple] = []
        self.open_row = row

    def close_rows(self, row: int) -> None:
        if row > self.open_row:
            self.items.append(("rows", self.open_row, row))
        self.open_row = row


class _Reader:
    """The expat-driven visitor: one method per IR event (superblock, def, device, map, ref).

    Speed matters only for mapping elements, so they take a lean path: their ordered
    attribute lists are appended, unconverted, to one flat list per element kind and checked
    and converted in bulk by :meth:`finish`.  Everything else goes through :meth:`_start`,
    which validates eagerly.  Line numbers of mapping rows are not kept; on the (rare) error
    path the document is parsed again to find the offending row's line.
    """

    def __init__(self, label: str, default_version: int) -> None:
        self.label = label
        self.default_version = default_version
        self.p: expat.XMLParserType | None = None
        self.stack: list[tuple[str, int]] = []
        self.sb: dict | None = None
        self.group: _Group | None = None
        self.devices: list[_Group] = []
        self.defs: dict[str, _Group] = {}
        self.dev_ids: dict[int, int] = {}
        self.sflat: list[str] = []      # single_mapping: [k, v] * 3 per row
        self.rflat: list[str] = []      # range_mapping:  [k, v] * 4 per row
        self.order = bytearray()        # per row in document order: 0 single, 1 range
        self.texts: set[str] = set()

    # -- errors -----------------------------------------------------------------------------
    def fail(self, msg: str, line: int | None = None, cls: type[InvalidArgument] = InvalidArgument) -> NoReturn:
        if line is None:
            line = self.p.CurrentLineNumber if self.p is not None else 0
        if len(msg) > 400:  # a quoted name or value may be megabytes long: keep both ends of the message
            msg = f"{msg[:240]}...[{len(msg) - 360:,} characters]...{msg[-120:]}"
        raise cls(f"{self.label}line {line}: {msg}")

    def _uint(self, tag: str, attr: str, text: str, line: int) -> int:
        if not (text.isascii() and text.isdigit()):
            self.fail(f"attribute {attr}={text[:80]!r} of <{tag}> is not a non-negative integer", line)
        if len(text.lstrip("0")) > 20:  # past 2^64 (and Python refuses int() of over 4,300 digits)
            self.fail(f"attribute {attr}={text[:40]}... of <{tag}> is out of range ({len(text)} digits)", line)
        value = int(text)
        limit = _LIMITS.get(attr, U64_MAX + 1)
        if value >= limit:
            if attr == "dev_id":
                self.fail(f"dev_id {value} of <device> is larger than {MAX_DEV_ID} (2^24-1)", line)
            self.fail(f"attribute {attr}={value} of <{tag}> is out of range (must be < {limit})", line)
        return value

    def _check_attrs(self, tag: str, attrs: dict, required: tuple, optional: tuple = (), line: int | None = None) -> None:
        for key in attrs:
            if key not in required and key not in optional:
                self.fail(f"unknown attribute {key!r} on <{tag}>", line)
        for key in required:
            if key not in attrs:
                self.fail(f"missing attribute {key!r} on <{tag}>", line)

    # -- events (the slow path: everything but well-formed mapping elements) ---------------------
    def _start(self, name: str, alist: list[str], row: int, in_group: bool) -> bool:
        """Handle a start tag; return whether the new innermost element is a device or def."""
        assert self.p is not None, "only the parser calls it (parse() made self.p)"
        line = self.p.CurrentLineNumber
        attrs = dict(zip(alist[0::2], alist[1::2]))
        parent = self.stack[-1][0] if self.stack else None
        # the fast path leaves mapping elements off the stack: inside one, in_group is False
        in_mapping = parent in _GROUP_TAGS and not in_group
        if name in _MAPPING_TAGS:
            if parent not in _GROUP_TAGS or in_mapping:
                where = "inside a mapping element" if in_mapping else (
                    f"inside <{parent}>" if parent else "at top level")
                self.fail(f"mapping outside a device: <{name}> {where}")
            self._check_attrs(name, attrs, _SINGLE_ATTRS if name == "single_mapping" else _RANGE_ATTRS)
            self.fail(f"bad attributes on <{name}>")  # pragma: no cover - _check_attrs raised
        if in_mapping:
            self.fail(f"<{name}> inside a mapping element")
        if name == "superblock":
            if parent is not None or self.sb is not None:
                self.fail("a second <superblock>" if self.sb is not None else f"<superblock> inside <{parent}>")
            self._check_attrs(name, attrs, _SB_REQUIRED, _SB_OPTIONAL)
            sb: dict = {"uuid": attrs["uuid"]}
            for key in _SB_REQUIRED[1:] + _SB_OPTIONAL:
                if key in attrs:
                    sb[key] = self._uint(name, key, attrs[key], line)
            bs = sb["data_block_size"]
            if bs % MIN_BLOCK_SECTORS or not MIN_BLOCK_SECTORS <= bs <= MAX_BLOCK_SECTORS:
                self.fail(f"bad data_block_size {bs}: must be a multiple of 128 sectors in 128..2097152")
            self.sb = sb
        elif name in _GROUP_TAGS:
            if parent != "superblock":
                self.fail(f"<{name}> must be directly inside <superblock>, not "
                          + (f"inside <{parent}>" if parent else "at top level"))
            if name == "device":
                self._check_attrs(name, attrs, _DEV_ATTRS)
                vals = {k: self._uint(name, k, attrs[k], line) for k in _DEV_ATTRS}
                dev_id = vals["dev_id"]
                if dev_id in self.dev_ids:
                    self.fail(f"duplicate device: dev_id {dev_id} already defined at line {self.dev_ids[dev_id]}",
                              cls=DuplicateDevice)
                self.dev_ids[dev_id] = line
                self.group = _Group("device", str(dev_id), line, vals, row)
                self.devices.append(self.group)
            else:
                self._check_attrs(name, attrs, ("name",))
                def_name = attrs["name"]
                if def_name in self.defs:
                    self.fail(f"duplicate <def name={def_name!r}> (first at line {self.defs[def_name].line})")
                self.group = _Group("def", def_name, line, {}, row)
                self.defs[def_name] = self.group
        elif name == "ref":
            if parent not in _GROUP_TAGS:
                self.fail("<ref> outside a device or def" + (f" (inside <{parent}>)" if parent else ""))
            self._check_attrs(name, attrs, ("name",))
            assert self.group is not None
            self.group.close_rows(row)
            self.group.items.append(("ref", attrs["name"], line))
        else:
            self.fail(f"unknown tag <{name}>")
        self.stack.append((name, line))
        return name in _GROUP_TAGS

    def _end(self, name: str, row: int) -> bool:
        self.stack.pop()
        if name in _GROUP_TAGS:
            assert self.group is not None
            self.group.close_rows(row)
            self.group = None
        return bool(self.stack) and self.stack[-1][0] in _GROUP_TAGS

    # -- driving ------------------------------------------------------------------------------
    def _new_parser(self) -> expat.XMLParserType:
        p = expat.ParserCreate()
        p.buffer_text = True
        p.buffer_size = 1 << 16
        p.ordered_attributes = True
        return p

    def _feed(self, p: expat.XMLParserType) -> None:
        if self.text is not None:
            p.Parse(self.text, True)
        else:
            assert self.path is not None, "parse() is given a path or the text"
            with open(self.path, "rb") as f:
                p.ParseFile(f)

    def parse(self, *, path: str | os.PathLike | None = None, text: str | None = None) -> None:
        """Parse the document at *path*, or the XML *text*."""
        self.path, self.text = path, text
        p = self.p = self._new_parser()
        order = self.order
        o_ap = order.append
        s_ext = self.sflat.extend
        r_ext = self.rflat.extend
        in_group = False        # the innermost open element is a device or def
        slow_start, slow_end = self._start, self._end

        def start(name: str, attrs: list[str]) -> None:
            nonlocal in_group
            if in_group:
                if name == "single_mapping":
                    if len(attrs) == 6:
                        s_ext(attrs)
                        o_ap(0)
                        in_group = False
                        return
                elif name == "range_mapping":
                    if len(attrs) == 8:
                        r_ext(attrs)
                        o_ap(1)
                        in_group = False
                        return
            in_group = slow_start(name, attrs, len(order), in_group)

        def end(name: str) -> None:
            nonlocal in_group
            if name == "single_mapping" or name == "range_mapping":
                in_group = True
                return
            in_group = slow_end(name, len(order))

        p.StartElementHandler = start
        p.EndElementHandler = end
        p.CharacterDataHandler = self.texts.add
        try:
            self._feed(p)
        except UnicodeEncodeError:  # a str holding a lone surrogate (undecodable bytes let through)
            self.fail("the XML text is not valid Unicode (it holds a lone surrogate)", 0)
        except expat.ExpatError as e:
            if self.stack and e.code == expat.errors.codes[expat.errors.XML_ERROR_NO_ELEMENTS]:
                tag, opened = self.stack[-1]
                self.fail(f"unexpected end of input: <{tag}> opened at line {opened} is not closed", e.lineno)
            self.fail(f"malformed XML: {expat.errors.messages[e.code]}", e.lineno)
        if self.sb is None:
            self.fail("no <superblock> element")
        for text in self.texts:
            if not text.isspace():
                self._fail_text(text)

    def _fail_text(self, bad: str) -> NoReturn:
        p = self._new_parser()

        def text(data: str) -> None:
            if data == bad:
                # buffered text is delivered when the next tag starts: count back to the text
                lead = len(data) - len(data.lstrip())
                raise _Located(p.CurrentLineNumber - data.count("\n") + data[:lead].count("\n"))

        p.StartElementHandler = lambda name, attrs: None  # same handlers, same text chunks
        p.EndElementHandler = lambda name: None
        p.CharacterDataHandler = text
        try:
            self._feed(p)
        except _Located as e:
            self.fail(f"unexpected text {bad.strip()[:40]!r}", e.args[0])
        self.fail(f"unexpected text {bad.strip()[:40]!r}", 0)  # pragma: no cover

    def _row_line(self, row: int) -> int:
        """The line of the *row*-th mapping element (document order), found by parsing again."""
        p = self._new_parser()
        count = -1

        def start(name: str, attrs: list[str]) -> None:
            nonlocal count
            if name == "single_mapping" or name == "range_mapping":
                count += 1
                if count == row:
                    raise _Located(p.CurrentLineNumber)

        p.StartElementHandler = start
        try:
            self._feed(p)
        except _Located as e:
            return int(e.args[0])
        return 0  # pragma: no cover

    def fail_row(self, row: int, msg: str) -> NoReturn:
        self.fail(msg, self._row_line(row))

    # -- finishing ----------------------------------------------------------------------------
    def _columns(self, flat: list[str], keys: tuple[str, ...], rows: np.ndarray) -> list[list[str]]:
        """Split a flat [k, v, ...] list into one value list per key, checking the keys."""
        width = 2 * len(keys)
        n = len(flat) // width
        if all(flat[2 * i::width].count(k) == n for i, k in enumerate(keys)):
            return [flat[2 * i + 1::width] for i in range(len(keys))]
        cols: list[list[str]] = [[] for _ in keys]
        tag = "single_mapping" if len(keys) == 3 else "range_mapping"
        for j in range(n):
            chunk = flat[j * width:(j + 1) * width]
            attrs = dict(zip(chunk[0::2], chunk[1::2]))
            if set(attrs) != set(keys):
                self._check_attrs(tag, attrs, keys, line=self._row_line(int(rows[j])))
            for col, k in zip(cols, keys):
                col.append(attrs[k])
        return cols

    def _to_u64(self, strs: list[str], what: str, rows: np.ndarray) -> np.ndarray:
        joined = "".join(strs)
        if joined.isascii() and joined.isdigit():
            try:
                return np.array(strs, dtype=np.uint64)
            except (OverflowError, ValueError):
                pass
        for j, s in enumerate(strs):
            if not (s.isascii() and s.isdigit()):
                self.fail_row(int(rows[j]), f"attribute {what}={s[:80]!r} is not a non-negative integer")
            if len(s.lstrip("0")) > 20 or int(s) > U64_MAX:  # (no int() of a number of thousands of digits)
                shown = s if len(s) <= 40 else f"{s[:40]}... ({len(s)} digits)"
                self.fail_row(int(rows[j]), f"attribute {what}={shown} does not fit in 64 bits")
        raise AssertionError("unreachable")  # pragma: no cover

    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        order = np.frombuffer(bytes(self.order), dtype=np.uint8)
        n = len(order)
        is_range = order == 1
        srows = np.flatnonzero(~is_range)
        rrows = np.flatnonzero(is_range)
        V = np.empty(n, np.uint64)
        D = np.empty(n, np.uint64)
        L = np.ones(n, np.uint64)
        T = np.empty(n, np.uint64)
        if len(srows):
            sv, sd, st = self._columns(self.sflat, _SINGLE_ATTRS, srows)
            V[srows] = self._to_u64(sv, "origin_block", srows)
            D[srows] = self._to_u64(sd, "data_block", srows)
            T[srows] = self._to_u64(st, "time", srows)
        if len(rrows):
            rv, rd, rl, rt = self._columns(self.rflat, _RANGE_ATTRS, rrows)
            V[rrows] = self._to_u64(rv, "origin_begin", rrows)
            D[rrows] = self._to_u64(rd, "data_begin", rrows)
            L[rrows] = self._to_u64(rl, "length", rrows)
            T[rrows] = self._to_u64(rt, "time", rrows)
        self.sflat = self.rflat = []
        return V, D, L, T

    def finish(self) -> Metadata:
        sb = self.sb
        assert sb is not None
        nr = sb["nr_data_blocks"]
        V, D, L, T = self._rows()

        def first(mask: np.ndarray) -> int:
            return int(np.flatnonzero(mask)[0])

        if len(L):
            if bool((L == 0).any()):
                self.fail_row(first(L == 0), "range_mapping with length 0")
            if bool((T >= U32_LIMIT).any()):
                i = first(T >= U32_LIMIT)
                self.fail_row(i, f"mapping time {int(T[i])} is out of range (must be < 2^32)")
            one = np.uint64(1)
            for arr, what in ((V, "origin"), (D, "data")):
                wrap = arr + (L - one) < arr
                if bool(wrap.any()):
                    i = first(wrap)
                    self.fail_row(i, f"{what} range {int(arr[i])}+{int(L[i])} overflows 64 bits")
            beyond = D + (L - one) >= np.uint64(nr)
            if bool(beyond.any()):
                i = first(beyond)
                self.fail_row(i, f"mapping beyond end of data device ({max(int(D[i]), nr)} >= {nr})")

        refs = RefResolver(self.defs, len(V), self.fail)
        devices: list[Device] = []
        for g in sorted(self.devices, key=lambda g: g.attrs["dev_id"]):
            dev_id = g.attrs["dev_id"]
            rows = refs.device_rows(g)  # counted and checked before any row index is built
            vb, ln, db, tm = V[rows], L[rows], D[rows], T[rows]
            if len(rows) > 1:
                bad = vb[1:] < vb[:-1] + ln[:-1]
                if bool(bad.any()):
                    i = first(bad) + 1
                    prev_line = self._row_line(int(rows[i - 1]))
                    if vb[i] < vb[i - 1]:
                        problem = (f"unsorted keys: origin block {int(vb[i])} follows {int(vb[i - 1])} "
                                   f"(line {prev_line})")
                    else:
                        problem = (f"duplicate/overlapping mapping: origin block {int(vb[i])} is already "
                                   f"mapped by the mapping at line {prev_line}")
                    self.fail_row(int(rows[i]), f"device {dev_id}: {problem}")
            total = int(ln.sum()) if len(ln) else 0
            if total != g.attrs["mapped_blocks"]:
                self.fail(f"device {dev_id}: mapped_blocks=\"{g.attrs['mapped_blocks']}\" but its "
                          f"mappings cover {total} blocks", g.line)
            if total == len(rows):
                vblocks, dblocks, times = vb, db, tm
            else:
                lens = ln.astype(np.int64)
                offs = np.arange(total, dtype=np.uint64) - np.repeat((np.cumsum(lens) - lens).astype(np.uint64), lens)
                vblocks = np.repeat(vb, lens) + offs
                dblocks = np.repeat(db, lens) + offs
                times = np.repeat(tm, lens)
            a = g.attrs
            devices.append(Device(dev_id, a["mapped_blocks"], a["transaction"], a["creation_time"],
                                  a["snap_time"], vblocks, dblocks, times.astype(np.uint32)))
        superblock = Superblock(
            time=sb["time"], transaction=sb["transaction"], data_block_size=sb["data_block_size"],
            nr_data_blocks=nr, flags=sb.get("flags", 0), version=sb.get("version", self.default_version),
            uuid=sb["uuid"], metadata_snap=sb.get("metadata_snap"),
        )
        return Metadata(superblock, devices)


def load_xml(source: str | os.PathLike | TextIO, *, default_version: int = 2) -> Metadata:
    """Read ``thin_dump`` XML (0.9.0 or 1.x) into a :class:`~thinpool.interop.ir.Metadata`.

    *source* is a path, an open text stream, or a string holding the XML itself (a ``str``
    whose first non-blank character is ``<``).  The 1.x additions are understood: ``<def
    name=…>`` groups of mappings at superblock level, spliced into a device (or another def)
    where ``<ref name=…/>`` names them; ``metadata_snap`` (stored as
    ``Superblock.metadata_snap``); optional ``flags`` (default 0) and ``version`` (default
    *default_version*: 2 as the kernel and the 1.x tools write — pass 1 to mimic 0.9.0
    ``thin_restore``).  Comments, an XML declaration, self-closing ``<device/>`` and
    non-self-closing mapping elements are accepted; devices may come in any order and are
    sorted by dev id.

    Stricter than ``thin_restore`` by choice.  Raises :class:`InvalidArgument` whose message
    names the line for: malformed XML; an unknown tag or attribute; a missing attribute; a
    non-integer or out-of-range attribute; ``data_block_size`` not a multiple of 128 sectors in
    128..2097152; a dev id above 2^24-1; a time at or above 2^32; a mapping outside a device;
    a zero-length range; a data block at or beyond ``nr_data_blocks`` ("mapping beyond end of
    data device (B >= N)"); keys within a device out of order or overlapping/duplicated; a ref
    to a missing def; text content; unclosed elements; and **a ``mapped_blocks`` attribute that
    disagrees with the device's mappings** (0.9.0 ``thin_restore`` silently recomputes it and
    1.x trusts it, which then fails its own ``thin_check``; we refuse rather than guess which of
    the two the author meant).  A duplicated dev id raises :class:`DuplicateDevice`, which is
    both an ``InvalidArgument`` and an ``AlreadyExists``.
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("<")):
        reader = _Reader(f"{os.fspath(source)}: ", default_version)
        reader.parse(path=source)
    else:
        # a stream is read whole, so that an error's line can be found by parsing again
        text = source if isinstance(source, str) else source.read()
        if not isinstance(text, str):
            raise InvalidArgument("load_xml: the stream must be opened in text mode")
        reader = _Reader("", default_version)
        reader.parse(text=text)
    return reader.finish()
