"""Applying a layer's changes to a directory tree, never writing outside it.

:func:`apply_layer` takes the entries of one layer (:meth:`thinpool.containers.oci.Image.layer_entries`, or
:func:`thinpool.containers.oci_tar.iter_tar_entries` over any layer tar)
and applies them to ``root_dir``:

* every path is resolved component by component from a file descriptor of the root, with
  ``O_NOFOLLOW`` at each step (``openat``); a symlink met on the way is resolved *inside* the root, as if the
  root were ``/`` (what Docker's chrooted extraction does): an absolute target restarts at the root and
  ``..`` stops at it.  So a tar-slip -- ``a -> /etc`` then ``a/passwd`` -- writes ``ROOT/etc/passwd``,
  never ``/etc/passwd``; the last component of a path is never followed (it is replaced);
* hard links are made with ``linkat`` to a target resolved the same way, which must exist and not be a
  directory;
* ``whiteouts="apply"`` (a filesystem holding the whole image, e.g. a thin snapshot of the parent layer):
  ``.wh.NAME`` deletes NAME, ``.wh..wh..opq`` empties the directory -- of what lower layers put there only:
  what this layer itself adds stays, whatever the order of the members (OCI image spec, "Whiteouts");
* ``whiteouts="overlay"`` (a directory per layer, as Docker's overlay2 keeps them): a whiteout becomes a
  character device 0/0 named NAME, an opaque directory gets the xattr ``trusted.overlay.opaque=y``;
* modes, mtimes, symlinks, FIFOs as given; ownership, device nodes, setuid/setgid bits and non-``user.``
  xattrs only when ``privileged`` (default: running as root).  Unprivileged, device nodes and
  setuid/setgid files are refused with an error, ownership and other xattrs are skipped (counted in the
  returned :class:`ApplyStats`).

Directory modes and mtimes are set at the end (deepest first), so a read-only directory can still be
filled and its mtime is not disturbed by its children.  Every failure is an
:class:`~thinpool.errors.ImageError` naming the member.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from thinpool.containers.oci_tar import (BLOCK, CHAR, CHUNK, DIR, FIFO, FILE, HARDLINK, OPAQUE_DIR, SYMLINK,
                                     WHITEOUT, Entry)
from thinpool.errors import ImageError

#: most symlinks followed while resolving one path (Linux's MAXSYMLINKS)
MAX_SYMLINKS = 40
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class ApplyStats:
    """What :func:`apply_layer` did.  ``file_bytes`` is the sum of the regular files' sizes (Docker's
    ``DiffSize`` of a layer: the tar headers' sizes)."""

    entries: int = 0
    files: int = 0
    file_bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    fifos: int = 0
    whiteouts: int = 0
    opaques: int = 0
    skipped_ownership: int = 0
    skipped_xattrs: int = 0


class _Tree:
    """Path resolution and removal inside one root directory, by file descriptors."""

    def __init__(self, root_dir: str) -> None:
        try:
            self.fd = os.open(root_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageError(f"{root_dir}: cannot open the target directory: {e.strerror}") from None
        self.root_dir = root_dir

    def close(self) -> None:
        os.close(self.fd)

    def open_dir(self, path: str, create: bool, what: str) -> int | None:
        """A new fd of directory ``path`` resolved inside the root (missing directories made with mode
        0755 when ``create``, else None is returned when one is missing)."""
        stack = [os.dup(self.fd)]
        todo = list(reversed(path.split("/")))
        hops = 0
        try:
            while todo:
                c = todo.pop()
                if c in ("", "."):
                    continue
                if c == "..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    continue
                cur = stack[-1]
                try:
                    stack.append(os.open(c, _DIR_FLAGS, dir_fd=cur))
                    continue
                except FileNotFoundError:
                    if not create:
                        return None
                    os.mkdir(c, 0o755, dir_fd=cur)
                    stack.append(os.open(c, _DIR_FLAGS, dir_fd=cur))
                    continue
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                st = os.stat(c, dir_fd=cur, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise ImageError(f"{what}: {c!r} in {path!r} is not a directory")
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise ImageError(f"{what}: more than {MAX_SYMLINKS} symlinks resolving {path!r}")
                target = os.readlink(c, dir_fd=cur)
                if target.startswith("/"):       # absolute: from the root, never the host's /
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo.extend(reversed(target.split("/")))
            return stack.pop()
        finally:
            for fd in stack:
                os.close(fd)

    def parent(self, path: str, create: bool, what: str) -> tuple[int | None, str]:
        head, _, leaf = path.rpartition("/")
        return self.open_dir(head, create, what), leaf

    @staticmethod
    def lstat(pfd: int, leaf: str) -> os.stat_result | None:
        try:
            return os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @staticmethod
    def remove(pfd: int, leaf: str) -> None:
        st = _Tree.lstat(pfd, leaf)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(leaf, dir_fd=pfd)     # fd-based: never follows symlinks inside
        else:
            os.unlink(leaf, dir_fd=pfd)


def _set_xattrs(target: int | str, entry: Entry, privileged: bool, stats: ApplyStats, what: str,
                follow: bool = True) -> None:
    for name, value in entry.xattrs.items():
        if not privileged and not name.startswith("user."):
            stats.skipped_xattrs += 1
            continue
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as e:
            if entry.kind == SYMLINK and name.startswith("user.") and e.errno == errno.EPERM:
                stats.skipped_xattrs += 1        # Linux allows no user.* xattrs on symlinks
                continue
            raise ImageError(f"{what}: cannot set xattr {name!r}: {e.strerror}") from None


def apply_layer(layer_entries: Iterable[Entry], root_dir: str, *, whiteouts: str = "apply",
                privileged: bool | None = None, opaque_xattr: str = OVERLAY_OPAQUE_XATTR) -> ApplyStats:
    """Apply one layer's entries to ``root_dir`` (see the module docstring) and return what was done.

    ``whiteouts``: ``"apply"`` deletes what whiteouts name, ``"overlay"`` stores them as overlayfs does
    (0/0 character devices, ``opaque_xattr`` = ``y``).  ``privileged`` defaults to ``os.geteuid() == 0``."""
    if whiteouts not in ("apply", "overlay"):
        raise ImageError(f"whiteouts must be 'apply' or 'overlay', not {whiteouts!r}")
    if privileged is None:
        privileged = os.geteuid() == 0
    tree = _Tree(os.fspath(root_dir))
    stats = ApplyStats()
    created: set[str] = set()        # paths this layer wrote (whiteouts never remove them)
    ancestors: set[str] = set()      # directories holding something this layer wrote
    dir_meta: dict[str, tuple[int, float, str]] = {}
    try:
        for entry in layer_entries:
            stats.entries += 1
            what = f"member {entry.member!r}"
            try:
                _apply_one(tree, entry, whiteouts, privileged, opaque_xattr, stats, created, ancestors,
                           dir_meta, what)
            except ImageError as e:
                raise ImageError(f"{root_dir}: {e}") from None
            except OSError as e:
                raise ImageError(f"{root_dir}: {what}: {e.strerror or e}") from None
            if entry.kind not in (WHITEOUT, OPAQUE_DIR) or whiteouts == "overlay":
                created.add(entry.path)
                head = entry.path
                while head:
                    head = head.rpartition("/")[0]
                    if head in ancestors:
                        break
                    ancestors.add(head)
        for path in sorted(dir_meta, key=lambda p: (-p.count("/") - (p != ""), p)):
            mode, mtime, what = dir_meta[path]
            if path == "":
                fd = os.dup(tree.fd)
            else:                    # the directory itself, not what a later member may have put there
                pfd, leaf = tree.parent(path, False, what)
                if pfd is None:
                    continue
                try:
                    fd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
                except OSError:      # replaced or removed by a later member
                    continue
                finally:
                    os.close(pfd)
            try:
                os.chmod(fd, mode)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
    finally:
        tree.close()
    return stats


def _apply_one(tree: _Tree, entry: Entry, whiteouts: str, privileged: bool, opaque_xattr: str,
               stats: ApplyStats, created: set[str], ancestors: set[str],
               dir_meta: dict[str, tuple[int, float, str]], what: str) -> None:
    kind = entry.kind
    if entry.privileged and not privileged:
        which = "device node" if kind in (CHAR, BLOCK) else f"setuid/setgid mode {entry.mode:o}"
        raise ImageError(f"{what}: {which} refused when not running as root")
    if kind == OPAQUE_DIR:
        stats.opaques += 1
        fd = tree.open_dir(entry.path, True, what)
        assert fd is not None
        try:
            if whiteouts == "overlay":
                os.setxattr(fd, opaque_xattr, b"y")
                return
            for name in os.listdir(fd):
                _prune(tree, fd, name, f"{entry.path}/{name}" if entry.path else name, created, ancestors)
        finally:
            os.close(fd)
        return
    if kind == DIR and entry.path == "":
        _dir_metadata(tree.fd, entry, privileged, stats, what)
        dir_meta[""] = (entry.mode, entry.mtime, what)
        return
    pfd, leaf = tree.parent(entry.path, kind != WHITEOUT or whiteouts == "overlay", what)
    if pfd is None:                  # a whiteout under a directory that does not exist: nothing to hide
        stats.whiteouts += 1
        return
    try:
        if kind == WHITEOUT:
            stats.whiteouts += 1
            if whiteouts == "apply":
                _prune(tree, pfd, leaf, entry.path, created, ancestors)
            else:
                tree.remove(pfd, leaf)
                os.mknod(leaf, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
                _lchown(pfd, leaf, entry, privileged, stats)
            return
        existing = tree.lstat(pfd, leaf)
        if kind == DIR:
            stats.dirs += 1
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                tree.remove(pfd, leaf)
                existing = None
            if existing is None:
                os.mkdir(leaf, 0o700, dir_fd=pfd)
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
            try:
                _dir_metadata(fd, entry, privileged, stats, what)
            finally:
                os.close(fd)
            dir_meta[entry.path] = (entry.mode, entry.mtime, what)
            return
        if kind == HARDLINK:
            tpfd, tleaf = tree.parent(entry.linkname, False, what)
            tst = tree.lstat(tpfd, tleaf) if tpfd is not None else None
            try:
                if tst is None or stat.S_ISDIR(tst.st_mode):
                    raise ImageError(f"{what}: hard link target {entry.linkname!r} is missing or a directory")
                if existing is not None and (existing.st_dev, existing.st_ino) == (tst.st_dev, tst.st_ino):
                    stats.hardlinks += 1
                    return
                if existing is not None:
                    tree.remove(pfd, leaf)
                os.link(tleaf, leaf, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                if tpfd is not None:
                    os.close(tpfd)
            stats.hardlinks += 1
            return
        if existing is not None:
            tree.remove(pfd, leaf)
        if kind == FILE:
            _write_file(pfd, leaf, entry, privileged, stats, what)
            return
        if kind == SYMLINK:
            stats.symlinks += 1
            os.symlink(entry.linkname, leaf, dir_fd=pfd)
            _lchown(pfd, leaf, entry, privileged, stats)
            _set_xattrs(f"/proc/self/fd/{pfd}/{leaf}", entry, privileged, stats, what, follow=False)
            os.utime(leaf, (entry.mtime, entry.mtime), dir_fd=pfd, follow_symlinks=False)
            return
        if kind in (CHAR, BLOCK, FIFO):
            if kind == FIFO:
                stats.fifos += 1
                os.mkfifo(leaf, 0o600, dir_fd=pfd)
            else:
                stats.devices += 1
                fmt = stat.S_IFCHR if kind == CHAR else stat.S_IFBLK
                os.mknod(leaf, fmt | 0o600, os.makedev(entry.devmajor, entry.devminor), dir_fd=pfd)
            _lchown(pfd, leaf, entry, privileged, stats)
            path = f"/proc/self/fd/{pfd}/{leaf}"      # a node we just made: chmod may follow it
            os.chmod(path, entry.mode)
            _set_xattrs(path, entry, privileged, stats, what, follow=False)
            os.utime(leaf, (entry.mtime, entry.mtime), dir_fd=pfd, follow_symlinks=False)
            return
        raise ImageError(f"{what}: unknown entry kind {kind!r}")
    finally:
        os.close(pfd)


def _lchown(pfd: int, leaf: str, entry: Entry, privileged: bool, stats: ApplyStats) -> None:
    if privileged:
        os.chown(leaf, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
    elif (entry.uid, entry.gid) != (os.geteuid(), os.getegid()):
        stats.skipped_ownership += 1


def _dir_metadata(fd: int, entry: Entry, privileged: bool, stats: ApplyStats, what: str) -> None:
    if privileged:
        os.chown(fd, entry.uid, entry.gid)
    elif (entry.uid, entry.gid) != (os.geteuid(), os.getegid()):
        stats.skipped_ownership += 1
    os.chmod(fd, 0o700 | entry.mode)     # writable until the end; the final mode is set last
    _set_xattrs(fd, entry, privileged, stats, what)


def _write_file(pfd: int, leaf: str, entry: Entry, privileged: bool, stats: ApplyStats, what: str) -> None:
    fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
    try:
        n = 0
        reader = entry.reader
        while reader is not None:
            data = reader.read(CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            n += len(data)
        if n != entry.size:
            raise ImageError(f"{what}: {n} bytes of content, header says {entry.size}")
        if privileged:
            os.fchown(fd, entry.uid, entry.gid)
        elif (entry.uid, entry.gid) != (os.geteuid(), os.getegid()):
            stats.skipped_ownership += 1
        os.fchmod(fd, entry.mode)               # after chown, which clears setuid/setgid
        _set_xattrs(fd, entry, privileged, stats, what)
        os.utime(fd, (entry.mtime, entry.mtime))
    finally:
        os.close(fd)
    stats.files += 1
    stats.file_bytes += entry.size


def _prune(tree: _Tree, pfd: int, leaf: str, path: str, created: set[str], ancestors: set[str]) -> None:
    """Remove ``path`` (``leaf`` in ``pfd``) as a whiteout does: all of it, except what this layer wrote."""
    if path not in ancestors:
        if path not in created:
            tree.remove(pfd, leaf)
        return
    st = tree.lstat(pfd, leaf)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return
    fd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
    try:
        for name in os.listdir(fd):
            _prune(tree, fd, name, f"{path}/{name}", created, ancestors)
    finally:
        os.close(fd)
