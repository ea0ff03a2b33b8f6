"""dm-thin persistent-data blocks and B-trees: checksums, bottom-up bulk building, and walking.

Every metadata block is 4096 bytes and starts with ``csum u32 @0`` and (for every type this
module handles) ``blocknr u64 @8``.  The checksum is CRC-32C over bytes 4..4095 with the kernel's
"no final inversion" convention, XORed with a per-type constant:
``stored = standard_crc32c(block[4:]) ^ 0xFFFFFFFF ^ XOR`` (docs/dm-thin.md §12).

B-tree node (docs/dm-thin.md §12.2)::

    0   csum u32 (XOR 121107)        16  nr_entries u32
    4   flags u32 (1 internal, 2 leaf)   20  max_entries u32
    8   blocknr u64                  24  value_size u32, 28 padding
    32  keys    u64[max_entries]
    32 + 8*max_entries   values  value_size bytes each

``max_entries = 3 * ((4064 // (8 + value_size)) // 3)``: 336 / 252 / 168 / 126 for value sizes
4 / 8 / 16 / 24.  Internal nodes always have value size 8 (the child's block number) and
``key[i]`` is the lower bound of child ``i``'s keys.

Building (:func:`plan_forest`, :func:`pack_forest`) works on a *forest*: many trees with the same
value size packed in one vectorised pass (e.g. one mapping tree per thin device).  Each level
spreads its items evenly over ``ceil(n / max_entries)`` nodes, so every non-root node is at least
half full (thin_check demands a third).  Walking (:func:`walk_forest`) is the inverse, also level by
level over the whole forest, and validates every node it reads; failures raise
:class:`~thinpool.errors.MetadataCorrupt` naming the tree and the block.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import crc32c
import numpy as np

from thinpool.errors import MetadataCorrupt

BLOCK_SIZE = 4096
NODE_HEADER_SIZE = 32
INTERNAL_NODE = 1
LEAF_NODE = 2

SUPERBLOCK_CSUM_XOR = 160774
BTREE_CSUM_XOR = 121107
BITMAP_CSUM_XOR = 240779
INDEX_CSUM_XOR = 160478

#: deeper than any valid tree can be (≥ 84 entries per node); guards against cycles
MAX_TREE_DEPTH = 16
_NO_LIMIT = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def max_entries(value_size: int) -> int:
    """Entries per node for ``value_size``-byte values (always a multiple of 3)."""
    return 3 * (((BLOCK_SIZE - NODE_HEADER_SIZE) // (8 + value_size)) // 3)


INTERNAL_MAX_ENTRIES = max_entries(8)


def corrupt(structure: str, block: int | None, problem: str) -> MetadataCorrupt:
    """A :class:`MetadataCorrupt` whose message names ``structure`` and ``block``."""
    where = f" (block {block})" if block is not None else ""
    return MetadataCorrupt(f"{structure}: {problem}{where}", structure=structure, block=block)


# ---------------------------------------------------------------------------------------------
# Checksums


def block_checksums(blocks: np.ndarray, xor: int | np.ndarray) -> np.ndarray:
    """dm-thin checksums of each row of ``blocks`` (an ``(n, 4096)`` uint8 array)."""
    blocks = np.ascontiguousarray(blocks)
    n = blocks.shape[0]
    flat = blocks.reshape(-1).data
    crc = crc32c.crc32c
    raw = np.fromiter((crc(flat[o + 4 : o + BLOCK_SIZE]) for o in range(0, n * BLOCK_SIZE, BLOCK_SIZE)), np.uint32, n)
    return raw ^ np.uint32(0xFFFFFFFF) ^ np.asarray(xor, dtype=np.uint32)


def seal_blocks(image: np.ndarray, xor: np.ndarray) -> None:
    """Store the checksum of every row of ``image`` (``(n, 4096)`` uint8, in place); ``xor`` per row."""
    image.view(np.uint32)[:, 0] = block_checksums(image, xor)


# ---------------------------------------------------------------------------------------------
# Block source (reading)


class BlockSource:
    """Read-only, checksum-verifying access to the blocks of a metadata file or device.

    The file is memory-mapped; :meth:`read` copies the requested blocks out and verifies their
    checksum and stored block number once per block.  ``expanded`` records which tree nodes have
    already been walked, so reference counting counts each node's children once however many
    parents share it.
    """

    def __init__(self, path: str | os.PathLike[str], limit: int | None = None) -> None:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
        self.path = os.fspath(path)
        self.nr_blocks = size // BLOCK_SIZE
        if self.nr_blocks == 0:
            raise corrupt("superblock", 0, f"metadata file is too small ({size} bytes)")
        self._map: np.memmap | None = np.memmap(self.path, dtype=np.uint8, mode="r",
                                                shape=(self.nr_blocks, BLOCK_SIZE))  # None once closed
        self.limit = self.nr_blocks if limit is None else min(limit, self.nr_blocks)
        self.verified = np.zeros(self.nr_blocks, dtype=bool)
        self.expanded = np.zeros(self.nr_blocks, dtype=bool)

    def close(self) -> None:
        """Release the memory map."""
        mm = getattr(self._map, "_mmap", None)
        self._map = None
        if mm is not None:
            mm.close()

    def read(self, blocks: np.ndarray, xor: int, name_of: Callable[[int], str], what: str = "") -> np.ndarray:
        """Copy out ``blocks`` (int array), verifying range, checksum and stored block number.

        ``name_of(i)`` names the structure that referenced ``blocks[i]`` (for error messages);
        ``what`` is a short description of the block type.
        """
        given = np.asarray(blocks)
        if given.dtype.kind == "u":  # a block number of 2^63 or more must not wrap to a negative int64
            out_of_range = np.flatnonzero(given >= np.uint64(self.limit))
        else:
            out_of_range = np.flatnonzero((given < 0) | (given >= self.limit))
        if out_of_range.size:
            i = int(out_of_range[0])
            raise corrupt(name_of(i), int(given[i]) & 0xFFFFFFFFFFFFFFFF,  # as stored: unsigned 64-bit
                          f"{what or 'block'} lies beyond the end of the metadata ({self.limit} blocks)")
        blocks = given.astype(np.int64)
        assert self._map is not None, f"{self.path}: read after close"
        data = np.array(self._map[blocks])
        stored_nr = data.view(np.uint64)[:, 1]
        bad = np.flatnonzero(stored_nr != blocks.astype(np.uint64))
        if bad.size:
            i = int(bad[0])
            raise corrupt(name_of(i), int(blocks[i]),
                          f"bad block number in {what or 'block'}: stored {int(stored_nr[i])}")
        todo = np.flatnonzero(~self.verified[blocks])
        if todo.size:
            sums = block_checksums(data[todo], xor)
            bad = np.flatnonzero(sums != data.view(np.uint32)[todo, 0])
            if bad.size:
                i = int(todo[bad[0]])
                raise corrupt(name_of(i), int(blocks[i]),
                              f"bad checksum in {what or 'block'}: wanted {int(sums[bad[0]])}, "
                              f"found {int(data.view(np.uint32)[i, 0])}")
            self.verified[blocks[todo]] = True
        return data


# ---------------------------------------------------------------------------------------------
# Bulk building


@dataclass
class _Level:
    first: int  # global index of this level's first node
    item_start: np.ndarray  # per node: first item (entries for leaves, previous-level nodes above)
    item_count: np.ndarray


@dataclass
class Forest:
    """The shape of a bulk-built forest: which items go in which node, level by level.

    Nodes are numbered globally, leaves first (all trees), then each internal level; node ``g``
    is written to block ``first_block + g`` by :func:`pack_forest`.
    """

    value_size: int
    levels: list[_Level]
    roots: np.ndarray  # global node index of each tree's root

    @property
    def nr_nodes(self) -> int:
        if not self.levels:  # a forest of no trees
            return 0
        last = self.levels[-1]
        return last.first + len(last.item_start)


def plan_forest(counts: np.ndarray | list[int], value_size: int) -> Forest:
    """Plan a forest of bulk-built trees holding ``counts[t]`` entries each.

    Each level of each tree has ``ceil(n / max_entries)`` nodes of near-equal size (node ``j`` of
    ``k`` gets items ``[j*n//k, (j+1)*n//k)``); an empty tree is a single empty leaf.
    """
    cnt = np.asarray(counts, dtype=np.int64)
    trees = np.arange(len(cnt))
    item_base = np.cumsum(cnt) - cnt
    cap = max_entries(value_size)
    roots = np.full(len(cnt), -1, dtype=np.int64)
    levels: list[_Level] = []
    first = 0
    while trees.size:
        k = np.maximum(1, -(-cnt // cap))
        node_base = np.cumsum(k) - k  # level-local index of each tree's first node
        j = np.arange(int(k.sum())) - np.repeat(node_base, k)
        c, kk, base = np.repeat(cnt, k), np.repeat(k, k), np.repeat(item_base, k)
        start = base + (j * c) // kk
        end = base + ((j + 1) * c) // kk
        levels.append(_Level(first, start, end - start))
        done = k == 1
        roots[trees[done]] = first + node_base[done]
        first += int(k.sum())
        keep = ~done
        trees, cnt, item_base = trees[keep], k[keep], node_base[keep]
        cap = INTERNAL_MAX_ENTRIES
    return Forest(value_size, levels, roots)


def pack_forest(image: np.ndarray, forest: Forest, first_block: int, keys: np.ndarray, values: np.ndarray,
                image_first: int = 0) -> None:
    """Write ``forest``'s nodes, blocks ``first_block..``, into rows ``first_block - image_first..`` of
    ``image`` (``(n, 4096)`` uint8 holding the blocks from ``image_first`` on).

    ``keys`` (uint64) and ``values`` hold the leaf entries of all trees, tree after tree, each
    tree's keys strictly increasing.  ``values`` is a uint64 vector for value size 8, else an
    ``(n, value_size // 4)`` uint32 array.  Checksums are not computed here (see :func:`seal_blocks`).
    """
    u32 = image.view(np.uint32)
    u64 = image.view(np.uint64)
    prev_first_keys = np.zeros(0, np.uint64)
    prev_first = 0
    for depth, level in enumerate(forest.levels):
        leaf = depth == 0
        vsize = forest.value_size if leaf else 8
        cap = max_entries(vsize)
        n_nodes = len(level.item_start)
        blocks = first_block + level.first + np.arange(n_nodes)
        rows = blocks - image_first
        u32[rows, 1] = LEAF_NODE if leaf else INTERNAL_NODE
        u64[rows, 1] = blocks
        u32[rows, 4] = level.item_count
        u32[rows, 5] = cap
        u32[rows, 6] = vsize
        count = level.item_count
        node_entry0 = np.cumsum(count) - count
        total = int(count.sum())
        pos = np.arange(total) - np.repeat(node_entry0, count)
        item = np.repeat(level.item_start, count) + pos
        r = np.repeat(rows, count)
        if leaf:
            k, v = keys[item], values[item]
        else:
            k = prev_first_keys[item]
            v = (first_block + prev_first + item).astype(np.uint64)
        u64[r, 4 + pos] = k
        if vsize == 8:
            u64[r, 4 + cap + pos] = v
        else:
            words = vsize // 4
            base = (NODE_HEADER_SIZE + 8 * cap) // 4
            u32[r[:, None], base + pos[:, None] * words + np.arange(words)] = v
        first_keys = np.zeros(n_nodes, np.uint64)
        nonempty = count > 0
        first_keys[nonempty] = k[node_entry0[nonempty]]
        prev_first_keys, prev_first = first_keys, level.first


# ---------------------------------------------------------------------------------------------
# Walking


@dataclass
class ForestContents:
    """Leaf entries of a walked forest, grouped by tree (in root order) and sorted by key.

    ``values`` is ``(n, value_size)`` uint8.  ``leaf_blocks`` is the leaf each entry came from;
    ``fresh`` marks entries of leaves walked for the first time (for counting data references
    once per distinct leaf).  ``child_refs`` lists the children of every internal node expanded
    for the first time (one metadata reference each).
    """

    counts: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    leaf_blocks: np.ndarray
    fresh: np.ndarray
    child_refs: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        """``offsets[t]:offsets[t+1]`` are tree ``t``'s entries."""
        return np.concatenate(([0], np.cumsum(self.counts)))


def _entries(nr: np.ndarray, width: int) -> np.ndarray:
    """Mask selecting the first ``nr[i]`` slots of each of ``len(nr)`` rows of ``width`` slots."""
    return np.arange(width) < nr[:, None]


def _check_headers(nodes: np.ndarray, blocks: np.ndarray, leaf_vsize: int, name_of: Callable[[int], str]) -> None:
    h32 = nodes.view(np.uint32)
    flags, nr, cap, vsize = h32[:, 1], h32[:, 4], h32[:, 5], h32[:, 6]
    leaf = flags == LEAF_NODE
    checks = (
        (~(leaf | (flags == INTERNAL_NODE)), lambda i: f"bad node flags {int(flags[i])}"),
        (vsize != np.where(leaf, leaf_vsize, 8),
         lambda i: f"value size mismatch: expected {leaf_vsize if leaf[i] else 8}, got {int(vsize[i])}"),
        (cap != np.where(leaf, max_entries(leaf_vsize), INTERNAL_MAX_ENTRIES),
         lambda i: f"bad max_entries {int(cap[i])} for value size {int(vsize[i])}"),
        (nr > cap, lambda i: f"nr_entries {int(nr[i])} exceeds max_entries {int(cap[i])}"),
    )
    for bad, message in checks:
        hit = np.flatnonzero(bad)
        if hit.size:
            i = int(hit[0])
            raise corrupt(name_of(i), int(blocks[i]), f"btree node: {message(i)}")


def walk_forest(src: BlockSource, roots: np.ndarray, leaf_vsize: int, name_of: Callable[[int], str]) -> ForestContents:
    """Walk the trees rooted at ``roots`` level by level and return their leaf entries.

    Validates every node: checksum, block number, flags, value size (``leaf_vsize`` for leaves,
    8 for internal nodes), max_entries, ``nr_entries <= max_entries``, non-root nodes not empty,
    keys strictly increasing within a node and inside the parent's key range, and keys strictly
    increasing across each tree.  ``name_of(t)`` names tree ``t`` for errors.  Shared subtrees are
    read once per level and their entries repeated for every tree that reaches them.
    """
    roots = np.asarray(roots)
    if roots.dtype.kind == "u":
        src.read(roots[roots >= np.uint64(src.limit)][:1], BTREE_CSUM_XOR, lambda i: name_of(0), "btree node")
    roots = roots.astype(np.int64)
    n_trees = len(roots)
    blocks, tree = roots, np.arange(n_trees)
    lo = np.zeros(n_trees, np.uint64)
    hi = np.full(n_trees, _NO_LIMIT)
    bounded = np.zeros(n_trees, bool)
    out: list[tuple[np.ndarray, ...]] = []
    refs: list[np.ndarray] = []
    depth = 0
    while blocks.size:
        if depth > MAX_TREE_DEPTH:
            raise corrupt(name_of(int(tree[0])), int(blocks[0]), "btree deeper than possible (cycle?)")
        ublocks, first_visit, inv = np.unique(blocks, return_index=True, return_inverse=True)
        unique_name = lambda i: name_of(int(tree[first_visit[i]]))  # noqa: E731
        nodes = src.read(ublocks, BTREE_CSUM_XOR, unique_name, "btree node")
        _check_headers(nodes, ublocks, leaf_vsize, unique_name)
        h32, u64 = nodes.view(np.uint32), nodes.view(np.uint64)
        nr = h32[:, 4].astype(np.int64)
        is_leaf = h32[:, 1] == LEAF_NODE
        visit_nr = nr[inv]
        empty = np.flatnonzero((visit_nr == 0) & ((depth > 0) | ~is_leaf[inv]))
        if empty.size:
            v = int(empty[0])
            raise corrupt(name_of(int(tree[v])), int(blocks[v]), "btree node: empty non-root or internal node")
        width = max(max_entries(leaf_vsize), INTERNAL_MAX_ENTRIES)
        keys = u64[:, 4 : 4 + width][_entries(nr, width)]
        node_entry0 = np.cumsum(nr) - nr
        starts = np.zeros(keys.size, bool)
        starts[node_entry0[nr > 0]] = True
        disorder = np.flatnonzero((keys[1:] <= keys[:-1]) & ~starts[1:])
        if disorder.size:
            e = int(disorder[0]) + 1
            u = int(np.searchsorted(node_entry0, e, side="right") - 1)
            raise corrupt(unique_name(u), int(ublocks[u]),
                          f"keys are out of order, {int(keys[e])} <= {int(keys[e - 1])}")
        nonempty = visit_nr > 0
        first_key = keys[node_entry0[inv][nonempty]]
        last_key = keys[(node_entry0 + nr - 1)[inv][nonempty]]
        bad = (first_key < lo[nonempty]) | (bounded[nonempty] & (last_key >= hi[nonempty]))
        if bad.any():
            v = int(np.flatnonzero(nonempty)[np.flatnonzero(bad)[0]])
            raise corrupt(name_of(int(tree[v])), int(blocks[v]),
                          f"keys outside the parent's range [{int(lo[v])}, {'' if not bounded[v] else int(hi[v])})")
        fresh_unique = ~src.expanded[ublocks]
        src.expanded[ublocks] = True
        fresh_visit = fresh_unique[inv] & (np.arange(blocks.size) == first_visit[inv])
        leaf_visits = np.flatnonzero(is_leaf[inv])
        if leaf_visits.size:
            out.append(_gather_leaves(nodes, is_leaf, inv, leaf_visits, nr, node_entry0, keys, leaf_vsize,
                                      blocks, tree, fresh_visit))
        int_visits = np.flatnonzero(~is_leaf[inv])
        if not int_visits.size:
            break
        children, child_keys, owner = _gather_children(u64, is_leaf, inv, int_visits, nr, node_entry0, keys)
        fresh_int = np.flatnonzero(~is_leaf & fresh_unique)
        if fresh_int.size:
            refs.append(u64[fresh_int, 4 + INTERNAL_MAX_ENTRIES : 4 + 2 * INTERNAL_MAX_ENTRIES]
                        [_entries(nr[fresh_int], INTERNAL_MAX_ENTRIES)].astype(np.int64))
        # child i of a node covers [key[i], key[i+1]); the last child inherits the node's bound
        last_child = np.ones(children.size, bool)
        last_child[:-1] = owner[1:] != owner[:-1]
        next_key = np.zeros(children.size, np.uint64)
        next_key[:-1] = child_keys[1:]
        lo, hi = child_keys, np.where(last_child, hi[owner], next_key)
        bounded = np.where(last_child, bounded[owner], True)
        blocks, tree = children.astype(np.int64), tree[owner]
        depth += 1
    return _assemble(out, refs, n_trees, leaf_vsize, name_of)


def _gather_leaves(nodes: np.ndarray, is_leaf: np.ndarray, inv: np.ndarray, visits: np.ndarray, nr: np.ndarray,
                   node_entry0: np.ndarray, keys: np.ndarray, vsize: int, blocks: np.ndarray, tree: np.ndarray,
                   fresh_visit: np.ndarray) -> tuple[np.ndarray, ...]:
    """Entries of the leaf visits ``visits``: (tree, keys, values, leaf block, fresh) arrays."""
    cap = max_entries(vsize)
    leaf_u = np.flatnonzero(is_leaf)
    lpos = np.full(len(is_leaf), -1)
    lpos[leaf_u] = np.arange(leaf_u.size)
    region = nodes[leaf_u, NODE_HEADER_SIZE + 8 * cap : NODE_HEADER_SIZE + (8 + vsize) * cap]
    vals = region.reshape(leaf_u.size, cap, vsize)[_entries(nr[leaf_u], cap)]
    lnr = nr[leaf_u]
    lentry0 = np.cumsum(lnr) - lnr
    u = inv[visits]
    cnt = nr[u]
    pos = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    return (np.repeat(tree[visits], cnt), keys[np.repeat(node_entry0[u], cnt) + pos],
            vals[np.repeat(lentry0[lpos[u]], cnt) + pos], np.repeat(blocks[visits], cnt),
            np.repeat(fresh_visit[visits], cnt))


def _gather_children(u64: np.ndarray, is_leaf: np.ndarray, inv: np.ndarray, visits: np.ndarray, nr: np.ndarray,
                     node_entry0: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Children of the internal-node visits ``visits``: (child blocks, their keys, owning visit)."""
    int_u = np.flatnonzero(~is_leaf)
    ipos = np.full(len(is_leaf), -1)
    ipos[int_u] = np.arange(int_u.size)
    inr = nr[int_u]
    vals = u64[int_u, 4 + INTERNAL_MAX_ENTRIES : 4 + 2 * INTERNAL_MAX_ENTRIES][_entries(inr, INTERNAL_MAX_ENTRIES)]
    ientry0 = np.cumsum(inr) - inr
    u = inv[visits]
    cnt = nr[u]
    pos = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    k_index = np.repeat(node_entry0[u], cnt) + pos
    children = vals[np.repeat(ientry0[ipos[u]], cnt) + pos]
    return children, keys[k_index], np.repeat(visits, cnt)


def _assemble(out: list[tuple[np.ndarray, ...]], refs: list[np.ndarray], n_trees: int, vsize: int,
              name_of: Callable[[int], str]) -> ForestContents:
    """Concatenate the per-level leaf entries, group them by tree and check cross-leaf key order."""
    if out:
        tree, keys, vals, leaf_blocks, fresh = (np.concatenate(parts) for parts in zip(*out))
    else:
        tree, keys, leaf_blocks = np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int64)
        vals, fresh = np.zeros((0, vsize), np.uint8), np.zeros(0, bool)
    if len(out) > 1:  # leaves of different trees came out at different depths
        order = np.argsort(tree, kind="stable")
        tree, keys, vals, leaf_blocks, fresh = tree[order], keys[order], vals[order], leaf_blocks[order], fresh[order]
    same_tree = tree[1:] == tree[:-1]
    disorder = np.flatnonzero(same_tree & (keys[1:] <= keys[:-1]))
    if disorder.size:
        e = int(disorder[0]) + 1
        raise corrupt(name_of(int(tree[e])), int(leaf_blocks[e]),
                      f"keys are out of order across leaves, {int(keys[e])} <= {int(keys[e - 1])}")
    counts = np.bincount(tree, minlength=n_trees) if tree.size else np.zeros(n_trees, np.int64)
    child_refs = np.concatenate(refs) if refs else np.zeros(0, np.int64)
    return ForestContents(counts, keys, vals, leaf_blocks, fresh, child_refs)
