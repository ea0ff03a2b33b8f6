"""S5-S6 of ``python -m perf`` (perf/run.py): what a snapshot, a commit and a delete cost as the
mapped size grows from 1,000 to 1,000,000 blocks -- the library, the CLI and ``qemu-img snapshot -c``."""

from __future__ import annotations

import numpy as np

from . import qemu
from .cli_rows import cli_available, run_cli
from .common import KiB, Row, Scratch, interleave, med, missing_row, ratio_row, synthetic_metadata, timed

BS = 64 * KiB
IO = 4 * KiB


class _Undo(Exception):
    """Raised inside a batch to drop what it did (Pool.batch aborts on an exception)."""

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
                          values={f"us_{n}": ms[n] * 1e6 for n in sizes}))
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
                              mcli[sizes[-1]] / mcli[sizes[0]], values={f"ms_{n}": mcli[n] * 1e3 for n in sizes}))
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
                          values={f"ms_{n}": mc[n] * 1e3 for n in sizes}))
    rows.append(ratio_row("S6b", "delete a snapshot (all blocks shared): 1M vs 1K mapped", "<= 2",
                          mds[sizes[-1]] / mds[sizes[0]], values={f"us_{n}": mds[n] * 1e6 for n in sizes}))
    rows.append(Row("S6c", "delete a volume (all blocks exclusive, freed): cost vs mapped blocks",
                    {**{f"ms_{n}": md_[n] * 1e3 for n in sizes},
                     "ns_per_block_1M": md_[sizes[-1]] / sizes[-1] * 1e9},
                    md_[sizes[-1]] / md_[sizes[0]], "", "info", note="proportional to the freed blocks, as dm-thin"))
    for path, _ in pools.values():
        sc.remove(path)
    return rows, out
