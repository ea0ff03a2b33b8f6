"""A pool's directory: which files make a pool, how they are opened, and the lock that keeps one
writer per pool.

Used by :class:`thinpool.pool.Pool` and :class:`thinpool.devtable.DeviceTable` alike (no numpy here).

Every file of a pool is opened with :func:`open_pool_file`: ``O_NOFOLLOW`` (a symbolic link is
refused, never followed), ``O_CLOEXEC``, ``O_NONBLOCK`` while opening (a FIFO planted in a pool
cannot hang the opener), then checked to be a regular file owned by the calling user.  A pool whose
directory or files belong to another user is refused unless the caller passes
``allow_foreign=True`` (CLI: ``thinpool --allow-foreign``): root must not be steered by a user's
files.  New pools are private: directory 0700, files 0600 (see :func:`file_mode`).

The lock (``POOL/lock``) is an ``flock``: shared for readers, exclusive for a writer, which also
records its pid in the file.  :class:`~thinpool.errors.PoolLocked` names the process that really
holds it (found in ``/proc/locks``), and :func:`lock` can wait for it (``wait`` seconds).
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import stat
import time
from typing import NamedTuple

from .errors import InvalidArgument, NotFound, PermissionDenied, PoolLocked

DATA = "data"
METADATA = "metadata"
LOCK = "lock"

#: Modes of a new pool: the directory, and every file in it (the lock included).
DIR_MODE = 0o700
FILE_MODE = 0o600


class OpenDefaults(NamedTuple):
    """Process-wide defaults for opening pools when a call does not say (the CLI sets them from
    ``thinpool --wait`` / ``--allow-foreign``; a library caller normally passes the arguments)."""

    #: seconds to wait for a pool's lock (0: fail at once; ``math.inf``: wait for ever)
    wait: float = 0.0
    #: open pools whose directory or files another user owns
    allow_foreign: bool = False


_defaults = OpenDefaults()


def set_defaults(*, wait: float = 0.0, allow_foreign: bool = False) -> None:
    """Set the process-wide :class:`OpenDefaults` (used where ``wait`` / ``allow_foreign`` is None)."""
    global _defaults
    _defaults = OpenDefaults(check_wait(wait), bool(allow_foreign))


def defaults() -> OpenDefaults:
    """The current process-wide defaults."""
    return _defaults


def check_wait(wait: float | int | None) -> float:
    """``wait`` as a number of seconds >= 0 (None -> the process default); InvalidArgument otherwise."""
    if wait is None:
        return _defaults.wait
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or math.isnan(wait) or wait < 0:
        raise InvalidArgument(f"lock wait must be a number of seconds >= 0, got {wait!r}")
    return float(wait)


def file_mode(dir_mode: int) -> int:
    """The mode of a pool's files for a pool directory of mode ``dir_mode``: the same read/write
    bits, no execute bits (0700 -> 0600, 0750 -> 0640, 0755 -> 0644)."""
    return dir_mode & 0o666


def _owner_name(uid: int) -> str:
    try:
        import pwd
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_owner(path: str, st: os.stat_result, allow_foreign: bool | None = None, what: str = "pool file") -> None:
    """Raise PermissionDenied if ``st`` (of ``path``) belongs to another user than the caller's
    effective uid, unless ``allow_foreign`` (None -> the process default)."""
    if allow_foreign is None:
        allow_foreign = _defaults.allow_foreign
    me = os.geteuid()
    if st.st_uid != me and not allow_foreign:
        raise PermissionDenied(
            f"{what} {path} is owned by {_owner_name(st.st_uid)}, not by you ({_owner_name(me)}): refusing to "
            f"use another user's pool (pass --allow-foreign, or allow_foreign=True, if you trust its owner)")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _denied(path: str, flags: int) -> PermissionDenied:
    how = "reading" if (flags & os.O_ACCMODE) == os.O_RDONLY else "writing"
    try:
        st = os.lstat(path)
        detail = f" (owner {_owner_name(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}; you are " \
                 f"{_owner_name(os.geteuid())})"
    except OSError:
        detail = ""
    return PermissionDenied(f"permission denied: cannot open {path} for {how}{detail}")


def _foreign_dir(path: str) -> bool:
    try:
        return os.stat(os.path.dirname(os.path.abspath(path))).st_uid != os.geteuid()
    except OSError:
        return True


def occupy_closed_standard_fds() -> list[int]:
    """Give each of the descriptors 0, 1 and 2 that is closed to /dev/null; the ones that were.  A
    process started without one (``>&-``), or whose caller closed it, would otherwise hand that number
    to the next file opened -- a pool file, or the duplicate Python's ``mmap`` keeps of the data file --
    and whatever is then written to standard output or error (a fatal signal's report, a C library's
    message, a stray ``print``) would land in the pool."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError as exc:
            if exc.errno != errno.EBADF:
                continue
        null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: ``fd`` (the lower ones are open)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        os.set_inheritable(fd, True)
        closed.append(fd)
    return closed


def open_pool_file(path: str, flags: int, mode: int = FILE_MODE, *, allow_foreign: bool | None = None,
                   what: str = "pool file") -> int:
    """Open one file of a pool safely and return its fd.

    Adds ``O_NOFOLLOW | O_CLOEXEC`` to ``flags`` (``mode`` applies with ``O_CREAT``); then checks
    the file is a regular file (InvalidArgument otherwise: a symbolic link, FIFO, directory...)
    owned by the caller (PermissionDenied otherwise, unless ``allow_foreign``; a file with several
    hard links in a directory another user owns is refused even then).  EACCES/EPERM become
    PermissionDenied naming the file; FileNotFoundError passes through unchanged.  Closed standard
    descriptors are given to /dev/null first (:func:`occupy_closed_standard_fds`), so the fd is
    never 0, 1 or 2."""
    path = os.fspath(path)
    occupy_closed_standard_fds()
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidArgument(f"{what} {path} is a symbolic link: thinpool never follows symlinks for a "
                                  f"pool's files (put the file itself there)") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise _denied(path, flags) from None
        if exc.errno == errno.EISDIR:
            raise InvalidArgument(f"{what} {path} is a directory, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
        check_owner(path, st, allow_foreign, what)
        if st.st_nlink > 1 and _foreign_dir(path):
            # in a directory another user controls, a second name may be a hard link they made to a
            # file of ours (fs.protected_hardlinks=0): refuse rather than write through it
            raise PermissionDenied(f"{what} {path} has {st.st_nlink} hard links in a directory another user "
                                   f"owns: refusing to use it (it may be a link to another file)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def resolve(path: str | os.PathLike, *, allow_foreign: bool | None = None) -> str:
    """The absolute path of an existing pool directory (NotFound / InvalidArgument otherwise;
    PermissionDenied if another user owns it and ``allow_foreign`` is not set)."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"pool {path} does not exist") from None
    except PermissionError:
        raise PermissionDenied(f"permission denied: cannot reach pool {path}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{path} is not a thin pool (not a directory)")
    check_owner(path, st, allow_foreign, "pool directory")
    try:
        md = os.lstat(os.path.join(path, METADATA))
    except FileNotFoundError:
        raise InvalidArgument(f"{path} is not a thin pool (no metadata file)") from None
    except PermissionError:
        raise PermissionDenied(f"permission denied: cannot read pool directory {path}") from None
    if stat.S_ISDIR(md.st_mode):
        raise InvalidArgument(f"{path} is not a thin pool (no metadata file)")
    return path


# ---------------------------------------------------------------------------------------------- the lock
def _proc_locks() -> list[tuple[int, int, int, int, str]] | None:
    """(pid, major, minor, inode, kind) of every granted lock in /proc/locks (None if unreadable)."""
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":  # "->" lines are waiters, not holders
            continue
        try:
            pid = int(fields[4])
            dev, ino = fields[5].rsplit(":", 1)
            major, minor = (int(x, 16) for x in dev.split(":"))
            out.append((pid, major, minor, int(ino), fields[3]))
        except ValueError:
            continue
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return ""
    text = " ".join(raw.decode(errors="replace").split("\0")).strip()
    return text if len(text) <= 100 else text[:97] + "..."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(pid: int) -> str:
    if pid == os.getpid():
        return f"pid {pid} (this process)"
    cmd = _cmdline(pid)
    return f"pid {pid} ({cmd})" if cmd else f"pid {pid}"


def lock_holders(fd: int) -> list[int]:
    """Pids holding an flock on the file open at ``fd``, from /proc/locks (empty if none is visible;
    a pid of another pid namespace shows as 0 and is left out)."""
    st = os.fstat(fd)
    locks = _proc_locks() or []
    ino = [(p, ma, mi) for p, ma, mi, i, _ in locks if i == st.st_ino]
    exact = [p for p, ma, mi in ino if (ma, mi) == (os.major(st.st_dev), os.minor(st.st_dev))]
    # an overlay or FUSE file system may report another device number than /proc/locks does
    pids = exact or [p for p, _, _ in ino]
    return sorted({p for p in pids if p > 0})


def holder_text(fd: int) -> str:
    """"held by pid N (command line)" / "held by pids N, M (...)" / "held by an unknown process"."""
    pids = lock_holders(fd)
    if not pids and _proc_locks() is None:
        try:
            recorded = int(os.pread(fd, 32, 0).decode(errors="replace").strip() or "0")
        except (OSError, ValueError):
            recorded = 0
        if recorded > 0 and _alive(recorded):
            return f"probably held by {_describe(recorded)} (recorded in the lock file; /proc/locks unreadable)"
        return "held by an unknown process"
    if not pids:
        return "held by an unknown process"
    return ("held by " if len(pids) == 1 else "held by pids ") + \
        ", ".join(_describe(p) if len(pids) == 1 else _describe(p)[4:] for p in pids)


def lock(path: str, read_only: bool, *, wait: float | None = None, allow_foreign: bool | None = None,
         mode: int | None = None, purpose: str = "") -> int:
    """Take the pool's lock: shared for readers, exclusive (and our pid recorded) for a writer.

    The lock file is opened with :func:`open_pool_file` (created with ``mode``, default: the mode
    of the pool's metadata file without execute bits, so whoever cannot read the pool cannot hold
    its lock either).  If it is taken, waits up to ``wait`` seconds (None -> the process default),
    then raises PoolLocked naming the real holder; ``purpose`` is appended to that message.
    Returns the lock's fd."""
    wait = check_wait(wait)
    lock_path = os.path.join(path, LOCK)
    if mode is None:
        try:
            md = os.lstat(os.path.join(path, METADATA))
            mode = stat.S_IMODE(md.st_mode) & 0o666 if stat.S_ISREG(md.st_mode) else FILE_MODE
        except OSError:
            mode = FILE_MODE
    try:
        fd = open_pool_file(lock_path, os.O_RDWR | os.O_CREAT, mode, allow_foreign=allow_foreign, what="lock file")
    except PermissionDenied:
        if not read_only:
            raise
        # a reader of a pool it may read but not write (old pools: lock 0644)
        fd = open_pool_file(lock_path, os.O_RDONLY, allow_foreign=allow_foreign, what="lock file")
    op = fcntl.LOCK_SH if read_only else fcntl.LOCK_EX
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                try:
                    who = holder_text(fd)
                finally:
                    os.close(fd)
                waited = f" after waiting {wait:g} s" if wait > 0 else ""
                hint = "" if wait > 0 else " (thinpool --wait[=SECONDS] waits for it)"
                raise PoolLocked(f"pool {path} is locked by another process{waited}: {who}{purpose}{hint}") from None
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.2)
        except BaseException:
            os.close(fd)
            raise
    if not read_only:  # the holder's pid, for messages only (the flock is the lock): best effort, so a
        try:              # full host filesystem does not fail an open
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
    return fd


def unlock(fd: int) -> None:
    """Release a lock taken with :func:`lock` (a negative fd is ignored)."""
    if fd >= 0:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- new pools
def check_mode(mode: int | str | None) -> int | None:
    """A pool directory mode (an int, or an octal string such as ``"0750"``) checked: permission
    bits only, and the owner keeps rwx.  None stays None (the default, :data:`DIR_MODE`)."""
    if mode is None:
        return None
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            raise InvalidArgument(f"pool mode {mode!r} is not an octal number such as 0700 or 0750") from None
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise InvalidArgument(f"pool mode {mode!r} must be permission bits between 0000 and 0777")
    if mode & 0o700 != 0o700:
        raise InvalidArgument(f"pool mode {mode:04o} must give the owner rwx (0700 at least)")
    return mode


def make_dir(path: str, mode: int | str | None = None, *, allow_foreign: bool | None = None) -> int:
    """Create a new pool's directory ``path`` (its parents as needed) with exactly ``mode``
    (default :data:`DIR_MODE`, whatever the umask), or accept an existing empty directory (it must be
    ours unless ``allow_foreign``; its mode is changed only when ``mode`` is given).  Returns the mode
    for the pool's files (:func:`file_mode`)."""
    explicit = check_mode(mode)
    dmode = DIR_MODE if explicit is None else explicit
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, dmode)
        chmod = True
    except FileExistsError:
        chmod = explicit is not None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        check_owner(path, os.fstat(fd), allow_foreign, "pool directory")
        if chmod:
            os.fchmod(fd, dmode)
    finally:
        os.close(fd)
    return file_mode(dmode)


def set_file_mode(path: str, mode: int, *, allow_foreign: bool | None = None) -> None:
    """Set a pool file's mode exactly (through :func:`open_pool_file`: never through a symlink)."""
    fd = open_pool_file(path, os.O_RDONLY, allow_foreign=allow_foreign)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
