"""The per-format block parsers behind :func:`thinpool.simulate.traces.open_trace`.

Each parser turns one block of whole lines (:func:`thinpool.simulate.trace_text.iter_blocks`) into
record arrays with a fixed number of numpy operations, and reports malformed lines through a
:class:`Bad` collector (the caller raises for the first one, or counts them with ``skip_bad``).
A parser keeps what must survive from one block to the next (names seen, the first time stamp, the
v2 ``wait`` clock, blkparse's summary state) in its own attributes; a new parser is made for every
pass over a file.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field

import numpy as np

from thinpool.simulate import trace_text as T

OP_READ, OP_WRITE, OP_DISCARD, OP_FLUSH = 0, 1, 2, 3


@dataclass
class Records:
    """Records parsed from one block (the arrays of a ``TraceChunk`` plus time in integer units)."""

    time: np.ndarray      # float64 seconds since the trace's first record
    op: np.ndarray        # uint8
    offset: np.ndarray    # int64 bytes
    length: np.ndarray    # int64 bytes
    volume: np.ndarray    # int32
    line: np.ndarray      # int64, 1-based line numbers


@dataclass
class Bad:
    """Malformed lines of one block: arrays of (block-relative, 0-based) line indices with their reasons."""

    lines: list[tuple[np.ndarray, str]] = field(default_factory=list)

    def add_lines(self, lines: np.ndarray, reason: str) -> None:
        if len(lines):
            self.lines.append((lines, reason))

    def add(self, mask: np.ndarray, reason: str) -> None:
        """Mark the lines where ``mask`` (over all the block's lines) is set."""
        self.add_lines(np.flatnonzero(mask), reason)

    def all(self) -> np.ndarray:
        """Every malformed line, once, sorted."""
        if not self.lines:
            return np.empty(0, np.int64)
        return np.unique(np.concatenate([ln for ln, _ in self.lines]))

    def first(self) -> tuple[int, str] | None:
        """The first malformed line (block-relative) and its reason, or None."""
        if not self.lines:
            return None
        return min((int(ln.min()), reason) for ln, reason in self.lines)


def _empty_records() -> Records:
    return Records(np.empty(0, np.float64), np.empty(0, np.uint8), np.empty(0, np.int64),
                   np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.int64))


class Parser(abc.ABC):
    """Base of the format parsers: ``parse(buf, size, first_line)`` -> (:class:`Records`, :class:`Bad`)."""

    #: names of the volumes seen so far, in order of first appearance
    names: T.Interner

    def __init__(self) -> None:
        self.names = T.Interner()
        self.t0: int | None = None     # the first record's time stamp, in the format's unit

    def volumes(self) -> list[str]:
        """The volume names seen so far, in order of first appearance (``["0"]`` if none)."""
        return list(self.names.names) or ["0"]

    @abc.abstractmethod
    def parse(self, buf: np.ndarray, size: int, first_line: int) -> tuple[Records, Bad]:
        """The records of ``buf[:size]`` (whole lines; the first is line ``first_line``) and the bad ones."""

    def _seconds(self, ticks: np.ndarray, scale: float) -> np.ndarray:
        """Integer time stamps -> float seconds since the first record's (kept across blocks)."""
        if len(ticks) == 0:
            return np.empty(0, np.float64)
        if self.t0 is None:
            self.t0 = int(ticks[0])
        return (ticks - self.t0).astype(np.float64) * scale


# ------------------------------------------------------------------------------------------ fio iolog
def _kw(word: bytes) -> tuple[int, int]:
    return T.keyword(word), len(word)


_FIO_IO = {_kw(b"read"): OP_READ, _kw(b"write"): OP_WRITE, _kw(b"trim"): OP_DISCARD,
           _kw(b"sync"): OP_FLUSH, _kw(b"datasync"): OP_FLUSH}
_FIO_FILE = (_kw(b"add"), _kw(b"open"), _kw(b"close"))
_WAIT = _kw(b"wait")
FIO_HEADERS = {b"fio version 2 iolog": 2, b"fio version 3 iolog": 3}


class FioIolog(Parser):
    """fio's iolog, versions 2 and 3 (``fio --write_iolog``; fio's HOWTO, "Trace file format").

    v3: ``TIME FILE ACTION [OFFSET LENGTH]``, TIME in microseconds since the job started (what fio's
    writer prints and its replay sleeps on); v2: ``FILE ACTION [OFFSET LENGTH]`` with no time, except
    ``FILE wait MICROSECONDS 0`` lines, which advance the clock.  File actions ``add``/``open``/``close``
    name the files (volumes, in order of first appearance); I/O actions ``read``, ``write``, ``trim``
    (a discard), ``sync`` and ``datasync`` (flushes: offset and length 0).  v3 ``wait`` is ignored, as
    fio ignores it.  The first line is the version header."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = version
        self.clock_us = 0          # v2: the sum of the waits so far

    def parse(self, buf: np.ndarray, size: int, first_line: int) -> tuple[Records, Bad]:
        f = T.split_whitespace(buf, size)
        bad = Bad()
        v3 = self.version == 3
        n_io, n_file = (5, 3) if v3 else (4, 2)
        count = f.count
        if first_line == 1:           # the header, checked when the file was opened
            count[0] = 0
        io = np.flatnonzero(count == n_io)
        fl = np.flatnonzero(count == n_file)
        if len(io) + len(fl) < f.nlines:
            bad.add((count != 0) & (count != n_io) & (count != n_file),
                    f"expected {n_io} fields (an I/O) or {n_file} (a file action)")
        # I/O lines: [TIME] FILE ACTION OFFSET LENGTH
        name_i = f.first[io] + (1 if v3 else 0)
        act_s, act_e = f.start[name_i + 1], f.end[name_i + 1]
        act_w = T.words(buf, act_s, act_e)
        act_len = act_e - act_s
        op = np.full(len(io), 255, dtype=np.uint8)
        for (w, n), code in _FIO_IO.items():
            op[(act_w == np.uint64(w)) & (act_len == n)] = code
        wait = (act_w == np.uint64(_WAIT[0])) & (act_len == 4)
        wrong = (op == 255) & ~wait
        bad.add_lines(io[wrong], "unknown I/O action (read, write, trim, sync, datasync, wait)")
        offset, bad_o = T.parse_uint(buf, f.start[name_i + 2], f.end[name_i + 2])
        length, bad_l = T.parse_uint(buf, f.start[name_i + 3], f.end[name_i + 3])
        bad_n = bad_o | bad_l
        bad.add_lines(io[bad_n], "offset and length must be unsigned decimal numbers of at most 18 digits")
        wrong |= bad_n
        # file lines: [TIME] FILE add|open|close
        fname_i = f.first[fl] + (1 if v3 else 0)
        fact_w = T.words(buf, f.start[fname_i + 1], f.end[fname_i + 1])
        fact_len = f.end[fname_i + 1] - f.start[fname_i + 1]
        fl_ok = np.zeros(len(fl), dtype=bool)
        for w, n in _FIO_FILE:
            fl_ok |= (fact_w == np.uint64(w)) & (fact_len == n)
        bad.add_lines(fl[~fl_ok], "unknown file action (add, open, close)")
        if v3:
            ticks, bad_t = T.parse_uint(buf, f.start[name_i - 1], f.end[name_i - 1])
            bad.add_lines(io[bad_t], "the time stamp must be an unsigned decimal number (microseconds)")
            wrong |= bad_t
            _, fbad_t = T.parse_uint(buf, f.start[fname_i - 1], f.end[fname_i - 1])
            bad.add_lines(fl[fbad_t], "the time stamp must be an unsigned decimal number (microseconds)")
            fl_ok &= ~fbad_t
        else:
            waits = np.where(wait & ~wrong, offset, 0)
            ticks = self.clock_us + np.cumsum(waits)
            if len(ticks):
                self.clock_us = int(ticks[-1])
        keep = ~wrong & ~wait
        # volumes: file names in line order (fio's add lines name the files first)
        vol = np.zeros(len(io), dtype=np.int32)
        if len(fl):
            lines = np.concatenate((io[keep], fl[fl_ok]))
            fields = np.concatenate((name_i[keep], fname_i[fl_ok]))
            order = np.argsort(lines, kind="stable")
            idx = np.empty(len(lines), dtype=np.int32)
            idx[order] = self.names.intern(buf, f.start[fields[order]], f.end[fields[order]])
            vol[keep] = idx[:int(keep.sum())]
        else:
            vol[keep] = self.names.intern(buf, f.start[name_i[keep]], f.end[name_i[keep]])
        op = op[keep]
        is_flush = op == OP_FLUSH
        rec = Records(
            time=self._seconds(ticks[keep], 1e-6),
            op=op,
            offset=np.where(is_flush, 0, offset[keep]),
            length=np.where(is_flush, 0, length[keep]),
            volume=vol[keep],
            line=io[keep] + first_line,
        )
        return rec, bad


def sniff_fio(head: bytes) -> int | None:
    """The iolog version when ``head`` (the file's first bytes) starts with fio's header line."""
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    return FIO_HEADERS.get(first)


# ------------------------------------------------------------------------------------------- blkparse
_DIGIT_LO, _DIGIT_HI = 48, 57
_SUMMARY_HEADER = re.compile(rb"(CPU\d+|Total) +\(\d+,\d+\):")
_PLUS = _kw(b"+")


class Blkparse(Parser):
    """blkparse's default text output (``blktrace -d DEV -o - | blkparse -i -``).

    A record line: ``MAJ,MIN CPU SEQ SECONDS.NANOSECONDS PID ACTION RWBS [SECTOR + COUNT] [PROCESS]``.
    Only lines whose ACTION is ``event`` (``Q`` queued by default, ``D`` issued, ``C`` completed) are
    records; every other action (G, I, M, P, U, m...) is skipped.  RWBS: an optional leading ``F`` (a
    preflush: a flush record, before the data record when the request also carries data), then ``R``
    read, ``W`` write, ``D`` discard or ``N`` (no data); later letters (F for FUA, S, M, A...) do not
    change the op.  Sectors are 512 bytes.  A request without data and without preflush (an empty
    ``WS 0`` completion) is no record.  Volumes are the ``MAJ,MIN`` devices.  The per-CPU summary
    blkparse prints at the end (from the first ``CPUn (MAJ,MIN):`` or ``Total (MAJ,MIN):`` line on) is
    skipped; any other line that is not a record is malformed."""

    def __init__(self, event: str) -> None:
        super().__init__()
        self.event = ord(event)
        self.in_summary = False

    def parse(self, buf: np.ndarray, size: int, first_line: int) -> tuple[Records, Bad]:
        f = T.split_whitespace(buf, size)
        bad = Bad()
        count = f.count
        nonblank = np.flatnonzero(count > 0)
        first_byte = buf[f.start[f.first[nonblank]]]
        record_like = (first_byte >= _DIGIT_LO) & (first_byte <= _DIGIT_HI) & (count[nonblank] >= 7)
        if self.in_summary:
            return _empty_records(), bad
        others = nonblank[~record_like]
        if len(others):
            # the summary starts at a "CPUn (MAJ,MIN):" or "Total (MAJ,MIN):" line (few lines: checked
            # one by one; a record line is never among them)
            stop = None
            for line in others.tolist():
                a, b = int(f.start[f.first[line]]), int(f.end[f.first[line] + count[line] - 1])
                if _SUMMARY_HEADER.fullmatch(buf[a:b].tobytes()):
                    stop = line
                    break
            if stop is not None:
                self.in_summary = True
                others = others[others < stop]
                keep = nonblank < stop
                nonblank = nonblank[keep]
                record_like = record_like[keep]
            bad.add_lines(others, "not a blkparse record line (MAJ,MIN CPU SEQ TIME PID ACTION RWBS ...)")
        rec_lines = nonblank[record_like]
        fi = f.first[rec_lines]
        act = f.start[fi + 5]
        mine = (buf[act] == self.event) & (f.end[fi + 5] - act == 1)
        lines = rec_lines[mine]
        fi = fi[mine]
        n_fields = count[lines]
        # time: SECONDS.NANOSECONDS
        whole, frac, bad_t = T.parse_decimal(buf, f.start[fi + 3], f.end[fi + 3])
        bad.add_lines(lines[bad_t], "the time stamp must be SECONDS.NANOSECONDS")
        # RWBS
        rs, re_ = f.start[fi + 6], f.end[fi + 6]
        pre = (buf[rs] == ord("F")) & (re_ - rs > 1)
        kind = buf[rs + pre]
        is_r, is_w = kind == ord("R"), kind == ord("W")
        is_d, is_n = (kind == ord("D")) | (kind == ord("E")), kind == ord("N")
        pre |= (buf[rs] == ord("F")) & (re_ - rs == 1)
        is_n |= (buf[rs] == ord("F")) & (re_ - rs == 1)
        bad_k = ~(is_r | is_w | is_d | is_n)
        bad.add_lines(lines[bad_k], "RWBS must start with [F]R, [F]W, [F]D or [F]N")
        # SECTOR + COUNT when the 9th field is '+'
        has_range = n_fields >= 10
        pi = np.where(has_range, fi + 8, 0)
        has_range &= (T.words(buf, f.start[pi], f.end[pi]) == np.uint64(_PLUS[0])) & \
            (f.end[pi] - f.start[pi] == 1)
        ri = np.flatnonzero(has_range)
        sector = np.zeros(len(lines), dtype=np.int64)
        nsect = np.zeros(len(lines), dtype=np.int64)
        sector[ri], bad_s = T.parse_uint(buf, f.start[fi[ri] + 7], f.end[fi[ri] + 7])
        nsect[ri], bad_c = T.parse_uint(buf, f.start[fi[ri] + 9], f.end[fi[ri] + 9])
        bad_r = np.zeros(len(lines), dtype=bool)
        bad_r[ri] = bad_s | bad_c | (sector[ri] > (1 << 54)) | (nsect[ri] >= (1 << 32))
        bad.add_lines(lines[bad_r], "SECTOR + COUNT must be unsigned decimal numbers (SECTOR below 2^54, COUNT "
                      "below 2^32)")
        ok = ~(bad_t | bad_k | bad_r)
        data = ok & (nsect > 0) & (is_r | is_w | is_d)
        flush = ok & pre
        # one or two records per line: the preflush first, then the data
        n_out = flush.astype(np.int64) + data
        src = np.repeat(np.arange(len(lines)), n_out)
        second = np.zeros(len(src), dtype=bool)
        second[1:] = src[1:] == src[:-1]
        is_flush_rec = flush[src] & ~second
        op = np.where(is_flush_rec, OP_FLUSH,
                      np.where(is_r[src], OP_READ, np.where(is_w[src], OP_WRITE, OP_DISCARD))).astype(np.uint8)
        ns = whole[src] * 1_000_000_000 + frac[src]
        vol_all = self.names.intern(buf, f.start[fi[ok]], f.end[fi[ok]])
        vol = np.zeros(len(lines), dtype=np.int32)
        vol[ok] = vol_all
        rec = Records(
            time=self._seconds(ns, 1e-9),
            op=op,
            offset=np.where(is_flush_rec, 0, sector[src] * 512),
            length=np.where(is_flush_rec, 0, nsect[src] * 512),
            volume=vol[src],
            line=lines[src] + first_line,
        )
        return rec, bad


def sniff_blkparse(head: bytes) -> bool:
    """Whether the first non-blank line of ``head`` looks like a blkparse record."""
    for raw in head.split(b"\n")[:-1][:20]:
        parts = raw.split()
        if not parts:
            continue
        dev = parts[0].split(b",")
        return (len(parts) >= 7 and len(dev) == 2 and all(d.isdigit() for d in dev)
                and parts[1].isdigit() and parts[2].isdigit() and b"." in parts[3]
                and parts[3].replace(b".", b"", 1).isdigit())
    return False
