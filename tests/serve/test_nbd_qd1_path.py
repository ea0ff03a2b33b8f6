"""The compiled loop's wait between requests (thinpool/kernels_nbd.py, _wait_request): what one request
at iodepth 1 costs in system calls, and when busy-polling gives way to a blocking wait.

* a READ at iodepth 1 costs its session thread one ``recv`` (which waits), one ``pread`` and one
  ``send`` -- no ``poll`` before the receive (strace of a served pool, busy-polling off);
* a busy-poll whose ``sched_yield`` ran another task on the CPU for longer than the busy-poll window
  stops busy-polling (for the back-off), also when the request arrived during that yield: it had
  waited for the other task's time slice, where a session blocked in ``recv`` is woken at once -- in the compiled loop and in the Python path's
  busy-poll (Session._spin_wait).

(A session idle in the loop's blocking receive still ends at the server's stop and at its idle timeout:
tests/serve/test_nbd_compiled_reads.py and test_serve_hostile.py check both.)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

import pytest
from tests.serve.test_nbd_pool import Raw
from tests.support import require_tool, serving_with_loop_probe

from thinpool import Pool
from thinpool.nbd import protocol as P
from thinpool.nbd import session as session_mod
from thinpool.nbd.pool_backend import PoolProvider
from thinpool.nbd.server import NBDServer

KiB, MiB = 1024, 1024 * 1024
VOL = 4 * MiB
READS = 200


def _pool(root: str) -> str:
    path = os.path.join(root, "pool")
    with Pool.create(path, data_size=16 * MiB, block_size="64KiB") as p:
        v = p.create_thin("vol", VOL)
        v.write(0, os.urandom(VOL))
    return path


@pytest.fixture()
def scratch() -> Iterator[str]:  # (a short path: the unix socket's name must fit)
    d = tempfile.mkdtemp(prefix="nbdq", dir="/tmp")
    yield d
    subprocess.run(["rm", "-rf", d], check=False)


def _wait_socket(path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    raise AssertionError(f"{path} did not come up")


def _traced(pid: int) -> bool:
    """Whether every thread of process ``pid`` has a tracer attached."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            if next(line for line in f if line.startswith("TracerPid:")).split()[1] == "0":
                return False
    return True


def test_nbd_rule_a_read_at_iodepth_1_costs_a_recv_a_pread_and_a_send(scratch: str) -> None:
    """strace of ``thinpool serve`` while a client sends 200 READs one at a time: the session thread (the
    one that preads) makes one receive, one pread and one send per READ, and no poll between them (the
    code before made a poll per READ).  A poll is allowed after a pause of the client longer than the
    receive timeout (a loaded machine), so at most a few."""
    require_tool("strace")
    pool = _pool(scratch)
    sock = os.path.join(scratch, "nbd.sock")
    env = dict(os.environ, THINPOOL_NBD_SPIN_NS="0")
    server = subprocess.Popen([sys.executable, "-m", "thinpool", "serve", pool, "--socket", sock],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    log = os.path.join(scratch, "strace.log")
    tracer = None
    try:
        _wait_socket(sock, server)
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=poll,ppoll,recvfrom,recvmsg,sendto,sendmsg,"
                                   "pread64,select,epoll_wait", "-o", log, "-p", str(server.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not _traced(server.pid):
            assert time.monotonic() < deadline and tracer.poll() is None, "strace did not attach"
            time.sleep(0.05)
        c = Raw(sock, "vol", structured=False)
        for i in range(READS):
            err, data, _ = c.cmd(P.CMD_READ, (i * 7919 % (VOL // 4096)) * 4096, 4096)
            assert err == 0 and len(data) == 4096
        c.close()
        time.sleep(0.2)
    finally:
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        if server.stderr:
            server.stderr.close()
    lines = open(log).read().splitlines()
    calls: dict[str, list[str]] = {}
    for line in lines:
        m = re.match(r"(\d+)\s+(\w+)\(", line)
        if m:
            calls.setdefault(m.group(1), []).append(m.group(2))
    reader = max(calls, key=lambda tid: calls[tid].count("pread64"))
    seq = calls[reader]
    first, last = seq.index("pread64"), len(seq) - 1 - seq[::-1].index("pread64")
    between = seq[first:last + 1]
    assert between.count("pread64") == READS, between[:20]
    polls = sum(between.count(n) for n in ("poll", "ppoll", "select", "epoll_wait"))
    receives = between.count("recvfrom") + between.count("recvmsg")
    sends = seq[first:].count("sendto") + seq[first:].count("sendmsg")  # (the last READ's reply follows it)
    assert polls <= 5, (polls, between[:20])
    assert receives <= READS + polls, (receives, between[:20])
    assert sends == READS, sends


def test_nbd_rule_a_busy_poll_that_yields_to_another_task_stops_busy_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session shares its CPU with a busy process, its client runs on another CPU.  Once a
    ``sched_yield`` of the busy-poll runs the busy process for longer than the busy-poll window, the
    session stops busy-polling (here for longer than the test) and waits for each request in ``recv``.
    The code before checked a round's time only when no request had arrived, and the request always
    arrived during the busy process's time slice: it kept busy-polling (every other wait, as a slow
    busy-poll skips the next one), and those requests waited for a time slice of the busy process (at
    iodepth 1 through fio: 992-1,711 IOPS where this code gives 11,163-19,299)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: the session's (shared with a busy process) and the client's")
    mine, other = cpus[-1], cpus[0]
    monkeypatch.setattr(session_mod, "SPIN_NS", 100_000)  # the default window
    monkeypatch.setattr(session_mod, "SPIN_BACKOFF_NS", 3600 * 10**9)
    before = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{mine}}})\nprint(flush=True)\n"
                            "while True: pass"], stdout=subprocess.PIPE)
    assert hog.stdout is not None and hog.stdout.readline() == b"\n"  # busy on that CPU from now on
    root = tempfile.mkdtemp(prefix="nbdy", dir="/tmp")
    loops: list = []
    try:
        pool = Pool.create(os.path.join(root, "pool"), data_size=16 * MiB, block_size="64KiB")
        pool.create_thin("vol", VOL).write(0, b"x" * VOL)
        server = NBDServer(PoolProvider(pool), unix_path=os.path.join(root, "nbd.sock"))
        os.sched_setaffinity(0, {mine})  # the server's threads (started from this one) run there
        with serving_with_loop_probe(monkeypatch, server, root, loops.append):
            os.sched_setaffinity(0, {other})  # the client (this thread) on the other CPU
            c = Raw(server.unix_path or "", "vol", structured=True)
            for i in range(READS):
                err, data, _ = c.cmd(P.CMD_READ, (i % (VOL // 4096)) * 4096, 4096)
                assert err == 0 and data == b"x" * 4096
            c.close()
            deadline = time.monotonic() + 30
            while not loops and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        os.sched_setaffinity(0, before)
        hog.kill()
        hog.wait()
    (loop,) = loops
    assert loop.served == READS
    # the first yield that runs the busy process comes within the first few requests (the session's
    # busy-poll, burning its CPU share, soon makes it the busy process's turn); from then on every
    # request is waited for.  (The code before: 68-71 blocking waits of 200 in three runs.)
    assert loop.contended == 1
    assert loop.waits >= READS - 5, (loop.waits, loop.contended)


def test_nbd_rule_the_python_paths_busy_poll_backs_off_after_a_yield_that_ran_another_task(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python path's busy-poll (Session._spin_wait: exports without the compiled loop) follows the same
    rule.  Its ``sched_yield`` is replaced by one that lets "another task" run for 1 ms, during which the
    client's request arrives: the wait returns readable and the session backs off.  The code before
    found the request at its next poll and kept busy-polling (no back-off)."""
    from thinpool.nbd.session import Session, SessionContext
    a, b = socket.socketpair()
    wake_r, wake_w = os.pipe()
    yields: list[int] = []
    transmitting = int(session_mod._transmitting[0])

    def other_task_runs() -> None:
        yields.append(1)
        if len(yields) == 1:
            b.sendall(b"\0" * 28)  # the request arrives while the other task has the CPU
        time.sleep(0.001)
    try:
        ctx = SessionContext(provider=None, read_only=False, stopping=threading.Event(),  # type: ignore[arg-type]
                             wake_fd=wake_r, grace=1.0)
        s = Session(a, ctx, "test")
        monkeypatch.setattr(session_mod, "SPIN_NS", 100_000)  # the default window (< the 1 ms yield)
        monkeypatch.setattr(session_mod.os, "sched_yield", other_task_runs)
        session_mod._transmitting[0] = 1  # the only connection transmitting
        assert s._spin_backoff == 0
        _spin_next, readable = s._spin_wait(True)
        assert readable
        assert yields == [1]
        assert s._spin_backoff > time.monotonic_ns()  # backing off now
    finally:
        session_mod._transmitting[0] = transmitting
        a.close()
        b.close()
        os.close(wake_r)
        os.close(wake_w)
