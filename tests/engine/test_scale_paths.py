"""The paths that keep a pool of 100,000 volumes and 100,000,000 mappings cheap to open and list
(perf row S10): the leaves read straight into place, the overflow counts searched only where stored,
the device table's name index read only when needed.  Each gives what the plain path gives."""

from __future__ import annotations

from array import array

import numpy as np
import pytest

from thinpool import Pool, rules
from thinpool.spacemap_pages import counts_from_disk
from thinpool.devtable import DeviceTable
from thinpool.errors import MetadataCorrupt
from thinpool import nodestore

from tests.support import damage_a_new_leaf_page

BS = 64 * 1024


def _pool(path) -> Pool:
    """Dense leaves, sparse leaves, shadowed leaves and a freed one, over two origins and snapshots."""
    pool = Pool.create(path, data_size=8192 * BS, metadata_only=True)
    rng = np.random.default_rng(9)
    one = np.ones((3000, 1), np.uint8)
    a = pool.create_thin("a", "64GiB")
    a.write_many(np.arange(2500, dtype=np.int64) * BS, one[:2500])                  # dense leaves
    b = pool.create_thin("b", "64GiB")
    b.write_many(np.sort(rng.choice(1 << 20, 300, replace=False)).astype(np.int64) * BS, one[:300])  # sparse
    for i in range(6):
        pool.snapshot("a", f"s{i}")
        pool.thin(f"s{i}").write_many(rng.integers(0, 2500, 40).astype(np.int64) * BS, one[:40])
    pool.snapshot("b", "t")
    pool.delete("s3")
    pool.commit()
    return pool


@pytest.mark.parametrize("populate", [False, True])
def test_leaves_read_into_place_equal_the_whole_array_decode(tmp_path, monkeypatch, populate):
    if populate:  # the big-pool path: the leaves' memory mapped in at once, then read into
        monkeypatch.setattr(nodestore, "POPULATE_MIN", 0)
    pool = _pool(tmp_path / "p")
    live = pool.nodes_map.leaf_rc > 0
    want = pool.nodes_map.leaves[live].copy()
    store = pool.store
    whole = nodestore.leaves_from_disk({k: np.frombuffer(v, np.uint8) for k, v in store.load().items()})
    direct = nodestore.load_leaves(store)
    assert direct is not None and np.array_equal(direct, whole)
    assert np.array_equal(direct[: len(live)][live], want)
    pool.close()
    with Pool.open(tmp_path / "p") as again:
        assert np.array_equal(again.nodes_map.leaves[: len(live)][live], want)
        again.thin("b").write_many(np.arange(10, dtype=np.int64) * BS, np.ones((10, 1), np.uint8))  # writable
        again.commit()
        assert [u.mapped_blocks for u in again.usage()] == [2500, 310] + [2500] * 5 + [300]
        assert again.check().ok


def test_a_damaged_leaf_page_of_the_last_commit_opens_the_commit_before(tmp_path):
    """The leaves are read after the other arrays; a bad checksum there still makes the open fall
    back to the previous commit, as when every page was read at once."""
    pool = _pool(tmp_path / "p")
    damage_a_new_leaf_page(pool, tmp_path / "p", lambda: pool.thin("b").write_many(
        np.arange(600, 900, dtype=np.int64) * BS, np.ones((300, 1), np.uint8)))
    again = Pool.open(tmp_path / "p", read_only=True)
    assert again.recovered_from and "checksum" in again.recovered_from
    assert again.thin("b").mapped_blocks == 300  # the write after the first commit is gone
    again.close()


def test_overflow_counts_are_searched_in_the_stored_pages_only():
    nr = 4096
    bitmap = np.zeros(nr // 4, np.uint8)
    over = np.zeros(nr * 4, np.uint8)
    bitmap[1] = 3            # block 4: a count of 3 or more ...
    over.view(np.uint32)[4] = 9  # ... in the overflow array's page 0
    stored = array("Q", [(7 << 32) | 1, 0, 0, 0])  # page 0 stored, pages 1-3 absent (read as zeroes)
    plain = counts_from_disk({"data_sm": bitmap, "data_rc_over": over}, nr)
    assert np.array_equal(counts_from_disk({"data_sm": bitmap, "data_rc_over": over}, nr, stored), plain)
    assert plain[4] == 9
    over.view(np.uint32)[5] = 4  # a stray overflow count in a stored page is still found
    with pytest.raises(MetadataCorrupt, match="block 5 has an overflow count"):
        counts_from_disk({"data_sm": bitmap, "data_rc_over": over}, nr, stored)


def test_device_table_counts_volumes_and_origins_without_reading_the_name_index(tmp_path):
    pool = _pool(tmp_path / "p")
    n = len(pool.thins())
    origin_file = tmp_path / "golden.img"
    origin_file.write_bytes(b"x" * BS)
    pool.close()
    with DeviceTable.open(tmp_path / "p") as t:
        assert t.status().nr_thins == n
        assert not t.may_have_external_origins()
        assert t.store.npages("names") >= 1 and not t._stored.index._cache  # no name page was read
        assert [v.name for v in t.thins()] == ["a", "b", "s0", "s1", "s2", "s4", "s5", "t"]
    with Pool.open(tmp_path / "p") as p:
        p.create_thin("ext", "1GiB", external_origin=str(origin_file))
    with DeviceTable.open(tmp_path / "p", read_only=False) as t:
        assert t.may_have_external_origins() and t.status().nr_thins == n + 1
        assert t.thin("ext").external_origin["path"] == str(origin_file)
        t.snapshot("ext", "ext-snap")
        assert t.thins()[-1].external_origin["path"] == str(origin_file)
        assert t.status().nr_thins == n + 2


def test_catalog_bytes_round_trip_and_fall_back_for_what_orjson_refuses():
    cat = {"volumes": {"a": {"dev_id": 1, "slot": 0, "gen": 1}, "é ü": {"dev_id": 2, "slot": 1, "gen": 2}},
           "next_dev_id": 3, "records": {"ns": {"k": [1, "two", None]}}, "next_gen": 3}
    raw = rules.catalog_dumps(cat)
    assert rules.catalog_loads(raw) == cat
    import json
    assert json.loads(raw) == cat and rules.catalog_loads(json.dumps(cat).encode()) == cat
    odd = {"volumes": {"\udcff": {"dev_id": 1}}}  # a lone surrogate: the standard library writes it
    assert rules.catalog_loads(rules.catalog_dumps(odd)) == odd
    with pytest.raises(ValueError):
        rules.catalog_loads(b"{not json")
    # a large document (a format-1 catalog) is read by orjson, a small one by the standard library: both
    # give the same catalog, the lone surrogate included
    big = {"volumes": {f"v{i:06d}": {"dev_id": i, "slot": i, "gen": i} for i in range(3000)} | odd["volumes"]}
    raw = rules.catalog_dumps(big)
    assert len(raw) > rules.SMALL_JSON and rules.catalog_loads(raw) == big
    with pytest.raises(ValueError):
        rules.catalog_loads(b"{" * (rules.SMALL_JSON + 1))


def test_a_table_snapshot_rewrites_only_the_catalog_pages_that_changed(tmp_path):
    """A new name goes into one page of the name index (thinpool.catalog) and its generation into one
    page of slot records: the snapshot writes those, the other pages and the catalog's JSON part stay
    where they were committed, and the pool reads every name back."""
    with Pool.create(tmp_path / "p", data_size=64 * BS, metadata_only=True) as pool, pool.batch():
        pool.create_thin("base", "1GiB")
        for i in range(400):
            pool.snapshot("base", f"a-rather-long-volume-name-to-fill-catalog-pages-{i:04d}")
    with DeviceTable.open(tmp_path / "p", read_only=False) as t:
        before = {a: t.store.locs[a].tolist() for a in ("names", "vol_slots", "catalog")}
        assert len(before["names"]) >= 5
        t.snapshot("base", "one-more")
        after = {a: t.store.locs[a].tolist() for a in before}
        read = set(t._stored.index._cache)
    assert len(read) == 1  # one index page: the one "one-more" goes in (the fence is in the JSON part)
    assert after["catalog"] == before["catalog"]  # no split: the JSON part (origins, records, fence) is unchanged
    assert len(after["names"]) == len(before["names"])
    assert sum(a != b for a, b in zip(before["names"], after["names"])) == 1
    assert sum(a != b for a, b in zip(before["vol_slots"], after["vol_slots"])) == 1
    with Pool.open(tmp_path / "p", read_only=True) as again:
        assert len(again.thins()) == 402 and "one-more" in again
        assert again.thin("one-more").snap_time == again.time
