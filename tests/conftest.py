"""Shared test fixtures.

Tests that need a real tool call :func:`require_tool`; on a developer machine without the tool
they skip with a reason, but under ``CI=true`` a missing tool is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(*names: str) -> None:
    """Skip (or fail under CI=true) unless every named executable is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        msg = f"needs {', '.join(missing)} (install thin-provisioning-tools/qemu-utils/libnbd-bin/fio/fuse3)"
        if IN_CI:
            pytest.fail(msg + " -- CI=true, so a missing tool is a failure")
        pytest.skip(msg)


def require_root() -> None:
    """Skip (or fail under CI=true) unless running as root with /dev/fuse present."""
    problems = []
    if os.geteuid() != 0:
        problems.append("root")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse")
    if problems:
        msg = f"needs {' and '.join(problems)}"
        if IN_CI:
            pytest.fail(msg + " -- CI=true, so this is a failure")
        pytest.skip(msg)
