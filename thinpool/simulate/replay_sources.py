"""What a replay reads: traces given as numpy arrays (:class:`ArrayTrace`), a path or trace object
opened as a trace (:func:`open_trace`), and the records of several traces (a scenario's volumes)
merged by trace time, window by window (:class:`Source`, :func:`windows`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import InvalidArgument


# --------------------------------------------------------------------------- traces given as arrays
@dataclass(frozen=True)
class Chunk:
    """A chunk of trace records (the shape of :class:`thinpool.simulate.traces.TraceChunk`)."""

    time: np.ndarray
    op: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    volume: np.ndarray
    line: np.ndarray


class ArrayTrace:
    """A trace held in numpy arrays (for notebooks and tests): the same interface as the trace readers'
    ``Trace`` (``path``, ``format``, ``volumes``, ``chunks()``, ``bad_records``)."""

    format = "arrays"
    bad_records = 0

    def __init__(self, op: Any, offset: Any, length: Any, time: Any = None, volume: Any = None, *,
                 volumes: Sequence[str] = ("0",), path: str = "<arrays>", chunk_records: int = 1 << 20) -> None:
        self.op = np.asarray(op, np.uint8)
        n = len(self.op)
        self.offset = np.asarray(offset, np.int64)
        self.length = np.asarray(length, np.int64)
        self.time = np.zeros(n) if time is None else np.asarray(time, np.float64)
        self.volume = np.zeros(n, np.int32) if volume is None else np.asarray(volume, np.int32)
        if not (len(self.offset) == len(self.length) == len(self.time) == len(self.volume) == n):
            raise InvalidArgument("ArrayTrace: arrays of different lengths")
        self.volumes = list(volumes)
        self.path = path
        self.chunk_records = max(1, int(chunk_records))

    def chunks(self) -> Iterator[Chunk]:
        """The records in order, ``chunk_records`` at a time; ``line`` numbers them from 1."""
        for a in range(0, len(self.op), self.chunk_records):
            b = a + self.chunk_records
            yield Chunk(self.time[a:b], self.op[a:b], self.offset[a:b], self.length[a:b], self.volume[a:b],
                        np.arange(a + 1, a + 1 + len(self.op[a:b]), dtype=np.int64))


def expected_records(trace: Any) -> int:
    """A rough record count of a trace before reading it (for the default sampling interval)."""
    if hasattr(trace, "op"):
        return len(trace.op)
    try:
        return os.path.getsize(trace.path) // 32  # text traces: about 30-40 bytes a record
    except (OSError, AttributeError, TypeError):
        return 0


def open_trace(trace: Any, format: str | None = None, *, skip_bad: bool = False, blkparse_event: str = "Q") -> Any:
    """The trace to read: a path opened by :func:`thinpool.simulate.traces.open_trace` (a ``Trace``;
    its errors are ``TraceError``), or an object with ``chunks()`` such as :class:`ArrayTrace`, used as is."""
    if hasattr(trace, "chunks"):
        return trace
    from . import traces
    return traces.open_trace(os.fspath(trace), format, skip_bad=skip_bad, blkparse_event=blkparse_event)

# --------------------------------------------------------------------------- merging several traces
@dataclass
class Source:
    """A trace feeding the replay: its chunks, which target each of its volumes drives (-1: none),
    and a time offset added to its records' times."""

    trace: Any
    volume_map: np.ndarray | None  #: trace volume index -> target index (-1: dropped); None: see all_to
    time_offset: float = 0.0
    index: int = 0
    all_to: int = 0                #: with no volume_map, the target every record drives


def windows(sources: list[Source]) -> Iterator[tuple[np.ndarray, ...]]:
    """Windows of records of every source merged by trace time (stable: a source's records stay in
    file order): (time, op, offset, length, target, line, source index)."""
    iters = [iter(s.trace.chunks()) for s in sources]
    pending: list[tuple[np.ndarray, ...] | None] = [None] * len(sources)
    done = [False] * len(sources)
    while True:
        for k, s in enumerate(sources):
            while not done[k] and ((cur := pending[k]) is None or len(cur[0]) == 0):
                try:
                    ch = next(iters[k])
                except StopIteration:
                    done[k] = True
                    break
                vol = np.asarray(ch.volume, np.int64)
                if s.volume_map is None:
                    tgt = np.full(len(vol), s.all_to, np.int64)
                else:
                    if len(vol) and (vol.max() >= len(s.volume_map) or vol.min() < 0):
                        raise InvalidArgument(f"trace {getattr(s.trace, 'path', '?')}: volume index out of range")
                    tgt = s.volume_map[vol] if len(vol) else vol
                keep = tgt >= 0
                n = len(tgt)
                parts: tuple[np.ndarray, ...] = (
                    np.asarray(ch.time, np.float64) + s.time_offset, np.asarray(ch.op, np.uint8),
                    np.asarray(ch.offset, np.int64), np.asarray(ch.length, np.int64), tgt,
                    np.asarray(ch.line, np.int64), np.full(n, s.index, np.int64))
                if not keep.all():
                    parts = tuple(p[keep] for p in parts)
                pending[k] = parts
        live = [p for p in pending if p is not None and len(p[0])]
        if not live:
            return
        if len(live) == 1 and all(done[k] or pending[k] is live[0] for k in range(len(sources))):
            k = next(i for i, p in enumerate(pending) if p is live[0])
            pending[k] = None
            yield live[0]
            continue
        # cut at the earliest "last time" among sources that may still have records after theirs
        cut = min(float(p[0][-1]) for k, p in enumerate(pending) if p is not None and len(p[0]))
        taken = []
        for k, p in enumerate(pending):
            if p is None or not len(p[0]):
                continue
            j = int(np.searchsorted(p[0], cut, side="right"))
            if j:
                taken.append(tuple(a[:j] for a in p))
                pending[k] = tuple(a[j:] for a in p)
        merged = tuple(np.concatenate([t[i] for t in taken]) for i in range(7))
        order = np.argsort(merged[0], kind="stable")
        yield tuple(a[order] for a in merged)
