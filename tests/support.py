"""Helpers shared by the test modules (fixtures built on them live in ``tests/conftest.py``).

- :func:`require_tool` / :func:`require_root`: skip on a developer machine, fail under ``CI=true``.
- :data:`SOAK` / :func:`soak_scaled` / :func:`soak_examples`: ``THINPOOL_SOAK=1`` selects the long settings of the
  fault suites and ten times the Hypothesis examples of the property tests.
- :func:`scratch_dir`: a directory on ``/dev/shm`` when writable (the fault suites write a lot), removed after.
- :data:`REPORTS`: reliability counts collected by the fault suites and written to ``.reliability/<name>.json``
  once, at the end of the session (``pytest_sessionfinish`` in conftest), whatever order the tests ran in.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import socket
import tempfile
from collections import Counter
from typing import Any, Callable, Iterator

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_DIR = os.path.join(REPO_ROOT, ".reliability")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SOAK = os.environ.get("THINPOOL_SOAK", "") not in ("", "0")


#: the prelude of a script that records the kernels numba compiles: every top-level compile (not the
#: functions a kernel calls) appends "module.function" to ``top`` (see :func:`compile_listener_script`)
_COMPILE_LISTENER = """
from numba.core import event
depth, top = [0], []

class Top(event.Listener):
    def on_start(self, ev):
        depth[0] += 1

    def on_end(self, ev):
        depth[0] -= 1
        if depth[0] == 0:
            f = ev.data["dispatcher"].py_func
            top.append(f.__module__.rsplit(".", 1)[-1] + "." + f.__name__)

event.register("numba:compile", Top())
"""


def compile_listener_script(body: str) -> str:
    """A ``python -c`` script: ``body`` run after a numba compile listener is registered; ``body`` reads
    and clears the list ``top`` of the kernels compiled so far (``"kernels.write_one"``, ...)."""
    return _COMPILE_LISTENER + body


def damage_a_new_leaf_page(pool: Any, path: Any, write: Callable[[], Any]) -> int:
    """Run ``write()``, commit and close ``pool`` (kept at directory ``path``), then damage the first
    dense-leaf page that commit wrote (16 bytes inside its metadata block); returns the block."""
    from thinpool import nodestore
    before = set(pool.store.locs[nodestore.LEAVES.dense_array].tolist())
    write()
    pool.commit()
    new = [loc >> 32 for loc in pool.store.locs[nodestore.LEAVES.dense_array].tolist() if loc and loc not in before]
    pool.close()
    assert new, "the commit wrote no new dense leaf page"
    with open(os.path.join(path, "metadata"), "r+b") as f:
        f.seek(new[0] * 4096 + 100)
        f.write(b"\xa5" * 16)
    return new[0]


@contextlib.contextmanager
def serving_with_loop_probe(monkeypatch: Any, server: Any, root: str, record: Callable[[Any], None]) -> Iterator[None]:
    """Run the NBD ``server`` (then shut it down and remove ``root``), each session's compiled loop
    handed to ``record(loop)`` when it closes (a :class:`thinpool.nbd.readloop.CompiledReads` that ran)."""
    from thinpool.nbd import readloop
    close = readloop.CompiledReads.close

    def probing_close(self: Any) -> None:
        if self.registered:
            record(self)
        close(self)
    monkeypatch.setattr(readloop.CompiledReads, "close", probing_close)
    server.start()
    try:
        yield
    finally:
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def unix_socket_accepts(path: str) -> bool:
    """Whether a connection to the unix socket ``path`` is accepted (a listener is there)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


@contextlib.contextmanager
def address_space_headroom(extra: int) -> Iterator[None]:
    """Cap this process's address space (RLIMIT_AS) at what it maps now plus ``extra`` bytes, so a
    runaway allocation fails fast with MemoryError/ENOMEM; restored after.  Relative to the current
    size, not absolute: late in a full test run the process already maps several GiB (numba, threads'
    stacks, other tests' leftovers), and an absolute cap would refuse even a small mapping."""
    import resource
    with open("/proc/self/status") as f:
        vm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_kib * 1024 + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def soak_scaled(env: str, normal: int, soak: int) -> int:
    """An iteration count: ``$env`` when set, else ``soak`` under THINPOOL_SOAK=1, else ``normal``."""
    return int(os.environ.get(env, soak if SOAK else normal))


def soak_examples(normal: int, factor: int = 10) -> int:
    """A Hypothesis ``max_examples``: ``normal``, or under THINPOOL_SOAK=1 ``normal`` times
    ``$THINPOOL_EXAMPLES_FACTOR`` (``factor`` when unset)."""
    if not SOAK:
        return normal
    return normal * int(os.environ.get("THINPOOL_EXAMPLES_FACTOR", factor))


def require_tool(*names: str) -> None:
    """Skip (or fail under CI=true) unless every named executable is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        msg = f"needs {', '.join(missing)} (install thin-provisioning-tools/qemu-utils/libnbd-bin/fio/fuse3)"
        if IN_CI:
            pytest.fail(msg + " -- CI=true, so a missing tool is a failure")
        pytest.skip(msg)


def require_module(name: str):
    """The imported Python module ``name`` (a test extra: ``pip install -e '.[test]'``); skip if it is
    missing, or fail under CI=true, where tests/run.sh installs the extras."""
    if IN_CI:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            pytest.fail(f"needs the Python module {name} ({exc}) -- CI=true, so a missing module is a failure")
    return pytest.importorskip(name)


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


def scratch_root() -> str:
    """Where scratch pools go: ``/dev/shm`` when writable (memory-backed), else the temp directory."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def pool_with_volumes(tmp_path: Any, names: tuple[str, ...] = ("a", "b")) -> Any:
    """A committed pool at ``tmp_path/pool`` (16 MiB of 64 KiB blocks) with a 4 MiB volume per name,
    each with its first block written (``b"x"``)."""
    from thinpool import Pool
    p = Pool.create(str(tmp_path / "pool"), data_size=16 << 20, block_size=64 << 10)
    for n in names:
        p.create_thin(n, 4 << 20).write(0, b"x" * (64 << 10))
    p.commit()
    return p


@contextlib.contextmanager
def scratch_dir(prefix: str = "tp-") -> Iterator[str]:
    """A fresh directory under :func:`scratch_root`, removed with its contents on exit."""
    d = tempfile.mkdtemp(prefix=prefix, dir=scratch_root())
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Reports:
    """Reliability reports of one test session: named counters (and whole records) that are written
    as ``<REPORT_DIR>/<name>.json`` at session end.  A report nothing was counted into is not written,
    so running a subset of the tests never overwrites a full run's figures with zeros."""

    def __init__(self) -> None:
        self._counters: dict[str, Counter] = {}
        self._summaries: dict[str, Callable[[Counter], dict[str, Any]]] = {}
        self._records: dict[str, dict[str, Any]] = {}

    def counter(self, name: str, summary: Callable[[Counter], dict[str, Any]] | None = None) -> Counter:
        """The session's counter for report ``name`` (created on first use).  ``summary`` turns the
        counts into the JSON written at the end (default: the counts, sorted by key)."""
        c = self._counters.setdefault(name, Counter())
        if summary is not None:
            self._summaries[name] = summary
        return c

    def record(self, name: str, data: dict[str, Any]) -> None:
        """Set report ``name`` to ``data`` as is (for a test that measures a whole run itself)."""
        self._records[name] = dict(data)

    def merge(self, reports: dict[str, dict[str, Any]]) -> None:
        """Take over reports another process collected (a pytest-xdist worker's :meth:`collected`).
        A module's tests run in one worker (tests/conftest.py groups them), so a report comes whole
        from one process; one that two processes counted into cannot be added up from its summaries
        and is an error."""
        for name, data in reports.items():
            if name in self._records or self._counters.get(name):
                raise RuntimeError(f"reliability report {name!r} was counted in two test processes: "
                                   "its tests must run in one (tests/conftest.py's xdist groups)")
            self._records[name] = data

    def collected(self) -> dict[str, dict[str, Any]]:
        """Every non-empty report of this session, by name."""
        out: dict[str, dict[str, Any]] = {}
        for name, c in self._counters.items():
            if c:
                summary = self._summaries.get(name)
                out[name] = summary(c) if summary else dict(sorted(c.items()))
        out.update(self._records)
        return out

    def write(self, directory: str = REPORT_DIR) -> list[str]:
        """Write every non-empty report to ``directory``; returns the paths written."""
        paths = []
        for name, data in sorted(self.collected().items()):
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, name + ".json")
            with open(path, "w") as f:
                json.dump(data, f, indent=2, default=str)
            paths.append(path)
        return paths


REPORTS = Reports()
