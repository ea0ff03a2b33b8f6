"""The performance suite (plus the engine ratios and the dump rows).

    python -m perf [--full] [--only S1,S5,...] [--no-engine] [--no-docs]

Rows (each prints measured values, the ratio, the target and pass/short):
  S1 first writes      random 4 KiB first writes, 16 GiB volume: thin batch / per-call / raw sparse file / qcow2
  S2 overwrites        the same offsets again (provisioned blocks): same four sides
  S3 CoW after snap    first 4 KiB write into each shared block: thin vs qcow2 internal snapshot / external overlay
  S4 snapshot depth    random 4 KiB reads at depth 1, 10, 50, 100: thin chain vs qcow2 backing chain
  S5 snapshot creation vs mapped size 1K..1M: thin library, thin CLI, `qemu-img snapshot -c`
  S6 commit cost vs pool size; delete cost vs volume size
  S7 JIT vs pure-Python reference allocator, 1M blocks
  S8 CLI latency on a pool with 10,000 volumes vs `python -c pass`
  S9 scale: 1 TiB pool, 10,000 volumes, 10,000,000 mappings: open, RSS, status, ls, dump vs thin_dump
  S10 100,000 volumes (snapshots of 4 origins), 100,000,000 mappings, metadata-only (perf/scale.py; quick: 1 %):
     open, RSS, status / ls / snapshot vs `python -c pass`, ls --usage, export-metadata vs thin_dump
  C1-C3 cold start: the first `thinpool demo` of a fresh install (empty kernel cache; a new checkout on a machine
     that ran these sources) and a warm one (perf/coldstart.py)
  I4 dump / export-metadata of 1,000,000 mappings over 100 volumes vs thin_dump
  I7 fio over NBD -- a hook: perf/nbd.py, when it exists, provides run(scratch, full) -> rows
  M1 metadata blocks used per million mappings, ours vs the exported dm-thin metadata (perf/metadata.py):
     a dense volume, a volume + 10 snapshots with 1 % CoW each, random sparse writes (1 in 16), and
     very sparse ones (100,000 over 100,000,000 blocks), many small volumes of 200 mappings
  A  rows anchored to the physical limit (perf/anchors.py; also `python -m perf.anchors [--docs]`):
     F1-F3 Thin.write_many / read_many(out=) vs fio psync --read_iolog of the same offsets,
     P1-P5 per-call write/read (first writes, overwrites, CoW break, depth 1 and 100) vs the Python loop,
     CF1-CF2 commit() vs the fsync floor (pwrite + fdatasync of data, metadata pages, superblock)
  X1-X4 exported metadata keeps btree sharing: `python -m perf.sharing [--docs]` (its own section)
  T1-T5 trace parsing records/s per format, and what `serve --record` costs a request:
     `python -m perf.traces [--docs]` (its own section)
  O1-O2 unpacking one image layer into a directory vs `umoci unpack` and `tar -xzf`:
     `python -m perf.oci [--docs]` (its own section)
  O3-O6 importing an image onto a thin pool (and an overlay2-style store) vs `umoci unpack`, as root:
     `python -m perf.image_import [--docs]` (its own section)

Writes perf/results/<date>.json, docs/performance.md and docs/perf-*.png.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import subprocess
import sys
import traceback

import numpy as np

from . import engine
from . import qemu
from .common import (GiB, KiB, MiB, TiB, Row, Scratch, clock, drop_file, find_tool, interleave, log, machine,
                     med, missing_msg, rand_bytes, ratio_row, save_json, sparse_file, synthetic_metadata, timed, cow_sampler,
                     read_sides, tool_version)

BS = 64 * KiB
IO = 4 * KiB
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



class _Undo(Exception):
    """Raised inside a batch to drop what it did (Pool.batch aborts on an exception)."""

def cli_cmd() -> list[str]:
    """How to run the thinpool CLI: the `thinpool` script installed beside this interpreter (not a
    version manager's shim on PATH, which adds its own start-up), else `python -m thinpool`."""
    exe = os.path.join(os.path.dirname(sys.executable), "thinpool")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "thinpool"]


def byte_compile() -> None:
    """Byte-compile the package as `pip install` does for a regular install (an editable checkout run
    with PYTHONDONTWRITEBYTECODE=1 would otherwise recompile every module in every CLI process)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(REPO, "thinpool")],
                   stdout=subprocess.DEVNULL, check=True)


def cli_available() -> bool:
    try:
        importlib.import_module("thinpool.cli")
        return True
    except ImportError:
        return False


def run_cli(*args: str, check: bool = True) -> float:
    t0 = clock()
    r = subprocess.run(cli_cmd() + list(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = clock() - t0
    if check and r.returncode != 0:
        raise RuntimeError(f"thinpool {' '.join(args)} failed: {r.stderr.decode()[-500:]}")
    return dt


def wall(cmd: list[str]) -> float:
    t0 = clock()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return clock() - t0


def missing_row(key: str, title: str, tool: str) -> Row:
    return Row(key, title, {}, None, "", "missing", note=missing_msg(tool))


# ----------------------------------------------------------------------------- S1 / S2
def s1_s2(sc: Scratch, full: bool) -> tuple[list[Row], dict]:
    from thinpool import Pool
    n = 20000 if full else 4000
    reps = 5 if full else 3
    vol = 16 * GiB
    offs, bufs = engine.first_write_offsets(vol, n, seed=11)
    bufs2 = rand_bytes(np.random.default_rng(12), n, IO)
    offs_l = offs.tolist()
    rows1 = [bufs[i] for i in range(n)]
    rows2 = [bufs2[i] for i in range(n)]
    have_q = qemu.available()
    first: dict[str, list[float]] = {}
    over: dict[str, list[float]] = {}

    def rec(d, k, t):
        d.setdefault(k, []).append(t)

    def thin(batch: bool):
        def run(_r):
            path = sc.path("s1")
            p = Pool.create(path, data_size=vol, block_size=BS)
            v = p.create_thin("v", vol)
            if batch:
                rec(first, "batch", timed(lambda: v.write_many(offs, bufs)))
                rec(over, "batch", timed(lambda: v.write_many(offs, bufs2)))
            else:
                w = v.write

                def go(rows):
                    for o, b in zip(offs_l, rows):
                        w(o, b)
                rec(first, "call", timed(lambda: go(rows1)))
                rec(over, "call", timed(lambda: go(rows2)))
            p.close(commit=False)
            sc.remove(path)
            return 0.0
        return run

    def raw(_r):
        path = sc.path("raw")
        fd = sparse_file(path, vol)
        pw = os.pwrite

        def go(rows):
            for o, b in zip(offs_l, rows):
                pw(fd, b, o)
        rec(first, "raw", timed(lambda: go(rows1)))
        rec(over, "raw", timed(lambda: go(rows2)))
        os.close(fd)
        drop_file(path)
        return 0.0

    def qcow(_r):
        path = sc.path("s1.qcow2")
        qemu.create(path, vol)
        rec(first, "qcow2", qemu.timed_script(path, qemu.writes(offs_l, IO, 0x11)))
        rec(over, "qcow2", qemu.timed_script(path, qemu.writes(offs_l, IO, 0x22)))
        qemu.remove(path)
        return 0.0

    sides = {"batch": thin(True), "call": thin(False), "raw": raw}
    if have_q:
        sides["qcow2"] = qcow
    interleave(sides, reps)
    rows = []
    for key, label, d in (("S1", "first writes", first), ("S2", "overwrites", over)):
        m = {k: med(v) for k, v in d.items()}
        iops = {f"{k}_iops": n / t for k, t in m.items()}
        # the Python-loop rows are info: the anchors are fio (F1/F2) and, per call, P1/P2 (perf/anchors.py)
        rows.append(ratio_row(f"{key}a", f"{label}: random 4 KiB, thin write_many vs raw sparse file (Python loop; "
                              "info)", "", m["raw"] / m["batch"], note="judged against fio in F1/F2", **iops))
        rows.append(ratio_row(f"{key}b", f"{label}: random 4 KiB, thin per-call write vs raw sparse file (info)",
                              "", m["raw"] / m["call"], note="judged in P1/P2 (CPU time)",
                              us_per_call=m["call"] / n * 1e6))
        if have_q:
            rows.append(ratio_row(f"{key}c", f"{label}: thin write_many vs qcow2 (qemu-io -t writeback)", ">= 1.0",
                                  m["qcow2"] / m["batch"], qcow2_iops=n / m["qcow2"],
                                  note="qemu-io script of the same offsets (pattern bytes); its start-up subtracted"))
            rows.append(Row(f"{key}d", f"{label}: thin per-call write vs qcow2", {}, m["qcow2"] / m["call"], "",
                            "info"))
        else:
            rows.append(missing_row(f"{key}c", f"{label}: qcow2 peer", "qemu-io"))
    return rows, {"first": first, "over": over, "n": n}


# ----------------------------------------------------------------------------- S3
def s3(sc: Scratch, full: bool) -> tuple[list[Row], dict]:
    from thinpool import Pool
    nblocks = 8192 if full else 2048
    reps = 5 if full else 3
    rng = np.random.default_rng(13)
    size = nblocks * BS
    path = sc.path("s3")
    # room for this repeat's copies and the previous repeat's (freed blocks stay reserved for one
    # more commit): no implicit commit inside the timed writes
    p = Pool.create(path, data_size=(3 * nblocks + 1024) * BS, block_size=BS)
    o = p.create_thin("o", size)
    for i in range(0, nblocks, 256):
        o.write_many(np.arange(i, i + 256, dtype=np.int64) * BS, rand_bytes(rng, 256, BS))
    p.commit()
    order = rng.permutation(nblocks).astype(np.int64)
    offs = order * BS + rng.integers(0, BS // IO, nblocks) * IO
    bufs = rand_bytes(rng, nblocks, IO)
    offs_l = offs.tolist()
    have_q = qemu.available()
    base_q = sc.path("s3-base.qcow2")
    if have_q:
        qemu.create(base_q, size)
        qemu.fill(base_q, size)

    def thin(batch):
        return cow_sampler(p, "o", offs, bufs, batch)

    def q_internal(_r):
        img = sc.path("s3-int.qcow2")
        subprocess.run(["cp", "--sparse=always", base_q, img], check=True)
        qemu.snapshot_create(img, "snap")
        t = qemu.timed_script(img, qemu.writes(offs_l, IO, 0x33))
        qemu.remove(img)
        return t

    def q_overlay(_r):
        img = sc.path("s3-ovl.qcow2")
        qemu.create(img, size, backing=base_q)
        t = qemu.timed_script(img, qemu.writes(offs_l, IO, 0x44))
        qemu.remove(img)
        return t

    sides = {"batch": thin(True), "call": thin(False)}
    if have_q:
        sides.update(internal=q_internal, overlay=q_overlay)
    res = interleave(sides, reps)
    p.close()
    sc.remove(path)
    qemu.remove(base_q)
    m = {k2: med(v) for k2, v in res.items()}
    iops = {f"{k2}_iops": nblocks / t for k2, t in m.items()}
    if not have_q:
        return [Row("S3", "CoW after snapshot", iops, None, "", "info"),
                missing_row("S3a", "CoW after snapshot: qcow2 peer", "qemu-io")], res
    return [
        ratio_row("S3a", "CoW after snapshot: thin write_many vs qcow2 internal snapshot", ">= 1.0",
                  m["internal"] / m["batch"], blocks=nblocks, **iops),
        ratio_row("S3b", "CoW after snapshot: thin write_many vs qcow2 external overlay", ">= 1.0",
                  m["overlay"] / m["batch"]),
        ratio_row("S3c", "CoW after snapshot: thin per-call write vs qcow2 internal snapshot", ">= 1.0",
                  m["internal"] / m["call"]),
    ], res


# ----------------------------------------------------------------------------- S4
def s4(sc: Scratch, full: bool) -> tuple[list[Row], dict]:
    nblocks = 16384 if full else 4096
    n = 20000 if full else 5000
    reps = 5 if full else 3
    loops = 10  # read_many of n offsets is only milliseconds: repeat it inside each sample
    depths = [1, 10, 50, 100]
    path, p = engine.build_chain(sc, nblocks, 100, seed=14)
    rng = np.random.default_rng(15)
    offs = rng.integers(0, nblocks * BS // IO, n).astype(np.int64) * IO
    offs_l = offs.tolist()
    have_q = qemu.available()
    chain = []
    if have_q:
        size = nblocks * BS
        base = sc.path("chain-base.qcow2")
        qemu.create(base, size)
        qemu.fill(base, size)
        prev = base
        nchurn = max(1, nblocks // 100)
        for d in range(1, 101):
            img = sc.path(f"chain-{d}.qcow2")
            qemu.create(img, size, backing=prev)
            blocks = rng.choice(nblocks, nchurn, replace=False)
            qemu.run_script(img, qemu.writes((blocks * BS + rng.integers(0, 16, nchurn) * IO).tolist(), IO, d % 250))
            chain.append(img)
            prev = img
    vols = {d: p.thin(f"s{d}") for d in depths}
    sides = {}
    batch, call = read_sides(offs, IO, loops)
    for d in depths:
        sides[f"thin{d}"] = batch(vols[d])
        sides[f"call{d}"] = call(vols[d])
        if have_q:
            sides[f"qcow{d}"] = (lambda img: lambda _r: qemu.timed_script(img, qemu.reads(offs_l, IO)))(chain[d - 1])
    res = interleave(sides, reps)
    p.close()
    sc.remove(path)
    for img in chain:
        qemu.remove(img)
    if have_q:
        qemu.remove(base)
    m = {k: med(v) for k, v in res.items()}
    rows = [ratio_row("S4", "random 4 KiB reads: thin depth 100 vs depth 1 (read_many)", ">= 0.9",
                      m["thin1"] / m["thin100"],
                      **{f"thin_d{d}_iops": n / m[f"thin{d}"] for d in depths})]
    rows.append(ratio_row("S4+", "random 4 KiB reads: thin depth 100 vs depth 1 (per-call read)", ">= 0.9",
                          m["call1"] / m["call100"], **{f"call_d{d}_iops": n / m[f"call{d}"] for d in depths}))
    if have_q:
        for d in depths:
            rows.append(ratio_row(f"S4.{d}", f"random 4 KiB reads at depth {d}: thin (per-call read) vs qcow2 chain",
                                  ">= 1.0", m[f"qcow{d}"] / m[f"call{d}"], qcow2_iops=n / m[f"qcow{d}"],
                                  thin_call_iops=n / m[f"call{d}"], thin_batch_iops=n / m[f"thin{d}"]))
    else:
        rows.append(missing_row("S4.q", "qcow2 backing chains", "qemu-io"))
    return rows, {"depths": depths, "n": n, "medians": m}


# ----------------------------------------------------------------------------- S5 / S6
def size_pools(sc: Scratch, sizes: list[int]):
    from thinpool import Pool
    pools = {}
    for n in sizes:
        md = synthetic_metadata(n + 65536, [n], vspan_factor=2.0, seed=16)
        path = sc.path(f"sz{n}")
        Pool.from_metadata(path, md, names={1: "v"}).close()
        pools[n] = (path, md.devices[0].vblocks.astype(np.int64))
    return pools


def s5_s6(sc: Scratch, full: bool) -> tuple[list[Row], dict]:
    from thinpool import Pool
    sizes = [1_000, 10_000, 100_000, 1_000_000]
    pools = size_pools(sc, sizes)
    reps = 21 if full else 9
    out: dict = {"sizes": sizes}
    rows: list[Row] = []
    # library snapshot / commit / delete, sizes interleaved
    opened = {n: Pool.open(pools[n][0]) for n in sizes}
    free_vb = {}
    for n in sizes:
        vblocks = opened[n].thin("v").size // BS
        cand = np.setdiff1d(np.arange(min(2 * n + 4096, vblocks), dtype=np.int64), pools[n][1])
        free_vb[n] = np.random.default_rng(17).permutation(cand)
    cnt = {"i": 0}
    buf = np.full(IO, 9, np.uint8)

    def lib_snap(n):
        def run(_r):
            p = opened[n]
            cnt["i"] += 1
            name = f"l{cnt['i']}"
            with p.batch():  # the messages alone (each would commit on its own); one commit at the end
                t = timed(lambda: p.snapshot("v", name))
                t2 = timed(lambda: p.delete(name))
            out.setdefault("delete_snap", {}).setdefault(n, []).append(t2)
            return t
        return run

    def commit(n):
        def run(r):
            p = opened[n]
            p.thin("v").write(int(free_vb[n][r]) * BS, buf)
            return timed(p.commit)
        return run

    def delete_vol(n):
        def run(_r):
            p = opened[n]
            try:
                with p.batch():  # the delete alone, then dropped: leaving a batch by an exception aborts it
                    t = timed(lambda: p.delete("v"))
                    raise _Undo
            except _Undo:
                pass
            return t
        return run

    snap = interleave({n: lib_snap(n) for n in sizes}, reps)
    com = interleave({n: commit(n) for n in sizes}, reps)
    dele = interleave({n: delete_vol(n) for n in sizes}, max(3, reps // 3))
    for p in opened.values():
        p.close()
    ms = {n: med(snap[n]) for n in sizes}
    mc = {n: med(com[n]) for n in sizes}
    md_ = {n: med(dele[n]) for n in sizes}
    mds = {n: med(out["delete_snap"][n]) for n in sizes}
    out.update(lib_snapshot=ms, commit=mc, delete_volume=md_, delete_snapshot=mds)
    rows.append(ratio_row("S5a", "snapshot creation (library): 1M vs 1K mapped blocks", "<= 2", ms[sizes[-1]] / ms[sizes[0]],
                          **{f"us_{n}": ms[n] * 1e6 for n in sizes}))
    # CLI snapshot
    if cli_available():
        cli = {}

        def cli_snap(n):
            def run(_r):
                cnt["i"] += 1
                return run_cli("snapshot", pools[n][0], "v", f"c{cnt['i']}")
            return run
        run_cli("status", pools[sizes[0]][0])  # warm the kernel cache
        cli = interleave({n: cli_snap(n) for n in sizes}, max(3, reps // 3))
        mcli = {n: med(cli[n]) for n in sizes}
        out["cli_snapshot"] = mcli
        rows.append(ratio_row("S5b", "snapshot creation (CLI process): 1M vs 1K mapped blocks", "<= 2",
                              mcli[sizes[-1]] / mcli[sizes[0]], **{f"ms_{n}": mcli[n] * 1e3 for n in sizes}))
    else:
        rows.append(Row("S5b", "snapshot creation (CLI)", {}, None, "", "missing", note="thinpool.cli not importable yet"))
    if qemu.available():
        qimgs = {}
        for n in sizes:
            img = sc.path(f"snap{n}.qcow2")
            qemu.create(img, n * BS, prealloc="metadata")
            qimgs[n] = img
        qc = {"i": 0}

        def qsnap(n):
            def run(_r):
                qc["i"] += 1
                return qemu.snapshot_create(qimgs[n], f"q{qc['i']}")
            return run
        q = interleave({n: qsnap(n) for n in sizes}, max(3, reps // 3))
        mq = {n: med(q[n]) for n in sizes}
        out["qemu_snapshot"] = mq
        for img in qimgs.values():
            qemu.remove(img)
        rows.append(Row("S5c", "qemu-img snapshot -c (qcow2, all clusters allocated): 1M vs 1K clusters",
                        {f"ms_{n}": mq[n] * 1e3 for n in sizes}, mq[sizes[-1]] / mq[sizes[0]], "", "info"))
        if "cli_snapshot" in out:
            mcli = out["cli_snapshot"]
            rows.append(ratio_row("S5d", "snapshot at 1M mapped: thinpool CLI vs qemu-img snapshot -c", "<= 1.0",
                                  mcli[sizes[-1]] / mq[sizes[-1]],
                                  note="ratio = thinpool time / qemu-img time (lower is better)"))
    else:
        rows.append(missing_row("S5c", "qemu-img snapshot -c", "qemu-img"))
    rows.append(ratio_row("S6a", "commit() after one 4 KiB write: 1M vs 1K mappings", "<= 3", mc[sizes[-1]] / mc[sizes[0]],
                          **{f"ms_{n}": mc[n] * 1e3 for n in sizes}))
    rows.append(ratio_row("S6b", "delete a snapshot (all blocks shared): 1M vs 1K mapped", "<= 2",
                          mds[sizes[-1]] / mds[sizes[0]], **{f"us_{n}": mds[n] * 1e6 for n in sizes}))
    rows.append(Row("S6c", "delete a volume (all blocks exclusive, freed): cost vs mapped blocks",
                    {**{f"ms_{n}": md_[n] * 1e3 for n in sizes},
                     "ns_per_block_1M": md_[sizes[-1]] / sizes[-1] * 1e9},
                    md_[sizes[-1]] / md_[sizes[0]], "", "info", note="proportional to the freed blocks, as dm-thin"))
    for path, _ in pools.values():
        sc.remove(path)
    return rows, out


# ----------------------------------------------------------------------------- S7
def s7(sc: Scratch, full: bool):
    rows, res = engine.bench_alloc(1_000_000, 5 if full else 3, key="S7")
    return rows, res


# ----------------------------------------------------------------------------- S8
def s8(sc: Scratch, full: bool):
    from thinpool import Pool
    if not cli_available():
        return [Row("S8", "CLI latency", {}, None, "", "missing", note="thinpool.cli not importable yet")], {}
    nvol = 10_000
    md = synthetic_metadata(nvol * 16 + 65536, [16] * nvol, vspan_factor=4, seed=18)
    path = sc.path("s8")
    Pool.from_metadata(path, md, metadata_size="512MiB").close()
    reps = 7 if full else 3
    cnt = {"i": 0}
    run_cli("status", path)

    def snap(_r):
        cnt["i"] += 1
        return run_cli("snapshot", path, "dev1", f"cli{cnt['i']}")
    sides = {"pass": lambda _r: wall([sys.executable, "-c", "pass"]),
             "snapshot": snap,
             "ls": lambda _r: run_cli("ls", path),
             "status": lambda _r: run_cli("status", path),
             "ls_usage": lambda _r: run_cli("ls", path, "--usage")}
    res = interleave(sides, reps)
    sc.remove(path)
    m = {k: med(v) for k, v in res.items()}
    rows = [ratio_row("S8a", f"`thinpool snapshot` on a pool with {nvol:,} volumes vs `python -c pass`", "<= 3",
                      m["snapshot"] / m["pass"], snapshot_ms=m["snapshot"] * 1e3, python_pass_ms=m["pass"] * 1e3),
            ratio_row("S8b", "`thinpool ls` (10,000 volumes) vs `python -c pass`", "<= 3", m["ls"] / m["pass"],
                      ls_ms=m["ls"] * 1e3),
            ratio_row("S8c", "`thinpool status` (10,000 volumes) vs `python -c pass`", "<= 3", m["status"] / m["pass"],
                      status_ms=m["status"] * 1e3),
            Row("S8d", "`thinpool ls --usage` (10,000 volumes: walks every volume's mappings) vs `python -c pass`",
                {"ls_usage_ms": m["ls_usage"] * 1e3}, m["ls_usage"] / m["pass"], "", "info")]
    return rows, m


# ----------------------------------------------------------------------------- S9 / I4
_OPEN = r"""
import json, sys, time
t0 = time.perf_counter()
from thinpool import Pool
import psutil
t1 = time.perf_counter()
p = Pool.open(sys.argv[1], read_only=sys.argv[2] == "ro")
t2 = time.perf_counter()
rss = psutil.Process().memory_info().rss
s = p.status()
t3 = time.perf_counter()
u = p.usage()
t4 = time.perf_counter()
rss2 = psutil.Process().memory_info().rss
print(json.dumps(dict(import_s=t1 - t0, open_s=t2 - t1, status_s=t3 - t2, usage_s=t4 - t3, rss=rss, rss_after_usage=rss2)))
"""


def dump_rows(sc: Scratch, path: str, key: str, label: str, reps: int) -> tuple[list[Row], dict]:
    """`thinpool dump` and `thinpool export-metadata` vs `thin_dump` on the exported metadata."""
    rows = []
    res: dict = {}
    if not cli_available():
        return [Row(key, f"{label}: dump", {}, None, "", "missing", note="thinpool.cli not importable yet")], res
    meta = sc.path("meta.bin")
    xml_ours, xml_theirs = sc.path("ours.xml"), sc.path("theirs.xml")
    td = find_tool("thin_dump")

    def exp(_r):
        drop_file(meta)
        return run_cli("export-metadata", path, meta)
    sides = {"dump": lambda _r: run_cli("dump", path, "-o", xml_ours), "export": exp}
    if td:
        sides["thin_dump"] = lambda _r: wall([td, meta, "-o", xml_theirs])
        exp(0)
    res = interleave(sides, reps)
    m = {k: med(v) for k, v in res.items()}
    if td:
        same = subprocess.run(["cmp", "-s", xml_ours, xml_theirs]).returncode == 0
        rows.append(ratio_row(f"{key}a", f"{label}: `thinpool dump` vs `thin_dump` (same metadata)", "<= 1.5",
                              m["dump"] / m["thin_dump"], dump_s=m["dump"], thin_dump_s=m["thin_dump"],
                              identical_xml=same))
        rows.append(ratio_row(f"{key}b", f"{label}: `thinpool export-metadata` vs `thin_dump`", "<= 1.5",
                              m["export"] / m["thin_dump"], export_s=m["export"]))
    else:
        rows.append(Row(f"{key}a", f"{label}: dump", {"dump_s": m["dump"], "export_s": m["export"]}, None, "",
                        "missing", note=missing_msg("thin_dump")))
    for f in (meta, xml_ours, xml_theirs):
        drop_file(f)
    return rows, m


def i4(sc: Scratch, full: bool):
    from thinpool import Pool
    md = synthetic_metadata(1_000_000 + 65536, [10_000] * 100, vspan_factor=2, seed=19)
    path = sc.path("i4")
    Pool.from_metadata(path, md).close()
    rows, m = dump_rows(sc, path, "I4", "1,000,000 mappings over 100 volumes", 5 if full else 3)
    sc.remove(path)
    return rows, m


def s9(sc: Scratch, full: bool):
    from thinpool import Pool
    nvol = 10_000
    per = 1000 if full else 200
    total = nvol * per
    nr = TiB // BS
    path = sc.path("s9")
    t0 = clock()
    md = synthetic_metadata(nr, [per] * nvol, vspan_factor=4, seed=20)
    Pool.from_metadata(path, md, metadata_size="4GiB").close()
    del md
    build = clock() - t0
    reps = 3
    import json
    opens: dict[str, list[dict]] = {"ro": [], "rw": []}
    for _ in range(reps):
        for mode in ("ro", "rw"):
            r = subprocess.run([sys.executable, "-c", _OPEN, path, mode], capture_output=True, text=True, check=True)
            opens[mode].append(json.loads(r.stdout))
    o = {k: med([x[k] for x in opens["ro"]]) for k in opens["ro"][0]}
    orw = {k: med([x[k] for x in opens["rw"]]) for k in opens["rw"][0]}
    label = f"1 TiB pool, {nvol:,} volumes, {total:,} mappings"
    rows = [Row("S9a", f"{label}: open (read-only, fresh process)", {"open_s": o["open_s"], "build_s": build},
                o["open_s"], "<= 1", note="absolute target (ratio column = seconds)").judge(),
            Row("S9a+", f"{label}: open (read-write, fresh process)", {"open_s": orw["open_s"],
                                                                        "rss_MiB": orw["rss"] / MiB},
                orw["open_s"], "<= 1", note="absolute target (ratio column = seconds)").judge(),
            Row("S9b", f"{label}: RSS after open", {"rss_MiB": o["rss"] / MiB,
                                                     "rss_after_usage_MiB": o["rss_after_usage"] / MiB},
                o["rss"] / GiB, "<= 1", note="absolute target (ratio column = GiB)").judge(),
            Row("S9c", f"{label}: library status() / usage() of all volumes",
                {"status_ms": o["status_s"] * 1e3, "usage_s": o["usage_s"]}, None, "", "info")]
    if cli_available():
        res = interleave({"pass": lambda _r: wall([sys.executable, "-c", "pass"]),
                          "status": lambda _r: run_cli("status", path), "ls": lambda _r: run_cli("ls", path)}, reps)
        m = {k: med(v) for k, v in res.items()}
        rows.append(Row("S9d", f"{label}: `thinpool status` / `thinpool ls` wall time",
                        {"status_s": m["status"], "ls_s": m["ls"], "python_pass_s": m["pass"]},
                        m["status"] / m["pass"], "", "info", note="ratio = status / python -c pass"))
        r2, _ = dump_rows(sc, path, "S9e", label, 1 if not full else 3)
        rows += r2
    sc.remove(path)
    return rows, {"ro": o, "rw": orw}


def i7(sc: Scratch, full: bool):
    """Hook for I7 (fio over NBD): perf/nbd.py provides run(scratch, full) -> (rows, detail)."""
    try:
        mod = importlib.import_module("perf.nbd")
    except ImportError:
        return [Row("I7", "fio over NBD: thinpool serve vs qemu-nbd+qcow2 vs nbdkit file", {}, None, ">= 1.0",
                    "skipped", note="left for the NBD engineer: add perf/nbd.py with run(scratch, full)")], {}
    return mod.run(sc, full)


def m1(sc: Scratch, full: bool):
    """M1: metadata blocks per million mappings, ours vs dm-thin's (perf/metadata.py)."""
    from . import metadata
    return metadata.run(sc, full)


def c1(sc: Scratch, full: bool):
    """C1-C3: cold start, the first and a warm `thinpool demo` (perf/coldstart.py)."""
    from . import coldstart
    return coldstart.run(full, sc)


def anchors(sc: Scratch, full: bool):
    """A: F1-F3 batch I/O vs fio, P1-P5 per call vs the Python loop, CF1-CF2 commit vs the fsync floor
    (perf/anchors.py)."""
    from . import anchors as mod
    return mod.suite_step(sc, full)


def s10(sc: Scratch, full: bool):
    """S10: 100,000 volumes and 100,000,000 mappings (perf/scale.py; quick mode at scale 0.01)."""
    from . import scale
    return scale.run_step(sc, full)


STEPS = {"S1": s1_s2, "S3": s3, "S4": s4, "S5": s5_s6, "S7": s7, "S8": s8, "S9": s9, "S10": s10, "I4": i4, "I7": i7,
         "M1": m1, "C1": c1, "A": anchors}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="bigger sizes, more repeats (S9 at 10,000,000 mappings)")
    ap.add_argument("--only", help="comma-separated steps: " + ",".join(STEPS) + ",E (engine)")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine ratios")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.md and plots")
    ap.add_argument("--workdir", help="where sparse files go (default $THINPOOL_PERF_DIR or the temp dir)")
    a = ap.parse_args(argv)
    if a.workdir:
        os.environ["THINPOOL_PERF_DIR"] = a.workdir
    only = set(a.only.split(",")) if a.only else None
    m = machine()
    m["peers"] = {t: tool_version(t) for t in ("qemu-img", "thin_dump")}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in m.items()), flush=True)
    for t in ("qemu-img", "qemu-io", "thin_dump"):
        if not find_tool(t):
            print("WARNING: " + missing_msg(t), flush=True)
    byte_compile()
    start = clock()
    sections: dict[str, list[Row]] = {}
    detail: dict = {}
    with Scratch() as sc:
        engine._warm_jit(sc)
        if not a.no_engine and (only is None or "E" in only):
            rows, raw = engine.run(a.full, sc)
            sections["engine"] = rows
            detail["engine"] = raw
        suite: list[Row] = []
        for name, fn in STEPS.items():
            if only and name not in only:
                continue
            log(f"perf: {name} ...")
            t0 = clock()
            try:
                rows, d = fn(sc, a.full)
            except Exception as exc:
                traceback.print_exc()
                rows, d = [Row(name, "error", {}, None, "", "error", note=repr(exc)[:300])], {}
            for r in rows:
                print(r.line(), flush=True)
            log(f"perf: {name} took {clock() - t0:.0f} s")
            suite += rows
            detail[name] = d
        sections["suite"] = suite
    elapsed = clock() - start
    all_rows = [r for rs in sections.values() for r in rs]
    print(f"\n{'row':<10} {'ratio':>9}  {'target':<8} status")
    for r in all_rows:
        print(f"{r.key:<10} {(f'{r.ratio:.3g}' if r.ratio is not None else '-'):>9}  {r.target:<8} {r.status:<7} "
              f"{r.title}")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    mode = "full" if a.full else "quick"
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "mode": mode, "elapsed_s": elapsed,
              "machine": m, "sections": {k: [r.as_dict() for r in v] for k, v in sections.items()},
              "detail": _small(detail)}
    out = os.path.join(REPO, "perf", "results", f"{stamp}{'' if mode == 'quick' else '-full'}.json")
    save_json(out, result)
    print(f"results: {out}")
    if not a.no_docs:
        from .report import write_docs
        if mode == "quick":
            result["latest_full_scale"] = _latest_full_scale()
        write_docs(result, os.path.join(REPO, "docs"))
        print("docs: docs/performance.md, docs/perf-*.png")
    return 0


def _latest_full_scale() -> dict | None:
    """S9 rows of the newest perf/results/*-full.json (quick mode runs S9 at a fifth of the size)."""
    import glob
    import json
    for path in sorted(glob.glob(os.path.join(REPO, "perf", "results", "*-full.json")), reverse=True):
        with open(path) as f:
            res = json.load(f)
        rows = [r for r in res.get("sections", {}).get("suite", []) if r["key"].startswith("S9")]
        if rows:
            return {"date": res["date"], "rows": rows}
    return None


def _small(obj, depth=0):
    """Keep the JSON small: medians of lists, recurse into dicts."""
    if isinstance(obj, dict):
        return {str(k): _small(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(x, (int, float)) for x in obj) and any(isinstance(x, float) for x in obj):
            return {"median": float(np.median(obj)), "n": len(obj)}
        return [_small(x, depth + 1) for x in obj][:20]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


if __name__ == "__main__":
    sys.exit(main())
