"""``thinpool demo``'s compile helper (thinpool.containers.demo.compile_helper): on a cold kernel
cache a second process compiles the kernels the demo needs after ``write_one``.  It only helps if it
compiles them for the argument types the demo passes: after the helper's work, the demo itself must
compile nothing but ``write_one``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from thinpool import kernels_cache  # noqa: F401 -- the machine cache registered before a test patches it
from thinpool.containers import demo

from tests.support import compile_listener_script

_SCRIPT = compile_listener_script("""
from thinpool.containers.demo import _helper_work, run_demo
_helper_work()
helper = sorted(set(k for k in top if not k.endswith("._built_with")))
top.clear()
run_demo(data_size="1GiB")
import json
print(json.dumps(helper))
print(json.dumps(sorted(set(top))))
""")


@pytest.mark.slow
def test_after_the_helpers_work_the_demo_compiles_only_write_one(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    for name in ("NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT"):
        env.pop(name, None)
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    helper, rest = r.stdout.splitlines()[-2:]
    assert json.loads(helper) == sorted(demo.HELPER_KERNELS)
    # (write_one itself: by the helper too when it runs first, as here -- kernels.write_bytes runs it)
    assert set(json.loads(rest)) <= {"kernels.write_one"}


def test_no_helper_is_started_when_the_kernels_are_cached(tmp_path, monkeypatch):
    import pickle

    import numba

    from thinpool import jit_cache
    monkeypatch.setattr(jit_cache, "machine_dir", str(tmp_path))
    for k in demo.HELPER_KERNELS[:2]:
        (tmp_path / f"{k}-1.py311.nbi").write_bytes(pickle.dumps(numba.__version__))
    with demo.compile_helper() as helper:
        assert helper is None
    (tmp_path / f"{demo.HELPER_KERNELS[0]}-1.py311.nbi").unlink()
    with demo.compile_helper() as helper:
        assert helper is not None
    assert helper.returncode is not None  # stopped (or finished) when the block ended


def test_an_index_written_by_another_numba_version_counts_as_uncached(tmp_path, monkeypatch):
    """numba ignores an index whose first pickle is another version: such kernels compile again, so
    the demo must start its helper for them (a precompile by another numba does not help)."""
    import pickle

    import numba

    from thinpool import jit_cache
    monkeypatch.setattr(jit_cache, "machine_dir", str(tmp_path))
    a, b, c = demo.HELPER_KERNELS[:3]
    (tmp_path / f"{a}-1.py311.nbi").write_bytes(pickle.dumps(numba.__version__) + b"rest")
    (tmp_path / f"{b}-1.py311.nbi").write_bytes(pickle.dumps("0.1.0") + b"rest")
    (tmp_path / f"{c}-1.py311.nbi").write_bytes(b"\x00 not a pickle")
    assert demo.uncached((a, b, c)) == [b, c]
