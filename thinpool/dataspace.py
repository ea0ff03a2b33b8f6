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
first commit writes the new layout and releases the old pages.  The pages themselves -- sparse count
arrays, sizes, decoding and packing -- are :mod:`thinpool.spacemap_pages`'.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from . import schema as K
from .mdpages import BLOCK, PageUpdates
from .spacemap_pages import (_CHUNK, _RC_PAGES_PER_SM_PAGE, OLD_ARRAY, RC_PER_PAGE, SM_PER_PAGE, StoredCounts,
                             _compiled_pack, _disk_updates_compiled, _pack_bitmap, _round_up, _stored_few, sm_pages,
                             stored_at,
                             zeroed)

#: page flags from which :func:`flagged` scans them a word of eight at a time (fewer: one numpy step)
_WORDS_FROM = 1 << 16
#: dirty count pages up to which :meth:`DataSpaceMap.freed_blocks` looks at each page on its own
_FEW_PAGES = 16
#: per state byte: 1 if it marks a block freed in this transaction (``freed_blocks``' scan of a page)
_FREED_BYTES = bytes(int(b & K.BLOCK_STATE == K.BLOCK_FREED) for b in range(256))


class DataSpaceMap:
    """Reference counts, the freed-this-transaction marks and page dirty flags for the data device.

    ``rc_live`` marks the 1,024-block pages that may hold a nonzero count or state byte (pages touched
    since the map was loaded, as of the last commit; with ``rc_dirty``, which marks those touched since):
    every scan of the map visits only those pages, so its cost -- and the memory of a sparse map --
    follows the blocks in use, not the size of the data device."""

    def __init__(self, st: np.ndarray, nr_blocks: int, data_rc: "np.ndarray | StoredCounts | None" = None,
                 live: np.ndarray | None = None) -> None:
        """``data_rc``: the counts (used in place when it has the right length and is writable), or the
        stored pages not yet decoded (:class:`StoredCounts`: decoded when the counts are first used);
        ``live``: per page, whether it may hold a nonzero count (computed from ``data_rc`` if not given)."""
        self.st = st
        cap = _round_up(max(nr_blocks, 1), 1 << K.RC_PAGE_BITS)
        npages = cap >> K.RC_PAGE_BITS
        if isinstance(data_rc, StoredCounts):
            # ``data_rc`` and ``rc_live`` stay unset until first used (``__getattr__``)
            self._stored: StoredCounts | None = data_rc
            self.freed_txn = zeroed(cap, np.uint8)
            self.rc_dirty = np.zeros(npages, np.uint8)
            self.pending = np.zeros(0, np.int64)
            st[K.ST_NR_BLOCKS] = nr_blocks
            st[K.ST_NR_FREE] = st[K.ST_NR_ALLOCATABLE] = nr_blocks - data_rc.used()
            return
        self._stored = None
        if data_rc is not None and len(data_rc) == cap and data_rc.flags.writeable:
            self.data_rc = data_rc  # the loaded pages, used in place
        else:
            self.data_rc = zeroed(cap, np.uint32)
            if data_rc is not None:
                n = min(len(data_rc), cap)
                self.data_rc[:n] = data_rc[:n]
                live = None
        self.freed_txn = zeroed(cap, np.uint8)  # BlockState bits
        self.rc_dirty = np.zeros(npages, np.uint8)
        if live is None:
            live = (self.data_rc.reshape(-1, RC_PER_PAGE) != 0).any(axis=1) if data_rc is not None else None
        self.rc_live = np.zeros(npages, np.uint8)
        if live is not None:
            self.rc_live[: len(live)] = np.asarray(live, bool)[:npages]
        self.pending = np.zeros(0, np.int64)  # freed by the last commit, released by the next
        st[K.ST_NR_BLOCKS] = nr_blocks
        self.recount(states=False)  # no state bit is set yet

    def __getattr__(self, name: str) -> Any:
        """``data_rc`` and ``rc_live`` of a map made from :class:`StoredCounts`: decoded on first use
        (then they are plain attributes, and this is never called for them again)."""
        stored = self.__dict__.get("_stored")
        if name not in ("data_rc", "rc_live") or stored is None:
            raise AttributeError(name)
        counts, live = stored.decode()
        self.data_rc = counts
        self.rc_live = np.zeros(len(self.rc_dirty), np.uint8)
        self.rc_live[: len(live)] = live[: len(self.rc_live)]
        self._stored = None
        return self.__dict__[name]

    @property
    def decoded(self) -> bool:
        """Whether the counts are in memory (False until a map made from stored pages is first used)."""
        return self._stored is None

    # ------------------------------------------------------------------ the pages in use
    def live_pages(self) -> np.ndarray:
        """Pages that may hold a nonzero count or state byte (live at the last commit or dirty since)."""
        return flagged(self.rc_live | self.rc_dirty)

    def _live_blocks(self, extra: np.ndarray | None = None) -> Any:
        """The blocks of the live pages (below ``nr_blocks``) as an index for the per-block arrays: a
        slice of all blocks when most pages are live (a contiguous scan is faster than a gather)."""
        n = self.nr_blocks
        pages = self.live_pages()
        if extra is not None:
            pages = np.union1d(pages, extra)
        if len(pages) * 4 >= len(self.rc_dirty):
            return slice(0, n)
        idx = (pages[:, None] * RC_PER_PAGE + np.arange(RC_PER_PAGE)[None, :]).reshape(-1)
        return idx[idx < n] if len(idx) and idx[-1] >= n else idx

    def _touch(self, blocks: np.ndarray) -> None:
        """Blocks whose state byte is set outside a kernel: their pages are live (a page named more than
        once is set more than once: no sort to make them distinct, which cost more than the stores)."""
        if len(blocks):
            self.rc_live[np.asarray(blocks, np.int64) >> K.RC_PAGE_BITS] = 1

    def committed(self) -> None:
        """After a durable commit: the pages changed in it stay live, none is dirty (only those pages
        written: a 1 PiB pool has 2^24 of them)."""
        pages = flagged(self.rc_dirty)
        self.rc_live[pages] = 1
        self.rc_dirty[pages] = 0

    def live_page_count(self) -> int:
        """Pages of 1,024 blocks that may hold a nonzero count (the memory the counts take: 4 KiB of
        counts and 1 KiB of state bytes each, when the map is a sparse one)."""
        if self._stored is not None:  # (nothing is dirty before the counts are first used)
            return self._stored.live_count()
        dirty = flagged(self.rc_dirty)  # (no temporary the size of the map)
        return int(np.count_nonzero(self.rc_live)) + int(np.count_nonzero(self.rc_live[dirty] == 0))

    def inherit_stale(self, old: "DataSpaceMap | None") -> None:
        """After a reload (abort, rollback) from ``old``, the map in use until now: every block free
        here that ``old`` marked stale or had in use may hold bytes -- mark it ``STALE``."""
        if old is None:
            return
        sel = old._live_blocks()
        if isinstance(sel, slice):
            sel = slice(0, min(old.nr_blocks, self.nr_blocks))
        else:
            sel = sel[sel < self.nr_blocks]
        held = (old.data_rc[sel] > 0) | ((old.freed_txn[sel] & K.BLOCK_STALE) != 0)
        stale = held & (self.data_rc[sel] == 0)
        if isinstance(sel, slice):
            stale = np.flatnonzero(stale)
        else:
            stale = sel[stale]
        self.freed_txn[stale] |= K.BLOCK_STALE
        self._touch(stale)

    @property
    def arrays(self) -> tuple:
        """The ``space`` tuple every kernel takes: (data_rc, freed_txn, rc_dirty) (see
        :mod:`thinpool.kernels_map`)."""
        return (self.data_rc, self.freed_txn, self.rc_dirty)

    @property
    def nr_blocks(self) -> int:
        return int(self.st[K.ST_NR_BLOCKS])

    def recount(self, states: bool = True) -> None:
        """Recompute the free counters from the counts (after load, import or a commit); scans the
        live pages only.  ``states=False``: no block has a state bit (a new map), so the state bytes
        are not scanned (on a 100,000,000-block map that scan is a third of the cost)."""
        sel = self._live_blocks()
        used = int(np.count_nonzero(self.data_rc[sel]))
        free = self.nr_blocks - used
        self.st[K.ST_NR_FREE] = free
        held = int(np.count_nonzero(self.freed_txn[sel] & K.BLOCK_STATE)) if states else 0
        self.st[K.ST_NR_ALLOCATABLE] = free - held

    def add_refs(self, blocks: np.ndarray) -> None:
        """One more reference to each entry of ``blocks`` (a block listed twice gains two): import
        (:mod:`thinpool.pool_ir`), one per entry of every distinct leaf; call :meth:`recount` after."""
        if len(blocks) == 0:
            return
        ublocks, counts = np.unique(np.asarray(blocks, np.int64), return_counts=True)
        self.data_rc[ublocks] += counts.astype(np.uint32)
        self.rc_dirty[np.unique(ublocks >> K.RC_PAGE_BITS)] = 1

    def drop_refs(self, blocks: np.ndarray) -> int:
        """One reference less for each distinct entry of ``blocks`` (the undo of :meth:`add_refs` of
        a set); a block reaching 0 is freed in this transaction, as a kernel's ``dec_data`` frees it
        (``FREED`` and ``STALE``: it keeps its bytes; allocatable after the commits).  Returns how
        many were freed."""
        ublocks = np.unique(np.asarray(blocks, np.int64))
        if len(ublocks) == 0:
            return 0
        self.data_rc[ublocks] -= np.uint32(1)
        self.rc_dirty[np.unique(ublocks >> K.RC_PAGE_BITS)] = 1
        zero = ublocks[self.data_rc[ublocks] == 0]
        self.freed_txn[zero] = np.uint8(K.BLOCK_FREED | K.BLOCK_STALE)
        self.st[K.ST_NR_FREE] += len(zero)
        return len(zero)

    def used(self) -> int:
        return self.nr_blocks - int(self.st[K.ST_NR_FREE])

    def freed_blocks(self) -> np.ndarray:
        """Blocks freed in this transaction, in order (a block freed has its count page dirty: only
        those pages are scanned -- or, when they are most of the map, the whole map at once, which
        costs less than gathering them)."""
        dirty = self.rc_dirty
        pages = flagged(dirty)
        if len(pages) == 0:
            return np.zeros(0, np.int64)
        state = np.uint8(K.BLOCK_STATE)
        f = self.freed_txn
        if len(pages) * 4 >= len(dirty):
            hits = ((f & state) == K.BLOCK_FREED).nonzero()[0]
            return hits[dirty[hits >> K.RC_PAGE_BITS] != 0]
        if len(pages) <= _FEW_PAGES:
            # a small transaction: each page's state bytes looked at in place, a page without a freed
            # block passed over by one C scan of its bytes (most commits free nothing)
            parts = []
            for p in pages.tolist():
                lo = p * RC_PER_PAGE
                if f[lo:lo + RC_PER_PAGE].tobytes().translate(_FREED_BYTES).find(1) >= 0:
                    parts.append(((f[lo:lo + RC_PER_PAGE] & state) == K.BLOCK_FREED).nonzero()[0] + lo)
            if len(parts) == 1:
                return parts[0]
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return _freed_in_pages(f, pages)

    def set_pending(self, blocks: np.ndarray) -> None:
        """Blocks freed by the commit just made: reserved until the next commit is durable."""
        self.pending = np.asarray(blocks, np.int64)
        f = self.freed_txn
        f[self.pending] = (f[self.pending] & ~np.uint8(K.BLOCK_STATE)) | K.BLOCK_PENDING
        self._touch(self.pending)

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
        dirty_rc = np.arange(nrc) if old_layout else flagged(self.rc_dirty)
        q = dirty_rc // _RC_PAGES_PER_SM_PAGE  # sorted: its distinct values without np.unique's sort
        dirty_sm = q[np.concatenate(([True], q[1:] != q[:-1]))] if len(q) > 1 else q
        pack = _compiled_pack()
        if pack is not None and len(dirty_sm) <= _FEW_PAGES:  # (a few: looked up in Python)
            out = _disk_updates_compiled(pack, self.data_rc, dirty_sm,
                                         _stored_few(committed_locs.get("data_sm"), dirty_sm.tolist()), dirty_rc,
                                         committed_locs.get("data_rc_over"), nsm, nrc)
            if old_layout:
                out[OLD_ARRAY] = PageUpdates(0, {})
            return out
        sm_have = stored_at(committed_locs.get("data_sm"), dirty_sm)
        if pack is not None:
            out = _disk_updates_compiled(pack, self.data_rc, dirty_sm, sm_have.tolist(), dirty_rc,
                                         committed_locs.get("data_rc_over"), nsm, nrc)
        else:
            out = self._disk_updates_numpy(dirty_sm, sm_have, dirty_rc, committed_locs.get("data_rc_over"), nsm, nrc)
        if old_layout:
            out[OLD_ARRAY] = PageUpdates(0, {})
        return out

    def _disk_updates_numpy(self, dirty_sm: np.ndarray, sm_have: np.ndarray, dirty_rc: np.ndarray, over_locs: Any,
                            nsm: int, nrc: int) -> dict[str, PageUpdates]:
        """:meth:`disk_updates` in numpy (the reference of :func:`thinpool.kernels_map.pack_space_pages`,
        and the path of a process that has not loaded numba)."""
        sm_pages_out: dict[int, bytes] = {}
        sm_dead: list[int] = []
        rc = self.data_rc
        for p, have in zip(dirty_sm.tolist(), sm_have.tolist()):  # one numpy step per bitmap page: slices
            counts = rc[p * SM_PER_PAGE:(p + 1) * SM_PER_PAGE]
            if len(counts) < SM_PER_PAGE:  # the last page of a data device that ends inside it
                counts = np.concatenate([counts, np.zeros(SM_PER_PAGE - len(counts), np.uint32)])
            if counts.any():
                sm_pages_out[p] = _pack_bitmap(counts).tobytes()
            elif have:
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
            gone = pages[~nonzero]
            over_dead += gone[stored_at(over_locs, gone)].tolist()
        return {"data_sm": PageUpdates(nsm, sm_pages_out, dead=sm_dead),
                "data_rc_over": PageUpdates(nrc, over_out, dead=over_dead)}

    def disk_pages(self) -> int:
        """Metadata pages the space map takes on disk for the current counts: the bitmap pages that
        are not all zeroes and the count pages holding a count of 3 or more (a scan of the live pages)."""
        live = self.live_pages()
        if len(live) == 0:
            return 0
        pages = self.data_rc.reshape(-1, RC_PER_PAGE)[live]
        over = int(np.count_nonzero((pages >= 3).any(axis=1)))
        used = live[(pages != 0).any(axis=1)]
        return over + len(np.unique(used // _RC_PAGES_PER_SM_PAGE))

    def disk_pages_bound(self) -> int:
        """An upper bound of the metadata pages the space map takes on disk, without a scan: a bitmap
        and an overflow page per live count page, and never more overflow pages than count pages."""
        return min(len(self.rc_dirty), 2 * self.live_page_count())

    def to_punch(self, blocks: np.ndarray) -> np.ndarray:
        """Those of ``blocks`` a discard passed down (``PASSDOWN``): to be punched when released."""
        blocks = np.asarray(blocks, np.int64)
        return blocks[(self.freed_txn[blocks] & K.BLOCK_PASSDOWN) != 0]

    def mark_stale(self, blocks: np.ndarray) -> None:
        """Free ``blocks`` hold bytes: a reuse must zero what its write does not cover."""
        blocks = np.asarray(blocks, np.int64)
        self.freed_txn[blocks] |= K.BLOCK_STALE
        self._touch(blocks)

    def stale_count(self) -> int:
        """Free blocks marked as possibly holding old bytes."""
        sel = self._live_blocks()
        return int(np.count_nonzero(((self.freed_txn[sel] & K.BLOCK_STALE) != 0) & (self.data_rc[sel] == 0)))

    def is_allocatable(self, blocks: np.ndarray) -> np.ndarray:
        """Per entry of ``blocks``: free and allocatable now (free at the last commit, not freed in
        this transaction nor by the last commit)."""
        blocks = np.asarray(blocks, np.int64)
        return (self.data_rc[blocks] == 0) & ((self.freed_txn[blocks] & K.BLOCK_STATE) == 0)

    def held_free_count(self) -> int:
        """Free blocks that are not allocatable now (freed in this transaction or by the last commit)."""
        sel = self._live_blocks()
        return int(np.count_nonzero((self.data_rc[sel] == 0) & ((self.freed_txn[sel] & K.BLOCK_STATE) != 0)))

    def clear_stale_allocatable(self) -> None:
        """Every allocatable block is a hole now (a trim punched them): clear ``STALE`` and ``PASSDOWN``."""
        sel = self._live_blocks()
        f = self.freed_txn
        mask = (self.data_rc[sel] == 0) & ((f[sel] & K.BLOCK_STATE) == 0)
        if isinstance(sel, slice):
            f[sel][mask] &= np.uint8(K.BLOCK_STATE)
        else:
            f[sel[mask]] &= np.uint8(K.BLOCK_STATE)

    def clear_stale(self, blocks: np.ndarray) -> None:
        """The given free blocks are holes now (punched): clear ``STALE`` and ``PASSDOWN``."""
        self.freed_txn[np.asarray(blocks, np.int64)] &= np.uint8(K.BLOCK_STATE)

    def resize(self, nr_blocks: int) -> None:
        """Grow to ``nr_blocks`` (shrinking is not supported, as in dm-thin).  The new pages hold
        zeroes, which is what an absent page stores: they are neither live nor dirty."""
        cap = _round_up(nr_blocks, 1 << K.RC_PAGE_BITS)
        self.st[K.ST_EPOCH] += 1
        if cap > len(self.data_rc):
            self.data_rc = _grown(self.data_rc, cap, self.live_pages())
            self.freed_txn = _grown(self.freed_txn, cap, self.live_pages())
            extra = (cap - len(self.rc_dirty) * RC_PER_PAGE) >> K.RC_PAGE_BITS
            self.rc_dirty = np.concatenate([self.rc_dirty, np.zeros(extra, np.uint8)])
            self.rc_live = np.concatenate([self.rc_live, np.zeros(extra, np.uint8)])
        self.st[K.ST_NR_BLOCKS] = nr_blocks
        self.recount()


def flagged(flags: np.ndarray) -> np.ndarray:
    """The indices of the nonzero entries of ``flags`` (a uint8 array of page flags), in order: found a
    word of eight at a time (most flags of a big pool's maps are 0; ``nonzero`` of 2^24 single bytes
    took 50 ms a call, and a commit made several)."""
    if len(flags) < _WORDS_FROM:
        return np.flatnonzero(flags)
    n8 = len(flags) & ~7
    words = np.flatnonzero(flags[:n8].view(np.uint64)) if n8 else np.zeros(0, np.int64)
    if len(words) * 8 >= n8 // 4:  # many flags set: one scan of the bytes costs less
        return np.flatnonzero(flags)
    idx = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    idx = idx[flags[idx] != 0]
    if n8 < len(flags):
        idx = np.concatenate([idx, np.flatnonzero(flags[n8:]) + n8])
    return idx


def _freed_in_pages(f: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """The blocks of count pages ``pages`` (sorted) whose state byte in ``f`` says freed in this
    transaction, in order: the pages' bytes gathered and masked in place, then one flat scan (a
    two-dimensional ``nonzero`` of the same bytes took four times as long)."""
    g = f.reshape(-1, RC_PER_PAGE)[pages]
    g &= np.uint8(K.BLOCK_STATE)
    hits = np.flatnonzero(g == np.uint8(K.BLOCK_FREED))
    return pages[hits >> K.RC_PAGE_BITS] * RC_PER_PAGE + (hits & (RC_PER_PAGE - 1))


def _grown(a: np.ndarray, n: int, live: np.ndarray) -> np.ndarray:
    """``a`` grown to ``n`` elements of zeroes: a copy of its live pages (all of it when most are)."""
    out = zeroed(n, a.dtype)
    if len(live) * 4 >= len(a) // RC_PER_PAGE:
        out[: len(a)] = a
    else:
        src, dst = a.reshape(-1, RC_PER_PAGE), out[: len(a)].reshape(-1, RC_PER_PAGE)
        for i in range(0, len(live), 4096):
            dst[live[i:i + 4096]] = src[live[i:i + 4096]]
    return out
