"""The CLI rows of ``python -m perf`` (perf/run.py): running ``thinpool`` in a fresh process, timed;
S8 the CLI's latency on a pool of 10,000 volumes, S9 a 1 TiB pool of 10,000 volumes (open, RSS,
status, ls, dump), I4 and S9e ``thinpool dump`` / ``export-metadata`` against ``thin_dump``."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

from .common import (GiB, KiB, MiB, REPO, TiB, Row, Scratch, clock, drop_file, find_tool, interleave, med,
                     missing_msg, ratio_row, synthetic_metadata)

BS = 64 * KiB


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
