"""Image and container commands: ``thinpool image import|ls|history|rm``, ``thinpool container
create|exec|rm`` and ``thinpool ps``.

A thin shell over :mod:`thinpool.containers.image_store` and :mod:`thinpool.containers.runtime`.  The
commands that mount a volume (``image import``, ``container create``, ``container exec``) need root
(mount, losetup, nbdfuse): without it they say so in one line.  They serve the pool over NBD from inside
the command, so they run only on a pool that is not being served (ops registered ``local_only``); the
reporting commands and the removals are ordinary ops and also work through a serving process.
"""

from __future__ import annotations

from typing import Any

import click

from thinpool.units import format_docker_size

from .common import SIZE, abspath, emit, json_option, pool_argument
from .registry import get_op, register_op, run_op

SECTION = "Images and containers (real filesystems on thin volumes; root)"


# ============================================================================================== ops
def op_image_import(pool: Any, archive: str, tag: str | None = None, fs: str = "ext4",
                    base_size: int = 10 << 30, ref: str | None = None) -> dict[str, Any]:
    """Import an image archive (OCI layout or docker-archive) onto the pool."""
    from thinpool.containers.image_store import import_image
    from .common import stderr_is_tty
    say = (lambda msg: click.echo(msg, err=True)) if stderr_is_tty() else None
    return import_image(pool, archive, tag=tag, fs=fs, base_size=base_size, ref=ref, progress=say).as_dict()


def op_image_ls(pool: Any) -> list[dict[str, Any]]:
    """Every stored image."""
    from thinpool.containers.image_store import list_images
    return [r.as_dict() for r in list_images(pool)]


def op_image_history(pool: Any, image_ref: str) -> list[dict[str, Any]]:
    """docker history, measured on the pool."""
    from thinpool.containers.image_store import image_history
    return image_history(pool, image_ref)


def op_image_rm(pool: Any, image_ref: str) -> dict[str, Any]:
    """docker rmi."""
    from thinpool.containers.image_store import remove_image
    return remove_image(pool, image_ref)


def op_container_create(pool: Any, image_ref: str, name: str) -> dict[str, Any]:
    """docker create: -init device and the writable snapshot."""
    from thinpool.containers.runtime import create_container
    return create_container(pool, image_ref, name)


def op_container_rm(pool: Any, name: str) -> dict[str, Any]:
    """docker rm."""
    from thinpool.containers.runtime import remove_container
    return remove_container(pool, name)


def op_container_exec(pool: Any, name: str, argv: list[str], chroot: bool = False,
                      record: str | None = None) -> dict[str, Any]:
    """Mount the container and run a command there; returns its exit status."""
    from thinpool.containers.runtime import exec_in_container
    return {"name": name, "exit_status": exec_in_container(pool, name, argv, chroot=chroot, record=record)}


def op_ps(pool: Any, sizes: bool = False) -> list[dict[str, Any]]:
    """docker ps -a [-s]."""
    from thinpool.containers.runtime import list_containers
    return list_containers(pool, sizes=sizes)


def _table(header: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> str:
    if not rows:
        return "  ".join(header)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return "\n".join("   ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                                enumerate(zip(row, widths))).rstrip() for row in [header] + rows)


def _split_tag(tag: str) -> tuple[str, str]:
    head, sep, tail = tag.rpartition(":")
    return (head, tail) if sep and "/" not in tail else (tag, "<none>")


def _render_ls(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        bs = r["block_size"]
        blocks = sum(layer["owned_blocks"] for layer in r["layers"])
        for tag in r["tags"] or ["<none>:<none>"]:
            repo, t = _split_tag(tag)
            out.append([repo, t, r["id"].split(":", 1)[1][:12], str(len(r["layers"])),
                        format_docker_size(r["file_bytes"]), f"{format_docker_size(blocks * bs)} ({blocks:,} blk)"])
    return _table(["REPOSITORY", "TAG", "IMAGE ID", "LAYERS", "SIZE (files)", "SIZE (thin blocks)"], out,
                  right=frozenset({3, 4, 5}))


def _render_import(r: dict[str, Any]) -> str:
    blocks = sum(layer["owned_blocks"] for layer in r["layers"])
    what = "imported" if r["new"] else "already stored (nothing written)"
    return (f"{', '.join(r['tags']) or r['id']}: {what}; {len(r['layers'])} layers, "
            f"{format_docker_size(r['file_bytes'])} of files, {blocks:,} blocks of {r['block_size']:,} B "
            f"on the pool\nimage ID {r['id']}")


def _render_history(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        cb = " ".join(r["created_by"].split())
        cb = cb[:52] + "..." if len(cb) > 55 else cb
        out.append([r["volume"] or "<missing>", cb, format_docker_size(r["file_bytes"]), f"{r['owned_blocks']:,}",
                    format_docker_size(r["block_bytes"]), f"{r['mapped_blocks']:,}", f"{r['exclusive_blocks']:,}",
                    f"{r['shared_blocks']:,}"])
    return _table(["VOLUME", "CREATED BY", "SIZE (files)", "OWNED blk", "SIZE (blocks)", "MAPPED", "EXCLUSIVE",
                   "SHARED"], out, right=frozenset({2, 3, 4, 5, 6, 7}))


def _render_ps(rows: list[dict[str, Any]]) -> str:
    sizes = bool(rows) and "size_bytes" in rows[0]
    out = []
    for r in rows:
        row = [r["name"], r["image"], r["volume"], r["created"]]
        if sizes:
            row.append(f"{format_docker_size(r['size_bytes'])} (virtual {format_docker_size(r['virtual_size_bytes'])})")
        out.append(row)
    return _table(["NAMES", "IMAGE", "VOLUME", "CREATED"] + (["SIZE"] if sizes else []), out)


register_op("image-import", op_image_import, write=True, render=_render_import, local_only=True)
register_op("image-ls", op_image_ls, write=False, render=_render_ls)
register_op("image-history", op_image_history, write=False, render=_render_history)
register_op("image-rm", op_image_rm, write=True,
            render=lambda r: "\n".join([f"Untagged: {t}" for t in r["untagged"]]
                                       + ([f"Deleted: {r['deleted']}"] if r["deleted"] else [])
                                       + [f"Deleted layer: {c}" for c in r["layers_removed"]]))
register_op("container-create", op_container_create, write=True, render=lambda r: r["name"], local_only=True)
register_op("container-rm", op_container_rm, write=True, render=lambda r: r["removed"])
register_op("container-exec", op_container_exec, write=True, render=None, local_only=True)
register_op("ps", op_ps, write=False, render=_render_ps)


def _run(pool: str, name: str, kwargs: dict[str, Any], as_json: bool) -> Any:
    result = run_op(abspath(pool), name, kwargs)
    emit(result, as_json, get_op(name).render)
    return result


def _need_root(what: str) -> None:
    from thinpool.containers.volmount import require_mounts
    require_mounts(what)


# ============================================================================================== commands
@click.group("image", short_help="Import real images onto thin volumes: import, ls, history, rm.")
def image_group() -> None:
    """Images stored as Docker's devicemapper driver stored them: a base thin device with a fresh
    filesystem, then one committed snapshot per layer (keyed by its chain ID), each layer applied
    through the mounted filesystem.  Layers shared between images are stored once.

    \b
    Examples:
      thinpool image import /tmp/pool ./alpine-oci.tar --tag alpine:3
      thinpool image history /tmp/pool alpine:3
      thinpool container create /tmp/pool alpine:3 web1
      thinpool container exec /tmp/pool web1 -- du -sh .
      thinpool ps -s /tmp/pool
    """


@image_group.command("import")
@pool_argument
@click.argument("archive", type=click.Path(exists=True, path_type=str))
@click.option("--tag", default=None, metavar="REPO:TAG", help="Name to give the image (default: the archive's).")
@click.option("--ref", default=None, metavar="NAME", help="Which image of the archive, when it holds several.")
@click.option("--fs", default="ext4", show_default=True, type=click.Choice(["ext4"]),
              help="Filesystem of the base device (when the pool has none yet).")
@click.option("--base-size", type=SIZE, default="10G", show_default=True,
              help="Size of the base thin device (Docker's dm.basesize).")
@json_option
def image_import_cmd(pool: str, archive: str, tag: str | None, ref: str | None, fs: str, base_size: int,
                     as_json: bool) -> None:
    """Import ARCHIVE (an OCI image layout, directory or tar, or a `docker save` tarball) onto POOL.

    Every blob's digest is verified; any failure leaves nothing in the pool.  Needs root (it mounts).
    """
    _need_root("thinpool image import")
    _run(pool, "image-import", {"archive": abspath(archive), "tag": tag, "fs": fs, "base_size": base_size,
                                "ref": ref}, as_json)


@image_group.command("ls")
@pool_argument
@json_option
def image_ls_cmd(pool: str, as_json: bool) -> None:
    """List the images stored in POOL: file-level size and the blocks their layers own on the pool."""
    _run(pool, "image-ls", {}, as_json)


@image_group.command("history")
@pool_argument
@click.argument("image_ref", metavar="IMAGE")
@json_option
def image_history_cmd(pool: str, image_ref: str, as_json: bool) -> None:
    """Per layer of IMAGE (top first): its file-level size from the archive, the blocks it really added
    on the pool (owned: mappings not shared with its parent) and their bytes, and its volume's
    mapped/exclusive/shared blocks as `thinpool ls --usage` shows them."""
    _run(pool, "image-history", {"image_ref": image_ref}, as_json)


@image_group.command("rm")
@pool_argument
@click.argument("image_ref", metavar="IMAGE")
@json_option
def image_rm_cmd(pool: str, image_ref: str, as_json: bool) -> None:
    """Remove IMAGE (a tag of several only untags); its layers no other image uses go with it."""
    _run(pool, "image-rm", {"image_ref": image_ref}, as_json)


@click.group("container", short_help="Containers of imported images: create, exec, rm.")
def container_group() -> None:
    """Containers as Docker's devicemapper driver made them: a NAME-init snapshot of the image's top
    layer holding Docker's init files, and the container's writable snapshot of it."""


@container_group.command("create")
@pool_argument
@click.argument("image_ref", metavar="IMAGE")
@click.argument("name")
@json_option
def container_create_cmd(pool: str, image_ref: str, name: str, as_json: bool) -> None:
    """Create container NAME of IMAGE (needs root: it mounts to write the init files)."""
    _need_root("thinpool container create")
    _run(pool, "container-create", {"image_ref": image_ref, "name": name}, as_json)


@container_group.command("exec", context_settings={"ignore_unknown_options": True})
@pool_argument
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, metavar="-- CMD...")
@click.option("--chroot", is_flag=True, help="Run CMD chrooted in the container (the image has it).")
@click.option("--record", default=None, metavar="FILE",
              help="Write the container's block I/O as a fio iolog v3 (as `serve --record`).")
@click.pass_context
def container_exec_cmd(ctx: click.Context, pool: str, name: str, argv: tuple[str, ...], chroot: bool,
                       record: str | None) -> None:
    """Mount container NAME and run CMD with ROOT set to its root directory (also the working
    directory); exits with CMD's status.  Needs root."""
    _need_root("thinpool container exec")
    result = run_op(abspath(pool), "container-exec", {"name": name, "argv": list(argv), "chroot": chroot,
                                                      "record": abspath(record) if record else None})
    ctx.exit(int(result["exit_status"]))


@container_group.command("rm")
@pool_argument
@click.argument("name")
@json_option
def container_rm_cmd(pool: str, name: str, as_json: bool) -> None:
    """Remove container NAME (its writable snapshot and its -init)."""
    _run(pool, "container-rm", {"name": name}, as_json)


@click.command("ps")
@click.option("-s", "--size", "sizes", is_flag=True, help="Show sizes: block-level SIZE (virtual SIZE).")
@pool_argument
@json_option
def ps_cmd(sizes: bool, pool: str, as_json: bool) -> None:
    """List containers, as `docker ps -a [-s]`: with -s, SIZE is the blocks the container's volume owns
    (not shared with its -init layer) x block size, and virtual is every block its volume maps."""
    _run(pool, "ps", {"sizes": sizes}, as_json)


COMMANDS: list[click.Command] = [image_group, container_group, ps_cmd]

__all__ = ["COMMANDS", "SECTION"]
