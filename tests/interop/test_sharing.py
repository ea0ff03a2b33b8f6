"""Export and import keep btree sharing, as dm-thin has it.

The kernel never copies a tree to snapshot it: ``create_snap`` points the snapshot at the origin's root
and bumps the root's count; a write shadows only the nodes on its path (dm-thin-metadata.c,
dm-btree.c).  Reference counts then count the sharing: a metadata node once per parent, a data block
once per distinct leaf that maps it.  Our exported metadata has that shape (thin_check, thin_dump,
thin_ls and thin_rmap verify it), and importing it -- or restoring thin_dump XML, with or without 1.x
``<def>``/``<ref>`` -- rebuilds a pool whose leaves are shared again (leaf_rc > 1), not copied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.interop.test_interop_pool import ALL_FIELDS, rmap_view, run
from tests.support import require_tool
from thinpool import Pool
from thinpool.interop.binary import write_binary_metadata
from thinpool.interop.binary_read import (
    check_binary_metadata,
    read_binary_metadata,
    read_data_refcounts,
    read_metadata_refcounts,
)
from thinpool.interop.ir import identical_runs
from thinpool.interop.thin_ls import format_ls
from thinpool.interop.thin_rmap import format_rmap
from thinpool.interop.xml import dump_xml, load_xml

BS = 64 * 1024
TOOLS = ("thin_check", "thin_dump", "thin_ls", "thin_rmap")


def origin_with_snapshots(path: Path, nblocks: int, nsnaps: int, *, written: int = 0, sparse: bool = False,
                          seed: int = 1) -> Pool:
    """A volume of ``nblocks`` mapped blocks (every 37th virtual block if ``sparse``) and ``nsnaps``
    snapshots of it, the first ``written`` of which get a few blocks rewritten."""
    pool = Pool.create(path, data_size=(nblocks + 64 * nsnaps + 1024) * BS)
    v = pool.create_thin("v", "64GiB")
    offsets = np.arange(nblocks) * (37 if sparse else 1)
    v.write_many(offsets * BS, [b"v"] * nblocks)
    rng = np.random.default_rng(seed)
    for i in range(nsnaps):
        pool.snapshot("v", f"s{i}")
        if i < written:
            pool.thin(f"s{i}").write_many(rng.choice(offsets, 3, replace=False) * BS, [b"s"] * 3)
    pool.commit()
    return pool


def export_and_check(pool: Pool, meta: Path) -> int:
    """Export; the real tools accept it and print what they print for the same mappings unshared."""
    md = pool.to_metadata()
    used = write_binary_metadata(md, meta, pools=[pool])
    run("thin_check", str(meta))
    assert run("thin_dump", str(meta)) == dump_xml(md)
    assert run("thin_ls", "-o", ALL_FIELDS, str(meta)) == format_ls(md, ALL_FIELDS.split(","))
    end = pool.status().used_data_blocks + 64
    assert run("thin_rmap", "--region", f"0..{end}", str(meta)) == format_rmap(rmap_view(meta, md), [(0, end)])
    assert check_binary_metadata(meta) == []  # both space maps count exactly the references made
    return used


def test_kernel_rule_snapshot_shares_the_origin_tree_in_exported_metadata(tmp_path: Path) -> None:
    """create_snap shares the origin's root: 60 unchanged snapshots of a volume add no mapping nodes,
    only their top-level and details entries; the shared root counts one reference per device and every
    data block one (its leaves are distinct once)."""
    require_tool(*TOOLS)
    alone = origin_with_snapshots(tmp_path / "alone", 3000, 0)
    used_alone = export_and_check(alone, tmp_path / "alone.bin")
    alone.close()
    pool = origin_with_snapshots(tmp_path / "p", 3000, 60)
    meta = tmp_path / "meta.bin"
    used = export_and_check(pool, meta)
    assert used - used_alone <= 2  # a second top-level/details leaf at most; no mapping node
    counts = read_metadata_refcounts(meta)
    assert counts.max() == 61  # the one root, referenced by 61 top-level entries
    data = read_data_refcounts(meta)
    assert data.max() == 1 and int(data.sum()) == 3000
    # before sharing, every device had its own tree: 61 copies
    assert used < 61 * (3000 // 252) // 4
    pool.close()


def test_kernel_rule_written_snapshots_shadow_only_their_path(tmp_path: Path) -> None:
    """A write to a snapshot shadows the nodes on its path (dm-btree's shadowing): each written
    snapshot owns a few leaves and internal nodes, the rest stays shared; data blocks count one per
    distinct leaf mapping them, so a block of a shadowed leaf counts 2, a rewritten one 1."""
    require_tool(*TOOLS)
    unwritten = origin_with_snapshots(tmp_path / "u", 20000, 40)
    used_unwritten = export_and_check(unwritten, tmp_path / "u.bin")
    unwritten.close()
    pool = origin_with_snapshots(tmp_path / "p", 20000, 40, written=10)
    meta = tmp_path / "meta.bin"
    used = export_and_check(pool, meta)
    # ten snapshots with 3 blocks rewritten: each owns the 3 leaves it wrote and its root (a 2-level
    # tree), as the kernel's shadowing leaves it; the other leaves of the written chunks stay shared
    assert used - used_unwritten <= 10 * (3 + 1) + 4
    data = read_data_refcounts(meta)
    assert data.max() >= 2 and (data >= 2).sum() <= 10 * 3 * 252  # blocks of shadowed leaves
    pool.close()


def test_kernel_rule_sparse_volumes_share_too(tmp_path: Path) -> None:
    """Sparse mappings (every 37th block: 14 per 512-block chunk) gather into aligned windows of at
    least 84 mappings, thin_check's minimum node fill, and those are shared like dense chunks."""
    require_tool(*TOOLS)
    alone = origin_with_snapshots(tmp_path / "alone", 5000, 0, sparse=True)
    used_alone = export_and_check(alone, tmp_path / "alone.bin")
    alone.close()
    pool = origin_with_snapshots(tmp_path / "p", 5000, 30, written=5, sparse=True)
    used = export_and_check(pool, tmp_path / "meta.bin")
    assert used < used_alone + 5 * 12 + 10
    pool.close()


def test_kernel_rule_held_metadata_snapshot_shares_the_live_trees(tmp_path: Path) -> None:
    """reserve_metadata_snap increments the mapping and details roots (__reserve_metadata_snap): the
    held view shares every subtree the live pool has not changed since."""
    require_tool(*TOOLS)
    pool = origin_with_snapshots(tmp_path / "p", 10000, 5)
    plain = export_and_check(pool, tmp_path / "plain.bin")
    pool.reserve_metadata_snap()
    pool.thin("v").write_many(np.arange(0, 10000, 1000) * BS, [b"w"] * 10)
    pool.commit()
    meta = tmp_path / "meta.bin"
    md, held = pool.to_metadata(), pool.to_metadata(held=True)
    used = write_binary_metadata(md, meta, held=held, pools=[pool])
    run("thin_check", str(meta))
    assert run("thin_dump", str(meta)) == dump_xml(md)
    assert run("thin_dump", "-m", str(meta)) == dump_xml(held)
    assert check_binary_metadata(meta) == []
    # v changed in 10 chunks: those and v's internal nodes are its own, everything else is shared
    assert used < plain + 10 * 3 + 12
    pool.close()


def test_kernel_rule_export_import_round_trip_keeps_sharing(tmp_path: Path) -> None:
    """Importing metadata keeps the sharing it reads: identical chunks become one leaf with leaf_rc > 1,
    data blocks count once per distinct leaf, so the pool's metadata use changes by at most 1.2x; the
    imported pool breaks sharing on write exactly as the original does."""
    require_tool("thin_check")
    pool = origin_with_snapshots(tmp_path / "p", 20000, 50, written=8)
    before = pool.status().used_metadata_blocks
    usage = [(u.name, u.mapped_blocks, u.exclusive_blocks, u.shared_blocks) for u in pool.usage()]
    meta = tmp_path / "meta.bin"
    write_binary_metadata(pool.to_metadata(), meta, pools=[pool])
    ours = dump_xml(pool.to_metadata())
    pool.close()
    names = {i + 1: n for i, n in enumerate(["v"] + [f"s{i}" for i in range(50)])}
    back = Pool.from_metadata(tmp_path / "back", read_binary_metadata(meta), names=names,
                              data_file=tmp_path / "p" / "data", take_over_data=True)
    try:
        after = back.status().used_metadata_blocks
        assert after <= 1.2 * before, (before, after)
        assert back.check().ok
        assert dump_xml(back.to_metadata()) == ours
        assert [(u.name, u.mapped_blocks, u.exclusive_blocks, u.shared_blocks) for u in back.usage()] == usage
        # shared leaves were rebuilt shared: a write to a snapshot copies, the origin keeps its bytes
        before_write = back.status().used_data_blocks
        back.thin("s40").write(5 * BS, b"new")
        assert back.status().used_data_blocks == before_write + 1
        assert back.thin("v").read(5 * BS, 1) == b"v" and back.thin("s41").read(5 * BS, 1) == b"v"
        assert back.thin("s40").read(5 * BS, 3) == b"new"
        assert back.check().ok
        back.commit()
        write_binary_metadata(back.to_metadata(), tmp_path / "again.bin", pools=[back])
        run("thin_check", str(tmp_path / "again.bin"))
    finally:
        back.close()


def chunked_1x_xml(md, chunk: int = 512) -> str:
    """thin_dump 1.x style XML: the first device's mappings as one <def> per chunk, and every device
    splicing in (<ref>) the defs of the chunks it has unchanged, its other mappings written out."""
    sb = md.superblock
    out = [f'<superblock uuid="" time="{sb.time}" transaction="{sb.transaction}" version="2" '
           f'data_block_size="{sb.data_block_size}" nr_data_blocks="{sb.nr_data_blocks}">']
    first = md.devices[0]
    defs = {}
    for c in np.unique(first.vblocks // chunk):
        sel = first.vblocks // chunk == c
        defs[int(c)] = (first.vblocks[sel], first.dblocks[sel], first.times[sel])
        out.append(f'  <def name="{int(c)}">')
        out += [f'    <single_mapping origin_block="{v}" data_block="{d}" time="{t}"/>' for v, d, t in zip(*defs[int(c)])]
        out.append("  </def>")
    for dev in md.devices:
        out.append(f'  <device dev_id="{dev.dev_id}" mapped_blocks="{dev.mapped_blocks}" transaction="{dev.transaction}" '
                   f'creation_time="{dev.creation_time}" snap_time="{dev.snap_time}">')
        for c in np.unique(dev.vblocks // chunk):
            sel = dev.vblocks // chunk == c
            mine = (dev.vblocks[sel], dev.dblocks[sel], dev.times[sel])
            if int(c) in defs and all(np.array_equal(a, b) for a, b in zip(mine, defs[int(c)])):
                out.append(f'    <ref name="{int(c)}"/>')
            else:
                out += [f'    <single_mapping origin_block="{v}" data_block="{d}" time="{t}"/>' for v, d, t in zip(*mine)]
        out.append("  </device>")
    out.append("</superblock>")
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("form", ["1.x def/ref", "0.9.0"])
def test_kernel_rule_dump_restore_keeps_sharing(tmp_path: Path, form: str) -> None:
    """`thinpool dump | thinpool restore` (0.9.0 XML) and a thin_dump 1.x XML whose <def>s are spliced into
    several devices by <ref> both restore a pool with its snapshots' leaves shared again."""
    require_tool("thin_check")
    pool = origin_with_snapshots(tmp_path / "p", 6000, 30, written=4)
    before = pool.status().used_metadata_blocks
    md = pool.to_metadata()
    pool.close()
    text = chunked_1x_xml(md) if form == "1.x def/ref" else dump_xml(md)
    if form == "1.x def/ref":
        assert text.count("<ref ") > 25 * 11  # most chunks of most snapshots are spliced in
    back = Pool.from_metadata(tmp_path / "back", load_xml(text))
    try:
        assert back.status().used_metadata_blocks <= 1.2 * before
        assert dump_xml(back.to_metadata()) == dump_xml(md)
        assert back.check().ok
        write_binary_metadata(back.to_metadata(), tmp_path / "m.bin", pools=[back])
        run("thin_check", str(tmp_path / "m.bin"))
    finally:
        back.close()


def test_identical_runs_finds_equal_runs_and_survives_hash_collisions(monkeypatch) -> None:
    """Runs are grouped by a hash and then compared element by element: a collision costs sharing, never
    correctness (the hash is forced to collide for every run of a length here)."""
    a = np.array([5, 6, 7, 5, 6, 7, 5, 6, 8, 9, 5, 6, 7, 1, 2], np.uint64)
    b = np.zeros(a.size, np.uint64)
    starts, counts = np.array([0, 3, 6, 9, 10, 13, 0, 12]), np.array([3, 3, 3, 1, 3, 2, 0, 0])
    expect = np.array([0, 0, 2, 3, 0, 5, 6, 6])
    rep, unique = identical_runs(starts, counts, [a, b])
    assert rep.tolist() == expect.tolist() and unique.tolist() == [0, 2, 3, 5, 6]
    import thinpool.interop.ir as ir
    monkeypatch.setattr(ir, "_mix_inplace", lambda x: x.fill(0))
    rep, unique = identical_runs(starts, counts, [a, b])
    assert all(np.array_equal(a[starts[r]:starts[r] + counts[r]], a[starts[q]:starts[q] + counts[q]])
               for r, q in enumerate(rep))
    assert rep[1] == 0 and rep[7] == 6 and rep[2] == 2  # equal ones still found, the collided one kept apart


def derived_family(seed: int, n_devices: int, nr_data_blocks: int) -> "Metadata":
    """Devices made from each other by random edits (remaps, new mappings, unmaps), dense and sparse
    stretches, keys up to 2^40: the leaf groups' cuts and merges meet every case."""
    from thinpool.interop.ir import Device, Metadata, Superblock
    rng = np.random.default_rng(seed)
    parts = [np.arange(int(rng.integers(1, 2000))) + int(rng.integers(0, 1 << 40)) for _ in range(3)]
    parts.append(np.unique(rng.integers(0, 1 << 20, int(rng.integers(1, 3000)))) * int(rng.integers(1, 60)))
    vb = np.unique(np.concatenate(parts)).astype(np.uint64)
    db = rng.integers(0, nr_data_blocks, vb.size).astype(np.uint64)
    tm = rng.integers(0, 5, vb.size).astype(np.uint32)
    devices = [Device(0, vb.size, 0, 0, 0, vb, db, tm)]
    for i in range(1, n_devices):
        base = devices[int(rng.integers(0, i))]
        v, d, t = base.vblocks.copy(), base.dblocks.copy(), base.times.copy()
        hit = rng.random(v.size) < rng.choice([0.0, 0.001, 0.05])
        d[hit] = rng.integers(0, nr_data_blocks, int(hit.sum()))
        keep = rng.random(v.size) >= rng.choice([0.0, 0.002, 0.3])
        extra = rng.integers(0, 1 << 41, int(rng.integers(0, 300))).astype(np.uint64)
        v, d, t = np.concatenate((v[keep], extra)), np.concatenate((d[keep], rng.integers(0, nr_data_blocks, extra.size)
                                                                   .astype(np.uint64))), \
            np.concatenate((t[keep], np.full(extra.size, 7, np.uint32)))
        v, first = np.unique(v, return_index=True)
        devices.append(Device(i, v.size, i, i, i, v, d[first], t[first]))
    return Metadata(Superblock(9, 3, 128, nr_data_blocks), devices)


@pytest.mark.parametrize("seed", range(6))
def test_kernel_rule_shared_forest_nodes_are_a_third_full_and_counts_exact(tmp_path: Path, seed: int) -> None:
    """thin_check 0.9.0 refuses a non-root node with fewer than max_entries / 3 entries (84) and any
    reference count that differs from the references made; random families of related devices (remaps,
    inserts, unmaps, dense and sparse stretches, huge keys) pass it, read back exactly, and share."""
    require_tool("thin_check", "thin_dump")
    from tests.interop.test_interop_binary import assert_same, dump
    md = derived_family(seed, 12, 50_000)
    meta = tmp_path / "meta.bin"
    used = write_binary_metadata(md, meta)
    run("thin_check", str(meta))
    assert_same(read_binary_metadata(meta), md)
    assert_same(dump(meta), md)
    assert check_binary_metadata(meta) == []
    # devices derived from each other share nodes: fewer than their trees built one by one
    from thinpool.interop.sharing import build_shared_forest

    def nodes(devs) -> int:
        keys = np.concatenate([d.vblocks for d in devs])
        values = np.concatenate([(d.dblocks << np.uint64(24)) | d.times.astype(np.uint64) for d in devs])
        return build_shared_forest(keys, values, np.array([d.mapped_blocks for d in devs])).nr_nodes
    alone = sum(nodes([d]) for d in md.devices)
    assert nodes(md.devices) < alone and used < alone
