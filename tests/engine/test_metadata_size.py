"""Metadata size: the data space map stored as dm-thin's sm_disk stores it (two bits per data block plus
the counts of 3 or more), metadata use within 1.5x of the dm-thin metadata of the same state, and
format-1 pools (one uint32 count per block on disk) still opening."""

from __future__ import annotations

import os
import subprocess
import tarfile

import numpy as np
import pytest

from thinpool import Pool, nodestore
from thinpool.spacemap_pages import SM_PER_PAGE, counts_from_disk
from thinpool.errors import MetadataCorrupt
from thinpool.interop.binary import write_binary_metadata
from thinpool.interop.binary_read import read_metadata_refcounts
from tests.support import require_tool

from .fixtures.make_format1_pool import BS, expected
from .fixtures import make_format3_pool

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


def test_sparse_leaves_are_packed_records_and_dense_leaves_on_their_own_page(tmp_path):
    """A dm-thin btree leaf holds up to 252 mappings of any keys; ours are 512-entry radix leaves, so on
    disk a sparse leaf is a record of its mapped entries, packed with other leaves' records: 64 leaves
    of one mapping each take one metadata block; a commit rewrites only the pack page of a changed leaf;
    records of leaves left with nothing mapped are dropped.  A leaf with more than 192 mappings keeps its
    own page (``leaf_dense``, page = leaf slot): a commit that changes it writes that page only, and it
    rejoins the packs once sparse."""
    def changed(before, after):
        return [i for i, (a, b) in enumerate(zip(before, after)) if a != b] + list(range(len(before), len(after)))

    with Pool.create(tmp_path / "p", data_size=str(4096 * BS)) as p:
        v = p.create_thin("v", size=str((1 << 20) * BS))
        _write_blocks(v, np.arange(64) * 4096)  # 64 leaves of one mapping each
        p.commit()
        assert int(np.count_nonzero(p.nodes_map.leaf_rc)) == 64
        assert _stored_pages(p, nodestore.PACK_ARRAY) == [0] and _stored_pages(p, nodestore.DENSE_ARRAY) == []
        before = list(p.store.locs[nodestore.PACK_ARRAY])
        _write_blocks(v, [1])  # changes the first leaf only
        p.commit()
        assert changed(before, p.store.locs[nodestore.PACK_ARRAY]) == [0]
        v.discard(0, 16 * 4096 * BS)  # every mapping of the first 16 leaves
        p.commit()
        assert _stored_pages(p, nodestore.PACK_ARRAY) == [0]
        _write_blocks(v, np.arange(512, 1000))  # a dense leaf (488 mappings) beside sparse ones
        p.commit()
        own = _stored_pages(p, nodestore.DENSE_ARRAY)
        assert len(own) == 1 and _stored_pages(p, nodestore.PACK_ARRAY) == [0]  # its record marks it dense
        before = {k: list(p.store.locs[k]) for k in (nodestore.PACK_ARRAY, nodestore.DENSE_ARRAY)}
        _write_blocks(v, [1000], tag=2)  # a dense leaf gains a mapping: its page rewritten, no pack page
        p.commit()
        assert changed(before[nodestore.DENSE_ARRAY], p.store.locs[nodestore.DENSE_ARRAY]) == own
        assert changed(before[nodestore.PACK_ARRAY], p.store.locs[nodestore.PACK_ARRAY]) == []
        v.discard(512 * BS, 400 * BS)  # 89 mappings left: sparse again
        p.commit()
        assert _stored_pages(p, nodestore.DENSE_ARRAY) == []
    with Pool.open(tmp_path / "p") as p:
        vol = p.thin("v")
        assert vol.read(0, 1) == bytes(1) and vol.read(16 * 4096 * BS, 1) == b"\x01"
        assert vol.read(999 * BS, 1) == b"\x01" and vol.read(1000 * BS, 1) == b"\x02"
        assert vol.read(600 * BS, 1) == bytes(1) and p.check().ok
        assert p.usage("v").mapped_blocks == 48 + 89


def test_many_pack_pages_split_merge_and_stay_about_half_full_or_more(tmp_path):
    """Records are cut into pages of equal fill; a commit re-packs only the pages holding changed
    leaves (a page that overflows splits, one left under half full takes in its neighbour), so every
    pack page but a lone one stays about half full or more, and the pool reads back what was written after
    commits that add, grow, empty and drop leaves at random."""
    rng = np.random.default_rng(5)
    path = tmp_path / "p"
    with Pool.create(path, data_size=str(100000 * BS), metadata_only=True, error_if_no_space=True) as p:
        v = p.create_thin("v", size=str((1 << 24) * BS))
        for step in range(12):
            leaves = rng.choice(1 << 15, 300, replace=False)
            if step % 3 == 2:  # empty some leaves, thin out others
                for leaf in leaves[:100].tolist():
                    v.discard(leaf * 512 * BS, 512 * BS)
            else:
                per = rng.integers(1, 40, len(leaves))
                blocks = np.unique(np.concatenate([l * 512 + rng.choice(512, n, replace=False)
                                                   for l, n in zip(leaves.tolist(), per.tolist())]))
                _write_blocks(v, blocks, tag=step + 1)
            p.commit()
            disk = p._leaf_disk
            # at least half full but for the size of the record at a cut (up to 1,926 bytes)
            assert len(disk.keys) > 1 and (disk.size >= 4096 // 4).all() and disk.size.mean() > 0.7 * 4096, step
            assert np.array_equal(np.sort(disk.pos), np.unique(disk.pos))
            assert sorted(disk.pos.tolist()) == _stored_pages(p, nodestore.PACK_ARRAY)
        expect = v.mappings()
    with Pool.open(path) as p:
        got = p.thin("v").mappings()
        assert all(np.array_equal(a, b) for a, b in zip(expect, got)) and p.check().ok


class _BlockCount:
    """A ``MetadataStore.io`` counting the metadata blocks written."""

    def __init__(self) -> None:
        self.blocks = 0

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self.blocks += len(data) // 4096
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)


@pytest.mark.parametrize("shape", ["sparse", "very sparse"])
def test_kernel_rule_a_commit_after_one_write_writes_a_few_blocks_whatever_the_pool_size(tmp_path, monkeypatch, shape):
    """dm-thin's commit writes only the btree nodes a transaction shadowed, so one new mapping costs a
    few metadata blocks however much is mapped.  Ours: the changed leaf's pack page (one or two more
    when it splits or takes in a neighbour), a node and count page for a new leaf, the space map page,
    the page-map pages over them, the directory and the superblock -- the same in a pool with ten
    times the mappings."""
    from thinpool.mdstore import MetadataStore
    worst = {}
    for n in (4000, 40000):
        rng = np.random.default_rng(n)
        span = 16 * n if shape == "sparse" else 1000 * n
        with Pool.create(tmp_path / f"p{n}", data_size=str(2 * n * BS), metadata_only=True) as p:
            v = p.create_thin("v", size=str(span * BS))
            mapped = np.sort(rng.choice(span, n, replace=False))
            _write_blocks(v, mapped)
            p.commit()
            assert p.store.npages(nodestore.PACK_ARRAY) > (2 if n == 4000 else 20)
            io = _BlockCount()
            monkeypatch.setattr(MetadataStore, "io", io)
            taken = set(mapped.tolist())
            counts = []
            for i in range(16):  # next to a mapping (its leaf changes), or anywhere (often a new leaf)
                vb = int(rng.choice(mapped)) + 1 if i % 2 else int(rng.integers(0, span))
                if vb in taken or vb >= span:
                    continue
                taken.add(vb)
                _write_blocks(v, [vb], tag=2)
                io.blocks = 0
                p.commit()
                counts.append(io.blocks)
            monkeypatch.undo()
            worst[n] = max(counts)
            assert len(counts) >= 12 and min(counts) >= 6
    assert worst[40000] <= worst[4000] + 1 and worst[40000] <= 14, worst


@pytest.mark.parametrize("lost", [nodestore.DENSE_ARRAY, nodestore.PACK_ARRAY])
def test_repair_loses_only_the_leaves_of_an_unreadable_leaf_page(tmp_path, lost):
    """thin_repair salvages every mapping it can still read.  A dense leaf's unreadable page loses that
    leaf only; an unreadable pack page loses the leaves whose records it held, and the leaves on the
    other pages survive."""
    from thinpool.mdstore import BLOCK, MetadataStore
    from thinpool.repair import repair
    path = tmp_path / "p"
    with Pool.create(path, data_size=str(4096 * BS)) as p:
        v = p.create_thin("v", size=str((1 << 22) * BS))
        _write_blocks(v, np.arange(512, 812))                           # leaf 1: dense
        sparse = np.arange(1500) * 1024 + 7                             # 1,500 leaves of one mapping
        _write_blocks(v, sparse)
        p.commit()
        assert p.store.npages(nodestore.PACK_ARRAY) >= 3
        locs = p.store.locs[lost]
        block = [int(x) >> 32 for x in locs if int(x) >> 32][0 if lost == nodestore.DENSE_ARRAY else 1]
        older = 1 - p.store.generation % 2
    with open(path / "metadata", "r+b") as f:
        for b in (block, older):
            f.seek(b * BLOCK + 123)
            f.write(b"\x5a\xa5")
    with pytest.raises(MetadataCorrupt):
        Pool.open(path).close()
    report = repair(path, tmp_path / "out")
    assert report.nodes_lost >= 1 and not report.lossless
    with Pool.open(tmp_path / "out") as q:
        vb = set(q.thin("v").mappings()[0].tolist())
        assert q.check().ok
    if lost == nodestore.DENSE_ARRAY:
        assert report.nodes_lost == 1 and vb == set(sparse.tolist())
    else:
        kept = set(sparse.tolist()) & vb
        assert set(range(512, 812)) <= vb and 0 < len(kept) < len(sparse) and vb - set(range(512, 812)) == kept
        assert report.nodes_lost == len(sparse) - len(kept)  # every leaf of the lost page, no other


# --------------------------------------------------------------------------- against dm-thin's metadata

def _shape(p: Pool, shape: str, n: int) -> None:
    rng = np.random.default_rng(7)
    v = p.create_thin("v", size=str(1000 * n * BS))
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
    elif shape == "sparse":  # a quarter of the blocks of a 4n-block range, at random
        _write_blocks(v, np.sort(rng.choice(4 * n, n, replace=False)))
    elif shape == "very sparse":  # n blocks of a 1000n-block range, about one mapping per 512-block range
        _write_blocks(v, np.sort(rng.choice(1000 * n, n, replace=False)))
    else:  # many small volumes (containers): n // 50 volumes of 50 mappings in their first 200 blocks
        with p.batch():
            for i in range(n // 50):
                _write_blocks(p.create_thin(f"c{i}", size=str(1024 * BS)), np.sort(rng.choice(200, 50, replace=False)))
    p.commit()


@pytest.mark.parametrize("shape", ["dense", "snapshots", "sparse", "very sparse", "many volumes"])
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
        assert p.store.npages("leaves") == 0 and _stored_pages(p, nodestore.PACK_ARRAY) == [0]  # 4 sparse leaves: 1 page
        assert _stored_pages(p, nodestore.DENSE_ARRAY) == []
    with Pool.open(path) as p:
        assert np.array_equal(p.space.data_rc, old_counts)
        assert p.check().ok
        _assert_fixture_contents(p)
        assert sorted(p.catalog["volumes"]) == ["a", "s1", "s2"]


def _fixture_mappings(p: Pool) -> dict[str, tuple]:
    out = {}
    for name in sorted(p.catalog["volumes"]):
        vb, db, t = p.thin(name).mappings()
        out[name] = (vb.tolist(), db.tolist(), t.tolist())
    return out


@pytest.mark.parametrize("fixture", ["format3_pool.tar.gz", "format4_pool.tar.gz"])
def test_a_format3_or_4_pool_opens_with_every_mapping_and_converts_at_its_first_commit(tmp_path, fixture):
    """Pools in format 3 (leaves grouped 16 to a stream, dense ones on their own page: array
    ``leaf_groups``) and format 4 (leaves as packed records: ``leaf_dense``, ``leaf_packs``), both with
    inner nodes one per page (``inners``), made by tests/engine/fixtures/make_format3_pool.py with the
    code of their format, open with every mapping (sparse leaves, dense leaves shared and shadowed,
    pending blocks) and every byte; the first commit writes the current layout, drops the old arrays'
    pages and changes no mapping."""
    path = _old_pool(tmp_path, fixture)
    exp = make_format3_pool.expected()
    old = "leaf_groups" if fixture.startswith("format3") else nodestore.PACK_ARRAY
    with Pool.open(path, read_only=True) as p:
        assert p.store.npages(old) > 0 and p.store.npages("inners") > 0
        counts = p.space.data_rc.copy()
        assert np.array_equal(counts, _counts_from_tree(p)) and counts.max() == 3
        before = _fixture_mappings(p)
        assert {n: sorted(m[0]) for n, m in before.items()} == {n: sorted(b) for n, b in exp.items()}
        assert p.check().ok
    for opened in range(2):
        with Pool.open(path) as p:
            assert _fixture_mappings(p) == before and np.array_equal(p.space.data_rc, counts)
            for name, blocks in exp.items():
                vol = p.thin(name)
                for block, data in blocks.items():
                    assert vol.read(block * BS, len(data)) == data, (name, block)
            assert p.check().ok
            if opened == 0:
                assert len(p.space.pending) == 40  # volume b's blocks, freed by the fixture's last commit
                p.commit()
                assert p.store.npages("leaf_groups") == 0 and p.store.npages("inners") == 0
                assert len(_stored_pages(p, nodestore.DENSE_ARRAY)) == 2  # d's and ds's dense leaves
                assert _stored_pages(p, nodestore.PACK_ARRAY) == [0]
                assert _stored_pages(p, nodestore.INNERS.pack_array) == [0]  # 5 roots and their mid nodes


def _encode(leaves: np.ndarray, rc: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays a commit of every leaf writes (absent pages as zeroes), with ``leaf_rc``."""
    pages, _ = nodestore.NodeDisk.empty(nodestore.LEAVES).updates(leaves, rc, np.ones(len(leaves), np.uint8))
    out = {"leaf_rc": rc.view(np.uint8)}
    for name in (nodestore.PACK_ARRAY, nodestore.DENSE_ARRAY):
        arr = pages[name]
        buf = np.zeros(arr.npages * 4096, np.uint8)
        for i in arr.dirty:
            if i not in arr.dead:
                buf[i * 4096:(i + 1) * 4096] = np.frombuffer(bytes(arr.page(i)), np.uint8)
        out[name] = buf
    return out


def test_inner_node_records_decode_what_was_encoded():
    """Inner nodes (1,024 int32 children, -1 none) of every density -- a root with one child, sparse
    mid nodes, just below and above the dense threshold (340), full, dead -- come back as they were."""
    rng = np.random.default_rng(4)
    counts = [0, 1, 7, nodestore.INNERS.dense, nodestore.INNERS.dense + 1, 1024, 500, 2] * 4
    inners = np.full((1024, 1024), -1, np.int32)
    for i, c in enumerate(counts):
        inners[i, rng.choice(1024, c, replace=False)] = rng.integers(0, 1 << 30, c, dtype=np.int32)
    rc = np.ones(1024, np.uint32)
    rc[6] = 0
    pages, _ = nodestore.NodeDisk.empty(nodestore.INNERS).updates(inners, rc, np.ones(1024, np.uint8))
    arrays = {"inner_rc": rc.view(np.uint8)}
    for name in (nodestore.INNERS.pack_array, nodestore.INNERS.dense_array):
        arr = pages[name]
        buf = np.zeros(arr.npages * 4096, np.uint8)
        for i in arr.dirty:
            if i not in arr.dead:
                buf[i * 4096:(i + 1) * 4096] = np.frombuffer(bytes(arr.page(i)), np.uint8)
        arrays[name] = buf
    back, disk = nodestore.load(nodestore.INNERS, arrays)
    expect = inners.copy()
    expect[6] = -1
    assert np.array_equal(back, expect)
    assert np.flatnonzero(disk.stored == nodestore.MARK).tolist() == [i for i, c in enumerate(counts)
                                                                       if c > nodestore.INNERS.dense and i != 6]
    bad = dict(arrays)
    bad[nodestore.INNERS.pack_array] = arrays[nodestore.INNERS.pack_array].copy()
    bad[nodestore.INNERS.pack_array][4:8] = np.frombuffer(np.uint32(nodestore.LEAVES.tag).tobytes(), np.uint8)
    with pytest.raises(MetadataCorrupt, match="inner pack page 0: bad header"):  # a leaf page's tag
        nodestore.load(nodestore.INNERS, bad)


def test_leaf_records_decode_what_was_encoded_and_refuse_inconsistent_pages():
    """Leaves of every density (empty, one mapping, sparse, just below and above the dense threshold,
    full, dead) come back as they were; a pack page whose header, slots, counts or entry indices do not
    add up is corrupt metadata, named as such."""
    rng = np.random.default_rng(3)
    counts = [0, 1, 32, nodestore.DENSE, nodestore.DENSE + 1, 512, 300, 5] * 5
    leaves = np.full((len(counts), 512), np.iinfo(np.uint64).max, np.uint64)
    for i, c in enumerate(counts):
        leaves[i, rng.choice(512, c, replace=False)] = rng.integers(0, 1 << 40, c, dtype=np.uint64)
    rc = np.ones(1024, np.uint32)  # leaf_rc holds whole pages of counts
    leaves = np.concatenate([leaves, np.full((1024 - len(counts), 512), np.iinfo(np.uint64).max, np.uint64)])
    rc[7] = 0  # a dead leaf is stored as nothing
    arrays = _encode(leaves, rc)
    back, disk = nodestore.load(nodestore.LEAVES, arrays)
    expect = leaves.copy()
    expect[7] = np.iinfo(np.uint64).max
    assert np.array_equal(back, expect)
    dense = [i for i, c in enumerate(counts) if c > nodestore.DENSE]
    assert np.flatnonzero(disk.stored == nodestore.MARK).tolist() == dense
    pages = arrays[nodestore.PACK_ARRAY]
    assert len(pages) // 4096 == len(disk.keys) >= 2  # 20 sparse records of 1..192 entries: two pages
    nrec, nent = pages[:4].view(np.uint16)

    def corrupt(offset: int, value: bytes, match: str) -> None:
        bad = dict(arrays, **{nodestore.PACK_ARRAY: pages.copy()})
        bad[nodestore.PACK_ARRAY][offset:offset + len(value)] = np.frombuffer(value, np.uint8)
        with pytest.raises(MetadataCorrupt, match=match):
            nodestore.load(nodestore.LEAVES, bad)

    slots_at = 8 + 8 * int(nent)
    counts_at = slots_at + 4 * int(nrec)
    idx_at = counts_at + 2 * int(nrec)
    corrupt(4, b"XXXX", "bad header")                                          # tag
    corrupt(0, np.uint16(nrec + 400).tobytes(), "bad header")                  # records past the page
    corrupt(slots_at, np.uint32(5000).tobytes(), "beyond the 1024 leaf slots")  # slot out of range
    corrupt(slots_at + 4, pages[slots_at:slots_at + 4].tobytes(), "two records")  # a slot twice
    corrupt(counts_at, np.uint16(nodestore.DENSE + 1).tobytes(), "count")      # neither sparse nor dense
    corrupt(idx_at, np.uint16(600).tobytes(), "entry 600")                     # index past 512
    bad_tail = dict(arrays)
    bad_tail[nodestore.DENSE_ARRAY] = arrays[nodestore.DENSE_ARRAY][:4096]     # a dense leaf without its page
    with pytest.raises(MetadataCorrupt, match="has no page"):
        nodestore.load(nodestore.LEAVES, bad_tail)
