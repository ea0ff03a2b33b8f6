"""Safe output files: every file a command writes at a path the user names goes through here.

Three rules, applied by :func:`guard_output` and :func:`atomic_output`:

* **Type check.**  A path argument must be a ``str`` or an ``os.PathLike`` giving one (not an int --
  which ``open`` would take as a file descriptor -- nor bytes, nor an empty string, nor one holding
  NUL); anything else is :class:`~thinpool.errors.InvalidArgument` before any file is touched.
* **Never onto a pool.**  An output that resolves (``os.path.realpath``, and for an existing target
  its ``st_dev``/``st_ino``, which catches hard links) to a file of a pool is refused with
  InvalidArgument naming the output and the pool file it is.  "A file of a pool" means: the files of the
  pools named by the command (the pool directory's ``metadata``, ``lock``, ``data``, ``control.sock``
  and the data file wherever it lives), the files of every pool open in this process (see
  :func:`register_pool`), and anything in a directory that holds a pool (a ``metadata`` and a ``lock``
  file side by side), plus any existing file that carries a pool's data-file owner stamp or that
  another process holds an ``flock`` on (an open pool's data file, wherever it lives).
* **Atomic replace.**  A regular output is written to a temporary file in the target's directory,
  flushed to disk and renamed over the target; on any failure the temporary file is removed and the old
  target is left exactly as it was.  ``-`` stays a stream (stdout); an existing FIFO or device is
  written in place (it cannot be renamed over).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import sys
import tempfile
import threading
import weakref
from typing import IO, Any, Iterable, Iterator, NamedTuple

from .errors import HostIOError, InvalidArgument
from .hostio import write_all

#: file names inside a pool directory that belong to the pool
POOL_FILE_NAMES = ("metadata", "lock", "data", "control.sock")

_registry_lock = threading.Lock()
_open_pools: "weakref.WeakSet[Any]" = weakref.WeakSet()


def check_path(value: Any, what: str = "path") -> str:
    """``value`` as a ``str`` path, or InvalidArgument naming ``what`` when it is not a usable path
    (an int would be taken as a file descriptor by ``open``)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a path (a string), got {type(value).__name__} {value!r:.60}")
    if not value:
        raise InvalidArgument(f"{what} must be a path, got an empty string")
    if "\0" in value:
        raise InvalidArgument(f"{what} {value!r:.80} contains a NUL character")
    return value


def register_pool(pool: Any) -> None:
    """Remember an open pool (a :class:`~thinpool.pool.Pool` or
    :class:`~thinpool.devtable.DeviceTable`) so no output is ever written onto its files.  Weakly held;
    a pool whose ``_closed`` is true is skipped."""
    with _registry_lock:
        _open_pools.add(pool)


def _data_path_of(pool: Any) -> str | None:
    path = getattr(pool, "data_path", None)
    if isinstance(path, str):
        return path
    data = getattr(pool, "data", None)
    path = getattr(data, "path", None)
    return path if isinstance(path, str) else None


def _peek_data_file(pool_dir: str) -> str | None:
    """The data file a pool directory's newest superblock names (no lock taken; None if unreadable)."""
    try:
        from .mdstore import MetadataStore
        store = MetadataStore(os.path.join(pool_dir, "metadata"), read_only=True)
        try:
            sbs = store.superblocks()
        finally:
            store.close()
    except Exception:  # not a readable pool: its directory files are still protected
        return None
    for _gen, _slot, header in sbs:
        data_file = header.get("data_file") if isinstance(header, dict) else None
        if isinstance(data_file, str):
            return data_file
    return None


def pool_files(pool: Any) -> tuple[str, list[str]]:
    """(pool directory, its files) for a pool object or a pool directory path."""
    if isinstance(pool, (str, os.PathLike)):
        pool_dir = os.path.abspath(os.fspath(pool))
        data = _peek_data_file(pool_dir)
    else:
        pool_dir = os.path.abspath(str(getattr(pool, "path", "")))
        data = _data_path_of(pool)
    files = [os.path.join(pool_dir, n) for n in POOL_FILE_NAMES]
    if data:
        files.append(os.path.abspath(data))
    return pool_dir, files


def _known_pools(pools: Iterable[Any]) -> list[tuple[str, list[str]]]:
    with _registry_lock:
        live = [p for p in _open_pools if not getattr(p, "_closed", False)]
    return [pool_files(p) for p in list(pools) + live]


def is_pool_dir(directory: str) -> bool:
    """Whether ``directory`` holds a pool (its metadata file and lock)."""
    return all(os.path.lexists(os.path.join(directory, n)) for n in ("metadata", "lock"))


def guard_output(path: Any, *, pools: Iterable[Any] = (), what: str = "output") -> str:
    """Type-check an output path and refuse one that is (or lands inside) a pool: returns the resolved
    absolute target to write (``-`` is returned as is; an existing non-regular file such as
    ``/dev/stdout`` on a pipe keeps its given absolute path, which the kernel resolves).  ``pools``:
    pool objects or directories the command works on, on top of every open pool of this process."""
    path = check_path(path, what)
    if path == "-":
        return path
    given = os.path.abspath(path)
    target = os.path.realpath(given)
    try:  # the file the kernel would open (follows /proc/self/fd-style links realpath cannot name)
        st: os.stat_result | None = os.stat(given)
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{what} {path}: is a directory")
    ids: dict[tuple[int, int], tuple[str, str]] = {}
    for pool_dir, files in _known_pools(pools):
        for f in files:
            real = os.path.realpath(f)
            if real == target:
                shown = f"{path} is {real}," if real != os.path.abspath(path) else f"{path} is"
                raise InvalidArgument(f"{what} {shown} a file of pool {pool_dir}: refusing to overwrite it")
            try:
                pst = os.stat(real)
            except OSError:
                continue
            ids[(pst.st_dev, pst.st_ino)] = (real, pool_dir)
    parent = os.path.dirname(target)
    if is_pool_dir(parent):
        raise InvalidArgument(f"{what} {path} lies in the directory of pool {parent}: refusing to write into a pool")
    if st is None:
        return target
    hit = ids.get((st.st_dev, st.st_ino))
    if hit is not None:
        raise InvalidArgument(f"{what} {path} is a hard link to {hit[0]}, a file of pool {hit[1]}: refusing "
                              f"to overwrite it")
    if not stat.S_ISREG(st.st_mode):
        return given  # a pipe, terminal or device: written in place through the path as given
    if not os.path.exists(target):  # a magic link to a regular file realpath cannot name
        raise InvalidArgument(f"{what} {path}: cannot tell which file it names (resolves to {target})")
    _refuse_claimed_file(target, path, what)
    return target


def _refuse_claimed_file(target: str, path: str, what: str) -> None:
    """Refuse an existing regular file that a pool claims: it carries a data-file owner stamp
    (:mod:`thinpool.ownership`; a pool that is not running) or another process holds an flock on it
    (an open pool's data file or lock, wherever it lives)."""
    import fcntl
    try:
        from .ownership import read_stamp
        stamp = read_stamp(target)
    except (ImportError, OSError):
        stamp = None
    if stamp is not None:
        raise InvalidArgument(f"{what} {path} is the data file of {stamp.describe()} (it carries that pool's "
                              f"owner stamp): refusing to overwrite it")
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InvalidArgument(f"{what} {path} is locked by another process (an open pool's file?): refusing "
                              f"to overwrite it") from None
    except OSError:
        pass
    finally:
        os.close(fd)  # closing drops the probe's lock


class Output(NamedTuple):
    """An output being written: ``file`` (binary), its ``fd``, and whether it is a regular file
    (written to a temporary file, renamed over ``path`` on success).  Write to a regular output through
    ``file`` or :meth:`pwrite_all`/:meth:`truncate`: every failure is a
    :class:`~thinpool.errors.HostIOError` naming ``path``."""

    path: str
    file: IO[bytes]
    regular: bool

    @property
    def fd(self) -> int:
        return self.file.fileno()

    def pwrite_all(self, data: Any, offset: int) -> None:
        """Write all of ``data`` at byte ``offset`` (short counts continued, a write that took more than
        one call read back, :func:`thinpool.hostio.write_all`); HostIOError naming the output."""
        self.file.flush()
        write_all(os.pwrite, self.fd, data, offset, self.path)

    def truncate(self, size: int) -> None:
        """Set the output's size to ``size`` bytes; HostIOError naming the output."""
        self.file.flush()
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _host_error(exc, f"setting the size of {self.path} to {size} bytes", self.path) from None


def _host_error(exc: OSError, action: str, path: str) -> HostIOError:
    err = exc.errno or errno.EIO
    return HostIOError(f"{action} failed: {os.strerror(err)}", err, path)


class _DeviceRaw(io.RawIOBase):
    """The raw file under an output that is a FIFO, character or block device (written in place, with
    write(2) at its position): every failure a HostIOError naming ``path`` (``/dev/full``: ENOSPC)."""

    def __init__(self, fd: int, path: str, what: str, seekable: bool) -> None:
        super().__init__()
        self._fd, self._path, self._what, self._seekable = fd, path, what, seekable

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def _failed(self, exc: OSError, doing: str) -> HostIOError:
        err = exc.errno or errno.EIO
        return HostIOError(f"{doing} {self._what} {self._path} failed: {os.strerror(err)}", err, self._path)

    def write(self, b: Any) -> int:
        try:
            return os.write(self._fd, b)
        except OSError as exc:
            raise self._failed(exc, "writing") from None

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        try:
            return os.lseek(self._fd, offset, whence)
        except OSError as exc:
            raise self._failed(exc, "seeking in") from None

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _CheckedRaw(io.RawIOBase):
    """The raw file under a regular output's buffered writer: every write goes through
    :func:`thinpool.hostio.write_all` at the current position (a short count is continued; a layer that
    claims bytes it did not store is caught by the read-back), every failure a HostIOError naming the
    output ``path`` (not the temporary file)."""

    def __init__(self, fd: int, path: str) -> None:
        super().__init__()
        self._fd = fd
        self._path = path
        self._pos = 0

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        write_all(os.pwrite, self._fd, view, self._pos, self._path)
        self._pos += len(view)
        return len(view)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._pos
        elif whence == os.SEEK_END:
            offset += os.fstat(self._fd).st_size
        if offset < 0:
            raise ValueError(f"negative seek position {offset}")
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise _host_error(exc, f"setting the size of {self._path} to {size} bytes", self._path) from None
        return size

    def close(self) -> None:
        if not self.closed and self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        super().close()


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Any, *, pools: Iterable[Any] = (), what: str = "output",
                  mode: int | None = None) -> Iterator[Output]:
    """Open output ``path`` for writing after :func:`guard_output`.

    A regular (or new) file is written to ``.<name>.XXXX.tmp`` in the target's directory and renamed
    over the target only when the ``with`` block finishes without an exception (after an fsync); on an
    exception the temporary file is removed and the old target is untouched.  ``-`` yields stdout (not
    closed); an existing FIFO, character or block device is opened and written in place.  ``mode``: the
    new file's permissions (default: the old target's, else 0666 minus the umask)."""
    target = guard_output(path, pools=pools, what=what)
    if target == "-":
        sys.stdout.flush()
        yield Output("-", sys.stdout.buffer, False)
        sys.stdout.buffer.flush()
        return
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InvalidArgument(f"{what} {path}: {exc.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        block = stat.S_ISBLK(st.st_mode)
        try:
            dfd = os.open(target, os.O_RDWR if block else os.O_WRONLY | os.O_TRUNC)
        except OSError as exc:
            raise HostIOError(f"{what} {target}: cannot open it for writing: {os.strerror(exc.errno or errno.EIO)}",
                              exc.errno or errno.EIO, target) from None
        with io.BufferedWriter(_DeviceRaw(dfd, target, what, block), buffer_size=1 << 20) as f:
            yield Output(target, f, False)
            f.flush()
        return
    directory, base = os.path.split(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise InvalidArgument(f"{what} {path}: cannot create a file in {directory}: {exc.strerror}") from None
    try:
        if mode is None:
            if st is not None:
                mode = stat.S_IMODE(st.st_mode)
            else:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        raw = _CheckedRaw(fd, target)
        fd = -1
        with io.BufferedWriter(raw, buffer_size=1 << 20) as f:
            yield Output(target, f, True)
            f.flush()
            try:
                os.fsync(raw.fileno())
            except OSError as exc:
                raise HostIOError(f"flushing {what} {target} to disk failed: {os.strerror(exc.errno or errno.EIO)}; "
                                  f"{'the old file is left as it was' if st is not None else 'nothing was written'}",
                                  exc.errno or errno.EIO, target) from None
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise HostIOError(f"renaming the new {what} into place as {target} failed: "
                              f"{os.strerror(exc.errno or errno.EIO)}", exc.errno or errno.EIO, target) from None
        tmp = ""
        _fsync_dir(directory)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_output(path: Any, data: bytes | str, *, pools: Iterable[Any] = (), what: str = "output") -> None:
    """Write ``data`` (text is UTF-8 encoded) to output ``path`` through :func:`atomic_output`."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_output(path, pools=pools, what=what) as out:
        view = memoryview(raw)
        while len(view):
            n = out.file.write(view)
            if not n:
                raise OSError(f"short write to {out.path}")
            view = view[n:]
