"""O1-O2: unpacking an image layer -- ``thinpool.containers.oci`` + ``oci_apply`` vs ``umoci unpack``.

    python -m perf.oci [--full] [--docs] [--json OUT]

Two one-layer images are built with umoci (init, new, unpack, repack: a gzip layer) in the scratch
directory: O1 a copy of this Python's standard library (many small files; ``__pycache__`` and
``site-packages`` left out), O2 four files of 64 MiB of random bytes (--full: 256 MiB each).  Then, in
interleaved repeats (medians; 3, --full 5), the same layer is unpacked into a fresh directory by

* thinpool: ``open_image`` + ``apply_layer(image.layer_entries(layer), dir)`` -- the blob's sha256 and
  the diff ID checked on the way, every path resolved from the root with ``O_NOFOLLOW``;
* ``umoci unpack --image DIR:tag BUNDLE`` (which also checks digests, and writes a runtime config and
  an mtree manifest of the rootfs besides -- it does more than an unpack);
* ``tar -xzf BLOB -C DIR`` (GNU tar + gzip, no checks): the floor.

O1/O2 ratio = thinpool unpack / umoci wall time (target <= 1.5: the reader must not make an import slower
than the tool people use to unpack such images).  Importing these images onto a thin pool (``thinpool
image import``) is perf.image_import's O5-O6.  ``--docs`` rewrites this section of docs/performance.md
between its markers, nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

from .common import (Row, Scratch, docs_head, finish, interleave, log, machine, med, perf_parser, ratio_row,
                     rows_table_md)

SECTION_BEGIN = "<!-- oci: begin (written by `python -m perf.oci --docs`) -->"
SECTION_END = "<!-- oci: end -->"
TARGET = 1.5


def build_image(scratch: Scratch, name: str, fill) -> tuple[str, int, int]:
    """A one-layer umoci image whose rootfs ``fill(rootfs)`` makes; (layout, files, bytes)."""
    img = scratch.path(f"{name}-img")
    bundle = scratch.path(f"{name}-bundle")
    subprocess.run(["umoci", "init", "--layout", img], check=True)
    subprocess.run(["umoci", "new", "--image", f"{img}:base"], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{img}:base", bundle], check=True, stdout=subprocess.DEVNULL)
    fill(os.path.join(bundle, "rootfs"))
    files = nbytes = 0
    for dirpath, _, names in os.walk(os.path.join(bundle, "rootfs")):
        for n in names:
            files += 1
            nbytes += os.lstat(os.path.join(dirpath, n)).st_size
    subprocess.run(["umoci", "repack", "--image", f"{img}:v1", bundle], check=True)
    shutil.rmtree(bundle)
    return img, files, nbytes


def stdlib_tree(rootfs: str) -> None:
    src = sysconfig.get_paths()["stdlib"]
    shutil.copytree(src, os.path.join(rootfs, "lib"), symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "site-packages", "dist-packages"))


def big_tree(size: int):
    def fill(rootfs: str) -> None:
        os.makedirs(os.path.join(rootfs, "data"))
        for i in range(4):
            with open(os.path.join(rootfs, "data", f"f{i}"), "wb") as f:
                left = size
                while left:
                    n = min(left, 8 << 20)
                    f.write(os.urandom(n))
                    left -= n
    return fill


def sides(scratch: Scratch, img: str) -> dict:
    from thinpool.containers.oci import open_image
    from thinpool.containers.oci_apply import apply_layer
    from .common import timed

    with open_image(img, "v1") as image:
        blob = os.path.join(img, image.layers[0].blob)

    def ours(_r: int) -> float:
        d = scratch.path("ours")
        os.mkdir(d)

        def go() -> None:
            with open_image(img, "v1") as image:
                for layer in image.layers:
                    apply_layer(image.layer_entries(layer), d)
        t = timed(go)
        scratch.remove(d)
        return t

    def umoci(_r: int) -> float:
        d = scratch.path("umoci")
        t = timed(lambda: subprocess.run(["umoci", "unpack", "--image", f"{img}:v1", d], check=True,
                                         stdout=subprocess.DEVNULL))
        scratch.remove(d)
        return t

    def tar(_r: int) -> float:
        d = scratch.path("tar")
        os.mkdir(d)
        t = timed(lambda: subprocess.run(["tar", "-xzf", blob, "-C", d], check=True))
        scratch.remove(d)
        return t

    return {"thinpool": ours, "umoci": umoci, "tar": tar}


def run(full: bool) -> tuple[list[Row], dict]:
    repeats = 5 if full else 3
    size = (256 if full else 64) << 20
    rows: list[Row] = []
    detail: dict = {"repeats": repeats}
    with Scratch() as scratch:
        for key, title, fill in (("O1", "a copy of the Python standard library", stdlib_tree),
                                 ("O2", f"4 files of {size >> 20} MiB random", big_tree(size))):
            img, files, nbytes = build_image(scratch, key, fill)
            log(f"{key}: {files:,} files, {nbytes / 2**20:.1f} MiB; {repeats} interleaved repeats")
            t = {k: med(v) for k, v in interleave(sides(scratch, img), repeats).items()}
            detail[key] = {"files": files, "bytes": nbytes, **t}
            rows.append(ratio_row(key, f"unpack one gzip layer ({title}: {files:,} files, "
                                  f"{nbytes / 2**20:.0f} MiB): thinpool / umoci unpack", f"<= {TARGET}",
                                  t["thinpool"] / t["umoci"], thinpool_s=t["thinpool"], umoci_s=t["umoci"],
                                  tar_s=t["tar"], MiB_per_s=nbytes / 2**20 / t["thinpool"]))
    return rows, detail


def main(argv: list[str] | None = None) -> int:
    ap = perf_parser("oci", __doc__, "5 repeats, 256 MiB files (quick: 3, 64 MiB)", "oci")
    args = ap.parse_args(argv)
    if shutil.which("umoci") is None:
        print("perf.oci: needs umoci (apt-get install umoci)", file=sys.stderr)
        return 2
    rows, detail = run(args.full)
    for r in rows:
        print(r.line())
    mach = machine()

    def body() -> str:
        return (docs_head("Unpacking an image layer", "oci", args.full, mach) + ", "
                "shared): a one-layer gzip image made by umoci, unpacked into a fresh directory by "
                "`thinpool.containers.oci` + `oci_apply.apply_layer` (blob digest and diff ID checked, every "
                "path resolved from the root with O_NOFOLLOW), by `umoci unpack` (digests checked; also writes "
                "a runtime config and an mtree manifest) and by `tar -xzf` (no checks); "
                f"{detail['repeats']} interleaved repeats (medians of wall seconds). Ratio = thinpool / umoci. "
                "Importing the same images onto a thin pool is O5-O6 (\"Importing an image\").\n\n"
                + rows_table_md(rows) + "\n")
    return finish(args, rows, detail, mach, SECTION_BEGIN, SECTION_END, body)


if __name__ == "__main__":
    sys.exit(main())
