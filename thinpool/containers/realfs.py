"""The demo's scenario on a real filesystem: ``thinpool demo --real-fs`` (root only).

:mod:`thinpool.containers.demo` runs Docker's "About storage drivers" walkthrough on the idealized layer model
(files laid out block-aligned, no filesystem).  This module runs the same walkthrough the way Docker's
``devicemapper`` driver really did it, with ext4 on thin devices, and measures what ext4 actually wrote
-- superblock, group descriptors, bitmaps, inode tables, directories, journal and data:

1. the pool is served over NBD from a background thread (:class:`thinpool.nbd.served.Served`, so
   ``thinpool ls POOL`` works from another shell meanwhile); a volume becomes a block device through
   ``nbdfuse`` (the export as a file in a FUSE directory) and a loop device (:class:`Attached`);
2. the base device (``base``, 10 GiB by default) is formatted like Docker does it:
   ``mkfs.ext4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0`` then ``tune2fs -c -1 -i 0``;
3. each image layer is a snapshot of the one below (the first of ``base``), mounted, given its file(s)
   -- 103,000,000 / 745 / 2,780 / 7 bytes for ubuntu, then the 100-byte ``COPY`` -- and unmounted
   before the next snapshot (Docker's ApplyDiff), so every snapshot is of a clean, flushed filesystem;
4. five containers: ``<name>-init`` (a snapshot of the top layer, given Docker's init files and
   directories) and ``<name>`` (a snapshot of the -init device), all five mounted ("running");
5. ``printf hello > /out.txt`` in containers 1-3, 4 KiB changed in the middle of the 103 MB file in
   container 4, each followed by ``syncfs``; then the containers are stopped (unmounted).

Every block figure is measured from the pool (owned blocks = mappings a device does not share with its
parent; pool Data Space Used), after the filesystem was flushed, and shown beside the idealized model's
figure for the same step (:func:`thinpool.containers.demo.run_demo`, run on a scratch pool with the same block
size).  The helpers :func:`problems`, :class:`Attached` and :func:`run` are also used by the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable, Mapping

from ..errors import FailedPrecondition
from ..units import format_docker_size, parse_size

#: Executables the real-filesystem path drives.
TOOLS = ("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "tune2fs", "mount", "umount", "fsfreeze", "sync")
#: Docker's mkfs.ext4 options for the base device (docs/containers.md §1).
MKFS_EXT4 = ("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0")
#: Docker's init layer: empty files, directories and one symlink (docs/containers.md §1).
INIT_FILES = ("/.dockerenv", "/etc/resolv.conf", "/etc/hosts", "/etc/hostname", "/dev/console")
INIT_DIRS = ("/dev/pts", "/dev/shm", "/proc", "/sys")
INIT_LINKS = (("/etc/mtab", "/proc/mounts"),)


# ============================================================================================== plumbing
def problems() -> list[str]:
    """Why the real-filesystem path cannot run here (empty when it can): root, /dev/fuse, tools."""
    out = []
    if os.geteuid() != 0:
        out.append("root (mount, losetup)")
    if not os.path.exists("/dev/fuse"):
        out.append("/dev/fuse")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        out.append("the tools " + ", ".join(missing) + " (Debian: nbdfuse/libnbd-bin, fuse3, e2fsprogs, "
                   "util-linux, coreutils)")
    return out


def run(*args: str, timeout: float = 120, check: bool = True, input: bytes | None = None) -> str:
    """Run a command; return its stdout (text); FailedPrecondition with its stderr if it fails."""
    try:
        r = subprocess.run(list(args), capture_output=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"{' '.join(args)}: timed out after {timeout} s") from None
    if check and r.returncode != 0:
        raise FailedPrecondition(f"{' '.join(args)} failed ({r.returncode}): "
                                 f"{(r.stderr or r.stdout).decode(errors='replace').strip()[-500:]}")
    return r.stdout.decode(errors="replace")


class Attached:
    """An NBD export as a block device: ``nbdfuse`` (the export as a file in a private FUSE directory)
    then a loop device on that file; optionally mounted.  :meth:`close` undoes all of it, whatever
    state it is in (lazy unmount, ``losetup -d``, ``fusermount3 -u``, waiting for nbdfuse to exit) and
    is idempotent -- use it in ``finally`` or as a context manager.

    ``read_only`` attaches read-only all the way down (nbdfuse ``-r``, ``losetup -r``).
    """

    def __init__(self, uri: str, workdir: str, tag: str, *, read_only: bool = False, timeout: float = 30.0) -> None:
        self.uri = uri
        self.read_only = read_only
        self.fusedir = tempfile.mkdtemp(prefix=f"fuse-{tag}-", dir=workdir)
        self.file = os.path.join(self.fusedir, "disk")
        self.device: str | None = None
        self.mountpoint: str | None = None
        self.proc: subprocess.Popen | None = None
        pidfile = self.fusedir + ".pid"
        try:
            cmd = ["nbdfuse", "-P", pidfile] + (["-r"] if read_only else []) + [self.file, uri]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + timeout
            while not (os.path.exists(pidfile) and os.path.getsize(pidfile) > 0):
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise FailedPrecondition(f"nbdfuse {uri} exited with {self.proc.returncode}: {err.strip()}")
                if time.monotonic() > deadline:
                    raise FailedPrecondition(f"nbdfuse {uri} was not ready after {timeout} s")
                time.sleep(0.01)
            os.unlink(pidfile)
            self.device = run("losetup", "--find", "--show", *(["--read-only"] if read_only else []),
                              self.file).strip()
        except BaseException:
            self.close()
            raise

    def mount(self, mountpoint: str, options: str = "") -> str:
        """Mount the device's filesystem on ``mountpoint`` (created if missing)."""
        assert self.device is not None
        os.makedirs(mountpoint, exist_ok=True)
        run("mount", *(["-o", options] if options else []), self.device, mountpoint)
        self.mountpoint = mountpoint
        return mountpoint

    def umount(self) -> None:
        """Unmount (flushes the filesystem; the block layer sends a FLUSH, which commits the pool)."""
        if self.mountpoint is not None:
            run("umount", self.mountpoint)
            self.mountpoint = None

    def syncfs(self) -> None:
        """``sync -f`` on the mounted filesystem: its data and journal reach the pool, then a FLUSH."""
        if self.mountpoint is not None:
            run("sync", "-f", self.mountpoint)

    def close(self) -> None:
        """Unmount, detach the loop device, unmount the FUSE directory, reap nbdfuse (idempotent)."""
        if self.mountpoint is not None:
            if subprocess.run(["umount", self.mountpoint], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
            self.mountpoint = None
        if self.device is not None:
            for _ in range(50):
                if subprocess.run(["losetup", "-d", self.device], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            self.device = None
        if self.proc is not None:
            if self.proc.poll() is None:
                if subprocess.run(["fusermount3", "-u", self.fusedir], capture_output=True).returncode != 0:
                    subprocess.run(["fusermount3", "-u", "-z", self.fusedir], capture_output=True)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None
        try:
            os.rmdir(self.fusedir)
        except OSError:
            pass

    def __enter__(self) -> "Attached":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def owned_blocks(pool: Any, name: str, parent: str | None) -> int:
    """Mappings of ``name`` that ``parent`` does not have identically (what the device wrote itself)."""
    from .snapshotter import owned_blocks as _owned
    vb, db, _ = pool.thin(name).mappings()
    if parent is None:
        return int(len(vb))
    pvb, pdb, _ = pool.thin(parent).mappings()
    return _owned(vb, db, pvb, pdb)


# ============================================================================================== scenario
def _write_file(root: str, path: str, data: bytes) -> None:
    full = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(data)


def _populate_init(root: str) -> None:
    """Docker's ``-init`` layer: empty files, directories and the /etc/mtab symlink."""
    for d in INIT_DIRS:
        os.makedirs(os.path.join(root, d.lstrip("/")), exist_ok=True)
    for f in INIT_FILES:
        _write_file(root, f, b"")
    for link, target in INIT_LINKS:
        full = os.path.join(root, link.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if not os.path.lexists(full):
            os.symlink(target, full)


def run_realfs_demo(path: str | os.PathLike | None = None, block_size: int | str = "64KiB", *,
                    data_size: int | str = "100GiB", base_size: int | str = "10GiB", seed: int = 0,
                    progress: Callable[[str], None] | None = None,
                    control_ops: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the walkthrough with ext4 on the thin devices (see the module docstring); returns a JSON-able
    dict (:func:`render_realfs` prints it).  ``path``: the pool directory to create (kept), or None for
    a temporary one that is removed.  ``control_ops``: the op table the pool's control socket answers
    with meanwhile (the CLI gives its own; None: no control socket).  FailedPrecondition when not root
    or a tool is missing."""
    from .demo import run_demo
    from ..pool import Pool
    from ..nbd.served import Served

    missing = problems()
    if missing:
        raise FailedPrecondition("thinpool demo --real-fs needs " + " and ".join(missing))
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    bs = parse_size(block_size, "block size")
    base_bytes = parse_size(base_size, "base size")
    tmp = tempfile.mkdtemp(prefix="thinpool-realfs-")
    pool_path = os.path.abspath(os.fspath(path)) if path is not None else os.path.join(tmp, "pool")
    work = os.path.join(tmp, "w")  # short paths: unix sockets, FUSE dirs, mount points
    attached: list[Attached] = []
    served: Served | None = None
    try:
        os.mkdir(work)
        # the idealized run first: it refuses a data size too small for the walkthrough before any pool is made
        say("idealized model (thinpool demo) for comparison ...")
        ideal = run_demo(None, bs, data_size=data_size, base_size=base_bytes, seed=seed)
        Pool.create(pool_path, data_size=data_size, block_size=bs).close()
        served = Served(pool_path, control_ops, socket_path=os.path.join(work, "nbd.sock"))
        served.start()
        result = _scenario(served, attached, work, ideal, bs, base_bytes, parse_size(data_size), seed, say)
    finally:
        for a in reversed(attached):
            a.close()
        if served is not None:
            served.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result["pool"] = None if path is None else pool_path
    result["elapsed_seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _scenario(served: Any, attached: list[Attached], work: str, ideal: dict[str, Any], bs: int, base_bytes: int,
              data_size: int, seed: int, say: Callable[[str], None]) -> dict[str, Any]:
    from .demo import BASE_STEPS, CONTAINERS, FINAL_IMAGE, UBUNTU_STEPS
    from .layers import file_content

    ideal_rows = {r["created_by"]: r for r in ideal["history"][FINAL_IMAGE]}
    pool = served.pool

    def attach(name: str, read_only: bool = False) -> Attached:
        a = Attached(served.export_uri(name), work, name.replace("/", "_")[:20], read_only=read_only)
        attached.append(a)
        return a

    def detach(a: Attached) -> None:
        a.close()
        attached.remove(a)

    def used() -> int:
        with pool.locked():
            return pool.status().used_data_blocks

    def snapshot(origin: str, name: str) -> None:
        with pool.locked():
            pool.snapshot(origin, name)
            pool.commit()

    def usage(name: str, parent: str | None) -> dict[str, Any]:
        with pool.locked():
            u = pool.usage(name)
            return {"name": name, "parent": parent, "owned_blocks": owned_blocks(pool, name, parent),
                    "mapped_blocks": u.mapped_blocks, "exclusive_blocks": u.exclusive_blocks,
                    "shared_blocks": u.shared_blocks}

    result: dict[str, Any] = {"block_size": bs, "base_device_size": base_bytes, "data_size": data_size,
                              "filesystem": "ext4", "mkfs": " ".join(MKFS_EXT4) + " && tune2fs -c -1 -i 0"}
    # ---------------------------------------------------------------- base device
    say(f"base device: {format_docker_size(base_bytes)} thin volume, mkfs.ext4 over NBD ...")
    with pool.locked():
        pool.create_thin("base", base_bytes)
        pool.commit()
    a = attach("base")
    assert a.device is not None
    run(*MKFS_EXT4, a.device)
    run("tune2fs", "-c", "-1", "-i", "0", a.device)
    detach(a)
    result["base"] = {**usage("base", None), "ideal_blocks": 0}
    result["pool_used_blocks_after_base"] = used()

    # ---------------------------------------------------------------- image layers
    layers: list[dict[str, Any]] = []
    prev = "base"
    n = 0
    for step in list(UBUNTU_STEPS) + list(BASE_STEPS):
        if not step.files:
            layers.append({"created_by": step.created_by, "layer": None, "file_bytes": 0, "owned_blocks": 0,
                           "ideal_blocks": 0, "files": []})
            continue
        n += 1
        name = f"layer{n}"
        say(f"layer {n}: snapshot of {prev}, mount, add {', '.join(f.path for f in step.files)} ...")
        snapshot(prev, name)
        a = attach(name)
        mnt = a.mount(os.path.join(work, "m-" + name))
        for spec in step.files:
            _write_file(mnt, spec.path, file_content((seed << 8) + n, spec.size).tobytes())
        a.umount()
        detach(a)
        row = usage(name, prev)
        ideal_row = ideal_rows.get(step.created_by, {})
        row.update(created_by=step.created_by, layer=name, file_bytes=sum(f.size for f in step.files),
                   files=[{"path": f.path, "size": f.size} for f in step.files],
                   ideal_blocks=int(ideal_row.get("owned_blocks", 0)))
        layers.append(row)
        prev = name
    top = prev
    result["layers"] = layers
    result["image_top_layer"] = top
    result["pool_used_blocks_after_images"] = used()
    result["image_file_bytes"] = sum(r["file_bytes"] for r in layers)
    result["image_blocks"] = result["pool_used_blocks_after_images"] - result["pool_used_blocks_after_base"]
    result["ideal_image_blocks"] = int(ideal["image_blocks"])
    top_mapped = usage(top, None)["mapped_blocks"]

    # ---------------------------------------------------------------- containers: -init + rw, started
    running: dict[str, Attached] = {}
    for cname in CONTAINERS:
        say(f"{cname}: -init snapshot with Docker's init files, writable snapshot, mount (start) ...")
        snapshot(top, f"{cname}-init")
        a = attach(f"{cname}-init")
        mnt = a.mount(os.path.join(work, "m-" + cname + "-init"))
        _populate_init(mnt)
        a.umount()
        detach(a)
        snapshot(f"{cname}-init", cname)
        a = attach(cname)
        a.mount(os.path.join(work, "m-" + cname))
        a.syncfs()
        running[cname] = a
    result["pool_used_blocks_after_start"] = used()

    def containers() -> list[dict[str, Any]]:
        rows = []
        for cname in CONTAINERS:
            init = usage(f"{cname}-init", top)
            rw = usage(cname, f"{cname}-init")
            rows.append({"name": cname, "init_owned_blocks": init["owned_blocks"],
                         "owned_blocks": rw["owned_blocks"], "mapped_blocks": rw["mapped_blocks"],
                         "exclusive_blocks": rw["exclusive_blocks"], "shared_blocks": rw["shared_blocks"],
                         "size_bytes": rw["owned_blocks"] * bs,
                         "virtual_size_bytes": (rw["owned_blocks"] + top_mapped) * bs})
        return rows
    result["containers_at_start"] = containers()

    # ---------------------------------------------------------------- writes
    say("printf hello > /out.txt in my_container_1..3, syncfs ...")
    writes = []
    for cname in CONTAINERS[:3]:
        before, pool_before = usage(cname, f"{cname}-init")["owned_blocks"], used()
        _write_file(running[cname].mountpoint or "", "/out.txt", b"hello")
        running[cname].syncfs()
        after = usage(cname, f"{cname}-init")["owned_blocks"]
        writes.append({"container": cname, "path": "/out.txt", "bytes_written": 5,
                       "owned_blocks_added": after - before, "block_level_bytes": (after - before) * bs,
                       "pool_blocks_added": used() - pool_before})
    result["writes"] = writes
    result["pool_used_blocks_after_writes"] = used()
    result["containers_after_writes"] = containers()

    say("4 KiB changed in the middle of the 103 MB file in my_container_4, syncfs ...")
    c4 = CONTAINERS[3]
    rootfs = UBUNTU_STEPS[0].files[0]
    offset = rootfs.size // 2 // 4096 * 4096
    new = file_content(seed + 0x4B1D, 4096).tobytes()
    before, pool_before = usage(c4, f"{c4}-init")["owned_blocks"], used()
    full = os.path.join(running[c4].mountpoint or "", rootfs.path.lstrip("/"))
    with open(full, "r+b") as fh:
        fh.seek(offset)
        fh.write(new)
    running[c4].syncfs()
    after = usage(c4, f"{c4}-init")["owned_blocks"]
    with open(os.path.join(running[CONTAINERS[4]].mountpoint or "", rootfs.path.lstrip("/")), "rb") as rh:
        rh.seek(offset)
        other = rh.read(4096)
    result["copy_up"] = {"container": c4, "path": rootfs.path, "offset": offset, "bytes_changed": 4096,
                         "owned_blocks_added": after - before, "block_level_bytes": (after - before) * bs,
                         "pool_blocks_added": used() - pool_before, "file_level_bytes": rootfs.size,
                         "other_containers_unchanged": other != new,
                         "ideal_block_level_bytes": int(ideal["copy_up"]["block_level_bytes"])}

    # ---------------------------------------------------------------- stop
    say("stop: unmount the five containers ...")
    for cname in CONTAINERS:
        a = running.pop(cname)
        a.umount()
        detach(a)
    result["pool_used_blocks_after_stop"] = used()
    result["containers"] = containers()
    result["ideal"] = {
        "pool_used_blocks_after_base": int(ideal["pool_used_blocks_after_base"]),
        "pool_used_blocks_after_images": int(ideal["pool_used_blocks_after_images"]),
        "pool_used_blocks_after_start": int(ideal["pool_used_blocks_after_start"]),
        "pool_used_blocks_after_writes": int(ideal["pool_used_blocks_after_writes"]),
        "pool_used_blocks_after_change": int(ideal["pool_used_blocks_after_change"]),
        "container_owned_blocks_at_start": {r["name"]: r["owned_blocks"] for r in ideal["containers_at_start"]},
        "container_owned_blocks_after_writes": {r["name"]: r["owned_blocks"]
                                                for r in ideal["containers_after_writes"]},
        "container_owned_blocks": {r["name"]: r["owned_blocks"] for r in ideal["containers"]},
        "writes_added_blocks": int(ideal["writes_added_blocks"]),
    }
    with pool.locked():
        pool.commit()
        result["thin_devices"] = pool.status().nr_thins
        result["check_ok"] = bool(pool.check().ok)
        result["volumes"] = [{"name": u.name, "dev_id": u.dev_id, "mapped_blocks": u.mapped_blocks,
                              "exclusive_blocks": u.exclusive_blocks, "shared_blocks": u.shared_blocks}
                             for u in pool.usage()]
    return result


# ============================================================================================== text
def _b(blocks: int, bs: int) -> str:
    return f"{blocks:,} blk = {format_docker_size(blocks * bs)}"


def _table(headers: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "   ".join(c.rjust(w) if i in right else c.ljust(w)
                          for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(headers)] + [fmt(r) for r in rows])


def render_realfs(res: dict[str, Any]) -> str:
    """The result of :func:`run_realfs_demo` as text: real ext4 figures beside the idealized ones."""
    bs = res["block_size"]
    ideal = res["ideal"]
    out = ["thinpool demo --real-fs: Docker's \"About storage drivers\" walkthrough with ext4 on thin devices",
           f"pool: {res['pool'] or '(temporary directory, removed)'}   block size {bs:,} B   base device "
           f"{format_docker_size(res['base_device_size'])} ext4 ({res['mkfs']})",
           "Volumes are served over NBD and mounted through nbdfuse + loop devices; every figure is measured",
           "from the pool after the filesystem was flushed.  'real ext4' counts everything ext4 wrote (superblock,",
           "group descriptors, bitmaps, inode tables, directories, journal, data); 'idealized' is `thinpool demo`",
           "(files laid out block-aligned, no filesystem) at the same block size.", ""]
    base = res["base"]
    out.append(f"base device after mkfs.ext4: {_b(base['mapped_blocks'], bs)} mapped "
               f"(idealized: 0; Docker's docs show 11.8 MB for a fresh 10 GiB xfs base)")
    out += ["", "$ docker history acme/my-final-image:1.0   (layers bottom to top, blocks each layer wrote itself)"]
    rows = []
    for r in res["layers"]:
        cb = r["created_by"]
        cb = cb[:44] + "..." if len(cb) > 47 else cb
        if r["layer"] is None:
            rows.append([cb, "-", "0B", "0", "0", "-"])
            continue
        rows.append([cb, r["layer"], format_docker_size(r["file_bytes"]), f"{r['ideal_blocks']:,}",
                     f"{r['owned_blocks']:,}", f"+{r['owned_blocks'] - r['ideal_blocks']:,}"])
    out.append(_table(["CREATED BY", "DEVICE", "SIZE (docker)", "IDEALIZED blk", "REAL EXT4 blk", "EXT4 EXTRA"],
                      rows, right=frozenset({2, 3, 4, 5})))
    out.append(f"image chain: real {_b(res['image_blocks'], bs)}, idealized {_b(res['ideal_image_blocks'], bs)}, "
               f"Docker {format_docker_size(res['image_file_bytes'])}")

    def ps(rows: list[dict[str, Any]], ideal_owned: dict[str, int] | None) -> str:
        body = []
        for r in rows:
            size = f"{format_docker_size(r['size_bytes'])} (virtual {format_docker_size(r['virtual_size_bytes'])})"
            body.append([r["name"], f"{r['init_owned_blocks']:,}", f"{r['owned_blocks']:,}",
                         "-" if ideal_owned is None else f"{ideal_owned.get(r['name'], 0):,}", size,
                         f"{r['mapped_blocks']:,}", f"{r['exclusive_blocks']:,}", f"{r['shared_blocks']:,}"])
        return _table(["NAME", "-init OWNED", "OWNED", "IDEALIZED", "SIZE block-level", "MAPPED", "EXCLUSIVE",
                       "SHARED"], body, right=frozenset({1, 2, 3, 5, 6, 7}))

    out += ["", "$ docker run -dit --name my_container_1..5 acme/my-final-image:1.0 bash   (mounted = running)",
            f"pool used data blocks: {res['pool_used_blocks_after_images']:,} -> "
            f"{res['pool_used_blocks_after_start']:,} (idealized {ideal['pool_used_blocks_after_images']:,} -> "
            f"{ideal['pool_used_blocks_after_start']:,}): the -init files and ext4's mount-time writes",
            ps(res["containers_at_start"], ideal["container_owned_blocks_at_start"])]
    w = res["writes"]
    out += ["", "$ docker exec my_container_{1,2,3} sh -c 'printf hello > /out.txt'; sync",
            "each 5-byte write costs " + ", ".join(f"{x['block_level_bytes']:,} B ({x['owned_blocks_added']} blk)"
                                                    for x in w)
            + f" block-level (idealized: {bs:,} B, 1 blk); Docker shows 5B",
            f"pool used data blocks: {res['pool_used_blocks_after_start']:,} -> "
            f"{res['pool_used_blocks_after_writes']:,} (idealized +{ideal['writes_added_blocks']})",
            ps(res["containers_after_writes"], ideal["container_owned_blocks_after_writes"])]
    cu = res["copy_up"]
    out += ["", f"$ # change 4 KiB at offset {cu['offset']:,} of {cu['path']} in {cu['container']}; sync",
            f"block-level copy-on-write: {cu['owned_blocks_added']} block(s) = {cu['block_level_bytes']:,} B "
            f"(idealized {cu['ideal_block_level_bytes']:,} B; data block + ext4 inode/journal blocks)",
            f"overlay-style copy-up:     {cu['file_level_bytes']:,} B (the whole file)",
            "other containers still read the original bytes: " + ("yes" if cu["other_containers_unchanged"] else "NO"),
            "", "$ docker stop (unmount all five)",
            f"pool used data blocks: {res['pool_used_blocks_after_stop']:,} "
            f"= {format_docker_size(res['pool_used_blocks_after_stop'] * bs)} "
            f"(idealized {ideal['pool_used_blocks_after_change']:,}); {res['thin_devices']} thin devices; "
            f"pool check: {'ok' if res['check_ok'] else 'FAILED'}",
            ps(res["containers"], ideal["container_owned_blocks"]),
            "", f"(finished in {res.get('elapsed_seconds', 0):.1f} s)"]
    return "\n".join(out) + "\n"


__all__ = ["problems", "run", "Attached", "owned_blocks", "run_realfs_demo", "render_realfs", "MKFS_EXT4"]
