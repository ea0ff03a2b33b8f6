"""Where numba caches thinpool's compiled kernels, chosen before numba is imported.

The kernels are compiled with ``cache=True``.  numba stores that cache in the package's own
``__pycache__`` if writable, else in ``$NUMBA_CACHE_DIR``, else in ``$XDG_CACHE_HOME/numba`` /
``~/.cache/numba``; when none is writable (an installed package run by a user whose HOME does not
exist or is read-only) it does not fall back to compiling without a cache: it raises
``RuntimeError: cannot cache function ...: no locator available`` on import, and every command that
touches data dies with a traceback.  :func:`configure` (run by ``import thinpool``) detects that case
and points ``NUMBA_CACHE_DIR`` at a private directory under the system temporary directory, printing
one warning line to stderr.  It touches nothing when a default location works.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile

_done = False


def _writable_dir(path: str) -> bool:
    """Whether ``path`` is (or can be made) a directory this process can create files in -- the
    test numba itself applies."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _user_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "numba")


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
    global _done
    if _done:
        return None
    _done = True
    if os.environ.get("NUMBA_DISABLE_JIT") == "1":
        return None
    user_dir = os.environ.get("NUMBA_CACHE_DIR")
    if user_dir and _writable_dir(user_dir):
        return None
    if not user_dir:
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
        config.CACHE_DIR = fallback
    why = f"NUMBA_CACHE_DIR={user_dir} is not writable" if user_dir else \
        f"neither the package's __pycache__ nor {_user_cache_dir()} is writable"
    sys.stderr.write(f"thinpool: warning: {why}; compiled kernels are cached in {fallback}\n")
    return fallback
