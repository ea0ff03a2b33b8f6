"""The pool's lock: a re-entrant lock that compiled readers running without it can exclude themselves from.

Every change to a pool -- its block map, device table, data file contents, mode, a reload -- is made
by a thread holding the pool's re-entrant lock (:meth:`thinpool.pool.Pool.locked`).  The NBD server's
compiled read loop (:mod:`thinpool.kernels_nbd`) serves READs without that lock and without the GIL,
so that reads of several connections run on several CPUs at once.  :class:`PoolLock` lets it do so
safely:

* while at least one such reader is registered (:meth:`PoolLock.add_reader`), the outermost
  acquisition of the pool lock bumps the *generation* counter :attr:`PoolLock.gen` and -- when a
  reader of another thread is registered (a thread's own readers are never reading while it holds the
  lock) -- also takes the *write* side of a POSIX reader-writer lock (``pthread_rwlock_t``,
  writer-preferring, so a stream of reads cannot starve a writer); the outermost release (or a
  ``Condition.wait`` that gives the lock up) releases the write side;
* a compiled reader takes the *read* side around each request's map lookup and ``pread`` and first
  checks that the generation is still the one it was bound at (under the pool lock, from
  :func:`read_binding`); if it moved, some thread has held the pool lock since --
  arrays may have been reallocated, the volume deleted, blocks freed and reused -- and the reader
  goes back to Python to bind again before reading.

So a read either completes entirely before a pool-lock holder starts, or starts after it has finished
and sees its changes: it never sees a half-updated mapping, nor a data block freed and reused under
it.  With no reader registered the lock is a plain re-entrant lock (one Python call of overhead).
"""

from __future__ import annotations

import _thread
import ctypes
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import schema as K
from .errors import HostIOError

#: bytes reserved for a ``pthread_rwlock_t`` (56 on x86-64 glibc; 64 covers every glibc ABI)
RWLOCK_BYTES = 64
#: ``PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP``: a waiting writer blocks new readers
_PREFER_WRITER_NONRECURSIVE = 2


def _pthread() -> Any:
    # glibc's names first: ctypes.util.find_library runs `ldconfig -p` in a subprocess (0.1 s and more
    # that every pool open paid), so it is asked only when neither name loads
    for name in ("libc.so.6", "libpthread.so.0", None):
        if name is None:
            from ctypes.util import find_library
            name = find_library("c")
            if name is None:
                break
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        if hasattr(lib, "pthread_rwlock_wrlock"):
            return lib
    raise OSError("no pthread_rwlock_* in the C library")  # pragma: no cover - every glibc has them


_lib = _pthread()
for _fn in ("pthread_rwlock_init", "pthread_rwlock_wrlock", "pthread_rwlock_unlock", "pthread_rwlockattr_init",
            "pthread_rwlockattr_setkind_np"):
    getattr(_lib, _fn).restype = ctypes.c_int
_lib.pthread_rwlock_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_lib.pthread_rwlock_wrlock.argtypes = [ctypes.c_void_p]
_lib.pthread_rwlock_unlock.argtypes = [ctypes.c_void_p]
_lib.pthread_rwlockattr_init.argtypes = [ctypes.c_void_p]
_lib.pthread_rwlockattr_setkind_np.argtypes = [ctypes.c_void_p, ctypes.c_int]
_wrlock = _lib.pthread_rwlock_wrlock  # a foreign call: releases the GIL while it waits for readers
_unlock = _lib.pthread_rwlock_unlock
_get_ident = _thread.get_ident
_acquire = _thread.RLock.acquire
_release = _thread.RLock.release
#: The plain re-entrant lock's own acquire and release (C calls), for a holder that acts only while no
#: compiled reader is registered -- ``Thin.read``'s fast path: ``plain_acquire(lock)``, then ``if not
#: lock.readers:`` read, then ``plain_release(lock)``; ``Thin.write``'s: ``plain_acquire(lock)``, and
#: if ``lock.readers`` then :meth:`PoolLock.hold_plain` (and :meth:`PoolLock.release` at the end).  It
#: excludes every other holder like ``with lock``; the generation and the write side exist only for
#: registered readers (the same thread cannot register one without holding the lock, so none appears
#: during the hold), and a ``with lock`` nested inside works as it does inside any outermost hold.
#: A fifth of the cost of ``with lock`` (two Python calls): 0.1 us against 0.43-0.54.
plain_acquire = _thread.RLock.acquire
plain_release = _thread.RLock.release


class PoolLock(_thread.RLock):  # type: ignore[misc]  # (final in typeshed; CPython allows subclassing it)
    """A re-entrant lock (``threading.RLock``'s interface, ``Condition``-compatible) that also excludes
    the registered compiled readers while held (see the module docstring).

    Attributes: ``rw`` the reader-writer lock's memory (uint64 array; ``rw.ctypes.data`` is the
    ``pthread_rwlock_t *`` a compiled reader passes to ``pthread_rwlock_rdlock``); ``gen`` a 1-element
    int64 array, bumped at every outermost acquisition while readers are registered; ``readers`` how
    many are registered.
    """

    if TYPE_CHECKING:  # the C RLock's, which Condition uses too; typeshed does not declare it
        def _is_owned(self) -> bool: ...

    def __init__(self) -> None:
        super().__init__()
        self.rw = np.zeros(RWLOCK_BYTES // 8, np.uint64)
        self.gen = np.zeros(1, np.int64)
        self.readers = 0
        self._own: dict[int, int] = {}  # thread ident -> readers that thread registered
        self._depth = 0      # this lock's recursion depth (only the owner changes it)
        self._wr = False     # whether the owner's outermost acquisition took the write side
        self._rw_addr = int(self.rw.ctypes.data)
        attr = np.zeros(2, np.uint64)  # pthread_rwlockattr_t is 8 bytes
        if (_lib.pthread_rwlockattr_init(attr.ctypes.data) or
                _lib.pthread_rwlockattr_setkind_np(attr.ctypes.data, _PREFER_WRITER_NONRECURSIVE) or
                _lib.pthread_rwlock_init(self._rw_addr, attr.ctypes.data)):
            raise OSError(ctypes.get_errno(), "pthread_rwlock_init failed")

    # ------------------------------------------------------------------ the RLock interface
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Like ``RLock.acquire``; the outermost acquisition also excludes registered readers."""
        if not _acquire(self, blocking, timeout):
            return False
        d = self._depth
        self._depth = d + 1
        if not d and self.readers:
            self._exclude()
        return True

    def __enter__(self) -> bool:  # type: ignore[override]  # (typeshed: an alias of acquire(); takes no arguments)
        _acquire(self)
        d = self._depth
        self._depth = d + 1
        if not d and self.readers:
            self._exclude()
        return True

    def release(self) -> None:
        """Like ``RLock.release`` (RuntimeError if this thread does not hold the lock)."""
        if not self._is_owned():
            _release(self)  # raises RuntimeError: cannot release un-acquired lock
        d = self._depth - 1
        self._depth = d
        if not d and self._wr:
            self._wr = False
            _unlock(self._rw_addr)
        _release(self)

    def hold_plain(self) -> None:
        """Make this thread's hold taken with :data:`plain_acquire` what ``with lock`` makes it: count it
        and, as the outermost, exclude the registered compiled readers (the write side, the generation);
        release it then with :meth:`release`.  For a writer that took the lock the plain way and then
        found readers registered (``Thin.write``'s fast path)."""
        d = self._depth
        self._depth = d + 1
        if not d and self.readers:
            self._exclude()

    def __exit__(self, *exc: object) -> None:
        d = self._depth - 1
        self._depth = d
        if not d and self._wr:
            self._wr = False
            _unlock(self._rw_addr)
        _release(self)

    # threading.Condition waits with these: give the lock up entirely, then take it back
    def _release_save(self) -> Any:
        depth, self._depth = self._depth, 0
        if self._wr:
            self._wr = False
            _unlock(self._rw_addr)
        return super()._release_save(), depth  # type: ignore[misc]  # (the C RLock's; not in typeshed)

    def _acquire_restore(self, state: Any) -> None:
        inner, depth = state
        super()._acquire_restore(inner)  # type: ignore[misc]  # (the C RLock's; not in typeshed)
        self._depth = depth
        if self.readers:
            self._exclude()

    def inspecting(self) -> "_Inspecting":
        """The lock held only to *look* (``with lock.inspecting(): ...``): it excludes other holders like
        ``with lock``, but as the outermost acquisition it neither bumps the generation nor takes the
        write side, so the registered readers' bindings stay valid.  For a compiled reader binding
        (again) -- every binding would otherwise invalidate every other connection's, and two
        connections would rebind in turn at every request.  Nothing may be changed under it that a
        compiled reader reads (nested ``with lock`` inside it does not exclude them either)."""
        return _Inspecting(self)

    def _exclude(self) -> None:
        # a thread's own readers cannot be reading while it holds the lock (a session runs its compiled
        # loop only outside it): the write side is needed only against other threads' readers -- but
        # the generation moves for every holder, so every reader binds again after any change
        if self.readers > self._own.get(_get_ident(), 0):
            if _wrlock(self._rw_addr):
                raise OSError(ctypes.get_errno(), "pthread_rwlock_wrlock failed")
            self._wr = True
        self.gen[0] += 1

    # ------------------------------------------------------------------ readers
    def add_reader(self) -> None:
        """Register a compiled reader (call with the lock held): from the next outermost acquisition
        on, holders exclude it.  The caller binds after this call, so it reads only state that every
        later holder will guard."""
        if not self._is_owned():
            raise RuntimeError("PoolLock.add_reader needs the lock held")
        self.readers += 1
        me = _get_ident()
        self._own[me] = self._own.get(me, 0) + 1

    def drop_reader(self) -> None:
        """Unregister a compiled reader (call with the lock held, after it stopped reading)."""
        if not self._is_owned():
            raise RuntimeError("PoolLock.drop_reader needs the lock held")
        if self.readers <= 0:
            raise RuntimeError("PoolLock.drop_reader without add_reader")
        me = _get_ident()
        n = self._own.get(me, 0)
        if n <= 0:
            raise RuntimeError("PoolLock.drop_reader from a thread that registered no reader")
        self.readers -= 1
        if n == 1:
            del self._own[me]
        else:
            self._own[me] = n - 1

    @property
    def rw_address(self) -> int:
        """The ``pthread_rwlock_t *`` compiled readers lock for reading."""
        return self._rw_addr

    def __repr__(self) -> str:
        return f"<PoolLock depth={self._depth} readers={self.readers} gen={int(self.gen[0])}>"


class _Inspecting:
    """:meth:`PoolLock.inspecting`'s context manager."""

    __slots__ = ("lock",)

    def __init__(self, lock: PoolLock) -> None:
        self.lock = lock

    def __enter__(self) -> bool:
        lock = self.lock
        _acquire(lock)
        lock._depth += 1
        return True

    def __exit__(self, *exc: object) -> None:
        self.lock.__exit__()


class ReadBinding(NamedTuple):
    """What a compiled reader needs to read one volume without the pool's lock (see
    :func:`read_binding`): valid while ``lock.gen[0] == gen``."""

    table: np.ndarray   # the kernels' array table (``kernels.read_one_pread``'s ``tab``)
    devs: np.ndarray    # the device table (int64 rows)
    slot: int           # the volume's row in it
    fd: int             # the data file's descriptor (-1: a metadata-only pool, reads zeroes)
    size: int           # the volume's size in bytes
    gen: int            # the lock's generation the binding was taken at
    lock: PoolLock
    keep: tuple         # the arrays ``table`` holds the addresses of (kept alive with the binding)
    writable: bool = False  # whether the pool took writes at the binding (open, writable, write mode)
    data_bytes: int = 0     # the data file's size the pool expects (a shorter file was truncated)


def read_binding(thin: Any) -> ReadBinding | None:
    """Bind a compiled reader to volume ``thin`` (a :class:`~thinpool.thin.Thin`); call with the pool's
    lock held and a reader registered (:meth:`PoolLock.add_reader`).  None when its reads need the
    Python path: the pool is closed, the volume gone, or it reads unmapped blocks from an external
    origin (whose file is checked in Python on every use).  ``writable`` says whether it may also
    overwrite provisioned, unshared blocks in place (the pool is open read-write in write mode and has
    a data file) -- the mode changes only under the pool lock, so only with the generation."""
    ctx = thin._ctx
    lock = ctx.lock
    if not lock._is_owned():
        raise RuntimeError("read_binding needs the pool's lock held")
    key = thin._key
    slot = ctx.slots.get(key)
    try:
        ctx.fault_check()  # the pool's mapped metadata rows faulted: it fails (the Python path answers EIO)
    except HostIOError:
        return None
    if slot is None or not ctx.readable or key in ctx.origins.by_key:
        return None
    table = ctx.table()
    data = ctx.data
    return ReadBinding(table, ctx.devs_i, int(slot), int(data.fd), int(ctx.devs_i[slot, K.DEV_SIZE]),
                       int(lock.gen[0]), lock, ctx._tab_arrays, bool(ctx.fast_write and data.fd >= 0),
                       int(data.nr_blocks) * int(data.block_size))


__all__ = ["PoolLock", "RWLOCK_BYTES", "ReadBinding", "plain_acquire", "plain_release", "read_binding"]
