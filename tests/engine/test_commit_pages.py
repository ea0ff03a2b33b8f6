"""What one small commit writes and in which order (dm-thin-metadata.c's commit: every dirty block
written, then the superblock; data flushed before the superblock that maps it; a small commit's pages
and superblock made durable by one flush, the superblock listing the pages).

A recording layer under the metadata store (``MetadataStore.io``) and the data file (``DataDevice.io``)
logs every ``pwrite`` and ``fdatasync`` of a commit.  The page sets are the ones a commit of that
change must write (docs/performance.md, "Where the time of a commit goes"): a page of every array the
change touches, the page-map page above it, the directory -- nothing unchanged -- then the superblock.
"""

from __future__ import annotations

import os

import pytest

from thinpool import Pool, mdstore
from thinpool.hostio import DataIO
from thinpool.mdpages import BLOCK, COMMIT_PAGES, SUPERBLOCKS, checksum

BS = 64 * 1024


class Recorder:
    """Logs (file, call, first block, blocks) for the metadata store's and the data file's calls."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, int, int]] = []

    def store_io(self) -> object:
        rec = self

        class StoreIO(mdstore.FileIO):
            @staticmethod
            def pwrite(fd: int, data, offset: int) -> int:
                rec.log.append(("md", "pwrite", offset // BLOCK, len(memoryview(data).cast("B")) // BLOCK))
                return os.pwrite(fd, data, offset)

            @staticmethod
            def fdatasync(fd: int) -> None:
                rec.log.append(("md", "fdatasync", 0, 0))
                os.fdatasync(fd)

        return StoreIO()

    def data_io(self) -> object:
        rec = self

        class RecDataIO(DataIO):
            @staticmethod
            def fdatasync(fd: int) -> None:
                rec.log.append(("data", "fdatasync", 0, 0))
                os.fdatasync(fd)

        return RecDataIO()


@pytest.fixture
def pool_rec(tmp_path):
    p = Pool.create(str(tmp_path / "pool"), data_size=1 << 30, block_size=BS)
    v = p.create_thin("v", 1 << 30)
    v.write(0, b"a" * 4096)
    p.commit()
    rec = Recorder()
    p._store.io = rec.store_io()
    p._data.io = rec.data_io()
    arrays: list[set[str]] = []
    real = mdstore.MetadataStore.commit

    def spy(self, arrs, header, **kw):
        arrays.append({name for name, pa in arrs.items() if pa.dirty})
        return real(self, arrs, header, **kw)

    mdstore.MetadataStore.commit = spy
    try:
        yield p, v, rec, arrays
    finally:
        mdstore.MetadataStore.commit = real
        p.close()


def _pages(log: list[tuple[str, str, int, int]]) -> list[int]:
    """The metadata blocks written before the superblock."""
    return [b for f, call, first, n in log if f == "md" and call == "pwrite" and first >= SUPERBLOCKS
            for b in range(first, first + n)]


def _check_order(log: list[tuple[str, str, int, int]], store) -> None:
    """page writes; the data flush; one superblock write; one metadata flush -- 2 flushes (a one-flush
    commit: the data is durable before the superblock is written, and the superblock lists every page
    the commit wrote, block and CRC-32C, so that a load can tell whether they all reached the disk)."""
    calls = [(f, call) for f, call, _first, _n in log]
    assert calls.count(("data", "fdatasync")) == 1 and calls.count(("md", "fdatasync")) == 1, log
    sb = [i for i, (f, call, first, _n) in enumerate(log) if f == "md" and call == "pwrite" and first < SUPERBLOCKS]
    assert len(sb) == 1 and log[sb[0]][3] == 1, log
    assert calls[sb[0] - 1] == ("data", "fdatasync") and calls[sb[0] + 1:] == [("md", "fdatasync")], log
    assert all(f == "md" and call == "pwrite" for f, call, *_ in log[:sb[0] - 1]), log
    listed = store.header[COMMIT_PAGES]
    assert sorted(loc >> 32 for loc in listed) == sorted(_pages(log)), (listed, log)
    for loc in listed:
        assert checksum(os.pread(store.fd, BLOCK, (loc >> 32) * BLOCK)) == loc & 0xFFFFFFFF


def test_kernel_rule_commit_writes_dirty_blocks_flushes_then_superblock_new_leaf(pool_rec):
    """A first write into a new leaf: its pack page, the inner node that points at it, the new leaf's
    reference count, the data space map's bitmap page, the device record (mapped count) -- one
    page-map page each -- and the directory: 11 distinct fresh blocks, then the superblock."""
    p, v, rec, arrays = pool_rec
    v.write(600 * BS, b"d" * 4096)
    p.commit()
    _check_order(rec.log, p._store)
    assert arrays == [{"leaf_packs", "inner_packs", "leaf_rc", "data_sm", "devs"}]
    pages = _pages(rec.log)
    assert len(pages) == 11 == len(set(pages)), rec.log
    # one run of free blocks (MetadataSpace._reserve_run): one pwrite, one range for the flush to write
    assert pages == list(range(pages[0], pages[0] + 11)), rec.log
    assert sum(1 for f, call, first, _n in rec.log if f == "md" and call == "pwrite" and first >= SUPERBLOCKS) == 1


def test_commit_pages_stay_in_blocks_written_before(pool_rec):
    """Many one-write commits reuse the same few metadata blocks (the run is looked for just above the
    lowest free block), so the sparse metadata file is not filled with fresh blocks one commit at a time."""
    p, v, rec, _arrays = pool_rec
    for i in range(40):
        v.write((700 + 600 * i) * BS % (1 << 30), b"e" * 4096)
        p.commit()
    written = _pages(rec.log)
    assert max(written) < 64, sorted(set(written))


def test_kernel_rule_unchanged_pages_are_not_rewritten_same_leaf(pool_rec):
    """A first write into a leaf that exists: no inner node and no leaf reference count changes, so
    only the leaf's pack page, the bitmap page and the device record (and their page maps, the
    directory) are written."""
    p, v, rec, arrays = pool_rec
    v.write(BS, b"b" * 4096)
    p.commit()
    _check_order(rec.log, p._store)
    assert arrays == [{"leaf_packs", "data_sm", "devs"}]
    assert len(_pages(rec.log)) == 7, rec.log


def test_kernel_rule_commit_without_metadata_change_only_flushes_data(pool_rec):
    """An overwrite of a provisioned, unshared block changes no metadata: the commit flushes the data
    file and writes nothing else (dm-thin's commit is a no-op without a change)."""
    p, v, rec, arrays = pool_rec
    gen = p._store.generation
    v.write(0, b"c" * 4096)
    p.commit()
    assert rec.log == [("data", "fdatasync", 0, 0)]
    assert arrays == []
    assert p._store.generation == gen  # no superblock was written
