"""Trace replay (thinpool/simulate/replayer.py, replay_volume.py, replay_sources.py, schedule.py) and
`thinpool replay`: counters checked against an independent computation from the trace itself, data
mode vs metadata-only, schedules, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from thinpool import Pool
from thinpool.errors import InvalidArgument
from thinpool.simulate import ArrayTrace, replay
from thinpool.simulate.results import COUNTERS, SERIES_COLUMNS
from tests.support import require_module, require_tool

BS = 64 << 10
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "thinpool", *args], capture_output=True, text=True, env=env,
                          check=check, timeout=300)


def fio_iolog(tmp, name: str, *extra: str) -> str:
    """A real trace: fio's own --write_iolog of a small random job."""
    require_tool("fio")
    log = str(tmp / f"{name}.iolog")
    subprocess.run(["fio", f"--name={name}", f"--filename={tmp / (name + '.img')}", "--size=32M", "--bs=4k",
                    "--ioengine=psync", "--io_size=6M", "--randseed=7", f"--write_iolog={log}", *extra],
                   check=True, capture_output=True, timeout=120)
    return log


def iolog_records(path: str) -> list[tuple[str, int, int]]:
    """(action, offset, length) of every I/O record, by plain line splitting (independent of traces.py)."""
    out = []
    with open(path) as f:
        for line in f.read().splitlines()[1:]:
            parts = line.split()
            if len(parts) == 5 and parts[2] in ("read", "write", "trim"):
                out.append((parts[2], int(parts[3]), int(parts[4])))
            elif len(parts) >= 3 and parts[2] in ("sync", "datasync"):
                out.append(("flush", 0, 0))
    return out


def expected_blocks(records, every: int) -> tuple[int, int]:
    """Independent count: (first writes to unmapped blocks, CoW breaks) with a snapshot after every
    ``every`` records -- dm-thin's time rule: the first write after a snapshot to a block mapped before
    it breaks sharing (whether or not the snapshot still exists); later writes go in place."""
    mapped: set[int] = set()
    fresh: set[int] = set()     # written since the last snapshot (exclusive again)
    provisioned = breaks = 0
    for i, (op, off, ln) in enumerate(records, start=1):
        if op == "write":
            for b in range(off // BS, (off + ln - 1) // BS + 1):
                if b not in mapped:
                    provisioned += 1
                    mapped.add(b)
                    fresh.add(b)
                elif b not in fresh:
                    breaks += 1
                    fresh.add(b)
        if every and i % every == 0:
            fresh = set()
    return provisioned, breaks


def test_kernel_rule_replay_counts_first_writes_and_cow_breaks_after_each_snapshot(tmp_path):
    log = fio_iolog(tmp_path, "rw", "--rw=randrw", "--rwmixread=30")
    recs = iolog_records(log)
    every = 300
    with Pool.create(str(tmp_path / "p"), data_size="256MiB", metadata_only=True) as pool:
        pool.create_thin("vol", "32MiB")
        r = replay(pool, "vol", log, snapshot_every=every, keep=2)
    prov, breaks = expected_blocks(recs, every)
    c = r.counters
    assert set(COUNTERS) <= set(c)
    assert c["ios"] == len(recs)
    assert c["reads"] == sum(op == "read" for op, _, _ in recs)
    assert c["writes"] == sum(op == "write" for op, _, _ in recs)
    assert c["bytes_written"] == sum(ln for op, _, ln in recs if op == "write")
    assert c["bytes_read"] == sum(ln for op, _, ln in recs if op == "read")
    assert (c["provisioned_blocks"], c["cow_breaks"]) == (prov, breaks) and breaks > 0
    assert c["snapshots_taken"] == len(recs) // every and c["snapshots_deleted"] == c["snapshots_taken"] - 2
    # 4 KiB writes into 64 KiB blocks: every break copies a whole block, every first write zeroes one
    assert c["cow_bytes_copied"] == breaks * BS and c["zeroed_bytes"] == prov * BS
    assert c["data_bytes_written"] == c["bytes_written"] + (breaks + prov) * BS
    assert c["write_amplification"] == pytest.approx(c["data_bytes_written"] / c["bytes_written"])
    # the volume maps every block written; the two kept snapshots are what's left besides it
    assert r.volumes["vol"]["mapped_blocks"] == len({b for op, off, ln in recs if op == "write"
                                                     for b in range(off // BS, (off + ln - 1) // BS + 1)})
    assert set(r.volumes) == {"vol", f"vol@{c['snapshots_taken'] - 1}", f"vol@{c['snapshots_taken']}"}
    assert c["peak_data_blocks_used"] >= c["data_blocks_used"] > 0
    s = r.series
    assert list(s) == list(SERIES_COLUMNS) and s["io"][0] == 0 and s["io"][-1] == len(recs)
    assert s["cow_breaks"][-1] == breaks and all(np.diff(s["cow_breaks"]) >= 0)


def test_kernel_rule_replay_data_mode_and_metadata_only_same_dump_and_counters(tmp_path):
    log = fio_iolog(tmp_path, "mix", "--rw=randrw", "--rwmixread=20", "--fsync=16")
    outs = {}
    for mode in ("data", "meta"):
        args = ["replay", log, "--data-size", "256M", "--volume-size", "32M", "--snapshot-every", "200",
                "--keep", "3", "--pool", str(tmp_path / mode), "--json", str(tmp_path / f"{mode}.json")]
        cli(*args, *(["--metadata-only"] if mode == "meta" else []))
        outs[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    assert os.path.exists(tmp_path / "data" / "data") and not os.path.exists(tmp_path / "meta" / "data")
    assert outs["data"]["flushes"] > 0 and outs["data"]["cow_breaks"] > 0
    strip = ("params",)
    assert {k: v for k, v in outs["data"].items() if k not in strip} == \
        {k: v for k, v in outs["meta"].items() if k not in strip}
    assert cli("dump", str(tmp_path / "data")).stdout == cli("dump", str(tmp_path / "meta")).stdout


def test_replay_offset_past_volume_names_file_and_line_or_wraps(tmp_path):
    log = fio_iolog(tmp_path, "w", "--rw=randwrite")
    recs = iolog_records(log)
    lines = open(log).read().splitlines()
    limit = 8 << 20
    first = next(i for i, (_, off, ln) in enumerate(recs) if off + ln > limit)
    want_line = [n for n, t in enumerate(lines, start=1) if len(t.split()) == 5][first]
    p = cli("replay", log, "--metadata-only", "--volume-size", "8M", check=False)
    assert p.returncode == 1
    assert f"{log}:{want_line}:" in p.stderr and "past the end" in p.stderr and "--wrap" in p.stderr
    p = cli("replay", log, "--metadata-only", "--volume-size", "8M", "--wrap", "--json", "-")
    d = json.loads(p.stdout)
    assert d["writes"] == len(recs) and d["data_blocks_used"] <= limit // BS


def test_replay_snapshots_every_t_seconds_of_trace_time(tmp_path):
    n = 1000
    t = np.linspace(0.0, 99.9, n)
    tr = ArrayTrace(np.ones(n, np.uint8), (np.arange(n) % 64) * BS, np.full(n, 4096), t)
    with Pool.create(str(tmp_path / "p"), data_size="64MiB", metadata_only=True) as pool:
        pool.create_thin("v", "4MiB")
        r = replay(pool, "v", tr, snapshot_every="10s", sample_every="5s")
    assert r["snapshots_taken"] == 9           # at 10, 20, ..., 90 s (the trace ends at 99.9 s)
    # 64 blocks written cyclically, 100 s: every 10 s snapshot makes the next 64 writes break sharing
    assert r["provisioned_blocks"] == 64 and r["cow_breaks"] == 9 * 64
    assert r.series["time"][1] < 5.0 <= r.series["time"][2] and len(r.series["io"]) == 21


def test_replay_no_space_fails_writes_alone_and_counts_events(tmp_path):
    n = 64
    tr = ArrayTrace(np.ones(n, np.uint8), np.arange(n) * BS, np.full(n, BS))
    with Pool.create(str(tmp_path / "p"), data_size=16 * BS, metadata_only=True, low_water_mark=4,
                     error_if_no_space=True) as pool:
        pool.create_thin("v", n * BS)
        r = replay(pool, "v", tr, sample_every=8)
    assert r["enospc_events"] == n - 16 and r["data_blocks_used"] == 16
    # the series counts them where they happened, also inside one chunk
    assert r.series["enospc_events"] == [max(0, io - 16) for io in r.series["io"]]
    assert r["mode_changes"] == 1 and r["low_water_events"] == 1
    assert r["data_bytes_written"] == 16 * BS  # only the writes that got a block wrote anything


def test_replay_results_as_tables(tmp_path):
    pd = require_module("pandas")
    pa = require_module("pyarrow")
    import pyarrow.parquet as pq
    n = 5000
    rng = np.random.default_rng(1)
    tr = ArrayTrace(rng.choice(np.array([0, 1, 2, 3], np.uint8), n), rng.integers(0, 256, n) * 4096,
                    np.full(n, 4096))
    with Pool.create(str(tmp_path / "p"), data_size="64MiB", metadata_only=True) as pool:
        pool.create_thin("v", "1MiB")
        r = replay(pool, "v", tr, sample_every=1000)
    df = r.to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df["io"]) == [0, 1000, 2000, 3000, 4000, 5000]
    assert isinstance(r.to_arrow(), pa.Table)
    r.write_series(tmp_path / "s.parquet")
    r.write_series(tmp_path / "s.csv")
    assert pq.read_table(tmp_path / "s.parquet").column("flushes").to_pylist() == list(df["flushes"])
    assert open(tmp_path / "s.csv").readline().strip().split(",") == list(SERIES_COLUMNS)
    from thinpool.simulate.results import Result
    assert Result.from_dict(json.loads(r.to_json())).counters == r.counters


def test_replay_html_report_is_self_contained(tmp_path):
    require_module("matplotlib")
    log = fio_iolog(tmp_path, "h", "--rw=randwrite")
    cli("replay", log, "--metadata-only", "--snapshot-every", "500", "--html", str(tmp_path / "r.html"),
        "--plot", str(tmp_path / "r.png"))
    text = (tmp_path / "r.html").read_text()
    assert text.count("data:image/png;base64,") == 1 and "http" not in text.replace("http-equiv", "")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_bad_arguments_rejected(tmp_path):
    tr = ArrayTrace(np.ones(1, np.uint8), [0], [4096])
    with Pool.create(str(tmp_path / "p"), data_size="4MiB", metadata_only=True) as pool:
        pool.create_thin("v", "1MiB")
        for kw, msg in ((dict(snapshot_every="0"), "at least 1"), (dict(snapshot_every="x"), "seconds"),
                        (dict(keep=2), "snapshot schedule"), (dict(keep=-1), "non-negative")):
            with pytest.raises(InvalidArgument, match=msg):
                replay(pool, "v", tr, **kw)
        assert pool.thin("v").mapped_blocks == 0


def test_replay_twice_into_one_volume_names_new_snapshots(tmp_path):
    n = 100
    tr = ArrayTrace(np.ones(n, np.uint8), (np.arange(n) % 8) * BS, np.full(n, 4096))
    with Pool.create(str(tmp_path / "p"), data_size="16MiB", metadata_only=True) as pool:
        pool.create_thin("v", "1MiB")
        a = replay(pool, "v", tr, snapshot_every=50)
        b = replay(pool, "v", tr, snapshot_every=50)
        assert set(a.volumes) == {"v", "v@1", "v@2"} and set(b.volumes) == {"v", "v@3", "v@4"}
        assert b["provisioned_blocks"] == 0 and b["cow_breaks"] == 16  # counters are per replay


def _queue_trace() -> ArrayTrace:
    """A full pool of 16 blocks, then: 4 writes to new blocks (t=1), a discard of 4 blocks (t=10), a
    write to a new block (t=11), one more (t=80, past a 60 s timeout), a discard and a flush (t=90,
    91), a last new block (t=92).  (op, block, blocks, time) rows; whole-block writes."""
    rows = [(1, b, 1, 0.0) for b in range(16)] + [(1, b, 1, 1.0) for b in range(16, 20)] + \
        [(2, 0, 4, 10.0), (1, 30, 1, 11.0), (1, 31, 1, 80.0), (2, 4, 1, 90.0), (3, 0, 0, 91.0), (1, 32, 1, 92.0)]
    op, blk, nb, t = (np.array(c) for c in zip(*rows))
    return ArrayTrace(op.astype(np.uint8), blk * BS, nb * BS, t.astype(np.float64))


@pytest.mark.parametrize("error_if_no_space", [False, True])
def test_kernel_rule_queue_if_no_space_holds_writes_for_the_timeout_in_trace_time(tmp_path, error_if_no_space):
    # dm-thin's queue_if_no_space: a write that finds no data block waits (retry_on_resume) until a
    # commit finds free blocks (check_for_data_space -> write mode, requeue_bios: the waiting writes
    # go right after the write whose allocation committed), and fails with ENOSPC no_space_timeout
    # after the pool entered out-of-data-space (do_no_space_timeout), as do writes after that until
    # the pool leaves the mode.  error_if_no_space fails each such write at once.
    with Pool.create(str(tmp_path / "p"), data_size=16 * BS, metadata_only=True, no_space_timeout=60,
                     error_if_no_space=error_if_no_space) as pool:
        v = pool.create_thin("v", 64 * BS)
        r = replay(pool, "v", _queue_trace(), sample_every="5s")
        mapped = set(v.mappings()[0].tolist())  # virtual blocks mapped at the end
    if error_if_no_space:
        # t=1: 4 fail; t=11 and t=80 find the 4 discarded blocks (after a commit)
        assert (r["enospc_events"], r["queued_writes"]) == (4, 0)
        assert mapped == set(range(5, 16)) | {30, 31, 32}
    else:
        # t=1: 4 wait; t=11: the write commits (the discarded blocks become allocatable), takes one, and
        # the waiting writes take the other 3 -- block 19 waits again, from t=11; the timeout passes at
        # 71, so block 19's write fails then, and the write at t=80 at once (the pool never left the mode)
        assert (r["enospc_events"], r["queued_writes"]) == (2, 4)
        assert mapped == set(range(5, 16)) | {16, 17, 18, 30, 32}
        s = r.series
        at = {round(t): (q, e) for t, q, e in zip(s["time"], s["queued_writes"], s["enospc_events"])}
        assert at[11] == (4, 0) and at[92] == (4, 2)
    assert r["data_blocks_used"] == len(mapped) and r["eio_events"] == 0
    # payload of the writes that succeeded: the first 16 (0-3 and 4 discarded later) and the later ones mapped
    assert r["data_bytes_written"] == (16 + len(mapped - set(range(16)))) * BS
    assert r["mode_changes"] >= 2 and pool.mode == "write"



def test_kernel_rule_replay_goes_on_out_of_metadata_space_serving_provisioned_blocks(tmp_path):
    # dm-thin out of metadata space: writes to provisioned, unshared blocks are served, writes that
    # need a block fail with EIO, pool messages (a scheduled snapshot) are refused; the replay goes on
    from thinpool import nodestore
    per_leaf = nodestore.DENSE + 1  # mappings that make a leaf dense (a metadata page of its own)
    firsts = ((np.arange(300)[:, None] * 512 + np.arange(per_leaf)[None, :]) * BS).reshape(-1)
    offs = np.concatenate([firsts, firsts[:50]])  # then rewrites of the first blocks
    n = len(offs)
    tr = ArrayTrace(np.ones(n, np.uint8), offs, np.full(n, 4096))
    with Pool.create(str(tmp_path / "p"), data_size="8GiB", metadata_size="512KiB", metadata_only=True,
                     error_if_no_space=True) as pool:
        v = pool.create_thin("v", "32GiB")
        r = replay(pool, "v", tr, snapshot_every=n - 10)
        assert pool.mode == "out-of-metadata-space"
        mapped = v.mapped_blocks
    assert 0 < mapped < len(firsts) and r["eio_events"] == len(firsts) - mapped
    assert r["provisioned_blocks"] == mapped and r["enospc_events"] == 0
    assert (r["snapshots_taken"], r["snapshots_failed"]) == (0, 1)
    assert r["mode_changes"] == 1 and r.series["eio_events"][-1] == r["eio_events"]


def test_kernel_rule_metadata_only_fast_paths_same_dump_counters_and_series_as_data_mode(tmp_path):
    # the batch kernel decides one-block rewrites and first writes of a metadata-only pool without the
    # general write path: the same rules, so the same metadata (thinpool dump), counters and series
    # (metadata blocks included: the node store grows at the same I/O) as a pool with a data file --
    # over many leaves, several node-store growths, snapshots (shared leaves), discards and flushes
    rng = np.random.default_rng(5)
    n = 40_000
    op = rng.choice(np.array([0, 1, 1, 1, 1, 1, 1, 2, 3], np.uint8), n)
    length = rng.choice(np.array([512, 4096, BS]), n).astype(np.int64)
    offset = rng.integers(0, (4 << 30) // BS, n) * BS + rng.choice(np.array([0, 4096, 8192]), n)
    offset[length == BS] -= offset[length == BS] % BS
    length[op == 2] = 3 * BS
    offset[op == 2] -= offset[op == 2] % BS
    offset[op == 3], length[op == 3] = 0, 0
    results, dumps = {}, {}
    for mode in ("data", "meta"):
        path = str(tmp_path / mode)
        with Pool.create(path, data_size="8GiB", metadata_only=mode == "meta", error_if_no_space=True) as pool:
            pool.create_thin("v", "4GiB")
            r = replay(pool, "v", ArrayTrace(op, offset, length), snapshot_every=7_000, keep=2, sample_every=1_000)
        results[mode] = r.to_dict()
        results[mode].pop("params")
        dumps[mode] = cli("dump", path).stdout
    assert results["data"] == results["meta"] and dumps["data"] == dumps["meta"]
    c = results["meta"]
    assert c["provisioned_blocks"] > 10_000 and c["cow_breaks"] > 1_000 and c["snapshots_deleted"] > 0


def test_kernel_rule_cow_break_frees_the_old_block_at_once_so_the_peak_never_counts_both(tmp_path):
    # dm-thin's break of sharing remaps the block and drops the old block's reference in the same step:
    # a block only the volume still mapped (its snapshot deleted, the mapping older than the snapshot)
    # is free again after each write, so the peak of data blocks in use, sampled after every write,
    # stays at the volume's size; with the snapshot kept, every distinct block broken adds exactly one
    nblocks = 1024
    rng = np.random.default_rng(9)
    first = np.arange(nblocks) * BS                                       # one full write per block
    again = rng.permutation(nblocks) * BS + rng.integers(0, 16, nblocks) * 4096  # 4 KiB into each block
    some = rng.integers(0, nblocks // 2, 3000) * BS + rng.integers(0, 16, 3000) * 4096
    with Pool.create(str(tmp_path / "p"), data_size=4 * nblocks * BS, metadata_only=True) as pool:
        pool.create_thin("v", nblocks * BS)
        r = replay(pool, "v", ArrayTrace(np.ones(nblocks, np.uint8), first, np.full(nblocks, BS)))
        assert (r.counters["provisioned_blocks"], r.counters["peak_data_blocks_used"]) == (nblocks, nblocks)
        pool.snapshot("v", "s")
        pool.delete("s")
        r = replay(pool, "v", ArrayTrace(np.ones(nblocks, np.uint8), again, np.full(nblocks, 4096)))
        c = r.counters
        assert c["cow_breaks"] == nblocks and c["peak_data_blocks_used"] == c["data_blocks_used"] == nblocks
        pool.snapshot("v", "kept")
        r = replay(pool, "v", ArrayTrace(np.ones(len(some), np.uint8), some, np.full(len(some), 4096)))
        broken = len(set((some // BS).tolist()))
        c = r.counters
        assert c["cow_breaks"] == broken < nblocks // 2
        assert c["peak_data_blocks_used"] == c["data_blocks_used"] == nblocks + broken


def test_replay_result_reports_each_volume_as_pool_usage_does(tmp_path):
    # the result's per-volume blocks come from one pass over the pool's trees for all volumes; each must
    # be what pool.usage(name) (thin_ls's MAPPED / EXCLUSIVE / SHARED) says for that volume alone
    rng = np.random.default_rng(4)
    n = 6500  # six snapshots (the last at I/O 6,000), then writes the volume alone maps
    off = rng.integers(0, (256 * BS) // 4096, n) * 4096
    with Pool.create(str(tmp_path / "p"), data_size="64MiB", metadata_only=True) as pool:
        pool.create_thin("v", 256 * BS)
        pool.create_thin("other", 16 * BS)
        r = replay(pool, "v", ArrayTrace(np.ones(n, np.uint8), off, np.full(n, 4096)), snapshot_every=1000, keep=3)
        assert set(r.volumes) == {"v", "v@4", "v@5", "v@6"}
        for name, got in r.volumes.items():
            u = pool.usage(name)
            assert got == {"mapped_blocks": u.mapped_blocks, "exclusive_blocks": u.exclusive_blocks,
                           "shared_blocks": u.shared_blocks}
        assert 0 < r.volumes["v"]["exclusive_blocks"] < r.volumes["v"]["mapped_blocks"]
        assert r.volumes["v@6"]["shared_blocks"] > 0
