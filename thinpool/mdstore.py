"""The metadata file and its transaction manager: the only place that knows about shadowing on disk.

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
superblock slot and syncs again.  A crash at any instant leaves the previous superblock and
everything it reaches intact, so :meth:`MetadataStore.load` yields exactly the last commit (or the
newest older one that still verifies).  Every block read is checked; a mismatch raises
:class:`~thinpool.errors.MetadataCorrupt` naming the structure and block.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np

from .errors import MetadataCorrupt, ReadOnly

BLOCK = 4096
MAGIC = b"TPOOLMD1"
FORMAT_VERSION = 1
PM_ENTRIES = BLOCK // 8
_SB_HEADER = struct.Struct("<I8sIQI")  # crc, magic, version, generation, json length
SUPERBLOCKS = 2


def checksum(page: bytes | memoryview | np.ndarray) -> int:
    """CRC-32C of a 4 KiB page (the metadata's only checksum)."""
    return crc32c.crc32c(page)


@dataclass
class PagedArray:
    """How the pool hands one array to the store.

    ``data`` is the array's bytes (a contiguous uint8 view whose length is a multiple of 4 KiB);
    ``dirty`` the page indices changed since the last commit; ``dead`` the subset of those pages
    that are no longer used (their blocks are released instead of written).
    """

    data: np.ndarray
    dirty: np.ndarray
    dead: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class FileIO:
    """The system calls the store writes through; tests substitute a fault-injecting layer
    (torn writes, lost unflushed writes, a stop at the N-th write)."""

    pwrite = staticmethod(os.pwrite)
    fdatasync = staticmethod(os.fdatasync)


class MetadataSpaceExhausted(ReadOnly):
    """No free metadata block for a commit."""


class MetadataStore:
    """A metadata file of ``nr_blocks`` 4 KiB blocks holding paged arrays, committed atomically."""

    #: the write path (class-level so a test can swap it for every store it opens)
    io: FileIO = FileIO()

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise MetadataCorrupt(f"metadata file {path} is missing", structure="file") from None
        self.nr_blocks = os.fstat(self.fd).st_size // BLOCK
        self.generation = 0
        self.header: dict[str, Any] = {}
        self.locs: dict[str, np.ndarray] = {}      # per array: page -> block<<32|crc
        self.pm_locs: dict[str, np.ndarray] = {}   # per array: page-map page -> block<<32|crc
        self.dir_locs: list[int] = []
        self.used = np.zeros(self.nr_blocks, np.uint8)       # reachable from the current state
        self.protected = np.zeros(self.nr_blocks, np.uint8)  # reachable from the last commit / held root
        self.used[:SUPERBLOCKS] = 1
        self.protected[:SUPERBLOCKS] = 1
        self.held_blocks = np.zeros(0, np.int64)

    # ------------------------------------------------------------------ formatting
    @classmethod
    def format(cls, path: str, nr_blocks: int) -> "MetadataStore":
        """Create an empty metadata file of ``nr_blocks`` blocks (sparse) and open it."""
        if nr_blocks < 16:
            raise ReadOnly(f"metadata file {path}: {nr_blocks} blocks is too small (need >= 16)")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, nr_blocks * BLOCK)
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
        if version != FORMAT_VERSION:
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
        return sorted(found, reverse=True)

    def _gather(self, locs: np.ndarray, structure: str) -> np.ndarray:
        """Read and verify the pages at ``locs`` (0 = absent page, read as zeroes)."""
        out = np.zeros((len(locs), BLOCK), np.uint8)
        if len(locs) == 0:
            return out
        blocks = (locs >> np.uint64(32)).astype(np.int64)
        crcs = (locs & np.uint64(0xFFFFFFFF)).astype(np.int64)
        present = np.flatnonzero(blocks)
        if len(present) == 0:
            return out
        bad = blocks[present] >= self.nr_blocks
        if bad.any():
            b = int(blocks[present][bad][0])
            raise MetadataCorrupt(f"{structure}: page at metadata block {b} lies beyond the end of the "
                                  f"metadata file ({self.nr_blocks} blocks; truncated?)", structure=structure, block=b)
        self._read_runs(blocks[present], present, out)
        for i in present:
            if checksum(out[i]) != crcs[i]:
                raise MetadataCorrupt(f"{structure}: bad checksum in metadata block {int(blocks[i])}",
                                      structure=structure, block=int(blocks[i]))
        return out

    def _read_runs(self, blocks: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """Read metadata ``blocks`` into ``out[rows]`` with one preadv per run of consecutive blocks
        that land in consecutive rows (pages are mostly allocated in order, so runs are long)."""
        order = np.argsort(blocks, kind="stable")
        b, r = blocks[order], rows[order]
        breaks = np.flatnonzero((np.diff(b) != 1) | (np.diff(r) != 1)) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [len(b)])).tolist()
        flat = out.reshape(-1)
        for s0, e0 in zip(starts, ends):
            first_row = int(r[s0])
            n = e0 - s0
            want = n * BLOCK
            got = os.preadv(self.fd, [memoryview(flat[first_row * BLOCK:(first_row + n) * BLOCK])], int(b[s0]) * BLOCK)
            if got != want:
                raise MetadataCorrupt(f"{self.path}: short read at metadata block {int(b[s0])} (file truncated?)",
                                      structure="file", block=int(b[s0]))

    def _load_directory(self, header: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[int]]:
        dir_locs = [int(x) for x in header["directory"]]
        pages = self._gather(np.array(dir_locs, np.uint64), "directory")
        raw = pages.tobytes()[: header["directory_bytes"]]
        try:
            directory = json.loads(raw)
        except ValueError:
            first = dir_locs[0] >> 32 if dir_locs else None
            raise MetadataCorrupt(f"{self.path}: directory: not valid JSON (first page at metadata block {first})",
                                  structure="directory", block=first) from None
        pm_locs = {name: np.array(v, np.uint64) for name, v in directory.items()}
        return pm_locs, dir_locs

    def _load_locs(self, pm_locs: dict[str, np.ndarray], npages: dict[str, int]) -> dict[str, np.ndarray]:
        locs = {}
        for name, pml in pm_locs.items():
            pages = self._gather(pml, f"page map of {name}")
            locs[name] = pages.view(np.uint64).reshape(-1)[: npages[name]].copy()
        return locs

    def load(self) -> dict[str, np.ndarray]:
        """Load the newest committed state that verifies; returns the arrays' bytes by name."""
        candidates = self.superblocks()
        if not candidates:
            raise MetadataCorrupt(f"{self.path}: superblock: no valid superblock in metadata blocks 0 and 1 "
                                  f"(not a thinpool metadata file, truncated, or both corrupt)",
                                  structure="superblock", block=0)
        first_error: MetadataCorrupt | None = None
        for generation, _slot, header in candidates:
            try:
                arrays = self._load_state(header)
            except MetadataCorrupt as exc:
                first_error = first_error or exc
                continue
            self.generation = generation
            self.header = header
            if first_error is None:
                first_error = self._newer_damaged_superblock(generation)
            if first_error is not None:
                self.header["recovered_from"] = str(first_error)
            return arrays
        assert first_error is not None
        raise first_error

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

    def _load_state(self, header: dict[str, Any]) -> dict[str, np.ndarray]:
        pm_locs, dir_locs = self._load_directory(header)
        npages = {k: int(v) for k, v in header["pages"].items()}
        locs = self._load_locs(pm_locs, npages)
        arrays = {}
        for name, l in locs.items():
            arrays[name] = self._gather(l, name).reshape(-1)
        held_blocks = np.zeros(0, np.int64)
        if header.get("held"):
            held_blocks = self._blocks_of(header["held"])
        # commit the in-memory bookkeeping only once everything verified
        self.pm_locs, self.locs, self.dir_locs = pm_locs, locs, dir_locs
        self.held_blocks = held_blocks
        self._rebuild_used()
        return arrays

    def _blocks_of(self, held: dict[str, Any]) -> np.ndarray:
        """All blocks reachable from a held directory (so they are never reused while held)."""
        pm_locs, dir_locs = self._load_directory(held)
        npages = {k: int(v) for k, v in held["pages"].items()}
        locs = self._load_locs(pm_locs, npages)
        parts = [np.array(dir_locs, np.uint64)] + list(pm_locs.values()) + list(locs.values())
        allb = (np.concatenate(parts) >> np.uint64(32)).astype(np.int64)
        return allb[allb > 0]

    def load_held(self) -> dict[str, np.ndarray]:
        """Arrays of the held metadata snapshot (see :meth:`hold`)."""
        held = self.header.get("held")
        if not held:
            raise ReadOnly(f"{self.path}: no metadata snapshot is held")
        pm_locs, _ = self._load_directory(held)
        npages = {k: int(v) for k, v in held["pages"].items()}
        locs = self._load_locs(pm_locs, npages)
        return {name: self._gather(l, f"held {name}").reshape(-1) for name, l in locs.items()}

    def _rebuild_used(self) -> None:
        self.used[:] = 0
        self.used[:SUPERBLOCKS] = 1
        for arr in list(self.locs.values()) + list(self.pm_locs.values()) + [np.array(self.dir_locs, np.uint64)]:
            b = (arr >> np.uint64(32)).astype(np.int64)
            self.used[b[b > 0]] = 1
        self.protected = self.used.copy()
        if len(self.held_blocks):
            self.protected[self.held_blocks] = 1

    # ------------------------------------------------------------------ writing
    def used_blocks(self) -> int:
        """Metadata blocks in use by the current state (including superblocks and held blocks)."""
        return int(np.count_nonzero(self.used | self.protected))

    def _allocate(self, count: int) -> np.ndarray:
        """``count`` blocks free now and unused by the last commit (never overwrite committed state)."""
        if count == 0:
            return np.zeros(0, np.int64)
        free = np.flatnonzero((self.used | self.protected) == 0)
        if len(free) < count:
            raise MetadataSpaceExhausted(
                f"{self.path}: out of metadata space ({self.nr_blocks} blocks, {len(free)} free, "
                f"{count} needed for this commit)")
        blocks = free[:count]
        self.used[blocks] = 1
        return blocks

    def _write_pages(self, pages: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Write 4 KiB pages (rows) to blocks; return their CRCs."""
        crcs = np.fromiter((checksum(p) for p in pages), np.uint64, len(pages))
        order = np.argsort(blocks, kind="stable")
        b = blocks[order]
        start = 0
        n = len(b)
        while start < n:
            end = start + 1
            while end < n and b[end] == b[end - 1] + 1:
                end += 1
            self.io.pwrite(self.fd, pages[order[start:end]].tobytes(), int(b[start]) * BLOCK)
            start = end
        return crcs

    def _resized(self, locs: np.ndarray | None, n: int) -> np.ndarray:
        """A location array grown (zeros) or shrunk (releasing the dropped pages' blocks) to ``n``."""
        locs = np.zeros(0, np.uint64) if locs is None else locs
        if len(locs) == n:
            return locs
        if len(locs) > n:
            self._release(locs[n:])
        grown = np.zeros(n, np.uint64)
        keep = min(n, len(locs))
        grown[:keep] = locs[:keep]
        return grown

    def _release(self, locs: np.ndarray) -> None:
        b = (locs >> np.uint64(32)).astype(np.int64)
        self.used[b[b > 0]] = 0

    def estimate_commit_blocks(self, arrays: dict[str, PagedArray]) -> int:
        """Upper bound of fresh blocks a commit of ``arrays`` needs."""
        n = 0
        for pa in arrays.values():
            n += len(pa.dirty) + len(pa.dirty) // PM_ENTRIES + 2
        return n + 4

    def free_blocks(self) -> int:
        return int(self.nr_blocks - np.count_nonzero(self.used | self.protected))

    def commit(self, arrays: dict[str, PagedArray], header: dict[str, Any]) -> None:
        """Write the dirty pages of ``arrays`` and a new superblock carrying ``header``; atomic."""
        if self.read_only:
            raise ReadOnly(f"{self.path}: metadata is read-only")
        new_locs = {k: v.copy() for k, v in self.locs.items()}
        new_pm = {k: v.copy() for k, v in self.pm_locs.items()}
        used_before = self.used.copy()
        try:
            pages_count = {k: int(v) for k, v in self.header.get("pages", {}).items()}
            for name, pa in arrays.items():
                npages = len(pa.data) // BLOCK
                pages_count[name] = npages
                locs = self._resized(new_locs.get(name), npages)
                dirty = np.unique(pa.dirty[pa.dirty < npages]).astype(np.int64)
                is_dead = np.zeros(npages, bool)
                is_dead[pa.dead[pa.dead < npages]] = True
                dead = dirty[is_dead[dirty]]
                live = dirty[~is_dead[dirty]]
                self._release(locs[dirty])
                locs[dead] = 0
                if len(live):
                    view = pa.data.reshape(npages, BLOCK)
                    blocks = self._allocate(len(live))
                    pages = view[live]
                    crcs = self._write_pages(pages, blocks)
                    locs[live] = (blocks.astype(np.uint64) << np.uint64(32)) | crcs
                new_locs[name] = locs
                # page-map pages that point at changed pages
                npm = (npages + PM_ENTRIES - 1) // PM_ENTRIES
                pml = self._resized(new_pm.get(name), npm)
                pm_mask = pml == 0
                pm_mask[dirty // PM_ENTRIES] = True
                changed_pm = np.flatnonzero(pm_mask)
                if len(changed_pm):
                    padded = np.zeros(npm * PM_ENTRIES, np.uint64)
                    padded[:npages] = locs
                    pm_pages = padded.view(np.uint8).reshape(npm, BLOCK)[changed_pm]
                    self._release(pml[changed_pm])
                    blocks = self._allocate(len(changed_pm))
                    crcs = self._write_pages(pm_pages, blocks)
                    pml[changed_pm] = (blocks.astype(np.uint64) << np.uint64(32)) | crcs
                new_pm[name] = pml
            # directory
            directory = json.dumps({k: [int(x) for x in v] for k, v in new_pm.items()}).encode()
            ndir = (len(directory) + BLOCK - 1) // BLOCK
            dir_pages = np.zeros((ndir, BLOCK), np.uint8)
            dir_pages.reshape(-1)[: len(directory)] = np.frombuffer(directory, np.uint8)
            self._release(np.array(self.dir_locs, np.uint64))
            blocks = self._allocate(ndir)
            crcs = self._write_pages(dir_pages, blocks)
            dir_locs = [int(b) << 32 | int(c) for b, c in zip(blocks, crcs)]
            self.io.fdatasync(self.fd)
            header = dict(header)
            if "held" in self.header:
                header["held"] = self.header["held"]
            header.update(directory=dir_locs, directory_bytes=len(directory), pages=pages_count)
            self._write_superblock(self.generation + 1, header)
        except BaseException:
            self.used = used_before
            raise
        self.generation += 1
        self.header = header
        self.locs, self.pm_locs, self.dir_locs = new_locs, new_pm, dir_locs
        self.protected = self.used.copy()
        if len(self.held_blocks):
            self.protected[self.held_blocks] = 1

    def _write_superblock(self, generation: int, header: dict[str, Any]) -> None:
        body = json.dumps(header, separators=(",", ":")).encode()
        if len(body) > BLOCK - _SB_HEADER.size:
            raise MetadataSpaceExhausted(f"{self.path}: superblock header too large ({len(body)} bytes)")
        raw = bytearray(BLOCK)
        _SB_HEADER.pack_into(raw, 0, 0, MAGIC, FORMAT_VERSION, generation, len(body))
        raw[_SB_HEADER.size:_SB_HEADER.size + len(body)] = body
        struct.pack_into("<I", raw, 0, checksum(bytes(raw[4:])))
        self.io.pwrite(self.fd, bytes(raw), (generation % SUPERBLOCKS) * BLOCK)
        self.io.fdatasync(self.fd)

    # ------------------------------------------------------------------ held metadata snapshot
    def hold(self) -> None:
        """Keep the last committed state readable (reserve_metadata_snap); its blocks stay reserved."""
        held = {k: self.header[k] for k in ("directory", "directory_bytes", "pages")}
        held["generation"] = self.generation
        held["root_block"] = int(self.dir_locs[0] >> 32) if self.dir_locs else 0
        self.header["held"] = held
        self.held_blocks = self._blocks_of(held)
        self.protected[self.held_blocks] = 1

    def release_hold(self) -> None:
        self.header.pop("held", None)
        self.held_blocks = np.zeros(0, np.int64)
        self.protected = self.used.copy()
