"""S1-S4 of ``python -m perf`` (perf/run.py): a volume's I/O against a raw sparse file and qcow2 --
first writes and overwrites (S1-S2), the first write into each block shared with a snapshot (S3), reads
at snapshot depth 1 to 100 against a qcow2 backing chain (S4)."""

from __future__ import annotations

import os
import subprocess

import numpy as np

from . import engine
from . import qemu
from .common import (GiB, KiB, Row, Scratch, cow_sampler, drop_file, interleave, med, missing_row, rand_bytes,
                     ratio_row, read_sides, sparse_file, timed)

BS = 64 * KiB
IO = 4 * KiB


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
                              "info)", "", m["raw"] / m["batch"], note="judged against fio in F1/F2", values=iops))
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
                  m["internal"] / m["batch"], values={"blocks": nblocks, **iops}),
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
                      values={f"thin_d{d}_iops": n / m[f"thin{d}"] for d in depths})]
    rows.append(ratio_row("S4+", "random 4 KiB reads: thin depth 100 vs depth 1 (per-call read)", ">= 0.9",
                          m["call1"] / m["call100"], values={f"call_d{d}_iops": n / m[f"call{d}"] for d in depths}))
    if have_q:
        for d in depths:
            rows.append(ratio_row(f"S4.{d}", f"random 4 KiB reads at depth {d}: thin (per-call read) vs qcow2 chain",
                                  ">= 1.0", m[f"qcow{d}"] / m[f"call{d}"], qcow2_iops=n / m[f"qcow{d}"],
                                  thin_call_iops=n / m[f"call{d}"], thin_batch_iops=n / m[f"thin{d}"]))
    else:
        rows.append(missing_row("S4.q", "qcow2 backing chains", "qemu-io"))
    return rows, {"depths": depths, "n": n, "medians": m}
