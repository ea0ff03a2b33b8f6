"""dm-thin interoperability commands: thin_dump XML, real binary metadata, thin_delta/thin_rmap/
thin_metadata_size equivalents (``ls -o`` is thin_ls, ``check`` is thinpool's own check)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from .common import IntRange, SIZE, abspath, emit, json_option, pool_argument
from . import ops as _ops  # noqa: F401  (registers the interop ops)
from .registry import OPS, run_op

if TYPE_CHECKING:
    from thinpool.pool import Pool

SECTION = "dm-thin interoperability"


def _write_text(text: str, output: str | None, pool: str | None = None) -> None:
    """Print ``text``, or write it to file ``output`` atomically, never onto a file of ``pool`` or of any
    other pool (:mod:`thinpool.safe_output`)."""
    if output is None or output == "-":
        click.echo(text, nl=False)
        return
    from thinpool.safe_output import write_output
    write_output(output, text, pools=[abspath(pool)] if pool else [])


def _check_new_pool_path(pool: str) -> None:
    from thinpool.errors import AlreadyExists
    import os
    if os.path.exists(pool) and (not os.path.isdir(pool) or os.listdir(pool)):
        raise AlreadyExists(f"cannot create pool {abspath(pool)}: path exists and is not an empty directory")


def _finish_new_pool(p: Pool, data_size: int | None) -> None:
    """Grow a freshly restored pool's data device to ``data_size`` if asked, then close it (committing);
    if any of that fails, everything the restore created is removed."""
    from thinpool.errors import InvalidArgument
    try:
        if data_size is not None:
            current = p.nr_data_blocks * p.block_size
            if data_size < current:
                raise InvalidArgument(f"--data-size {data_size} is smaller than the metadata's data device "
                                      f"({current} bytes)")
            # a new pool: its metadata is sized for the final data size (a resize alone refuses to
            # outgrow the metadata unless autoextend is on)
            from thinpool.poolspace import metadata_blocks_needed
            need = metadata_blocks_needed(p, data_size // p.block_size)
            have = p.store.nr_blocks
            p.resize(data_size, need * 4096 if need > have else None)
        p.close()  # its commit can fail too (a full or failing host disk)
    except BaseException:
        p.close(commit=False)
        p._new_files.undo()  # a failed restore leaves nothing behind
        raise


@click.command("dump")
@pool_argument
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write the XML to this file instead of stdout.")
@click.option("-m", "--metadata-snap", is_flag=True, help="Dump the held metadata snapshot (thin_dump -m).")
@json_option
def dump_cmd(pool: str, output: str | None, metadata_snap: bool, as_json: bool) -> None:
    """Print the metadata as thin_dump XML.

    Byte-identical to what thin_dump 0.9.0 prints for the same metadata.

    \b
    Examples:
      thinpool dump /tmp/pool > pool.xml
      thinpool reserve-metadata-snap /tmp/pool && thinpool dump -m /tmp/pool -o snap.xml
    """
    if output not in (None, "-"):
        from thinpool.safe_output import guard_output
        guard_output(output, pools=[abspath(pool)])  # refused before the dump runs
    text = run_op(pool, "dump", {"metadata_snap": metadata_snap})
    if as_json:
        if output not in (None, "-"):
            _write_text(text, output, pool)
        emit({"xml": text} if output in (None, "-") else {"output": abspath(output), "bytes": len(text)}, True)
        return
    _write_text(text, output, pool)


@click.command("restore")
@pool_argument
@click.option("-i", "--input", "input_file", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="thin_dump XML (0.9.0 or 1.x) to restore; - for stdin.")
@click.option("--data-size", type=SIZE, default=None,
              help="Grow the data device to this size (default: nr_data_blocks from the XML).")
@click.option("--data-file", type=click.Path(dir_okay=False), default=None,
              help="Use this existing data device file (in place) instead of a new empty <POOL>/data.")
@click.option("--metadata-size", type=SIZE, default=None, help="Metadata size of the new pool.")
@click.option("--take-over-data", is_flag=True,
              help="The --data-file belongs to another pool that is gone: make it this pool's (the old pool "
                   "then refuses to open).")
@json_option
def restore_cmd(pool: str, input_file: str, data_size: int | None, data_file: str | None,
                metadata_size: int | None, take_over_data: bool, as_json: bool) -> None:
    """Create pool POOL from thin_dump XML.

    Like thin_restore.

    Malformed input is refused with an error naming the line and the problem (unknown tag, missing
    attribute, data block beyond the data device, duplicate device or mapping, unsorted keys, bad block
    size), and nothing is created.  Volumes are named dev<ID>.

    A data file belongs to exactly one pool: --data-file naming another pool's data is refused
    unless --take-over-data.  A failed restore removes everything it created.

    \b
    Examples:
      thinpool restore /tmp/pool2 -i pool.xml
      thinpool restore /tmp/pool2 -i pool.xml --data-file /tmp/pool/data
    """
    from thinpool.interop.xml import load_xml
    from thinpool.pool import Pool
    _check_new_pool_path(pool)
    md = load_xml(sys.stdin.read() if input_file == "-" else abspath(input_file))
    p = Pool.from_metadata(abspath(pool), md, data_file=abspath(data_file) if data_file else None,
                           metadata_size=metadata_size, take_over_data=take_over_data)
    _finish_new_pool(p, data_size)
    if as_json:
        emit(run_op(pool, "status", {}), True)


@click.command("export-metadata")
@pool_argument
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--metadata-blocks", type=IntRange(min=8), default=None,
              help="Size of the metadata file in 4KiB blocks (default: thin_metadata_size's estimate).")
@json_option
def export_metadata_cmd(pool: str, file: str, metadata_blocks: int | None, as_json: bool) -> None:
    """Write real dm-thin binary metadata to FILE.

    FILE passes thin_check and thin_dump reads it; with the pool's data file (already laid out like a
    dm-thin data device) it forms a pool the kernel can activate (docs/interop.md).  A held metadata snapshot
    is carried over as the held root.

    \b
    Examples:
      thinpool export-metadata /tmp/pool meta.bin && thin_check meta.bin
    """
    emit(run_op(pool, "export-metadata", {"path": abspath(file), "nr_metadata_blocks": metadata_blocks}),
         as_json, OPS["export-metadata"].render)


@click.command("import-metadata")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.option("--data", "data_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The data device file the metadata describes, used in place (default: a new empty one).")
@click.option("--metadata-size", type=SIZE, default=None, help="Metadata size of the new pool.")
@click.option("-m", "--metadata-snap", is_flag=True, help="Import the held metadata snapshot's view instead.")
@click.option("--take-over-data", is_flag=True,
              help="The --data file belongs to another pool that is gone: make it this pool's (the old pool "
                   "then refuses to open).")
@pool_argument
@json_option
def import_metadata_cmd(file: str, data_file: str | None, metadata_size: int | None, metadata_snap: bool,
                        take_over_data: bool, pool: str, as_json: bool) -> None:
    """Create pool POOL from binary dm-thin metadata.

    FILE is real dm-thin metadata: the kernel's, thin_restore's or ours.

    Every block is verified (checksums, block numbers, btree structure, space maps); corrupt input is
    refused naming the structure and block at fault, and nothing is created.  Volumes are named dev<ID>.
    A data file belongs to exactly one pool: --data naming another pool's data is refused unless
    --take-over-data.  A failed import removes everything it created.

    \b
    Examples:
      thinpool import-metadata meta.bin --data data.img /tmp/pool2
    """
    from thinpool.interop.binary_read import read_binary_metadata
    from thinpool.pool import Pool
    _check_new_pool_path(pool)
    md = read_binary_metadata(abspath(file), metadata_snap=metadata_snap)
    p = Pool.from_metadata(abspath(pool), md, data_file=abspath(data_file) if data_file else None,
                           metadata_size=metadata_size, take_over_data=take_over_data)
    _finish_new_pool(p, None)
    if as_json:
        emit(run_op(pool, "status", {}), True)



@click.command("delta")
@pool_argument
@click.argument("left", metavar="A")
@click.argument("right", metavar="B")
@click.option("-v", "--verbose", is_flag=True, help="One <range> per record, with data blocks (thin_delta --verbose).")
@click.option("-m", "--metadata-snap", is_flag=True, help="Compare in the held metadata snapshot.")
@json_option
def delta_cmd(pool: str, left: str, right: str, verbose: bool, metadata_snap: bool, as_json: bool) -> None:
    """Show how volumes A and B differ (thin_delta XML).

    A and B are volume names or dm-thin device ids.  Mappings are compared by data block (times are
    ignored); units are blocks.  The output is what `thin_delta --thin1 A --thin2 B` prints.

    \b
    Examples:
      thinpool delta /tmp/pool base snap1
      thinpool delta /tmp/pool 1 2 --verbose
    """
    result = run_op(pool, "delta", {"left": left, "right": right, "verbose": verbose,
                                    "metadata_snap": metadata_snap, "as_json": as_json})
    emit(result, as_json, OPS["delta"].render)


@click.command("rmap")
@pool_argument
@click.option("-r", "--region", "regions", metavar="B..E", multiple=True, required=True,
              help="Data blocks B (inclusive) to E (exclusive); repeatable.")
@click.option("-m", "--metadata-snap", is_flag=True, help="Map in the held metadata snapshot.")
@json_option
def rmap_cmd(pool: str, regions: tuple[str, ...], metadata_snap: bool, as_json: bool) -> None:
    """Show which volumes map data blocks (thin_rmap).

    Prints `data B..E -> thin(DEV) V..W` lines (half-open ranges, in blocks), as thin_rmap does.

    \b
    Examples:
      thinpool rmap /tmp/pool --region 0..100 --region 200..210
    """
    result = run_op(pool, "rmap", {"regions": list(regions), "metadata_snap": metadata_snap, "as_json": as_json})
    emit(result, as_json, OPS["rmap"].render)


_NUMERIC_FLAG = "\0flag"


class _GetoptNumeric(click.Command):
    """thin_metadata_size's ``-n`` takes an optional *attached* argument (getopt): ``-n`` alone is
    number-only, ``-nshort``/``-nlong`` (or ``--numeric-only=short``) add the unit; ``-n short`` does not
    consume ``short``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten = []
        for arg in args:
            if arg in ("-n", "--numeric-only"):
                rewritten.append("--numeric-only=" + _NUMERIC_FLAG)
            elif arg.startswith("-n") and not arg.startswith("--"):
                rewritten.append("--numeric-only=" + arg[2:])
            else:
                rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


@click.command("metadata-size", cls=_GetoptNumeric)
@click.option("-b", "--block-size", required=True, metavar="SIZE",
              help="Data block size: a power of two, or any pool block size (a multiple of 64KiB "
                   "from 64KiB to 1GiB).")
@click.option("-s", "--pool-size", required=True, metavar="SIZE", help="Data device size.")
@click.option("-m", "--max-thins", required=True, metavar="N", help="Maximum number of thin volumes.")
@click.option("-u", "--unit", default=None, metavar="UNIT", help="Output unit (default: sectors).")
@click.option("-n", "--numeric-only", "numeric", default=None, metavar="[short|long]",
              help="Print only the number; -nshort / -nlong add the unit (getopt style, attached).")
@json_option
def metadata_size_cmd(block_size: str, pool_size: str, max_thins: str, unit: str | None, numeric: str | None,
                      as_json: bool) -> None:
    """Estimate metadata size (thin_metadata_size).

    Same formula and output as thin_metadata_size 0.9.0, and the tool's units: a number alone is in
    sectors; suffixes b, s, k, m, g, t, p (binary: k = KiB) and K, M, G, T, P (decimal: K = 1000), or
    long forms such as 64kibi or 1tera.  Every block size a pool accepts works (multiples of 64KiB from
    64KiB to 1GiB, e.g. 192k, which the tool itself refuses as not a power of two).

    \b
    Examples:
      thinpool metadata-size -b 64k -s 1t -m 1000
      thinpool metadata-size -b 192k -s 1t -m 1000
      thinpool metadata-size -b 64k -s 1t -m 1000 -u m -nshort
    """
    from thinpool.interop.thin_metadata_size import format_metadata_size
    flag: bool | str = False if numeric is None else (True if numeric == _NUMERIC_FLAG else numeric)
    text = format_metadata_size(block_size, pool_size, max_thins, unit=unit, numeric=flag)
    if as_json:
        nbytes = int(format_metadata_size(block_size, pool_size, max_thins, unit="b", numeric=True))
        emit({"bytes": nbytes, "blocks": nbytes // 4096, "text": text.rstrip("\n")}, True)
        return
    click.echo(text, nl=False)


COMMANDS: list[click.Command] = [dump_cmd, restore_cmd, export_metadata_cmd, import_metadata_cmd, delta_cmd,
                                 rmap_cmd, metadata_size_cmd]
