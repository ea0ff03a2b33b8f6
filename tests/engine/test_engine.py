"""Unit tests for the engine's rules One test per rule."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from thinpool import Pool
from thinpool.errors import AlreadyExists, InvalidArgument, NoSpace, NotFound, PoolLocked, ReadOnly

BS = 64 * 1024


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(tmp_path / "pool", data_size="16MiB")
    yield p
    p.close(commit=False)


def rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def allocated(pool: Pool) -> set[int]:
    return set(int(b) for b in pool.data.allocated_blocks())


# --------------------------------------------------------------------------- provisioning

def test_first_write_provisions_and_partial_block_reads_zero(pool):
    v = pool.create_thin("v", "1GiB")
    assert pool.status().used_data_blocks == 0
    v.write(BS + 100, b"abc")
    assert pool.status().used_data_blocks == 1
    assert v.read(BS, BS) == b"\0" * 100 + b"abc" + b"\0" * (BS - 103)
    assert v.read(0, BS) == b"\0" * BS  # unmapped reads zero, allocates nothing
    assert pool.status().used_data_blocks == 1
    assert v.usage().mapped_blocks == 1 and v.usage().highest_mapped_block == 1


def test_write_crossing_blocks_provisions_each(pool):
    v = pool.create_thin("v", "1GiB")
    data = rand(3 * BS)
    v.write(BS // 2, data)
    assert v.usage().mapped_blocks == 4
    assert v.read(BS // 2, 3 * BS) == data


def test_freed_block_never_leaks_old_data(tmp_path):
    pool = Pool.create(tmp_path / "p", data_size=2 * BS)
    a = pool.create_thin("a", "1GiB")
    a.write(0, b"\xff" * (2 * BS))
    pool.commit()
    assert a.discard(0, BS) == 1
    pool.commit()
    pool.commit()  # the freed block is punched and becomes allocatable once no superblock maps it
    b = pool.create_thin("b", "1GiB")
    b.write(10, b"x")  # the only free block is the one a used to map
    assert b.mappings()[1].tolist() == [0]
    assert b.read(0, BS) == b"\0" * 10 + b"x" + b"\0" * (BS - 11)
    pool.close()


def test_block_freed_in_transaction_not_reused_before_commit(pool):
    a = pool.create_thin("a", "1GiB")
    a.write_many(np.arange(4) * BS, np.full((4, BS), 7, np.uint8))
    pool.commit()
    s = pool.snapshot("a", "s")
    pool.commit()
    pool.delete("a")  # s still maps the blocks: nothing freed yet
    assert pool.status().used_data_blocks == 4
    pool.delete("s")
    assert pool.status().used_data_blocks == 0
    b = pool.create_thin("b", "1GiB")
    b.write_many(np.arange(4) * BS, np.full((4, BS), 9, np.uint8))
    assert set(b.mappings()[1]) == {4, 5, 6, 7}  # 0..3 were freed in this transaction


# --------------------------------------------------------------------------- snapshots and sharing

def test_snapshot_copies_nothing_and_shares_everything(pool):
    v = pool.create_thin("v", "1GiB")
    v.write_many(np.arange(20) * BS, np.full((20, BS), 1, np.uint8))
    rc_before = pool.space.data_rc.copy()
    s = pool.snapshot("v", "s")
    assert np.array_equal(pool.space.data_rc, rc_before)  # no per-block work
    assert pool.time == 1 and v.snap_time == 1 and s.snap_time == 1 and s.creation_time == 1
    u = pool.usage("s")
    assert (u.mapped_blocks, u.exclusive_blocks, u.shared_blocks) == (20, 0, 20)
    assert pool.status().used_data_blocks == 20


def test_cow_break_on_partial_write_copies_whole_block(pool):
    v = pool.create_thin("v", "1GiB")
    old = rand(BS, 1)
    v.write(0, old)
    s = pool.snapshot("v", "s")
    v.write(100, b"NEW")
    assert s.read(0, BS) == old
    assert v.read(0, BS) == old[:100] + b"NEW" + old[103:]
    assert pool.status().used_data_blocks == 2
    assert (pool.usage("v").exclusive_blocks, pool.usage("s").exclusive_blocks) == (1, 1)


def test_time_rule_breaks_sharing_n_plus_one_times(pool):
    """dm-thin decides sharing by time, not reference counts: after the origin broke sharing the
    snapshot still copies on its first write (kernel comment: 'breaking sharing n+1 times')."""
    v = pool.create_thin("v", "1GiB")
    v.write(0, b"a" * BS)
    s = pool.snapshot("v", "s")
    v.write(0, b"b")  # origin breaks sharing: block 1
    s.write(0, b"c")  # snapshot copies again into block 2; its old block 0 is freed
    assert sorted([int(v.mappings()[1][0]), int(s.mappings()[1][0])]) == [1, 2]
    assert pool.status().used_data_blocks == 2
    assert s.read(0, 2) == b"ca" and v.read(0, 2) == b"ba"
    assert pool.check().ok


def test_snapshots_of_snapshots_any_depth(pool):
    v = pool.create_thin("v0", "1GiB")
    v.write(0, b"0" * BS)
    for i in range(1, 30):
        pool.snapshot(f"v{i-1}", f"v{i}").write(i * BS, bytes([48 + i % 10]) * 10)
    last = pool.thin("v29")
    assert last.read(0, 1) == b"0"
    assert [last.read(i * BS, 1) for i in range(1, 30)] == [bytes([48 + i % 10]) for i in range(1, 30)]
    assert pool.thin("v5").read(6 * BS, 1) == b"\0"
    assert pool.check().ok


def test_delete_origin_keeps_snapshot(pool):
    v = pool.create_thin("v", "1GiB")
    data = rand(5 * BS, 3)
    v.write(0, data)
    s = pool.snapshot("v", "s")
    pool.delete("v")
    pool.commit()
    assert s.read(0, 5 * BS) == data
    assert pool.usage("s").exclusive_blocks == 5
    assert pool.check().ok
    with pytest.raises(NotFound):
        pool.thin("v")


def test_discard_unmaps_whole_blocks_only_and_punches_at_commit(pool):
    v = pool.create_thin("v", "1GiB")
    v.write(0, b"\x01" * (4 * BS))
    pool.commit()
    assert v.discard(10, BS) == 0  # no whole block inside
    assert v.discard(BS // 2, 2 * BS) == 1  # only block 1 is whole
    assert v.read(BS, BS) == b"\0" * BS
    assert v.read(0, 1) == b"\x01" and v.read(2 * BS, 1) == b"\x01"
    d1 = 1
    assert d1 in allocated(pool)  # not punched before commit: a crash must not lose committed data
    pool.commit()
    assert d1 in allocated(pool)  # the previous commit still maps it (fallback target): kept one more commit
    pool.commit()
    assert d1 not in allocated(pool)
    assert pool.status().used_data_blocks == 3


# --------------------------------------------------------------------------- transactions

def test_close_commits_and_reopen_restores(tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, data_size="8MiB") as p:
        v = p.create_thin("v", "64MiB")
        v.write(12345, b"persist")
        p.snapshot("v", "s")
    with Pool.open(path) as p:
        assert p.thin("s").read(12345, 7) == b"persist"
        assert p.time == 1 and p.check().ok


def test_crash_returns_last_commit(tmp_path):
    path = tmp_path / "p"
    p = Pool.create(path, data_size="8MiB")
    v = p.create_thin("v", "64MiB")
    v.write(0, b"committed")
    p.commit()
    with p.batch():  # messages inside a batch wait for its end: a crash before it loses them
        v.write(0, b"LOST!")
        p.create_thin("w", "1MiB")
        p.close(commit=False)
    p = Pool.open(path)
    assert "w" not in p
    # block 0 was exclusive and mapped at the commit: old or new bytes are both allowed
    assert p.thin("v").read(0, 9) in (b"committed", b"LOST!tted")
    assert p.check().ok
    p.close()


def test_uncommitted_new_block_is_scrubbed_after_crash(tmp_path):
    path = tmp_path / "p"
    p = Pool.create(path, data_size="8MiB")
    v = p.create_thin("v", "64MiB")
    p.commit()
    v.write(0, b"\xee" * BS)  # allocates block 0, never committed
    p.close(commit=False)
    p = Pool.open(path)
    assert p.scrubbed_blocks == 1
    w = p.thin("v")
    w.write(5, b"z")
    assert w.read(0, BS) == b"\0" * 5 + b"z" + b"\0" * (BS - 6)
    p.close()


def test_freed_block_hazard_crash_before_commit(tmp_path):
    """Delete a snapshot, write elsewhere (allocating), crash: the snapshot is back, intact."""
    path = tmp_path / "p"
    p = Pool.create(path, data_size="1MiB")  # 16 blocks
    v = p.create_thin("v", "64MiB")
    data = rand(8 * BS, 9)
    v.write(0, data)
    s = p.snapshot("v", "s")
    p.commit()
    with p.batch():  # the deletes are not committed when the crash comes
        p.delete("v")
        p.delete("s")
        w = p.create_thin("w", "64MiB")
        w.write(0, b"\xaa" * (8 * BS))  # must not land on the 8 freed blocks
        assert set(w.mappings()[1].tolist()) == set(range(8, 16))
        p.close(commit=False)
    p = Pool.open(path)
    assert p.thin("s").read(0, 8 * BS) == data and p.thin("v").read(0, 8 * BS) == data
    assert p.check().ok
    p.close()


def test_kill9_mid_workload_returns_last_commit(tmp_path):
    path = tmp_path / "p"
    Pool.create(path, data_size="64MiB").close()
    script = textwrap.dedent(f"""
        import sys, os
        from thinpool import Pool
        p = Pool.open({str(path)!r})
        v = p.create_thin("v", "256MiB")
        i = 0
        while True:
            v.write((i % 500) * 65536, (b"%08d" % i) * 8192)
            if i % 50 == 49:
                p.commit()
                print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    last = None
    for line in proc.stdout:
        last = int(line)
        if last >= 249:
            break
    proc.kill()
    proc.wait()
    p = Pool.open(path)
    assert p.check().ok
    v = p.thin("v")
    # every block written up to the last acknowledged commit holds a value from that generation or later
    for blk in range(0, min(last + 1, 500)):
        val = int(v.read(blk * BS, 8))
        assert val >= blk and val % 500 == blk
    p.close()


# --------------------------------------------------------------------------- space

def test_no_space_changes_nothing_and_resize_recovers(tmp_path):
    p = Pool.create(tmp_path / "p", data_size=4 * BS, low_water_mark=1, error_if_no_space=True)
    fired = []
    p.on_low_water = lambda pool: fired.append(pool.status().free_data_blocks)
    v = p.create_thin("v", "1GiB")
    v.write(0, b"1" * (3 * BS))
    assert fired == []  # free counts before the three allocations: 4, 3, 2 (the mark is 1)
    before = (v.read(0, 5 * BS), p.status().used_data_blocks, v.mappings()[0].tolist())
    with pytest.raises(NoSpace) as ei:
        v.write_many([3 * BS, 4 * BS], [b"x", b"y"])  # needs 2, only 1 free: nothing may change
    assert ei.value.errno == 28 and "no free data space" in str(ei.value)
    assert (v.read(0, 5 * BS), p.status().used_data_blocks, v.mappings()[0].tolist()) == before
    assert p.status().mode == "out-of-data-space"
    # the write that found no block raised the low water event (dm-thin's alloc_data_block checks
    # the mark before it finds no block: block by block, the failing allocation saw 0 free)
    assert fired == [1]
    v.write(0, b"in-place still works")  # provisioned, unshared: no allocation needed
    p.resize(8 * BS)
    assert p.status().mode == "write" and p.status().total_data_blocks == 8
    v.write_many([3 * BS, 4 * BS], [b"x", b"y"])
    assert fired == [1]  # 5 and 4 free before these allocations
    p.close()


def test_metadata_exhaustion_enters_out_of_metadata_space(tmp_path):
    p = Pool.create(tmp_path / "p", data_size="4GiB", metadata_size="256KiB")
    v = p.create_thin("v", "4GiB")
    with pytest.raises(ReadOnly, match="metadata"):
        for i in range(128):
            # one full leaf per commit (a dense leaf keeps a metadata page of its own; sparse ones share)
            v.write_many(np.arange(i * 512, (i + 1) * 512, dtype=np.int64) * BS, [b"x"] * 512)
            p.commit()
    assert p.status().mode == "out-of-metadata-space" and not p.status().needs_check
    v.write(0, b"y")  # provisioned and unshared: served
    with pytest.raises(ReadOnly):
        v.write(v.size - BS, b"y")  # needs a block (the last leaf is never reached)
    p.close()


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("bs", ["32K", "96K", "2G", 0, "abc", -65536])
def test_invalid_block_sizes(tmp_path, bs):
    with pytest.raises(InvalidArgument):
        Pool.create(tmp_path / "p", data_size="1GiB", block_size=bs)
    assert not (tmp_path / "p").exists()


def test_io_past_end_and_bad_names(pool):
    v = pool.create_thin("v", "1MiB")
    with pytest.raises(InvalidArgument, match="past the end"):
        v.write((1 << 20) - 1, b"ab")
    with pytest.raises(InvalidArgument, match="negative"):
        v.read(-1, 1)
    with pytest.raises(AlreadyExists):
        pool.create_thin("v", "1MiB")
    with pytest.raises(InvalidArgument, match="device id"):
        pool.create_thin("w", "1MiB", dev_id=1 << 24)
    with pytest.raises(NotFound, match="nope"):
        pool.snapshot("nope", "x")
    assert pool.status().used_data_blocks == 0 and len(pool.thins()) == 1


def test_second_process_is_locked_out(tmp_path):
    path = tmp_path / "p"
    p = Pool.create(path, data_size="8MiB")
    code = f"from thinpool import Pool\ntry:\n Pool.open({str(path)!r})\nexcept Exception as e: print(type(e).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.strip() == PoolLocked.__name__
    p.close()


# --------------------------------------------------------------------------- batch path and interop bridge

def test_write_many_equals_per_call_writes(tmp_path):
    rng = np.random.default_rng(5)
    offs = rng.integers(0, 4000, 300) * 1000
    bufs = rng.integers(0, 256, (300, 3000), dtype=np.uint8)
    a = Pool.create(tmp_path / "a", data_size="64MiB")
    b = Pool.create(tmp_path / "b", data_size="64MiB")
    va, vb = a.create_thin("v", "8MiB"), b.create_thin("v", "8MiB")
    va.write_many(offs, bufs)
    for o, buf in zip(offs, bufs):
        vb.write(int(o), buf.tobytes())
    assert va.read(0, 8 << 20) == vb.read(0, 8 << 20)
    got = va.read_many(offs, 3000)
    assert hashlib.sha256(got.tobytes()).digest() == hashlib.sha256(
        np.stack([np.frombuffer(vb.read(int(o), 3000), np.uint8) for o in offs]).tobytes()).digest()
    a.close()
    b.close()


def test_held_metadata_snapshot_is_a_consistent_view(pool):
    v = pool.create_thin("v", "1GiB")
    v.write(0, b"x" * BS)
    pool.reserve_metadata_snap()
    v.write(5 * BS, b"y")
    pool.commit()
    held = pool.to_metadata(held=True)
    live = pool.to_metadata()
    assert held.devices[0].mapped_blocks == 1 and live.devices[0].mapped_blocks == 2
    assert live.superblock.metadata_snap == pool.status().held_root is not None
    with pytest.raises(AlreadyExists):
        pool.reserve_metadata_snap()
    pool.release_metadata_snap()
    assert pool.status().held_root is None


def test_kernel_rule_reserve_metadata_snap_commits_even_when_one_is_held(pool):
    # process_reserve_metadata_snap_mesg: "(void) commit(pool);" then dm_pool_reserve_metadata_snap,
    # whose __reserve_metadata_snap commits again before it finds held_root set and returns -EBUSY:
    # the message fails, and what was written before it is committed (an abort keeps it)
    v = pool.create_thin("v", "1GiB")
    pool.reserve_metadata_snap()
    held = pool.status().held_root
    v.write(0, b"kept")
    with pytest.raises(AlreadyExists, match="already held"):
        pool.reserve_metadata_snap()
    pool.abort()
    assert pool.thin("v").read(0, 4) == b"kept" and pool.status().held_root == held
    pool.release_metadata_snap()


def test_from_metadata_roundtrip(pool, tmp_path):
    a = pool.create_thin("a", "1GiB")
    a.write_many(np.arange(0, 600, 3) * BS, np.full((200, 10), 3, np.uint8))
    pool.snapshot("a", "b").write(BS, b"q")
    md = pool.to_metadata()
    q = Pool.from_metadata(tmp_path / "copy", md)
    md2 = q.to_metadata()
    assert [d.dev_id for d in md2.devices] == [d.dev_id for d in md.devices]
    for d1, d2 in zip(md.devices, md2.devices):
        assert np.array_equal(d1.vblocks, d2.vblocks) and np.array_equal(d1.dblocks, d2.dblocks)
        assert np.array_equal(d1.times, d2.times) and d1.snap_time == d2.snap_time
    assert q.check().ok
    assert [u.exclusive_blocks for u in q.usage()] == [u.exclusive_blocks for u in pool.usage()]
    q.close()


def test_data_file_layout_is_a_dm_thin_data_device(pool):
    v = pool.create_thin("v", "1GiB")
    v.write(7 * BS, b"Z" * BS)
    (vb,), (db,), _ = v.mappings()
    with open(os.path.join(pool.path, "data"), "rb") as f:
        f.seek(int(db) * BS)
        assert f.read(BS) == b"Z" * BS


def test_pending_release_list_never_outlives_its_commit(tmp_path):
    """Regression: a commit that frees nothing must clear the persisted pending list, or a reopen
    would re-reserve (and later punch) a block that has since been reused."""
    path = tmp_path / "p"
    p = Pool.create(path, data_size=2 * BS)
    p.create_thin("a", 4 * BS).write(0, b"A" * BS)  # block 0
    p.commit()
    p.delete("a")
    p.commit()   # block 0 pending
    p.commit()   # block 0 released
    b = p.create_thin("b", 4 * BS)
    b.write(0, b"B" * (2 * BS))  # blocks 1 and 0
    assert sorted(b.mappings()[1].tolist()) == [0, 1]
    p.commit()   # frees nothing
    p.close()
    p = Pool.open(path)
    p.commit()
    p.commit()
    assert p.thin("b").read(0, 2 * BS) == b"B" * (2 * BS)
    assert p.check().ok
    p.close()


# --------------------------------------------------------------------------- the pread read path

def test_pread_path_reads_exactly_what_read_reads(tmp_path):
    """Thin.pread (pread(2) per mapped segment, the NBD read path) returns the same bytes as Thin.read
    (the memory map) for random ranges over mapped, unmapped and snapshot-shared blocks."""
    rng = np.random.default_rng(7)
    size = 4 * 1024 * 1024
    with Pool.create(tmp_path / "pool", data_size="32MiB") as p:
        v = p.create_thin("v", size)
        for i in range(30):
            off = int(rng.integers(0, size - 3 * BS))
            v.write(off, rand(int(rng.integers(1, 3 * BS)), seed=i))
        s = p.snapshot("v", "s")
        for i in range(10):  # break sharing for some blocks, keep others shared
            v.write(int(rng.integers(0, size - BS)), rand(int(rng.integers(1, BS)), seed=100 + i))
        checked = 0
        for t in (v, s):
            for n in (0, 1, 4096, BS, BS + 1, 3 * BS + 17, size):
                off = int(rng.integers(0, size - n + 1))
                assert t.pread(off, n) == t.read(off, n), (t.name, off, n)
            for _ in range(300):
                off = int(rng.integers(0, size))
                n = int(rng.integers(0, min(3 * BS, size - off) + 1))
                got = t.pread(off, n)
                assert len(got) == n and got == t.read(off, n), (t.name, off, n)
                checked += 1
        assert p.status().used_data_blocks > 0 and checked == 600
        with pytest.raises(InvalidArgument):
            v.pread(size - 1, 2)


def test_pread_path_failures_raise_hostioerror_not_sigbus(tmp_path):
    """A data file that fails pread (a directory fd: EISDIR) or ends before a mapped block (truncated)
    gives HostIOError naming the data file; unmapped ranges never touch the file."""
    import errno as _errno

    from thinpool.errors import HostIOError
    with Pool.create(tmp_path / "pool", data_size="16MiB") as p:
        v = p.create_thin("v", "1MiB")
        v.write(0, b"\x07" * BS)
        data_path = p.data.path
        good_fd = p.data.fd
        bad_fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            p.data.fd = bad_fd  # a real pread(2) that fails, no memory map involved
            with pytest.raises(HostIOError) as ei:
                v.pread(100, 10)
            assert ei.value.errno == _errno.EISDIR and ei.value.filename == data_path
            assert data_path in str(ei.value)
            assert v.pread(2 * BS, 10) == bytes(10)  # unmapped: zeroes, no pread
        finally:
            p.data.fd = good_fd
            os.close(bad_fd)
        assert v.pread(100, 10) == b"\x07" * 10
        os.truncate(data_path, 0)
        with pytest.raises(HostIOError) as ei:
            v.pread(100, 10)
        assert ei.value.errno == _errno.EIO and "truncated" in str(ei.value)
        os.truncate(data_path, 16 * 1024 * 1024)
        p.close(commit=False)
