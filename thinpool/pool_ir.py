"""The engine half of the IR bridge: a live :class:`~thinpool.pool.Pool` <-> the interop IR.

``pool_to_metadata`` is the one producer every exporter (XML, binary, thin_ls/delta/rmap) reads;
``pool_from_metadata`` is the one consumer every importer (XML restore, binary import) feeds.  It
reads the pool through its public read-only views under :meth:`Pool.locked` and builds one through
the pool's import interface (``_import_device``, ``_set_superblock``); it never writes the pool's
state itself.  The IR (:mod:`thinpool.interop.ir`) knows nothing of the pool.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import schema as K
from .errors import InvalidArgument, ReadOnly
from .rules import check_block_size
from .interop.ir import MAX_DEV_ID, SECTOR, Device, Metadata, Superblock
from .schema import DevFlag, Mode, pack_mapping, unpack_mapping

if TYPE_CHECKING:
    from .pool import Pool


def _walks():
    from . import walks
    return walks


def _device_mappings(nodes: tuple, root: int) -> tuple[np.ndarray, np.ndarray]:
    n, _ = _walks().count_mappings(nodes, root)
    vb = np.empty(n, np.int64)
    vals = np.empty(n, np.uint64)
    _walks().collect_mappings(nodes, root, vb, vals)
    return vb, vals


def state_to_metadata(pool: "Pool", nodes: tuple, devs: np.ndarray, nr_data_blocks: int, time: int,
                      transaction: int, held_root: int | None = None, flags: int | None = None) -> Metadata:
    """IR of a pool state: the block map ``nodes`` and device table ``devs`` (devices in dev-id order);
    ``flags`` defaults to the live pool's (needs_check)."""
    used = np.flatnonzero((devs["flags"] & DevFlag.IN_USE) != 0)
    order = used[np.argsort(devs["dev_id"][used], kind="stable")]
    devices = []
    by_root: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for slot in order:
        d = devs[slot]
        root = int(d["root"])
        arrays = by_root.get(root)
        if arrays is None:  # devices sharing a root (a snapshot and its unchanged origin) share the arrays
            vb, vals = _device_mappings(nodes, root)
            blocks, times = unpack_mapping(vals)
            arrays = by_root[root] = (vb.astype(np.uint64), blocks, times.astype(np.uint32))
        devices.append(Device(dev_id=int(d["dev_id"]), mapped_blocks=len(arrays[0]), transaction=int(d["transaction"]),
                              creation_time=int(d["creation_time"]), snap_time=int(d["snap_time"]),
                              vblocks=arrays[0], dblocks=arrays[1], times=arrays[2]))
    if flags is None:
        flags = 1 if pool.header.get("needs_check") else 0
    sb = Superblock(time=time, transaction=transaction, data_block_size=pool.block_size // SECTOR,
                    nr_data_blocks=nr_data_blocks, flags=flags, version=2,
                    metadata_snap=held_root)
    return Metadata(sb, devices)


def pool_to_metadata(pool: "Pool", *, held: bool = False) -> Metadata:
    """The pool's current state (or its held metadata snapshot) as IR, devices in dev-id order.

    The held view is what the kernel's held root holds: the superblock as it was at
    ``reserve_metadata_snap`` (its time, transaction id and flags) and ``nr_data_blocks`` 0 (the copy
    has no space maps, so thin_dump -m prints 0), and no held root of its own.
    """
    with pool.locked():
        if held:
            return _held_metadata(pool)
        hdr = pool.store.header.get("held")
        return state_to_metadata(pool, pool.nodes_map.nodes, pool.devs, pool.nr_data_blocks, pool.time,
                                 pool.transaction_id, int(hdr["root_block"]) if hdr else None)


def _held_metadata(pool: "Pool") -> Metadata:
    from .blockmap import BlockMap
    from .schema import dev_dtype
    held = pool.store.header.get("held")
    if not held:
        raise InvalidArgument(f"pool {pool.path}: no metadata snapshot is held (reserve one first)")
    arrays = {k: np.frombuffer(v, np.uint8) for k, v in pool.store.load_held().items()}
    st = np.zeros(K.ST_SIZE, np.int64)
    bm = BlockMap.from_arrays(st, arrays["leaves"].view(np.uint64), arrays["inners"].view(np.int32),
                              arrays["leaf_rc"].view(np.uint32), arrays["inner_rc"].view(np.uint32))
    devs = arrays["devs"].view(dev_dtype())
    # the kernel's held root is a copy of the superblock at reservation with its space-map roots
    # wiped (dm-thin-metadata.c, __reserve_metadata_snap): its own time, transaction id and flags,
    # and no data space map, so thin_dump -m / thin_delta -m print nr_data_blocks="0"
    sb = held.get("superblock")
    if sb is None:  # held before the hold kept its superblock fields: the best we know is the live pool's
        sb = {"time": pool.time, "transaction_id": pool.transaction_id, "needs_check": pool.header.get("needs_check")}
    # (the copy's own held_root is zero: metadata_snap None)
    return state_to_metadata(pool, bm.nodes, devs, 0, int(sb["time"]), int(sb["transaction_id"]),
                             None, flags=1 if sb.get("needs_check") else 0)


def pool_from_metadata(create: Callable[..., "Pool"], path: str | os.PathLike, md: Metadata, *, data_file: str | os.PathLike | None = None,
                       metadata_size: int | str | None = None, names: dict[int, str] | None = None,
                       take_over_data: bool = False, **create_kwargs: Any) -> "Pool":
    """Create a new pool at ``path`` (with ``create``, i.e. :meth:`Pool.create`) holding exactly the
    devices and mappings of ``md`` (:meth:`Pool.from_metadata`).

    Volume names default to ``dev<ID>``; sizes to the data device size (dm-thin stores none).
    ``data_file`` is an existing data device used in place (its contents are expected); one that
    another pool owns is refused unless ``take_over_data`` (see :mod:`thinpool.ownership`).
    Everything is validated before anything is created, and a failure (e.g. metadata space too
    small) removes everything created: the new pool, and the data file's former owner stamp is put
    back.
    """
    sb = md.superblock
    bs = sb.data_block_size * SECTOR
    check_block_size(bs)
    if sb.nr_data_blocks < 1:
        raise InvalidArgument("metadata describes a data device of 0 blocks")
    seen = set()
    for dev in md.devices:
        if not 0 <= dev.dev_id <= MAX_DEV_ID:
            raise InvalidArgument(f"device id {dev.dev_id} is out of range (24 bits)")
        if dev.dev_id in seen:
            raise InvalidArgument(f"device {dev.dev_id} appears twice")
        seen.add(dev.dev_id)
        if len(dev.vblocks):
            if len(dev.vblocks) > 1 and (np.diff(dev.vblocks.astype(np.int64)) <= 0).any():
                raise InvalidArgument(f"device {dev.dev_id}: mappings are not sorted / have duplicates")
            if int(dev.vblocks[-1]) >= K.MAX_VBLOCKS:
                raise InvalidArgument(f"device {dev.dev_id}: virtual block {int(dev.vblocks[-1])} is beyond "
                                      f"thinpool's limit of {K.MAX_VBLOCKS} blocks per device")
            if int(dev.dblocks.max()) >= sb.nr_data_blocks:
                raise InvalidArgument(f"device {dev.dev_id}: mapping beyond end of data device "
                                      f"({int(dev.dblocks.max())} >= {sb.nr_data_blocks})")
    pool = create(path, data_size=sb.nr_data_blocks * bs, block_size=bs, metadata_size=metadata_size,
                       data_file=data_file, force=True, take_over_data=take_over_data, **create_kwargs)
    try:
        _fill(pool, md, names or {})
        pool.commit()
        if pool.mode != Mode.WRITE and pool.mode != Mode.OUT_OF_DATA_SPACE:
            raise ReadOnly(f"pool {pool.path}: could not commit the imported metadata "
                           f"({getattr(pool, 'read_only_reason', pool.mode)})")
    except BaseException:
        pool.close(commit=False)
        pool._new_files.undo()
        raise
    return pool


def _fill(pool: "Pool", md: Metadata, names: dict[int, str]) -> None:
    size = pool.nr_data_blocks * pool.block_size
    for dev in md.devices:
        vb = dev.vblocks.astype(np.int64)
        vals = pack_mapping(dev.dblocks.astype(np.uint64), dev.times.astype(np.uint64))
        hi = int(vb[-1]) + 1 if len(vb) else 0
        pool._import_device(names.get(dev.dev_id, f"dev{dev.dev_id}"), dev.dev_id, vb, vals,
                            transaction=dev.transaction, creation_time=dev.creation_time, snap_time=dev.snap_time,
                            size=max(size, hi * pool.block_size))
    pool._set_superblock(time=md.superblock.time, transaction_id=md.superblock.transaction)
