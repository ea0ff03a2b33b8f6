"""What the per-call I/O path needs of a pool, in one object the pool owns.

:class:`~thinpool.thin.Thin` does its I/O through a :class:`KernelContext`, never through the
pool's private attributes.  The pool keeps the context current: it calls :meth:`KernelContext.refresh`
whenever it replaces an array the kernels use (a reload, a new page of device slots), and sets
:attr:`KernelContext.fast_write` whenever its mode or open state changes.  Everything here is
internal to the engine (``thinpool.pool`` and ``thinpool.thin``); front ends use the pool's public
methods.

Volumes are keyed by :func:`volume_key` (device id and creation generation), so a handle follows
its volume through a rename and never confuses it with a later volume that reuses the device id.
"""

from __future__ import annotations

import errno
import functools
from typing import TYPE_CHECKING, Any, Callable, TypeVar, cast

import numpy as np

from . import faultguard
from . import schema as K
from .errors import HostIOError
from .origin import Origins
from .poollock import PoolLock
from .schema import Mode

if TYPE_CHECKING:
    from .pool import Pool


_F = TypeVar("_F", bound=Callable[..., Any])


def locked_method(fn: _F) -> _F:
    """Run a pool method under the pool's lock (``self._engine.lock``), keeping its name, docstring
    and signature (``functools.wraps``: ``inspect.signature`` and ``help()`` show the real one)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self._engine.lock:
            return fn(self, *args, **kwargs)
    return cast(_F, wrapper)  # (functools.wraps keeps fn's signature; mypy cannot see that)


def volume_key(dev_id: int, gen: int) -> int:
    """One int naming a volume for ever: its 24-bit device id and its creation generation."""
    return (gen << 24) | dev_id


class KernelContext:
    """The pool state the kernels and :mod:`thinpool.thin` use (see the module docstring).

    Attributes (read them under :attr:`lock`; only the pool assigns them):
    ``lock`` the pool's re-entrant :class:`~thinpool.poollock.PoolLock`; ``keys`` name -> volume key; ``slots`` volume key -> device-table
    slot; ``names`` volume key -> name; ``is_open`` false once the pool is closed; ``devs_i`` the device table as int64 rows (``schema.DEV_*`` columns); ``devs_dirty`` slots
    changed since the last commit; ``st`` the kernels' state vector; ``nodes_map`` the block map;
    ``space`` the data space map; ``data`` the data device; ``one_io`` a (2, 1) int64 scratch for
    one [offset], [length] pair; ``fast_write`` true while the pool is open, writable and in write
    mode; ``path`` the pool's directory; ``active`` volume key -> {holder: count} of the volumes that are
    active (dm-thin's ``open_count``: see :meth:`hold`); ``origins`` the volumes' external origins
    (:class:`~thinpool.origin.Origins`: volume key -> open origin file); ``nospace`` the pool's
    :class:`~thinpool.nospace.NoSpaceQueue` (writes waiting for data space); ``tab``, ``tab_epoch`` the
    kernel table :meth:`table` built last and ``st[ST_EPOCH]`` then (the bound per-call entries take
    both and answer ``STALE_TABLE`` when it is out of date); ``write_bytes_fn``, ``locate_read_fn`` those
    entries once bound (:meth:`bind_write_bytes`, :meth:`bind_locate_read`; None after :meth:`refresh`).
    """

    __slots__ = ("pool", "lock", "keys", "slots", "names", "gone", "is_open", "readable", "devs_i", "devs_dirty", "st", "nodes_map", "space", "data",
                 "one_io", "fast_write", "path", "active", "origins", "nospace", "tab", "_tab_arrays", "_tab_st",
                 "tab_epoch", "locate_read_fn", "write_bytes_fn", "faults_seen")

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.lock = PoolLock()
        self.keys: dict[str, int] = {}
        self.slots: dict[int, int] = {}
        self.is_open = False
        self.readable = False  # open and not in fail mode: reads may be served
        self.names: dict[int, str] = {}
        self.gone: dict[int, str] = {}  # volume key -> its name when it was deleted (for handles' errors)
        self.active: dict[int, dict[str, int]] = {}  # volume key -> holder -> count (open_count)
        self.origins = Origins()
        self.one_io = np.zeros((2, 1), np.int64)
        self.fast_write = False
        self.path = pool.path
        self.devs_i: Any = None
        self.devs_dirty: set[int] = set()
        self.st: Any = None
        self.nodes_map: Any = None
        self.space: Any = None
        self.data: Any = None
        self.nospace: Any = None
        #: the kernel table :meth:`table` built last, and ``st[ST_EPOCH]`` then: the per-call entries
        #: (``kernels.write_bytes``, ``locate_read``) take both and answer ``STALE_TABLE`` when the
        #: epoch moved since (cheaper than calling :meth:`table` before each call)
        self.tab: Any = None
        self.tab_epoch = -1
        self._tab_arrays: tuple = ()
        self._tab_st: Any = None
        self.write_bytes_fn: Any = None  # kernels.write_bytes compiled for this context's arrays (bind_write_bytes)
        self.locate_read_fn: Any = None  # the same for kernels.locate_read
        #: faultguard.FAULTS[0] when this pool last looked (see fault_check)
        self.faults_seen = int(faultguard.FAULTS[0])

    def fault_check(self) -> None:
        """After a kernel call or a slice of the data file's map, when ``faultguard.FAULTS[0]`` is no
        longer :attr:`faults_seen` (a guarded map faulted meanwhile, in this pool or another: what the
        call read may hold zeroes or holes in place of a lost page -- the caller throws it away): map the
        data file again if its map faulted, and if the pool's metadata rows did (pages of the metadata
        file truncated under the open pool) put the pool in ``fail`` mode and raise
        :class:`~thinpool.errors.HostIOError` (EIO) naming the file."""
        now = int(faultguard.FAULTS[0])
        if now == self.faults_seen:
            return
        self.faults_seen = now
        remap = getattr(self.data, "remap_if_faulted", None)
        if remap is not None:
            remap()
        pool = self.pool
        if not any(faultguard.hits(getattr(pool, d).guard) for d in ("_leaf_disk", "_inner_disk") if hasattr(pool, d)):
            return
        # rows of the nodes mapped from the metadata file faulted (their pages, lost to a truncation
        # under the open pool, now read as holes): what the call computed from them is never returned
        # or committed -- the pool fails, the store's commits end
        store = pool._store
        why = (f"the metadata file {store.path} lost pages under the open pool (truncated by another program): "
               f"rows of the block map read from it are gone; stop whatever truncates it, then reopen the pool "
               f"(thinpool check; thinpool repair if pages are gone)")
        if not store.failed:
            store.failed = why
        if pool.mode != Mode.FAIL:
            pool._set_mode(Mode.FAIL)
            pool.read_only_reason = why
        raise HostIOError(f"pool {pool.path}: {why}", errno.EIO, store.path)

    def refresh(self, *, devs_i: np.ndarray, devs_dirty: set[int], st: np.ndarray, nodes_map: Any,
                space: Any) -> None:
        """Take the pool's current arrays (after a reload or a device-table growth)."""
        self.devs_i, self.devs_dirty, self.st, self.nodes_map, self.space = devs_i, devs_dirty, st, nodes_map, space
        # the device table's type may differ (read-only): bind again (binding builds the table again:
        # a table of the arrays before never reaches the bound entries)
        self.locate_read_fn = self.write_bytes_fn = None
        self.tab_epoch = -1

    def bind_write_bytes(self) -> Callable[..., int]:
        """:func:`kernels.write_bytes` compiled for exactly the argument types the per-call write of
        ``bytes`` in :mod:`thinpool.thin` passes -- this context's kernel table (:attr:`tab`, with
        :attr:`tab_epoch`) and device table, int64 scalars, a ``bytes`` object -- as its compiled entry
        point, which skips the dispatcher's type resolution (about half the cost of calling a kernel).
        Only that fast path calls it, with exactly those types (offsets bounded below 2**62);
        :meth:`refresh` unbinds it, and binding builds the table afresh.  Each kernel is bound when
        first needed, so a process that only reads never compiles it."""
        from numba import typeof, types

        from . import kernels
        tab, devs, i64 = typeof(self.table()), typeof(self.devs_i), types.int64
        self.write_bytes_fn = kernels.write_bytes.compile((tab, i64, devs, i64, typeof(b""), i64, i64, i64, i64))
        return self.write_bytes_fn

    def bind_locate_read(self) -> Callable[..., int]:
        """:func:`kernels.locate_read` bound as :meth:`bind_write_bytes` binds ``write_bytes``, for
        the per-call read's fast path (offsets, lengths and the data file's descriptor as int64)."""
        from numba import typeof, types

        from . import kernels
        tab, devs, i64 = typeof(self.table()), typeof(self.devs_i), types.int64
        self.locate_read_fn = kernels.locate_read.compile((tab, i64, devs, i64, i64, i64, i64))
        return self.locate_read_fn

    def table(self) -> np.ndarray:
        """(address, length) rows of the arrays :func:`kernels.write_one` / ``read_one`` use, rebuilt
        whenever one of them was reallocated (``st[ST_EPOCH]``) or the state was reloaded (a new ``st``)."""
        st = self.st
        if self._tab_st is not st or self.tab_epoch != st.item(K.ST_EPOCH):  # item(): a Python int, fast
            nodes, space, scratch = self.nodes_map.nodes, self.space.arrays, self.data.scratch
            self.tab = K.kernel_table(nodes, space, st, scratch)  # one row per array, by schema.KRow name
            self._tab_arrays = nodes + space + (st, scratch)  # keeps every address in the table valid
            self._tab_st, self.tab_epoch = st, int(st[K.ST_EPOCH])
        return self.tab

    def slot(self, key: int, name: str) -> int:
        """The device-table slot of volume ``key``; NotFound naming ``name`` if it was deleted."""
        slot = self.slots.get(key)
        if slot is None:
            self.pool._check_open()
            from .errors import NotFound
            raise NotFound(f"pool {self.path}: thin volume {name!r} (device id {key & 0xFFFFFF}) no longer exists")
        return slot

    def origin(self, key: int) -> tuple[int, int]:
        """``(fd, size)`` of volume ``key``'s external origin for the kernels, ``(-1, 0)`` when it has
        none (or the pool is metadata-only: no bytes are read).  Opens the file on first use and checks
        it is unchanged (FailedPrecondition naming the file otherwise: see :class:`thinpool.origin.OriginFile`)."""
        f = self.origins.by_key.get(key)
        if f is None or self.data.fd < 0:
            return -1, 0
        return f.use()

    # activations (dm-thin's open_count: an active thin device cannot be deleted)
    def hold(self, key: int, holder: str) -> None:
        """Count one more ``holder`` (e.g. ``"NBD connection"``) of volume ``key``."""
        holders = self.active.setdefault(key, {})
        holders[holder] = holders.get(holder, 0) + 1

    def unhold(self, key: int, holder: str) -> None:
        """Drop one ``holder`` of volume ``key`` (a no-op if it holds none)."""
        holders = self.active.get(key)
        if not holders or not holders.get(holder):
            return
        holders[holder] -= 1
        if not holders[holder]:
            del holders[holder]
        if not holders:
            del self.active[key]

    def holders(self, key: int) -> dict[str, int]:
        """Who holds volume ``key`` active: holder -> count (empty when it is not active)."""
        return dict(self.active.get(key, {}))

    # the pool's own rules, for the I/O path's slow branches
    def after_alloc(self) -> None:
        """Run after a write allocated blocks: the low-water callback and the metadata-space check."""
        self.pool._after_alloc()

    def md_check_below(self) -> int:
        """Live metadata nodes below which :meth:`after_alloc` skips its metadata-space estimate (a batch
        kernel returns to run it once an allocation reaches this many)."""
        return self.pool._md_check_below

    def check_open(self) -> None:
        """InvalidArgument if the pool is closed."""
        self.pool._check_open()

    def check_readable(self) -> None:
        """Before a read: InvalidArgument if closed, HostIOError (EIO) in fail mode -- dm-thin's
        ``thin_bio_map`` errors every bio, reads included, once the pool is in ``PM_FAIL``."""
        self.pool._check_open()
        if self.pool.mode == Mode.FAIL:
            raise HostIOError(f"pool {self.path} has failed ({getattr(self.pool, 'read_only_reason', '')}): "
                              f"every I/O fails, reads included, until it is reopened")

    def check_writable(self) -> None:
        """InvalidArgument if closed, ReadOnly if the pool cannot be written (saying why)."""
        self.pool._check_writable()

    def check_io_writable(self) -> None:
        """Before a write or discard: InvalidArgument if closed, ReadOnly if opened read-only or failed
        (read-only and out-of-metadata-space modes serve writes that need no new block)."""
        self.pool._check_io_writable()

    def no_metadata_change(self) -> bool:
        """Whether the pool's mode serves only writes to provisioned, unshared blocks."""
        return self.pool.mode in (Mode.OUT_OF_METADATA_SPACE, Mode.READ_ONLY)

    def out_of_data_space(self) -> None:
        """A write found no data block: the pool enters out-of-data-space mode -- and leaves it at once
        if the pool's autoextend policy grows the data device (as LVM's dmeventd does when the pool
        fills: a queued write then proceeds; under ``error_if_no_space`` this write still fails)."""
        self.pool._set_mode(Mode.OUT_OF_DATA_SPACE)
        self.pool._autoextend(data_full=True)
        # dm-thin's alloc_data_block runs check_low_water_mark before it finds no block: the kernel
        # allocates block by block, so the allocation that fails saw a free count of 0 -- at or below
        # any mark (the default mark 0 included): the low water event fires if it has not yet
        self.pool._check_low_water(0)

    def wait_for_space(self, check: Callable[[], None], abort: Callable[[], bool] | None = None) -> bool:
        """A write found no data block (the pool is out of data space): under ``queue_if_no_space``
        wait, with the pool's lock released, until the pool leaves out-of-data-space mode (True: retry
        the write) or the no-space timeout passes (False: fail with ENOSPC); under
        ``error_if_no_space`` return False at once.  See :meth:`thinpool.nospace.NoSpaceQueue.wait`."""
        pool = self.pool
        return self.nospace.wait(lambda: pool.mode == Mode.OUT_OF_DATA_SPACE, check, abort)

    @property
    def block_size(self) -> int:
        """Data block size in bytes."""
        return int(self.st[K.ST_BLOCK_SIZE])
