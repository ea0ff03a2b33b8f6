"""NBD wire protocol: pure encode/decode functions (the constants are :mod:`thinpool.nbd.wire`).

Everything here is side-effect free and works on ``bytes``; the server in
:mod:`thinpool.nbd.server` does the socket I/O.  The layouts follow the NBD
protocol specification (``doc/proto.md`` of the NetworkBlockDevice project):
fixed newstyle handshake, option haggling with ``NBD_OPT_GO``/``NBD_OPT_INFO``,
simple replies, structured replies and the ``base:allocation`` metadata
context.  All integers are big-endian ("network byte order").
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from thinpool.errors import ProtocolError
# the wire constants, re-exported: callers write protocol.CMD_READ etc.
from thinpool.nbd.wire import *  # noqa: F401,F403


class Disconnect(Exception):
    """End this connection now (peer gone, protocol violation, abort or shutdown); a server's session
    control flow, never sent to a client."""


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_HEADER = struct.Struct(">IHHQI")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXTENT = struct.Struct(">II")


# =========================================================================== handshake
def encode_greeting(handshake_flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    """The server's newstyle greeting: ``NBDMAGIC``, ``IHAVEOPT`` and 16 bits of handshake flags."""
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def decode_greeting(data: bytes) -> int:
    """Check a newstyle greeting and return its handshake flags (client side, used by tests)."""
    if len(data) != GREETING_SIZE:
        raise ProtocolError(f"greeting must be {GREETING_SIZE} bytes, got {len(data)}")
    magic, opt_magic, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise ProtocolError(f"not a newstyle NBD greeting: {magic:#x} {opt_magic:#x}")
    return int(flags)


def encode_client_flags(flags: int) -> bytes:
    """The client's 32-bit flags word sent after the greeting."""
    return _U32.pack(flags)


def decode_client_flags(data: bytes, handshake_flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> int:
    """Parse the client flags; unknown flags or ``NO_ZEROES`` the server did not offer are fatal."""
    if len(data) != CLIENT_FLAGS_SIZE:
        raise ProtocolError(f"client flags must be 4 bytes, got {len(data)}")
    (flags,) = _U32.unpack(data)
    if flags & ~KNOWN_CLIENT_FLAGS:
        raise ProtocolError(f"client sent unknown flags {flags:#x}")
    if flags & FLAG_C_NO_ZEROES and not handshake_flags & FLAG_NO_ZEROES:
        raise ProtocolError("client set NO_ZEROES which the server did not offer")
    return int(flags)


@dataclass(frozen=True)
class OptionHeader:
    """An option request header: ``IHAVEOPT``, option number and data length."""

    option: int
    length: int


def encode_option(option: int, data: bytes = b"") -> bytes:
    """A complete option request (client side)."""
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(data: bytes) -> OptionHeader:
    """Parse a 16-byte option request header; a wrong magic is a :class:`ProtocolError`."""
    if len(data) != OPTION_HEADER_SIZE:
        raise ProtocolError(f"option header must be {OPTION_HEADER_SIZE} bytes, got {len(data)}")
    magic, option, length = _OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    return OptionHeader(option, length)


def encode_option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    """One fixed-newstyle option reply (header plus payload)."""
    return _OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(payload)) + payload


@dataclass(frozen=True)
class OptionReplyHeader:
    """A parsed option reply header (client side)."""

    option: int
    reply_type: int
    length: int

    @property
    def is_error(self) -> bool:
        """True for the ``NBD_REP_ERR_*`` family (bit 31 set)."""
        return bool(self.reply_type & REP_FLAG_ERROR)


def decode_option_reply_header(data: bytes) -> OptionReplyHeader:
    """Parse a 20-byte option reply header."""
    if len(data) != OPTION_REPLY_HEADER_SIZE:
        raise ProtocolError(f"option reply header must be {OPTION_REPLY_HEADER_SIZE} bytes, got {len(data)}")
    magic, option, reply_type, length = _OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic {magic:#x}")
    return OptionReplyHeader(option, reply_type, length)


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise ProtocolError(f"string of {len(raw)} bytes exceeds the {MAX_STRING}-byte limit")
    return raw


def decode_string(raw: bytes, what: str = "string") -> str:
    """Decode a protocol string: UTF-8, no NUL, at most 4096 bytes."""
    if len(raw) > MAX_STRING:
        raise ProtocolError(f"{what} of {len(raw)} bytes exceeds the {MAX_STRING}-byte limit")
    if b"\x00" in raw:
        raise ProtocolError(f"{what} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not valid UTF-8") from exc


def encode_rep_server(name: str, description: str = "") -> bytes:
    """Payload of ``NBD_REP_SERVER``: name length, name, optional description."""
    raw = _encode_string(name)
    return _U32.pack(len(raw)) + raw + _encode_string(description)


def decode_rep_server(payload: bytes) -> tuple[str, str]:
    """Parse an ``NBD_REP_SERVER`` payload into (name, description)."""
    if len(payload) < 4:
        raise ProtocolError("NBD_REP_SERVER payload shorter than 4 bytes")
    (n,) = _U32.unpack_from(payload)
    if n > len(payload) - 4:
        raise ProtocolError("NBD_REP_SERVER name overruns the payload")
    return decode_string(payload[4 : 4 + n], "export name"), decode_string(payload[4 + n :], "description")


def encode_info_export(size: int, transmission_flags: int) -> bytes:
    """Payload of ``NBD_REP_INFO``/``NBD_INFO_EXPORT``: size and transmission flags."""
    return _INFO_EXPORT.pack(INFO_EXPORT, size, transmission_flags)


def encode_info_name(name: str) -> bytes:
    """Payload of ``NBD_REP_INFO``/``NBD_INFO_NAME``."""
    return _U16.pack(INFO_NAME) + _encode_string(name)


def encode_info_description(description: str) -> bytes:
    """Payload of ``NBD_REP_INFO``/``NBD_INFO_DESCRIPTION``."""
    return _U16.pack(INFO_DESCRIPTION) + _encode_string(description)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """Payload of ``NBD_REP_INFO``/``NBD_INFO_BLOCK_SIZE``."""
    return _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def decode_info(payload: bytes) -> tuple[int, object]:
    """Parse an ``NBD_REP_INFO`` payload into (info type, value) (client side, used by tests).

    ``INFO_EXPORT`` gives ``(size, flags)``, ``INFO_BLOCK_SIZE`` ``(min, preferred, max)``,
    name and description give ``str``; unknown types give the raw bytes.
    """
    if len(payload) < 2:
        raise ProtocolError("NBD_REP_INFO payload shorter than 2 bytes")
    (info,) = _U16.unpack_from(payload)
    if info == INFO_EXPORT:
        if len(payload) != _INFO_EXPORT.size:
            raise ProtocolError("NBD_INFO_EXPORT must be 12 bytes")
        _, size, flags = _INFO_EXPORT.unpack(payload)
        return info, (size, flags)
    if info == INFO_BLOCK_SIZE:
        if len(payload) != _INFO_BLOCK_SIZE.size:
            raise ProtocolError("NBD_INFO_BLOCK_SIZE must be 14 bytes")
        return info, _INFO_BLOCK_SIZE.unpack(payload)[1:]
    if info in (INFO_NAME, INFO_DESCRIPTION):
        return info, decode_string(payload[2:])
    return info, payload[2:]


def encode_export_name_reply(size: int, transmission_flags: int, no_zeroes: bool) -> bytes:
    """The reply that ends ``NBD_OPT_EXPORT_NAME``: size, flags and (unless NO_ZEROES) 124 zero bytes."""
    reply = _U64.pack(size) + _U16.pack(transmission_flags)
    return reply if no_zeroes else reply + bytes(EXPORT_NAME_PADDING)


def encode_go_request(name: str, info_requests: Sequence[int] = ()) -> bytes:
    """Option data of ``NBD_OPT_GO``/``NBD_OPT_INFO`` (client side)."""
    raw = _encode_string(name)
    return (
        _U32.pack(len(raw))
        + raw
        + _U16.pack(len(info_requests))
        + b"".join(_U16.pack(i) for i in info_requests)
    )


def decode_go_request(data: bytes) -> tuple[str, list[int]]:
    """Parse ``NBD_OPT_GO``/``NBD_OPT_INFO`` data into (export name, information requests)."""
    if len(data) < 6:
        raise ProtocolError(f"GO/INFO data is {len(data)} bytes, need at least 6")
    (n,) = _U32.unpack_from(data)
    if n > len(data) - 6:
        raise ProtocolError("GO/INFO export name overruns the option data")
    name = decode_string(data[4 : 4 + n], "export name")
    (count,) = _U16.unpack_from(data, 4 + n)
    rest = data[6 + n :]
    if len(rest) != 2 * count:
        raise ProtocolError(f"GO/INFO announces {count} information requests but carries {len(rest)} bytes")
    return name, [_U16.unpack_from(rest, 2 * i)[0] for i in range(count)]


def encode_meta_context_request(name: str, queries: Sequence[str]) -> bytes:
    """Option data of ``NBD_OPT_LIST_META_CONTEXT``/``NBD_OPT_SET_META_CONTEXT`` (client side)."""
    raw = _encode_string(name)
    parts = [_U32.pack(len(raw)), raw, _U32.pack(len(queries))]
    for q in queries:
        rq = _encode_string(q)
        parts += [_U32.pack(len(rq)), rq]
    return b"".join(parts)


def decode_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """Parse LIST/SET_META_CONTEXT data into (export name, queries)."""
    if len(data) < 8:
        raise ProtocolError(f"META_CONTEXT data is {len(data)} bytes, need at least 8")
    (n,) = _U32.unpack_from(data)
    if n > len(data) - 8:
        raise ProtocolError("META_CONTEXT export name overruns the option data")
    name = decode_string(data[4 : 4 + n], "export name")
    pos = 4 + n
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise ProtocolError("META_CONTEXT query length overruns the option data")
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4
        if qlen > len(data) - pos:
            raise ProtocolError("META_CONTEXT query overruns the option data")
        queries.append(decode_string(data[pos : pos + qlen], "metadata context query"))
        pos += qlen
    if pos != len(data):
        raise ProtocolError(f"META_CONTEXT data has {len(data) - pos} trailing bytes")
    return name, queries


def encode_rep_meta_context(context_id: int, name: str) -> bytes:
    """Payload of ``NBD_REP_META_CONTEXT``: 32-bit context id and the context name."""
    return _U32.pack(context_id) + _encode_string(name)


def decode_rep_meta_context(payload: bytes) -> tuple[int, str]:
    """Parse an ``NBD_REP_META_CONTEXT`` payload into (context id, name)."""
    if len(payload) < 4:
        raise ProtocolError("NBD_REP_META_CONTEXT payload shorter than 4 bytes")
    return _U32.unpack_from(payload)[0], decode_string(payload[4:], "metadata context")


# =========================================================================== transmission
@dataclass(frozen=True)
class Request:
    """A transmission-phase request header (a WRITE's payload follows it on the wire)."""

    flags: int
    type: int
    handle: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        """The command's name (``READ``, ``WRITE``...) or ``CMD<n>`` for unknown types."""
        return CMD_NAMES.get(self.type, f"CMD{self.type}")


def encode_request(type_: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    """A 28-byte request header (client side; append the payload for WRITE)."""
    return _REQUEST.pack(REQUEST_MAGIC, flags, type_, handle, offset, length)


def decode_request(data: bytes) -> Request:
    """Parse a 28-byte request header; a wrong magic is a :class:`ProtocolError`."""
    if len(data) != REQUEST_HEADER_SIZE:
        raise ProtocolError(f"request header must be {REQUEST_HEADER_SIZE} bytes, got {len(data)}")
    magic, flags, type_, handle, offset, length = _REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, type_, handle, offset, length)


def encode_simple_reply(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    """A simple reply; ``data`` only for a successful READ."""
    if error and data:
        raise ProtocolError("a simple reply with an error carries no data")
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + data


def encode_chunk_header(flags: int, type_: int, handle: int, length: int) -> bytes:
    """The 20-byte header of one structured reply chunk."""
    return _STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, type_, handle, length)


def encode_chunk(flags: int, type_: int, handle: int, payload: bytes = b"") -> bytes:
    """One structured reply chunk: header plus payload."""
    return encode_chunk_header(flags, type_, handle, len(payload)) + payload


def encode_done(handle: int) -> bytes:
    """The final ``NBD_REPLY_TYPE_NONE`` chunk with ``NBD_REPLY_FLAG_DONE``."""
    return encode_chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle)


def encode_offset_data_header(handle: int, offset: int, data_length: int, done: bool) -> bytes:
    """Header and offset of an ``OFFSET_DATA`` chunk; the caller sends the data after it."""
    if data_length < 1:
        raise ProtocolError("an OFFSET_DATA chunk carries at least one byte")
    flags = REPLY_FLAG_DONE if done else 0
    return encode_chunk_header(flags, REPLY_TYPE_OFFSET_DATA, handle, 8 + data_length) + _U64.pack(offset)


def encode_offset_hole(handle: int, offset: int, length: int, done: bool) -> bytes:
    """An ``OFFSET_HOLE`` chunk: ``length`` bytes at ``offset`` read as zeroes."""
    if not 0 < length < 1 << 32:
        raise ProtocolError(f"hole size {length} out of range")
    flags = REPLY_FLAG_DONE if done else 0
    return encode_chunk(flags, REPLY_TYPE_OFFSET_HOLE, handle, _U64.pack(offset) + _U32.pack(length))


def encode_error_chunk(handle: int, error: int, message: str = "", done: bool = True) -> bytes:
    """An ``NBD_REPLY_TYPE_ERROR`` chunk with an optional human-readable message."""
    if error == 0:
        raise ProtocolError("an error chunk needs a nonzero error")
    raw = message.encode("utf-8", "replace")[:MAX_STRING]
    flags = REPLY_FLAG_DONE if done else 0
    return encode_chunk(flags, REPLY_TYPE_ERROR, handle, _U32.pack(error) + _U16.pack(len(raw)) + raw)


def encode_block_status(
    handle: int, context_id: int, extents: Iterable[tuple[int, int]], done: bool = True
) -> bytes:
    """An ``NBD_REPLY_TYPE_BLOCK_STATUS`` chunk with (length, flags) descriptors."""
    body = [_U32.pack(context_id)]
    for length, flags in extents:
        if not 0 < length < 1 << 32:
            raise ProtocolError(f"extent length {length} out of range")
        body.append(_EXTENT.pack(length, flags))
    if len(body) == 1:
        raise ProtocolError("a block status chunk needs at least one extent")
    return encode_chunk(REPLY_FLAG_DONE if done else 0, REPLY_TYPE_BLOCK_STATUS, handle, b"".join(body))


@dataclass(frozen=True)
class ReplyHeader:
    """A reply header as seen by a client: simple (``structured`` False) or a structured chunk."""

    structured: bool
    handle: int
    error: int = 0  # simple replies only
    flags: int = 0  # structured only
    type: int = 0  # structured only
    length: int = 0  # structured only: payload length

    @property
    def done(self) -> bool:
        """True when this is the last message for its handle."""
        return not self.structured or bool(self.flags & REPLY_FLAG_DONE)


def reply_header_size(magic_bytes: bytes) -> int:
    """Given a reply's first 4 bytes, how long its whole header is."""
    (magic,) = _U32.unpack(magic_bytes)
    if magic == SIMPLE_REPLY_MAGIC:
        return SIMPLE_REPLY_HEADER_SIZE
    if magic == STRUCTURED_REPLY_MAGIC:
        return STRUCTURED_REPLY_HEADER_SIZE
    raise ProtocolError(f"bad reply magic {magic:#x}")


def decode_reply_header(data: bytes) -> ReplyHeader:
    """Parse a simple (16-byte) or structured (20-byte) reply header (client side)."""
    if len(data) == SIMPLE_REPLY_HEADER_SIZE:
        magic, error, handle = _SIMPLE_REPLY.unpack(data)
        if magic != SIMPLE_REPLY_MAGIC:
            raise ProtocolError(f"bad simple reply magic {magic:#x}")
        return ReplyHeader(False, handle, error=error)
    if len(data) == STRUCTURED_REPLY_HEADER_SIZE:
        magic, flags, type_, handle, length = _STRUCTURED_HEADER.unpack(data)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise ProtocolError(f"bad structured reply magic {magic:#x}")
        return ReplyHeader(True, handle, flags=flags, type=type_, length=length)
    raise ProtocolError(f"reply header of {len(data)} bytes")


def decode_block_status(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Parse a BLOCK_STATUS chunk payload into (context id, [(length, flags), ...])."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise ProtocolError(f"block status payload of {len(payload)} bytes")
    (ctx,) = _U32.unpack_from(payload)
    return ctx, [_EXTENT.unpack_from(payload, p) for p in range(4, len(payload), 8)]


def decode_error_chunk(payload: bytes) -> tuple[int, str]:
    """Parse an error chunk payload into (error, message)."""
    if len(payload) < 6:
        raise ProtocolError("error chunk payload shorter than 6 bytes")
    (err,) = _U32.unpack_from(payload)
    (mlen,) = _U16.unpack_from(payload, 4)
    if mlen > len(payload) - 6:
        raise ProtocolError("error message overruns the chunk")
    return err, payload[6 : 6 + mlen].decode("utf-8", "replace")


def decode_offset_data(payload: bytes) -> tuple[int, bytes]:
    """Parse an OFFSET_DATA payload into (offset, data)."""
    if len(payload) < 9:
        raise ProtocolError("OFFSET_DATA payload shorter than 9 bytes")
    return _U64.unpack_from(payload)[0], payload[8:]


def decode_offset_hole(payload: bytes) -> tuple[int, int]:
    """Parse an OFFSET_HOLE payload into (offset, size)."""
    if len(payload) != 12:
        raise ProtocolError("OFFSET_HOLE payload must be 12 bytes")
    return _U64.unpack_from(payload)[0], _U32.unpack_from(payload, 8)[0]


def coalesce_extents(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge adjacent (length, flags) extents that have the same flags; drop empty ones."""
    out: list[tuple[int, int]] = []
    for length, flags in extents:
        if length <= 0:
            continue
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out


def errno_to_nbd(err: int) -> int:
    """Map a host ``errno`` to one of the NBD error values (EDQUOT/EFBIG become ENOSPC)."""
    table = {
        errno.EPERM: EPERM,
        errno.EACCES: EPERM,
        errno.EROFS: EPERM,
        errno.EIO: EIO,
        errno.ENOMEM: ENOMEM,
        errno.EINVAL: EINVAL,
        errno.ENOSPC: ENOSPC,
        errno.EDQUOT: ENOSPC,
        errno.EFBIG: ENOSPC,
        errno.EOVERFLOW: EOVERFLOW,
        errno.ENOTSUP: ENOTSUP,
        errno.ESHUTDOWN: ESHUTDOWN,
    }
    return table.get(err, EIO)
