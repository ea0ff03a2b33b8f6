"""Numba kernel of mixed I/O batches: reads, writes and discards of several volumes applied in
their order, in one call (what a trace replay feeds; :func:`thinpool.thin.apply_io` is the caller).

The per-block rules are :mod:`thinpool.kernels`' own (:func:`~thinpool.kernels.write_span`,
:func:`~thinpool.kernels.discard_range`), so a replayed write does exactly what ``Thin.write`` does.
Writes store ``pattern`` (its first ``length`` bytes); with ``fd`` -1 (a metadata-only pool) no byte
moves and reads cost nothing.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import kernels_cache
from .kernels import ORIGIN_ERROR, discard_range, pread_all, read_hole, write_span
from .kernels_map import (UNMAPPED, alloc_data_block, dec_data, find_leaf_in, lookup, mapping_block, needs_new_block,
                          pack_mapping, prefetch, take_stale, writable_leaf)
from .schema import (INNER_BITS, INNER_ENTRIES, LEAF_BITS, DEV_MAPPED, DEV_ROOT, DEV_SNAP_TIME, IO_ERROR, LEAF_ENTRIES, NEED_NODES, NO_SPACE, NONE, OK,
                     ST_BLOCK_SIZE, ST_COW_BREAKS, ST_COW_PARTIAL, ST_INNER_FREE, ST_INNERS_LIVE, ST_LEAF_FREE, ST_LEAVES_LIVE, ST_NR_ALLOCATABLE,
                     ST_NR_BLOCKS, ST_NR_FREE, ST_PROVISIONED, ST_PROVISIONED_PARTIAL, ST_TIME)

#: operation codes of a mixed batch (the trace readers' codes)
OP_READ, OP_WRITE, OP_DISCARD = 0, 1, 2
#: apply_batch's own return codes: a write needs a new block while the pool allows no metadata change
#: (read-only and out-of-metadata-space modes: the bio fails with EIO); the metadata in use reached the
#: caller's check threshold after an allocating write (the pool's metadata-space check must run)
NO_BLOCK = -110
MD_CHECK = -111

_SOURCES_DIGEST = kernels_cache.sources_digest()


@njit(cache=True)
def _built_with():
    """The sources this module's cached code was compiled from (see :mod:`thinpool.kernels_cache`)."""
    return _SOURCES_DIGEST


@njit(cache=True)
def _blocks_needed(nodes, dev, off, length, bs):
    need = 0
    for vb in range(off // bs, (off + length - 1) // bs + 1):
        v, path_shared = lookup(nodes, dev[DEV_ROOT], vb)
        if needs_new_block(v, path_shared, dev[DEV_SNAP_TIME]):
            need += 1
    return need


#: how many I/Os ahead the batch kernel hints the caches with the leaf a write will touch
AHEAD = 32


@njit(cache=True, inline="always")
def _prefetch_path(leaves, inners, leaf_rc, inner_rc, data_rc, root, vb, near):
    """Cache hints for a coming write to ``vb`` (nothing changes): the mapping's line of its leaf, the
    whole leaf when the path is shared (the write will copy it), and when ``near`` the count of the
    block it maps now (a copy-on-write break drops it).  The root and mid rows are hot already."""
    mid = inners[root, vb >> (LEAF_BITS + INNER_BITS)]
    if mid == NONE:
        return
    leaf = inners[mid, (vb >> LEAF_BITS) & (INNER_ENTRIES - 1)]
    if leaf == NONE:
        return
    row = leaves[leaf]
    li = vb & (LEAF_ENTRIES - 1)
    if not near:
        if inner_rc[root] > 1 or inner_rc[mid] > 1 or leaf_rc[leaf] > 1:
            for k in range(0, LEAF_ENTRIES, 8):
                prefetch(row, k)
        else:
            prefetch(row, li)
        return
    v = row[li]
    if v != UNMAPPED:
        prefetch(data_rc, mapping_block(v))


@njit(cache=True)
def apply_batch(nodes, space, st, devs, slots, fd, tmp, pattern, vol, ops, offsets, lengths, start, end, skip_at,
                skip_no_space, no_alloc, md_check, out, failed_at, ofds, osizes):
    """Apply I/Os ``start..end-1`` in order; I/O ``i`` is ``ops[i]`` on the device in row ``slots[vol[i]]`` of
    ``devs``, whose external origin is ``ofds[vol[i]]`` (-1: none), ``osizes[vol[i]]`` bytes long.
    Returns (code, next_io, need).

    A write whose new blocks exceed the allocatable ones returns NO_SPACE at that I/O (``need`` its
    block count; earlier I/Os are complete) -- unless ``skip_no_space`` and no commit could help
    (``need`` > free blocks) or the I/O is ``skip_at`` (the caller already committed for it): then the
    write fails alone, as dm-thin's error_if_no_space fails the bio: ``out[0]`` counts such writes,
    ``out[1]`` their bytes, and ``failed_at[k]`` is the position of the k-th.  ``out[2]`` is raised to the most data blocks in use after any write.
    ``no_alloc`` (the pool is read-only or out of metadata space: dm-thin's ``process_bio_read_only``):
    a write to provisioned, unshared blocks is served, one that needs a block returns NO_BLOCK at that
    I/O -- or with ``skip_no_space`` fails alone (EIO), counted in ``out[3]`` and its bytes in
    ``out[4]`` -- and a discard succeeds unmapping nothing.  MD_CHECK at ``next_io``: a write allocated
    and the live metadata nodes reached ``md_check`` (the caller runs the pool's metadata-space check).
    NEED_NODES: the node store must grow before I/O ``next_io`` is retried; IO_ERROR: a data-file
    write or read failed at ``next_io``.  Ranges, read-only devices and op codes are the caller's checks.
    """
    bs = st[ST_BLOCK_SIZE]
    leaves, inners, leaf_rc, inner_rc, leaf_dirty = nodes[0], nodes[1], nodes[2], nodes[3], nodes[4]
    data_rc = space[0]
    last = -1
    dev = devs[0]
    for i in range(start, end):
        length = lengths[i]
        if length <= 0:
            continue
        off = offsets[i]
        op = ops[i]
        if vol[i] != last:
            last = vol[i]
            dev = devs[slots[last]]
        if op == OP_WRITE:
            if (fd < 0 and not no_alloc and (off + length - 1) // bs == off // bs
                    and st[ST_INNER_FREE] >= 3 and st[ST_LEAF_FREE] >= 1):
                # without a data file, the common cases of a replay inside one block, decided here
                # without write_span's general path (the same rules: a test compares the modes; the
                # node room the general path asks for first is asked for here too, so the node store
                # grows at the same I/O in both modes):
                j = i + AHEAD
                if j < end and vol[j] == last and ops[j] == OP_WRITE:
                    _prefetch_path(leaves, inners, leaf_rc, inner_rc, data_rc, dev[DEV_ROOT], offsets[j] // bs, False)
                j = i + AHEAD // 2
                if j < end and vol[j] == last and ops[j] == OP_WRITE:
                    _prefetch_path(leaves, inners, leaf_rc, inner_rc, data_rc, dev[DEV_ROOT], offsets[j] // bs, True)
                vb = off // bs
                leaf, shared = find_leaf_in(inners, leaf_rc, inner_rc, dev[DEV_ROOT], vb)
                v = UNMAPPED if leaf == NONE else leaves[leaf, vb & (LEAF_ENTRIES - 1)]
                if not needs_new_block(v, shared, dev[DEV_SNAP_TIME]):
                    continue  # a provisioned, unshared block: dm-thin remaps the bio, nothing changes
                if v != UNMAPPED and st[ST_NR_ALLOCATABLE] > 0:
                    # a copy-on-write break (a block mapped before the last snapshot, or a shared
                    # path): shadow the path only if it is shared, then write_span's steps for a
                    # mapped block -- a new block, the old one's count dropped at once (the peak is
                    # sampled after this write), the mapping replaced
                    li = vb & (LEAF_ENTRIES - 1)
                    if shared:
                        leaf = writable_leaf(nodes, space, st, dev, vb)  # node room checked above
                    free0 = st[ST_NR_FREE]
                    d = alloc_data_block(space, st)
                    take_stale(space, d)
                    dec_data(space, st, mapping_block(v))  # shadowing copies v: the same old block
                    st[ST_COW_BREAKS] += 1
                    if length != bs:
                        st[ST_COW_PARTIAL] += 1
                    leaves[leaf, li] = pack_mapping(d, st[ST_TIME])
                    leaf_dirty[leaf] = 1
                    used = st[ST_NR_BLOCKS] - st[ST_NR_FREE]
                    if used > out[2]:
                        out[2] = used
                    if st[ST_NR_FREE] != free0 and st[ST_LEAVES_LIVE] + st[ST_INNERS_LIVE] >= md_check:
                        return MD_CHECK, i + 1, 0
                    continue
                if v == UNMAPPED and leaf != NONE and not shared and st[ST_NR_ALLOCATABLE] > 0:
                    # a first write into an existing, unshared leaf: provision one block
                    d = alloc_data_block(space, st)
                    take_stale(space, d)  # no bytes to zero without a data file; the mark goes
                    dev[DEV_MAPPED] += 1
                    st[ST_PROVISIONED] += 1
                    if length != bs:
                        st[ST_PROVISIONED_PARTIAL] += 1
                    leaves[leaf, vb & (LEAF_ENTRIES - 1)] = pack_mapping(d, st[ST_TIME])
                    leaf_dirty[leaf] = 1
                    used = st[ST_NR_BLOCKS] - st[ST_NR_FREE]
                    if used > out[2]:
                        out[2] = used
                    if st[ST_LEAVES_LIVE] + st[ST_INNERS_LIVE] >= md_check:
                        return MD_CHECK, i + 1, 0
                    continue
            if no_alloc:
                if _blocks_needed(nodes, dev, off, length, bs) > 0:
                    if skip_no_space:
                        out[3] += 1
                        out[4] += length
                        continue
                    return NO_BLOCK, i, 0
                code = write_span(nodes, space, st, dev, fd, tmp, off, length, pattern, 0, bs, ofds[vol[i]],
                                  osizes[vol[i]])
                if code != OK:
                    return code, i, 0
                continue
            nblk = (off + length - 1) // bs - off // bs + 1
            if st[ST_INNER_FREE] < 2 * nblk + 1 or st[ST_LEAF_FREE] < nblk:
                return NEED_NODES, i, 0
            if st[ST_NR_ALLOCATABLE] < nblk:
                need = _blocks_needed(nodes, dev, off, length, bs)
                if need > st[ST_NR_ALLOCATABLE]:
                    if skip_no_space and (i == skip_at or need > st[ST_NR_FREE]):
                        failed_at[out[0]] = i
                        out[0] += 1
                        out[1] += length
                        continue
                    return NO_SPACE, i, need
            free0 = st[ST_NR_FREE]
            code = write_span(nodes, space, st, dev, fd, tmp, off, length, pattern, 0, bs, ofds[vol[i]],
                              osizes[vol[i]])
            if code != OK:
                return code, i, 0
            used = st[ST_NR_BLOCKS] - st[ST_NR_FREE]
            if used > out[2]:
                out[2] = used
            if st[ST_NR_FREE] != free0 and st[ST_LEAVES_LIVE] + st[ST_INNERS_LIVE] >= md_check:
                return MD_CHECK, i + 1, 0
        elif op == OP_DISCARD:
            if no_alloc:
                continue
            first = (off + bs - 1) // bs
            last = (off + length) // bs
            if last > first:
                code, _ = discard_range(nodes, space, st, dev, first, last)
                if code != OK:
                    return NEED_NODES, i, 0
        elif op == OP_READ and fd >= 0:
            while length > 0:
                vb = off // bs
                inblk = off - vb * bs
                seg = min(length, bs - inblk)
                v, _ = lookup(nodes, dev[DEV_ROOT], vb)
                if v != UNMAPPED:
                    if pread_all(fd, tmp, 0, seg, mapping_block(v) * bs + inblk) != OK:
                        return IO_ERROR, i, 0
                elif ofds[vol[i]] >= 0 and read_hole(tmp, 0, seg, off, ofds[vol[i]], osizes[vol[i]]) != OK:
                    return ORIGIN_ERROR, i, 0
                off += seg
                length -= seg
    return OK, end, 0


kernels_cache.check(globals(), _built_with)
