"""thinpool's build backend: setuptools', plus compiling the demo's numba kernels after a build.

``pip install .`` and ``pip install -e .`` (the README's install command) build through this module
(pyproject.toml, ``[build-system]``).  Every hook is setuptools' own; ``build_wheel`` and
``build_editable`` then run ``python -m thinpool.cli.precompile`` from the source tree, in
the build environment, which for that gets the package's dependencies (numba ...) on top of
setuptools -- the numba and numpy versions of the environment being installed into when it has them
(numba ignores a cache entry another numba version wrote).  The kernels land in the installing
user's kernel cache (``$XDG_CACHE_HOME/thinpool/kernels``, ``~/.cache/...``), where the first
``thinpool demo`` loads them instead of compiling them.

The step never fails a build: without a writable cache, with ``NUMBA_DISABLE_JIT=1`` or with
``THINPOOL_NO_PRECOMPILE=1`` it compiles nothing (the first run compiles, as before), and an error
is reported on stderr and otherwise ignored.
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (build_sdist, get_requires_for_build_sdist,  # noqa: F401 -- re-exported hooks
                                   prepare_metadata_for_build_editable, prepare_metadata_for_build_wheel)

#: what ``python -m thinpool.cli.precompile`` imports (the demo's library path and the CLI): the
#: package's dependencies (pyproject.toml)
COMPILE_REQUIRES = {"numba": "numba>=0.59", "numpy": "numpy>=1.26", "crc32c": "crc32c>=2.4",
                    "orjson": "orjson>=3.8", "click": "click>=8.1", "rich": "rich>=13"}
#: the versions pinned to the target environment's, when it has them
PINNED = ("numba", "numpy")
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _skip() -> bool:
    return os.environ.get("THINPOOL_NO_PRECOMPILE", "") not in ("", "0") or os.environ.get("NUMBA_DISABLE_JIT") == "1"


def target_versions(python: str = sys.executable) -> dict[str, str]:
    """The versions of :data:`PINNED` installed for ``python`` outside the build environment:
    ``python -I`` ignores the ``PYTHONPATH`` through which pip's isolated build environment hides the
    interpreter's own site-packages.  Empty when they cannot be found."""
    code = ("import importlib.metadata as m, json\nout = {}\nfor n in %r:\n    try:\n"
            "        out[n] = m.version(n)\n    except m.PackageNotFoundError:\n        pass\n"
            "print(json.dumps(out))" % (PINNED,))
    try:
        r = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60)
        import json
        found = json.loads(r.stdout) if r.returncode == 0 else {}
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, str) and v.replace(".", "").isalnum()}


def compile_requires() -> list[str]:
    """The build environment's extra requirements for the precompile step."""
    if _skip():
        return []
    pins = target_versions()
    return [f"{name}=={pins[name]}" if name in pins else spec for name, spec in COMPILE_REQUIRES.items()]


def precompile(source_root: str = SOURCE_ROOT, environ: dict[str, str] | None = None) -> int:
    """Run ``python -m thinpool.cli.precompile`` on ``source_root``'s package (in ``environ``,
    default this process's environment); returns its exit status (never raises)."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get("THINPOOL_NO_PRECOMPILE", "") not in ("", "0") or environ.get("NUMBA_DISABLE_JIT") == "1":
        sys.stderr.write("thinpool: kernels not compiled at install (THINPOOL_NO_PRECOMPILE or NUMBA_DISABLE_JIT)\n")
        return 0
    env = dict(environ, PYTHONPATH=os.pathsep.join(p for p in (source_root, environ.get("PYTHONPATH")) if p))
    env.pop("NUMBA_DISABLE_JIT", None)
    try:
        return subprocess.run([sys.executable, "-m", "thinpool.cli.precompile"], cwd=source_root, env=env,
                              stdin=subprocess.DEVNULL, timeout=900).returncode
    except (OSError, subprocess.SubprocessError) as e:
        sys.stderr.write(f"thinpool: kernels not compiled at install: {e}\n")
        return 1


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + compile_requires()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + compile_requires()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    precompile()
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    precompile()
    return name
