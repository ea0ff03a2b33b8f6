"""The thin pool: devices, snapshots, transactions, modes and accounting (dm-thin's target layer).

A pool is a directory holding ``data`` (the sparse data device), ``metadata`` (see
:mod:`thinpool.mdstore`) and ``lock``.  This module wires the layers together: the block map and
data space map in memory, the JIT kernels for per-block work, the metadata store for commits and
the data device for bytes.  The pool's methods live in one module per concept: construction, the
read-only views and closing here; devices and records in :mod:`thinpool.pool_devices`;
commit / abort in :mod:`thinpool.pool_txn`; usage, status and I/O counters in
:mod:`thinpool.pool_accounting`; the features (discard, no-space policy) in
:mod:`thinpool.pool_features`; resize and hole punching in :mod:`thinpool.poolspace`;
the IR bridge in :mod:`thinpool.pool_ir`.  I/O lives in :mod:`thinpool.thin`, which reaches the
pool through its :class:`~thinpool.kernel_context.KernelContext`; the shared rules (with
:class:`~thinpool.devtable.DeviceTable`) are :mod:`thinpool.rules`'s.
"""

from __future__ import annotations

import os
import time as _time
import types
import uuid as _uuid
import warnings
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping

import numpy as np

from . import schema as K
from . import catalog as cat_format
from . import faultguard, ownership, pooldir, rules, safe_output
from .blockmap import BlockMap
from .datadev import DataDevice, NullDataDevice
from .errors import AlreadyExists, InvalidArgument, MetadataCorrupt, ThinpoolWarning
from .kernel_context import KernelContext, volume_key
from .kernel_context import locked_method as _locked
from .mdpages import BLOCK, STORE_KEYS, PagedArray
from .mdstore import MetadataStore
from .nospace import DEFAULT_NO_SPACE_TIMEOUT, NoSpaceQueue
from .pool_accounting import Accounting
from .pool_devices import DeviceOps
from .pool_features import Features, check_features, kernel_flags
from .pool_txn import NoFlushDataIO, NoFlushFileIO, Transactions
from .rules import (DEFAULT_MAX_THINS, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE,  # noqa: F401 (this module's API)
                    check_block_size, default_metadata_blocks)
from .schema import Mode, dev_dtype
from .dataspace import DataSpaceMap
from .spacemap_pages import DISK_ARRAYS, empty_disk_arrays, load_counts
from .nodestore import ARRAYS as DENSE_NODE_ARRAYS, INNERS, LEAVES, empty_disk_arrays as empty_node_arrays
from .nodestore import load as load_nodes, open_nodes
from .status import PoolStatus, Usage  # noqa: F401  (part of this module's API)
from .units import parse_size

if TYPE_CHECKING:
    from .check import CheckReport
    from .interop.ir import Metadata



def _poolspace():
    from . import poolspace
    return poolspace


class Pool(Transactions, DeviceOps, Features, Accounting):
    """A thin pool in a directory.  Use :meth:`create` or :meth:`open`.

    A context manager: leaving the block commits and closes when it succeeded; when it raised, the
    pool is closed *without* committing, so everything since the last commit is dropped (like
    :meth:`abort`; a transaction either commits whole or not at all).  :class:`~thinpool.devtable.DeviceTable`
    follows the same policy.

    The public surface: the methods below, :meth:`locked` (the pool's re-entrant lock, for a caller
    that must make several calls atomically), and read-only views of the state (:attr:`devs`,
    :attr:`st`, :attr:`header`, :attr:`catalog`; the engine objects :attr:`nodes_map`, :attr:`space`,
    :attr:`store`, :attr:`data` are read-only attributes, meant for checks and tests).  The per-call
    I/O path (:mod:`thinpool.thin`) uses the pool's :class:`~thinpool.kernel_context.KernelContext`
    (``_engine``), the engine's IR bridge (:mod:`thinpool.pool_ir`) and repair the ``_import_*`` /
    ``_restore_*`` methods of :class:`~thinpool.pool_devices.DeviceOps`; nothing else writes its state.
    """

    DATA = pooldir.DATA
    _new_files: ownership.NewPoolFiles  # the files create() made (pool_ir.pool_from_metadata undoes them on failure)
    _autoextending: bool                # poolspace's autoextend is running (set only while it runs)
    METADATA = pooldir.METADATA
    LOCK = pooldir.LOCK

    # ------------------------------------------------------------------ construction
    def __init__(self, path: str, *, read_only: bool = False,
                 on_low_water: Callable[["Pool"], None] | None = None, _scrub: bool = True,
                 wait: float | None = None, allow_foreign: bool | None = None, discard: str | None = None,
                 error_if_no_space: bool | None = None, no_space_timeout: float | None = None,
                 flush: bool = True, on_metadata_low_water: Callable[["Pool"], None] | None = None) -> None:
        """Open an existing pool (prefer :meth:`open`).  ``_scrub=False`` (used by :meth:`create`)
        never punches free blocks holding data at open (it only marks them stale): a new pool may sit
        on a data file whose blocks an import is about to map.  ``wait`` / ``allow_foreign`` and the features:
        see :meth:`open`."""
        features = check_features(discard, error_if_no_space, no_space_timeout)
        if features and read_only:
            raise InvalidArgument(f"pool {path}: the features of a pool opened read-only cannot be changed "
                                  f"({', '.join(sorted(features))})")
        self.path = os.path.abspath(os.fspath(path))
        self.read_only = read_only
        self.on_low_water = on_low_water
        self.on_metadata_low_water = on_metadata_low_water
        self._lock_fd = -1
        self._closed = True
        self._mode = Mode.WRITE
        self._gen_floor = 0
        self._batch_depth = 0  # open batch() blocks (pool messages commit only outside them)
        self.path = pooldir.resolve(self.path, allow_foreign=allow_foreign)
        self._engine = KernelContext(self)  # what thin.py and the kernels use (see kernel_context)
        self._nospace = NoSpaceQueue(self._engine.lock)  # queue_if_no_space's waiting writers
        self._engine.nospace = self._nospace
        md_path = os.path.join(self.path, self.METADATA)
        self._lock_fd = pooldir.lock(self.path, read_only, wait=wait, allow_foreign=allow_foreign)
        try:
            self._store = MetadataStore(md_path, read_only=read_only, allow_foreign=allow_foreign)
            self._load()
            hdr = self._store.header
            data_path = hdr.get("data_file") or os.path.join(self.path, self.DATA)
            if hdr.get("metadata_only"):
                self._data: DataDevice | NullDataDevice = NullDataDevice(self.block_size, self._space.nr_blocks, read_only=read_only)
            else:
                self._data = DataDevice(data_path, self.block_size, self._space.nr_blocks, read_only=read_only,
                                        owner=self.uuid, pool_path=self.path, data_rc=self._space.data_rc,
                                        allow_foreign=allow_foreign)
            self._engine.data = self._data
            self.flush = bool(flush)
            if not self.flush:  # a scratch pool: see open()'s flush
                self._store.io, self._data.io = NoFlushFileIO(), NoFlushDataIO()
            # free blocks holding bytes: marked stale (or punched, with punch_freed_blocks)
            self.scrubbed_blocks = 0 if read_only else _poolspace().scrub_on_open(self, punch=_scrub)
        except BaseException:
            if getattr(self, "store", None) is not None:
                self._store.close()
            self._release_lock()
            raise
        self._closed = False
        self._engine.is_open = True
        self._set_mode(self._mode)  # the I/O fast path opens
        for problem in self._engine.origins.problems():  # external origins are checked at open too
            warnings.warn(ThinpoolWarning(f"pool {self.path}: {problem}"), stacklevel=3)
        safe_output.register_pool(self)  # no output is ever written onto its files
        if features:
            try:
                self._activate_features(features)
            except BaseException:
                self.close(commit=False)
                raise

    @classmethod
    def create(cls, path: str | os.PathLike, data_size: int | str = "1GiB", block_size: int | str = "64KiB", *,
               metadata_size: int | str | None = None, low_water_mark: int = 0,
               error_if_no_space: bool = False, zero_new_blocks: bool = True, punch_freed_blocks: bool = False,
               discard: str = "passdown", no_space_timeout: float = DEFAULT_NO_SPACE_TIMEOUT,
               data_file: str | os.PathLike | None = None, max_thins: int = DEFAULT_MAX_THINS,
               on_low_water: Callable[["Pool"], None] | None = None, force: bool = False,
               take_over_data: bool = False, mode: int | str | None = None,
               allow_foreign: bool | None = None, metadata_only: bool = False, flush: bool = True,
               on_metadata_low_water: Callable[["Pool"], None] | None = None) -> "Pool":
        """Create a pool: a sparse data file of ``data_size`` bytes cut into ``block_size`` blocks.

        ``low_water_mark`` is in data blocks (``on_low_water`` fires once when an allocation sees free
        blocks at or below it, or a write finds none; again after a resume: a reopen, a resize,
        ``set_features``);
        ``on_metadata_low_water`` is called when free metadata blocks fall to dm-thin's metadata low
        water mark, min(1024, metadata blocks / 4) (again after they were above it);
        ``metadata_size`` defaults to thin_metadata_size's formula (see :func:`default_metadata_blocks`).
        The pool features (dm-thin's, stored with the pool as LVM stores them; defaults are the
        kernel's): ``error_if_no_space`` fails a write that finds no data space at once, else it
        waits up to ``no_space_timeout`` seconds (0: for ever) for a resize or freed blocks
        (``queue_if_no_space``, :mod:`thinpool.nospace`); ``discard`` is ``passdown`` (discards unmap
        and punch the freed blocks), ``nopassdown`` (unmap only) or ``ignore`` (discards fail with
        EOPNOTSUPP); see :meth:`set_features` for changing them.
        ``zero_new_blocks``: a new block reads as zeroes where it was not written (off: dm-thin's
        ``skip_block_zeroing``, a reused block shows its old bytes).  ``punch_freed_blocks``: hole-punch
        every freed block once no durable commit maps it (off, the default, keeps its bytes as dm-thin
        does; :meth:`trim` returns the space).
        An existing non-empty ``data_file`` is refused unless ``force`` (new volumes would overwrite its
        blocks, :meth:`trim` punch them);
        one another pool owns (:mod:`thinpool.ownership`) unless ``take_over_data`` (that pool then
        refuses to open).  Nothing is created if any argument is invalid, and a failed creation
        removes what it made.  ``mode``: the directory's mode (default 0700, files 0600; 0750 gives
        files 0640, see :func:`thinpool.pooldir.make_dir`); ``allow_foreign``: see :meth:`open`.
        ``metadata_only``: no data file at all (recorded in the header, so every open keeps it): the
        same block map, space map and kernels, but writes store no bytes and every block reads as
        zeroes -- for simulating pools larger than the host's disks (docs/simulate.md).  ``flush=False``:
        a scratch pool whose commits are never flushed (see :meth:`open`; this process's pool only).
        """
        path = os.path.abspath(os.fspath(path))
        bs = check_block_size(block_size)
        size = parse_size(data_size, "data size")
        nr_blocks = size // bs
        if nr_blocks < 1:
            raise InvalidArgument(f"data size {size} bytes is smaller than one {bs}-byte block")
        if not isinstance(low_water_mark, int) or isinstance(low_water_mark, bool) or not 0 <= low_water_mark < 1 << 64:
            # dm-thin's pool table reads it with kstrtoull: an unsigned 64-bit number of blocks
            shown = (f"a number of {low_water_mark.bit_length()} bits" if isinstance(low_water_mark, int)
                     and low_water_mark.bit_length() > 128 else repr(low_water_mark)[:80])
            raise InvalidArgument(f"low water mark must be a number of blocks from 0 to 2^64-1, got {shown}")
        features = check_features(discard, error_if_no_space, no_space_timeout)
        if metadata_size is None:
            md_blocks = default_metadata_blocks(nr_blocks, max_thins)
        else:
            md_blocks = parse_size(metadata_size, "metadata size") // BLOCK
            if md_blocks < 64:
                raise InvalidArgument(f"metadata size {metadata_size!r} is too small (at least 256KiB)")
        if md_blocks > 4161600:
            raise InvalidArgument(f"metadata size {md_blocks * BLOCK} bytes exceeds dm-thin's 15.87GiB limit")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise AlreadyExists(f"cannot create pool {path}: path exists and is not an empty directory")
        parent = os.path.dirname(os.path.realpath(path))
        if safe_output.is_pool_dir(parent):
            raise InvalidArgument(f"cannot create pool {path}: it would lie in the directory of pool {parent}, "
                                  f"which holds only that pool's files")
        if metadata_only and data_file:
            raise InvalidArgument("a metadata-only pool has no data file: data_file cannot be given")
        pooldir.check_mode(mode)
        data_path = os.path.abspath(os.fspath(data_file)) if data_file else os.path.join(path, cls.DATA)
        if data_file:
            ownership.check_new_data_file(data_path, force=force, take_over=take_over_data, pool_dir=path)
        made = ownership.NewPoolFiles.before(path, data_path)
        try:
            pool = cls._create_files(path, data_path, bs, nr_blocks, md_blocks, made, low_water_mark,
                                     error_if_no_space, zero_new_blocks, bool(data_file), on_low_water,
                                     mode=mode, allow_foreign=allow_foreign, metadata_only=bool(metadata_only),
                                     features=features, punch_freed_blocks=punch_freed_blocks, flush=flush)
        except BaseException:
            made.undo()
            raise
        pool._new_files = made  # pool_from_metadata undoes the creation if filling it fails
        pool.on_metadata_low_water = on_metadata_low_water
        return pool

    @classmethod
    def _create_files(cls, path: str, data_path: str, bs: int, nr_blocks: int, md_blocks: int,
                      made: "ownership.NewPoolFiles", low_water_mark: int, error_if_no_space: bool,
                      zero_new_blocks: bool, explicit_data: bool, on_low_water: Callable[["Pool"], None] | None, *,
                      mode: int | str | None = None, allow_foreign: bool | None = None,
                      metadata_only: bool = False, features: dict[str, Any] | None = None,
                      punch_freed_blocks: bool = False, flush: bool = True) -> "Pool":
        fmode = pooldir.make_dir(path, mode, allow_foreign=allow_foreign)
        if not metadata_only:
            DataDevice.create(data_path, nr_blocks * bs, fmode, allow_foreign=allow_foreign)
        if not explicit_data and not metadata_only:
            pooldir.set_file_mode(data_path, fmode)  # exactly, whatever the umask
        store = MetadataStore.format(os.path.join(path, cls.METADATA), md_blocks, fmode)
        header: dict[str, Any] = dict(block_size=bs, nr_data_blocks=nr_blocks, time=0, transaction_id=0,
                      low_water_mark=low_water_mark, error_if_no_space=bool(error_if_no_space),
                      zero_new_blocks=bool(zero_new_blocks), punch_freed_blocks=bool(punch_freed_blocks),
                      needs_check=False, cursor=0,
                      uuid=str(_uuid.uuid4()), created=_time.time(), used_data_blocks=0, pending_blocks=0,
                      data_file=data_path if explicit_data else None, discard="passdown",
                      no_space_timeout=DEFAULT_NO_SPACE_TIMEOUT)
        header.update(features or {})
        if metadata_only:
            header["metadata_only"] = True
        header.update(next_dev_id=1, next_gen=1)
        arrays = {
            **empty_node_arrays(),
            "leaf_rc": PagedArray(np.zeros(0, np.uint8), np.zeros(0, np.int64)),
            "inner_rc": PagedArray(np.zeros(0, np.uint8), np.zeros(0, np.int64)),
            **empty_disk_arrays(nr_blocks),
            "devs": PagedArray(np.zeros(0, np.uint8), np.zeros(0, np.int64)),
            **cat_format.StoredCatalog.build({}, {}).updates(0, rules.catalog_dumps, header),
        }
        try:
            store.commit(arrays, header, hints={"dev_id_max": 0, "nr_thins": 0, "free_slot": 0})
        finally:
            store.close()
        if not metadata_only:
            made.claim(header["uuid"])
        return cls(path, on_low_water=on_low_water, _scrub=False, allow_foreign=allow_foreign, flush=flush)

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False,
             on_low_water: Callable[["Pool"], None] | None = None, wait: float | None = None,
             allow_foreign: bool | None = None, discard: str | None = None, error_if_no_space: bool | None = None,
             no_space_timeout: float | None = None, flush: bool = True,
             on_metadata_low_water: Callable[["Pool"], None] | None = None) -> "Pool":
        """Open an existing pool.  Raises PoolLocked if another process holds it (after waiting up
        to ``wait`` seconds for it; ``math.inf`` waits for ever), MetadataCorrupt if no committed
        state verifies, NotFound/InvalidArgument if ``path`` is not a pool, InvalidArgument if a pool
        file is a symbolic link or not a regular file, PermissionDenied if a file cannot be opened or
        another user owns the pool (unless ``allow_foreign``).  ``None`` takes the process default
        (:func:`thinpool.pooldir.set_defaults`; the CLI's ``--wait`` and ``--allow-foreign``).

        ``discard``, ``error_if_no_space``, ``no_space_timeout``: activate the pool with these features
        (None keeps the stored one).  Opening is a new activation of the pool, so -- as when dm-thin
        loads a pool's first table -- every feature may change here, ``discard`` to or from ``ignore``
        included; the new values are stored (committed) at once.  A read-only open cannot change them.

        ``flush=False`` (not the default; not stored with the pool): a *scratch* pool for simulation
        -- a replay in a temporary directory.  Its commits are the same commits, writing the same
        metadata in the same order, but nothing is ever flushed (no ``fdatasync`` of the metadata or
        data file): a crash of the process loses nothing committed (the writes are in the host's page
        cache), a crash of the host may lose or tear any commit.  dm-thin always flushes
        (docs/design.md, "Differences from the kernel")."""
        return cls(os.fspath(path), read_only=read_only, on_low_water=on_low_water, wait=wait,
                   allow_foreign=allow_foreign, discard=discard, error_if_no_space=error_if_no_space,
                   no_space_timeout=no_space_timeout, flush=flush, on_metadata_low_water=on_metadata_low_water)

    def _release_lock(self) -> None:
        pooldir.unlock(self._lock_fd)
        self._lock_fd = -1

    def _load(self) -> None:
        """(Re)build the in-memory state from the last committed metadata."""
        try:  # the dense nodes read straight into place (nodestore.open_nodes), the space map's stored
            # pages only (spacemap_pages.load_counts), the other arrays as they are
            arrays = {k: np.frombuffer(v, np.uint8)
                      for k, v in self._store.load(skip=DENSE_NODE_ARRAYS + DISK_ARRAYS).items()}
            nodes = (open_nodes(LEAVES, self._store, arrays), open_nodes(INNERS, self._store, arrays))
            counts = load_counts(self._store, arrays, self._store.header["nr_data_blocks"], lazy=True)
        except MetadataCorrupt:  # a damaged page: the whole load, which falls back to an older commit
            arrays, nodes = {k: np.frombuffer(v, np.uint8) for k, v in self._store.load().items()}, (None, None)
            counts = load_counts(self._store, arrays, self._store.header["nr_data_blocks"])
        self._install(arrays, self._store.header, nodes, counts)
        gen = self._engine.lock.gen.ctypes.data  # a lost row of the mapped nodes moves the NBD loop's generation
        for disk in (self._leaf_disk, self._inner_disk):
            faultguard.set_bump(disk.guard, gen)
        self._unpunched = np.zeros(0, np.int64)  # released blocks whose hole punch failed (still pending)
        self._lwm_fired = False
        self._md_low = None  # (the kernel's metadata threshold starts unset with its space map)
        self._set_md_check()
        self._nospace.configure(error_if_no_space=bool(self._header.get("error_if_no_space", True)),
                                timeout=float(self._header.get("no_space_timeout", DEFAULT_NO_SPACE_TIMEOUT)))
        self._set_mode(rules.derive_mode(bool(self._header.get("needs_check")), self.read_only))

    def _install(self, arrays: dict[str, np.ndarray], header: dict[str, Any],
                 nodes: tuple[Any, Any] = (None, None), counts: tuple[Any, Any] = (None, None)) -> None:
        self.recovered_from = header.get("recovered_from")
        self._header = {k: v for k, v in header.items()
                       if k not in STORE_KEYS}
        st = np.zeros(K.ST_SIZE, np.int64)
        st[K.ST_BLOCK_SIZE] = header["block_size"]
        st[K.ST_TIME] = header["time"]
        st[K.ST_CURSOR] = header.get("cursor", 0)
        self._st = st
        # the nodes, and what is stored of them (see nodestore), unless the open read them already
        leaves, self._leaf_disk = nodes[0] or load_nodes(LEAVES, arrays)
        inners, self._inner_disk = nodes[1] or load_nodes(INNERS, arrays)
        self._nodes_map = BlockMap.from_arrays(st, leaves, inners,
                                              arrays["leaf_rc"].view(np.uint32), arrays["inner_rc"].view(np.uint32))
        kernel_flags(st, header)
        previous = getattr(self, "_space", None)
        if counts[0] is None:
            counts = load_counts(self._store, arrays, header["nr_data_blocks"])
        self._space = DataSpaceMap(st, header["nr_data_blocks"], counts[0], counts[1])
        self._space.inherit_stale(previous)  # a reload (abort, rollback): blocks it frees hold bytes
        self._devs = arrays["devs"].view(dev_dtype()).copy()
        self._devs_i = self._devs.view(np.int64).reshape(-1, K.DEV_COLUMNS)  # the kernels' view (schema.DEV_*)
        self._devs_dirty: set[int] = set()
        self._hints_of = None  # the commit hints kept from the table before: counted again from this one
        self._catalog, self._stored_catalog, self._catalog_convert = self._catalog_from(arrays, header)
        self._catalog_touched: set[str] = set()  # names created, deleted, renamed since the last commit
        self._catalog_dirty = False
        if header.get("pending_blocks") and "pending" in arrays:
            pending = arrays["pending"].view(np.uint64)[: header["pending_blocks"]].astype(np.int64)
            pending = pending[pending < self._space.nr_blocks]
            self._space.set_pending(pending[self._space.data_rc[pending] == 0])  # never a block in use
            self._space.recount()
        if int(self._catalog.get("next_gen", 1)) < self._gen_floor:
            # an abort rolls the catalog back; a generation handed out since stays used, so a handle
            # to a volume the abort dropped never addresses a new volume with the same device id
            self._catalog["next_gen"] = self._gen_floor
        self._by_name: dict[str, int] = {}  # name -> volume key (kernel_context.volume_key)
        self._by_dev_id: dict[int, str] = {}
        slots, names = {}, {}
        for n, v in self._catalog["volumes"].items():
            key = volume_key(v["dev_id"], v.get("gen", 0))
            self._by_name[n] = key
            self._by_dev_id[v["dev_id"]] = n
            slots[key] = v["slot"]
            names[key] = n
        self._engine.keys, self._engine.slots, self._engine.names = self._by_name, slots, names
        self._engine.origins.reload((volume_key(v["dev_id"], v.get("gen", 0)), v["origin"])
                                    for v in self._catalog["volumes"].values() if v.get("origin") is not None)
        self._refresh_engine()

    def _catalog_from(self, arrays: dict[str, np.ndarray], header: Mapping[str, Any],
                      ) -> tuple[dict[str, Any], "cat_format.StoredCatalog", bool]:
        """(the catalog dict, its stored form, whether it must be converted): a format-2 catalog
        (:mod:`thinpool.catalog`) read from the loaded arrays, or a format-1 JSON catalog and the stored
        form its first commit writes."""
        def read(name: str, pages: list[int]) -> dict[int, bytes]:
            a = arrays.get(name, np.zeros(0, np.uint8))
            return {p: a[p * BLOCK:(p + 1) * BLOCK].tobytes() for p in pages}
        stored, old = rules.open_catalog(arrays["catalog"].tobytes()[: header["catalog_bytes"]],
                                         header.get("catalog_format") == cat_format.FORMAT,
                                         lambda n: len(arrays.get(n, ())) // BLOCK, read, f"pool {self.path}")
        if old is not None:
            return old, stored, True
        dev_ids = self._devs["dev_id"].tolist()
        volumes = cat_format.volumes_of(stored, dev_ids.__getitem__)
        return ({"volumes": volumes, "next_dev_id": int(header["next_dev_id"]),
                 "next_gen": int(header["next_gen"]), "records": stored.records}, stored, False)

    def _refresh_engine(self) -> None:
        """Hand the kernel context the current arrays (after a reload or a device-table growth)."""
        self._engine.refresh(devs_i=self._devs_i, devs_dirty=self._devs_dirty, st=self._st,
                             nodes_map=self._nodes_map, space=self._space)

    # ------------------------------------------------------------------ the public lock and read-only views
    def locked(self) -> ContextManager[Any]:
        """The pool's re-entrant lock, as a context manager: ``with pool.locked(): ...`` makes several
        calls (pool and volume methods, which take the same lock) atomic with respect to other threads."""
        return self._engine.lock

    @property
    def closed(self) -> bool:
        """Whether the pool has been closed."""
        return self._closed

    @property
    def mode(self) -> Mode:
        """The pool's mode (:class:`~thinpool.schema.Mode`: write, out-of-data-space, read-only, fail)."""
        return self._mode

    def _set_mode(self, value: Mode | str) -> None:
        """Enter ``value`` (the engine's modules only: the mode follows from what the pool found).
        Leaving out-of-data-space wakes the writers queued for space (:mod:`thinpool.nospace`)."""
        old = self._mode
        self._mode = Mode(value)
        self._engine.fast_write = self._mode is Mode.WRITE and not self.read_only and not self._closed
        self._engine.readable = self._mode is not Mode.FAIL and not self._closed
        self._nospace.mode_changed(old, self._mode)

    @property
    def devs(self) -> np.ndarray:
        """The device table (structured array, fields :data:`thinpool.schema.DEV_FIELDS`), read-only view."""
        return _read_only(self._devs)

    @property
    def st(self) -> np.ndarray:
        """The kernels' state vector (indices :class:`thinpool.schema.St`), read-only view."""
        return _read_only(self._st)

    @property
    def header(self) -> Mapping[str, Any]:
        """The superblock's fields, read-only."""
        return types.MappingProxyType(self._header)

    @property
    def catalog(self) -> Mapping[str, Any]:
        """The catalog (``volumes``: name -> {dev_id, slot, gen}; ``records``), read-only at the top
        level; treat the entries as read-only too."""
        return types.MappingProxyType(self._catalog)

    @property
    def nodes_map(self) -> BlockMap:
        """The block map (read-only attribute; for checks and tests)."""
        return self._nodes_map

    @property
    def space(self) -> DataSpaceMap:
        """The data space map (read-only attribute; for checks and tests)."""
        return self._space

    @property
    def store(self) -> MetadataStore:
        """The metadata store (read-only attribute; for checks and tests)."""
        return self._store

    @property
    def data(self) -> DataDevice | NullDataDevice:
        """The data device (read-only attribute): a :class:`~thinpool.datadev.NullDataDevice`, with no
        file, for a metadata-only pool."""
        return self._data

    # ------------------------------------------------------------------ properties
    @property
    def block_size(self) -> int:
        """Data block size in bytes."""
        return int(self._st[K.ST_BLOCK_SIZE])

    @property
    def metadata_only(self) -> bool:
        """Whether the pool has no data file (writes store nothing, blocks read as zeroes)."""
        return bool(self._header.get("metadata_only"))

    @property
    def data_path(self) -> str:
        """The data device's file."""
        return self._data.path

    @property
    def nr_data_blocks(self) -> int:
        """The data device's size in blocks of :attr:`block_size` (what a resize changes)."""
        return self._space.nr_blocks

    @property
    def time(self) -> int:
        """dm-thin's pool time: a counter each snapshot steps by one; new mappings carry it, and
        a write unshares a mapping older than its volume's snapshotted time (docs/dm-thin.md §4)."""
        return int(self._st[K.ST_TIME])

    @property
    def transaction_id(self) -> int:
        """The userspace transaction id that :meth:`set_transaction_id` last set (dm-thin's; 0 when new)."""
        return int(self._header["transaction_id"])

    @property
    def uuid(self) -> str:
        """The pool's UUID, drawn when it was created (its data file's owner stamp names it; "" if the
        metadata header has none)."""
        return self._header.get("uuid", "")

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        """Commit and close if the block succeeded; close without committing (dropping everything
        since the last commit) if it raised."""
        self.close(commit=exc_type is None)

    def __repr__(self) -> str:
        return f"<Pool {self.path} {self.nr_data_blocks}x{self.block_size}B mode={self.mode}>"

    def _check_open(self) -> None:
        rules.check_open(self.path, self._closed)

    def _check_io_writable(self) -> None:
        rules.check_io_writable(self.path, closed=self._closed, read_only=self.read_only, mode=self.mode,
                                needs_check=bool(self._header.get("needs_check")),
                                reason=getattr(self, "read_only_reason", ""))

    def _check_writable(self) -> None:
        rules.check_writable(self.path, closed=self._closed, read_only=self.read_only, mode=self.mode,
                             needs_check=bool(self._header.get("needs_check")),
                             reason=getattr(self, "read_only_reason", ""))

    # ------------------------------------------------------------------ check and interop
    @_locked
    def check(self) -> "CheckReport":
        """Structural check of the metadata (:class:`~thinpool.check.CheckReport`; ``.ok``)."""
        from .check import check_pool
        self._check_open()
        return check_pool(self)

    def to_metadata(self, *, held: bool = False) -> "Metadata":
        """The pool as interop IR (:class:`~thinpool.interop.ir.Metadata`); ``held`` reads the held
        metadata snapshot instead of the live state."""
        from .pool_ir import pool_to_metadata
        self._check_open()
        return pool_to_metadata(self, held=held)

    @classmethod
    def from_metadata(cls, path: str | os.PathLike, md: "Metadata", **kwargs: Any) -> "Pool":
        """Create a new pool holding exactly the devices and mappings of IR ``md`` (restore/import)."""
        from .pool_ir import pool_from_metadata
        return pool_from_metadata(cls.create, path, md, **kwargs)

    # ------------------------------------------------------------------ closing
    @_locked
    def close(self, commit: bool = True) -> None:
        """Commit (unless ``commit=False``, which drops uncommitted changes like a crash) and release.
        When the last commit freed blocks a discard passed down, a second commit releases them, so they
        are hole-punched before the pool closes."""
        if self._closed:
            return
        try:
            if commit:
                self.commit()
                self.commit_passdown()
        finally:
            self._closed = True
            self._engine.is_open = self._engine.fast_write = self._engine.readable = False
            self._data.close()
            for disk in (getattr(self, "_leaf_disk", None), getattr(self, "_inner_disk", None)):
                if disk is not None:  # (its guard bumps the lock's generation)
                    faultguard.unguard(disk.guard)
            self._engine.origins.close()
            self._store.close()
            self._release_lock()
            self._nospace.wake_all()  # queued writers find the pool closed


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m
