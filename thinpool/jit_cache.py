"""Where numba caches thinpool's compiled kernels, chosen before numba is imported.

The kernels are compiled with ``cache=True``.  numba's own choice of cache directory is per
checkout: the package's ``__pycache__`` if writable, else ``$NUMBA_CACHE_DIR``, else
``$XDG_CACHE_HOME/numba`` / ``~/.cache/numba`` under a name made from the source directory's path.
A fresh clone or a new virtual environment therefore compiled every kernel again (about 15 s of CPU
for the ones ``thinpool demo`` runs).  thinpool puts its kernel modules' cache in a per-user machine
directory instead, keyed by what the code was compiled from, not by where it lies:
``$XDG_CACHE_HOME/thinpool/kernels/<digest>`` (``~/.cache/...`` without ``XDG_CACHE_HOME``), where
``<digest>`` is :func:`thinpool.kernels_cache.sources_digest` of the kernel sources.  Any checkout
or install of the same sources on the same machine (as the same user) loads what the first one
compiled; numba itself still keys each entry on its version, the Python version, the CPU and the
kernel's bytecode, so a different numba or processor compiles afresh beside it.  Directories of
sources not used for 30 days are removed when a new one is made.

``$NUMBA_CACHE_DIR``, when set and writable, is the user's explicit choice and numba's own layout
is used there.  When no location is writable (an installed package run by a user whose HOME does not
exist or is read-only) numba does not fall back to compiling without a cache: it raises
``RuntimeError: cannot cache function ...: no locator available`` on import, and every command that
touches data dies with a traceback.  :func:`configure` (run by ``import thinpool``) detects that case
and points ``NUMBA_CACHE_DIR`` at a private directory under the system temporary directory, printing
one warning line to stderr.  :func:`install_locator` (run by :mod:`thinpool.kernels_cache`, which
every kernel module imports before defining a kernel) registers the machine directory with numba.
Every kernel's cache files detect damage (:func:`harden`): a data file failing its checksum or an
unreadable index is compiled again and replaced, where numba alone would raise or run it.
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys
import tempfile
import time
from typing import Any

_done = False
#: the per-user base of the machine kernel cache chosen by :func:`configure` (None: numba's own choice)
_machine_base: str | None = None
#: the kernel cache directory in use once :func:`install_locator` ran (None: numba's own choice)
machine_dir: str | None = None
#: directories of other sources last used longer ago than this are removed when a new one is made
PRUNE_AFTER_S = 30 * 24 * 3600
#: the kernel compile locks this process holds (see :func:`serialize_compiles`)
_held: set[str] = set()


def _writable_dir(path: str) -> bool:
    """Whether ``path`` is (or can be made) a directory this process can create files in -- the
    test numba itself applies."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _cache_home() -> str:
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def _user_cache_dir() -> str:
    return os.path.join(_cache_home(), "numba")


def _private_temp_dir() -> str | None:
    """``$TMPDIR/thinpool-numba-<uid>``, created 0700 (reused only if it is a real directory of ours
    that no one else can write), else a fresh ``mkdtemp``; None if neither can be made."""
    path = os.path.join(tempfile.gettempdir(), f"thinpool-numba-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        path = ""
    if path:
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022 \
                    and _writable_dir(path):
                return path
        except OSError:
            pass
    try:
        return tempfile.mkdtemp(prefix="thinpool-numba-")
    except OSError:
        return None


def configure() -> str | None:
    """Make sure numba has a writable cache directory for the kernels; returns the directory set
    (None when numba's own choice works).  Idempotent; warns once (stderr) when it falls back."""
    global _done, _machine_base
    if _done:
        return None
    _done = True
    if os.environ.get("NUMBA_DISABLE_JIT") == "1":
        return None
    user_dir = os.environ.get("NUMBA_CACHE_DIR")
    if user_dir and _writable_dir(user_dir):
        return None
    if not user_dir:
        base = os.path.join(_cache_home(), "thinpool", "kernels")
        if _writable_dir(base):
            _machine_base = base
            return None
        in_tree = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
        if _writable_dir(in_tree) or _writable_dir(_user_cache_dir()):
            return None
    fallback = _private_temp_dir()
    if fallback is None:
        sys.stderr.write("thinpool: warning: no writable directory for numba's kernel cache (set NUMBA_CACHE_DIR)\n")
        return None
    os.environ["NUMBA_CACHE_DIR"] = fallback
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba already imported: its config has read the environment
        # (mypy: numba.config's settings are set at run time, not annotated)
        config.CACHE_DIR = fallback  # type: ignore[attr-defined]
    why = f"NUMBA_CACHE_DIR={user_dir} is not writable" if user_dir else \
        f"neither the package's __pycache__ nor {_user_cache_dir()} is writable"
    sys.stderr.write(f"thinpool: warning: {why}; compiled kernels are cached in {fallback}\n")
    return fallback


def _prune(base: str, keep: str) -> None:
    """Remove the cache directories under ``base`` other than ``keep`` not used for
    :data:`PRUNE_AFTER_S` (each use touches its directory)."""
    cutoff = time.time() - PRUNE_AFTER_S
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        if name == keep or not name.isalnum():
            continue
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_mtime >= cutoff:
                continue
            for entry in os.listdir(path):
                os.unlink(os.path.join(path, entry))
            os.rmdir(path)
        except OSError:
            continue  # in use or already gone: a later prune tries again


def install_locator(sources_digest: int, sources: tuple[str, ...]) -> str | None:
    """Register the machine kernel cache with numba (see the module docstring) for the package's
    files named in ``sources`` (:data:`thinpool.kernels_cache.SOURCES`), keyed by ``sources_digest``
    (their :func:`~thinpool.kernels_cache.sources_digest`); returns its directory, or None when
    :func:`configure` left the choice to numba.  Idempotent; must run before the kernel modules
    define their kernels (numba picks a kernel's cache location then)."""
    global machine_dir
    if machine_dir is not None or _machine_base is None:
        return machine_dir
    if sources_digest == 0:  # no sources to key on: numba's own per-file choice
        return None
    from numba.core import caching

    digest = f"{sources_digest:016x}"
    path = os.path.join(_machine_base, digest)
    try:
        os.mkdir(path, 0o755)
        _prune(_machine_base, digest)
    except FileExistsError:
        try:
            os.utime(path)  # last used now: kept by the prune
        except OSError:
            pass
    except OSError:
        return None
    package = os.path.dirname(os.path.abspath(__file__))
    names = frozenset(sources)

    class MachineCacheLocator(caching._CacheLocator):
        """numba cache locator for thinpool's kernel modules: the machine directory of these sources,
        stamped with their digest (content, not file times), so every checkout of them shares it."""

        def __init__(self, py_func: Any, py_file: str) -> None:
            self._lineno = py_func.__code__.co_firstlineno

        def get_cache_path(self) -> str:
            return path

        def get_source_stamp(self) -> str:
            return digest

        def get_disambiguator(self) -> str:
            return str(self._lineno)

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> "MachineCacheLocator | None":
            py_file = os.path.abspath(py_file)
            if os.path.dirname(py_file) != package or os.path.basename(py_file) not in names:
                return None
            self = cls(py_func, py_file)
            try:
                self.ensure_cache_path()
            except OSError:
                return None
            return self

    impl = caching.CacheImpl
    impl._locator_classes = [MachineCacheLocator] + [c for c in impl._locator_classes
                                                      if c.__name__ != "MachineCacheLocator"]
    machine_dir = path
    return path


def serialize_compiles(namespace: dict[str, Any]) -> int:
    """Make the kernels of ``namespace`` (a kernel module's globals) compile one process at a time
    machine-wide: each kernel's compilation takes an exclusive ``flock`` on ``<kernel>.lock`` in the
    machine cache directory, and numba looks in the cache only once it holds it.  So a process that
    needs a kernel another process is compiling waits for it and loads it from the cache instead of
    compiling it a second time (``thinpool demo``'s helper process relies on this: see
    :mod:`thinpool.containers.demo`), and two processes never save entries of one kernel at once.
    Returns how many kernels were wrapped (0 without a machine cache directory).  Also makes every
    kernel's cache files detect damage (:func:`harden`), whichever directory holds them.

    The lock is taken inside numba's own (per-process) compiler lock, so the threads of one process
    cannot deadlock on it; between processes, a kernel's lock is only ever requested while holding
    the locks of kernels that call it (numba compiles callees while compiling a caller), and no kernel
    calls itself through another, so the waits cannot form a cycle."""
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.dispatcher import Dispatcher
    module = namespace["__name__"]
    wrapped = 0
    for obj in list(namespace.values()):
        if not isinstance(obj, Dispatcher) or obj.py_func.__module__ != module or "compile" in vars(obj):
            continue
        cache_file = getattr(getattr(obj, "_cache", None), "_cache_file", None)
        if cache_file is not None:
            harden(cache_file)
        if machine_dir is None:
            continue
        path = os.path.join(machine_dir, f"{module.rsplit('.', 1)[-1]}.{obj.py_func.__name__}.lock")
        # (mypy: the dispatcher's compile is wrapped on purpose)
        obj.compile = _locked_compile(obj.compile, path, global_compiler_lock)  # type: ignore[method-assign]
        wrapped += 1
    return wrapped


#: the first bytes of a kernel data file (``.nbc``) thinpool saved: magic, then a BLAKE2b-256 of the rest
DATA_MAGIC = b"thinpool-nbc-1\0"
#: the kernel cache files found damaged (unreadable index, data failing its checksum) in this process
damaged: list[str] = []


def harden(cache_file: Any) -> None:
    """Make one kernel's numba cache file (a ``numba.core.caching.IndexDataCacheFile``) detect damage:
    each saved data file carries a checksum of its payload, checked before numba unpickles it (a data
    file that fails it, or was written without one, is treated as missing: the kernel compiles again
    and the save replaces it); an index that cannot be read (truncated, not numba's format) counts as
    empty and is rewritten by the next save.  numba alone would raise (or, for damaged machine code
    that still unpickles, run it)."""
    if getattr(cache_file, "_thinpool_hardened", False):
        return
    import hashlib
    import pickle

    from numba.core.caching import _cache_log  # numba's NUMBA_DEBUG_CACHE lines, kept for our files

    load_index = cache_file._load_index

    def _load_index() -> dict:
        try:
            overloads = load_index()
        except Exception:  # noqa: BLE001 -- any undecodable index is damage, not a reason to crash
            damaged.append(cache_file._index_path)
            return {}
        if not isinstance(overloads, dict):
            damaged.append(cache_file._index_path)
            return {}
        return overloads

    def _save_data(name: str, data: Any) -> None:
        payload = cache_file._dump(data)
        with cache_file._open_for_write(cache_file._data_path(name)) as f:
            f.write(DATA_MAGIC + hashlib.blake2b(payload, digest_size=32).digest() + payload)
        _cache_log("[cache] data saved to %r", cache_file._data_path(name))

    def _load_data(name: str) -> Any:
        path = cache_file._data_path(name)
        with open(path, "rb") as f:
            raw = f.read()
        head, digest, payload = raw[:len(DATA_MAGIC)], raw[len(DATA_MAGIC):len(DATA_MAGIC) + 32], \
            raw[len(DATA_MAGIC) + 32:]
        if head != DATA_MAGIC or hashlib.blake2b(payload, digest_size=32).digest() != digest:
            damaged.append(path)
            return None  # as if missing: numba compiles and saves over it
        try:
            data = pickle.loads(payload)
        except Exception:  # noqa: BLE001 -- checksummed yet unreadable (another numba): compile afresh
            damaged.append(path)
            return None
        _cache_log("[cache] data loaded from %r", path)
        return data

    cache_file._load_index = _load_index
    cache_file._save_data = _save_data
    cache_file._load_data = _load_data
    cache_file._thinpool_hardened = True


def _locked_compile(compile_: Any, path: str, compiler_lock: Any) -> Any:
    def compile(sig: Any) -> Any:
        with compiler_lock:
            if path in _held:  # this process holds it already (a kernel compiled inside its own compile)
                return compile_(sig)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                return compile_(sig)  # no lock to be had: compile as numba alone would
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError:  # a file system without flock (ENOLCK): compile as numba alone would
                    return compile_(sig)
                _held.add(path)
                try:
                    return compile_(sig)
                finally:
                    _held.discard(path)
            finally:
                os.close(fd)  # releases the lock
    return compile
