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

Buffered: lines are kept in memory and written out (one ``pwrite``) after 8,192 requests (about
300 KiB), on every FLUSH or FUA request from a client (so the log on disk covers at least every
request the pool has committed) and when the recording closes (the server's shutdown, then fsync).  A
crash of the serving process loses at most the requests since the last flush -- at most one buffer.  A failed write to the log (a full disk) stops the
recording, is logged, and is reported by :attr:`IologRecorder.error`; serving goes on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable

from thinpool.hostio import write_all
from thinpool.safe_output import guard_output

if TYPE_CHECKING:
    from thinpool.nbd.backend import Payload

log = logging.getLogger("thinpool.nbd")

#: requests buffered before the log is written out (also on every FLUSH/FUA and at close)
BUFFER_LINES = 8192
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
    """A fio iolog v3 being written (see the module docstring).  Thread-safe: lines are appended to a
    list under a lock, and written out joined, with one ``pwrite``."""

    def __init__(self, path: Any, *, pools: Iterable[Any] = ()) -> None:
        """Create (or truncate) the log at ``path`` after :func:`check_record_path`'s checks (never a
        file of a pool in ``pools`` or of any open pool; not ``-``: the server prints on stdout)."""
        from thinpool.errors import InvalidArgument
        target = check_record_path(path, pools)
        self.path = target
        try:
            self._fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InvalidArgument(f"--record file {path}: cannot create it: {exc.strerror}") from None
        self._lock = threading.Lock()
        self._start_ns = time.monotonic_ns()
        self._files: dict[str, str] = {}     # export name -> its iolog name, once added
        self._pending: list[str] = [HEADER]
        self._offset = 0                     # bytes written to the file so far
        self.records = 0
        self.closed = False
        #: the OSError that stopped the recording, if one did
        self.error: OSError | None = None

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        log.error("--record %s: writing the I/O log failed (%s); recording stopped, serving goes on",
                  self.path, getattr(exc, "strerror", None) or exc)

    def _add(self, name: str) -> str:
        with self._lock:
            fname = self._files.get(name)
            if fname is None:
                t = (time.monotonic_ns() - self._start_ns) // 1000
                fname = iolog_name(name)
                self._pending.append(f"{t} {fname} add\n{t} {fname} open\n")
                self._files[name] = fname
            return fname

    def record(self, name: str, action: str, offset: int, length: int) -> None:
        """Log one request of export ``name``: ``action`` is read, write, trim or sync."""
        fname = self._files.get(name) or self._add(name)
        with self._lock:
            pending = self._pending
            pending.append(f"{(time.monotonic_ns() - self._start_ns) // 1000} {fname} {action} {offset} "
                           f"{length}\n")
            self.records += 1
            full = action == "sync" or len(pending) >= BUFFER_LINES
        if full:
            self.flush()

    def flush(self) -> None:
        """Write the pending lines out (to the OS: no fsync)."""
        with self._lock:
            lines, self._pending = self._pending, []
            if self.error is not None or self.closed or not lines:
                return
            data = "".join(lines).encode("utf-8", "surrogateescape")
            try:
                write_all(os.pwrite, self._fd, data, self._offset, self.path)
            except OSError as exc:
                self._fail(exc)
                return
            self._offset += len(data)

    def close(self) -> None:
        """``close`` every file, write everything out and fsync; idempotent."""
        with self._lock:
            if self.closed:
                return
            t = (time.monotonic_ns() - self._start_ns) // 1000
            self._pending.extend(f"{t} {f} close\n" for f in self._files.values())
        self.flush()
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.error is None:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    self._fail(exc)
            os.close(self._fd)


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

    def pwrite(self, offset: int, data: Payload) -> None:
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
