"""The data space map: one reference count per data block in memory, the allocator's bookkeeping,
and how the counts are stored in the metadata file (the on-disk space-map format of the interop
tools is :mod:`thinpool.interop.sm_disk`).

``data_rc[b]`` counts the distinct leaves that map block ``b`` (dm-thin's rule).  ``freed_txn[b]``
holds :class:`~thinpool.schema.BlockState` bits.  A block whose count drops to zero is marked
``FREED`` and is not allocatable in this transaction (docs/dm-thin.md §7), so a crash can never
expose a block the last commit still maps.  One step stricter than the kernel, the commit that frees
it keeps it reserved (``PENDING``) until the *next* commit is durable: the previous commit -- the one
a damaged newest superblock falls back to -- still maps it, so it must be neither punched nor reused
before then.

A freed block keeps its bytes (dm-thin never discards a block it frees): it is marked ``STALE`` ("may
hold old bytes") until a hole punch (``thinpool trim``, a discard's passdown, ``punch_freed_blocks``)
or a reuse clears it; the write kernels zero what a write to a reused ``STALE`` block does not cover
when the pool zeroes new blocks.  The marks live in memory only: an open marks every free block the
data file holds bytes for (:func:`thinpool.poolspace.scrub_on_open`).

**On disk** (metadata format 2) the counts are stored as dm-thin's ``sm_disk`` stores them: a
two-bit bitmap (``data_sm``: ``min(count, 3)``, 16,384 blocks per 4 KiB page) plus the full count of
every block whose count is 3 or more (``data_rc_over``: uint32 per block, 1,024 per page, written
only for the pages that hold such a block -- dm-thin's overflow btree).  A page that is all zeroes
is never written (the store reads an absent page as zeroes) and a page that becomes all zeroes is
released, so a pool's space map costs what its used blocks need, not what its data device could
hold.  Only the pages covering counts changed in the transaction are rebuilt and written at commit
(:meth:`DataSpaceMap.disk_updates`).  In memory the counts stay one uint32 per block, the array the
kernels use.  Format-1 pools stored that array as is (``data_rc``); they still open, and their
first commit writes the new layout and releases the old pages.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from . import schema as K
from .errors import MetadataCorrupt
from .mdpages import BLOCK, PageUpdates

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


class DataSpaceMap:
    """Reference counts, the freed-this-transaction marks and page dirty flags for the data device."""

    def __init__(self, st: np.ndarray, nr_blocks: int, data_rc: np.ndarray | None = None) -> None:
        self.st = st
        cap = _round_up(max(nr_blocks, 1), 1 << K.RC_PAGE_BITS)
        if data_rc is not None and len(data_rc) == cap and data_rc.flags.writeable:
            self.data_rc = data_rc  # the loaded pages, used in place
        else:
            self.data_rc = np.zeros(cap, np.uint32)
            if data_rc is not None:
                n = min(len(data_rc), cap)
                self.data_rc[:n] = data_rc[:n]
        self.freed_txn = np.zeros(cap, np.uint8)  # BlockState bits
        self.rc_dirty = np.zeros(cap >> K.RC_PAGE_BITS, np.uint8)
        self.pending = np.zeros(0, np.int64)  # freed by the last commit, released by the next
        st[K.ST_NR_BLOCKS] = nr_blocks
        self.recount()

    def inherit_stale(self, old: "DataSpaceMap | None") -> None:
        """After a reload (abort, rollback) from ``old``, the map in use until now: every block free
        here that ``old`` marked stale or had in use may hold bytes -- mark it ``STALE``."""
        if old is None:
            return
        n = min(len(old.data_rc), len(self.data_rc))
        held = (old.data_rc[:n] > 0) | ((old.freed_txn[:n] & K.BLOCK_STALE) != 0)
        self.freed_txn[:n][held & (self.data_rc[:n] == 0)] |= K.BLOCK_STALE

    @property
    def arrays(self) -> tuple:
        """The ``space`` tuple every kernel takes: (data_rc, freed_txn, rc_dirty) (see
        :mod:`thinpool.kernels_map`)."""
        return (self.data_rc, self.freed_txn, self.rc_dirty)

    @property
    def nr_blocks(self) -> int:
        return int(self.st[K.ST_NR_BLOCKS])

    def recount(self) -> None:
        """Recompute the free counters from the counts (after load, import or a commit)."""
        n = self.nr_blocks
        free = int(np.count_nonzero(self.data_rc[:n] == 0))
        self.st[K.ST_NR_FREE] = free
        self.st[K.ST_NR_ALLOCATABLE] = free - int(np.count_nonzero(self.freed_txn[:n] & K.BLOCK_STATE))

    def add_refs(self, blocks: np.ndarray) -> None:
        """One more reference to each entry of ``blocks`` (a block listed twice gains two): import
        (:mod:`thinpool.pool_ir`), one per entry of every distinct leaf; call :meth:`recount` after."""
        if len(blocks) == 0:
            return
        ublocks, counts = np.unique(np.asarray(blocks, np.int64), return_counts=True)
        self.data_rc[ublocks] += counts.astype(np.uint32)
        self.rc_dirty[np.unique(ublocks >> K.RC_PAGE_BITS)] = 1

    def used(self) -> int:
        return self.nr_blocks - int(self.st[K.ST_NR_FREE])

    def freed_blocks(self) -> np.ndarray:
        """Blocks freed in this transaction (scanning only the dirty count pages)."""
        pages = np.flatnonzero(self.rc_dirty)
        if len(pages) == 0:
            return np.zeros(0, np.int64)
        per = 1 << K.RC_PAGE_BITS
        idx = (pages[:, None] * per + np.arange(per)[None, :]).reshape(-1)
        return idx[(self.freed_txn[idx] & K.BLOCK_STATE) == K.BLOCK_FREED]

    def set_pending(self, blocks: np.ndarray) -> None:
        """Blocks freed by the commit just made: reserved until the next commit is durable."""
        self.pending = np.asarray(blocks, np.int64)
        f = self.freed_txn
        f[self.pending] = (f[self.pending] & ~np.uint8(K.BLOCK_STATE)) | K.BLOCK_PENDING

    def release(self, freed: np.ndarray, punched: np.ndarray | None = None) -> None:
        """After a commit: blocks freed in the committed transaction become allocatable; those in
        ``punched`` are holes now (no longer stale), the others keep their bytes (stay ``STALE``)."""
        f = self.freed_txn
        f[freed] &= np.uint8(K.BLOCK_STALE)
        if punched is not None and len(punched):
            f[punched] = 0
        self.st[K.ST_NR_ALLOCATABLE] += len(freed)

    def disk_updates(self, committed_locs: Mapping[str, Any]) -> dict[str, PageUpdates]:
        """The space map's changed pages for a commit: the bitmap and overflow pages that cover the
        count pages changed in this transaction, as :class:`~thinpool.mdpages.PageUpdates`.  A page
        that is all zeroes is left out, or released (``dead``) if it is stored; ``committed_locs``
        (the store's page locations by array name) says which pages are stored.  After a load of a
        format-1 pool, every page is rebuilt and the old ``data_rc`` array is dropped."""
        nsm, nrc = sm_pages(self.nr_blocks), len(self.data_rc) // RC_PER_PAGE
        old_layout = OLD_ARRAY in committed_locs and len(committed_locs[OLD_ARRAY]) > 0
        dirty_rc = np.arange(nrc) if old_layout else np.flatnonzero(self.rc_dirty)
        sm_have = stored_pages(committed_locs.get("data_sm"), nsm)
        over_have = stored_pages(committed_locs.get("data_rc_over"), nrc)
        sm_pages_out: dict[int, bytes] = {}
        sm_dead: list[int] = []
        dirty_sm = np.unique(dirty_rc // _RC_PAGES_PER_SM_PAGE).tolist()
        rc = self.data_rc
        for p in dirty_sm:  # one numpy step per bitmap page: slices, no gather
            counts = rc[p * SM_PER_PAGE:(p + 1) * SM_PER_PAGE]
            if len(counts) < SM_PER_PAGE:  # the last page of a data device that ends inside it
                counts = np.concatenate([counts, np.zeros(SM_PER_PAGE - len(counts), np.uint32)])
            if counts.any():
                sm_pages_out[p] = _pack_bitmap(counts).tobytes()
            elif sm_have[p]:
                sm_dead.append(p)
        over_out: dict[int, bytes] = {}
        over_dead: list[int] = []
        for i in range(0, len(dirty_rc), _CHUNK * _RC_PAGES_PER_SM_PAGE):
            pages = dirty_rc[i:i + _CHUNK * _RC_PAGES_PER_SM_PAGE]
            block = rc.reshape(-1, RC_PER_PAGE)[pages]
            high = block >= 3
            nonzero = high.any(axis=1)
            rows = np.flatnonzero(nonzero)
            if len(rows):
                raw = (block[rows] * high[rows]).astype(np.uint32, copy=False).tobytes()  # counts < 3 -> 0
                for k, p in enumerate(pages[rows].tolist()):
                    over_out[p] = raw[k * BLOCK:(k + 1) * BLOCK]
            over_dead += [p for p in pages[~nonzero].tolist() if over_have[p]]
        out = {"data_sm": PageUpdates(nsm, sm_pages_out, dead=sm_dead),
               "data_rc_over": PageUpdates(nrc, over_out, dead=over_dead)}
        if old_layout:
            out[OLD_ARRAY] = PageUpdates(0, {})
        return out

    def disk_pages(self) -> int:
        """Metadata pages the space map takes on disk for the current counts: the bitmap pages that
        are not all zeroes and the count pages holding a count of 3 or more (a scan of the counts)."""
        pages = self.data_rc.reshape(-1, RC_PER_PAGE)
        over = int(np.count_nonzero((pages >= 3).any(axis=1)))
        used = (pages != 0).any(axis=1)
        used = np.concatenate([used, np.zeros(-len(used) % _RC_PAGES_PER_SM_PAGE, bool)])
        return over + int(np.count_nonzero(used.reshape(-1, _RC_PAGES_PER_SM_PAGE).any(axis=1)))

    def to_punch(self, blocks: np.ndarray) -> np.ndarray:
        """Those of ``blocks`` a discard passed down (``PASSDOWN``): to be punched when released."""
        blocks = np.asarray(blocks, np.int64)
        return blocks[(self.freed_txn[blocks] & K.BLOCK_PASSDOWN) != 0]

    def mark_stale(self, blocks: np.ndarray) -> None:
        """Free ``blocks`` hold bytes: a reuse must zero what its write does not cover."""
        self.freed_txn[np.asarray(blocks, np.int64)] |= K.BLOCK_STALE

    def stale_count(self) -> int:
        """Free blocks marked as possibly holding old bytes."""
        n = self.nr_blocks
        return int(np.count_nonzero(((self.freed_txn[:n] & K.BLOCK_STALE) != 0) & (self.data_rc[:n] == 0)))

    def allocatable_mask(self) -> np.ndarray:
        """Per block: free and allocatable now (free at the last commit, not freed in this
        transaction nor by the last commit)."""
        n = self.nr_blocks
        return (self.data_rc[:n] == 0) & ((self.freed_txn[:n] & K.BLOCK_STATE) == 0)

    def clear_stale(self, mask_or_blocks: np.ndarray) -> None:
        """The given free blocks are holes now (punched): clear ``STALE`` and ``PASSDOWN``."""
        f = self.freed_txn
        if mask_or_blocks.dtype == np.bool_:
            f[: len(mask_or_blocks)][mask_or_blocks] &= np.uint8(K.BLOCK_STATE)
        else:
            f[mask_or_blocks] &= np.uint8(K.BLOCK_STATE)

    def resize(self, nr_blocks: int) -> None:
        """Grow to ``nr_blocks`` (shrinking is not supported, as in dm-thin)."""
        cap = _round_up(nr_blocks, 1 << K.RC_PAGE_BITS)
        self.st[K.ST_EPOCH] += 1
        if cap > len(self.data_rc):
            extra = cap - len(self.data_rc)
            self.data_rc = np.concatenate([self.data_rc, np.zeros(extra, np.uint32)])
            self.freed_txn = np.concatenate([self.freed_txn, np.zeros(extra, np.uint8)])
            self.rc_dirty = np.concatenate([self.rc_dirty, np.ones(extra >> K.RC_PAGE_BITS, np.uint8)])
        self.st[K.ST_NR_BLOCKS] = nr_blocks
        self.recount()


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
_DECODE_CHUNK = 1 << 24


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
    bitmap = arrays["data_sm"]
    over = arrays["data_rc_over"].view(np.uint32)
    out = np.zeros(cap, np.uint32)
    n = min(len(bitmap) * 4, cap)
    for a in range(0, n, _DECODE_CHUNK):  # four counts a byte, through a table, a chunk at a time
        b = min(n, a + _DECODE_CHUNK)
        out[a:b] = _UNPACK[bitmap[a // 4:(b + 3) // 4]].reshape(-1)[: b - a]
    m = min(len(over), cap)
    three = np.flatnonzero(out[:m] == 3)
    if len(three):
        vals = over[three]
        bad = three[vals < 3]
        if len(bad):
            raise MetadataCorrupt(f"data space map: block {int(bad[0])} has a count of 3 or more in the bitmap but "
                                  f"an overflow count of {int(over[bad[0]])}", structure="data space map")
        out[three] = vals
    if over_locs is None:
        stray = np.flatnonzero(over[:m] != 0)
    else:  # absent pages read as zeroes: search the stored ones (a pool's few blocks of count >= 3)
        pages = np.flatnonzero(stored_pages(over_locs, m // RC_PER_PAGE))
        by_page = over[: m // RC_PER_PAGE * RC_PER_PAGE].reshape(-1, RC_PER_PAGE)
        stray = (pages[:, None] * RC_PER_PAGE + np.arange(RC_PER_PAGE)[None, :])[by_page[pages] != 0]
        tail = over[m // RC_PER_PAGE * RC_PER_PAGE:m]
        stray = np.concatenate([stray, m // RC_PER_PAGE * RC_PER_PAGE + np.flatnonzero(tail != 0)])
    if len(stray) != len(three):
        b = int(np.setdiff1d(stray, three)[0])
        raise MetadataCorrupt(f"data space map: block {b} has an overflow count ({int(over[b])}) but a bitmap "
                              f"count of {int(out[b])}", structure="data space map")
    if (out[nr_blocks:] != 0).any():
        raise MetadataCorrupt(f"data space map: a block past the data device's {nr_blocks} blocks is counted",
                              structure="data space map")
    return out


def _pack_bitmap(counts: np.ndarray) -> np.ndarray:
    """Two bits per count, ``min(count, 3)``, four counts per byte (count i in bits 2*(i%4)..+1)."""
    c = np.minimum(counts, 3).astype(np.uint8)
    return c[0::4] | (c[1::4] << 2) | (c[2::4] << 4) | (c[3::4] << 6)


def stored_pages(locs: Any, n: int) -> np.ndarray:
    """Per page of an array as committed (its page locations from the metadata store, block << 32 | ...):
    whether the page is stored (an absent page reads as zeroes)."""
    out = np.zeros(n, bool)
    if locs is not None and len(locs):
        have = np.frombuffer(memoryview(locs).cast("B"), np.uint64)[:n] >> np.uint64(32) != 0
        out[: len(have)] = have
    return out


