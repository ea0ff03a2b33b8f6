"""The bridge between a live :class:`~thinpool.pool.Pool` and the interop IR.

``pool_to_metadata`` is the one producer every exporter (XML, binary, thin_ls/delta/rmap) reads;
``pool_from_metadata`` is the one consumer every importer (XML restore, binary import) feeds.
"""

from __future__ import annotations

import os

import numpy as np

from .. import schema as K
from ..errors import InvalidArgument, ReadOnly
from ..schema import Mode
from .ir import MAX_DEV_ID, SECTOR, TIME_MASK, Device, Metadata, Superblock


def _walks():
    from .. import walks
    return walks


def _device_mappings(nodes: tuple, root: int) -> tuple[np.ndarray, np.ndarray]:
    n, _ = _walks().count_mappings(nodes, root)
    vb = np.empty(n, np.int64)
    vals = np.empty(n, np.uint64)
    _walks().collect_mappings(nodes, root, vb, vals)
    return vb, vals


def state_to_metadata(pool, nodes: tuple, devs: np.ndarray, nr_data_blocks: int, time: int,
                      transaction: int, held_root: int | None = None) -> Metadata:
    used = np.flatnonzero((devs["flags"] & 1) != 0)
    order = used[np.argsort(devs["dev_id"][used], kind="stable")]
    devices = []
    for slot in order:
        d = devs[slot]
        vb, vals = _device_mappings(nodes, int(d["root"]))
        devices.append(Device(dev_id=int(d["dev_id"]), mapped_blocks=len(vb), transaction=int(d["transaction"]),
                              creation_time=int(d["creation_time"]), snap_time=int(d["snap_time"]),
                              vblocks=vb.astype(np.uint64), dblocks=vals >> np.uint64(24),
                              times=(vals & np.uint64(TIME_MASK)).astype(np.uint32)))
    sb = Superblock(time=time, transaction=transaction, data_block_size=pool.block_size // SECTOR,
                    nr_data_blocks=nr_data_blocks, flags=1 if pool.header.get("needs_check") else 0, version=2,
                    metadata_snap=held_root)
    return Metadata(sb, devices)


def pool_to_metadata(pool, *, held: bool = False) -> Metadata:
    """The pool's current state (or its held metadata snapshot) as IR, devices in dev-id order."""
    with pool._lock:
        if held:
            return _held_metadata(pool)
        hdr = pool.store.header.get("held")
        return state_to_metadata(pool, pool.nodes_map.nodes, pool.devs, pool.space.nr_blocks, pool.time,
                                 pool.transaction_id, int(hdr["root_block"]) if hdr else None)


def _held_metadata(pool) -> Metadata:
    from ..blockmap import BlockMap
    from ..schema import dev_dtype
    held = pool.store.header.get("held")
    if not held:
        raise InvalidArgument(f"pool {pool.path}: no metadata snapshot is held (reserve one first)")
    arrays = {k: np.frombuffer(v, np.uint8) for k, v in pool.store.load_held().items()}
    st = np.zeros(K.ST_SIZE, np.int64)
    bm = BlockMap.from_arrays(st, arrays["leaves"].view(np.uint64), arrays["inners"].view(np.int32),
                              arrays["leaf_rc"].view(np.uint32), arrays["inner_rc"].view(np.uint32))
    devs = arrays["devs"].view(dev_dtype())
    nr = len(arrays["data_rc"]) // 4
    nr = min(nr, pool.space.nr_blocks)
    md = state_to_metadata(pool, bm.nodes, devs, nr, pool.time, pool.transaction_id, int(held["root_block"]))
    return md


def pool_from_metadata(path: str | os.PathLike, md: Metadata, *, data_file: str | os.PathLike | None = None,
                       metadata_size: int | str | None = None, names: dict[int, str] | None = None,
                       take_over_data: bool = False, **create_kwargs):
    """Create a new pool at ``path`` holding exactly the devices and mappings of ``md``.

    Volume names default to ``dev<ID>``; sizes to the data device size (dm-thin stores none).
    ``data_file`` is an existing data device used in place (its contents are expected); one that
    another pool owns is refused unless ``take_over_data`` (see :mod:`thinpool.ownership`).
    Everything is validated before anything is created, and a failure (e.g. metadata space too
    small) removes everything created: the new pool, and the data file's former owner stamp is put
    back.
    """
    from ..pool import Pool, check_block_size
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
    pool = Pool.create(path, data_size=sb.nr_data_blocks * bs, block_size=bs, metadata_size=metadata_size,
                       data_file=data_file, force=True, take_over_data=take_over_data, **create_kwargs)
    try:
        _fill(pool, md, names or {})
        pool.commit()
        if pool.mode not in (Mode.WRITE, Mode.OUT_OF_DATA_SPACE):
            raise ReadOnly(f"pool {pool.path}: could not commit the imported metadata "
                           f"({getattr(pool, 'read_only_reason', pool.mode)})")
    except BaseException:
        pool.close(commit=False)
        pool._new_files.undo()
        raise
    return pool


def _fill(pool, md: Metadata, names: dict[int, str]) -> None:
    bm = pool.nodes_map
    size = pool.space.nr_blocks * pool.block_size
    for dev in md.devices:
        name = names.get(dev.dev_id, f"dev{dev.dev_id}")
        root = bm.new_root()
        vals = (dev.dblocks.astype(np.uint64) << np.uint64(24)) | (dev.times.astype(np.uint64) & np.uint64(TIME_MASK))
        state = np.zeros(K.DEV_COLUMNS, np.int64)
        state[K.DEV_ROOT] = root
        state[K.DEV_SNAP_TIME] = dev.snap_time
        start = 0
        vb = dev.vblocks.astype(np.int64)
        while True:
            from ..kernels_map import build_device
            code, start = build_device(bm.nodes, pool.space.arrays, pool.st, state, vb, vals, start)
            if code == K.OK:
                break
            bm.ensure(max(64, len(vb) // K.LEAF_ENTRIES // 8 + 3), max(64, (len(vb) - start) // K.LEAF_ENTRIES + 2))
        hi = int(vb[-1]) + 1 if len(vb) else 0
        vsize = max(size, hi * pool.block_size)
        slot = pool._register(name, dev.dev_id, int(state[K.DEV_ROOT]), len(vb), dev.creation_time, dev.snap_time, vsize)
        pool.devs[slot]["transaction"] = dev.transaction
    pool.st[K.ST_TIME] = md.superblock.time
    pool.header["transaction_id"] = md.superblock.transaction
    pool.space.recount()
