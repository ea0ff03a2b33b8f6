"""O3-O4: importing an image -- ``thinpool image import`` (and the overlay2-style store) vs ``umoci unpack``.

    python -m perf.image_import [--full] [--docs] [--json OUT]

The workload image of ``thinpool compare`` (thinpool.containers.workloads.build_workload_image: two
gzip layers, the second deleting a directory and a file) is built with umoci in the scratch directory:
small sizes (a 5 MB database, 10 MiB files, a tarball of 1,000 small files), --full the issue's (a ~50 MB
database, 100 MiB log and file, ~340 MB of files in all, 221 MiB of gzip blobs).  Then, in interleaved
repeats (medians of 3), the same archive is

* imported onto a fresh pool (64 KiB blocks) by ``thinpool.containers.image_store.import_image``: a
  base thin device with a fresh ext4 (``mkfs.ext4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0``,
  Docker's options, on a 1 GiB base), then each layer on a snapshot of its parent, applied through the
  mounted filesystem (NBD from a thread of the process, nbdfuse, a loop device), every digest checked;
* imported into a fresh overlay2-style store by ``thinpool.containers.overlay.OverlayStore.import_image``
  (each layer extracted into its own directory, whiteouts as 0/0 character devices);
* unpacked by ``umoci unpack --image DIR:tag BUNDLE`` (digests checked; every layer applied in turn into
  one rootfs, plus a runtime config and an mtree manifest): the tool people use to unpack such images.

O3 = thin import / umoci unpack: target <= 3 (the import formats a filesystem and writes every byte
through NBD, FUSE, a loop device and ext4 with a journal, where umoci writes plain files; a few unpacks'
time is what a one-time import may cost).  O4 = overlay store import / umoci unpack: target <= 1.5 (the
same reader as perf.oci).  ``--docs`` rewrites this section of docs/performance.md between its markers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .common import (Row, Scratch, docs_head, finish, interleave, log, machine, med, perf_parser, ratio_row,
                     rows_table_md, timed)

SECTION_BEGIN = "<!-- image_import: begin (written by `python -m perf.image_import --docs`) -->"
SECTION_END = "<!-- image_import: end -->"
TARGET_THIN = 3.0
TARGET_OVERLAY = 1.5
BASE_SIZE = "1GiB"


def sizes(full: bool):
    from thinpool.containers.workloads import ISSUE_SIZES, ImageSizes, MiB
    return ISSUE_SIZES if full else ImageSizes(db_bytes=5_000_000, log_bytes=10 * MiB, file_bytes=10 * MiB,
                                               big_bytes=10 * MiB, small_files=1000, stdlib_bytes=4_000_000)


def sides(scratch: Scratch, archive: str, tag: str) -> dict:
    from thinpool import Pool
    from thinpool.containers.image_store import import_image
    from thinpool.containers.overlay import OverlayStore

    def thin(_r: int) -> float:
        d = scratch.path("pool")
        Pool.create(d, data_size="8GiB", block_size="64KiB").close()
        t = timed(lambda: import_image(d, archive, tag=tag, base_size=BASE_SIZE))
        scratch.remove(d)
        return t

    def overlay(_r: int) -> float:
        d = scratch.path("overlay")
        t = timed(lambda: OverlayStore(d).import_image(archive, tag))
        scratch.remove(d)
        return t

    def umoci(_r: int) -> float:
        d = scratch.path("umoci")
        t = timed(lambda: subprocess.run(["umoci", "unpack", "--image", f"{archive}:{tag}", d], check=True,
                                         stdout=subprocess.DEVNULL))
        scratch.remove(d)
        return t

    return {"thin": thin, "overlay": overlay, "umoci": umoci}


def run(full: bool) -> tuple[list[Row], dict]:
    from thinpool.containers.workloads import build_workload_image
    repeats = 3
    rows: list[Row] = []
    with Scratch() as scratch:
        sz = sizes(full)
        built = build_workload_image(scratch.path("image"), sz, tag="perf")
        nbytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(built["archive"]) for f in fs)
        log(f"image: {nbytes / 2**20:.1f} MiB of blobs; {repeats} interleaved repeats")
        # warm-up: the kernels' JIT cache and the first NBD/nbdfuse start, untimed
        sides(scratch, built["archive"], "perf")["thin"](0)
        t = {k: med(v) for k, v in interleave(sides(scratch, built["archive"], "perf"), repeats).items()}
        detail = {"repeats": repeats, "archive_bytes": nbytes, "sizes": sz.__dict__, **t}
        what = f"the workload image ({nbytes / 2**20:.0f} MiB of gzip blobs, 2 layers)"
        rows.append(ratio_row("O3", f"import {what} onto a fresh thin pool (ext4, {BASE_SIZE} base): "
                              "thinpool image import / umoci unpack", f"<= {TARGET_THIN}",
                              t["thin"] / t["umoci"], thin_s=t["thin"], umoci_s=t["umoci"]))
        rows.append(ratio_row("O4", f"import {what} into a fresh overlay2-style store: "
                              "thinpool overlay import / umoci unpack", f"<= {TARGET_OVERLAY}",
                              t["overlay"] / t["umoci"], overlay_s=t["overlay"], umoci_s=t["umoci"]))
    return rows, detail


def main(argv: list[str] | None = None) -> int:
    ap = perf_parser("image_import", __doc__, "the issue's image sizes (~340 MB; quick: ~45 MB)", "image import")
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
                f"{os.getloadavg()[0]:.1f} at the end): the workload image of `thinpool compare` built by umoci, "
                f"imported onto a fresh 64 KiB-block pool by `thinpool image import` (mkfs.ext4 of a {BASE_SIZE} "
                "base with Docker's options, each layer on a snapshot through the mounted filesystem), into a "
                "fresh overlay2-style store (a directory per layer), and unpacked by `umoci unpack`, "
                f"{detail['repeats']} interleaved repeats (medians of wall seconds). The machine's load varies "
                "between runs: compare the ratios, not the seconds.\n\n"
                + rows_table_md(rows) + "\n")
    return finish(args, rows, detail, mach, SECTION_BEGIN, SECTION_END, body)


if __name__ == "__main__":
    sys.exit(main())
