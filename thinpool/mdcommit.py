"""The metadata store's commit: a transaction's dirty pages, the page maps that point at them, the
directory and the superblock written to the metadata file, durable in order (a part of
:class:`thinpool.mdstore.MetadataStore`, which this class is a base of; see that module for the file's
layout).

A commit writes only to blocks the last committed state does not use (:mod:`thinpool.mdspace`
picks them), makes every page and its checksum before anything is written, then writes the pages --
one ``pwrite`` per run of consecutive blocks -- and makes the superblock.  A commit of at most
:data:`ONE_FLUSH_PAGES` pages (a *one-flush commit*: every small commit) lists them in its superblock;
after the caller's data flush has returned it writes the superblock to the slot the last commit did
not use, starts the write-back of pages and superblock, lets the caller do its bookkeeping meanwhile
and flushes once.  A load uses such a superblock only if every listed page verifies
(:meth:`thinpool.mdstore.MetadataStore.load`), so power lost in that flush leaves the previous commit.
A larger commit starts its pages' write-back, makes the superblock meanwhile and flushes before it
writes the superblock, then goes on the same way (:data:`START_WRITEBACK`).  A failure at any step
before the superblock's write leaves the committed state as it was (:meth:`MetadataCommit.commit`); a
failed flush after it ends the store's commits.
"""

from __future__ import annotations

import errno
import json
import operator
import os
import struct
import sys
from array import array
from typing import Any, Callable

from .errors import HostIOError, MetadataSpaceExhausted, ReadOnly
from .hostio import start_writeback, sync_or_fail, write_all
from .mdpages import (_SB_HEADER, BLOCK, COMMIT_PAGES, FORMAT_VERSION, MAGIC, PM_ENTRIES, SUPERBLOCKS, _crc32c, _ints,
                      sorted_minus, sorted_unique)
from .mdspace import _NP_MIN, HINTS, MetadataSpace

#: the superblock's JSON encoder (what ``json.dumps(header, separators=(",", ":"))`` gives, made once)
_SB_JSON = json.JSONEncoder(separators=(",", ":"))


#: array names as JSON strings (the directory's keys), made once per name
_JSON_KEYS: dict[str, str] = {}
#: whether a commit starts the write-back of its pages and of its superblock right after their
#: ``pwrite`` (``sync_file_range``), so that their I/O runs while it makes the superblock and while
#: the pool does its bookkeeping; False: the ``fdatasync`` after that work starts it (see
#: :meth:`MetadataCommit.commit`)
START_WRITEBACK = True
#: a commit that writes at most this many pages (array pages, page maps, directory) is a *one-flush
#: commit*: its superblock lists them (:data:`~thinpool.mdpages.COMMIT_PAGES`), the pages and the
#: superblock are written and then flushed together, and a load uses that superblock only if every
#: listed page verifies.  A larger commit flushes its pages before it writes the superblock.  (64
#: entries take about 1.3 KiB of the superblock's 4 KiB.)
ONE_FLUSH_PAGES = 64
#: pages joined into one ``pwrite`` at most (4 MiB)
_RUN_PAGES = 1024
#: a queued (block, page)'s block
_FIRST = operator.itemgetter(0)


def _dir_part(name: str, pml: array) -> str:
    """One array's part of the directory's JSON: its name and its page map's locations."""
    key = _JSON_KEYS.get(name)
    if key is None:
        key = _JSON_KEYS[name] = json.dumps(name)
    return f"{key}: [{', '.join(map(str, pml))}]"


class FileIO:
    """The system calls the store writes through; tests substitute a fault-injecting layer
    (torn writes, lost unflushed writes, short counts, EIO/ENOSPC, a stop at the N-th write)."""

    pwrite = staticmethod(os.pwrite)
    fdatasync = staticmethod(os.fdatasync)


class MetadataCommit(MetadataSpace):
    """The write side of the metadata store: :meth:`commit` and its steps, the superblock, flushes.
    Works on the store's file (``fd``, ``path``), committed state (``header``, ``generation``, ``locs``,
    ``pm_locs``, ``dir_locs``) and block states (:class:`~thinpool.mdspace.MetadataSpace`)."""

    #: the write path (class-level so a test can swap it for every store it opens)
    io: FileIO = FileIO()
    #: the directory the last commit wrote, as :meth:`_directory` made it: (the page maps, their
    #: names in order, each name's part, the parts), or None (none written since the load)
    _dir_last: tuple[dict[str, array], tuple[str, ...], dict[str, int], list[str]] | None = None
    _dir_next: tuple[tuple[str, ...], dict[str, int], list[str]]  # (the commit under way's)
    # what these methods use of the store (set by MetadataStore.__init__; see mdstore.py for each)
    fd: int
    read_only: bool
    failed: str | None
    _rejected_slots: list[int]
    _queued: list[tuple[int, Any]]
    _chunks: list[tuple[Any, memoryview, Any]]
    _sb_written: dict[int, bytes | bytearray]
    #: the pages the commit under way has queued, as ``block << 32 | crc``, while they are at most
    #: :data:`ONE_FLUSH_PAGES`; None past that (or outside a commit)
    _listed: list[int] | None = None

    def _list_pages(self, blocks: list[int], crcs: list[int]) -> None:
        """Note queued pages for the superblock's list (:data:`ONE_FLUSH_PAGES`)."""
        listed = self._listed
        if listed is not None:
            if len(listed) + len(crcs) <= ONE_FLUSH_PAGES:
                listed.extend([b << 32 | c for b, c in zip(blocks, crcs)])
            else:
                self._listed = None

    def _write_pages(self, pages: list[Any], blocks: list[int]) -> list[int]:
        """Queue 4 KiB pages for blocks (written by :meth:`_write_runs`); return their CRCs."""
        crc = _crc32c
        self._queued.extend(zip(blocks, pages))
        crcs = [crc(p) for p in pages]
        self._list_pages(blocks, crcs)
        return crcs

    def _queue_rows(self, np: Any, base: Any, rows: Any, blocks: list[int]) -> list[int]:
        """Queue pages given as rows ``rows`` of ``base`` (a C-contiguous 2-D uint8 array of 4 KiB rows)
        for ``blocks``; return their CRCs.  No page is copied or listed: :meth:`_write_runs` writes
        each run of pages consecutive both in ``base`` and on disk with one ``pwrite`` straight from
        ``base`` (which must not change before the commit has written them)."""
        mv = memoryview(base).cast("B")
        crc = _crc32c
        crcs = [crc(mv[r * BLOCK:(r + 1) * BLOCK]) for r in rows.tolist()]
        self._chunks.append((np.asarray(blocks, np.int64), mv, np.asarray(rows, np.int64)))
        if self._listed is not None:  # (a large commit's blocks are not listed: no list of ints made)
            self._list_pages(_ints(blocks), crcs)
        return crcs

    def _chunk_runs(self, out: list[tuple[Any, int]]) -> None:
        """The pages :meth:`_queue_rows` queued, as (bytes, block) runs into ``out``: one per run of
        consecutive blocks (at most :data:`_RUN_PAGES` pages each), straight from the buffer where the
        run's rows are consecutive there too, else from a copy of its rows gathered in one numpy step."""
        chunks, self._chunks = self._chunks, []
        np = sys.modules["numpy"]
        for blocks, mv, rows in chunks:
            n = len(blocks)
            cut = (np.flatnonzero(np.diff(blocks) != 1) + 1).tolist()
            bl, rl = blocks.tolist(), rows.tolist()
            base = None
            for s, e in zip([0] + cut, cut + [n]):
                for i in range(s, e, _RUN_PAGES):
                    k = min(e - i, _RUN_PAGES)
                    if rl[i + k - 1] - rl[i] == k - 1 and (k < 3 or (np.diff(rows[i:i + k]) == 1).all()):
                        data = mv[rl[i] * BLOCK:(rl[i] + k) * BLOCK]
                    else:
                        if base is None:
                            base = np.frombuffer(mv, np.uint8).reshape(-1, BLOCK)
                        data = base[rows[i:i + k]]
                    out.append((data, bl[i]))

    def _queued_runs(self) -> list[tuple[Any, int]]:
        """The queued pages of a commit as (bytes, block) runs to write: those queued as rows of a
        buffer (:meth:`_chunk_runs`), then those queued one by one, in block order, one run per run of
        consecutive blocks (at most :data:`_RUN_PAGES` pages each), however many arrays they came from.
        Made before the commit's first flush (so that only the writes are left between the flushes)."""
        out: list[tuple[Any, int]] = []
        if self._chunks:
            self._chunk_runs(out)
        queued = sorted(self._queued, key=_FIRST)
        self._queued = []
        i, n = 0, len(queued)
        while i < n:
            j = i + 1
            while j < n and j - i < _RUN_PAGES and queued[j][0] == queued[j - 1][0] + 1:
                j += 1
            out.append((queued[i][1] if j == i + 1 else b"".join([bp[1] for bp in queued[i:j]]), queued[i][0]))
            i = j
        return out

    def _write_runs(self, runs: list[tuple[Any, int]]) -> None:
        """Write the runs :meth:`_queued_runs` made.  The order does not matter to a crash: no
        superblock refers to any of them before the flush after."""
        for data, block in runs:
            write_all(self.io.pwrite, self.fd, data, block * BLOCK, self.path)

    def check_length(self) -> None:
        """The metadata file is still as long as this store knows it (one ``fstat``).  Another program
        that truncates it under the open pool (the pool's lock keeps only thinpool's own programs off)
        takes pages the committed state may use; a commit would then write a superblock referring to
        them, and a big pool's rows mapped from them (:meth:`thinpool.mdstore.MetadataStore.map_into`)
        fault at their next touch (counted by :mod:`thinpool.faultguard`: the pool fails).  A shorter file ends this store's commits
        (``failed``, as a failed flush does: only a reopen, which verifies every page it reaches, may
        commit again) and raises :class:`~thinpool.errors.HostIOError` (EIO) naming it."""
        if self.failed:
            return
        try:
            size = os.fstat(self.fd).st_size
        except OSError as exc:
            raise HostIOError(f"{self.path}: cannot check the metadata file's length: {exc.strerror}",
                              exc.errno or errno.EIO, self.path) from None
        if size < self.nr_blocks * BLOCK:
            self.failed = (f"the metadata file was truncated to {size} bytes under the open pool (it had "
                           f"{self.nr_blocks * BLOCK}): stop whatever truncates it, then reopen the pool "
                           f"(thinpool check; thinpool repair if pages are gone)")
            raise HostIOError(f"{self.path}: {self.failed}", errno.EIO, self.path)

    def commit(self, arrays: dict[str, Any], header: dict[str, Any], *, tail: bool = False,
               hints: dict[str, int] | Callable[[], dict[str, int]] | None = None,
               before_write: Callable[[], None] | None = None,
               before_superblock: Callable[[], None] | None = None,
               while_flushing: Callable[[], None] | None = None) -> None:
        """Write the dirty pages of ``arrays`` (:class:`PagedArray` or :class:`PageUpdates`; arrays not
        named keep their committed pages) and a new superblock carrying ``header``; atomic.

        ``tail=True`` allows a *tail commit* (see :meth:`_tail_start`) for a caller that commits a few
        pages once and goes: it skips building the block-state map of the whole file.  ``hints``: values
        the caller knows of the state it commits (e.g. ``dev_id_max``), stored with it and read back by
        :meth:`hint`, or a function returning them (called once the pages are written, while their
        write-back runs: the superblock's part of a commit is made then); the store adds its own
        ``metadata_top``.  ``before_write``: called once the pages
        are made, before the first of them is written; if it raises, nothing is written and the store is
        as before the call.  ``before_superblock``: called once the pages are written (and,
        in a commit of more than :data:`ONE_FLUSH_PAGES` pages, flushed), before the superblock is
        written (the pool ends its data file's flush there: the data durable before the superblock that
        maps it; that flush runs while the pages are made and written); if it raises, the superblock is
        not written and the store is as before the call (the pages written are in blocks no superblock
        refers to).  ``while_flushing``: called once the superblock is written and its
        write-back started (:data:`START_WRITEBACK`), before its ``fdatasync``: the caller's bookkeeping
        of a commit that can no longer fail but by that flush, whose I/O runs meanwhile; :meth:`commit`
        returns only after the flush returned (a failed one raises, and only a reopen may commit again)."""
        if self.read_only:
            raise ReadOnly(f"{self.path}: metadata is read-only")
        if self.failed:
            raise HostIOError(f"{self.path}: no commit is possible until the pool is reopened ({self.failed})",
                              errno.EIO, self.path)
        self.check_length()
        # the location arrays of the arrays this commit changes are copied (then changed); the others
        # are shared with the committed state, which never changes an array in place
        new_locs = dict(self.locs)
        new_pm = dict(self.pm_locs)
        self._tail, self._tail_released = (self._tail_start(arrays) if tail else None), 0
        self._listed = []  # (the pages it writes, while few enough for a one-flush commit)
        tail_first = self._tail
        # what the commit changes in the block-state map, to put back if it fails: (block, old state)
        self._undo = [] if self._tail is None else None
        known = self._free_known  # (the free blocks of the map as it is now, if counted: _commit_state)
        free_before = known[1] if known is not None and known[0] is self._state else None
        self._free_known = None
        try:
            if self._tail is None:
                self._reserve_run(self._blocks_wanted(arrays))
            np = sys.modules.get("numpy")
            changed: list[tuple[str, array, list[int]]] = []  # arrays whose locations change
            released: list[int] = []  # the locations of the few-page arrays' pages this commit replaces
            few: list[tuple[array, list[int], Any]] = []  # (locations, live dirty pages, array): placed below
            for name, pa in arrays.items():
                npages = pa.npages
                old = new_locs.get(name)
                asked = pa.dirty
                if old is not None and len(old) == npages:
                    if not asked:
                        continue  # nothing of it changes
                    locs = old[:]
                else:
                    locs = self._resized(None if old is None else old[:], npages)
                if np is not None and len(asked) >= _NP_MIN:
                    if few:  # (blocks are given in the order of the arrays, whichever way)
                        self._place(few)
                        few = []
                    dirty = self._commit_pages_np(np, pa, locs, npages)
                else:
                    if len(asked) == 1:  # (most arrays of a small commit)
                        dirty = [asked[0]] if 0 <= asked[0] < npages else []
                    else:
                        dirty = sorted({d for d in asked if 0 <= d < npages})
                    if pa.dead:
                        dead_set = set(pa.dead)
                        live = [d for d in dirty if d not in dead_set]
                    else:
                        live = dirty
                    released.extend([locs[d] for d in dirty])
                    for d in dirty:
                        locs[d] = 0
                    if live:
                        few.append((locs, live, pa))
                new_locs[name] = locs
                changed.append((name, locs, dirty))
            if few:  # the few-page arrays' pages get their blocks in one allocation
                self._place(few)
            # page-map pages that point at changed pages; one whose pages are all absent is absent
            # itself (a page map of zeroes: e.g. the space map of a grown, unused range)
            pm_write: list[tuple[array, int, bytes]] = []
            for name, locs, dirty in changed:
                npm = (len(locs) + PM_ENTRIES - 1) // PM_ENTRIES
                old = new_pm.get(name)
                pml = old[:] if old is not None and len(old) == npm else \
                    self._resized(None if old is None else old[:], npm)
                changed_pm = [dirty[0] // PM_ENTRIES] if len(dirty) == 1 else sorted({d // PM_ENTRIES for d in dirty})
                if changed_pm:
                    released.extend([pml[i] for i in changed_pm])
                    for i in changed_pm:
                        pml[i] = 0
                        pm_page = locs[i * PM_ENTRIES:(i + 1) * PM_ENTRIES]
                        if any(pm_page):
                            pm_write.append((pml, i, pm_page.tobytes().ljust(BLOCK, b"\0")))
                new_pm[name] = pml
            if pm_write:
                blocks = self._allocate(len(pm_write))
                crcs = self._write_pages([page for _pml, _i, page in pm_write], blocks)
                for (pml, i, _page), b, c in zip(pm_write, blocks, crcs):
                    pml[i] = b << 32 | c
            # directory
            directory = self._directory(new_pm, changed)
            ndir = (len(directory) + BLOCK - 1) // BLOCK
            dir_pages = [directory[i * BLOCK:(i + 1) * BLOCK].ljust(BLOCK, b"\0") for i in range(ndir)]
            released.extend(self.dir_locs)
            self._release(released)  # (a released block stays protected: none is handed out again here)
            blocks = self._allocate(ndir)
            crcs = self._write_pages(dir_pages, blocks)
            dir_locs = [b << 32 | c for b, c in zip(blocks, crcs)]
            # every page is made before anything is written; what only the superblock needs -- the
            # block-state map once the commit is durable, the header, the superblock's bytes -- is
            # made while the pages' write-back runs (below)
            runs = self._queued_runs()
            listed: list[int] | None = self._listed  # (None: too many pages for one flush)
            self._listed = None
            if before_write is not None:
                before_write()  # (nothing of the commit is written before it)
            if self._rejected_slots:
                self._clear_rejected()
            self._write_runs(runs)
            if listed is None and START_WRITEBACK and self.io.fdatasync is os.fdatasync:  # (a substituted
                start_writeback(self.fd, 0, 0)  # flush: the tests' model) (the file's dirty pages: the runs)
            header = dict(header)  # (the rest of this block runs while their I/O does)
            header.pop(COMMIT_PAGES, None)  # (only the store writes it, for this commit's pages)
            if "held" in self.header:
                header["held"] = self.header["held"]
            committed: bytearray | None
            if self._tail is None:
                # the map once this commit is durable (held-only blocks are 2: top = top_used(self.state))
                committed, used, top = self._commit_state(free_before)
            else:
                committed = None  # rebuilt from the new locations if it is ever needed
                assert tail_first is not None, "a commit is a tail commit from its start or not at all"
                used = int(self.header["metadata_used_blocks"]) + (self._tail - tail_first) - \
                    self._tail_released
                top = self._tail - 1  # every block a tail commit takes lies above the old top
            pages_count = {k: int(v) for k, v in self.header.get("pages", {}).items()}
            for name, pa in arrays.items():
                pages_count[name] = pa.npages
            header.update(directory=dir_locs, directory_bytes=len(directory), pages=pages_count,
                          metadata_used_blocks=used)
            known_hints = hints() if callable(hints) else hints
            header[HINTS] = {**(known_hints or {}), "generation": self.generation + 1, "metadata_top": top}
            raw = None
            if listed is not None:  # a one-flush commit: the superblock lists the pages it reaches
                header[COMMIT_PAGES] = listed
                try:
                    raw = self._superblock_bytes(self.generation + 1, header)
                except MetadataSpaceExhausted:  # (no room for the list beside the rest: flushed first)
                    del header[COMMIT_PAGES]
                    listed = None
            if raw is None:
                raw = self._superblock_bytes(self.generation + 1, header)
                self.sync()  # the pages durable before the superblock that reaches them is written
            if before_superblock is not None:
                before_superblock()  # (the data file's flush: no superblock refers to data not durable)
            floor_next: list[tuple[Any, int, int] | None] = []
            window = None
            if while_flushing is not None:
                def window() -> None:
                    # (the bookkeeping of what the commit wrote, made while the superblock's I/O runs)
                    floor_next.append(self._next_floor(new_pm, changed, dir_locs))
                    while_flushing()
            self._write_superblock(self.generation + 1, raw, window, with_pages=listed is not None)
        except BaseException:
            self._queued, self._chunks, self._listed = [], [], None
            self._hint = 0
            if self._undo is not None and self._state is not None:
                self._undo_changes(self._undo)
            self._tail, self._undo = None, None
            raise
        self._tail, self._undo, self._hint = None, None, 0
        self._floor = floor_next[0] if floor_next else self._next_floor(new_pm, changed, dir_locs)
        self.generation += 1
        self.header = header
        self.locs, self.pm_locs, self.dir_locs = new_locs, new_pm, dir_locs
        self._dir_last = (new_pm, *self._dir_next)
        self._state = committed
        if committed is not None:
            self._free_known = (committed, self.nr_blocks - used)

    def _next_floor(self, new_pm: dict[str, array], changed: list[tuple[str, array, list[int]]],
                    dir_locs: list[int]) -> tuple[Any, int, int] | None:
        """What :attr:`_floor` becomes once a commit of ``new_pm`` (its page maps), ``changed`` (the
        arrays it changed) and ``dir_locs`` (its directory) is the store's: the count carried over,
        only the changed arrays counted again (:meth:`~thinpool.mdspace.MetadataSpace.commit_floor`),
        when the committed state's count is kept; else the kept one, which names another state (counted
        afresh when asked).  Changes nothing: :meth:`commit` installs it after the last flush."""
        floor = self._floor
        if floor is None or floor[0] is not self.pm_locs:
            return floor
        old_pm = self.pm_locs
        stored = floor[2] + sum(bool(any(new_pm[name])) - bool(any(old_pm.get(name, ())))
                                for name, _locs, _dirty in changed)
        return (new_pm, 2 * stored + max(1, len(dir_locs)), stored)

    def _place(self, few: list[tuple[array, list[int], Any]]) -> None:
        """The part of :meth:`commit` for the arrays with a few dirty pages: the live pages of all of
        them (``(locations, pages, array)`` each) get fresh blocks in one allocation and are queued;
        their locations updated."""
        blocks = self._allocate(sum(len(live) for _locs, live, _pa in few))
        crcs = self._write_pages([pa.page(d) for _locs, live, pa in few for d in live], blocks)
        k = 0
        for locs, live, _pa in few:
            for d in live:
                locs[d] = blocks[k] << 32 | crcs[k]
                k += 1

    def _commit_pages_np(self, np: Any, pa: Any, locs: array, npages: int) -> list[int]:
        """The part of :meth:`commit` for one array's many dirty pages, array-at-a-time: their old
        blocks released, fresh blocks (the same, in the same order, as block by block) given to the
        live ones, whose pages are queued; ``locs`` updated.  Returns the dirty pages (sorted)."""
        d = sorted_unique(np, pa.dirty)
        d = d[(d >= 0) & (d < npages)]
        live = sorted_minus(np, d, sorted_unique(np, pa.dead)) if len(pa.dead) else d
        view = np.frombuffer(locs, np.uint64)
        try:
            self._release(view[d])
            view[d] = 0
            if len(live):
                blocks = self._allocate(len(live))
                rows_of = getattr(pa, "page_rows", None)
                src = None if rows_of is None else rows_of(live)
                if src is not None:  # the pages are rows of a buffer: queued without a step per page
                    crcs = self._queue_rows(np, src[0], src[1], blocks)
                else:
                    crcs = self._write_pages([pa.page(i) for i in live.tolist()], blocks)
                view[live] = (np.asarray(blocks, np.uint64) << np.uint64(32)) | np.asarray(crcs, np.uint64)
        finally:
            del view  # the array must not stay exported
        return d.tolist()

    def _blocks_wanted(self, arrays: dict[str, Any]) -> int:
        """About how many fresh blocks a commit of ``arrays`` writes: its dirty pages, a page-map page
        per run of them within one page map, the directory (where :meth:`_reserve_run` looks for room)."""
        n = max(1, len(self.dir_locs))
        for pa in arrays.values():
            dirty = pa.dirty
            if dirty:
                n += len(dirty) - len(pa.dead) + (max(dirty) // PM_ENTRIES - min(dirty) // PM_ENTRIES + 1)
        return n

    def _directory(self, pm_locs: dict[str, array], changed: list[tuple[str, array, list[int]]]) -> bytes:
        """The directory's JSON (what ``json.dumps`` of the page maps' locations gives).  When the
        commit starts from the state the store's last commit wrote (:attr:`_dir_last`), only the
        parts of the arrays it ``changed`` are made again (the others' page maps are the same
        objects, never changed in place); after a load, every part.  What it made becomes
        :attr:`_dir_last` once the commit is durable (:meth:`commit`)."""
        last = self._dir_last
        names = tuple(pm_locs)
        if last is not None and last[0] is self.pm_locs and last[1] == names:
            index, parts = last[2], list(last[3])
            for name, _locs, _dirty in changed:
                parts[index[name]] = _dir_part(name, pm_locs[name])
        else:
            index = {name: i for i, name in enumerate(names)}
            parts = [_dir_part(name, pml) for name, pml in pm_locs.items()]
        self._dir_next = (names, index, parts)
        return ("{" + ", ".join(parts) + "}").encode()

    def _superblock_bytes(self, generation: int, header: dict[str, Any]) -> bytearray:
        """The 4 KiB superblock of ``generation`` carrying ``header`` (checksummed)."""
        body = _SB_JSON.encode(header).encode()
        if len(body) > BLOCK - _SB_HEADER.size:
            raise MetadataSpaceExhausted(f"{self.path}: superblock header too large ({len(body)} bytes)")
        raw = bytearray(BLOCK)
        _SB_HEADER.pack_into(raw, 0, 0, MAGIC, FORMAT_VERSION, generation, len(body))
        raw[_SB_HEADER.size:_SB_HEADER.size + len(body)] = body
        struct.pack_into("<I", raw, 0, _crc32c(memoryview(raw)[4:]))
        return raw

    def _clear_rejected(self) -> None:
        """Zero the superblock slots the load did not use (newer than the state loaded: a commit that
        did not complete, or damaged), durably, before this commit writes a page.  Such a superblock
        stays in its slot until a commit writes that slot, and this commit may write the very pages it
        lists to the very blocks (the same change redone from the same state): power lost before its
        own superblock would then leave the old one with every page verifying, a state that was never
        committed.  Only the first commit after such a load pays this write and flush."""
        for slot in self._rejected_slots:
            zeros = bytes(BLOCK)
            write_all(self.io.pwrite, self.fd, zeros, slot * BLOCK, self.path)
            self._sb_written[slot] = zeros
        self.sync()
        self._rejected_slots = []

    def _write_superblock(self, generation: int, raw: bytearray,
                          while_flushing: Callable[[], None] | None = None, *, with_pages: bool = False) -> None:
        """Write the superblock ``raw`` of ``generation`` to its slot and flush (``while_flushing``: see
        :meth:`commit`); ``with_pages``: the commit's pages are not flushed yet (a one-flush commit),
        so the write-back started covers the whole file, not the slot alone."""
        slot = generation % SUPERBLOCKS
        where = slot * BLOCK
        # what the slot holds now: the superblock this store wrote there last, else read (this store is
        # the file's one writer: the pool's lock)
        old = self._sb_written.get(slot)
        if old is None:
            old = os.pread(self.fd, BLOCK, where)
        try:
            write_all(self.io.pwrite, self.fd, raw, where, self.path)
            self._sb_written[slot] = raw
        except HostIOError:
            # part of it may be stored (and a prefix can verify): put the slot back as it was, so the
            # failed commit cannot surface later; if even that fails, only a reopen may commit again
            try:
                write_all(self.io.pwrite, self.fd, old, where, self.path)
            except HostIOError as exc:
                self.failed = f"a superblock write failed and could not be undone: {exc}"
            raise
        try:
            if while_flushing is None:
                self.sync()
                return
            if START_WRITEBACK and self.io.fdatasync is os.fdatasync:  # (a substituted flush: the tests' model)
                # (its I/O runs while the caller's work does)
                start_writeback(self.fd, 0 if with_pages else where, 0 if with_pages else BLOCK)
            try:
                while_flushing()
            finally:
                self.sync()
        except HostIOError:
            if with_pages and self.failed:
                self._unwrite_superblock(slot, old)
            raise

    def _unwrite_superblock(self, slot: int, old: bytes | bytearray) -> None:
        """A one-flush commit's flush failed: put its superblock's slot back as it was and flush that,
        best effort (the store has failed either way).  Linux keeps the writes a failed flush did not
        make durable readable in its cache, clean, until they are evicted: a reopen before a reboot
        would find this superblock and every page it lists verifying, and commit on top of pages the
        disk may never have had -- after a reboot, the commits since would be lost with them.  Put
        back, the slot holds the previous superblock in the cache and, once this new write's flush
        returns, on the disk: the reopen is at the previous commit, whose pages were flushed."""
        try:
            write_all(self.io.pwrite, self.fd, old, slot * BLOCK, self.path)
            self._sb_written[slot] = old
            sync_or_fail(self.io.fdatasync, self.fd, self.path)
        except HostIOError:
            pass  # (the slot may still hold it: a reopen verifies every page it reaches, in the cache)

    def sync(self) -> None:
        """Flush the metadata file; HostIOError if the flush fails.

        Linux reports a writeback error to one fsync and then forgets it: a retried flush may succeed
        without the lost pages ever reaching the disk.  So a failed flush ends this store's commits
        (``failed``; :meth:`commit` raises): reopening reads whichever superblock is durable -- the
        previous commit or, if the failed flush of a superblock wrote it anyway, the new one (a
        one-flush commit's slot is put back first: :meth:`_unwrite_superblock`).  A failed
        *write* (before any flush of that commit failed) leaves the store usable: nothing refers to the
        blocks it wrote, and a retry writes them again."""
        try:
            sync_or_fail(self.io.fdatasync, self.fd, self.path)
        except HostIOError as exc:
            self.failed = f"a flush failed: {exc}"
            raise


__all__ = ["FileIO", "MetadataCommit"]
