"""The package type-checks: ``mypy thinpool`` finds nothing, with the settings of ``[tool.mypy]`` in
pyproject.toml (Python 3.11, the checks listed there; third-party packages without type information
named per module).  So does ``mypy perf`` (the benchmarks, and the test helpers they import), with
the same settings except that a function there may be annotated in part: a separate test, so a
benchmark's finding never hides the package's verdict.

mypy is a test extra (``pip install -e '.[test]'``, which tests/run.sh runs): without it the test
skips, and fails under ``CI=true``.  mypy's incremental cache is the repository's ``.mypy_cache``
(ignored by git): a first run analyses the package and the typed libraries it imports (about 10-15 s
of CPU), a later one only what changed (about 1 s).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT, require_module

pytestmark = pytest.mark.slow  # a first run (an empty cache: CI's fresh checkout) takes 10-20 s


def _mypy(*targets: str) -> tuple[int, list[str], str]:
    """Run mypy over ``targets`` with the repository's configuration: (exit status, its error lines,
    its whole output)."""
    require_module("mypy")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", *targets],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MYPY_FORCE_COLOR": "0"})
    output = proc.stdout + proc.stderr
    return proc.returncode, [line for line in output.splitlines() if ": error:" in line], output


def test_mypy_finds_nothing_in_the_package():
    status, errors, output = _mypy("thinpool")
    assert not errors, f"mypy thinpool: {len(errors)} finding(s):\n" + "\n".join(errors)
    assert status == 0, f"mypy thinpool exited with status {status}:\n{output}"
    assert "Success: no issues found" in output, output


def test_mypy_finds_nothing_in_perf():
    status, errors, output = _mypy("perf")
    assert not errors, f"mypy perf: {len(errors)} finding(s):\n" + "\n".join(errors)
    assert status == 0, f"mypy perf exited with status {status}:\n{output}"
    assert "Success: no issues found" in output, output
