"""Writes and flushes that never report success for less than was asked (the host-filesystem seam).

``pwrite`` may store fewer bytes than asked (a nearly full filesystem, a signal, a file size limit);
``fdatasync`` may fail once and then forget the error (Linux's writeback error semantics).  Every
pool write of metadata goes through :func:`write_all` (loop on short counts, raise on 0 or an error)
and every flush through :func:`sync_or_fail`; both raise :class:`~thinpool.errors.HostIOError`
carrying the errno and the file.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ctypes

from .errors import HostIOError


def write_all(pwrite: Any, fd: int, data: Any, offset: int, path: str) -> None:
    """``pwrite`` all of ``data`` at ``offset``: a short count continues with the rest; a count of 0
    or an error raises :class:`~thinpool.errors.HostIOError` (with the errno; ENOSPC for a 0 count)
    naming ``path`` and the byte range never written.

    A write that needed more than one call is read back and compared: a layer that reports a short
    count for bytes it did not store (e.g. ``strace -e inject=pwrite64:retval=N``, which skips the
    call) is caught, and the whole range is written again (once; a second mismatch raises EIO)."""
    view = memoryview(data).cast("B")
    for attempt in range(2):
        if _write_loop(pwrite, fd, view, offset, path) == 1 or _reads_back(fd, view, offset):
            return
    raise HostIOError(f"writing {path} at byte {offset}: {len(view)} bytes read back differ from what was "
                      f"written twice", errno.EIO, path)


_READ_BACK = 1 << 30  # bytes compared per pread


def _reads_back(fd: int, view: memoryview, offset: int) -> bool:
    """Whether the file holds ``view`` at ``offset`` (True when ``fd`` cannot be read: write-only)."""
    try:
        for a in range(0, len(view), _READ_BACK):  # one pread returns at most 2 GiB - 4 KiB on Linux
            b = min(len(view), a + _READ_BACK)
            if os.pread(fd, b - a, offset + a) != view[a:b]:
                return False
        return True
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return True
        raise


def _write_loop(pwrite: Any, fd: int, view: memoryview, offset: int, path: str) -> int:
    """Write all of ``view``; returns the number of calls it took (raises on 0 or an error)."""
    done, n, calls = 0, len(view), 0
    while done < n:
        calls += 1
        try:
            w = pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise HostIOError(f"writing {path} at byte {offset + done} ({n - done} of {n} bytes not "
                              f"written): {os.strerror(err)}", err, path) from None
        if not isinstance(w, int) or w <= 0 or w > n - done:
            raise HostIOError(f"writing {path} at byte {offset + done}: the write stored {w!r} of "
                              f"{n - done} bytes (host filesystem full?)", errno.ENOSPC, path)
        done += w
    return calls


def sync_or_fail(fdatasync: Any, fd: int, path: str) -> None:
    """``fdatasync(fd)``; a failure raises :class:`~thinpool.errors.HostIOError` with its errno."""
    try:
        fdatasync(fd)
    except OSError as exc:
        err = exc.errno or errno.EIO
        raise HostIOError(f"flushing {path} failed: {os.strerror(err)}; what was written since the "
                          f"last flush may be lost", err, path) from None


class DataIO:
    """The data file's flush and hole punch (``DataDevice.io``); tests substitute a fault-injecting
    layer (EIO/ENOSPC from fdatasync or fallocate)."""

    fdatasync = staticmethod(os.fdatasync)

    @staticmethod
    def punch_hole(fd: int, offset: int, length: int) -> None:
        """``fallocate(PUNCH_HOLE | KEEP_SIZE)`` of ``length`` bytes at ``offset``; OSError on failure."""
        if libc().fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            import ctypes
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def load_libc() -> ctypes.CDLL:
    """The C library, for the calls the ``os`` module lacks: glibc's ``libc.so.6`` directly (already in
    the process: no file search), ``ctypes.util.find_library`` only where that name is not found --
    it runs ``ldconfig -p`` (or a compiler) in a subprocess, 0.1-0.2 s that every command importing
    this module paid (``thinpool ls`` of 100,000 volumes: docs/performance.md, S10)."""
    import ctypes
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library
        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc: Any = None


def libc() -> "ctypes.CDLL":
    """The C library with the prototypes used here, loaded on first use (ctypes' import is about 2 ms
    of every command that imports this module; ``status``, ``ls`` and ``snapshot`` never call C).  A
    module whose compiled code may fail calls it at import: :func:`last_errno` must not be the first
    use (loading the library may itself change ``errno``)."""
    global _libc
    if _libc is None:
        import ctypes
        lib = load_libc()
        lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        try:
            lib.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        except AttributeError:  # (not Linux's C library: start_writeback does nothing)
            pass
        lib.__errno_location.restype = ctypes.POINTER(ctypes.c_int)
        _libc = lib
    return _libc


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` of the file back to its device without waiting
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): a later ``fdatasync`` finds the I/O under way and
    waits only for what is left of it.  Durability still comes from that ``fdatasync`` alone: this
    call never reports a write-back error (it neither waits nor checks the file's error state, so
    the ``fdatasync`` after it reports one as before), and a failure of its own is ignored."""
    fn = getattr(libc(), "sync_file_range", None)
    if fn is not None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def last_errno() -> int:
    """This thread's C ``errno`` (what a failed system call made from compiled code left), or EIO
    when it is 0."""
    try:
        return int(libc().__errno_location().contents.value) or errno.EIO
    except AttributeError:  # not glibc
        return errno.EIO
