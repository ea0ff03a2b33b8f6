"""Containers of imported images on a thin pool, as Docker's ``devicemapper`` driver made them (root only
for what mounts).

:func:`create_container` makes Docker's two devices for a container of an image stored by
:mod:`thinpool.containers.image_store`: ``<name>-init``, a snapshot of the image's top layer given Docker's
init files and directories (``/.dockerenv``, ``/etc/hosts``, ``/dev/pts``, the ``/etc/mtab`` symlink ...;
:data:`~thinpool.containers.realfs.INIT_FILES`) and committed, then ``<name>``, the container's writable
snapshot of it.  Both are snapshots in the image store's snapshotter namespace (keys ``ctr/<name>-init``
and ``ctr/<name>``); the container records (image ID and the reference it was created from) live in the
pool's metadata (records ``containers``), committed with the devices.

:func:`mounted_container` mounts the writable volume (NBD from a background thread, ``nbdfuse`` + loop
device) and yields the container's root directory, ``<mount>/rootfs``; ``record=FILE`` logs every block
request the container's filesystem sends as a fio iolog v3, as ``thinpool serve --record`` does.
:func:`exec_in_container` runs a command there (``ROOT`` = that directory, also the working directory;
``chroot=True`` runs it chrooted, for images that carry their own programs).

Sizes (:func:`list_containers`, ``thinpool ps -s``) are block-level and measured from the pool: a
container's ``size_bytes`` is the blocks its writable volume owns (mappings not shared identically with
``-init``) times the block size; ``virtual_size_bytes`` is every block the container's volume maps (its
own, the init layer's, the image's and the base's) times the block size.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
from typing import Any, Iterator, Sequence

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .image_store import (CONTAINER_RECORDS, RECORDS, ROOTFS, load_records, opened_pool, recover, resolve,
                          snapshotter)

#: Docker's container name rule
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}\Z")
#: most arguments / bytes of a command given to :func:`exec_in_container`
MAX_ARGS, MAX_ARG_BYTES = 4096, 1 << 20


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(f"bad container name {str(name)[:100]!r}: [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128")
    return name


def _records(pool: Any) -> dict[str, Any]:
    recs = pool.get_records(CONTAINER_RECORDS)
    recs.setdefault("containers", {})
    return recs


def _container(pool: Any, name: str) -> dict[str, Any]:
    rec = _records(pool)["containers"].get(_check_name(name))
    if rec is None:
        raise NotFound(f"no container {name!r} in pool {pool.path} (thinpool ps POOL lists them)")
    return rec


def create_container(pool_path: Any, image_ref: str, name: str) -> dict[str, Any]:
    """``docker create``: Docker's ``<name>-init`` device (init files, committed) and the container's
    writable snapshot of it, from image ``image_ref``.  AlreadyExists for a name in use; NotFound for an
    unknown image; FailedPrecondition without root (it mounts to write the init files).  Returns the
    container's row (as :func:`list_containers`).  On failure nothing is left."""
    from .volmount import require_mounts
    _check_name(name)
    require_mounts("thinpool container create")
    with opened_pool(pool_path, write=True) as pool:
        recover(pool)
        crecs = _records(pool)
        if name in crecs["containers"]:
            raise AlreadyExists(f"container {name!r} already exists in pool {pool.path}")
        irecs = load_records(pool)
        image_id = resolve(irecs, image_ref)
        top = irecs["images"][image_id]["chain_ids"][-1] if irecs["images"][image_id]["chain_ids"] else "base"
        s = snapshotter(pool)
        init_key, key = f"ctr/{name}-init", f"ctr/{name}"
        existing = {i.name for i in s.walk()}
        for k in (init_key, key, "extract/" + init_key):
            if k in existing:
                raise AlreadyExists(f"snapshot {k!r} exists without a container record; "
                                    f"`thinpool snapshotter remove POOL {k} --namespace images` removes it")
        before = pool.get_records(RECORDS)
        irecs = load_records(pool)
        irecs["pending"] = {"keys": ["extract/" + init_key, init_key, key], "container": name}
        pool.put_records(RECORDS, irecs)
        from .volmount import PoolMounts
        mounts = None
        try:
            from ..nbd.served import warm_up
            warm_up(pool)
            labels = {"thinpool.container": name}
            mount = s.prepare("extract/" + init_key, top, labels)
            mounts = PoolMounts(pool)
            a = mounts.mount(mount.source)
            _populate_init(os.path.join(a.mountpoint or "", ROOTFS))
            a.syncfs()
            mounts.detach(a)
            mounts.check(f"container {name}: the -init layer")
            mounts.close()
            mounts = None
            s.commit(init_key, "extract/" + init_key, labels)
            s.prepare(key, init_key, labels)
            crecs["containers"][name] = {"name": name, "image": image_id, "image_ref": image_ref, "key": key,
                                         "init": init_key, "created": _now()}
            pool.put_records(CONTAINER_RECORDS, crecs)
            del irecs["pending"]
            pool.put_records(RECORDS, irecs)
            pool.commit()
        except BaseException:
            if mounts is not None:
                mounts.close()
            existing = {i.name for i in s.walk()}
            for k in (key, init_key, "extract/" + init_key):
                if k in existing:
                    s.remove(k)
            pool.put_records(RECORDS, before)
            pool.commit()
            raise
        return _row(pool, s, crecs["containers"][name], irecs, sizes=True)


def _now() -> str:
    from datetime import datetime, timezone
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _populate_init(root: str) -> None:
    """Docker's ``-init`` layer: empty files, directories and the /etc/mtab symlink (inside ``root`` only:
    every path is made relative and created without following symlinks an image may have planted)."""
    from .oci_apply import _Tree
    from .realfs import INIT_DIRS, INIT_FILES, INIT_LINKS
    tree = _Tree(root)
    try:
        def parent(path: str) -> tuple[int, str]:
            pfd, leaf = tree.parent(path.strip("/"), True, f"init path {path}")
            assert pfd is not None
            return pfd, leaf

        for d in INIT_DIRS:
            pfd, leaf = parent(d)
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(leaf, 0o755, dir_fd=pfd)
            finally:
                os.close(pfd)
        for f in INIT_FILES:
            pfd, leaf = parent(f)
            try:
                st = tree.lstat(pfd, leaf)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    os.unlink(leaf, dir_fd=pfd)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                                     dir_fd=pfd))
            finally:
                os.close(pfd)
        for link, target in INIT_LINKS:
            pfd, leaf = parent(link)
            try:
                with contextlib.suppress(FileExistsError):
                    os.symlink(target, leaf, dir_fd=pfd)
            finally:
                os.close(pfd)
    finally:
        tree.close()


def remove_container(pool_path: Any, name: str) -> dict[str, Any]:
    """``docker rm``: the container's writable snapshot and its ``-init`` go, with the record."""
    with opened_pool(pool_path, write=True) as pool:
        recover(pool)
        rec = _container(pool, name)
        s = snapshotter(pool)
        crecs = _records(pool)
        with pool.batch():
            existing = {i.name for i in s.walk()}
            for k in (rec["key"], rec["init"]):
                if k in existing:
                    s.remove(k)
            del crecs["containers"][name]
            pool.put_records(CONTAINER_RECORDS, crecs)
        return {"removed": name, "image": rec["image"]}


def _row(pool: Any, s: Any, rec: dict[str, Any], irecs: dict[str, Any], sizes: bool) -> dict[str, Any]:
    img = irecs["images"].get(rec["image"], {})
    tags = img.get("tags") or []
    row: dict[str, Any] = {"name": rec["name"], "image": tags[0] if tags else rec["image"][:19],
                           "image_id": rec["image"], "image_ref": rec.get("image_ref", ""),
                           "created": rec.get("created", ""), "volume": s.volume_name(rec["key"]),
                           "init_volume": s.volume_name(rec["init"])}
    if sizes:
        bs = pool.block_size
        u, ui = s.usage(rec["key"]), s.usage(rec["init"])
        row.update(block_size=bs, owned_blocks=u.owned_blocks, size_bytes=u.owned_blocks * bs,
                   init_owned_blocks=ui.owned_blocks, mapped_blocks=u.mapped_blocks,
                   exclusive_blocks=u.exclusive_blocks, shared_blocks=u.shared_blocks,
                   virtual_size_bytes=u.mapped_blocks * bs)
    return row


def list_containers(pool_path: Any, *, sizes: bool = True) -> list[dict[str, Any]]:
    """``docker ps -a [-s]`` rows, by name: ``name``, ``image`` (its first tag, else the short ID),
    ``image_id``, ``created``, ``volume``; with ``sizes`` also ``size_bytes`` (owned blocks x block size),
    ``virtual_size_bytes`` (mapped blocks x block size), ``owned_blocks``, ``init_owned_blocks``,
    ``mapped_blocks``, ``exclusive_blocks``, ``shared_blocks``, ``block_size``."""
    with opened_pool(pool_path, write=False) as pool:
        s = snapshotter(pool)
        irecs = load_records(pool)
        return [_row(pool, s, rec, irecs, sizes) for _, rec in sorted(_records(pool)["containers"].items())]


@contextlib.contextmanager
def mounted_container(pool_path: Any, name: str, *, record: str | None = None) -> Iterator[str]:
    """Mount container ``name`` ("start" it) and yield its root directory (``<mount>/rootfs``).  Leaving
    the block unmounts it (the filesystem's flush commits the pool).  ``record``: write the container's
    NBD requests as a fio iolog v3 (as ``thinpool serve --record``).  Writes that find the pool out of data
    space fail at once (they do not wait for space); if the pool failed any block request, leaving the block
    raises FailedPrecondition saying so (after unmounting)."""
    from .volmount import PoolMounts, require_mounts
    _check_name(name)
    require_mounts("thinpool container exec")
    with opened_pool(pool_path, write=True) as pool:
        rec = _container(pool, name)
        volume = snapshotter(pool).volume_name(rec["key"])
        from ..nbd.served import warm_up
        warm_up(pool)
        with PoolMounts(pool, record=record) as mounts:
            a = mounts.mount(volume)
            try:
                yield os.path.join(a.mountpoint or "", ROOTFS)
            finally:
                mounts.detach(a)
            mounts.check(f"container {name}")
        pool.commit()


def exec_in_container(pool_path: Any, name: str, argv: Sequence[str], *, chroot: bool = False,
                      record: str | None = None) -> int:
    """``docker exec``-like: mount container ``name`` and run ``argv`` with ``ROOT`` set to its root
    directory, which is also the working directory (``chroot``: run it chrooted there, for an image
    that has the program).  Returns the command's exit status; stdin/stdout/stderr are inherited."""
    argv = list(argv)
    if not argv or len(argv) > MAX_ARGS or not all(isinstance(a, str) for a in argv) \
            or sum(len(a) for a in argv) > MAX_ARG_BYTES or any("\0" in a for a in argv):
        raise InvalidArgument("exec needs a command: a list of 1 to 4096 strings without NUL")
    with mounted_container(pool_path, name, record=record) as root:
        env = dict(os.environ, ROOT=root)
        cmd = ["chroot", root, *argv] if chroot else argv
        try:
            return subprocess.run(cmd, cwd=root, env=env).returncode
        except OSError as e:
            raise FailedPrecondition(f"cannot run {argv[0]!r}: {e.strerror}") from None


__all__ = ["create_container", "remove_container", "list_containers", "mounted_container", "exec_in_container"]
