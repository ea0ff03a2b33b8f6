"""The metadata space map: which blocks of the metadata file the current state, the last commit and
the held metadata snapshot use, and the allocation of fresh blocks for a commit.

One byte per metadata block holds two bits: ``_USED`` (reachable from the current, uncommitted state)
and ``_PROTECTED`` (reachable from the last commit or the held snapshot).  A commit writes only to a
block whose byte is 0, so it never overwrites committed state (shadowing).  The map is built lazily from the
page locations after a load; a *tail commit* (a few pages, nothing built) allocates past the highest
used block instead.  :class:`MetadataSpace` is a mixin of :class:`thinpool.mdstore.MetadataStore`,
whose locations and header it reads.  Plain Python; numpy only when a caller loaded it (see
:func:`_zeros`): then a commit of many pages releases and allocates array-at-a-time.
"""

from __future__ import annotations

import sys
from array import array
from typing import Any, Iterable

from .errors import MetadataSpaceExhausted
from .mdpages import _HI, PM_ENTRIES, SUPERBLOCKS, sorted_unique

_USED = 1       # state bit: reachable from the current (uncommitted) state
_PROTECTED = 2  # state bit: reachable from the last commit or from the held metadata snapshot
_PROTECT_USED = bytes(3 if x & _USED else 0 for x in range(256))  # after a commit: protected := used
#: the superblock field holding the last commit's hints (:meth:`MetadataSpace.hint`)
HINTS = "hints"


def _mark(state: bytearray, blocks: Iterable[int], bits: int) -> None:
    n = len(state)
    for b in blocks:
        if 0 < b < n:
            state[b] |= bits


def _mark_locs(state: bytearray, locs: Any, bits: int) -> None:
    """:func:`_mark` the blocks of page locations ``locs`` (``block << 32 | crc``): with numpy when a
    caller loaded it and the array is long (the overflow counts of a 1 PiB pool have 2^24 pages: a
    Python step each took 1.4 s), else one Python step per location."""
    np = sys.modules.get("numpy")
    if np is None or not isinstance(locs, array) or len(locs) < 4096:
        _mark(state, (loc >> 32 for loc in locs), bits)
        return
    # most entries of a big pool's sparse arrays are 0 (absent pages): only the others are shifted and
    # filtered (shifting and masking all 2^24 of them made three temporaries of 128 MiB: 0.25-0.6 s)
    high = np.frombuffer(memoryview(locs).cast("B"), np.uint32)[_HI::2]  # (the block: the high half)
    blocks = high[high.nonzero()[0]].astype(np.int64)  # (flatnonzero would copy the strided view)
    blocks = blocks[blocks < len(state)]
    view = np.frombuffer(state, np.uint8)
    view[blocks] |= np.uint8(bits)
    del view  # the bytearray must not stay exported (resize() extends it)


#: fewest blocks a commit allocates array-at-a-time (when numpy is loaded): fewer go block by block
_NP_MIN = 32
#: most block-state changes (each block allocated or released, listed one by one) a commit's map is
#: rewritten from block by block (:meth:`MetadataSpace._commit_state`); more go array-at-a-time
_FEW_CHANGED = 128


def _allocate_np(np: Any, state: bytearray, undo: list | None, count: int, path: str, nr_blocks: int,
                 start: int = 0) -> list[int]:
    """:meth:`MetadataSpace._allocate` with numpy: the ``count`` lowest zero bytes of ``state`` at or
    after ``start`` (then the lowest before it), found in windows of growing size (the used blocks are
    mostly at the front), marked used."""
    view = np.frombuffer(state, np.uint8)
    try:
        found, need = [], count
        for lo, hi in ((start, len(view)), (0, start)):
            pos, win = lo, max(4096, 4 * count)
            while need and pos < hi:
                z = np.flatnonzero(view[pos:min(pos + win, hi)] == 0)[:need]
                if len(z):
                    found.append(z + pos)
                    need -= len(z)
                pos += win
                win *= 2
        if need:  # nothing changed yet
            raise MetadataSpaceExhausted(
                f"{path}: out of metadata space ({nr_blocks} blocks, {count - need} free, {count} needed "
                f"for this commit)")
        out = np.concatenate(found)
        if undo is not None:
            undo.append((out, np.zeros(len(out), np.uint8)))
        view[out] = _USED
    finally:
        del view  # the bytearray must not stay exported (resize() extends it)
    return out.tolist()


def _zeros(state: bytearray) -> int:
    """Free blocks of a state: its zero bytes (numpy's count when a caller loaded numpy: 40x faster
    than ``bytearray.count`` on a large metadata file; this module itself stays without numpy)."""
    np = sys.modules.get("numpy")
    if np is None:
        return state.count(0)
    return len(state) - int(np.count_nonzero(np.frombuffer(state, np.uint8)))


class MetadataSpace:
    """The block-state map and allocation of a :class:`~thinpool.mdstore.MetadataStore` (a mixin)."""

    path: str
    nr_blocks: int
    generation: int
    header: dict[str, Any]
    locs: dict[str, array]
    pm_locs: dict[str, array]
    dir_locs: list[int]
    held_blocks: list[int]
    _state: bytearray | None
    _tail: int | None
    _tail_released: int
    _undo: list[tuple[int, int]] | None  # in a commit: (block, state before) of every change, to undo
    _hint: int = 0  # where _allocate looks for a free block first (see _reserve_run)
    #: (the block-state map, its free blocks) as the last commit counted them; a change of the map in
    #: place (a commit under way, a resize, a hold) drops it
    _free_known: tuple[bytearray, int] | None = None

    @property
    def state(self) -> bytearray:
        """Per metadata block, whether the current state (_USED) or the last commit or the held
        snapshot (_PROTECTED) uses it."""
        if self._state is None:
            state = bytearray(self.nr_blocks)
            state[:SUPERBLOCKS] = bytes([_USED]) * SUPERBLOCKS
            for arr in list(self.locs.values()) + list(self.pm_locs.values()) + [self.dir_locs]:
                _mark_locs(state, arr, _USED)
            self._state = self._protected(state)
        return self._state

    def _protected(self, state: bytearray) -> bytearray:
        """``state`` after a commit: what is used is what the committed state (and the held one) uses."""
        out = state.translate(_PROTECT_USED)  # (a new bytearray)
        _mark(out, self.held_blocks, _PROTECTED)
        return out

    def _commit_state(self, free_before: int | None) -> tuple[bytearray, int, int]:
        """The block-state map a commit makes (:meth:`_protected` of the current one), its used blocks
        and its highest block that the new state uses, for the superblock.

        ``free_before``: the free blocks of the map when the commit began, if known (the last commit
        counted them and nothing changed the map since).  Then, with no metadata snapshot held and
        numpy loaded, only the blocks the commit changed -- those in its undo list -- are rewritten,
        in place, and the count follows from theirs: the work is the commit's, not the metadata
        file's (a translate and a count of a 512 KiB map took 0.2 ms a commit).  This relies on what
        every committed map is without a held snapshot: each byte 0 or ``_USED | _PROTECTED``; in a
        commit an allocated block is ``_USED`` (was 0) and a released one ``_PROTECTED`` (was both).
        The rewrite is in the undo list too: a commit that fails puts the map back as it was.  A
        small commit's (at most :data:`_FEW_CHANGED` changes, each of one block) is made block by
        block: the numpy steps cost more there (about 20 us of a one-write commit's 25)."""
        np = sys.modules.get("numpy")
        undo = self._undo
        if np is None or free_before is None or self.held_blocks or undo is None or self._state is None:
            committed = self._protected(self.state)
            return committed, self.nr_blocks - _zeros(committed), committed.rfind(_USED | _PROTECTED)
        state = self._state
        many = [b for b, _v in undo if hasattr(b, "dtype")]
        if not many and len(undo) <= _FEW_CHANGED:  # (a small commit: a step per block costs less than numpy's)
            allocated = released = 0
            for b in {b for b, _v in undo}:  # (each block once: the undo list may name it twice)
                was_b = state[b]
                if was_b == _USED:
                    allocated += 1
                elif was_b == _PROTECTED:
                    released += 1
                undo.append((b, was_b))
                state[b] = (_USED | _PROTECTED) if was_b & _USED else 0
            used = self.nr_blocks - free_before + allocated - released
            return state, used, state.rfind(_USED | _PROTECTED)
        parts = [np.asarray(b, np.int64) for b in many]
        few = [b for b, _v in undo if not hasattr(b, "dtype")]
        if few:
            parts.append(np.array(few, np.int64))
        blocks = sorted_unique(np, np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        view = np.frombuffer(state, np.uint8)
        try:
            was = view[blocks]
            allocated = int(np.count_nonzero(was == _USED))
            released = int(np.count_nonzero(was == _PROTECTED))
            undo.append((blocks, was))
            view[blocks] = (was & _USED) * (_USED | _PROTECTED)
        finally:
            del view  # the bytearray must not stay exported (resize() extends it)
        used = self.nr_blocks - free_before + allocated - released
        return state, used, state.rfind(_USED | _PROTECTED)

    def blocks_in_use(self) -> list[int]:
        """Metadata blocks reachable from the current state (superblocks included)."""
        return [b for b, s in enumerate(self.state) if s & _USED]

    def used_blocks(self) -> int:
        """Metadata blocks in use by the current state (including superblocks and held blocks)."""
        if self._state is None and "metadata_used_blocks" in self.header:
            return int(self.header["metadata_used_blocks"])  # counted by the commit that wrote it
        return self.nr_blocks - _zeros(self.state)

    def free_blocks(self) -> int:
        """Blocks free now (neither used by the current state nor protected)."""
        known = self._free_known
        if known is not None and known[0] is self._state:
            return known[1]  # counted by the commit that made this state (nothing changed it since)
        return _zeros(self.state)

    def _allocate(self, count: int) -> list[int]:
        """``count`` blocks free now and unused by the last commit (never overwrite committed state):
        the lowest such blocks, in order."""
        if self._tail is not None:
            out = list(range(self._tail, self._tail + count))
            self._tail += count
            return out
        state = self.state
        undo = self._undo
        np = sys.modules.get("numpy")
        if np is not None and count >= _NP_MIN:
            out = _allocate_np(np, state, undo, count, self.path, self.nr_blocks, self._hint)
            self._hint = out[-1] + 1 if out else self._hint
            return out
        out = []
        pos = self._hint
        for _ in range(count):
            found = state.find(0, pos)
            if found < 0 and pos:  # past the run a commit reserved: the lowest free block
                found = state.find(0)
            if found < 0:  # (the commit puts the state back as it was)
                raise MetadataSpaceExhausted(
                    f"{self.path}: out of metadata space ({self.nr_blocks} blocks, {state.count(0) + len(out)} "
                    f"free, {count} needed for this commit)")
            if undo is not None:
                undo.append((found, 0))
            state[found] = _USED
            out.append(found)
            pos = found + 1
        self._hint = pos
        return out

    def _reserve_run(self, need: int) -> None:
        """Make the next allocations start at a run of ``need`` consecutive free blocks, if there is one
        close above the lowest free block (within ``4 * need + 64`` blocks: blocks written before, not
        fresh ones of the sparse file), so that a commit's pages go out in one write (and its flush
        writes one range); else at the lowest free block, as without it.  Only where the allocations
        start changes: every block handed out is still free now and unused by the last commit."""
        self._hint = 0
        if need <= 1:
            return
        state = self.state
        first = state.find(0)
        if first < 0:
            return
        run = state.find(bytes(need), first, first + 5 * need + 64)
        if run > 0:
            self._hint = run

    def _resized(self, locs: array | None, n: int) -> array:
        """A location array grown (zeros) or shrunk (releasing the dropped pages' blocks) to ``n``."""
        locs = array("Q") if locs is None else locs
        if len(locs) == n:
            return locs
        if len(locs) > n:
            self._release(locs[n:])
            return locs[:n]
        return locs + array("Q", bytes(8 * (n - len(locs))))

    def _release(self, locs: Iterable[int]) -> None:
        """The blocks of page locations ``locs`` (``block << 32 | crc``; 0: no block) are no longer
        used by the current state.  A numpy array of locations is released array-at-a-time."""
        if hasattr(locs, "dtype"):
            self._release_np(locs)
            return
        if self._tail is not None:  # a tail commit: released blocks only need counting
            self._tail_released += sum(1 for loc in locs if loc >> 32)
            return
        state = self.state
        undo = self._undo
        for loc in locs:
            b = loc >> 32
            if b:
                if undo is not None:
                    undo.append((b, state[b]))
                state[b] &= ~_USED

    def _release_np(self, locs: Any) -> None:
        np = sys.modules["numpy"]
        blocks = locs >> np.uint64(32)
        blocks = blocks[blocks != 0].astype(np.int64)
        if self._tail is not None:
            self._tail_released += len(blocks)
            return
        view = np.frombuffer(self.state, np.uint8)
        try:
            if self._undo is not None:
                self._undo.append((blocks, view[blocks]))  # (fancy indexing copies)
            view[blocks] &= np.uint8(0xFF & ~_USED)
        finally:
            del view  # the bytearray must not stay exported (resize() extends it)

    def _undo_changes(self, undo: list[tuple[Any, Any]]) -> None:
        """Put the block states a failed commit changed back, latest change first."""
        state = self._state
        assert state is not None
        for b, v in reversed(undo):
            if hasattr(b, "dtype"):  # a change made array-at-a-time: the first old state of a block wins
                np = sys.modules["numpy"]
                view = np.frombuffer(state, np.uint8)
                view[b[::-1]] = v[::-1]
                del view
            else:
                state[b] = v

    #: (the page maps it was counted for, commit_floor, the arrays with a stored page); a commit
    #: carries it over, counting again only the arrays it changed
    _floor: tuple[Any, int, int] | None = None

    def commit_floor(self) -> int:
        """Fresh blocks a small commit may need: a page and its page-map page in every array with a
        stored page, and the directory (the least metadata reserve that lets such a commit through).
        Counted once per committed state (the pool asks twice per commit)."""
        cached = self._floor
        if cached is not None and cached[0] is self.pm_locs:
            return cached[1]
        stored = sum(1 for pml in self.pm_locs.values() if any(pml))
        n = 2 * stored + max(1, len(self.dir_locs))
        self._floor = (self.pm_locs, n, stored)
        return n

    def estimate_commit_blocks(self, arrays: dict[str, Any]) -> int:
        """Upper bound of fresh blocks a commit of ``arrays`` needs."""
        n = 0
        for pa in arrays.values():
            n += len(pa.dirty) + len(pa.dirty) // PM_ENTRIES + 2
        return n + 4

    def top_located(self) -> int:
        """The highest metadata block the committed state's pages, page maps and directory use (the
        superblocks at least), from their locations."""
        top = SUPERBLOCKS - 1
        for arr in list(self.locs.values()) + list(self.pm_locs.values()):
            if len(arr):
                top = max(top, max(memoryview(arr).cast("B").cast("I")[_HI::2]))
        return max([top] + [loc >> 32 for loc in self.dir_locs])

    def hint(self, name: str) -> int | None:
        """A value the last commit recorded with the state it wrote (``metadata_top``: the highest
        metadata block that state uses; a caller's, e.g. ``dev_id_max``: see
        :meth:`thinpool.mdstore.MetadataStore.commit`), or None if that commit did not record it.  A
        hint is tagged with the generation of the commit that wrote it: one carried over unchanged by a
        commit that did not know it (an older thinpool) is stale and ignored, so a hint is never
        trusted for a state it was not computed for."""
        hints = self.header.get(HINTS)
        if not isinstance(hints, dict) or hints.get("generation") != self.generation:
            return None
        value = hints.get(name)
        return value if type(value) is int and value >= 0 else None

    def _tail_start(self, arrays: dict[str, Any]) -> int | None:
        """Where a *tail commit* starts, or None for an ordinary one.

        A store that has not built its block-state map (a :class:`~thinpool.devtable.DeviceTable`
        committing a snapshot: a few pages) need not build it -- about one Python step per page of the
        whole pool -- when the file has room past the highest block the committed state uses: every
        block there is free.  The new pages go there; released blocks are only counted (a later
        ordinary commit reuses them).  Not with a held metadata snapshot (its blocks are not in the
        locations) or without the committed count of used blocks."""
        if self._state is not None or self.held_blocks or "metadata_used_blocks" not in self.header:
            return None
        top = self.hint("metadata_top")  # recorded by the commit that wrote this state
        if top is None:  # (a commit that did not record it: one Python step per page of the pool)
            top = self.top_located()
        need = self.estimate_commit_blocks(arrays) + len(self.dir_locs) + 8
        if top + 1 + need > self.nr_blocks:
            return None
        return top + 1
