"""Randomized *pools* (not hand-made IR) against the real thin-provisioning-tools.

For each pool built by random library operations (volumes, snapshots of snapshots, deletes,
discards, shared and exclusive blocks, several bitmaps, reference counts >= 3, trees with internal
nodes): export-metadata -> thin_check exit 0 -> thin_dump == our dump -> thin_ls (all fields) ==
our ls -> thin_delta / thin_rmap == ours for sampled pairs/regions; and the reverse path:
thin_restore of our XML -> import -> the same pool state.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.support import require_tool, soak_examples
from thinpool import Pool
from thinpool.errors import NoSpace
from thinpool.interop.binary import write_binary_metadata
from thinpool.interop.binary_read import read_binary_metadata
from thinpool.interop.thin_delta import format_delta
from thinpool.interop.thin_ls import format_ls
from thinpool.interop.thin_rmap import format_rmap
from thinpool.interop.xml import dump_xml, load_xml

BS = 64 * 1024
ALL_FIELDS = ("DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,MAPPED_SECTORS,EXCLUSIVE_SECTORS,SHARED_SECTORS,"
              "MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES,MAPPED,EXCLUSIVE,SHARED,TRANSACTION,CREATE_TIME,SNAP_TIME")


def run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


ops = st.lists(st.tuples(st.sampled_from(["write", "write", "write", "snap", "delete", "discard", "create"]),
                         st.integers(0, 10**9)), min_size=3, max_size=25)


def rmap_view(meta, md):
    """What thin_rmap 0.9.0 reports of metadata with shared subtrees: it walks the devices in id order
    and skips every node it has already visited, so a leaf shared by several devices (a snapshot's
    unchanged part, as the kernel shares it) is listed under the lowest device id that reaches it only.
    ``md`` with each device keeping just the entries of the leaves it is the first to reach."""
    from thinpool.interop.binary import RawSuperblock
    from thinpool.interop.btree import BlockSource, walk_forest
    from thinpool.interop.ir import Device, Metadata
    src = BlockSource(meta)
    try:
        sb = RawSuperblock.unpack(src.read(np.array([0]), 160774, lambda i: "sb")[0].tobytes())
        top = walk_forest(src, np.array([sb.data_mapping_root]), 8, lambda t: "top")
        maps = walk_forest(src, top.values.view(np.uint64).reshape(-1).astype(np.int64), 8, lambda t: "dev")
    finally:
        src.close()
    tree = np.repeat(np.arange(len(maps.counts)), maps.counts)
    first = np.full(int(maps.leaf_blocks.max(initial=0)) + 1, len(maps.counts))
    np.minimum.at(first, maps.leaf_blocks, tree)
    keep = first[maps.leaf_blocks] == tree
    at = maps.offsets
    devices = []
    for t, dev in enumerate(md.devices):
        k = keep[at[t]:at[t + 1]]
        devices.append(Device(dev.dev_id, int(k.sum()), dev.transaction, dev.creation_time, dev.snap_time,
                              dev.vblocks[k], dev.dblocks[k], dev.times[k]))
    return Metadata(md.superblock, devices)


def build_pool(path, program, big: bool) -> Pool:
    nr_blocks = 40000 if big else 3000  # > 16320 blocks: several data bitmaps
    pool = Pool.create(path, data_size=nr_blocks * BS)
    rng = np.random.default_rng(len(program))
    pool.create_thin("v0", "64GiB")
    n = 1
    for op, x in program:
        names = [t.name for t in pool.thins()]
        if op == "create" or not names:
            pool.create_thin(f"v{n}", "64GiB")
            n += 1
            continue
        name = names[x % len(names)]
        vol = pool.thin(name)
        if op == "write":
            count = int(rng.integers(1, 700 if big else 120))
            span = 3000 if big else 600
            blocks = np.unique(rng.integers(0, span, count))
            free = pool.status().free_data_blocks
            blocks = blocks[: max(0, min(len(blocks), free - 2))]
            if len(blocks) == 0:
                continue
            vol.write_many(blocks * BS + int(rng.integers(0, BS - 8)), [b"%08d" % x] * len(blocks))
        elif op == "snap":
            pool.snapshot(name, f"v{n}")
            n += 1
        elif op == "delete" and len(names) > 1:
            pool.delete(name)
        elif op == "discard":
            first = int(rng.integers(0, 500))
            vol.discard(first * BS, int(rng.integers(1, 200)) * BS)
        if x % 4 == 0:
            pool.commit()
    pool.commit()
    return pool


@settings(max_examples=soak_examples(12), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(program=ops, big=st.booleans(), seed=st.integers(0, 1000))
def test_random_pools_agree_with_real_tools(tmp_path_factory, program, big, seed):
    require_tool("thin_check", "thin_dump", "thin_ls", "thin_delta", "thin_rmap", "thin_restore")
    d = tmp_path_factory.mktemp("pool")
    pool = build_pool(d / "pool", program, big)
    try:
        md = pool.to_metadata()
        meta = d / "meta.bin"
        write_binary_metadata(md, meta)
        run("thin_check", str(meta))
        ours = dump_xml(md)
        assert run("thin_dump", str(meta)) == ours
        assert run("thin_ls", "-o", ALL_FIELDS, str(meta)) == format_ls(md, ALL_FIELDS.split(","))
        # our live accounting equals thin_ls's notion of exclusive/shared
        for u, dev in zip(pool.usage(), md.devices):
            assert u.dev_id == dev.dev_id and u.mapped_blocks == dev.mapped_blocks
        rng = np.random.default_rng(seed)
        ids = [dev.dev_id for dev in md.devices]
        for _ in range(3):
            a, b = (int(i) for i in rng.choice(ids, 2))
            for verbose in (False, True):
                args = ["thin_delta", "--thin1", str(a), "--thin2", str(b)] + (["--verbose"] if verbose else [])
                assert run(*args, str(meta)) == format_delta(md, a, b, verbose=verbose)
        begin = int(rng.integers(0, pool.nr_data_blocks - 1))
        end = int(rng.integers(begin + 1, pool.nr_data_blocks + 1))
        assert run("thin_rmap", "--region", f"{begin}..{end}", str(meta)) == \
            format_rmap(rmap_view(meta, md), [(begin, end)])
        # reverse path: thin_restore of our XML -> read back -> a pool with the same state
        xml = d / "pool.xml"
        xml.write_text(ours)
        restored = d / "restored.bin"
        with open(restored, "wb") as f:
            f.truncate(64 << 20)
        run("thin_restore", "-i", str(xml), "-o", str(restored))
        back = read_binary_metadata(restored)
        copy = Pool.from_metadata(d / "copy", back)
        try:
            assert dump_xml(copy.to_metadata()) == ours
            assert copy.check().ok
            assert [u.exclusive_blocks for u in copy.usage()] == [u.exclusive_blocks for u in pool.usage()]
        finally:
            copy.close()
        assert dump_xml(load_xml(ours)) == ours
    finally:
        pool.close()


def test_held_metadata_snapshot_exports_held_root(tmp_path):
    require_tool("thin_check", "thin_dump")
    pool = Pool.create(tmp_path / "p", data_size=2000 * BS)
    v = pool.create_thin("v", "1GiB")
    v.write_many(np.arange(300) * BS, [b"a"] * 300)
    pool.reserve_metadata_snap()
    v.write_many(np.arange(300, 400) * BS, [b"b"] * 100)
    pool.snapshot("v", "s")
    pool.commit()
    meta = tmp_path / "meta.bin"
    write_binary_metadata(pool.to_metadata(), meta, held=pool.to_metadata(held=True))
    run("thin_check", str(meta))
    from thinpool.interop.binary_read import read_binary_metadata as rb
    sb_held = rb(meta).superblock.metadata_snap
    assert sb_held
    held_xml = run("thin_dump", f"--metadata-snap={sb_held}", str(meta))
    assert 'mapped_blocks="300"' in held_xml and held_xml.count("<device ") == 1
    live_xml = run("thin_dump", str(meta))
    assert live_xml.count("<device ") == 2 and 'mapped_blocks="400"' in live_xml
    pool.close()


def test_many_bitmaps_refcount_tree_and_internal_nodes(tmp_path):
    """Deterministic coverage of the structures randomized pools only sometimes reach."""
    require_tool("thin_check", "thin_dump")
    from thinpool.interop.binary_read import read_data_refcounts
    pool = Pool.create(tmp_path / "p", data_size=40000 * BS)
    v = pool.create_thin("v", "64GiB")
    v.write_many(np.arange(17000) * BS, [b"x"] * 17000)  # > 16320 data blocks: two data bitmaps
    for i in range(3):
        pool.snapshot("v" if i == 0 else f"s{i - 1}", f"s{i}")
    n7 = len(range(0, 17000, 7))
    for i in range(3):  # every leaf of every snapshot changes: each keeps its own leaves
        pool.thin(f"s{i}").write_many(np.arange(i, 17000, 7)[:n7 - 1] * BS, [b"y"] * (n7 - 1))
    pool.commit()
    md = pool.to_metadata()
    meta = tmp_path / "meta.bin"
    write_binary_metadata(md, meta)
    run("thin_check", str(meta))
    assert run("thin_dump", str(meta)) == dump_xml(md)
    # dm-thin counts a data block once per distinct leaf mapping it: v's leaves and each snapshot's own
    counts = read_data_refcounts(meta)
    rewritten = 3 * (n7 - 1)
    assert counts.max() == 4 and (counts == 4).sum() == 17000 - rewritten
    assert (counts == 3).sum() == rewritten and (counts == 1).sum() == rewritten
    assert pool.status().used_data_blocks == 17000 + rewritten
    pool.close()


def test_kernel_rule_held_metadata_snapshot_is_a_copy_of_the_superblock_at_reservation(tmp_path):
    """dm-thin's reserve_metadata_snap copies the superblock (__reserve_metadata_snap) and wipes the
    copy's space-map roots: thin_dump -m / thin_delta -m print the copy's own time and transaction id
    and nr_data_blocks 0, whatever the live pool did since.  Ours says the same, and our exported
    metadata makes the real tools say it too."""
    require_tool("thin_check", "thin_dump", "thin_delta", "thin_ls")
    from thinpool.cli.ops import op_delta, op_dump
    pool = Pool.create(tmp_path / "p", data_size=2000 * BS)
    try:
        v = pool.create_thin("v", "1GiB")
        v.write_many(np.arange(50) * BS, [b"a"] * 50)
        pool.snapshot("v", "s0")  # time 1
        pool.set_transaction_id(0, 5)
        pool.commit()
        pool.reserve_metadata_snap()
        at_reserve = (pool.time, pool.transaction_id)
        pool.snapshot("v", "s1")  # the live pool moves on: time 2, transaction 9, more mappings
        v.write_many(np.arange(50, 80) * BS, [b"b"] * 30)
        pool.set_transaction_id(5, 9)
        pool.commit()
        assert (pool.time, pool.transaction_id) == (2, 9) and at_reserve == (1, 5)

        held = pool.to_metadata(held=True)
        assert (held.superblock.time, held.superblock.transaction) == at_reserve
        assert held.superblock.nr_data_blocks == 0 and held.superblock.metadata_snap is None
        assert [d.mapped_blocks for d in held.devices] == [50, 50]
        ours_xml = op_dump(pool, metadata_snap=True)
        assert ours_xml.startswith('<superblock uuid="" time="1" transaction="5" flags="0" version="2" '
                                   'data_block_size="128" nr_data_blocks="0">')

        meta = tmp_path / "meta.bin"
        write_binary_metadata(pool.to_metadata(), meta, held=held)
        run("thin_check", str(meta))
        assert run("thin_dump", "-m", str(meta)) == ours_xml
        assert run("thin_dump", str(meta)) == op_dump(pool)
        theirs = run("thin_delta", "-m", "--thin1", "1", "--thin2", "2", str(meta))
        assert theirs == op_delta(pool, "v", "s0", metadata_snap=True)
        assert run("thin_ls", "-m", "-o", ALL_FIELDS, str(meta)) == \
            format_ls(held, ALL_FIELDS.split(","), headers=True)
        # the reader gives the copy's fields too (with the live data device's size, which an import needs)
        back = read_binary_metadata(meta, metadata_snap=True)
        assert (back.superblock.time, back.superblock.transaction) == at_reserve
        # and the hold survives a reopen with its own superblock fields
        pool.close()
        pool = Pool.open(tmp_path / "p")
        assert (pool.to_metadata(held=True).superblock.time, pool.to_metadata(held=True).superblock.transaction) \
            == at_reserve
    finally:
        pool.close()


def test_kernel_rule_held_metadata_snapshot_keeps_its_data_blocks_in_use(tmp_path):
    """__reserve_metadata_snap increments the mapping tree's root (dm_tm_inc): the held trees keep
    referencing their leaves, and the leaves their data blocks, so a volume deleted, discarded or
    overwritten by copy-on-write after the reservation frees none of the blocks the held view maps
    until release_metadata_snap (__release_metadata_snap: dm_btree_del of the held trees).  A backup
    reading the blocks thin_delta -m / thin_dump -m name never reads another volume's data."""
    require_tool("thin_check", "thin_dump")
    pool = Pool.create(tmp_path / "p", data_size=8 * BS, error_if_no_space=True)
    try:
        v = pool.create_thin("v", 16 * BS)
        v.write(0, b"v" * (4 * BS))
        w = pool.create_thin("w", 16 * BS)
        w.write(0, b"w" * BS)
        pool.reserve_metadata_snap()
        held = pool.to_metadata(held=True)
        held_blocks = {int(b) for d in held.devices for b in d.dblocks}
        assert held_blocks == set(pool.held_data_blocks().tolist()) and len(held_blocks) == 5
        pool.delete("v")                       # frees v's 4 blocks -- not while they are held
        w.discard(0, BS)                       # w's block too
        pool.commit()
        pool.commit()
        assert pool.status().used_data_blocks == 5 and pool.check().ok
        x = pool.create_thin("x", 16 * BS)
        with pytest.raises(NoSpace):
            x.write(0, b"x" * (4 * BS))        # only 3 blocks are free
        x.write(0, b"x" * (3 * BS))
        live = {int(b) for t in pool.thins() for b in t.mappings()[1]}
        assert not live & held_blocks          # no held block was handed out again
        meta = tmp_path / "meta.bin"
        write_binary_metadata(pool.to_metadata(), meta, held=held)
        run("thin_check", str(meta))
        with open(pool.data_path, "rb") as f:  # the bytes the held view maps are the held bytes
            for dev, fill in zip(held.devices, (b"v", b"w")):
                for b in dev.dblocks:
                    f.seek(int(b) * BS)
                    assert f.read(BS) == fill * BS
        pool.close()
        pool = Pool.open(tmp_path / "p")       # the pins are committed with the hold
        assert pool.check().ok and pool.status().used_data_blocks == 8
        pool.release_metadata_snap()           # held-only blocks are freed now
        assert pool.status().used_data_blocks == 3 and pool.check().ok
        pool.commit()
        pool.thin("x").write(3 * BS, b"y" * (5 * BS))  # and allocatable after the commits
        assert pool.status().used_data_blocks == 8 and pool.check().ok
    finally:
        pool.close()


def test_kernel_rule_snapshot_of_a_snapshot_times_as_the_tools_read_them(tmp_path):
    """__create_snap: pmd->time++, then the snapshot's creation_time and snapshotted_time and the
    origin's snapshotted_time are the new time (__open_device(create) / __set_snapshot_details);
    create_thin stamps both with the current time and does not move it; a mapping is inserted with
    the time of its write (__insert: pack_block_time(data_block, pmd->time)).  thin_ls and thin_dump
    read the same from the exported metadata."""
    require_tool("thin_check", "thin_dump", "thin_ls")
    pool = Pool.create(tmp_path / "p", data_size=64 * BS)
    try:
        a = pool.create_thin("a", 16 * BS)            # dev 1: time 0
        a.write(0, b"a")                               # mapping time 0
        pool.snapshot("a", "s1")                       # dev 2: time 1
        pool.thin("s1").write(BS, b"s")                # mapping time 1 in s1
        pool.snapshot("s1", "s2")                      # dev 3: time 2 (a snapshot of a snapshot)
        b = pool.create_thin("b", 16 * BS)             # dev 4: time 2, not moved
        a.write(2 * BS, b"a")                          # mapping time 2 in a
        assert pool.time == 2
        times = {t.name: (t.creation_time, t.snap_time) for t in pool.thins()}
        assert times == {"a": (0, 1), "s1": (1, 2), "s2": (2, 2), "b": (2, 2)}
        meta = tmp_path / "meta.bin"
        md = pool.to_metadata()
        write_binary_metadata(md, meta)
        run("thin_check", str(meta))
        rows = run("thin_ls", "--no-headers", "-o", "DEV,CREATE_TIME,SNAP_TIME", str(meta)).split("\n")
        assert [r.split() for r in rows if r] == [["1", "0", "1"], ["2", "1", "2"], ["3", "2", "2"], ["4", "2", "2"]]
        dump = run("thin_dump", str(meta))
        assert '<superblock uuid="" time="2" ' in dump
        assert '<single_mapping origin_block="2" data_block="' in dump
        by_dev = {d.dev_id: dict(zip(d.vblocks.tolist(), d.times.tolist())) for d in md.devices}
        assert by_dev == {1: {0: 0, 2: 2}, 2: {0: 0, 1: 1}, 3: {0: 0, 1: 1}, 4: {}}
        assert b.mapped_blocks == 0
    finally:
        pool.close()
