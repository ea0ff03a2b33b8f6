"""Numba kernels that walk whole trees: mapping lists, accounting, reference-count checks.
Pure functions over the block-map arrays (the ``nodes`` tuple of :mod:`thinpool.kernels_map`, whose
mapping helpers they inline; see :mod:`thinpool.kernels_cache` for why that is safe with
``cache=True``).  A block map is built from mapping lists (restore/import) by :mod:`thinpool.pool_ir`
with numpy, shared leaves and all.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import kernels_cache
from .kernels_map import UNMAPPED, mapping_block
from .schema import INNER_BITS, INNER_ENTRIES, LEAF_BITS, LEAF_ENTRIES, NONE, RC_PAGE_BITS

_SOURCES_DIGEST = kernels_cache.sources_digest()


@njit(cache=True)
def _built_with():
    """The sources this module's cached code was compiled from (see :mod:`thinpool.kernels_cache`)."""
    return _SOURCES_DIGEST


@njit(cache=True)
def count_mappings(nodes, root):
    """Number of mapped virtual blocks and the highest mapped block (-1 if none)."""
    leaves, inners = nodes[0], nodes[1]
    n = 0
    highest = -1
    for r in range(INNER_ENTRIES):
        mid = inners[root, r]
        if mid == NONE:
            continue
        for m in range(INNER_ENTRIES):
            leaf = inners[mid, m]
            if leaf == NONE:
                continue
            base = (r << (LEAF_BITS + INNER_BITS)) | (m << LEAF_BITS)
            for i in range(LEAF_ENTRIES):
                if leaves[leaf, i] != UNMAPPED:
                    n += 1
                    highest = base + i
    return n, highest


@njit(cache=True)
def collect_mappings(nodes, root, vblocks, values):
    """Fill ``vblocks``/``values`` (sized by :func:`count_mappings`) in virtual-block order."""
    leaves, inners = nodes[0], nodes[1]
    k = 0
    for r in range(INNER_ENTRIES):
        mid = inners[root, r]
        if mid == NONE:
            continue
        for m in range(INNER_ENTRIES):
            leaf = inners[mid, m]
            if leaf == NONE:
                continue
            base = (r << (LEAF_BITS + INNER_BITS)) | (m << LEAF_BITS)
            for i in range(LEAF_ENTRIES):
                v = leaves[leaf, i]
                if v != UNMAPPED:
                    vblocks[k] = base + i
                    values[k] = v
                    k += 1
    return k


@njit(cache=True)
def logical_counts(nodes, roots, nr_data_blocks):
    """How many mapping entries, over all devices' trees, reference each data block (thin_ls's
    notion behind EXCLUSIVE/SHARED).  Linear in distinct nodes: multiplicities propagate down."""
    counts = np.zeros(nr_data_blocks, np.int32)
    logical_counts_into(nodes, roots, counts)
    return counts


@njit(cache=True)
def logical_counts_into(nodes, roots, counts):
    """:func:`logical_counts` into ``counts`` (zeroes, one integer per data block; only the entries of
    mapped blocks are written, so a lazily zeroed array costs the pages of the blocks in use).  A count
    stops at the largest value of ``counts``' type: with uint8 counts, which tell exclusive (1) from
    shared (more) as well as int32 ones, 100,000,000 blocks take 100 MB instead of 400."""
    leaves, inners = nodes[0], nodes[1]
    top = np.iinfo(counts.dtype).max
    mult_inner = np.zeros(inners.shape[0], np.int64)
    mult_leaf = np.zeros(leaves.shape[0], np.int64)
    for r in roots:
        mult_inner[r] += 1
    seen = np.zeros(inners.shape[0], np.uint8)
    for r in roots:
        if seen[r]:
            continue
        seen[r] = 1
        for i in range(INNER_ENTRIES):
            mid = inners[r, i]
            if mid != NONE:
                mult_inner[mid] += mult_inner[r]
    mids_seen = np.zeros(inners.shape[0], np.uint8)
    for r in roots:
        if seen[r] != 1:
            continue
        seen[r] = 2
        for i in range(INNER_ENTRIES):
            mid = inners[r, i]
            if mid == NONE or mids_seen[mid]:
                continue
            mids_seen[mid] = 1
            for j in range(INNER_ENTRIES):
                leaf = inners[mid, j]
                if leaf != NONE:
                    mult_leaf[leaf] += mult_inner[mid]
    for leaf in range(leaves.shape[0]):
        m = mult_leaf[leaf]
        if m == 0:
            continue
        for i in range(LEAF_ENTRIES):
            v = leaves[leaf, i]
            if v != UNMAPPED:
                b = mapping_block(v)
                c = counts[b] + m
                counts[b] = top if c > top else c


@njit(cache=True)
def device_usage(nodes, root, counts):
    """(mapped, exclusive, highest) for one device given :func:`logical_counts`."""
    leaves, inners = nodes[0], nodes[1]
    mapped = 0
    exclusive = 0
    highest = -1
    for r in range(INNER_ENTRIES):
        mid = inners[root, r]
        if mid == NONE:
            continue
        for m in range(INNER_ENTRIES):
            leaf = inners[mid, m]
            if leaf == NONE:
                continue
            base = (r << (LEAF_BITS + INNER_BITS)) | (m << LEAF_BITS)
            for i in range(LEAF_ENTRIES):
                v = leaves[leaf, i]
                if v != UNMAPPED:
                    mapped += 1
                    highest = base + i
                    if counts[mapping_block(v)] == 1:
                        exclusive += 1
    return mapped, exclusive, highest


@njit(cache=True)
def usage_of_roots(nodes, roots, counts):
    """(mapped, exclusive, highest) of every tree in ``roots`` at once: :func:`device_usage` for each,
    but linear in distinct nodes -- a leaf or mid node shared by many trees (snapshots) is summed once
    and its sums reused, and so is a root shared by several devices.  Returns three int64 arrays."""
    leaves, inners = nodes[0], nodes[1]
    n = roots.shape[0]
    mapped = np.zeros(n, np.int64)
    excl = np.zeros(n, np.int64)
    high = np.full(n, -1, np.int64)
    # per node: -2 = not summed yet; else its mapped / exclusive count and highest local block (-1: none)
    leaf_high = np.full(leaves.shape[0], -2, np.int64)
    leaf_mapped = np.zeros(leaves.shape[0], np.int64)
    leaf_excl = np.zeros(leaves.shape[0], np.int64)
    inner_high = np.full(inners.shape[0], -2, np.int64)
    inner_mapped = np.zeros(inners.shape[0], np.int64)
    inner_excl = np.zeros(inners.shape[0], np.int64)
    for k in range(n):
        root = roots[k]
        if inner_high[root] == -2:
            r_mapped = 0
            r_excl = 0
            r_high = -1
            for r in range(INNER_ENTRIES):
                mid = inners[root, r]
                if mid == NONE:
                    continue
                if inner_high[mid] == -2:
                    m_mapped = 0
                    m_excl = 0
                    m_high = -1
                    for m in range(INNER_ENTRIES):
                        leaf = inners[mid, m]
                        if leaf == NONE:
                            continue
                        if leaf_high[leaf] == -2:
                            l_mapped = 0
                            l_excl = 0
                            l_high = -1
                            for i in range(LEAF_ENTRIES):
                                v = leaves[leaf, i]
                                if v != UNMAPPED:
                                    l_mapped += 1
                                    l_high = i
                                    if counts[mapping_block(v)] == 1:
                                        l_excl += 1
                            leaf_mapped[leaf] = l_mapped
                            leaf_excl[leaf] = l_excl
                            leaf_high[leaf] = l_high
                        m_mapped += leaf_mapped[leaf]
                        m_excl += leaf_excl[leaf]
                        if leaf_high[leaf] >= 0:
                            m_high = (m << LEAF_BITS) | leaf_high[leaf]
                    inner_mapped[mid] = m_mapped
                    inner_excl[mid] = m_excl
                    inner_high[mid] = m_high
                r_mapped += inner_mapped[mid]
                r_excl += inner_excl[mid]
                if inner_high[mid] >= 0:
                    r_high = (r << (LEAF_BITS + INNER_BITS)) | inner_high[mid]
            inner_mapped[root] = r_mapped
            inner_excl[root] = r_excl
            inner_high[root] = r_high
        mapped[k] = inner_mapped[root]
        excl[k] = inner_excl[root]
        high[k] = inner_high[root]
    return mapped, excl, high


@njit(cache=True)
def expected_counts(nodes, roots, nr_data_blocks):
    """Reference counts recomputed from the trees: (inner, leaf, data) -- for check()."""
    exp_data = np.zeros(nr_data_blocks, np.int64)
    pages = np.zeros((nr_data_blocks >> RC_PAGE_BITS) + 1, np.uint8)
    exp_inner, exp_leaf, bad = expected_counts_into(nodes, roots, exp_data, pages)
    return exp_inner, exp_leaf, exp_data, bad


@njit(cache=True)
def expected_counts_into(nodes, roots, exp_data, pages):
    """:func:`expected_counts` with the data blocks' counts into ``exp_data`` (zeroes, one int64 per data
    block, written only for mapped blocks) and ``pages[b >> RC_PAGE_BITS] = 1`` for every block ``b``
    counted; returns (inner, leaf, bad)."""
    leaves, inners = nodes[0], nodes[1]
    nr_data_blocks = exp_data.shape[0]
    exp_inner = np.zeros(inners.shape[0], np.int64)
    exp_leaf = np.zeros(leaves.shape[0], np.int64)
    for r in roots:
        exp_inner[r] += 1
    seen_root = np.zeros(inners.shape[0], np.uint8)
    seen_mid = np.zeros(inners.shape[0], np.uint8)
    seen_leaf = np.zeros(leaves.shape[0], np.uint8)
    bad = 0
    for r in roots:
        if seen_root[r]:
            continue
        seen_root[r] = 1
        for i in range(INNER_ENTRIES):
            mid = inners[r, i]
            if mid == NONE:
                continue
            if mid < 0 or mid >= inners.shape[0]:
                bad += 1
                continue
            exp_inner[mid] += 1
            if seen_mid[mid]:
                continue
            seen_mid[mid] = 1
            for j in range(INNER_ENTRIES):
                leaf = inners[mid, j]
                if leaf == NONE:
                    continue
                if leaf < 0 or leaf >= leaves.shape[0]:
                    bad += 1
                    continue
                exp_leaf[leaf] += 1
                if seen_leaf[leaf]:
                    continue
                seen_leaf[leaf] = 1
                for k in range(LEAF_ENTRIES):
                    v = leaves[leaf, k]
                    if v != UNMAPPED:
                        d = mapping_block(v)
                        if d >= nr_data_blocks:
                            bad += 1
                        else:
                            exp_data[d] += 1
                            pages[d >> RC_PAGE_BITS] = 1
    return exp_inner, exp_leaf, bad


@njit(cache=True)
def mapped_flags(nodes, root, first, out):
    """out[i] = 1 if virtual block ``first + i`` is mapped (for BLOCK_STATUS / sparse export)."""
    leaves, inners = nodes[0], nodes[1]
    n = out.shape[0]
    i = 0
    while i < n:
        vb = first + i
        mid = inners[root, vb >> (LEAF_BITS + INNER_BITS)]
        if mid == NONE:
            step = ((vb >> (LEAF_BITS + INNER_BITS)) + 1 << (LEAF_BITS + INNER_BITS)) - vb
            for k in range(i, min(n, i + step)):
                out[k] = 0
            i += step
            continue
        leaf = inners[mid, (vb >> LEAF_BITS) & (INNER_ENTRIES - 1)]
        if leaf == NONE:
            step = ((vb >> LEAF_BITS) + 1 << LEAF_BITS) - vb
            for k in range(i, min(n, i + step)):
                out[k] = 0
            i += step
            continue
        out[i] = 1 if leaves[leaf, vb & (LEAF_ENTRIES - 1)] != UNMAPPED else 0
        i += 1


kernels_cache.check(globals(), _built_with)
