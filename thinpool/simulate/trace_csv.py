"""The comma-separated trace formats: MSR Cambridge / SNIA IOTTA block traces and a plain CSV with named
columns (block parsers for :func:`thinpool.simulate.traces.open_trace`, as in
:mod:`thinpool.simulate.trace_formats`)."""

from __future__ import annotations

import numpy as np

from thinpool.errors import TraceError
from thinpool.simulate import trace_text as T
from thinpool.simulate.trace_formats import (OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, Bad, Parser,
                                             Records)

def _ops(buf: np.ndarray, start: np.ndarray, end: np.ndarray, table: dict[bytes, int]) -> np.ndarray:
    """Op codes of the fields (255 where none of ``table``'s lower-case words matches)."""
    w = T.words_folded(buf, start, end)
    n = end - start
    op = np.full(len(start), 255, dtype=np.uint8)
    for word, code in table.items():
        op[(w == np.uint64(T.keyword(word))) & (n == len(word))] = code
    return op


# ------------------------------------------------------------------------------------ MSR / SNIA
_MSR_OPS = {b"read": OP_READ, b"write": OP_WRITE}


class Msr(Parser):
    """MSR Cambridge traces (SNIA IOTTA): ``Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime``,
    no header; Timestamp and ResponseTime in Windows filetime ticks (100 ns), Type ``Read`` or ``Write``,
    Offset and Size in bytes.  Volumes are ``Hostname/DiskNumber`` (taken as text); ResponseTime is not
    used (nor checked)."""

    def volumes(self) -> list[str]:
        return [n.replace(",", "/", 1) for n in self.names.names] or ["0"]

    def parse(self, buf: np.ndarray, size: int, first_line: int) -> tuple[Records, Bad]:
        f = T.split_delimited(buf, size)
        bad = Bad()
        bad.add((f.count != 0) & (f.count != 7), "expected 7 comma-separated fields "
                "(Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime)")
        lines = np.flatnonzero(f.count == 7)
        fi = f.first[lines]
        ticks, bad_t = T.parse_uint(buf, f.start[fi], f.end[fi])
        op = _ops(buf, f.start[fi + 3], f.end[fi + 3], _MSR_OPS)
        offset, bad_o = T.parse_uint(buf, f.start[fi + 4], f.end[fi + 4])
        length, bad_l = T.parse_uint(buf, f.start[fi + 5], f.end[fi + 5])
        bad.add_lines(lines[bad_t], "Timestamp must be an unsigned decimal number (100 ns ticks)")
        bad.add_lines(lines[op == 255], "Type must be Read or Write")
        bad.add_lines(lines[bad_o | bad_l], "Offset and Size must be unsigned decimal numbers of at most 18 digits")
        ok = ~(bad_t | bad_o | bad_l | (op == 255))
        lines, fi = lines[ok], fi[ok]
        volume = self.names.intern(buf, f.start[fi + 1], f.end[fi + 2])
        rec = Records(time=self._seconds(ticks[ok], 1e-7), op=op[ok], offset=offset[ok],
                      length=length[ok], volume=volume, line=lines + first_line)
        return rec, bad


def sniff_msr(head: bytes) -> bool:
    first = head.split(b"\n", 1)[0].rstrip(b"\r").split(b",")
    return len(first) == 7 and first[0].isdigit() and first[3].lower() in (b"read", b"write") \
        and first[4].isdigit() and first[5].isdigit()


# ------------------------------------------------------------------------------------- plain CSV
#: op words of the plain CSV (lower-cased): Tencent CBS's IOType 0/1 are read/write
_CSV_OPS = {b"r": OP_READ, b"read": OP_READ, b"0": OP_READ,
            b"w": OP_WRITE, b"write": OP_WRITE, b"1": OP_WRITE,
            b"d": OP_DISCARD, b"discard": OP_DISCARD, b"t": OP_DISCARD, b"trim": OP_DISCARD,
            b"f": OP_FLUSH, b"flush": OP_FLUSH, b"sync": OP_FLUSH}
#: column name -> (role, unit): time in seconds unless suffixed, offset/length in bytes or 512 B sectors
CSV_COLUMNS = {"time": ("time", 1.0), "time_s": ("time", 1.0), "time_ms": ("time", 1e-3),
               "time_us": ("time", 1e-6), "time_ns": ("time", 1e-9),
               "op": ("op", 1), "offset": ("offset", 1), "offset_sectors": ("offset", 512),
               "length": ("length", 1), "length_sectors": ("length", 512), "volume": ("volume", 1)}


class Csv(Parser):
    """A CSV whose first line names its columns: ``time`` (seconds; or ``time_ms``, ``time_us``,
    ``time_ns``), ``op`` (``R``/``read``/``0``, ``W``/``write``/``1``, ``D``/``discard``/``T``/``trim``,
    ``F``/``flush``/``sync``, any case), ``offset`` and ``length`` (bytes; or ``offset_sectors`` and
    ``length_sectors``, 512 bytes), optionally ``volume`` (any text: the volume's name).  Columns in any
    order; other columns are ignored.  No quoting."""

    def __init__(self, header: bytes, path: str) -> None:
        super().__init__()
        names = [c.strip().strip('"').strip().lower()
                 for c in header.rstrip(b"\r\n").decode("utf-8", "replace").split(",")]
        self.ncols = len(names)
        self.col: dict[str, int] = {}
        self.unit: dict[str, float] = {}
        for i, name in enumerate(names):
            if name in CSV_COLUMNS:
                role, unit = CSV_COLUMNS[name]
                if role in self.col:
                    raise TraceError(f"{path}: line 1: two {role} columns in the CSV header", path=path,
                                     line=1)
                self.col[role] = i
                self.unit[role] = unit
        missing = [r for r in ("time", "op", "offset", "length") if r not in self.col]
        if missing:
            raise TraceError(f"{path}: line 1: the CSV header must name the columns time, op, offset, "
                             f"length[, volume] (missing: {', '.join(missing)}; found: {', '.join(names)})",
                             path=path, line=1)
        # the first record's time as (whole, nanoseconds) in the time column's unit (the base's
        # integer t0 is not used: a CSV time stamp is a decimal number)
        self.first_time: tuple[int, int] | None = None

    def parse(self, buf: np.ndarray, size: int, first_line: int) -> tuple[Records, Bad]:
        f = T.split_delimited(buf, size)
        bad = Bad()
        if first_line == 1:
            f.count[0] = 0                # the header
        bad.add((f.count != 0) & (f.count != self.ncols), f"expected {self.ncols} comma-separated "
                "fields, as the header names")
        lines = np.flatnonzero(f.count == self.ncols)
        fi = f.first[lines]
        c = self.col
        whole, frac, bad_t = T.parse_decimal(buf, f.start[fi + c["time"]], f.end[fi + c["time"]])
        op = _ops(buf, f.start[fi + c["op"]], f.end[fi + c["op"]], _CSV_OPS)
        offset, bad_o = T.parse_uint(buf, f.start[fi + c["offset"]], f.end[fi + c["offset"]])
        length, bad_l = T.parse_uint(buf, f.start[fi + c["length"]], f.end[fi + c["length"]])
        big = (offset > (1 << 62) // self.unit["offset"]) | (length > (1 << 62) // self.unit["length"])
        bad.add_lines(lines[bad_t], "time must be a decimal number ([-]digits[.digits])")
        bad.add_lines(lines[op == 255], "op must be R, W, D, F (or read, write, discard, trim, flush, "
                      "sync, 0, 1)")
        bad.add_lines(lines[bad_o | bad_l | big], "offset and length must be unsigned decimal numbers of at most 18 "
                      "digits, below 2^62 bytes")
        ok = ~(bad_t | bad_o | bad_l | big | (op == 255))
        lines, fi = lines[ok], fi[ok]
        op = op[ok]
        flush = op == OP_FLUSH
        whole, frac = whole[ok], frac[ok]
        if len(whole) and self.first_time is None:
            self.first_time = (int(whole[0]), int(frac[0]))
        if self.first_time is not None:
            t0_whole, t0_frac = self.first_time
            seconds = ((whole - t0_whole).astype(np.float64)
                       + (frac - t0_frac).astype(np.float64) * 1e-9) * self.unit["time"]
        else:
            seconds = np.empty(0, np.float64)
        if "volume" in c:
            volume = self.names.intern(buf, f.start[fi + c["volume"]], f.end[fi + c["volume"]])
        else:
            volume = np.zeros(len(lines), dtype=np.int32)
        rec = Records(time=seconds, op=op,
                      offset=np.where(flush, 0, offset[ok] * int(self.unit["offset"])),
                      length=np.where(flush, 0, length[ok] * int(self.unit["length"])),
                      volume=volume, line=lines + first_line)
        return rec, bad


def sniff_csv(head: bytes) -> bool:
    first = head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace").lower().split(",")
    roles = {CSV_COLUMNS[c.strip().strip('"')][0] for c in first if c.strip().strip('"') in CSV_COLUMNS}
    return {"time", "op", "offset", "length"} <= roles
