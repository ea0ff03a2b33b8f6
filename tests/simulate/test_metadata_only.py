"""Metadata-only pools and mixed I/O batches (thin.apply_io): the engine half of trace replay.

A metadata-only pool runs the same kernels over the same metadata without a data file; a replay in
either mode must leave byte-identical metadata (``thinpool dump``) and the same counters.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from thinpool import Pool, nodestore
from thinpool.errors import InvalidArgument, NoSpace, ReadOnly, ReadOnlyIO
from thinpool.thin import apply_io

BS = 64 << 10
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dump(path: str) -> str:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "thinpool", "dump", path], check=True, capture_output=True,
                          text=True, env=env).stdout


def _mixed(rng: np.random.Generator, n: int, vsize: int, nvol: int):
    ops = rng.choice(np.array([0, 1, 1, 1, 2], np.uint8), n)
    lengths = rng.choice(np.array([512, 4096, 65536, 200_000]), n).astype(np.int64)
    offsets = rng.integers(0, vsize - 200_000, n) // 512 * 512
    vol = rng.integers(0, nvol, n)
    return vol, ops, offsets, lengths


def _drive(path: str, metadata_only: bool) -> dict:
    rng = np.random.default_rng(7)
    with Pool.create(path, data_size="64MiB", metadata_only=metadata_only) as pool:
        vols = [pool.create_thin(f"v{i}", "16MiB") for i in range(3)]
        for step in range(4):
            apply_io(vols, *_mixed(rng, 400, 16 << 20, 3), pattern=np.full(200_000, step + 1, np.uint8))
            pool.snapshot("v0", f"s{step}")
            if step == 2:
                pool.delete("s0")
        counters = pool.io_counters()
        used = pool.status().used_data_blocks
    return dict(counters, used=used)


def test_kernel_rule_metadata_only_pool_same_metadata_and_counters_as_data_mode(tmp_path):
    data = _drive(str(tmp_path / "data"), False)
    meta = _drive(str(tmp_path / "meta"), True)
    assert data == meta and data["provisioned_blocks"] > 0 and data["cow_breaks"] > 0
    assert _dump(str(tmp_path / "data")) == _dump(str(tmp_path / "meta"))
    assert not os.path.exists(tmp_path / "meta" / "data")
    with Pool.open(str(tmp_path / "meta")) as pool:  # the mode is in the header: a reopen keeps it
        assert pool.metadata_only and pool.data.fd == -1
        v = pool.thin("v0")
        assert v.mapped_blocks > 0
        assert v.read(0, 1 << 20) == bytes(1 << 20)  # mapped or not, no bytes: zeroes
        assert v.pread(0, 4096) == bytes(4096)
    with Pool.open(str(tmp_path / "data")) as pool:
        assert not pool.metadata_only


def test_metadata_only_create_refuses_a_data_file(tmp_path):
    with pytest.raises(InvalidArgument, match="data file"):
        Pool.create(str(tmp_path / "p"), metadata_only=True, data_file=str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "p") or not os.listdir(tmp_path / "p")


@pytest.mark.parametrize("metadata_only", [False, True])
def test_kernel_rule_batch_applies_ios_in_order_like_single_calls(tmp_path, metadata_only):
    """apply_io (one kernel call) == the same I/Os through Thin.write / Thin.discard one by one."""
    rng = np.random.default_rng(3)
    batch = _mixed(rng, 120, 8 << 20, 2)
    for name in ("batch", "single"):
        with Pool.create(str(tmp_path / name), data_size="32MiB", metadata_only=metadata_only) as pool:
            vols = [pool.create_thin(f"v{i}", "8MiB") for i in range(2)]
            pool.snapshot("v1", "s")
            if name == "batch":
                apply_io(vols, *batch)
            else:
                for v, op, off, ln in zip(*batch):
                    if op == 1:
                        vols[v].write(int(off), bytes(int(ln)))
                    elif op == 2:
                        vols[v].discard(int(off), int(ln))
    assert _dump(str(tmp_path / "batch")) == _dump(str(tmp_path / "single"))


def test_kernel_rule_cow_breaks_and_first_writes_counted_per_block(tmp_path):
    """First writes to unmapped blocks provision; after a snapshot the first write to each block mapped
    before it breaks sharing once (dm-thin's time rule), later writes go in place."""
    rng = np.random.default_rng(5)
    nblocks = 256
    a = rng.integers(0, nblocks * 16, 3000) * 4096          # 4 KiB writes: partial blocks
    b = rng.integers(0, nblocks * 16, 3000) * 4096
    with Pool.create(str(tmp_path / "p"), data_size="64MiB", metadata_only=True) as pool:
        v = pool.create_thin("v", nblocks * BS)
        z = np.zeros(len(a), np.int64)
        ones = np.ones(len(a), np.uint8)
        apply_io([v], z, ones, a, np.full(len(a), 4096))
        pool.snapshot("v", "snap")
        apply_io([v], z, ones, b, np.full(len(b), 4096))
        c = pool.io_counters()
    blocks_a, blocks_b = set((a // BS).tolist()), set((b // BS).tolist())
    assert c["provisioned_blocks"] == len(blocks_a | blocks_b)
    assert c["cow_breaks"] == len(blocks_a & blocks_b)
    assert c["cow_bytes_copied"] == len(blocks_a & blocks_b) * BS      # every break was a partial write
    assert c["zeroed_bytes"] == len(blocks_a | blocks_b) * BS          # zero_new_blocks: partial first writes


def test_batch_no_space_skip_fails_only_the_writes_that_need_a_block(tmp_path):
    with Pool.create(str(tmp_path / "p"), data_size=16 * BS, metadata_only=True) as pool:
        v = pool.create_thin("v", 64 * BS)
        offs = np.arange(32, dtype=np.int64) * BS
        n = len(offs)
        out = apply_io([v], np.zeros(n, np.int64), np.ones(n, np.uint8), offs, np.full(n, BS), on_no_space="skip")
        assert out[:3] == (16, 16 * BS, 16) and out.refused_writes == 0 and v.mapped_blocks == 16 and pool.mode == "out-of-data-space"
        # overwrites of mapped blocks still succeed; the raising policy stops at the first failing write
        assert apply_io([v], np.zeros(2, np.int64), np.ones(2, np.uint8), offs[:2], np.full(2, BS)).failed_writes == 0
        with pytest.raises(NoSpace):
            apply_io([v], np.zeros(2, np.int64), np.ones(2, np.uint8), offs[-2:], np.full(2, BS))


def test_batch_bad_input_changes_nothing(tmp_path):
    with Pool.create(str(tmp_path / "p"), data_size="4MiB") as pool:
        v = pool.create_thin("v", "1MiB")
        r = pool.snapshot("v", "r", read_only=True)
        one = (np.zeros(1, np.int64), np.ones(1, np.uint8), np.zeros(1, np.int64), np.full(1, 4096))
        with pytest.raises(InvalidArgument, match="past the end"):
            apply_io([v], one[0], one[1], np.array([1 << 20]), one[3])
        with pytest.raises(InvalidArgument, match="op code"):
            apply_io([v], one[0], np.array([7], np.uint8), one[2], one[3])
        with pytest.raises(ReadOnly):
            apply_io([v, r], np.array([0, 1]), np.ones(2, np.uint8), np.zeros(2, np.int64), np.full(2, 4096))
        assert v.mapped_blocks == 0 and pool.io_counters()["provisioned_blocks"] == 0


# --------------------------------------------------------------------------- read-only modes, batch vs per call
def _read_only_pool(path) -> Pool:
    """A pool in read-only mode (needs_check set in the imported metadata): v maps blocks 0-2, 1 and 2
    shared with the snapshot s, block 0 v's own."""
    from thinpool.pool_ir import NEEDS_CHECK_FLAG
    src = Pool.create(path / "src", data_size=64 * BS)
    v = src.create_thin("v", "1MiB")
    v.write(0, b"a" * (3 * BS))
    src.snapshot("v", "s")
    v.write(0, b"b" * BS)
    md = src.to_metadata()
    src.close()
    md.superblock.flags |= NEEDS_CHECK_FLAG
    return Pool.from_metadata(path / "p", md, names={1: "v", 2: "s"}, data_file=path / "src" / "data",
                              take_over_data=True)


#: (op, offset, length): a rewrite of v's own block, a sharing break, an unmapped block, a discard of
#: mapped blocks, a read, another rewrite
RO_IOS = [(1, 100, 6), (1, BS + 5, 6), (1, 10 * BS, 6), (2, 0, 3 * BS), (0, 0, 4096), (1, 200, 2)]


def test_kernel_rule_read_only_batch_serves_provisioned_unshared_writes_like_single_calls(tmp_path):
    # dm-thin's process_bio_read_only, per bio: a write to a mapped, unshared block is served, one that
    # needs a block (unmapped, or a sharing break) fails with EIO, a discard succeeds unmapping nothing
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    single, batch = _read_only_pool(tmp_path / "a"), _read_only_pool(tmp_path / "b")
    assert single.mode == batch.mode == "read-only"
    failed = 0
    v = single.thin("v")
    for op, off, ln in RO_IOS:
        if op == 1:
            try:
                v.write(off, b"w" * ln)
            except ReadOnlyIO:
                failed += 1
        elif op == 2:
            assert v.discard(off, ln) == 0
        else:
            v.read(off, ln)
    ops, offs, lens = (np.array(c) for c in zip(*RO_IOS))
    w = batch.thin("v")
    out = apply_io([w], np.zeros(len(ops), np.int64), ops.astype(np.uint8), offs, lens,
                   pattern=np.frombuffer(b"w" * 6, np.uint8), on_no_space="skip")
    assert failed == out.refused_writes == 2 and out.refused_bytes == 12 and out.failed_writes == 0
    for p, vol in ((single, v), (batch, w)):
        assert vol.mapped_blocks == 3 and vol.read(100, 6) == b"wwwwww" and vol.read(200, 2) == b"ww"
        assert vol.read(BS + 5, 6) == b"aaaaaa" and p.mode == "read-only"
    assert single.io_counters() == batch.io_counters()
    # the raising policy: ReadOnlyIO (EIO) at the first write that needs a block, the I/Os before it done
    with pytest.raises(ReadOnlyIO, match="I/O 1 of the batch") as ei:
        apply_io([w], np.zeros(2, np.int64), np.ones(2, np.uint8), np.array([300, 20 * BS]), np.full(2, 3),
                 pattern=np.frombuffer(b"xyz", np.uint8))
    assert ei.value.errno == 5 and w.read(300, 3) == b"xyz" and w.mapped_blocks == 3
    single.close()
    batch.close()


PER_LEAF = nodestore.DENSE + 1  # mappings that make a leaf dense: a metadata page of its own


def test_kernel_rule_metadata_running_out_mid_batch_enters_out_of_metadata_space_like_single_calls(tmp_path):
    # dm-thin checks metadata space at each allocation (commit before using the reserve, then
    # out-of-metadata-space): a batch reaches the mode at the same write as single calls, then serves
    # rewrites of provisioned blocks and fails (EIO) the writes that need a block
    leaves = 300
    offs = ((np.arange(leaves)[:, None] * 512 + np.arange(PER_LEAF)[None, :]) * BS).reshape(-1)
    offs = np.concatenate([offs, offs[:50]])  # then rewrites of the first (provisioned) blocks
    n = len(offs)
    pools = [Pool.create(tmp_path / name, data_size="8GiB", metadata_size="512KiB", metadata_only=True,
                         error_if_no_space=True) for name in ("single", "batch")]
    vs = [p.create_thin("v", "32GiB") for p in pools]
    failed = 0
    for off in offs.tolist():
        try:
            vs[0].write(off, b"x")
        except ReadOnlyIO:
            failed += 1
    out = apply_io([vs[1]], np.zeros(n, np.int64), np.ones(n, np.uint8), offs, np.ones(n, np.int64),
                   on_no_space="skip")
    assert pools[0].mode == pools[1].mode == "out-of-metadata-space"
    assert failed == out.refused_writes > 0 and out.refused_bytes == failed
    assert vs[0].mapped_blocks == vs[1].mapped_blocks == n - 50 - failed
    assert pools[0].io_counters() == pools[1].io_counters()
    for p in pools:
        p.close()


def _replay_counting_flushes(path: str, flush: bool, metadata_only: bool, monkeypatch) -> tuple[dict, int]:
    """A replay with snapshots (keep 2: deletes too) and flushes into a fresh pool; returns its result
    and how many fdatasync calls reached the metadata and data files from the open pool."""
    from thinpool import datadev, mdstore
    from thinpool.simulate import ArrayTrace, replay
    calls = []
    monkeypatch.setattr(mdstore.FileIO, "fdatasync", staticmethod(lambda fd: calls.append(fd)))
    monkeypatch.setattr(datadev.DataDevice.io.__class__, "fdatasync", staticmethod(lambda fd: calls.append(fd)))
    rng = np.random.default_rng(5)
    n = 6000
    ops = rng.choice(np.array([1, 1, 1, 0, 2, 3], np.uint8), n)  # writes, reads, discards, flushes
    tr = ArrayTrace(ops, rng.integers(0, 2048, n) * 4096, np.full(n, 4096))
    with Pool.create(path, data_size="64MiB", metadata_only=metadata_only, flush=flush) as pool:
        assert pool.flush is flush
        del calls[:]  # the new pool's first commit (made by create, before the pool is open) is flushed
        pool.create_thin("v", "8MiB")
        r = replay(pool, "v", tr, snapshot_every=500, keep=2, sample_every=1000)
    flushes = len(calls)
    with Pool.open(path) as pool:  # what was committed without flushes reopens like the rest
        assert pool.flush and len(pool.thins()) == 3
    return r.to_dict(), flushes


@pytest.mark.parametrize("metadata_only", [True, False])
def test_scratch_pool_without_flushes_commits_the_same_metadata_and_counters(tmp_path, monkeypatch, metadata_only):
    """flush=False (a scratch pool, thinpool's option; dm-thin always flushes) skips every fdatasync but
    makes the same commits: the replay's counters and series and the final dump are identical."""
    kept, flushes = _replay_counting_flushes(str(tmp_path / "f"), True, metadata_only, monkeypatch)
    scratch, none = _replay_counting_flushes(str(tmp_path / "s"), False, metadata_only, monkeypatch)
    assert flushes > 20 and none == 0
    assert kept == scratch and kept["snapshots_deleted"] == 10 and kept["flushes"] > 0
    assert _dump(str(tmp_path / "f")) == _dump(str(tmp_path / "s"))


def test_kernel_rule_every_pool_message_commits_in_a_replay_with_snapshots(tmp_path, monkeypatch):
    """A scheduled snapshot and the delete of the oldest kept one are two pool messages: each commits
    (dm-thin's pool_message), so one commit holds the new snapshot beside all the kept ones (the state
    after create_snap) and the next one the state after the delete."""
    from thinpool.pool import Pool as P
    from thinpool.simulate import ArrayTrace, replay
    committed: list[list[str]] = []
    real = P.commit

    def commit(self):
        real(self)
        committed.append(sorted(self.catalog["volumes"]))
    monkeypatch.setattr(P, "commit", commit)
    n = 2000
    tr = ArrayTrace(np.ones(n, np.uint8), np.arange(n) % 300 * 4096, np.full(n, 4096))
    with Pool.create(str(tmp_path / "p"), data_size="64MiB", metadata_only=True) as pool:
        pool.create_thin("v", "8MiB")
        r = replay(pool, "v", tr, snapshot_every=500, keep=2)
    assert r["snapshots_taken"] == 4 and r["snapshots_deleted"] == 2
    i = committed.index(["v", "v@1", "v@2", "v@3"])      # after the third snapshot's create_snap ...
    assert committed[i + 1] == ["v", "v@2", "v@3"]      # ... and after the delete of v@1
    assert ["v", "v@2", "v@3", "v@4"] in committed
