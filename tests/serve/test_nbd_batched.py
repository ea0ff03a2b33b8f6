"""Batched requests on one NBD connection, and the compiled loop's in-place WRITEs.

A session receives whatever the socket holds in one ``recv`` and serves every complete request in its
buffer before it sends the replies (one ``send``) and waits again -- in the compiled loop
(thinpool/kernels_nbd.py: READs, and WRITEs that overwrite a provisioned, unshared block in place) and
in the Python path alike.  These tests send requests the way a pipelining client does -- several in one
send, one split across sends, a WRITE payload arriving in pieces, a client that hangs up in the middle
of a batch -- with the compiled loop on and off, and check every reply (by handle) and the volume's bytes.
The other tests check what the in-place writes must leave to the Python path (copy-on-write after a
snapshot, FUA, a truncated data file) and that a connection binding its compiled loop does not
invalidate the other connections' bindings (poollock.PoolLock.inspecting).
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import threading
from typing import Iterator

import pytest
from tests.serve.test_nbd_pool import Raw
from tests.support import serving_with_loop_probe

from thinpool import Pool
from thinpool.nbd import protocol as P
from thinpool.nbd import readloop
from thinpool.nbd.pool_backend import PoolProvider
from thinpool.nbd.server import NBDServer
from thinpool.poollock import PoolLock

KiB, MiB = 1024, 1024 * 1024
BS = 64 * KiB
VOL = 4 * MiB


class Served:
    """A pool served in-process, its volume provisioned; per finished connection, what its compiled
    loop served: (READs, WRITEs, bindings)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.pool = Pool.create(os.path.join(root, "pool"), data_size=64 * MiB, block_size="64KiB")
        self.image = bytearray(random.Random(1).randbytes(VOL))
        self.pool.create_thin("vol", VOL).write(0, bytes(self.image))
        self.pool.commit()
        self.provider = PoolProvider(self.pool)
        self.sock = os.path.join(root, "nbd.sock")
        self.server = NBDServer(self.provider, unix_path=self.sock)
        self.loops: list[tuple[int, int, int]] = []

    def raw(self, name: str = "vol", structured: bool = False) -> Raw:
        return Raw(self.sock, name, structured)

    def volume(self, name: str = "vol") -> bytes:
        with self.pool.locked():
            return self.pool.thin(name).read(0, VOL)


@pytest.fixture(params=[True, False], ids=["compiled", "python"])
def served(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setattr(readloop, "ENABLED", request.param)
    root = tempfile.mkdtemp(prefix="nbdb", dir="/tmp")
    s = Served(root)
    with serving_with_loop_probe(monkeypatch, s.server, root,
                                 lambda loop: s.loops.append((loop.served, loop.written, loop.binds))):
        yield s


def _replies(c: Raw, expect: dict[int, int]) -> dict[int, tuple[int, bytes]]:
    """Read one simple reply per handle in ``expect`` (handle -> READ length, 0 for other commands):
    handle -> (error, data)."""
    got: dict[int, tuple[int, bytes]] = {}
    while len(got) < len(expect):
        hdr = P.decode_reply_header(c.recv(16))
        assert hdr.handle in expect and hdr.handle not in got, hdr
        n = expect[hdr.handle]
        got[hdr.handle] = (hdr.error, c.recv(n) if n and hdr.error == 0 else b"")
    return got


def _finish(served: Served, c: Raw) -> None:
    """Disconnect cleanly and wait until the session has ended (its loop counted)."""
    n = len(served.loops)
    c.sock.sendall(P.encode_request(P.CMD_DISC, 0))
    c.sock.settimeout(30)
    assert c.sock.recv(1) == b""
    c.close()
    if readloop.ENABLED:
        for _ in range(300):
            if len(served.loops) > n:
                return
            threading.Event().wait(0.01)
        raise AssertionError("the session did not end")


def test_nbd_rule_several_requests_in_one_send_are_each_answered_once(served: Served) -> None:
    """Sixty requests in one send -- overwrites (some across a block boundary), reads of what they
    wrote, FUA writes, flushes -- each get one reply with their handle, READs see the WRITEs sent
    before them (the server serves a connection's requests in order), and the volume holds the
    model's bytes."""
    rnd = random.Random(2)
    model = served.image
    c = served.raw()
    wire, expect, reads = [], {}, {}
    for h in range(1, 61):
        off = rnd.randrange(0, VOL - 8192)
        kind = h % 6
        if kind in (0, 1, 2):
            n = rnd.choice((512, 4096, 4096, 12288))
            data = rnd.randbytes(n)
            flags = P.CMD_FLAG_FUA if kind == 2 else 0
            wire.append(P.encode_request(P.CMD_WRITE, h, off, n, flags) + data)
            model[off:off + n] = data
            expect[h] = 0
        elif kind in (3, 4):
            n = rnd.choice((512, 4096))
            wire.append(P.encode_request(P.CMD_READ, h, off, n))
            reads[h] = bytes(model[off:off + n])
            expect[h] = n
        else:
            wire.append(P.encode_request(P.CMD_FLUSH, h))
            expect[h] = 0
    c.sock.sendall(b"".join(wire))
    got = _replies(c, expect)
    assert all(err == 0 for err, _ in got.values()), got
    for h, data in reads.items():
        assert got[h][1] == data, h
    _finish(served, c)
    assert served.volume() == bytes(model)
    if readloop.ENABLED:
        reads_c, writes_c, _binds = served.loops[-1]
        assert reads_c > 0 and writes_c > 0  # both kinds went through the compiled loop


def test_nbd_rule_a_request_split_across_sends_is_served_whole(served: Served) -> None:
    """A WRITE whose header arrives in three pieces and whose payload arrives in pieces -- some gaps
    shorter than the compiled loop's wait for a payload, one longer (the request goes to the Python
    path, which waits under the message deadline) -- is written whole and answered once; a READ after
    it sees it."""
    c = served.raw()
    assert c.cmd(P.CMD_READ, 0, 4096)[1] == bytes(served.image[:4096])  # the session now waits for requests
    data = random.Random(3).randbytes(64 * KiB)
    off = 3 * BS  # one whole provisioned block: an in-place overwrite
    req = P.encode_request(P.CMD_WRITE, 42, off, len(data)) + data
    cuts = [0, 5, 20, 28, 29, 4096, 4100, 30000, 50000, len(req)]
    gaps = [0.01, 0.01, 0.002, 0.002, 0.05, 0.001, 0.002, 0.08, 0]
    for a, b, gap in zip(cuts, cuts[1:], gaps):
        c.sock.sendall(req[a:b])
        threading.Event().wait(gap)
    hdr = P.decode_reply_header(c.recv(16))
    assert (hdr.handle, hdr.error) == (42, 0)
    assert c.cmd(P.CMD_READ, off, len(data))[1] == data
    _finish(served, c)
    served.image[off:off + len(data)] = data
    assert served.volume() == bytes(served.image)


def test_nbd_rule_a_write_payload_split_across_sends_in_a_batch(served: Served) -> None:
    """Pipelined WRITEs cut into sends at arbitrary points (a send ends inside a header, inside a
    payload, right after a header) are each written whole and answered once, in a stream that also
    wraps the session's receive buffer."""
    rnd = random.Random(4)
    model = served.image
    c = served.raw(structured=True)
    wire, expect = [], {}
    for h in range(1, 121):
        n = rnd.choice((4096, 4096, 65536, 512))
        off = rnd.randrange(0, (VOL - n) // 512) * 512
        data = rnd.randbytes(n)
        wire.append(P.encode_request(P.CMD_WRITE, h, off, n) + data)
        model[off:off + n] = data
        expect[h] = 0
    stream = b"".join(wire)
    pos = 0
    while pos < len(stream):
        step = rnd.choice((1, 27, 28, 29, 3000, 4124, 70000))
        c.sock.sendall(stream[pos:pos + step])
        pos += step
        if rnd.random() < 0.1:
            threading.Event().wait(0.005)
    got = _replies(c, expect)
    assert all(err == 0 for err, _ in got.values())
    _finish(served, c)
    assert served.volume() == bytes(model)
    if readloop.ENABLED:
        assert served.loops[-1][1] > 0


def test_nbd_rule_a_client_hanging_up_mid_batch_gets_its_complete_requests_served(served: Served) -> None:
    """Ten complete WRITEs and the header plus half the payload of an eleventh, then the client closes:
    the ten are written (a server serves what it received), the eleventh changes nothing, and the
    server serves the next client."""
    rnd = random.Random(5)
    model = served.image
    c = served.raw()
    wire = []
    for h in range(10):
        off = h * BS + 4096
        data = rnd.randbytes(4096)
        wire.append(P.encode_request(P.CMD_WRITE, h, off, 4096) + data)
        model[off:off + 4096] = data
    wire.append(P.encode_request(P.CMD_WRITE, 99, 20 * BS, 4096) + b"\xff" * 2048)
    c.sock.sendall(b"".join(wire))
    c.sock.shutdown(socket.SHUT_WR)
    c.sock.settimeout(30)
    while c.sock.recv(1 << 16):  # the replies (if any got out), then the server hangs up
        pass
    c.close()
    d = served.raw()
    assert d.cmd(P.CMD_READ, 0, VOL)[1] == bytes(model)
    d.close()


def test_kernel_rule_overwrite_after_a_snapshot_breaks_sharing_not_in_place(served: Served) -> None:
    """dm-thin's rule: a write to a block shared with a snapshot gets a new block (copy-on-write); the
    snapshot keeps the old bytes.  The compiled loop writes in place only unshared blocks: after the
    snapshot its write goes to the Python path, which breaks sharing."""
    c = served.raw()
    first = b"\x11" * 4096
    assert c.cmd(P.CMD_WRITE, 5 * BS, data=first)[0] == 0
    with served.pool.locked():  # as the control socket runs `thinpool snapshot`
        served.pool.snapshot("vol", "snap")
    second = b"\x22" * 4096
    assert c.cmd(P.CMD_WRITE, 5 * BS, data=second)[0] == 0
    for _ in range(20):  # unshared again: in place (after a write handed back, 16 go to Python first)
        assert c.cmd(P.CMD_WRITE, 5 * BS + 4096, data=second)[0] == 0
    assert c.cmd(P.CMD_READ, 5 * BS, 8192)[1] == second * 2
    _finish(served, c)
    with served.pool.locked():
        snap = served.pool.thin("snap").read(5 * BS, 8192)
    assert snap == first + bytes(served.image[5 * BS + 4096:5 * BS + 8192])
    if readloop.ENABLED:
        assert served.loops[-1][1] >= 2  # the first write and the last ones were in place


def test_nbd_rule_write_to_a_truncated_data_file_is_eio_and_does_not_extend_it(served: Served) -> None:
    """A data file truncated behind the server's back: an overwrite of a block that still lies inside
    the file is refused with EIO (it would re-extend the file, and blocks past the old end would read
    zeroes) -- the compiled loop checks the file's size as the Python path does."""
    c = served.raw()
    assert c.cmd(P.CMD_WRITE, 0, data=b"\x33" * 4096)[0] == 0  # in place, the loop is bound
    path = served.pool.data_path
    size = os.path.getsize(path)
    os.truncate(path, size - 4 * BS)
    assert c.cmd(P.CMD_WRITE, 4096, data=b"\x44" * 4096)[0] == P.EIO
    assert os.path.getsize(path) == size - 4 * BS
    c.close()


@pytest.mark.parametrize("served", [True], ids=["compiled"], indirect=True)
def test_nbd_rule_a_connection_binding_its_loop_keeps_the_others_bindings_valid(served: Served) -> None:
    """Two connections reading in turn: each binds its compiled loop once.  (A binding took the pool's
    lock, which moved the generation and so invalidated the other connection's binding: the two
    rebound in turn at every request.)"""
    assert readloop.ENABLED
    a, b = served.raw(), served.raw()
    for i in range(40):
        off = i * 4096
        assert a.cmd(P.CMD_READ, off, 4096)[1] == bytes(served.image[off:off + 4096])
        assert b.cmd(P.CMD_WRITE, VOL - BS + (i % 16) * 4096, data=bytes([i]) * 4096)[0] == 0
    _finish(served, a)
    _finish(served, b)
    assert [binds for _r, _w, binds in served.loops] == [1, 1], served.loops
    assert served.loops[0][0] == 40 and served.loops[1][1] == 40


def test_pool_lock_inspecting_moves_no_generation_and_excludes_other_holders() -> None:
    """``PoolLock.inspecting()`` is the lock for looking only: other threads wait for it as for ``with
    lock``, but it moves no generation (registered readers stay bound); ``with lock`` does."""
    lock = PoolLock()
    registered = threading.Event()
    release = threading.Event()

    def reader_thread() -> None:
        with lock:
            lock.add_reader()
        registered.set()
        release.wait(30)
        with lock.inspecting():
            lock.drop_reader()
    t = threading.Thread(target=reader_thread)
    t.start()
    try:
        assert registered.wait(30)
        gen = int(lock.gen[0])
        with lock.inspecting():
            assert int(lock.gen[0]) == gen
            took = []
            other = threading.Thread(target=lambda: took.append(lock.acquire(timeout=0.05)))
            other.start()
            other.join()
            assert took == [False]  # excluded like any holder
        assert int(lock.gen[0]) == gen
        with lock:
            assert int(lock.gen[0]) == gen + 1  # a holder that may change the pool invalidates bindings
    finally:
        release.set()
        t.join(30)
    assert lock.readers == 0
