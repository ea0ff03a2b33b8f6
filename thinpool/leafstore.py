"""The block map's leaves in the metadata file: dense leaves on their own page, sparse ones packed.

In memory a leaf is 512 mappings (4 KiB, all-ones = a hole; see :mod:`thinpool.blockmap`).  Stored
one leaf per page, a leaf would cost a block however few mappings it holds, where a dm-thin btree
leaf packs up to 252 mappings of any keys.  Metadata format 4 stores them in two arrays:

- ``leaf_dense``: a **dense** leaf (live, more than :data:`DENSE` = 192 mapped entries) keeps its own
  page, page ``s`` for leaf slot ``s``, stored as it is in memory -- so a commit that changes a dense
  leaf writes that one page;
- ``leaf_packs``: every other live leaf with a mapping is a **record** ``(slot, count, count x
  (entry index, value))``, 6 bytes plus 10 per mapping, and records are packed into pages of
  consecutive slots.  A page holds the records of the slots from its lowest slot up to the next
  page's lowest (its *key*); a dense leaf has a record too (count :data:`MARK`, no entries), which
  says that its own page is stored.  Page layout: uint16 record count, uint16 entry count, uint32
  tag, then the entries' values (uint64), the records' slots (uint32), counts (uint16) and the
  entries' indices in their leaf (uint16).

A commit re-packs only the pages whose records changed (a sparse leaf written, a leaf turning dense,
sparse, empty or dead): their records are cut into as few pages as hold them, of equal fill; a page
left less than half full takes in its neighbour.  So a commit that changes one sparse leaf writes one
to three pack pages, one that changes a dense leaf its own page, and every pack page but a lone one is
at least half full.  Pages are never overwritten in place: the store writes every changed page to a
fresh block (shadowing, :mod:`thinpool.mdstore`).  A dense leaf costs 4 KiB for 193..512 mappings
(<= 21.3 bytes each), a sparse one 6 bytes plus 10 per mapping.

Older layouts are read as they are and converted by the first commit (which releases their pages):
formats 1 and 2 (array ``leaves``: one leaf per page) and format 3 (array ``leaf_groups``: slots in
groups of 16, dense leaves on their own page in the group's span, the sparse leaves of a group as one
stream of a dense mask, a bitmap of the mapped entries and their values).
"""

from __future__ import annotations

import mmap
from typing import Any, Callable, Mapping

import numpy as np

from . import schema as K
from .errors import MetadataCorrupt
from .mdstore import BLOCK, PageUpdates

#: a leaf with more live mappings than this keeps its own page
DENSE = 192
#: the count of a dense leaf's record (its mappings are on its own page)
MARK = 0xFFFF
DENSE_ARRAY = "leaf_dense"
PACK_ARRAY = "leaf_packs"
#: the arrays of the older layouts: format 3, formats 1 and 2
GROUPS_ARRAY = "leaf_groups"
PAGES_ARRAY = "leaves"
#: a pack page's tag ("LPK4")
TAG = 0x344B504C
_HEAD = 8           # record count, entry count, tag
_REC = 6            # slot (uint32) + count (uint16)
_ENT = 10           # value (uint64) + index (uint16)
_CAP = BLOCK - _HEAD
_CHUNK = 4096       # leaf slots handled per numpy step (16 MB of leaves)
#: the array a pool's open reads straight into the leaves' rows (:func:`open_leaves`)
ARRAY = DENSE_ARRAY
#: leaves of at least this many bytes are loaded into memory mapped in at once (:func:`open_leaves`)
POPULATE_MIN = 1 << 24


def _record_bytes(stored: np.ndarray) -> np.ndarray:
    """Bytes of the records whose stored counts are ``stored`` (MARK: no entries)."""
    n = stored.astype(np.int64)
    return _REC + _ENT * np.where(n == MARK, 0, n)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for every start and length (vectorised)."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    firsts = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.int64) - firsts, lengths) + np.arange(total, dtype=np.int64)


class _Pages:
    """Pages one commit writes of one array (the interface of :class:`thinpool.mdstore.PagedArray`):
    a dense leaf's page is a view of the in-memory leaf, a pack page encoded bytes."""

    def __init__(self, npages: int, leaves: np.ndarray | None, own: Any, packed: dict[int, bytes],
                 dead: Any) -> None:
        self.npages = npages
        self._leaves, self._own, self._packed = leaves, set(int(s) for s in own), packed
        self.dead = sorted(set(int(d) for d in dead) - self._own - set(packed))
        self.dirty = sorted(self._own | set(packed) | set(self.dead))

    def page(self, i: int) -> Any:
        if i in self._own:
            assert self._leaves is not None
            return memoryview(self._leaves[i]).cast("B")
        return self._packed[i]


class LeafDisk:
    """What the last commit stored of the leaves, so that the next commit re-packs only what changed.

    ``stored[s]``: the count of leaf slot ``s``'s record (-1: no record, :data:`MARK`: dense);
    ``keys``/``pos``/``size``: per pack page, in slot order, its lowest slot, its page in
    ``leaf_packs`` and its bytes; ``npages``: pages of ``leaf_packs``; ``convert``: an older layout is
    stored (the next commit writes every leaf and drops it)."""

    def __init__(self, stored: np.ndarray, keys: np.ndarray, pos: np.ndarray, size: np.ndarray,
                 npages: int, convert: str | None = None) -> None:
        self.stored, self.keys, self.pos, self.size = stored, keys, pos, size
        self.npages, self.convert = npages, convert

    @classmethod
    def empty(cls, convert: str | None = None) -> "LeafDisk":
        z = np.zeros(0, np.int64)
        return cls(np.zeros(0, np.int32), z, z, z, 0, convert)

    # ------------------------------------------------------------------ a commit
    def updates(self, leaves: np.ndarray, leaf_rc: np.ndarray,
                leaf_dirty: np.ndarray) -> tuple[dict[str, Any], "LeafDisk"]:
        """The pages a commit writes for the leaves marked in ``leaf_dirty`` (every leaf after the load
        of an older layout), and what is stored once that commit is durable.  Changes nothing."""
        n = len(leaves)
        stored = np.full(n, -1, np.int32)
        keep = min(n, len(self.stored))
        stored[:keep] = self.stored[:keep]
        dirty = np.arange(n) if self.convert else np.flatnonzero(leaf_dirty[:n])
        new = np.empty(len(dirty), np.int32)
        for i in range(0, len(dirty), _CHUNK):
            slots = dirty[i:i + _CHUNK]
            count = (leaves[slots] != np.uint64(K.UNMAPPED)).sum(axis=1)
            count[leaf_rc[slots] == 0] = 0
            new[i:i + _CHUNK] = np.where(count == 0, -1, np.where(count > DENSE, MARK, count))
        old = stored[dirty]
        own = dirty[new == MARK]
        dead_own = dirty[(old == MARK) & (new != MARK)]
        changed = dirty[~(((old == MARK) & (new == MARK)) | ((old == -1) & (new == -1)))]
        stored[dirty] = new
        packed, dead_packs, after = self._repack(leaves, stored, changed)
        out: dict[str, Any] = {
            DENSE_ARRAY: _Pages(n, leaves, own, {}, dead_own),
            PACK_ARRAY: _Pages(after.npages, None, (), packed, dead_packs),
        }
        if self.convert:
            out[self.convert] = PageUpdates(0, {})
        return out, after

    def _runs(self, changed: np.ndarray) -> list[list[int]]:
        """Runs of consecutive pack pages (indices in slot order) holding the changed slots."""
        k = len(self.keys)
        if len(changed) == 0:
            return []
        if k == 0:
            return [[0, -1]]
        pages = np.unique(np.maximum(np.searchsorted(self.keys, changed, "right") - 1, 0))
        breaks = np.flatnonzero(np.diff(pages) > 1) + 1
        return [[int(r[0]), int(r[-1])] for r in np.split(pages, breaks)]

    def _repack(self, leaves: np.ndarray, stored: np.ndarray,
                changed: np.ndarray) -> tuple[dict[int, bytes], list[int], "LeafDisk"]:
        """Re-pack the pages holding ``changed`` slots (``stored``: the new counts)."""
        n, k = len(stored), len(self.keys)
        runs = self._runs(changed)
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
                lo = 0 if a <= 0 else int(self.keys[a])
                hi = n if b + 1 >= k else int(self.keys[b + 1])
                recs = np.flatnonzero(stored[lo:hi] != -1) + lo
                size = int(_record_bytes(stored[recs]).sum())
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
        free: Any = None  # pages of leaf_packs no page uses now (found when first needed)
        next_new = self.npages
        new_keys: list[int] = []
        new_pos: list[int] = []
        new_size: list[int] = []
        page_recs: list[np.ndarray] = []
        released: list[int] = []
        for a, b, recs in out_runs:
            reuse = sorted(self.pos[max(a, 0):b + 1].tolist()) if k else []
            for piece in _cut(_record_bytes(stored[recs]), recs):
                if reuse:
                    p = reuse.pop(0)
                else:
                    if free is None:
                        unused = np.ones(self.npages, bool)
                        unused[self.pos] = False
                        free = iter(np.flatnonzero(unused).tolist())
                    p = next(free, None)
                    if p is None:
                        p, next_new = next_new, next_new + 1
                new_keys.append(int(piece[0]))
                new_pos.append(p)
                new_size.append(_HEAD + int(_record_bytes(stored[piece]).sum()))
                page_recs.append(piece)
            released += reuse
        packed = _encode(leaves, stored, page_recs, new_pos)
        keys = np.concatenate([self.keys[~gone], np.array(new_keys, np.int64)])
        pos = np.concatenate([self.pos[~gone], np.array(new_pos, np.int64)])
        size = np.concatenate([self.size[~gone], np.array(new_size, np.int64)])
        order = np.argsort(keys, kind="stable")
        npages = int(pos.max()) + 1 if len(pos) else 0
        after = LeafDisk(stored, keys[order], pos[order], size[order], npages)
        return packed, [p for p in released if p < npages], after


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


def _encode(leaves: np.ndarray, stored: np.ndarray, page_recs: list[np.ndarray],
            pos: list[int]) -> dict[int, bytes]:
    """The pack pages holding the records of ``page_recs`` (slot lists), by page."""
    if not page_recs:
        return {}
    slots = np.concatenate(page_recs)
    counts = stored[slots].astype(np.int64)
    sparse = counts != MARK
    idx_parts, val_parts = [], []
    for i in range(0, len(slots), _CHUNK):
        part = slots[i:i + _CHUNK]
        rows = leaves[part]
        mask = (rows != np.uint64(K.UNMAPPED)) & sparse[i:i + _CHUNK, None]
        idx_parts.append(np.nonzero(mask)[1].astype(np.uint16))
        val_parts.append(rows[mask])
    idx = np.concatenate(idx_parts)
    vals = np.concatenate(val_parts)
    ents = np.where(sparse, counts, 0)
    assert len(vals) == int(ents.sum()), "leaf records out of step with the leaves"
    out: dict[int, bytes] = {}
    r = e = 0
    for recs, p in zip(page_recs, pos):
        nr = len(recs)
        ne = int(ents[r:r + nr].sum())
        page = b"".join([np.array([nr, ne], np.uint16).tobytes(), np.uint32(TAG).tobytes(),
                         vals[e:e + ne].tobytes(), recs.astype(np.uint32).tobytes(),
                         counts[r:r + nr].astype(np.uint16).tobytes(), idx[e:e + ne].tobytes()])
        out[p] = page.ljust(BLOCK, b"\0")
        r, e = r + nr, e + ne
    return out


# ---------------------------------------------------------------------------- loading

def empty_disk_arrays() -> dict[str, PageUpdates]:
    """The leaves of a new pool: none."""
    return {DENSE_ARRAY: PageUpdates(0, {}), PACK_ARRAY: PageUpdates(0, {})}


def leaves_from_disk(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The in-memory leaves (uint64, one row of 512 per leaf slot) from loaded arrays (uint8 views) of
    any layout.  Raises :class:`MetadataCorrupt` if the stored leaves are inconsistent."""
    return load(arrays)[0]


def load(arrays: Mapping[str, np.ndarray],
         lost: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, LeafDisk]:
    """The in-memory leaves and what is stored of them (:class:`LeafDisk`), from loaded arrays of any
    layout.  ``lost`` (repair): pages known to be unreadable (read as zeroes), per array; a dense
    leaf whose page is lost is left empty."""
    if PACK_ARRAY not in arrays:
        if GROUPS_ARRAY in arrays:
            return _groups_from_disk(arrays[GROUPS_ARRAY]), LeafDisk.empty(GROUPS_ARRAY)
        old = arrays.get(PAGES_ARRAY, np.zeros(0, np.uint8))
        return old.view(np.uint64).reshape(-1, K.LEAF_ENTRIES), LeafDisk.empty(PAGES_ARRAY if len(old) else None)
    convert = next((a for a in (GROUPS_ARRAY, PAGES_ARRAY) if len(arrays.get(a, ()))), None)
    if convert:
        raise MetadataCorrupt(f"leaves stored in both the current layout and the older '{convert}'",
                              structure="leaves")
    nleaves = len(arrays.get("leaf_rc", ())) // 4
    dense_buf = arrays.get(DENSE_ARRAY, np.zeros(0, np.uint8))
    dense_lost = None if lost is None else lost.get(DENSE_ARRAY)

    def fill(leaves: np.ndarray, dense: np.ndarray) -> None:
        if len(dense) and (dense.max() + 1) * BLOCK > len(dense_buf):
            raise _corrupt(f"dense leaf {int(dense.max())} has no page")
        if dense_lost is not None:
            dense = dense[~dense_lost[dense]]
        leaves[dense] = dense_buf.view(np.uint64).reshape(-1, K.LEAF_ENTRIES)[dense]

    return _packs_from_disk(arrays[PACK_ARRAY], nleaves, fill, np.full)


def open_leaves(store: Any, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, LeafDisk] | None:
    """:func:`load` for a pool's open: ``arrays`` loaded without :data:`ARRAY` (the dense leaves), whose
    pages are read straight into their rows (:meth:`thinpool.mdstore.MetadataStore.gather_into`), so
    the leaves are the only copy of them ever made (100,000,000 mappings are 800 MB of leaves), in
    memory mapped in at once when big.  None if the store holds an older layout: load that with the
    other arrays."""
    if PACK_ARRAY not in arrays:
        return None
    if any(len(arrays.get(a, ())) for a in (GROUPS_ARRAY, PAGES_ARRAY)):
        raise _corrupt("leaves stored in both the current layout and an older one")
    nleaves = len(arrays.get("leaf_rc", ())) // 4
    npages = store.npages(DENSE_ARRAY)

    def fill(leaves: np.ndarray, dense: np.ndarray) -> None:
        if len(dense) and dense.max() >= npages:
            raise _corrupt(f"dense leaf {int(dense.max())} has no page")
        if len(dense):
            store.gather_into(DENSE_ARRAY, dense.tolist(), leaves, dense.tolist())

    return _packs_from_disk(arrays[PACK_ARRAY], nleaves, fill, lambda shape, hole, dtype: _populated(shape[0], hole))


def load_leaves(store: Any) -> np.ndarray | None:
    """The store's committed leaves as a pool's open reads them (:func:`open_leaves`; every page read
    straight into place), or None for an older layout."""
    if PACK_ARRAY not in store.locs:
        return None
    npages = store.npages(PACK_ARRAY)
    packs = np.empty(npages * BLOCK, np.uint8)
    if npages:
        store.gather_into(PACK_ARRAY, list(range(npages)), packs, list(range(npages)))
    arrays = {PACK_ARRAY: packs, "leaf_rc": np.zeros(store.npages("leaf_rc") * BLOCK, np.uint8)}
    out = open_leaves(store, arrays)
    return None if out is None else out[0]


def _populated(nleaves: int, hole: int) -> np.ndarray:
    """``nleaves`` empty leaves, their memory mapped in at once when big (``MAP_POPULATE``: one system
    call instead of a page fault per 4 KiB, and no waiting for the kernel to assemble huge pages on a
    fragmented host -- 800 MB of leaves took 0.4 s of system time this way against 0.6-2.5 s)."""
    nbytes = nleaves * K.LEAF_ENTRIES * 8
    flags = getattr(mmap, "MAP_POPULATE", 0)
    if nbytes == 0 or nbytes < POPULATE_MIN or not flags:
        return np.full((nleaves, K.LEAF_ENTRIES), hole, np.uint64)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    leaves = np.frombuffer(buf, np.uint64).reshape(nleaves, K.LEAF_ENTRIES)
    for i in range(0, nleaves, _CHUNK):
        leaves[i:i + _CHUNK] = np.uint64(hole)
    return leaves


def _corrupt(msg: str) -> MetadataCorrupt:
    return MetadataCorrupt(msg, structure="leaves")


def _packs_from_disk(buf: np.ndarray, nleaves: int, fill: Callable[[np.ndarray, np.ndarray], None],
                     alloc: Callable[..., np.ndarray]) -> tuple[np.ndarray, LeafDisk]:
    """Decode format 4 (every pack page at once) and check it: headers, slots within the leaf arrays
    and in one record each, counts and entry indices in range, pages' slot ranges disjoint.  ``alloc``
    makes the empty leaves (as ``np.full``), ``fill(leaves, slots)`` puts the dense leaves' pages in."""
    npages = len(buf) // BLOCK
    u16, u32, u64 = buf.view(np.uint16), buf.view(np.uint32), buf.view(np.uint64)
    nrec = u16[0::BLOCK // 2][:npages].astype(np.int64)
    nent = u16[1::BLOCK // 2][:npages].astype(np.int64)
    tag = u32[1::BLOCK // 4][:npages]
    used = nrec > 0
    bad = np.flatnonzero((used & (tag != TAG)) | (~used & ((tag != 0) | (nent != 0)))
                         | (_HEAD + _ENT * nent + _REC * nrec > BLOCK))
    if len(bad):
        raise _corrupt(f"leaf pack page {int(bad[0])}: bad header (records {int(nrec[bad[0]])}, entries "
                       f"{int(nent[bad[0]])}, tag {int(tag[bad[0]]):#x})")
    pages = np.flatnonzero(used)
    rec_page = np.repeat(pages, nrec[pages])
    rec_j = _ranges(np.zeros(len(pages), np.int64), nrec[pages])
    slots = u32[rec_page * (BLOCK // 4) + 2 + 2 * nent[rec_page] + rec_j].astype(np.int64)
    counts = u16[rec_page * (BLOCK // 2) + 4 + 4 * nent[rec_page] + 2 * nrec[rec_page] + rec_j].astype(np.int64)
    if len(slots) and slots.max() >= nleaves:
        raise _corrupt(f"leaf record of slot {int(slots.max())}, beyond the {nleaves} leaf slots")
    order = np.argsort(slots, kind="stable")
    twice = np.flatnonzero(np.diff(slots[order]) == 0)
    if len(twice):
        raise _corrupt(f"leaf slot {int(slots[order][twice[0]])} has two records")
    okc = ((counts >= 1) & (counts <= DENSE)) | (counts == MARK)
    if not okc.all():
        raise _corrupt(f"leaf record of slot {int(slots[~okc][0])}: count {int(counts[~okc][0])}")
    ents = np.where(counts == MARK, 0, counts)
    per_page = np.bincount(rec_page, ents, minlength=npages).astype(np.int64)
    off = np.flatnonzero(per_page != nent)
    if len(off):
        raise _corrupt(f"leaf pack page {int(off[0])}: its records count {int(per_page[off[0]])} entries, "
                       f"its header {int(nent[off[0]])}")
    ent_page = np.repeat(pages, nent[pages])
    ent_k = _ranges(np.zeros(len(pages), np.int64), nent[pages])
    ent_rec = np.repeat(np.arange(len(slots)), ents)
    idx = u16[ent_page * (BLOCK // 2) + 4 + 4 * nent[ent_page] + 3 * nrec[ent_page] + ent_k].astype(np.int64)
    vals = u64[ent_page * (BLOCK // 8) + 1 + ent_k]
    step = np.diff(idx)
    bad = np.flatnonzero((idx >= K.LEAF_ENTRIES) | (vals == np.uint64(K.UNMAPPED))
                         | np.concatenate([[False], (step <= 0) & (np.diff(ent_rec) == 0)]))
    if len(bad):
        raise _corrupt(f"leaf record of slot {int(slots[ent_rec[bad[0]]])}: entry {int(idx[bad[0]])} out of "
                       f"order, out of range or a hole")
    leaves = alloc((nleaves, K.LEAF_ENTRIES), K.UNMAPPED, np.uint64)
    leaves[slots[ent_rec], idx] = vals
    fill(leaves, np.sort(slots[counts == MARK]))
    # pages in slot order, their ranges disjoint
    stored = np.full(nleaves, -1, np.int32)
    stored[slots] = counts
    if len(pages) == 0:
        return leaves, LeafDisk(stored, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), npages)
    starts = np.cumsum(nrec[pages]) - nrec[pages]
    lows = np.minimum.reduceat(slots, starts)
    highs = np.maximum.reduceat(slots, starts)
    o = np.argsort(lows)
    if len(o) > 1 and (highs[o][:-1] >= lows[o][1:]).any():
        raise _corrupt("leaf pack pages hold overlapping ranges of leaf slots")
    size = _HEAD + _ENT * nent[pages] + _REC * nrec[pages]
    return leaves, LeafDisk(stored, lows[o], pages[o], size[o], npages)


def lost_leaves(arrays: Mapping[str, np.ndarray], lost_pages: Mapping[str, np.ndarray],
                nleaves: int) -> np.ndarray:
    """Which leaf slots a repair loses when the pages marked in ``lost_pages`` are unreadable.

    Format 4: a dense leaf whose own page is lost; and, if a pack page is lost, every slot without a
    record outside the slot ranges of the readable pack pages (where the lost pages' records were).
    Format 3: a lost own page loses its leaf, a lost stream page its whole group."""
    out = np.zeros(nleaves, bool)
    if PACK_ARRAY not in arrays:
        if GROUPS_ARRAY not in arrays:
            return lost_pages.get(PAGES_ARRAY, out)[:nleaves]
        lost = lost_pages[GROUPS_ARRAY]
        ng = len(lost) // _SPAN
        lost = lost[: ng * _SPAN].reshape(ng, _SPAN)
        return (lost[:, :_GROUP] | lost[:, _GROUP:].any(axis=1)[:, None]).reshape(-1)[:nleaves]
    _, disk = load(arrays, lost_pages)
    stored = np.full(nleaves, -1, np.int32)
    stored[:min(nleaves, len(disk.stored))] = disk.stored[:nleaves]
    dense_lost = lost_pages.get(DENSE_ARRAY, np.zeros(0, bool))
    marks = np.flatnonzero(stored == MARK)
    marks = marks[marks < len(dense_lost)]
    out[marks[dense_lost[marks]]] = True
    pack_lost = lost_pages.get(PACK_ARRAY, np.zeros(0, bool)).any()
    recs = np.flatnonzero(stored != -1)
    if pack_lost and len(recs):
        # the readable pages' slot ranges (each from its lowest to its highest record)
        page_of = np.searchsorted(disk.keys, recs, "right") - 1
        firsts = np.flatnonzero(np.diff(np.concatenate([[-1], page_of])) != 0)
        cover = np.zeros(nleaves + 1, np.int64)
        np.add.at(cover, recs[firsts], 1)
        np.add.at(cover, np.maximum.reduceat(recs, firsts) + 1, -1)
        out |= (np.cumsum(cover)[:nleaves] == 0) & (stored == -1)
    elif pack_lost:
        out[:] = True
    return out


# ---------------------------------------------------------------------------- format 3 (read only)

_GROUP = 16
_STREAM_HEAD = 8 + _GROUP * K.LEAF_ENTRIES // 8     # dense mask + 1,024 bytes of bitmap
_SPAN = _GROUP + (_STREAM_HEAD + _GROUP * DENSE * 8 + BLOCK - 1) // BLOCK
_PAGE_WORDS = BLOCK // 8
_SPAN_WORDS = _SPAN * _PAGE_WORDS
_STREAM_WORD = _GROUP * _PAGE_WORDS
_VALUES_WORD = _STREAM_WORD + _STREAM_HEAD // 8
_CAPACITY = _SPAN_WORDS - _VALUES_WORD


def _groups_from_disk(buf: np.ndarray) -> np.ndarray:
    """Format 3's leaves: groups of 16 slots owning 23 pages each (16 own pages of dense leaves, then
    a stream: a uint64 mask of the dense slots, a 1,024-byte bitmap of the sparse leaves' mapped
    entries, their values)."""
    ng = len(buf) // (_SPAN * BLOCK)
    leaves = np.full((ng * _GROUP, K.LEAF_ENTRIES), K.UNMAPPED, np.uint64)
    if ng == 0:
        return leaves
    words = buf[: ng * _SPAN * BLOCK].view(np.uint64).reshape(ng, _SPAN_WORDS)
    dense_mask = words[:, _STREAM_WORD]
    bad = np.flatnonzero(dense_mask >> np.uint64(_GROUP))
    if len(bad):
        raise _corrupt(f"leaf group {int(bad[0])}: dense-leaf mask {int(dense_mask[bad[0]]):#x} names slots "
                       f"past {_GROUP}")
    dense = ((dense_mask[:, None] >> np.arange(_GROUP, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(bool)
    heads = words[:, _STREAM_WORD + 1:_VALUES_WORD].view(np.uint8)
    mask = np.unpackbits(heads, axis=1, bitorder="little").view(bool).reshape(ng, _GROUP, K.LEAF_ENTRIES)
    clash = np.flatnonzero((mask.any(axis=2) & dense).any(axis=1))
    if len(clash):
        raise _corrupt(f"leaf group {int(clash[0])}: a dense leaf also has entries in the stream")
    counts = mask.reshape(ng, -1).sum(axis=1)
    if counts.max() > _CAPACITY:
        g = int(np.argmax(counts))
        raise _corrupt(f"leaf group {g}: {int(counts[g])} mapped entries do not fit its pages")
    flat = words.reshape(-1)
    idx = _ranges(np.arange(ng, dtype=np.int64) * _SPAN_WORDS + _VALUES_WORD, counts)
    leaves.reshape(-1)[mask.reshape(-1)] = flat[idx]
    own = np.flatnonzero(dense.reshape(-1))
    if len(own):
        leaves[own] = words[:, :_STREAM_WORD].reshape(ng * _GROUP, K.LEAF_ENTRIES)[own]
    return leaves
