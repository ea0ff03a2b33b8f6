"""Fixtures and session hooks shared by the whole suite (plain helpers live in :mod:`tests.support`).

- ``soak``: True under ``THINPOOL_SOAK=1`` (the fault suites' long settings).
- ``scratch`` / ``module_scratch``: a fresh directory on ``/dev/shm`` when writable, removed afterwards.
- Reliability reports (``tests.support.REPORTS``) are written to ``.reliability/`` once, at session end.
- Tests under ``tests/crash/`` are marked ``slow`` (deselect them with ``-m "not slow"``).
- Under pytest-xdist (``tests/run.sh`` runs ``-n 2 --dist loadgroup``) every module's tests form one
  group: they run in one worker, in file order, as in a serial run (module-scoped fixtures are built
  once, a module's counters and order-dependent tests see all of its tests); workers hand their
  reliability reports to the controller, which writes them.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import pytest

from tests.support import REPORTS, SOAK, scratch_dir

_HERE = os.path.dirname(os.path.abspath(__file__))
_SLOW_DIRS = (os.path.join(_HERE, "crash") + os.sep,)
_WRITTEN = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def soak() -> bool:
    """Whether THINPOOL_SOAK asks for the long settings."""
    return SOAK


@pytest.fixture
def scratch() -> Iterator[str]:
    """A fresh scratch directory (memory-backed when possible) for one test."""
    with scratch_dir("tp-test-") as d:
        yield d


@pytest.fixture(scope="module")
def module_scratch(request: pytest.FixtureRequest) -> Iterator[str]:
    """A scratch directory shared by the tests of one module (for module-scoped pools)."""
    with scratch_dir(f"tp-{request.module.__name__.rsplit('.', 1)[-1]}-") as d:
        yield d


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test of the fault suites (tests/crash/) is ``slow``; in a pytest-xdist worker, every
    test is in the group of its module (``--dist loadgroup`` keeps a group in one worker)."""
    in_worker = hasattr(config, "workerinput")
    for item in items:
        if str(item.path).startswith(_SLOW_DIRS):
            item.add_marker(pytest.mark.slow)
        if in_worker:
            item.add_marker(pytest.mark.xdist_group(os.path.relpath(item.path, _HERE)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write the reliability reports counted during the session (a pytest-xdist worker hands its
    reports to the controller instead, which writes them all)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["thinpool_reports"] = json.dumps(REPORTS.collected(), default=str)
        return
    session.config.stash[_WRITTEN] = REPORTS.write()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """(pytest-xdist, in the controller) A worker finished: take over the reports it counted."""
    reports = getattr(node, "workeroutput", {}).get("thinpool_reports")
    if reports:
        REPORTS.merge(json.loads(reports))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Name the reliability reports written (their figures go into docs/reliability.md)."""
    written = config.stash.get(_WRITTEN, [])
    if written:
        terminalreporter.write_line("reliability reports: " + ", ".join(os.path.relpath(p) for p in written))
