"""A big pool's open maps its dense nodes' pages from the metadata file instead of reading them
(:meth:`thinpool.mdstore.MetadataStore.map_into`: private maps, every page still verified), and
keeps its space map's pages undecoded until the counts are first used (then decoded in whole runs
of pages) (perf row S10).  What such an open gives is what the plain read gives; a write to a mapped
row never reaches the file; a commit that releases a mapped row's block gives that row its own copy
first, so a later commit may reuse the block; a damaged page still makes the open fall back to the
previous commit."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from thinpool import Pool, nodestore
from thinpool import schema as K
from thinpool.dataspace import DataSpaceMap
from thinpool.spacemap_pages import RC_PER_PAGE, SM_PER_PAGE, StoredCounts, counts_from_disk
from thinpool.errors import MetadataCorrupt

from tests.support import damage_a_new_leaf_page

BS = 64 * 1024
BLOCK_BYTES = 4096
ONE = np.ones((4000, 1), np.uint8)


def _pool(path) -> None:
    """Dense leaves (two origins), their snapshots' shadowed leaves, sparse leaves, a deleted volume."""
    with Pool.create(path, data_size=16384 * BS, metadata_only=True) as pool:
        rng = np.random.default_rng(5)
        for name in ("a", "b"):
            pool.create_thin(name, "64GiB").write_many(np.arange(3000, dtype=np.int64) * BS, ONE[:3000])
        for i in range(4):
            pool.snapshot("a", f"s{i}")
            pool.thin(f"s{i}").write_many(rng.integers(0, 3000, 30).astype(np.int64) * BS, ONE[:30])
        pool.create_thin("sparse", "64GiB").write_many(np.arange(0, 400 * 2048, 2048, dtype=np.int64) * BS,
                                                       ONE[:400])
        pool.delete("s2")


@pytest.fixture
def mapped(monkeypatch):
    """Every open maps its dense nodes (the big-pool path, whatever the size)."""
    monkeypatch.setattr(nodestore, "POPULATE_MIN", 0)
    monkeypatch.setattr(nodestore, "MAP_NODES", True)


def _open(path, maps: bool, monkeypatch, **kw) -> Pool:
    monkeypatch.setattr(nodestore, "MAP_NODES", maps)
    pool = Pool.open(path, **kw)
    assert (pool._leaf_disk.mapped is not None) == maps
    return pool


def _state(pool: Pool) -> dict:
    return {t.name: (t.mappings()[0].tolist(), t.mappings()[1].tolist()) for t in pool.thins()}


def _digest(path) -> str:
    return hashlib.sha256((path / "metadata").read_bytes()).hexdigest()


def test_a_mapped_open_gives_what_the_read_open_gives(tmp_path, mapped, monkeypatch):
    _pool(tmp_path / "p")
    with _open(tmp_path / "p", True, monkeypatch, read_only=True) as m, \
            _open(tmp_path / "p", False, monkeypatch, read_only=True) as r:
        for a, b in ((m.nodes_map.leaves, r.nodes_map.leaves), (m.nodes_map.inners, r.nodes_map.inners)):
            assert a.shape == b.shape and np.array_equal(a, b)
        assert np.array_equal(m.space.data_rc, r.space.data_rc)
        assert _state(m) == _state(r)
        assert [u.as_dict() for u in m.usage()] == [u.as_dict() for u in r.usage()]
        dm, dr = m.to_metadata(), r.to_metadata()  # the same dump (export-metadata's IR)
        assert dm.superblock == dr.superblock and len(dm.devices) == len(dr.devices) == 6
        for a, b in zip(dm.devices, dr.devices):
            assert (a.dev_id, a.mapped_blocks, a.transaction, a.creation_time, a.snap_time) == \
                (b.dev_id, b.mapped_blocks, b.transaction, b.creation_time, b.snap_time)
            assert all(np.array_equal(x, y) for x, y in ((a.vblocks, b.vblocks), (a.dblocks, b.dblocks),
                                                         (a.times, b.times)))
        assert m.check().ok


def test_a_write_to_a_mapped_row_never_reaches_the_metadata_file(tmp_path, mapped, monkeypatch):
    _pool(tmp_path / "p")
    before = _digest(tmp_path / "p")
    pool = _open(tmp_path / "p", True, monkeypatch, read_only=True)
    want = _state(pool)
    rows = np.flatnonzero(pool._leaf_disk.mapped)
    assert len(rows)
    pool.nodes_map.leaves[rows] = 12345  # every mapped row written in memory
    pool.close(commit=False)
    assert _digest(tmp_path / "p") == before
    with _open(tmp_path / "p", True, monkeypatch, read_only=True) as again:
        assert _state(again) == want


def test_a_commit_copies_a_mapped_row_before_its_block_can_be_reused(tmp_path, mapped, monkeypatch):
    """A dense leaf marked dirty but never written in memory is still a map of its old block: the
    commit that releases that block must copy the row first, or the next commits, which reuse freed
    metadata blocks, would change the leaf under the pool."""
    _pool(tmp_path / "p")
    pool = _open(tmp_path / "p", True, monkeypatch)
    bm = pool.nodes_map
    dense = np.flatnonzero(pool._leaf_disk.mapped)
    want_rows = bm.leaves[dense].copy()
    want = _state(pool)
    bm.leaf_dirty[dense] = 1  # rewritten unchanged: every one of their blocks released
    pool.commit()
    for _ in range(3):  # the next commits rewrite them again, into the blocks just released
        bm.leaf_dirty[dense] = 1
        pool.commit()
    assert np.array_equal(bm.leaves[dense], want_rows)
    assert not pool._leaf_disk.mapped.any()
    assert _state(pool) == want and pool.check().ok
    pool.thin("b").write_many(np.arange(3000, 3100, dtype=np.int64) * BS, ONE[:100])
    pool.close()
    with _open(tmp_path / "p", False, monkeypatch) as again:
        want["b"] = (list(range(3100)), again.thin("b").mappings()[1].tolist())
        assert _state(again) == want and again.check().ok


def test_writes_and_commits_after_a_mapped_open_equal_those_after_a_read_open(tmp_path, mapped, monkeypatch):
    _pool(tmp_path / "m")
    _pool(tmp_path / "r")
    rng = np.random.default_rng(8)
    pools = [_open(tmp_path / "m", True, monkeypatch), _open(tmp_path / "r", False, monkeypatch)]
    for step in range(6):
        offs = rng.integers(0, 3000, 200).astype(np.int64) * BS
        cut = int(rng.integers(0, 2900)) * BS
        for p in pools:
            p.thin(["a", "s0", "s1", "s3"][step % 4]).write_many(offs, ONE[:200])
            p.thin("b").discard(cut, 64 * BS)
            if step == 2:
                p.delete("s1")
            p.commit()
        assert _state(pools[0]) == _state(pools[1])
    for p in pools:
        p.close()
    with _open(tmp_path / "m", False, monkeypatch) as m, _open(tmp_path / "r", False, monkeypatch) as r:
        assert _state(m) == _state(r) and m.check().ok


def test_a_damaged_dense_leaf_page_of_a_mapped_open_falls_back_to_the_previous_commit(tmp_path, mapped,
                                                                                      monkeypatch):
    _pool(tmp_path / "p")
    pool = _open(tmp_path / "p", True, monkeypatch)
    prev = _state(pool)
    block = damage_a_new_leaf_page(pool, tmp_path / "p", lambda: pool.thin("a").write_many(
        np.arange(3000, 3600, dtype=np.int64) * BS, ONE[:600]))
    again = Pool.open(tmp_path / "p", read_only=True)  # (the fallback loads the older commit whole)
    assert again.recovered_from and f"bad checksum in metadata block {block}" in again.recovered_from
    assert _state(again) == prev
    again.close()


def test_a_space_map_of_more_than_256_stored_pages_opens_with_the_counts_stored(tmp_path):
    """The bitmap pages an open reads one by one (256 and more come back as ``bytes`` from a memory
    map) decode to the counts the whole arrays give, counts of 2, 3 and more (overflow) included."""
    path = tmp_path / "p"
    nr = 300 * SM_PER_PAGE
    with Pool.create(path, data_size=nr * BS, metadata_only=True, metadata_size="256MiB") as pool:
        vol = pool.create_thin("v", nr * BS)
        vol.write_many(np.arange(300, dtype=np.int64) * SM_PER_PAGE * BS + 7 * BS, ONE[:300])  # a page each
        vol.write_many(np.arange(1000, dtype=np.int64) * BS, ONE[:1000])  # two dense leaves
        for i in range(5):  # shared leaves, each shadowed once: counts up to 6 on blocks 0..1023
            pool.snapshot("v", f"s{i}")
            pool.thin(f"s{i}").write(i * BS, b"x")
    with Pool.open(path, read_only=True) as pool:
        assert not pool.space.decoded  # the open read and verified the pages, and decoded nothing
        used, live = pool.status().used_data_blocks, pool.space.live_page_count()
        whole = {k: np.frombuffer(v, np.uint8) for k, v in pool.store.load().items()}
        want = counts_from_disk(whole, pool.space.nr_blocks)
        got = pool.space.data_rc
        assert pool.space.decoded
        assert np.array_equal(got[: len(want)], want) and not got[len(want):].any()
        assert got.max() >= 3 and int((got > 0).sum()) == used == pool.status().used_data_blocks
        assert live == pool.space.live_page_count() == int((got.reshape(-1, RC_PER_PAGE) != 0).any(axis=1).sum())
        assert pool.check().ok
    with Pool.open(path) as pool:  # a write decodes them first, then works as on a decoded map
        assert not pool.space.decoded and len(pool.usage()) == 6 and not pool.space.decoded
        pool.thin("s4").write(5 * BS, b"y")
        assert pool.space.decoded and pool.check().ok
    with Pool.open(path, read_only=True) as pool:
        assert pool.usage("s4").exclusive_blocks == 2 and pool.check().ok  # the write's copy and block 4's


def test_a_bitmap_that_disagrees_with_its_overflow_counts_is_reported_when_the_counts_are_first_used():
    """The pages' checksums are verified at open; that the bitmap and the overflow counts agree can be
    checked only by decoding them, which an open no longer does: the error comes at first use."""
    nr = 3 * RC_PER_PAGE
    page = np.zeros(BLOCK_BYTES, np.uint8)
    page[0], page[300] = 0b0111, 0b11  # blocks 0 (3), 1 (1), 1200 (3)
    over = np.zeros((2, RC_PER_PAGE), np.uint32)
    over[0, 0] = 7  # block 0's full count; block 1200 has none
    stored = StoredCounts(nr, nr, np.array([0]), [page[: nr // 4]], np.array([0, 1]), over)
    assert stored.used() == 3 and stored.live_count() == 2
    space = DataSpaceMap(np.zeros(K.ST_SIZE, np.int64), nr, stored)
    assert space.used() == 3 and not space.decoded
    with pytest.raises(MetadataCorrupt, match="block 1200 has a count of 3 or more in the bitmap"):
        space.arrays
    over[1, 1200 - RC_PER_PAGE] = 4
    space = DataSpaceMap(np.zeros(K.ST_SIZE, np.int64), nr, stored)
    assert space.data_rc[[0, 1, 1200]].tolist() == [7, 1, 4] and space.live_page_count() == 2


def test_check_reports_a_bitmap_that_disagrees_with_its_overflow_counts(tmp_path):
    """``check`` of a pool whose stored space map decodes to an error (here: a bitmap count of 3 or more
    with no overflow count) reports it as a finding, as thin_check does, instead of failing itself."""
    _pool(tmp_path / "p")
    with Pool.open(tmp_path / "p", read_only=True) as pool:
        assert not pool.space.decoded and pool.check().ok
        nr = pool.space.nr_blocks
        page = np.zeros(BLOCK_BYTES, np.uint8)
        page[300] = 0b11  # block 1200: a count of 3 or more, and no overflow count for it
        stored = StoredCounts(nr, nr, np.array([0]), [page[: min(nr // 4, BLOCK_BYTES)]], np.zeros(0, np.int64),
                              np.zeros((0, RC_PER_PAGE), np.uint32))
        pool._space = DataSpaceMap(pool.st.copy(), nr, stored)
        rep = pool.check()
    assert not rep.ok and any("data space map" in e and "block 1200" in e for e in rep.errors), rep.errors


def test_a_damaged_dense_leaf_page_both_commits_use_is_an_error_naming_its_block(tmp_path, mapped, monkeypatch):
    """A page no commit can do without: MetadataCorrupt naming the array and the block, as the read
    path reports it (tests/crash/test_corruption.py covers that path)."""
    _pool(tmp_path / "p")
    with _open(tmp_path / "p", True, monkeypatch) as pool:
        pool.thin("b").write_many(np.arange(3000, 3100, dtype=np.int64) * BS, ONE[:100])  # a second commit
    with _open(tmp_path / "p", True, monkeypatch, read_only=True) as pool:
        slot = int(np.flatnonzero(pool._leaf_disk.mapped)[0])
        block = pool.store.locs[nodestore.LEAVES.dense_array][slot] >> 32
    with open(tmp_path / "p" / "metadata", "r+b") as f:  # a leaf of origin "a": both commits use it
        f.seek(block * 4096 + 8)
        f.write(b"\x5a" * 8)
    with pytest.raises(MetadataCorrupt, match=f"leaf_dense: bad checksum in metadata block {block}") as exc:
        Pool.open(tmp_path / "p", read_only=True)
    assert exc.value.block == block


@pytest.mark.parametrize("why", ["mmap fails", "too many runs"])
def test_an_open_that_cannot_map_reads_the_pages_instead(tmp_path, mapped, monkeypatch, why):
    from thinpool import mdstore
    _pool(tmp_path / "p")
    with _open(tmp_path / "p", False, monkeypatch, read_only=True) as r:
        want = _state(r), r.nodes_map.leaves[r.nodes_map.leaf_rc > 0].copy()
    if why == "mmap fails":
        monkeypatch.setattr(mdstore, "map_private", lambda *a: False)
    else:
        monkeypatch.setattr(mdstore.MetadataStore.map_into, "__defaults__", (0,))
    monkeypatch.setattr(nodestore, "MAP_NODES", True)
    with Pool.open(tmp_path / "p") as pool:
        assert pool._leaf_disk.mapped is None  # read, not mapped
        assert _state(pool) == want[0]
        assert np.array_equal(pool.nodes_map.leaves[pool.nodes_map.leaf_rc > 0], want[1])
        pool.thin("a").write_many(np.arange(10, dtype=np.int64) * BS, ONE[:10])
        assert pool.check().ok


@pytest.mark.parametrize("popcount", [True, False])
def test_stored_counts_give_the_used_blocks_and_live_pages_the_decoded_counts_give(monkeypatch, popcount):
    """What an open reports before decoding (used blocks, live count pages) equals what the decoded
    counts give: whole pages at once, a short last page, counts past the data device's end."""
    from thinpool import spacemap_pages as D
    if not popcount and hasattr(np, "bitwise_count"):
        monkeypatch.delattr(np, "bitwise_count")
    rng = np.random.default_rng(3)
    for trial in range(60):
        nr = int(rng.integers(1, 150_000))
        cap = D.rc_pages(nr) * RC_PER_PAGE
        counts = np.zeros(cap, np.uint32)
        hit = rng.choice(nr, size=int(rng.integers(0, nr)), replace=False)
        counts[hit] = rng.choice([1, 2, 3, 7], len(hit))
        raw = np.frombuffer(D._pack_bitmap(counts).tobytes(), np.uint8)
        pages = [np.frombuffer(raw[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES].tobytes().ljust(BLOCK_BYTES, b"\0"),
                               np.uint8) for i in range((len(raw) + BLOCK_BYTES - 1) // BLOCK_BYTES)]
        keep = [i for i, pg in enumerate(pages) if pg.any()]
        if trial % 3 == 0 and keep:  # a short last page, as a loaded array may end
            short = int(rng.integers(1, BLOCK_BYTES))
            pages[keep[-1]] = pages[keep[-1]][:short]
            counts[keep[-1] * SM_PER_PAGE + 4 * short:(keep[-1] + 1) * SM_PER_PAGE] = 0  # what it no longer holds
        over = np.flatnonzero((counts.reshape(-1, RC_PER_PAGE) >= 3).any(axis=1))
        stored = StoredCounts(nr, cap, np.array(keep, np.int64), [pages[i] for i in keep], over,
                              np.where(counts >= 3, counts, 0).reshape(-1, RC_PER_PAGE)[over])
        got, live = stored.decode()
        assert stored.used() == int(np.count_nonzero(got[:nr]))
        assert stored.live_count() == int(live.sum())
        assert np.array_equal(got, counts)
