"""Real dm-thin binary metadata: write it from the interop IR (reading is :mod:`thinpool.interop.binary_read`).

The format is the kernel's (``dm-thin-metadata.c`` + ``persistent-data``), as documented in the
docs/dm-thin.md §12-§15 and accepted by ``thin_check``/``thin_dump`` 0.9.0.  A written file looks like::

    block 0                 superblock (magic 27022010, version 2, XOR 160774)
    block 1                 metadata space map index block (≤ 255 index entries, XOR 160478)
    2 ..                    metadata space map bitmaps (16320 2-bit counts each, XOR 240779)
    ..                      data space map: index btree (value size 16), bitmaps, ref-count btree
    ..                      device details btree (dev id -> 24-byte details)
    ..                      top level of the mapping tree (dev id -> device tree root)
    ..                      the mapping btrees (vblock -> (data block << 24) | time), identical
                            subtrees of different devices written once and shared, as the kernel
                            shares them after a snapshot (:mod:`thinpool.interop.sharing`)
    ..                      held metadata snapshot, if any: its own details/top-level trees unless
                            identical to the live ones, its device trees sharing every subtree the
                            live ones have, and a superblock copy with zeroed space-map roots
    ..                      metadata space map ref-count btree (blocks with ≥ 3 references)
    used .. nr_blocks-1     free (the file is sparse there)

Writing plans every btree first (:func:`~thinpool.interop.btree.plan_forest`), so the number of
blocks is known before any block number is assigned; then the metadata space map, which has to
count its own blocks, is built from the finished layout, and every node is packed with numpy
and checksummed per block.  Memory stays bounded whatever the number of mappings: the trees are
planned and the mapping leaves packed, checksummed and written a window of mappings at a time (the
blocks before them -- space maps, device trees -- and after them -- internal nodes, the held copy,
the metadata ref-count tree -- in one piece each), the data blocks counted a window at a time into
one byte of count per data block (counts past 254 exactly, in a list beside it).  Reference counts are exact: a metadata block's count is the number
of references to it (a node shared by two parents, or a root shared by two devices, has count 2),
a data block's count the number of leaf entries mapping it across all distinct leaves (dm-thin's
rule: a snapshot's unchanged leaves add nothing).

Reading (:mod:`thinpool.interop.binary_read`)
validates every block it touches (checksum, block number, node header, key order, space-map
structure, and by default every reference count against the btrees) and raises :class:`~thinpool.errors.MetadataCorrupt` naming the structure
(``superblock``, ``details tree``, ``mapping tree of device 3``, ``data space map``, ...) and the
block.  It accepts the 0.9.0 ``thin_restore`` output too (version 1, truncated last bitmap,
an unreferenced-but-counted temporary block).
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from thinpool.errors import InvalidArgument
from thinpool.safe_output import atomic_output, check_path, guard_output
from thinpool.interop.btree import (
    BITMAP_CSUM_XOR,
    BLOCK_SIZE,
    BTREE_CSUM_XOR,
    INDEX_CSUM_XOR,
    SUPERBLOCK_CSUM_XOR,
    BlockSource,
    Forest,
    corrupt,
    pack_forest,
    plan_forest,
    seal_blocks,
)
from thinpool.interop.sharing import WINDOW, SharedForest, TreeEntries, run_rows, build_forest, pack_inner, pack_leaves
from thinpool.interop.ir import MAX_DEV_ID, TIME_MASK, Device, Metadata, Superblock
from thinpool.interop.sm_disk import (
    MAX_METADATA_BITMAPS,
    MAX_METADATA_BLOCKS,
    SpaceMapContent,
    SpaceMapRoot,
    build_space_map,
    space_map_from_counts,
    nr_bitmaps,
)

__all__ = [
    "write_binary_metadata",
    "default_metadata_blocks",
    "RawSuperblock",
]

THIN_MAGIC = 27022010
THIN_VERSION = 2
METADATA_BLOCK_SECTORS = 8
MIN_METADATA_BLOCKS = 512  # 2 MiB
MAX_DATA_BLOCK = (1 << 40) - 1

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_DETAILS = np.dtype([("mapped_blocks", "<u8"), ("transaction", "<u8"),
                     ("creation_time", "<u4"), ("snap_time", "<u4")])


# ---------------------------------------------------------------------------------------------
# Superblock


@dataclass
class RawSuperblock:
    """Every field of the on-disk superblock (docs/dm-thin.md §12.1) except the checksum and blocknr."""

    _FORMAT = struct.Struct("<IIQ16sQIIQQ128s128sQQIIQIII")  # 364 bytes

    flags: int
    uuid: bytes
    magic: int
    version: int
    time: int
    trans_id: int
    held_root: int
    data_sm: SpaceMapRoot | None
    metadata_sm: SpaceMapRoot | None
    data_mapping_root: int
    device_details_root: int
    data_block_size: int
    metadata_block_size: int
    metadata_nr_blocks: int
    compat_flags: int = 0
    compat_ro_flags: int = 0
    incompat_flags: int = 0

    def pack(self, blocknr: int) -> bytes:
        """The 4096-byte block (checksum left zero); a ``None`` space map packs as zeroes."""
        data_sm = self.data_sm.pack() if self.data_sm else bytes(128)
        meta_sm = self.metadata_sm.pack() if self.metadata_sm else bytes(128)
        raw = self._FORMAT.pack(0, self.flags, blocknr, self.uuid, self.magic, self.version, self.time,
                                self.trans_id, self.held_root, data_sm, meta_sm, self.data_mapping_root,
                                self.device_details_root, self.data_block_size, self.metadata_block_size,
                                self.metadata_nr_blocks, self.compat_flags, self.compat_ro_flags,
                                self.incompat_flags)
        return raw.ljust(BLOCK_SIZE, b"\0")

    @classmethod
    def unpack(cls, block: bytes) -> RawSuperblock:
        """Parse a superblock (or held-root copy) block."""
        f = cls._FORMAT.unpack_from(block)
        data_sm, meta_sm = (SpaceMapRoot.unpack(area) if any(area) else None for area in (f[9], f[10]))
        return cls(f[1], f[3], f[4], f[5], f[6], f[7], f[8], data_sm, meta_sm, *f[11:])


def _read_superblock(src: BlockSource, block: int, structure: str) -> RawSuperblock:
    raw = RawSuperblock.unpack(src.read(np.array([block]), SUPERBLOCK_CSUM_XOR, lambda i: structure, structure)[0])
    if raw.magic != THIN_MAGIC:
        raise corrupt(structure, block, f"bad magic {raw.magic} (expected {THIN_MAGIC})")
    if raw.version not in (1, 2):
        raise corrupt(structure, block, f"unsupported metadata version {raw.version}")
    if raw.metadata_block_size != METADATA_BLOCK_SECTORS:
        raise corrupt(structure, block, f"metadata block size {raw.metadata_block_size} sectors (expected 8)")
    if raw.incompat_flags:
        raise corrupt(structure, block, f"unknown incompatible feature flags {raw.incompat_flags:#x}")
    if raw.data_block_size == 0:
        raise corrupt(structure, block, "data block size is 0")
    return raw


# ---------------------------------------------------------------------------------------------
# Writing: validation and preparation of one view (live or held)


@dataclass
class _View:
    """One metadata view: devices sorted by id, each pointing at its mapping tree (``tree``)."""

    sb: Superblock
    devices: list[Device]
    dev_ids: np.ndarray
    details: np.ndarray  # (n, 6) uint32
    tree: np.ndarray  # per device: its tree among _Trees (devices with the very same arrays share one)


class _Trees:
    """The distinct mapping contents of every view, tree after tree (devices whose arrays are the very
    same objects -- a snapshot the producer knows unchanged -- are one tree, validated and hashed once)."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, int, int], int] = {}
        self.owners: list[tuple[str, Device]] = []  # (view label, first device) per tree, for errors
        self.limits: list[int] = []

    def add(self, label: str, dev: Device, data_limit: int) -> int:
        key = (id(dev.vblocks), id(dev.dblocks), id(dev.times))
        t = self.index.get(key)
        if t is None or self.limits[t] != data_limit:
            t = self.index[key] = len(self.owners)
            self.owners.append((label, dev))
            self.limits.append(data_limit)
        return t

    def check(self) -> TreeEntries:
        """Check every tree's mappings (a window of entries at a time) and return them as entries."""
        entries = TreeEntries([d.vblocks for _, d in self.owners], [d.dblocks for _, d in self.owners],
                              [d.times for _, d in self.owners])
        _check_mappings(self.owners, entries, np.array(self.limits, np.uint64))
        return entries


def _check_range(label: str, name: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise InvalidArgument(f"{label}: {name} {value} out of range 0..{limit}")


def _prepare(md: Metadata, label: str, trees: _Trees, data_limit: int | None = None) -> _View:
    """Validate one view and register its devices' mappings in ``trees``; mappings must lie below
    ``data_limit`` (default: the view's own ``nr_data_blocks``; a held view's superblock copy says 0,
    so the caller passes the live one's)."""
    sb = md.superblock
    for name, value, limit in (("time", sb.time, _U32), ("transaction", sb.transaction, _U64),
                               ("flags", sb.flags, _U32), ("nr_data_blocks", sb.nr_data_blocks, _U64)):
        _check_range(label, name, value, limit)
    if not 0 < sb.data_block_size <= _U32:
        raise InvalidArgument(f"{label}: data_block_size {sb.data_block_size} sectors out of range")
    if len(sb.uuid.encode()) > 16:
        raise InvalidArgument(f"{label}: uuid {sb.uuid!r} is longer than the superblock's 16 bytes")
    limit = min(sb.nr_data_blocks if data_limit is None else data_limit, MAX_DATA_BLOCK + 1)
    devices = sorted(md.devices, key=lambda d: d.dev_id)
    details = np.zeros(len(devices), _DETAILS)
    tree = np.zeros(len(devices), np.int64)
    for i, dev in enumerate(devices):
        where = f"{label}: device {dev.dev_id}"
        _check_range(where, "dev_id", dev.dev_id, MAX_DEV_ID)
        if i and dev.dev_id == devices[i - 1].dev_id:
            raise InvalidArgument(f"{where}: duplicate device id")
        if not len(dev.vblocks) == len(dev.dblocks) == len(dev.times):
            raise InvalidArgument(f"{where}: vblocks, dblocks and times differ in length")
        if dev.mapped_blocks != len(dev.vblocks):
            raise InvalidArgument(f"{where}: mapped_blocks {dev.mapped_blocks} but {len(dev.vblocks)} mappings")
        for name, value, lim in (("transaction", dev.transaction, _U64),
                                 ("creation_time", dev.creation_time, _U32),
                                 ("snap_time", dev.snap_time, _U32)):
            _check_range(where, name, value, lim)
        details[i] = (dev.mapped_blocks, dev.transaction, dev.creation_time, dev.snap_time)
        tree[i] = trees.add(label, dev, limit)
    dev_ids = np.array([d.dev_id for d in devices], np.uint64)
    return _View(sb, devices, dev_ids, details.view(np.uint32).reshape(-1, 6), tree)


def _check_mappings(owners: list[tuple[str, Device]], entries: TreeEntries, limits: np.ndarray) -> None:
    """Keys strictly increasing within each tree, data blocks below the tree's limit, times in 24 bits;
    the first fault in that order of checks (and then of entries) is the one reported."""
    first: list[tuple[int, str] | None] = [None, None, None]  # (tree, problem) of each check's first fault
    prev_key, prev_tree = np.uint64(0), -1
    for lo in range(0, entries.total, WINDOW):
        keys, _, dblocks, tree = entries.span(lo, min(entries.total, lo + WINDOW), with_tree=True)
        disorder = np.empty(keys.size, bool)
        disorder[0] = tree[0] == prev_tree and keys[0] <= prev_key
        disorder[1:] = (keys[1:] <= keys[:-1]) & (tree[1:] == tree[:-1])
        if first[0] is None and disorder.any():
            i = int(np.argmax(disorder))
            first[0] = (int(tree[i]), f"vblocks not strictly increasing at vblock {int(keys[i])}")
        beyond = dblocks >= limits[tree]
        if first[1] is None and beyond.any():
            i = int(np.argmax(beyond))
            first[1] = (int(tree[i]), f"data block {int(dblocks[i])} beyond the data device "
                                      f"({int(limits[tree[i]])} blocks)")
        prev_key, prev_tree = keys[-1], int(tree[-1])
    for t, (_, dev) in enumerate(owners):  # times: the trees' own arrays, no window needed
        late = dev.times > TIME_MASK
        if first[2] is None and late.any():
            first[2] = (t, f"mapping time {int(dev.times[np.argmax(late)])} does not fit in 24 bits")
    for fault in first:
        if fault is not None:
            label, dev = owners[fault[0]]
            raise InvalidArgument(f"{label}: device {dev.dev_id}: {fault[1]}")


# ---------------------------------------------------------------------------------------------
# Writing: layout


@dataclass
class _Plan:
    """Every structure to write, before block numbers are assigned."""

    live: _View
    held: _View | None
    entries: TreeEntries
    map_forest: SharedForest
    share_details: bool
    share_top: bool
    data_sm: SpaceMapContent
    top_forest: Forest
    details_forest: Forest
    index_forest: Forest
    data_rc_forest: Forest

    def roots(self, view: _View) -> np.ndarray:
        """Each device's mapping-tree root, as a node of :attr:`map_forest`."""
        return self.map_forest.roots[view.tree]


@dataclass
class _Layout:
    """First block of every region; regions in file order."""

    nr_blocks: int
    meta_index: int
    meta_bitmaps: int
    n_meta_bitmaps: int
    data_index: int
    data_bitmaps: int
    data_rc: int
    details: int
    top: int
    maps: int
    held_copy: int
    meta_rc: int
    used: int = 0


def _plan(md: Metadata, held: Metadata | None) -> _Plan:
    trees = _Trees()
    live = _prepare(md, "metadata", trees)
    hv = None
    if held is not None:
        hv = _prepare(held, "held metadata snapshot", trees, live.sb.nr_data_blocks)
        if hv.sb.data_block_size != live.sb.data_block_size:
            raise InvalidArgument("held metadata snapshot: data_block_size differs from the live metadata's")
    entries = trees.check()
    forest = build_forest(entries)
    share_details = share_top = False
    if hv is not None:
        same_ids = np.array_equal(hv.dev_ids, live.dev_ids)
        share_details = same_ids and np.array_equal(hv.details, live.details)
        share_top = same_ids and np.array_equal(forest.roots[hv.tree], forest.roots[live.tree])
    data_sm = _data_space_map(forest, entries, live.sb.nr_data_blocks)
    n_live, n_held = len(live.devices), len(hv.devices) if hv is not None else 0
    top = plan_forest([n_live] + ([n_held] if hv is not None and not share_top else []), 8)
    details = plan_forest([n_live] + ([n_held] if hv is not None and not share_details else []), 24)
    return _Plan(live, hv, entries, forest, share_details, share_top, data_sm, top, details,
                 plan_forest([data_sm.bitmaps.shape[0]], 16), plan_forest([data_sm.rc_blocks.size], 4))


def _data_space_map(forest: SharedForest, entries: TreeEntries, nr_data_blocks: int) -> SpaceMapContent:
    """The data space map: a data block counts one per entry of every distinct leaf (dm-thin's rule).
    Counted a window of leaves at a time: into one byte per data block when the data device is not much
    larger than the mappings (a count reaching 255 goes on exactly in a list of (block, count) pairs),
    else into (block, count) pairs alone."""
    n_entries = int(forest.leaf_count.sum())
    dense = nr_data_blocks <= 16 * n_entries + (1 << 24)
    counts = np.zeros(nr_data_blocks if dense else 0, np.uint8)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []  # exact counts: every block (sparse) or those past 254
    for a, b, lo, hi in forest.leaf_windows():
        dblocks = entries.span(lo, hi)[2][run_rows(forest.leaf_start[a:b] - lo, forest.leaf_count[a:b])]
        ublocks, ucounts = np.unique(dblocks, return_counts=True)
        if not dense:
            pairs.append((ublocks, ucounts))
            continue
        had = counts[ublocks].astype(np.int64)
        full = had == _SATURATED  # already in the pairs: add this window's count there
        total = had + ucounts
        spill = ~full & (total >= _SATURATED)  # reaching 255 now: its whole count goes to the pairs
        pairs.append((ublocks[full | spill], np.where(full, ucounts, total)[full | spill]))
        counts[ublocks] = np.minimum(total, _SATURATED)
    ublocks, ucounts = _merge_pairs(pairs)
    if not dense:
        return build_space_map(ublocks.astype(np.int64), ucounts, nr_data_blocks)
    sm = space_map_from_counts(counts, nr_data_blocks)
    sm.rc_counts[np.searchsorted(sm.rc_blocks, ublocks)] = np.minimum(ucounts, 0xFFFFFFFF)
    return sm


_SATURATED = 255


def _merge_pairs(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, counts) pairs of several windows as one sorted list, a block's counts summed."""
    ublocks = np.concatenate([p[0] for p in pairs] or [np.zeros(0, np.uint64)])
    ucounts = np.concatenate([p[1] for p in pairs] or [np.zeros(0, np.int64)]).astype(np.int64)
    if len(pairs) > 1 and ublocks.size:
        order = np.argsort(ublocks, kind="stable")
        ublocks, ucounts = ublocks[order], ucounts[order]
        new = np.ones(ublocks.size, bool)
        new[1:] = ublocks[1:] != ublocks[:-1]
        ucounts = np.add.reduceat(ucounts, np.flatnonzero(new))
        ublocks = ublocks[new]
    return ublocks, ucounts


def default_metadata_blocks(nr_data_blocks: int, nr_thins: int) -> int:
    """thin_metadata_size's estimate (0.9.0): ``1 + 2 * nr_data_blocks // 252 + nr_thins`` blocks, at least 2 MiB."""
    return max(MIN_METADATA_BLOCKS, 1 + 2 * nr_data_blocks // 252 + nr_thins)


def _layout(plan: _Plan, n_meta_bitmaps: int, nr_blocks: int) -> _Layout:
    pos = 2 + n_meta_bitmaps
    starts = []
    for size in (plan.index_forest.nr_nodes, plan.data_sm.bitmaps.shape[0], plan.data_rc_forest.nr_nodes,
                 plan.details_forest.nr_nodes, plan.top_forest.nr_nodes, plan.map_forest.nr_nodes,
                 1 if plan.held else 0):
        starts.append(pos)
        pos += size
    data_index, data_bitmaps, data_rc, details, top, maps, held_copy = starts
    return _Layout(nr_blocks, 1, 2, n_meta_bitmaps, data_index, data_bitmaps, data_rc, details, top, maps, held_copy,
                   meta_rc=pos)


def _metadata_counts(plan: _Plan, lay: _Layout) -> np.ndarray:
    """Reference count of every block before the metadata ref-count tree: one per reference.

    A mapping-tree node counts one per distinct parent node and, for a device root, one per entry of
    each top-level tree that points at it (a snapshot's root shared with its origin counts 2); the
    roots of a top-level or details tree shared by the live and held views count 2."""
    counts = np.ones(lay.meta_rc, np.int64)
    forest = plan.map_forest
    refs = forest.refs.copy()
    np.add.at(refs, plan.roots(plan.live), 1)
    if plan.held is not None:
        if plan.share_top:
            counts[lay.top + plan.top_forest.roots[0]] += 1
        else:
            np.add.at(refs, plan.roots(plan.held), 1)
        if plan.share_details:
            counts[lay.details + plan.details_forest.roots[0]] += 1
    counts[lay.maps : lay.maps + forest.nr_nodes] = refs
    return counts


def _choose_layout(plan: _Plan, nr_metadata_blocks: int | None) -> tuple[_Layout, np.ndarray]:
    """Fix the metadata size and every region; returns the layout and per-block reference counts."""
    if nr_metadata_blocks is not None and not 0 < nr_metadata_blocks <= MAX_METADATA_BLOCKS:
        raise InvalidArgument(f"nr_metadata_blocks {nr_metadata_blocks} out of range 1..{MAX_METADATA_BLOCKS}")
    size = nr_metadata_blocks or MIN_METADATA_BLOCKS
    for _ in range(8):
        n_bm = nr_bitmaps(size)
        lay = _layout(plan, n_bm, size)
        counts = _metadata_counts(plan, lay)
        rc_forest = plan_forest([int(np.count_nonzero(counts >= 3))], 4)
        lay.used = lay.meta_rc + rc_forest.nr_nodes
        if nr_metadata_blocks is None:
            want = max(default_metadata_blocks(plan.live.sb.nr_data_blocks, len(plan.live.devices)), 2 * lay.used)
            size = max(min(want, MAX_METADATA_BLOCKS), lay.used)
            if nr_bitmaps(size) != n_bm:
                continue
        if lay.used > size or n_bm > MAX_METADATA_BITMAPS:
            raise InvalidArgument(f"metadata needs {lay.used} blocks; the metadata device has {size} "
                                  f"(at most {MAX_METADATA_BLOCKS})")
        lay.nr_blocks = size
        return lay, np.concatenate([counts, np.ones(rc_forest.nr_nodes, np.int64)])
    raise AssertionError("metadata size did not converge")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# Writing: packing


def _pack_space_map_bitmaps(img: np.ndarray, xor: np.ndarray, first: int, sm: SpaceMapContent) -> np.ndarray:
    rows = first + np.arange(sm.bitmaps.shape[0])
    img[rows, 16:] = sm.bitmaps
    img.view(np.uint64)[rows, 1] = rows
    xor[rows] = BITMAP_CSUM_XOR
    return rows


def _pack_dev_trees(img: np.ndarray, plan: _Plan, lay: _Layout) -> tuple[list[int], list[int]]:
    """Pack the details and top-level trees; returns (details roots, top roots) per view."""
    live, hv = plan.live, plan.held
    dev_keys, top_values, detail_values = [live.dev_ids], [lay.maps + plan.roots(live)], [live.details]
    if hv is not None and not plan.share_top:
        dev_keys.append(hv.dev_ids)
        top_values.append(lay.maps + plan.roots(hv))
    pack_forest(img, plan.top_forest, lay.top, np.concatenate(dev_keys), np.concatenate(top_values).astype(np.uint64))
    dev_keys = [live.dev_ids] + ([hv.dev_ids] if hv is not None and not plan.share_details else [])
    detail_values += [hv.details] if hv is not None and not plan.share_details else []
    pack_forest(img, plan.details_forest, lay.details, np.concatenate(dev_keys), np.concatenate(detail_values))
    details_roots = [lay.details + int(r) for r in plan.details_forest.roots]
    top_roots = [lay.top + int(r) for r in plan.top_forest.roots]
    return details_roots, top_roots


def _sealed(blocks: np.ndarray, xor: np.ndarray | int = BTREE_CSUM_XOR) -> np.ndarray:
    seal_blocks(blocks, np.broadcast_to(np.asarray(xor, np.uint32), (blocks.shape[0],)))
    return blocks


def _image_parts(plan: _Plan, lay: _Layout, meta_counts: np.ndarray) -> Iterator[np.ndarray]:
    """The metadata blocks ``0 .. lay.used - 1`` in order, sealed, a part at a time: the space maps and
    device trees, the mapping leaves a window at a time, then the internal mapping nodes, the held
    superblock copy and the metadata ref-count tree."""
    head = np.zeros((lay.maps, BLOCK_SIZE), np.uint8)
    xor = np.full(lay.maps, BTREE_CSUM_XOR, np.uint32)
    meta_sm = build_space_map(np.arange(lay.used), meta_counts, lay.nr_blocks)
    meta_rc = plan_forest([meta_sm.rc_blocks.size], 4)
    meta_rows = _pack_space_map_bitmaps(head, xor, lay.meta_bitmaps, meta_sm)
    head.view(np.uint64)[lay.meta_index, 1] = lay.meta_index
    head[lay.meta_index, 16 : 16 + 16 * len(meta_rows)] = meta_sm.index_entries(meta_rows).view(np.uint8).reshape(-1)
    xor[lay.meta_index] = INDEX_CSUM_XOR

    data_sm = plan.data_sm
    data_rows = _pack_space_map_bitmaps(head, xor, lay.data_bitmaps, data_sm)
    pack_forest(head, plan.index_forest, lay.data_index, np.arange(len(data_rows), dtype=np.uint64),
                data_sm.index_entries(data_rows))
    pack_forest(head, plan.data_rc_forest, lay.data_rc, data_sm.rc_blocks, data_sm.rc_counts[:, None])
    details_roots, top_roots = _pack_dev_trees(head, plan, lay)

    sb = plan.live.sb
    raw = RawSuperblock(
        flags=sb.flags, uuid=sb.uuid.encode(), magic=THIN_MAGIC, version=THIN_VERSION, time=sb.time,
        trans_id=sb.transaction, held_root=lay.held_copy if plan.held else 0,
        data_sm=SpaceMapRoot(data_sm.nr_blocks, data_sm.nr_allocated,
                             lay.data_index + int(plan.index_forest.roots[0]),
                             lay.data_rc + int(plan.data_rc_forest.roots[0])),
        metadata_sm=SpaceMapRoot(lay.nr_blocks, meta_sm.nr_allocated, lay.meta_index,
                                 lay.meta_rc + int(meta_rc.roots[0])),
        data_mapping_root=top_roots[0], device_details_root=details_roots[0],
        data_block_size=sb.data_block_size, metadata_block_size=METADATA_BLOCK_SECTORS,
        metadata_nr_blocks=lay.nr_blocks)
    head[0] = np.frombuffer(raw.pack(0), np.uint8)
    xor[0] = SUPERBLOCK_CSUM_XOR
    yield _sealed(head, xor)
    del head

    forest = plan.map_forest
    for a, b, lo, hi in forest.leaf_windows():
        keys, values, _, _ = plan.entries.span(lo, hi)
        yield _sealed(pack_leaves(forest, a, b, lay.maps, keys, values, lo))

    tail0 = lay.maps + forest.n_leaves
    tail = np.zeros((lay.used - tail0, BLOCK_SIZE), np.uint8)
    xor = np.full(tail.shape[0], BTREE_CSUM_XOR, np.uint32)
    tail[: lay.maps + forest.nr_nodes - tail0] = pack_inner(forest, lay.maps)
    pack_forest(tail, meta_rc, lay.meta_rc, meta_sm.rc_blocks, meta_sm.rc_counts[:, None], image_first=tail0)
    if plan.held is not None:
        hsb = plan.held.sb
        copy = replace(raw, flags=hsb.flags, uuid=hsb.uuid.encode(), time=hsb.time, trans_id=hsb.transaction,
                       held_root=0, data_sm=None, metadata_sm=None, data_mapping_root=top_roots[-1],
                       device_details_root=details_roots[-1])
        tail[lay.held_copy - tail0] = np.frombuffer(copy.pack(lay.held_copy), np.uint8)
        xor[lay.held_copy - tail0] = SUPERBLOCK_CSUM_XOR
    yield _sealed(tail, xor)


def _write_image(path: str, parts: Iterable[np.ndarray], nr_blocks: int, pools: Iterable[Any] = ()) -> None:
    """Write the blocks ``parts`` yields, in order from block 0, through
    :func:`thinpool.safe_output.atomic_output` (never onto a pool's file; a regular file is replaced
    atomically, a block device written in place)."""
    with atomic_output(path, pools=pools, what="metadata output") as out:
        f = out.file
        is_device = not out.regular and stat.S_ISBLK(os.fstat(out.fd).st_mode)
        if is_device:
            size = f.seek(0, os.SEEK_END)
            if size < nr_blocks * BLOCK_SIZE:
                raise InvalidArgument(f"{path}: device has {size} bytes, metadata needs {nr_blocks} blocks")
            f.seek(0)
        for part in parts:
            f.write(part.data.cast("B"))  # (ndarray.data: the memoryview memoryview(part) makes)
        if out.regular:  # atomic_output flushes it and names the file if that fails
            f.truncate(nr_blocks * BLOCK_SIZE)
        else:
            f.flush()
            os.fsync(f.fileno())


def write_binary_metadata(md: Metadata, path: str | os.PathLike[str], *, nr_metadata_blocks: int | None = None,
                          held: Metadata | None = None, pools: Iterable[Any] = ()) -> int:
    """Write real dm-thin metadata for ``md`` to ``path`` and return the number of blocks used.

    ``path`` (a regular file, created or truncated, or a block device at least that large) gets
    ``nr_metadata_blocks`` 4 KiB blocks; by default the larger of thin_metadata_size's estimate
    (:func:`default_metadata_blocks`) and twice the blocks used, capped at 4,161,600.  The
    superblock gets version 2 (the kernel's) whatever ``md.superblock.version`` says, and
    ``md.superblock.metadata_snap`` is ignored: pass the held view as ``held`` (a metadata
    snapshot reserved with ``reserve_metadata_snap``) to write its trees and a held-root
    superblock copy (docs/dm-thin.md §15) and point ``held_root`` at it.  Identical mapping subtrees
    (between devices and between the views), and the details and top-level trees when identical in
    both views, are written once and shared, as the kernel shares them: one volume with 300 unchanged
    snapshots takes one tree, not 301.

    Raises :class:`~thinpool.errors.InvalidArgument` for an inconsistent IR (unsorted or
    duplicate vblocks, mapped_blocks ≠ number of mappings, data block beyond
    ``nr_data_blocks``, time ≥ 2^24, out-of-range fields) or metadata that does not fit, and for a
    ``path`` that is not a string path or is a file of a pool (``pools``, or any pool open in this
    process: see :mod:`thinpool.safe_output`); the file is replaced atomically.
    """
    path = check_path(path, "metadata output")
    guard_output(path, pools=pools, what="metadata output")
    plan = _plan(md, held)
    lay, meta_counts = _choose_layout(plan, nr_metadata_blocks)
    _write_image(path, _image_parts(plan, lay, meta_counts), lay.nr_blocks, pools)
    return lay.used
