"""Block I/O traces read as chunks of numpy arrays, streaming: never the whole trace in memory.

>>> trace = open_trace("run.iolog")                     # format sniffed: fio-iolog
>>> for chunk in trace.chunks():                        # up to chunk_records records each
...     chunk.op, chunk.offset, chunk.length            # numpy arrays, one element per record

Formats (``format=``; sniffed from the file's first bytes when None):

* ``"fio-iolog"``: fio's iolog v2 and v3 as ``fio --write_iolog`` writes them (v3 times in
  microseconds); volumes are the file names;
* ``"blkparse"``: blkparse's default text output (blktrace of a block device): ``Q`` events by default
  (``blkparse_event="D"`` or ``"C"``), RWBS ``R``/``W``/``D`` (discard)/``F`` (flush), 512-byte sectors;
  volumes are the ``MAJ,MIN`` devices;
* ``"msr"``: MSR Cambridge / SNIA IOTTA CSV ``Timestamp,Hostname,DiskNumber,Type,Offset,Size,
  ResponseTime`` (no header, Windows 100 ns ticks); volumes are ``host/disk``;
* ``"csv"``: a CSV with a header naming the columns ``time,op,offset,length[,volume]`` (any order, other
  columns ignored); time in seconds, op ``R``/``W``/``D``/``F`` or ``read``/``write``/``discard``/
  ``trim``/``flush``/``sync``, offset and length in bytes.

gzip, bzip2 and xz files are decompressed on the fly (:func:`open_stream`).

A malformed record raises :class:`~thinpool.errors.TraceError` naming the file and line, or with
``skip_bad=True`` is skipped and counted in :attr:`Trace.bad_records`.  Parsing is vectorised: a fixed
number of numpy operations per block of lines (:mod:`thinpool.simulate.trace_text`).
"""

from __future__ import annotations

import bz2
import errno
import gzip
import lzma
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

from thinpool.errors import TraceError
from thinpool.simulate import trace_csv as C
from thinpool.simulate import trace_formats as F
from thinpool.simulate import trace_text as T

OP_READ, OP_WRITE, OP_DISCARD, OP_FLUSH = F.OP_READ, F.OP_WRITE, F.OP_DISCARD, F.OP_FLUSH
#: the name of every op code
OP_NAMES = {OP_READ: "read", OP_WRITE: "write", OP_DISCARD: "discard", OP_FLUSH: "flush"}
#: the formats :func:`open_trace` reads
FORMATS = ("fio-iolog", "blkparse", "msr", "csv")
#: how many bytes of a file :func:`sniff_format` looks at
SNIFF_BYTES = 64 << 10
#: the most records per chunk a caller may ask for
MAX_CHUNK_RECORDS = 1 << 26


@dataclass(frozen=True)
class TraceChunk:
    """Up to ``chunk_records`` records of a trace; all arrays have the same length."""

    time: np.ndarray     #: float64, seconds since the trace's first record (0.0 if the format has none)
    op: np.ndarray       #: uint8, ``OP_*``
    offset: np.ndarray   #: int64, bytes (0 for flushes)
    length: np.ndarray   #: int64, bytes (0 for flushes)
    volume: np.ndarray   #: int32, index into :attr:`Trace.volumes` (all 0 for one-volume traces)
    line: np.ndarray     #: int64, 1-based source line of each record (for error messages)

    def __len__(self) -> int:
        return len(self.op)


class Trace:
    """A trace file opened by :func:`open_trace`; iterating :meth:`chunks` twice reads the file twice."""

    def __init__(self, path: str, format: str, *, chunk_records: int, skip_bad: bool,
                 blkparse_event: str, fio_version: int = 3) -> None:
        self.path = path
        self.format = format
        self.chunk_records = chunk_records
        self.skip_bad = skip_bad
        self.blkparse_event = blkparse_event
        self.fio_version = fio_version
        #: malformed records skipped by the last complete pass (``skip_bad=True``)
        self.bad_records = 0
        #: records delivered by the last complete pass
        self.records = 0
        self._volumes: list[str] | None = None

    def __repr__(self) -> str:
        return f"Trace({self.path!r}, format={self.format!r})"

    @property
    def volumes(self) -> list[str]:
        """Volume names, indexed by :attr:`TraceChunk.volume`, in order of first appearance.  Known
        after one complete pass of :meth:`chunks`; asking before makes that pass (parsing only)."""
        if self._volumes is None:
            for _ in self.chunks():
                pass
        assert self._volumes is not None
        return list(self._volumes)

    def _parser(self) -> F.Parser:
        if self.format == "fio-iolog":
            return F.FioIolog(self.fio_version)
        if self.format == "blkparse":
            return F.Blkparse(self.blkparse_event)
        if self.format == "msr":
            return C.Msr()
        return C.Csv(self._header(), self.path)

    def _header(self) -> bytes:
        try:
            with open_stream(self.path) as f:
                return f.readline(T.MAX_LINE)
        except _READ_ERRORS as e:
            raise TraceError(f"cannot read trace {self.path}: {_why(e)}", path=self.path) from e

    def chunks(self) -> Iterator[TraceChunk]:
        """The records in file order, ``chunk_records`` per chunk (the last one shorter).  Streaming:
        the file is read in blocks of whole lines, each parsed with numpy and released."""
        parser = self._parser()
        bad_total = 0
        total = 0
        pending: list[F.Records] = []
        pending_n = 0
        try:
            f = open_stream(self.path)
        except _READ_ERRORS as e:
            raise TraceError(f"cannot read trace {self.path}: {_why(e)}", path=self.path) from e
        with f:
            try:
                for buf, size, first_line in T.iter_blocks(f, T.BLOCK_BYTES):
                    rec, bad = parser.parse(buf, size, first_line)
                    worst = bad.first()
                    if worst is not None:
                        if not self.skip_bad:
                            rel, reason = worst
                            self._raise(buf, size, first_line, rel, reason)
                        bad_total += len(bad.all())
                    if len(rec.op):
                        pending.append(rec)
                        pending_n += len(rec.op)
                    while pending_n >= self.chunk_records:
                        chunk, pending, pending_n = _take(pending, self.chunk_records)
                        total += len(chunk)
                        yield chunk
            except T.LineTooLong as e:
                raise TraceError(f"{self.path}: line {e.line}: longer than {T.MAX_LINE} bytes "
                                 f"(not a {self.format} trace?)", path=self.path, line=e.line) from None
            except _READ_ERRORS as e:
                raise TraceError(f"cannot read trace {self.path}: {_why(e)}",
                                 path=self.path) from e
        if pending_n:
            chunk, pending, pending_n = _take(pending, pending_n)
            total += len(chunk)
            yield chunk
        self.bad_records = bad_total
        self.records = total
        self._volumes = parser.volumes()

    def _raise(self, buf: np.ndarray, size: int, first_line: int, rel: int, reason: str) -> None:
        text = bytes(buf[:size]).split(b"\n")[rel].rstrip(b"\r")
        shown = text[:120].decode("utf-8", "backslashreplace") + ("..." if len(text) > 120 else "")
        line = first_line + rel
        raise TraceError(f"{self.path}: line {line}: malformed {self.format} record: {reason}: {shown!r}"
                         " (skip_bad / --skip-bad skips and counts such records)",
                         path=self.path, line=line)


def _take(pending: list[F.Records], n: int) -> tuple[TraceChunk, list[F.Records], int]:
    """The first ``n`` pending records as a chunk, and what remains."""
    names = ("time", "op", "offset", "length", "volume", "line")
    if len(pending) == 1 and len(pending[0].op) == n:
        r = pending[0]
        return TraceChunk(*(getattr(r, k) for k in names)), [], 0
    cols = {k: np.concatenate([getattr(r, k) for r in pending]) for k in names}
    total = len(cols["op"])
    chunk = TraceChunk(*(cols[k][:n] for k in names))
    if total == n:
        return chunk, [], 0
    rest = F.Records(*(cols[k][n:] for k in names))
    return chunk, [rest], total - n


#: compressed files are read through the standard library's decompressors, found by their magic bytes
_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


_READ_ERRORS = (OSError, EOFError, lzma.LZMAError)


def _why(e: BaseException) -> str:
    return str(getattr(e, "strerror", None) or e or type(e).__name__)


def open_stream(path: str) -> BinaryIO:
    """``path`` opened for reading bytes, decompressed on the fly when it is gzip, bzip2 or xz (told by
    its first bytes, not its name): public traces are often shipped compressed (``hm_0.csv.gz``).

    Only a regular file is a trace (an OSError otherwise): a trace is read more than once (its format
    sniffed, its header, its records), which a pipe cannot give, and opening a FIFO nobody writes to
    would wait for ever; it is opened non-blocking to find that out."""
    if "\0" in path:
        raise OSError(errno.EINVAL, "the path contains a NUL byte")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a trace is read more than once: a pipe, FIFO or "
                                        "device cannot be one)")
        os.set_blocking(fd, True)
        f = open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    try:
        magic = f.read(6)
        f.seek(0)
    except OSError:
        f.close()
        raise
    for prefix, opener in _COMPRESSED:
        if magic.startswith(prefix):
            # (mypy: gzip/bz2/lzma file objects are binary streams; typeshed does not call them BinaryIO)
            return opener(f, "rb")  # type: ignore[return-value]
    return f


def sniff_format(path: str | os.PathLike[str]) -> str:
    """The format of a trace file, from its first bytes; TraceError when it matches none."""
    p = os.fspath(path)
    try:
        with open_stream(p) as f:
            head = f.read(SNIFF_BYTES)
    except _READ_ERRORS as e:
        raise TraceError(f"cannot read trace {p}: {_why(e)}", path=p) from e
    if F.sniff_fio(head) is not None:
        return "fio-iolog"
    if F.sniff_blkparse(head):
        return "blkparse"
    if C.sniff_msr(head):
        return "msr"
    if C.sniff_csv(head):
        return "csv"
    raise TraceError(f"{p}: cannot tell the trace format from the first line; give it "
                     f"(one of {', '.join(FORMATS)})", path=p, line=1)


def open_trace(path: str | os.PathLike[str], format: str | None = None, *, chunk_records: int = 1 << 20,
               skip_bad: bool = False, blkparse_event: str = "Q") -> Trace:
    """Open a block I/O trace for streaming (:meth:`Trace.chunks`).

    ``format``: one of :data:`FORMATS`, or None to sniff it; ``chunk_records``: records per chunk
    (1 .. :data:`MAX_CHUNK_RECORDS`); ``skip_bad``: skip malformed records and count them in
    :attr:`Trace.bad_records` instead of raising :class:`~thinpool.errors.TraceError`;
    ``blkparse_event``: which blkparse action to replay, ``"Q"`` (queued, default), ``"D"`` (issued)
    or ``"C"`` (completed)."""
    p = os.fspath(path)
    if not isinstance(chunk_records, int) or isinstance(chunk_records, bool) \
            or not 1 <= chunk_records <= MAX_CHUNK_RECORDS:
        raise TraceError(f"chunk_records must be an integer from 1 to {MAX_CHUNK_RECORDS}, "
                         f"not {chunk_records!r}")
    if blkparse_event not in ("Q", "D", "C"):
        raise TraceError(f"blkparse_event must be Q, D or C, not {blkparse_event!r}")
    if format is None:
        format = sniff_format(p)
    if format not in FORMATS:
        raise TraceError(f"unknown trace format {format!r} (one of {', '.join(FORMATS)})")
    fio_version = 3
    if format == "fio-iolog":
        try:
            with open_stream(p) as f:
                head = f.read(256)
        except _READ_ERRORS as e:
            raise TraceError(f"cannot read trace {p}: {_why(e)}", path=p) from e
        version = F.sniff_fio(head)
        if version is None:
            first = head.split(b"\n", 1)[0][:80].decode("utf-8", "backslashreplace")
            raise TraceError(f"{p}: line 1: not a fio iolog: the first line must be 'fio version 2 iolog' "
                             f"or 'fio version 3 iolog', not {first!r}", path=p, line=1)
        fio_version = version
    trace = Trace(p, format, chunk_records=chunk_records, skip_bad=bool(skip_bad),
                  blkparse_event=blkparse_event, fio_version=fio_version)
    if format == "csv":
        trace._parser()           # the header is checked now
    return trace
