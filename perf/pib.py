"""S11: a 1 PiB metadata-only pool at 64 KiB blocks (2^34 data blocks) with 100,000 volumes.

    python -m perf.pib [--volumes N] [--writes N] [--full] [--docs] [--json OUT]

Built from scratch in a fresh process each run (the numbers are the build's): ``Pool.create`` of 1 PiB
at 64 KiB blocks (metadata-only, 8 GiB of sparse metadata); half the volumes created as 10 TiB thin
volumes in one ``pool.batch()``; ``--writes`` random 4 KiB writes spread over them with ``apply_io``
(first writes: each a root, a mid node and a leaf of its own); the other half created as snapshots of
them in one batch; as many random 4 KiB writes again over all the volumes (first writes and, where a
write meets a shared node, copy-on-write breaks); a commit; close.  Then, each in a fresh process:
``Pool.open``, one more write and commit, close; ``thinpool status``.  Default (quick): 10,000
volumes and 10,000 writes per round; ``--full``: 100,000 volumes and 100,000 writes per round.

Rows (values: seconds of wall time and of CPU, RSS and peak RSS in MiB; the machine's load average is
printed beside them):
  S11a  build: create + volumes + writes + snapshots + writes + commit; peak RSS   target: peak <= 8 GiB
  S11b  Pool.open of the built pool in a fresh process; RSS after it and its peak  target: peak <= 8 GiB
  S11c  a 4 KiB write + commit after that open (the commit writes the changed space-map pages only)
  S11d  `thinpool status` in a fresh process
The anchor is the machine (24 GiB of RAM): a flat space map of 2^34 blocks takes 80 GiB (a uint32 count
and a state byte per block); the targets say the pool fits with room to spare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from .common import GiB, Row, Scratch, docs_head, finish, log, machine, perf_parser, rows_table_md

SECTION_BEGIN = "<!-- pib: begin (written by `python -m perf.pib --docs`) -->"
SECTION_END = "<!-- pib: end -->"

_PRELUDE = r"""
import json, os, sys, time
t_import = time.perf_counter()
import numpy as np
from thinpool import Pool
from thinpool.thin import apply_io
def mem():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out["VmRSS"], out["VmHWM"]
steps = {}
def step(name, t0, c0):
    rss, hwm = mem()
    steps[name] = dict(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, rss_MiB=rss, peak_MiB=hwm)
    print(name, json.dumps(steps[name]), file=sys.stderr, flush=True)
def clock():
    return time.perf_counter(), time.process_time()
"""

_BUILD = _PRELUDE + r"""
path, nvol, nwrites = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
VOL = 10 << 40
t, c = clock()
pool = Pool.create(path, data_size="1PiB", block_size="64KiB", metadata_only=True,
                   max_thins=nvol, metadata_size="8GiB")
step("create", t, c)
t, c = clock()
half = nvol // 2
with pool.batch():
    thins = [pool.create_thin(f"v{i}", VOL) for i in range(half)]
step("thins", t, c)
def writes(vols, n):
    apply_io(vols, rng.integers(0, len(vols), n), np.ones(n, np.uint8),
             rng.integers(0, VOL // 4096, n) * 4096, np.full(n, 4096))
t, c = clock()
writes(thins, nwrites)
step("writes1", t, c)
t, c = clock()
with pool.batch():
    snaps = [pool.snapshot(f"v{i}", f"s{i}") for i in range(nvol - half)]
step("snapshots", t, c)
t, c = clock()
writes(thins + snaps, nwrites)
step("writes2", t, c)
t, c = clock()
pool.commit()
step("commit", t, c)
st = pool.status()
sp = pool.space
extra = dict(volumes=st.nr_thins, used_data_blocks=st.used_data_blocks, total_data_blocks=st.total_data_blocks,
             used_metadata_blocks=st.used_metadata_blocks, live_pages=sp.live_page_count(),
             map_pages=len(sp.rc_dirty))
pool.close()
print(json.dumps(dict(steps=steps, **extra)))
"""

_OPEN = _PRELUDE + r"""
path = sys.argv[1]
t, c = clock()
pool = Pool.open(path)
step("open", t, c)
t, c = clock()
pool.thin("v0").write(4096, b"x" * 4096)
pool.commit()
step("write_commit", t, c)
used = pool.status().used_data_blocks
pool.close(commit=False)
print(json.dumps(dict(steps=steps, used_data_blocks=used)))
"""


def _child(code: str, *args: str, timeout: float = 3600) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    if r.returncode:
        raise RuntimeError(f"child failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cli_status(path: str) -> dict[str, Any]:
    """``thinpool status`` in a fresh process: wall and CPU seconds, its own peak RSS (``wait4``)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "thinpool", "status", path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert proc.stdout is not None and proc.stderr is not None  # (both piped)
    out, err = proc.stdout.read(), proc.stderr.read()  # small outputs: no deadlock
    _, code, ru = os.wait4(proc.pid, 0)
    proc.returncode = code
    wall = time.perf_counter() - t0
    if code:
        raise RuntimeError(f"thinpool status failed: {err.decode()[-2000:]}")
    return dict(wall_s=wall, cpu_s=ru.ru_utime + ru.ru_stime, peak_MiB=ru.ru_maxrss / 1024,
                line=out.decode().splitlines()[0])


def run(volumes: int, writes: int, sc: Scratch) -> tuple[list[Row], dict[str, Any]]:
    """Build the pool and measure it; returns the rows and the raw figures."""
    path = sc.path("pib")
    load0 = os.getloadavg()
    log(f"pib: building a 1 PiB pool with {volumes:,} volumes and 2 x {writes:,} writes ...")
    built = _child(_BUILD, path, str(volumes), str(writes))
    load1 = os.getloadavg()
    opened = _child(_OPEN, path)
    load2 = os.getloadavg()
    status = _cli_status(path)
    load3 = os.getloadavg()
    s = built["steps"]
    build_wall = sum(x["wall_s"] for x in s.values())
    build_cpu = sum(x["cpu_s"] for x in s.values())
    peak = max(x["peak_MiB"] for x in s.values())
    o, wc = opened["steps"]["open"], opened["steps"]["write_commit"]
    rows = [
        Row("S11a", f"build 1 PiB / 64 KiB pool, {built['volumes']:,} volumes, 2 x {writes:,} writes, commit",
            dict(wall_s=build_wall, cpu_s=build_cpu, peak_MiB=peak,
                 **{f"{k}_s": v["wall_s"] for k, v in s.items()}, **{f"{k}_cpu_s": v["cpu_s"] for k, v in s.items()},
                 used_data_blocks=built["used_data_blocks"], live_map_pages=built["live_pages"],
                 map_pages=built["map_pages"], load=load1[0]),
            peak / 1024, "<= 8").judge(),
        Row("S11b", "Pool.open of that pool (fresh process)",
            dict(wall_s=o["wall_s"], cpu_s=o["cpu_s"], rss_MiB=o["rss_MiB"], peak_MiB=o["peak_MiB"], load=load2[0]),
            o["peak_MiB"] / 1024, "<= 8").judge(),
        Row("S11c", "4 KiB write + commit after the open (ratio: seconds)",
            dict(wall_s=wc["wall_s"], cpu_s=wc["cpu_s"], load=load2[0]), wc["wall_s"]),
        Row("S11d", "`thinpool status` (fresh process; ratio: seconds)",
            dict(wall_s=status["wall_s"], cpu_s=status["cpu_s"], peak_MiB=status["peak_MiB"], load=load3[0]),
            status["wall_s"]),
    ]
    detail = dict(build=built, open=opened, status=status, loadavg=[load0, load1, load2, load3],
                  volumes=volumes, writes=writes)
    return rows, detail


LIMITS = """
**Anchors.** The targets are the machine: 8 GiB of peak RSS on a 23 GiB machine, where a flat space map
of 2^34 blocks would need 80 GiB (a uint32 count and a state byte per block) and so could not be built
at all. `live_map_pages` is the space map's memory: pages of 1,024 blocks in use (5 KiB each), of
`map_pages` reserved (`spacemap_pages.zeroed`: anonymous memory with `MAP_NORESERVE`, a page allocated when
first written). Times are wall seconds with the CPU seconds beside them: on a shared machine the wall
time includes waiting for a core.

**What the memory is.** Nearly all of the RSS is the block map: a 4 KiB root per volume, and for each
random write into a 10 TiB volume a mid node and a leaf of its own (4 KiB each, holding one mapping),
plus the roots and mid nodes the writes into snapshots shadow. The space map is about 1 MiB of it. The
metadata store keeps an 8-byte location per page of every array: the overflow-count array of 2^34
blocks has 2^24 pages, so 128 MiB of locations, copied once by each commit.

**What limits the times.** The build's CPU goes to creating 100,000 volumes (catalog and device
records) and to the writes' node allocation and shadowing; `Pool.open` reads and checksums the
block map's pages and decodes only the stored space-map pages; the first commit after an open builds
the store's block-state map from those 2^24 locations (numpy). `thinpool status` reads the superblock,
the page maps and the device table, no space map.
"""


def run_step(sc: Scratch, full: bool) -> tuple[list[Row], dict[str, Any]]:
    """The S11 step of ``python -m perf`` (perf/run.py): 100,000 volumes with ``--full``, else 10,000."""
    n = 100_000 if full else 10_000
    return run(n, n, sc)


def main(argv: list[str] | None = None) -> int:
    ap = perf_parser("pib", __doc__, "100,000 volumes and 100,000 writes per round (quick: 10,000)", "pib")
    ap.add_argument("--volumes", type=int, default=None, help="volumes (half thin, half snapshots)")
    ap.add_argument("--writes", type=int, default=None, help="random 4 KiB writes per round (two rounds)")
    args = ap.parse_args(argv)
    n = 100_000 if args.full else 10_000
    volumes = args.volumes or n
    writes = args.writes or n
    if not 2 <= volumes <= 1_000_000 or not 1 <= writes <= 100_000_000:
        ap.error("--volumes must be in [2, 1000000] and --writes in [1, 100000000]")
    with Scratch() as sc:
        rows, detail = run(volumes, writes, sc)
    mach = machine()
    for r in rows:
        print(r.line())
    loads = ", ".join(f"{x[0]:.2f}" for x in detail["loadavg"])

    def body() -> str:
        return (docs_head("1 PiB at 64 KiB blocks, 100,000 volumes", "pib", args.full, mach) +
                f"; load average {loads} at the start, after the build, the open and status: the machine is "
                f"shared). {volumes:,} volumes, 2 x {writes:,} writes.\n\n" + rows_table_md(rows) + "\n"
                + LIMITS)
    return finish(args, rows, detail, mach, SECTION_BEGIN, SECTION_END, body)


if __name__ == "__main__":
    sys.exit(main())
