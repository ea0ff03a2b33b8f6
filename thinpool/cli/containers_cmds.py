"""Container commands: the containerd-style snapshotter's verbs (``thinpool snapshotter ...``) and
``thinpool demo``.

The snapshotter verbs are one group, ``thinpool snapshotter prepare|view|commit|remove|stat|update|list|
usage``, so "snapshot" and "commit" there always mean containerd's (a Snapshotter snapshot; committing
an active snapshot), never the pool's ``thinpool snapshot`` (dm-thin's create_snap) or ``thinpool
commit`` (the pool's metadata transaction).  The former top-level names (``prepare``, ``view``,
``commit-snapshot``, ``remove-snapshot``, ``stat-snapshot``, ``update-snapshot``, ``snapshots``,
``snapshot-usage``) remain for one release as hidden aliases (:data:`DEPRECATED_ALIASES`) that print a
one-line deprecation note on stderr and behave identically.

The verbs are ops (:mod:`thinpool.cli.registry`; op names are unchanged, e.g. ``commit-snapshot``), so they
also work on a pool that is being served.  Naming: snapshot keys and names live in a namespace
(``--namespace``, default ``default``); snapshot ``<id>`` of namespace ``<ns>`` is thin volume
``snap/<ns>/<id>``, which is how it appears in ``thinpool ls``.
"""

from __future__ import annotations

from typing import Any

import click

from thinpool.units import parse_size

DEFAULT_BASE_SIZE = parse_size("10GiB")  # thinpool.containers.snapshotter's default; imported lazily (numpy)

from .common import INT, SIZE, abspath, emit, json_option, pool_argument
from .registry import register_op, run_op

SECTION = "Container commands (containerd-style snapshots, Docker demo)"

_NAMING = ("Snapshot KEYs (active/view) and NAMEs (committed) share one key space per namespace "
           "(--namespace, default 'default').  Each snapshot is the thin volume snap/<namespace>/<id> "
           "(shown by `thinpool ls`); committing keeps the volume name and makes it read-only.")


# ============================================================================================== ops
def _snap(pool: Any, namespace: str, base_size: int = DEFAULT_BASE_SIZE) -> Any:
    # run_op / the serving process commit after a write op: records and devices in one transaction
    from thinpool.containers.snapshotter import Snapshotter
    return Snapshotter(pool, namespace, base_size=base_size, autocommit=False)


def _snapshot_dict(s: Any, key: str) -> dict[str, Any]:
    info = s.stat(key).as_dict()
    vol = s.volume(key)
    info.update(namespace=s.namespace, volume=vol.name, dev_id=vol.dev_id, size=vol.size,
                read_only=bool(vol.read_only))
    return info


def op_prepare(pool: Any, namespace: str, key: str, parent: str | None = None,
               labels: dict[str, str] | None = None, base_size: int = DEFAULT_BASE_SIZE) -> dict[str, Any]:
    """containerd Prepare: an active snapshot KEY of committed PARENT (or an empty volume)."""
    s = _snap(pool, namespace, base_size)
    mount = s.prepare(key, parent, labels)
    return {**_snapshot_dict(s, key), "mount": mount.as_dict()}


def op_view(pool: Any, namespace: str, key: str, parent: str | None = None,
            labels: dict[str, str] | None = None, base_size: int = DEFAULT_BASE_SIZE) -> dict[str, Any]:
    """containerd View: a read-only snapshot KEY of committed PARENT."""
    s = _snap(pool, namespace, base_size)
    mount = s.view(key, parent, labels)
    return {**_snapshot_dict(s, key), "mount": mount.as_dict()}


def op_commit_snapshot(pool: Any, namespace: str, name: str, key: str,
                       labels: dict[str, str] | None = None) -> dict[str, Any]:
    """containerd Commit (a snapshotter commit, not the pool's metadata commit): active KEY becomes
    committed NAME; the pool's metadata commit follows as for every write op."""
    s = _snap(pool, namespace)
    s.commit(name, key, labels)
    return _snapshot_dict(s, name)


def op_remove_snapshot(pool: Any, namespace: str, key: str) -> dict[str, Any]:
    """containerd Remove."""
    s = _snap(pool, namespace)
    volume = s.volume_name(key)
    s.remove(key)
    return {"namespace": namespace, "removed": key, "volume": volume}


def op_stat_snapshot(pool: Any, namespace: str, key: str) -> dict[str, Any]:
    """containerd Stat (plus the snapshot's volume)."""
    return _snapshot_dict(_snap(pool, namespace), key)


def op_update_snapshot(pool: Any, namespace: str, key: str, labels: dict[str, str],
                       fieldpaths: list[str] | None = None) -> dict[str, Any]:
    """containerd Update (labels only)."""
    from thinpool.containers.snapshotter import Info
    s = _snap(pool, namespace)
    s.update(Info(kind="", name=key, labels=labels), fieldpaths)
    return _snapshot_dict(s, key)


def op_snapshots(pool: Any, namespace: str, filters: list[str] | None = None) -> list[dict[str, Any]]:
    """containerd Walk with filters (OR of filters, AND within one)."""
    s = _snap(pool, namespace)
    return [_snapshot_dict(s, info.name) for info in s.walk(filters or None)]


def op_snapshot_usage(pool: Any, namespace: str, key: str) -> dict[str, Any]:
    """containerd Usage, block-level."""
    s = _snap(pool, namespace)
    return {"namespace": namespace, "key": key, "volume": s.volume_name(key), **s.usage(key).as_dict()}


def _shown(text: str) -> str:
    """``text`` as is when printable, else with its control characters escaped (a label holding a
    newline must not print as a second line that looks like another label)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _render_one(r: dict[str, Any]) -> str:
    labels = ", ".join(f"{_shown(k)}={_shown(v)}" for k, v in sorted(r["labels"].items())) or "-"
    return (f"{r['kind']:<9} {r['name']}  parent={r['parent'] or '-'}  volume={r['volume']} "
            f"(dev {r['dev_id']}, {'ro' if r['read_only'] else 'rw'})  labels: {labels}")


def _render_stat(r: dict[str, Any]) -> str:
    rows = [("Name", r["name"]), ("Kind", r["kind"]), ("Parent", r["parent"] or "-"),
            ("Namespace", r["namespace"]), ("Volume", f"{r['volume']} (dev id {r['dev_id']}, "
                                                      f"{'read-only' if r['read_only'] else 'writable'})"),
            ("Size", f"{r['size']} bytes"), ("Created", r["created"]), ("Updated", r["updated"])]
    rows += [("Label", f"{k}={v}") for k, v in sorted(r["labels"].items())]
    return "\n".join(f"{k + ':':<11} {v}" for k, v in rows)


def _render_list(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    table = [["KIND", "NAME", "PARENT", "VOLUME", "LABELS"]]
    table += [[r["kind"], r["name"], r["parent"] or "-", r["volume"],
               ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "-"] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def _render_usage(r: dict[str, Any]) -> str:
    return (f"{r['key']}: {r['size_bytes']} bytes owned ({r['owned_blocks']} blocks of {r['block_size']}); "
            f"mapped {r['mapped_blocks']}, exclusive {r['exclusive_blocks']}, shared {r['shared_blocks']}; "
            f"containerd devmapper's mapped growth: {r['mapped_growth_blocks']} blocks")


register_op("prepare", op_prepare, write=True, render=_render_one)
register_op("view", op_view, write=True, render=_render_one)
register_op("commit-snapshot", op_commit_snapshot, write=True, render=_render_one)
register_op("remove-snapshot", op_remove_snapshot, write=True,
            render=lambda r: f"removed {r['removed']} ({r['volume']})")
register_op("stat-snapshot", op_stat_snapshot, write=False, render=_render_stat)
register_op("update-snapshot", op_update_snapshot, write=True, render=_render_one)
register_op("snapshots", op_snapshots, write=False, render=_render_list)
register_op("snapshot-usage", op_snapshot_usage, write=False, render=_render_usage)


def _run(pool: str, name: str, kwargs: dict[str, Any], as_json: bool) -> None:
    from .registry import get_op
    emit(run_op(abspath(pool), name, kwargs), as_json, get_op(name).render)


# ============================================================================================== options
def _parse_labels(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{v!r} is not KEY=VALUE", ctx=ctx, param=param)
        labels[k] = val
    return labels


namespace_option = click.option("-n", "--namespace", default="default", show_default=True,
                                help="Snapshotter namespace (volumes are snap/<namespace>/<id>).")
label_option = click.option("-l", "--label", "labels", multiple=True, callback=_parse_labels, metavar="KEY=VALUE",
                            help="Label to set (repeatable).")


# ============================================================================================== commands
@click.command("prepare", epilog=_NAMING)
@pool_argument
@click.argument("key")
@click.option("-p", "--parent", default=None, help="Committed snapshot to start from (default: empty volume).")
@click.option("--size", "base_size", type=SIZE, default=DEFAULT_BASE_SIZE, show_default="10GiB",
              help="Virtual size of a snapshot without parent (children inherit their parent's size).")
@label_option
@namespace_option
@json_option
def prepare_cmd(pool: str, key: str, parent: str | None, base_size: int, labels: dict[str, str], namespace: str,
                as_json: bool) -> None:
    """Create an active (writable) snapshot KEY, a thin snapshot of committed PARENT.

    Errors: KEY exists (AlreadyExists); PARENT missing (NotFound) or not committed (InvalidArgument).

    \b
    Examples:
      thinpool snapshotter prepare /tmp/pool layer1-extract
      thinpool snapshotter commit /tmp/pool layer1 layer1-extract
      thinpool snapshotter prepare /tmp/pool ctr1 --parent layer1 --label app=web
    """
    _run(pool, "prepare", {"namespace": namespace, "key": key, "parent": parent, "labels": labels,
                           "base_size": base_size}, as_json)


@click.command("view", epilog=_NAMING)
@pool_argument
@click.argument("key")
@click.argument("parent")
@label_option
@namespace_option
@json_option
def view_cmd(pool: str, key: str, parent: str, labels: dict[str, str], namespace: str, as_json: bool) -> None:
    """Create a read-only view KEY of committed snapshot PARENT (it cannot be committed; remove it)."""
    _run(pool, "view", {"namespace": namespace, "key": key, "parent": parent, "labels": labels}, as_json)


@click.command("commit", epilog=_NAMING)
@pool_argument
@click.argument("name")
@click.argument("key")
@label_option
@namespace_option
@json_option
def commit_snapshot_cmd(pool: str, name: str, key: str, labels: dict[str, str], namespace: str,
                        as_json: bool) -> None:
    """Commit active snapshot KEY as NAME (KEY goes away; NAME is read-only and can be a parent).

    This is containerd's Commit of a snapshot; the pool's metadata commit is `thinpool commit`.

    The committed snapshot's labels are the --label options given here (containerd replaces, not inherits).
    Errors: NAME exists (AlreadyExists); KEY missing (NotFound) or not active (FailedPrecondition).
    """
    _run(pool, "commit-snapshot", {"namespace": namespace, "name": name, "key": key, "labels": labels}, as_json)


@click.command("remove", epilog=_NAMING)
@pool_argument
@click.argument("key")
@namespace_option
@json_option
def remove_snapshot_cmd(pool: str, key: str, namespace: str, as_json: bool) -> None:
    """Remove snapshot KEY (any kind) and its volume; fails (FailedPrecondition) while it has children."""
    _run(pool, "remove-snapshot", {"namespace": namespace, "key": key}, as_json)


@click.command("stat", epilog=_NAMING)
@pool_argument
@click.argument("key")
@namespace_option
@json_option
def stat_snapshot_cmd(pool: str, key: str, namespace: str, as_json: bool) -> None:
    """Show snapshot KEY: kind (view|active|committed), parent, labels, times and its volume."""
    _run(pool, "stat-snapshot", {"namespace": namespace, "key": key}, as_json)


@click.command("update", epilog=_NAMING)
@pool_argument
@click.argument("key")
@label_option
@click.option("--field", "fieldpaths", multiple=True, metavar="PATH",
              help="Field path to update: 'labels' or 'labels.<key>' (repeatable; default: replace all labels; "
                   "'labels.<key>' without a matching --label deletes that label).")
@namespace_option
@json_option
def update_snapshot_cmd(pool: str, key: str, labels: dict[str, str], fieldpaths: tuple[str, ...], namespace: str,
                        as_json: bool) -> None:
    """Update the labels of snapshot KEY (the only mutable field; other paths are InvalidArgument)."""
    _run(pool, "update-snapshot", {"namespace": namespace, "key": key, "labels": labels,
                                   "fieldpaths": list(fieldpaths)}, as_json)


@click.command("list", epilog=_NAMING)
@pool_argument
@click.option("-f", "--filter", "filters", multiple=True, metavar="FILTER",
              help="containerd filter; repeat for OR, comma for AND.")
@namespace_option
@json_option
def snapshots_cmd(pool: str, filters: tuple[str, ...], namespace: str, as_json: bool) -> None:
    """List snapshots (containerd Walk), optionally filtered.

    \b
    Filter syntax (a subset of containerd's):
      FIELD==VALUE, FIELD!=VALUE, FIELD~=REGEX, or a bare FIELD (present)
      fields: kind (view|active|committed), name, parent, labels.KEY (quote odd keys:
      labels."containerd.io/gc.root"); values bare or "double-quoted"
      a comma ANDs selectors; several --filter options are ORed
    \b
    Examples:
      thinpool snapshotter list /tmp/pool --filter kind==committed
      thinpool snapshotter list /tmp/pool --filter 'parent==layer1,labels.app==web' --filter name~=^tmp
    """
    _run(pool, "snapshots", {"namespace": namespace, "filters": list(filters)}, as_json)


@click.command("usage", epilog=_NAMING)
@pool_argument
@click.argument("key")
@namespace_option
@json_option
def snapshot_usage_cmd(pool: str, key: str, namespace: str, as_json: bool) -> None:
    """Block-level usage of snapshot KEY, excluding its parents.

    size = blocks it owns (mapped blocks whose data block differs from its parent's: new or
    copy-on-write broken) x block size.  Also shows mapped/exclusive/shared blocks and the "mapped
    growth" containerd's devmapper snapshotter would report (which misses overwrites of inherited blocks).
    """
    _run(pool, "snapshot-usage", {"namespace": namespace, "key": key}, as_json)


@click.command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Create the pool in this directory (must not exist or be empty; kept). "
                   "Default: a temporary directory, removed afterwards.")
@click.option("-b", "--block-size", type=SIZE, default="64KiB", show_default=True,
              help="Pool data block size (Docker: 64K loop-lvm, 512K direct-lvm).")
@click.option("--data-size", type=SIZE, default="100GiB", show_default=True,
              help="Pool data device size (a sparse file; Docker's loop-lvm default).  Less than the idealized "
                   "walkthrough maps (1,580 blocks at 64K, 205 at 512K) is refused at once.")
@click.option("--seed", type=INT, default=0, show_default=True, help="Seed of the pseudo-random file content.")
@click.option("--real-fs", "real_fs", is_flag=True,
              help="Root only: run it with ext4 on the thin devices (served over NBD, nbdfuse + loop devices, "
                   "mkfs.ext4, real files) and report what ext4 really wrote beside the idealized numbers.")
@click.option("--vs-overlay", "vs_overlay", is_flag=True,
              help="Root only: build a workload image with umoci (a ~50 MB SQLite database, a 100 MiB log and file, "
                   "...), import it onto the pool and into an overlay2-style store, and run `thinpool compare`'s "
                   "built-in workloads on both (docs/containers.md).")
@click.option("--small-image", "small_image", is_flag=True, hidden=True,
              help="With --vs-overlay: a small image (megabytes; for a quick look and the tests).")
@json_option
def demo_cmd(directory: str | None, block_size: int, data_size: int, seed: int, real_fs: bool, vs_overlay: bool,
             small_image: bool, as_json: bool) -> None:
    """Run Docker's "About storage drivers" walkthrough on a thin pool and show it Docker-style.

    Builds ubuntu (files of 103,000,000 / 745 / 2,780 / 7 bytes), acme/my-base-image:1.0 (COPY, 100 bytes)
    and acme/my-final-image:1.0 (CMD, no layer) over a 10 GiB base device; starts my_container_1..5
    (-init + writable snapshot each); writes 5 bytes into containers 1-3; changes 4 KiB in the middle of
    the 103 MB file in container 4.  Prints docker images / history / ps -s / info with block-level sizes
    measured from the pool beside Docker's file-level ones, and the block-level cost of the 4 KiB change
    beside the whole-file copy-up an overlay driver would do.

    \b
    Examples:
      thinpool demo
      thinpool demo --block-size 512K
      thinpool demo --json | jq '.image_blocks, .copy_up'
      thinpool demo --dir /tmp/demo-pool && thinpool ls /tmp/demo-pool
      sudo thinpool demo --real-fs        # ext4 on the thin devices: superblocks, journal, inodes included
      sudo thinpool demo --vs-overlay     # real workloads, thin pool vs overlayfs, side by side
    """
    if vs_overlay:
        from thinpool.containers.compare import render_compare, run_vs_overlay_demo
        from thinpool.containers.workloads import ISSUE_SIZES, SMALL_SIZES
        from .common import stderr_is_tty
        say = (lambda msg: click.echo(f"thinpool demo --vs-overlay: {msg}", err=True)) if stderr_is_tty() else None
        result = run_vs_overlay_demo(abspath(directory) if directory else None, block_size=block_size,
                                     data_size=data_size, sizes=SMALL_SIZES if small_image else ISSUE_SIZES,
                                     base_size="256MiB" if small_image else "10GiB", progress=say)
        emit(result, as_json, render_compare)
        return
    if real_fs:
        from thinpool.containers.realfs import render_realfs, run_realfs_demo
        from .common import stderr_is_tty
        say = (lambda msg: click.echo(f"thinpool demo --real-fs: {msg}", err=True)) if stderr_is_tty() else None
        from .registry import op_table
        result = run_realfs_demo(abspath(directory) if directory else None, block_size, data_size=data_size,
                                 seed=seed, progress=say, control_ops=op_table())
        emit(result, as_json, render_realfs)
        return
    from thinpool.containers.demo import compile_helper, render_demo, run_demo
    with compile_helper():  # a cold kernel cache: a second process compiles beside the demo
        result = run_demo(abspath(directory) if directory else None, block_size, data_size=data_size, seed=seed)
    emit(result, as_json, render_demo)


SNAPSHOTTER_COMMANDS: list[click.Command] = [prepare_cmd, view_cmd, commit_snapshot_cmd, remove_snapshot_cmd,
                                             stat_snapshot_cmd, update_snapshot_cmd, snapshots_cmd,
                                             snapshot_usage_cmd]


@click.group("snapshotter", commands=SNAPSHOTTER_COMMANDS, epilog=_NAMING,
             short_help="containerd snapshotter: prepare, commit, list, ...")
def snapshotter_group() -> None:
    """containerd-style snapshotter: prepare, view, commit, remove, stat, update, list, usage.

    Snapshots here are containerd's (each one a thin volume snap/<namespace>/<id>), and `commit` is
    containerd's Commit of an active snapshot; the pool's own `thinpool snapshot` (dm-thin's
    create_snap) and `thinpool commit` (the metadata transaction) are different commands.

    \b
    Examples:
      thinpool snapshotter prepare /tmp/pool layer1-extract
      thinpool snapshotter commit /tmp/pool layer1 layer1-extract
      thinpool snapshotter list /tmp/pool
    """


#: former top-level command name -> its ``thinpool snapshotter`` subcommand (hidden aliases, one release)
DEPRECATED_ALIASES: dict[str, str] = {
    "prepare": "prepare", "view": "view", "commit-snapshot": "commit", "remove-snapshot": "remove",
    "stat-snapshot": "stat", "update-snapshot": "update", "snapshots": "list", "snapshot-usage": "usage",
}


def _deprecated_alias(old: str, new: click.Command) -> click.Command:
    """A hidden top-level command ``old`` that notes its deprecation on stderr, then runs ``new``."""
    def callback(**kwargs: Any) -> Any:
        click.echo(f"thinpool: note: 'thinpool {old}' is deprecated and will be removed; "
                   f"use 'thinpool snapshotter {new.name}'", err=True)
        assert new.callback is not None, f"'thinpool snapshotter {new.name}' has a callback"
        return new.callback(**kwargs)
    return click.Command(old, params=list(new.params), callback=callback, hidden=True, help=new.help,
                         epilog=new.epilog, short_help=f"deprecated: thinpool snapshotter {new.name}")


COMMANDS: list[click.Command] = [demo_cmd, snapshotter_group] + [
    _deprecated_alias(old, snapshotter_group.commands[new]) for old, new in DEPRECATED_ALIASES.items()]
