"""The NBD session's compiled read loop (thinpool/kernels_nbd.py, nbd/readloop.py, poollock.py).

* the bytes on the wire are the Python path's: the same pipelined stream of good and malformed
  requests gets byte-identical replies with the compiled loop on and off (simple and structured);
* reads of several connections served by the compiled loop while another connection writes, trims and
  snapshots never see a half-updated mapping or a reused block: every 4 KiB read is one whole version
  of its block that the block had, a reader never goes back in a block's history, and each snapshot
  reads back as the model at the moment it was taken;
* nbdcopy over several connections (CAN_MULTI_CONN) copies the volume exactly.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from typing import Any, Iterator

import pytest
from tests.serve.test_nbd_pool import Raw
from tests.support import require_tool, serving_with_loop_probe

from thinpool import Pool
from thinpool.nbd import protocol as P
from thinpool.nbd import readloop
from thinpool.nbd.pool_backend import PoolProvider
from thinpool.nbd.server import NBDServer

KiB, MiB = 1024, 1024 * 1024
BS = 64 * KiB
VOL = 4 * MiB
NBLOCKS = VOL // BS


class Served:
    """A pool served in-process; counts the READs the compiled loop served per connection."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.pool = Pool.create(os.path.join(root, "pool"), data_size=64 * MiB, block_size="64KiB")
        self.pool.create_thin("vol", VOL)
        self.pool.create_thin("other", VOL)
        self.provider = PoolProvider(self.pool)
        self.sock = os.path.join(root, "nbd.sock")
        self.server = NBDServer(self.provider, unix_path=self.sock)
        self.compiled_served: list[int] = []

    def raw(self, name: str = "vol", structured: bool = True) -> Raw:
        return Raw(self.sock, name, structured)


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    root = tempfile.mkdtemp(prefix="nbdr", dir="/tmp")
    s = Served(root)
    with serving_with_loop_probe(monkeypatch, s.server, root, lambda loop: s.compiled_served.append(loop.served)):
        yield s


def _stream(served: Served, structured: bool, requests: bytes) -> bytes:
    """Every byte the server answers to ``requests`` (sent in one piece) until it hangs up."""
    c = served.raw(structured=structured)
    c.sock.sendall(requests)
    out = bytearray()
    while True:
        chunk = c.sock.recv(1 << 20)
        if not chunk:
            break
        out += chunk
    c.close()
    return bytes(out)


def _hostile_requests(size: int) -> bytes:
    r = P.encode_request
    reqs = [
        r(P.CMD_READ, 1, 0, 4096),                       # plain
        r(P.CMD_READ, 2, size - 4096, 4096),             # last 4 KiB
        r(P.CMD_READ, 3, size - 4096, 8192),             # past the end: EINVAL
        r(P.CMD_READ, 4, 2**64 - 4096, 4096),            # offset overflows
        r(P.CMD_READ, 5, 2**63, 4096),                   # offset >= 2**63
        r(P.CMD_READ, 6, 4096, 0),                       # zero length
        r(P.CMD_READ, 7, 0, 4096, flags=1 << 7),         # unknown flag
        r(P.CMD_READ, 8, 0, 4096, flags=P.CMD_FLAG_FUA),  # FUA: served
        r(P.CMD_READ, 20, 4096, 4096, flags=P.CMD_FLAG_DF),  # DF: served if structured, else EINVAL
        r(P.CMD_READ, 21, 0, 4096, flags=P.CMD_FLAG_NO_HOLE),  # a WRITE_ZEROES flag on a READ: EINVAL
        r(P.CMD_READ, 9, 0, 300 * KiB),                  # longer than the compiled loop serves
        r(P.CMD_READ, 10, 0, 2**32 - 1),                 # longer than the server accepts
        r(P.CMD_READ, 11, BS - 2048, 4096),              # across a block boundary
        r(P.CMD_WRITE, 12, 8192, 4096) + b"\xab" * 4096,  # a write between reads
        r(P.CMD_READ, 13, 8192, 4096),                   # sees it
        r(P.CMD_TRIM, 14, BS, BS),
        r(P.CMD_READ, 15, BS, 4096),                     # a hole now
        r(99, 16, 0, 4096),                              # unknown command: EINVAL
        r(P.CMD_FLUSH, 17),
        r(P.CMD_READ, 18, 12345, 777),                   # unaligned
    ]
    body = b"".join(reqs)
    # a bad magic last: the server hangs up
    return body + struct.pack(">IHHQQI", 0x12345678, 0, P.CMD_READ, 19, 0, 4096)


@pytest.mark.parametrize("structured", [False, True])
def test_nbd_rule_compiled_loop_answers_byte_for_byte_like_the_python_path(served: Served, structured: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(7)
    data = bytes(rnd.getrandbits(8) for _ in range(256 * KiB))
    with served.pool.locked():
        served.pool.thin("vol").write(0, data)
        served.pool.thin("vol").write(VOL - 256 * KiB, data)
    wire = _hostile_requests(VOL)
    compiled = _stream(served, structured, wire)
    assert served.compiled_served and served.compiled_served[-1] > 0  # the compiled loop served reads
    # the same stream once more with the pool restored and the compiled loop off
    with served.pool.locked():
        served.pool.thin("vol").write(8192, data[8192:12288])
        served.pool.thin("vol").write(BS, data[BS:2 * BS])
    monkeypatch.setattr(readloop, "ENABLED", False)
    n = len(served.compiled_served)
    python = _stream(served, structured, wire)
    assert len(served.compiled_served) == n  # not used this time
    assert compiled == python
    assert len(compiled) > 256 * KiB  # the long reads were answered too


def test_nbd_rule_compiled_loop_pipelined_reads_arrive_whole(served: Served) -> None:
    """Hundreds of READs sent in one piece (the receive buffer fills and wraps, replies fill the reply
    buffer) are answered once each with the right bytes."""
    rnd = random.Random(3)
    data = bytes(rnd.getrandbits(8) for _ in range(VOL))
    served.pool.thin("vol").write(0, data)
    c = served.raw(structured=False)
    offs = [rnd.randrange(0, VOL - 64 * KiB) for _ in range(600)]
    lens = [rnd.choice((512, 4096, 4096, 65536)) for _ in offs]
    c.sock.sendall(b"".join(P.encode_request(P.CMD_READ, i, o, n) for i, (o, n) in enumerate(zip(offs, lens))))
    for i, (o, n) in enumerate(zip(offs, lens)):
        hdr = P.decode_reply_header(c.recv(16))
        assert (hdr.handle, hdr.error) == (i, 0)
        assert c.recv(n) == data[o:o + n]
    c.close()


def _pattern(block: int, version: int) -> bytes:
    return struct.pack("<II", block, version) * (BS // 8)


def test_kernel_rule_reads_never_see_a_half_updated_mapping_while_another_connection_writes(served: Served) -> None:
    """Three reader connections (compiled loop) against one writer connection that overwrites whole blocks,
    trims blocks (freed blocks are reused by writes to another volume) and takes snapshots (the next
    write to a block breaks sharing: the mapping moves) -- dm-thin's rule that an I/O sees the mapping
    before or after a change, never a mix."""
    pool = served.pool
    history: list[list[tuple[int, int]]] = [[(0, 0)] for _ in range(NBLOCKS)]  # (block, version); (0,0) = zeroes
    done = threading.Event()
    errors: list[str] = []
    snapshots: list[tuple[str, bytes]] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        c = served.raw(structured=seed % 2 == 0)
        seen = [0] * NBLOCKS
        try:
            while not done.is_set():
                b = rnd.randrange(NBLOCKS)
                off = b * BS + rnd.randrange(BS // 4096) * 4096
                err, got, _ = c.cmd(P.CMD_READ, off, 4096)
                if err:
                    errors.append(f"read at {off}: error {err}")
                    return
                blk, ver = struct.unpack_from("<II", got)
                if got != _pattern(blk, ver)[:4096] or (ver and blk != b):
                    errors.append(f"read at {off}: not one whole version of block {b}: {got[:16].hex()}")
                    return
                hist = history[b]
                try:
                    i = max(j for j, h in enumerate(hist) if h == ((0, 0) if ver == 0 else (b, ver)))
                except ValueError:
                    errors.append(f"read at {off}: version {ver} was never written to block {b}")
                    return
                if ver and i < seen[b]:
                    errors.append(f"read at {off}: went back in block {b}'s history ({i} < {seen[b]})")
                    return
                seen[b] = max(seen[b], i if ver else seen[b])
        finally:
            c.close()

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    w = served.raw(structured=True)
    other = served.raw("other", structured=False)
    rnd = random.Random(11)
    model = bytearray(VOL)
    version = 0
    try:
        for step in range(300):
            b = rnd.randrange(NBLOCKS)
            what = rnd.random()
            if what < 0.65:
                version += 1
                history[b].append((b, version))  # before the write: a reader may see it from now on
                assert w.cmd(P.CMD_WRITE, b * BS, data=_pattern(b, version))[0] == 0
                model[b * BS:(b + 1) * BS] = _pattern(b, version)
            elif what < 0.85:
                assert w.cmd(P.CMD_TRIM, b * BS, BS)[0] == 0
                history[b].append((0, 0))
                model[b * BS:(b + 1) * BS] = bytes(BS)
                # reuse freed blocks at once: fill the same place of another volume
                assert other.cmd(P.CMD_WRITE, b * BS, data=b"\xee" * BS)[0] == 0
                if step % 3 == 0:
                    assert w.cmd(P.CMD_FLUSH)[0] == 0  # commit: freed blocks become allocatable
            else:
                name = f"snap{step}"
                with pool.locked():  # as the control socket runs `thinpool snapshot`
                    pool.snapshot("vol", name)
                snapshots.append((name, bytes(model)))
            if errors:
                break
    finally:
        done.set()
        for t in threads:
            t.join(60)
        w.close()
        other.close()
    assert not errors, errors[:3]
    c = served.raw("vol")
    assert c.cmd(P.CMD_READ, 0, VOL)[1] == bytes(model)
    c.close()
    for name, image in snapshots[-3:]:
        c = served.raw(name)
        got = b"".join(c.cmd(P.CMD_READ, o, 64 * KiB)[1] for o in range(0, VOL, 64 * KiB))
        c.close()
        assert got == image, name
    assert sum(served.compiled_served) > 0


def test_nbd_rule_multi_conn_nbdcopy_copies_the_volume_exactly(served: Served) -> None:
    """nbdcopy with four connections (the server advertises CAN_MULTI_CONN) reads the volume in parallel
    through the compiled loop; the copy is byte-identical."""
    require_tool("nbdcopy")
    big = 160 * MiB  # nbdcopy hands out 128 MiB of work at a time: two connections get some
    served.pool.create_thin("big", big)
    rnd = random.Random(5)
    data = bytearray(big)
    for start in (0, big - 4 * MiB):
        for b in range(0, 4 * MiB, 2 * BS):
            data[start + b:start + b + BS] = rnd.randbytes(BS)
        served.pool.thin("big").write(start, bytes(data[start:start + 4 * MiB]))
    out = os.path.join(served.root, "copy.raw")
    r = subprocess.run(["nbdcopy", "--connections=4", "--requests=16", "--request-size=65536",
                        f"nbd+unix:///big?socket={served.sock}", out], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        assert f.read() == bytes(data)
    served.server.shutdown()  # every session has ended (and counted) once this returns
    assert sum(n > 0 for n in served.compiled_served) >= 2, served.compiled_served  # several connections served reads compiled


def test_nbd_rule_compiled_loop_completes_a_header_sent_in_pieces(served: Served) -> None:
    """A READ header split over several sends (the loop waits for the rest in the Python path, under
    the message deadline) is answered like any other."""
    data = random.Random(9).randbytes(2 * BS)
    served.pool.thin("vol").write(0, data)
    c = served.raw(structured=False)
    assert c.cmd(P.CMD_READ, 0, 4096)[1] == data[:4096]  # the compiled loop now waits for requests
    req = P.encode_request(P.CMD_READ, 77, 4096, 8192)
    for piece in (req[:3], req[3:20], req[20:]):
        c.sock.sendall(piece)
        threading.Event().wait(0.05)
    hdr = P.decode_reply_header(c.recv(16))
    assert (hdr.handle, hdr.error) == (77, 0)
    assert c.recv(8192) == data[4096:12288]
    c.close()


def test_nbd_rule_server_stop_ends_a_connection_waiting_in_the_compiled_loop(served: Served) -> None:
    """A client idle after READs (its session waits in the compiled loop's poll, without the GIL) does
    not hold up the server's shutdown: the session sees the wake-up descriptor and hangs up."""
    c = served.raw(structured=True)
    for off in range(0, 16 * 4096, 4096):
        assert c.cmd(P.CMD_READ, off, 4096)[0] == 0
    done = threading.Event()
    t = threading.Thread(target=lambda: (served.server.shutdown(), done.set()))
    t.start()
    t.join(30)
    assert done.is_set()
    c.sock.settimeout(10)
    assert c.sock.recv(1) == b""  # hung up
    c.close()
    assert served.compiled_served[-1] >= 15


def test_nbd_rule_compiled_loop_reads_a_pool_opened_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool opened read-only (its device table is a read-only array: another compilation of the loop)
    is read through the compiled loop too, with the same bytes."""
    root = tempfile.mkdtemp(prefix="nbdo", dir="/tmp")
    try:
        data = random.Random(4).randbytes(256 * KiB)
        with Pool.create(os.path.join(root, "pool"), data_size=64 * MiB, block_size="64KiB") as p:
            p.create_thin("vol", VOL).write(0, data)
        pool = Pool.open(os.path.join(root, "pool"), read_only=True)
        counts: list[int] = []
        close = readloop.CompiledReads.close
        monkeypatch.setattr(readloop.CompiledReads, "close",
                            lambda self: (counts.append(self.served) if self.registered else None, close(self)))
        server = NBDServer(PoolProvider(pool, read_only=True), unix_path=os.path.join(root, "s"))
        server.start()
        try:
            c = Raw(os.path.join(root, "s"), "vol", structured=False)
            for off in range(0, 256 * KiB, 16 * KiB):
                assert c.cmd(P.CMD_READ, off, 4096) == (0, data[off:off + 4096], [])
            assert c.cmd(P.CMD_WRITE, 0, data=b"x" * 512)[0] == P.EPERM  # still the Python path's answer
            c.close()
        finally:
            server.shutdown()
        assert counts and counts[-1] == 16
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("read_only", [False, True])
def test_served_pool_compiles_the_session_loop_before_its_first_client(monkeypatch: pytest.MonkeyPatch,
                                                                       read_only: bool) -> None:
    """Serving a pool (``thinpool serve``'s :class:`~thinpool.nbd.served.Served`; a read-only pool through
    its ``warm_up``) compiles the session loop for the argument types its sessions give it before any
    client connects: the first client's READ and WRITE are served by the compiled loop without a compile
    of their own (on a cold kernel cache that compile took 5-7 s of the first request)."""
    from thinpool.nbd.served import Served as PoolServed, warm_up
    root = tempfile.mkdtemp(prefix="nbdw", dir="/tmp")
    try:
        path = os.path.join(root, "pool")
        data = random.Random(5).randbytes(2 * BS)
        with Pool.create(path, data_size=64 * MiB, block_size="64KiB") as p:
            p.create_thin("vol", VOL).write(0, data)
        entries: dict = {}
        monkeypatch.setattr(readloop, "_ENTRIES", entries)  # nothing compiled for this process yet
        counts: list[tuple[int, int]] = []
        close = readloop.CompiledReads.close
        monkeypatch.setattr(readloop.CompiledReads, "close", lambda self: (
            counts.append((self.served, self.written)) if self.registered else None, close(self)))
        sock = os.path.join(root, "s")
        if read_only:
            pool = Pool.open(path, read_only=True)
            warm_up(pool)
            server: Any = NBDServer(PoolProvider(pool, read_only=True), unix_path=sock)
            server.start()
            stop = server.shutdown
        else:
            srv = PoolServed(path, socket_path=sock)
            srv.start()
            stop = srv.stop
        try:
            assert len(entries) == 1  # compiled before the first connection
            c = Raw(sock, "vol", structured=False)
            assert c.cmd(P.CMD_READ, 0, 4096) == (0, data[:4096], [])
            if not read_only:
                assert c.cmd(P.CMD_WRITE, BS, data=b"w" * 4096)[0] == 0  # a provisioned block: in place
                assert c.cmd(P.CMD_READ, BS, 4096)[1] == b"w" * 4096
            c.close()
        finally:
            stop()
        assert len(entries) == 1  # the session's argument types were the precompiled ones
        assert counts and counts[-1] == ((1, 0) if read_only else (2, 1))  # served by the compiled loop
    finally:
        shutil.rmtree(root, ignore_errors=True)
