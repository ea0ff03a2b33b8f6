"""The thin pool: devices, snapshots, transactions, modes and accounting (dm-thin's target layer).

A pool is a directory holding ``data`` (the sparse data device), ``metadata`` (see
:mod:`thinpool.mdstore`) and ``lock``.  This module wires the layers together: the block map and
data space map in memory, the JIT kernels for per-block work, the metadata store for commits and
the data device for bytes.  I/O lives in :mod:`thinpool.thin`.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time as _time
import uuid as _uuid
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import schema as K
from . import ownership, pooldir, safe_output
from .blockmap import BlockMap
from .datadev import DataDevice
from .devtable import (DEVS_PER_PAGE,
                       MAX_DEV_ID, check_new_name, new_catalog_entry, pad_pages, pick_dev_id)
from .errors import AlreadyExists, HostIOError, InvalidArgument, MetadataCorrupt, NotFound, ReadOnly
from .mdstore import BLOCK, MetadataSpaceExhausted, MetadataStore, PagedArray
from .schema import DevFlag, Mode, dev_dtype
from .dataspace import DataSpaceMap
from .status import PoolStatus, Usage  # noqa: F401  (part of this module's API)
from .units import parse_size

if TYPE_CHECKING:
    from .thin import Thin

MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 1 << 30
DEFAULT_MAX_THINS = 1000


def _walks():
    from . import walks
    return walks


def _kernels():
    from . import kernels_map  # imported on first use: opening a pool does not need numba
    return kernels_map


def _poolspace():
    from . import poolspace
    return poolspace


def check_block_size(block_size: int | str) -> int:
    """Validate a data block size: a multiple of 64 KiB within 64 KiB .. 1 GiB (dm-thin's rule)."""
    bs = parse_size(block_size, "block size")
    if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs % MIN_BLOCK_SIZE:
        raise InvalidArgument(f"block size {bs} bytes is invalid: it must be a multiple of 64KiB "
                              f"between 64KiB and 1GiB")
    return bs


def default_metadata_blocks(nr_data_blocks: int, max_thins: int = DEFAULT_MAX_THINS) -> int:
    """Metadata size in 4 KiB blocks: thin_metadata_size's formula (reference §3.7), doubled for
    copy-on-write headroom, plus two pages per thin device, at least 2 MiB."""
    formula = 1 + (2 * nr_data_blocks) // 252 + max_thins
    return max(512, 2 * formula + 2 * max_thins + 64)


def _locked(fn):
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return fn(self, *args, **kwargs)
    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class Pool:
    """A thin pool in a directory.  Use :meth:`create` or :meth:`open`; a context manager (close commits)."""

    DATA = pooldir.DATA
    METADATA = pooldir.METADATA
    LOCK = pooldir.LOCK

    # ------------------------------------------------------------------ construction
    def __init__(self, path: str, *, read_only: bool = False,
                 on_low_water: Callable[["Pool"], None] | None = None, _scrub: bool = True,
                 wait: float | None = None, allow_foreign: bool | None = None) -> None:
        """Open an existing pool (prefer :meth:`open`).  ``_scrub=False`` (used by :meth:`create`)
        skips the crash-recovery punch of free blocks holding data: a new pool may sit on a data
        file whose blocks an import is about to map.  ``wait`` / ``allow_foreign``: see :meth:`open`."""
        self.path = os.path.abspath(os.fspath(path))
        self.read_only = read_only
        self.on_low_water = on_low_water
        self._lock = threading.RLock()
        self._one_io = np.zeros((2, 1), np.int64)  # Thin.write's [offset], [length] (used under _lock)
        self._ktab_st: np.ndarray | None = None
        self._ktab_epoch = -1
        self._lock_fd = -1
        self._closed = True
        self.path = pooldir.resolve(self.path, allow_foreign=allow_foreign)
        md_path = os.path.join(self.path, self.METADATA)
        self._lock_fd = pooldir.lock(self.path, read_only, wait=wait, allow_foreign=allow_foreign)
        try:
            self.store = MetadataStore(md_path, read_only=read_only, allow_foreign=allow_foreign)
            self._load()
            hdr = self.store.header
            data_path = hdr.get("data_file") or os.path.join(self.path, self.DATA)
            self.data = DataDevice(data_path, self.block_size, self.space.nr_blocks, read_only=read_only,
                                   owner=self.uuid, pool_path=self.path, data_rc=self.space.data_rc,
                                   allow_foreign=allow_foreign)
            self.scrubbed_blocks = 0 if read_only or not _scrub else \
                _poolspace().scrub_on_open(self)
        except BaseException:
            if getattr(self, "store", None) is not None:
                self.store.close()
            self._release_lock()
            raise
        self._closed = False
        safe_output.register_pool(self)  # no output is ever written onto its files

    @classmethod
    def create(cls, path: str | os.PathLike, data_size: int | str = "1GiB", block_size: int | str = "64KiB", *,
               metadata_size: int | str | None = None, low_water_mark: int = 0,
               error_if_no_space: bool = True, zero_new_blocks: bool = True,
               data_file: str | os.PathLike | None = None, max_thins: int = DEFAULT_MAX_THINS,
               on_low_water: Callable[["Pool"], None] | None = None, force: bool = False,
               take_over_data: bool = False, mode: int | str | None = None,
               allow_foreign: bool | None = None) -> "Pool":
        """Create a pool: a sparse data file of ``data_size`` bytes cut into ``block_size`` blocks.

        ``low_water_mark`` is in data blocks (the callback fires once when free blocks fall to it);
        ``metadata_size`` defaults to thin_metadata_size's formula (see :func:`default_metadata_blocks`).
        An existing non-empty ``data_file`` is refused unless ``force`` (its blocks would be punched);
        one another pool owns (:mod:`thinpool.ownership`) unless ``take_over_data`` (that pool then
        refuses to open).  Nothing is created if any argument is invalid, and a failed creation
        removes what it made.  ``mode``: the directory's mode (default 0700, files 0600; 0750 gives
        files 0640, see :func:`thinpool.pooldir.make_dir`); ``allow_foreign``: see :meth:`open`.
        """
        path = os.path.abspath(os.fspath(path))
        bs = check_block_size(block_size)
        size = parse_size(data_size, "data size")
        nr_blocks = size // bs
        if nr_blocks < 1:
            raise InvalidArgument(f"data size {size} bytes is smaller than one {bs}-byte block")
        if not isinstance(low_water_mark, int) or low_water_mark < 0:
            raise InvalidArgument(f"low water mark must be a non-negative number of blocks, got {low_water_mark!r}")
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
        pooldir.check_mode(mode)
        data_path = os.path.abspath(os.fspath(data_file)) if data_file else os.path.join(path, cls.DATA)
        if data_file:
            ownership.check_new_data_file(data_path, force=force, take_over=take_over_data)
        made = ownership.NewPoolFiles.before(path, data_path)
        try:
            pool = cls._create_files(path, data_path, bs, nr_blocks, md_blocks, made, low_water_mark,
                                     error_if_no_space, zero_new_blocks, bool(data_file), on_low_water,
                                     mode=mode, allow_foreign=allow_foreign)
        except BaseException:
            made.undo()
            raise
        pool._new_files = made  # pool_from_metadata undoes the creation if filling it fails
        return pool

    @classmethod
    def _create_files(cls, path: str, data_path: str, bs: int, nr_blocks: int, md_blocks: int,
                      made: "ownership.NewPoolFiles", low_water_mark: int, error_if_no_space: bool,
                      zero_new_blocks: bool, explicit_data: bool, on_low_water, *,
                      mode: int | str | None = None, allow_foreign: bool | None = None) -> "Pool":
        fmode = pooldir.make_dir(path, mode, allow_foreign=allow_foreign)
        DataDevice.create(data_path, nr_blocks * bs, fmode, allow_foreign=allow_foreign)
        if not explicit_data:
            pooldir.set_file_mode(data_path, fmode)  # exactly, whatever the umask
        store = MetadataStore.format(os.path.join(path, cls.METADATA), md_blocks, fmode)
        header = dict(block_size=bs, nr_data_blocks=nr_blocks, time=0, transaction_id=0,
                      low_water_mark=low_water_mark, error_if_no_space=bool(error_if_no_space),
                      zero_new_blocks=bool(zero_new_blocks), needs_check=False, cursor=0,
                      uuid=str(_uuid.uuid4()), created=_time.time(), used_data_blocks=0, pending_blocks=0,
                      data_file=data_path if explicit_data else None)
        catalog = {"volumes": {}, "next_dev_id": 1, "records": {}}
        cat = pad_pages(json.dumps(catalog).encode())
        arrays = {
            "leaves": PagedArray(np.zeros(0, np.uint8), np.zeros(0, np.int64)),
            "inners": PagedArray(np.zeros(0, np.uint8), np.zeros(0, np.int64)),
            "leaf_rc": PagedArray(np.zeros(0, np.uint8), np.zeros(0, np.int64)),
            "inner_rc": PagedArray(np.zeros(0, np.uint8), np.zeros(0, np.int64)),
            "data_rc": PagedArray(np.zeros(_round_up(nr_blocks, 1024) * 4, np.uint8), np.zeros(0, np.int64)),
            "devs": PagedArray(np.zeros(0, np.uint8), np.zeros(0, np.int64)),
            "catalog": PagedArray(cat, np.arange(len(cat) // BLOCK)),
        }
        header["catalog_bytes"] = len(json.dumps(catalog).encode())
        try:
            store.commit(arrays, header)
        finally:
            store.close()
        made.claim(header["uuid"])
        return cls(path, on_low_water=on_low_water, _scrub=False, allow_foreign=allow_foreign)

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False,
             on_low_water: Callable[["Pool"], None] | None = None, wait: float | None = None,
             allow_foreign: bool | None = None) -> "Pool":
        """Open an existing pool.  Raises PoolLocked if another process holds it (after waiting up
        to ``wait`` seconds for it; ``math.inf`` waits for ever), MetadataCorrupt if no committed
        state verifies, NotFound/InvalidArgument if ``path`` is not a pool, InvalidArgument if a pool
        file is a symbolic link or not a regular file, PermissionDenied if a file cannot be opened or
        another user owns the pool (unless ``allow_foreign``).  ``None`` takes the process default
        (:func:`thinpool.pooldir.set_defaults`; the CLI's ``--wait`` and ``--allow-foreign``)."""
        return cls(os.fspath(path), read_only=read_only, on_low_water=on_low_water, wait=wait,
                   allow_foreign=allow_foreign)

    def _release_lock(self) -> None:
        pooldir.unlock(self._lock_fd)
        self._lock_fd = -1

    def _load(self) -> None:
        """(Re)build the in-memory state from the last committed metadata."""
        arrays = {k: np.frombuffer(v, np.uint8) for k, v in self.store.load().items()}
        self._install(arrays, self.store.header)
        self._unpunched = np.zeros(0, np.int64)  # released blocks whose hole punch failed (still pending)
        self._lwm_fired = False
        self._set_md_check()
        self.mode = Mode.WRITE
        if self.header.get("needs_check"):
            self.mode = Mode.READ_ONLY
        elif self.st[K.ST_NR_ALLOCATABLE] == 0:
            self.mode = Mode.OUT_OF_DATA_SPACE

    def _install(self, arrays: dict[str, np.ndarray], header: dict[str, Any]) -> None:
        self.recovered_from = header.get("recovered_from")
        self.header = {k: v for k, v in header.items()
                       if k not in ("directory", "directory_bytes", "pages", "held", "recovered_from")}
        st = np.zeros(K.ST_SIZE, np.int64)
        st[K.ST_BLOCK_SIZE] = header["block_size"]
        st[K.ST_TIME] = header["time"]
        st[K.ST_CURSOR] = header.get("cursor", 0)
        self.st = st
        self.nodes_map = BlockMap.from_arrays(st, arrays["leaves"].view(np.uint64), arrays["inners"].view(np.int32),
                                              arrays["leaf_rc"].view(np.uint32), arrays["inner_rc"].view(np.uint32))
        self.space = DataSpaceMap(st, header["nr_data_blocks"], arrays["data_rc"].view(np.uint32))
        self.devs = arrays["devs"].view(dev_dtype()).copy()
        self.devs_i = self.devs.view(np.int64).reshape(-1, K.DEV_COLUMNS)  # the kernels' view (schema.DEV_*)
        self.devs_dirty: set[int] = set()
        raw = arrays["catalog"].tobytes()[: header["catalog_bytes"]]
        try:
            self.catalog = json.loads(raw)
        except ValueError:
            raise MetadataCorrupt(f"pool {self.path}: catalog is not valid JSON", structure="catalog") from None
        self.catalog_dirty = False
        if header.get("pending_blocks") and "pending" in arrays:
            pending = arrays["pending"].view(np.uint64)[: header["pending_blocks"]].astype(np.int64)
            pending = pending[pending < self.space.nr_blocks]
            self.space.set_pending(pending[self.space.data_rc[pending] == 0])  # never a block in use
            self.space.recount()
        self._by_name: dict[str, int] = {n: v["slot"] for n, v in self.catalog["volumes"].items()}
        self._by_dev_id: dict[int, str] = {v["dev_id"]: n for n, v in self.catalog["volumes"].items()}

    def _kernel_table(self) -> np.ndarray:
        """(address, length) rows of the arrays :func:`kernels.write_one` uses, rebuilt whenever
        one of them was reallocated (``st[ST_EPOCH]``) or the state was reloaded (a new ``st``)."""
        st = self.st
        if self._ktab_st is not st or self._ktab_epoch != st.item(K.ST_EPOCH):  # item(): a Python int, fast
            nodes, space, scratch = self.nodes_map.nodes, self.space.arrays, self.data.scratch
            self._ktab = K.kernel_table(nodes, space, st, scratch)  # one row per array, by schema.KRow name
            self._ktab_arrays = nodes + space + (st, scratch)  # keeps every address in the table valid
            self._ktab_st, self._ktab_epoch = st, int(st[K.ST_EPOCH])
        return self._ktab

    # ------------------------------------------------------------------ properties
    @property
    def block_size(self) -> int:
        """Data block size in bytes."""
        return int(self.st[K.ST_BLOCK_SIZE])

    @property
    def data_path(self) -> str:
        """The data device's file."""
        return self.data.path

    @property
    def nr_data_blocks(self) -> int:
        return self.space.nr_blocks

    @property
    def time(self) -> int:
        return int(self.st[K.ST_TIME])

    @property
    def transaction_id(self) -> int:
        return int(self.header["transaction_id"])

    @property
    def uuid(self) -> str:
        return self.header.get("uuid", "")

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(commit=True)

    def __repr__(self) -> str:
        return f"<Pool {self.path} {self.nr_data_blocks}x{self.block_size}B mode={self.mode}>"

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument(f"pool {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnly(f"pool {self.path} is opened read-only")
        if self.mode in (Mode.READ_ONLY, Mode.FAIL):
            raise ReadOnly(f"pool {self.path} is {self.mode}" +
                           (" (needs check/repair)" if self.header.get("needs_check") else
                            f" ({self.read_only_reason})" if getattr(self, "read_only_reason", "") else ""))

    # ------------------------------------------------------------------ devices
    def _slot(self, name: str) -> int:
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise NotFound(f"pool {self.path}: no thin volume named {name!r}") from None

    def _name_ok(self, name: str) -> None:
        check_new_name(self.path, name, self._by_name)

    def _pick_dev_id(self, dev_id: int | None) -> int:
        return pick_dev_id(self.path, dev_id, self._by_dev_id, int(self.catalog.get("next_dev_id", 1)))

    def _new_slot(self) -> int:
        free = np.flatnonzero((self.devs["flags"] & DevFlag.IN_USE) == 0)
        if len(free):
            return int(free[0])
        old = len(self.devs)
        self.devs = np.concatenate([self.devs, np.zeros(DEVS_PER_PAGE, dev_dtype())])
        self.devs_i = self.devs.view(np.int64).reshape(-1, K.DEV_COLUMNS)
        self.devs_dirty.update(range(old, len(self.devs)))
        return old

    def _register(self, name: str, dev_id: int, root: int, mapped: int, creation_time: int,
                  snap_time: int, size: int, flags: int = 0) -> int:
        slot = self._new_slot()
        self.devs[slot] = (dev_id, root, mapped, self.transaction_id, creation_time, snap_time, size,
                           DevFlag.IN_USE | flags)
        self.devs_dirty.add(slot)
        self.catalog["volumes"][name] = new_catalog_entry(self.catalog, dev_id, slot)
        self.catalog["next_dev_id"] = (dev_id + 1) & MAX_DEV_ID
        self.catalog_dirty = True
        self._by_name[name] = slot
        self._by_dev_id[dev_id] = name
        return slot

    def _check_size(self, size: int | str) -> int:
        nbytes = parse_size(size, "volume size")
        if nbytes <= 0 or nbytes % 512:
            raise InvalidArgument(f"volume size {nbytes} bytes must be a positive multiple of 512 (a sector)")
        limit = K.MAX_VBLOCKS * self.block_size
        if nbytes > limit:
            raise InvalidArgument(f"volume size {nbytes} bytes exceeds the limit of {limit} bytes "
                                  f"({K.MAX_VBLOCKS} blocks of {self.block_size})")
        return nbytes

    @_locked
    def create_thin(self, name: str, size: int | str, *, dev_id: int | None = None,
                    read_only: bool = False) -> "Thin":
        """Create an empty thin volume of virtual ``size`` bytes (dm-thin's ``create_thin``)."""
        self._check_writable()
        self._name_ok(name)
        nbytes = self._check_size(size)
        dev_id = self._pick_dev_id(dev_id)
        root = self.nodes_map.new_root()
        self._register(name, dev_id, root, 0, self.time, self.time, nbytes, DevFlag.READ_ONLY if read_only else 0)
        return self.thin(name)

    @_locked
    def snapshot(self, origin: str, name: str, *, dev_id: int | None = None, read_only: bool = False) -> "Thin":
        """Snapshot ``origin`` as ``name`` (dm-thin's ``create_snap``): O(1) whatever the origin maps.

        The pool time increments; origin and snapshot are stamped with it, so every existing mapping
        becomes shared and the next write to it on either side breaks sharing by copy-on-write.
        """
        self._check_writable()
        oslot = self._slot(origin)
        self._name_ok(name)
        dev_id = self._pick_dev_id(dev_id)
        o = self.devs[oslot]
        self.st[K.ST_TIME] += 1
        t = self.time
        self.devs[oslot]["snap_time"] = t
        self.devs_dirty.add(oslot)
        self.nodes_map.share_root(int(o["root"]))
        self._register(name, dev_id, int(o["root"]), int(o["mapped"]), t, t, int(o["size"]),
                       DevFlag.READ_ONLY if read_only else 0)
        return self.thin(name)

    @_locked
    def delete(self, name: str) -> None:
        """Delete a thin volume (dm-thin's ``delete``).  Blocks only it maps become free after the
        next commit; the volume's snapshots and origin are unaffected."""
        self._check_writable()
        slot = self._slot(name)
        root = int(self.devs[slot]["root"])
        _kernels().release_inner(self.nodes_map.nodes, self.space.arrays, self.st, root, 0)
        dev_id = int(self.devs[slot]["dev_id"])
        self.devs[slot] = np.zeros(1, dev_dtype())[0]
        self.devs_dirty.add(slot)
        del self.catalog["volumes"][name]
        del self._by_name[name]
        del self._by_dev_id[dev_id]
        self.catalog_dirty = True

    @_locked
    def rename(self, old: str, new: str) -> None:
        """Rename a thin volume (names are thinpool's; dm-thin only knows device ids)."""
        self._check_writable()
        slot = self._slot(old)
        self._name_ok(new)
        entry = self.catalog["volumes"].pop(old)
        self.catalog["volumes"][new] = entry
        del self._by_name[old]
        self._by_name[new] = slot
        self._by_dev_id[entry["dev_id"]] = new
        self.catalog_dirty = True

    @_locked
    def set_read_only(self, name: str, read_only: bool = True) -> None:
        """Make a volume read-only (writes and discards raise ReadOnly) or writable again."""
        self._check_writable()
        slot = self._slot(name)
        flags = int(self.devs[slot]["flags"])
        self.devs[slot]["flags"] = (flags | DevFlag.READ_ONLY) if read_only else (flags & ~int(DevFlag.READ_ONLY))
        self.devs_dirty.add(slot)

    def record_namespaces(self) -> list[str]:
        """Namespaces that hold records (see :meth:`get_records`)."""
        return sorted(self.catalog["records"])

    def thin(self, name: str) -> "Thin":
        """The thin volume called ``name`` (NotFound if none)."""
        from .thin import Thin
        self._check_open()
        self._slot(name)
        return Thin(self, name)

    def thins(self) -> list["Thin"]:
        """All thin volumes, in device-id order."""
        from .thin import Thin
        self._check_open()
        return [Thin(self, self._by_dev_id[d]) for d in sorted(self._by_dev_id)]

    def by_dev_id(self, dev_id: int) -> "Thin":
        """The thin volume with device id ``dev_id``."""
        from .thin import Thin
        if dev_id not in self._by_dev_id:
            raise NotFound(f"pool {self.path}: no thin device with id {dev_id}")
        return Thin(self, self._by_dev_id[dev_id])

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    # ------------------------------------------------------------------ records (snapshotter etc.)
    def get_records(self, namespace: str) -> dict[str, Any]:
        """A copy of the records stored under ``namespace`` in the pool's own metadata."""
        return json.loads(json.dumps(self.catalog["records"].get(namespace, {})))

    @_locked
    def put_records(self, namespace: str, records: dict[str, Any]) -> None:
        """Replace the records under ``namespace``; committed in the same transaction as the devices."""
        self._check_writable()
        if not isinstance(namespace, str) or not namespace:
            raise InvalidArgument(f"pool {self.path}: record namespace must be a non-empty string, got {namespace!r}")
        try:
            copy = json.loads(json.dumps(records))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"pool {self.path}: records for {namespace!r} are not JSON-serialisable ({exc})") \
                from None
        self.catalog["records"][namespace] = copy
        self.catalog_dirty = True

    # ------------------------------------------------------------------ accounting
    def _roots(self) -> np.ndarray:
        used = (self.devs["flags"] & DevFlag.IN_USE) != 0
        return self.devs["root"][used].astype(np.int64)

    @_locked
    def usage(self, name: str | None = None) -> "Usage | list[Usage]":
        """Mapped / exclusive / shared blocks of one volume (or of all, in dev-id order).

        Exclusive = mapped blocks whose data block no other mapping entry in the pool references
        (thin_ls's definition); shared = mapped - exclusive.
        """
        self._check_open()
        counts = _walks().logical_counts(self.nodes_map.nodes, self._roots(), self.space.nr_blocks)
        names = [name] if name is not None else [self._by_dev_id[d] for d in sorted(self._by_dev_id)]
        out = []
        for n in names:
            d = self.devs[self._slot(n)]
            mapped, excl, highest = _walks().device_usage(self.nodes_map.nodes, int(d["root"]), counts)
            out.append(Usage(n, int(d["dev_id"]), self.block_size, int(mapped), int(excl), int(mapped - excl),
                             None if highest < 0 else int(highest)))
        return out[0] if name is not None else out

    @_locked
    def status(self) -> PoolStatus:
        """Pool status (dm-thin's status line fields); does not commit."""
        self._check_open()
        held = self.store.header.get("held")
        return PoolStatus(
            transaction_id=self.transaction_id, time=self.time, data_block_size=self.block_size,
            used_data_blocks=self.space.used(), total_data_blocks=self.space.nr_blocks,
            used_metadata_blocks=min(self.store.nr_blocks, self.store.used_blocks() + self._dirty_page_estimate()),
            total_metadata_blocks=self.store.nr_blocks, mode=self.mode,
            low_water_mark=int(self.header["low_water_mark"]),
            held_root=int(held["root_block"]) if held else None,
            needs_check=bool(self.header.get("needs_check")),
            error_if_no_space=bool(self.header.get("error_if_no_space", True)),
            zero_new_blocks=bool(self.header.get("zero_new_blocks", True)), nr_thins=len(self._by_name))

    def _dirty_page_estimate(self) -> int:
        bm = self.nodes_map
        return int(np.count_nonzero(bm.leaf_dirty) + np.count_nonzero(bm.inner_dirty))

    # ------------------------------------------------------------------ transactions
    def _paged(self) -> dict[str, PagedArray]:
        bm, sp = self.nodes_map, self.space
        ld = np.flatnonzero(bm.leaf_dirty)
        idn = np.flatnonzero(bm.inner_dirty)
        arrays = {
            "leaves": PagedArray(bm.leaves.reshape(-1).view(np.uint8), ld, ld[bm.leaf_rc[ld] == 0]),
            "inners": PagedArray(bm.inners.reshape(-1).view(np.uint8), idn, idn[bm.inner_rc[idn] == 0]),
            "leaf_rc": PagedArray(bm.leaf_rc.view(np.uint8), np.flatnonzero(bm.leaf_rc_dirty)),
            "inner_rc": PagedArray(bm.inner_rc.view(np.uint8), np.flatnonzero(bm.inner_rc_dirty)),
            "data_rc": PagedArray(sp.data_rc.view(np.uint8), np.flatnonzero(sp.rc_dirty)),
            "devs": PagedArray(self.devs.view(np.uint8),
                               np.unique(np.array(sorted(self.devs_dirty), np.int64) // DEVS_PER_PAGE)),
        }
        if self.catalog_dirty:
            raw = json.dumps(self.catalog).encode()
            self.header["catalog_bytes"] = len(raw)
            cat = pad_pages(raw)
            arrays["catalog"] = PagedArray(cat, np.arange(len(cat) // BLOCK))
        return arrays

    @_locked
    def commit(self) -> None:
        """Make everything done so far durable, atomically (data is flushed before metadata).

        Blocks freed in this transaction are hole-punched and become allocatable afterwards (a block
        whose punch fails stays unallocatable, with a :class:`~thinpool.errors.ThinpoolWarning`, until
        a later punch succeeds).  If the host filesystem refuses a write (ENOSPC, EIO, a short write
        that cannot be completed) the commit raises :class:`~thinpool.errors.HostIOError` and nothing
        of it is durable: the pool keeps its changes and a later commit may retry.  If a *flush* fails
        the pool goes to ``fail`` mode (Linux may report a lost write to one flush only, so no retry
        can be trusted): every further commit raises until the pool is reopened, which finds the
        last durable commit.  A pool in ``fail`` mode never reports a commit as done.
        """
        self._check_open()
        if self.mode == Mode.FAIL:
            raise HostIOError(f"pool {self.path} has failed and must be reopened; nothing since its last "
                              f"durable commit was committed ({getattr(self, 'read_only_reason', '')})")
        if self.read_only or self.mode == Mode.READ_ONLY:
            return
        freed = self.space.freed_blocks()
        record = np.union1d(freed, self._unpunched) if len(self._unpunched) else freed
        arrays = self._paged()
        if len(record) or len(self.space.pending):
            arrays["pending"] = PagedArray(pad_pages(record.astype(np.uint64).tobytes()),
                                           np.arange(max(1, _round_up(len(record) * 8, BLOCK) // BLOCK)))
        self.header["pending_blocks"] = len(record)  # always: a stale count would resurrect an old list
        self.header.update(time=self.time, cursor=int(self.st[K.ST_CURSOR]), nr_data_blocks=self.space.nr_blocks,
                           used_data_blocks=self.space.used())  # for readers that skip the space map
        try:
            try:
                self.data.sync()
            except HostIOError:
                self.store.failed = self.store.failed or "the data file's flush failed"
                raise
            self.store.commit(arrays, self.header)
        except MetadataSpaceExhausted as exc:
            self._abort_to_read_only(str(exc))
            raise ReadOnly(f"pool {self.path}: out of metadata space; the transaction was aborted and the "
                           f"pool is read-only ({exc}); grow the metadata (thinpool resize --metadata-size) "
                           f"to write again") from None
        except HostIOError as exc:
            flushed = bool(self.store.failed)
            if flushed:
                self.mode = Mode.FAIL
                self.read_only_reason = str(exc)
            raise HostIOError(f"pool {self.path}: commit failed, nothing of it is durable" +
                              (" (the pool has failed: reopen it; the last durable commit is kept)" if flushed
                               else " (the changes are kept; a later commit retries)") + f": {exc}",
                              exc.errno or errno.EIO, exc.filename) from None
        bm = self.nodes_map
        bm.leaf_dirty[:] = 0
        bm.inner_dirty[:] = 0
        bm.leaf_rc_dirty[:] = 0
        bm.inner_rc_dirty[:] = 0
        self.space.rc_dirty[:] = 0
        self.devs_dirty.clear()
        self.catalog_dirty = False
        released = self.space.pending  # freed by the previous commit: no superblock maps them any more
        released = released[self.space.data_rc[released] == 0]
        self._unpunched = _poolspace().punch_released(self, released)  # "needs zeroing": not handed out
        self.space.release(np.setdiff1d(released, self._unpunched) if len(self._unpunched) else released)
        self.space.set_pending(np.union1d(freed, self._unpunched) if len(self._unpunched) else freed)
        if self.mode == Mode.OUT_OF_DATA_SPACE and self.st[K.ST_NR_ALLOCATABLE] > 0:
            self.mode = Mode.WRITE
        self._set_md_check()

    @_locked
    def abort(self) -> None:
        """Drop everything since the last commit (dm-thin's transaction abort)."""
        self._check_open()
        self._load()
        if self.data.nr_blocks != self.space.nr_blocks:  # a resize since the last commit is undone too
            self.data.resize(self.space.nr_blocks)
        if not self.read_only:
            _poolspace().scrub_on_open(self)

    def _abort_to_read_only(self, reason: str) -> None:
        self._load()
        self.mode = Mode.READ_ONLY
        self.read_only_reason = reason

    @_locked
    def set_transaction_id(self, old: int, new: int) -> None:
        """dm-thin's ``set_transaction_id <old> <new>``: compare-and-swap of the userspace id."""
        self._check_writable()
        if old != self.transaction_id:
            raise InvalidArgument(f"pool {self.path}: mismatched transaction id (pool has "
                                  f"{self.transaction_id}, caller said {old})")
        if not isinstance(new, int) or not 0 <= new < 1 << 64:
            raise InvalidArgument(f"transaction id {new!r} must be an unsigned 64-bit integer")
        self.header["transaction_id"] = new

    @_locked
    def resize(self, data_size: int | str | None, metadata_size: int | str | None = None) -> None:
        """Grow the data device (dm-thin cannot shrink) and/or the metadata file; leaves
        out-of-data-space mode; commits.

        Before anything changes, the metadata's room for the bigger data space map is checked: if the
        metadata file cannot hold it, it is grown first (to ``metadata_size`` if given, else to the
        default size for the new data size), and if no allowed size can hold it the resize is refused
        (InvalidArgument) with both files unchanged.  A resize whose commit fails is rolled back (the
        data file keeps its old size).  ``data_size=None`` grows only the metadata
        (:meth:`resize_metadata`)."""
        _poolspace().resize(self, data_size, metadata_size)

    @_locked
    def resize_metadata(self, metadata_size: int | str) -> None:
        """Grow the metadata file to ``metadata_size`` bytes (never shrinks; at most 15.87 GiB).

        The way out of metadata space: a pool that went read-only because a commit found no free
        metadata block returns to write mode (then e.g. ``delete`` frees space).  Nothing else changes;
        the next commit uses the new room.  ``thinpool resize POOL --metadata-size SIZE``."""
        _poolspace().resize_metadata(self, metadata_size)

    def _set_md_check(self) -> None:
        """Live node count below which a commit surely fits in the metadata file (see _after_alloc);
        refreshed at every load and commit (the other pages only grow between them)."""
        bm = self.nodes_map
        fixed = (len(bm.leaf_rc) + len(bm.inner_rc) + len(self.space.data_rc)) // 1024 + \
            len(self.devs) // DEVS_PER_PAGE + 8
        self._md_check_below = (self.store.nr_blocks - 16) // 2 - fixed - 64

    def _after_alloc(self) -> None:
        item = self.st.item  # Python ints: this runs after every allocating write
        if not self._lwm_fired and item(K.ST_NR_FREE) <= self.header["low_water_mark"]:
            self._lwm_fired = True
            if self.on_low_water is not None:
                self.on_low_water(self)
        if item(K.ST_LEAVES_LIVE) + item(K.ST_INNERS_LIVE) < self._md_check_below:
            return  # far from the metadata limit: skip the estimate
        bm = self.nodes_map
        live = int(self.st[K.ST_LEAVES_LIVE] + self.st[K.ST_INNERS_LIVE]) + \
            (len(bm.leaf_rc) + len(bm.inner_rc) + len(self.space.data_rc)) // 1024 + len(self.devs) // DEVS_PER_PAGE + 8
        if 2 * live + 16 > self.store.nr_blocks:
            needed = self.store.estimate_commit_blocks(self._paged())
            if needed > self.store.free_blocks():
                self.commit()  # frees the previous versions of rewritten pages, or goes read-only

    # ------------------------------------------------------------------ metadata snapshot
    @_locked
    def reserve_metadata_snap(self) -> None:
        """Commit and hold a read-only view of the metadata (dm-thin's ``reserve_metadata_snap``)."""
        self._check_writable()
        if self.store.header.get("held"):
            raise AlreadyExists(f"pool {self.path}: a metadata snapshot is already held")
        self.commit()
        self.store.hold()
        self.catalog_dirty = True
        self.commit()

    @_locked
    def release_metadata_snap(self) -> None:
        """Release the held metadata snapshot (dm-thin's ``release_metadata_snap``)."""
        self._check_writable()
        if not self.store.header.get("held"):
            raise InvalidArgument(f"pool {self.path}: no metadata snapshot is held")
        self.store.release_hold()
        self.catalog_dirty = True
        self.commit()

    # ------------------------------------------------------------------ check and interop
    @_locked
    def check(self):
        """Structural check of the metadata (:class:`~thinpool.check.CheckReport`; ``.ok``)."""
        from .check import check_pool
        self._check_open()
        return check_pool(self)

    def to_metadata(self, *, held: bool = False):
        """The pool as interop IR (:class:`~thinpool.interop.ir.Metadata`); ``held`` reads the held
        metadata snapshot instead of the live state."""
        from .interop.pool_ir import pool_to_metadata
        self._check_open()
        return pool_to_metadata(self, held=held)

    @classmethod
    def from_metadata(cls, path: str | os.PathLike, md, **kwargs) -> "Pool":
        """Create a new pool holding exactly the devices and mappings of IR ``md`` (restore/import)."""
        from .interop.pool_ir import pool_from_metadata
        return pool_from_metadata(path, md, **kwargs)

    # ------------------------------------------------------------------ closing
    @_locked
    def close(self, commit: bool = True) -> None:
        """Commit (unless ``commit=False``, which drops uncommitted changes like a crash) and release."""
        if self._closed:
            return
        try:
            if commit:
                self.commit()
        finally:
            self._closed = True
            self.data.close()
            self.store.close()
            self._release_lock()


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m





