"""O3-O6: importing an image -- ``thinpool image import`` (and the overlay2-style store) vs ``umoci unpack``.

    python -m perf.image_import [--full] [--docs] [--json OUT]

Three images, built with umoci in the scratch directory:

* O3-O4: the workload image of ``thinpool compare`` (thinpool.containers.workloads.build_workload_image:
  two gzip layers, the second deleting a directory and a file): small sizes (a 5 MB database, 10 MiB
  files, a tarball of 1,000 small files), --full the issue's (a ~50 MB database, 100 MiB log and file,
  ~340 MB of files in all, 221 MiB of gzip blobs);
* O5: perf.oci's O1 image (one gzip layer: a copy of this Python's standard library, many small files);
* O6: perf.oci's O2 image (one gzip layer: four files of 64 MiB of random bytes; --full 256 MiB each).

For each image, in interleaved repeats (medians of 3; O5-O6 --full 5), the same archive is

* imported onto a fresh pool (64 KiB blocks, created untimed) by
  ``thinpool.containers.image_store.import_image``: a base thin device with a fresh ext4
  (``mkfs.ext4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0``, Docker's options; a 1 GiB base for
  the workload image, 10 GiB -- Docker's dm.basesize default -- for O5-O6), then each layer on a snapshot
  of its parent, applied through the mounted filesystem (NBD from a thread of the process, nbdfuse, a
  loop device), unmounted and committed, every digest checked;
* (the workload image) imported into a fresh overlay2-style store by
  ``thinpool.containers.overlay.OverlayStore.import_image`` (each layer extracted into its own
  directory, whiteouts as 0/0 character devices);
* unpacked by ``umoci unpack --image DIR:tag BUNDLE`` (digests checked; every layer applied in turn into
  one rootfs, plus a runtime config and an mtree manifest): the tool people use to unpack such images.

O3, O5, O6 = thin import / umoci unpack: target <= 3 (the import formats a filesystem and writes every
byte through NBD, FUSE, a loop device and ext4 with a journal, where umoci writes plain files; a few
unpacks' time is what a one-time import may cost).  O4 = overlay store import / umoci unpack: target
<= 1.5 (the same reader as perf.oci's O1-O2, which measure unpacking one layer into a directory).
``--docs`` rewrites this section of docs/performance.md between its markers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

from .common import (Row, Scratch, docs_head, finish, interleave, log, machine, med, perf_parser, ratio_row,
                     rows_table_md, timed)

SECTION_BEGIN = "<!-- image_import: begin (written by `python -m perf.image_import --docs`) -->"
SECTION_END = "<!-- image_import: end -->"
TARGET_THIN = 3.0
TARGET_OVERLAY = 1.5
WORKLOAD_BASE = "1GiB"    #: the workload image's base device (O3)
ONE_LAYER_BASE = "10GiB"  #: O5-O6's base device: Docker's dm.basesize default, thinpool image import's


@dataclass(frozen=True)
class Image:
    """One image to import: its OCI layout and the tag of the image in it, and the pool it is imported onto."""

    archive: str
    tag: str
    base_size: str
    pool_size: str
    overlay: bool  #: also import it into an overlay2-style store


def sizes(full: bool):
    from thinpool.containers.workloads import ISSUE_SIZES, ImageSizes, MiB
    return ISSUE_SIZES if full else ImageSizes(db_bytes=5_000_000, log_bytes=10 * MiB, file_bytes=10 * MiB,
                                               big_bytes=10 * MiB, small_files=1000, stdlib_bytes=4_000_000)


def sides(scratch: Scratch, image: Image) -> dict[str, Callable[[int], float]]:
    """The timed sides of one image: thin import, (overlay import,) umoci unpack."""
    from thinpool import Pool
    from thinpool.containers.image_store import import_image
    from thinpool.containers.overlay import OverlayStore

    def thin(_r: int) -> float:
        d = scratch.path("pool")
        Pool.create(d, data_size=image.pool_size, block_size="64KiB").close()
        t = timed(lambda: import_image(d, image.archive, ref=image.tag, base_size=image.base_size))
        scratch.remove(d)
        return t

    def overlay(_r: int) -> float:
        d = scratch.path("overlay")
        t = timed(lambda: OverlayStore(d).import_image(image.archive, image.tag))
        scratch.remove(d)
        return t

    def umoci(_r: int) -> float:
        d = scratch.path("umoci")
        t = timed(lambda: subprocess.run(["umoci", "unpack", "--image", f"{image.archive}:{image.tag}", d],
                                         check=True, stdout=subprocess.DEVNULL))
        scratch.remove(d)
        return t

    out: dict[str, Callable[[int], float]] = {"thin": thin, "overlay": overlay, "umoci": umoci}
    if not image.overlay:
        del out["overlay"]
    return out


def blob_bytes(archive: str) -> int:
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(archive) for f in fs)


def run(full: bool) -> tuple[list[Row], dict]:
    from thinpool.containers.workloads import build_workload_image

    from .oci import big_tree, build_image, stdlib_tree
    rows: list[Row] = []
    detail: dict = {}
    with Scratch() as scratch:
        # O3-O4: the workload image
        repeats = 3
        sz = sizes(full)
        built = build_workload_image(scratch.path("image"), sz, tag="perf")
        work = Image(built["archive"], "perf", WORKLOAD_BASE, "8GiB", overlay=True)
        nbytes = blob_bytes(work.archive)
        log(f"workload image: {nbytes / 2**20:.1f} MiB of blobs; {repeats} interleaved repeats")
        # warm-up: the kernels' JIT cache and the first NBD/nbdfuse start, untimed
        sides(scratch, work)["thin"](0)
        t = {k: med(v) for k, v in interleave(sides(scratch, work), repeats).items()}
        detail["workload"] = {"repeats": repeats, "archive_bytes": nbytes, "sizes": sz.__dict__, **t}
        what = f"the workload image ({nbytes / 2**20:.0f} MiB of gzip blobs, 2 layers)"
        rows.append(ratio_row("O3", f"import {what} onto a fresh thin pool (ext4, {WORKLOAD_BASE} base): "
                              "thinpool image import / umoci unpack", f"<= {TARGET_THIN}",
                              t["thin"] / t["umoci"], thin_s=t["thin"], umoci_s=t["umoci"]))
        rows.append(ratio_row("O4", f"import {what} into a fresh overlay2-style store: "
                              "thinpool overlay import / umoci unpack", f"<= {TARGET_OVERLAY}",
                              t["overlay"] / t["umoci"], overlay_s=t["overlay"], umoci_s=t["umoci"]))
        # O5-O6: perf.oci's one-layer images
        repeats = 5 if full else 3
        size = (256 if full else 64) << 20
        for key, title, fill in (("O5", "a copy of the Python standard library", stdlib_tree),
                                 ("O6", f"4 files of {size >> 20} MiB random", big_tree(size))):
            layout, files, nbytes = build_image(scratch, key, fill)
            img = Image(layout, "v1", ONE_LAYER_BASE, "64GiB", overlay=False)
            log(f"{key}: {files:,} files, {nbytes / 2**20:.1f} MiB; {repeats} interleaved repeats")
            t = {k: med(v) for k, v in interleave(sides(scratch, img), repeats).items()}
            detail[key] = {"repeats": repeats, "files": files, "bytes": nbytes, **t}
            rows.append(ratio_row(key, f"import one gzip layer ({title}: {files:,} files, {nbytes / 2**20:.0f} "
                                  f"MiB) onto a fresh thin pool (ext4, {ONE_LAYER_BASE} base): thinpool image "
                                  "import / umoci unpack", f"<= {TARGET_THIN}",
                                  t["thin"] / t["umoci"], thin_s=t["thin"], umoci_s=t["umoci"]))
    return rows, detail


def main(argv: list[str] | None = None) -> int:
    ap = perf_parser("image_import", __doc__, "the issue's workload image sizes (~340 MB; quick: ~45 MB), "
                     "O6's files of 256 MiB and 5 repeats for O5-O6 (quick: 64 MiB, 3)", "image import")
    args = ap.parse_args(argv)
    missing = [t for t in ("umoci", "nbdfuse", "mkfs.ext4", "losetup") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        print(f"perf.image_import: needs root and {', '.join(missing) or 'the tools'} (apt-get install umoci "
              "nbdfuse e2fsprogs mount)", file=sys.stderr)
        return 2
    rows, detail = run(args.full)
    for r in rows:
        print(r.line())
    mach = machine()

    def body() -> str:
        return (docs_head("Importing an image", "image_import", args.full, mach) + ", shared; load average "
                f"{os.getloadavg()[0]:.1f} at the end): each image built by umoci, imported onto a fresh "
                "64 KiB-block pool by `thinpool image import` (mkfs.ext4 of the base with Docker's options, each "
                "layer on a snapshot through the mounted filesystem served over NBD, nbdfuse and a loop device, "
                "unmounted and committed) and unpacked by `umoci unpack`; the workload image of `thinpool "
                f"compare` (2 layers, a {WORKLOAD_BASE} base) also into a fresh overlay2-style store (a directory "
                f"per layer); O5-O6 the one-layer images of perf.oci's O1-O2 (a {ONE_LAYER_BASE} base). "
                "Interleaved repeats (medians of wall seconds). The machine's load varies between runs: compare "
                "the ratios, not the seconds.\n\n" + rows_table_md(rows) + "\n")
    return finish(args, rows, detail, mach, SECTION_BEGIN, SECTION_END, body)


if __name__ == "__main__":
    sys.exit(main())
