"""dm-thin's discard features and its no-space queue on a served pool (``thinpool serve``), with real clients.

Kernel rules (drivers/md/dm-thin.c; docs/dm-thin.md §6, §9):

* ``ignore_discard``: the thin devices advertise no discard support (``pool_io_hints`` zeroes the discard
  limits) -- over NBD, ``NBD_FLAG_SEND_TRIM`` is not advertised (nbdinfo's ``can_trim`` is false), and a
  TRIM a client sends anyway is refused (EINVAL) with nothing changed;
* ``pool_ctr`` on an active pool: "Discard support cannot be disabled once enabled" (``thinpool set`` on a
  served pool), while passdown may change;
* ``queue_if_no_space``: a write that needs a block while the pool is out of data space is held until a
  resize makes room (here: ``thinpool resize`` through the control socket) and then completes; other
  connections are served meanwhile; after ``no_space_timeout`` it fails with ENOSPC.  A client that
  hangs up while its write is held: the write is dropped, never written.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from tests.support import require_tool

from thinpool import Pool
from thinpool.nbd import protocol as P
from tests.serve.test_nbd_pool import BS, MiB, Env, Raw, cli, cli_json, env, ok, stopped_and_checked  # noqa: F401

pytestmark = pytest.mark.realtools

LIMIT = 60.0


def make_full_pool(env: Env, **features) -> None:
    """4 data blocks, all mapped by ``vol`` (blocks 0..3 hold bytes 1..4)."""
    with Pool.create(env.pool, data_size=4 * BS, block_size=BS, **features) as p:
        v = p.create_thin("vol", 4 * MiB)
        for i in range(4):
            v.write(i * BS, bytes([i + 1]) * BS)


def wait_status(env: Env, cond, what: str) -> dict:
    deadline = time.monotonic() + LIMIT
    while True:
        st = cli_json("status", env.pool)
        if cond(st):
            return st
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {st['dmsetup_line']}"
        time.sleep(0.05)


class Pending(threading.Thread):
    """One request of a :class:`Raw` client, in a thread (its reply may be held)."""

    def __init__(self, client: Raw, *args, **kw) -> None:
        super().__init__(daemon=True)
        self.client, self.args, self.kw = client, args, kw
        self.reply = None

    def run(self) -> None:
        try:
            self.reply = self.client.cmd(*self.args, **self.kw)
        except Exception as exc:  # noqa: BLE001
            self.reply = exc

    def finish(self):
        self.join(LIMIT)
        assert not self.is_alive(), "the held request never got its reply"
        return self.reply


def test_kernel_rule_ignore_discard_trim_is_not_advertised(env: Env) -> None:
    require_tool("nbdinfo")
    with Pool.create(env.pool, data_size="64MiB", block_size=BS, discard="ignore") as p:
        p.create_thin("vol", 4 * MiB).write(0, b"k" * (2 * BS))
    srv = env.serve()
    (info,) = json.loads(ok("nbdinfo", "--json", srv.uri("vol")))["exports"]
    assert info["can_trim"] is False and info["can_zero"] is True and not info["is_read_only"]
    c = Raw(srv.sock, "vol")
    try:
        assert c.cmd(P.CMD_TRIM, 0, 2 * BS)[0] == P.EINVAL          # not advertised: refused
        assert c.cmd(P.CMD_WRITE_ZEROES, 0, BS, flags=P.CMD_FLAG_FAST_ZERO)[0] == P.ENOTSUP  # cannot unmap
        assert c.cmd(P.CMD_WRITE_ZEROES, BS, BS)[0] == 0            # writes zeroes instead of unmapping
        err, data, _ = c.cmd(P.CMD_READ, 0, 2 * BS)
        assert err == 0 and data == b"k" * BS + bytes(BS)
    finally:
        c.close()
    r = cli("set", env.pool, "--discard-passdown")  # an active pool: discards stay off
    assert r.returncode == 1 and "Discard support cannot be disabled once enabled" in r.stderr
    p = stopped_and_checked(srv)
    try:
        assert p.thin("vol").mapped_blocks == 2 and p.features["discard"] == "ignore"
    finally:
        p.close()


def test_kernel_rule_served_pool_may_change_passdown_but_not_discard_support(env: Env) -> None:
    with Pool.create(env.pool, data_size="64MiB", block_size=BS) as p:
        p.create_thin("vol", MiB)
    srv = env.serve()
    r = cli("set", env.pool, "--ignore-discard")
    assert r.returncode == 1 and "Discard support cannot be disabled once enabled" in r.stderr
    out = cli_json("set", env.pool, "--no-discard-passdown", "--error-if-no-space")
    assert out["discard"] == "nopassdown" and " no_discard_passdown error_if_no_space " in out["dmsetup_line"]
    p = stopped_and_checked(srv)
    p.close()
    out = cli_json("set", env.pool, "--ignore-discard")  # not served: a new activation may
    assert " ignore_discard " in out["dmsetup_line"]


def test_kernel_rule_queue_if_no_space_holds_nbd_write_until_resize(env: Env) -> None:
    make_full_pool(env, no_space_timeout=0)
    srv = env.serve()
    a, b = Raw(srv.sock, "vol"), Raw(srv.sock, "vol")
    try:
        held = Pending(a, P.CMD_WRITE, 10 * BS, data=b"q" * 4096)
        held.start()
        st = wait_status(env, lambda s: s["queued_writes"] == 1, "the write to be queued")
        assert st["mode"] == "out-of-data-space" and " queue_if_no_space " in st["dmsetup_line"]
        assert held.is_alive()
        err, data, _ = b.cmd(P.CMD_READ, 2 * BS, 8)        # another connection is served meanwhile
        assert err == 0 and data == b"\x03" * 8
        assert b.cmd(P.CMD_WRITE, 0, data=b"w" * 8)[0] == 0  # a provisioned block: no space needed
        cli_json("resize", env.pool, "1MiB")                  # through the control socket
        assert held.finish()[0] == 0
        err, data, _ = b.cmd(P.CMD_READ, 10 * BS, 4096)
        assert err == 0 and data == b"q" * 4096
    finally:
        a.close()
        b.close()
    p = stopped_and_checked(srv)
    try:
        assert p.thin("vol").read(10 * BS, 4096) == b"q" * 4096 and p.thin("vol").read(0, 8) == b"w" * 8
    finally:
        p.close()


def test_kernel_rule_held_nbd_write_fails_with_enospc_after_no_space_timeout(env: Env) -> None:
    make_full_pool(env, no_space_timeout=0.5)
    srv = env.serve()
    c = Raw(srv.sock, "vol")
    try:
        assert c.cmd(P.CMD_WRITE, 10 * BS, data=b"t" * 512)[0] == P.ENOSPC
        st = cli_json("status", env.pool)
        assert " out_of_data_space discard_passdown error_if_no_space " in st["dmsetup_line"]
        cli_json("resize", env.pool, "1MiB")
        assert " rw discard_passdown queue_if_no_space " in cli_json("status", env.pool)["dmsetup_line"]
        assert c.cmd(P.CMD_WRITE, 10 * BS, data=b"t" * 512)[0] == 0
    finally:
        c.close()
    stopped_and_checked(srv).close()


def test_held_nbd_write_of_a_client_that_hangs_up_is_dropped(env: Env) -> None:
    make_full_pool(env, no_space_timeout=0)
    srv = env.serve()
    a = Raw(srv.sock, "vol")
    a.sock.sendall(P.encode_request(P.CMD_WRITE, 1, 10 * BS, 512, 0) + b"x" * 512)
    wait_status(env, lambda s: s["queued_writes"] == 1, "the write to be queued")
    a.sock.shutdown(socket.SHUT_RDWR)
    a.close()
    wait_status(env, lambda s: s["queued_writes"] == 0, "the held write to be dropped")
    cli_json("resize", env.pool, "1MiB")
    b = Raw(srv.sock, "vol")
    try:
        assert b.cmd(P.CMD_READ, 10 * BS, 512)[1] == bytes(512)  # never written
    finally:
        b.close()
    p = stopped_and_checked(srv)
    try:
        assert p.thin("vol").mapped_blocks == 4
    finally:
        p.close()


def test_held_nbd_write_gets_eshutdown_when_the_server_stops(env: Env) -> None:
    make_full_pool(env, no_space_timeout=0)
    srv = env.serve()
    a = Raw(srv.sock, "vol")
    try:
        held = Pending(a, P.CMD_WRITE, 10 * BS, data=b"s" * 512)
        held.start()
        wait_status(env, lambda s: s["queued_writes"] == 1, "the write to be queued")
        p = stopped_and_checked(srv)  # SIGTERM: exits 0 although a write was held
        try:
            assert p.thin("vol").mapped_blocks == 4
        finally:
            p.close()
        reply = held.finish()
        assert not isinstance(reply, Exception) and reply[0] == P.ESHUTDOWN, reply
    finally:
        a.close()
