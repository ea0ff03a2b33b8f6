"""The data file's flush on the helper thread (thinpool.kernels_flush, datadev.BackgroundFlush).

A commit starts the data file's ``fdatasync`` on a helper thread that never takes the GIL, makes its
pages meanwhile and ends the flush before it writes the first of them: done if the helper's flush
returned, else the committing thread's own flush (which waits for the write-back under way).  The
kernel's rule is unchanged -- data durable before any metadata write that maps it
(dm-thin.c's commit flushes the data device first) -- and strace checks it on every commit of a real
process, whichever thread flushed.  The request's states (taken back, abandoned, busy) and the
helper's error reporting are checked directly.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.support import require_tool
from thinpool import Pool, datadev
from thinpool.errors import HostIOError
from thinpool.hostio import DataIO

kf = pytest.importorskip("thinpool.kernels_flush")


def _ctl() -> np.ndarray:
    """A request block with its mutex and condition variable initialised (no helper thread)."""
    ctl = np.zeros(kf.CTL_WORDS, np.int64)
    lib = ctypes.CDLL(None)
    assert lib.pthread_mutex_init(ctypes.c_void_p(ctl.ctypes.data), None) == 0
    assert lib.pthread_cond_init(ctypes.c_void_p(ctl.ctypes.data + 8 * kf.LOCK_WORDS), None) == 0
    return ctl


def _wait_state(ctl: np.ndarray, states: tuple[int, ...]) -> None:
    deadline = time.monotonic() + 20
    while int(ctl[kf.C_STATE]) not in states:
        assert time.monotonic() < deadline, f"the helper never reached {states}: state {int(ctl[kf.C_STATE])}"
        time.sleep(0.001)


def test_request_not_taken_up_is_taken_back_and_one_in_flight_is_abandoned():
    """Without a helper: a request nobody took up is taken back at once (the caller flushes itself); a
    second request while one is pending is refused (busy); a flush under way is waited for at most
    the time given, then abandoned (its result dropped by the helper when it returns)."""
    ctl = _ctl()
    assert kf.flush_start(ctl, 0) == 0 and ctl[kf.C_STATE] == kf.REQUESTED
    assert kf.flush_start(ctl, 0) == kf.BUSY
    assert kf.flush_finish(ctl, 10**9) == kf.NOT_STARTED and ctl[kf.C_STATE] == kf.IDLE  # (never waits)
    assert kf.flush_finish(ctl, 0) == kf.NOT_STARTED  # (nothing requested: nothing to end)
    ctl[kf.C_STATE] = kf.RUNNING  # as the helper marks a request it took up
    t0 = time.monotonic()
    assert kf.flush_finish(ctl, 50_000_000) == kf.IN_FLIGHT and ctl[kf.C_ABANDONED] == 1
    assert time.monotonic() - t0 >= 0.045  # (it waited for the flush under way, and no longer)
    assert kf.flush_start(ctl, 0) == kf.BUSY  # (until the helper returns from that flush)


def test_helper_flushes_and_reports_the_errno_of_a_failed_flush(tmp_path):
    """The helper thread runs each request's fdatasync and posts 0 or its errno (EINVAL: a pipe
    cannot be flushed; EBADF: no such descriptor); an abandoned request leaves it idle; it stops
    when told."""
    import threading
    ctl = _ctl()
    helper = threading.Thread(target=kf.flush_loop, args=(ctl,), daemon=True)
    helper.start()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    r, w = os.pipe()
    try:
        for target, want in ((fd, 0), (r, errno.EINVAL), (1 << 20, errno.EBADF), (fd, 0)):
            os.pwrite(fd, b"x" * 4096, 0)
            assert kf.flush_start(ctl, target) == 0
            _wait_state(ctl, (kf.DONE,))
            assert kf.flush_finish(ctl, 0) == want and ctl[kf.C_STATE] == kf.IDLE
            assert ctl[kf.C_T_END] >= ctl[kf.C_T_START] > 0
        ctl[kf.C_T_END] = 0
        assert kf.flush_start(ctl, fd) == 0
        _wait_state(ctl, (kf.RUNNING, kf.DONE))
        got = kf.flush_finish(ctl, 0)  # (abandoned if still running, else its result)
        assert got in (0, kf.IN_FLIGHT)
        _wait_state(ctl, (kf.IDLE,))
        assert ctl[kf.C_ABANDONED] == 0 and ctl[kf.C_T_END] > 0
    finally:
        kf.flush_stop(ctl)
        helper.join(20)
        os.close(fd)
        os.close(r)
        os.close(w)
    assert not helper.is_alive()


def _open_helper_device(pool: Pool) -> datadev.DataDevice:
    dev = pool._data
    assert isinstance(dev, datadev.DataDevice)
    dev._sync_starts = datadev.HELPER_AFTER  # (past the open file's first flushes, made in place)
    return dev


def test_data_flush_on_the_helper_ends_in_sync_and_a_failure_raises(tmp_path):
    """A data device's flush started on the helper and ended by ``sync()``: done by the helper (its
    end time moves); a failed helper flush raises HostIOError with its errno, naming the file."""
    with Pool.create(str(tmp_path / "p"), data_size="64MiB") as pool:
        v = pool.create_thin("v", "8MiB")
        v.write(0, b"a" * 4096)
        dev = _open_helper_device(pool)
        assert dev.start_sync(), "the helper thread did not start"
        ctl = datadev._background._ctl
        _wait_state(ctl, (kf.DONE,))
        end = int(ctl[kf.C_T_END])
        dev.sync()
        assert ctl[kf.C_STATE] == kf.IDLE and end > 0
        # the helper's descriptor replaced by a pipe's: its flush fails with EINVAL
        r, w = os.pipe()
        real, dev._flush_fd = dev._flush_fd, r
        try:
            assert dev.start_sync()
            _wait_state(ctl, (kf.DONE,))
            with pytest.raises(HostIOError) as err:
                dev.sync()
            assert err.value.errno == errno.EINVAL and dev.path in str(err.value)
        finally:
            dev._flush_fd = real
            os.close(r)
            os.close(w)
        pool.commit()  # (the pool itself never saw that failure: its own commits go on)


def test_substituted_or_disabled_flush_never_uses_the_helper(tmp_path, monkeypatch):
    """A flush substituted in ``io`` (fault injection, a scratch pool's none) runs in the committing
    thread; so does every flush with the helper turned off, and an open file's first ones."""
    class Counting(DataIO):
        calls = 0

        @staticmethod
        def fdatasync(fd: int) -> None:
            Counting.calls += 1
            os.fdatasync(fd)

    with Pool.create(str(tmp_path / "p"), data_size="64MiB") as pool:
        dev = pool._data
        assert not dev.start_sync() and not dev.start_sync()  # (the first HELPER_AFTER: in place)
        dev.io = Counting()
        assert not dev.start_sync()
        v = pool.create_thin("v", "8MiB")
        v.write(0, b"a" * 4096)
        pool.commit()
        assert Counting.calls >= 2  # (create_thin's commit and this one)
        dev.io = DataIO()
        monkeypatch.setattr(datadev, "BACKGROUND_FLUSH", False)
        assert not dev.start_sync()
    with Pool.create(str(tmp_path / "s"), data_size="64MiB", flush=False) as pool:
        _open_helper_device(pool)
        assert not pool._data.start_sync()


_COMMITS = """
import sys
from thinpool import Pool
pool = Pool.open(sys.argv[1])
v = pool.thin("v")
for i in range(24):
    v.write(i * 131072, bytes([i + 1]) * 4096)
    pool.commit()
pool.close()
"""


def test_kernel_rule_data_durable_before_the_superblock_whichever_thread_flushes(tmp_path):
    """strace -f of a process making 24 one-write commits: before the superblock write of every
    commit, a flush of the data file has *returned* since that file's last write -- the helper
    thread's (another open of the file) or the committing thread's own (dm-thin flushes the data
    device before it commits the metadata that maps the new blocks; the pages a commit writes to
    blocks no superblock refers to may go before, as dm-bufio's write-back may).  Every commit writes
    its pages, then its superblock, then flushes the metadata file (once, or after the pages too)."""
    require_tool("strace")
    path = str(tmp_path / "p")
    with Pool.create(path, data_size="64MiB") as pool:
        pool.create_thin("v", "8MiB")
    log = tmp_path / "trace"
    script = tmp_path / "commits.py"
    script.write_text(textwrap.dedent(_COMMITS))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    r = subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=fdatasync,pwrite64", "-o", str(log),
                        sys.executable, str(script), path], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    pending: dict[str, str] = {}  # pid -> the path of its unfinished fdatasync
    events: list[tuple[str, str, int]] = []  # ("flushed" | "write", path, offset), in the order they completed / began
    for line in log.read_text().splitlines():
        m = re.match(r"(\d+)\s+(.*)", line)
        if not m:
            continue
        pid, rest = m.groups()
        call = re.match(r"(fdatasync|pwrite64)\(\d+<([^>]*)>", rest)
        if rest.startswith("<... fdatasync resumed>"):
            if rest.rstrip().endswith("= 0"):
                events.append(("flushed", pending.pop(pid), -1))
            continue
        if call is None:
            continue
        name, target = call.groups()
        if name == "fdatasync":
            if rest.endswith("<unfinished ...>"):
                pending[pid] = target
            elif rest.rstrip().endswith("= 0"):
                events.append(("flushed", target, -1))
        else:
            offset = re.search(r", (\d+)(?:\)| <unfinished)", rest)  # (its last argument)
            assert offset, rest
            events.append(("write", target, int(offset.group(1))))
    data = os.path.realpath(os.path.join(path, "data"))
    meta = os.path.realpath(os.path.join(path, "metadata"))
    commits = 0
    data_flushed = False  # since the data file's last write
    phase = 0  # 0 between commits, 1 pages written, 2 pages flushed, 3 superblock written
    data_writes = 0
    for kind, target, offset in events:
        if kind == "flushed" and target == data:
            data_flushed = True
        elif kind == "write" and target == data:
            data_writes += 1
            data_flushed = False  # (a write after the flush: the next commit needs another)
        elif kind == "write" and target == meta and offset >= 2 * 4096:  # a page
            assert phase in (0, 1), f"commit {commits}: a page written after the superblock, before its flush"
            if phase == 0:
                commits += 1
                phase = 1
        elif kind == "write" and target == meta:  # a superblock slot
            assert phase in (1, 2), f"commit {commits}: a superblock written without pages before it"
            assert data_flushed, f"commit {commits}: the superblock written before the data file's flush returned"
            phase = 3
        elif kind == "flushed" and target == meta:
            if phase == 1:
                phase = 2
            elif phase == 3:
                phase, data_flushed = 0, False
    assert phase == 0 and commits >= 24 and data_writes >= 24, (commits, data_writes, events[:40])
