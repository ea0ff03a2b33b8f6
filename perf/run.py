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
  S11 1 PiB metadata-only pool at 64 KiB blocks (2^34 data blocks), 100,000 volumes (perf/pib.py; quick: 10,000):
     build (create, thins, writes, snapshots, writes, commit), open, write + commit, status: times and RSS
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
import sys
import traceback

import numpy as np

from . import engine
from .cli_rows import byte_compile, i4, s8, s9
from .common import REPO, Row, Scratch, clock, find_tool, log, machine, missing_msg, save_json, tool_version
from .io_rows import s1_s2, s3, s4
from .snapshot_rows import s5_s6


# ----------------------------------------------------------------------------- the steps
# S1-S4: perf/io_rows.py; S5-S6: perf/snapshot_rows.py; S8, S9, I4: perf/cli_rows.py
def s7(sc: Scratch, full: bool):
    """S7: the JIT allocator vs the pure-Python reference, 1M blocks (perf/engine.py)."""
    rows, res = engine.bench_alloc(1_000_000, 5 if full else 3, key="S7")
    return rows, res


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


def s11(sc: Scratch, full: bool):
    """S11: a 1 PiB pool at 64 KiB blocks with 100,000 volumes (perf/pib.py; quick mode: 10,000)."""
    from . import pib
    return pib.run_step(sc, full)


STEPS = {"S1": s1_s2, "S3": s3, "S4": s4, "S5": s5_s6, "S7": s7, "S8": s8, "S9": s9, "S10": s10, "S11": s11,
         "I4": i4, "I7": i7, "M1": m1, "C1": c1, "A": anchors}


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
