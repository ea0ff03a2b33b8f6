"""``thinpool compare``: block-level CoW on the thin pool against overlayfs, on the same image and workloads.

A thin shell over :func:`thinpool.containers.compare.compare` (root only: it mounts).  It is the op
``compare``, registered ``local_only``: it serves the pool over NBD from inside the command, so it runs
only on a pool that is not being served.
"""

from __future__ import annotations

from typing import Any

import click

from .common import SIZE, abspath, pool_argument
from .registry import register_op, run_op

SECTION = "Images and containers (real filesystems on thin volumes; root)"


def op_compare(pool: Any, archive: str, tag: str | None = None, workloads: list[str] | None = None,
               only: list[str] | None = None, builtin: bool = True, block_sizes: str = "64K,128K,256K,512K,1M",
               workdir: str | None = None, podman: bool = True, keep: bool = False, fs: str | None = None,
               base_size: int | None = None, chroot: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run the workloads on a thin container and an overlay container of the image; the report."""
    from thinpool.containers.compare import compare, parse_block_sizes
    from thinpool.containers.workloads import builtin_workloads, parse_workload
    from thinpool.errors import InvalidArgument
    sizes = parse_block_sizes(block_sizes)           # bad input fails before anything is done
    wls = (builtin_workloads() if builtin else []) + [parse_workload(w) for w in workloads or []]
    if only:
        known = {w.name for w in wls}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise InvalidArgument(f"--only {', '.join(unknown)}: no such workload (known: {', '.join(sorted(known))})")
        wls = [w for w in wls if w.name in only]
    if not wls:
        raise InvalidArgument("no workload to run (--no-builtin needs --workload NAME=COMMAND)")
    say = (lambda msg: click.echo(f"thinpool compare: {msg}", err=True)) if progress else None
    return compare(pool, archive, tag=tag, workloads=wls, block_sizes=sizes, workdir=workdir, podman=podman,
                   keep=keep, fs=fs, base_size=base_size, chroot=chroot, progress=say)


def _render(res: dict[str, Any]) -> str:
    from thinpool.containers.compare import render_compare
    return render_compare(res)


register_op("compare", op_compare, write=True, render=_render, local_only=True)


def write_reports(res: dict[str, Any], json_out: str | None, html_out: str | None, pool: str,
                  png_out: str | None = None) -> None:
    """Write the report's JSON, HTML and PNG files asked for (never onto the pool's files)."""
    import json

    from thinpool.containers.compare import html_compare, save_png
    from thinpool.safe_output import write_output
    if png_out:
        save_png(res, png_out)
    if json_out:
        write_output(json_out, json.dumps(res, indent=2) + "\n", pools=[pool], what="--json file")
    if html_out:
        write_output(html_out, html_compare(res), pools=[pool], what="--html file")


@click.command("compare")
@pool_argument
@click.argument("archive", type=click.Path(exists=True))
@click.option("--tag", default=None, help="Which image of the archive (its tag), and the name it gets on the pool.")
@click.option("--workload", "workloads", multiple=True, metavar="NAME=COMMAND",
              help="Add a workload of your own: COMMAND runs with sh -c on the container's root (ROOT is set "
                   "to it, and it is the working directory).  Repeatable.")
@click.option("--only", multiple=True, metavar="NAME", help="Run only these workloads (repeatable).")
@click.option("--no-builtin", "no_builtin", is_flag=True, help="Leave the built-in workloads out.")
@click.option("--block-sizes", default="64K,128K,256K,512K,1M", show_default=True,
              help="The thin side at these block sizes (the recorded I/O replayed through the simulator; "
                   "the 4 KiB floor is always reported).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, metavar="OUT",
              help="Write the report as JSON (keys: docs/containers.md).")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), default=None, metavar="OUT",
              help="Write the report as one self-contained HTML page.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False), default=None, metavar="OUT",
              help="Write a bar chart of the report as a PNG (needs matplotlib).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the overlay store and the traces go (default: a temporary directory, removed). "
                   "Its filesystem is the overlay side's upper filesystem.")
@click.option("--chroot", is_flag=True, help="Run the commands chrooted in the container's root (the image's own "
              "programs; the podman side then starts the container, as podman run).")
@click.option("--keep", is_flag=True, help="Keep the containers (both sides), the overlay store and the traces.")
@click.option("--no-podman", "no_podman", is_flag=True, help="Do not run the podman side even where podman works.")
@click.option("--fs", default=None, help="Filesystem of the image's base device, if the pool has none yet "
              "[default: ext4].")
@click.option("--base-size", type=SIZE, default=None,
              help="Size of the image's base device, if the pool has none yet [default: 10GiB].")
def compare_cmd(pool: str, archive: str, tag: str | None, workloads: tuple[str, ...], only: tuple[str, ...],
                no_builtin: bool, block_sizes: str, json_out: str | None, html_out: str | None,
                png_out: str | None, workdir: str | None, keep: bool, no_podman: bool, fs: str | None,
                base_size: int | None, chroot: bool) -> None:
    """Block-level CoW (thin pool) against overlayfs, measured: run each workload in a fresh thin container
    and a fresh overlay container of image ARCHIVE (OCI layout or docker-archive; imported onto POOL if not
    there yet) and report the overlay upper directory's bytes (as du counts them) beside the thin
    container's exclusive blocks x block size, the wall time of each side, and the thin side at every
    --block-sizes value.  Root only.

    \b
    Examples:
      sudo thinpool compare /tmp/p image.oci.tar
      sudo thinpool compare /tmp/p ./layout --tag v1 --workload 'pip=python3 -m pip --version' --json r.json
      sudo thinpool compare /tmp/p image.tar --only sqlite-1pct --block-sizes 64K,512K --html r.html
    """
    from .common import stderr_is_tty
    pool_abs = abspath(pool)
    res = run_op(pool_abs, "compare", {
        "archive": abspath(archive), "tag": tag, "workloads": list(workloads), "only": list(only),
        "builtin": not no_builtin, "block_sizes": block_sizes, "workdir": abspath(workdir) if workdir else None,
        "podman": not no_podman, "keep": keep, "fs": fs, "base_size": base_size, "chroot": chroot,
        "progress": stderr_is_tty()})
    write_reports(res, json_out, html_out, pool_abs, png_out)
    click.echo(_render(res))


COMMANDS: list[click.Command] = [compare_cmd]
