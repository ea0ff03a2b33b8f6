"""The metadata file and its transaction manager: with its three parts, the only place that knows about
shadowing on disk.  The parts: :mod:`thinpool.mdpages` (4 KiB pages, CRC-32C, the superblock's layout
constants, :class:`~thinpool.mdpages.PagedArray` and :class:`~thinpool.mdpages.PageUpdates`),
:mod:`thinpool.mdspace` (which metadata blocks are used or protected, allocation of fresh ones) and
:mod:`thinpool.mdcommit` (the write side: a commit's pages, page maps, directory, superblock and
flushes).  This module opens the file, reads and verifies what a superblock reaches, resizes the file
and holds the metadata snapshot.

The pool's persistent state is a handful of arrays held in memory (block-map nodes, reference
counts, the device table, a small JSON catalog).  This module stores them in a fixed-size file of
4 KiB metadata blocks, copy-on-write:

* every array is cut into 4 KiB **pages**; a page's location and CRC-32C live in its array's
  **page map** (``block << 32 | crc`` per page, 512 per page-map page);
* the page-map pages' locations and CRCs are listed in a small **directory** (a JSON document
  written to fresh blocks on every commit);
* two **superblocks** (blocks 0 and 1) alternate; each carries a generation number, the pool's
  scalar fields and the directory's locations, and is checksummed.

A commit writes only the dirty pages, the page-map pages that point at them and the directory --
always to blocks that the last committed state does not use -- then syncs, then writes the other
superblock slot and syncs again.  A commit of at most 64 pages (:data:`thinpool.mdcommit.ONE_FLUSH_PAGES`)
lists them in its superblock (``block << 32 | crc`` each) and writes pages and superblock before one
sync: a superblock whose listed pages do not all verify is a commit that did not complete, and is
not used.  A crash at any instant leaves the previous superblock and everything it reaches intact,
so :meth:`MetadataStore.load` yields exactly the last commit (or the newest older one that still
verifies).  Every block read is checked; a mismatch raises
:class:`~thinpool.errors.MetadataCorrupt` naming the structure and block.

The store and its parts are plain Python (``array``, ``bytearray``, ``memoryview``; no numpy) so that a command which
touches only a few pages -- ``status``, ``ls``, ``snapshot`` through :mod:`thinpool.devtable` -- loads
only those: :meth:`MetadataStore.load` takes the names of the arrays to read, and
:meth:`MetadataStore.read_pages` reads single pages.  Arrays come back as writable buffers
(``bytearray``, or an anonymous ``mmap`` when large; the pool wraps them with ``numpy.frombuffer``,
no copy).
"""

from __future__ import annotations

import errno
import json
import os
from array import array
from typing import Any, Iterable, Sequence

from . import pooldir
from .errors import HostIOError, MetadataCorrupt, MetadataSpaceExhausted, ReadOnly
from .mdcommit import FileIO, MetadataCommit
from .mdpages import (_HI, _LO, _SB_HEADER, BLOCK, COMMIT_PAGES, MAGIC, READABLE_VERSIONS, SUPERBLOCKS, Buffer,
                      _crc32c, _zeroed, checksum, commit_pages_valid, map_private)
from .mdspace import _PROTECTED, _USED, _mark

#: the committed header's fields a held metadata snapshot keeps (its superblock copy)
HELD_SUPERBLOCK_FIELDS = ("time", "transaction_id", "needs_check")


class MetadataStore(MetadataCommit):
    """A metadata file of ``nr_blocks`` 4 KiB blocks holding paged arrays, committed atomically."""


    def __init__(self, path: str, *, read_only: bool = False, allow_foreign: bool | None = None) -> None:
        self.path = path
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self.fd = pooldir.open_pool_file(path, flags, allow_foreign=allow_foreign, what="metadata file")
        except FileNotFoundError:
            raise MetadataCorrupt(f"metadata file {path} is missing", structure="file") from None
        self.nr_blocks = os.fstat(self.fd).st_size // BLOCK
        self.generation = 0
        self.header: dict[str, Any] = {}
        self.locs: dict[str, array] = {}      # per array: page -> block<<32|crc
        self.pm_locs: dict[str, array] = {}   # per array: page-map page -> block<<32|crc
        self.dir_locs: list[int] = []
        # per metadata block: _USED | _PROTECTED bits; a block is free for a commit only at 0.  Built
        # on first use after a load (see `state`): a reader that only reports does not need it.
        self._state: bytearray | None = bytearray(self.nr_blocks)
        self._state[:SUPERBLOCKS] = bytes([_USED | _PROTECTED]) * SUPERBLOCKS
        self.held_blocks: list[int] = []
        self._tail: int | None = None  # in a tail commit: the next block to allocate (see commit)
        self._tail_released = 0
        self._queued: list[tuple[int, Any]] = []  # (block, page) written by the commit under way
        self._chunks: list[tuple[Any, memoryview, Any]] = []  # (blocks, rows' buffer, rows): see _queue_rows
        self._undo: list[tuple[int, int]] | None = None  # the block states it changed (see commit)
        self._sb_written: dict[int, bytes | bytearray] = {}  # per slot: the superblock written there last
        #: slots of superblocks newer than the one loaded that :meth:`load` did not use (cleared by the
        #: next commit before it writes a page: see MetadataCommit._clear_rejected)
        self._rejected_slots: list[int] = []
        #: why this store must be reopened before it commits again (a flush failed), or None
        self.failed: str | None = None

    # ------------------------------------------------------------------ formatting
    @classmethod
    def format(cls, path: str, nr_blocks: int, mode: int = 0o600) -> "MetadataStore":
        """Create an empty metadata file of ``nr_blocks`` blocks (sparse, mode ``mode``) and open it."""
        if nr_blocks < 16:
            raise ReadOnly(f"metadata file {path}: {nr_blocks} blocks is too small (need >= 16)")
        fd = pooldir.open_pool_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode, what="metadata file")
        try:
            os.fchmod(fd, mode)  # exactly ``mode`` (a pool's file mode), whatever the umask
            os.ftruncate(fd, nr_blocks * BLOCK)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise HostIOError(f"sizing new metadata file {path} to {nr_blocks * BLOCK} bytes failed: "
                              f"{os.strerror(err)}", err, path) from None
        finally:
            os.close(fd)
        return cls(path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ------------------------------------------------------------------ reading
    def _read_block(self, block: int) -> bytes:
        data = os.pread(self.fd, BLOCK, block * BLOCK)
        if len(data) != BLOCK:
            raise MetadataCorrupt(f"metadata block {block} lies beyond the end of {self.path} (file truncated?)",
                                  structure="file", block=block)
        return data

    def _read_superblock(self, slot: int) -> tuple[int, dict[str, Any]] | None:
        raw = os.pread(self.fd, BLOCK, slot * BLOCK)
        if len(raw) != BLOCK:
            return None
        crc, magic, version, generation, length = _SB_HEADER.unpack_from(raw)
        if magic != MAGIC or crc != checksum(raw[4:]) or length > BLOCK - _SB_HEADER.size:
            return None
        if version not in READABLE_VERSIONS:
            raise MetadataCorrupt(f"{self.path}: superblock in metadata block {slot}: unsupported metadata "
                                  f"format version {version}", structure="superblock", block=slot)
        try:
            header = json.loads(raw[_SB_HEADER.size:_SB_HEADER.size + length])
        except ValueError:
            return None
        return generation, header

    def superblocks(self) -> list[tuple[int, int, dict[str, Any]]]:
        """Valid superblocks as (generation, slot, header), newest first."""
        found = []
        for slot in range(SUPERBLOCKS):
            sb = self._read_superblock(slot)
            if sb is not None:
                found.append((sb[0], slot, sb[1]))
        return sorted(found, reverse=True, key=lambda s: (s[0], s[1]))

    def _gather(self, locs: Sequence[int], structure: str) -> Buffer:
        """Read and verify the pages at ``locs`` (0 = absent page, read as zeroes).

        One ``preadv`` per run of consecutive blocks in consecutive pages (pages are mostly written
        in order, so runs are long); the per-page work is the checksum."""
        n = len(locs)
        out = _zeroed(n * BLOCK)
        halves = memoryview(locs if isinstance(locs, array) else array("Q", locs)).cast("B").cast("I")
        blocks, crcs = halves[_HI::2].tolist(), halves[_LO::2].tolist()  # C loops: block and crc of each page
        if not any(blocks):
            return out
        if max(blocks) >= self.nr_blocks:
            b = next(b for b in blocks if b >= self.nr_blocks)
            raise MetadataCorrupt(f"{self.path}: {structure}: page at metadata block {b} lies beyond the end of "
                                  f"the metadata file ({self.nr_blocks} blocks; truncated?)", structure=structure, block=b)
        view = memoryview(out)
        fd, i = self.fd, 0
        while i < n:
            b0 = blocks[i]
            if not b0:
                i += 1
                continue
            j = i + 1
            while j < n and blocks[j] == b0 + j - i:
                j += 1
            want = (j - i) * BLOCK
            if os.preadv(fd, [view[i * BLOCK:j * BLOCK]], b0 * BLOCK) != want:
                raise MetadataCorrupt(f"{self.path}: short read at metadata block {b0} (file truncated?)",
                                      structure="file", block=b0)
            i = j
        crc = _crc32c
        for row, b in enumerate(blocks):
            if b and crc(view[row * BLOCK:(row + 1) * BLOCK]) != crcs[row]:
                raise MetadataCorrupt(f"{self.path}: {structure}: bad checksum in metadata block {b}",
                                      structure=structure, block=b)
        return out

    def _page_locs(self, name: str, pages: Sequence[int]) -> tuple[list[int], list[int]]:
        """(blocks, crcs) of the committed pages ``pages`` of array ``name``, checked to lie in the file."""
        locs = self.locs.get(name, array("Q"))
        n = len(pages)
        if n and (min(pages) < 0 or max(pages) >= len(locs)):
            raise MetadataCorrupt(f"{self.path}: {name}: a page past the array's {len(locs)} pages is asked for",
                                  structure=name)
        halves = memoryview(array("Q", [locs[p] for p in pages])).cast("B").cast("I")
        blocks, crcs = halves[_HI::2].tolist(), halves[_LO::2].tolist()
        if n and max(blocks) >= self.nr_blocks:
            b = next(b for b in blocks if b >= self.nr_blocks)
            raise MetadataCorrupt(f"{self.path}: {name}: page at metadata block {b} lies beyond the end of the "
                                  f"metadata file ({self.nr_blocks} blocks; truncated?)", structure=name, block=b)
        return blocks, crcs

    def _verify_rows(self, name: str, view: memoryview, blocks: list[int], crcs: list[int], rows: list[int]) -> None:
        crc = _crc32c
        for b, c, r in zip(blocks, crcs, rows):
            if b and crc(view[r * BLOCK:(r + 1) * BLOCK]) != c:
                raise MetadataCorrupt(f"{self.path}: {name}: bad checksum in metadata block {b}", structure=name,
                                      block=b)

    def gather_into(self, name: str, pages: Sequence[int], out: Any, rows: Sequence[int]) -> None:
        """Read and verify the committed pages ``pages`` of array ``name`` straight into the 4 KiB rows
        ``rows`` of ``out`` (a writable buffer of whole pages), an absent page as zeroes -- what
        :meth:`load` gives for those pages, without an intermediate copy of the whole array.  One
        ``preadv`` per run of pages consecutive both on disk and in ``out``."""
        blocks, crcs = self._page_locs(name, pages)
        view = memoryview(out).cast("B")
        rows = list(rows)
        n = len(blocks)
        fd, i = self.fd, 0
        zero = bytes(BLOCK)
        while i < n:
            b0, r0 = blocks[i], rows[i]
            if not b0:
                view[r0 * BLOCK:(r0 + 1) * BLOCK] = zero
                i += 1
                continue
            j = i + 1
            while j < n and blocks[j] == b0 + j - i and rows[j] == r0 + j - i:
                j += 1
            want = (j - i) * BLOCK
            if os.preadv(fd, [view[r0 * BLOCK:r0 * BLOCK + want]], b0 * BLOCK) != want:
                raise MetadataCorrupt(f"{self.path}: short read at metadata block {b0} (file truncated?)",
                                      structure="file", block=b0)
            i = j
        self._verify_rows(name, view, blocks, crcs, rows)

    def map_into(self, name: str, pages: Sequence[int], out: Any, rows: Sequence[int], max_runs: int = 4096) -> bool:
        """What :meth:`gather_into` does, by mapping the pages instead of reading them: each run of pages
        consecutive both on disk and in ``out`` (an anonymous memory map the caller owns, page-aligned)
        becomes a private map of the file (:func:`thinpool.mdpages.map_private`), so ``out`` shows the
        page cache's pages without a copy, and a write to a row makes a private copy of it: nothing
        reaches the file but through :meth:`commit`.  Every page is verified (CRC-32C) as
        :meth:`gather_into` does.  False, with nothing mapped, when the pages make more than
        ``max_runs`` runs (each run is a kernel memory area) or the host cannot map; the caller reads
        them then.

        The rows stay backed by the blocks they were mapped from: a caller must write to (privatize) a
        row before a commit releases its block (a later commit may reuse the block)."""
        import ctypes
        blocks, crcs = self._page_locs(name, pages)
        view = memoryview(out).cast("B")
        if view.readonly or not blocks:
            return False
        base = ctypes.addressof(ctypes.c_char.from_buffer(view))
        if base % BLOCK:
            return False
        rows = list(rows)
        runs, i, n = [], 0, len(blocks)
        while i < n:
            b0, r0 = blocks[i], rows[i]
            j = i + 1
            while b0 and j < n and blocks[j] == b0 + j - i and rows[j] == r0 + j - i:
                j += 1
            runs.append((b0, r0, j - i))
            i = j
        if sum(1 for b0, _, _ in runs if b0) > max_runs:
            return False
        for b0, r0, k in runs:
            if not b0:
                view[r0 * BLOCK:(r0 + 1) * BLOCK] = bytes(BLOCK)
            elif not map_private(base + r0 * BLOCK, k * BLOCK, self.fd, b0 * BLOCK):
                return False  # the rows mapped so far are overwritten by the caller's read
        self._verify_rows(name, view, blocks, crcs, rows)
        return True

    def _load_directory(self, header: dict[str, Any]) -> tuple[dict[str, array], list[int]]:
        dir_locs = [int(x) for x in header["directory"]]
        pages = self._gather(dir_locs, "directory")
        raw = bytes(pages[: header["directory_bytes"]])
        try:
            directory = json.loads(raw)
        except ValueError:
            first = dir_locs[0] >> 32 if dir_locs else None
            raise MetadataCorrupt(f"{self.path}: directory: not valid JSON (first page at metadata block {first})",
                                  structure="directory", block=first) from None
        pm_locs = {name: array("Q", v) for name, v in directory.items()}
        return pm_locs, dir_locs

    def _load_locs(self, pm_locs: dict[str, array], npages: dict[str, int]) -> dict[str, array]:
        locs = {}
        for name, pml in pm_locs.items():
            pages = self._gather(pml, f"page map of {name}")
            locs[name] = array("Q")
            locs[name].frombytes(memoryview(pages)[: npages[name] * 8])  # one copy (16 MiB per 2^21 pages)
        return locs

    def load(self, only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> dict[str, Buffer]:
        """Load the newest committed state that verifies; returns the arrays' bytes by name.

        With ``only``, just those arrays are read (every page map is still read, so the store knows
        which blocks are in use and can commit); the others' pages can be read later with
        :meth:`read_pages`.  A damaged page of an array that is not read is not noticed.  When no
        state verifies, :class:`MetadataCorrupt` and the store's state is as before the call."""
        names = None if only is None else set(only)
        skipped = set(skip)  # arrays the caller reads itself (:meth:`gather_into`), e.g. the leaves
        candidates = self.superblocks()
        if not candidates:
            raise MetadataCorrupt(f"{self.path}: superblock: no valid superblock in metadata blocks 0 and 1 "
                                  f"(not a thinpool metadata file, truncated, or both corrupt)",
                                  structure="superblock", block=0)
        first_error: MetadataCorrupt | None = None
        rejected: list[int] = []
        # (a candidate whose listed pages do not verify was installed by _load_state: put back if none is used)
        before = self.pm_locs, self.locs, self.dir_locs, self.held_blocks, self._state
        for generation, slot, header in candidates:
            try:
                problem = header_problem(header)
                if problem:
                    raise MetadataCorrupt(f"{self.path}: superblock in metadata block {slot} (generation {generation}): "
                                          f"{problem}", structure="superblock", block=slot)
                arrays = self._load_state(header, names, skipped)
                self._check_commit_pages(generation, header)  # (and the pages not read yet)
            except MetadataCorrupt as exc:
                first_error = first_error or exc
                rejected.append(slot)
                continue
            self._rejected_slots = rejected
            self.generation = generation
            self.header = header
            if first_error is None:
                first_error = self._newer_damaged_superblock(generation)
            if first_error is not None:
                self.header["recovered_from"] = str(first_error)
            return arrays
        assert first_error is not None
        self.pm_locs, self.locs, self.dir_locs, self.held_blocks, self._state = before
        raise first_error

    def _check_commit_pages(self, generation: int, header: dict[str, Any]) -> None:
        """The pages a one-flush commit lists in its superblock (:data:`~thinpool.mdpages.COMMIT_PAGES`)
        all verify, else :class:`MetadataCorrupt` naming the structure the page belongs to (the state
        of ``header`` just loaded): the superblock reached the disk in that commit's one flush but a
        page it reaches did not (power lost in the flush), so the commit never completed -- or that
        page was damaged since.  Either way the superblock is not used.  (Most of them were verified
        by the load already; a caller that reads only a few arrays, such as the device table's light
        commands, or reads the others later, relies on this check.)"""
        listed = header.get(COMMIT_PAGES)
        if listed is None:
            return
        if not commit_pages_valid(listed):
            raise MetadataCorrupt(f"{self.path}: commit pages of generation {generation}: the superblock's list of "
                                  f"the pages its commit wrote is malformed", structure="commit pages", block=None)
        for loc in listed:
            block = loc >> 32
            raw = os.pread(self.fd, BLOCK, block * BLOCK) if SUPERBLOCKS <= block < self.nr_blocks else b""
            if len(raw) != BLOCK or checksum(raw) != loc & 0xFFFFFFFF:
                structure = self._structure_of(loc)
                what = "bad checksum in" if raw else "a page lies beyond the end of the metadata file at"
                raise MetadataCorrupt(f"{self.path}: {structure}: {what} metadata block {block} (a page the commit "
                                      f"of generation {generation} wrote: that commit did not complete, or the page "
                                      f"was damaged since)", structure=structure, block=block)

    def _structure_of(self, loc: int) -> str:
        """The structure of the state just loaded that has a page at ``loc`` (``block << 32 | crc``)."""
        if loc in self.dir_locs:
            return "directory"
        for name, pml in self.pm_locs.items():
            if loc in pml:
                return f"page map of {name}"
        for name, locs in self.locs.items():
            if loc in locs:
                return name
        return "commit pages"

    def _newer_damaged_superblock(self, generation: int) -> MetadataCorrupt | None:
        """A superblock slot with our magic and a *newer* (unverified) generation whose checksum fails:
        either a torn write of a commit that never completed or a damaged completed one -- the two
        look alike, so it is reported (as a warning) rather than treated as fatal."""
        for slot in range(SUPERBLOCKS):
            raw = os.pread(self.fd, BLOCK, slot * BLOCK)
            if len(raw) != BLOCK:
                continue
            crc, magic, _version, gen, _length = _SB_HEADER.unpack_from(raw)
            if magic == MAGIC and gen > generation and crc != checksum(raw[4:]):
                return MetadataCorrupt(f"superblock: bad checksum in metadata block {slot} (generation {gen}); "
                                       f"generation {generation} was used", structure="superblock", block=slot)
        return None

    def _load_state(self, header: dict[str, Any], names: set[str] | None = None,
                    skipped: set[str] | None = None) -> dict[str, Buffer]:
        pm_locs, dir_locs = self._load_directory(header)
        npages = {k: int(v) for k, v in header["pages"].items()}
        locs = self._load_locs(pm_locs, npages)
        arrays = {name: self._gather(l, name) for name, l in locs.items()
                  if (names is None or name in names) and name not in (skipped or ())}
        held_blocks: list[int] = []
        if header.get("held"):
            held_blocks = self._blocks_of(header["held"])
        # commit the in-memory bookkeeping only once everything verified
        self.pm_locs, self.locs, self.dir_locs = pm_locs, locs, dir_locs
        self.held_blocks = held_blocks
        self._state = None
        return arrays

    def read_pages(self, name: str, pages: Iterable[int]) -> dict[int, bytes]:
        """Verified copies of single pages of array ``name`` as last committed (page -> 4 KiB)."""
        locs = self.locs.get(name, array("Q"))
        want = sorted(set(pages))
        for p in want:
            if not 0 <= p < len(locs):
                raise MetadataCorrupt(f"{self.path}: {name}: page {p} is beyond the array's {len(locs)} pages",
                                      structure=name)
        data = self._gather([locs[p] for p in want], name)  # a bytearray, or a memory map when large
        with memoryview(data) as view:  # one copy per page into bytes, whichever buffer it is
            return {p: view[i * BLOCK:(i + 1) * BLOCK].tobytes() for i, p in enumerate(want)}

    def npages(self, name: str) -> int:
        """Pages of array ``name`` in the current state."""
        return len(self.locs.get(name, ()))

    def _blocks_of(self, held: dict[str, Any]) -> list[int]:
        """All blocks reachable from a held directory (so they are never reused while held)."""
        pm_locs, dir_locs = self._load_directory(held)
        npages = {k: int(v) for k, v in held["pages"].items()}
        locs = self._load_locs(pm_locs, npages)
        out = [loc >> 32 for loc in dir_locs]
        for arr in list(pm_locs.values()) + list(locs.values()):
            out.extend(loc >> 32 for loc in arr)
        return [b for b in out if b > 0]

    def load_held(self) -> dict[str, Buffer]:
        """Arrays of the held metadata snapshot (see :meth:`hold`)."""
        held = self.header.get("held")
        if not held:
            raise ReadOnly(f"{self.path}: no metadata snapshot is held")
        pm_locs, _ = self._load_directory(held)
        npages = {k: int(v) for k, v in held["pages"].items()}
        locs = self._load_locs(pm_locs, npages)
        return {name: self._gather(l, f"held {name}") for name, l in locs.items()}
    def resize(self, nr_blocks: int) -> None:
        """Make the file ``nr_blocks`` blocks long (sparse).  Growing is always safe: the committed state
        is untouched and the new blocks are free.  Shrinking is only for undoing a growth: every
        dropped block must be unused (else :class:`~thinpool.errors.ReadOnly`)."""
        if self.read_only:
            raise ReadOnly(f"{self.path}: metadata is read-only")
        if nr_blocks < self.nr_blocks and any(self.state[nr_blocks:]):
            raise ReadOnly(f"{self.path}: cannot shrink the metadata to {nr_blocks} blocks: blocks past it are in use")
        try:
            os.ftruncate(self.fd, nr_blocks * BLOCK)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise HostIOError(f"resizing {self.path} to {nr_blocks * BLOCK} bytes failed: {os.strerror(err)}",
                              err, self.path) from None
        self._free_known = None
        if self._state is not None:
            if nr_blocks > self.nr_blocks:
                self._state.extend(bytes(nr_blocks - self.nr_blocks))
            else:
                del self._state[nr_blocks:]
        self.nr_blocks = nr_blocks

    # ------------------------------------------------------------------ held metadata snapshot
    def hold(self) -> None:
        """Keep the last committed state readable (reserve_metadata_snap); its blocks stay reserved.

        Like the kernel's ``__reserve_metadata_snap``, which copies the superblock, the hold keeps the
        committed superblock's own fields (``superblock``: time, transaction id, needs_check) beside the
        arrays, so the held view reports them and not the live pool's."""
        held = {k: self.header[k] for k in ("directory", "directory_bytes", "pages")}
        held["superblock"] = {k: self.header[k] for k in HELD_SUPERBLOCK_FIELDS if k in self.header}
        held["generation"] = self.generation
        held["root_block"] = int(self.dir_locs[0] >> 32) if self.dir_locs else 0
        self.header["held"] = held
        self.held_blocks = self._blocks_of(held)
        self._free_known = None
        _mark(self.state, self.held_blocks, _PROTECTED)

    def release_hold(self) -> None:
        """Drop the held metadata snapshot from the state the next commit writes.  Its blocks stay
        protected until that commit is durable: the last committed superblock still names them (a
        load of it reads and verifies the held state), so the commit that drops the hold must not
        write into them -- power lost before its superblock would leave that superblock with a held
        state no longer there.  That commit's map (:meth:`_commit_state`, which sees no held blocks
        and no counted free blocks) frees them."""
        self.header.pop("held", None)
        self._state = self.state  # (built now, the held blocks protected; and no tail commit then)
        self.held_blocks = []
        self._free_known = None


_U64 = 1 << 64
#: the superblock's integer fields besides the required ones (each optional; None allowed)
_INT_FIELDS = ("transaction_id", "low_water_mark", "cursor", "used_data_blocks", "pending_blocks", "next_dev_id",
               "next_gen", "catalog_bytes", "metadata_used_blocks")


def _is_u64(x: Any) -> bool:
    return type(x) is int and 0 <= x < _U64


def _state_problem(h: dict[str, Any], what: str) -> str | None:
    """What is wrong with the fields of ``h`` that locate a state (directory, its length, page counts)."""
    directory, length, pages = h.get("directory"), h.get("directory_bytes"), h.get("pages")
    if not isinstance(directory, list) or not all(_is_u64(x) for x in directory):
        return f"{what}'s directory is not a list of page locations"
    if not isinstance(length, int) or not _is_u64(length) or length > len(directory) * BLOCK:
        return f"{what}'s directory length is not a byte count within its {len(directory)} pages"
    if not isinstance(pages, dict) or not all(isinstance(k, str) and _is_u64(v) and v < 1 << 40
                                              for k, v in pages.items()):
        return f"{what}'s page counts are not a table of array names and counts"
    return None


def header_problem(header: Any) -> str | None:
    """What is wrong with the types and ranges of a superblock's header (one whose checksum verified,
    so its bytes are as written -- by thinpool, or crafted), or None.  Checked before anything of it
    is used, so that a malformed header is a damaged superblock (:class:`MetadataCorrupt`, the other
    superblock used if it verifies) and never an exception from deep inside the load."""
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    for k in ("block_size", "nr_data_blocks", "time"):
        if not _is_u64(header.get(k)):
            return f"its {k} is not an integer from 0 to 2^64-1"
    if header["block_size"] == 0:
        return "its block_size is 0"
    for k in _INT_FIELDS:
        if header.get(k) is not None and not _is_u64(header[k]):
            return f"its {k} is not an integer from 0 to 2^64-1"
    t = header.get("no_space_timeout")
    if t is not None and not (type(t) in (int, float) and 0 <= t < float("inf")):
        return "its no_space_timeout is not a number of seconds"
    if header.get("data_file") is not None and not isinstance(header["data_file"], str):
        return "its data_file is not a path"
    if header.get("hints") is not None and not isinstance(header["hints"], dict):
        return "its hints are not a JSON object"
    problem = _state_problem(header, "the state")
    if problem:
        return problem
    held = header.get("held")
    if held is None:
        return None
    if not isinstance(held, dict):
        return "its held metadata snapshot is not a JSON object"
    return _state_problem(held, "the held metadata snapshot")


#: re-exported: the class was defined here once, and code may still import it from here
__all__ = ["FileIO", "HELD_SUPERBLOCK_FIELDS", "MetadataSpaceExhausted", "MetadataStore"]
