"""The data device: a sparse file where data block n lives at byte n x block size.

The kernels move its bytes with pread(2)/pwrite(2) (one call per run of blocks), so a data file
truncated or failing under an open pool is an error code -- HostIOError naming the file -- and not
SIGBUS, which a mapped page past the file's new end raises.  The file is also mapped read-only
(``mm``) for one path only: ``Thin.read`` of a single mapped block slices it, the map watched by
:mod:`thinpool.faultguard` (a page lost to a truncation is a counted fault, the read then redone
with pread) or, where that cannot be, after checking the file's length (docs/design.md, "Files
changed under an open pool").  Blocks are
hole-punched (``fallocate(PUNCH_HOLE)``) by ``thinpool trim``, by a discard's passdown and, with the
pool setting ``punch_freed_blocks``, whenever they are freed -- always only once no durable commit
maps them (:mod:`thinpool.poolspace`).  Otherwise a freed block keeps its bytes, as on a dm-thin data
device, and the write kernels zero a reused block where a write does not cover it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import sys
import threading
from typing import Any

import numpy as np

from . import faultguard, pooldir
from .errors import FailedPrecondition, HostIOError
from .hostio import DataIO, load_libc, sync_or_fail, write_all

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = load_libc()
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def runs(blocks: np.ndarray) -> list[tuple[int, int]]:
    """Sorted block numbers -> (first, count) runs of consecutive blocks."""
    if len(blocks) == 0:
        return []
    b = np.sort(np.asarray(blocks, np.int64))
    breaks = np.flatnonzero(np.diff(b) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(b)]))
    return [(int(b[s]), int(e - s)) for s, e in zip(starts, ends)]


def short_file_mapped(data_rc: np.ndarray | None, first: int) -> np.ndarray:
    """Mapped blocks (``data_rc`` > 0) at or after block ``first``: those a data file of
    ``first`` whole blocks has lost."""
    if data_rc is None:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.asarray(data_rc)[first:] > 0).astype(np.int64) + first


def short_file_error(path: str, size: int, block_size: int, nr_blocks: int, past: np.ndarray,
                     read_only: bool) -> FailedPrecondition:
    """The error for a data file of ``size`` bytes shorter than the pool (see DataDevice)."""
    expected = nr_blocks * block_size
    msg = f"data file {path} is {size} bytes, shorter than the pool's {nr_blocks} blocks of {block_size} bytes " \
          f"({expected} bytes)"
    if len(past):
        first = ", ".join(str(int(b)) for b in past[:8]) + (", ..." if len(past) > 8 else "")
        msg += (f": {len(past)} mapped data blocks lie past its end (blocks {first}); their data is gone. "
                f"Run `thinpool repair` to drop those mappings and re-extend the file")
    else:
        msg += ": no mapped block lies past its end; a read-write open re-extends it"
    return FailedPrecondition(msg)


#: whether a commit may start the data file's flush on the helper thread (:class:`BackgroundFlush`);
#: False: every flush runs in the committing thread
BACKGROUND_FLUSH = True
#: flushes an open data file makes itself before it uses the helper: the helper's first use costs
#: about 10 ms of CPU (loading its kernels, starting the thread), more than a command that commits
#: once or twice (the CLI's) could gain
HELPER_AFTER = 2
#: how long :meth:`DataDevice.sync` waits for a flush the helper began before it flushes itself: its
#: own flush would wait for the same write-back and then flush the device's cache once more (about
#: 60 us); a helper that waits for a CPU (a loaded machine) costs at most this
WAIT_FOR_HELPER_NS = 200_000


class BackgroundFlush:
    """The process's helper thread that runs a data file's ``fdatasync`` while the committing thread
    makes the commit's metadata pages (:mod:`thinpool.kernels_flush`: it never takes the GIL, so it
    starts the flush at once, whatever Python code runs meanwhile).  One request at a time: a second
    pool committing meanwhile flushes its file itself.  Made on first use in each process (a forked
    child makes its own); a daemon thread, idle between requests.  Used only where numba is loaded
    (its JIT enabled) and the file's flush is the real ``os.fdatasync`` (:class:`~thinpool.hostio.DataIO`)."""

    def __init__(self) -> None:
        self._pid = -1
        self._ctl: Any = None
        self._kf: Any = None
        self._guard = threading.Lock()

    def _ready(self) -> bool:
        """Whether this process's helper runs (started now if not yet, or after a fork)."""
        if self._pid == os.getpid():
            return self._ctl is not None
        with self._guard:
            if self._pid != os.getpid():
                self._ctl = None
                try:
                    from numba import config
                    # (without the JIT the kernels would run as Python, holding the GIL; mypy:
                    # numba's config settings are set at run time, not annotated)
                    if config.DISABLE_JIT:  # type: ignore[attr-defined]
                        raise ImportError("numba's JIT is disabled")
                    from . import kernels_flush as kf
                    ctl = np.zeros(kf.CTL_WORDS, np.int64)
                    base = ctl.ctypes.data
                    lock_bytes = 8 * kf.LOCK_WORDS
                    if _libc.pthread_mutex_init(ctypes.c_void_p(base), None) == 0 and \
                            _libc.pthread_cond_init(ctypes.c_void_p(base + lock_bytes), None) == 0:
                        threading.Thread(target=kf.flush_loop, args=(ctl,), name="thinpool-data-flush",
                                         daemon=True).start()
                        self._ctl, self._kf = ctl, kf
                except Exception:  # (no helper: every flush runs in the committing thread)
                    self._ctl = None
                self._pid = os.getpid()
        return self._ctl is not None

    def start(self, fd: int) -> bool:
        """Ask the helper to flush ``fd``; False when it cannot now (none in this process, or busy with
        another pool's flush): the caller flushes itself."""
        return self._ready() and self._kf.flush_start(self._ctl, fd) == 0

    def finish(self, wait_ns: int = 0) -> int:
        """The end of the request :meth:`start` made: 0 when the flush succeeded, its errno when it
        failed, a negative value when it has not returned (after waiting at most ``wait_ns`` for a
        flush the helper began) or not begun: the caller flushes (:func:`thinpool.kernels_flush.flush_finish`)."""
        return int(self._kf.flush_finish(self._ctl, wait_ns))


_background = BackgroundFlush()


class DataDevice:
    """A sparse data file of ``nr_blocks`` blocks of ``block_size`` bytes, open as ``fd`` (read and
    written with pread/pwrite) and mapped read-only as ``mm`` (the mmap.mmap, None while unmapped)
    for the per-call read's fast path."""

    def __init__(self, path: str, block_size: int, nr_blocks: int, *, read_only: bool = False,
                 owner: str | None = None, pool_path: str | None = None,
                 data_rc: np.ndarray | None = None, allow_foreign: bool | None = None) -> None:
        """Open the data file of pool ``owner`` (its uuid) at ``pool_path``.

        Takes the file's flock (exclusive read-write, shared read-only) and checks its owner stamp
        (:mod:`thinpool.ownership`; a read-write open adopts an unstamped file).  A file shorter than
        the pool is refused when any block at or past its end is mapped (``data_rc`` > 0) or the
        open is read-only; a read-write open re-extends a file whose missing tail maps nothing.
        """
        from . import ownership
        self.path = path
        self.block_size = block_size
        self.nr_blocks = nr_blocks
        self.read_only = read_only
        self.owner = owner or None
        self.pool_path = pool_path or os.path.dirname(path)
        self.mm: mmap.mmap | None = None
        self.fd = pooldir.open_pool_file(path, os.O_RDONLY if read_only else os.O_RDWR,
                                         allow_foreign=allow_foreign, what="data file")
        try:
            ownership.lock(self.fd, path, read_only)
            if self.owner:
                ownership.check_owner(path, self.owner, self.pool_path, fd=self.fd, adopt=not read_only)
            self.scratch = np.empty(block_size, np.uint8)  # one block, for copy-on-write merges
            size = os.fstat(self.fd).st_size
            if size < nr_blocks * block_size:
                past = short_file_mapped(data_rc, size // block_size)
                if read_only or len(past):
                    raise short_file_error(path, size, block_size, nr_blocks, past, read_only)
                try:
                    os.ftruncate(self.fd, nr_blocks * block_size)
                except OSError as exc:
                    err = exc.errno or errno.EIO
                    raise HostIOError(f"extending data file {path} to {nr_blocks * block_size} bytes failed: "
                                      f"{os.strerror(err)}", err, path) from None
            self._map()
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    @staticmethod
    def create(path: str, size: int, mode: int = 0o600, allow_foreign: bool | None = None) -> None:
        """Create (or extend) a sparse data file of ``size`` bytes with truncate (a new file gets
        ``mode``; opened with :func:`thinpool.pooldir.open_pool_file`: no symlink, owner checked)."""
        fd = pooldir.open_pool_file(path, os.O_RDWR | os.O_CREAT, mode, allow_foreign=allow_foreign,
                                    what="data file")
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise HostIOError(f"sizing data file {path} to {size} bytes failed: {os.strerror(err)}", err,
                              path) from None
        finally:
            os.close(fd)

    #: the :func:`thinpool.faultguard.guard` slot watching :attr:`mm` (-1: not watched), and its fault
    #: count when mapped: a page of ``mm`` past the end of a file truncated under the pool reads as
    #: zeroes, counted, instead of raising SIGBUS (:meth:`remap_if_faulted` maps the file again)
    guard = -1
    guard_hits = 0
    #: the descriptor ``kernels.locate_read`` checks the file's length on before ``Thin.read`` slices
    #: :attr:`mm` (an lseek(2)): -1 -- no check -- while the map is guarded, since a fault is then counted
    lseek_fd = -1

    def _map(self) -> None:
        length = self.nr_blocks * self.block_size
        try:
            self.mm = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ) if length else None
        except ValueError:  # a file now shorter than the pool (truncated under it): see _map_past_end
            self.mm = self._map_past_end(length)
        self.guard = -1 if self.mm is None else faultguard.guard(self.mm, faultguard.address_of(self.mm), length)
        self.guard_hits = faultguard.hits(self.guard)
        self.lseek_fd = -1 if self.guard >= 0 else self.fd

    def _map_past_end(self, length: int) -> mmap.mmap:
        """A map of the file's first ``length`` bytes when the file is shorter (the ``mmap`` module
        refuses that): an anonymous reservation with the file mapped over it privately (reads see the
        file's pages; the pages past its end fault, counted by the guard).  HostIOError if the host
        cannot map it."""
        from .mdpages import MAP_SPARSE, map_private
        mm = mmap.mmap(-1, length, flags=MAP_SPARSE)
        if not map_private(faultguard.address_of(mm), length, self.fd, 0):
            mm.close()
            raise HostIOError(f"cannot map the data file {self.path} again after a page of it faulted "
                              f"(the file was truncated under the open pool)", errno.EIO, self.path)
        return mm

    def remap_if_faulted(self) -> None:
        """Map the file again if a page of :attr:`mm` faulted since it was mapped (the page now reads as
        zeroes; the new map shows the file as it is)."""
        if self.guard >= 0 and faultguard.hits(self.guard) != self.guard_hits:
            self._unmap()
            self._map()

    def _unmap(self) -> None:
        faultguard.unguard(self.guard)
        self.guard = -1
        self.lseek_fd = self.fd
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                # a view is still referenced (e.g. a reference cycle left by numba's first compile):
                # collect and retry; failing that, the map is closed when the last view goes away
                import gc
                gc.collect()
                try:
                    self.mm.close()
                except BufferError:
                    pass
            self.mm = None

    def resize(self, nr_blocks: int) -> None:
        """Grow the file (sparse) to ``nr_blocks`` blocks and remap it (a failed ``ftruncate`` leaves the
        file, its map and ``nr_blocks`` as they were)."""
        os.ftruncate(self.fd, nr_blocks * self.block_size)
        self._unmap()
        self.nr_blocks = nr_blocks
        self._map()

    #: the flush and hole-punch calls (class-level so a test can swap them for every device)
    io: DataIO = DataIO()

    #: a flush :meth:`start_sync` handed to the helper thread, not yet ended by :meth:`sync`
    _flush_started = False
    #: the helper's descriptor of the file (another open of it: see :meth:`start_sync`), -1 until needed
    _flush_fd = -1
    #: calls of :meth:`start_sync` so far (see :data:`HELPER_AFTER`)
    _sync_starts = 0

    def start_sync(self) -> bool:
        """Start flushing every write so far on the helper thread (:class:`BackgroundFlush`), for
        :meth:`sync` to end; False (nothing started) when no helper can (numba not loaded or its JIT
        disabled, a substituted flush in ``io``, a flush already started, a read-only file) and for
        this open file's first :data:`HELPER_AFTER` calls.  The caller must call
        :meth:`sync` before anything that relies on those writes being durable.  The helper flushes
        through its own open of the file (``/proc/self/fd``: the same file, whatever its path names
        now), so a write-back error is reported to each descriptor's flush: one the helper saw is
        still reported to this descriptor's own flush (Linux reports an error once per open file)."""
        self._sync_starts += 1
        if self._sync_starts <= HELPER_AFTER or self.read_only or self._flush_started or not BACKGROUND_FLUSH \
                or self.fd < 0 or self.io.fdatasync is not os.fdatasync or "numba" not in sys.modules:
            return False  # (a substituted flush -- a test's fault injection, a scratch pool's none -- runs here)
        if self._flush_fd < 0:
            try:
                self._flush_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        self._flush_started = _background.start(self._flush_fd)
        return self._flush_started

    def sync(self) -> None:
        """Make every write so far durable (dm-thin flushes the data device before committing).  Ends
        the flush :meth:`start_sync` started: done when the helper's flush has returned (waiting at
        most :data:`WAIT_FOR_HELPER_NS` for one it began), else (not begun, or not yet returned) this
        descriptor's own flush, which waits for the write-back under way.  A failed flush raises :class:`~thinpool.errors.HostIOError` (the writes may be lost)."""
        if self.read_only:
            return
        if self._flush_started:
            self._flush_started = False
            err = _background.finish(WAIT_FOR_HELPER_NS)
            if err == 0:
                return
            if err > 0:
                raise HostIOError(f"flushing {self.path} failed: {os.strerror(err)}; what was written since "
                                  f"the last flush may be lost", err, self.path)
        sync_or_fail(self.io.fdatasync, self.fd, self.path)

    def end_sync(self) -> None:
        """End the flush :meth:`start_sync` started, if one is under way (as :meth:`sync`, which
        raises if it failed); nothing otherwise."""
        if self._flush_started:
            self.sync()

    def punch(self, blocks: np.ndarray) -> int:
        """Hole-punch the given data blocks; returns the number of runs punched.

        Every run is tried; if any punch fails (other than "not supported", where the blocks are
        written with zeroes instead) :class:`~thinpool.errors.HostIOError` is raised afterwards
        with ``blocks`` = the data blocks that were *not* punched (they still hold their old bytes)."""
        bs = self.block_size
        todo = runs(blocks)
        failed: list[np.ndarray] = []
        first_err = 0
        for first, count in todo:
            try:
                self.io.punch_hole(self.fd, first * bs, count * bs)
            except OSError as exc:
                err = exc.errno or errno.EIO
                if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                    try:
                        self._write_zeroes(first * bs, count * bs)
                        continue
                    except OSError as exc2:
                        err = exc2.errno or errno.EIO
                first_err = first_err or err
                failed.append(np.arange(first, first + count, dtype=np.int64))
        if failed:
            bad = np.concatenate(failed)
            raise HostIOError(f"punching {len(bad)} data blocks of {self.path} failed ({os.strerror(first_err)}; "
                              f"first block {int(bad[0])})", first_err, self.path, blocks=bad)
        return len(todo)

    def _write_zeroes(self, start: int, length: int) -> None:
        """Write zeroes over ``[start, start+length)`` (a filesystem that cannot punch holes)."""
        zero = bytes(min(length, 1 << 20))
        end = start + length
        while start < end:
            n = min(len(zero), end - start)
            write_all(os.pwrite, self.fd, zero[:n], start, self.path)
            start += n

    def _short_length(self) -> int | None:
        """The data file's length if it is a regular file shorter than the pool (truncated under it by
        another program), else None (one ``fstat``; its OSError propagates)."""
        st = os.fstat(self.fd)
        return st.st_size if stat.S_ISREG(st.st_mode) and st.st_size < self.nr_blocks * self.block_size else None

    def check_length(self) -> None:
        """The data file is still as long as the pool (one ``fstat``; a commit asks): HostIOError (EIO)
        naming it if another program truncated it under the open pool -- the mapped blocks past its new
        end are gone, and a later write past that end would re-extend the file with a hole, so that the
        others read as zeroes."""
        try:
            size = self._short_length()
        except OSError as exc:
            raise HostIOError(f"cannot check the length of the data file {self.path}: {exc.strerror}",
                              exc.errno or errno.EIO, self.path) from None
        if size is not None:
            raise HostIOError(f"the data file {self.path} was truncated under the open pool to {size} bytes "
                              f"(the pool's {self.nr_blocks} blocks take {self.nr_blocks * self.block_size}): "
                              f"the blocks past its end are lost; stop whatever truncates it, then reopen the "
                              f"pool (thinpool repair drops the mappings of the lost blocks)", errno.EIO, self.path)

    def failure(self, err: int) -> tuple[int, str]:
        """(errno, why) for a failed read or write of the data file that left C ``errno`` ``err``: a file
        now shorter than the pool -- truncated under it by another program, where a short read leaves
        ``errno`` as it was -- is EIO saying so with its length; else ``err`` and its text."""
        try:
            size = self._short_length()
        except OSError:
            size = None
        if size is not None:
            return errno.EIO, (f"the file is {size} bytes, shorter than the pool's {self.nr_blocks * self.block_size}: "
                               f"truncated under the open pool by another program")
        return err, os.strerror(err)

    def allocated_blocks(self) -> np.ndarray:
        """Blocks that hold data on the host filesystem (found with SEEK_DATA / SEEK_HOLE)."""
        bs = self.block_size
        end = self.nr_blocks * bs
        out = []
        pos = 0
        while pos < end:
            try:
                start = os.lseek(self.fd, pos, SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if start >= end:
                break
            stop = min(os.lseek(self.fd, start, SEEK_HOLE), end)
            out.append(np.arange(start // bs, (stop + bs - 1) // bs, dtype=np.int64))
            pos = stop
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def check_stamp(self) -> None:
        """Re-check the file's owner stamp before punching: never punch a file another pool has taken
        over (raises as :func:`thinpool.ownership.check_owner` does)."""
        if self.owner:
            from . import ownership
            ownership.check_owner(self.path, self.owner, self.pool_path, fd=self.fd)

    def close(self) -> None:
        if self._flush_started:  # (a request left: over, its result unread -- a commit ends its own)
            self._flush_started = False
            _background.finish()
        if self._flush_fd >= 0:
            os.close(self._flush_fd)
            self._flush_fd = -1
        self._unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NullDataDevice:
    """The data device of a metadata-only pool: no file and no bytes.

    The pool keeps the same block map and data space map and runs the same kernels; they see
    ``fd == -1`` and skip every data transfer (writes store nothing, mapped
    blocks read as zeroes).  Nothing here is proportional to the pool's size, so a pool far larger
    than the host's disks can be simulated (docs/simulate.md, "Metadata-only mode").
    """

    fd = -1
    path = ""
    read_only = False
    io: DataIO = DataIO()  # as DataDevice's (a scratch pool swaps it); never called: there is no file

    def __init__(self, block_size: int, nr_blocks: int, *, read_only: bool = False) -> None:
        self.block_size = block_size
        self.nr_blocks = nr_blocks
        self.read_only = read_only
        self.scratch = np.empty(block_size, np.uint8)  # the kernel table's scratch row (never touched with fd -1)

    def resize(self, nr_blocks: int) -> None:
        self.nr_blocks = nr_blocks

    def start_sync(self) -> bool:
        """Nothing to flush: nothing started."""
        return False

    def end_sync(self) -> None:
        """Nothing started."""

    def sync(self) -> None:
        """Nothing to flush."""

    def punch(self, blocks: np.ndarray) -> int:
        """Nothing to punch: no block ever holds bytes."""
        return 0

    def allocated_blocks(self) -> np.ndarray:
        return np.zeros(0, np.int64)

    def check_length(self) -> None:
        """No file: nothing to check."""

    def failure(self, err: int) -> tuple[int, str]:
        """As :meth:`DataDevice.failure` (never called: no I/O of a file that does not exist fails)."""
        return err, os.strerror(err)

    def check_stamp(self) -> None:
        """No file: nothing another pool could own."""

    def close(self) -> None:
        """Nothing to close."""
