"""`thinpool serve` against hostile clients: the control protocol's type matrix, stale exports, bad
volume names, a data file truncated while served, TCP access control, and resource exhaustion.

Servers run in-process (:class:`thinpool.nbd.served.Served` on a real pool) except where the old
failure mode kills the process (SIGBUS on a truncated data file): that one runs ``thinpool serve`` as
a subprocess.  The NBD client is the literal one of ``test_nbd_protocol.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
from tests.serve.test_nbd_protocol import RawClient
from tests.support import require_tool, IN_CI

from thinpool import Pool
from thinpool.errors import Busy
from thinpool import errors as E
from thinpool.cli.registry import op_table, run_op
from thinpool.nbd.served import Served
from thinpool.devtable import check_new_name
from thinpool.nbd import protocol as P

KiB, MiB = 1024, 1024 * 1024
BS = 64 * KiB
THINPOOL = [sys.executable, "-m", "thinpool"]
FIGURES: dict[str, Any] = {}


# =========================================================================== helpers
def make_pool(root: str, volumes: tuple[str, ...] = ("vol", "other")) -> str:
    path = os.path.join(root, "pool")
    with Pool.create(path, data_size=64 * MiB, block_size=BS) as p:
        for name in volumes:
            t = p.create_thin(name, 8 * MiB)
            t.write(0, bytes([0x5A]) * (2 * BS))
    return path


@contextmanager
def served(pool: str, **kw: Any) -> Iterator[Served]:
    s = Served(pool, op_table(), **kw)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def control(pool: str, line: bytes | str, timeout: float = 30.0) -> dict[str, Any]:
    """Send one raw request line over the pool's control socket; the decoded reply."""
    if isinstance(line, str):
        line = line.encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.path.join(pool, "control.sock"))
        s.sendall(line + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def request(pool: str, op: str, args: Any) -> dict[str, Any]:
    return control(pool, json.dumps({"op": op, "args": args}))


class TCPClient(RawClient):
    """RawClient over TCP."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0) -> None:  # noqa: D107
        self.sock = socket.create_connection(address, timeout=timeout)
        self.pending = {}
        self.next_handle = 1
        self.structured = False
        self.size = 0
        self.tflags = 0


def list_exports(c: RawClient) -> list[str]:
    c.greet()
    replies = c.option(P.OPT_LIST)
    assert replies[-1][0] == P.REP_ACK, replies
    return [P.decode_rep_server(payload)[0] for rtype, payload in replies if rtype == P.REP_SERVER]


def healthy_roundtrip(sock_path: str, name: str = "vol") -> float:
    """Seconds for a new client to connect, handshake, write 4 KiB, read it back and disconnect."""
    t0 = time.monotonic()
    c = RawClient.connect(sock_path, name)
    try:
        pattern = os.urandom(4096)
        assert c.cmd(P.CMD_WRITE, 3 * BS, data=pattern).error == 0
        r = c.cmd(P.CMD_READ, 3 * BS, 4096)
        assert r.error == 0 and r.data == pattern
    finally:
        c.disconnect()
    return time.monotonic() - t0


# =========================================================================== control protocol: type matrix
MATRIX: list[Any] = [None, True, 0, -1, 2 ** 64, 1.5, "", "x", "../x", "\udcff", "/nonexistent-dir/x", [], [1],
                     ["x"], {}, {"a": 1}, "y" * (1 << 20)]
#: replies that are a refusal of the request, not a bug
DOMAIN_ERRORS = {"InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition", "NoSpace", "ReadOnly"}


def _baseline(hint: Any) -> Any:
    """A plausible value of an argument's type (other arguments keep it while one is fuzzed)."""
    text = str(hint)
    if "list" in text:
        return ["nope"]
    if "dict" in text:
        return {}
    if "bool" in text:
        return False
    if "int" in text:
        return 1 << 20
    return "nope"


def test_control_type_matrix_every_op_every_argument(tmp_path: Any, monkeypatch: Any) -> None:
    """Every op x every argument x the JSON matrix (plus unknown/missing arguments and non-object args):
    no internal error, every refusal a domain error, the server alive and the pool consistent after,
    and nothing written into the serving process's working directory (relative paths are refused)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    from thinpool.control.args import _signature
    ops = op_table()
    pool = make_pool(str(tmp_path))
    cases = 0
    outcomes: dict[str, int] = {}
    with served(pool) as s:
        for name, spec in sorted(ops.items()):
            sig = _signature(spec.func)
            base = {arg: _baseline(hint) for arg, hint, required in sig if required}
            trials: list[Any] = [dict(base, zzz_unknown=1), [], "x", None]
            if base:
                trials.append({})  # missing required arguments
            for arg, hint, _ in sig:
                trials += [dict(base, **{arg: v}) for v in MATRIX]
            for args in trials:
                reply = request(pool, name, args)
                cases += 1
                key = "ok" if reply["ok"] else reply["error"]
                outcomes[key] = outcomes.get(key, 0) + 1
                assert not (spec.local_only and reply["ok"]), (name, args)  # streams: never on a served pool
                if not reply["ok"]:
                    assert reply["error"] in DOMAIN_ERRORS, (name, str(args)[:200], reply)
                    assert "internal error" not in reply["message"], (name, str(args)[:200], reply)
        # garbage lines
        for line in [b"", b"{", b"[]", b'{"op": 5}', b'{"op": "status", "args": 5}', b"\xff\xfe",
                     json.dumps({"op": "x" * 100000}).encode()]:
            if not line:
                continue
            reply = control(pool, line)
            cases += 1
            assert reply["ok"] is False and reply["error"] == "InvalidArgument", (line[:50], reply)
        # still serving, still consistent
        assert request(pool, "status", {})["ok"]
        assert healthy_roundtrip(s.nbd.unix_path) < 5
        report = request(pool, "check", {})
        assert report["ok"] and report["result"]["ok"], report
    with Pool.open(pool) as p:
        assert p.check().ok
    assert os.listdir(cwd) == []
    FIGURES["control_matrix_cases"] = cases
    FIGURES["control_matrix_outcomes"] = outcomes
    print(f"\n[control matrix] {cases} requests over {len(ops)} ops: {outcomes}")
    assert cases > 1000


def test_control_path_argument_must_be_a_string(tmp_path: Any) -> None:
    """``{"path": 4}`` was taken as a file descriptor (it truncated the server's own metadata file)."""
    pool = make_pool(str(tmp_path))
    md = os.path.join(pool, "metadata")
    with served(pool):
        before = os.stat(md).st_size
        for bad in (4, 0, 1, True, None, ["x"], {"a": 1}, 2 ** 64):
            reply = request(pool, "export-metadata", {"path": bad})
            assert reply["ok"] is False and reply["error"] == "InvalidArgument", (bad, reply)
            assert "'path'" in reply["message"] and "export-metadata" in reply["message"], reply
        assert os.stat(md).st_size == before
    with Pool.open(pool) as p:
        assert p.check().ok and len(p.thins()) == 2


@pytest.mark.parametrize("names", ["vol", {"vol": 1}, [["vol"]], [1], None])
def test_delete_busy_check_cannot_be_bypassed_by_types(tmp_path: Any, names: Any) -> None:
    """``names`` as a string (iterated per character) or an object skipped the "open over NBD" check."""
    pool = make_pool(str(tmp_path), volumes=("vol", "v", "o", "l"))
    with served(pool) as s:
        c = RawClient.connect(s.nbd.unix_path, "vol")
        try:
            reply = request(pool, "delete", {"names": names})
            assert reply["ok"] is False and reply["error"] == "InvalidArgument", reply
            assert "names" in reply["message"]
            busy = request(pool, "delete", {"names": ["vol"]})
            assert busy["ok"] is False and busy["error"] == "Busy" and "open over NBD" in busy["message"]
            assert c.cmd(P.CMD_READ, 0, 4096).data == bytes([0x5A]) * 4096
        finally:
            c.disconnect()
        names_now = [v["name"] for v in request(pool, "ls", {})["result"]["volumes"]]
        assert sorted(names_now) == ["l", "o", "v", "vol"]


# =========================================================================== stale exports
def test_stale_client_never_writes_into_a_volume_that_reuses_the_device_id(tmp_path: Any) -> None:
    """An open volume cannot be deleted (dm-thin's EBUSY); it can still go away under a client when
    the transaction that created it is aborted.  A new volume that then takes its device id never
    receives the stale client's requests."""
    pool = make_pool(str(tmp_path))
    with served(pool) as s:
        batch = contextlib.ExitStack()  # a pool message commits, unless inside a batch
        with s.pool.locked():
            batch.enter_context(s.pool.batch())
            dev_id = s.pool.create_thin("tmp", 8 * MiB).dev_id  # not committed
        stale = RawClient.connect(s.nbd.unix_path, "tmp")
        try:
            with s.pool.locked():
                with pytest.raises(Busy):
                    s.pool.delete("tmp")
                s.pool.abort()  # drops "tmp" while the client sits idle
                batch.close()  # the batch ends (its commit finds nothing of "tmp")
                assert "tmp" not in s.pool
                s.pool.create_thin("new", 8 * MiB, dev_id=dev_id)
                s.pool.commit()
            r = stale.cmd(P.CMD_WRITE, 0, data=b"\xee" * 4096)
            assert r.error == P.EIO, r
            r = stale.cmd(P.CMD_READ, 0, 4096)
            assert r.error == P.EIO, r
            assert s.pool.thin("new").read(0, 4096) == bytes(4096)
            assert s.provider.open_count("new") == 0  # the stale connection does not pin the new volume
            assert s.pool.holders("new") == {}
            assert request(pool, "delete", {"names": ["new"]})["ok"]
        finally:
            stale.close()


def test_rename_keeps_an_open_export(tmp_path: Any) -> None:
    pool = make_pool(str(tmp_path))
    with served(pool) as s:
        c = RawClient.connect(s.nbd.unix_path, "vol")
        try:
            assert request(pool, "rename", {"old": "vol", "new": "renamed"})["ok"]
            assert c.cmd(P.CMD_WRITE, 0, data=b"\x11" * 4096).error == 0
            assert s.pool.thin("renamed").read(0, 4096) == b"\x11" * 4096
            assert s.provider.open_count("renamed") == 1
        finally:
            c.disconnect()


# =========================================================================== names
@pytest.mark.parametrize("name,rule", [
    ("bad\udcff", "UTF-8"), ("\ud800", "UTF-8"), ("a\x00b", "NUL"), ("a\nb", "control"), ("", "empty"),
    ("x" * 1025, "1-1024 bytes"), ("\u00e9" * 513, "1-1024 bytes"), ("a/../b", "'/'"), ("/abs", "'/'"),
    ("a//b", "'/'"), ("..", None), ("a/", "'/'"), (5, "string")])
def test_check_new_name_says_which_rule(name: Any, rule: str | None) -> None:
    if rule is None:  # ".." alone is a plain name (no '/'), allowed
        check_new_name("/p", name, {})
        return
    with pytest.raises(E.InvalidArgument) as exc:
        check_new_name("/p", name, {})
    assert rule in str(exc.value)


def test_bad_names_over_the_control_socket(tmp_path: Any) -> None:
    pool = make_pool(str(tmp_path))
    with served(pool) as s:
        for bad in ["bad\udcff", "\ud800", "a\x00b", "x" * 2000]:
            for op, args in (("create-thin", {"name": bad, "size": MiB}),
                             ("snapshot", {"origin": "vol", "name": bad}),
                             ("rename", {"old": "other", "new": bad})):
                reply = request(pool, op, args)
                assert reply["ok"] is False and reply["error"] == "InvalidArgument", (op, bad[:20], reply)
        c = RawClient(s.nbd.unix_path)
        try:
            assert sorted(list_exports(c)) == ["other", "vol"]
        finally:
            c.close()


def test_serve_survives_an_existing_undecodable_name(tmp_path: Any, caplog: Any) -> None:
    """An old pool may hold a name that is not valid UTF-8: serve starts, skips it with a warning,
    NBD_OPT_LIST works for everyone."""
    pool = make_pool(str(tmp_path))
    with Pool.open(pool) as p:
        p._name_ok = lambda name: None  # what an older thinpool allowed
        p.create_thin("bad\udcff", MiB)
        p.create_thin("long" + "z" * 5000, MiB)
    caplog.set_level(logging.WARNING, logger="thinpool.nbd")
    with served(pool) as s:
        uris = s.uris()
        assert [n for n, _ in uris] == ["vol", "other"]
        c = RawClient(s.nbd.unix_path)
        try:
            assert list_exports(c) == ["vol", "other"]
        finally:
            c.close()
        assert healthy_roundtrip(s.nbd.unix_path) < 5
        assert request(pool, "ls", {})["ok"]  # the CLI still lists it (JSON escapes the surrogate)
    assert "cannot be an NBD export" in caplog.text


# =========================================================================== truncated data file (SIGBUS)
def _start_serve(pool: str, root: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    err = os.path.join(root, f"serve-{time.monotonic_ns()}.err")
    proc = subprocess.Popen([*THINPOOL, "serve", pool, *args], stdout=subprocess.DEVNULL, stderr=open(err, "w"))
    sock = os.path.join(pool, "nbd.sock")
    deadline = time.monotonic() + 60
    while True:
        # ready when both sockets accept a connection: the NBD socket's file exists from its bind(), before
        # its listen() -- a client connecting in between (a loaded machine) was refused
        try:
            for path in (os.path.join(pool, "control.sock"), sock):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(path)
            break
        except OSError:
            pass
        assert proc.poll() is None, open(err).read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, err


def test_read_past_a_truncated_data_file_is_eio_not_sigbus(tmp_path: Any) -> None:
    pool = make_pool(str(tmp_path))
    with Pool.open(pool) as p:
        data_path = p.data_path
        blocks = p.thin("other").mappings()[1]
    proc, err = _start_serve(pool, str(tmp_path))
    try:
        sock = os.path.join(pool, "nbd.sock")
        c = RawClient.connect(sock, "other")
        # keep the first mapped block of "other", cut the file where its second one starts (a page
        # boundary: reading that page through the memory map would raise SIGBUS)
        os.truncate(data_path, int(max(blocks)) * BS)
        r = c.cmd(P.CMD_READ, BS, 4096)  # "other"'s second block lies past the end
        assert r.error == P.EIO, r
        assert proc.poll() is None, "the server died: " + open(err).read()[-2000:]
        r = c.cmd(P.CMD_READ, 4 * BS, 4096)  # unmapped: zeroes, no data file access
        assert r.error == 0 and r.data == bytes(4096)
        r = c.cmd(P.CMD_WRITE, 4 * BS, data=b"\x01" * 4096)  # a write may allocate anywhere: refused
        assert r.error == P.EIO, r
        c.disconnect()
        assert proc.poll() is None
        h = RawClient.connect(sock, "vol")  # a new client still gets answers
        r = h.cmd(P.CMD_BLOCK_STATUS, 0, BS)
        assert r.error == 0
        h.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode != -signal.SIGBUS, open(err).read()[-2000:]


def test_a_data_file_read_error_is_eio_and_the_server_stays_up(tmp_path: Any) -> None:
    """NBD READs copy mapped data with pread(2), never through the memory map, so a failing read of
    the data file is that request's EIO (a media error through the map would be SIGBUS, killing the
    server).  The failure is real: the served pool's data fd is swapped for the same file opened
    write-only, on which pread fails (EBADF) while fstat still sees the full size (so no size check
    can answer for it: only the pread fails); unmapped ranges, BLOCK_STATUS and other clients are
    unaffected."""
    pool = make_pool(str(tmp_path))
    with served(pool) as s:
        c = RawClient.connect(s.nbd.unix_path, "other")
        assert c.cmd(P.CMD_READ, 0, 4096).data == bytes([0x5A]) * 4096
        data = s.pool.data
        good_fd, bad_fd = data.fd, os.open(data.path, os.O_WRONLY)
        try:
            with s.pool.locked():
                data.fd = bad_fd
            for off in (0, BS - 100, BS + 4096):  # mapped: in a block, across two blocks, the second block
                r = c.cmd(P.CMD_READ, off, 4096)
                assert r.error == P.EIO, (off, r)
            r = c.cmd(P.CMD_READ, 4 * BS, 4096)  # unmapped: zeroes, no data file access
            assert r.error == 0 and r.data == bytes(4096)
            h = RawClient.connect(s.nbd.unix_path, "vol")  # a new client still gets answers
            assert h.cmd(P.CMD_BLOCK_STATUS, 0, BS).error == 0
            assert h.cmd(P.CMD_READ, 0, 4096).error == P.EIO
            h.disconnect()
        finally:
            with s.pool.locked():
                data.fd = good_fd
            os.close(bad_fd)
        r = c.cmd(P.CMD_READ, BS - 100, 4096)  # the same connection reads again once the file is readable
        assert r.error == 0 and r.data == bytes([0x5A]) * 4096
        c.disconnect()


def test_strace_injected_eio_on_data_file_reads_is_eio_and_serve_stays_up(tmp_path: Any) -> None:
    """``thinpool serve`` under strace, every pread64 of the data file failing with EIO (a media error
    as the kernel reports it): mapped READs get EIO, an unmapped READ reads zeroes, the process stays up
    (before, READs went through the memory map, not pread)."""
    require_tool("strace")  # skip here, fail under CI=true
    pool = make_pool(str(tmp_path))
    data_path = os.path.join(pool, "data")
    trace = str(tmp_path / "trace")
    err = str(tmp_path / "serve.err")
    proc = subprocess.Popen(["/usr/bin/strace", "-f", "-qq", "-o", trace, "-P", data_path, "-e", "trace=pread64",
                             "-e", "inject=pread64:error=EIO", *THINPOOL, "serve", pool],
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"))
    serve_pid = None
    try:
        sock = os.path.join(pool, "nbd.sock")
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, open(err).read()
            time.sleep(0.05)
        serve_pid = int(open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()[0])
        c = RawClient.connect(sock, "other")
        for off in (0, BS - 100, BS + 4096):
            r = c.cmd(P.CMD_READ, off, 4096)
            assert r.error == P.EIO, (off, r)
        r = c.cmd(P.CMD_READ, 4 * BS, 4096)
        assert r.error == 0 and r.data == bytes(4096)
        c.disconnect()
        h = RawClient.connect(sock, "vol")  # the same process still answers a new client
        assert h.cmd(P.CMD_BLOCK_STATUS, 0, BS).error == 0
        h.disconnect()
        assert proc.poll() is None and os.path.exists(f"/proc/{serve_pid}"), open(err).read()[-2000:]
        assert "EIO (Input/output error) (INJECTED)" in open(trace).read()  # the server read with pread64
    finally:
        # SIGKILL: how it stops is not under test here (under strace a SIGTERM taken by a non-main
        # thread can leave the main thread in poll() until the next connection)
        if serve_pid is not None:
            os.kill(serve_pid, signal.SIGKILL)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# =========================================================================== sockets and TCP
def test_unix_sockets_are_owner_only(tmp_path: Any) -> None:
    pool = make_pool(str(tmp_path))
    old = os.umask(0)  # the most permissive umask: the sockets must still be 0600
    try:
        with served(pool) as s:
            for path in (s.control.path, s.nbd.unix_path):
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    finally:
        os.umask(old)


def test_tcp_allow_export_limits_what_tcp_clients_see_and_open(tmp_path: Any) -> None:
    pool = make_pool(str(tmp_path))
    with served(pool, tcp=("127.0.0.1", 0), nbd_options={"tcp_exports": ["other"]}) as s:
        addr = s.nbd.tcp_address
        assert list_exports(TCPClient(addr)) == ["other"]
        c = TCPClient(addr)
        c.greet()
        replies = c.option(P.OPT_GO, P.encode_go_request("vol"))
        assert replies[-1][0] == P.REP_ERR_UNKNOWN, replies
        c.close()
        c = TCPClient(addr)
        c.greet()
        c.go("other")
        assert c.cmd(P.CMD_READ, 0, 4096).data == bytes([0x5A]) * 4096
        c.disconnect()
        u = RawClient(s.nbd.unix_path)  # the owner-only unix socket still serves everything
        assert list_exports(u) == ["vol", "other"]
        u.close()
        # the URIs serve prints: a TCP one only for the volumes TCP serves
        assert s.tcp_uri("other") == f"nbd://127.0.0.1:{addr[1]}/other" and s.tcp_uri("vol") is None


def test_serve_tcp_warns_on_stderr(tmp_path: Any) -> None:
    pool = make_pool(str(tmp_path))
    proc, err = _start_serve(pool, str(tmp_path), "--tcp", "127.0.0.1:0", "--tcp-allow-export", "vol")
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    text = open(err).read()
    assert "WARNING" in text and "no authentication" in text and "vol" in text, text
    help_text = subprocess.run([*THINPOOL, "serve", "--help"], capture_output=True, text=True).stdout
    assert "every local user" in help_text and "--tcp-allow-export" in help_text


# =========================================================================== resource exhaustion
def test_ten_times_the_connection_limit_of_idle_and_half_open_clients(tmp_path: Any) -> None:
    """80 connections against a limit of 8 -- silent, greeted-only and half-sent client flags -- and a
    healthy client still gets answered within a second."""
    pool = make_pool(str(tmp_path))
    limit = 8
    hostile: list[socket.socket] = []
    with served(pool, nbd_options={"max_clients": limit}) as s:
        try:
            for i in range(10 * limit):
                h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                h.settimeout(5)
                h.connect(s.nbd.unix_path)
                if i % 3 == 1:
                    try:
                        h.recv(P.GREETING_SIZE)
                    except OSError:
                        pass
                elif i % 3 == 2:
                    h.sendall(b"\x00\x00")  # half of the client flags
                hostile.append(h)
            # wait until the server has taken all 80 (accepted, the 72 over the limit evicted and their
            # threads gone), not a fixed time: on a loaded machine a fixed 0.2 s left the healthy client
            # queued behind the server still working through them (up to 0.6 s of the 1 s at load 8)
            deadline = time.monotonic() + 60
            while s.nbd.total_connections < 10 * limit or s.nbd.active_clients > limit:
                assert time.monotonic() < deadline, (s.nbd.total_connections, s.nbd.active_clients)
                time.sleep(0.01)
            took = [healthy_roundtrip(s.nbd.unix_path) for _ in range(5)]
            FIGURES["nbd_healthy_s_under_80_idle"] = max(took)
            print(f"\n[exhaustion] healthy NBD round trip with {10 * limit} idle connections (limit {limit}): "
                  f"max {max(took) * 1000:.1f} ms of 5 {[round(t * 1000) for t in took]}, {s.nbd.evictions} evictions")
            assert max(took) < 1.0, took
            assert s.nbd.active_clients <= limit + 1
        finally:
            for h in hostile:
                h.close()


def test_handshake_and_idle_timeouts(tmp_path: Any) -> None:
    pool = make_pool(str(tmp_path))
    with served(pool, nbd_options={"handshake_timeout": 1.0, "idle_timeout": 1.5}) as s:
        silent = RawClient(s.nbd.unix_path)
        t0 = time.monotonic()
        assert silent.at_eof(timeout=5), "a silent client was not dropped"
        dropped_after = time.monotonic() - t0
        assert 0.8 < dropped_after < 3, dropped_after
        idle = RawClient.connect(s.nbd.unix_path, "vol")
        time.sleep(0.5)
        assert idle.cmd(P.CMD_READ, 0, 512).error == 0  # activity resets the idle clock
        t0 = time.monotonic()
        assert idle.at_eof(timeout=5)
        assert 1.2 < time.monotonic() - t0 < 3.5
    with served(pool) as s:  # the default: no idle timeout in the transmission phase
        assert s.nbd._ctx.idle_timeout is None and s.nbd._ctx.handshake_timeout == 10.0


def test_stalled_write_payloads_are_bounded(tmp_path: Any) -> None:
    """Clients announce 32 MiB WRITEs, send part of them and stall: the buffered bytes stay within
    the server's payload budget, a healthy client is answered within a second, and the stalled
    connections are dropped at the message deadline with their budget returned."""
    pool = make_pool(str(tmp_path))
    budget = 32 * MiB
    opts = {"max_clients": 16, "message_timeout": 4.0, "payload_budget": budget}
    stalled: list[RawClient] = []

    def push(c: RawClient) -> None:
        try:  # 12 MiB of a 32 MiB WRITE each (96 MiB in all), then silence
            c.sock.sendall(P.encode_request(P.CMD_WRITE, 1, 0, P.MAX_PAYLOAD) + bytes(12 * MiB))
        except OSError:
            pass

    with served(pool, nbd_options=opts) as s:
        try:
            pushers = []
            for i in range(8):
                c = RawClient.connect(s.nbd.unix_path, "vol")
                c.sock.settimeout(6)
                stalled.append(c)
                pushers.append(threading.Thread(target=push, args=(c,), daemon=True))
                pushers[-1].start()
            peak = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:
                peak = max(peak, s.nbd._ctx.budget.used)
                time.sleep(0.01)
            used = peak
            FIGURES["stalled_budget_used"] = used
            assert budget - 2 * MiB <= used <= budget, used  # the budget fills, and no further
            took = healthy_roundtrip(s.nbd.unix_path)
            FIGURES["nbd_healthy_s_under_stalled"] = took
            print(f"\n[exhaustion] 8 stalled 32 MiB WRITEs: {used / MiB:.1f} MiB buffered (budget "
                  f"{budget // MiB} MiB); healthy round trip {took * 1000:.1f} ms")
            assert took < 1.0
            deadline = time.monotonic() + 10
            while s.nbd._ctx.budget.used and time.monotonic() < deadline:
                time.sleep(0.1)
            assert s.nbd._ctx.budget.used == 0
            for c in stalled:
                assert c.at_eof(timeout=5)
        finally:
            for c in stalled:
                c.close()


def test_write_header_alone_then_silence_is_dropped_at_the_message_deadline(tmp_path: Any) -> None:
    """A WRITE header sent on its own and no payload after it: waiting for that payload is a wait inside
    a message, bounded by the message deadline like a payload that stalls half-way (not an idle wait,
    which has no limit by default) -- with busy-polling on or off; the server goes on serving."""
    pool = make_pool(str(tmp_path))
    with served(pool, nbd_options={"message_timeout": 1.0}) as s:
        for _ in range(2):  # the second time the session may be busy-polling (its client answered quickly)
            c = RawClient.connect(s.nbd.unix_path, "vol")
            try:
                assert c.cmd(P.CMD_READ, 0, 512).error == 0
                c.sock.sendall(P.encode_request(P.CMD_WRITE, 7, 0, 4096))
                t0 = time.monotonic()
                assert c.at_eof(timeout=10), "a WRITE whose payload never came was waited for past its deadline"
                assert 0.5 < time.monotonic() - t0 < 5
            finally:
                c.close()
        assert healthy_roundtrip(s.nbd.unix_path) < 5


def test_control_socket_idle_connections_cannot_lock_out_the_cli(tmp_path: Any) -> None:
    pool = make_pool(str(tmp_path))
    with served(pool) as s:
        s.control.max_clients = 8
        idle = []
        try:
            for _ in range(80):
                h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                h.connect(s.control.path)
                idle.append(h)
            time.sleep(0.2)
            t0 = time.monotonic()
            for _ in range(5):
                assert run_op(pool, "status")["nr_thins"] == 2
            took = (time.monotonic() - t0) / 5
            FIGURES["control_status_s_under_80_idle"] = took
            print(f"\n[exhaustion] CLI status over the control socket with 80 idle connections (limit 8): "
                  f"{took * 1000:.1f} ms, {s.control.evictions} evictions")
            assert took < 1.0
        finally:
            for h in idle:
                h.close()


def test_control_server_drops_a_silent_client(tmp_path: Any) -> None:
    pool = make_pool(str(tmp_path))
    with served(pool, control_timeout=1.0) as s:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as h:
            h.settimeout(5)
            h.connect(s.control.path)
            h.sendall(b'{"op": "sta')  # and never the rest
            t0 = time.monotonic()
            assert h.recv(100) == b""
            assert time.monotonic() - t0 < 3


def test_cli_control_client_times_out_naming_the_socket(tmp_path: Any, monkeypatch: Any) -> None:
    """A serving process that accepts and never answers: the CLI gives up and says so."""
    pool = str(tmp_path / "pool")
    os.mkdir(pool)
    path = os.path.join(pool, "control.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    monkeypatch.setenv("THINPOOL_CONTROL_TIMEOUT", "1")
    try:
        t0 = time.monotonic()
        with pytest.raises(E.FailedPrecondition) as exc:
            run_op(pool, "status")
        assert time.monotonic() - t0 < 5
        assert "not answering" in str(exc.value) and "control.sock" in str(exc.value)
    finally:
        srv.close()
