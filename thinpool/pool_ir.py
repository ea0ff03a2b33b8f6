"""The engine half of the IR bridge: a live :class:`~thinpool.pool.Pool` <-> the interop IR.

``pool_to_metadata`` is the one producer every exporter (XML, binary, thin_ls/delta/rmap) reads;
``pool_from_metadata`` is the one consumer every importer (XML restore, binary import) feeds.  It
reads the pool through its public read-only views under :meth:`Pool.locked` and builds one through
the pool's import interface (``_import_forest``, ``_import_device_at``, ``_set_superblock``); it never writes the pool's
state itself.  The IR (:mod:`thinpool.interop.ir`) knows nothing of the pool.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import schema as K
from .errors import InvalidArgument, ReadOnly
from .rules import check_block_size
from .interop.ir import MAX_DEV_ID, SECTOR, Device, Metadata, Superblock, identical_runs
from .schema import U64_MASK, DevFlag, Mode, pack_mapping, unpack_mapping

#: bit 0 of dm-thin's superblock flags (THIN_METADATA_NEEDS_CHECK_FLAG; thin_dump's ``flags="1"``)
NEEDS_CHECK_FLAG = 1

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
            blocks = unpack_mapping(vals)[0]
            vals &= np.uint64(K.TIME_MASK)  # the times, in place: at 100 million mappings every copy is 800 MB
            arrays = by_root[root] = (vb.view(np.uint64), blocks, vals.astype(np.uint32))
            del vb, vals
        devices.append(Device(dev_id=int(d["dev_id"]), mapped_blocks=len(arrays[0]),
                              transaction=int(d["transaction"]) & U64_MASK,
                              creation_time=int(d["creation_time"]), snap_time=int(d["snap_time"]),
                              vblocks=arrays[0], dblocks=arrays[1], times=arrays[2]))
    if flags is None:
        flags = NEEDS_CHECK_FLAG if pool.header.get("needs_check") else 0
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
    from .nodestore import inners_from_disk, leaves_from_disk  # any layout
    bm = BlockMap.from_arrays(st, leaves_from_disk(arrays), inners_from_disk(arrays),
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
        needs_check = bool(sb.flags & NEEDS_CHECK_FLAG)
        if needs_check:  # the superblock's flag survives the import: the pool is read-only until checked
            pool._set_needs_check("the imported metadata has needs_check set")
        pool.commit()
        if needs_check:
            pool._set_mode(Mode.READ_ONLY)
        elif pool.mode != Mode.WRITE and pool.mode != Mode.OUT_OF_DATA_SPACE:
            raise ReadOnly(f"pool {pool.path}: could not commit the imported metadata "
                           f"({getattr(pool, 'read_only_reason', pool.mode)})")
    except BaseException:
        pool.close(commit=False)
        pool._new_files.undo()
        raise
    return pool


def _fill(pool: "Pool", md: Metadata, names: dict[int, str]) -> None:
    size = pool.nr_data_blocks * pool.block_size
    trees, tree_of_dev = _distinct_trees(md.devices)
    vb = np.concatenate([d.vblocks for d in trees] or [np.zeros(0, np.uint64)]).astype(np.int64)
    vals = np.concatenate([pack_mapping(d.dblocks.astype(np.uint64), d.times.astype(np.uint64)) for d in trees]
                          or [np.zeros(0, np.uint64)])
    counts = np.array([len(d.vblocks) for d in trees], np.int64)
    leaves, mids, roots, refs, data_blocks, root_of_tree = shared_block_map(vb, vals, counts)
    refs = (refs[0], refs[1], np.bincount(root_of_tree[tree_of_dev], minlength=roots[0]).astype(np.uint32))
    slots = pool._import_forest(leaves, mids, roots, refs, data_blocks)
    for dev, tree in zip(md.devices, tree_of_dev):
        hi = int(dev.vblocks[-1]) + 1 if len(dev.vblocks) else 0
        pool._import_device_at(names.get(dev.dev_id, f"dev{dev.dev_id}"), dev.dev_id,
                               int(slots[root_of_tree[tree]]), len(dev.vblocks), transaction=dev.transaction,
                               creation_time=dev.creation_time, snap_time=dev.snap_time,
                               size=max(size, hi * pool.block_size))
    pool._set_superblock(time=md.superblock.time, transaction_id=md.superblock.transaction)


def _distinct_trees(devices: list[Device]) -> tuple[list[Device], np.ndarray]:
    """Devices whose mapping arrays are the very same objects (a producer's way of saying "this snapshot
    is its origin, unchanged") have one tree: (one device per tree, each device's tree)."""
    index: dict[tuple[int, int, int], int] = {}
    trees: list[Device] = []
    tree_of = np.zeros(len(devices), np.int64)
    for i, dev in enumerate(devices):
        key = (id(dev.vblocks), id(dev.dblocks), id(dev.times))
        t = index.get(key)
        if t is None:
            t = index[key] = len(trees)
            trees.append(dev)
        tree_of[i] = t
    return trees, tree_of


def _runs(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal consecutive rows of ``keys`` (equal-length arrays): (first row, length) of each."""
    n = len(keys[0])
    new = np.zeros(n, bool)
    if n:
        new[0] = True
        for k in keys:
            new[1:] |= k[1:] != k[:-1]
    first = np.flatnonzero(new)
    return first, np.diff(np.append(first, n))


def _dedupe(first: np.ndarray, length: np.ndarray, columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Identical runs: (node number of each run, the runs that are their own representative, in node order)."""
    rep, unique = identical_runs(first, length, columns)
    node = np.full(len(first), -1, np.int64)
    node[unique] = np.arange(unique.size)
    return node[rep], unique


def _rows(first: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, run) of every row of the runs ``first``/``length``."""
    run = np.repeat(np.arange(len(first)), length)
    return np.repeat(first, length) + (np.arange(run.size) - np.repeat(np.cumsum(length) - length, length)), run


def shared_block_map(vb: np.ndarray, vals: np.ndarray, counts: np.ndarray) -> tuple:
    """The pool's block map for trees of sorted mappings, identical parts shared as a snapshot shares
    them: every 512-block chunk whose mappings equal another tree's at the same place is one leaf, every
    identical mid node (1024 chunks) one node, identical trees one root.

    ``vb``/``vals`` (int64 virtual blocks, packed mapping values) hold the trees' mappings tree after
    tree, ``counts[t]`` each.  Returns ``(leaves, mids, roots, counts, data_blocks, root_of_tree)`` in
    the form :meth:`BlockMap.add_forest <thinpool.blockmap.BlockMap.add_forest>` takes (the roots'
    counts left to the caller, who knows how many devices use each tree), ``data_blocks`` listing the
    data block of every entry of every distinct leaf (dm-thin's count: one per distinct leaf).
    """
    n_trees = len(counts)
    tree_of = np.repeat(np.arange(n_trees), counts)
    chunk = vb >> K.LEAF_BITS
    # leaves: runs of one tree's mappings in one chunk
    c_first, c_len = _runs([tree_of, chunk])
    leaf_of_chunk, leaf_reps = _dedupe(c_first, c_len, [vb, vals])
    rows, run = _rows(c_first[leaf_reps], c_len[leaf_reps])
    leaves = (leaf_reps.size, run, vb[rows] & (K.LEAF_ENTRIES - 1), vals[rows])
    # mid nodes: runs of one tree's chunks under one mid (1024 chunks)
    c_tree, c_idx = tree_of[c_first], chunk[c_first]
    m_first, m_len = _runs([c_tree, c_idx >> K.INNER_BITS])
    mid_of_run, mid_reps = _dedupe(m_first, m_len, [c_idx, leaf_of_chunk])
    rows, run = _rows(m_first[mid_reps], m_len[mid_reps])
    mids = (mid_reps.size, run, c_idx[rows] & (K.INNER_ENTRIES - 1), leaf_of_chunk[rows])
    leaf_rc = np.bincount(leaf_of_chunk[rows], minlength=leaf_reps.size).astype(np.uint32)
    # roots: each tree's mid nodes (an empty tree: an empty root)
    m_tree, m_idx = c_tree[m_first], c_idx[m_first] >> K.INNER_BITS
    r_len = np.bincount(m_tree, minlength=n_trees).astype(np.int64)
    r_first = np.cumsum(r_len) - r_len
    root_of_tree, root_reps = _dedupe(r_first, r_len, [m_idx, mid_of_run])
    rows, run = _rows(r_first[root_reps], r_len[root_reps])
    roots = (root_reps.size, run, m_idx[rows] & (K.INNER_ENTRIES - 1), mid_of_run[rows])
    mid_rc = np.bincount(mid_of_run[rows], minlength=mid_reps.size).astype(np.uint32)
    data_blocks = (leaves[3] >> np.uint64(K.TIME_BITS)).astype(np.int64)
    return leaves, mids, roots, (leaf_rc, mid_rc), data_blocks, root_of_tree
