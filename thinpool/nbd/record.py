"""``thinpool serve --record FILE``: every NBD request of every export written as a fio iolog (version 3).

:class:`RecordingProvider` wraps the served pool's :class:`~thinpool.nbd.backend.ExportProvider`; the
exports it opens are :class:`RecordingExport` proxies that log each request reaching the volume into
one :class:`IologRecorder` before running it, in the order the pool serves them (every request runs
under the provider's lock, so the log is the pool's own order).  One file holds every export, as fio's
iolog v3 allows (one ``add``/``open`` per file, ``close`` at the end):

* ``TIME EXPORT read|write|trim OFFSET LENGTH``, TIME in microseconds since the recording started (what
  fio writes and what its replay sleeps on); a FUA write is a ``write`` followed by a ``sync``;
* FLUSH -> ``TIME EXPORT sync 0 0``;
* WRITE_ZEROES -> ``trim`` when the client allows holes (the pool unmaps whole blocks), ``write``
  with ``NO_HOLE`` (real zeroes are written);
* READ, WRITE and TRIM are recorded as the client sent them, also when the pool then fails them
  (e.g. ENOSPC); requests the server refuses before they reach the volume (out of range, read-only,
  bad flags) and BLOCK_STATUS queries are not I/O and are not recorded.

Export names are written with ``%`` and space percent-encoded (``%25``, ``%20``): fio reads a file name
up to the first blank, and names longer than 256 bytes are beyond fio's replay (thinpool's reader has
no such limit).

Buffered: lines go to a 1 MiB buffer, written out when it fills, on every FLUSH or FUA request from a
client (so the log on disk covers at least every request the pool has committed) and when the
recording closes (the server's shutdown).  A crash of the serving process loses at most the requests
since the last flush -- at most one buffer's worth.  A failed write to the log (a full disk) stops the
recording, is logged, and is reported by :attr:`IologRecorder.error`; serving goes on.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from typing import Any, Iterable

from thinpool.safe_output import guard_output

log = logging.getLogger("thinpool.nbd")

#: the log's buffer: written out when full, on FLUSH/FUA, and at close
BUFFER_BYTES = 1 << 20
HEADER = "fio version 3 iolog\n"


def iolog_name(name: str) -> str:
    """An export name as an iolog file name: ``%`` and space percent-encoded."""
    return name.replace("%", "%25").replace(" ", "%20")


def check_record_path(path: Any, pools: Iterable[Any] = ()) -> str:
    """The checks :class:`IologRecorder` makes on its path, without creating anything (so a bad
    ``--record`` fails before a pool is opened): not ``-``, never a pool's file or directory."""
    from thinpool.errors import InvalidArgument
    if path == "-":
        raise InvalidArgument("--record needs a file (not -: serve writes its messages on stdout)")
    return guard_output(path, pools=pools, what="--record file")


class IologRecorder:
    """A fio iolog v3 being written (see the module docstring).  Thread-safe."""

    def __init__(self, path: Any, *, pools: Iterable[Any] = ()) -> None:
        """Create (or truncate) the log at ``path`` after :func:`~thinpool.safe_output.guard_output`'s
        checks (never a file of a pool in ``pools`` or of any open pool; ``-`` is refused: the server
        prints on stdout)."""
        from thinpool.errors import InvalidArgument
        target = check_record_path(path, pools)
        self.path = target
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InvalidArgument(f"--record file {path}: cannot create it: {exc.strerror}") from None
        self._file = io.open(fd, "w", buffering=BUFFER_BYTES, encoding="utf-8", errors="surrogateescape",
                             newline="\n")
        self._lock = threading.Lock()
        self._start_ns = time.monotonic_ns()
        self._files: dict[str, str] = {}     # export name -> its iolog name, once added
        self.records = 0
        self.closed = False
        #: the OSError that stopped the recording, if one did
        self.error: OSError | None = None
        self._write(HEADER)

    def _now_us(self) -> int:
        return (time.monotonic_ns() - self._start_ns) // 1000

    def _write(self, text: str) -> None:
        if self.error is not None or self.closed:
            return
        try:
            self._file.write(text)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        log.error("--record %s: writing the I/O log failed (%s); recording stopped, serving goes on",
                  self.path, exc.strerror or exc)

    def record(self, name: str, action: str, offset: int, length: int) -> None:
        """Log one request of export ``name``: ``action`` is read, write, trim or sync."""
        with self._lock:
            t = self._now_us()
            fname = self._files.get(name)
            if fname is None:
                fname = self._files[name] = iolog_name(name)
                self._write(f"{t} {fname} add\n{t} {fname} open\n")
            self._write(f"{t} {fname} {action} {offset} {length}\n")
            self.records += 1
            if action == "sync":
                self._flush()

    def _flush(self) -> None:
        if self.error is None and not self.closed:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)

    def flush(self) -> None:
        """Write the buffer out (to the OS: no fsync)."""
        with self._lock:
            self._flush()

    def close(self) -> None:
        """``close`` every file, write everything out and fsync; idempotent."""
        with self._lock:
            if self.closed:
                return
            t = self._now_us()
            self._write("".join(f"{t} {f} close\n" for f in self._files.values()))
            self._flush()
            if self.error is None:
                try:
                    os.fsync(self._file.fileno())
                except OSError as exc:
                    self._fail(exc)
            self.closed = True
            try:
                self._file.close()
            except OSError as exc:
                if self.error is None:
                    self._fail(exc)


class RecordingExport:
    """An export whose requests are logged by an :class:`IologRecorder` before they run."""

    def __init__(self, inner: Any, recorder: IologRecorder) -> None:
        self._inner = inner
        self._rec = recorder.record
        self._name = inner.name

    def __getattr__(self, attr: str) -> Any:     # name, size, read_only, block_size, description, ...
        return getattr(self._inner, attr)

    def pread(self, offset: int, length: int) -> bytes:
        self._rec(self._name, "read", offset, length)
        return self._inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self._rec(self._name, "write", offset, len(data))
        self._inner.pwrite(offset, data)

    def flush(self) -> None:
        self._rec(self._name, "sync", 0, 0)
        self._inner.flush()

    def trim(self, offset: int, length: int) -> None:
        self._rec(self._name, "trim", offset, length)
        self._inner.trim(offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        self._rec(self._name, "trim" if may_trim else "write", offset, length)
        self._inner.write_zeroes(offset, length, may_trim)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self._inner.extents(offset, length)


class RecordingProvider:
    """An :class:`~thinpool.nbd.backend.ExportProvider` whose exports record their requests; closing it
    closes the inner provider, then the recording."""

    def __init__(self, inner: Any, recorder: IologRecorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self.lock = inner.lock

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def list_exports(self) -> list[str]:
        return self.inner.list_exports()

    def open_export(self, name: str, read_only: bool) -> RecordingExport:
        return RecordingExport(self.inner.open_export(name, read_only), self.recorder)

    def close(self) -> None:
        try:
            close = getattr(self.inner, "close", None)
            if close is not None:
                close()
        finally:
            self.recorder.close()
