"""External origins: a read-only file under a thin volume (dm-thin's ``external-origin`` thin argument).

dm-thin lets a thin device sit on a read-only *external origin* (the base of LVM's external-origin
thins, and of qcow2-style golden images): a block the thin does not map reads from the origin; the
first write to such a block copies the rest of the block from the origin into the new data block
(``schedule_external_copy``); bytes past the origin's end read as zeroes (its size need not be a
multiple of the block size).  The kernel takes the origin as a thin *table* argument, never from the
pool metadata, and every internal snapshot of such a thin must be activated with the same origin.

thinpool records the origin in the volume's catalog entry (``"origin"``: :func:`describe` of the file)
when :meth:`thinpool.pool.Pool.create_thin` is given ``external_origin``, and a snapshot inherits its
origin's entry, so the table argument is never forgotten.  This module checks a new origin
(:func:`check_new_origin`: never a file the pool writes) and keeps the open files
(:class:`OriginFile`: one read-only descriptor per file, shared by every volume on it, and the
change check the I/O path runs before each call).  The kernels read it with pread(2) (see
:mod:`thinpool.kernels`); nothing here is per block.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Iterable

from .errors import FailedPrecondition, HostIOError, InvalidArgument, MetadataCorrupt, NotFound

#: the catalog entry's key
CATALOG_KEY = "origin"


def _identity(st: os.stat_result) -> dict[str, int]:
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "dev": int(st.st_dev), "ino": int(st.st_ino)}


def _size_of(fd: int, st: os.stat_result) -> int:
    """Bytes of a regular file or block device (a device's size is where SEEK_END lands)."""
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return int(st.st_size)


def check_new_origin(path: Any, pool_dir: str, pool_files: Iterable[str]) -> dict[str, Any]:
    """The catalog record of a new external origin ``path``: ``{"path", "size", "mtime_ns", "dev", "ino"}``.

    Refused (InvalidArgument naming the file and the rule; NotFound if it does not exist): a path that
    is not a string; anything but a regular file or block device; a file inside the pool's directory
    ``pool_dir``; any of ``pool_files`` (the pool's data, metadata and lock files, by path or as a hard
    link); a file carrying a pool's data-file owner stamp (another pool writes it).  The file is opened
    read-only, once, to read its size -- thinpool never opens an origin for writing."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise InvalidArgument(f"external origin must be a file path, got {path!r}")
    raw = os.fspath(path)
    given = raw if len(raw) <= 300 else raw[:300] + "..."  # as shown in messages
    if not raw or "\0" in raw:
        raise InvalidArgument(f"external origin {given!r}: not a valid path")
    try:
        real = os.path.realpath(os.path.abspath(raw))
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"external origin {given}: no such file") from None
    except OSError as exc:
        raise InvalidArgument(f"external origin {given}: cannot be opened read-only ({exc.strerror})") from None
    except (UnicodeError, ValueError):
        raise InvalidArgument(f"external origin {given!r}: not a valid file name") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise InvalidArgument(f"external origin {given}: not a regular file or block device")
        size = _size_of(fd, st)
    finally:
        os.close(fd)
    pool_real = os.path.realpath(pool_dir)
    if real == pool_real or real.startswith(pool_real.rstrip("/") + "/"):
        raise InvalidArgument(f"external origin {given} lies inside the pool directory {pool_dir}: the pool "
                              f"writes there, and an origin must never change")
    for f in pool_files:
        try:
            pst = os.stat(f)
        except OSError:
            continue
        if os.path.realpath(f) == real or (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino):
            raise InvalidArgument(f"external origin {given} is {f}, a file of the pool itself: the pool writes "
                                  f"it, and an origin must never change")
    if stat.S_ISREG(st.st_mode):
        from .ownership import read_stamp
        try:
            stamp = read_stamp(real)
        except OSError:
            stamp = None
        if stamp is not None:
            raise InvalidArgument(f"external origin {given} is the data file of {stamp.describe()}: that pool "
                                  f"writes it, and an origin must never change")
    rec = {"path": real, **_identity(st)}
    rec["size"] = size
    return rec


def valid_record(rec: Any) -> bool:
    """Whether ``rec`` has the form of an origin record (what :func:`check_new_origin` returns)."""
    return (isinstance(rec, dict) and isinstance(rec.get("path"), str)
            and all(type(rec.get(k)) is int for k in ("size", "mtime_ns", "dev", "ino")) and rec["size"] >= 0)


def describe(rec: dict[str, Any]) -> str:
    """``PATH (N bytes)`` for listings and errors."""
    return f"{rec['path']} ({rec['size']} bytes)"


class OriginFile:
    """One external origin file, opened read-only on first use and shared by the volumes on it.

    :meth:`use` is what the I/O path calls before each call: it opens the file when needed and checks
    with one ``fstat`` that it still has the size and modification time recorded at creation (and, when
    it opens, that the path still names the same file) -- FailedPrecondition naming the file otherwise,
    for that volume's I/O only.  ``fd`` is -1 until opened and after :meth:`close`."""

    __slots__ = ("rec", "path", "size", "fd", "_fstat")

    def __init__(self, rec: dict[str, Any]) -> None:
        self.rec = dict(rec)
        self.path: str = str(rec["path"])
        self.size: int = int(rec["size"])
        self.fd = -1
        self._fstat = os.fstat

    def _changed(self, why: str) -> FailedPrecondition:
        return FailedPrecondition(f"external origin {self.path} {why}: it was {self.size} bytes, modified at "
                                  f"{self.rec['mtime_ns']} ns when the volume was created; an origin must "
                                  f"never change (put the original file back, or copy the volume's data out "
                                  f"while it is unchanged)")

    def _check(self, st: os.stat_result, size: int) -> None:
        if size != self.size:
            raise self._changed(f"changed size (now {size} bytes)")
        if int(st.st_mtime_ns) != int(self.rec["mtime_ns"]):
            raise self._changed(f"was modified (mtime now {int(st.st_mtime_ns)} ns)")

    def open(self) -> None:
        """Open the file read-only and check it is the recorded one, unchanged."""
        if self.fd >= 0:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise FailedPrecondition(f"external origin {self.path} is missing: the volumes on it cannot be "
                                     f"read until it is back") from None
        except OSError as exc:
            raise FailedPrecondition(f"external origin {self.path} cannot be opened read-only "
                                     f"({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (self.rec["dev"], self.rec["ino"]) and stat.S_ISREG(st.st_mode):
                raise self._changed("was replaced by another file")
            self._check(st, _size_of(fd, st))
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def use(self) -> tuple[int, int]:
        """``(fd, size)`` for the kernels, after the cheap change check (see the class docstring)."""
        fd = self.fd
        if fd < 0:
            self.open()
            return self.fd, self.size
        st = self._fstat(fd)
        self._check(st, st.st_size if stat.S_ISREG(st.st_mode) else self.size)
        return fd, self.size

    def close(self) -> None:
        """Close the descriptor (a later :meth:`use` opens it again)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class Origins:
    """The external origins of a pool's volumes: volume key -> :class:`OriginFile` (files shared by
    path and identity).  Built from the catalog at every load; updated by create, snapshot and delete."""

    __slots__ = ("by_key", "_files")

    def __init__(self) -> None:
        self.by_key: dict[int, OriginFile] = {}
        self._files: dict[tuple, OriginFile] = {}

    def _file(self, rec: dict[str, Any]) -> OriginFile:
        if not valid_record(rec):
            raise MetadataCorrupt(f"an external origin record in the catalog is malformed: {rec!r:.200}",
                                  structure="catalog")
        ident = (rec["path"], rec["dev"], rec["ino"], rec["size"], rec["mtime_ns"])
        f = self._files.get(ident)
        if f is None:
            f = self._files[ident] = OriginFile(rec)
        return f

    def add(self, key: int, rec: dict[str, Any] | None) -> None:
        """Volume ``key`` sits on origin ``rec`` (a catalog record; None: no origin)."""
        if rec is None:
            self.by_key.pop(key, None)
        else:
            self.by_key[key] = self._file(rec)

    def drop(self, key: int) -> None:
        """Volume ``key`` is gone."""
        self.by_key.pop(key, None)

    def reload(self, keyed_records: Iterable[tuple[int, dict[str, Any]]]) -> None:
        """Replace the map (after a load or abort); files still in use keep their descriptors."""
        self.by_key.clear()  # the same dict for ever: the I/O path keeps a reference to it
        for key, rec in keyed_records:
            self.add(key, rec)
        live = {id(f) for f in self.by_key.values()}
        for ident, f in list(self._files.items()):
            if id(f) not in live:
                f.close()
                del self._files[ident]

    def read_failed(self, key: int, where: str, errno_value: int, offset: int) -> None:
        """A kernel could not read volume ``key``'s origin at byte ``offset`` (``where`` names the pool and
        volume for the message): FailedPrecondition if the file changed (size, mtime, replaced, missing),
        else HostIOError with the read's errno (``errno_value``, 0: the file ended early); both name the file."""
        f = self.by_key.get(key)
        path = f.path if f is not None else "?"
        if f is not None:
            f.close()
            f.use()  # reopens and checks it: raises FailedPrecondition if it changed
        raise HostIOError(f"{where}: reading its external origin {path} at byte {offset} failed "
                          f"({os.strerror(errno_value) if errno_value else 'the file ends early'})",
                          errno_value or errno.EIO, path)

    def problems(self) -> list[str]:
        """Open every origin in use and check it (:meth:`OriginFile.use`): one message per file that
        changed, naming it (the pool warns with them when it opens)."""
        out = []
        for f in {id(f): f for f in self.by_key.values()}.values():
            try:
                f.use()
            except FailedPrecondition as exc:
                out.append(str(exc))
        return out

    def close(self) -> None:
        """Close every descriptor."""
        for f in self._files.values():
            f.close()


__all__ = ["CATALOG_KEY", "check_new_origin", "valid_record", "describe", "OriginFile", "Origins"]
