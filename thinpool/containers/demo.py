"""``thinpool demo``: the "About storage drivers" walkthrough on a thin pool (docs/containers.md §4-§5).

Scenario (the older, ubuntu-based version of Docker's page), on a fresh pool:

1. the base device (empty thin volume, 10 GiB);
2. ``ubuntu:16.10`` as layers of one file each: 103,000,000 / 745 / 2,780 / 7 bytes, with the 0-byte
   ``rm -rf`` and ``CMD`` rows as history only (no layer);
3. ``acme/my-base-image:1.0`` = ubuntu + ``COPY . /app`` (one 100-byte file);
   ``acme/my-final-image:1.0`` = that + ``CMD`` (history row, no layer);
4. five containers ``my_container_1..5`` (``-init`` + writable device each);
5. ``printf hello > /out.txt`` (5 bytes) in containers 1-3;
6. 4 KiB changed in the middle of the 103 MB file in container 4, with the whole-file copy-up an overlay
   driver would do reported beside the block-level cost.

Every number in the result is measured from the pool (``pool.status().used_data_blocks``, snapshot
usage), never computed from the file sizes.  :func:`run_demo` returns a JSON-able dict;
:func:`render_demo` prints it the way Docker users know it (``docker images``, ``docker history``,
``docker ps -s``, ``docker info``), block-level figures first with Docker's file-level ones beside them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np

from ..errors import InvalidArgument
from ..pool import Pool
from ..rules import check_block_size
from ..units import format_docker_size, format_go_human_size, parse_size
from .layers import FileSpec, LayerStore, Step, file_content

UBUNTU = "ubuntu:16.10"
BASE_IMAGE = "acme/my-base-image:1.0"
FINAL_IMAGE = "acme/my-final-image:1.0"
ROOTFS = "/ubuntu-rootfs.tar"
CONTAINERS = tuple(f"my_container_{i}" for i in range(1, 6))

#: The ubuntu image's history, bottom to top (docs/containers.md §4): one file per non-empty row.
UBUNTU_STEPS = (
    Step("/bin/sh -c #(nop) ADD file:eef57983bd66e3a0d2cb4b5c1c57dd4ab9ee1dc14c4ae5a8d5bb6a1d7d2ad3a0 in / ",
         (FileSpec(ROOTFS, 103_000_000),)),
    Step("/bin/sh -c set -xe && echo '#!/bin/sh' > /usr/sbin/policy-rc.d && echo 'exit 101' >> ...",
         (FileSpec("/usr/sbin/policy-rc.d", 745),)),
    Step("/bin/sh -c rm -rf /var/lib/apt/lists/*"),
    Step("/bin/sh -c sed -i 's/^#\\s*\\(deb.*universe\\)$/\\1/g' /etc/apt/sources.list",
         (FileSpec("/etc/apt/sources.list", 2_780),)),
    Step("/bin/sh -c mkdir -p /run/systemd && echo 'docker' > /run/systemd/container",
         (FileSpec("/run/systemd/container", 7),)),
    Step('/bin/sh -c #(nop)  CMD ["/bin/bash"]'),
)
BASE_STEPS = (Step("/bin/sh -c #(nop) COPY dir:35a7eb158c1504e8e6d8a4c7c3e1e8ea6ca5d59a8d55ab6fa8d5b0e4a1f2c3d4 in /app ",
                   (FileSpec("/app/hello.sh", 100),)),)
FINAL_STEPS = (Step('/bin/sh -c #(nop)  CMD ["/bin/sh" "-c" "/app/hello.sh"]'),)


def blocks_needed(block_size: int) -> int:
    """The data blocks the walkthrough maps at ``block_size``: its files block-aligned (docs/containers.md
    §5), then one block for each 5-byte write and one for the 4 KiB change (4 KiB-aligned, so inside
    one block)."""
    steps = UBUNTU_STEPS + BASE_STEPS + FINAL_STEPS
    return sum(-(-f.size // block_size) for step in steps for f in step.files) + len(CONTAINERS[:3]) + 1


def run_demo(path: str | os.PathLike | None = None, block_size: int | str = "64KiB", *,
             data_size: int | str = "100GiB", base_size: int | str = "10GiB", seed: int = 0) -> dict[str, Any]:
    """Run the walkthrough and return its measured results (see the module docstring).

    ``path``: the pool directory to create (must not exist or be empty; kept afterwards), or None for a
    temporary directory that is removed at the end.  ``data_size`` defaults to Docker's loop-lvm 100 GiB
    (a sparse file).  Keys include ``block_size``, ``image_blocks``, ``pool_used_blocks_after_start``,
    ``pool_used_blocks_after_writes``, ``containers`` (final ``docker ps -s`` rows: ``name``,
    ``size_bytes``, ``virtual_size_bytes``, ``file_level_size_bytes``, ...), ``containers_at_start``,
    ``containers_after_writes``, ``copy_up`` (``block_level_bytes``, ``file_level_bytes``, ...),
    ``images``, ``history``, ``writes``, ``info``, ``ps_order`` (container names in
    ``docker ps`` order, newest first).
    """
    t0 = time.perf_counter()
    bs = check_block_size(block_size)
    nr_blocks = parse_size(data_size, "data size") // bs
    if nr_blocks < blocks_needed(bs):
        # refused before anything is made: the pool would run out of space half-way through the images
        # (and, queue_if_no_space being the default, only after waiting no_space_timeout)
        raise InvalidArgument(f"data size {parse_size(data_size, 'data size')} bytes holds {nr_blocks} blocks of "
                              f"{bs} bytes; the walkthrough maps {blocks_needed(bs)} (its image, three writes "
                              f"and a change): give at least {blocks_needed(bs) * bs} bytes")
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="thinpool-demo-")
        pool_path = os.path.join(tmp, "pool")
    else:
        pool_path = os.path.abspath(os.fspath(path))
    try:
        pool = Pool.create(pool_path, data_size=data_size, block_size=block_size)
        try:
            result = _scenario(pool, base_size=base_size, seed=seed)
        finally:
            pool.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["pool"] = None if tmp is not None else pool_path
    result["elapsed_seconds"] = round(time.perf_counter() - t0, 3)
    return result


#: what the helper of :func:`compile_helper` compiles, in its order (the demo itself starts with
#: ``write_one``); the helper starts only when the first two are missing from the kernel cache
HELPER_KERNELS = ("kernels.write_batch", "kernels.locate_read", "walks.logical_counts_into",
                  "walks.usage_of_roots", "walks.count_mappings", "walks.collect_mappings",
                  "kernels_pages.node_updates", "kernels_map.pack_space_pages", "kernels_flush.flush_loop",
                  "kernels_flush.flush_start", "kernels_flush.flush_finish", "kernels.write_bytes")


def uncached(kernels: tuple[str, ...]) -> list[str]:
    """The ``module.kernel`` names of ``kernels`` with no index in the machine kernel cache written by
    the numba running now (numba ignores an index of another version: such a kernel compiles again).
    Imports numba; all of them when there is no machine cache directory."""
    from .. import jit_cache, kernels_cache  # noqa: F401 -- registers the machine cache (imports numba)
    import numba
    where = jit_cache.machine_dir
    if where is None:
        return list(kernels)
    out = []
    for k in kernels:
        found = False
        for path in glob.glob(os.path.join(glob.escape(where), f"{k}-*.nbi")):
            try:
                with open(path, "rb") as f:
                    found = pickle.load(f) == numba.__version__  # numba's index starts with its version
            except Exception:  # noqa: BLE001 -- unreadable: as good as missing
                found = False
            if found:
                break
        if not found:
            out.append(k)
    return out


@contextlib.contextmanager
def compile_helper(wait: bool = False) -> Iterator[subprocess.Popen | None]:
    """Around a demo run: on a cold kernel cache, a second process compiles the kernels the demo needs
    after its first (:data:`HELPER_KERNELS`) while the demo compiles ``write_one``; the machine
    cache's compile locks (:func:`thinpool.jit_cache.serialize_compiles`) make the demo wait for a
    kernel the helper is compiling and load it, and the helper for one the demo is compiling, so
    nothing is compiled twice and the two cores share the work.  Nothing is started when the
    kernels are cached by this numba (or the JIT is off, or ``NUMBA_CACHE_DIR`` chose numba's own
    layout); the helper is stopped when the block ends (what it saved stays cached), or waited for
    with ``wait`` (:mod:`thinpool.cli.precompile`)."""
    from .. import jit_cache  # noqa: F401
    helper = None
    cold = jit_cache.machine_dir is not None and bool(uncached(HELPER_KERNELS[:2]))
    if cold and os.environ.get("NUMBA_DISABLE_JIT") != "1":
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        try:
            helper = subprocess.Popen([sys.executable, "-c", "from thinpool.containers.demo import _helper_work; "
                                       "_helper_work()"], env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            helper = None  # the demo compiles everything itself
    try:
        yield helper
    finally:
        if helper is not None:
            if helper.poll() is None and not wait:
                helper.terminate()
            helper.wait()


def _helper_work() -> None:
    """The helper process of :func:`compile_helper`: in a small temporary pool, the library calls
    through which the demo reaches :data:`HELPER_KERNELS`, in that order, with buffers of the same
    kinds (file contents are read-only arrays) -- so the kernels compile for the demo's argument types."""
    with tempfile.TemporaryDirectory(prefix="thinpool-demo-helper-") as tmp:
        with Pool.create(os.path.join(tmp, "pool"), data_size="64MiB") as pool:
            vol = pool.create_thin("v", "1MiB")
            vol.write_many(np.array([0, 65536], np.int64), file_content(0, 2 * 4096).reshape(2, 4096))
            vol.read(0, 4096)  # a one-block read: kernels.locate_read
            pool.snapshot("v", "s")
            pool.usage("s")
            pool.thin("s").mappings()
            vol.write_many(np.array([4096], np.int64), file_content(1, 4096).reshape(1, 4096))
            pool.commit()  # (a pool's third commit: its data flush on the helper thread, kernels_flush)
            # last: a write of bytes, kernels.write_bytes -- it runs write_one, which the demo compiles
            # first (by now the helper loads it from the cache instead of waiting for it)
            vol.write(4096, bytes(16))


def _by_name(rows: list) -> list[dict[str, Any]]:
    return sorted((r.as_dict() for r in rows), key=lambda d: d["name"])


def _scenario(pool: Pool, *, base_size: int | str, seed: int) -> dict[str, Any]:
    used = lambda: pool.status().used_data_blocks  # noqa: E731 -- measured every time
    bs = pool.block_size
    store = LayerStore(pool, base_size=base_size, seed=seed)
    used_base = used()

    store.build(UBUNTU, UBUNTU_STEPS)
    store.build(BASE_IMAGE, BASE_STEPS, base=UBUNTU)
    store.build(FINAL_IMAGE, FINAL_STEPS, base=BASE_IMAGE)
    used_images = used()
    images = [r.as_dict() for r in store.images()]
    history = {ref: [r.as_dict() for r in store.history(ref)] for ref in (BASE_IMAGE, FINAL_IMAGE)}
    final_top = store.image_top_layer(FINAL_IMAGE)
    top_usage = store.snapshotter.usage(final_top)

    for name in CONTAINERS:
        store.run(FINAL_IMAGE, name)
    used_start = used()
    at_start = store.ps(size=True)

    writes = [store.write_file(name, "/out.txt", 0, b"hello").as_dict() for name in CONTAINERS[:3]]
    used_writes = used()
    after_writes = store.ps(size=True)

    fsize = store.image_files(FINAL_IMAGE)[ROOTFS]["size"]
    offset = fsize // 2 // 4096 * 4096
    new = file_content(seed + 0x4B1D, 4096).tobytes()
    old = store.read_file(CONTAINERS[4], ROOTFS, offset, 4096)
    change = store.write_file(CONTAINERS[3], ROOTFS, offset, new)
    used_change = used()
    final = store.ps(size=True)
    isolated = (store.read_file(CONTAINERS[3], ROOTFS, offset, 4096) == new
                and store.read_file(CONTAINERS[4], ROOTFS, offset, 4096) == old and old != new)

    return {
        "block_size": bs,
        "data_size": pool.nr_data_blocks * bs,
        "base_device_size": store.base_size,
        "pool_used_blocks_after_base": used_base,
        "image_blocks": used_images - used_base,
        "image_bytes": (used_images - used_base) * bs,
        "image_top_layer_mapped_blocks": top_usage.mapped_blocks,
        "pool_used_blocks_after_images": used_images,
        "pool_used_blocks_after_start": used_start,
        "containers_added_blocks": used_start - used_images,
        "pool_used_blocks_after_writes": used_writes,
        "writes_added_blocks": used_writes - used_start,
        "pool_used_blocks_after_change": used_change,
        "thin_devices": pool.status().nr_thins,
        "images": images,
        "history": history,
        "containers_at_start": _by_name(at_start),
        "containers_after_writes": _by_name(after_writes),
        "containers": _by_name(final),
        "writes": writes,
        "copy_up": {
            "container": CONTAINERS[3], "path": ROOTFS, "offset": offset, "bytes_changed": len(new),
            "block_level_bytes": change.block_level_bytes, "owned_blocks_added": change.owned_blocks_added,
            "pool_blocks_added": change.pool_blocks_added, "file_level_bytes": change.copy_up_bytes,
            "other_containers_unchanged": isolated,
        },
        "info": store.info(),
        "ps_order": [r.name for r in final],
    }


# ------------------------------------------------------------------------------------------------ text
human_size_4 = format_go_human_size  # go-units HumanSize, as ``docker info`` prints: ``65.54 kB``


def _ago(iso: str) -> str:
    try:
        secs = (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()
    except (TypeError, ValueError):
        return "-"
    if secs < 1:
        return "Less than a second ago"
    if secs < 60:
        return f"{int(secs)} seconds ago"
    return f"{int(secs // 60)} minutes ago"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["   ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _blocks(nbytes: int, bs: int) -> str:
    return f"{format_docker_size(nbytes)} ({nbytes // bs:,} blk)"


def _ps(rows: list[dict[str, Any]], order: list[str], bs: int) -> str:
    by = {r["name"]: r for r in rows}
    out = []
    for name in order:
        r = by[name]
        out.append([r["container_id"], r["image"], f'"{r["command"]}"', name,
                    f'{format_docker_size(r["size_bytes"])} (virtual {format_docker_size(r["virtual_size_bytes"])}) '
                    f'[{r["owned_blocks"]:,} blk]',
                    f'{format_docker_size(r["file_level_size_bytes"])} '
                    f'(virtual {format_docker_size(r["file_level_virtual_size_bytes"])})'])
    return _table(["CONTAINER ID", "IMAGE", "COMMAND", "NAMES", "SIZE block-level", "SIZE docker (file-level)"],
                  out)


def render_demo(res: dict[str, Any]) -> str:
    """The demo result as text: ``docker images``, ``docker history``, ``docker ps -s``, ``docker info``."""
    bs = res["block_size"]
    order = res.get("ps_order") or [c["name"] for c in res["containers"]][::-1]
    out = [f"thinpool demo: Docker's \"About storage drivers\" walkthrough on a thin pool",
           f"pool: {res['pool'] or '(temporary directory, removed)'}   block size {bs:,} B "
           f"({human_size_4(bs)})   base device {format_docker_size(res['base_device_size'])}",
           "Block-level sizes are measured from the pool (owned/mapped blocks x block size); Docker's",
           "own file-level numbers (sums of file bytes) are shown beside them.", ""]

    out.append(f"$ docker images")
    out.append(_table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE", "BLOCK-LEVEL"],
                      [[i["repository"], i["tag"], i["image_id"], _ago(i["created"]), format_docker_size(i["size_bytes"]),
                        _blocks(i["block_level_bytes"], bs)] for i in res["images"]]))
    out.append(f"image chain: {res['image_blocks']:,} data blocks = {res['image_bytes']:,} bytes "
               f"(pool used {res['pool_used_blocks_after_base']:,} -> {res['pool_used_blocks_after_images']:,})")
    for ref, rows in res["history"].items():
        out += ["", f"$ docker history {ref}"]
        out.append(_table(["IMAGE", "CREATED", "CREATED BY", "SIZE", "BLOCK-LEVEL"],
                          [[r["image"], _ago(r["created"]),
                            (r["created_by"][:45] + "...") if len(r["created_by"]) > 48 else r["created_by"],
                            format_docker_size(r["size_bytes"]), _blocks(r["block_level_bytes"], bs)] for r in rows]))

    out += ["", f"$ for i in 1 2 3 4 5; do docker run -dit --name my_container_$i {FINAL_IMAGE} bash; done",
            f"pool used data blocks: {res['pool_used_blocks_after_images']:,} -> "
            f"{res['pool_used_blocks_after_start']:,} (+{res['containers_added_blocks']:,}); "
            f"{res['thin_devices']} thin devices (base, 5 layers, 5 x -init + container)",
            "", "$ docker ps -s", _ps(res["containers_at_start"], order, bs)]

    w = res["writes"]
    out += ["", "$ docker exec my_container_{1,2,3} sh -c 'printf hello > /out.txt'",
            f"pool used data blocks: {res['pool_used_blocks_after_start']:,} -> "
            f"{res['pool_used_blocks_after_writes']:,} (+{res['writes_added_blocks']:,}); each 5-byte write costs "
            + ", ".join(f"{x['block_level_bytes']:,} B" for x in w),
            "", "$ docker ps -s", _ps(res["containers_after_writes"], order, bs)]

    cu = res["copy_up"]
    out += ["", f"$ # change {cu['bytes_changed']:,} bytes at offset {cu['offset']:,} of {cu['path']} "
                f"in {cu['container']}",
            f"block-level copy-on-write: {cu['owned_blocks_added']} block(s) = {cu['block_level_bytes']:,} bytes "
            f"(pool +{cu['pool_blocks_added']} block)",
            f"overlay-style copy-up:     {cu['file_level_bytes']:,} bytes (the whole file)"
            + (f"  -> {cu['file_level_bytes'] / cu['block_level_bytes']:,.0f}x more"
               if cu["block_level_bytes"] else ""),
            "other containers still read the original bytes: " + ("yes" if cu["other_containers_unchanged"] else "NO"),
            "", "$ docker ps -s", _ps(res["containers"], order, bs)]

    info = res["info"]
    out += ["", "$ docker info   (storage part)",
            f" Storage Driver: {info['storage_driver']}",
            f"  Pool Name: {info['pool_name']}",
            f"  Pool Blocksize: {human_size_4(info['pool_blocksize'])}",
            f"  Base Device Size: {human_size_4(info['base_device_size'])}",
            f"  Backing Filesystem: {info['backing_filesystem']}",
            f"  Data file: {info['data_file']}",
            f"  Metadata file: {info['metadata_file']}",
            f"  Data Space Used: {human_size_4(info['data_space_used'])}",
            f"  Data Space Total: {human_size_4(info['data_space_total'])}",
            f"  Data Space Available: {human_size_4(info['data_space_available'])}",
            f"  Metadata Space Used: {human_size_4(info['metadata_space_used'])}",
            f"  Metadata Space Total: {human_size_4(info['metadata_space_total'])}",
            f"  Metadata Space Available: {human_size_4(info['metadata_space_available'])}",
            f"  Thin Pool Minimum Free Space: {human_size_4(info['thin_pool_minimum_free_space'])}",
            f"  dmsetup status: {info['dmsetup_status'].strip()}",
            "", f"(finished in {res.get('elapsed_seconds', 0):.2f} s)"]
    return "\n".join(out) + "\n"


__all__ = ["run_demo", "render_demo", "human_size_4", "UBUNTU_STEPS", "BASE_STEPS", "FINAL_STEPS", "CONTAINERS"]
