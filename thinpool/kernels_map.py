"""Numba kernels of the block map and the data space map: mapping values, dm-thin's time rule,
data-block allocation and reference counts, the node store, lookup, shadowing and release.

Pure functions over numpy arrays (the I/O path that uses them is :mod:`thinpool.kernels`; whole-tree
walks are :mod:`thinpool.walks`).  Two tuples carry the pool's arrays, in the order of
:class:`thinpool.schema.KRow`:

- ``nodes`` = (leaves, inners, leaf_rc, inner_rc, leaf_dirty, inner_dirty, leaf_rc_dirty,
  inner_rc_dirty, leaf_free, inner_free) -- :attr:`thinpool.blockmap.BlockMap.nodes`;
- ``space`` = (data_rc, freed_txn, rc_dirty) -- :attr:`thinpool.dataspace.DataSpaceMap.arrays`;
  ``freed_txn`` holds :class:`thinpool.schema.BlockState` bits per data block (the allocator's state in
  the low two bits, ``STALE``: may hold old bytes, ``PASSDOWN``: punch when released).

Block map shape (a 3-level radix tree of fixed fan-out, shared by reference like dm-thin's btrees)::

    device root  (inner node, 1024 x int32 child slots)      virtual block bits 28..19
      -> mid     (inner node, 1024 x int32 child slots)      bits 18..9
        -> leaf  (512 x uint64 mappings)                     bits 8..0

A mapping is ``(data_block << 24) | (time & 0xFFFFFF)`` exactly as dm-thin packs it
(:func:`pack_mapping`); ``UNMAPPED`` (all ones) marks a hole.  Reference counts: ``inner_rc`` /
``leaf_rc`` count parent references (device roots count one per device), ``data_rc`` counts
*distinct leaves* referencing a data block (dm-thin's rule).  A node with count > 1 is copied
before it is modified (shadowing) and its children gain one reference each.

State scalars live in ``st`` (an int64 array) at the ``ST_*`` indices of :mod:`thinpool.schema`.
Cached kernels here are called by the other kernel modules: see :mod:`thinpool.kernels_cache`.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.core import config as _numba_config

from . import kernels_cache
from .schema import UNMAPPED as _UNMAPPED
from .schema import (BLOCK_FREED, BLOCK_PASSDOWN, BLOCK_STALE, BLOCK_STATE, DEV_ROOT, INNER_BITS, INNER_ENTRIES, LEAF_BITS, LEAF_ENTRIES, NEED_NODES, NONE, OK, RC_PAGE_BITS,
                     ST_CURSOR, ST_INNER_FREE, ST_INNERS_LIVE, ST_LEAF_FREE, ST_LEAVES_LIVE, ST_NR_ALLOCATABLE,
                     ST_NR_BLOCKS, ST_NR_FREE, TIME_BITS, TIME_MASK)

UNMAPPED = np.uint64(_UNMAPPED)  # a hole, typed as the leaves' element type
_TIME_BITS = np.uint64(TIME_BITS)
_TIME_MASK = np.uint64(TIME_MASK)
_RC_PAGE_BITS = np.uint64(RC_PAGE_BITS)
_SOURCES_DIGEST = kernels_cache.sources_digest()


@njit(cache=True)
def _built_with():
    """The sources this module's cached code was compiled from (see :mod:`thinpool.kernels_cache`)."""
    return _SOURCES_DIGEST


# --------------------------------------------------------------------------- mapping values

@njit(cache=True, inline="always")
def pack_mapping(block, time):
    """A leaf's mapping value: data block ``block`` written at pool time ``time`` (low 24 bits kept)."""
    return (np.uint64(block) << _TIME_BITS) | (np.uint64(time) & _TIME_MASK)


@njit(cache=True, inline="always")
def mapping_block(v):
    """The data block of mapping value ``v``."""
    return np.int64(v >> _TIME_BITS)


@njit(cache=True, inline="always")
def unpack_mapping(v):
    """``(data_block, time)`` of mapping value ``v``."""
    return np.int64(v >> _TIME_BITS), np.int64(v & _TIME_MASK)


@njit(cache=True, inline="always")
def needs_new_block(v, path_shared, snap_time):
    """dm-thin's time rule: writing a virtual block whose mapping is ``v`` needs a new data block
    when it is unmapped, when a node on its path is shared, or when it was mapped before the
    device's last snapshot (mapping time < ``snap_time``: the snapshot may share the block)."""
    return v == UNMAPPED or path_shared or np.int64(v & _TIME_MASK) < snap_time


# --------------------------------------------------------------------------- cache hints

# (mypy: numba.config's settings are set at run time, not annotated)
if _numba_config.DISABLE_JIT:  # type: ignore[attr-defined]
    def prefetch(arr, i):
        """Without the JIT (the reference runs): nothing to hint."""
else:
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cgutils
    from numba.extending import intrinsic as _intrinsic

    @_intrinsic
    def prefetch(typingctx, arr, i):
        """Hint that ``arr[i]`` (a 1-d array, ``i`` in range) will be read soon: LLVM's prefetch of its
        cache line into every cache level.  No effect on any result."""
        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = _cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
            i8p = _ir.IntType(8).as_pointer()
            i32 = _ir.IntType(32)
            fn = _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(_ir.VoidType(), [i8p, i32, i32, i32]),
                                                 "llvm.prefetch.p0i8")
            builder.call(fn, [builder.bitcast(ptr, i8p), _ir.Constant(i32, 0), _ir.Constant(i32, 3), _ir.Constant(i32, 1)])
            return context.get_dummy_value()
        from numba.core import types
        return types.void(arr, i), codegen


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


# --------------------------------------------------------------------------- data space map

@njit(cache=True, inline="always")
def find_free_data_block(space, st):
    """Linear search from the cursor (wrapping) for a block free now *and* not freed in this transaction."""
    data_rc, freed_txn = space[0], space[1]
    n = st[ST_NR_BLOCKS]
    c = st[ST_CURSOR]
    if c >= n:
        c = 0
    # two plain loops (cursor to end, then start to cursor) and unsigned indices: no wrap test and no
    # negative-index fix-up per block scanned
    for b in range(np.uint64(c), np.uint64(n)):
        if data_rc[b] == 0 and (freed_txn[b] & BLOCK_STATE) == 0:
            return np.int64(b)
    for b in range(np.uint64(0), np.uint64(c)):
        if data_rc[b] == 0 and (freed_txn[b] & BLOCK_STATE) == 0:
            return np.int64(b)
    return -1


@njit(cache=True, inline="always")
def alloc_data_block(space, st):
    """Allocate one data block (count 1); -1 if none is allocatable.  The block's ``STALE`` bit is
    left for the writer (:func:`take_stale`), which must then clear it."""
    b = find_free_data_block(space, st)
    if b < 0:
        return -1
    space[0][b] = 1
    space[2][b >> RC_PAGE_BITS] = 1
    st[ST_CURSOR] = b + 1
    st[ST_NR_FREE] -= 1
    st[ST_NR_ALLOCATABLE] -= 1
    return b


@njit(cache=True, inline="always")
def take_stale(space, d):
    """Whether newly allocated block ``d`` may hold old bytes (freed without a hole punch); clears the
    mark (the block is in use now; freeing it sets the mark again)."""
    flags = space[1]
    stale = (flags[d] & BLOCK_STALE) != 0
    if stale:
        flags[d] = 0
    return stale


@njit(cache=True)
def allocate_many(space, st, count, out):
    """Allocate ``count`` blocks into ``out``; returns how many were allocated (the JIT allocator benchmark)."""
    for i in range(count):
        b = alloc_data_block(space, st)
        if b < 0:
            return i
        out[i] = b
    return count


@njit(cache=True, inline="always")
def inc_data(space, d):
    space[0][d] += 1
    space[2][d >> RC_PAGE_BITS] = 1


@njit(cache=True, inline="always")
def dec_data(space, st, d):
    """Drop one reference; a block reaching 0 is free but not allocatable until the next commit.  It
    keeps its bytes (dm-thin never discards a block it frees): marked ``STALE``."""
    data_rc = space[0]
    c = data_rc[d] - 1
    data_rc[d] = c
    space[2][d >> RC_PAGE_BITS] = 1
    if c == 0:
        space[1][d] = BLOCK_FREED | BLOCK_STALE
        st[ST_NR_FREE] += 1


@njit(cache=True, inline="always")
def dec_data_passdown(space, st, d):
    """:func:`dec_data` for a discard passed down: a block reaching 0 is also marked ``PASSDOWN``, so
    it is hole-punched when released (after the commits that free it are durable)."""
    dec_data(space, st, d)
    if space[0][d] == 0:
        space[1][d] |= BLOCK_PASSDOWN


@njit(cache=True, inline="always")
def unallocate_data_block(space, st, d):
    """Undo :func:`alloc_data_block` for a block that was never mapped but may hold part of a write:
    it is freed like a discarded block (not allocatable again until the commits after this
    transaction are durable), and marked ``STALE``: whoever reuses it zeroes what it does not write."""
    space[0][d] = 0
    space[1][d] = BLOCK_FREED | BLOCK_STALE
    st[ST_NR_FREE] += 1


@njit(cache=True, inline="always")
def dec_leaf_data(row, data_rc, freed_txn, rc_dirty):
    """Every data block leaf ``row`` maps loses a reference (a leaf released), as :func:`dec_data`
    per mapping does; returns how many blocks reached zero (the caller adds them to the free count).
    The arrays are taken out of the ``space`` tuple once by the caller (an extraction per mapping
    costs reference counting) and indexed unsigned (no negative-index check): ~10x faster per leaf
    than :func:`dec_data` per mapping (:func:`shadow_leaf` raises counts the same way)."""
    freed = 0
    for i in range(LEAF_ENTRIES):
        v = row[i]
        if v != UNMAPPED:
            u = v >> _TIME_BITS
            c = data_rc[u] - 1
            data_rc[u] = c
            rc_dirty[u >> _RC_PAGE_BITS] = 1
            if c == 0:
                freed_txn[u] = BLOCK_FREED | BLOCK_STALE
                freed += 1
    return freed


# --------------------------------------------------------------------------- node store

@njit(cache=True, inline="always")
def new_inner(nodes, st):
    inners, inner_rc, inner_dirty, inner_rc_dirty, inner_free = nodes[1], nodes[3], nodes[5], nodes[7], nodes[9]
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
def _take_leaf(nodes, st):
    """A free leaf slot taken (count 1, dirty) with its row as it was: the caller fills it."""
    leaf_rc, leaf_dirty, leaf_rc_dirty, leaf_free = nodes[2], nodes[4], nodes[6], nodes[8]
    n = st[ST_LEAF_FREE]
    if n == 0:
        return NONE
    n -= 1
    st[ST_LEAF_FREE] = n
    s = leaf_free[n]
    leaf_rc[s] = 1
    leaf_dirty[s] = 1
    leaf_rc_dirty[s >> RC_PAGE_BITS] = 1
    st[ST_LEAVES_LIVE] += 1
    return s


@njit(cache=True, inline="always")
def new_leaf(nodes, st):
    s = _take_leaf(nodes, st)
    if s == NONE:
        return NONE
    row = nodes[0][s]
    for k in range(LEAF_ENTRIES):
        row[k] = UNMAPPED
    return s


@njit(cache=True)
def release_leaf(nodes, space, st, leaf):
    """Drop one reference to a leaf; at zero, drop its data references and free the slot."""
    leaves, leaf_rc, leaf_dirty, leaf_rc_dirty, leaf_free = nodes[0], nodes[2], nodes[4], nodes[6], nodes[8]
    c = leaf_rc[leaf] - 1
    leaf_rc[leaf] = c
    leaf_rc_dirty[leaf >> RC_PAGE_BITS] = 1
    if c == 0:
        st[ST_NR_FREE] += dec_leaf_data(leaves[leaf], space[0], space[1], space[2])
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
def release_inner(nodes, space, st, node, level):
    """Drop one reference to an inner node (level 0 = device root, 1 = mid) and release whatever
    reaches zero below it: dm-thin's recursive delete, stopping at nodes still shared."""
    inners = nodes[1]
    if not _drop_inner(nodes, st, node):
        return
    if level == 1:
        for j in range(INNER_ENTRIES):
            leaf = inners[node, j]
            if leaf != NONE:
                release_leaf(nodes, space, st, leaf)
        _free_inner(nodes, st, node)
        return
    for i in range(INNER_ENTRIES):
        mid = inners[node, i]
        if mid == NONE or not _drop_inner(nodes, st, mid):
            continue
        for j in range(INNER_ENTRIES):
            leaf = inners[mid, j]
            if leaf != NONE:
                release_leaf(nodes, space, st, leaf)
        _free_inner(nodes, st, mid)
    _free_inner(nodes, st, node)


@njit(cache=True)
def shadow_inner(nodes, st, node, level):
    """Copy a shared inner node; children gain a reference. Returns the new slot or NONE."""
    inners, leaf_rc, inner_rc, leaf_rc_dirty, inner_rc_dirty = nodes[1], nodes[2], nodes[3], nodes[6], nodes[7]
    new = new_inner(nodes, st)
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
def shadow_leaf(nodes, space, st, leaf):
    """Copy a shared leaf; every data block it maps gains a reference (dm-thin's leaf rule).  One
    pass over the leaf copies each mapping and raises its block's count (the new row is written
    once: no holes filled first), the count arrays taken out of ``space`` once and indexed unsigned."""
    leaves, leaf_rc, leaf_rc_dirty = nodes[0], nodes[2], nodes[6]
    new = _take_leaf(nodes, st)
    if new == NONE:
        return NONE
    src, dst = leaves[leaf], leaves[new]
    data_rc, rc_dirty = space[0], space[2]
    for i in range(np.uint64(LEAF_ENTRIES)):
        v = src[i]
        dst[i] = v
        if v != UNMAPPED:
            u = v >> _TIME_BITS
            data_rc[u] += 1
            rc_dirty[u >> _RC_PAGE_BITS] = 1
    leaf_rc[leaf] -= 1
    leaf_rc_dirty[leaf >> RC_PAGE_BITS] = 1
    return new


# --------------------------------------------------------------------------- lookup and update

@njit(cache=True, inline="always")
def lookup(nodes, root, vb):
    """Mapping of virtual block ``vb`` under ``root`` (UNMAPPED if none); also returns whether any
    node on the path is shared (count > 1)."""
    return lookup_in(nodes[0], nodes[1], nodes[2], nodes[3], root, vb)


@njit(cache=True, inline="always")
def lookup_in(leaves, inners, leaf_rc, inner_rc, root, vb):
    """:func:`lookup` over the node arrays themselves (a batch loop takes them out of ``nodes`` once:
    each extraction per I/O costs reference counting)."""
    leaf, shared = find_leaf_in(inners, leaf_rc, inner_rc, root, vb)
    if leaf == NONE:
        return UNMAPPED, shared
    return leaves[leaf, vb & (LEAF_ENTRIES - 1)], shared


@njit(cache=True, inline="always")
def find_leaf_in(inners, leaf_rc, inner_rc, root, vb):
    """The leaf slot holding virtual block ``vb`` under ``root`` (NONE if there is none yet) and
    whether any node on the path is shared (count > 1)."""
    shared = inner_rc[root] > 1
    mid = inners[root, vb >> (LEAF_BITS + INNER_BITS)]
    if mid == NONE:
        return NONE, shared
    shared = shared or inner_rc[mid] > 1
    leaf = inners[mid, (vb >> LEAF_BITS) & (INNER_ENTRIES - 1)]
    if leaf == NONE:
        return NONE, shared
    return leaf, shared or leaf_rc[leaf] > 1


@njit(cache=True)
def writable_leaf(nodes, space, st, dev, vb):
    """Make the path to ``vb`` exclusive to this device (shadowing shared nodes, creating missing
    ones) and return the leaf slot, or NONE when the node store needs to grow."""
    inners, leaf_rc, inner_rc, inner_dirty = nodes[1], nodes[2], nodes[3], nodes[5]
    root = dev[DEV_ROOT]
    if inner_rc[root] > 1:
        root = shadow_inner(nodes, st, root, 0)
        if root == NONE:
            return NONE
        dev[DEV_ROOT] = root
    ri = vb >> (LEAF_BITS + INNER_BITS)
    mid = inners[root, ri]
    if mid == NONE:
        mid = new_inner(nodes, st)
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
        leaf = new_leaf(nodes, st)
        if leaf == NONE:
            return NONE
        inners[mid, mi] = leaf
        inner_dirty[mid] = 1
    elif leaf_rc[leaf] > 1:
        leaf = shadow_leaf(nodes, space, st, leaf)
        if leaf == NONE:
            return NONE
        inners[mid, mi] = leaf
        inner_dirty[mid] = 1
    return leaf


# --------------------------------------------------------------------------- the space map's pages (commit)

@njit(cache=True)
def pack_space_pages(rc, sm_pages, rc_pages, bitmap, sm_used, over, over_pages):
    """The on-disk data space map's changed pages in one pass over the counts ``rc`` (what
    :meth:`thinpool.dataspace.DataSpaceMap.disk_updates` writes; its numpy code is the reference).

    Bitmap page ``sm_pages[k]`` (``4 * bitmap.shape[1]`` blocks) goes to ``bitmap[k]``: ``min(count, 3)``
    in two bits per block, four blocks a byte (block i in bits 2*(i%4)..+1; blocks past ``rc`` count 0);
    ``sm_used[k]`` says whether any of its counts is nonzero.  Each count page ``rc_pages[j]``
    (``over.shape[1]`` blocks) holding a count of 3 or more goes, with its counts below 3 zeroed, to the
    next row of ``over`` and its index to ``over_pages``; returns how many rows were written."""
    n = np.uint64(len(rc))
    per_byte = np.uint64(4)
    nbytes = np.uint64(bitmap.shape[1])
    three = np.uint32(3)
    for k in range(len(sm_pages)):
        base = np.uint64(sm_pages[k]) * nbytes * per_byte
        row = bitmap[k]
        used = np.uint32(0)
        if base + nbytes * per_byte <= n:  # a whole page: no bounds test, no branch per block
            for b in range(nbytes):
                i = base + np.uint64(b) * per_byte
                c0, c1, c2, c3 = rc[i], rc[i + np.uint64(1)], rc[i + np.uint64(2)], rc[i + np.uint64(3)]
                used |= c0 | c1 | c2 | c3
                row[b] = (min(c0, three) | (min(c1, three) << 2) | (min(c2, three) << 4)
                          | (min(c3, three) << 6))
        else:  # the last page of a data device that ends inside it
            for b in range(nbytes):
                byte = 0
                i0 = base + np.uint64(b) * per_byte
                for q in range(4):
                    i = i0 + np.uint64(q)
                    c = rc[i] if i < n else np.uint32(0)
                    used |= c
                    byte |= min(c, three) << (2 * q)
                row[b] = byte
        sm_used[k] = used != 0
    per = np.uint64(over.shape[1])
    m = 0
    for j in range(len(rc_pages)):
        base = np.uint64(rc_pages[j]) * per
        high = False
        for i in range(per):
            if rc[base + np.uint64(i)] >= 3:
                high = True
                break
        if high:
            out = over[m]
            for i in range(per):
                c = rc[base + np.uint64(i)]
                out[i] = c if c >= 3 else 0
            over_pages[m] = rc_pages[j]
            m += 1
    return m

kernels_cache.check(globals(), _built_with)
