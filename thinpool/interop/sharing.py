"""Mapping btrees with shared nodes, as the kernel has them after snapshots (written by
:mod:`thinpool.interop.binary`).

dm-thin never copies a tree to snapshot it: ``create_snap`` points the new device at its origin's
root, and a later write shadows only the nodes on its path, so snapshots keep sharing every
unchanged subtree (docs/dm-thin.md §4, §15).  Metadata rebuilt from mappings alone must find that
sharing again, or a volume with 300 snapshots takes 300 copies of its tree.  :func:`build_shared_forest`
builds every device's mapping tree so that identical regions of different devices are the same
nodes, whatever produced the mappings:

* **leaf groups** -- each tree's mappings are cut into groups at positions that depend only on the
  tree's own mappings near the cut (content-defined chunking on 512-block-aligned chunks, the size of
  the pool's own leaves): a cut lies between two consecutive mapped chunks ``a < b`` when the aligned
  window of chunks that ends just before the highest power-of-two boundary in ``(a, b]`` holds at least
  :data:`MIN_ENTRIES` mappings.  A dense chunk (≥ 84 mappings) is thus a group of its own, sparse
  chunks gather into aligned windows; groups left under-full merge with a neighbour.  Two devices
  with the same mappings in a region cut it the same way;
* **leaves** -- each group is split into ``ceil(n / 252)`` leaves of near-equal size, never fewer than
  84 entries (thin_check's third) unless the leaf is a root; the split depends on the group's keys
  alone, so a write that remaps blocks (copy-on-write changes values, not keys) leaves the other
  leaves of its group identical; identical leaves (same keys and values:
  :func:`~thinpool.interop.ir.identical_runs`) are written once;
* **internal nodes** -- built level by level over each tree's leaf sequence, identical nodes (same
  children) written once, up to each tree's root; identical trees share their root.

Reference counts follow: a node counts one per distinct parent node that points at it (plus, for a
root, one per top-level entry: the caller's), a data block one per entry in distinct leaves
(dm-thin's rule).  Everything is vectorised over chunks, groups and nodes; the only per-mapping
passes are numpy's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from thinpool.interop.btree import INTERNAL_MAX_ENTRIES, LEAF_NODE, INTERNAL_NODE, NODE_HEADER_SIZE, max_entries
from thinpool.interop.ir import identical_runs

__all__ = ["SharedForest", "build_shared_forest", "pack_shared_forest", "MIN_ENTRIES", "CHUNK_BITS"]

#: a mapping leaf's capacity (value size 8)
LEAF_MAX = max_entries(8)
#: the fewest entries thin_check accepts in a non-root node (a third of max_entries)
MIN_ENTRIES = LEAF_MAX // 3
#: chunks of 2^9 = 512 virtual blocks, the pool's own leaf size, are the unit of sharing
CHUNK_BITS = 9


@dataclass
class SharedForest:
    """Nodes of mapping trees that share identical subtrees.

    Node ``g`` is written to block ``first_block + g``: leaves are ``0 .. n_leaves - 1`` (entries
    ``leaf_start[g] ..`` of the keys/values the forest was built from), internal nodes follow, level
    by level bottom-up (``levels`` lists each level's node range); internal node ``n_leaves + i``
    points at ``children[inner_start[i] : inner_start[i] + inner_count[i]]``.  ``roots[t]`` is tree
    ``t``'s root, ``refs[g]`` the number of references to ``g`` from internal nodes (each distinct
    parent once).
    """

    leaf_start: np.ndarray
    leaf_count: np.ndarray
    inner_start: np.ndarray
    inner_count: np.ndarray
    children: np.ndarray
    levels: list[tuple[int, int]]
    roots: np.ndarray
    refs: np.ndarray

    @property
    def n_leaves(self) -> int:
        return len(self.leaf_start)

    @property
    def nr_nodes(self) -> int:
        return len(self.leaf_start) + len(self.inner_start)

    def leaf_entries(self) -> np.ndarray:
        """Indices (into the keys/values the forest was built from) of every entry of every leaf."""
        return _run_rows(self.leaf_start, self.leaf_count)


def _run_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, np.int64)
    pos = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(np.asarray(starts, np.int64), counts) + pos


def _even_split(n: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split runs of ``n[i]`` items into ``k = ceil(n / cap)`` near-equal pieces (``k >= 1``):
    (pieces per run, each piece's offset within its run, each piece's length)."""
    n = np.asarray(n, np.int64)
    k = np.maximum(1, -(-n // cap))
    j = np.arange(int(k.sum()), dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
    nn, kk = np.repeat(n, k), np.repeat(k, k)
    lo = (j * nn) // kk
    return k, lo, ((j + 1) * nn) // kk - lo


def _chunk_cuts(keys: np.ndarray, tree_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leaf groups of every tree: (group's first entry, group's entry count, group's tree).

    Entries are the trees' keys, tree after tree, each tree's keys strictly increasing.
    """
    n_trees = len(tree_counts)
    total = keys.size
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    tree_of = np.repeat(np.arange(n_trees), tree_counts)
    chunk = keys >> np.uint64(CHUNK_BITS)
    new_chunk = np.ones(total, bool)
    new_chunk[1:] = (chunk[1:] != chunk[:-1]) | (tree_of[1:] != tree_of[:-1])
    c_first = np.flatnonzero(new_chunk)
    c_count = np.diff(np.append(c_first, total))
    c_tree = tree_of[c_first]
    c_idx = chunk[c_first]
    nc = c_first.size
    last_of_tree = np.ones(nc, bool)
    last_of_tree[:-1] = c_tree[1:] != c_tree[:-1]
    cut = last_of_tree.copy()
    inner = np.flatnonzero(~last_of_tree)
    if inner.size:
        a, b = c_idx[inner], c_idx[inner + 1]
        # t = the highest bit where a and b differ; the window is [a with bits below t cleared, a]
        t = (_bit_length(a ^ b) - 1).astype(np.uint64)
        s = (a >> t) << t
        first_in_window = _first_chunk_at_or_after(c_tree, c_idx, c_tree[inner], s)
        c_end = np.cumsum(c_count)
        window = c_end[inner] - (c_end[first_in_window] - c_count[first_in_window])
        cut[inner] = window >= MIN_ENTRIES
    # groups under MIN_ENTRIES merge with a neighbour of their tree (the one before, the first with the next)
    while True:
        g_last = np.flatnonzero(cut)
        g_first = np.concatenate(([0], g_last[:-1] + 1))
        c_end = np.cumsum(c_count)
        g_count = c_end[g_last] - (c_end[g_first] - c_count[g_first])
        g_tree = c_tree[g_first]
        groups_in_tree = np.bincount(g_tree, minlength=n_trees)
        under = (g_count < MIN_ENTRIES) & (groups_in_tree[g_tree] > 1)
        if not under.any():
            break
        first_of_tree = np.ones(g_last.size, bool)
        first_of_tree[1:] = g_tree[1:] != g_tree[:-1]
        drop = np.concatenate((g_last[np.flatnonzero(under & ~first_of_tree) - 1],
                               g_last[np.flatnonzero(under & first_of_tree)]))
        cut[drop] = False
    return c_first[g_first], g_count, g_tree


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Bit length of each element of a uint64 array (0 for 0)."""
    x = x.copy()
    n = np.zeros(x.size, np.int64)
    for shift in (32, 16, 8, 4, 2, 1):
        big = x >= (np.uint64(1) << np.uint64(shift))
        n += big * shift
        x[big] >>= np.uint64(shift)
    return n + (x > 0)


def _first_chunk_at_or_after(c_tree: np.ndarray, c_idx: np.ndarray, q_tree: np.ndarray, q_idx: np.ndarray) -> np.ndarray:
    """For each query (tree, chunk index), the first chunk of that tree whose index is >= it
    (chunks are sorted by tree, then index; every query has an answer in its tree)."""
    nc = c_tree.size
    trees = np.concatenate((c_tree, q_tree))
    idx = np.concatenate((c_idx, q_idx))
    is_chunk = np.concatenate((np.ones(nc, np.int64), np.zeros(q_tree.size, np.int64)))
    order = np.lexsort((is_chunk, idx, trees))  # a query sorts before a chunk with the same index
    before = np.cumsum(is_chunk[order]) - is_chunk[order]
    out = np.empty(q_tree.size, np.int64)
    at = order >= nc
    out[order[at] - nc] = before[at]
    return out


def build_shared_forest(keys: np.ndarray, values: np.ndarray, tree_counts: np.ndarray) -> SharedForest:
    """Plan the mapping trees of ``len(tree_counts)`` devices with identical subtrees shared.

    ``keys`` (virtual blocks) and ``values`` (``(data block << 24) | time``) hold the trees' entries,
    tree after tree (``tree_counts[t]`` each), keys strictly increasing within a tree.  An empty tree
    is an empty root leaf (all empty trees share one).
    """
    tree_counts = np.asarray(tree_counts, np.int64)
    n_trees = len(tree_counts)
    # 1. leaf groups, each split into near-equal leaves (the split depends on the group's keys only,
    #    so a copy-on-write that changes values keeps it), identical leaves once
    g_start, g_count, g_tree = _chunk_cuts(keys, tree_counts)
    k, lo, length = _even_split(g_count, LEAF_MAX)
    l_start = np.repeat(g_start, k) + lo
    l_rep, l_unique = identical_runs(l_start, length, [keys, values])
    u_of = np.full(l_start.size, -1, np.int64)
    u_of[l_unique] = np.arange(l_unique.size)
    leaf_start, leaf_count = l_start[l_unique], length[l_unique]
    empty = tree_counts == 0
    if empty.any():  # one empty leaf for the empty trees
        leaf_start = np.append(leaf_start, 0)
        leaf_count = np.append(leaf_count, 0)
    n_leaves = leaf_start.size
    # each tree's sequence of leaves
    cur = u_of[l_rep]
    ncur = np.bincount(np.repeat(g_tree, k), minlength=n_trees).astype(np.int64)
    roots = np.full(n_trees, -1, np.int64)
    roots[empty] = n_leaves - 1
    # 2. internal levels: each tree's nodes split evenly, identical nodes once
    inner_start: list[np.ndarray] = []
    inner_count: list[np.ndarray] = []
    children: list[np.ndarray] = []
    levels: list[tuple[int, int]] = []
    next_id, child_base = n_leaves, 0
    tree_ids = np.arange(n_trees)
    while True:
        cur_first = np.cumsum(ncur) - ncur
        single = ncur == 1
        roots[tree_ids[single]] = cur[cur_first[single]]
        keep = ncur > 1
        if not keep.any():
            break
        sel = _run_rows(cur_first[keep], ncur[keep])
        cur, ncur, tree_ids = cur[sel], ncur[keep], tree_ids[keep]
        k, lo, length = _even_split(ncur, INTERNAL_MAX_ENTRIES)
        n_start = np.repeat(np.cumsum(ncur) - ncur, k) + lo
        rep, unique = identical_runs(n_start, length, [cur])
        u_of = np.full(n_start.size, -1, np.int64)
        u_of[unique] = np.arange(unique.size)
        node_ids = next_id + u_of[rep]
        kids = cur[_run_rows(n_start[unique], length[unique])]
        inner_start.append(child_base + np.cumsum(length[unique]) - length[unique])
        inner_count.append(length[unique])
        children.append(kids)
        levels.append((next_id, next_id + unique.size))
        next_id += unique.size
        child_base += kids.size
        cur, ncur = node_ids, k
    all_children = np.concatenate(children) if children else np.zeros(0, np.int64)
    refs = np.bincount(all_children, minlength=next_id).astype(np.int64)
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return SharedForest(leaf_start.astype(np.int64), leaf_count.astype(np.int64), cat(inner_start),
                        cat(inner_count), all_children, levels, roots, refs)


def pack_shared_forest(image: np.ndarray, forest: SharedForest, first_block: int, keys: np.ndarray,
                       values: np.ndarray) -> None:
    """Write ``forest``'s nodes into rows ``first_block ..`` of ``image`` (``(n, 4096)`` uint8), leaves
    from ``keys``/``values`` (uint64), as :func:`~thinpool.interop.btree.pack_forest` lays out a node.
    Checksums are not computed here."""
    u32 = image.view(np.uint32)
    u64 = image.view(np.uint64)
    first_key = np.zeros(forest.nr_nodes, np.uint64)
    # leaves
    nl = forest.n_leaves
    rows = first_block + np.arange(nl)
    _headers(u32, u64, rows, forest.leaf_count, LEAF_NODE, LEAF_MAX)
    cnt = forest.leaf_count
    pos = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    item = np.repeat(forest.leaf_start, cnt) + pos
    r = np.repeat(rows, cnt)
    u64[r, 4 + pos] = keys[item]
    u64[r, 4 + LEAF_MAX + pos] = values[item]
    nonempty = cnt > 0
    first_key[:nl][nonempty] = keys[forest.leaf_start[nonempty]]
    # internal nodes, level by level so that every child's first key is known
    for lo, hi in forest.levels:
        i = np.arange(lo, hi) - nl
        rows = first_block + np.arange(lo, hi)
        cnt = forest.inner_count[i]
        _headers(u32, u64, rows, cnt, INTERNAL_NODE, INTERNAL_MAX_ENTRIES)
        pos = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        kids = forest.children[np.repeat(forest.inner_start[i], cnt) + pos]
        r = np.repeat(rows, cnt)
        u64[r, 4 + pos] = first_key[kids]
        u64[r, 4 + INTERNAL_MAX_ENTRIES + pos] = (first_block + kids).astype(np.uint64)
        first_key[lo:hi] = first_key[forest.children[forest.inner_start[i]]]


def _headers(u32: np.ndarray, u64: np.ndarray, rows: np.ndarray, count: np.ndarray, flags: int, cap: int) -> None:
    u32[rows, 1] = flags
    u64[rows, 1] = rows
    u32[rows, 4] = count
    u32[rows, 5] = cap
    u32[rows, 6] = 8
    assert NODE_HEADER_SIZE == 32  # keys start at u64 word 4
