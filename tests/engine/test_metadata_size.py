"""Metadata size: the data space map stored as dm-thin's sm_disk stores it (two bits per data block plus
the counts of 3 or more), metadata use within 1.5x of the dm-thin metadata of the same state, and
format-1 pools (one uint32 count per block on disk) still opening."""

from __future__ import annotations

import os
import subprocess
import tarfile

import numpy as np
import pytest

from thinpool import Pool, leafstore
from thinpool.dataspace import SM_PER_PAGE, counts_from_disk
from thinpool.errors import MetadataCorrupt
from thinpool.interop.binary import write_binary_metadata
from thinpool.interop.binary_read import read_metadata_refcounts
from tests.support import require_tool

from .fixtures.make_format1_pool import BS, expected

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _stored_pages(pool: Pool, name: str) -> list[int]:
    """Pages of array ``name`` that are stored in the metadata file (absent pages read as zeroes)."""
    return [i for i, loc in enumerate(pool.store.locs.get(name, ())) if loc >> 32]


def _write_blocks(vol, blocks, tag: int = 1) -> None:
    blocks = np.asarray(blocks, np.int64)
    vol.write_many(blocks * BS, [np.full(512, tag, np.uint8)] * len(blocks))


def _counts_from_tree(pool: Pool) -> np.ndarray:
    """Reference counts recomputed from the mappings: one per distinct leaf mapping a block."""
    bm = pool.nodes_map
    live = np.flatnonzero(bm.leaf_rc[: len(bm.leaves)] > 0)
    vals = bm.leaves[live].reshape(-1)
    vals = vals[vals != np.uint64(0xFFFF_FFFF_FFFF_FFFF)]
    counts = np.zeros(len(pool.space.data_rc), np.int64)
    np.add.at(counts, (vals >> np.uint64(24)).astype(np.int64), 1)
    return counts


# --------------------------------------------------------------------------- the on-disk layout

def test_kernel_rule_data_space_map_is_two_bits_per_block_plus_overflow_counts(tmp_path):
    """dm-thin's sm_disk: a two-bit count per data block (16,384 per 4 KiB bitmap block), counts of 3
    or more in an overflow structure.  Ours: the bitmap pages (``data_sm``) and a page of full counts
    (``data_rc_over``) only where some count is >= 3; all-zero pages are never stored."""
    nr = 4 * SM_PER_PAGE  # four bitmap pages
    p = Pool.create(tmp_path / "p", data_size=str(nr * BS))
    try:
        v = p.create_thin("v", size=str(nr * BS))
        _write_blocks(v, np.arange(2000))
        p.commit()
        assert _stored_pages(p, "data_sm") == [0]        # blocks 0..1999: the first bitmap page only
        assert _stored_pages(p, "data_rc_over") == []    # every count is 1
        assert p.store.npages("data_sm") == 4 and "data_rc" not in p.store.locs
        # two snapshots whose leaves get shadowed: blocks 1000..1499 are then in three leaves
        p.snapshot("v", "s1")
        _write_blocks(v, [0], tag=2)
        p.snapshot("v", "s2")
        _write_blocks(v, [1], tag=3)
        p.commit()
        counts = p.space.data_rc.copy()
        assert counts[100] == 3 and counts[1000] == 1 and counts.max() == 3
        assert _stored_pages(p, "data_rc_over") == [0]   # only the count page holding counts >= 3
        p.close()
        p = Pool.open(tmp_path / "p")
        assert np.array_equal(p.space.data_rc, counts)
        assert p.check().ok
        # counts that fall below 3 release the overflow page; a bitmap page that becomes all zero is released
        p.delete("s1")
        p.delete("s2")
        p.commit()
        assert _stored_pages(p, "data_rc_over") == []
        p.delete("v")
        p.commit()
        p.commit()  # the blocks freed by the delete were pending until this commit
        assert _stored_pages(p, "data_sm") == []
        p.close()
        p = Pool.open(tmp_path / "p")
        assert not p.space.data_rc.any() and p.status().used_data_blocks == 0
    finally:
        p.close(commit=False)


def test_kernel_rule_a_commit_writes_only_the_changed_bitmap_pages(tmp_path):
    """Like sm_disk's bitmap blocks, only the space-map pages covering changed counts are shadowed by
    a commit: a write at one end of a big pool leaves the other bitmap pages where they were."""
    nr = 8 * SM_PER_PAGE
    with Pool.create(tmp_path / "p", data_size=str(nr * BS)) as p:
        v = p.create_thin("v", size=str(nr * BS))
        _write_blocks(v, np.arange(0, nr, SM_PER_PAGE // 2))  # two blocks in each bitmap page (cursor order)
        p.commit()
        before = list(p.store.locs["data_sm"])
        _write_blocks(v, [1])  # one new block: allocated next to the others, in the first bitmap page
        p.commit()
        after = list(p.store.locs["data_sm"])
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        assert len(changed) == 1


def test_kernel_rule_growing_the_data_device_costs_no_space_map_pages(tmp_path):
    """dm-thin's sm_disk extend adds bitmap blocks for the new range; ours stores none for an all-free
    range (an absent page reads as zeroes): growing 1 GiB to 256 GiB adds page-map entries only."""
    with Pool.create(tmp_path / "p", data_size="1GiB", metadata_size="64MiB") as p:
        v = p.create_thin("v", size="1TiB")
        _write_blocks(v, np.arange(100))
        p.commit()
        used = p.status().used_metadata_blocks
        p.resize("256GiB")
        assert p.store.npages("data_sm") == (256 << 30) // BS // SM_PER_PAGE
        assert p.status().used_metadata_blocks <= used + 2
        _write_blocks(v, np.arange(100, 200))
        p.commit()
    with Pool.open(tmp_path / "p") as p:
        assert p.status().used_data_blocks == 200 and p.check().ok


def test_bitmap_and_overflow_that_disagree_are_reported_as_corrupt():
    nr = 2048
    bitmap = np.zeros(4096, np.uint8)
    over = np.zeros(2 * 4096, np.uint8)
    bitmap[0] = 3  # block 0: count >= 3 ...
    with pytest.raises(MetadataCorrupt, match="block 0 has a count of 3 or more"):
        counts_from_disk({"data_sm": bitmap, "data_rc_over": over}, nr)  # ... but no overflow count
    over.view(np.uint32)[0] = 7
    assert counts_from_disk({"data_sm": bitmap, "data_rc_over": over}, nr)[0] == 7
    over.view(np.uint32)[5] = 4  # an overflow count for a block whose bitmap count is 0
    with pytest.raises(MetadataCorrupt, match="block 5 has an overflow count"):
        counts_from_disk({"data_sm": bitmap, "data_rc_over": over}, nr)


def test_sparse_leaves_are_stored_in_groups_and_dense_leaves_on_their_own_page(tmp_path):
    """A dm-thin btree leaf holds up to 252 mappings of any keys; ours are 512-entry radix leaves, so on
    disk sparse ones are grouped 16 to a stream of a bitmap and the mapped values: 16 leaves of one
    mapping each take one metadata block; a commit rewrites only the streams of changed groups; a group
    left with nothing mapped is released.  A leaf with more than 192 mappings keeps its own page: a
    commit that changes it writes that page only, and it rejoins its group's stream once sparse."""
    def changed(before, after):
        return [i for i, (a, b) in enumerate(zip(before, after)) if a != b]

    with Pool.create(tmp_path / "p", data_size=str(4096 * BS)) as p:
        v = p.create_thin("v", size=str((1 << 20) * BS))
        _write_blocks(v, np.arange(64) * 4096)  # 64 leaves of one mapping each: 4 groups
        p.commit()
        assert int(np.count_nonzero(p.nodes_map.leaf_rc)) == 64
        groups = _stored_pages(p, "leaf_groups")
        assert len(groups) == 4 and all(i % leafstore.SPAN == leafstore.GROUP for i in groups)
        before = list(p.store.locs["leaf_groups"])
        _write_blocks(v, [1])  # changes the first leaf only
        p.commit()
        assert changed(before, p.store.locs["leaf_groups"]) == [groups[0]]
        v.discard(0, 16 * 4096 * BS)  # every mapping of the first 16 leaves
        p.commit()
        assert len(_stored_pages(p, "leaf_groups")) == 3
        _write_blocks(v, np.arange(512, 1000))  # a dense leaf (488 mappings) beside sparse ones
        p.commit()
        pages = _stored_pages(p, "leaf_groups")
        own = [i for i in pages if i % leafstore.SPAN < leafstore.GROUP]
        assert len(own) == 1 and len(pages) == 5  # its own page, and the mask in its group's stream
        before = list(p.store.locs["leaf_groups"])
        _write_blocks(v, [1000], tag=2)  # a dense leaf gains a mapping: its page rewritten, no stream
        p.commit()
        assert changed(before, p.store.locs["leaf_groups"]) == own
        v.discard(512 * BS, 400 * BS)  # 89 mappings left: sparse again
        p.commit()
        assert not [i for i in _stored_pages(p, "leaf_groups") if i % leafstore.SPAN < leafstore.GROUP]
    with Pool.open(tmp_path / "p") as p:
        vol = p.thin("v")
        assert vol.read(0, 1) == bytes(1) and vol.read(16 * 4096 * BS, 1) == b"\x01"
        assert vol.read(999 * BS, 1) == b"\x01" and vol.read(1000 * BS, 1) == b"\x02"
        assert vol.read(600 * BS, 1) == bytes(1) and p.check().ok
        assert p.usage("v").mapped_blocks == 48 + 89


# --------------------------------------------------------------------------- against dm-thin's metadata

def _shape(p: Pool, shape: str, n: int) -> None:
    rng = np.random.default_rng(7)
    v = p.create_thin("v", size=str(16 * n * BS))
    if shape == "dense":
        _write_blocks(v, np.arange(n))
    elif shape == "snapshots":
        _write_blocks(v, np.arange(n))
        p.commit()
        for s in range(4):
            p.snapshot("v", f"s{s}")
            start = int(rng.integers(0, n - n // 10))
            _write_blocks(v, np.arange(start, start + n // 10), tag=s + 2)  # CoW of a tenth of the volume
            p.commit()
    else:  # sparse: a quarter of the blocks of a 4n-block range, at random
        _write_blocks(v, np.sort(rng.choice(4 * n, n, replace=False)))
    p.commit()


@pytest.mark.parametrize("shape", ["dense", "snapshots", "sparse"])
def test_kernel_rule_metadata_use_is_within_1_5x_of_dm_thin_metadata(tmp_path, shape):
    """The pool's used metadata blocks (``status()``, what dm-thin's status line reports) are at most
    1.5x the blocks the same state takes as dm-thin metadata (our exporter's file, whose metadata
    space map is read back and which thin_check accepts)."""
    require_tool("thin_check")
    n = 20000
    with Pool.create(tmp_path / "p", data_size=str(2 * n * BS)) as p:
        _shape(p, shape, n)
        ours = p.status().used_metadata_blocks
        out = str(tmp_path / "exported.bin")
        used = write_binary_metadata(p.to_metadata(), out)
    subprocess.run(["thin_check", out], check=True, capture_output=True)
    theirs = int(np.count_nonzero(read_metadata_refcounts(out)))
    assert theirs == used
    assert ours <= 1.5 * theirs, f"{shape}: {ours} metadata blocks used, dm-thin metadata {theirs}"


# --------------------------------------------------------------------------- format 1

def _old_pool(tmp_path, fixture: str) -> str:
    path = tmp_path / "old"
    path.mkdir(mode=0o700)
    with tarfile.open(os.path.join(FIXTURES, fixture)) as tar:
        tar.extractall(path, filter="data")
    for name in ("metadata", "data"):
        os.chmod(path / name, 0o600)
    return str(path)


def _assert_fixture_contents(p: Pool) -> None:
    for name, blocks in expected().items():
        vol = p.thin(name)
        for block, data in blocks.items():
            assert vol.read(block * BS, len(data)) == data, (name, block)
            assert vol.read(block * BS + len(data), 100) == bytes(100)


@pytest.mark.parametrize("fixture", ["format1_pool.tar.gz", "format2_pool.tar.gz"])
def test_an_old_format_pool_opens_and_its_first_commit_writes_the_current_layout(tmp_path, fixture):
    """Pools made before the two-bit space map (format 1: a uint32 count per data block, array
    ``data_rc``) and before the grouped leaves (formats 1 and 2: one leaf per page, array ``leaves``),
    made by tests/engine/fixtures/make_format1_pool.py with the code of those formats, open with every
    count, mapping and pending block; their first commit writes the current layout and drops the old
    arrays' pages."""
    path = _old_pool(tmp_path, fixture)
    with Pool.open(path, read_only=True) as p:
        assert p.store.npages("leaves") > 0 and "leaf_groups" not in p.store.locs
        assert (p.store.npages("data_rc") > 0) == (fixture == "format1_pool.tar.gz")
        old_counts = p.space.data_rc.copy()
        assert old_counts.max() == 3  # the fixture has counts >= 3
        assert np.array_equal(old_counts, _counts_from_tree(p))
        assert p.check().ok
        _assert_fixture_contents(p)
    with Pool.open(path) as p:
        assert p.status().used_data_blocks == int(np.count_nonzero(old_counts))
        assert len(p.space.pending) == 40  # volume b's blocks, freed by the fixture's last commit
        p.commit()
        assert p.store.npages("data_rc") == 0 and _stored_pages(p, "data_sm") == [0]
        assert _stored_pages(p, "data_rc_over") == [0]
        assert p.store.npages("leaves") == 0 and _stored_pages(p, "leaf_groups") == [leafstore.GROUP]  # 4 sparse leaves: 1 stream page
    with Pool.open(path) as p:
        assert np.array_equal(p.space.data_rc, old_counts)
        assert p.check().ok
        _assert_fixture_contents(p)
        assert sorted(p.catalog["volumes"]) == ["a", "s1", "s2"]


def _encode(leaves: np.ndarray, rc: np.ndarray) -> np.ndarray:
    """The ``leaf_groups`` array a commit of every leaf writes (absent pages as zeroes)."""
    pages = leafstore.group_updates(leaves, rc, np.ones(len(leaves), np.uint8), {})[leafstore.ARRAY]
    buf = np.zeros(pages.npages * 4096, np.uint8)
    for i in pages.dirty:
        if i not in pages.dead:
            buf[i * 4096:(i + 1) * 4096] = np.frombuffer(bytes(pages.page(i)), np.uint8)
    return buf


def test_leaf_groups_decode_what_was_encoded_and_refuse_an_inconsistent_stream():
    """Leaves of every density (empty, sparse, just below and above the dense threshold, full, dead)
    come back as they were; a stream whose dense mask names a slot past 16, or whose bitmap has
    entries of a dense leaf, is corrupt metadata."""
    rng = np.random.default_rng(3)
    counts = [0, 1, 32, leafstore.DENSE, leafstore.DENSE + 1, 512, 300, 5] * 5
    leaves = np.full((len(counts), 512), np.iinfo(np.uint64).max, np.uint64)
    for i, c in enumerate(counts):
        leaves[i, rng.choice(512, c, replace=False)] = rng.integers(0, 1 << 40, c, dtype=np.uint64)
    rc = np.ones(len(counts), np.uint32)
    rc[7] = 0  # a dead leaf is stored as empty
    buf = _encode(leaves, rc)
    back = leafstore.leaves_from_disk({leafstore.ARRAY: buf})
    expect = leaves.copy()
    expect[7] = np.iinfo(np.uint64).max
    assert np.array_equal(back[:len(counts)], expect)
    stream = leafstore.GROUP * 4096  # first group's stream: dense mask, then the bitmap
    assert buf[stream:stream + 8].view(np.uint64)[0] == 0b0111000001110000  # slots 4-6 and 12-14
    bad = buf.copy()
    bad[stream + 2] |= 0x10  # dense mask bit 20
    with pytest.raises(MetadataCorrupt, match="past 16"):
        leafstore.leaves_from_disk({leafstore.ARRAY: bad})
    bad = buf.copy()
    bad[stream + 8 + 5 * 64] |= 1  # an entry of slot 5 (dense) in the bitmap
    with pytest.raises(MetadataCorrupt, match="dense leaf"):
        leafstore.leaves_from_disk({leafstore.ARRAY: bad})
