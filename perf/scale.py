"""S10: 100,000 thin volumes and 100,000,000 mappings (issue 16, row 5).

    python -m perf.scale [--scale F] [--full] [--docs] [--json OUT] [--rebuild] [--only S10a,S10f,...]

The pool (metadata-only: no data file, so 6 TiB of mapped data costs no disk) has ORIGINS origin
volumes holding 100,000,000 mapped 64 KiB blocks between them (dense: block 0..n-1 of each origin)
and 100,000 snapshots of them (round robin over the origins), at ``--scale 1``; ``--scale 0.01``
is 1,000 volumes and 1,000,000 mappings for a quick run.  Built once with the bulk paths -- the
mappings with ``write_many`` of a byte per block (the write kernel maps a block per offset; a
metadata-only pool stores no byte), the snapshots inside one ``pool.batch()`` (one commit) -- and
kept under the cache directory ($THINPOOL_PERF_CACHE, else ~/.cache/thinpool-perf), so a re-run
reuses it (``--rebuild`` builds it again).

Rows (each process is a fresh one; medians of interleaved repeats):
  S10a  Pool.open (read-only) in a fresh process, seconds            target <= 2
  S10b  RSS after that open, GiB                                     target <= 4
  S10c  `thinpool status` / `python -c pass`                         target <= 3
  S10d  `thinpool ls` / `python -c pass`                             target <= 3
  S10e  `thinpool snapshot` / `python -c pass`                       target <= 3
  S10f  `thinpool ls --usage`, seconds                               target <= 10
  S10g  `thinpool export-metadata` / `thin_dump` of the exported metadata (to /dev/null)   target <= 1.0
        (with the export's CPU time and peak RSS, and thin_check of the exported file timed beside it)
  S10h  (info) `export-metadata` / `thin_dump --dev-id` of each origin in turn: every distinct mapping
        dumped once, a far smaller job than the whole dump
thin_dump expands every device's tree (it knows nothing of shared subtrees), so on this pool its whole
dump is 100,000 x the origins' mappings; it runs with a time limit, and when it is killed the ratio is
an upper bound (export time / the time thin_dump ran without finishing), marked so.

The CLI rows run the package the way an install has it: before them the run byte-compiles the
``thinpool`` package it imports (``compileall`` into its ``__pycache__``, as ``pip install`` does; with
``PYTHONDONTWRITEBYTECODE`` set, a source tree on ``PYTHONPATH`` would otherwise compile every module
from source at each command's start: about 20 ms), and it records whether the compiled table
formatter (``thinpool.cli._tablefmt``, built by ``pip install``; ``python setup.py build_ext
--inplace`` for a source tree) loads: without it ``ls`` writes its table in Python.

``--only S10a,S10f`` measures only the rows named (S10a and S10b are one measurement, S10c-S10e one
interleaved run, S10g and S10h one); with ``--docs`` those rows replace their lines in the section's
table, each with the load average it was measured at, and nothing else of the section changes.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from .common import (PERFORMANCE_MD, GiB, KiB, MiB, Row, Scratch, clock, docs_head, drop_file, find_tool, finish,
                     fmt, interleave, log, machine, med, perf_parser, rows_table_md)

SECTION_BEGIN = "<!-- scale: begin (written by `python -m perf.scale --docs`) -->"
SECTION_END = "<!-- scale: end -->"
BS = 64 * KiB
VOLUMES = 100_000
MAPPINGS = 100_000_000
ORIGINS = 4
CHUNK = 4_000_000          # offsets per write_many call while building
LAYOUT = 2                 # bump when the built pool's shape changes (the cache key); 2: catalog format 2

_OPEN = r"""
import json, sys, time
t0 = time.perf_counter()
from thinpool import Pool
t1 = time.perf_counter()
c1 = time.process_time()
p = Pool.open(sys.argv[1], read_only=sys.argv[2] == "ro")
t2 = time.perf_counter()
c2 = time.process_time()
rss = 0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
hwm = 0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
p.close(commit=False)
print(json.dumps(dict(import_s=t1 - t0, open_s=t2 - t1, open_cpu_s=c2 - c1, rss=rss, peak_rss=hwm)))
"""


def shape(scale: float) -> tuple[int, int, int]:
    """(origins, snapshots, mappings per origin) at ``scale``."""
    volumes = max(ORIGINS + 1, int(round(VOLUMES * scale)))
    per_origin = max(1, int(round(MAPPINGS * scale / ORIGINS)))
    return ORIGINS, volumes - ORIGINS, per_origin


def cache_dir() -> str:
    return os.environ.get("THINPOOL_PERF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "thinpool-perf")


def build(path: str, scale: float) -> dict[str, Any]:
    """Build the pool at ``path`` (metadata-only); returns how long each part took."""
    from thinpool import Pool
    origins, snaps, per = shape(scale)
    nr_blocks = origins * per + (1 << 20)
    # metadata: our format takes about 22 bytes a dense mapping; room for copy-on-write and the snapshots
    md_bytes = max(64 * MiB, min(15 * GiB, int(origins * per * 24 * 1.5) + snaps * 256 + 64 * MiB))
    t0 = clock()
    pool = Pool.create(path, data_size=nr_blocks * BS, block_size=BS, metadata_only=True,
                       metadata_size=md_bytes, max_thins=origins + snaps + 1024)
    byte = np.ones((CHUNK, 1), np.uint8)
    with pool.batch():
        for o in range(origins):
            vol = pool.create_thin(f"origin{o}", per * BS)
            for start in range(0, per, CHUNK):
                n = min(CHUNK, per - start)
                vol.write_many(np.arange(start, start + n, dtype=np.int64) * BS, byte[:n])
    t1 = clock()
    with pool.batch():
        for i in range(snaps):
            pool.snapshot(f"origin{i % origins}", f"snap{i}")
    t2 = clock()
    pool.close()
    return {"mappings_s": t1 - t0, "snapshots_s": t2 - t1, "origins": origins, "snapshots": snaps,
            "mappings": origins * per}


def cached_pool(scale: float, rebuild: bool = False) -> tuple[str, dict[str, Any]]:
    """The pool for ``scale``, built if the cache has none (or ``rebuild``): (path, its build record)."""
    base = os.path.join(cache_dir(), f"scale-{scale:g}-v{LAYOUT}")
    path, stamp = os.path.join(base, "pool"), os.path.join(base, "built.json")
    if rebuild or not os.path.exists(stamp):
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
        log(f"scale: building the pool at {path} (scale {scale:g}) ...")
        rec = build(path, scale)
        with open(stamp, "w") as f:
            json.dump(rec, f)
        log(f"scale: built in {rec['mappings_s'] + rec['snapshots_s']:.0f} s")
    with open(stamp) as f:
        return path, json.load(f)


def _cli() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "thinpool")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "thinpool"]


def _installed_like(cli: list[str]) -> dict[str, Any]:
    """Byte-compile the package ``cli`` runs (as an install has it: see the module docstring); which
    package that is and whether its compiled table formatter loads."""
    import compileall
    probe = ("import json, os, thinpool, thinpool.cli.tables as t; "
             "print(json.dumps([os.path.dirname(thinpool.__file__), t.compiled()]))")
    # the console script's interpreter, with this environment (PYTHONPATH picks the package)
    python = sys.executable
    if cli and cli[0] != sys.executable:
        with open(cli[0], "rb") as f:
            first = f.readline().decode(errors="replace")
        if first.startswith("#!") and os.path.isabs(first[2:].split()[0]):
            python = first[2:].split()[0]
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout
    package, table_compiled = json.loads(out)
    compileall.compile_dir(package, quiet=1)
    if not table_compiled:
        log(f"scale: the compiled table formatter is not built in {package}: `ls` writes its table in Python")
    return {"package": package, "compiled_table": table_compiled}


#: CPU seconds (user + system) of every command :func:`_wall` ran, by command name: on a shared
#: machine a command's wall time counts the time it waited for a core, its CPU time does not
CPU: dict[str, list[float]] = {}


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _wall(cmd: list[str], timeout: float | None = None, key: str | None = None) -> float:
    c0, t0 = _children_cpu(), clock()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True, timeout=timeout)
    dt = clock() - t0
    if key:
        CPU.setdefault(key, []).append(_children_cpu() - c0)
    return dt


def _measured(cmd: list[str]) -> tuple[float, float, int]:
    """Run ``cmd`` (output discarded): (wall seconds, CPU seconds, peak RSS in bytes) of that process."""
    with tempfile.TemporaryFile() as err:
        t0 = clock()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        dt = clock() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed with status {p.returncode}: {err.read().decode()[-2000:]}")
    return dt, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * KiB


def _thin_dump(cmd: list[str], limit: float) -> tuple[float, bool]:
    """(seconds, finished): ``cmd`` killed after ``limit`` seconds if still running."""
    t0 = clock()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rc = p.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return clock() - t0, False
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {rc}")
    return clock() - t0, True


def _drop_snapshots(path: str, names: list[str]) -> None:
    """Delete the snapshots the `thinpool snapshot` repeats made (the cached pool keeps its shape)."""
    from thinpool import Pool
    if not names:
        return
    with Pool.open(path) as p, p.batch():
        for n in names:
            p.delete(n)


ROWS = ("S10a", "S10b", "S10c", "S10d", "S10e", "S10f", "S10g", "S10h")


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def run(scale: float = 0.01, full: bool = False, sc: Scratch | None = None, rebuild: bool = False,
        only: set[str] | None = None) -> tuple[list[Row], dict[str, Any]]:
    """The rows (those named in ``only``, with the rows measured with them; all when None)."""
    sc = sc or Scratch()
    reps = 5 if full else 3
    want = set(ROWS) if only is None else set(only)
    path, rec = cached_pool(scale, rebuild)
    origins, snaps = rec["origins"], rec["snapshots"]
    label = f"{origins + snaps:,} volumes ({origins} origins + {snaps:,} snapshots), {rec['mappings']:,} mappings"
    cli = _cli()
    _wall(cli + ["status", path])  # the kernel cache and the page cache warm
    rows: list[Row] = []
    detail: dict[str, Any] = {"scale": scale, "build": rec, "only": sorted(want)}
    if want & {"S10a", "S10b"}:
        rows += _open_rows(path, rec, label, reps, detail)
    if want & {"S10c", "S10d", "S10e"}:
        detail["cli_package"] = _installed_like(cli)
        rows += _cli_rows(cli, path, label, reps, detail)
    if "S10f" in want:
        CPU.pop("ls_usage", None)
        load = _load1()
        usage = [_wall(cli + ["ls", path, "--usage"], timeout=600, key="ls_usage") for _ in range(max(1, reps - 2))]
        rows.append(Row("S10f", f"{label}: `thinpool ls --usage` (exclusive/shared of every volume), seconds",
                        {"ls_usage_s": med(usage), "cpu_s": med(CPU["ls_usage"]), "load": load}, med(usage),
                        "<= 10").judge())
        detail["ls_usage_s"] = usage
    if want & {"S10g", "S10h"}:
        rows += export_rows(sc, path, label, origins, reps)
        detail["export_scale"] = scale
    return rows, detail


def _open_rows(path: str, rec: dict[str, Any], label: str, reps: int, detail: dict[str, Any]) -> list[Row]:
    """S10a, S10b: Pool.open in fresh processes."""
    load = _load1()
    opens = []
    for _ in range(reps):
        r = subprocess.run([sys.executable, "-c", _OPEN, path, "ro"], capture_output=True, text=True, check=True)
        opens.append(json.loads(r.stdout))
    o = {k: med([x[k] for x in opens]) for k in opens[0]}
    detail["open"] = o
    return [
        Row("S10a", f"{label}: Pool.open (read-only, fresh process), seconds",
            {"open_s": o["open_s"], "cpu_s": o["open_cpu_s"], "import_s": o["import_s"],
             "build_mappings_s": rec["mappings_s"],
             "build_snapshots_s": rec["snapshots_s"], "load": load}, o["open_s"], "<= 2").judge(),
        Row("S10b", f"{label}: RSS after the open, GiB", {"rss_MiB": round(o["rss"] / MiB),
                                                        "peak_MiB": round(o["peak_rss"] / MiB)},
            o["rss"] / GiB, "<= 4").judge(),
    ]


def _cli_rows(cli: list[str], path: str, label: str, reps: int, detail: dict[str, Any]) -> list[Row]:
    """S10c-S10e: status, ls and snapshot against `python -c pass`, interleaved."""
    made: list[str] = []

    def snap(_r: int) -> float:
        name = f"perfsnap{len(made)}"
        made.append(name)
        return _wall(cli + ["snapshot", path, "origin0", name], key="snapshot")
    CPU.clear()
    res = interleave({"pass": lambda _r: _wall([sys.executable, "-c", "pass"], key="pass"),
                      "status": lambda _r: _wall(cli + ["status", path], key="status"),
                      "ls": lambda _r: _wall(cli + ["ls", path], key="ls"),
                      "snapshot": snap}, reps)
    _drop_snapshots(path, made)
    m = {k: med(v) for k, v in res.items()}
    cpu = {k: med(v) for k, v in CPU.items()}
    detail["cli"] = m
    return [
        Row("S10c", f"{label}: `thinpool status` vs `python -c pass`",
            {"status_ms": round(m["status"] * 1e3), "python_pass_ms": round(m["pass"] * 1e3),
             "cpu_ratio": cpu["status"] / cpu["pass"]}, m["status"] / m["pass"], "<= 3").judge(),
        Row("S10d", f"{label}: `thinpool ls` vs `python -c pass`",
            {"ls_ms": round(m["ls"] * 1e3), "cpu_ratio": cpu["ls"] / cpu["pass"],
             "compiled_table": detail.get("cli_package", {}).get("compiled_table")}, m["ls"] / m["pass"],
            "<= 3").judge(),
        Row("S10e", f"{label}: `thinpool snapshot` vs `python -c pass`",
            {"snapshot_ms": round(m["snapshot"] * 1e3), "cpu_ratio": cpu["snapshot"] / cpu["pass"]},
            m["snapshot"] / m["pass"], "<= 3").judge(),
    ]


def export_rows(sc: Scratch, path: str, label: str, origins: int, reps: int) -> list[Row]:
    """S10g/S10h: `thinpool export-metadata` vs thin_dump of what it exported (and thin_check of it)."""
    td, tc = find_tool("thin_dump"), find_tool("thin_check")
    meta = sc.path("scale-meta.bin")
    cli = _cli()
    load = _load1()
    runs = []
    for _ in range(max(1, reps - 2)):
        drop_file(meta)
        runs.append(_measured(cli + ["export-metadata", path, meta]))
    e, cpu, rss = med([r[0] for r in runs]), med([r[1] for r in runs]), max(r[2] for r in runs)
    figures: dict[str, Any] = {"export_s": e, "export_cpu_s": cpu, "export_peak_rss_MiB": round(rss / MiB),
                               "load": load}
    if tc:
        check_s, check_cpu, _ = _measured([tc, meta])
        figures.update(thin_check_s=check_s, thin_check_cpu_s=check_cpu)
    if not td:
        drop_file(meta)
        return [Row("S10g", f"{label}: `thinpool export-metadata`", figures, None, "<= 1.0", "missing",
                    note="thin_dump not installed")]
    limit = max(30.0, 5 * e)  # thin_dump expands every shared tree: it is stopped here, see the docs
    whole, finished = _thin_dump([td, meta, "-o", "/dev/null"], limit)
    per_origin = []
    for dev in range(1, origins + 1):
        t, _ = _thin_dump([td, meta, "--dev-id", str(dev), "-o", "/dev/null"], 3600)
        per_origin.append(t)
    drop_file(meta)
    note = "" if finished else (f"thin_dump killed after {whole:.0f} s without finishing: the ratio is an upper "
                                "bound (export / the time thin_dump ran)")
    figures.update(thin_dump_s=whole, thin_dump_finished=finished)
    return [Row("S10g", f"{label}: `thinpool export-metadata` vs `thin_dump` of the exported metadata",
                figures, e / whole, "<= 1.0", note=note).judge(),
            Row("S10h", f"{label}: `export-metadata` vs `thin_dump --dev-id` of each origin (every distinct "
                "mapping once)", {"thin_dump_origins_s": sum(per_origin)}, e / sum(per_origin), "", "info")]


def main(argv: list[str] | None = None) -> int:
    ap = perf_parser("scale", __doc__, "5 repeats (quick: 3)", "scale")
    ap.add_argument("--scale", type=float, default=None,
                    help="fraction of the target pool (1 = 100,000 volumes and 100,000,000 mappings; "
                         "default 1 with --full, else 0.01)")
    ap.add_argument("--rebuild", action="store_true", help="build the cached pool again")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: print (and with --docs write) the "
                    "figures a previous --json run saved")
    ap.add_argument("--only", metavar="ROWS", help="comma-separated rows to measure (e.g. S10a,S10f); with "
                    "--docs they replace their lines of the section's table, nothing else changes")
    args = ap.parse_args(argv)
    only = None if not args.only else {k.strip() for k in args.only.split(",") if k.strip()}
    if only is not None and (not only or only - set(ROWS)):
        ap.error(f"--only takes rows among {', '.join(ROWS)}")
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        rows, detail, mach = [Row(**r) for r in saved["rows"]], saved["detail"], saved["machine"]
        scale = detail["scale"]
        args.json = None
    else:
        scale = args.scale if args.scale is not None else (1.0 if args.full else 0.01)
        if not 0 < scale <= 1:
            ap.error("--scale must be in (0, 1]")
        from .cli_rows import byte_compile
        byte_compile()  # as `pip install` leaves the package: the CLI processes do not recompile it
        load = os.getloadavg()
        with Scratch() as sc:
            rows, detail = run(scale, args.full, sc, args.rebuild, only)
        detail["loadavg"] = {"before": load, "after": os.getloadavg()}
        mach = machine()
    load, load_after = detail["loadavg"]["before"], detail["loadavg"]["after"]
    for r in rows:
        print(r.line())

    if only is not None or detail.get("only", list(ROWS)) != list(ROWS):
        if args.docs:
            merge_rows(rows, f"`--only`, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
            args.docs = False
        return finish(args, rows, detail, mach, SECTION_BEGIN, SECTION_END, lambda: "")

    def body() -> str:
        return (docs_head("100,000 volumes and 100,000,000 mappings", "scale", args.full, mach) +
                f"; load average {load[0]:.2f} at the start, {load_after[0]:.2f} at the end: the machine is "
                f"shared), scale {scale:g}. {detail_text(detail)}\n\n" + rows_table_md(rows) + "\n"
                + limits_text(rows, (load[0], load_after[0])))
    return finish(args, rows, detail, mach, SECTION_BEGIN, SECTION_END, body)


def merge_rows(rows: list[Row], when: str) -> None:
    """Replace the lines of ``rows`` in the section's table of docs/performance.md (each marked with
    ``when``); every other line of the section stays as it is.  A row the table lacks is an error."""
    text = open(PERFORMANCE_MD).read()
    a, b = text.index(SECTION_BEGIN), text.index(SECTION_END)
    lines = text[a:b].split("\n")
    for r in rows:
        new = rows_table_md([r]).split("\n")[2]
        cells = new.split(" | ")
        cells[2] += f" ({when})"
        at = [i for i, line in enumerate(lines) if line.startswith(f"| {r.key} |")]
        if len(at) != 1:
            raise SystemExit(f"docs/performance.md: the scale table has {len(at)} lines of row {r.key}")
        lines[at[0]] = " | ".join(cells)
    with open(PERFORMANCE_MD, "w") as f:
        f.write(text[:a] + "\n".join(lines) + text[b:])


def detail_text(detail: dict[str, Any]) -> str:
    b = detail["build"]
    return (f"A metadata-only pool: {b['origins']} origins with {b['mappings']:,} mapped 64 KiB blocks between them "
            f"(dense), {b['snapshots']:,} snapshots of them, built in {b['mappings_s']:.0f} s (mappings: "
            f"`write_many` of a byte per block) + {b['snapshots_s']:.0f} s (snapshots, one `pool.batch()`) and "
            "cached between runs. Every command is a fresh process (the installed `thinpool` script).")


def limits_text(rows: list[Row], load: tuple[float, ...] = ()) -> str:
    """What each row measures against, and what limits the rows that are short (from this session's
    profiles of the same pool; the figures are the table's)."""
    r = {row.key: row for row in rows}

    def v(key: str, name: str) -> str:
        x = r.get(key)
        return "?" if x is None or name not in x.values else fmt(x.values[name])
    return f"""
**Anchors.** S10a/S10b are absolute (seconds, GiB); S10c-S10e are whole-command wall times against
`python -c pass` in the same run (interleaved); S10f is absolute; S10g is `export-metadata` against
`thin_dump` of the metadata it exported, to `/dev/null`. `cpu_ratio` / `cpu_s` are the same commands'
CPU time (user + system, `getrusage` of the child): on a shared machine the wall time includes the
time a command waited for a core; the CPU figures are close to what the wall figures would be on an
idle machine (less the time spent waiting for the disk's syncs, which only `snapshot` does).

**What the open costs (S10a, S10f).** The pool's metadata file holds 850 MB of pages: 195,313 dense
leaves (800 MB), the two-bit space map of 101 million data blocks (6,168 pages), the device table
(6.4 MB) and the catalog (2.7 MB of name index). The open does not read the leaves: it maps their
pages from the metadata file (`MetadataStore.map_into`: here 4 runs of pages consecutive both in the
file and in the rows, each a private map of the file at its rows), so the leaves are the page
cache's pages, with no `preadv` and no copy; a write to a row copies that one page, and nothing
reaches the file but through a commit (docs/design.md, "The nodes on disk"). Every mapped page is
still checksummed (CRC-32C) before the open returns, so a damaged page of the newest commit still
makes the open fall back to the previous one. The space map's pages are read and checksummed as
well, but decoded into one count per block only when the counts are first used (a write, a delete,
`check`: `spacemap_pages.StoredCounts`), and the rows of the 66,832 free leaf slots are not written at
all, so neither a read-only open nor `ls --usage` spends the 400 MB of counts and their decode (about
0.25 s) or touches 273 MB of free rows. {v('S10a', 'cpu_s')} s of CPU here, so on an idle core the
open is about that; the wall times above are a machine with a load average of
{max(load or (0.0,)):.0f} on 2 cores. What is left, profiled (cProfile, load 3.5): the checksums of
the 195,313 leaf pages (0.13 s) and the Python loops around them (0.1 s), the names read into the
pool's catalog (about 0.3 s), the used-block count from the bitmap (0.05 s). Checking a leaf when it
is first used (dm-bufio's way) instead of at the open would take the checksums off the open too, but
an open that does not verify every page of the newest commit can no longer fall back to the previous
commit when one is damaged: not done.
Before this work the same open took 13 s of wall time (load about 6) and peaked at 4.2 GB (the leaves
read into one buffer, then copied twice while decoding); then 7.3 s wall / 1.99 s CPU at load 12, peak
1,710 MiB (the leaves read straight into their rows by `preadv` into memory mapped in at once: about
1 s of the kernel's copy; their checksums 0.3 s; the space map decoded page by page, 0.3 s). The peak
is now {v('S10b', 'peak_MiB')} MiB.

**`ls --usage` (S10f)** is that open, numba's import and the walk kernels loaded from the cache (about
1 s of CPU, the largest part), one count per data block over all trees (`walks.logical_counts_into`,
linear in distinct nodes: about 0.35 s; a byte per block, enough to tell exclusive from shared: 100 MB
written where int32 counts wrote 400 MB), then every volume's MAPPED/EXCLUSIVE in
one pass that sums each shared node once (`walks.usage_of_roots`, 0.08 s; before, each of the 100,000
snapshots walked its origin's 25 million mappings: 2.5 * 10^12 entries, never finishing) and 100,000
rows built and printed in Python (about 1 s) (profiled with cProfile at load 4).

**status, snapshot, ls (S10c-S10e).** The catalog is stored in format 2 (`thinpool/catalog.py`): the
names in a sorted, paged name index (675 pages of 4 KiB for 100,000 names, each page a run of the name
order with its names' device-table slots), one 16-byte record per device slot (generation, external
origin) and a small JSON part (origins, records, the index's page order: 11 KB here); until then it was
one 6 MB JSON document that `snapshot` parsed, extended and wrote again and `ls` parsed. A format-1 pool
converts at its first commit, names an older thinpool allowed that a page cannot hold (a lone
surrogate, more than 1,024 bytes) included: they stay in the JSON part. `status` reads the superblock,
the directory and the page maps, no device-table page and no name; what is left is the CLI's start: the interpreter (`python -c
pass` itself), then click and the command modules (about 50 ms of import on this machine). `snapshot`
reads the JSON part, one name index page (the origin's name and the new name are looked up there; a
second page when they fall in two) and one page of slot records, and writes those pages (two index
pages and the JSON part's last page when the page splits): its cost no longer grows with the number of
volumes. Two passes over the whole pool that every `snapshot` made are gone:
the next device id was checked by a byte search of the table's dev_id fields (about 8 ms: an 8-byte
id of zeroes and small numbers matches many other fields) and the tail commit started past the largest
of the 205,000 page locations (about 7 ms). Every commit now records both with the state it writes, in
the superblock's `hints` (`MetadataStore.hint`): `dev_id_max`, an id no device in use exceeds (Pool's
commits and the table's), so an id above it is free at once, and `metadata_top`, the highest metadata
block the state uses (an ordinary commit takes it from its block-state map, a tail commit's is its last
block); each hint carries its commit's generation, so one an older thinpool carried over unchanged is
ignored and the value computed as before (`tests/engine/test_devtable.py` checks both against a
recomputation after ordinary, tail and batch commits, deletes, renames and reopens). The light
commands also import less: `hostio` loads ctypes and the C library on first use (about 2 ms of
import that `status`, `ls` and `snapshot` never needed), and `thinpool.status` (a dataclass, about
2 ms) is imported only when a status is made. What is left of `snapshot` (timed in one process at load
2.5-3, before the imports were trimmed: 16 ms importing `thinpool.cli` with click, 11 ms the volume commands with the
ops, 4 ms the device table's modules, 14 ms the open -- superblocks, directory, page maps, the 6.4 MB
table read and checksummed -- about 1 ms the message and 4 ms the commit with its two flushes) is
mostly the CLI's imports: click alone (about 12 ms, `inspect`, `uuid` and `datetime` among them) is
a third of `python -c pass`. After all of this session's changes (CPU time in one process, best of 5 at load
4-5): 15.6 ms importing `thinpool.cli` with click, 7.4 ms the volume commands, 3.7 ms the device
table's modules, 8.5 ms the open, 0.6 ms the message, 2.7 ms the commit. The device table is no longer read whole by `status` and `snapshot`: two more
hints, `free_slot` (the first slot not in use: the one `Pool.snapshot` takes) and `nr_thins`, let the
table read its pages when first needed -- `status` none, `snapshot` the origin's page, its slot's and
those up to the next free slot (one or two of 1,563), `ls` all. CPU of a warm `DeviceTable.open` and
its status, 20 in a row, best of 7, interleaved, load 4.5: 4.6 ms against 7.6 ms before (the `preadv`
of the 6.4 MB table into fresh memory, its checksums and a copy). Until the session before, every command also ran `ldconfig -p` in a
subprocess at start (`ctypes.util.find_library("c")` at the import of `hostio`, `datadev` and `poollock`:
0.19 s of wall time in one `-X importtime` at load 5; the C library is now loaded by its glibc name),
built the device table's flag tables with enum
operations (512 enum members, about 10 ms) and imported orjson (about 3 ms with zoneinfo; now imported
when a catalog is written or a large one read).

Before the C extensions described at the end of this paragraph, `ls` read every index page and the whole
device table and printed 100,000 lines (5.8 MB) from columns (a list per field built by C loops, one `%`
template per line). Profiled in one process at load 4-5 (CPU
time): the interpreter's start about 40 ms (what `python -c pass` costs), imports about 50 ms, the store's
open and page maps 13 ms, the name index 25 ms (675 pages read, their names joined and decoded at once,
their order checked across pages; the order check now compares with `operator.lt`, about 2 ms where
`str.__lt__`'s slot wrapper took 15), the columns 20 ms (slices of the device table when the volumes fill
its first slots in device-id order, as here; a sort and reordering otherwise), the table 66-73 ms (the
widths, taken from the distinct cells for SIZE and MAPPED, and the formatting of those two, about 20 ms;
the 600,000 cells' `%` conversion about 50 ms: about 80 ns a cell, what one `%` over the whole table
also takes). The 100,000 lines' own work is thus about three `python -c pass` by itself, and S10d
stayed about {v('S10d', 'cpu_ratio')}x of CPU. The
per-cell work has no cheaper form in the interpreter: an int's decimal text costs about 50 ns
whichever way it is made (a `%` template per row, one `%` over a whole column, `repr` of the list,
`map(str)`), 300,000 ints alone about 15 ms; a column-wise layout (each column formatted with one `%`,
the rows interleaved by strided `bytearray` copies, no object per row) measured the same as the
row template (69 against 72 ms for the table, one run at load 5); numpy would format the columns in
a few ms but costs its import (48-66 ms here), and `status`/`ls`/`snapshot` are kept free of it. With
the interpreter (36 ms), click and the command modules (about 25 ms) and the open (about 10 ms), 3x
(108 ms) leaves under 40 ms for reading 100,000 names and formatting 600,000 cells: it needs the rows
made by compiled code that the CLI can load without numba or numpy (a small C helper). That is
now done, with two optional C extensions built by `pip install` (docs/dependencies.md; without them
the same work is done in Python, as before). `thinpool/_lscols.c` reads the name index: the 675 pages,
gathered into one buffer, checked as `catalog_index.py` checks them (counts, 1-1,024 bytes of valid
UTF-8, strictly rising across pages: the same MetadataCorrupt messages, tests/engine/test_lscols.py
compares both over random and damaged pages) and laid out by slot as one NUL-separated blob, no str
per name (about 2.5 ms). The device table hands its int64 fields to the formatter as strided views
(`DeviceTable.volume_columns(buffers=True)`), no list per field, and keeps its records in an anonymous
map instead of a zeroed bytearray, so `status` and `snapshot` no longer fault in 6.4 MB they never read
(about 5 ms of each). `thinpool/cli/_tablefmt.c` writes the table (about 6 ms): the SIZE and MAPPED
cells formatted once per distinct value by `units.format_size`, the rest in C; the text is the Python
renderer's byte for byte (tests/cli/test_tablefmt.py: random tables with wide, combining and whitespace
characters, read-only volumes, external origins, integers to 2^64, headers on and off), made by the
`ls` op where the pool is open (so a served pool answers with the same text) and written straight
from the str to stdout's descriptor (through click's text stream when stdout is not a UTF-8 file or
the text holds an escape character, which click strips from text written to a pipe). What is left of
`ls` above `status` (a fresh process, load 2.5: about 25 ms) is mostly memory touched for the first
time: the 6.4 MB device table read whole and 2.7 MB of index pages (the 5.8 MB table too until it was
streamed, below) -- about 0.9 ms a MB of page faults on this machine, which gives no transparent huge
pages to a process -- then the CRC-32C of 2,238 pages and the formatting. The CLI rows are measured with the package byte-compiled (perf/scale.py runs
`compileall` on the package the command imports, as `pip install` does, and records whether the
table formatter is built): run from a source tree with `PYTHONDONTWRITEBYTECODE=1`, as here, every
command compiled its modules from source at start (cProfile: 9 `compile` calls, 23 ms in `ls`),
which an installed package never does. Steps, `--only S10c,S10d,S10e` (status / ls / snapshot, wall
ratio, CPU ratio in brackets): the Python table from source (04:57 UTC, load 1.1) 1.95 / 5.16 / 2.12;
byte-compiled, the C table from Python lists (05:30 UTC, load 1.9-2.0) 2.23 / 4.55 (4.58) / 2.48; with
the names, views and the anonymous map (05:58 UTC, load 1.9-2.2, two runs) 2.08 / 2.70 (2.72) / 2.33
and 2.21 / 2.96 (2.96) / 2.80 (`ls` 105-109 ms against 81 ms for `status` and 37-39 ms for `python -c
pass`); with no dataclass made at start either (the op table's `OpSpec`, `pooldir.OpenDefaults`,
`ownership.Stamp` and `safe_output.Output` are NamedTuples, `ownership.NewPoolFiles` a plain class:
five dataclasses and their module cost every light command about 4 ms) and the table's cells copied
inline (06:04-06:05 UTC, load 1.7-1.9, two runs) 2.13 / 2.79 (2.80) / 2.29 and 1.91 / 2.41 (2.68) /
2.11 (`ls` 95-109 ms against 73-86 ms for `status` and 34-45 ms for `python -c pass`); with the table
streamed (06:10 UTC, load 1.1, two runs; on a pool that is not served the CLI opens the device table
itself, `registry.run_local`, and the formatter writes the table to stdout's descriptor through a
quarter-megabyte buffer, so the 5.8 MB text is never in memory; a served pool still answers the `ls`
op with the text) 2.25 / 2.86 (2.70) / 2.29 and 2.13 / 2.76 (2.77) / 2.22: `ls` 98-104 ms against
76-82 ms for `status` and 36 ms for `python -c pass`, about 22 ms above `status`. In this session's
runs the S10d ratio moved between 2.41 and 2.96 with the other sessions' load; its margin under 3x
is thin, and what remains is reading 9 MB of pages into fresh memory (faults) and their checksums.
The wall ratios move with the load: a loaded machine stretches the 60-190 ms of `python -c pass` more
than the longer commands, so the CPU ratios are the steadier figures. Runs this session (`--full`,
status / ls / snapshot, CPU ratio and wall ratio): before the `ls` and C-library changes (load 6.1)
2.31 / 6.79 / 3.04 CPU, 1.84x / 4.22x / 2.30x wall; after them (load 3.5) 2.58 / 6.67 / 3.11, 3.17x /
6.55x / 3.15x; with the flag tables (load 7.6) 2.60 / 6.44 / 3.05, 2.55x / 6.30x / 4.06x; with the lazy
orjson and the widths (load 7.4-7.6, two runs on a copy of the cached pool: another session's run
holding its lock made a `snapshot` here fail) 2.52 / 5.81 / 2.91, 1.79x / 4.03x / 1.91x and 2.37 /
6.24 / 2.86, 1.28x / 3.72x / 1.66x (the table's row).

**History** (quoted from earlier runs on this machine, not re-measured; wall / CPU):
before this work, `Pool.open` of this pool took 13-39 s and peaked at 4.2 GB, `status` 5.4x, `ls`
21x, `snapshot` 10x `python -c pass`, and `ls --usage` never finished (each snapshot walked its
origin's mappings). First run after the open and device-table changes (load 7.5-10.8): open 5.72 s /
1.73 s CPU, status 2.42x, ls 6.78x, snapshot 3.70x, ls --usage 16.8 s / 4.2 s CPU, export at scale 0.1
<= 0.20x thin_dump. The table before this run (catalog in one JSON document, load 11.9): status 1.16x,
ls 12.9x / 14.3 CPU, snapshot 3.95x / 6.14 CPU, open 7.3 s.

**Export (S10g, S10h).** `export-metadata` builds and writes the kernel-format trees a window of
mappings at a time (`interop/sharing.py`, `interop/binary.py`): the distinct trees' arrays are read 2
million mappings at a time and never concatenated, what is kept for all of them is per leaf, per node
and one byte of count per data block (a count past 254 kept exactly beside it), and the leaf blocks are packed, checksummed and written window by
window, so the export of this pool peaks at {v('S10g', 'export_peak_rss_MiB')} MiB of RSS (target 4
GiB; the exporter that held every mapping at once passed 8.7 GB here and was stopped) and writes the
same bytes as that exporter (tests/interop/test_export_stream.py). Most of that memory is what the
pool hands the exporter: the open ({v('S10b', 'rss_MiB')} MiB) and the IR of `Pool.to_metadata` (20
bytes a distinct mapping, 2 GB here, plus the metadata pages its walk maps: 2,995 MiB after it and a
peak of 3,254 MiB while it is built, measured by stages on 2026-12-07); the exporter's windows, leaves
and one-byte data counts add about 300 MB on top. thin_check of the exported file took
{v('S10g', 'thin_check_s')} s ({v('S10g', 'thin_check_cpu_s')} s of CPU). thin_dump 0.9 knows nothing of
shared subtrees: it walks every device's tree, 100,000 x 25 million mappings on this pool, and is
stopped at its time limit (five times the export), so S10g's ratio is an upper bound. S10h, thin_dump
of the origins alone (each distinct mapping once, a much smaller job than the whole dump) shows what
the export costs against a walk of the mappings it writes. S10g and S10h at scale 1 take 5.5-9
minutes of a `--full` run (three exports, thin_check, the capped dump, the four origins' dumps; the
longer at load 5-7).
"""


def run_step(sc: Scratch, full: bool) -> tuple[list[Row], dict[str, Any]]:
    """The S10 step of ``python -m perf`` (perf/run.py): scale 1 with ``--full``, else 0.01."""
    return run(1.0 if full else 0.01, full, sc)


if __name__ == "__main__":
    sys.exit(main())
