"""Reading real dm-thin binary metadata: the superblock, both space maps and every btree, verified
as ``thin_check`` verifies them (see :func:`read_binary_metadata`).  Writing is in
:mod:`thinpool.interop.binary`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from thinpool.errors import InvalidArgument, MetadataCorrupt
from thinpool.interop.binary import _DETAILS, RawSuperblock, _read_superblock
from thinpool.interop.btree import BlockSource, corrupt, walk_forest
from thinpool.interop.ir import TIME_MASK, Device, Metadata, Superblock
from thinpool.interop.sm_disk import SpaceMapRoot, read_data_space_map, read_metadata_space_map

__all__ = ["read_binary_metadata", "read_data_refcounts", "read_metadata_refcounts", "check_binary_metadata"]


@contextmanager
def _opened(path: str | os.PathLike[str]) -> Iterator[tuple[BlockSource, RawSuperblock]]:
    """The block source and verified superblock of a metadata file, closed on exit."""
    src = BlockSource(path)
    try:
        sb = _read_superblock(src, 0, "superblock")
        if src.nr_blocks < sb.metadata_nr_blocks:
            raise corrupt("superblock", 0, f"metadata file has {src.nr_blocks} blocks but the superblock says "
                                           f"{sb.metadata_nr_blocks} (truncated?)")
        if sb.data_sm is None or sb.metadata_sm is None:
            raise corrupt("superblock", 0, "space map root is empty")
        src.limit = sb.metadata_nr_blocks
        yield src, sb
    finally:
        src.close()


@dataclass
class _ViewRefs:
    """One superblock view's devices and the references its trees make."""

    devices: list[Device]
    metadata_refs: np.ndarray  # one entry per reference to a metadata block
    data_refs: np.ndarray  # data blocks of entries in leaves seen for the first time


def _read_view(src: BlockSource, view: RawSuperblock, nr_data_blocks: int) -> _ViewRefs:
    details = walk_forest(src, np.array([view.device_details_root]), 24, lambda t: "details tree")
    top = walk_forest(src, np.array([view.data_mapping_root]), 8, lambda t: "mapping tree (top level)")
    if not np.array_equal(details.keys, top.keys):
        missing = np.setxor1d(details.keys, top.keys)
        in_details = bool(np.isin(missing[0], details.keys))
        structure = "mapping tree (top level)" if in_details else "details tree"
        block = view.data_mapping_root if in_details else view.device_details_root
        raise corrupt(structure, block, f"device {int(missing[0])} is missing (present in the "
                                        f"{'details' if in_details else 'mapping'} tree only)")
    dev_ids = top.keys
    roots = top.values.view(np.uint64).reshape(-1).astype(np.int64)
    # devices sharing a root (a snapshot and its unchanged origin) are walked once and share the arrays
    uroots, first_dev, tree_of = np.unique(roots, return_index=True, return_inverse=True)
    maps = walk_forest(src, uroots, 8, lambda t: f"mapping tree of device {int(dev_ids[first_dev[t]])}")
    values = maps.values.view(np.uint64).reshape(-1)
    dblocks = values >> np.uint64(24)
    beyond = np.flatnonzero(dblocks >= np.uint64(nr_data_blocks))
    if beyond.size:
        e = int(beyond[0])
        t = int(np.searchsorted(np.cumsum(maps.counts), e, side="right"))
        raise corrupt(f"mapping tree of device {int(dev_ids[first_dev[t]])}", int(maps.leaf_blocks[e]),
                      f"data block {int(dblocks[e])} beyond the end of the data device ({nr_data_blocks} blocks)")
    times = (values & np.uint64(TIME_MASK)).astype(np.uint32)
    info = details.values.copy().view(_DETAILS).reshape(-1)
    at = maps.offsets
    arrays = [(maps.keys[at[t] : at[t + 1]], dblocks[at[t] : at[t + 1]], times[at[t] : at[t + 1]])
              for t in range(len(uroots))]
    devices = [Device(int(dev_ids[d]), int(info["mapped_blocks"][d]), int(info["transaction"][d]),
                      int(info["creation_time"][d]), int(info["snap_time"][d]), *arrays[int(tree_of[d])])
               for d in range(len(dev_ids))]
    meta_refs = np.concatenate(([view.device_details_root, view.data_mapping_root], details.child_refs,
                                top.child_refs, roots[top.fresh], maps.child_refs)).astype(np.int64)
    return _ViewRefs(devices, meta_refs, dblocks[maps.fresh].astype(np.int64))


def _to_ir(view: RawSuperblock, devices: list[Device], nr_data_blocks: int) -> Metadata:
    sb = Superblock(time=view.time, transaction=view.trans_id, data_block_size=view.data_block_size,
                    nr_data_blocks=nr_data_blocks, flags=view.flags, version=view.version,
                    uuid=view.uuid.rstrip(b"\0").decode("utf-8", "replace"), metadata_snap=view.held_root or None)
    return Metadata(sb, devices)


def read_binary_metadata(path: str | os.PathLike[str], *, metadata_snap: bool = False,
                         check_counts: bool = True) -> Metadata:
    """:func:`_read_binary_metadata`, whose every :class:`~thinpool.errors.MetadataCorrupt` names the
    file (``path: structure: problem (block N)``)."""
    try:
        return _read_binary_metadata(path, metadata_snap=metadata_snap, check_counts=check_counts)
    except MetadataCorrupt as exc:
        where = os.fspath(path)
        if str(exc).startswith(f"{where}:"):
            raise
        raise MetadataCorrupt(f"{where}: {exc}", structure=exc.structure, block=exc.block) from None


def _read_binary_metadata(path: str | os.PathLike[str], *, metadata_snap: bool = False,
                          check_counts: bool = True) -> Metadata:
    """Read real dm-thin metadata (the kernel's, ``thin_restore``'s or ours) into the IR.

    Verifies what ``thin_check`` verifies, and more: every block read (checksum, stored block
    number), every btree node header (flags, value size for its tree, max_entries, nr_entries ≤
    max_entries) and key order, the superblock (magic, version 1 or 2, metadata block size,
    incompatible flags), the held metadata snapshot's superblock copy and trees when one is held,
    the structure of both space maps (index -- index block or index btree -- and its entries, every
    bitmap, ref-count trees; ``nr_blocks`` checked against the metadata before anything is sized by
    it), and with ``check_counts`` (the default) that every reference count in **both** space maps
    equals the references the btrees make (live and held views; thin_check 0.9.0 compares only the
    metadata counts).  Raises :class:`~thinpool.errors.MetadataCorrupt` naming the structure and
    block at fault.  The one check left out: a wrong ``nr_allocated`` total in a space-map root is
    accepted (0.9.0 ``thin_restore`` writes one off by a block it freed, and thin_check accepts it;
    the totals are recomputed from the counts anyway).

    Devices come back sorted by dev_id, mappings by vblock; ``superblock.metadata_snap`` is the
    held root's block, or None.  ``metadata_snap=True`` returns the held metadata snapshot's view
    instead (its superblock copy's time, transaction, flags and trees; ``nr_data_blocks`` from the
    live data space map; ``metadata_snap`` None), and raises
    :class:`~thinpool.errors.InvalidArgument` if none is held.
    """
    with _opened(path) as (src, sb):
        data_root, meta_root = _roots(sb)
        if metadata_snap and not sb.held_root:
            raise InvalidArgument(f"{os.fspath(path)}: no metadata snapshot is held")
        if check_counts:
            problems, views, walked = _count_problems(src, sb)
            fatal = [p for p in problems if ": nr_allocated is " not in p]
            if fatal:
                raise MetadataCorrupt(f"{os.fspath(path)}: space map reference counts do not match the btrees: "
                                      + "; ".join(fatal[:3]) + (f" (and {len(fatal) - 3} more)" if len(fatal) > 3
                                                                 else ""), structure="space map")
            i = 1 if metadata_snap else 0
            return _to_ir(views[i], walked[i].devices, data_root.nr_blocks)
        read_data_space_map(src, data_root)
        read_metadata_space_map(src, meta_root)
        view = sb
        if metadata_snap:
            view = _read_superblock(src, sb.held_root, "metadata snapshot superblock copy")
        return _to_ir(view, _read_view(src, view, data_root.nr_blocks).devices, data_root.nr_blocks)


def read_data_refcounts(path: str | os.PathLike[str]) -> np.ndarray:
    """Every data block's reference count as recorded in the data space map (uint32 array)."""
    with _opened(path) as (src, sb):
        return read_data_space_map(src, _roots(sb)[0]).ref_counts(src)


def read_metadata_refcounts(path: str | os.PathLike[str]) -> np.ndarray:
    """Every metadata block's reference count as recorded in the metadata space map (uint32 array)."""
    with _opened(path) as (src, sb):
        return read_metadata_space_map(src, _roots(sb)[1]).ref_counts(src)


def _compare_counts(what: str, recorded: np.ndarray, refs: np.ndarray, limit: int = 10) -> list[str]:
    expected = np.bincount(refs, minlength=recorded.size)
    if expected.size > recorded.size:
        return [f"{what} block {int(refs.max())} is referenced but lies beyond the space map"]
    bad = np.flatnonzero(recorded != expected)
    problems = [f"{what} reference counts differ for block {int(b)}: expected {int(expected[b])}, "
                f"space map has {int(recorded[b])}" for b in bad[:limit]]
    if bad.size > limit:
        problems.append(f"... and {bad.size - limit} more {what} blocks with wrong counts")
    return problems


def _roots(sb: RawSuperblock) -> tuple[SpaceMapRoot, SpaceMapRoot]:
    """The data and metadata space map roots of a superblock :func:`_opened` verified."""
    assert sb.data_sm is not None and sb.metadata_sm is not None, "_opened refuses a superblock without them"
    return sb.data_sm, sb.metadata_sm


def _count_problems(src: BlockSource, sb: RawSuperblock) -> tuple[list[str], list[RawSuperblock], list[_ViewRefs]]:
    """Read both space maps and every view (live, held) and compare the counts with the references:
    (problems, views, their walked trees)."""
    data_root, meta_root = _roots(sb)
    data_sm = read_data_space_map(src, data_root)
    meta_sm = read_metadata_space_map(src, meta_root)
    meta_refs = [np.array([0]), data_sm.metadata_refs, meta_sm.metadata_refs]
    views = [sb]
    if sb.held_root:
        meta_refs.append(np.array([sb.held_root]))
        views.append(_read_superblock(src, sb.held_root, "metadata snapshot superblock copy"))
    data_refs = []
    walked = []
    for view in views:
        w = _read_view(src, view, data_root.nr_blocks)
        walked.append(w)
        meta_refs.append(w.metadata_refs)
        data_refs.append(w.data_refs)
    problems: list[str] = []
    for sm, refs in ((meta_sm, meta_refs), (data_sm, data_refs)):
        counts = sm.ref_counts(src)
        problems += _compare_counts(sm.name.split()[0], counts, np.concatenate(refs))
        if sm.root.nr_allocated != np.count_nonzero(counts):
            problems.append(f"{sm.name}: nr_allocated is {sm.root.nr_allocated} but "
                            f"{np.count_nonzero(counts)} blocks are in use")
    return problems, views, walked


def check_binary_metadata(path: str | os.PathLike[str]) -> list[str]:
    """Compare both space maps with the references actually present; return the discrepancies.

    Structural damage raises :class:`~thinpool.errors.MetadataCorrupt` as in
    :func:`read_binary_metadata`.  The result lists every metadata block whose recorded count
    differs from the number of references to it (superblock, space-map blocks, every tree node
    once per parent, the held-root copy), every data block whose count differs from the number
    of mapping entries referencing it across distinct leaves (live and held views), and wrong
    ``nr_allocated`` totals.  An empty list means the counts are exact, as the kernel and the
    Rust thin_check require (0.9.0 ``thin_restore`` output shows one: its nr_allocated counts a
    temporary block it freed).
    """
    with _opened(path) as (src, sb):
        return _count_problems(src, sb)[0]
