"""Kernels compiled at install (thinpool.cli.precompile, run by build_backend/thinpool_build.py
after ``pip install`` builds): the first ``thinpool demo`` afterwards must compile nothing, the step
must write only into the installing user's kernel cache, never fail a build, and build against the
numba the target environment runs (numba ignores an index another version wrote)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numba
import numpy
import pytest

from tests.support import compile_listener_script
from thinpool.cli import precompile

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "build_backend"))
import thinpool_build  # noqa: E402 -- the build backend, from its backend-path

_DEMO_COMPILES = compile_listener_script("""
from thinpool.containers.demo import run_demo
run_demo(data_size="1GiB")
demo = sorted(set(top))
top.clear()
from thinpool.cli.precompile import _cli_work
_cli_work()  # the common commands, in a process of their own
import json
print(json.dumps(demo))
print(json.dumps(sorted(set(top))))
""")


def _env(cache_home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home), **extra)
    for name in ("NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT", "THINPOOL_NO_PRECOMPILE"):
        if name not in extra:
            env.pop(name, None)
    return env


def _fresh_source_tree(dest: Path) -> Path:
    """What a fresh clone has: the package without byte code, the build backend, pyproject.toml."""
    for name in ("thinpool", "build_backend"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    return dest


@pytest.mark.slow
def test_a_pip_build_compiles_the_kernels_and_the_first_demo_and_commands_compile_none(tmp_path):
    """``pip wheel`` of a fresh source tree (pip's isolated build environment, as ``pip install``
    makes it: the build requirements come from the package index) runs the backend's step, into the
    user's kernel cache only; a demo run from that tree then loads every kernel and compiles nothing,
    nor do the common commands (precompile.CLI_COMMANDS) run afterwards."""
    src = _fresh_source_tree(tmp_path / "src")
    cache = tmp_path / "cache"
    env = _env(cache)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w",
                        str(tmp_path / "wheels"), str(src)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert list((tmp_path / "wheels").glob("thinpool-*.whl"))
    dirs = list((cache / "thinpool" / "kernels").iterdir())
    assert len(dirs) == 1  # one directory: the digest of these sources
    for k in precompile.DEMO_KERNELS:
        assert list(dirs[0].glob(f"{k}-*.nbi")), k
    assert not list(src.rglob("*.nbi")) and not list(src.rglob("*.nbc"))  # nothing beside the sources
    r = subprocess.run([sys.executable, "-c", _DEMO_COMPILES], env=_env(cache, PYTHONPATH=str(src)),
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x) for x in r.stdout.splitlines()[-2:]] == [[], []]


def test_the_step_is_skipped_on_request_and_never_fails(tmp_path):
    cache = tmp_path / "cache"
    env = _env(cache, THINPOOL_NO_PRECOMPILE="1")
    code = f"import sys; sys.path.insert(0, {str(REPO / 'build_backend')!r}); import thinpool_build; " \
           "print(thinpool_build.precompile(), thinpool_build.compile_requires())"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["0", "[]"], r.stderr
    assert "not compiled at install" in r.stderr and not cache.exists()
    # a JIT-off run: nothing compiled, exit status 0, a line saying so
    r = subprocess.run([sys.executable, "-m", "thinpool.cli.precompile"], cwd=REPO,
                       env=_env(cache, NUMBA_DISABLE_JIT="1", PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "not compiled ahead" in r.stderr and not cache.exists()


def test_the_build_environment_gets_the_numba_and_numpy_of_the_target_environment(monkeypatch):
    """numba writes its version into each index and ignores another's: the build compiles with the
    numba the installed package will run (here: the interpreter running the tests)."""
    assert thinpool_build.target_versions() == {"numba": numba.__version__, "numpy": numpy.__version__}
    reqs = thinpool_build.compile_requires()
    assert f"numba=={numba.__version__}" in reqs and f"numpy=={numpy.__version__}" in reqs
    assert any(r.startswith("crc32c") for r in reqs) and any(r.startswith("orjson") for r in reqs)
    # what pip asks the backend before building an editable install includes them
    monkeypatch.chdir(REPO)  # pip runs the hooks in the source tree
    assert set(reqs) <= set(thinpool_build.get_requires_for_build_editable())


def test_the_build_environment_is_unpinned_when_the_target_has_no_numba(tmp_path):
    """A fresh virtual environment has no numba yet: pip installs the newest into both."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    assert thinpool_build.target_versions(str(venv / "bin" / "python")) == {}


_SERVE_SIGNATURES = """
import json, os, subprocess, sys, tempfile
from numba.core.dispatcher import Dispatcher
from thinpool import kernels, kernels_map, kernels_nbd, kernels_pages, kernels_replay, walks
from thinpool.cli import precompile

MODULES = (kernels, kernels_map, kernels_nbd, kernels_pages, kernels_replay, walks)

def signatures():
    return {(m.__name__.rsplit(".", 1)[-1] + "." + n, str(s)) for m in MODULES for n, o in vars(m).items()
            if isinstance(o, Dispatcher) and o.py_func.__module__ == m.__name__ for s in o.signatures}

precompile._serve_work()
after_precompile = signatures()
# a pool made by the CLI, then served the way `thinpool serve` serves it (writable, then read-only)
from thinpool.cli.registry import op_table
from thinpool.nbd.served import Served
tmp = tempfile.mkdtemp()
pool = os.path.join(tmp, "pool")
for args in (["create", pool, "--data-size", "1GiB", "--block-size", "128KiB"], ["create-thin", pool, "a", "1GiB"],
             ["create-thin", pool, "b", "64MiB"]):
    subprocess.run([sys.executable, "-m", "thinpool", *args], check=True, stdout=subprocess.DEVNULL)
for read_only in (False, True):
    s = Served(pool, op_table(), read_only=read_only)
    s.start()
    s.stop()
print(json.dumps(sorted({k for k, _ in after_precompile})))
print(json.dumps(sorted(signatures() - after_precompile)))
"""


def test_the_install_step_compiles_every_kernel_a_served_pool_compiles_at_start(tmp_path):
    """``thinpool serve`` runs its kernels once before the first client (nbd/served.py ``warm_up``: the
    NBD session's compiled request loop, a read, a mapping query).  After the install step's serve work
    (``precompile._serve_work``), starting a served pool adds no kernel signature -- so nothing it runs
    at start compiles when the install's cache is there -- and every kernel of
    ``precompile.SERVE_KERNELS`` (the list whose cached index the step reports) was reached."""
    r = subprocess.run([sys.executable, "-c", _SERVE_SIGNATURES], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-3000:]
    reached, added = (json.loads(x) for x in r.stdout.splitlines()[-2:])
    assert added == []
    assert set(precompile.SERVE_KERNELS) <= set(reached)
