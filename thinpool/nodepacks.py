"""The pack pages of metadata format 5 (see :mod:`thinpool.nodestore`) with numpy: the kinds of node,
the records' sizes, and the numpy planner and encoder of a commit's pack pages -- the reference the
compiled ones (:mod:`thinpool.kernels_pages`) are tested against, and the path of a process that has
not loaded numba (a commit needs only numpy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import schema as K
from .mdpages import BLOCK


@dataclass(frozen=True)
class Kind:
    """One kind of block-map node as stored: its entries, their type, the hole value, the dense
    threshold, its arrays (format 4 and the older one-node-per-page array) and its pages' tag."""

    name: str
    entries: int
    dtype: Any
    hole: int
    dense: int
    dense_array: str
    pack_array: str
    old_array: str
    tag: int

    @functools.cached_property
    def width(self) -> int:
        """Bytes of one entry's value."""
        return np.dtype(self.dtype).itemsize


#: leaves: 512 mappings (uint64; all-ones a hole)
LEAVES = Kind("leaf", K.LEAF_ENTRIES, np.uint64, K.UNMAPPED, 192, "leaf_dense", "leaf_packs", "leaves",
              0x344B504C)  # "LPK4"
#: inner nodes: 1,024 children (int32; -1 none)
INNERS = Kind("inner", K.INNER_ENTRIES, np.int32, K.NONE, 340, "inner_dense", "inner_packs", "inners",
              0x344B5049)  # "IPK4"
#: a leaf with more live mappings than this keeps its own page
DENSE = LEAVES.dense
#: the count of a dense node's record (its entries are on its own page)
MARK = 0xFFFF
DENSE_ARRAY, PACK_ARRAY = LEAVES.dense_array, LEAVES.pack_array
_HEAD = 8           # record count, entry count, tag
_REC = 6            # slot (uint32) + count (uint16)
_CAP = BLOCK - _HEAD
_CHUNK = 4096       # node slots handled per numpy step (16 MB of nodes)


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for every start and length (vectorised)."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    firsts = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.int64) - firsts, lengths) + np.arange(total, dtype=np.int64)


def _record_bytes(stored: np.ndarray, kind: Kind) -> np.ndarray:
    """Bytes of the records whose stored counts are ``stored`` (MARK: no entries)."""
    n = stored.astype(np.int64)
    return _REC + (kind.width + 2) * np.where(n == MARK, 0, n)


def _runs(keys: np.ndarray, changed: np.ndarray) -> list[list[int]]:
    """Runs of consecutive pack pages (indices in slot order) holding the changed slots."""
    k = len(keys)
    if len(changed) == 0:
        return []
    if k == 0:
        return [[0, -1]]
    pages = np.unique(np.maximum(np.searchsorted(keys, changed, "right") - 1, 0))
    breaks = np.flatnonzero(np.diff(pages) > 1) + 1
    return [[int(r[0]), int(r[-1])] for r in np.split(pages, breaks)]


def repack(kind: Kind, keys: np.ndarray, pos: np.ndarray, npages: int, nodes: np.ndarray, stored: np.ndarray,
           changed: np.ndarray) -> tuple[dict[int, Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Re-pack the stored pages (lowest slots ``keys``, places ``pos``, in slot order; ``npages`` in the
    pack array) holding the ``changed`` slots, ``stored`` being the new counts: (the new pages by
    place, which stored pages they replace (a mask), the new pages' keys, places and bytes, the places
    released)."""
    n, k = len(stored), len(keys)
    runs = _runs(keys, changed)
    # a run left under half a page takes in a neighbour (adjacent runs merge)
    merged: list[list[int]] = []
    for a, b in runs:
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out_runs: list[tuple[int, int, np.ndarray]] = []
    i = 0
    while i < len(merged):
        a, b = merged[i]
        while True:
            lo = 0 if a <= 0 else int(keys[a])
            hi = n if b + 1 >= k else int(keys[b + 1])
            recs = np.flatnonzero(stored[lo:hi] != -1) + lo
            size = int(_record_bytes(stored[recs], kind).sum())
            if size >= _CAP // 2 or b - a + 1 >= k:
                break
            if b + 1 < k:
                b += 1
                if i + 1 < len(merged) and merged[i + 1][0] <= b + 1:  # reached the next run
                    b = max(b, merged.pop(i + 1)[1])
            elif a > 0:
                a -= 1
                if out_runs and out_runs[-1][1] >= a - 1:  # reached the previous run
                    pa, _, _ = out_runs.pop()
                    a = pa
            else:
                break
        out_runs.append((a, b, recs))
        i += 1
    # cut every run into pages of equal fill, reusing its pages' places first
    gone = np.zeros(k, bool)
    for a, b, _ in out_runs:
        if k:
            gone[max(a, 0):b + 1] = True
    free: Any = None  # pages of the pack array no page uses now (found when first needed)
    next_new = npages
    new_keys: list[int] = []
    new_pos: list[int] = []
    new_size: list[int] = []
    page_recs: list[np.ndarray] = []
    released: list[int] = []
    for a, b, recs in out_runs:
        reuse = sorted(pos[max(a, 0):b + 1].tolist()) if k else []
        for piece in _cut(_record_bytes(stored[recs], kind), recs):
            if reuse:
                p = reuse.pop(0)
            else:
                if free is None:
                    unused = np.ones(npages, bool)
                    unused[pos] = False
                    free = iter(np.flatnonzero(unused).tolist())
                p = next(free, None)
                if p is None:
                    p, next_new = next_new, next_new + 1
            new_keys.append(int(piece[0]))
            new_pos.append(p)
            new_size.append(_HEAD + int(_record_bytes(stored[piece], kind).sum()))
            page_recs.append(piece)
        released += reuse
    return (_encode(kind, nodes, stored, page_recs, new_pos), gone, np.array(new_keys, np.int64),
            np.array(new_pos, np.int64), np.array(new_size, np.int64), released)



def _cut(sizes: np.ndarray, recs: np.ndarray) -> list[np.ndarray]:
    """``recs`` cut into as few consecutive pieces of at most one page's records as possible (records
    of ``sizes`` bytes): of about equal bytes (each cut at the record boundary nearest its share) when
    that takes no more pages, so that pages filled by one commit still take a few more records; else
    filled in order."""
    if len(recs) == 0:
        return []
    cum = np.cumsum(sizes)
    edges = [0]
    while edges[-1] < len(recs):  # filled in order: the fewest pages
        base = int(cum[edges[-1] - 1]) if edges[-1] else 0
        edges.append(int(np.searchsorted(cum, base + _CAP, "right")))
    pieces = len(edges) - 1
    if pieces > 1:
        total = int(cum[-1])
        targets = total * np.arange(1, pieces) / pieces
        bounds = np.searchsorted(cum, targets, "right")  # records wholly below each target ...
        over = np.minimum(bounds, len(cum) - 1)
        below = cum[np.maximum(bounds - 1, 0)] * (bounds > 0)
        bounds = bounds + ((cum[over] - targets) < (targets - below))  # ... or one more, if nearer
        even = np.concatenate([[0], bounds, [len(recs)]])
        fill = np.diff(np.concatenate([[0], cum[np.maximum(even[1:] - 1, 0)]]))
        if (np.diff(even) > 0).all() and fill.max() <= _CAP:
            edges = even.tolist()
        elif total - int(cum[edges[-2] - 1]) < _CAP // 2:  # a small last page: share with the one before
            lo = int(cum[edges[-3] - 1]) if edges[-3] else 0
            mid = (lo + total) / 2
            cut = int(np.searchsorted(cum, mid, "right"))
            if cut < len(recs) and cum[cut] - mid < mid - cum[cut - 1]:
                cut += 1
            if edges[-3] < cut < len(recs) and cum[cut - 1] - lo <= _CAP and total - cum[cut - 1] <= _CAP:
                edges[-2] = cut
    return [recs[s:e] for s, e in zip(edges[:-1], edges[1:])]


def _encode(kind: Kind, nodes: np.ndarray, stored: np.ndarray, page_recs: list[np.ndarray],
                  pos: list[int]) -> dict[int, Any]:
    """The pack pages holding the records of ``page_recs`` (slot lists), by page, encoded with numpy
    (the reference: :func:`thinpool.kernels_pages.encode_packs` writes the same bytes)."""
    if not page_recs:
        return {}
    slots = np.concatenate(page_recs)
    counts = stored[slots].astype(np.int64)
    sparse = counts != MARK
    idx_parts, val_parts = [], []
    for i in range(0, len(slots), _CHUNK):
        part = slots[i:i + _CHUNK]
        rows = nodes[part]
        mask = (rows != nodes.dtype.type(kind.hole)) & sparse[i:i + _CHUNK, None]
        idx_parts.append(np.nonzero(mask)[1].astype(np.uint16))
        val_parts.append(rows[mask])
    idx = np.concatenate(idx_parts)
    vals = np.concatenate(val_parts)
    ents = np.where(sparse, counts, 0)
    assert len(vals) == int(ents.sum()), f"{kind.name} records out of step with the nodes"
    out: dict[int, bytes] = {}
    r = e = 0
    for recs, p in zip(page_recs, pos):
        nr = len(recs)
        ne = int(ents[r:r + nr].sum())
        page = b"".join([np.array([nr, ne], np.uint16).tobytes(), np.uint32(kind.tag).tobytes(),
                         vals[e:e + ne].tobytes(), recs.astype(np.uint32).tobytes(),
                         counts[r:r + nr].astype(np.uint16).tobytes(), idx[e:e + ne].tobytes()])
        out[p] = page.ljust(BLOCK, b"\0")
        r, e = r + nr, e + ne
    return out


