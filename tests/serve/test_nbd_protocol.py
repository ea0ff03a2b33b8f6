"""NBD protocol codec, memory backend and server behaviour, driven by a raw Python client.

Includes hypothesis fuzzing of the handshake and the request parser against a live server
on a unix socket: after every fuzz case a well-behaved client must still be served.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import soak_examples
from thinpool.errors import AlreadyExists, InvalidArgument, NoSpace, NotFound, ReadOnly
from thinpool.nbd import protocol as P
from thinpool.nbd.backend import MemoryExport, MemoryProvider, split_by_blocks
from thinpool.nbd.server import NBDServer
from thinpool.nbd.handshake import preferred_block_size
from thinpool.nbd.requests import clip_extents, nbd_error_for

KiB, MiB = 1024, 1024 * 1024
BS = 64 * KiB
FUZZ = settings(
    max_examples=soak_examples(200),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# =========================================================================== a raw NBD client
class Closed(Exception):
    """The server closed the connection."""


@dataclass
class Reply:
    handle: int
    error: int = 0
    message: str = ""
    data: bytes = b""
    extents: list[tuple[int, int]] = field(default_factory=list)
    chunk_types: list[int] = field(default_factory=list)
    structured: bool = False
    context: int = -1


class RawClient:
    """A deliberately literal NBD client built on the protocol module's encoders/decoders."""

    def __init__(self, path: str | None, timeout: float = 10.0) -> None:
        assert path is not None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.pending: dict[int, P.Request] = {}
        self.next_handle = 1
        self.structured = False
        self.size = 0
        self.tflags = 0

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (reads and discards anything before)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except (socket.timeout, TimeoutError):
            return False
        except ConnectionResetError:
            return True
        return True

    # ------------------------------------------------------------------ handshake
    def greet(self, flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> int:
        hflags = P.decode_greeting(self.recv(P.GREETING_SIZE))
        self.sock.sendall(P.encode_client_flags(flags))
        return hflags

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; return every (reply type, payload) up to the final ACK/error."""
        self.sock.sendall(P.encode_option(option, data))
        replies = []
        while True:
            hdr = P.decode_option_reply_header(self.recv(P.OPTION_REPLY_HEADER_SIZE))
            assert hdr.option == option
            payload = self.recv(hdr.length) if hdr.length else b""
            replies.append((hdr.reply_type, payload))
            if hdr.reply_type == P.REP_ACK or hdr.is_error:
                return replies

    def go(self, name: str, structured: bool = True, meta: bool = True) -> None:
        if structured:
            assert self.option(P.OPT_STRUCTURED_REPLY) == [(P.REP_ACK, b"")]
            self.structured = True
            if meta:
                r = self.option(P.OPT_SET_META_CONTEXT, P.encode_meta_context_request(name, ["base:allocation"]))
                assert r[-1][0] == P.REP_ACK
        replies = self.option(P.OPT_GO, P.encode_go_request(name, [P.INFO_BLOCK_SIZE]))
        assert replies[-1][0] == P.REP_ACK, replies
        for rtype, payload in replies[:-1]:
            info, value = P.decode_info(payload)
            if info == P.INFO_EXPORT:
                self.size, self.tflags = value  # type: ignore[misc]

    @classmethod
    def connect(cls, path: str | None, name: str, **kw: Any) -> RawClient:
        c = cls(path)
        c.greet()
        c.go(name, **kw)
        return c

    # ------------------------------------------------------------------ transmission
    def send(self, type_: int, offset: int = 0, length: int | None = None, flags: int = 0,
             data: bytes = b"") -> int:
        handle = self.next_handle
        self.next_handle += 1
        if length is None:
            length = len(data)
        self.pending[handle] = P.Request(flags, type_, handle, offset, length)
        self.sock.sendall(P.encode_request(type_, handle, offset, length, flags) + data)
        return handle

    def reply(self) -> Reply:
        head = self.recv(4)
        head += self.recv(P.reply_header_size(head) - 4)
        hdr = P.decode_reply_header(head)
        req = self.pending.pop(hdr.handle)
        if not hdr.structured:
            assert not self.structured or req.type != P.CMD_READ, "simple reply to a structured READ"
            data = b""
            if req.type == P.CMD_READ and hdr.error == 0:
                data = self.recv(req.length)
            return Reply(hdr.handle, hdr.error, data=data)
        assert self.structured, "structured reply without negotiation"
        out = Reply(hdr.handle, structured=True)
        pieces: list[tuple[int, bytes]] = []  # (offset in request, data); holes as zero bytes
        while True:
            payload = self.recv(hdr.length) if hdr.length else b""
            out.chunk_types.append(hdr.type)
            if hdr.type == P.REPLY_TYPE_OFFSET_DATA:
                off, data = P.decode_offset_data(payload)
                assert req.offset <= off and off + len(data) <= req.offset + req.length
                pieces.append((off - req.offset, data))
            elif hdr.type == P.REPLY_TYPE_OFFSET_HOLE:
                off, n = P.decode_offset_hole(payload)
                assert req.offset <= off and off + n <= req.offset + req.length
                pieces.append((off - req.offset, bytes(n)))
            elif hdr.type == P.REPLY_TYPE_BLOCK_STATUS:
                out.context, out.extents = P.decode_block_status(payload)
            elif hdr.type & 0x8000:
                out.error, out.message = P.decode_error_chunk(payload)
            else:
                assert hdr.type == P.REPLY_TYPE_NONE and not payload
            if hdr.done:
                break
            nxt = self.recv(4)
            nxt += self.recv(P.reply_header_size(nxt) - 4)
            hdr = P.decode_reply_header(nxt)
            assert hdr.structured and hdr.handle == out.handle
        if req.type == P.CMD_READ and not out.error:
            pieces.sort()
            pos = 0
            for off, data in pieces:
                assert off == pos, "structured READ chunks overlap or leave a gap"
                pos += len(data)
            assert pos == req.length, "structured READ did not cover the request"
            out.data = b"".join(d for _, d in pieces)
        else:
            assert not pieces or req.type == P.CMD_READ
        return out

    def cmd(self, type_: int, offset: int = 0, length: int | None = None, flags: int = 0,
            data: bytes = b"") -> Reply:
        self.send(type_, offset, length, flags, data)
        return self.reply()

    def disconnect(self) -> None:
        self.sock.sendall(P.encode_request(P.CMD_DISC, 0))
        self.close()


# =========================================================================== fixtures
@contextmanager
def serve(provider: Any, **kw: Any) -> Iterator[NBDServer]:
    d = tempfile.mkdtemp(prefix="nbdt", dir="/tmp")
    try:
        with NBDServer(provider, unix_path=os.path.join(d, "s"), **kw) as server:
            yield server
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_provider(**kw: Any) -> MemoryProvider:
    prov = MemoryProvider(block_size=BS, **kw)
    prov.create("disk", 8 * MiB, description="fuzz target")
    prov.create("ro", 1 * MiB, read_only=True)
    prov.create("scratch", 4 * MiB)
    return prov


class _InternalErrors(logging.Handler):
    """Collects the server's "internal error" log records (bugs, as opposed to bad input)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "internal error" in record.msg:
            self.records.append(self.format(record))


INTERNAL_ERRORS = _InternalErrors()


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[NBDServer, MemoryProvider]]:
    logger = logging.getLogger("thinpool.nbd")
    logger.addHandler(INTERNAL_ERRORS)
    prov = make_provider()
    try:
        with serve(prov) as server:
            yield server, prov
    finally:
        logger.removeHandler(INTERNAL_ERRORS)


@pytest.fixture()
def fresh() -> Iterator[tuple[NBDServer, MemoryProvider]]:
    prov = make_provider()
    with serve(prov) as server:
        yield server, prov


def assert_serving(path: str | None, name: str = "scratch") -> None:
    """A well-behaved client still gets correct service, and no session died of a server bug."""
    assert not INTERNAL_ERRORS.records, INTERNAL_ERRORS.records
    c = RawClient.connect(path, name)
    try:
        pattern = os.urandom(4096)
        assert c.cmd(P.CMD_WRITE, 8192, data=pattern).error == 0
        r = c.cmd(P.CMD_READ, 8192, 4096)
        assert r.error == 0 and r.data == pattern
    finally:
        c.disconnect()


# =========================================================================== codec unit tests
def test_greeting_and_client_flags() -> None:
    g = P.encode_greeting()
    assert g[:8] == b"NBDMAGIC" and g[8:16] == b"IHAVEOPT" and len(g) == 18
    assert P.decode_greeting(g) == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
    with pytest.raises(P.ProtocolError):
        P.decode_greeting(b"X" + g[1:])
    assert P.decode_client_flags(P.encode_client_flags(3)) == 3
    with pytest.raises(P.ProtocolError, match="unknown flags"):
        P.decode_client_flags(P.encode_client_flags(4))
    with pytest.raises(P.ProtocolError, match="NO_ZEROES"):
        P.decode_client_flags(P.encode_client_flags(2), handshake_flags=P.FLAG_FIXED_NEWSTYLE)
    with pytest.raises(P.ProtocolError):
        P.decode_client_flags(b"\0\0\0")
    assert issubclass(P.ProtocolError, __import__("thinpool.errors").errors.ThinpoolError)


def test_option_header_and_reply() -> None:
    raw = P.encode_option(P.OPT_GO, b"abc")
    assert P.decode_option_header(raw[:16]) == P.OptionHeader(P.OPT_GO, 3) and raw[16:] == b"abc"
    with pytest.raises(P.ProtocolError, match="magic"):
        P.decode_option_header(b"\0" * 16)
    rep = P.encode_option_reply(P.OPT_LIST, P.REP_ERR_UNSUP, b"no")
    hdr = P.decode_option_reply_header(rep[:20])
    assert (hdr.option, hdr.reply_type, hdr.length, hdr.is_error) == (P.OPT_LIST, P.REP_ERR_UNSUP, 2, True)
    assert struct.unpack(">Q", rep[:8])[0] == 0x3E889045565A9
    assert P.decode_rep_server(P.encode_rep_server("vol", "desc")) == ("vol", "desc")
    assert P.decode_rep_meta_context(P.encode_rep_meta_context(7, "base:allocation")) == (7, "base:allocation")


def test_info_payloads() -> None:
    assert P.decode_info(P.encode_info_export(1 << 40, 0x1ED)) == (P.INFO_EXPORT, (1 << 40, 0x1ED))
    assert P.decode_info(P.encode_info_block_size(1, 4096, 32 * MiB)) == (P.INFO_BLOCK_SIZE, (1, 4096, 32 * MiB))
    assert P.decode_info(P.encode_info_name("x")) == (P.INFO_NAME, "x")
    assert len(P.encode_info_export(0, 0)) == 12 and len(P.encode_info_block_size(1, 2, 3)) == 14
    assert P.encode_export_name_reply(5, 1, no_zeroes=False)[10:] == bytes(124)
    assert len(P.encode_export_name_reply(5, 1, no_zeroes=True)) == 10


@pytest.mark.parametrize(
    "data",
    [b"", b"\0\0\0\x05ab\0\0", b"\0\0\0\x01a\0\x02\0\x03", b"\0\0\0\x01a\0\x01\0\x03\0\x01", b"\0\0\0\x01\xff\0\0"],
)
def test_go_request_malformed(data: bytes) -> None:
    with pytest.raises(P.ProtocolError):
        P.decode_go_request(data)


@given(st.text(max_size=64), st.lists(st.integers(0, 0xFFFF), max_size=8))
def test_go_request_roundtrip(name: str, infos: list[int]) -> None:
    name = name.replace("\0", "")
    assert P.decode_go_request(P.encode_go_request(name, infos)) == (name, infos)


@given(st.text(max_size=32), st.lists(st.text(max_size=32), max_size=5))
def test_meta_context_roundtrip(name: str, queries: list[str]) -> None:
    name, queries = name.replace("\0", ""), [q.replace("\0", "") for q in queries]
    raw = P.encode_meta_context_request(name, queries)
    assert P.decode_meta_context_request(raw) == (name, queries)
    with pytest.raises(P.ProtocolError):
        P.decode_meta_context_request(raw + b"x")
    with pytest.raises(P.ProtocolError):
        P.decode_meta_context_request(raw[:-1])


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_request_roundtrip(flags: int, type_: int, handle: int, offset: int, length: int) -> None:
    raw = P.encode_request(type_, handle, offset, length, flags)
    assert len(raw) == 28 and raw[:4] == b"\x25\x60\x95\x13"
    assert P.decode_request(raw) == P.Request(flags, type_, handle, offset, length)


@given(st.binary(max_size=64))
def test_decoders_raise_only_protocol_error(data: bytes) -> None:
    decoders = [
        P.decode_greeting, P.decode_client_flags, P.decode_option_header, P.decode_option_reply_header,
        P.decode_rep_server, P.decode_info, P.decode_go_request, P.decode_meta_context_request,
        P.decode_rep_meta_context, P.decode_request, P.decode_reply_header, P.decode_block_status,
        P.decode_error_chunk, P.decode_offset_data, P.decode_offset_hole, P.decode_string,
    ]
    for decode in decoders:
        try:
            decode(data)
        except P.ProtocolError:
            pass


def test_replies_and_chunks() -> None:
    assert P.encode_simple_reply(9, 22) == struct.pack(">IIQ", 0x67446698, 22, 9)
    with pytest.raises(P.ProtocolError):
        P.encode_simple_reply(1, 5, b"data")
    hole = P.encode_offset_hole(3, 4096, 512, done=True)
    hdr = P.decode_reply_header(hole[:20])
    assert (hdr.structured, hdr.handle, hdr.type, hdr.length, hdr.done) == (True, 3, 2, 12, True)
    assert P.decode_offset_hole(hole[20:]) == (4096, 512)
    data_hdr = P.encode_offset_data_header(4, 100, 3, done=False)
    h = P.decode_reply_header(data_hdr[:20])
    assert h.length == 11 and not h.done and P.decode_offset_data(data_hdr[20:] + b"abc") == (100, b"abc")
    err = P.encode_error_chunk(5, P.EINVAL, "bad")
    assert P.decode_reply_header(err[:20]).type == P.REPLY_TYPE_ERROR
    assert P.decode_error_chunk(err[20:]) == (P.EINVAL, "bad")
    bs = P.encode_block_status(6, 1, [(4096, 3), (8192, 0)])
    assert P.decode_block_status(bs[20:]) == (1, [(4096, 3), (8192, 0)])
    assert P.encode_done(7) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 7, 0)
    for bad in (lambda: P.encode_block_status(1, 1, []), lambda: P.encode_offset_hole(1, 0, 0, True),
                lambda: P.encode_error_chunk(1, 0), lambda: P.encode_offset_data_header(1, 0, 0, True)):
        with pytest.raises(P.ProtocolError):
            bad()


def test_strings_extents_errnos() -> None:
    assert P.decode_string("é".encode()) == "é"
    for bad in (b"a\0b", b"\xff", b"x" * 4097):
        with pytest.raises(P.ProtocolError):
            P.decode_string(bad)
    assert P.coalesce_extents([(1, 0), (2, 0), (0, 3), (4, 3), (5, 0)]) == [(3, 0), (4, 3), (5, 0)]
    assert P.errno_to_nbd(errno.EDQUOT) == P.ENOSPC and P.errno_to_nbd(errno.EROFS) == P.EPERM
    assert P.errno_to_nbd(errno.ENOENT) == P.EIO
    assert nbd_error_for(NoSpace("x")) == P.ENOSPC and nbd_error_for(InvalidArgument("x")) == P.EINVAL
    assert nbd_error_for(ReadOnly("x")) == P.EPERM and nbd_error_for(RuntimeError()) == P.EIO
    assert nbd_error_for(NotFound("gone")) == P.EIO
    assert clip_extents([(100, 3), (100, 3), (50, 0)], 150, False) == [(150, 3)]
    assert clip_extents([(100, 3), (100, 0)], 150, False) == [(100, 3), (50, 0)]
    assert clip_extents([(100, 3), (100, 0)], 150, True) == [(100, 3)]
    assert clip_extents([], 77, False) == [(77, 0)]


def test_preferred_block_size() -> None:
    ex = MemoryExport("a", MiB, 192 * KiB)
    assert preferred_block_size(ex) == 64 * KiB
    assert preferred_block_size(MemoryExport("b", MiB, 512)) == 512
    assert preferred_block_size(MemoryExport("c", 0, 1024 * MiB)) == 32 * MiB


# =========================================================================== memory backend
@given(st.integers(0, 10**7), st.integers(0, 10**7), st.sampled_from([512, 4096, 65536, 192 * 1024]))
def test_split_by_blocks(offset: int, length: int, bs: int) -> None:
    s = split_by_blocks(offset, length, bs)
    assert s.head_offset == offset
    assert s.head_length + s.block_count * bs + s.tail_length == length
    if s.block_count:
        assert s.head_offset + s.head_length == s.first_block * bs
        assert s.tail_offset == (s.first_block + s.block_count) * bs
        assert s.head_length < bs and s.tail_length < bs
    else:
        assert s.tail_length == 0


def test_memory_export_semantics() -> None:
    prov = MemoryProvider(block_size=4096, data_blocks=8)
    vol = prov.create("v", 64 * 1024)
    vol.pwrite(100, b"abc")
    assert vol.allocated_blocks == 1 and vol.pread(99, 5) == b"\0abc\0"
    assert vol.extents(0, 64 * 1024) == [(4096, 0), (61440, 3)]
    vol.pwrite(4096, b"x" * 8192)  # blocks 1 and 2
    vol.trim(4000, 4096)  # covers no block entirely: nothing unmapped, data kept
    assert vol.allocated_blocks == 3 and vol.pread(4096, 2) == b"xx"
    vol.trim(4096, 4096)
    assert vol.allocated_blocks == 2 and vol.pread(4096, 4096) == bytes(4096)
    vol.write_zeroes(8000, 8392, may_trim=True)  # unmapped head, block 2 unmapped, unmapped tail
    assert vol.pread(8192, 4096) == bytes(4096) and vol.allocated_blocks == 1
    vol.write_zeroes(20000, 5000, may_trim=False)  # NO_HOLE allocates blocks 4..6
    assert vol.allocated_blocks == 4 and vol.pread(20000, 5000) == bytes(5000)
    with pytest.raises(NoSpace):
        vol.pwrite(30000, b"y" * 30000)  # needs 8 blocks, 4 free
    assert vol.allocated_blocks == 4 and vol.pread(30000, 10) == bytes(10)  # atomic failure
    with pytest.raises(InvalidArgument):
        vol.pread(64 * 1024 - 1, 2)
    ro = prov.open_export("v", read_only=True)
    assert ro.pread(100, 3) == b"abc"
    for op in (lambda: ro.pwrite(0, b"x"), lambda: ro.trim(0, 4096), lambda: ro.write_zeroes(0, 1, True)):
        with pytest.raises(ReadOnly):
            op()
    with pytest.raises(NotFound):
        prov.open_export("nope", False)
    prov.default_export = "v"
    assert prov.open_export("", False).pread(100, 3) == b"abc"
    assert prov.used_blocks == 4 and prov.list_exports() == ["v"]


@settings(max_examples=soak_examples(60), deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from(["w", "t", "z", "zh"]), st.integers(0, 60000), st.integers(0, 9000)),
                max_size=25))
def test_memory_export_model(ops: list[tuple[str, int, int]]) -> None:
    """Random ops against a shadow bytearray: contents always match, extents match the map."""
    size, bs = 64 * 1024, 4096
    vol = MemoryExport("m", size, bs)
    shadow = bytearray(size)
    rnd = random.Random(len(ops))
    for op, off, n in ops:
        n = min(n, size - off)
        if op == "w":
            data = bytes(rnd.getrandbits(8) for _ in range(n))
            vol.pwrite(off, data)
            shadow[off : off + n] = data
        elif op == "t":
            vol.trim(off, n)
            s = split_by_blocks(off, n, bs)
            a, b = s.first_block * bs, (s.first_block + s.block_count) * bs
            shadow[a:b] = bytes(b - a)  # trimmed blocks read back as zero in this backend
        else:
            vol.write_zeroes(off, n, may_trim=(op == "z"))
            shadow[off : off + n] = bytes(n)
    assert vol.pread(0, size) == bytes(shadow)
    pos = 0
    for length, flags in vol.extents(0, size):
        if flags & P.STATE_ZERO:
            assert shadow[pos : pos + length] == bytes(length)
        pos += length
    assert pos == size


# =========================================================================== handshake over a live server
def test_export_name_with_and_without_zero_padding(live: tuple[NBDServer, MemoryProvider]) -> None:
    server, prov = live
    for cflags, tail in ((P.FLAG_C_FIXED_NEWSTYLE, 124), (P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES, 0)):
        c = RawClient(server.unix_path)
        assert c.greet(cflags) == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
        c.sock.sendall(P.encode_option(P.OPT_EXPORT_NAME, b"disk"))
        size, flags = struct.unpack(">QH", c.recv(10))
        assert size == 8 * MiB and flags & P.FLAG_HAS_FLAGS and not flags & P.FLAG_READ_ONLY
        if tail:
            assert c.recv(tail) == bytes(tail)
        c.size = size
        r = c.cmd(P.CMD_READ, 0, 512)
        assert r.error == 0 and not r.structured and len(r.data) == 512
        c.disconnect()
    c = RawClient(server.unix_path)
    c.greet()
    c.sock.sendall(P.encode_option(P.OPT_EXPORT_NAME, b"missing"))
    assert c.at_eof()  # EXPORT_NAME cannot return an error: hard disconnect


def test_list_info_go(live: tuple[NBDServer, MemoryProvider]) -> None:
    server, _ = live
    c = RawClient(server.unix_path)
    c.greet()
    replies = c.option(P.OPT_LIST)
    assert [P.decode_rep_server(p)[0] for t, p in replies if t == P.REP_SERVER] == ["disk", "ro", "scratch"]
    assert replies[-1][0] == P.REP_ACK
    assert c.option(P.OPT_LIST, b"junk")[-1][0] == P.REP_ERR_INVALID
    infos = c.option(P.OPT_INFO, P.encode_go_request("disk", [P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE]))
    assert infos[-1][0] == P.REP_ACK
    got: dict[int, Any] = dict(P.decode_info(p) for t, p in infos[:-1])
    assert got[P.INFO_EXPORT][0] == 8 * MiB and got[P.INFO_NAME] == "disk"
    assert got[P.INFO_DESCRIPTION] == "fuzz target" and got[P.INFO_BLOCK_SIZE] == (1, BS, 32 * MiB)
    assert c.option(P.OPT_GO, P.encode_go_request("nope"))[-1][0] == P.REP_ERR_UNKNOWN
    assert c.option(P.OPT_GO, b"\0\0\0\x09ab")[-1][0] == P.REP_ERR_INVALID
    c.go("ro", structured=False)
    assert c.tflags & P.FLAG_READ_ONLY and not c.tflags & P.FLAG_SEND_TRIM
    assert c.cmd(P.CMD_READ, 0, 10).error == 0
    c.disconnect()


def test_unsupported_options_and_abort(live: tuple[NBDServer, MemoryProvider]) -> None:
    server, _ = live
    c = RawClient(server.unix_path)
    c.greet()
    for opt in (P.OPT_STARTTLS, P.OPT_PEEK_EXPORT, P.OPT_EXTENDED_HEADERS, 99, 0x7FFFFFFF):
        assert c.option(opt, b"some data")[-1][0] == P.REP_ERR_UNSUP
    assert c.option(P.OPT_STRUCTURED_REPLY, b"x")[-1][0] == P.REP_ERR_INVALID
    assert c.option(P.OPT_ABORT) == [(P.REP_ACK, b"")]
    assert c.at_eof()


def test_meta_context_negotiation(live: tuple[NBDServer, MemoryProvider]) -> None:
    server, _ = live
    c = RawClient(server.unix_path)
    c.greet()
    req = P.encode_meta_context_request("disk", ["base:allocation"])
    assert c.option(P.OPT_SET_META_CONTEXT, req)[-1][0] == P.REP_ERR_INVALID  # structured first
    assert c.option(P.OPT_STRUCTURED_REPLY) == [(P.REP_ACK, b"")]
    for queries, expect in (([], True), (["base:"], True), (["qemu:dirty-bitmap:x"], False), (["base:other"], False)):
        r = c.option(P.OPT_LIST_META_CONTEXT, P.encode_meta_context_request("disk", queries))
        assert r[-1][0] == P.REP_ACK
        names = [P.decode_rep_meta_context(p) for t, p in r if t == P.REP_META_CONTEXT]
        assert names == ([(0, "base:allocation")] if expect else [])
    assert c.option(P.OPT_LIST_META_CONTEXT, P.encode_meta_context_request("disk", ["nocolon"]))[-1][0] == \
        P.REP_ERR_INVALID
    assert c.option(P.OPT_SET_META_CONTEXT, P.encode_meta_context_request("nope", []))[-1][0] == P.REP_ERR_UNKNOWN
    r = c.option(P.OPT_SET_META_CONTEXT, P.encode_meta_context_request("disk", ["base:", "base:allocation"]))
    assert [t for t, _ in r] == [P.REP_META_CONTEXT, P.REP_ACK]
    ctx_id = P.decode_rep_meta_context(r[0][1])[0]
    c.go("disk", structured=False)  # already negotiated above
    c.structured = True
    status = c.cmd(P.CMD_BLOCK_STATUS, 0, 4096)
    assert status.error == 0 and status.extents and status.context == ctx_id != 0
    c.disconnect()
    # contexts negotiated for another export do not carry over to GO
    c = RawClient(server.unix_path)
    c.greet()
    c.option(P.OPT_STRUCTURED_REPLY)
    c.option(P.OPT_SET_META_CONTEXT, P.encode_meta_context_request("ro", ["base:allocation"]))
    c.go("disk", structured=False)
    c.structured = True
    assert c.cmd(P.CMD_BLOCK_STATUS, 0, 4096).error == P.EINVAL
    c.disconnect()


@pytest.mark.parametrize(
    "payload",
    [
        b"\0\0\0\x04",  # unknown client flag
        b"\0\0\0\x01" + b"IHAVEOPX" + b"\0" * 8,  # bad option magic
        b"\0\0\0\x01" + P.encode_option(P.OPT_GO)[:12] + struct.pack(">I", 1 << 30),  # absurd option length
    ],
)
def test_malformed_handshake_disconnects(live: tuple[NBDServer, MemoryProvider], payload: bytes) -> None:
    server, _ = live
    c = RawClient(server.unix_path)
    P.decode_greeting(c.recv(18))
    c.sock.sendall(payload)
    assert c.at_eof()
    assert_serving(server.unix_path)


# =========================================================================== transmission phase
def test_simple_replies_and_bounds(fresh: tuple[NBDServer, MemoryProvider]) -> None:
    server, prov = fresh
    c = RawClient.connect(server.unix_path, "scratch", structured=False)
    size = 4 * MiB
    data = os.urandom(10000)
    assert c.cmd(P.CMD_WRITE, 12345, data=data).error == 0
    assert c.cmd(P.CMD_READ, 12345, len(data)).data == data
    assert prov.volume("scratch").pread(12345, len(data)) == data
    assert c.cmd(P.CMD_READ, size - 10, 11).error == P.EINVAL
    assert c.cmd(P.CMD_WRITE, size - 10, data=b"x" * 11).error == P.ENOSPC  # payload consumed, still in sync
    assert c.cmd(P.CMD_WRITE_ZEROES, size, 1).error == P.ENOSPC
    assert c.cmd(P.CMD_TRIM, size, 1).error == P.EINVAL
    assert c.cmd(P.CMD_READ, 0, 32 * MiB + 1).error == P.EINVAL
    assert c.cmd(P.CMD_READ, 0, 0) == Reply(c.next_handle - 1)
    assert c.cmd(P.CMD_WRITE, 0, data=b"").error == 0
    assert c.cmd(P.CMD_CACHE, 0, 4096).error == P.EINVAL  # not advertised: unknown command
    assert c.cmd(200, 0, 0).error == P.EINVAL
    assert c.cmd(P.CMD_READ, 0, 512, flags=0x80).error == P.EINVAL
    assert c.cmd(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_DF).error == P.EINVAL  # DF needs structured replies
    assert c.cmd(P.CMD_WRITE, 0, flags=P.CMD_FLAG_NO_HOLE, data=b"zz").error == P.EINVAL
    assert c.cmd(P.CMD_BLOCK_STATUS, 0, 4096).error == P.EINVAL
    assert c.cmd(P.CMD_READ, 12345, 3).data == data[:3]
    # an oversized WRITE payload is a denial of service: hard disconnect
    c.sock.sendall(P.encode_request(P.CMD_WRITE, 77, 0, 32 * MiB + 1))
    assert c.at_eof()
    assert_serving(server.unix_path)


def test_structured_reads_and_block_status(fresh: tuple[NBDServer, MemoryProvider]) -> None:
    server, prov = fresh
    vol = prov.volume("disk")
    vol.pwrite(BS, b"A" * BS)
    vol.pwrite(4 * BS + 100, b"B" * 50)
    c = RawClient.connect(server.unix_path, "disk")
    assert c.tflags & P.FLAG_SEND_DF and c.tflags & P.FLAG_CAN_MULTI_CONN
    r = c.cmd(P.CMD_READ, 0, 6 * BS)
    assert r.data == vol.pread(0, 6 * BS) and r.error == 0
    assert P.REPLY_TYPE_OFFSET_HOLE in r.chunk_types and P.REPLY_TYPE_OFFSET_DATA in r.chunk_types
    r = c.cmd(P.CMD_READ, 0, 6 * BS, flags=P.CMD_FLAG_DF)
    assert r.chunk_types == [P.REPLY_TYPE_OFFSET_DATA] and r.data == vol.pread(0, 6 * BS)
    r = c.cmd(P.CMD_READ, 8 * MiB - 1, 2)
    assert r.error == P.EINVAL and r.chunk_types == [P.REPLY_TYPE_ERROR] and "beyond" in r.message
    r = c.cmd(P.CMD_READ, 0, 0)
    assert r.chunk_types == [P.REPLY_TYPE_NONE] and r.data == b""
    hz = P.STATE_HOLE | P.STATE_ZERO
    r = c.cmd(P.CMD_BLOCK_STATUS, 0, 8 * MiB)
    assert r.extents == [(BS, hz), (BS, 0), (2 * BS, hz), (BS, 0), (8 * MiB - 5 * BS, hz)]
    assert c.cmd(P.CMD_BLOCK_STATUS, 100, 2 * BS).extents == [(BS - 100, hz), (BS, 0), (100, hz)]
    assert c.cmd(P.CMD_BLOCK_STATUS, 0, 8 * MiB, flags=P.CMD_FLAG_REQ_ONE).extents == [(BS, hz)]
    assert c.cmd(P.CMD_BLOCK_STATUS, 8 * MiB - 512, 1024).error == P.EINVAL
    assert c.cmd(P.CMD_BLOCK_STATUS, 0, 0).error == P.EINVAL
    c.disconnect()


def test_write_zeroes_trim_flush_fua(fresh: tuple[NBDServer, MemoryProvider]) -> None:
    server, prov = fresh
    vol = prov.volume("scratch")
    c = RawClient.connect(server.unix_path, "scratch")
    assert c.cmd(P.CMD_WRITE, 0, data=b"\xff" * (4 * BS)).error == 0
    assert vol.allocated_blocks == 4
    # without NO_HOLE: whole blocks trimmed, partial edges zeroed, neighbours untouched
    assert c.cmd(P.CMD_WRITE_ZEROES, 100, 2 * BS).error == 0
    assert vol.allocated_blocks == 3
    assert vol.pread(0, 100) == b"\xff" * 100 and vol.pread(100, 2 * BS) == bytes(2 * BS)
    assert vol.pread(2 * BS + 100, 10) == b"\xff" * 10
    # with NO_HOLE: real zeroes, blocks stay/become provisioned
    assert c.cmd(P.CMD_WRITE_ZEROES, 5 * BS, 2 * BS, flags=P.CMD_FLAG_NO_HOLE).error == 0
    assert vol.allocated_blocks == 5 and vol.pread(5 * BS, 2 * BS) == bytes(2 * BS)
    assert c.cmd(P.CMD_WRITE_ZEROES, 0, BS, flags=P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO).error == P.ENOTSUP
    assert c.cmd(P.CMD_WRITE_ZEROES, 0, 4 * MiB, flags=P.CMD_FLAG_FAST_ZERO).error == 0
    assert vol.allocated_blocks == 0
    assert c.cmd(P.CMD_WRITE, 3 * BS, data=b"q" * (2 * BS)).error == 0
    assert c.cmd(P.CMD_TRIM, 3 * BS + 1, 2 * BS).error == 0  # only block 4 is covered entirely
    assert vol.allocated_blocks == 1 and vol.pread(3 * BS, 2) == b"qq"
    before = vol.flush_count
    assert c.cmd(P.CMD_FLUSH).error == 0
    assert c.cmd(P.CMD_WRITE, 0, flags=P.CMD_FLAG_FUA, data=b"fua").error == 0
    assert c.cmd(P.CMD_WRITE_ZEROES, 0, 3, flags=P.CMD_FLAG_FUA).error == 0
    assert c.cmd(P.CMD_WRITE, 0, data=b"nofua").error == 0
    assert vol.flush_count == before + 3
    c.disconnect()


def test_read_only_exports_and_server(fresh: tuple[NBDServer, MemoryProvider]) -> None:
    server, prov = fresh
    c = RawClient.connect(server.unix_path, "ro")
    assert c.tflags & P.FLAG_READ_ONLY
    for t, kw in ((P.CMD_WRITE, {"data": b"x"}), (P.CMD_TRIM, {"length": 4096}), (P.CMD_WRITE_ZEROES, {"length": 1})):
        r = c.cmd(t, 0, **kw)
        assert r.error == P.EPERM and "read-only" in r.message
    assert c.cmd(P.CMD_READ, 0, 100).error == 0 and c.cmd(P.CMD_FLUSH).error == 0
    c.disconnect()
    with serve(prov, read_only=True) as ro_server:
        c = RawClient.connect(ro_server.unix_path, "scratch", structured=False)
        assert c.tflags & P.FLAG_READ_ONLY
        assert c.cmd(P.CMD_WRITE, 0, data=b"x").error == P.EPERM
        c.disconnect()


class FaultyExport:
    """Wraps a MemoryExport; raises ``fault`` from every data operation when set."""

    def __init__(self, inner: MemoryExport, owner: FaultyProvider) -> None:
        self.inner, self.owner = inner, owner
        self.name, self.size, self.read_only, self.block_size = inner.name, inner.size, False, inner.block_size

    def _maybe_fail(self) -> None:
        if self.owner.delay:
            time.sleep(self.owner.delay)
        if self.owner.fault is not None:
            raise self.owner.fault

    def pread(self, offset: int, length: int) -> bytes:
        self._maybe_fail()
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self._maybe_fail()
        self.inner.pwrite(offset, data)

    def flush(self) -> None:
        self._maybe_fail()

    def trim(self, offset: int, length: int) -> None:
        self._maybe_fail()
        self.inner.trim(offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        self._maybe_fail()
        self.inner.write_zeroes(offset, length, may_trim)

    def close(self) -> None:
        self.owner.released += 1

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        self._maybe_fail()
        if self.owner.extents_fault is not None:
            raise self.owner.extents_fault
        return self.inner.extents(offset, length)


class FaultyProvider:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.fault: BaseException | None = None
        self.extents_fault: BaseException | None = None
        self.delay = 0.0
        self.closed = 0
        self.opened = 0
        self.released = 0
        self.mem = MemoryExport("f", MiB, BS)

    def list_exports(self) -> list[str]:
        return ["f"]

    def open_export(self, name: str, read_only: bool) -> FaultyExport:
        if name != "f":
            raise NotFound(name)
        self.opened += 1
        return FaultyExport(self.mem, self)

    def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize(
    "fault, expected",
    [(NoSpace("pool full"), P.ENOSPC), (InvalidArgument("bad"), P.EINVAL), (ReadOnly("ro"), P.EPERM),
     (RuntimeError("boom"), P.EIO), (OSError(errno.EDQUOT, "quota"), P.ENOSPC)],
)
@pytest.mark.parametrize("structured", [False, True])
def test_backend_errors_are_translated(fault: BaseException, expected: int, structured: bool) -> None:
    prov = FaultyProvider()
    with serve(prov) as server:
        c = RawClient.connect(server.unix_path, "f", structured=structured)
        prov.fault = fault
        for t, kw in ((P.CMD_READ, {"length": 10}), (P.CMD_WRITE, {"data": b"abc"}), (P.CMD_FLUSH, {}),
                      (P.CMD_TRIM, {"length": BS}), (P.CMD_WRITE_ZEROES, {"length": 5})):
            r = c.cmd(t, 0, **kw)
            assert r.error == expected, (t, r)
        prov.fault = None
        assert c.cmd(P.CMD_WRITE, 0, data=b"ok").error == 0 and c.cmd(P.CMD_READ, 0, 2).data == b"ok"
        c.disconnect()
    assert prov.closed == 1


def test_failing_allocation_query() -> None:
    """BLOCK_STATUS reports the backend's error; a structured READ falls back to plain data."""
    prov = FaultyProvider()
    prov.mem.pwrite(BS, b"z" * 10)
    with serve(prov) as server:
        c = RawClient.connect(server.unix_path, "f")
        prov.extents_fault = NoSpace("metadata exhausted")
        r = c.cmd(P.CMD_READ, 0, 4 * BS)
        assert r.error == 0 and r.chunk_types == [P.REPLY_TYPE_OFFSET_DATA] and r.data[BS : BS + 10] == b"z" * 10
        assert c.cmd(P.CMD_BLOCK_STATUS, 0, 4 * BS).error == P.ENOSPC
        prov.extents_fault = None
        r = c.cmd(P.CMD_READ, 0, 4 * BS)
        assert P.REPLY_TYPE_OFFSET_HOLE in r.chunk_types and r.data == prov.mem.pread(0, 4 * BS)
        c.disconnect()


def test_export_close_hook_balances_opens() -> None:
    prov = FaultyProvider()
    with serve(prov) as server:
        c = RawClient(server.unix_path)
        c.greet()
        c.option(P.OPT_INFO, P.encode_go_request("f"))
        c.option(P.OPT_STRUCTURED_REPLY)
        c.option(P.OPT_LIST_META_CONTEXT, P.encode_meta_context_request("f", []))
        c.go("f")  # SET_META_CONTEXT + GO
        assert prov.opened == 4 and prov.released == 3
        c.disconnect()
        assert_serving_f = RawClient.connect(server.unix_path, "f", structured=False)
        assert_serving_f.sock.close()  # vanished without NBD_CMD_DISC
        deadline = time.monotonic() + 5
        while server.active_clients and time.monotonic() < deadline:
            time.sleep(0.01)
    assert prov.opened == prov.released == 5


def test_signal_handler_shutdown_in_serving_thread() -> None:
    """The caller's SIGTERM-style handler may call shutdown() in the thread running serve_forever."""
    prov = make_provider()
    d = tempfile.mkdtemp(prefix="nbdt", dir="/tmp")
    server = NBDServer(prov, unix_path=os.path.join(d, "s"))
    old = signal.signal(signal.SIGUSR1, lambda *_: server.shutdown())
    results: list[bool] = []

    def client() -> None:
        c = RawClient.connect(server.unix_path, "disk")
        results.append(c.cmd(P.CMD_WRITE, 0, data=b"sig").error == 0)
        os.kill(os.getpid(), signal.SIGUSR1)
        results.append(c.at_eof())

    t = threading.Thread(target=client)
    try:
        t.start()
        server.serve_forever()  # returns once the handler has shut the server down
        t.join(10)
        assert results == [True, True] and prov.closed and not os.path.exists(os.path.join(d, "s"))
        assert prov.volume("disk").pread(0, 3) == b"sig"
    finally:
        signal.signal(signal.SIGUSR1, old)
        server.shutdown()
        shutil.rmtree(d, ignore_errors=True)


def test_keyboard_interrupt_in_serve_forever_shuts_down() -> None:
    prov = make_provider()
    d = tempfile.mkdtemp(prefix="nbdt", dir="/tmp")
    server = NBDServer(prov, unix_path=os.path.join(d, "s"))
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    seen: list[bool] = []

    def client() -> None:
        c = RawClient.connect(server.unix_path, "disk")
        seen.append(c.cmd(P.CMD_READ, 0, 10).error == 0)
        os.kill(os.getpid(), signal.SIGINT)
        seen.append(c.at_eof())

    t = threading.Thread(target=client)
    try:
        t.start()
        with pytest.raises(KeyboardInterrupt):
            server.serve_forever()
        t.join(10)
        assert seen == [True, True] and prov.closed and not os.path.exists(os.path.join(d, "s"))
    finally:
        signal.signal(signal.SIGINT, old)
        server.shutdown()
        shutil.rmtree(d, ignore_errors=True)


def test_real_nospace_from_exhausted_provider() -> None:
    prov = MemoryProvider(block_size=BS, data_blocks=3)
    prov.create("v", MiB)
    with serve(prov) as server:
        c = RawClient.connect(server.unix_path, "v")
        assert c.cmd(P.CMD_WRITE, 0, data=b"a" * (3 * BS)).error == 0
        r = c.cmd(P.CMD_WRITE, 3 * BS, data=b"b")
        assert r.error == P.ENOSPC and "free" in r.message
        assert c.cmd(P.CMD_WRITE, BS, data=b"c").error == 0  # mapped blocks still writable
        assert c.cmd(P.CMD_TRIM, 0, BS).error == 0
        assert c.cmd(P.CMD_WRITE, 3 * BS, data=b"b").error == 0  # space came back
        c.disconnect()


def test_concurrent_clients(fresh: tuple[NBDServer, MemoryProvider]) -> None:
    server, prov = fresh
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            c = RawClient.connect(server.unix_path, "disk")
            rnd = random.Random(i)
            for _ in range(40):
                off = i * MiB + rnd.randrange(0, MiB - 8192)
                data = rnd.randbytes(rnd.randrange(1, 8192))
                handles = [c.send(P.CMD_WRITE, off, data=data), c.send(P.CMD_READ, off, len(data))]
                replies = {r.handle: r for r in (c.reply(), c.reply())}
                assert replies[handles[0]].error == 0 and replies[handles[1]].data == data
            c.disconnect()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    deadline = time.monotonic() + 5
    while server.active_clients and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.active_clients == 0 and server.total_connections >= 8


def test_client_vanishing_mid_request(fresh: tuple[NBDServer, MemoryProvider]) -> None:
    server, prov = fresh
    for partial in (P.encode_request(P.CMD_WRITE, 1, 0, 4096) + b"x" * 100,
                    P.encode_request(P.CMD_READ, 1, 0, 4096)[:13],
                    P.encode_option(P.OPT_GO, P.encode_go_request("disk"))[:20]):
        c = RawClient(server.unix_path)
        c.greet()
        if not partial.startswith(b"IHAVEOPT"):
            c.go("disk", structured=False)
        c.sock.sendall(partial)
        c.sock.close()
    # a client that disappears while a READ reply is being sent
    c = RawClient.connect(server.unix_path, "disk", structured=False)
    c.send(P.CMD_READ, 0, 8 * MiB - 1)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.sock.close()
    deadline = time.monotonic() + 5
    while server.active_clients and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.active_clients == 0
    assert_serving(server.unix_path)
    assert prov.volume("disk").allocated_blocks == 0  # the partial WRITE was never applied


def test_shutdown_finishes_in_flight_requests() -> None:
    prov = FaultyProvider()
    prov.mem.pwrite(0, b"hello")
    d = tempfile.mkdtemp(prefix="nbdt", dir="/tmp")
    path = os.path.join(d, "s")
    server = NBDServer(prov, unix_path=path, shutdown_grace=5.0)
    server.start()
    try:
        c = RawClient.connect(path, "f", structured=False)
        prov.delay = 0.4
        c.send(P.CMD_READ, 0, 5)
        c.send(P.CMD_READ, 0, 5)  # pipelined behind the first
        time.sleep(0.1)
        stopper = threading.Thread(target=server.shutdown)
        stopper.start()
        first = c.reply()
        assert first.error == 0 and first.data == b"hello"
        second = c.reply()
        assert second.error in (0, P.ESHUTDOWN)
        assert second.error == P.ESHUTDOWN or second.data == b"hello"
        assert c.at_eof()
        stopper.join(10)
        assert not stopper.is_alive()
        assert prov.closed == 1 and not os.path.exists(path)
        with pytest.raises(OSError):
            RawClient(path)
        server.shutdown()  # idempotent
        assert prov.closed == 1
    finally:
        server.shutdown()
        shutil.rmtree(d, ignore_errors=True)


def test_shutdown_aborts_a_stalled_client() -> None:
    prov = make_provider()
    d = tempfile.mkdtemp(prefix="nbdt", dir="/tmp")
    server = NBDServer(prov, unix_path=os.path.join(d, "s"), shutdown_grace=0.5)
    server.start()
    try:
        c = RawClient.connect(server.unix_path, "disk", structured=False)
        c.sock.sendall(P.encode_request(P.CMD_WRITE, 1, 0, 4096) + b"x" * 10)  # never completes
        idle = RawClient.connect(server.unix_path, "disk", structured=False)
        t0 = time.monotonic()
        server.shutdown()
        assert time.monotonic() - t0 < 4.0
        assert c.at_eof(2) and idle.at_eof(2) and prov.closed
    finally:
        server.shutdown()
        shutil.rmtree(d, ignore_errors=True)


def test_listening_sockets(tmp_path: Any) -> None:
    prov = make_provider()
    with NBDServer(prov) as server:  # default: private unix socket
        assert server.unix_path and server.tcp_address is None
        tmpdir = os.path.dirname(server.unix_path)
        assert oct(os.stat(server.unix_path).st_mode & 0o777) == "0o600"
        assert_serving(server.unix_path)
    assert not os.path.exists(tmpdir)
    with NBDServer(prov, tcp=("", 0)) as server:
        assert server.unix_path is None and server.tcp_address is not None
        assert server.tcp_address[0] == "127.0.0.1"
        s = socket.create_connection(server.tcp_address, timeout=5)
        assert P.decode_greeting(s.recv(18)) & P.FLAG_FIXED_NEWSTYLE
        s.close()
        assert server.uri.startswith("nbd://127.0.0.1:")
    d = tempfile.mkdtemp(prefix="nbdt", dir="/tmp")
    try:
        path = os.path.join(d, "s")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # a stale socket file is replaced
        with NBDServer(prov, unix_path=path) as server:
            assert_serving(path)
            with pytest.raises(AlreadyExists):
                NBDServer(prov, unix_path=path)
        open(path, "w").close()
        with pytest.raises(InvalidArgument):
            NBDServer(prov, unix_path=path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_shutdown_returns_after_the_private_socket_directory_is_gone(monkeypatch: Any) -> None:
    """The serving thread and shutdown() both close the listeners; whichever does, shutdown() returns
    only when the socket and its private directory are removed (a slow removal made it return early)."""
    from thinpool.nbd import server as server_mod
    real = shutil.rmtree

    def slow_rmtree(path: str, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.3)
        real(path, *args, **kwargs)

    monkeypatch.setattr(server_mod.shutil, "rmtree", slow_rmtree)
    for _ in range(3):
        with NBDServer(make_provider()) as server:
            tmpdir = os.path.dirname(server.unix_path)
            assert_serving(server.unix_path)
        assert not os.path.exists(tmpdir)


def test_max_clients() -> None:
    prov = make_provider()
    with serve(prov, max_clients=2) as server:
        a = RawClient.connect(server.unix_path, "disk")
        b = RawClient.connect(server.unix_path, "disk")
        c = RawClient(server.unix_path)
        assert c.at_eof()
        a.disconnect()
        deadline = time.monotonic() + 5
        while server.active_clients > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert_serving(server.unix_path, "disk")
        b.disconnect()


# =========================================================================== fuzzing
FUZZ_COUNTS: dict[str, int] = {}


def _report(name: str, capsys: Any) -> None:
    with capsys.disabled():
        print(f"\n[nbd fuzz] {name}: {FUZZ_COUNTS.get(name, 0)} cases")


def _blast(path: str | None, data: bytes, read_greeting: bool = True) -> None:
    """Send ``data`` after the greeting, half-close, and require the server to hang up."""
    assert path is not None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    try:
        if read_greeting:
            got = b""
            while len(got) < 18:
                chunk = s.recv(18 - len(got))
                assert chunk
                got += chunk
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return  # the server already hung up on us
        while True:
            try:
                if not s.recv(1 << 20):
                    return
            except ConnectionResetError:
                return
    finally:
        s.close()


def _valid_script() -> bytes:
    """A complete, valid client conversation in bytes (fixed newstyle, structured, some I/O)."""
    parts = [
        P.encode_client_flags(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES),
        P.encode_option(P.OPT_LIST),
        P.encode_option(P.OPT_STRUCTURED_REPLY),
        P.encode_option(P.OPT_SET_META_CONTEXT, P.encode_meta_context_request("disk", ["base:allocation"])),
        P.encode_option(P.OPT_INFO, P.encode_go_request("disk", [P.INFO_NAME])),
        P.encode_option(P.OPT_GO, P.encode_go_request("disk", [P.INFO_BLOCK_SIZE])),
        P.encode_request(P.CMD_WRITE, 1, 4096, 16) + b"0123456789abcdef",
        P.encode_request(P.CMD_READ, 2, 0, 8192),
        P.encode_request(P.CMD_BLOCK_STATUS, 3, 0, 1 << 20),
        P.encode_request(P.CMD_WRITE_ZEROES, 4, 0, 4096),
        P.encode_request(P.CMD_TRIM, 5, 0, 65536),
        P.encode_request(P.CMD_FLUSH, 6),
        P.encode_request(P.CMD_DISC, 7),
    ]
    return b"".join(parts)


VALID = _valid_script()


@st.composite
def mutated_script(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "u32"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "u32" and pos + 4 <= len(data):
            data[pos : pos + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 0xFFFFFFFF, 1 << 31, 4097, 65537])))
    return bytes(data)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_handshake_random_bytes(live: tuple[NBDServer, MemoryProvider], data: bytes) -> None:
    server, _ = live
    FUZZ_COUNTS["handshake_random"] = FUZZ_COUNTS.get("handshake_random", 0) + 1
    _blast(server.unix_path, data)
    assert_serving(server.unix_path)


names_st = st.one_of(st.sampled_from(["disk", "ro", "scratch", "", "nope"]), st.text(max_size=8))
query_st = st.one_of(st.sampled_from(["base:allocation", "base:", "base:other", "qemu:x", "nocolon", ":"]),
                     st.text(max_size=12))
go_payload_st = st.builds(lambda n, i: P.encode_go_request(n.replace("\0", ""), i), names_st,
                          st.lists(st.integers(0, 0xFFFF), max_size=4))
meta_payload_st = st.builds(
    lambda n, q: P.encode_meta_context_request(n.replace("\0", ""), [x.replace("\0", "") for x in q]),
    names_st, st.lists(query_st, max_size=3))
framing_st = st.sampled_from(["exact"] * 8 + ["short", "long"])
option_frame_st = st.one_of(
    st.tuples(st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 0xFFFFFFFF]), st.binary(max_size=48), framing_st),
    st.tuples(st.sampled_from([P.OPT_INFO, P.OPT_INFO, P.OPT_GO]), go_payload_st, framing_st),
    st.tuples(st.sampled_from([P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT]), meta_payload_st, framing_st),
    st.tuples(st.sampled_from([P.OPT_STRUCTURED_REPLY, P.OPT_LIST, P.OPT_ABORT]), st.just(b""), framing_st),
)


@settings(FUZZ, max_examples=soak_examples(400))
@given(st.integers(0, 7), st.booleans(), st.lists(option_frame_st, max_size=8))
def test_fuzz_option_haggling(live: tuple[NBDServer, MemoryProvider], cflags: int, structured: bool,
                              frames: list[tuple[int, bytes, str]]) -> None:
    """Well-framed options with random or plausible payloads, so every option parser is exercised."""
    server, _ = live
    FUZZ_COUNTS["option_haggling"] = FUZZ_COUNTS.get("option_haggling", 0) + 1
    out = [P.encode_client_flags(cflags)]
    if structured:
        out.append(P.encode_option(P.OPT_STRUCTURED_REPLY))
    for option, payload, framing in frames:
        if framing == "exact":
            out.append(P.encode_option(option, payload))
        else:  # the header's length disagrees with the payload that follows
            delta = -1 if framing == "short" else 1
            out.append(struct.pack(">QII", P.IHAVEOPT, option, max(0, len(payload) + delta)) + payload)
    _blast(server.unix_path, b"".join(out))
    assert_serving(server.unix_path)


@FUZZ
@given(mutated_script())
def test_fuzz_mutated_conversation(live: tuple[NBDServer, MemoryProvider], data: bytes) -> None:
    server, _ = live
    FUZZ_COUNTS["mutated_conversation"] = FUZZ_COUNTS.get("mutated_conversation", 0) + 1
    _blast(server.unix_path, data)
    assert_serving(server.unix_path)


request_st = st.tuples(
    st.integers(0, 12),  # command type, including unknown ones
    st.sampled_from([0, 1, 2, 4, 8, 16, 3, 0x20, 0xFFFF]),  # flags
    st.one_of(st.integers(0, 9 * MiB), st.sampled_from([2**63, 2**64 - 1, 8 * MiB - 1])),
    st.one_of(st.integers(0, 70000), st.sampled_from([0, 1, 32 * MiB + 1, 2**32 - 1])),
)


@FUZZ
@given(st.booleans(), st.lists(request_st, min_size=1, max_size=12))
def test_fuzz_requests(live: tuple[NBDServer, MemoryProvider], structured: bool,
                       requests: list[tuple[int, int, int, int]]) -> None:
    """Random request headers after a valid handshake: every reply must be well formed."""
    server, prov = live
    FUZZ_COUNTS["requests"] = FUZZ_COUNTS.get("requests", 0) + 1
    c = RawClient.connect(server.unix_path, "disk", structured=structured)
    allowed_errors = {0, P.EPERM, P.EINVAL, P.ENOSPC, P.ENOTSUP}
    try:
        for type_, flags, offset, length in requests:
            if type_ == P.CMD_DISC:
                c.disconnect()
                return
            if type_ == P.CMD_WRITE:
                if length > 32 * MiB:  # must be a hard disconnect, not a reply
                    c.sock.sendall(P.encode_request(type_, 1, offset, length, flags))
                    assert c.at_eof()
                    return
                c.send(type_, offset, length, flags, data=bytes([length & 0xFF]) * length)
            else:
                c.send(type_, offset, length, flags)
            r = c.reply()
            assert r.error in allowed_errors, r
            end_ok = offset + length <= 8 * MiB
            if type_ == P.CMD_READ and r.error == 0:
                assert len(r.data) == length and end_ok
            if type_ in (P.CMD_WRITE, P.CMD_READ, P.CMD_TRIM, P.CMD_WRITE_ZEROES, P.CMD_BLOCK_STATUS) and not end_ok:
                assert r.error != 0
            if type_ not in (0, 1, 3, 4, 6, 7):
                assert r.error == P.EINVAL
        c.disconnect()
    except Closed:
        pytest.fail("server hung up on a well-framed request")
    finally:
        c.close()
        assert not INTERNAL_ERRORS.records, INTERNAL_ERRORS.records


@FUZZ
@given(st.binary(min_size=1, max_size=400))
def test_fuzz_transmission_garbage(live: tuple[NBDServer, MemoryProvider], data: bytes) -> None:
    """Arbitrary bytes in the transmission phase, sometimes behind a valid request magic."""
    server, _ = live
    FUZZ_COUNTS["transmission_garbage"] = FUZZ_COUNTS.get("transmission_garbage", 0) + 1
    c = RawClient.connect(server.unix_path, "disk", structured=bool(data[0] & 1))
    prefix = struct.pack(">I", P.REQUEST_MAGIC) if data[0] & 2 else b""
    try:
        c.sock.sendall(prefix + data[1:])
        c.sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert c.at_eof()
    c.close()
    assert_serving(server.unix_path)


def test_fuzz_case_counts(live: tuple[NBDServer, MemoryProvider], capsys: Any) -> None:
    """Report how many fuzz cases ran (run after the fuzz tests above, in file order)."""
    server, _ = live
    if not FUZZ_COUNTS:
        pytest.skip("reports the fuzz tests above; run it together with them")
    for name in ("handshake_random", "option_haggling", "mutated_conversation", "requests", "transmission_garbage"):
        _report(name, capsys)
    with capsys.disabled():
        print(f"[nbd fuzz] total: {sum(FUZZ_COUNTS.values())} cases, "
              f"{server.total_connections} connections served")
    assert sum(FUZZ_COUNTS.values()) >= 5 * 50
    assert_serving(server.unix_path)
