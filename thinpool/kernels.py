"""Numba kernels: the per-block work of the I/O path, as pure functions over numpy arrays.

Nothing here knows about files, names or transactions on disk.  The caller (``pool.py``) passes
the block map (node store), the data space map and the mmap'd data device as arrays; kernels
look blocks up, unshare nodes (shadowing), allocate data blocks, copy/zero, and keep reference
counts and dirty flags exact.

Block map shape (a 3-level radix tree of fixed fan-out, shared by reference like dm-thin's btrees)::

    device root  (inner node, 1024 x int32 child slots)      virtual block bits 28..19
      -> mid     (inner node, 1024 x int32 child slots)      bits 18..9
        -> leaf  (512 x uint64 mappings)                     bits 8..0

A mapping is ``(data_block << 24) | (time & 0xFFFFFF)`` exactly as dm-thin packs it; ``UNMAPPED``
(all ones) marks a hole.  Reference counts: ``inner_rc`` / ``leaf_rc`` count parent references
(device roots count one per device), ``data_rc`` counts *distinct leaves* referencing a data block
(dm-thin's rule, §1.8 of the reference).  A node with count > 1 is copied before it is modified
(shadowing) and its children gain one reference each.

State scalars live in ``st`` (an int64 array) at the ``ST_*`` indices below.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# libc's pwrite/pread, resolved by symbol name at link time (so cache=True still works): data writes
# go to the data file with one system call per block segment instead of faulting mmap pages in.
c_pwrite = types.ExternalFunction("pwrite", types.intp(types.int32, types.voidptr, types.uintp, types.int64))
c_pread = types.ExternalFunction("pread", types.intp(types.int32, types.voidptr, types.uintp, types.int64))

#: write_one's answer for an I/O it leaves to the caller's general path (out of range, read-only)
NOT_HANDLED = -100

from .schema import UNMAPPED as _UNMAPPED
from .schema import (ST_SIZE, DEV_FLAGS, DEV_MAPPED, DEV_ROOT, DEV_SIZE, DEV_SNAP_TIME, INNER_BITS, INNER_ENTRIES,
                     IO_ERROR, LEAF_BITS, LEAF_ENTRIES, NEED_NODES, NO_SPACE, NONE, OK, RC_PAGE_BITS, ST_BLOCK_SIZE, ST_CURSOR,
                     ST_INNER_FREE, ST_INNERS_LIVE, ST_LEAF_FREE, ST_LEAVES_LIVE, ST_NR_ALLOCATABLE, ST_NR_BLOCKS,
                     ST_NR_FREE, ST_TIME, TIME_MASK)

UNMAPPED = np.uint64(_UNMAPPED)  # a hole, typed as the leaves' element type


# --------------------------------------------------------------------------- byte copies
# numba's slice assignment between arrays copies through a temporary at ~1 GB/s; explicit loops
# vectorise (tens of GB/s).

@njit(cache=True, inline="always")
def copy_bytes(dst, d0, src, s0, n):
    # unsigned indices: no negative-index wraparound check per element, so LLVM vectorises the
    # loop (a signed-index byte loop copies ~1.5 bytes/ns: 2.7 us per 4 KiB, now ~0.1 us + misses)
    d = np.uint64(d0)
    s = np.uint64(s0)
    for k in range(np.uint64(n)):
        dst[d + k] = src[s + k]


@njit(cache=True, inline="always")
def fill_bytes(dst, d0, n, value):
    d = np.uint64(d0)
    for k in range(np.uint64(n)):
        dst[d + k] = value


@njit(cache=True)
def pwrite_all(fd, arr, start, n, off):
    """Write ``arr[start:start+n]`` at file offset ``off``: a short count continues with the rest; a
    count of 0 or -1 (errno left set for the caller) returns False.  True when all ``n`` are written.
    A write that took more than one call is read back and compared, and written again once if it
    differs (a layer that reports bytes it did not store); a second mismatch returns False."""
    for attempt in range(2):
        done = 0
        calls = 0
        while done < n:
            w = c_pwrite(fd, arr[start + done:].ctypes.data, n - done, off + done)
            if w <= 0:
                return False
            done += w
            calls += 1
        if calls <= 1:
            return True
        back = np.empty(n, np.uint8)
        if c_pread(fd, back.ctypes.data, n, off) == n:
            same = True
            for i in range(n):
                if back[i] != arr[start + i]:
                    same = False
                    break
            if same:
                return True
    return False


# --------------------------------------------------------------------------- allocation

@njit(cache=True, inline="always")
def find_free_data_block(data_rc, freed_txn, st):
    """Linear search from the cursor (wrapping) for a block free now *and* not freed in this transaction."""
    n = st[ST_NR_BLOCKS]
    c = st[ST_CURSOR]
    if c >= n:
        c = 0
    for i in range(n):
        b = c + i
        if b >= n:
            b -= n
        if data_rc[b] == 0 and freed_txn[b] == 0:
            return b
    return -1


@njit(cache=True, inline="always")
def alloc_data_block(data_rc, freed_txn, rc_dirty, st):
    """Allocate one data block (count 1); -1 if none is allocatable."""
    b = find_free_data_block(data_rc, freed_txn, st)
    if b < 0:
        return -1
    data_rc[b] = 1
    rc_dirty[b >> RC_PAGE_BITS] = 1
    st[ST_CURSOR] = b + 1
    st[ST_NR_FREE] -= 1
    st[ST_NR_ALLOCATABLE] -= 1
    return b


@njit(cache=True)
def allocate_many(data_rc, freed_txn, rc_dirty, st, count, out):
    """Allocate ``count`` blocks into ``out``; returns how many were allocated (the JIT allocator benchmark)."""
    for i in range(count):
        b = alloc_data_block(data_rc, freed_txn, rc_dirty, st)
        if b < 0:
            return i
        out[i] = b
    return count


@njit(cache=True, inline="always")
def inc_data(data_rc, rc_dirty, d):
    data_rc[d] += 1
    rc_dirty[d >> RC_PAGE_BITS] = 1


@njit(cache=True, inline="always")
def dec_data(data_rc, freed_txn, rc_dirty, st, d):
    """Drop one reference; a block reaching 0 is free but not allocatable until the next commit."""
    c = data_rc[d] - 1
    data_rc[d] = c
    rc_dirty[d >> RC_PAGE_BITS] = 1
    if c == 0:
        freed_txn[d] = 1
        st[ST_NR_FREE] += 1


# --------------------------------------------------------------------------- node store

@njit(cache=True, inline="always")
def new_inner(inners, inner_rc, inner_dirty, inner_rc_dirty, inner_free, st):
    n = st[ST_INNER_FREE]
    if n == 0:
        return NONE
    n -= 1
    st[ST_INNER_FREE] = n
    s = inner_free[n]
    row = inners[s]
    for k in range(INNER_ENTRIES):
        row[k] = NONE
    inner_rc[s] = 1
    inner_dirty[s] = 1
    inner_rc_dirty[s >> RC_PAGE_BITS] = 1
    st[ST_INNERS_LIVE] += 1
    return s


@njit(cache=True, inline="always")
def new_leaf(leaves, leaf_rc, leaf_dirty, leaf_rc_dirty, leaf_free, st):
    n = st[ST_LEAF_FREE]
    if n == 0:
        return NONE
    n -= 1
    st[ST_LEAF_FREE] = n
    s = leaf_free[n]
    row = leaves[s]
    for k in range(LEAF_ENTRIES):
        row[k] = UNMAPPED
    leaf_rc[s] = 1
    leaf_dirty[s] = 1
    leaf_rc_dirty[s >> RC_PAGE_BITS] = 1
    st[ST_LEAVES_LIVE] += 1
    return s


@njit(cache=True)
def release_leaf(nodes, data_rc, freed_txn, rc_dirty, st, leaf):
    """Drop one reference to a leaf; at zero, drop its data references and free the slot."""
    leaves, inners, leaf_rc, inner_rc, leaf_dirty, inner_dirty, leaf_rc_dirty, inner_rc_dirty, leaf_free, inner_free = nodes
    c = leaf_rc[leaf] - 1
    leaf_rc[leaf] = c
    leaf_rc_dirty[leaf >> RC_PAGE_BITS] = 1
    if c == 0:
        row = leaves[leaf]
        for i in range(LEAF_ENTRIES):
            v = row[i]
            if v != UNMAPPED:
                dec_data(data_rc, freed_txn, rc_dirty, st, np.int64(v >> np.uint64(24)))
        leaf_dirty[leaf] = 1
        leaf_free[st[ST_LEAF_FREE]] = leaf
        st[ST_LEAF_FREE] += 1
        st[ST_LEAVES_LIVE] -= 1


@njit(cache=True)
def _drop_inner(nodes, st, node):
    """Drop one reference to an inner node; True when it reached zero (the caller releases its
    children, then the slot is pushed back on the free stack)."""
    inner_rc, inner_rc_dirty = nodes[3], nodes[7]
    c = inner_rc[node] - 1
    inner_rc[node] = c
    inner_rc_dirty[node >> RC_PAGE_BITS] = 1
    return c == 0


@njit(cache=True)
def _free_inner(nodes, st, node):
    inner_dirty, inner_free = nodes[5], nodes[9]
    inner_dirty[node] = 1
    inner_free[st[ST_INNER_FREE]] = node
    st[ST_INNER_FREE] += 1
    st[ST_INNERS_LIVE] -= 1


@njit(cache=True)
def release_inner(nodes, data_rc, freed_txn, rc_dirty, st, node, level):
    """Drop one reference to an inner node (level 0 = device root, 1 = mid) and release whatever
    reaches zero below it: dm-thin's recursive delete, stopping at nodes still shared."""
    inners = nodes[1]
    if not _drop_inner(nodes, st, node):
        return
    if level == 1:
        for j in range(INNER_ENTRIES):
            leaf = inners[node, j]
            if leaf != NONE:
                release_leaf(nodes, data_rc, freed_txn, rc_dirty, st, leaf)
        _free_inner(nodes, st, node)
        return
    for i in range(INNER_ENTRIES):
        mid = inners[node, i]
        if mid == NONE or not _drop_inner(nodes, st, mid):
            continue
        for j in range(INNER_ENTRIES):
            leaf = inners[mid, j]
            if leaf != NONE:
                release_leaf(nodes, data_rc, freed_txn, rc_dirty, st, leaf)
        _free_inner(nodes, st, mid)
    _free_inner(nodes, st, node)


@njit(cache=True)
def shadow_inner(nodes, st, node, level):
    """Copy a shared inner node; children gain a reference. Returns the new slot or NONE."""
    leaves, inners, leaf_rc, inner_rc, leaf_dirty, inner_dirty, leaf_rc_dirty, inner_rc_dirty, leaf_free, inner_free = nodes
    new = new_inner(inners, inner_rc, inner_dirty, inner_rc_dirty, inner_free, st)
    if new == NONE:
        return NONE
    copy_bytes(inners[new], 0, inners[node], 0, INNER_ENTRIES)
    for i in range(INNER_ENTRIES):
        ch = inners[new, i]
        if ch != NONE:
            if level == 0:
                inner_rc[ch] += 1
                inner_rc_dirty[ch >> RC_PAGE_BITS] = 1
            else:
                leaf_rc[ch] += 1
                leaf_rc_dirty[ch >> RC_PAGE_BITS] = 1
    inner_rc[node] -= 1
    inner_rc_dirty[node >> RC_PAGE_BITS] = 1
    return new


@njit(cache=True)
def shadow_leaf(nodes, data_rc, rc_dirty, st, leaf):
    """Copy a shared leaf; every data block it maps gains a reference (dm-thin's leaf rule)."""
    leaves, inners, leaf_rc, inner_rc, leaf_dirty, inner_dirty, leaf_rc_dirty, inner_rc_dirty, leaf_free, inner_free = nodes
    new = new_leaf(leaves, leaf_rc, leaf_dirty, leaf_rc_dirty, leaf_free, st)
    if new == NONE:
        return NONE
    copy_bytes(leaves[new], 0, leaves[leaf], 0, LEAF_ENTRIES)
    row = leaves[new]
    for i in range(LEAF_ENTRIES):
        v = row[i]
        if v != UNMAPPED:
            inc_data(data_rc, rc_dirty, np.int64(v >> np.uint64(24)))
    leaf_rc[leaf] -= 1
    leaf_rc_dirty[leaf >> RC_PAGE_BITS] = 1
    return new


@njit(cache=True, inline="always")
def lookup(nodes, root, vb):
    """Mapping of virtual block ``vb`` under ``root`` (UNMAPPED if none); also returns whether any
    node on the path is shared (count > 1)."""
    leaves, inners, leaf_rc, inner_rc, leaf_dirty, inner_dirty, leaf_rc_dirty, inner_rc_dirty, leaf_free, inner_free = nodes
    shared = inner_rc[root] > 1
    mid = inners[root, vb >> (LEAF_BITS + INNER_BITS)]
    if mid == NONE:
        return UNMAPPED, shared
    shared = shared or inner_rc[mid] > 1
    leaf = inners[mid, (vb >> LEAF_BITS) & (INNER_ENTRIES - 1)]
    if leaf == NONE:
        return UNMAPPED, shared
    shared = shared or leaf_rc[leaf] > 1
    return leaves[leaf, vb & (LEAF_ENTRIES - 1)], shared


@njit(cache=True)
def writable_leaf(nodes, data_rc, rc_dirty, st, dev, vb):
    """Make the path to ``vb`` exclusive to this device (shadowing shared nodes, creating missing
    ones) and return the leaf slot, or NONE when the node store needs to grow."""
    leaves, inners, leaf_rc, inner_rc, leaf_dirty, inner_dirty, leaf_rc_dirty, inner_rc_dirty, leaf_free, inner_free = nodes
    root = dev[DEV_ROOT]
    if inner_rc[root] > 1:
        root = shadow_inner(nodes, st, root, 0)
        if root == NONE:
            return NONE
        dev[DEV_ROOT] = root
    ri = vb >> (LEAF_BITS + INNER_BITS)
    mid = inners[root, ri]
    if mid == NONE:
        mid = new_inner(inners, inner_rc, inner_dirty, inner_rc_dirty, inner_free, st)
        if mid == NONE:
            return NONE
        inners[root, ri] = mid
        inner_dirty[root] = 1
    elif inner_rc[mid] > 1:
        mid = shadow_inner(nodes, st, mid, 1)
        if mid == NONE:
            return NONE
        inners[root, ri] = mid
        inner_dirty[root] = 1
    mi = (vb >> LEAF_BITS) & (INNER_ENTRIES - 1)
    leaf = inners[mid, mi]
    if leaf == NONE:
        leaf = new_leaf(leaves, leaf_rc, leaf_dirty, leaf_rc_dirty, leaf_free, st)
        if leaf == NONE:
            return NONE
        inners[mid, mi] = leaf
        inner_dirty[mid] = 1
    elif leaf_rc[leaf] > 1:
        leaf = shadow_leaf(nodes, data_rc, rc_dirty, st, leaf)
        if leaf == NONE:
            return NONE
        inners[mid, mi] = leaf
        inner_dirty[mid] = 1
    return leaf


# --------------------------------------------------------------------------- I/O batches

@njit(cache=True)
def count_segments(offsets, lengths, bs):
    n = 0
    for i in range(offsets.shape[0]):
        if lengths[i] > 0:
            n += (offsets[i] + lengths[i] - 1) // bs - offsets[i] // bs + 1
    return n


@njit(cache=True)
def blocks_needed(nodes, dev, offsets, lengths, bs):
    """Distinct virtual blocks of a write batch that need a new data block (unmapped, or shared by
    the time rule).  Computed before anything changes so a batch that cannot fit changes nothing."""
    nseg = count_segments(offsets, lengths, bs)
    need = np.empty(nseg, np.int64)
    k = 0
    root = dev[DEV_ROOT]
    snap_time = dev[DEV_SNAP_TIME]
    for i in range(offsets.shape[0]):
        if lengths[i] <= 0:
            continue
        first = offsets[i] // bs
        last = (offsets[i] + lengths[i] - 1) // bs
        for vb in range(first, last + 1):
            v, path_shared = lookup(nodes, root, vb)
            if v == UNMAPPED or np.int64(v & np.uint64(TIME_MASK)) < snap_time or path_shared:
                need[k] = vb
                k += 1
    if k <= 1:
        return k
    s = np.sort(need[:k])
    distinct = 1
    for i in range(1, k):
        if s[i] != s[i - 1]:
            distinct += 1
    return distinct


@njit(cache=True)
def write_batch(nodes, data_rc, freed_txn, rc_dirty, st, dev, fd, tmp, offsets, lengths, buf, buf_starts, start):
    """Write I/Os ``start..`` of a batch to the data file ``fd``.  Returns (code, next_io, need).

    ``dev`` is the device's record (int64 row: root and mapped count are updated in place); ``tmp``
    a scratch buffer of one block.  When ``start`` is 0 the batch's data-block need is counted
    first (:func:`blocks_needed`); if fewer blocks are allocatable the code is NO_SPACE and nothing
    has changed.  NEED_NODES: the node store must grow before I/O ``next_io`` is retried (the I/Os
    before it are complete); IO_ERROR: a data-file write failed at I/O ``next_io`` (earlier I/Os
    are complete, the failed block is not mapped).
    Per block: mapped and unshared -> write in place; unmapped -> allocate (the new block is a hole,
    so the rest reads zero); shared (time rule) -> allocate, copy the whole old block unless the
    write covers it, then write; the old block loses one reference.
    """
    bs = st[ST_BLOCK_SIZE]
    need = 0
    if start == 0:
        need = blocks_needed(nodes, dev, offsets, lengths, bs)
        if need > st[ST_NR_ALLOCATABLE]:
            return NO_SPACE, 0, need
    for i in range(start, offsets.shape[0]):
        off = offsets[i]
        remaining = lengths[i]
        if remaining <= 0:
            continue
        nblk = (off + remaining - 1) // bs - off // bs + 1
        if st[ST_INNER_FREE] < 2 * nblk + 1 or st[ST_LEAF_FREE] < nblk:
            return NEED_NODES, i, need
        if write_span(nodes, data_rc, freed_txn, rc_dirty, st, dev, fd, tmp, off, remaining, buf,
                      buf_starts[i], bs) != OK:
            return IO_ERROR, i, need
    return OK, offsets.shape[0], need


@njit(cache=True, inline="always")
def write_span(nodes, data_rc, freed_txn, rc_dirty, st, dev, fd, tmp, off, remaining, buf, src, bs):
    """Write ``remaining`` bytes of ``buf[src:]`` at virtual byte ``off``, block by block (see
    :func:`write_batch`; node room must have been checked).  Returns OK or IO_ERROR (blocks before the
    failed one are complete, the failed block is not mapped)."""
    leaves = nodes[0]
    snap_time = dev[DEV_SNAP_TIME]
    time24 = np.uint64(st[ST_TIME] & TIME_MASK)
    while remaining > 0:
        vb = off // bs
        inblk = off - vb * bs
        seg = min(remaining, bs - inblk)
        v, path_shared = lookup(nodes, dev[DEV_ROOT], vb)
        if v != UNMAPPED and not path_shared and np.int64(v & np.uint64(TIME_MASK)) >= snap_time:
            d = np.int64(v >> np.uint64(24))
            if not pwrite_all(fd, buf, src, seg, d * bs + inblk):
                return IO_ERROR
        else:
            leaf = writable_leaf(nodes, data_rc, rc_dirty, st, dev, vb)
            li = vb & (LEAF_ENTRIES - 1)
            v = leaves[leaf, li]  # re-read: shadowing may have moved the path
            d = alloc_data_block(data_rc, freed_txn, rc_dirty, st)
            ok = True
            if v != UNMAPPED and seg != bs:
                # break sharing: old block + this write merged in memory, one block-sized write
                old = np.int64(v >> np.uint64(24))
                ok = c_pread(fd, tmp.ctypes.data, bs, old * bs) == bs
                if ok:
                    copy_bytes(tmp, inblk, buf, src, seg)
                    ok = pwrite_all(fd, tmp, 0, bs, d * bs)
            else:
                ok = pwrite_all(fd, buf, src, seg, d * bs + inblk)
            if not ok:
                # undo the allocation: the block is not mapped.  Part of the write may have reached
                # it, so it is freed like a discarded block (not allocatable again until the commits
                # after this transaction have punched it): never handed out holding these bytes.
                data_rc[d] = 0
                freed_txn[d] = 1
                st[ST_NR_FREE] += 1
                return IO_ERROR
            if v != UNMAPPED:
                dec_data(data_rc, freed_txn, rc_dirty, st, np.int64(v >> np.uint64(24)))
            else:
                dev[DEV_MAPPED] += 1
            leaves[leaf, li] = (np.uint64(d) << np.uint64(24)) | time24
            nodes[4][leaf] = 1  # leaf_dirty
        off += seg
        src += seg
        remaining -= seg
    return OK


@njit(cache=True, inline="always")
def read_span(nodes, root, data, bs, off, remaining, out, dst):
    """Copy ``remaining`` bytes at virtual byte ``off`` into ``out[dst:]`` (holes read as zeroes)."""
    while remaining > 0:
        vb = off // bs
        inblk = off - vb * bs
        seg = min(remaining, bs - inblk)
        v, _ = lookup(nodes, root, vb)
        if v == UNMAPPED:
            fill_bytes(out, dst, seg, 0)
        else:
            copy_bytes(out, dst, data, np.int64(v >> np.uint64(24)) * bs + inblk, seg)
        off += seg
        dst += seg
        remaining -= seg


@njit(cache=True)
def read_batch(nodes, root, data, bs, offsets, lengths, out, out_starts):
    """Read a batch: mapped blocks are copied from the data device, holes read as zeroes."""
    for i in range(offsets.shape[0]):
        read_span(nodes, root, data, bs, offsets[i], lengths[i], out, out_starts[i])


@njit(cache=True)
def discard_range(nodes, data_rc, freed_txn, rc_dirty, st, dev, first, last):
    """Unmap virtual blocks ``first..last-1`` (whole blocks only).  Returns (code, next_vb)."""
    leaves, inners, leaf_rc, inner_rc, leaf_dirty, inner_dirty, leaf_rc_dirty, inner_rc_dirty, leaf_free, inner_free = nodes
    vb = first
    span_mid = 1 << (LEAF_BITS + INNER_BITS)
    span_leaf = 1 << LEAF_BITS
    while vb < last:
        root = dev[DEV_ROOT]
        mid = inners[root, vb >> (LEAF_BITS + INNER_BITS)]
        if mid == NONE:
            vb = (vb // span_mid + 1) * span_mid
            continue
        leaf = inners[mid, (vb >> LEAF_BITS) & (INNER_ENTRIES - 1)]
        if leaf == NONE:
            vb = (vb // span_leaf + 1) * span_leaf
            continue
        # any mapping left in this leaf inside the range?
        end = min(last, (vb // span_leaf + 1) * span_leaf)
        found = False
        for x in range(vb, end):
            if leaves[leaf, x & (span_leaf - 1)] != UNMAPPED:
                found = True
                break
        if not found:
            vb = end
            continue
        if st[ST_INNER_FREE] < 3 or st[ST_LEAF_FREE] < 1:
            return NEED_NODES, vb
        leaf = writable_leaf(nodes, data_rc, rc_dirty, st, dev, vb)
        for x in range(vb, end):
            li = x & (span_leaf - 1)
            v = leaves[leaf, li]
            if v != UNMAPPED:
                leaves[leaf, li] = UNMAPPED
                dec_data(data_rc, freed_txn, rc_dirty, st, np.int64(v >> np.uint64(24)))
                dev[DEV_MAPPED] -= 1
        leaf_dirty[leaf] = 1
        vb = end
    return OK, last


# --------------------------------------------------------------------------- single-I/O entry point
# Passing twenty arrays costs ~5 us of argument unboxing per call; the per-call write path passes
# one table of (address, length) rows instead (Pool._kernel_table keeps it current and keeps the
# arrays alive) and rebuilds the array views here for free.

@intrinsic
def _address(typingctx, addr):
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return sig, codegen


@njit(cache=True, inline="always")
def _table_nodes(tab):
    """The node-store tuple (``nodes``, see :attr:`thinpool.blockmap.BlockMap.nodes`) from the first
    ten rows of a kernel table."""
    return (carray(_address(tab[0, 0]), (tab[0, 1], LEAF_ENTRIES), np.uint64),
            carray(_address(tab[1, 0]), (tab[1, 1], INNER_ENTRIES), np.int32),
            carray(_address(tab[2, 0]), (tab[2, 1],), np.uint32),
            carray(_address(tab[3, 0]), (tab[3, 1],), np.uint32),
            carray(_address(tab[4, 0]), (tab[4, 1],), np.uint8),
            carray(_address(tab[5, 0]), (tab[5, 1],), np.uint8),
            carray(_address(tab[6, 0]), (tab[6, 1],), np.uint8),
            carray(_address(tab[7, 0]), (tab[7, 1],), np.uint8),
            carray(_address(tab[8, 0]), (tab[8, 1],), np.int32),
            carray(_address(tab[9, 0]), (tab[9, 1],), np.int32))


@njit(cache=True)
def write_one(tab, devs, slot, buf, fd, offset):
    """:func:`write_batch` for one I/O of ``len(buf)`` bytes at ``offset`` (>= 0); the pool's arrays
    come from ``tab`` (rows: leaves, inners, leaf_rc, inner_rc, leaf_dirty, inner_dirty, leaf_rc_dirty,
    inner_rc_dirty, leaf_free, inner_free, data_rc, freed_txn, rc_dirty, st, scratch).
    The device is row ``slot`` of the device records ``devs`` (indexing here is cheaper than passing
    the row).  Returns (code, need); code NOT_HANDLED (nothing done) when the I/O goes past the device's
    end or the device is read-only -- the caller's general path reports those."""
    dev = devs[slot]
    n = buf.shape[0]
    if offset + n > dev[DEV_SIZE] or dev[DEV_FLAGS] & 2:
        return NOT_HANDLED, 0
    if n <= 0:
        return OK, 0
    nodes = _table_nodes(tab)
    st = carray(_address(tab[13, 0]), (ST_SIZE,), np.int64)
    bs = st[ST_BLOCK_SIZE]
    first = offset // bs
    nblk = (offset + n - 1) // bs - first + 1
    root = dev[DEV_ROOT]
    snap_time = dev[DEV_SNAP_TIME]
    need = 0
    for vb in range(first, first + nblk):
        v, path_shared = lookup(nodes, root, vb)
        if v == UNMAPPED or np.int64(v & np.uint64(TIME_MASK)) < snap_time or path_shared:
            need += 1
    if need > st[ST_NR_ALLOCATABLE]:
        return NO_SPACE, need
    if st[ST_INNER_FREE] < 2 * nblk + 1 or st[ST_LEAF_FREE] < nblk:
        return NEED_NODES, need
    data_rc = carray(_address(tab[10, 0]), (tab[10, 1],), np.uint32)
    freed_txn = carray(_address(tab[11, 0]), (tab[11, 1],), np.uint8)
    rc_dirty = carray(_address(tab[12, 0]), (tab[12, 1],), np.uint8)
    tmp = carray(_address(tab[14, 0]), (tab[14, 1],), np.uint8)
    return write_span(nodes, data_rc, freed_txn, rc_dirty, st, dev, fd, tmp, offset, n, buf, 0, bs), need


@njit(cache=True)
def read_one(tab, devs, slot, data, out, offset):
    """:func:`read_batch` for one read of ``len(out)`` bytes at ``offset`` of the device in row
    ``slot`` of ``devs`` (node arrays from ``tab``)."""
    nodes = _table_nodes(tab)
    st = carray(_address(tab[13, 0]), (ST_SIZE,), np.int64)
    read_span(nodes, devs[slot, DEV_ROOT], data, st[ST_BLOCK_SIZE], offset, out.shape[0], out, 0)
