"""dm-thin's on-disk space map format (the kernel's sm-disk and sm-metadata): 2-bit reference-count
bitmaps, index entries and ref-count trees, read and written for binary metadata.  (The pool's own
in-memory data space map is :mod:`thinpool.dataspace`.)

A space map keeps one reference count per block (docs/dm-thin.md §13):

* **bitmaps** (XOR 240779): ``csum u32 @0, not_used u32 @4, blocknr u64 @8`` then 4080 bytes of
  2-bit entries, 16320 per bitmap.  Entry ``i`` is in byte ``16 + i // 4`` at shift ``2 * (i % 4)``;
  the lower bit of the pair is the *high* bit of the value, so count 1 is stored as ``0b10``,
  2 as ``0b01``, and 3 (``0b11``) means "3 or more: look in the ref-count tree".
* **index entries** (16 bytes): ``blocknr u64`` (the bitmap), ``nr_free u32``,
  ``none_free_before u32`` (the first possibly-free entry).  The data space map keeps them in a
  btree keyed by bitmap number (value size 16); the metadata space map in a single index block
  (XOR 160478, entries from byte 16, at most 255).
* **ref-count tree**: btree, key = block, value = u32 count, holding exactly the blocks whose
  bitmap entry is 3.
* **root** (first 32 of the 128 bytes the superblock reserves for each map): ``nr_blocks``,
  ``nr_allocated``, ``bitmap_root`` (index tree root / index block) and ``ref_count_root``.

Counts follow the kernel's conventions: every bitmap's ``nr_free`` starts at 16320 (the last,
partial bitmap included) and is decremented per allocated block.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from thinpool.interop.btree import (
    BITMAP_CSUM_XOR,
    BLOCK_SIZE,
    INDEX_CSUM_XOR,
    BlockSource,
    ForestContents,
    corrupt,
    walk_forest,
)

ENTRIES_PER_BITMAP = (BLOCK_SIZE - 16) * 4  # 16320
BITMAP_BYTES = BLOCK_SIZE - 16
MAX_METADATA_BITMAPS = 255
MAX_METADATA_BLOCKS = MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP  # 4,161,600
MAX_DATA_BLOCKS = 1 << 40  # a mapping value holds the data block in 40 bits (above a 24-bit time)
SM_ROOT_SIZE = 32
SM_ROOT_AREA = 128

#: 2-bit pattern written for counts 0, 1, 2, 3+ (and, being an involution, the decoding table)
_ENCODE = np.array([0, 2, 1, 3], dtype=np.uint8)
_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


def nr_bitmaps(nr_blocks: int) -> int:
    """Bitmaps needed for ``nr_blocks`` entries."""
    return -(-nr_blocks // ENTRIES_PER_BITMAP)


@dataclass
class SpaceMapRoot:
    """The 32-byte space-map root stored in the superblock."""

    nr_blocks: int
    nr_allocated: int
    bitmap_root: int
    ref_count_root: int

    def pack(self) -> bytes:
        """The 128-byte superblock area (root then zero padding)."""
        raw = struct.pack("<4Q", self.nr_blocks, self.nr_allocated, self.bitmap_root, self.ref_count_root)
        return raw.ljust(SM_ROOT_AREA, b"\0")

    @classmethod
    def unpack(cls, area: bytes) -> SpaceMapRoot:
        """Parse the first 32 bytes of a superblock space-map area."""
        return cls(*struct.unpack_from("<4Q", area))


@dataclass
class SpaceMapContent:
    """Everything needed to write one space map, computed from per-block reference counts.

    ``bitmaps`` is ``(nr_bitmaps, 4080)`` uint8 (the bytes after each bitmap's 16-byte header);
    ``rc_blocks``/``rc_counts`` are the ref-count tree's entries (counts ≥ 3).
    """

    nr_blocks: int
    nr_allocated: int
    bitmaps: np.ndarray
    nr_free: np.ndarray
    none_free_before: np.ndarray
    rc_blocks: np.ndarray
    rc_counts: np.ndarray

    def index_entries(self, bitmap_blocks: np.ndarray) -> np.ndarray:
        """Index entries for bitmaps stored at ``bitmap_blocks``, as ``(n, 4)`` uint32 words."""
        entries = np.zeros((len(bitmap_blocks), 4), np.uint32)
        entries.view(np.uint64)[:, 0] = np.asarray(bitmap_blocks, np.uint64)
        entries[:, 2] = self.nr_free
        entries[:, 3] = self.none_free_before
        return entries


def build_space_map(blocks: np.ndarray, counts: np.ndarray, nr_blocks: int) -> SpaceMapContent:
    """Encode the counts ``counts[i]`` of the distinct, sorted, in-range ``blocks[i]`` (others 0).

    Cost is O(len(blocks) + nr_blocks / 4): bitmaps are built by scattering 2-bit codes.
    """
    blocks = np.asarray(blocks, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    used = counts > 0
    blocks, counts = blocks[used], counts[used]
    n_bm = nr_bitmaps(nr_blocks)
    flat = np.zeros(n_bm * BITMAP_BYTES, np.uint8)
    codes = _ENCODE[np.minimum(counts, 3)] << (2 * (blocks % 4)).astype(np.uint8)
    np.bitwise_or.at(flat, blocks // 4, codes)
    which = blocks // ENTRIES_PER_BITMAP
    allocated = np.bincount(which, minlength=n_bm)
    return SpaceMapContent(
        nr_blocks=nr_blocks,
        nr_allocated=int(blocks.size),
        bitmaps=flat.reshape(n_bm, BITMAP_BYTES),
        nr_free=(ENTRIES_PER_BITMAP - allocated).astype(np.uint32),
        none_free_before=_first_free(blocks, which, allocated),
        rc_blocks=blocks[counts >= 3].astype(np.uint64),
        rc_counts=np.minimum(counts[counts >= 3], 0xFFFFFFFF).astype(np.uint32),
    )


def space_map_from_counts(counts: np.ndarray, nr_blocks: int, bitmaps_at_once: int = 256) -> SpaceMapContent:
    """:func:`build_space_map` from one count per block (``counts``, length ``nr_blocks``, unsigned),
    encoded ``bitmaps_at_once`` bitmaps at a time: no per-block temporary beyond that window.  A count
    the caller's dtype saturates (255 in a uint8 array) is stored as that value in ``rc_counts``: the
    caller puts the exact count there."""
    n_bm = nr_bitmaps(nr_blocks)
    flat = np.zeros((n_bm, BITMAP_BYTES), np.uint8)
    nr_free = np.zeros(n_bm, np.uint32)
    hint = np.zeros(n_bm, np.uint32)
    rc_blocks, rc_counts = [], []
    allocated = 0
    step = bitmaps_at_once * ENTRIES_PER_BITMAP
    for lo in range(0, nr_blocks, step):
        part = counts[lo : min(nr_blocks, lo + step)]
        b0 = lo // ENTRIES_PER_BITMAP
        nb = nr_bitmaps(part.size)
        c = np.zeros(nb * ENTRIES_PER_BITMAP, np.uint8)
        c[: part.size] = np.minimum(part, 3)
        codes = _ENCODE[c].reshape(-1, 4)
        flat[b0 : b0 + nb] = (codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
                              ).reshape(nb, BITMAP_BYTES)
        used = c.reshape(nb, ENTRIES_PER_BITMAP) != 0
        n_used = used.sum(axis=1)
        nr_free[b0 : b0 + nb] = ENTRIES_PER_BITMAP - n_used
        full = n_used == ENTRIES_PER_BITMAP
        hint[b0 : b0 + nb] = np.where(full, ENTRIES_PER_BITMAP, np.argmin(used, axis=1))
        allocated += int(n_used.sum())
        over = np.flatnonzero(part >= 3)
        rc_blocks.append((lo + over).astype(np.uint64))
        rc_counts.append(np.minimum(part[over].astype(np.uint64), 0xFFFFFFFF).astype(np.uint32))
    return SpaceMapContent(
        nr_blocks=nr_blocks, nr_allocated=allocated, bitmaps=flat, nr_free=nr_free, none_free_before=hint,
        rc_blocks=np.concatenate(rc_blocks or [np.zeros(0, np.uint64)]),
        rc_counts=np.concatenate(rc_counts or [np.zeros(0, np.uint32)]))


def _first_free(blocks: np.ndarray, which: np.ndarray, allocated: np.ndarray) -> np.ndarray:
    """Per bitmap, the first entry that is free: the none_free_before hint."""
    hint = np.zeros(len(allocated), np.uint32)
    if not blocks.size:
        return hint
    group0 = np.cumsum(allocated) - allocated
    local = blocks - which * ENTRIES_PER_BITMAP
    rank = np.arange(blocks.size) - group0[which]
    # the first free entry is the first rank whose block is not equal to it, else the count
    candidate = np.where(local != rank, rank, allocated[which])
    present = np.flatnonzero(allocated)
    hint[present] = np.minimum.reduceat(candidate, group0[present])
    return hint


def decode_bitmaps(bitmaps: np.ndarray, nr_blocks: int) -> np.ndarray:
    """The 2-bit values (0, 1, 2 or 3 = "see ref-count tree") of the first ``nr_blocks`` entries."""
    flat = np.ascontiguousarray(bitmaps).reshape(-1)
    pairs = (flat[:, None] >> _SHIFTS) & 3
    return _ENCODE[pairs.reshape(-1)[:nr_blocks]]


def unpack_index_entries(words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(blocknr, nr_free, none_free_before)`` from ``(n, 16)`` uint8 index entries."""
    raw = np.ascontiguousarray(words).view(np.uint32).reshape(-1, 4)
    return raw.view(np.uint64)[:, 0].astype(np.int64), raw[:, 2].copy(), raw[:, 3].copy()


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class SpaceMapOnDisk:
    """A space map read from disk and structurally verified (every bitmap's checksum included).

    ``metadata_refs`` lists the metadata blocks the space map itself references (index block or
    index tree nodes, bitmaps, ref-count tree nodes), one entry per reference.
    """

    name: str
    root: SpaceMapRoot
    bitmap_blocks: np.ndarray
    nr_free: np.ndarray
    none_free_before: np.ndarray
    rc_blocks: np.ndarray
    rc_counts: np.ndarray
    metadata_refs: np.ndarray

    def ref_counts(self, src: BlockSource) -> np.ndarray:
        """The reference count of every block (uint32, length ``root.nr_blocks``)."""
        parts = [decode_bitmaps(chunk[:, 16:], ENTRIES_PER_BITMAP * len(chunk))
                 for chunk in _read_bitmaps(src, self.bitmap_blocks, self.name)]
        values = np.concatenate(parts or [np.zeros(0, np.uint8)])[: self.root.nr_blocks]
        counts = values.astype(np.uint32)
        overflow = np.flatnonzero(values == 3)
        if not np.array_equal(overflow.astype(np.uint64), self.rc_blocks) or np.any(self.rc_counts < 3):
            mismatch = np.setxor1d(overflow.astype(np.uint64), self.rc_blocks)
            block = int(mismatch[0]) if mismatch.size else int(self.rc_blocks[np.argmax(self.rc_counts < 3)])
            raise corrupt(self.name, None, f"ref-count tree disagrees with the bitmaps about block {block}")
        counts[overflow] = self.rc_counts
        return counts


def _read_bitmaps(src: BlockSource, blocks: np.ndarray, name: str, chunk: int = 4096) -> Iterator[np.ndarray]:
    """Yield the bitmap blocks (verified) ``chunk`` at a time."""
    for i in range(0, len(blocks), chunk):
        part = blocks[i : i + chunk]
        yield src.read(part, BITMAP_CSUM_XOR, lambda j: name, "space map bitmap")


def _read_ref_count_tree(src: BlockSource, root: int, name: str) -> tuple[ForestContents, np.ndarray]:
    tree = walk_forest(src, np.array([root]), 4, lambda t: name + " ref-count tree")
    return tree, tree.values.view(np.uint32).reshape(-1)


def read_data_space_map(src: BlockSource, root: SpaceMapRoot, name: str = "data space map") -> SpaceMapOnDisk:
    """Read and verify the data space map: index btree, bitmaps and ref-count tree."""
    n_bm = nr_bitmaps(root.nr_blocks)
    if root.nr_blocks == 0 or root.nr_blocks > MAX_DATA_BLOCKS or n_bm > src.limit:
        # checked before anything is sized by it: a hostile 2^63 must not become a 4 PiB array
        raise corrupt(name, 0, f"nr_blocks {root.nr_blocks} is out of range: "
                               + ("a data device has at least one block" if root.nr_blocks == 0 else
                                  f"dm-thin addresses at most 2^40 data blocks" if root.nr_blocks > MAX_DATA_BLOCKS
                                  else f"it needs {n_bm} bitmap blocks, the metadata has only {src.limit} blocks"))
    index = walk_forest(src, np.array([root.bitmap_root], np.uint64), 16, lambda t: name + " index tree")
    if index.keys.size != n_bm or not np.array_equal(index.keys, np.arange(n_bm, dtype=np.uint64)):
        raise corrupt(name + " index tree", root.bitmap_root,
                      f"keys for {index.keys.size} bitmaps, expected 0..{n_bm - 1}")
    blocks, nr_free, hint = unpack_index_entries(index.values)
    for _ in _read_bitmaps(src, blocks, name):
        pass
    rc, rc_counts = _read_ref_count_tree(src, root.ref_count_root, name)
    refs = np.concatenate(([root.bitmap_root], index.child_refs, blocks[index.fresh], [root.ref_count_root],
                           rc.child_refs)).astype(np.int64)
    return SpaceMapOnDisk(name, root, blocks, nr_free, hint, rc.keys, rc_counts, refs)


def read_metadata_space_map(src: BlockSource, root: SpaceMapRoot,
                            name: str = "metadata space map") -> SpaceMapOnDisk:
    """Read and verify the metadata space map: index block, bitmaps and ref-count tree."""
    n_bm = nr_bitmaps(root.nr_blocks)
    if n_bm > MAX_METADATA_BITMAPS:
        raise corrupt(name, None, f"{root.nr_blocks} blocks need {n_bm} bitmaps (at most {MAX_METADATA_BITMAPS})")
    block = src.read(np.array([root.bitmap_root]), INDEX_CSUM_XOR, lambda i: name, "space map index block")[0]
    blocks, nr_free, hint = unpack_index_entries(block[16 : 16 + 16 * n_bm].reshape(-1, 16))
    for _ in _read_bitmaps(src, blocks, name):
        pass
    rc, rc_counts = _read_ref_count_tree(src, root.ref_count_root, name)
    refs = np.concatenate(([root.bitmap_root], blocks, [root.ref_count_root], rc.child_refs)).astype(np.int64)
    return SpaceMapOnDisk(name, root, blocks, nr_free, hint, rc.keys, rc_counts, refs)
