"""T1-T4: trace parsing speed -- records per second of ``thinpool.simulate.traces`` per format.

    python -m perf.traces [--full] [--docs] [--json OUT]

T5: the cost of ``thinpool serve --record`` -- fio's nbd engine against two servers of identical pools,
one recording, side by side (see :func:`record_overhead`).

For each format (T1 fio iolog v3, T2 MSR Cambridge CSV, T3 blkparse text, T4 plain CSV) a synthetic
trace of random 4 KiB..64 KiB reads/writes/discards at offsets up to 1 TiB is written in the scratch
directory (1,000,000 records; --full 4,000,000), then read to the end with ``open_trace(...).chunks()``
(default chunk size) in interleaved repeats (medians), from the page cache; wall-clock and CPU time
(``time.process_time``) of each read are both kept.  Side by side in the same
run: a plain Python reader of the same file (``for line in f: line.split(...)``, ints converted) --
the "Python loop per line" the vectorised reader replaces -- and, for the CSV formats, pyarrow's
multi-threaded CSV reader when pyarrow is installed (conversion to arrays only: no line numbers, no
validation of op words).  Ratio = thinpool records per CPU second / 3,000,000 (the target for fio
iolog and MSR: one core's rate, which a shared machine's wall clock understates);
blkparse and plain CSV rows are informational.  ``--docs`` rewrites the trace section of
docs/performance.md between its markers, nothing else.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import numpy as np

from .common import Row, Scratch, docs_head, finish, interleave, log, machine, med, perf_parser, status_cell

SECTION_BEGIN = "<!-- traces: begin (written by `python -m perf.traces --docs`) -->"
SECTION_END = "<!-- traces: end -->"
TARGET_RPS = 3_000_000
FORMATS = [("T1", "fio-iolog", True), ("T2", "msr", True), ("T3", "blkparse", False), ("T4", "csv", False)]


# ----------------------------------------------------------------------------- synthetic traces
def records(n: int, seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"op": rng.choice(np.array([0, 1, 1, 1, 2]), n),
            "offset": rng.integers(0, 1 << 28, n) * 4096,
            "length": rng.integers(1, 17, n) * 4096,
            "us": np.cumsum(rng.integers(0, 200, n))}


def write_trace(path: str, fmt: str, r: dict[str, np.ndarray]) -> None:
    """Write ``r`` in ``fmt`` (plain Python, 100,000 lines per write)."""
    names = {"fio-iolog": ("read", "write", "trim"), "msr": ("Read", "Write", "Write"),
             "blkparse": ("R", "W", "D"), "csv": ("R", "W", "D")}[fmt]
    op, off, ln, us = (r[k].tolist() for k in ("op", "offset", "length", "us"))
    with open(path, "w") as f:
        if fmt == "fio-iolog":
            f.write("fio version 3 iolog\n0 /dev/nbd0 add\n1 /dev/nbd0 open\n")
        elif fmt == "csv":
            f.write("time,op,offset,length,volume\n")
        for a in range(0, len(op), 100_000):
            b = min(a + 100_000, len(op))
            if fmt == "fio-iolog":
                f.write("".join(f"{us[i]} /dev/nbd0 {names[op[i]]} {off[i]} {ln[i]}\n" for i in range(a, b)))
            elif fmt == "msr":
                f.write("".join(f"{128166372003061629 + us[i] * 10},hm,0,{names[op[i]]},{off[i]},{ln[i]},1500\r\n"
                                for i in range(a, b)))
            elif fmt == "blkparse":
                f.write("".join(f"  8,16   1   {i + 1:>6} {us[i] // 1_000_000:>5}.{us[i] % 1_000_000 * 1000:09d}"
                                f"  4321  Q  {names[op[i]]}S {off[i] // 512} + {ln[i] // 512} [fio]\n"
                                for i in range(a, b)))
            else:
                f.write("".join(f"{us[i] / 1e6:.6f},{names[op[i]]},{off[i]},{ln[i]},vol{op[i] & 1}\n"
                                for i in range(a, b)))


# ----------------------------------------------------------------------------- readers
def thinpool_reader(path: str, fmt: str) -> Callable[[], int]:
    from thinpool.simulate.traces import open_trace

    def run() -> int:
        return sum(len(c) for c in open_trace(path, fmt).chunks())
    return run


def python_reader(path: str, fmt: str) -> Callable[[], int]:
    """A straightforward per-line Python parser of the same fields (no validation beyond int())."""
    def run() -> int:
        n = 0
        offs: list[int] = []
        lens: list[int] = []
        with open(path) as f:
            if fmt in ("fio-iolog", "csv"):
                f.readline()
            for line in f:
                if fmt == "fio-iolog":
                    p = line.split()
                    if len(p) != 5:
                        continue
                    offs.append(int(p[3]))
                    lens.append(int(p[4]))
                elif fmt == "msr":
                    p = line.split(",")
                    offs.append(int(p[4]))
                    lens.append(int(p[5]))
                elif fmt == "blkparse":
                    p = line.split()
                    if len(p) < 10 or p[5] != "Q":
                        continue
                    offs.append(int(p[7]) * 512)
                    lens.append(int(p[9]) * 512)
                else:
                    p = line.split(",")
                    float(p[0])
                    offs.append(int(p[2]))
                    lens.append(int(p[3]))
                n += 1
        np.array(offs)
        np.array(lens)
        return n
    return run


def pyarrow_reader(path: str, fmt: str) -> Callable[[], int] | None:
    try:
        import pyarrow.csv as pacsv
    except ImportError:
        return None
    if fmt == "msr":
        names = ["ts", "host", "disk", "type", "offset", "size", "resp"]
        ropts = pacsv.ReadOptions(column_names=names, block_size=8 << 20)
    elif fmt == "csv":
        ropts = pacsv.ReadOptions(block_size=8 << 20)
    else:
        return None

    def run() -> int:
        n = 0
        for batch in pacsv.open_csv(path, read_options=ropts):
            batch.column("offset").to_numpy()
            n += batch.num_rows
        return n
    return run


# ----------------------------------------------------------------------------- T5: serve --record
def export_overhead(sc: Scratch, n: int = 20_000, reps: int = 5) -> dict[str, float]:
    """CPU microseconds per 4 KiB read and write through a pool's NBD export, plain and recording (the
    calls the NBD session makes per request, in process: no socket, no client), interleaved repeats."""
    import time

    from thinpool import Pool
    from thinpool.nbd.pool_backend import PoolProvider
    from thinpool.nbd.record import IologRecorder, RecordingExport

    from .common import MiB
    pool = Pool.create(sc.path("ovh-pool"), data_size=256 * MiB, block_size="64KiB")
    try:
        pool.create_thin("vol", 128 * MiB)
        provider = PoolProvider(pool, close_pool=False)
        plain = provider.open_export("vol", False)
        rec = IologRecorder(sc.path("ovh.iolog"))
        recording = RecordingExport(provider.open_export("vol", False), rec)
        offs = (np.random.default_rng(9).integers(0, 128 * MiB // 4096, n) * 4096).tolist()
        data = bytes(4096)
        for o in offs[:2000]:
            plain.pwrite(o, data)            # warm up (JIT, provisioning)
        times: dict[str, list[float]] = {}

        def side(name: str, exp: Any, op: str) -> Callable[[int], float]:
            def run(_r: int) -> float:
                t0 = time.process_time()
                if op == "read":
                    for o in offs:
                        exp.pread(o, 4096)
                else:
                    for o in offs:
                        exp.pwrite(o, data)
                t = (time.process_time() - t0) / n * 1e6
                times.setdefault(f"{name}_{op}_us", []).append(t)
                return t
            return run
        interleave({f"{k}-{op}": side(k, e, op) for k, e in (("plain", plain), ("recording", recording))
                    for op in ("read", "write")}, reps)
        rec.close()
        return {k: med(v) for k, v in times.items()}
    finally:
        pool.close(commit=False)


def per_request_us(sc: Scratch, n: int = 200_000) -> float:
    """Microseconds one ``IologRecorder.record`` call costs (in process, CPU time)."""
    import time

    from thinpool.nbd.record import IologRecorder
    rec = IologRecorder(sc.path("cost.iolog"))
    try:
        record = rec.record
        t0 = time.process_time()
        for i in range(n):
            record("vol", "write", i * 4096, 4096)
        return (time.process_time() - t0) / n * 1e6
    finally:
        rec.close()

def record_overhead(sc: Scratch, full: bool) -> tuple[list[Row], dict[str, Any]]:
    """T5: fio's nbd engine (4 KiB random writes and reads, iodepth 16) against two `thinpool serve`
    processes of identical pools, one with ``--record``; interleaved repeats, medians.  Ratio = IOPS with
    recording / without; target >= 0.9."""
    from thinpool import Pool

    from .common import MiB, find_tool, missing_msg
    from .nbd import Server, fio, iops
    title = "serve --record: fio nbd 4 KiB random {rw} iodepth 16, recording / not recording"
    if not find_tool("fio"):
        return [Row("T5", title.format(rw="I/O"), {}, None, ">= 0.9", "missing", note=missing_msg("fio"))], {}
    size = (256 if full else 128) * MiB
    runtime = 5 if full else 2
    reps = 7 if full else 5
    servers: dict[str, Server] = {}
    detail: dict[str, Any] = {}
    rows: list[Row] = []
    try:
        for side in ("plain", "record"):
            pool_dir = sc.path(f"rec-{side}")
            with Pool.create(pool_dir, data_size=size + 64 * MiB, block_size="64KiB") as p:
                p.create_thin("vol", size)
            sock = os.path.join(sc.dir, f"{side}.sock")
            extra = ["--record", os.path.join(sc.dir, "rec.iolog")] if side == "record" else []
            servers[side] = Server(side, [sys.executable, "-m", "thinpool", "serve", pool_dir, "--socket", sock,
                                          *extra], sock, "vol")
            fio(servers[side].uri, "write", 4, size, 0, bs="1M", cwd=sc.dir)    # provision
        ovh = export_overhead(sc)
        detail["export_overhead_us"] = ovh
        for op in ("write", "read"):
            # informational: the export call alone, without the socket work of a real request (which
            # T5a/T5b include), so the ratio understates the end-to-end one
            rows.append(Row(f"T5{'cd'[op == 'read']}",
                            f"serve --record: CPU per 4 KiB {op} through the NBD export, plain / recording",
                            {"plain_us": ovh[f"plain_{op}_us"], "recording_us": ovh[f"recording_{op}_us"],
                             "added_us": ovh[f"recording_{op}_us"] - ovh[f"plain_{op}_us"]},
                            ovh[f"plain_{op}_us"] / ovh[f"recording_{op}_us"], "", "info"))
            log(rows[-1].line())
        def fio_iops(s: Server, rw: str) -> Callable[[int], float]:
            return lambda _r: iops(fio(s.uri, rw, 16, size, runtime, cwd=sc.dir), rw)
        for i, rw in enumerate(("randwrite", "randread")):
            got = interleave({k: fio_iops(s, rw) for k, s in servers.items()}, reps)
            m = {k: med(v) for k, v in got.items()}
            detail[rw] = got
            rows.append(Row(f"T5{'ab'[i]}", title.format(rw=rw[4:] + "s"),
                            {"plain_iops": m["plain"], "record_iops": m["record"],
                             "record_us_per_request": per_request_us(sc)},
                            m["record"] / m["plain"], ">= 0.9").judge())
            log(rows[-1].line())
    finally:
        for s in servers.values():
            s.stop()
    return rows, detail


# ----------------------------------------------------------------------------- measurement
def run(full: bool = False, sc: Scratch | None = None) -> tuple[list[Row], dict[str, Any]]:
    n = 4_000_000 if full else 1_000_000
    reps = 5 if full else 3
    own = sc is None
    sc = sc or Scratch()
    rows: list[Row] = []
    detail: dict[str, Any] = {"records": n, "repeats": reps}
    try:
        r = records(n)
        for key, fmt, judged in FORMATS:
            path = sc.path(f"trace.{fmt}")
            write_trace(path, fmt, r)
            size = os.path.getsize(path)
            sides: dict[str, Callable[[], int]] = {"thinpool": thinpool_reader(path, fmt),
                                                   "python": python_reader(path, fmt)}
            pa = pyarrow_reader(path, fmt)
            if pa is not None:
                sides["pyarrow"] = pa
            for name, fn in sides.items():        # warm-up: page cache, imports
                got = fn()
                if got != n:
                    raise RuntimeError(f"{name} read {got} records of {fmt}, expected {n}")
            cpu: dict[str, list[float]] = {k: [] for k in sides}

            def timed_side(k: str, fn: Callable[[], int]) -> Callable[[int], float]:
                return lambda _r: _timed(fn, cpu[k])
            times = interleave({k: timed_side(k, fn) for k, fn in sides.items()}, reps)
            m = {k: med(v) for k, v in times.items()}
            c = {k: med(v) for k, v in cpu.items()}
            values: dict[str, Any] = {f"{k}_records_per_s": n / t for k, t in m.items()}
            values["thinpool_cpu_records_per_s"] = n / c["thinpool"]
            values["python_cpu_records_per_s"] = n / c["python"]
            values["thinpool_MB_per_s"] = size / m["thinpool"] / 1e6
            values["x_python_loop"] = m["python"] / m["thinpool"]
            values["load_average"] = os.getloadavg()[0]
            # judged on the process's CPU time: the records/s one core gives, whatever else the
            # machine runs (wall-clock figures are reported beside it)
            ratio = n / c["thinpool"] / TARGET_RPS
            row = Row(key, f"parse {fmt}: records/s of open_trace().chunks() (vs {TARGET_RPS:,}/s)", values,
                      ratio, ">= 1.0" if judged else "", "info")
            rows.append(row.judge())
            detail[fmt] = {"bytes": size, "seconds": times}
            log(row.line())
            sc.remove(path)
        rec_rows, detail["record"] = record_overhead(sc, full)
        rows += rec_rows
    finally:
        if own:
            sc.close()
    return rows, detail


def _timed(fn: Callable[[], int], cpu: list[float]) -> float:
    """Wall seconds of ``fn()``; its CPU seconds (this process) appended to ``cpu``.  pyarrow's
    reader uses threads: its CPU time is the sum over them."""
    import gc
    import time
    gc.collect()
    gc.disable()
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        t1, c1 = time.perf_counter(), time.process_time()
    finally:
        gc.enable()
    cpu.append(c1 - c0)
    return t1 - t0


def table_md(rows: list[Row], detail: dict[str, Any]) -> str:
    out = ["| row | format | thinpool records/s, CPU time (wall) | MB/s (wall) | Python loop records/s, CPU "
           "(wall) | x Python loop (wall) | pyarrow CSV records/s (wall) | ratio: CPU records/s / 3,000,000 "
           "| target | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r, (_, fmt, _) in zip(rows[:len(FORMATS)], FORMATS):
        v = r.values
        pa = v.get("pyarrow_records_per_s")
        status = status_cell(r)
        out.append(f"| {r.key} | {fmt} | {v['thinpool_cpu_records_per_s']:,.0f} ({v['thinpool_records_per_s']:,.0f}) "
                   f"| {v['thinpool_MB_per_s']:.0f} | {v['python_cpu_records_per_s']:,.0f} "
                   f"({v['python_records_per_s']:,.0f}) | {v['x_python_loop']:.1f} | "
                   f"{f'{pa:,.0f}' if pa else '-'} | {r.ratio:.2f} | {r.target or '-'} | {status} |")
    rec = rows[len(FORMATS):]
    if rec:
        out += ["", "| row | what | IOPS without --record | IOPS with --record | recorder us per request (CPU) "
                "| ratio | target | status |", "|---|---|---|---|---|---|---|---|"]
        for r in [r for r in rec if "plain_iops" in r.values]:
            v = r.values
            status = status_cell(r)
            ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
            out.append(f"| {r.key} | {r.title} | {v.get('plain_iops', 0):,.0f} | {v.get('record_iops', 0):,.0f} | "
                       f"{v.get('record_us_per_request', 0):.2f} | {ratio} | {r.target} | {status} |")
        cpu_rows = [r for r in rec if "plain_us" in r.values]
        if cpu_rows:
            out += ["", "| row | what | CPU us plain | CPU us recording | added us | ratio (plain / recording, "
                    "export call alone) |", "|---|---|---|---|---|---|"]
            for r in cpu_rows:
                v = r.values
                out.append(f"| {r.key} | {r.title} | {v['plain_us']:.2f} | {v['recording_us']:.2f} | "
                           f"{v['added_us']:.2f} | {r.ratio:.2f} |")
    return "\n".join(out)



def main(argv: list[str] | None = None) -> int:
    ap = perf_parser("traces", __doc__, "4,000,000 records, 5 repeats (quick: 1,000,000, 3)", "trace")
    args = ap.parse_args(argv)
    rows, detail = run(args.full)
    mach = machine()

    def body() -> str:
        return (docs_head("Trace parsing", "traces", args.full, mach) + "), "
                f"Python {sys.version.split()[0]}, numpy {np.__version__}: {detail['records']:,} synthetic "
                f"records per format read from the page cache, {detail['repeats']} interleaved repeats "
                "(medians).  Judged on the reading process's CPU time (one core's rate); wall-clock "
                "figures in brackets -- the machine is shared (1-minute load average "
                f"{max(r.values.get('load_average', 0) for r in rows):.1f} on {mach.get('cores', '?')} cores during the "
                "run), so they are lower.  Python loop: a plain `for line in f: line.split()` reader of the "
                "same fields; pyarrow: `pyarrow.csv.open_csv` (multi-threaded, no line numbers, no "
                "validation; not a dependency: see dependencies.md).  T5: the same fio job against two "
                "servers, one recording; on this shared machine the IOPS of either side vary by up to 2x "
                "between repeats, so that ratio is noisy.  T5c/T5d are steadier: the CPU time of the "
                "export call a session makes per 4 KiB request, plain and through the recording proxy, in "
                "process -- the added microseconds are what recording costs a request; the ratio there "
                "leaves out the socket work of a real request (tens of microseconds), so it understates "
                "the end-to-end one.\n\n"
                + table_md(rows, detail) + "\n")
    return finish(args, rows, detail, mach, SECTION_BEGIN, SECTION_END, body)


if __name__ == "__main__":
    sys.exit(main())
