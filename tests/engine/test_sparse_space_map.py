"""A 1 PiB pool at 64 KiB blocks (2^34 data blocks): the data space map costs what the blocks in use
touch, not 4 + 1 bytes per block of the data device (80 GiB), and its semantics stay dm-thin's."""

from __future__ import annotations

import numpy as np

from thinpool import Pool
from thinpool import schema as K
from thinpool.spacemap_pages import RC_PER_PAGE, SM_PER_PAGE

BS = 64 << 10
NR = (1 << 50) // BS  # 2^34 data blocks
VOL = 16 << 40


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS in /proc/self/status")


def _maps(vol) -> dict[int, int]:
    vb, blocks, _ = vol.mappings()
    return dict(zip(vb.tolist(), blocks.tolist()))


def _counts(pool: Pool, blocks: list[int]) -> list[int]:
    return pool.space.data_rc[blocks].tolist()


LAST = VOL // BS - 1
# volume a after the writes below: virtual block -> data block
A_MAP = {0: 4, 5: NR - 2, 6: NR - 1, 7: 2, 8: 3, LAST: 1}
S_MAP = {0: 0, 5: NR - 2, 6: NR - 1, 7: 2, 8: 3, LAST: 1}
BLOCKS = [0, 1, 2, 3, 4, NR - 2, NR - 1]


def test_kernel_rule_allocation_searches_from_the_cursor_and_wraps_on_a_1_pib_pool_with_a_sparse_space_map(tmp_path):
    """dm-thin's allocator searches the space map from its cursor, wrapping at the end, skipping blocks
    in use; a data block's count is the number of distinct leaves mapping it (shadowing a shared leaf
    adds one to each of its blocks).  On a pool of 2^34 blocks the in-memory map allocates a 1,024-block
    page of counts only when one of its blocks is used: after writes at both ends of the data device
    two such pages are live, before and after a reopen, and the process grew by far less than the
    80 GiB a flat map would take."""
    rss0 = _rss()
    path = tmp_path / "p"
    pool = Pool.create(path, data_size="1PiB", block_size="64KiB", metadata_only=True, metadata_size="1GiB")
    sp = pool.space
    assert sp.nr_blocks == NR and len(sp.data_rc) == NR and sp.live_page_count() == 0
    a = pool.create_thin("a", VOL)
    a.write(0, b"first")                  # near the start of the volume: data block 0
    a.write(LAST * BS, b"last")           # its last block: data block 1
    pool._st[K.ST_CURSOR] = NR - 2        # the allocator's cursor near the end of the data device
    a.write(5 * BS, b"\1" * (4 * BS))     # NR-2, NR-1, then wrapping: 2, 3 (0 and 1 are in use)
    pool.snapshot("a", "s")
    a.write(0, b"cow")                    # shared with s (time rule): a new block, 4
    pool.commit()
    assert _maps(a) == A_MAP and _maps(pool.thin("s")) == S_MAP
    # a's write shadowed its path to the near leaf: that leaf's blocks gained a reference, block 0
    # lost a's; the far leaf (block 1) is still one leaf shared by both volumes
    assert _counts(pool, BLOCKS) == [1, 1, 2, 2, 1, 2, 2]
    assert pool.status().used_data_blocks == 7 and sp.used() == 7
    assert sp.live_page_count() == 2  # page 0 and the last page of 16,777,216
    assert sp.disk_pages() == 2       # and on disk one bitmap page at each end, no overflow page
    assert pool.check().ok and pool.check().data_blocks_used == 7
    usage = {u.name: (u.mapped_blocks, u.exclusive_blocks) for u in pool.usage()}
    assert usage == {"a": (6, 1), "s": (6, 1)}  # 4 is a's own block, 0 s's: the other five are shared
    assert _rss() - rss0 < 2 << 30
    pool.close()

    pool = Pool.open(path)
    sp = pool.space
    assert sp.live_page_count() == 2 and sp.used() == 7
    assert int(pool.st[K.ST_NR_ALLOCATABLE]) == NR - 7
    a, s = pool.thin("a"), pool.thin("s")
    assert _maps(a) == A_MAP and _maps(s) == S_MAP
    assert _counts(pool, BLOCKS) == [1, 1, 2, 2, 1, 2, 2]
    assert int(pool.st[K.ST_CURSOR]) == 5  # persisted at the commit: past the last block allocated (4)
    assert pool.check().ok
    pool.delete("s")                      # s's only own block (0) is freed; the rest lose a reference
    assert _counts(pool, BLOCKS) == [0, 1, 1, 1, 1, 1, 1] and sp.used() == 6
    a.write(9 * BS, b"x")                 # block 0 was freed in this transaction: not reused (kernel
    assert _maps(a)[9] == 5               # commit 4feaef830de7), the search goes on from the cursor
    pool.commit()
    assert pool.status().used_data_blocks == 7 and sp.live_page_count() == 2
    assert _rss() - rss0 < 2 << 30
    pool.close()

    with Pool.open(path, read_only=True) as pool:
        assert pool.space.used() == 7 and pool.space.live_page_count() == 2
        assert _counts(pool, BLOCKS + [5]) == [0, 1, 1, 1, 1, 1, 1, 1]
        # close committed once more (the last commit freed a block): block 0 is released, allocatable
        assert len(pool.space.pending) == 0 and pool.space.is_allocatable([0, 5]).tolist() == [True, False]
        assert int(pool.st[K.ST_NR_ALLOCATABLE]) == NR - 7


def test_a_sparse_space_map_grows_and_its_scans_visit_only_the_live_pages(tmp_path):
    """A pool grown from 1 GiB to 1 PiB: its counts are copied into a map of 2^34 blocks that stays
    sparse (the live pages only), the grown range is neither live nor dirty, and a block allocated at
    the far end counts in the used blocks after a reopen."""
    path = tmp_path / "p"
    with Pool.create(path, data_size="1GiB", block_size="64KiB", metadata_only=True, metadata_size="1GiB") as pool:
        v = pool.create_thin("v", VOL)
        v.write_many(np.arange(100) * BS, np.ones((100, 10), np.uint8))
        pool.commit()
        pool.resize("1PiB", metadata_size="9GiB")  # room for a bitmap of the whole range in use
        sp = pool.space
        assert sp.nr_blocks == NR and sp.live_page_count() == 1 and sp.used() == 100
        assert not sp.rc_dirty.any()
        pool._st[K.ST_CURSOR] = NR - 1
        v.write(200 * BS, b"far")
        assert _maps(v)[200] == NR - 1 and sp.live_page_count() == 2
        assert sp.stale_count() == 0 and sp.used() == 101
    with Pool.open(path) as pool:
        assert pool.space.used() == 101 and pool.space.live_page_count() == 2
        assert pool.status().used_data_blocks == 101
        assert pool.store.npages("data_sm") == NR // SM_PER_PAGE
        assert pool.store.npages("data_rc_over") == NR // RC_PER_PAGE


def test_check_finds_a_wrong_count_at_the_far_end_of_a_1_pib_pool(tmp_path):
    """thin_check's rule: every data block's count equals the number of distinct leaves mapping it; on a
    pool of 2^34 blocks the check recounts the trees into a lazily zeroed array and compares the pages
    in use (an open makes them exactly the pages holding a count)."""
    with Pool.create(tmp_path / "p", data_size="1PiB", block_size="64KiB", metadata_only=True,
                     metadata_size="1GiB") as pool:
        a = pool.create_thin("a", VOL)
        pool._st[K.ST_CURSOR] = NR - 1
        a.write(0, b"x")
        assert _maps(a) == {0: NR - 1}
        pool.space.data_rc[NR - 1] = 5  # as a damaged space map would have it
        report = pool.check()
        assert not report.ok
        assert f"data block {NR - 1}: reference count is 5, expected 1" in report.errors
        pool.space.data_rc[NR - 1] = 1
        assert pool.check().ok


def test_kernel_rule_a_damaged_space_map_page_falls_back_to_the_previous_commit_on_a_1_pib_pool(tmp_path):
    """A metadata page that fails its checksum makes the open use the previous commit (dm-thin keeps
    the last transaction's blocks until the next commit is durable); on a pool of 2^34 blocks the
    space map's whole arrays are then read (a private map, pages of zeroes cost nothing) and the
    counts are those of that commit."""
    path = tmp_path / "p"
    with Pool.create(path, data_size="1PiB", block_size="64KiB", metadata_only=True, metadata_size="1GiB") as pool:
        a = pool.create_thin("a", VOL)
        a.write(0, b"x")
        pool.commit()
        a.write(600_000 * BS, b"y")  # a second block: the bitmap's page 0 is written again
        pool.commit()
        loc = pool.store.locs["data_sm"][0] >> 32
    with open(path / "metadata", "r+b") as f:
        f.seek(loc * 4096 + 100)
        f.write(b"\xa5" * 16)
    with Pool.open(path, read_only=True) as pool:
        assert "data_sm: bad checksum" in (pool.recovered_from or "")
        assert pool.space.used() == 1 and _maps(pool.thin("a")) == {0: 0}
        assert pool.space.live_page_count() == 1 and pool.check().ok


def test_page_flags_scanned_a_word_at_a_time_are_the_flags_set(monkeypatch):
    """The map's page flags (dirty, live) are scanned eight at a time on a big map: the pages found are
    exactly numpy's ``flatnonzero`` of the flags, for any length (a tail past the last whole word) and
    any density (a dense map falls back to one scan of the bytes)."""
    from thinpool import dataspace
    monkeypatch.setattr(dataspace, "_WORDS_FROM", 0)
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 8, 9, 2051, 1 << 16):
        for p in (0.0, 0.001, 0.1, 0.5, 1.0):
            flags = (rng.random(n) < p).astype(np.uint8) * rng.integers(1, 256, n).astype(np.uint8)
            got = dataspace.flagged(flags)
            assert got.dtype == np.int64 and np.array_equal(got, np.flatnonzero(flags)), (n, p)
