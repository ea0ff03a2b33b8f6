"""The block map: every thin device's mappings as a forest of shared radix-tree nodes.

Nodes live in two growable arrays (leaves of 512 mappings, inner nodes of 1024 children), each
node one 4 KiB metadata page.  A device is just a root slot; a snapshot is the same root with
one more reference.  The kernels in :mod:`thinpool.kernels_map` and :mod:`thinpool.kernels` do all
per-block work; this class owns the arrays, grows them, and tracks which pages a commit must write.
"""

from __future__ import annotations

import numpy as np

from . import schema as K

_GROW_MIN = 1024  # slots; capacities stay multiples of 1024 so rc arrays fill whole pages


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def extents_of_flags(flags: np.ndarray, base: int, block_size: int, start: int, end: int
                     ) -> list[tuple[int, int, bool]]:
    """Runs of equal per-block ``flags`` (block i begins at byte ``base + i * block_size``) as
    ``(offset, length, flag)`` extents clipped to ``[start, end)``: what NBD BLOCK_STATUS and a sparse
    export need from :func:`thinpool.walks.mapped_flags`."""
    cuts = np.flatnonzero(np.diff(flags)) + 1
    firsts = np.concatenate(([0], cuts)).tolist()
    lasts = np.concatenate((cuts, [len(flags)])).tolist()
    out = []
    for s, e in zip(firsts, lasts):
        a = max(start, base + s * block_size)
        b = min(end, base + e * block_size)
        out.append((a, b - a, bool(flags[s])))
    return out


class BlockMap:
    """Leaves, inner nodes, their reference counts, free-slot stacks and dirty flags."""

    def __init__(self, st: np.ndarray) -> None:
        self.st = st
        self.leaves = np.zeros((0, K.LEAF_ENTRIES), np.uint64)
        self.inners = np.zeros((0, K.INNER_ENTRIES), np.int32)
        self.leaf_rc = np.zeros(0, np.uint32)
        self.inner_rc = np.zeros(0, np.uint32)
        self.leaf_dirty = np.zeros(0, np.uint8)
        self.inner_dirty = np.zeros(0, np.uint8)
        self.leaf_rc_dirty = np.zeros(0, np.uint8)
        self.inner_rc_dirty = np.zeros(0, np.uint8)
        self.leaf_free = np.zeros(0, np.int32)
        self.inner_free = np.zeros(0, np.int32)

    @property
    def nodes(self) -> tuple:
        """The ``nodes`` tuple every kernel takes: (leaves, inners, leaf_rc, inner_rc, leaf_dirty,
        inner_dirty, leaf_rc_dirty, inner_rc_dirty, leaf_free, inner_free)."""
        return (self.leaves, self.inners, self.leaf_rc, self.inner_rc, self.leaf_dirty, self.inner_dirty,
                self.leaf_rc_dirty, self.inner_rc_dirty, self.leaf_free, self.inner_free)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_arrays(cls, st: np.ndarray, leaves: np.ndarray, inners: np.ndarray,
                    leaf_rc: np.ndarray, inner_rc: np.ndarray) -> "BlockMap":
        bm = cls(st)
        bm.leaves = leaves.reshape(-1, K.LEAF_ENTRIES)
        bm.inners = inners.reshape(-1, K.INNER_ENTRIES)
        nl, ni = len(bm.leaves), len(bm.inners)
        bm.leaf_rc = leaf_rc[:nl].copy()
        bm.inner_rc = inner_rc[:ni].copy()
        bm.leaf_dirty = np.zeros(nl, np.uint8)
        bm.inner_dirty = np.zeros(ni, np.uint8)
        bm.leaf_rc_dirty = np.zeros(nl >> K.RC_PAGE_BITS, np.uint8)
        bm.inner_rc_dirty = np.zeros(ni >> K.RC_PAGE_BITS, np.uint8)
        bm._rebuild_free()
        return bm

    def _rebuild_free(self) -> None:
        lf = np.flatnonzero(self.leaf_rc == 0)[::-1].astype(np.int32)
        inf = np.flatnonzero(self.inner_rc == 0)[::-1].astype(np.int32)
        self.leaf_free = np.zeros(len(self.leaf_rc), np.int32)
        self.leaf_free[: len(lf)] = lf
        self.inner_free = np.zeros(len(self.inner_rc), np.int32)
        self.inner_free[: len(inf)] = inf
        self.st[K.ST_LEAF_FREE] = len(lf)
        self.st[K.ST_INNER_FREE] = len(inf)
        self.st[K.ST_LEAVES_LIVE] = len(self.leaf_rc) - len(lf)
        self.st[K.ST_INNERS_LIVE] = len(self.inner_rc) - len(inf)

    # ------------------------------------------------------------------ growth
    def ensure(self, inners: int, leaves: int) -> None:
        """Grow so that at least ``inners`` inner and ``leaves`` leaf slots are free."""
        if self.st[K.ST_INNER_FREE] < inners:
            self._grow_inners(_round_up(max(len(self.inner_rc), inners, _GROW_MIN), _GROW_MIN))
        if self.st[K.ST_LEAF_FREE] < leaves:
            self._grow_leaves(_round_up(max(len(self.leaf_rc), leaves, _GROW_MIN), _GROW_MIN))

    @staticmethod
    def _extend(arr: np.ndarray, extra: int, fill: int = 0) -> np.ndarray:
        out = np.empty((len(arr) + extra,) + arr.shape[1:], arr.dtype)
        out[: len(arr)] = arr
        out[len(arr):] = fill
        return out

    def _grow_leaves(self, extra: int) -> None:
        self.st[K.ST_EPOCH] += 1
        old = len(self.leaf_rc)
        self.leaves = self._extend(self.leaves, extra, K.UNMAPPED)
        self.leaf_rc = self._extend(self.leaf_rc, extra)
        self.leaf_dirty = self._extend(self.leaf_dirty, extra)
        self.leaf_rc_dirty = self._extend(self.leaf_rc_dirty, extra >> K.RC_PAGE_BITS, 1)
        self.leaf_free = self._push(self.leaf_free, K.ST_LEAF_FREE, old, extra)

    def _grow_inners(self, extra: int) -> None:
        self.st[K.ST_EPOCH] += 1
        old = len(self.inner_rc)
        self.inners = self._extend(self.inners, extra, K.NONE)
        self.inner_rc = self._extend(self.inner_rc, extra)
        self.inner_dirty = self._extend(self.inner_dirty, extra)
        self.inner_rc_dirty = self._extend(self.inner_rc_dirty, extra >> K.RC_PAGE_BITS, 1)
        self.inner_free = self._push(self.inner_free, K.ST_INNER_FREE, old, extra)

    def _push(self, stack: np.ndarray, idx: int, old: int, extra: int) -> np.ndarray:
        n = int(self.st[idx])
        out = np.zeros(old + extra, np.int32)
        out[:n] = stack[:n]
        out[n:n + extra] = np.arange(old + extra - 1, old - 1, -1, dtype=np.int32)
        self.st[idx] = n + extra
        return out

    # ------------------------------------------------------------------ devices
    def new_root(self) -> int:
        """An empty device root (one reference)."""
        self.ensure(1, 0)
        n = int(self.st[K.ST_INNER_FREE]) - 1
        slot = int(self.inner_free[n])
        self.st[K.ST_INNER_FREE] = n
        self.inners[slot] = K.NONE
        self.inner_rc[slot] = 1
        self.inner_dirty[slot] = 1
        self.inner_rc_dirty[slot >> K.RC_PAGE_BITS] = 1
        self.st[K.ST_INNERS_LIVE] += 1
        return slot

    def share_root(self, root: int) -> None:
        """One more device references ``root`` (a snapshot): O(1), nothing else is touched."""
        self.inner_rc[root] += 1
        self.inner_rc_dirty[root >> K.RC_PAGE_BITS] = 1

    # ------------------------------------------------------------------ import
    def _pop(self, stack: np.ndarray, idx: int, n: int) -> np.ndarray:
        top = int(self.st[idx])
        slots = stack[top - n:top][::-1].astype(np.int64)
        self.st[idx] = top - n
        return slots

    def add_forest(self, leaves: tuple, mids: tuple, roots: tuple, counts: tuple) -> np.ndarray:
        """Install a whole forest of new nodes at once (import: :mod:`thinpool.pool_ir`); returns the
        roots' slots.

        ``leaves`` is ``(n, node, index, value)``: ``n`` new leaves, and every mapping ``value`` at
        ``index`` of leaf ``node`` (0 .. n-1); ``mids`` and ``roots`` the same for the inner levels, whose
        values are child nodes of the level below (numbered like ``node``).  ``counts`` are the
        reference counts of the leaves, mids and roots (a node shared by two parents counts 2, a root
        one per device).  Vectorised: no per-mapping or per-node Python loop.
        """
        (nl, l_node, l_pos, l_val), (nm, m_node, m_pos, m_child), (nr, r_node, r_pos, r_child) = leaves, mids, roots
        self.ensure(nm + nr, nl)
        leaf_slots = self._pop(self.leaf_free, K.ST_LEAF_FREE, nl)
        inner_slots = self._pop(self.inner_free, K.ST_INNER_FREE, nm + nr)
        mid_slots, root_slots = inner_slots[:nm], inner_slots[nm:]
        self.leaves[leaf_slots] = K.UNMAPPED
        self.leaves[leaf_slots[l_node], l_pos] = l_val
        self.inners[inner_slots] = K.NONE
        self.inners[mid_slots[m_node], m_pos] = leaf_slots[m_child]
        self.inners[root_slots[r_node], r_pos] = mid_slots[r_child]
        self.leaf_rc[leaf_slots] = counts[0]
        self.inner_rc[mid_slots] = counts[1]
        self.inner_rc[root_slots] = counts[2]
        self.leaf_dirty[leaf_slots] = 1
        self.inner_dirty[inner_slots] = 1
        self.leaf_rc_dirty[np.unique(leaf_slots >> K.RC_PAGE_BITS)] = 1
        self.inner_rc_dirty[np.unique(inner_slots >> K.RC_PAGE_BITS)] = 1
        self.st[K.ST_LEAVES_LIVE] += nl
        self.st[K.ST_INNERS_LIVE] += nm + nr
        return root_slots
