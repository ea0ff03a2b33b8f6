"""``thinpool compare``: block-level copy-on-write on a thin pool against overlayfs, measured side by side.

:func:`compare` imports an image archive twice -- onto the pool (:mod:`thinpool.containers.image_store`,
Docker's devicemapper layout: ext4 on thin snapshots) and into an overlay2-style store
(:mod:`thinpool.containers.overlay`) -- and runs every workload (:mod:`thinpool.containers.workloads`) in
two fresh containers of it, one per side.  Per workload it reports

* **overlay**: the upper directory's allocated bytes as ``du`` counts them, after the run;
* **thin**: the container volume's exclusive blocks (``thinpool ls --usage``'s definition) x the pool's
  block size, after the run (the container was unmounted, so ext4 flushed everything, the pool committed);
* the thin side **at every requested block size**: the container's block I/O was recorded (fio iolog v3,
  as ``serve --record``) and is replayed through the simulator (:func:`thinpool.simulate.replay`) into a
  snapshot of a volume mapping what the image maps, on a metadata-only pool of that block size; the
  exclusive blocks of the snapshot are the figure.  dm-thin's smallest block is 64 KiB; the **floor** --
  what block-level CoW costs at ext4's own 4 KiB block, the finest it can be -- is counted from the trace
  directly (4 KiB blocks written and not discarded afterwards);
* the **wall time** of each side: the command plus ``sync -f`` of its filesystem (``seconds``), and from
  mount to unmount (``total_seconds``).

Where ``podman`` works, the same workloads also run on podman's own overlay storage (``podman load`` of
the archive, then per workload ``podman create`` + ``podman mount``, the workload on the mounted root,
``podman unmount``, the upper directory's du); where it cannot, the report says why (``podman.skipped``).
The JSON keys are documented in docs/containers.md ("thinpool compare").
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from thinpool.containers.overlay import (OverlayStore, RunResult, allocated_bytes, kernel_features,
                                         problems as overlay_problems, run_in_root)
from thinpool.containers.workloads import Workload, builtin_workloads
from thinpool.errors import FailedPrecondition, InvalidArgument
from thinpool.units import format_size, parse_size

#: the block sizes reported by default (Docker's loop-lvm 64 KiB to 1 MiB)
DEFAULT_BLOCK_SIZES = (64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20)
#: the floor: ext4's block (block-level CoW cannot be finer than the filesystem's own block)
FLOOR_BLOCK_SIZE = 4096
#: most block sizes one comparison replays
MAX_BLOCK_SIZES = 16
#: most workloads one comparison runs
MAX_WORKLOADS = 64


def parse_block_sizes(text: str | Sequence[int | str]) -> list[int]:
    """``"64K,128K,1M"`` (or a list) as sorted, distinct byte counts; each a dm-thin block size (a
    multiple of 64 KiB from 64 KiB to 1 GiB)."""
    from thinpool.rules import check_block_size
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [x.strip() if isinstance(x, str) else x for x in items]
    if not items or any(x == "" for x in items):
        raise InvalidArgument(f"block sizes {text!r}: a comma-separated list such as 64K,512K")
    if len(items) > MAX_BLOCK_SIZES:
        raise InvalidArgument(f"at most {MAX_BLOCK_SIZES} block sizes, got {len(items)}")
    return sorted({check_block_size(parse_size(x, "block size")) for x in items})


# ================================================================================ the trace, replayed
def _trace_arrays(trace: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from thinpool.simulate.traces import open_trace
    ops, offs, lens = [], [], []
    for c in open_trace(trace, "fio-iolog").chunks():
        ops.append(c.op)
        offs.append(c.offset)
        lens.append(c.length)
    if not ops:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ops), np.concatenate(offs), np.concatenate(lens)


def _expand(first: np.ndarray, last: np.ndarray, rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every block of the ranges [first, last] with the record index it came from (vectorised)."""
    keep = last >= first
    first, last, rec = first[keep], last[keep], rec[keep]
    n = last - first + 1
    if n.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.repeat(first - np.concatenate(([0], np.cumsum(n)[:-1])), n)
    return starts + np.arange(int(n.sum()), dtype=np.int64), np.repeat(rec, n)


def written_blocks(trace: str, block_size: int = FLOOR_BLOCK_SIZE) -> int:
    """Blocks of ``block_size`` that the trace writes and does not discard whole afterwards: what a
    volume that maps blocks of that size on first write owns at the end (the 4 KiB floor)."""
    from thinpool.simulate.traces import OP_DISCARD, OP_WRITE
    op, off, length = _trace_arrays(trace)
    idx = np.arange(op.size, dtype=np.int64)
    w = (op == OP_WRITE) & (length > 0)
    wb, wr = _expand(off[w] // block_size, (off[w] + length[w] - 1) // block_size, idx[w])
    d = (op == OP_DISCARD) & (length > 0)
    db, dr = _expand(-(-off[d] // block_size), (off[d] + length[d]) // block_size - 1, idx[d])
    if wb.size == 0:
        return 0
    order = np.lexsort((wr, wb))
    ub, pos = np.unique(wb[order][::-1], return_index=True)    # the last write of each block
    lw = wr[order][::-1][pos]
    if db.size == 0:
        return int(ub.size)
    order = np.lexsort((dr, db))
    dub, dpos = np.unique(db[order][::-1], return_index=True)
    ld = dr[order][::-1][dpos]
    i = np.searchsorted(dub, ub)
    i = np.minimum(i, dub.size - 1)
    discarded_after = (dub[i] == ub) & (ld[i] > lw)
    return int(np.count_nonzero(~discarded_after))


def replay_at(trace: str, block_size: int, volume_size: int, base_ranges: np.ndarray) -> dict[str, int]:
    """Replay the container's recorded I/O at ``block_size``: on a metadata-only pool of that block size,
    a volume ``image`` mapping every block that touches ``base_ranges`` (``[start, end)`` byte ranges: what
    the image maps under the container) is snapshotted as ``container`` and the trace replayed into it.
    Returns its exclusive blocks, their bytes, and the replay's CoW counters."""
    from thinpool import Pool
    from thinpool.simulate import replay
    from thinpool.simulate.replay_sources import ArrayTrace
    from thinpool.simulate.traces import OP_WRITE

    size = -(-volume_size // block_size) * block_size
    with tempfile.TemporaryDirectory(prefix="thinpool-compare-") as tmp:
        with Pool.create(os.path.join(tmp, "pool"), data_size=max(size, block_size) * 2, block_size=block_size,
                         metadata_only=True, error_if_no_space=True) as pool:
            pool.create_thin("image", size)
            if len(base_ranges):
                first = base_ranges[:, 0] // block_size
                last = (base_ranges[:, 1] - 1) // block_size
                blocks, _ = _expand(first, last, np.zeros(len(first), np.int64))
                blocks = np.unique(blocks)
                n = blocks.size
                replay(pool, "image", ArrayTrace(np.full(n, OP_WRITE), blocks * block_size,
                                                 np.full(n, block_size)))
            pool.snapshot("image", "container")
            r = replay(pool, "container", trace, format="fio-iolog")
            u = pool.usage("container")
            return {"block_size": block_size, "exclusive_blocks": int(u.exclusive_blocks),
                    "bytes": int(u.exclusive_blocks) * block_size,
                    "cow_breaks": int(r.counters.get("cow_breaks", 0)),
                    "cow_bytes_copied": int(r.counters.get("cow_bytes_copied", 0)),
                    "provisioned_blocks": int(r.counters.get("provisioned_blocks", 0))}


def _ranges(vblocks: np.ndarray, block_size: int) -> np.ndarray:
    """Mapped virtual blocks as merged ``[start, end)`` byte ranges."""
    if vblocks.size == 0:
        return np.zeros((0, 2), np.int64)
    vb = np.sort(vblocks.astype(np.int64))
    cut = np.flatnonzero(np.diff(vb) != 1) + 1
    starts = np.concatenate(([vb[0]], vb[cut]))
    ends = np.concatenate((vb[cut - 1], [vb[-1]])) + 1
    return np.stack([starts * block_size, ends * block_size], axis=1)


# ================================================================================ one side each
def _thin_run(pool: Any, image_ref: str, wl: Workload, name: str, trace: str, timeout: float,
              chroot: bool) -> dict[str, Any]:
    from thinpool.containers import runtime

    row = runtime.create_container(pool, image_ref, name)
    volume = row["volume"]
    thin = pool.thin(volume)
    vb, _, _ = thin.mappings()
    bs = pool.block_size
    base = _ranges(vb, bs)
    vsize = int(thin.size)
    t0 = time.perf_counter()
    with runtime.mounted_container(pool, name, record=trace) as root:
        res = run_in_root(root, list(wl.argv), timeout=timeout, chroot=chroot)
    total = time.perf_counter() - t0
    if res.returncode != 0:
        raise FailedPrecondition(f"workload {wl.name} failed on the thin container ({res.returncode}): "
                                 f"{res.stderr.strip()[-300:]}")
    u = pool.usage(volume)
    return {"container": name, "volume": volume, "block_size": bs, "exclusive_blocks": int(u.exclusive_blocks),
            "mapped_blocks": int(u.mapped_blocks), "bytes": int(u.exclusive_blocks) * bs,
            "seconds": res.seconds, "total_seconds": total, "trace": trace,
            "_base": base, "_volume_size": vsize}


def _overlay_run(store: OverlayStore, image: Any, wl: Workload, name: str, timeout: float,
                 chroot: bool) -> dict[str, Any]:
    store.create_container(image, name)
    t0 = time.perf_counter()
    with store.mounted(name) as root:
        res = run_in_root(root, list(wl.argv), timeout=timeout, chroot=chroot)
    total = time.perf_counter() - t0
    if res.returncode != 0:
        raise FailedPrecondition(f"workload {wl.name} failed on the overlay container ({res.returncode}): "
                                 f"{res.stderr.strip()[-300:]}")
    return {"container": name, "upper_dir": store.upper_dir(name), "upper_bytes": store.upper_bytes(name),
            "seconds": res.seconds, "total_seconds": total}


# ================================================================================ podman
def _podman(*args: str, timeout: float = 600) -> str:
    try:
        r = subprocess.run(["podman", *args], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"podman {args[0]} timed out after {timeout} s") from None
    if r.returncode != 0:
        raise FailedPrecondition(f"podman {' '.join(args)[:200]} failed: "
                                 f"{(r.stderr or r.stdout).decode(errors='replace').strip()[-300:]}")
    return r.stdout.decode(errors="replace")


def podman_problem() -> str | None:
    """Why podman cannot run the comparison here (None when it can): missing, not root, or a storage
    driver other than overlay."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    if os.geteuid() != 0:
        return "podman mount needs root"
    try:
        driver = _podman("info", "--format", "{{.Store.GraphDriverName}}", timeout=120).strip()
    except FailedPrecondition as e:
        return f"podman info fails: {e}"
    if driver != "overlay":
        return f"podman's storage driver is {driver!r}, not overlay"
    return None


class _Podman:
    """The archive loaded into podman (``podman load -i ARCHIVE``; ``podman pull oci:DIR:TAG`` for a tag of a
    layout directory); per workload a created, never started, container whose root is mounted with ``podman
    mount``.  Containers are removed after each run and :meth:`close` removes the image again (unless podman
    had it before), both unless ``keep``."""

    def __init__(self, archive: str, ref: str | None, keep: bool = False) -> None:
        self.keep = keep
        before = set(_podman("images", "-q", "--no-trunc").split())
        # podman names an image loaded from a path after the path, which must then be a valid reference
        # (lowercase, no trailing "_"): load it through a symlink whose path is
        base = tempfile.gettempdir()
        if not re.fullmatch(r"[a-z0-9/._-]+", base):
            base = "/tmp"
        linkdir = os.path.join(base, f"thinpool-podman-{secrets.token_hex(4)}")
        os.mkdir(linkdir, 0o700)
        try:
            link = os.path.join(linkdir, "image" if os.path.isdir(archive) else "image.tar")
            os.symlink(archive, link)
            t0 = time.perf_counter()
            if os.path.isdir(archive) and ref:
                out = _podman("pull", "-q", f"oci:{link}:{ref}", timeout=3600)
            else:
                out = _podman("load", "-q", "-i", link, timeout=3600)
        finally:
            shutil.rmtree(linkdir, ignore_errors=True)
        self.load_seconds = time.perf_counter() - t0
        words = out.split()
        if not words:
            raise FailedPrecondition(f"podman could not load {archive}: it printed nothing")
        ref_out = words[-1]
        self.image_id = _podman("image", "inspect", "--format", "{{.Id}}", ref_out).strip()
        self.remove = not ({self.image_id, "sha256:" + self.image_id} & before)

    def run(self, wl: Workload, name: str, timeout: float, chroot: bool = False) -> dict[str, Any]:
        if chroot:     # the image's own programs: a real container run (podman create + start = podman run)
            _podman("create", "--name", name, "--network", "none", "--workdir", "/", self.image_id, *wl.argv)
        else:          # host programs on the container's root: created, never started, mounted
            _podman("create", "--name", name, "--network", "none", self.image_id, "true")
        try:
            t0 = time.perf_counter()
            if chroot:
                try:
                    r = subprocess.run(["podman", "start", "--attach", name], capture_output=True, timeout=timeout)
                except subprocess.TimeoutExpired:
                    raise FailedPrecondition(f"workload {wl.name}: podman start timed out after {timeout} s") from None
                upper = _podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name).strip()
                subprocess.run(["sync", "-f", upper], capture_output=True)
                res = RunResult(list(wl.argv), r.returncode, time.perf_counter() - t0,
                                r.stdout.decode(errors="replace")[-2000:], r.stderr.decode(errors="replace")[-2000:])
            else:
                root = _podman("mount", name).strip()
                try:
                    res = run_in_root(root, list(wl.argv), timeout=timeout)
                finally:
                    _podman("unmount", name)
            total = time.perf_counter() - t0
            if res.returncode != 0:
                raise FailedPrecondition(f"workload {wl.name} failed on the podman container ({res.returncode}): "
                                         f"{res.stderr.strip()[-300:]}")
            upper = _podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name).strip()
            return {"container": name, "upper_dir": upper, "upper_bytes": allocated_bytes(upper),
                    "seconds": res.seconds, "total_seconds": total}
        finally:
            if not self.keep:
                subprocess.run(["podman", "rm", "-f", name], capture_output=True)

    def close(self) -> None:
        if self.remove and not self.keep:
            subprocess.run(["podman", "rmi", "-f", self.image_id], capture_output=True)


# ================================================================================ the comparison
def _fs_type(path: str) -> str:
    best, fstype = "", "?"
    path = os.path.realpath(path)
    with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2:
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    return fstype


def compare(pool: Any, archive: str | os.PathLike[str], *, tag: str | None = None,
            workloads: Sequence[Workload] | None = None, block_sizes: Sequence[int] | str = DEFAULT_BLOCK_SIZES,
            workdir: str | None = None, podman: bool = True, keep: bool = False, timeout: float = 3600.0,
            fs: str | None = None, base_size: int | str | None = None, chroot: bool = False,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``workloads`` (default: the built-in ones) on both sides for the image ``archive`` (``tag`` picks
    the image in an archive of several) and return the report (see the module docstring; the keys are
    documented in docs/containers.md).  The image is imported onto ``pool`` (a path or an open pool;
    nothing is written if the image is there already; ``fs``/``base_size`` as ``thinpool image import``,
    default: the pool's base device's when it has one, else ext4 on 10 GiB) and into an overlay store in
    ``workdir`` (default: a temporary directory in the system's temp dir, removed afterwards; the upper
    directories live there, so its filesystem is the overlay side's).  Containers are removed after each workload unless ``keep``.  ``chroot``: the commands
    run chrooted in the container's root (the image's own programs; podman then starts the container: a
    real ``podman run``).  Root only."""
    from thinpool.containers import image_store, runtime

    wls = list(builtin_workloads() if workloads is None else workloads)
    if not wls or len(wls) > MAX_WORKLOADS:
        raise InvalidArgument(f"between 1 and {MAX_WORKLOADS} workloads, got {len(wls)}")
    if not all(isinstance(w, Workload) for w in wls):
        raise InvalidArgument("workloads must be Workload values (thinpool.containers.workloads.parse_workload "
                              "makes one of NAME=COMMAND)")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 86400:
        raise InvalidArgument(f"timeout must be a number of seconds in (0, 86400], not {timeout!r}")
    if len({w.name for w in wls}) != len(wls):
        raise InvalidArgument("workload names must be distinct")
    sizes = parse_block_sizes(block_sizes if isinstance(block_sizes, str) else list(block_sizes))
    missing = overlay_problems()
    if missing:
        raise FailedPrecondition("thinpool compare needs " + ", ".join(missing))
    archive = os.path.abspath(os.fspath(archive))
    say = progress or (lambda msg: None)
    token = secrets.token_hex(3)
    with contextlib.ExitStack() as stack:
        p = stack.enter_context(image_store.opened_pool(pool, write=True))
        pool_path = os.path.abspath(p.path)
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="thinpool-compare-")
            if not keep:
                stack.callback(shutil.rmtree, workdir, True)
        else:
            os.makedirs(workdir, exist_ok=True)
        traces = os.path.join(workdir, "traces")
        os.makedirs(traces, exist_ok=True)

        say(f"importing {archive} onto the pool")
        t0 = time.perf_counter()
        base = image_store.load_records(p)["base"] or {}
        rec = image_store.import_image(p, archive, tag=tag, fs=fs or base.get("fs", "ext4"),
                                       base_size=base_size or base.get("size", "10G"))
        thin_import = time.perf_counter() - t0
        image_ref = rec.id
        say(f"importing {archive} into the overlay store")
        store = OverlayStore(os.path.join(workdir, "overlay"))
        t0 = time.perf_counter()
        oimage = store.import_image(archive, tag)
        overlay_import = time.perf_counter() - t0

        pod_problem = podman_problem() if podman else "not asked for (--no-podman)"
        pod = None
        if pod_problem is None:
            try:
                pod = _Podman(archive, tag, keep)
                stack.callback(pod.close)
            except FailedPrecondition as e:
                pod_problem = str(e)

        rows = []
        for wl in wls:
            name = f"cmp-{wl.name}-{token}"
            trace = os.path.join(traces, f"{wl.name}.iolog")
            say(f"{wl.name}: thin container")
            try:
                thin = _thin_run(p, image_ref, wl, name, trace, timeout, chroot)
            finally:
                if not keep:
                    with contextlib.suppress(Exception):
                        runtime.remove_container(p, name)
                        p.commit()           # also when a failure aborts the caller's batch (run_op)
            say(f"{wl.name}: overlay container")
            try:
                ov = _overlay_run(store, oimage, wl, name, timeout, chroot)
            finally:
                if not keep:
                    with contextlib.suppress(Exception):
                        store.remove_container(name)
            base, vsize = thin.pop("_base"), thin.pop("_volume_size")
            if not keep:
                thin["trace"] = None         # the work directory goes
            say(f"{wl.name}: replaying the thin container's I/O at {len(sizes)} block sizes")
            floor = written_blocks(trace, FLOOR_BLOCK_SIZE)
            at = [{"block_size": FLOOR_BLOCK_SIZE, "exclusive_blocks": floor, "bytes": floor * FLOOR_BLOCK_SIZE,
                   "floor": True}]
            at += [replay_at(trace, bs, vsize, base) for bs in sizes]
            row: dict[str, Any] = {"name": wl.name, "description": wl.description, "argv": list(wl.argv),
                                   "overlay": ov, "thin": thin, "thin_at": at,
                                   "ratio": (ov["upper_bytes"] / thin["bytes"]) if thin["bytes"] else None}
            if pod is not None:
                say(f"{wl.name}: podman container")
                try:
                    row["podman"] = pod.run(wl, f"{name}-podman", timeout, chroot)
                except FailedPrecondition as e:
                    row["podman"] = {"skipped": str(e)}
            else:
                row["podman"] = {"skipped": pod_problem}
            rows.append(row)
        return {
            "pool": pool_path, "archive": archive, "tag": tag, "chroot": bool(chroot),
            "image": {"id": rec.id, "tags": list(rec.tags), "layers": len(rec.layers),
                      "file_bytes": int(rec.file_bytes), "fs": rec.fs, "mkfs": rec.mkfs,
                      "thin_import_seconds": thin_import, "overlay_import_seconds": overlay_import},
            "block_size": int(rec.block_size), "block_sizes": sizes, "floor_block_size": FLOOR_BLOCK_SIZE,
            "overlay": {"store": store.root if keep else None, "upper_fs": _fs_type(store.root),
                        "kernel": kernel_features()},
            "podman": {"used": pod is not None, "skipped": pod_problem,
                       "image_id": pod.image_id if pod is not None else None,
                       "load_seconds": pod.load_seconds if pod is not None else None},
            "workloads": rows,
            "workdir": workdir if keep else None,
        }


# ================================================================================ rendering
def _mb(n: int | None) -> str:
    return "-" if n is None else format_size(int(n))


def render_compare(res: dict[str, Any]) -> str:
    """The report as text: one row per workload."""
    native = res["block_size"]
    extra = [a["block_size"] for a in res["workloads"][0]["thin_at"]] if res["workloads"] else []
    head = ["workload", "overlay upper", f"thin ({format_size(native)} blocks)", "overlay/thin"] + \
        [("floor " if bs == res["floor_block_size"] else "") + format_size(bs) for bs in extra] + \
        ["time overlay", "time thin"]
    if res["podman"]["used"]:
        head.insert(2, "podman upper")
    rows = []
    for w in res["workloads"]:
        ratio = "-" if w["ratio"] is None else f"{w['ratio']:.1f}x" if w["ratio"] >= 1 else f"{w['ratio']:.2g}x"
        r = [w["name"], _mb(w["overlay"]["upper_bytes"]), _mb(w["thin"]["bytes"]), ratio] + \
            [_mb(a["bytes"]) for a in w["thin_at"]] + \
            [f"{w['overlay']['seconds']:.2f}s", f"{w['thin']['seconds']:.2f}s"]
        if res["podman"]["used"]:
            r.insert(2, _mb(w["podman"].get("upper_bytes")))
        rows.append(r)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(row))
             for row in [head] + rows]
    img = res["image"]
    notes = [f"image {', '.join(img['tags']) or img['id'][:19]}: {img['layers']} layers, {_mb(img['file_bytes'])} "
             f"of files; {img['fs']} on the thin pool ({format_size(native)} blocks), overlay upper on "
             f"{res['overlay']['upper_fs']} (metacopy={res['overlay']['kernel'].get('metacopy', '?')})",
             "thin at other block sizes: the container's recorded block I/O replayed through the simulator; "
             f"floor: {format_size(res['floor_block_size'])} blocks written (ext4's block)",
             "time: the command plus sync -f of its filesystem"]
    if not res["podman"]["used"]:
        notes.append(f"podman: skipped ({res['podman']['skipped']})")
    return "\n".join(lines + [""] + notes)


def html_compare(res: dict[str, Any]) -> str:
    """The report as one self-contained HTML page: the table and one bar chart (SVG) per workload."""
    esc = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>thinpool compare</title>",
             "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}</style>",
             "<h1>Block-level CoW (thin pool) vs overlayfs</h1>",
             f"<pre>{esc(render_compare(res))}</pre>"]
    for w in res["workloads"]:
        bars = [("overlay upper", w["overlay"]["upper_bytes"], "#c0504d")]
        if "upper_bytes" in w.get("podman", {}):
            bars.append(("podman upper", w["podman"]["upper_bytes"], "#9b59b6"))
        bars += [(("floor " if a.get("floor") else "thin ") + format_size(a["block_size"]), a["bytes"], "#4f81bd")
                 for a in w["thin_at"]]
        top = max([b[1] for b in bars] + [1])
        h = 22 * len(bars) + 10
        svg = [f"<svg width='760' height='{h}' xmlns='http://www.w3.org/2000/svg'>"]
        for i, (label, value, colour) in enumerate(bars):
            width = 500 * value / top
            y = 5 + 22 * i
            svg.append(f"<text x='0' y='{y + 14}' font-size='12'>{esc(label)}</text>"
                       f"<rect x='120' y='{y}' width='{width:.1f}' height='16' fill='{colour}'/>"
                       f"<text x='{125 + width:.1f}' y='{y + 14}' font-size='12'>{esc(_mb(value))}</text>")
        svg.append("</svg>")
        parts.append(f"<h2>{esc(w['name'])}</h2><p>{esc(w['description'])}</p>" + "".join(svg))
    parts.append(f"<h2>JSON</h2><pre>{esc(json.dumps(res, indent=1))}</pre>")
    return "\n".join(parts)


# ================================================================================ thinpool demo --vs-overlay
def run_vs_overlay_demo(directory: str | None = None, *, block_size: int | str = "64KiB",
                        data_size: int | str = "100GiB", sizes: Any = None,
                        block_sizes: Sequence[int] | str = DEFAULT_BLOCK_SIZES, base_size: int | str = "10G",
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``thinpool demo --vs-overlay``: build the workload image (:func:`~thinpool.containers.workloads.
    build_workload_image`, ``sizes`` default the issue's) with umoci, make a pool (in ``directory``, which
    must not exist or be empty, kept; default a temporary directory, removed) and :func:`compare` the
    built-in workloads on it.  The result is :func:`compare`'s with the image's build parameters added
    (``built``)."""
    from thinpool import Pool
    from thinpool.containers.workloads import ISSUE_SIZES, build_workload_image
    say = progress or (lambda msg: None)
    missing = overlay_problems()
    if missing:
        raise FailedPrecondition("thinpool demo --vs-overlay needs " + ", ".join(missing))
    with tempfile.TemporaryDirectory(prefix="thinpool-vs-overlay-") as tmp:
        pool_dir = directory or os.path.join(tmp, "pool")
        say("building the workload image with umoci")
        built = build_workload_image(os.path.join(tmp, "image"), sizes or ISSUE_SIZES, tag="workload")
        Pool.create(pool_dir, data_size=data_size, block_size=block_size).close()
        res = compare(pool_dir, built["archive"], tag="workload", block_sizes=block_sizes, base_size=base_size,
                      workdir=os.path.join(tmp, "work"), progress=say)
    res["built"] = {k: v for k, v in built.items() if k != "archive"}
    res["archive"] = None
    if directory is None:
        res["pool"] = None
    return res


def save_png(res: dict[str, Any], path: str) -> None:
    """A bar chart of the report (log scale, one group per workload: the overlay upper directory, podman's,
    then the thin side at the floor and every block size) as a PNG (needs matplotlib: the ``simulate``
    extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgument("--png needs matplotlib (pip install 'thinpool[simulate]')") from None
    from thinpool.safe_output import write_output
    import io
    ws = res["workloads"]
    series = [("overlay upper (du)", [w["overlay"]["upper_bytes"] for w in ws], "#c0504d")]
    if res["podman"]["used"]:
        series.append(("podman upper (du)", [w["podman"].get("upper_bytes", 0) for w in ws], "#9b59b6"))
    blues = ["#9dc3e6", "#6fa8dc", "#3d85c6", "#0b5394", "#073763", "#041e3a"]
    for i, a in enumerate(ws[0]["thin_at"] if ws else []):
        label = ("thin, floor " if a.get("floor") else "thin, ") + format_size(a["block_size"]) + " blocks"
        series.append((label, [w["thin_at"][i]["bytes"] for w in ws], blues[min(i, len(blues) - 1)]))
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / max(1, len(series))
    for k, (label, values, colour) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(ws))]
        ax.bar(xs, [max(v, 1) / 2**20 for v in values], width, label=label, color=colour)
    ax.set_yscale("log")
    ax.set_ylabel("MiB written by the container (log)")
    ax.set_xticks(range(len(ws)))
    ax.set_xticklabels([w["name"] for w in ws])
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(f"file-level copy-up (overlayfs) vs block-level CoW (thin pool, {res['image']['fs']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_output(path, buf.getvalue(), pools=[res["pool"]] if res.get("pool") else [], what="--png file")
