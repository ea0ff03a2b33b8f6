"""Which pool owns a data file: one data file, exactly one owning pool.

A pool's identity is the ``uuid`` in its metadata header.  The data file carries the same identity
as a *stamp* -- the extended attribute ``user.thinpool.owner`` (JSON ``{"uuid": ..., "pool": ...}``),
or, on a filesystem without user xattrs, a record file ``.<name>.thinpool-owner`` next to the data
file that also names the file's device and inode.  Two guards together:

* the stamp catches a pool whose owner is not running: every open (read-write or read-only, the
  device table, repair) compares it with the metadata's uuid and refuses a data file stamped by
  another pool;
* an ``flock`` on the data file itself, held by its pool for as long as it is open (exclusive for a
  writer, shared for readers), catches a second pool while the first is live.

A data file without a stamp (a pool made before stamps existed) is adopted by its first read-write
open.  A new pool over an existing data file (``create``/``restore``/``import-metadata`` with an
explicit data file) stamps it; if another pool's stamp is there the new pool is refused unless the
caller says that pool is gone (``take_over_data``), and the old pool then refuses to open.
:class:`NewPoolFiles` records what a pool creation made so a failed creation removes exactly that.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
from typing import NamedTuple

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument

XATTR = "user.thinpool.owner"
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


class Stamp(NamedTuple):
    """An owner stamp: the owning pool's uuid and (informational) directory at stamping time."""

    uuid: str
    pool: str

    def describe(self) -> str:
        """``pool <uuid> at <directory>``, for error messages."""
        return f"pool {self.uuid or '?'} at {self.pool or '?'}"


def _record_path(data_path: str) -> str:
    head, tail = os.path.split(data_path)
    return os.path.join(head, f".{tail}.thinpool-owner")


def _parse(raw: bytes) -> Stamp:
    try:
        d = json.loads(raw)
        return Stamp(str(d["uuid"]), str(d.get("pool", "")))
    except (ValueError, KeyError, TypeError):
        return Stamp("", f"(unreadable owner stamp {raw[:64]!r})")


def read_raw(data_path: str, fd: int | None = None) -> bytes | None:
    """The raw stamp of ``data_path`` (xattr, else the record file), or None when unstamped."""
    try:
        return os.getxattr(fd if fd is not None else data_path, XATTR)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        if exc.errno not in _NO_XATTR:
            raise
    try:
        with open(_record_path(data_path), "rb") as f:
            rec = json.loads(f.read())
        st = os.fstat(fd) if fd is not None else os.stat(data_path)
        if rec.get("dev") != st.st_dev or rec.get("ino") != st.st_ino:
            return None  # a record about another file that once had this name
        return json.dumps({"uuid": rec.get("uuid", ""), "pool": rec.get("pool", "")}).encode()
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError):
        return b"?"


def read_stamp(data_path: str, fd: int | None = None) -> Stamp | None:
    """The owner stamp of ``data_path`` (None when it has none)."""
    raw = read_raw(data_path, fd)
    return None if raw is None else _parse(raw)


def write_raw(data_path: str, raw: bytes | None, fd: int | None = None) -> None:
    """Set (or with None remove) the raw stamp of ``data_path``."""
    target = fd if fd is not None else data_path
    try:
        if raw is None:
            try:
                os.removexattr(target, XATTR)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        else:
            os.setxattr(target, XATTR, raw)
        return
    except OSError as exc:
        if exc.errno not in _NO_XATTR:
            raise
    rec_path = _record_path(data_path)
    if raw is None:
        try:
            os.unlink(rec_path)
        except FileNotFoundError:
            pass
        return
    st = os.fstat(fd) if fd is not None else os.stat(data_path)
    rec = dict(_parse(raw)._asdict(), dev=st.st_dev, ino=st.st_ino)
    tmp = f"{rec_path}.{os.getpid()}.tmp"
    # readable by whoever can read the data file, no more; never through a symlink
    fd_rec = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, st.st_mode & 0o666)
    try:
        with os.fdopen(fd_rec, "w") as f:
            f.write(json.dumps(rec))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, rec_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def stamp_bytes(uuid: str, pool_path: str) -> bytes:
    """The raw stamp naming pool ``uuid`` at ``pool_path``."""
    return json.dumps({"uuid": uuid, "pool": pool_path}).encode()


def foreign_error(data_path: str, stamp: Stamp, uuid: str, pool_path: str) -> FailedPrecondition:
    """The error for pool ``uuid`` at ``pool_path`` finding its data file owned by another pool."""
    return FailedPrecondition(
        f"pool {pool_path}: its data file {data_path} belongs to {stamp.describe()}, not to this pool "
        f"({uuid}); the data was taken over by that pool, so this pool can no longer be opened (remove this "
        f"pool, or take the data back with restore/import-metadata --take-over-data)")


def check_owner(data_path: str, uuid: str, pool_path: str, *, fd: int | None = None, adopt: bool = False) -> None:
    """Refuse (FailedPrecondition) unless ``data_path`` is stamped with ``uuid`` or unstamped.
    ``adopt`` stamps an unstamped file (a pool made before stamps; best effort: the flock still
    guards a live pool when the stamp cannot be written)."""
    if not uuid:
        return  # metadata without an identity (never written by thinpool's create)
    stamp = read_stamp(data_path, fd)
    if stamp is None:
        if adopt:
            try:
                write_raw(data_path, stamp_bytes(uuid, pool_path), fd)
            except OSError:
                pass
        return
    if stamp.uuid != uuid:
        raise foreign_error(data_path, stamp, uuid, pool_path)


def lock(fd: int, data_path: str, read_only: bool) -> None:
    """Take the data file's flock for an open pool (exclusive for a writer, shared for readers);
    FailedPrecondition naming the stamped owner when another open pool holds it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        stamp = None
        try:
            stamp = read_stamp(data_path, fd)
        except OSError:
            pass
        owner = stamp.describe() if stamp else "another pool"
        raise FailedPrecondition(f"data file {data_path} is in use by {owner}, which has it open: one data file "
                                 f"belongs to exactly one pool") from None


def check_claim(data_path: str, *, take_over: bool = False) -> None:
    """Before a new pool claims the existing file ``data_path``: refuse when another pool has it
    open (even with ``take_over``), or has stamped it (unless ``take_over``)."""
    try:
        fd = os.open(data_path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stamp = read_stamp(data_path, fd)
            owner = stamp.describe() if stamp else "another pool"
            raise FailedPrecondition(f"data file {data_path} is in use by {owner}, which has it open: stop "
                                     f"that pool first (a live pool's data is never taken over)") from None
        stamp = read_stamp(data_path, fd)
        if stamp is not None and not take_over:
            raise FailedPrecondition(
                f"data file {data_path} belongs to {stamp.describe()}: one data file has exactly one pool; if "
                f"that pool is gone, pass --take-over-data (take_over_data=True) and it will refuse to open")
    finally:
        os.close(fd)


#: the files of a pool directory other than its data file: never a data file, whatever --force says
_POOL_OWN_FILES = ("metadata", "lock", "control.sock", "nbd.sock")


def check_new_data_file(data_path: str, *, force: bool = False, take_over: bool = False,
                        pool_dir: str | None = None) -> None:
    """An explicit data file for a new pool (at ``pool_dir``): absent, or an existing regular file that
    is empty (or ``force``: its contents may be punched) and that no other pool owns
    (:func:`check_claim`).  Never a file of a pool directory but its ``data`` (a pool's metadata or
    lock, which the new pool's writes would overwrite -- ``--force`` does not change that), nor a
    new file there, nor the new pool's own metadata or lock."""
    real = os.path.realpath(data_path)
    where, name = os.path.split(real)
    if pool_dir is not None and where == os.path.realpath(pool_dir) and name in _POOL_OWN_FILES:
        raise InvalidArgument(f"data file {data_path} would be the new pool's own {name} file")
    if all(os.path.lexists(os.path.join(where, n)) for n in ("metadata", "lock")) and name != "data":
        what = f"the {name} file" if name in _POOL_OWN_FILES else "a file in the directory"
        raise InvalidArgument(f"data file {data_path} is {what} of pool {where}: a pool's data device is never "
                              f"another pool's file")
    try:
        st = os.stat(data_path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"data file {data_path} is not a regular file")
    check_claim(data_path, take_over=take_over)
    if st.st_size > 0 and not force:
        raise AlreadyExists(f"data file {data_path} exists and is not empty ({st.st_size} bytes): a new pool "
                            f"would punch its contents; use --force (force=True) to use it anyway")


class NewPoolFiles:
    """What creating a pool made, so a failed creation (create, restore, import-metadata, repair -o)
    removes exactly that: the pool directory's contents (it was empty or absent), the data file if
    it did not exist, else its former size and owner stamp.  (A plain class, not a dataclass: every
    command that opens a pool imports this module, and a dataclass costs about half a millisecond to
    make.)"""

    def __init__(self, pool_dir: str, made_dir: bool, data_path: str, data_existed: bool, data_size: int = 0,
                 stamp_before: bytes | None = None, stamped: bool = False) -> None:
        self.pool_dir = pool_dir
        self.made_dir = made_dir
        self.data_path = data_path
        self.data_existed = data_existed
        self.data_size = data_size
        self.stamp_before = stamp_before
        self.stamped = stamped

    def __repr__(self) -> str:
        return (f"NewPoolFiles(pool_dir={self.pool_dir!r}, made_dir={self.made_dir!r}, data_path={self.data_path!r}, "
                f"data_existed={self.data_existed!r}, data_size={self.data_size!r}, "
                f"stamp_before={self.stamp_before!r}, stamped={self.stamped!r})")

    @classmethod
    def before(cls, pool_dir: str, data_path: str) -> "NewPoolFiles":
        """Record the state before creation starts."""
        existed = os.path.exists(data_path)
        return cls(pool_dir=pool_dir, made_dir=not os.path.exists(pool_dir), data_path=data_path,
                   data_existed=existed, data_size=os.path.getsize(data_path) if existed else 0,
                   stamp_before=read_raw(data_path) if existed else None)

    def claim(self, uuid: str) -> None:
        """Stamp the data file as owned by pool ``uuid`` at :attr:`pool_dir`."""
        self.stamped = True
        write_raw(self.data_path, stamp_bytes(uuid, self.pool_dir))

    def undo(self) -> None:
        """Remove what the creation made (errors are ignored: this runs while another propagates)."""
        if self.data_existed:
            try:
                if os.path.getsize(self.data_path) > self.data_size:
                    os.truncate(self.data_path, self.data_size)
                if self.stamped:
                    write_raw(self.data_path, self.stamp_before)
            except OSError:
                pass
        else:
            for p in (self.data_path, _record_path(self.data_path)):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        if self.made_dir:
            shutil.rmtree(self.pool_dir, ignore_errors=True)
            return
        try:
            names = os.listdir(self.pool_dir)
        except OSError:
            return
        keep = os.path.abspath(self.data_path) if self.data_existed else None
        for name in names:
            p = os.path.join(self.pool_dir, name)
            if p == keep:
                continue
            try:
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.unlink(p)
            except OSError:
                pass


__all__ = ["XATTR", "Stamp", "read_stamp", "check_owner", "check_claim", "lock", "check_new_data_file", "NewPoolFiles"]
