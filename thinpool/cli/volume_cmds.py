"""Volume commands: create-thin, snapshot, delete, rename, ls, usage, write/read/discard, import/export."""

from __future__ import annotations

import inspect

import click

from .common import CommandFn, IntRange, SIZE, abspath, echo_text, emit, json_option, pool_argument, stream_table
from . import stream_ops  # noqa: F401  (registers write, read, import, export)
from .ops import render_volumes, volume_columns_json
from .registry import OPS, run_op

SECTION = "Volume commands"

_served_note = ("Runs in this process only: on a pool that is being served, use the volume's NBD export "
                "(e.g. nbdcopy) instead.")


def _dev_id_option(f: CommandFn) -> CommandFn:
    return click.option("--dev-id", type=IntRange(0, (1 << 24) - 1), default=None,
                        help="dm-thin device id (default: the next free one).")(f)


@click.command("create-thin")
@pool_argument
@click.argument("name")
@click.argument("size", type=SIZE)
@_dev_id_option
@click.option("--read-only", is_flag=True, help="Create the volume read-only.")
@click.option("--external-origin", "external_origin", metavar="FILE", default=None,
              help="A read-only file (or block device) under the volume: unprovisioned blocks read from it "
                   "(dm-thin's external origin).")
@json_option
def create_thin_cmd(pool: str, name: str, size: int, dev_id: int | None, read_only: bool,
                    external_origin: str | None, as_json: bool) -> None:
    """Create an empty thin volume NAME of SIZE bytes.

    SIZE is the virtual size (a multiple of 512 bytes); no space is used until written.

    With --external-origin FILE (dm-thin's external origin, e.g. a golden image): blocks the volume
    has not written read from FILE, the first partial write to a block copies the rest of the block
    from FILE, and bytes past FILE's end read as zeroes.  FILE is never written; it must not be a
    pool file or lie in the pool directory, and must not change afterwards (its size and mtime are
    recorded and checked).  Snapshots of the volume share the origin.  Exported metadata does not
    carry it (dm-thin keeps it in the thin's table, not in the metadata).

    \b
    Examples:
      thinpool create-thin /tmp/pool base 10G
      thinpool create-thin /tmp/pool vm1 20G --external-origin golden.img
    """
    args = {"name": name, "size": size, "dev_id": dev_id, "read_only": read_only}
    if external_origin is not None:
        args["external_origin"] = abspath(external_origin)
    emit(run_op(pool, "create-thin", args), as_json)


@click.command("snapshot")
@pool_argument
@click.argument("origin")
@click.argument("name")
@_dev_id_option
@click.option("--read-only", is_flag=True, help="Make the snapshot read-only.")
@json_option
def snapshot_cmd(pool: str, origin: str, name: str, dev_id: int | None, read_only: bool, as_json: bool) -> None:
    """Snapshot volume ORIGIN as NAME (O(1)).

    Blocks are shared until either side writes them (copy-on-write).  This is dm-thin's create_snap;
    containerd-style snapshots are `thinpool snapshotter`.

    Snapshots of snapshots work the same way.

    \b
    Examples:
      thinpool snapshot /tmp/pool base snap1
    """
    emit(run_op(pool, "snapshot", {"origin": origin, "name": name, "dev_id": dev_id, "read_only": read_only}),
         as_json)


@click.command("delete")
@pool_argument
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@json_option
def delete_cmd(pool: str, names: tuple[str, ...], as_json: bool) -> None:
    """Delete thin volumes (all or none).

    Their snapshots and origins are unaffected.

    \b
    Examples:
      thinpool delete /tmp/pool snap1 snap2
    """
    emit(run_op(pool, "delete", {"names": list(names)}), as_json)


@click.command("rename")
@pool_argument
@click.argument("old")
@click.argument("new")
@json_option
def rename_cmd(pool: str, old: str, new: str, as_json: bool) -> None:
    """Rename volume OLD to NEW.

    Names are thinpool's; the dm-thin device id does not change."""
    emit(run_op(pool, "rename", {"old": old, "new": new}), as_json)


@click.command("ls")
@pool_argument
@click.option("-o", "--format", "fields", metavar="FIELDS", default=None,
              help="Comma-separated thin_ls fields; prints exactly what thin_ls prints.")
@click.option("--no-headers", is_flag=True, help="Omit the header row.")
@click.option("-m", "--metadata-snap", is_flag=True,
              help="Report the held metadata snapshot (thin_ls -m; see reserve-metadata-snap).")
@click.option("-u", "--usage", is_flag=True,
              help="Add EXCLUSIVE and SHARED (walks every volume's mappings).")
@json_option
def ls_cmd(pool: str, fields: str | None, no_headers: bool, metadata_snap: bool, usage: bool,
           as_json: bool) -> None:
    """List volumes: size and mapped space; with --usage, exclusive and shared space too.

    By default: NAME, DEV, SIZE (virtual), MAPPED, CREATE_TIME, SNAP_TIME -- read from the device
    table alone, so this is fast on any pool.  --usage adds EXCLUSIVE (blocks no other volume maps)
    and SHARED = MAPPED - EXCLUSIVE (thin_ls's definitions); like thin_ls, that walks every volume's
    mappings.

    With -o FIELDS (or --metadata-snap) the output is thin_ls's, byte for byte, using thin_ls's field
    names: DEV, MAPPED_BLOCKS, EXCLUSIVE_BLOCKS, SHARED_BLOCKS, MAPPED_SECTORS, EXCLUSIVE_SECTORS,
    SHARED_SECTORS, MAPPED_BYTES, EXCLUSIVE_BYTES, SHARED_BYTES, MAPPED, EXCLUSIVE, SHARED, TRANSACTION,
    CREATE_TIME, SNAP_TIME (thin_ls's default set is DEV,MAPPED,CREATE_TIME,SNAP_TIME).

    \b
    Examples:
      thinpool ls /tmp/pool
      thinpool ls /tmp/pool --usage
      thinpool ls /tmp/pool -o DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS --no-headers
      thinpool ls /tmp/pool --json
    """
    if fields is None and not metadata_snap:
        if not usage:  # columns: no object per volume (100,000 volumes list in a fraction of a second)
            if not as_json:  # (the table made where the pool is open: see thinpool.cli.tables)
                if stream_table(pool, not no_headers):
                    return
                text = run_op(pool, "ls", {"table": True, "headers": not no_headers})["text"]
                if text:
                    echo_text(text)
                return
            click.echo(volume_columns_json(run_op(pool, "ls", {"columns": True})["columns"]))
            return
        result = run_op(pool, "ls", {"usage": True})
        if as_json:
            emit(result["volumes"], True)
        else:
            emit(result["volumes"], False, lambda rows: render_volumes(rows, headers=not no_headers))
        return
    result = run_op(pool, "ls", {"fields": fields, "headers": not no_headers,
                                 "metadata_snap": metadata_snap, "as_json": as_json})
    if as_json:
        emit(result["rows"], True)
    else:
        click.echo(result["text"], nl=False)


@click.command("usage")
@pool_argument
@click.argument("name", required=False)
@json_option
def usage_cmd(pool: str, name: str | None, as_json: bool) -> None:
    """Block usage of one volume or of all.

    Mapped, exclusive and shared blocks and the highest mapped block of NAME (default: every volume)."""
    emit(run_op(pool, "usage", {"name": name}), as_json, OPS["usage"].render)


_offset_option = click.option("--offset", type=SIZE, default=0, show_default=True,
                              help="Byte offset in the volume (units allowed: 4K, 1M...).")


@click.command("write")
@pool_argument
@click.argument("name")
@click.argument("input_file", metavar="[FILE]", required=False, default="-",
                type=click.Path(dir_okay=False, allow_dash=True))
@_offset_option
@click.option("--length", type=SIZE, default=None, help="Write at most this many bytes.")
@json_option
def write_cmd(pool: str, name: str, input_file: str, offset: int, length: int | None, as_json: bool) -> None:
    """Write FILE or stdin into volume NAME.

    The data goes at --offset.

    Every byte is written, zeros included; use `import` for sparse images.  The write is atomic:
    if it fails (e.g. the pool runs out of space) nothing is committed.

    \b
    Examples:
      echo hello | thinpool write /tmp/pool base --offset 1M
      thinpool write /tmp/pool base blob.bin

    """
    args = {"name": name, "input": "-" if input_file == "-" else abspath(input_file), "offset": offset,
            "length": length}
    emit(run_op(pool, "write", args), as_json)


@click.command("read")
@pool_argument
@click.argument("name")
@_offset_option
@click.option("--length", type=SIZE, default=None, help="Bytes to read (default: to the end of the volume).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="Write to this file instead of stdout.")
def read_cmd(pool: str, name: str, offset: int, length: int | None, output: str) -> None:
    """Read volume NAME to stdout or a file.

    Reads --length bytes (default: to the end) from --offset.

    Unmapped blocks read as zeros.

    \b
    Examples:
      thinpool read /tmp/pool base --length 4K | xxd | head
    """
    args = {"name": name, "output": "-" if output == "-" else abspath(output), "offset": offset, "length": length}
    run_op(pool, "read", args)


@click.command("discard")
@pool_argument
@click.argument("name")
@_offset_option
@click.option("--length", type=SIZE, default=None, help="Bytes to discard (default: to the end of the volume).")
@json_option
def discard_cmd(pool: str, name: str, offset: int, length: int | None, as_json: bool) -> None:
    """Unmap blocks of volume NAME (like blkdiscard).

    Unmaps the whole blocks inside [offset, offset+length).

    Partial blocks at either end are left alone (dm-thin's rule); freed blocks return to the pool.

    \b
    Examples:
      thinpool discard /tmp/pool base --offset 1M --length 64M
    """
    emit(run_op(pool, "discard", {"name": name, "offset": offset, "length": length}), as_json,
         OPS["discard"].render)


def _hex_digest(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--sha256: 64 hexadecimal digits (a usage error otherwise)."""
    if value is not None and (len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value)):
        raise click.BadParameter(f"must be 64 hexadecimal digits (got {value[:80]!r})")
    return value


@click.command("import")
@pool_argument
@click.argument("name")
@click.argument("image", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--size", type=SIZE, default=None,
              help="Size of the volume to create (default: the image's, rounded up to 512 bytes).")
@click.option("--expect-size", type=SIZE, default=None,
              help="The image's exact length: a stream that ends before it (or goes on past it) is refused "
                   "and nothing is imported.  From a pipe it also sizes a new volume without spooling.")
@click.option("--sha256", "sha256", metavar="HEX", default=None, callback=_hex_digest,
              help="The image's SHA-256 (64 hex digits), holes counted as zeroes: verified before the import "
                   "is committed; a mismatch imports nothing.")
@click.option("--allow-empty", is_flag=True, help="Import an empty image (refused by default: an empty pipe "
                                                   "usually means its producer failed).")
@json_option
def import_cmd(pool: str, name: str, image: str, size: int | None, expect_size: int | None, sha256: str | None,
               allow_empty: bool, as_json: bool) -> None:
    """Import a raw image into volume NAME (sparse).

    IMAGE is a raw disk image file, or - for stdin.

    Only blocks holding non-zero bytes are written: holes and zero blocks allocate nothing.  NAME is
    created if it does not exist; in an existing volume, blocks that are zero in the image are unmapped,
    so its first len(IMAGE) bytes then read exactly like the image.  From a pipe (- or /dev/stdin)
    without --size or --expect-size, a new volume's size is learnt by first copying the stream to a
    temporary file ($TMPDIR).  Shows a progress bar when stderr is a terminal.

    All or nothing: the import commits only once the whole image was read, written and verified.  On
    any failure -- an empty input (without --allow-empty), a stream shorter or longer than
    --expect-size, a --sha256 mismatch, a read error, no space, Ctrl-C -- it exits 1 and the pool is
    as before: a new volume is not created, and an existing volume keeps its data, because while it is
    imported into, every block written goes to a new data block (so that needs free space for every
    block the image writes; the replaced blocks are freed by the commit).  A pipe's end looks the same
    whether its producer finished or died: give --expect-size or --sha256 to tell them apart.

    \b
    Examples:
      thinpool import /tmp/pool vm disk.raw
      nbdcopy -- [ qemu-nbd -f qcow2 disk.qcow2 ] - | thinpool import /tmp/pool vm - --size 20G
      curl -fsS https://example.org/vm.raw | thinpool import /tmp/pool vm - --expect-size 2G --sha256 5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03
    """
    args = {"name": name, "image": "-" if image == "-" else abspath(image), "size": size,
            "expect_size": expect_size, "sha256": sha256, "allow_empty": allow_empty}
    emit(run_op(pool, "import", args), as_json, OPS["import"].render)


@click.command("export")
@pool_argument
@click.argument("name")
@click.argument("output", type=click.Path(dir_okay=False, allow_dash=True), default="-", required=False)
@json_option
def export_cmd(pool: str, name: str, output: str, as_json: bool) -> None:
    """Export volume NAME as a raw image (sparse).

    OUTPUT is a file (default: stdout).

    A regular OUTPUT file is written sparse: unmapped and all-zero blocks are seeked over, so the
    file only takes the space of the data.  Shows a progress bar when stderr is a terminal.

    \b
    Examples:
      thinpool export /tmp/pool vm vm.raw
      thinpool export /tmp/pool vm | gzip > vm.raw.gz
    """
    if as_json and output == "-":
        raise click.UsageError("--json needs an OUTPUT file (stdout carries the image)")
    args = {"name": name, "output": "-" if output == "-" else abspath(output)}
    emit(run_op(pool, "export", args), as_json, OPS["export"].render)


for _cmd in (write_cmd, read_cmd, import_cmd, export_cmd):
    # cleandoc first: the docstring's indentation must go before an unindented line is appended, or click
    # (which dedents the whole help) keeps it and re-wraps the \b example blocks into the paragraphs
    _cmd.help = inspect.cleandoc(_cmd.help or "") + "\n\n" + _served_note

COMMANDS: list[click.Command] = [create_thin_cmd, snapshot_cmd, delete_cmd, rename_cmd, ls_cmd, usage_cmd,
                                 write_cmd, read_cmd, discard_cmd, import_cmd, export_cmd]
