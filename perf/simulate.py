"""R1-R4: trace replay and sweep speed, measured side by side in one run.

    python -m perf.simulate [--full] [--docs] [--json OUT]

R1 metadata-only replay of random 4 KiB writes (``thinpool.simulate.replay`` of an in-memory trace, chunks of
   1,048,576 records, default sampling) into a 64 GiB volume: I/Os per CPU second of the process (the
   machine is shared: wall time is shown beside it) vs the 5,000,000/s target;
R2 the same with a snapshot every 10,000 I/Os keeping the last 4 (so a delete each time too): ratio to R1
   on CPU time (>= 0.5; the wall-time ratio is shown beside it); both pools get 2 GiB of metadata (a sparse
   file) and are scratch pools (``flush=False``, as ``thinpool replay`` makes in a temporary directory:
   the same commits, not flushed);
R2s (info) R2's ratio and extra CPU per snapshot interval when the random writes span 1, 4, 16 or 64 GiB
    (1,000,000 writes each, 2,000,000 with --full; plain and with snapshots interleaved, CPU medians);
R3 data-mode replay of a fio iolog (v2, random 4 KiB writes and reads) parsed from the file, vs
   ``fio --read_iolog`` with the psync engine replaying the same iolog on a raw sparse file (>= 0.8);
   fio's time is its own job runtime (without its start-up), thinpool's the whole ``replay()`` call;
R4 a sweep of 8 configurations (block size x keep) of a metadata-only scenario: 2 workers vs 1 (>= 1.7),
   judged on the CPU critical path (what two idle cores would take: the parent's CPU during the sweep
   plus the busiest worker's CPU, start-up and result transfer included) against the 1-worker sweep's
   CPU time; the wall-time ratio, which needs two free cores, is shown beside it.

Sides are interleaved, figures are medians of the repeats.  ``--docs`` rewrites the replay section of
docs/performance.md between its markers, nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import numpy as np

from .common import (GiB, Row, Scratch, docs_head, finish, interleave, log, machine, med, perf_parser, ratio_row,
                     status_cell, timed)

SECTION_BEGIN = "<!-- replay: begin (written by `python -m perf.simulate --docs`) -->"
SECTION_END = "<!-- replay: end -->"
TARGET_IOPS = 5_000_000
KiB4 = 4096


def random_writes(n: int, vol: int, seed: int = 11):
    from thinpool.simulate import ArrayTrace
    rng = np.random.default_rng(seed)
    return ArrayTrace(np.ones(n, np.uint8), rng.integers(0, vol // KiB4, n) * KiB4, np.full(n, KiB4))


CPU: dict[str, list[float]] = {}


def replay_md(sc: Scratch, trace, snapshot_every: int | None, side: str = "") -> float:
    """Wall seconds of one replay (its CPU seconds are appended to CPU[side])."""
    import time
    from thinpool import Pool
    from thinpool.simulate import replay
    path = sc.path("md")
    # a scratch pool, as thinpool replay makes in a temporary directory: the same commits, not flushed
    with Pool.create(path, data_size=128 * GiB, metadata_only=True, metadata_size=2 * GiB, flush=False) as pool:
        pool.create_thin("v", 64 * GiB)
        c0 = time.process_time()
        t = timed(lambda: replay(pool, "v", trace, snapshot_every=snapshot_every,
                                 keep=4 if snapshot_every else None))
        CPU.setdefault(side, []).append(time.process_time() - c0)
    sc.remove(path)
    return t


def breakdown(fill: int = 3_000_000, n: int = 1_000_000, flush: bool = False) -> dict[str, float]:
    """R2's steady state taken apart (``--breakdown``): a 64 GiB volume filled by ``fill`` random 4 KiB
    writes (dense leaves), then ``n`` more with a snapshot every 10,000 (keep 4), and the same ``n``
    without snapshots into a second pool filled the same way.  CPU milliseconds per snapshot interval
    (10,000 I/Os): the snapshot message with its commit, the delete message's kernel (the release walk)
    and its commit, and the writes (with shadowing; the run without snapshots gives the writes alone).
    The writes are taken apart too: the batch kernel's calls, the node store's growth, the per-volume
    usage of the result (once per replay) and the rest (the replay's Python between kernel calls)."""
    import time
    from thinpool import Pool, kernels_map, kernels_replay
    from thinpool.blockmap import BlockMap as B
    from thinpool.pool import Pool as P
    from thinpool.simulate import replay
    acc: dict[str, float] = {}
    # (owner, attribute, the key its CPU time is counted under): each wrapped by timed_call for a run
    probes: list[tuple[Any, str, str]] = [
        (P, "commit", "commit"), (P, "snapshot", "snapshot"), (P, "delete", "delete"),
        (kernels_map, "release_inner", "release"), (kernels_replay, "apply_batch", "kernel"), (P, "usage", "usage"),
        (B, "_grow_leaves", "grow"), (B, "_grow_inners", "grow")]
    real = [getattr(owner, name) for owner, name, _ in probes]

    def timed_call(key, fn):
        def call(*a, **k):
            c0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + time.process_time() - c0
        return call
    sc = Scratch()
    out: dict[str, float] = {}
    try:
        for snaps in (False, True):
            path = sc.path(f"b{int(snaps)}")
            with Pool.create(path, data_size=128 * GiB, metadata_only=True, metadata_size=2 * GiB,
                             flush=flush) as pool:
                pool.create_thin("v", 64 * GiB)
                replay(pool, "v", random_writes(100_000, 64 * GiB, seed=1), snapshot_every=10_000, keep=4)
                replay(pool, "v", random_writes(fill, 64 * GiB, seed=2))
                tr = random_writes(n, 64 * GiB, seed=3)
                acc.clear()
                try:
                    for (owner, name, key), fn in zip(probes, real):
                        setattr(owner, name, timed_call(key, fn))
                    c0 = time.process_time()
                    replay(pool, "v", tr, snapshot_every=10_000 if snaps else None, keep=4 if snaps else None)
                    total = time.process_time() - c0
                finally:
                    for (owner, name, _key), fn in zip(probes, real):
                        setattr(owner, name, fn)
            sc.remove(path)
            per = n / 10_000
            if not snaps:
                out["writes_alone_ms"] = (total - acc.get("commit", 0.0)) / per * 1000
                continue
            out.update(total_ms=total / per * 1000, snapshot_message_ms=acc["snapshot"] / per * 1000,
                       delete_release_ms=acc["release"] / per * 1000,
                       delete_message_ms=acc["delete"] / per * 1000,
                       commits_ms=acc["commit"] / per * 1000,
                       writes_with_shadowing_ms=(total - acc["snapshot"] - acc["delete"]) / per * 1000,
                       writes_kernel_ms=acc["kernel"] / per * 1000, node_growth_ms=acc.get("grow", 0.0) / per * 1000,
                       result_usage_ms=acc.get("usage", 0.0) / per * 1000,
                       writes_python_ms=(total - acc["snapshot"] - acc["delete"] - acc["kernel"] - acc.get("grow", 0.0)
                                         - acc.get("usage", 0.0)) / per * 1000)
    finally:
        sc.close()
    out["load_at_end"] = os.getloadavg()[0]
    return out


def write_iolog(path: str, target: str, n: int, size: int, seed: int = 12) -> None:
    rng = np.random.default_rng(seed)
    ops = np.where(rng.random(n) < 0.25, "read", "write")
    offs = rng.integers(0, size // KiB4, n) * KiB4
    with open(path, "w") as f:
        f.write(f"fio version 2 iolog\n{target} add\n{target} open\n")
        f.write("".join(f"{target} {o} {a} {KiB4}\n" for o, a in zip(ops.tolist(), offs.tolist())))
        f.write(f"{target} close\n")


def fio_runtime(iolog: str) -> float:
    out = subprocess.run(["fio", "--output-format=json", "--name=replay", f"--read_iolog={iolog}",
                          "--ioengine=psync"], check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["job_runtime"] / 1000.0


def replay_data(sc: Scratch, iolog: str, size: int) -> float:
    from thinpool import Pool
    from thinpool.simulate import replay
    path = sc.path("data")
    with Pool.create(path, data_size=2 * size) as pool:
        pool.create_thin("v", size)
        pattern = np.random.default_rng(1).integers(0, 256, KiB4, dtype=np.uint8)
        t = timed(lambda: replay(pool, "v", iolog, format="fio-iolog", pattern=pattern))
    sc.remove(path)
    return t


SCENARIO = """
[pool]
data_size = "256GiB"
metadata_only = true
[[volume]]
name = "v"
size = "64GiB"
trace = "{trace}"
snapshot_every = 50000
keep = 4
"""


R4_CPU: dict[str, list[float]] = {}


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of a live process (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sweep_time(sc: Scratch, scen: str, workers: int) -> float:
    """Wall seconds of one sweep of 8 points.  Its CPU goes to R4_CPU: with 1 worker the process's own
    CPU time; with more, the critical path on idle cores: the parent's CPU during the sweep (threads
    included: handing out points, taking results) plus the busiest worker's whole CPU (from its fork to
    its last result: start-up, runs, sending results), read from /proc before the pool shuts down."""
    import time
    from concurrent.futures import ProcessPoolExecutor
    from thinpool.simulate import sweep, sweeps
    sw = {"block_size": ["64KiB", "128KiB", "256KiB", "512KiB"], "keep": [2, 8]}
    per_worker: list[float] = []

    class Probe(ProcessPoolExecutor):
        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            per_worker.extend(_cpu_of(pid) for pid in list(self._processes or {}))
            super().shutdown(wait, cancel_futures=cancel_futures)
    real = sweeps.ProcessPoolExecutor
    setattr(sweeps, "ProcessPoolExecutor", Probe)  # (sweep() makes its pool through this name)
    try:
        c0 = time.process_time()
        t = timed(lambda: sweep(scen, sw, workers=workers))
        parent = time.process_time() - c0
    finally:
        setattr(sweeps, "ProcessPoolExecutor", real)
    R4_CPU.setdefault(f"w{workers}", []).append(parent + max(per_worker, default=0.0))
    R4_CPU.setdefault(f"w{workers}_parent", []).append(parent)
    R4_CPU.setdefault(f"w{workers}_workers", []).append(sum(per_worker))
    return t


def r2_by_span(sc: Scratch, n: int, reps: int, detail: dict[str, Any]) -> Row:
    """R2s: what R2 costs as a function of the span its random writes cover (an info row).  A snapshot
    shares every leaf of the volume; the writes of the next interval shadow the leaves they reach (at
    most the span's leaves, 512 mappings each) and the delete of the oldest kept snapshot releases as
    many, so the cost per interval grows with the span until every leaf is reached every interval;
    what is left at a small span is the two messages and their commits.  ``n`` writes per replay,
    plain and with a snapshot every 10,000 (keep 4), interleaved, CPU medians."""
    values: dict[str, Any] = {}
    for gib in (1, 4, 16, 64):
        tr = random_writes(n, gib * GiB)
        plain, snap = f"span{gib}_plain", f"span{gib}_snap"
        interleave({plain: lambda _r: replay_md(sc, tr, None, plain),
                    snap: lambda _r: replay_md(sc, tr, 10_000, snap)}, reps)
        cp, cs = med(CPU[plain]), med(CPU[snap])
        values[f"ratio_{gib}GiB"] = cp / cs
        values[f"ms_per_interval_{gib}GiB"] = (cs - cp) / (n // 10_000) * 1e3
    detail["R2s_cpu_seconds"] = {k: v for k, v in CPU.items() if k.startswith("span")}
    return Row("R2s", "R2 by the span of the random writes (1, 4, 16, 64 GiB): ratio to the same replay without "
               "snapshots, and the extra CPU per snapshot interval (snapshot, delete, shadowing, commits)", values)


def run(full: bool = False, only: set[str] | None = None) -> tuple[list[Row], dict[str, Any]]:
    n = 8_000_000 if full else 4_000_000
    only = only or {"R1", "R2", "R2s", "R3", "R4"}
    reps = 5 if full else 3
    sc = Scratch()
    rows: list[Row] = []
    detail: dict[str, Any] = {"records_R1": n, "repeats": reps}
    try:
        replay_md(sc, random_writes(100_000, 64 * GiB), 10_000, "warm")  # warm: kernels, imports
        if only & {"R1", "R2"}:
            tr = random_writes(n, 64 * GiB)
            t = interleave({"plain": lambda _r: replay_md(sc, tr, None, "plain"),
                            "snap": lambda _r: replay_md(sc, tr, 10_000, "snap")}, reps)
            plain, snap = med(t["plain"]), med(t["snap"])
            cplain, csnap = med(CPU["plain"]), med(CPU["snap"])
            rows.append(ratio_row("R1", "metadata-only replay, random 4 KiB writes: I/Os per CPU second vs 5,000,000/s",
                                  ">= 1.0", n / cplain / TARGET_IOPS, ios_per_cpu_s=n / cplain, ios_per_wall_s=n / plain))
            rows.append(ratio_row("R2", "the same with a snapshot every 10,000 I/Os (keep 4): vs R1, CPU time",
                                  ">= 0.5", cplain / csnap, ios_per_cpu_s=n / csnap,
                                  ios_per_wall_s=n / snap, wall_ratio=plain / snap, snapshots=n // 10_000))
            detail["R1_R2_seconds"] = t
            detail["R1_R2_cpu_seconds"] = CPU
            log(rows[-2].line())
            log(rows[-1].line())
        if "R2s" in only:
            rows.append(r2_by_span(sc, 2_000_000 if full else 1_000_000, max(2, reps - 1), detail))
            log(rows[-1].line())
        if "R3" in only and shutil.which("fio"):
            m = 400_000 if full else 200_000
            size = 4 * GiB
            target = sc.path("raw.img")
            with open(target, "wb") as f:
                f.truncate(size)
            iolog = sc.path("r.iolog")
            write_iolog(iolog, target, m, size)
            fio_runtime(iolog)
            replay_data(sc, iolog, size)

            def fio_side(_r):
                os.truncate(target, 0)
                os.truncate(target, size)
                return fio_runtime(iolog)
            t = interleave({"thin": lambda _r: replay_data(sc, iolog, size), "fio": fio_side}, reps)
            th, fi = med(t["thin"]), med(t["fio"])
            rows.append(ratio_row("R3", "data-mode replay of a fio iolog (75% 4 KiB random writes) vs fio "
                                  "--read_iolog psync on a raw sparse file", ">= 0.8", fi / th,
                                  thin_ios_per_s=m / th, fio_ios_per_s=m / fi))
            detail["R3_seconds"] = t
            log(rows[-1].line())
        if "R4" in only:
            k = 4_000_000 if full else 2_000_000
            trace = sc.path("sweep.iolog")
            write_iolog(trace, "/dev/vol", k, 64 * GiB)
            scen = sc.path("s.toml")
            with open(scen, "w") as text:
                text.write(SCENARIO.format(trace=trace))
            t = interleave({"w1": lambda _r: sweep_time(sc, scen, 1), "w2": lambda _r: sweep_time(sc, scen, 2)},
                           max(2, reps - 1))
            w1, w2 = med(t["w1"]), med(t["w2"])
            c1, c2 = med(R4_CPU["w1"]), med(R4_CPU["w2"])
            rows.append(ratio_row("R4", f"sweep of 8 configurations ({k:,} records each): 2 workers vs 1, "
                                  "CPU critical path", ">= 1.7", c1 / c2, one_worker_cpu_s=c1,
                                  two_workers_cpu_s=c2, parent_cpu_s=med(R4_CPU["w2_parent"]),
                                  workers_cpu_s=med(R4_CPU["w2_workers"]), one_worker_s=w1, two_workers_s=w2,
                                  wall_ratio=w1 / w2, cores=os.cpu_count()))
            detail["R4_cpu_seconds"] = R4_CPU
            detail["R4_seconds"] = t
            log(rows[-1].line())
    finally:
        sc.close()
    return rows, detail


def table_md(rows: list[Row]) -> str:
    out = ["| row | what | measured | ratio | target | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        vals = ", ".join(f"{k} {v:,.0f}" if isinstance(v, (int, float)) and abs(v) >= 100 else
                         f"{k} {v:.2f}" if isinstance(v, float) and abs(v) >= 1 else
                         f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.values.items())
        status = status_cell(r)
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}" if r.ratio >= 1 else f"{r.ratio:.3g}"
        out.append(f"| {r.key} | {r.title} | {vals} | {ratio} | {r.target} | {status} |")
    return "\n".join(out)



def main(argv: list[str] | None = None) -> int:
    ap = perf_parser("simulate", __doc__, "bigger traces, 5 repeats", "replay")
    ap.add_argument("--from-json", nargs="+", help="measure nothing: take the rows of earlier --json runs")
    ap.add_argument("--only", help="comma-separated rows to measure (R1,R2,R2s,R3,R4)")
    ap.add_argument("--breakdown", action="store_true", help="measure nothing else: R2's cost per snapshot taken "
                    "apart (commits, delete, writes with shadowing) on a volume filled by 3M writes")
    ap.add_argument("--breakdown-flush", action="store_true", help="the breakdown with flushed commits (an "
                    "ordinary pool instead of a scratch pool)")
    args = ap.parse_args(argv)
    if args.breakdown or args.breakdown_flush:
        log(f"load average {os.getloadavg()[0]:.2f} at the start")
        for k, v in breakdown(flush=args.breakdown_flush).items():
            log(f"{k:28s} {v:9.2f}")
        return 0
    if args.from_json:
        byk: dict[str, Row] = {}
        detail = {}
        for path in args.from_json:  # later files' rows replace earlier ones
            with open(path) as f:
                saved = json.load(f)
            for r in saved["rows"]:
                byk[r["key"]] = Row(r["key"], r["title"], r["values"], r["ratio"], r["target"],
                                    r.get("status", ""), r.get("note", ""))
            detail.update(saved["detail"])
            mach = saved["machine"]
        rows = [byk[k] for k in sorted(byk)]
    else:
        load = os.getloadavg()[0]  # what else the machine was doing when the run began
        rows, detail = run(args.full, set(args.only.split(",")) if args.only else None)
        mach = machine()
        detail["load_at_start"] = round(load, 2)

    def body() -> str:
        return (docs_head("Trace replay and sweeps", "simulate", args.full, mach) + ", "
                f"load average {detail.get('load_at_start', 'not recorded')} at the start), Python {sys.version.split()[0]}, numpy {np.__version__}; "
                f"{detail['repeats']} interleaved repeats (medians).\n\n" + table_md(rows) + "\n\n"
                "R1 is judged on the process's CPU time: on this shared machine the wall-clock rate depends on the "
                "other jobs (both are shown).  R1's kernel decides the two common cases of a metadata-only replay "
                "inside one block -- a rewrite of a provisioned, unshared block (nothing changes) and a first write "
                "into an existing, unshared leaf -- without the general write path; the rest of the time is the "
                "replay's own work per chunk (cutting at samples, the counters).\n\n"
                "What R2 pays for is dm-thin's own cost structure, not the replay: a snapshot makes every leaf of "
                "the 64 GiB volume (2,048 leaves) shared; the next 10,000 random writes touch nearly all of them, "
                "and each first touch shadows the leaf (copies 512 mappings and raises 512 data-block reference "
                "counts); deleting the oldest kept snapshot then releases as many (dm_btree_del's walk: the root "
                "dropped, only nodes reaching zero descended, about a million counts dropped); and both the "
                "snapshot and the delete are pool messages, each committing as the kernel's do: the snapshot's "
                "commit writes every shadowed leaf and the space map's pages (about 2,000 leaf pages, and a page of "
                "counts of 3 or more per 1,024 data blocks in use: most blocks are shared by the origin and the 4 "
                "kept snapshots), the delete's the released nodes and the counts again.  Every per-leaf and "
                "per-mapping step is a compiled loop (shadowing, release, the space map's pages); the replay's "
                "pools are scratch pools (`flush=False`: the same commits, not flushed).  `python -m perf.simulate "
                "--breakdown` takes it apart on a volume filled by 3,000,000 writes (R2's steady state), 1,000,000 "
                "writes with a snapshot every 10,000, CPU per snapshot interval.  On 2026-12-06, main before and "
                "after the commits' array-at-a-time release and allocation of metadata blocks (below), interleaved, "
                "two runs each at load average 4.2-5.5: before 50.6 and 53.9 ms (the snapshot message 21.7/23.1 ms, "
                "the delete message 16.3/17.2 ms of which the release walk 5.0/5.2 ms, the commits together "
                "32.8/34.8 ms, the 10,000 writes 12.6/13.7 ms against 1.3 ms without snapshots), after 47.9 and "
                "51.2 ms (19.3/20.1, 14.9/15.7 with the walk 5.3/5.8, commits 28.6/29.8, writes 13.8/15.4).  "
                "Each commit released and allocated its thousands of metadata blocks one Python step per block "
                "(about 9 ms per interval); the store now does it array-at-a-time when numpy is loaded, picking "
                "the same blocks in the same order (the metadata written is the same; "
                "tests/engine/test_commit_many_pages.py), about 0.7 ms.  What a commit still costs is writing "
                "(about 4 ms per interval of `pwrite` into the page cache), checksumming and queueing (2-4 ms) and "
                "handing over (a Python step per page: listing, sorting by block) some 2,000 leaf pages and the "
                "space map's pages twice per interval.  Earlier the same interval measured 71 ms at load 1.6 "
                "(before that work 131 ms at load 9).  Later the same day, with main's commits putting their pages "
                "in one run of free blocks and the data-block allocator's two plain loops, main measured 44.3 "
                "and 43.4 ms at load 6.6-7.3 (commits 26.1/26.2 ms, the writes 13.1/12.1 ms, the walk 4.9/4.8 "
                "ms).  " 
                "In the evening the commits' pages went to the store as rows of the buffers that hold them -- the "
                "nodes themselves for dense leaves, the pack encoder's and the space map kernel's outputs -- "
                "checksummed row by row and written one `pwrite` per run of consecutive blocks straight from the "
                "buffer (rows that lie apart gathered in one numpy step), with no Python step per page for "
                "listing, copying (`tobytes`), sorting or joining; sets of pages are sorted instead of numpy's "
                "hashing `unique`, and the new state's top block is found with one `memrchr` instead of an "
                "`rstrip` of the 512 KiB block-state map (1.8 ms a commit).  The metadata written is byte for "
                "byte the same (tests/engine/test_commit_many_pages.py).  Interleaved with main before it "
                "(4eb0e12), two runs each at load 4.3-5.5: before 42.6 and 46.3 ms per interval (commits "
                "27.0/28.7 ms), after 32.9 and 34.9 ms (commits 16.8/17.8 ms; the snapshot message 9.9/10.5 ms, "
                "the delete message 12.2/12.8 ms with the walk 5.1/5.3, the writes 10.8/11.6).  What a commit "
                "costs now is memory traffic over the ~4,600 pages (19 MB) an interval writes: per interval at "
                "load 4, checksums about 2.5-3 ms, `pwrite` into the page cache 3.6-4.7 ms and gathering rows 1.5 "
                "ms, the nodes' and the space map's pages 3.5 ms, the rest (page maps, directory, the freed-block "
                "scan, releasing the pending blocks) about 4 ms.  Evaluated and not built: deferring a scratch "
                "pool's page writes (each commit decided in memory -- the same blocks allocated and freed, the "
                "same counters -- and the live pages written when the pool is closed or read).  (a) The directory "
                "(the JSON of the page maps' `block << 32 | crc` entries) changes length with the checksums' "
                "digits, so its page count, and with it the blocks a commit allocates, depends on every page's "
                "CRC: only the writes could be deferred, not the checksums.  (b) The pool changes pages in place "
                "between commits (unshared leaves, the counts, the device table) and an abort or a failed "
                "metadata operation reloads from the file, so a deferred page must be copied at its commit -- the "
                "same memcpy the `pwrite` into the page cache is: replacing the writes by that copy in the "
                "breakdown saved 3-4 ms of the 6-7 ms they then cost (load 4).  (c) Written later, the pages "
                "overwrite blocks that the transaction still on disk references (freed by one deferred commit, "
                "reused by a later one), so staying openable after a SIGKILL at any moment would need a second, "
                "temporary transaction in blocks free in both (and room for it) before the final locations are "
                "written.  For about 3 ms of a ~34 ms interval that was not worth the risk; the writes stay eager "
                "and cheaper instead.  Tried and not kept then: in a run of blocks whose rows lie apart, writing "
                "the long pieces consecutive in the buffer straight from it and gathering only the short ones (fewer bytes copied, "
                "more system calls: the writes took 5.8-6.1 ms per interval either way, three alternated runs each "
                "at load 6.2-6.6)."
                "  The writes, later that evening: the batch kernel breaks the sharing of a metadata-only write inside one "
                "mapped block itself -- `writable_leaf` only when the path is shared, then a new block, the old block's "
                "count dropped at once, the mapping replaced, the peak sampled after the write -- instead of through "
                "`write_span`'s general path (which looked the block up again and passed the data-file branches); a "
                "shadowed leaf is copied and its 512 counts raised in one pass without filling the new row with holes "
                "first; and the kernel hints the caches for the writes ahead (32 I/Os ahead the line of the mapping in "
                "its leaf, or the whole leaf when its path is shared; 16 ahead the count of the block the mapping holds: "
                "`kernels_map.prefetch`, LLVM's prefetch, a no-op under NUMBA_DISABLE_JIT"
                "; 32 rather than 16 I/Os: with the caches flushed 6.2-6.7 against 6.3-7.5 ms, six alternations at "
                "load 6.2-6.9; prefetching also the 512 counts of a leaf about to be shadowed made it slower, 7.0-7.2 "
                "against 6.2-6.6 ms).  The arrays that result are "
                "the same (compared after 23,000 mixed-size writes; tests/simulate compare data mode with metadata-only, "
                "and the peak against a count from the trace).  The kernel alone on one interval of the steady state, "
                "from copied state, thread CPU: at load 1.5-1.7, 10,000 writes shadowing 2,048 leaves 7.8-8.4 -> 5.8-5.9 "
                "ms before the hints, 10,000 copy-on-write breaks without shadowing 2.9-3.4 -> 1.1 ms; with the caches "
                "flushed first (load 5.9-6.4) the hints took the first from a median of 8.5 to 7.3 ms and the second from"
                " 1.8-2.0 to 1.1 ms.  The result's per-volume usage is one pass over the trees for the volume and its "
                "kept snapshots (five passes before, ~0.25 s a replay).  Breakdowns alternated with main without these "
                "changes, three runs each at load 5.4-6.4: the writes 14.6/13.9/14.3 -> 8.1/11.5/10.9 ms per interval "
                "(the kernel's calls 11.1/10.2/10.9 -> 6.9/8.4/7.9 ms, the result's usage 0.65/0.70/0.61 -> "
                "0.25/0.27/0.24 ms, the node store's growth 0.2-2.2 ms and the replay's Python 0.7-1.0 ms either way), "
                "the interval 39.1/36.7/38.3 -> 30.2/35.0/35.6 ms.  The row alternated the same way at 19:47-19:52 UTC "
                "(load 5.2-6.9): R2's CPU for 4,000,000 writes 13.9/14.1/14.7 and 15.2/15.0/15.7 s -> 14.4/13.6/13.6 and "
                "14.6/14.4/14.1 s (ratios 0.0268 and 0.0399 -> 0.0280 and 0.0295, moved mostly by R1, which the hints "
                "speed up too: 4,000,000 plain writes 0.41-0.43 -> 0.37-0.39 s of CPU in a separate alternation at load "
                "4.6).  Inside the replay the kernel costs more than alone (the commits between intervals push the leaves"
                " and counts out of the caches).  The release walk is unchanged at 4.5-5.5 ms per interval: about 2,000 "
                "cold leaves (reading them alone: 0.8 ms) and a million decrements scattered over the 8 MiB of counts; "
                "marking each count's page dirty is ~0.7 ms of it (a variant without the mark: 3.8 against 4.6 ms; "
                "testing the mark before setting it saved nothing) and prefetching the next leaves (1, 2 or 4 ahead) "
                "showed nothing.  What is left of the writes and the walk is those scattered counts, about a million each"
                " way per interval, as long as a leaf's 512 counts move with it as dm-thin's do."
                "  Tried and not kept: one `pwritev` of a run's pages instead of joining them first (a "
                "micro-benchmark of 4,000 pages in one run: 3.2-3.4 ms against 8.2-9.0 ms joined; in the "
                "interleaved breakdown the commits 24.2/25.6 ms against main's 26.1/26.2), because the fault "
                "tests inject short writes and ENOSPC into the store's `pwrite64` calls with strace, which a "
                "`pwritev` would bypass; and a software prefetch of a leaf's 512 counts before it is shadowed (no "
                "effect above the noise of interleaved runs; the one-pass copy tried beside it is kept now, "
                "see above).  Raising the counts of a batch later, sorted, would change what the replay reports: a "
                "copy-on-write break drops the count of the block it unmaps at once, so that block would reach "
                "zero early, and the peak of data blocks in use is sampled after every write.  "
                "R2's target needs the whole interval in about 2.4-3 ms (twice R1's 1.2-1.5 ms for 10,000 writes), less "
                "than either commit alone: each commit encodes, checksums and writes thousands of 4 KiB pages (the "
                "metadata the kernel would write), and shadowing and release each touch about a million reference "
                "counts scattered over an 8 MiB array: about 2 ns each with the counts in cache (the release walk "
                "alone: 2.1 ms; 2,000 leaves' counts raised in a tight loop inside the steady state: 4 ms), more "
                "inside the replay.  It stays out "
                "of reach while metadata-only pools keep the kernel's metadata and commit it as the kernel does; "
                "a volume whose writes stay within fewer leaves pays proportionally less.\n\n"
                "R2s (an info row) takes R2 apart by the span its random writes cover (1,000,000 writes a replay, "
                "plain and with a snapshot every 10,000, interleaved, CPU medians): at a small span what is left is "
                "fixed per interval -- two pool messages, each committing.  On 2026-12-07 03:34-03:40 UTC, five "
                "alternated runs each of main before (1250a10) and after the commits' scans were made to follow what "
                "changed (load 3.2-6.7, about +-1 ms of noise per interval): 1 GiB ratio 0.287 -> 0.322, extra CPU "
                "per interval 4.29 -> 4.11 ms; 4 GiB 0.194 -> 0.25, 7.43 -> 5.56 ms; 16 GiB 0.134 -> 0.151, 11.1 -> "
                "10.6 ms; 64 GiB 0.0692 -> 0.0683, 28.7 -> 28.2 ms.  What changed: the block-state map of the next "
                "transaction is made from the blocks the commit changed (in place, recorded for the undo) instead of "
                "a translate and a count of the whole 512 KiB map; the freed blocks of the dirty count pages are "
                "found by one flat scan (a 2-D `nonzero` took four times as long) and the pending blocks' pages are "
                "marked without a sort; the overflow pages that became empty are found by a binary search instead of "
                "`isin`.  A commit of the 1 GiB replay now costs about 1.1 ms of CPU (thread CPU, load 4): the "
                "store's part 0.54 ms (checksumming, queueing and writing some 125 pages, allocating their blocks, "
                "page maps, directory, superblock), the nodes' and the space map's pages 0.29 ms (about 94 count "
                "pages are dirty: a shadowed leaf raises the counts of 512 blocks spread over the pages the moving "
                "allocation cursor left them in), the freed-block scan 0.08 ms, releasing the pending blocks 0.05 ms, "
                "the rest 0.1 ms.  With the delete's release walk (0.1 ms) and the writes' copy-on-write breaks "
                "(about 7,500 new blocks an interval) that is 3-4 ms an interval against 1.2-1.5 ms for the 10,000 "
                "writes alone: 0.5 at 1 GiB needs both commits together in well under 1 ms.  The same changes make a "
                "big pool's commits follow what changed: on the 1 PiB pool of `python -m perf.pib` (quick build, "
                "10,000 volumes; load 9) the first write and commit after an open, kernels loaded, 0.18-0.21 -> "
                "0.08-0.09 s of CPU (0.50-0.52 -> 0.16-0.18 s wall) -- the block-state map is built from the nonzero "
                "entries of the page locations only (2^24 of the overflow counts' are 0) -- and each later commit "
                "60-85 -> 16-20 ms, the data space map's 2^24 page flags scanned a word of eight at a time.  S11c "
                "itself (a fresh process that loads numba and the kernels for its write) measured 0.82/1.19 -> "
                "0.83/0.82 s of CPU in one alternation: loading the kernels dominates it.\n\n"
                "R4 is judged on the CPU critical path, what two idle cores would take: the 1-worker sweep's CPU "
                "time against the parent's CPU during the 2-worker sweep plus the busiest worker's whole CPU (its "
                "start-up after the fork, its runs, sending its results; read from /proc before the pool shuts "
                "down).  The wall-clock ratio needs two free cores, which this shared machine seldom has (both "
                "are shown; an earlier run on the idle machine, load 0.57, measured 1.76x on wall time).  What "
                "besides the runs is in the 2-worker time was measured: the parent's part (warming the kernels "
                "before the fork, handing out points, taking 8 results of about 29 KB) is under 0.1 s, and the "
                "two workers' CPU together was 13.0-13.1 s against the 1-worker sweep's 12.0-12.2 s in the run "
                "above (in a separate probe at load 4.5-5.7: 16.2 s against the 8 runs' 16.9 s one after the "
                "other in one process): start-up and result transfer cost little.  The runs differ: 1.4-2.7 s of "
                "CPU each in that probe (64 KiB blocks the longest, 512 KiB with keep 2 the shortest): handed out "
                "in the product's order, those figures give two workers a critical path of 9.1 s of the 16.9 "
                "(the 512 KiB, keep 8 run last, alone); the points now go out longest first (an estimate: blocks "
                "spanned, then snapshot rate, then kept snapshots; results still come back in the product's "
                "order, identical whichever runs them), which gives 8.7 s.  Eight runs over two workers cannot "
                "balance exactly, so the critical path stays a little above half of the total.\n")
    return finish(args, rows, detail, mach, SECTION_BEGIN, SECTION_END, body)


if __name__ == "__main__":
    sys.exit(main())
