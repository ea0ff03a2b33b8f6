"""Pool commands: create, status, resize, set-autoextend, commit, set-transaction-id, metadata snapshots,
check, trim."""

from __future__ import annotations

from typing import Any, Callable

import click

from .common import CommandFn, IntRange, SIZE, abspath, emit, json_option, mode_option, pool_argument
from .ops import render_features, render_status_human
from .registry import OPS, register_op, run_op


def _discard_options(default: str | None) -> Callable[[CommandFn], CommandFn]:
    """``--discard-passdown`` / ``--no-discard-passdown`` / ``--ignore-discard`` (dm-thin's pool features,
    one value ``discard``)."""
    def deco(f):
        f = click.option("--ignore-discard", "discard", flag_value="ignore",
                         help="dm-thin's ignore_discard: discards fail (EOPNOTSUPP); NBD exports advertise no TRIM.")(f)
        f = click.option("--no-discard-passdown", "discard", flag_value="nopassdown",
                         help="dm-thin's no_discard_passdown: discards unmap blocks but do not punch them "
                              "out of the data file.")(f)
        f = click.option("--discard-passdown", "discard", flag_value="passdown", default=default,
                         help="Discards unmap blocks and punch the freed ones out of the data file "
                              "(dm-thin's default).")(f)
        return f
    return deco


def _no_space_options(default_error: bool | None, default_timeout: float | None
                      ) -> Callable[[CommandFn], CommandFn]:
    def deco(f):
        f = click.option("--no-space-timeout", type=click.FloatRange(0, 86400), default=default_timeout,
                         show_default=default_timeout is not None, metavar="SECONDS",
                         help="How long a write queued for data space waits before failing with ENOSPC "
                              "(0: for ever; the kernel's no_space_timeout).")(f)
        f = click.option("--error-if-no-space/--queue-if-no-space", default=default_error,
                         show_default=default_error is not None,
                         help="dm-thin's no-space policy: fail writes that find no data space at once, or "
                              "queue them until a resize or freed blocks make room (the kernel's default).")(f)
        return f
    return deco

SECTION = "Pool commands"


@click.command("create")
@pool_argument
@click.option("-s", "--data-size", type=SIZE, default="1GiB", show_default=True,
              help="Size of the data device (a sparse file).")
@click.option("-b", "--block-size", type=SIZE, default="64KiB", show_default=True,
              help="Data block size: a multiple of 64KiB up to 1GiB.")
@click.option("--metadata-size", type=SIZE, default=None,
              help="Metadata size (default: thin_metadata_size's estimate with headroom).")
@click.option("--low-water-mark", type=IntRange(min=0), default=0, show_default=True,
              help="Free data blocks at which the low-water event fires.")
@_no_space_options(False, 60.0)
@_discard_options("passdown")
@click.option("--zero/--no-zero", "zero_new_blocks", default=True, show_default=True,
              help="Zero newly provisioned blocks (dm-thin's skip_block_zeroing when off: a reused block "
                   "shows its old bytes where not written).")
@click.option("--punch-freed-blocks", is_flag=True,
              help="Hole-punch every freed block once no durable commit maps it (not dm-thin's behaviour: "
                   "by default freed blocks keep their bytes until `thinpool trim` or a discard).")
@click.option("--data-file", type=click.Path(dir_okay=False), default=None,
              help="Put the data device at this path instead of <POOL>/data.")
@click.option("--max-thins", type=IntRange(min=1), default=1000, show_default=True,
              help="Expected number of thin volumes (sizes the default metadata).")
@click.option("--force", is_flag=True,
              help="Use a non-empty existing --data-file anyway (the new pool maps none of it: new volumes "
                   "overwrite its contents and `thinpool trim` punches them).")
@click.option("--take-over-data", is_flag=True,
              help="The --data-file belongs to another pool that is gone: make it this pool's (the old pool "
                   "then refuses to open).")
@click.option("--metadata-only", is_flag=True,
              help="No data file: the same metadata and kernels, but writes store no bytes and reads return "
                   "zeroes (simulating pools larger than this host's disks; docs/simulate.md).")
@mode_option
@json_option
def create_cmd(pool: str, data_size: int, block_size: int, metadata_size: int | None, low_water_mark: int,
               error_if_no_space: bool, no_space_timeout: float, discard: str, zero_new_blocks: bool,
               punch_freed_blocks: bool, data_file: str | None, max_thins: int, force: bool, take_over_data: bool,
               metadata_only: bool, mode: int | None, as_json: bool) -> None:
    """Create a new pool in directory POOL.

    POOL must not exist or must be an empty directory.  An existing --data-file must be empty
    (else --force) and belong to no other pool (else --take-over-data, when that pool is gone).

    \b
    Examples:
      thinpool create /tmp/pool
      thinpool create /tmp/pool --data-size 100G --block-size 512K
      thinpool create /tmp/pool --error-if-no-space --no-discard-passdown
    """
    from thinpool.pool import Pool
    p = Pool.create(abspath(pool), data_size=data_size, block_size=block_size, metadata_size=metadata_size,
                    low_water_mark=low_water_mark, error_if_no_space=error_if_no_space,
                    no_space_timeout=no_space_timeout, discard=discard, zero_new_blocks=zero_new_blocks,
                    punch_freed_blocks=punch_freed_blocks,
                    data_file=abspath(data_file) if data_file else None, max_thins=max_thins, force=force,
                    take_over_data=take_over_data, mode=mode, metadata_only=metadata_only)
    p.close()
    if as_json:
        emit(run_op(pool, "status", {}), True)


@click.command("status")
@pool_argument
@click.option("-l", "--line", "line_only", is_flag=True, help="Print only the dmsetup status line.")
@click.option("-H", "--human", "human_only", is_flag=True,
              help="Print only the docker-info-like block (Data/Metadata Space Used/Total/Available...).")
@json_option
def status_cmd(pool: str, line_only: bool, human_only: bool, as_json: bool) -> None:
    """Show the dmsetup status line and space summary.

    Prints dmsetup's thin-pool status line, then Data/Metadata Space Used/Total/Available etc.

    The line is exactly what `dmsetup status` prints after `0 <len> thin-pool` (docs/dm-thin.md §10):

    \b
      <transaction id> <used meta>/<total meta> <used data>/<total data> <held root|-> <rw|ro|out_of_data_space>
      <discard_passdown|no_discard_passdown|ignore_discard> <error_if_no_space|queue_if_no_space>
      <needs_check|-> <metadata low watermark>

    Sizes in the summary are printed as docker info prints them (SI units, 4 significant digits);
    Available is capped by the free space of the host filesystem, as Docker does for loop files.

    \b
    Examples:
      thinpool status /tmp/pool
      thinpool status --line /tmp/pool
      thinpool status --json /tmp/pool | jq .data_space
    """
    if line_only and human_only:
        raise click.UsageError("--line and --human are mutually exclusive")
    result = run_op(pool, "status", {})
    if line_only:
        emit(result, as_json, lambda r: r["dmsetup_line"])
    elif human_only:
        emit(result, as_json, render_status_human)
    else:
        emit(result, as_json, OPS["status"].render)


@click.command("resize")
@pool_argument
@click.argument("data_size", metavar="[SIZE]", type=SIZE, required=False)
@click.option("--metadata", "--metadata-size", "metadata_size", type=SIZE, default=None,
              help="Grow the metadata file to this size (never shrinks; at most 15.87GiB).")
@json_option
def resize_cmd(pool: str, data_size: int | None, metadata_size: int | None, as_json: bool) -> None:
    """Grow the data device to SIZE and/or the metadata file (never shrinks).

    A pool that ran out of data space returns to write mode.  If the metadata cannot hold the bigger
    data space map it is grown too when autoextend is on (`thinpool set-autoextend`) or --metadata
    gives a size that covers it; otherwise the resize is refused with nothing changed.  A pool that
    ran out of metadata space gets out with --metadata, then can delete volumes.  --metadata-size is
    the same option.

    \b
    Examples:
      thinpool resize /tmp/pool 20G
      thinpool resize /tmp/pool --metadata 64M
    """
    if data_size is None and metadata_size is None:
        raise click.UsageError("give a data SIZE, --metadata, or both")
    args = {"data_size": data_size} if data_size is not None else {}
    if metadata_size is not None:
        args["metadata_size"] = metadata_size
    emit(run_op(pool, "resize", args), as_json)


@click.command("set-autoextend")
@pool_argument
@click.option("--threshold", type=IntRange(0, 100), required=True,
              help="Grow when use goes above this percent (LVM's thin_pool_autoextend_threshold; 100 = off, "
                   "below 50 counts as 50).")
@click.option("--percent", type=IntRange(0, 10000), default=None,
              help="Grow by this percent of the current size (LVM's thin_pool_autoextend_percent; default 20).")
@json_option
def set_autoextend_cmd(pool: str, threshold: int, percent: int | None, as_json: bool) -> None:
    """Set LVM's autoextend policy for the pool's metadata and data.

    After every commit, when metadata use or data use is above --threshold percent, that space grows
    by --percent of its size (more if needed to get back under the threshold), as LVM's dmeventd
    does with thin_pool_autoextend_threshold/_percent.

    \b
    Examples:
      thinpool set-autoextend /tmp/pool --threshold 80 --percent 20
      thinpool set-autoextend /tmp/pool --threshold 100     # off
    """
    args: dict = {"threshold": threshold}
    if percent is not None:
        args["percent"] = percent
    emit(run_op(pool, "set-autoextend", args), as_json)


@click.command("set")
@pool_argument
@_discard_options(None)
@_no_space_options(None, None)
@json_option
def set_cmd(pool: str, discard: str | None, error_if_no_space: bool | None, no_space_timeout: float | None,
            as_json: bool) -> None:
    """Change the pool's features (discards, the no-space policy).

    The features are dm-thin's pool features, stored with the pool.  On a pool that is not served this
    opens it with the new features -- a new activation, where dm-thin accepts any of them.  On a served
    pool (an active one) dm-thin's rules for reloading its table apply: passdown and the no-space
    policy may change, but discards cannot be turned off or on (--ignore-discard) until the pool is
    stopped ("Discard support cannot be disabled once enabled").  Writes queued for space fail with
    ENOSPC when the policy becomes --error-if-no-space.

    \b
    Examples:
      thinpool set /tmp/pool --ignore-discard
      thinpool set /tmp/pool --queue-if-no-space --no-space-timeout 0
    """
    kwargs: dict[str, Any] = {k: v for k, v in (("discard", discard), ("error_if_no_space", error_if_no_space),
                                                ("no_space_timeout", no_space_timeout)) if v is not None}
    if not kwargs:
        raise click.UsageError("give at least one feature to change")
    from thinpool.control import client
    sock = client.connect(abspath(pool))
    if sock is not None:  # served: the serving process's pool is active
        sock.close()
        result = run_op(pool, "set", kwargs)
    else:
        from thinpool.pool import Pool
        p = Pool.open(abspath(pool), **kwargs)
        try:
            result = {"pool": p.path, **p.features, "dmsetup_line": p.status().dmsetup_line()}
        finally:
            p.close(commit=False)
    emit(result, as_json, render_features)


@click.command("commit")
@pool_argument
@json_option
def commit_cmd(pool: str, as_json: bool) -> None:
    """Commit the pool's metadata (its transaction; not `thinpool snapshotter commit`).

    A no-op for an idle pool; on a served pool it makes the clients' writes durable."""
    emit(run_op(pool, "commit", {}), as_json)


@click.command("set-transaction-id")
@pool_argument
@click.argument("old", type=IntRange(min=0))
@click.argument("new", type=IntRange(min=0))
@json_option
def set_transaction_id_cmd(pool: str, old: int, new: int, as_json: bool) -> None:
    """Change the userspace transaction id OLD -> NEW.

    Fails unless the current id is OLD.

    Like `dmsetup message POOL 0 set_transaction_id OLD NEW`.

    \b
    Examples:
      thinpool set-transaction-id /tmp/pool 0 1
    """
    emit(run_op(pool, "set-transaction-id", {"old": old, "new": new}), as_json)


@click.command("reserve-metadata-snap")
@pool_argument
@json_option
def reserve_metadata_snap_cmd(pool: str, as_json: bool) -> None:
    """Hold a metadata snapshot (for --metadata-snap).

    dump/ls/delta/rmap with --metadata-snap then read a consistent view while volumes change."""
    emit(run_op(pool, "reserve-metadata-snap", {}), as_json, OPS["reserve-metadata-snap"].render)


@click.command("release-metadata-snap")
@pool_argument
@json_option
def release_metadata_snap_cmd(pool: str, as_json: bool) -> None:
    """Release the held metadata snapshot."""
    emit(run_op(pool, "release-metadata-snap", {}), as_json)


@click.command("check")
@pool_argument
@click.option("-q", "--quiet", is_flag=True, help="Print nothing; only the exit status tells.")
@click.option("--clear-needs-check", "clear_needs_check", is_flag=True,
              help="If the metadata is sound, clear its needs_check flag: the pool leaves read-only mode "
                   "(thin_check --clear-needs-check-flag).")
@json_option
@click.pass_context
def check_cmd(ctx: click.Context, pool: str, quiet: bool, clear_needs_check: bool, as_json: bool) -> None:
    """Check the metadata structure (exit 1 on errors).

    Recomputes reference counts from the mappings and compares mapped blocks and the space map.

    Exit status 0 when clean, 1 when problems were found (like thin_check); the problems are printed
    one per line.
    """
    result = run_op(pool, "check", {"clear_needs_check": True}, write=True) if clear_needs_check else \
        run_op(pool, "check", {})
    if not quiet:
        emit(result, as_json, OPS["check"].render)
    if not result["ok"]:
        ctx.exit(1)


def op_trim(pool: Any) -> dict[str, Any]:
    """Commit (releasing the blocks freed by the last commit), then punch every free block that holds
    bytes (:meth:`thinpool.pool.Pool.trim`)."""
    pool.commit()
    return pool.trim().as_dict()


def render_trim(r: dict[str, Any]) -> str:
    """One line: blocks and bytes punched, free blocks, and those held back."""
    held = f"; {r['held_blocks']:,} freed by the last commit are trimmed after the next one" \
        if r["held_blocks"] else ""
    return (f"punched {r['punched_blocks']:,} free blocks ({r['punched_bytes']:,} bytes, {r['punched_runs']:,} "
            f"runs); {r['free_blocks']:,} blocks free{held}")


register_op("trim", op_trim, write=True, render=render_trim)


@click.command("trim")
@pool_argument
@json_option
def trim_cmd(pool: str, as_json: bool) -> None:
    """Return the host space of free data blocks (like thin_trim).

    A deleted volume's blocks, and blocks freed by copy-on-write or overwrites, keep their bytes in the
    data file (dm-thin never discards a block it frees); trim hole-punches every free block that holds
    bytes.  It commits first, then punches only blocks no durable commit maps, so a crash during a
    trim loses nothing.  Safe on a served pool.

    \b
    Examples:
      thinpool trim /tmp/pool
    """
    emit(run_op(pool, "trim", {}), as_json, OPS["trim"].render)


COMMANDS: list[click.Command] = [create_cmd, status_cmd, resize_cmd, set_cmd, set_autoextend_cmd, commit_cmd,
                                 set_transaction_id_cmd,
                                 reserve_metadata_snap_cmd, release_metadata_snap_cmd, check_cmd, trim_cmd]
