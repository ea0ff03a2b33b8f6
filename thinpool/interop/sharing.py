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
passes are numpy's, and they read the mappings a window at a time (:data:`WINDOW` mappings, from the
trees' own arrays through :class:`TreeEntries`, never concatenated): what is kept for all the trees is
per leaf and per node, so a forest of 100 million mappings is planned in a few hundred megabytes.  The
result does not depend on the window: a tree's cuts depend on its own mappings, a leaf's hash is a sum
over its entries, and the leaves are compared pairwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from thinpool.interop.btree import INTERNAL_MAX_ENTRIES, LEAF_NODE, INTERNAL_NODE, NODE_HEADER_SIZE, max_entries
from thinpool.interop.ir import TIME_MASK, first_of_equal_hashes, identical_runs, row_hashes

__all__ = ["SharedForest", "TreeEntries", "run_rows", "build_shared_forest", "build_forest", "pack_leaves", "pack_inner",
           "MIN_ENTRIES", "CHUNK_BITS", "WINDOW"]

#: a mapping leaf's capacity (value size 8)
LEAF_MAX = max_entries(8)
#: the fewest entries thin_check accepts in a non-root node (a third of max_entries)
MIN_ENTRIES = LEAF_MAX // 3
#: chunks of 2^9 = 512 virtual blocks, the pool's own leaf size, are the unit of sharing
CHUNK_BITS = 9
#: mappings read at once by the windowed passes (each costs some tens of bytes a mapping of its window)
WINDOW = 1 << 21


class TreeEntries:
    """The mappings of several trees as one sequence of *entries*, tree after tree, without copying
    them into one array: ``keys[t]`` (virtual blocks, uint64), ``dblocks[t]`` (uint64) and ``times[t]``
    (uint32) are tree ``t``'s, keys strictly increasing; entry ``base[t] + i`` is tree ``t``'s ``i``-th
    mapping, and its value is ``(dblock << 24) | time``."""

    def __init__(self, keys: list[np.ndarray], dblocks: list[np.ndarray], times: list[np.ndarray]) -> None:
        self.keys, self.dblocks, self.times = keys, dblocks, times
        self.counts = np.array([len(k) for k in keys], np.int64)
        self.base = np.concatenate(([0], np.cumsum(self.counts))).astype(np.int64)

    @classmethod
    def from_flat(cls, keys: np.ndarray, values: np.ndarray, tree_counts: np.ndarray) -> TreeEntries:
        """Entries from concatenated keys and values (``(dblock << 24) | time``), ``tree_counts[t]`` each."""
        bounds = np.concatenate(([0], np.cumsum(np.asarray(tree_counts, np.int64))))
        ks = [np.asarray(keys, np.uint64)[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        vs = [np.asarray(values, np.uint64)[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return cls(ks, [v >> np.uint64(24) for v in vs], [(v & np.uint64(TIME_MASK)).astype(np.uint32) for v in vs])

    @property
    def total(self) -> int:
        return int(self.base[-1])

    def span(self, lo: int, hi: int, with_tree: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Entries ``lo .. hi - 1``: (keys, values, dblocks, tree of each entry -- empty unless ``with_tree``);
        views of the trees' arrays when they lie in one tree (values are always computed)."""
        t = int(np.searchsorted(self.base, lo, side="right")) - 1
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, int, int]] = []
        while lo < hi:
            a, b = lo - int(self.base[t]), min(hi, int(self.base[t + 1])) - int(self.base[t])
            if b > a:
                parts.append((self.keys[t][a:b], self.dblocks[t][a:b], self.times[t][a:b], t, b - a))
                lo += b - a
            t += 1
        if len(parts) == 1:
            k, d, tm = parts[0][:3]
        else:
            empty64 = np.zeros(0, np.uint64)
            k = np.concatenate([p[0] for p in parts] or [empty64])
            d = np.concatenate([p[1] for p in parts] or [empty64])
            tm = np.concatenate([p[2] for p in parts] or [np.zeros(0, np.uint32)])
        tree = (np.repeat(np.array([p[3] for p in parts], np.int64), [p[4] for p in parts]) if with_tree
                else np.zeros(0, np.int64))
        return k, (d << np.uint64(24)) | tm.astype(np.uint64), d, tree

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of the entries ``rows`` (any order)."""
        rows = np.asarray(rows, np.int64)
        keys = np.empty(rows.size, np.uint64)
        values = np.empty(rows.size, np.uint64)
        tree = np.searchsorted(self.base, rows, side="right") - 1
        order = np.argsort(tree, kind="stable")
        ts = tree[order]
        cuts = np.flatnonzero(np.diff(ts)) + 1
        for a, b in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [rows.size]))):
            if a == b:
                continue
            t = int(ts[a])
            idx = order[a:b]
            local = rows[idx] - self.base[t]
            keys[idx] = self.keys[t][local]
            values[idx] = (self.dblocks[t][local] << np.uint64(24)) | self.times[t][local].astype(np.uint64)
        return keys, values


@dataclass
class SharedForest:
    """Nodes of mapping trees that share identical subtrees.

    Node ``g`` is written to block ``first_block + g``: leaves are ``0 .. n_leaves - 1`` (entries
    ``leaf_start[g] ..`` of the :class:`TreeEntries` the forest was built from; ``leaf_key[g]`` is the
    first key, 0 for the empty leaf), internal nodes follow, level by level bottom-up (``levels`` lists
    each level's node range); internal node ``n_leaves + i`` points at
    ``children[inner_start[i] : inner_start[i] + inner_count[i]]``.  ``roots[t]`` is tree ``t``'s root,
    ``refs[g]`` the number of references to ``g`` from internal nodes (each distinct parent once).
    """

    leaf_start: np.ndarray
    leaf_count: np.ndarray
    leaf_key: np.ndarray
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

    def leaf_windows(self, window: int | None = None) -> Iterator[tuple[int, int, int, int]]:
        """Leaves ``a .. b - 1`` at a time, whose entries lie in ``lo .. hi - 1`` (at most ``window``
        entries, default :data:`WINDOW`, or one leaf): ``(a, b, lo, hi)``, in order."""
        return _windows(self.leaf_start, self.leaf_count, window or WINDOW)


def _windows(start: np.ndarray, count: np.ndarray, window: int) -> Iterator[tuple[int, int, int, int]]:
    """Consecutive ranges of runs (``start`` ascending, runs not overlapping; an empty run anywhere)
    spanning at most ``window`` rows each, or one run: ``(a, b, lo, hi)``."""
    end = np.maximum.accumulate(np.asarray(start, np.int64) + count) if len(start) else np.zeros(0, np.int64)
    beg = end - count
    a, n = 0, len(start)
    while a < n:
        b = max(a + 1, int(np.searchsorted(end, int(beg[a]) + window, side="right")))
        yield a, b, int(beg[a]), int(end[b - 1])
        a = b


def run_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
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


def _chunks(entries: TreeEntries, lo: int, hi: int, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 512-block chunks of entries ``lo .. hi - 1`` (whole trees), read ``window`` entries at a time:
    (chunk's first entry, chunk index, tree), a new chunk where the chunk index or the tree changes."""
    firsts, idxs, trees = [], [], []
    prev_chunk, prev_tree = np.uint64(0), -1
    for wlo in range(lo, hi, window):
        keys, _, _, tree = entries.span(wlo, min(hi, wlo + window), with_tree=True)
        chunk = keys >> np.uint64(CHUNK_BITS)
        new = np.empty(chunk.size, bool)
        new[0] = chunk[0] != prev_chunk or tree[0] != prev_tree
        new[1:] = (chunk[1:] != chunk[:-1]) | (tree[1:] != tree[:-1])
        at = np.flatnonzero(new)
        firsts.append(wlo + at)
        idxs.append(chunk[at])
        trees.append(tree[at])
        prev_chunk, prev_tree = chunk[-1], int(tree[-1])
    return np.concatenate(firsts), np.concatenate(idxs), np.concatenate(trees)


def _cuts(c_first: np.ndarray, c_count: np.ndarray, c_tree: np.ndarray, c_idx: np.ndarray,
          n_trees: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leaf groups of trees ``0 .. n_trees - 1`` from their chunks (first entry, entry count, tree,
    chunk index; sorted by tree, then index): (group's first entry, entry count, tree)."""
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


def _leaves(entries: TreeEntries, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every tree's leaves, tree after tree: (first entry, entry count, tree).  Trees are taken a batch
    at a time (whole trees of at most ``window`` entries between them, or one tree), and the cuts of a
    tree depend on that tree alone, so the batches change nothing."""
    base, n = entries.base, len(entries.counts)
    parts = []
    t = 0
    while t < n:
        t1 = min(n, max(t + 1, int(np.searchsorted(base, base[t] + window, side="right")) - 1))
        lo, hi = int(base[t]), int(base[t1])
        if hi > lo:
            c_first, c_idx, c_tree = _chunks(entries, lo, hi, window)
            c_count = np.diff(np.append(c_first, hi))
            g_start, g_count, g_tree = _cuts(c_first, c_count, c_tree - t, c_idx, t1 - t)
            # each group split into near-equal leaves: the split depends on the group's keys only, so a
            # copy-on-write that changes values keeps it
            k, off, length = _even_split(g_count, LEAF_MAX)
            parts.append((np.repeat(g_start, k) + off, length, np.repeat(g_tree + t, k)))
        t = t1
    cat = (lambda i: np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, np.int64))
    return cat(0), cat(1), cat(2)


def _identical_leaves(entries: TreeEntries, start: np.ndarray, count: np.ndarray, window: int) -> np.ndarray:
    """:func:`~thinpool.interop.ir.identical_runs`'s ``rep`` for the leaves (runs of entries that tile the
    trees in order), keys and values compared, hashed and checked ``window`` entries at a time."""
    n = len(start)
    run_hash = np.zeros(n, np.uint64)
    for a, b, lo, hi in _windows(start, count, window):
        keys, values, _, _ = entries.span(lo, hi)
        first = start[a:b] - lo
        pos = np.arange(hi - lo, dtype=np.uint64)
        pos -= np.repeat(first.astype(np.uint64), count[a:b])
        run_hash[a:b] = np.add.reduceat(row_hashes(pos, [keys, values]), first)
    rep = first_of_equal_hashes(count, run_hash)
    check = np.flatnonzero(rep != np.arange(n))
    for a, b, lo, _ in _windows(np.cumsum(count[check]) - count[check], count[check], window):
        c = check[a:b]
        cc = count[c]
        cpos = np.arange(int(cc.sum()), dtype=np.int64) - np.repeat(np.cumsum(cc) - cc, cc)
        mk, mv = entries.gather(np.repeat(start[c], cc) + cpos)
        tk, tv = entries.gather(np.repeat(start[rep[c]], cc) + cpos)
        differs = (mk != tk) | (mv != tv)
        if differs.any():  # a collision: those leaves stay their own
            bad = np.unique(np.repeat(np.arange(c.size), cc)[differs])
            rep[c[bad]] = c[bad]
    return rep


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
    """:func:`build_forest` of trees given as concatenated ``keys`` and ``values``
    (``(data block << 24) | time``), ``tree_counts[t]`` each."""
    return build_forest(TreeEntries.from_flat(keys, values, tree_counts))


def build_forest(entries: TreeEntries, window: int | None = None) -> SharedForest:
    """Plan the mapping trees of ``entries`` with identical subtrees shared.

    The mappings are read ``window`` entries (default :data:`WINDOW`) at a time: memory is a few dozen bytes a mapping of a
    window plus some per leaf and per 512-block chunk of the largest tree, never per mapping of them all.
    An empty tree is an empty root leaf (all empty trees share one).
    """
    window = window or WINDOW
    tree_counts = entries.counts
    n_trees = len(tree_counts)
    # 1. leaf groups, each split into near-equal leaves, identical leaves once
    l_start, length, l_tree = _leaves(entries, window)
    l_rep = _identical_leaves(entries, l_start, length, window)
    l_unique = np.flatnonzero(l_rep == np.arange(l_rep.size))
    u_of = np.full(l_start.size, -1, np.int64)
    u_of[l_unique] = np.arange(l_unique.size)
    leaf_start, leaf_count = l_start[l_unique], length[l_unique]
    leaf_key = np.zeros(leaf_start.size, np.uint64)
    for a, b, w_lo, w_hi in _windows(leaf_start, leaf_count, window):
        leaf_key[a:b] = entries.span(w_lo, w_hi)[0][leaf_start[a:b] - w_lo]
    empty = tree_counts == 0
    if empty.any():  # one empty leaf for the empty trees
        leaf_start = np.append(leaf_start, 0)
        leaf_count = np.append(leaf_count, 0)
        leaf_key = np.append(leaf_key, np.uint64(0))
    n_leaves = leaf_start.size
    # each tree's sequence of leaves
    cur = u_of[l_rep]
    ncur = np.bincount(l_tree, minlength=n_trees).astype(np.int64)
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
        sel = run_rows(cur_first[keep], ncur[keep])
        cur, ncur, tree_ids = cur[sel], ncur[keep], tree_ids[keep]
        k, lo, length = _even_split(ncur, INTERNAL_MAX_ENTRIES)
        n_start = np.repeat(np.cumsum(ncur) - ncur, k) + lo
        rep, unique = identical_runs(n_start, length, [cur])
        u_of = np.full(n_start.size, -1, np.int64)
        u_of[unique] = np.arange(unique.size)
        node_ids = next_id + u_of[rep]
        kids = cur[run_rows(n_start[unique], length[unique])]
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
    return SharedForest(leaf_start.astype(np.int64), leaf_count.astype(np.int64), leaf_key, cat(inner_start),
                        cat(inner_count), all_children, levels, roots, refs)


def pack_leaves(forest: SharedForest, a: int, b: int, first_block: int, keys: np.ndarray,
                values: np.ndarray, lo: int) -> np.ndarray:
    """Leaves ``a .. b - 1`` of ``forest`` as blocks (``(b - a, 4096)`` uint8, checksums not computed),
    their entries taken from ``keys``/``values`` (entries ``lo ..``, as :meth:`SharedForest.leaf_windows`
    gives them); leaf ``g`` is block ``first_block + g``, laid out as
    :func:`~thinpool.interop.btree.pack_forest` lays out a node."""
    image = np.zeros((b - a, 4096), np.uint8)
    u32 = image.view(np.uint32)
    u64 = image.view(np.uint64)
    cnt = forest.leaf_count[a:b]
    _headers(u32, u64, np.arange(b - a), first_block + np.arange(a, b), cnt, LEAF_NODE, LEAF_MAX)
    pos = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    item = np.repeat(forest.leaf_start[a:b] - lo, cnt) + pos
    r = np.repeat(np.arange(b - a), cnt)
    u64[r, 4 + pos] = keys[item]
    u64[r, 4 + LEAF_MAX + pos] = values[item]
    return image


def pack_inner(forest: SharedForest, first_block: int) -> np.ndarray:
    """The internal nodes of ``forest`` as blocks (``(nr_nodes - n_leaves, 4096)`` uint8, checksums not
    computed): node ``g`` is block ``first_block + g``."""
    nl = forest.n_leaves
    image = np.zeros((forest.nr_nodes - nl, 4096), np.uint8)
    u32 = image.view(np.uint32)
    u64 = image.view(np.uint64)
    first_key = np.zeros(forest.nr_nodes, np.uint64)
    first_key[:nl] = forest.leaf_key
    # level by level, so that every child's first key is known
    for lo, hi in forest.levels:
        i = np.arange(lo, hi) - nl
        cnt = forest.inner_count[i]
        _headers(u32, u64, i, first_block + np.arange(lo, hi), cnt, INTERNAL_NODE, INTERNAL_MAX_ENTRIES)
        pos = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        kids = forest.children[np.repeat(forest.inner_start[i], cnt) + pos]
        r = np.repeat(i, cnt)
        u64[r, 4 + pos] = first_key[kids]
        u64[r, 4 + INTERNAL_MAX_ENTRIES + pos] = (first_block + kids).astype(np.uint64)
        first_key[lo:hi] = first_key[forest.children[forest.inner_start[i]]]
    return image


def _headers(u32: np.ndarray, u64: np.ndarray, rows: np.ndarray, blocks: np.ndarray, count: np.ndarray, flags: int,
             cap: int) -> None:
    u32[rows, 1] = flags
    u64[rows, 1] = blocks
    u32[rows, 4] = count
    u32[rows, 5] = cap
    u32[rows, 6] = 8
    assert NODE_HEADER_SIZE == 32  # keys start at u64 word 4
