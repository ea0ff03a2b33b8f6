"""Host-filesystem faults while a command writes a file outside the pool, or a new pool: `export`,
`read -o`, `dump -o`, `export-metadata`, `import`, `restore`, `import-metadata`.

Two methods, each counted into ``.reliability/output_faults.json`` (docs/reliability.md keeps the figures):

* **strace** on a subprocess ``python3 -m thinpool ...``: a clean run under ``strace -f -e trace=...``
  enumerates the command's own write/pwrite64/fsync/fdatasync/rename*/fallocate/ftruncate calls (writes
  to stdout and stderr left out), then every K-th call of each kind gets one fault
  (``-e inject=SYSCALL:retval=N:when=K`` -- a short count that strace claims without storing anything --
  or ``:error=ENOSPC`` / ``:error=EIO``).  By default one call of each class per command (the last data write,
  a flush, the rename; the faults rotate); ``THINPOOL_SOAK=1`` tries every fault at every K;
* **a real small filesystem**: the same commands in-process onto a loop-mounted ext4 image filled to H KiB
  of headroom (root; skipped with a reason otherwise, a failure under CI=true).

Every case must either fail cleanly -- exit 1, one ``thinpool: error:`` line naming the file, no
traceback, the output target absent or holding its old bytes, no temporary file left, the source pool
byte-for-byte unchanged and ``check`` clean -- or succeed completely (output equal to a clean run's).
For ``import``: the pool holds the imported volume with exactly the image's bytes, or its previous
committed state.  For ``restore``/``import-metadata``: the new pool is complete, or nothing is left.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from tests.crash.test_host_faults import _free_bytes, small_ext4  # noqa: F401 (a fixture)
from tests.support import require_tool, IN_CI, REPORTS, SOAK
from thinpool import Pool
from thinpool.errors import ThinpoolWarning

STRACE = "/usr/bin/strace"
STATS = REPORTS.counter("output_faults")
KB = 1024
VSIZE = 1024 * KB

SYSCALLS = ("write", "pwrite64", "fsync", "fdatasync", "rename", "renameat", "renameat2", "fallocate",
            "ftruncate")
ERRORS = ("error=ENOSPC", "error=EIO")
#: the default run's choice: one call of each class the command makes (the data write, its flush, the
#: rename); THINPOOL_SOAK=1 runs every call
DEFAULT_CLASSES = (("pwrite64", "write"), ("fsync", "fdatasync"), ("rename", "renameat", "renameat2"))


def _pattern(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _make_source(path: str) -> dict[str, bytes]:
    """A pool with volume v (data at 0 and 600 KiB, zeros elsewhere) and its snapshot s; its contents."""
    pool = Pool.create(path, data_size="4M", metadata_size="512K")
    pool.create_thin("v", VSIZE)
    pool.thin("v").write(0, _pattern(1, 200 * KB))
    pool.thin("v").write(600 * KB, _pattern(2, 100 * KB))
    pool.snapshot("v", "s")
    state = _state(pool)
    pool.close()
    return state


def _state(pool: Pool) -> dict[str, bytes]:
    return {t.name: pool.thin(t.name).read(0, t.size) for t in pool.thins()}


def _open_state(path: str) -> tuple[dict[str, bytes], bool]:
    """A pool's volumes and whether ``check`` is clean (opened read-only: nothing written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThinpoolWarning)
        pool = Pool.open(path, read_only=True)
    try:
        return _state(pool), bool(pool.check().ok)
    finally:
        pool.close(commit=False)


def _digests(pool_dir: str) -> dict[str, str]:
    """sha256 of a pool's metadata and data files (the lock records the last opener's pid)."""
    return {n: hashlib.sha256(open(os.path.join(pool_dir, n), "rb").read()).hexdigest()
            for n in ("metadata", "data")}


def _listing(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


def _lost(expected: dict[str, bytes], got: dict[str, bytes]) -> int:
    lost = 0
    for name, data in expected.items():
        other = got.get(name)
        if other is None or len(other) != len(data):
            lost += len(data)
        else:
            lost += int(np.count_nonzero(np.frombuffer(data, np.uint8) != np.frombuffer(other, np.uint8)))
    return lost


# ---------------------------------------------------------------------------- the commands
@dataclass
class Case:
    """One command run in a fresh directory ``d``: ``args`` for ``thinpool``, what it produces."""

    name: str
    args: list[str]
    kind: str                 # "output" (a file next to an unchanged pool), "import", "new-pool"
    target: str               # the output file, the pool imported into, or the new pool directory
    expect: Callable[[], object]  # the complete result: output bytes / volume states / new pool state


def _cli(args: list[str]) -> str:
    """Run a thinpool command in-process (no fault); its stdout."""
    from click.testing import CliRunner

    from thinpool.cli import main
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def _setup(d: str, command: str, old_target: bool) -> Case:
    """Build the inputs of ``command`` in directory ``d`` and return its Case."""
    src = os.path.join(d, "P")
    state = _make_source(src)
    out = os.path.join(d, "out")
    if old_target and command in ("export", "read", "dump", "export-metadata"):
        with open(out, "wb") as f:
            f.write(b"old target content\n" * 50)
    if command == "export":
        return Case(command, ["export", src, "v", out], "output", out, lambda: state["v"])
    if command == "read":
        return Case(command, ["read", src, "v", "-o", out], "output", out, lambda: state["v"])
    if command in ("dump", "export-metadata"):
        ref = os.path.join(d, "ref")
        if command == "dump":
            text = _cli(["dump", src])
            return Case(command, ["dump", src, "-o", out], "output", out, lambda: text.encode())
        _cli(["export-metadata", src, ref])
        data = open(ref, "rb").read()
        os.unlink(ref)
        return Case(command, ["export-metadata", src, out], "output", out, lambda: data)
    if command in ("import-new", "import-existing"):
        img = os.path.join(d, "img")
        image = bytearray(VSIZE)
        image[64 * KB:64 * KB + 300 * KB] = _pattern(3, 300 * KB)   # over v's data and its zeros
        image[900 * KB:960 * KB] = _pattern(4, 60 * KB)
        with open(img, "wb") as f:  # sparse: the zero ranges are holes
            f.truncate(VSIZE)
            f.seek(64 * KB)
            f.write(image[64 * KB:364 * KB])
            f.seek(900 * KB)
            f.write(image[900 * KB:960 * KB])
        vol = "w" if command == "import-new" else "v"
        after = dict(state, **{vol: bytes(image)})
        return Case(command, ["import", src, vol, img], "import", src, lambda: (state, after))
    if command in ("restore", "import-metadata"):
        new = os.path.join(d, "NEW")
        if command == "restore":
            xml = os.path.join(d, "in.xml")
            with open(xml, "w") as f:
                f.write(_cli(["dump", src]))
            args = ["restore", new, "-i", xml]
        else:
            meta = os.path.join(d, "in.bin")
            _cli(["export-metadata", src, meta])
            args = ["import-metadata", meta, new]
        shutil.rmtree(src)  # only the input file matters (and restoring with a new data file)
        # the new pool has dev1, dev2 (v's and s's mappings; sized like the data device, which the
        # metadata does not record) reading zeros: a new empty data file
        return Case(command, args, "new-pool", new, lambda: {"dev1": bytes(4 << 20), "dev2": bytes(4 << 20)})
    raise AssertionError(command)


COMMANDS = ("export", "read", "dump", "export-metadata", "import-new", "import-existing", "restore",
            "import-metadata")


def _thinpool(args: list[str], strace: list[str] | None = None, cwd: str | None = None
              ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "thinpool"] + args
    if strace is not None:
        cmd = [STRACE, "-f", "-qq"] + strace + cmd
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=cwd)


#: the machine kernel cache numba saves to (thinpool.jit_cache; the subprocesses get this environment)
KERNEL_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "thinpool", "kernels") + os.sep
_CALL = re.compile(r"^(\d+) +(\w+)\((\d+)?(?:<([^>]*)>)?(.*)$")


def _enumerate(d: str, command: str) -> list[tuple[str, int, int]]:
    """Run ``command`` cleanly under strace; its own calls of SYSCALLS as (syscall, K, byte count),
    K the call's ordinal among the main process's calls of that syscall (strace counts per process)."""
    case = _setup(d, command, old_target=True)
    log = os.path.join(d, "trace")
    r = _thinpool(case.args, ["-y", "-e", "trace=execve," + ",".join(SYSCALLS), "-o", log])
    assert r.returncode == 0, r.stderr
    calls: list[tuple[str, int, int]] = []
    seen: Counter = Counter()
    main_pid = None
    for line in open(log):
        m = _CALL.match(line)
        if not m:
            continue
        pid, name = int(m.group(1)), m.group(2)
        if main_pid is None:
            main_pid = pid
        if pid != main_pid or name not in SYSCALLS:
            continue
        seen[name] += 1
        first_arg = int(m.group(3)) if m.group(3) else -1
        if name in ("write", "pwrite64") and first_arg in (1, 2):
            continue  # the command's report on stdout / stderr: not the output
        if "__pycache__" in line or KERNEL_CACHE in line:
            continue  # numba saving a cold JIT cache (see docs/reliability.md: not covered)
        count = -1
        if name in ("write", "pwrite64"):
            mc = re.search(r", (\d+)(?:, \d+)?\) += (-?\d+)", line)
            count = int(mc.group(1)) if mc else -1
        calls.append((name, seen[name], count))
    return calls


def _faults(syscall: str, count: int) -> list[str]:
    if syscall in ("write", "pwrite64") and count > 1:
        return [f"retval={count // 2}"] + list(ERRORS)
    return list(ERRORS)


def _check_case(d: str, case: Case, r: subprocess.CompletedProcess, before: dict, label: str) -> str:
    """Assert the outcome is a complete success or a clean failure; returns which."""
    assert "Traceback" not in r.stderr, f"{label}: traceback\n{r.stderr}"
    ok = r.returncode == 0
    if not ok:
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("thinpool: error: "), \
            f"{label}: not one error line (exit {r.returncode}): {r.stderr!r}"
    if case.kind == "output":
        assert _digests(os.path.join(d, "P")) == before["digests"], f"{label}: the source pool changed"
        state, clean = _open_state(os.path.join(d, "P"))
        assert clean and state == before["state"], f"{label}: source pool not clean/unchanged"
        extra = set(_listing(os.path.dirname(case.target))) - set(before["out_listing"]) - {before["base"]}
        assert not extra, f"{label}: left behind {extra}"
        if ok:
            assert open(case.target, "rb").read() == case.expect(), f"{label}: exit 0 but the output differs"
            return "success"
        assert case.target in lines[0] or os.path.basename(case.target) in lines[0], \
            f"{label}: the error does not name the output: {lines[0]}"
        if before["old"] is None:
            assert not os.path.exists(case.target), f"{label}: failed but created the output"
        else:
            assert open(case.target, "rb").read() == before["old"], f"{label}: failed and changed the old output"
        return "clean failure"
    if case.kind == "import":
        old_state, new_state = case.expect()
        state, clean = _open_state(case.target)
        assert clean, f"{label}: check fails after exit {r.returncode}: {r.stderr}"
        STATS["strace committed bytes lost"] += _lost({"s": old_state["s"]}, state)
        assert STATS["strace committed bytes lost"] == 0, f"{label}: committed bytes lost"
        if ok:
            assert state == new_state, f"{label}: exit 0 but the pool does not hold the image"
            return "success"
        assert case.target in lines[0], f"{label}: the error does not name a file of the pool: {lines[0]}"
        if state == new_state and "flushing" in lines[0]:
            # the commit's last flush failed after its writes went through: reported as failed (its
            # durability is unknown), reopened complete -- one of the two allowed states, never a mix
            return "failed flush, reopens complete"
        assert state == old_state, f"{label}: failed ({lines[0]}) but the committed state changed"
        return "clean failure"
    # a new pool
    if ok:
        state, clean = _open_state(case.target)
        assert clean and state == case.expect(), f"{label}: exit 0 but the new pool is not complete"
        return "success"
    assert not os.path.exists(case.target), f"{label}: failed ({lines[0]}) but left {case.target}"
    assert set(_listing(os.path.dirname(case.target))) - {before["base"]} == set(before["out_listing"]) - {before["base"]}, \
        f"{label}: left behind files"
    assert case.target in lines[0], f"{label}: the error does not name a file of the new pool: {lines[0]}"
    return "clean failure"


def _before(d: str, case: Case) -> dict:
    src = os.path.join(d, "P")
    before: dict = {"base": os.path.basename(case.target), "out_listing": _listing(os.path.dirname(case.target))}
    if case.kind == "output":
        before["state"] = _open_state(src)[0]
        before["digests"] = _digests(src)
        before["old"] = open(case.target, "rb").read() if os.path.exists(case.target) else None
    return before


def _strace_cases(tmp: str, command: str) -> tuple[list[tuple[str, int, str]], list[tuple[str, int, int]]]:
    """(syscall, K, fault) cases of ``command``: SOAK, every fault at every call; by default one call of
    each kind of syscall (its middle occurrence) with one fault, the faults rotating."""
    probe = os.path.join(tmp, f"probe-{command}")
    os.mkdir(probe)
    calls = _enumerate(probe, command)
    shutil.rmtree(probe)
    assert calls, f"{command}: no output calls seen"
    if SOAK:
        return [(sc, k, f) for sc, k, count in calls for f in _faults(sc, count)], calls
    by_kind: dict[str, list[tuple[str, int, int]]] = {}
    for call in calls:
        by_kind.setdefault(call[0], []).append(call)
    cases = []
    # one call of each class: the data write (pwrite64, else write), the flush, the rename
    kinds = [next((sc for sc in group if sc in by_kind), None) for group in DEFAULT_CLASSES]
    for i, sc in enumerate(k for k in kinds if k is not None):
        group = by_kind[sc]
        # the last data/metadata write (a commit's superblock, an output's tail), the flush before
        # the last one (the output's own fsync, not its directory's; a commit's), the middle rename
        pick = {"pwrite64": -1, "write": -1, "fsync": -2, "fdatasync": -2}.get(sc, len(group) // 2)
        _, k, count = group[max(pick, -len(group))]
        faults = _faults(sc, count)
        cases.append((sc, k, faults[(i + len(command)) % len(faults)]))
    return cases, calls


@pytest.mark.parametrize("command", COMMANDS)
def test_strace_fault_at_every_output_call(tmp_path, command):
    """Every write/flush/rename/size change of the command gets a fault; each case is a complete success
    or a clean failure (see the module docstring)."""
    require_tool("strace")  # skip here, fail under CI=true
    cases, calls = _strace_cases(str(tmp_path), command)
    STATS[f"{command}: output calls"] = len(calls)
    prepared = []
    for n, (syscall, k, fault) in enumerate(cases):  # set up in-process, one directory per case
        d = str(tmp_path / f"c{n}")
        os.mkdir(d)
        case = _setup(d, command, old_target=n % 2 == 0)
        prepared.append((d, case, _before(d, case), f"{command} {syscall}#{k} {fault}",
                         ["-o", "/dev/null", "-e", f"inject={syscall}:{fault}:when={k}"]))
    with ThreadPoolExecutor(max_workers=2) as ex:  # the subprocesses, two at a time
        results = list(ex.map(lambda p: _thinpool(p[1].args, p[4]), prepared))
    outcomes: Counter = Counter()
    problems = []
    for (d, case, before, label, _), r in zip(prepared, results):
        try:
            outcomes[_check_case(d, case, r, before, label)] += 1
        except AssertionError as exc:  # every case is reported, not just the first
            problems.append(str(exc).splitlines()[0])
            continue
        shutil.rmtree(d)
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems)
    STATS[f"strace {command}: cases"] += len(cases)
    for key, v in outcomes.items():
        STATS[f"strace {command}: {key}"] += v
    assert sum(outcomes.values()) == len(cases)
    assert outcomes["clean failure"], f"{command}: no injected fault made the command fail"


# ---------------------------------------------------------------------------- a real full filesystem
def _fill(mnt: str, headroom: int) -> None:
    """Leave about ``headroom`` bytes free at ``mnt`` (unbuffered writes: a full filesystem at
    headroom 0 stops the filling, it does not fail it)."""
    fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = b"\xff" * (1 << 20)
        for _ in range(3):  # the filler's own extent blocks: top up
            want = _free_bytes(mnt) - headroom
            while want > 0:
                try:
                    want -= os.write(fd, chunk[:min(len(chunk), want)])
                except OSError:
                    break
            os.fsync(fd)
            if _free_bytes(mnt) <= headroom + 4096:
                break
    finally:
        os.close(fd)


class _Result:
    """A CliRunner result shaped like CompletedProcess for :func:`_check_case`."""

    def __init__(self, r) -> None:
        self.returncode = r.exit_code
        self.stderr = r.stderr
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            import traceback
            self.stderr += "Traceback\n" + "".join(traceback.format_exception(r.exception))


EXT4_COMMANDS = ("export", "read", "dump", "export-metadata", "import-new", "import-existing", "restore",
                 "import-metadata")


def test_full_ext4_every_few_kib_of_headroom(small_ext4, tmp_path):
    """Each command (in-process) writing onto an ext4 filled to H KiB free: a complete success or a clean
    failure.  Outputs and new pools live on the small filesystem; for ``import`` the pool does."""
    from click.testing import CliRunner

    from thinpool.cli import main
    mnt = small_ext4
    step = 16 if SOAK else 480
    headrooms = list(range(0, 1500, step))
    outcomes: Counter = Counter()
    for command in EXT4_COMMANDS:
        for h in headrooms:
            on_fs = command.startswith("import") and command != "import-metadata"
            d = os.path.join(mnt, "d") if on_fs else str(tmp_path / "d")
            os.mkdir(d)
            case = _setup(d, command, old_target=h % 2 == 0)
            if not on_fs:  # the output / new pool goes onto the small filesystem
                out = os.path.join(mnt, "out" if case.kind == "output" else "NEW")
                case.args = [out if a == case.target else a for a in case.args]
                if case.kind == "output" and os.path.exists(case.target):
                    shutil.move(case.target, out)
                case.target = out
            before = _before(d, case)
            before["mnt"] = _listing(mnt)
            _fill(mnt, h * KB)
            r = _Result(CliRunner().invoke(main, case.args))
            os.unlink(os.path.join(mnt, "filler"))
            label = f"ext4 {command} headroom {h} KiB"
            outcome = _check_case(d, case, r, before, label)
            outcomes[f"{command}: {outcome}"] += 1
            for leftover in ("out", "NEW"):
                p = os.path.join(mnt, leftover)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.unlink(p)
            assert _listing(mnt) == [x for x in before["mnt"] if x not in ("out", "NEW")], \
                f"{label}: left behind {set(_listing(mnt)) - set(before['mnt'])}"
            shutil.rmtree(d)
    STATS["ext4 cases"] += len(headrooms) * len(EXT4_COMMANDS)
    for k, v in outcomes.items():
        STATS[f"ext4 {k}"] += v
    for command in EXT4_COMMANDS:
        assert outcomes[f"{command}: success"], f"{command}: never succeeded on ext4"
