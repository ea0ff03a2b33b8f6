"""A pool's directory: which files make a pool, and the lock that keeps one writer per pool.

Used by :class:`thinpool.pool.Pool` and :class:`thinpool.devtable.DeviceTable` alike (no numpy here).
"""

from __future__ import annotations

import fcntl
import os

from .errors import InvalidArgument, NotFound, PoolLocked

DATA = "data"
METADATA = "metadata"
LOCK = "lock"


def resolve(path: str | os.PathLike) -> str:
    """The absolute path of an existing pool directory (NotFound / InvalidArgument otherwise)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise NotFound(f"pool {path} does not exist")
    if not os.path.isdir(path):
        raise InvalidArgument(f"{path} is not a thin pool (not a directory)")
    if not os.path.isfile(os.path.join(path, METADATA)):
        raise InvalidArgument(f"{path} is not a thin pool (no metadata file)")
    return path


def lock(path: str, read_only: bool) -> int:
    """Take the pool's lock: shared for readers, exclusive (and our pid recorded) for a writer.
    Raises PoolLocked naming the holder's pid when it is taken; returns the lock's fd."""
    lock_path = os.path.join(path, LOCK)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise PoolLocked(f"pool {path} is locked by another process (pid {holder})") from None
    if not read_only:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock(fd: int) -> None:
    """Release a lock taken with :func:`lock` (a negative fd is ignored)."""
    if fd >= 0:
        os.close(fd)
