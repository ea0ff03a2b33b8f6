"""The engine ratios (and import + first call), measured side by side in one run.

    python -m perf.engine [--full] [--json FILE]

1. random 4 KiB first writes into a fresh volume: Thin.write_many and per-call Thin.write vs os.pwrite
   into a plain sparse file at the same offsets with the same bytes (info: judged against fio and, per
   call, on CPU time in perf/anchors.py F1 and P1)
2. snapshot creation: origin with 1,000,000 mapped blocks vs 1,000 (<= 2x)
3. random 4 KiB reads at snapshot depth 100 vs depth 1 (>= 0.9x)
4. commit() after one 4 KiB first write: pool holding 1,000,000 mappings vs 1,000 (<= 3x)
5. kernels_map.allocate_many of 1,000,000 blocks vs the pure-Python allocator of tests/engine/reference.py (>= 50x)
6. 4 KiB writes into shared 64 KiB blocks after a snapshot (CoW break) vs the same file work by hand
   (pread old block, pwrite it to a new block, pwrite the 4 KiB) (>= 0.8x)
8. random 4 KiB reads of a thin on an external origin (unprovisioned: pread of the origin) vs a plain
   thin (provisioned) (info)
plus import + first call in a fresh process, twice (the second must load the numba cache), and two
info rows: random 4 KiB first writes into reused blocks that hold a deleted volume's bytes (zeroed
around the write) vs never-used ones ("reuse"), and Pool.trim of free blocks holding bytes in
one-block runs vs one run ("trim").

Throughput ratios are thin / peer (higher is better); cost ratios are big / small (lower is better).
All sides are interleaved and rotated; figures are medians of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

from .common import (GiB, KiB, MiB, Row, Scratch, drop_file, interleave, log, machine, med, rand_bytes,
                     ratio_row, sparse_file, synthetic_metadata, timed, cow_sampler,
                     read_sides)

BS = 64 * KiB
IO = 4 * KiB


def _warm_jit(sc: Scratch) -> None:
    """Load/compile every kernel the benches use before any timed region."""
    from thinpool import Pool
    path = sc.path("warm")
    with Pool.create(path, data_size="64MiB") as p:
        v = p.create_thin("v", "64MiB")
        v.write(0, b"x" * IO)
        v.write_many([BS, 3 * BS + 5], [b"y" * IO, b"z" * 100])
        v.read(0, IO)
        v.read_many([0, BS], IO)
        s = p.snapshot("v", "s")
        s.write(100, b"q" * 10)
        v.discard(0, BS)
        p.usage()
        p.commit()
        p.delete("s")
    sc.remove(path)


# ----------------------------------------------------------------------------- 1. first writes
def first_write_offsets(vol_size: int, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    blocks = rng.choice(vol_size // BS, n, replace=False).astype(np.int64)
    offs = blocks * BS + rng.integers(0, BS // IO, n) * IO
    return offs, rand_bytes(rng, n, IO)


def bench_first_writes(sc: Scratch, n: int, vol_size: int, repeats: int, key: str = "engine.1") -> tuple[list[Row], dict[str, Any]]:
    from thinpool import Pool
    offs, bufs = first_write_offsets(vol_size, n)
    offs_l = offs.tolist()
    rows = [bufs[i] for i in range(n)]

    def fresh():
        path = sc.path("fw")
        p = Pool.create(path, data_size=vol_size, block_size=BS)
        return path, p, p.create_thin("v", vol_size)

    def thin_batch(_r):
        path, p, v = fresh()
        t = timed(lambda: v.write_many(offs, bufs))
        p.close(commit=False)
        sc.remove(path)
        return t

    def thin_call(_r):
        path, p, v = fresh()
        w = v.write

        def go():
            for o, b in zip(offs_l, rows):
                w(o, b)
        t = timed(go)
        p.close(commit=False)
        sc.remove(path)
        return t

    def raw(_r):
        path = sc.path("raw")
        fd = sparse_file(path, vol_size)
        pw = os.pwrite

        def go():
            for o, b in zip(offs_l, rows):
                pw(fd, b, o)
        t = timed(go)
        os.close(fd)
        drop_file(path)
        return t

    res = interleave({"batch": thin_batch, "call": thin_call, "raw": raw}, repeats)
    tb, tc, tr = med(res["batch"]), med(res["call"]), med(res["raw"])
    common = dict(n=n, volume=f"{vol_size // GiB} GiB")
    return [
        # info: the anchors are fio (perf/anchors.py F1) and, per call, P1 there
        ratio_row(f"{key}a", "random 4 KiB first writes: Thin.write_many vs os.pwrite sparse file (info)", "",
                  tr / tb, note="judged against fio in F1",
                  values={"thin_iops": n / tb, "raw_iops": n / tr, **common}),
        ratio_row(f"{key}b", "random 4 KiB first writes: per-call Thin.write vs os.pwrite sparse file (info)", "",
                  tr / tc, note="judged in P1 (CPU time)",
                  values={"thin_iops": n / tc, "raw_iops": n / tr, "us_per_write": tc / n * 1e6, **common}),
    ], res


# ----------------------------------------------------------------------------- 2. snapshot creation
def bench_snapshot(sc: Scratch, big: int, small: int, repeats: int, key: str = "engine.2") -> tuple[list[Row], dict[str, Any]]:
    from thinpool import Pool
    nr = big + small + 65536
    md = synthetic_metadata(nr, [big, small], vspan_factor=1.5, seed=2)
    path = sc.path("snap")
    t0 = timed(lambda: Pool.from_metadata(path, md, names={1: "big", 2: "small"}).close())
    p = Pool.open(path)
    n = {"i": 0}

    def side(origin):
        def run(_r):
            n["i"] += 1
            name = f"s{n['i']}"
            with p.batch():  # the message alone; its commit comes at the batch's end (untimed)
                t = timed(lambda: p.snapshot(origin, name))
                p.delete(name)
            return t
        return run

    def side_commit(origin):
        def run(_r):
            n["i"] += 1
            name = f"s{n['i']}"

            t = timed(lambda: p.snapshot(origin, name))  # a pool message commits
            p.delete(name)
            return t
        return run

    res = interleave({"big": side("big"), "small": side("small")}, repeats)
    resc = interleave({"big": side_commit("big"), "small": side_commit("small")}, max(5, repeats // 10))
    p.close()
    sc.remove(path)
    tb, ts = med(res["big"]), med(res["small"])
    cb, cs = med(resc["big"]), med(resc["small"])
    return [
        ratio_row(key, f"snapshot creation: origin with {big:,} vs {small:,} mapped blocks", "<= 2", tb / ts,
                  big_us=tb * 1e6, small_us=ts * 1e6, build_s=t0),
        Row(f"{key}+", "snapshot + commit (info)", dict(big_ms=cb * 1e3, small_ms=cs * 1e3), cb / cs, "",
            "info"),
    ], {"snapshot": res, "snapshot+commit": resc}


# ----------------------------------------------------------------------------- 3. read depth
def build_chain(sc: Scratch, nblocks: int, depth: int, churn: float = 0.01, seed: int = 3):
    """base volume fully written (64 KiB random blocks), then snapshots s1..s<depth>, each a snapshot
    of the previous one with ``churn`` of its blocks rewritten by 4 KiB writes."""
    from thinpool import Pool
    rng = np.random.default_rng(seed)
    path = sc.path("chain")
    size = nblocks * BS
    nchurn = max(1, int(nblocks * churn))
    p = Pool.create(path, data_size=(nblocks + depth * nchurn + 1024) * BS, block_size=BS)
    base = p.create_thin("base", size)
    chunk = 256
    for i in range(0, nblocks, chunk):
        k = min(chunk, nblocks - i)
        base.write_many(np.arange(i, i + k, dtype=np.int64) * BS, rand_bytes(rng, k, BS))
    prev = "base"
    with p.batch():  # one commit for the whole chain
        for d in range(1, depth + 1):
            s = p.snapshot(prev, f"s{d}")
            blocks = rng.choice(nblocks, nchurn, replace=False)
            s.write_many(blocks * BS + rng.integers(0, BS // IO, nchurn) * IO, rand_bytes(rng, nchurn, IO))
            prev = f"s{d}"
    return path, p


def bench_read_depth(sc: Scratch, nblocks: int, n: int, repeats: int, key: str = "engine.3") -> tuple[list[Row], dict[str, Any]]:
    path, p = build_chain(sc, nblocks, 100)
    rng = np.random.default_rng(4)
    offs = rng.integers(0, nblocks * BS // IO, n).astype(np.int64) * IO
    d1, d100 = p.thin("s1"), p.thin("s100")
    batch, call = read_sides(offs, IO)  # one read_many is only milliseconds: 5 inside each sample

    res = interleave({"d1": batch(d1), "d100": batch(d100)}, repeats)
    resc = interleave({"d1": call(d1), "d100": call(d100)}, repeats)
    p.close()
    sc.remove(path)
    t1, t100 = med(res["d1"]), med(res["d100"])
    c1, c100 = med(resc["d1"]), med(resc["d100"])
    return [
        ratio_row(key, "random 4 KiB reads (read_many): snapshot depth 100 vs depth 1", ">= 0.9", t1 / t100,
                  depth1_iops=n / t1, depth100_iops=n / t100, volume=f"{nblocks * BS // MiB} MiB"),
        ratio_row(f"{key}+", "random 4 KiB reads (per-call read): depth 100 vs depth 1", ">= 0.9", c1 / c100,
                  depth1_iops=n / c1, depth100_iops=n / c100),
    ], {"read_many": res, "read": resc}


# ----------------------------------------------------------------------------- 4. commit cost
def bench_commit(sc: Scratch, big: int, small: int, repeats: int, key: str = "engine.4") -> tuple[list[Row], dict[str, Any]]:
    from thinpool import Pool
    nr = big + 65536 * 2
    pools = {}
    free_vb = {}
    for label, count in (("big", big), ("small", small)):
        md = synthetic_metadata(nr, [count], vspan_factor=2.0, seed=5)
        path = sc.path(f"commit-{label}")
        Pool.from_metadata(path, md, names={1: "v"}).close()
        p = Pool.open(path)
        v = p.thin("v")
        mapped = md.devices[0].vblocks.astype(np.int64)
        cand = np.setdiff1d(np.arange(min(max(2 * count, 4096), v.size // BS), dtype=np.int64), mapped)
        free_vb[label] = np.random.default_rng(6).permutation(cand)
        pools[label] = (path, p, v)
    buf = np.full(IO, 7, np.uint8)

    def side(label):
        def run(r):
            _path, p, v = pools[label]
            v.write(int(free_vb[label][r]) * BS, buf)
            return timed(p.commit)
        return run

    res = interleave({"big": side("big"), "small": side("small")}, repeats)
    for path, p, _v in pools.values():
        p.close()
        sc.remove(path)
    tb, ts = med(res["big"]), med(res["small"])
    return [ratio_row(key, f"commit() after one 4 KiB write: pool with {big:,} vs {small:,} mappings", "<= 3",
                      tb / ts, big_ms=tb * 1e3, small_ms=ts * 1e3)], res


# ----------------------------------------------------------------------------- 5. allocator
def alloc_state(nr_blocks: int, used_frac: float = 0.3, freed_frac: float = 0.05, seed: int = 7):
    from thinpool import schema as K
    rng = np.random.default_rng(seed)
    cap = -(-nr_blocks // 1024) * 1024
    data_rc = np.zeros(cap, np.uint32)
    used = rng.random(nr_blocks) < used_frac
    data_rc[:nr_blocks][used] = 1
    freed = np.zeros(cap, np.uint8)
    freed[:nr_blocks][(~used) & (rng.random(nr_blocks) < freed_frac)] = 1
    st = np.zeros(K.ST_SIZE, np.int64)
    st[K.ST_NR_BLOCKS] = nr_blocks
    st[K.ST_CURSOR] = int(rng.integers(0, nr_blocks))
    nfree = int(np.count_nonzero(data_rc[:nr_blocks] == 0))
    st[K.ST_NR_FREE] = nfree
    st[K.ST_NR_ALLOCATABLE] = nfree - int(np.count_nonzero(freed))
    return data_rc, freed, np.zeros(cap >> K.RC_PAGE_BITS, np.uint8), st


def bench_alloc(count: int, repeats: int, key: str = "engine.5") -> tuple[list[Row], dict[str, Any]]:
    from thinpool import kernels_map as K

    from tests.engine.reference import ReferenceAllocator
    state = alloc_state(int(count * 1.6))
    out = np.empty(count, np.int64)
    K.allocate_many(tuple(a.copy() for a in state[:3]), state[3].copy(), 10, out)  # JIT warm
    seqs: dict[str, Any] = {}

    def jit(_r):
        a = [x.copy() for x in state]
        t = timed(lambda: K.allocate_many((a[0], a[1], a[2]), a[3], count, out))
        seqs["jit"] = out.copy()
        return t

    def ref(_r):
        alloc = ReferenceAllocator.from_kernel_state(*state)
        got = []
        t = timed(lambda: got.append(alloc.allocate_many(count)))
        seqs["ref"] = got[0]
        return t

    res = interleave({"jit": jit, "ref": ref}, repeats)
    same = np.array_equal(seqs["jit"], np.array(seqs["ref"], np.int64))
    tj, tr = med(res["jit"]), med(res["ref"])
    return [ratio_row(key, f"allocate {count:,} blocks: kernels_map.allocate_many vs pure-Python reference", ">= 50",
                      tr / tj, jit_ms=tj * 1e3, python_ms=tr * 1e3, same_sequence=bool(same))], res


# ----------------------------------------------------------------------------- 6. CoW break
def bench_cow(sc: Scratch, nblocks: int, repeats: int, key: str = "engine.6") -> tuple[list[Row], dict[str, Any]]:
    from thinpool import Pool
    rng = np.random.default_rng(8)
    path = sc.path("cow")
    # room for the origin, this repeat's copies and the previous repeat's (blocks freed by a commit
    # stay reserved until the next one): no implicit commit inside the timed writes
    p = Pool.create(path, data_size=(3 * nblocks + 1024) * BS, block_size=BS)
    o = p.create_thin("o", nblocks * BS)
    hand_path = sc.path("cow-hand")
    fd = sparse_file(hand_path, 2 * nblocks * BS)
    chunk = 256
    for i in range(0, nblocks, chunk):
        k = min(chunk, nblocks - i)
        data = rand_bytes(rng, k, BS)
        o.write_many(np.arange(i, i + k, dtype=np.int64) * BS, data)
        os.pwrite(fd, data.tobytes(), i * BS)
    p.commit()
    order = rng.permutation(nblocks).astype(np.int64)
    inblk = rng.integers(0, BS // IO, nblocks) * IO
    offs = order * BS + inblk
    bufs = rand_bytes(rng, nblocks, IO)
    rows = [bufs[i] for i in range(nblocks)]
    order_l, inblk_l = order.tolist(), inblk.tolist()

    def thin(batch):
        return cow_sampler(p, "o", offs, bufs, batch)

    def hand(_r):
        pr, pw = os.pread, os.pwrite

        def go():
            dst = nblocks
            for src, ib, b in zip(order_l, inblk_l, rows):
                old = pr(fd, BS, src * BS)
                pw(fd, old, dst * BS)
                pw(fd, b, dst * BS + ib)
                dst += 1
        t = timed(go)
        from thinpool.datadev import _libc
        _libc.fallocate(fd, 0x03, nblocks * BS, nblocks * BS)  # punch the copies (untimed)
        return t

    res = interleave({"batch": thin(True), "call": thin(False), "hand": hand}, repeats)
    p.close()
    os.close(fd)
    sc.remove(path)
    drop_file(hand_path)
    tb, tc, th = med(res["batch"]), med(res["call"]), med(res["hand"])
    return [
        ratio_row(key, "4 KiB writes into shared 64 KiB blocks (CoW): Thin.write_many vs by hand", ">= 0.8",
                  th / tb, thin_iops=nblocks / tb, hand_iops=nblocks / th, blocks=nblocks),
        ratio_row(f"{key}+", "CoW break, per-call Thin.write vs by hand", ">= 0.8", th / tc,
                  thin_iops=nblocks / tc, hand_iops=nblocks / th),
    ], res


# ----------------------------------------------------------------------------- 8. external origin
def bench_origin_reads(sc: Scratch, nblocks: int, n: int, repeats: int, key: str = "engine.8") -> tuple[list[Row], dict[str, Any]]:
    """Random 4 KiB reads of a volume on an external origin (every block unprovisioned: each read is a
    pread of the origin file from compiled code) vs the same reads of a plain thin whose blocks are all
    provisioned (copied from the data file's memory map).  Info: the price of the origin path."""
    from thinpool import Pool
    rng = np.random.default_rng(9)
    path = sc.path("origin")
    golden = sc.path("golden.img")
    size = nblocks * BS
    fd = sparse_file(golden, size)
    p = Pool.create(path, data_size=size + 64 * BS, block_size=BS)
    plain = p.create_thin("plain", size)
    for i in range(0, nblocks, 256):
        k = min(256, nblocks - i)
        data = rand_bytes(rng, k, BS)
        plain.write_many(np.arange(i, i + k, dtype=np.int64) * BS, data)
        os.pwrite(fd, data.tobytes(), i * BS)
    os.close(fd)
    p.commit()
    ext = p.create_thin("ext", size, external_origin=golden)
    offs = rng.integers(0, size // IO, n).astype(np.int64) * IO
    assert ext.read_many(offs[:64], IO).tobytes() == plain.read_many(offs[:64], IO).tobytes()
    batch, call = read_sides(offs, IO)  # one read_many is only milliseconds: 5 inside each sample

    res = interleave({"plain": batch(plain), "ext": batch(ext)}, repeats)
    resc = interleave({"plain": call(plain), "ext": call(ext)}, repeats)
    p.close()
    sc.remove(path)
    drop_file(golden)
    tp, te = med(res["plain"]), med(res["ext"])
    cp, ce = med(resc["plain"]), med(resc["ext"])
    return [
        ratio_row(key, "random 4 KiB reads (read_many): external-origin thin (unprovisioned) vs plain thin "
                  "(provisioned) (info)", "", tp / te, origin_iops=n / te, plain_iops=n / tp,
                  volume=f"{size // MiB} MiB"),
        ratio_row(f"{key}+", "random 4 KiB reads (per-call read): external-origin vs plain thin (info)", "",
                  cp / ce, origin_iops=n / ce, plain_iops=n / cp),
    ], {"read_many": res, "read": resc}


# ----------------------------------------------------------------------------- freed blocks: reuse and trim
def _stale_pool(sc: Scratch, name: str, nblocks: int, stale: bool):
    """A pool of ``nblocks`` blocks; with ``stale`` every block held a deleted volume's 4 KiB and is
    allocatable again (two commits), else none was ever used."""
    from thinpool import Pool
    path = sc.path(name)
    p = Pool.create(path, data_size=nblocks * BS, block_size=BS)
    if stale:
        old = p.create_thin("old", nblocks * BS)
        old.write_many(np.arange(nblocks, dtype=np.int64) * BS, np.full((nblocks, IO), 0xEE, np.uint8))
        p.commit()
        p.delete("old")
        p.commit()
        p.commit()
    return path, p


def bench_reuse(sc: Scratch, nblocks: int, repeats: int, key: str = "engine.reuse") -> tuple[list[Row], dict[str, Any]]:
    """First 4 KiB writes at random offsets: every block reused (may hold old bytes: written whole,
    zeroes around the data) vs never used (a hole: the 4 KiB alone)."""
    rng = np.random.default_rng(21)
    offs = rng.permutation(nblocks).astype(np.int64) * BS + rng.integers(0, BS // IO, nblocks) * IO
    bufs = rand_bytes(rng, nblocks, IO)

    def side(stale: bool):
        def run(r):
            path, p = _stale_pool(sc, f"reuse-{int(stale)}-{r}", nblocks, stale)
            v = p.create_thin("v", nblocks * BS)
            t = timed(lambda: v.write_many(offs, bufs))
            p.close(commit=False)
            sc.remove(path)
            return t
        return run

    res = interleave({"fresh": side(False), "reused": side(True)}, repeats)
    tf, tr = med(res["fresh"]), med(res["reused"])
    return [Row(key, "random 4 KiB first writes: blocks reused after a delete (zeroed around) vs never used (info)",
                {"reused_iops": round(nblocks / tr), "fresh_iops": round(nblocks / tf), "n": nblocks},
                tr / tf, "", "info", note="ratio = reused time / fresh time")], res


def bench_trim(sc: Scratch, nblocks: int, repeats: int, key: str = "engine.trim") -> tuple[list[Row], dict[str, Any]]:
    """Pool.trim of ``nblocks`` free blocks holding bytes: in one-block runs (every other block, two
    volumes written in turn, one deleted) vs one run (one volume deleted); and a trim with nothing to
    punch (the SEEK_DATA walk alone)."""
    from thinpool import Pool
    buf = np.full(IO, 0x5A, np.uint8)

    def build(r: int, fragmented: bool):
        path = sc.path(f"trim-{int(fragmented)}-{r}")
        p = Pool.create(path, data_size=2 * nblocks * BS, block_size=BS)
        a, b = p.create_thin("a", nblocks * BS), p.create_thin("b", nblocks * BS)
        if fragmented:
            for i in range(nblocks):
                a.write(i * BS, buf)
                b.write(i * BS, buf)
        else:
            offs = np.arange(nblocks, dtype=np.int64) * BS
            a.write_many(offs, np.tile(buf, (nblocks, 1)))
            b.write_many(offs, np.tile(buf, (nblocks, 1)))
        p.commit()
        p.delete("a")
        p.commit()
        p.commit()
        return path, p

    empty: list[float] = []

    def side(fragmented: bool):
        def run(r):
            path, p = build(r, fragmented)
            got = []
            t = timed(lambda: got.append(p.trim()))
            assert got[0].punched_blocks == nblocks, got[0]
            if fragmented and r == 0:
                empty.append(timed(p.trim))
            p.close(commit=False)
            sc.remove(path)
            return t
        return run

    res = interleave({"fragmented": side(True), "contiguous": side(False)}, repeats)
    tf, tc = med(res["fragmented"]), med(res["contiguous"])
    return [Row(key, f"Pool.trim of {nblocks:,} free blocks holding bytes: one-block runs vs one run (info)",
                {"fragmented_blocks_per_s": round(nblocks / tf), "contiguous_blocks_per_s": round(nblocks / tc),
                 "fragmented_ms": round(tf * 1e3, 1), "contiguous_ms": round(tc * 1e3, 1),
                 "nothing_to_punch_ms": round(empty[0] * 1e3, 2)},
                tf / tc, "", "info", note="ratio = fragmented time / contiguous time")], res


# ----------------------------------------------------------------------------- startup
_STARTUP = r"""
import json, os, sys, tempfile, time
t0 = time.perf_counter()
import thinpool
from thinpool import Pool
t1 = time.perf_counter()
d = tempfile.mkdtemp()
p = Pool.create(os.path.join(d, "p"), data_size="64MiB")
v = p.create_thin("v", "64MiB")
v.write(0, b"x" * 4096)
v.write_many([65536], [b"y" * 4096])
v.read(0, 4096)
v.read_many([0], 4096)
s = p.snapshot("v", "s")
s.write(10, b"z")
v.discard(0, 65536)
p.usage()
p.commit()
p.delete("s")
p.close()
t2 = time.perf_counter()
import shutil; shutil.rmtree(d)
print("RESULT " + json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1}))
"""


def _run_startup(env: dict[str, str]) -> dict:
    r = subprocess.run([sys.executable, "-c", _STARTUP], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    res = {}
    saved = loaded = 0
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
        elif "[cache] data saved" in line:
            saved += 1
        elif "[cache] data loaded" in line:
            loaded += 1
    res.update(compiled=saved, loaded_from_cache=loaded)
    return res


def bench_startup(key: str = "engine.7") -> tuple[list[Row], dict[str, Any]]:
    """import + first call in fresh processes: an empty numba cache, then the same cache again."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_DEBUG_CACHE="1")
        first = _run_startup(env)
        second = _run_startup(env)
    env = dict(os.environ, NUMBA_DEBUG_CACHE="1")
    env.pop("NUMBA_CACHE_DIR", None)
    default = _run_startup(env)
    tot = lambda r: r["import_s"] + r["first_call_s"]  # noqa: E731
    ok = second["compiled"] == 0 and second["loaded_from_cache"] > 0
    row = Row(key, "import + first call, fresh process: empty numba cache, then warm cache (2nd process)",
              {"cold_s": tot(first), "cold_compiled": first["compiled"], "warm_s": tot(second),
               "warm_import_s": second["import_s"], "warm_first_call_s": second["first_call_s"],
               "warm_compiled": second["compiled"], "warm_loaded": second["loaded_from_cache"],
               "installed_cache_s": tot(default), "installed_cache_compiled": default["compiled"]},
              tot(first) / tot(second), "", "pass" if ok else "short",
              note="ratio = cold / warm; pass = the second process compiled nothing and loaded from the cache")
    return [row], {"cold": first, "warm": second, "installed": default}


# ----------------------------------------------------------------------------- 8. batched messages
def bench_batch(sc: Scratch, count: int, key: str = "engine.9") -> tuple[list[Row], dict[str, Any]]:
    """``count`` snapshots of one volume: each its own pool message, committing as dm-thin's do, vs
    all inside one ``Pool.batch()`` (one commit at its end).  Info: the cost of the kernel's rule."""
    from thinpool import Pool
    times: dict[str, float] = {}
    for label in ("batched", "one_by_one"):
        path = sc.path(f"batch-{label}")
        p = Pool.create(path, data_size="1GiB", max_thins=count + 16)
        v = p.create_thin("v", "1GiB")
        v.write_many(np.arange(64, dtype=np.int64) * BS, np.full((64, IO), 7, np.uint8))
        p.commit()

        def many(p=p):
            for i in range(count):
                p.snapshot("v", f"s{i}")

        if label == "batched":
            def go(p=p, many=many):
                with p.batch():
                    many()
            times[label] = timed(go)
        else:
            times[label] = timed(many)
        p.close()
        sc.remove(path)
    tb, to = times["batched"], times["one_by_one"]
    return [Row(key, f"{count:,} snapshots: one commit each (dm-thin's rule) vs one Pool.batch() (info)",
                dict(one_by_one_s=to, batched_s=tb, per_message_commit_ms=to / count * 1e3), to / tb, "", "info",
                note="ratio = one by one / batched")], times


# ----------------------------------------------------------------------------- main
def run(full: bool = False, sc: Scratch | None = None, only: set[str] | None = None) -> tuple[list[Row], dict]:
    own = sc is None
    sc = sc or Scratch()
    q = not full
    rows: list[Row] = []
    raw: dict = {}
    try:
        _warm_jit(sc)
        steps = [
            ("1", lambda: bench_first_writes(sc, 5000 if q else 20000, 16 * GiB, 5 if q else 7)),
            ("2", lambda: bench_snapshot(sc, 1_000_000, 1_000, 200 if q else 1000)),
            ("3", lambda: bench_read_depth(sc, 4096 if q else 16384, 20000 if q else 100000, 7 if q else 11)),
            ("4", lambda: bench_commit(sc, 1_000_000, 1_000, 15 if q else 41)),
            ("5", lambda: bench_alloc(1_000_000, 3 if q else 5)),
            ("6", lambda: bench_cow(sc, 2048 if q else 8192, 5 if q else 7)),
            ("7", lambda: bench_startup()),
            ("8", lambda: bench_origin_reads(sc, 4096 if q else 16384, 20000 if q else 100000, 7 if q else 11)),
            ("reuse", lambda: bench_reuse(sc, 4000 if q else 16000, 3 if q else 5)),
            ("trim", lambda: bench_trim(sc, 10000 if q else 50000, 3 if q else 5)),
            ("9", lambda: bench_batch(sc, 1_000 if q else 10_000)),
        ]
        for name, fn in steps:
            if only and name not in only:
                continue
            log(f"engine: running {name} ...")
            try:
                r, detail = fn()
            except Exception as exc:  # a broken bench must not hide the others
                import traceback
                traceback.print_exc()
                r, detail = [Row(f"engine.{name}", "error", {}, None, "", "error", note=repr(exc)[:300])], {}
            for row in r:
                print(row.line(), flush=True)
            rows += r
            raw[name] = detail
    finally:
        if own:
            sc.close()
    return rows, raw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="bigger sizes and more repeats")
    ap.add_argument("--only", help="comma-separated subset of 1..8, reuse, trim")
    ap.add_argument("--json", help="write rows to this JSON file")
    a = ap.parse_args(argv)
    m = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in m.items()))
    rows, _ = run(a.full, only=set(a.only.split(",")) if a.only else None)
    print()
    print(f"{'row':<10} {'ratio':>9}  {'target':<8} status")
    for r in rows:
        print(f"{r.key:<10} {(f'{r.ratio:.3g}x' if r.ratio is not None else '-'):>9}  {r.target:<8} {r.status}"
              f"   {r.title}")
    if a.json:
        from .common import save_json
        save_json(a.json, {"machine": m, "rows": [r.as_dict() for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
