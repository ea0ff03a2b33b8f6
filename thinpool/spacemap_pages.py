"""The data space map's pages: the sparse count arrays in memory and the on-disk layout.

In memory the counts are one uint32 per data block, allocated a 1,024-block page at a time when large
(:func:`zeroed`: reserved address space); :class:`thinpool.dataspace.DataSpaceMap` owns them.  On disk
(metadata format 2) they are stored as dm-thin's ``sm_disk`` stores them: a two-bit bitmap
(``data_sm``: ``min(count, 3)``, 16,384 blocks per 4 KiB page) plus the full count of every block whose
count is 3 or more (``data_rc_over``: uint32 per block, 1,024 per page, only the pages holding such a
block).  This module sizes those arrays, decodes stored pages into counts (at once, or kept verified and
undecoded until first used: :class:`StoredCounts`), checks that bitmap and overflow agree, and packs
changed pages for a commit.  Format 1 (``data_rc``: the uint32 counts as they are) is still read.
"""

from __future__ import annotations

import mmap
import sys
from typing import Any, Mapping

import numpy as np

from . import schema as K
from .errors import MetadataCorrupt
from .mdpages import BLOCK, MAP_SPARSE, PageUpdates, RowPages

#: data blocks per 4 KiB page of the two-bit bitmap (``data_sm``)
SM_PER_PAGE = BLOCK * 4
#: data blocks per 4 KiB page of the overflow counts (``data_rc_over``) and of the in-memory pages
RC_PER_PAGE = 1 << K.RC_PAGE_BITS
_RC_PAGES_PER_SM_PAGE = SM_PER_PAGE // RC_PER_PAGE
#: the arrays of the on-disk data space map (format 2) and of format 1
DISK_ARRAYS = ("data_sm", "data_rc_over")
OLD_ARRAY = "data_rc"
_CHUNK = 64  # overflow pages are checked 1,024 count pages per numpy step (bounds the temporary memory)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


#: arrays at least this large are reserved address space (pages allocated when first touched)
SPARSE_BYTES = 256 << 20




def zeroed(n: int, dtype: Any) -> np.ndarray:
    """A zero-filled array of ``n`` elements.  A large one is a private anonymous memory map made with
    ``MAP_NORESERVE``: address space only, each 4 KiB page allocated when first written (and never
    counted against the machine's memory before), so a space map sized for 2^34 blocks costs what the
    blocks in use touch.  (``np.zeros`` is lazy too, but the kernel's overcommit heuristic refuses a
    single allocation larger than the machine's memory.)"""
    dtype = np.dtype(dtype)
    nbytes = n * dtype.itemsize
    if nbytes < SPARSE_BYTES:
        return np.zeros(n, dtype)
    mm = mmap.mmap(-1, nbytes, flags=MAP_SPARSE)
    return np.frombuffer(mm, dtype)


# ---------------------------------------------------------------------------------------------
# Storage: the two-bit bitmap + overflow layout in the metadata file


def sm_pages(nr_blocks: int) -> int:
    """Pages of the two-bit bitmap for ``nr_blocks`` data blocks."""
    return (max(nr_blocks, 1) + SM_PER_PAGE - 1) // SM_PER_PAGE


def rc_pages(nr_blocks: int) -> int:
    """Pages of the overflow array (and of the in-memory counts) for ``nr_blocks`` data blocks."""
    return (max(nr_blocks, 1) + RC_PER_PAGE - 1) // RC_PER_PAGE


def empty_disk_arrays(nr_blocks: int) -> dict[str, PageUpdates]:
    """The space map of a new pool: every page absent (all counts zero); nothing is written."""
    return {"data_sm": PageUpdates(sm_pages(nr_blocks), {}), "data_rc_over": PageUpdates(rc_pages(nr_blocks), {})}


def is_old_layout(arrays: Mapping[str, Any]) -> bool:
    """Whether loaded arrays hold a format-1 space map (uint32 per block, ``data_rc``)."""
    return "data_sm" not in arrays and OLD_ARRAY in arrays


#: byte -> its four two-bit counts (count i in bits 2*(i%4)..+1)
_UNPACK = ((np.arange(256, dtype=np.uint8)[:, None] >> (2 * np.arange(4, dtype=np.uint8))[None, :]) & 3).astype(np.uint8)


def counts_from_disk(arrays: Mapping[str, np.ndarray], nr_blocks: int, over_locs: Any = None) -> np.ndarray:
    """The in-memory counts (uint32 per block, a whole number of 1,024-block pages) from loaded arrays
    (uint8 views) of either layout.  Raises :class:`MetadataCorrupt` when bitmap and overflow disagree
    (a bitmap entry of 3 without an overflow count of at least 3, or an overflow count elsewhere).
    ``over_locs``: the overflow array's page locations in the store, if known: only its stored pages
    are searched for stray counts (an absent page is zeroes)."""
    cap = rc_pages(nr_blocks) * RC_PER_PAGE
    if is_old_layout(arrays):
        old = arrays[OLD_ARRAY].view(np.uint32)
        if len(old) == cap and old.flags.writeable:
            return old
        out = np.zeros(cap, np.uint32)
        n = min(len(old), cap)
        out[:n] = old[:n]
        return out
    bitmap = np.asarray(arrays["data_sm"]).view(np.uint8)
    over = np.asarray(arrays["data_rc_over"]).view(np.uint32)
    over = over[: min(len(over), cap)]
    if len(over) % RC_PER_PAGE:
        over = np.concatenate([over, np.zeros(-len(over) % RC_PER_PAGE, np.uint32)])
    nover = len(over) // RC_PER_PAGE
    over_pages = np.arange(nover) if over_locs is None else np.flatnonzero(stored_pages(over_locs, nover))
    nsm = (min(len(bitmap) * 4, cap) + SM_PER_PAGE - 1) // SM_PER_PAGE
    out = zeroed(cap, np.uint32)
    decode_counts(out, nr_blocks, np.arange(nsm), lambda ps: [bitmap[p * BLOCK:(p + 1) * BLOCK] for p in ps],
                  over_pages, lambda ps: over.reshape(-1, RC_PER_PAGE)[ps])
    return out


class StoredCounts:
    """A space map's stored pages, read and verified, not yet decoded into one count per block: what a
    pool's open keeps until the counts are first used (:class:`DataSpaceMap` decodes them then), so an
    open that only reads -- ``ls --usage``, ``status`` of a loaded pool -- never spends the 400 MB and
    the decode of 100,000,000 counts.  The number of blocks in use comes from the bitmap alone."""

    def __init__(self, nr_blocks: int, cap: int, sm_idx: np.ndarray, sm_pages: list[np.ndarray],
                 over_idx: np.ndarray, over_rows: np.ndarray) -> None:
        self.nr_blocks, self.cap = nr_blocks, cap
        self.sm_idx, self.sm_pages, self.over_idx, self.over_rows = sm_idx, sm_pages, over_idx, over_rows

    def _whole(self, end: int) -> tuple[int, np.ndarray]:
        """(k, bytes): the first ``k`` stored pages, whole pages that end at or before block ``end``,
        as one array (the pages after them are looked at one by one)."""
        ends = (self.sm_idx + 1) * SM_PER_PAGE
        k = int(np.searchsorted(ends, end, "right"))
        while k and any(len(r) != BLOCK for r in self.sm_pages[:k]):
            k = 0  # (pages the store read are whole; anything else takes the page-by-page path)
        return k, (np.concatenate(self.sm_pages[:k]) if k else np.zeros(0, np.uint8))

    def used(self) -> int:
        """Blocks below ``nr_blocks`` whose bitmap count is not zero."""
        n = min(self.nr_blocks, self.cap)
        k, whole = self._whole(n)
        total = _nonzero_counts(whole) if k else 0
        for p, raw in zip(self.sm_idx[k:].tolist(), self.sm_pages[k:]):
            a = p * SM_PER_PAGE
            if a >= n:
                break
            raw = raw[: (min(n, a + len(raw) * 4) - a + 3) // 4]
            total += int(np.bincount(raw, minlength=256) @ _NONZERO)
            if a + len(raw) * 4 > n:  # the bitmap's last byte holds counts of blocks past the device
                last = _UNPACK[raw[-1]][: n - (a + (len(raw) - 1) * 4)]
                total -= int(_NONZERO[raw[-1]]) - int(np.count_nonzero(last))
        return total

    def live_count(self) -> int:
        """Count pages (1,024 blocks) holding a nonzero count, as the decoded map's ``rc_live`` counts them."""
        per = RC_PER_PAGE // 4  # bitmap bytes per count page
        k, whole = self._whole(self.cap)
        total = int(np.count_nonzero(whole.reshape(-1, per).any(axis=1))) if k else 0
        for p, raw in zip(self.sm_idx[k:].tolist(), self.sm_pages[k:]):
            raw = raw[: max(0, min(len(raw), (self.cap - p * SM_PER_PAGE) // 4))]
            pad = -len(raw) % per
            rows = raw if not pad else np.concatenate([raw, np.zeros(pad, np.uint8)])
            total += int(np.count_nonzero(rows.reshape(-1, per).any(axis=1)))
        return total

    def decode(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, live pages), as :func:`decode_counts` gives them; MetadataCorrupt as it raises."""
        out = zeroed(self.cap, np.uint32)
        pages = self.sm_pages

        def sm_read(ps: np.ndarray) -> list[Any]:
            return [pages[i] for i in np.searchsorted(self.sm_idx, ps).tolist()]
        live = decode_counts(out, self.nr_blocks, self.sm_idx, sm_read, self.over_idx, lambda ps: self.over_rows)
        return out, live


#: byte -> how many of its four two-bit counts are not zero
_NONZERO = np.count_nonzero(_UNPACK, axis=1).astype(np.int64)
_NONZERO8 = _NONZERO.astype(np.uint8)


def _nonzero_counts(raw: np.ndarray) -> int:
    """How many of the two-bit counts in the bitmap bytes ``raw`` are not zero (bit 2i of
    ``b | b >> 1`` is set where count i of ``b`` is)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: a popcount per byte
        return int(np.bitwise_count((raw | (raw >> 1)) & np.uint8(0x55)).sum(dtype=np.int64))
    return int(_NONZERO8[raw].sum(dtype=np.int64))


def load_counts(store: Any, arrays: Mapping[str, np.ndarray], nr_blocks: int,
                lazy: bool = False) -> "tuple[np.ndarray | StoredCounts, np.ndarray | None]":
    """The counts of a pool's space map and its live pages (``None``: compute them from the counts), reading
    only the *stored* pages of the bitmap and the overflow array -- from ``arrays`` if the store loaded
    them, else from ``store`` (:meth:`~thinpool.mdstore.MetadataStore.read_pages`; an absent page is
    zeroes), so opening a pool reads and decodes what its used blocks need.  Raises
    :class:`MetadataCorrupt` as :func:`counts_from_disk` does (and for a damaged page).  ``lazy``: the
    pages read from ``store`` are verified and kept undecoded (:class:`StoredCounts`, live pages None);
    a bitmap that disagrees with its overflow counts is then reported when the counts are first used."""
    locs = store.locs
    if "data_sm" not in locs and OLD_ARRAY in arrays:  # format 1 (small pools only): the counts as stored
        return counts_from_disk(arrays, nr_blocks), None
    cap = rc_pages(nr_blocks) * RC_PER_PAGE
    nsm = min(len(locs.get("data_sm", ())), (cap + SM_PER_PAGE - 1) // SM_PER_PAGE)
    nover = min(len(locs.get("data_rc_over", ())), cap // RC_PER_PAGE)
    sm_idx = np.flatnonzero(stored_pages(locs.get("data_sm"), nsm))
    over_idx = np.flatnonzero(stored_pages(locs.get("data_rc_over"), nover))

    def reader(name: str, rows: int) -> Any:
        if name in arrays:
            whole = np.asarray(arrays[name]).view(np.uint8)
            return lambda ps: [whole[p * BLOCK:(p + 1) * BLOCK] for p in ps] if rows == 0 else \
                whole.view(np.uint32)[: nover * RC_PER_PAGE].reshape(-1, RC_PER_PAGE)[ps]

        def read(ps: np.ndarray) -> Any:
            got = store.read_pages(name, ps.tolist())
            if rows == 0:
                return [got[p] for p in ps.tolist()]
            return np.frombuffer(b"".join(got[p] for p in ps.tolist()), np.uint32).reshape(-1, RC_PER_PAGE)
        return read

    if lazy and not any(name in arrays for name in DISK_ARRAYS):
        sm = [_bytes_of(r) for r in reader("data_sm", 0)(sm_idx)] if len(sm_idx) else []
        over = reader("data_rc_over", 1)(over_idx) if len(over_idx) else np.zeros((0, RC_PER_PAGE), np.uint32)
        return StoredCounts(nr_blocks, cap, sm_idx, sm, over_idx, over), None
    out = zeroed(cap, np.uint32)
    live = decode_counts(out, nr_blocks, sm_idx, reader("data_sm", 0), over_idx, reader("data_rc_over", 1))
    return out, live


_DECODE_PAGES = 256  # bitmap pages decoded per step (4,194,304 blocks: bounds the temporaries)
#: byte -> its four two-bit counts as uint32 (the counts' type: decoded straight into place)
_UNPACK32 = _UNPACK.astype(np.uint32)


def _bytes_of(raw: Any) -> np.ndarray:
    """A bitmap page as uint8 (the store gives ``bytes`` or ``bytearray`` pages, loaded arrays numpy views)."""
    return np.frombuffer(raw, np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else \
        np.asarray(raw, np.uint8)


def _decode_run(out: np.ndarray, live: np.ndarray, a: int, raw: np.ndarray) -> np.ndarray:
    """Decode the bitmap bytes ``raw`` (four counts a byte) into ``out[a:]`` (zeroes) and mark the count
    pages they make nonzero in ``live``; returns the blocks whose bitmap count is 3 (their full counts
    are in the overflow pages).  A few whole-array numpy passes, no per-page Python work: 100,000,000
    blocks decode in a fraction of a second."""
    if not raw.any():
        return np.zeros(0, np.int64)
    n = len(raw) * 4
    np.take(_UNPACK32, raw, axis=0, out=out[a:a + n].reshape(-1, 4), mode="clip")
    per = RC_PER_PAGE // 4  # bitmap bytes per count page
    pad = -len(raw) % per
    rows = (raw if not pad else np.concatenate([raw, np.zeros(pad, np.uint8)])).reshape(-1, per)
    p0 = a // RC_PER_PAGE
    live[p0:p0 + len(rows)] |= rows.any(axis=1)
    both = raw & (raw >> 1) & np.uint8(0x55)  # bit 2i set where count i of the byte is 3
    at = np.flatnonzero(both)
    if len(at) == 0:
        return np.zeros(0, np.int64)
    bits = (both[at, None] >> np.arange(0, 8, 2, dtype=np.uint8)[None, :]) & 1
    r, c = np.nonzero(bits)
    return a + at[r].astype(np.int64) * 4 + c


def decode_counts(out: np.ndarray, nr_blocks: int, sm_idx: np.ndarray, sm_read: Any, over_idx: np.ndarray,
                  over_read: Any) -> np.ndarray:
    """Decode the bitmap pages ``sm_idx`` (``sm_read(pages)``: their bytes, a page each, the last one
    possibly short) and the overflow pages ``over_idx`` (``over_read(pages)``: uint32 rows of 1,024) into
    ``out`` (zeroes, a whole number of 1,024-block pages), checking that they agree; returns the live
    count pages (bool per page).  Bitmap entries past ``len(out)`` are ignored."""
    cap = len(out)
    live = np.zeros(cap // RC_PER_PAGE, bool)
    over_idx = np.asarray(over_idx, np.int64)
    over_rows = over_read(over_idx) if len(over_idx) else np.zeros((0, RC_PER_PAGE), np.uint32)
    threes = []
    for i in range(0, len(sm_idx), _DECODE_PAGES):
        ps = np.asarray(sm_idx[i:i + _DECODE_PAGES], np.int64)
        raws = [_bytes_of(r) for r in sm_read(ps)]
        plist = ps.tolist()
        j = 0
        while j < len(plist):  # a run of consecutive whole pages is decoded at once
            k = j + 1
            while k < len(plist) and plist[k] == plist[k - 1] + 1 and len(raws[k - 1]) == BLOCK:
                k += 1
            a = plist[j] * SM_PER_PAGE
            raw = raws[j] if k == j + 1 else np.concatenate(raws[j:k])
            j = k
            b = min(cap, a + len(raw) * 4)
            if b <= a:
                continue
            three = _decode_run(out, live, a, raw[: (b - a) // 4])
            if len(three):
                threes.append(three)
    three = np.concatenate(threes) if threes else np.zeros(0, np.int64)
    if len(three):
        row = np.searchsorted(over_idx, three >> K.RC_PAGE_BITS)
        found = (row < len(over_idx)) & (over_idx[np.minimum(row, max(len(over_idx) - 1, 0))] == three >> K.RC_PAGE_BITS) \
            if len(over_idx) else np.zeros(len(three), bool)
        vals = np.zeros(len(three), np.uint32)
        vals[found] = over_rows[row[found], three[found] & (RC_PER_PAGE - 1)]
        bad = np.flatnonzero(vals < 3)
        if len(bad):
            raise MetadataCorrupt(f"data space map: block {int(three[bad[0]])} has a count of 3 or more in the bitmap "
                                  f"but an overflow count of {int(vals[bad[0]])}", structure="data space map")
        out[three] = vals
    r, c = np.nonzero(over_rows)
    stray = over_idx[r] * RC_PER_PAGE + c
    if len(stray) != len(three):
        b = int(np.setdiff1d(stray, three)[0])
        v = int(over_rows[r, c][np.searchsorted(stray, b)])
        raise MetadataCorrupt(f"data space map: block {b} has an overflow count ({v}) but a bitmap "
                              f"count of {int(out[b])}", structure="data space map")
    tail = nr_blocks // RC_PER_PAGE
    if (tail < len(live) and live[tail] and (out[nr_blocks:(tail + 1) * RC_PER_PAGE] != 0).any()) or live[tail + 1:].any():
        raise MetadataCorrupt(f"data space map: a block past the data device's {nr_blocks} blocks is counted",
                              structure="data space map")
    return live


_COMPILED_CHUNK = 4096  # count pages per compiled call (bounds the overflow rows' memory: 16 MiB)


def _compiled_pack() -> Any:
    """:func:`thinpool.kernels_map.pack_space_pages` when this process has loaded numba (any kernel
    call does), else None: a commit needs only numpy, and the numpy code writes the same bytes."""
    if _PACK:
        return _PACK[0]
    if "numba" not in sys.modules or sys.byteorder != "little":
        return None
    from . import kernels_map
    _PACK.append(kernels_map.pack_space_pages)
    return _PACK[0]


_PACK: list[Any] = []  # kernels_map.pack_space_pages, once a commit found numba loaded
#: pages up to which their stored-or-not is looked up in Python (fewer steps than numpy's for a few)
_FEW = 16


def _disk_updates_compiled(pack: Any, rc: np.ndarray, dirty_sm: np.ndarray, sm_have: list[bool],
                           dirty_rc: np.ndarray, over_locs: Any, nsm: int, nrc: int) -> dict[str, Any]:
    """:meth:`DataSpaceMap.disk_updates`'s pages built by one compiled pass per chunk of pages
    (``sm_have``: per page of ``dirty_sm``, whether it is stored): a few pages as
    :class:`~thinpool.mdpages.PageUpdates` (Python lists cost less), more as
    :class:`~thinpool.mdpages.RowPages` over the pass's output (no copy, no step per page)."""
    if max(len(dirty_sm), len(dirty_rc)) > _FEW:
        return _disk_rows_compiled(pack, rc, dirty_sm, np.asarray(sm_have, bool), dirty_rc, over_locs, nsm, nrc)
    sm_pages_out: dict[int, bytes] = {}
    over_out: dict[int, bytes] = {}
    over_dead: list[int] = []
    sm_dead: list[int] = []
    nothing = np.zeros(0, np.int64)
    bitmap = np.empty((len(dirty_sm), BLOCK), np.uint8)
    used = np.empty(len(dirty_sm), np.uint8)
    over = np.empty((len(dirty_rc), RC_PER_PAGE), np.uint32)
    over_pages = np.empty(len(dirty_rc), np.int64)
    m = pack(rc, dirty_sm if len(dirty_sm) else nothing, dirty_rc if len(dirty_rc) else nothing, bitmap, used,
             over, over_pages)
    for k, (p, u, have) in enumerate(zip(dirty_sm.tolist(), used.tolist(), sm_have)):
        if u:
            sm_pages_out[p] = bitmap[k].tobytes()
        elif have:
            sm_dead.append(p)
    over_written = over_pages[:m].tolist()
    for k, p in enumerate(over_written):
        over_out[p] = over[k].tobytes()
    if m < len(dirty_rc):  # count pages without an overflow count now
        written = set(over_written)
        gone_l = [p for p in dirty_rc.tolist() if p not in written]
        over_dead += [p for p, have in zip(gone_l, _stored_few(over_locs, gone_l)) if have]
    return {"data_sm": PageUpdates(nsm, sm_pages_out, dead=sm_dead),
            "data_rc_over": PageUpdates(nrc, over_out, dead=over_dead)}


def _disk_rows_compiled(pack: Any, rc: np.ndarray, dirty_sm: np.ndarray, sm_have: np.ndarray,
                        dirty_rc: np.ndarray, over_locs: Any, nsm: int, nrc: int) -> dict[str, RowPages]:
    """:func:`_disk_updates_compiled` for many pages: the pages go to the store as rows of the pass's
    output; past one chunk, each chunk's live rows are copied out at once (its arrays are not kept),
    so memory stays bounded by what is live."""
    nothing = np.zeros(0, np.int64)
    Part = tuple[np.ndarray, np.ndarray, np.ndarray]
    sm_parts: list[Part] = []  # per chunk: (pages, the kernel's output, their rows in it)
    over_parts: list[Part] = []
    sm_dead: list[np.ndarray] = []
    over_dead: list[np.ndarray] = []
    many = max(len(dirty_sm), len(dirty_rc)) > _COMPILED_CHUNK
    for i in range(0, max(len(dirty_sm), len(dirty_rc)), _COMPILED_CHUNK):
        sm = dirty_sm[i:i + _COMPILED_CHUNK]
        pages = dirty_rc[i:i + _COMPILED_CHUNK]
        bitmap = np.empty((len(sm), BLOCK), np.uint8)
        used = np.empty(len(sm), np.uint8)
        over = np.empty((len(pages), RC_PER_PAGE), np.uint32)
        over_pages = np.empty(len(pages), np.int64)
        m = pack(rc, sm if len(sm) else nothing, pages if len(pages) else nothing, bitmap, used, over, over_pages)
        live = used.astype(bool)
        if many:  # only the live rows are kept (copies): the chunk's arrays go
            sm_parts.append((sm[live], bitmap[live], np.arange(int(live.sum()))))
            over_parts.append((over_pages[:m].copy(), over.view(np.uint8)[:m].copy(), np.arange(m)))
        else:
            sm_parts.append((sm[live], bitmap, np.flatnonzero(live)))
            over_parts.append((over_pages[:m], over.view(np.uint8), np.arange(m)))
        sm_dead.append(sm[~live & sm_have[i:i + _COMPILED_CHUNK]])
        if m < len(pages):  # count pages without an overflow count now (the kernel keeps their order)
            gone = pages if m == 0 else _without(pages, over_pages[:m])
            over_dead.append(gone[stored_at(over_locs, gone)])

    def rows(parts: list[Part], npages: int, dead: list[np.ndarray]) -> RowPages:
        if len(parts) == 1:
            pages, base, at = parts[0]
        else:
            pages = np.concatenate([p for p, _, _ in parts]) if parts else nothing
            base = np.concatenate([b for _, b, _ in parts]) if parts else np.zeros((0, BLOCK), np.uint8)
            at = np.arange(len(pages))
        return RowPages(npages, pages, base, at, dead=np.concatenate(dead) if dead else nothing)
    return {"data_sm": rows(sm_parts, nsm, sm_dead), "data_rc_over": rows(over_parts, nrc, over_dead)}


def _without(pages: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The entries of ``pages`` (sorted, distinct) not in ``kept`` (some of them, in the same order):
    ``np.isin``'s answer found by a binary search of each kept page (isin sorts both again)."""
    out = np.ones(len(pages), bool)
    out[np.searchsorted(pages, kept)] = False
    return pages[out]


def _pack_bitmap(counts: np.ndarray) -> np.ndarray:
    """Two bits per count, ``min(count, 3)``, four counts per byte (count i in bits 2*(i%4)..+1)."""
    c = np.minimum(counts, 3).astype(np.uint8)
    return c[0::4] | (c[1::4] << 2) | (c[2::4] << 4) | (c[3::4] << 6)


def _stored_few(locs: Any, pages: list[int]) -> list[bool]:
    """:func:`stored_at` for a few pages given as a list, in Python (a location array is ``array("Q")``)."""
    if locs is None:
        return [False] * len(pages)
    n = len(locs)
    return [p < n and locs[p] >> 32 != 0 for p in pages]


def stored_at(locs: Any, pages: np.ndarray) -> np.ndarray:
    """Per entry of ``pages``: whether that page of an array is stored (see :func:`stored_pages`),
    looking up those pages only."""
    pages = np.asarray(pages, np.int64)
    out = np.zeros(len(pages), bool)
    if locs is not None and len(pages) and len(locs):
        all_locs = np.frombuffer(memoryview(locs).cast("B"), np.uint64)
        ok = pages < len(all_locs)
        out[ok] = (all_locs[pages[ok]] >> np.uint64(32)) != 0
    return out


def stored_pages(locs: Any, n: int) -> np.ndarray:
    """Per page of an array as committed (its page locations from the metadata store, block << 32 | ...):
    whether the page is stored (an absent page reads as zeroes)."""
    out = np.zeros(n, bool)
    if locs is not None and len(locs):
        have = np.frombuffer(memoryview(locs).cast("B"), np.uint64)[:n] >> np.uint64(32) != 0
        out[: len(have)] = have
    return out


