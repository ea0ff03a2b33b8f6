"""Shared helpers for the perf suite: timing, rows, machine description, peers, synthetic pools.

Every figure here is a ratio of two (or more) sides measured side by side in one process, in
interleaved repeats, with medians -- never an absolute timing compared against a constant.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Mapping, TypeVar

import numpy as np

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

clock = time.perf_counter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERFORMANCE_MD = os.path.join(REPO, "docs", "performance.md")


# ----------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One line of a results table: measured values, a ratio, its target and the verdict."""

    key: str                      # short id, e.g. "engine.1a"
    title: str
    values: dict[str, Any] = field(default_factory=dict)   # measured values with units in the names
    ratio: float | None = None
    target: str = ""              # e.g. ">= 0.8" or "<= 2"
    status: str = "info"          # pass | short | info | missing | skipped | error
    note: str = ""

    def judge(self) -> "Row":
        if self.ratio is None or not self.target:
            return self
        op, text = self.target.split()
        bound = float(text)
        ok = self.ratio >= bound if op == ">=" else self.ratio <= bound
        self.status = "pass" if ok else "short"
        return self

    def line(self) -> str:
        vals = ", ".join(f"{k}={fmt(v)}" for k, v in self.values.items())
        r = f"{self.ratio:.3g}x" if self.ratio is not None else "-"
        t = f"target {self.target}" if self.target else ""
        s = f"[{self.status}]"
        extra = f"  ({self.note})" if self.note else ""
        return f"{self.key:<10} {self.title}\n           {vals}\n           ratio {r} {t} {s}{extra}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 1:
            return f"{v:.3g}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def ratio_row(key: str, title: str, target: str, ratio: float, note: str = "", *,
              values: Mapping[str, Any] | None = None, **named: Any) -> Row:
    """A judged row: the measured ``values`` (names made at run time) then the ``named`` ones."""
    return Row(key, title, {**(values or {}), **named}, float(ratio), target, note=note).judge()


# ----------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    gc.disable()
    try:
        t0 = clock()
        fn()
        return clock() - t0
    finally:
        gc.enable()


def cow_sampler(pool: Any, origin: str, offs: Any, bufs: Any, batch: bool) -> Callable[[int], float]:
    """An :func:`interleave` side: snapshot ``origin``, time the 4 KiB writes into its shared blocks
    (one ``write_many`` or a ``write`` per I/O), then delete the snapshot and commit (untimed)."""
    offs_l = offs.tolist()
    rows = [bufs[i] for i in range(len(bufs))]
    counter = {"i": 0}

    def run(_r: int) -> float:
        counter["i"] += 1
        s = pool.snapshot(origin, f"cow{'b' if batch else 'c'}{counter['i']}")
        if batch:
            t = timed(lambda: s.write_many(offs, bufs))
        else:
            w = s.write

            def go() -> None:
                for off, b in zip(offs_l, rows):
                    w(off, b)
            t = timed(go)
        pool.delete(s.name)
        pool.commit()
        return t
    return run


_Side = TypeVar("_Side", bound=Hashable)


def interleave(sides: Mapping[_Side, Callable[[int], float]], repeats: int) -> dict[_Side, list[float]]:
    """Run each side ``repeats`` times, alternating sides and rotating their order each round.

    A side is called with the repeat index and returns the seconds it measured (so it can time
    only the interesting part and do its set-up and tear-down untimed).  Sides are named by any
    key (a string, a size ...); the results come back under the same keys."""
    names = list(sides)
    out: dict[_Side, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(sides[n](r))
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def read_sides(offs: Any, io: int, loops: int = 5) -> tuple[Callable[[Any], Callable[[int], float]],
                                                          Callable[[Any], Callable[[int], float]]]:
    """Two :func:`interleave` side makers for reading ``io`` bytes at each offset of ``offs`` from a volume:
    ``batch(v)`` times one ``read_many`` (repeated ``loops`` times inside a sample, as one call is only
    milliseconds; the mean is returned), ``call(v)`` a ``read`` per offset."""
    offs_l = offs.tolist()

    def batch(v: Any) -> Callable[[int], float]:
        def run(_r: int) -> float:
            def go() -> None:
                for _ in range(loops):
                    v.read_many(offs, io)
            return timed(go) / loops
        return run

    def call(v: Any) -> Callable[[int], float]:
        def run(_r: int) -> float:
            rd = v.read

            def go() -> None:
                for o in offs_l:
                    rd(o, io)
            return timed(go)
        return run
    return batch, call


# ----------------------------------------------------------------------------- scratch space
class Scratch:
    """A work directory (sparse files go here; same filesystem for every side of a comparison)."""

    def __init__(self, base: str | None = None, keep: bool = False) -> None:
        self.base = base or os.environ.get("THINPOOL_PERF_DIR") or tempfile.gettempdir()
        os.makedirs(self.base, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="thinpool-perf-", dir=self.base)
        self.keep = keep
        self._n = 0

    def path(self, name: str) -> str:
        self._n += 1
        return os.path.join(self.dir, f"{self._n:04d}-{name}")

    def remove(self, path: str) -> None:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sparse_file(path: str, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    return fd


def drop_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# ----------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, filesystem of the work dir, kernel, Python/numpy/numba versions."""
    info: dict[str, Any] = {}
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info["cpu"] = cpu
    info["cores"] = os.cpu_count()
    try:
        import psutil
        info["ram_gib"] = round(psutil.virtual_memory().total / GiB, 1)
    except ImportError:
        info["ram_gib"] = None
    base = os.environ.get("THINPOOL_PERF_DIR") or tempfile.gettempdir()
    fs = "?"
    with contextlib.suppress(Exception):
        fs = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", base], capture_output=True, text=True,
                            timeout=10).stdout.strip() or "?"
    info["filesystem"] = f"{' '.join(fs.split())} ({base})"
    info["kernel"] = platform.release()
    info["python"] = platform.python_version()
    import numba
    info["numpy"] = np.__version__
    info["numba"] = numba.__version__
    return info


# ----------------------------------------------------------------------------- peers
PEERS = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "thin_dump": "thin-provisioning-tools",
    "thin_restore": "thin-provisioning-tools",
    "thin_check": "thin-provisioning-tools",
    "fio": "fio",
    "qemu-nbd": "qemu-utils",
    "nbdkit": "nbdkit",
}


def find_tool(name: str) -> str | None:
    """Locate a peer tool on PATH or in the sbin dirs Debian puts thin-provisioning-tools in."""
    p = shutil.which(name)
    if p:
        return p
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        cand = os.path.join(d, name)
        if os.access(cand, os.X_OK):
            return cand
    return None


def missing_msg(name: str) -> str:
    pkg = PEERS.get(name, name)
    return f"peer '{name}' not found: install it with `apt-get install {pkg}` (the test command does the same)"


def missing_row(key: str, title: str, tool: str) -> Row:
    """A row that could not be measured because the peer ``tool`` is not installed."""
    return Row(key, title, {}, None, "", "missing", note=missing_msg(tool))


def tool_version(name: str) -> str:
    path = find_tool(name)
    if not path:
        return "missing"
    for args in (["--version"], ["-V"]):
        with contextlib.suppress(Exception):
            r = subprocess.run([path, *args], capture_output=True, text=True, timeout=10)
            out = (r.stdout or r.stderr).strip().splitlines()
            if out:
                return out[0]
    return "?"


# ----------------------------------------------------------------------------- synthetic pools
def synthetic_metadata(nr_data_blocks: int, mappings_per_dev: list[int], *, vspan_factor: float = 2.0,
                       seed: int = 0, block_size: int = 64 * KiB, time: int = 0):
    """Interop IR with one device per entry of ``mappings_per_dev``: each maps that many virtual
    blocks (random, sorted, within ``vspan_factor`` x the count) to distinct data blocks."""
    from thinpool.interop.ir import Device, Metadata, Superblock
    rng = np.random.default_rng(seed)
    total = sum(mappings_per_dev)
    if total > nr_data_blocks:
        raise ValueError("more mappings than data blocks")
    dblocks_all = rng.permutation(nr_data_blocks)[:total].astype(np.uint64) if total < nr_data_blocks // 4 \
        else rng.permutation(nr_data_blocks).astype(np.uint64)[:total]
    devices = []
    pos = 0
    for i, n in enumerate(mappings_per_dev):
        span = max(n, int(n * vspan_factor))
        vb = np.sort(rng.choice(span, n, replace=False)).astype(np.uint64) if n else np.zeros(0, np.uint64)
        devices.append(Device(dev_id=i + 1, mapped_blocks=n, transaction=0, creation_time=time, snap_time=time,
                              vblocks=vb, dblocks=dblocks_all[pos:pos + n], times=np.full(n, time, np.uint32)))
        pos += n
    sb = Superblock(time=time, transaction=1, data_block_size=block_size // 512, nr_data_blocks=nr_data_blocks)
    return Metadata(sb, devices)


def synthetic_pool(path: str, nr_data_blocks: int, mappings_per_dev: list[int], **kw):
    """A pool built from :func:`synthetic_metadata` (``Pool.from_metadata``; the data file stays sparse)."""
    from thinpool import Pool
    md = synthetic_metadata(nr_data_blocks, mappings_per_dev, **kw)
    return Pool.from_metadata(path, md)


def rand_bytes(rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    return rng.integers(0, 256, (n, length), dtype=np.uint8)


def save_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def write_figures(path: str, rows: list[Row], detail: Any, mach: dict[str, Any]) -> None:
    """The ``--json`` file of a perf module: its rows, raw detail and the machine."""
    with open(path, "w") as f:
        json.dump({"rows": [r.as_dict() for r in rows], "detail": detail, "machine": mach}, f, indent=1)


# ----------------------------------------------------------------------------- command line, docs
def perf_parser(module: str, doc: str | None, full_help: str, section: str,
                json_help: str = "also write the figures to this file") -> argparse.ArgumentParser:
    """The argument parser every ``python -m perf.<module>`` starts from: --full, --docs (rewrite
    ``section`` of docs/performance.md) and --json; a module adds its own options."""
    ap = argparse.ArgumentParser(prog=f"python -m perf.{module}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help=full_help)
    ap.add_argument("--docs", action="store_true", help=f"rewrite the {section} section of docs/performance.md")
    ap.add_argument("--json", help=json_help)
    return ap


def docs_head(title: str, module: str, full: bool, mach: dict[str, Any]) -> str:
    """The start of a perf module's docs section: its heading (the command that measured it) and
    "Measured <date> on <cpu> (<n> cores" -- the module goes on with its own words."""
    return (f"## {title} (`python -m perf.{module}{' --full' if full else ''}`)\n\n"
            f"Measured {datetime.date.today()} on {mach.get('cpu', '?')} ({mach.get('cores', '?')} cores")


def finish(args: argparse.Namespace, rows: list[Row], detail: Any, mach: dict[str, Any], begin: str, end: str,
           body: Callable[[], str]) -> int:
    """The end of a perf module's main(): ``--json`` writes the figures, ``--docs`` rewrites the module's
    section of docs/performance.md (``body()``, between the markers ``begin`` and ``end``).  Returns the
    exit status: 1 when a row is short of its target, else 0."""
    if args.json:
        write_figures(args.json, rows, detail, mach)
    if args.docs:
        write_section(PERFORMANCE_MD, begin, end, body())
    return 0 if all(r.status != "short" for r in rows) else 1


def status_cell(r: Row) -> str:
    """A row's status for a Markdown table (a short row in bold)."""
    return f"**{r.status}**" if r.status == "short" else r.status


def rows_table_md(rows: list[Row]) -> str:
    """A Markdown table of ``rows``: key, title, the measured values (floats to 3 digits, booleans
    as yes/no), the ratio, the target and the status."""
    out = ["| row | what | measured | ratio | target | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        vals = ", ".join(f"{k}={v:,.3g}" if isinstance(v, float) else
                         (f"{k}={'yes' if v else 'no'}" if isinstance(v, bool) else f"{k}={v:,}")
                         for k, v in r.values.items())
        out.append(f"| {r.key} | {r.title} | {vals} | {r.ratio:.3g} | {r.target} | {status_cell(r)} |")
    return "\n".join(out)


def write_section(path: str, begin: str, end: str, body: str) -> None:
    """Replace (or append) the text between the markers ``begin`` and ``end`` in ``path``; nothing else changes."""
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    if begin in text and end in text:
        a = text.index(begin)
        b = text.index(end) + len(end)
        text = text[:a] + block.rstrip("\n") + text[b:]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    with open(path, "w") as f:
        f.write(text)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)
