"""One NBD client connection: fixed newstyle handshake, then the transmission phase.

A :class:`Session` runs in its own thread (started by :class:`~thinpool.nbd.server.NBDServer`).
It never raises: protocol violations, vanished peers and backend failures end in a clean
disconnect or an NBD error reply, and are logged.  Every call into the backend is made
while holding the provider's ``lock``.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from thinpool.errors import InvalidArgument, NoSpace, NotFound, ReadOnly, ThinpoolError
from thinpool.nbd import protocol as P
from thinpool.nbd.backend import Export, ExportProvider
from thinpool.nbd.limits import PayloadBudget

log = logging.getLogger("thinpool.nbd")

#: context id we hand out for ``base:allocation``
BASE_ALLOCATION_ID = 1
#: most descriptors sent in one BLOCK_STATUS reply (the spec lets a server send fewer)
MAX_EXTENTS = 2048
#: holes shorter than this are sent inline as data in structured READ replies
MIN_HOLE_CHUNK = 4096

# command -> command flags it may carry (DF only once structured replies are on)
_ALLOWED_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_FLUSH: P.CMD_FLAG_FUA,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
}
_WRITES = (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES)


class Disconnect(Exception):
    """End this connection now (peer gone, protocol violation, abort or shutdown)."""


@dataclass
class SessionContext:
    """What a session needs from its server."""

    provider: ExportProvider
    read_only: bool
    stopping: threading.Event
    wake_fd: int  # readable once the server is stopping
    grace: float  # seconds a half-received message may take to complete after shutdown starts
    handshake_flags: int = P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
    stats: dict[str, int] = field(default_factory=dict)
    #: seconds from connecting to the end of option haggling (None: no limit)
    handshake_timeout: float | None = 10.0
    #: seconds a connected client may send nothing between requests (None: no limit -- see docs/nbd.md)
    idle_timeout: float | None = None
    #: seconds a request may take to arrive completely once its first byte did (a stalled payload)
    message_timeout: float | None = 30.0
    #: WRITE payloads received and not yet served, over all sessions (None: no limit)
    budget: PayloadBudget | None = None


def nbd_error_for(exc: BaseException) -> int:
    """Translate a backend exception into an NBD error value."""
    if isinstance(exc, NoSpace):
        return P.ENOSPC
    if isinstance(exc, InvalidArgument):
        return P.EINVAL
    if isinstance(exc, ReadOnly):
        return P.EPERM
    if isinstance(exc, ThinpoolError):
        return P.EIO
    if isinstance(exc, OSError) and exc.errno:
        return P.errno_to_nbd(exc.errno)
    return P.EIO


_RECV_CHUNK = 256 * 1024
_SEND_CHUNK = 256 * 1024
#: messages longer than this are received into their own buffer instead of the session's ring
_LARGE = _RECV_CHUNK // 2
_IOV_MAX = 1024
#: a large payload is received (and reserved in the PayloadBudget) this many bytes at a time
_BUDGET_CHUNK = 1 << 20
#: busy-poll window before a session blocks for its next request (see Session._spin_wait); 0 disables
SPIN_NS = int(os.environ.get("THINPOOL_NBD_SPIN_NS", 100_000))
_SPINNER = threading.Lock()

# transmission fast path: header layouts and constants, bound once
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_DATA_CHUNK_HEADER = struct.Struct(">IHHQIQ")  # structured header + the OFFSET_DATA chunk's offset
_REQUEST_MAGIC = P.REQUEST_MAGIC
_SIMPLE_REPLY_MAGIC = P.SIMPLE_REPLY_MAGIC
_STRUCTURED_REPLY_MAGIC = P.STRUCTURED_REPLY_MAGIC
_DONE = P.REPLY_FLAG_DONE
_OFFSET_DATA = P.REPLY_TYPE_OFFSET_DATA
_CMD_READ = P.CMD_READ
_CMD_WRITE = P.CMD_WRITE
_CMD_DISC = P.CMD_DISC
_FUA = P.CMD_FLAG_FUA
_DF = P.CMD_FLAG_DF
_HDR = P.REQUEST_HEADER_SIZE
_MAX_PAYLOAD = P.MAX_PAYLOAD


class Session:
    """Serve one connected client until it disconnects or the server stops."""

    def __init__(self, sock: socket.socket, ctx: SessionContext, peer: str,
                 allowed: frozenset[str] | None = None) -> None:
        self.sock = sock
        self.ctx = ctx
        self.peer = peer
        #: the export names this connection may list and open (None: all of them)
        self.allowed = allowed
        self.client_flags = 0
        self.structured = False
        self.contexts_export: str | None = None  # export the selected meta context refers to
        self.export: Export | None = None
        self.export_read_only = False
        self._idle_poll = select.poll()
        self._idle_poll.register(sock, select.POLLIN)
        self._idle_poll.register(ctx.wake_fd, select.POLLIN)
        self._busy_poll = select.poll()
        self._busy_poll.register(sock, select.POLLIN)
        # batched socket I/O: one recv takes many pipelined requests; replies are queued and sent
        # with one sendmsg before the session would block for input (so it can never deadlock).
        # Received bytes not consumed yet are _rbuf[_rpos:_rend].
        self._rbuf = bytearray(_RECV_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self._out: list[bytes] = []
        self._outlen = 0
        self._spin = SPIN_NS > 0
        self.started = time.monotonic()
        #: True until option haggling ends (the server may evict such a connection when it is full)
        self.in_handshake = True
        self.evicted = False  # set by the server when it aborts this connection to make room
        self._handshake_deadline: float | None = None
        self._msg_deadline: float | None = None  # set when a wait inside a message starts
        self._held = 0  # bytes reserved in ctx.budget for the payload being received

    # ================================================================= lifecycle
    def run(self) -> None:
        """Handshake, transmission, close; never raises."""
        try:
            if self._handshake():
                self._transmission()
        except Disconnect as exc:
            log.debug("nbd %s: disconnect: %s", self.peer, exc)
        except P.ProtocolError as exc:
            log.info("nbd %s: protocol violation, disconnecting: %s", self.peer, exc)
        except OSError as exc:
            log.debug("nbd %s: connection error: %s", self.peer, exc)
        except Exception:  # a bug in the server: log it, keep the server alive
            log.exception("nbd %s: internal error, disconnecting", self.peer)
        finally:
            self._give_back()
            self._release(self.export)
            self.export = None
            self.close()

    def _give_back(self) -> None:
        """Return this session's payload reservation to the server's budget."""
        if self._held and self.ctx.budget is not None:
            self.ctx.budget.release(self._held)
        self._held = 0

    def close(self) -> None:
        """Send any queued replies, then close the socket (idempotent)."""
        try:
            self._flush_out()
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Force-end a connection stuck in I/O (used after the shutdown grace period)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ================================================================= socket I/O
    def _wait_readable(self, idle: bool, deadline: list[float]) -> bool:
        """Wait until the socket is readable; False if we should stop instead.

        ``idle`` means we are between messages: once the server is stopping an idle
        session stops at once.  Mid-message, the peer gets ``grace`` seconds to finish.
        """
        limit = self._wait_limit(idle)
        while True:
            if not self.ctx.stopping.is_set():
                sock_fd = self.sock.fileno()
                if limit is None:
                    events = self._idle_poll.poll()
                else:
                    remaining = limit - time.monotonic()
                    if remaining <= 0:
                        raise Disconnect(self._timeout_reason(idle))
                    events = self._idle_poll.poll(min(remaining, 3600.0) * 1000)
                for fd, _ in events:
                    if fd == sock_fd:
                        return True
                continue
            if idle:
                return False
            if not deadline:
                deadline.append(time.monotonic() + self.ctx.grace)
            remaining = deadline[0] - time.monotonic()
            if remaining <= 0:
                raise Disconnect("peer did not finish its message within the shutdown grace period")
            if self._busy_poll.poll(remaining * 1000):
                return True

    def _wait_limit(self, idle: bool) -> float | None:
        """The monotonic time by which the socket must become readable (None: no limit): the
        handshake deadline during option haggling, else the idle timeout between messages, else the
        deadline of the message being received (started at its first wait)."""
        ctx = self.ctx
        if self.in_handshake:
            if self._handshake_deadline is None and ctx.handshake_timeout is not None:
                self._handshake_deadline = self.started + ctx.handshake_timeout
            return self._handshake_deadline
        if idle:
            return None if ctx.idle_timeout is None else time.monotonic() + ctx.idle_timeout
        if self._msg_deadline is None and ctx.message_timeout is not None:
            self._msg_deadline = time.monotonic() + ctx.message_timeout
        return self._msg_deadline

    def _timeout_reason(self, idle: bool) -> str:
        if self.in_handshake:
            return f"handshake not finished within {self.ctx.handshake_timeout} s"
        if idle:
            return f"idle for {self.ctx.idle_timeout} s"
        return f"request not received completely within {self.ctx.message_timeout} s (stalled payload)"

    def _fill(self, n: int, idle: bool = False) -> None:
        """Receive until at least ``n`` (<= the buffer size) unread bytes are buffered; Disconnect on
        EOF or shutdown.  Queued replies are sent before any wait for input."""
        deadline: list[float] = []
        while self._rend - self._rpos < n:
            self._flush_out()  # never wait for input with replies held back
            have = self._rend - self._rpos
            if SPIN_NS and not have and self.export is not None:
                self._spin = self._spin_wait(self._spin)
            if not self._wait_readable(idle and not have, deadline):
                raise Disconnect("server shutting down")
            if self._rpos + n > len(self._rbuf) or self._rend == len(self._rbuf):
                # move the unread bytes to the front to make room
                self._rbuf[:have] = self._rview[self._rpos:self._rend]
                self._rpos, self._rend = 0, have
            got = self.sock.recv_into(self._rview[self._rend:])
            if not got:
                raise Disconnect("peer closed the connection" + (" mid-message" if have else ""))
            self._rend += got

    def _spin_wait(self, spin: bool) -> bool:
        """Wait for the next request, busy-polling the socket for up to SPIN_NS first if ``spin``;
        return whether to spin next time.

        A request that arrives while we spin is picked up without a wake-up from idle (on a VM a
        cross-CPU wake-up costs tens of microseconds, more than serving a 4 KiB request).  Adaptive,
        like QEMU's AioContext polling: a session spins only while its client keeps sending within
        about the window (an idle or slow client costs no CPU); one session spins at a time (the
        others block); each round yields the CPU, so a client sharing it runs at once.
        """
        now = time.monotonic_ns
        start = now()
        if spin and _SPINNER.acquire(blocking=False):
            try:
                poll0 = self._busy_poll.poll
                end = start + SPIN_NS
                while True:
                    if poll0(0):
                        return True
                    if now() >= end:
                        break
                    os.sched_yield()
            finally:
                _SPINNER.release()
        self._wait_readable(True, [])  # the caller's wait then handles a shutdown
        return now() - start < 2 * SPIN_NS

    def _recv(self, n: int, idle: bool = False) -> bytes | bytearray:
        """Receive exactly ``n`` bytes; Disconnect on EOF or shutdown.  Long messages (WRITE payloads
        over 128 KiB) come back as a bytearray of their own."""
        if n > _LARGE:
            return self._recv_large(n)
        if self._rend - self._rpos < n:
            self._fill(n, idle)
        p = self._rpos
        self._rpos = p + n
        return bytes(self._rview[p:p + n])

    def _recv_large(self, n: int) -> memoryview:
        """Receive a long payload into a buffer of its own whose pages are only touched as bytes
        arrive (numpy's large allocations are lazily backed), reserving every chunk in the server's
        :class:`PayloadBudget` first: a client that announces 32 MiB and stalls pins what it sent."""
        import numpy as np
        out = np.empty(n, np.uint8)
        view = memoryview(out)
        got = min(n, self._rend - self._rpos)
        view[:got] = self._rview[self._rpos:self._rpos + got]
        self._rpos += got
        budget = self.ctx.budget
        if budget is not None:
            self._reserve(budget, got)
        deadline: list[float] = []
        while got < n:
            self._flush_out()
            if not self._wait_readable(False, deadline):
                raise Disconnect("server shutting down")
            want = min(n - got, _BUDGET_CHUNK)
            if budget is not None:
                self._reserve(budget, want)
            k = self.sock.recv_into(view[got:got + want])
            if not k:
                raise Disconnect("peer closed the connection mid-message")
            if budget is not None and k < want:
                budget.release(want - k)
                self._held -= want - k
            got += k
        return view

    def _reserve(self, budget: PayloadBudget, n: int) -> None:
        if not n:
            return
        if not budget.acquire(n, self._wait_limit(False), self.ctx.stopping):
            raise Disconnect(f"no payload budget for {n} bytes within the message deadline "
                             f"({budget.used} of {budget.limit} bytes held by other requests)")
        self._held += n

    def _send(self, *parts: bytes) -> None:
        """Queue a reply in the transmission phase (sent before the next wait for input, or at 256 KiB);
        send at once during the handshake."""
        self._out.extend(parts)
        self._outlen += sum(len(p) for p in parts)
        if self.export is None or self._outlen >= _SEND_CHUNK:
            self._flush_out()

    def _flush_out(self) -> None:
        out = self._out
        if not out:
            return
        total = self._outlen
        self._out = []
        self._outlen = 0
        if len(out) == 1:
            self.sock.sendall(out[0])
            return
        sendmsg = self.sock.sendmsg
        sent = sendmsg(out[:_IOV_MAX])
        while sent != total:
            # partial send (or more than _IOV_MAX parts): drop what went out (and empty parts),
            # resume inside the first part not fully sent (one exists: total > 0)
            total -= sent
            i = 0
            while sent >= len(out[i]):
                sent -= len(out[i])
                i += 1
            out = out[i:]
            if sent:
                out[0] = memoryview(out[0])[sent:]
            sent = sendmsg(out[:_IOV_MAX])

    # ================================================================= handshake
    def _reply(self, option: int, reply_type: int, payload: bytes = b"") -> None:
        self._send(P.encode_option_reply(option, reply_type, payload))

    def _error(self, option: int, reply_type: int, message: str) -> None:
        log.debug("nbd %s: option %d -> error %#x: %s", self.peer, option, reply_type, message)
        self._reply(option, reply_type, message.encode("utf-8", "replace")[: P.MAX_STRING])

    def _handshake(self) -> bool:
        """Run option haggling; True when the transmission phase starts."""
        self._send(P.encode_greeting(self.ctx.handshake_flags))
        self.client_flags = P.decode_client_flags(self._recv(P.CLIENT_FLAGS_SIZE), self.ctx.handshake_flags)
        handlers: dict[int, Callable[[int, bytes], bool]] = {
            P.OPT_ABORT: self._opt_abort,
            P.OPT_LIST: self._opt_list,
            P.OPT_INFO: self._opt_info_go,
            P.OPT_GO: self._opt_info_go,
            P.OPT_STRUCTURED_REPLY: self._opt_structured_reply,
            P.OPT_LIST_META_CONTEXT: self._opt_meta_context,
            P.OPT_SET_META_CONTEXT: self._opt_meta_context,
        }
        while True:
            header = P.decode_option_header(self._recv(P.OPTION_HEADER_SIZE, idle=True))
            if header.length > P.MAX_OPTION_DATA:
                raise Disconnect(f"option {header.option} carries {header.length} bytes (denial of service?)")
            data = self._recv(header.length) if header.length else b""
            if header.option == P.OPT_EXPORT_NAME:
                return self._opt_export_name(data)
            handler = handlers.get(header.option)
            if handler is None:
                self._error(header.option, P.REP_ERR_UNSUP, f"option {header.option} is not supported")
                continue
            if handler(header.option, data):
                return True

    def _open(self, name: str) -> Export:
        with self.ctx.provider.lock:
            export = self.ctx.provider.open_export(name, self.ctx.read_only)
        if self.allowed is not None and getattr(export, "name", name) not in self.allowed:
            self._release(export)
            raise NotFound(f"export {name!r} is not available on this listener")
        return export

    def _release(self, export: Export | None) -> None:
        """Call the export's optional ``close()`` hook (errors are logged, not raised)."""
        close = getattr(export, "close", None)
        if not callable(close):
            return
        try:
            with self.ctx.provider.lock:
                close()
        except Exception:
            log.exception("nbd %s: closing export %r failed", self.peer, getattr(export, "name", "?"))

    def _transmission_flags(self, export: Export) -> int:
        flags = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_CAN_MULTI_CONN
        if self.ctx.read_only or export.read_only:
            flags |= P.FLAG_READ_ONLY
        else:
            flags |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO
        if self.structured:
            flags |= P.FLAG_SEND_DF
        return flags

    def _enter(self, export: Export, name: str) -> None:
        self.export = export
        self.in_handshake = False
        self.export_read_only = self.ctx.read_only or export.read_only
        if self.contexts_export != name:
            self.contexts_export = None  # contexts were negotiated for another export
        log.info("nbd %s: serving export %r (%d bytes%s)", self.peer, export.name, export.size,
                 ", read-only" if self.export_read_only else "")

    def _opt_export_name(self, data: bytes) -> bool:
        try:
            name = P.decode_string(data, "export name")
            export = self._open(name)
        except (P.ProtocolError, ThinpoolError) as exc:
            raise Disconnect(f"NBD_OPT_EXPORT_NAME failed: {exc}") from exc  # this option cannot error
        no_zeroes = bool(self.client_flags & P.FLAG_C_NO_ZEROES)
        self._send(P.encode_export_name_reply(export.size, self._transmission_flags(export), no_zeroes))
        self._enter(export, name)
        return True

    def _opt_abort(self, option: int, data: bytes) -> bool:
        try:
            self._reply(option, P.REP_ACK)
        except OSError:
            pass  # the client may close without waiting for the ACK
        raise Disconnect("client sent NBD_OPT_ABORT")

    def _opt_list(self, option: int, data: bytes) -> bool:
        if data:
            self._error(option, P.REP_ERR_INVALID, "NBD_OPT_LIST carries no data")
            return False
        with self.ctx.provider.lock:
            names = self.ctx.provider.list_exports()
        if self.allowed is not None:
            names = [n for n in names if n in self.allowed]
        for name in names:
            self._reply(option, P.REP_SERVER, P.encode_rep_server(name))
        self._reply(option, P.REP_ACK)
        return False

    def _opt_structured_reply(self, option: int, data: bytes) -> bool:
        if data:
            self._error(option, P.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY carries no data")
            return False
        self.structured = True
        self._reply(option, P.REP_ACK)
        return False

    def _opt_info_go(self, option: int, data: bytes) -> bool:
        try:
            name, requests = P.decode_go_request(data)
        except P.ProtocolError as exc:
            self._error(option, P.REP_ERR_INVALID, str(exc))
            return False
        try:
            export = self._open(name)
        except NotFound as exc:
            self._error(option, P.REP_ERR_UNKNOWN, str(exc))
            return False
        except Exception as exc:
            log.warning("nbd %s: opening export %r failed: %s", self.peer, name, exc)
            self._error(option, P.REP_ERR_UNKNOWN, f"export {name!r} is not available: {exc}")
            return False
        self._reply(option, P.REP_INFO, P.encode_info_export(export.size, self._transmission_flags(export)))
        if P.INFO_NAME in requests:
            self._reply(option, P.REP_INFO, P.encode_info_name(export.name))
        description = getattr(export, "description", "")
        if P.INFO_DESCRIPTION in requests and description:
            self._reply(option, P.REP_INFO, P.encode_info_description(description))
        self._reply(option, P.REP_INFO, P.encode_info_block_size(1, preferred_block_size(export), P.MAX_PAYLOAD))
        self._reply(option, P.REP_ACK)
        if option == P.OPT_GO:
            self._enter(export, name)
            return True
        self._release(export)
        return False

    def _opt_meta_context(self, option: int, data: bytes) -> bool:
        setting = option == P.OPT_SET_META_CONTEXT
        if setting:
            self.contexts_export = None  # replaced even when this request fails
        if not self.structured:
            self._error(option, P.REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return False
        try:
            name, queries = P.decode_meta_context_request(data)
        except P.ProtocolError as exc:
            self._error(option, P.REP_ERR_INVALID, str(exc))
            return False
        try:
            self._release(self._open(name))
        except Exception as exc:
            self._error(option, P.REP_ERR_UNKNOWN, str(exc))
            return False
        found = False
        if not queries and not setting:
            found = True
        for query in queries:
            namespace, sep, leaf = query.partition(":")
            if not sep:
                self._error(option, P.REP_ERR_INVALID, f"metadata context query {query!r} has no namespace")
                return False
            if namespace == "base" and (leaf == "allocation" or (leaf == "" and not setting)):
                found = True
        if found:
            ctx_id = BASE_ALLOCATION_ID if setting else 0
            self._reply(option, P.REP_META_CONTEXT, P.encode_rep_meta_context(ctx_id, P.META_CONTEXT_BASE_ALLOCATION))
            if setting:
                self.contexts_export = name
        self._reply(option, P.REP_ACK)
        return False

    # ================================================================= transmission
    def _transmission(self) -> None:
        export = self.export
        assert export is not None
        stopping = self.ctx.stopping
        lock = self.ctx.provider.lock
        size = export.size
        structured = self.structured
        read_flags = _FUA | (_DF if structured else 0)
        # READs up to this length go out as one data chunk (see _read_extents): the backend says so,
        # or there is no structured reply to put holes in
        dense = (_MAX_PAYLOAD if not structured else
                 max(MIN_HOLE_CHUNK - 1, min(int(getattr(export, "dense_read_max", 0) or 0), _MAX_PAYLOAD)))
        writable = not self.export_read_only
        unpack = _REQUEST.unpack_from
        pack_simple = _SIMPLE_REPLY.pack
        pack_data = _DATA_CHUNK_HEADER.pack
        deadline: float | None = None
        while True:
            self._msg_deadline = None  # the next message gets its own deadline
            if self._held:
                self._give_back()
            if stopping.is_set():
                # Answer requests the client already sent with ESHUTDOWN, then hang up.
                deadline = deadline or time.monotonic() + self.ctx.grace
                if time.monotonic() > deadline or (self._rend == self._rpos and not self._busy_poll.poll(0)):
                    raise Disconnect("server shutting down")
            if self._rend - self._rpos < _HDR:
                self._fill(_HDR, idle=not stopping.is_set())
            magic, flags, type_, handle, offset, length = unpack(self._rbuf, self._rpos)
            if magic != _REQUEST_MAGIC:
                raise P.ProtocolError(f"bad request magic {magic:#x}")
            self._rpos += _HDR
            # fast paths: plain in-range READ and WRITE (everything else, and every error, goes
            # through _serve); the bytes on the wire are the same either way
            if type_ == _CMD_READ:
                if (0 < length <= dense and not flags & ~read_flags and offset + length <= size
                        and not stopping.is_set()):
                    try:
                        with lock:
                            data = export.pread(offset, length)
                    except Exception as exc:
                        self._failed(P.Request(flags, type_, handle, offset, length), exc)
                        continue
                    if structured:
                        self._out.append(pack_data(_STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, handle,
                                                   8 + length, offset))
                    else:
                        self._out.append(pack_simple(_SIMPLE_REPLY_MAGIC, 0, handle))
                    self._out.append(data)
                    self._outlen += length + (28 if structured else 16)
                    if self._outlen >= _SEND_CHUNK:
                        self._flush_out()
                    continue
                payload = b""
            elif type_ == _CMD_WRITE:
                if length > _MAX_PAYLOAD:
                    raise Disconnect(f"WRITE of {length} bytes exceeds {_MAX_PAYLOAD}")
                payload = self._recv(length) if length else b""
                if (writable and 0 < length and not flags & ~_FUA and offset + length <= size
                        and not stopping.is_set()):
                    try:
                        with lock:
                            export.pwrite(offset, payload)
                            if flags & _FUA:
                                export.flush()
                    except Exception as exc:
                        self._failed(P.Request(flags, type_, handle, offset, length), exc)
                        continue
                    self._out.append(pack_simple(_SIMPLE_REPLY_MAGIC, 0, handle))
                    self._outlen += 16
                    if self._outlen >= _SEND_CHUNK:
                        self._flush_out()
                    continue
            else:
                if type_ == _CMD_DISC:
                    raise Disconnect("client sent NBD_CMD_DISC")
                payload = b""
            request = P.Request(flags, type_, handle, offset, length)
            if stopping.is_set():
                self._reply_error(request, P.ESHUTDOWN, "server is shutting down")
            else:
                self._serve(request, payload)

    def _check(self, req: P.Request) -> tuple[int, str] | None:
        """Validate a request before touching the backend; (error, message) if it must fail."""
        assert self.export is not None
        allowed = _ALLOWED_FLAGS.get(req.type)
        if allowed is None:
            return P.EINVAL, f"unknown command {req.type}"
        if not self.structured:
            allowed &= ~P.CMD_FLAG_DF
        if req.flags & ~allowed:
            return P.EINVAL, f"{req.name}: unsupported command flags {req.flags & ~allowed:#x}"
        if req.type in _WRITES and self.export_read_only:
            return P.EPERM, f"{req.name}: export {self.export.name!r} is read-only"
        if req.type == P.CMD_FLUSH:
            return None
        if req.offset + req.length > self.export.size:
            err = P.ENOSPC if req.type in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            return err, (f"{req.name}: offset {req.offset} + length {req.length} "
                         f"is beyond the export's {self.export.size} bytes")
        if req.type == P.CMD_READ and req.length > P.MAX_PAYLOAD:
            return P.EINVAL, f"READ of {req.length} bytes exceeds the {P.MAX_PAYLOAD}-byte maximum"
        if req.type == P.CMD_BLOCK_STATUS:
            if not self.structured or self.contexts_export is None:
                return P.EINVAL, "BLOCK_STATUS needs a negotiated metadata context"
            if req.length == 0:
                return P.EINVAL, "BLOCK_STATUS of length 0"
        if (req.type == P.CMD_WRITE_ZEROES and req.flags & P.CMD_FLAG_FAST_ZERO
                and req.flags & P.CMD_FLAG_NO_HOLE):
            return P.ENOTSUP, "fast zero with NO_HOLE is no faster than a write"
        return None

    def _serve(self, req: P.Request, payload: bytes) -> None:
        problem = self._check(req)
        if problem is not None:
            self._reply_error(req, *problem)
            return
        export = self.export
        assert export is not None
        fua = bool(req.flags & P.CMD_FLAG_FUA) and req.type in _WRITES
        data = b""
        extents: list[tuple[int, int]] | None = None
        status: list[tuple[int, int]] = []
        try:
            with self.ctx.provider.lock:
                if req.type == P.CMD_READ:
                    data = export.pread(req.offset, req.length) if req.length else b""
                    extents = self._read_extents(export, req)
                elif req.type == P.CMD_WRITE:
                    if payload:
                        export.pwrite(req.offset, payload)
                elif req.type == P.CMD_FLUSH:
                    export.flush()
                elif req.type == P.CMD_TRIM:
                    if req.length:
                        export.trim(req.offset, req.length)
                elif req.type == P.CMD_WRITE_ZEROES:
                    if req.length:
                        export.write_zeroes(req.offset, req.length, may_trim=not req.flags & P.CMD_FLAG_NO_HOLE)
                elif req.type == P.CMD_BLOCK_STATUS:
                    status = list(export.extents(req.offset, req.length))
                if fua:
                    export.flush()
        except Exception as exc:
            self._failed(req, exc)
            return
        if req.type == P.CMD_READ:
            self._reply_read(req, data, extents)
        elif req.type == P.CMD_BLOCK_STATUS:
            descriptors = clip_extents(status, req.length, bool(req.flags & P.CMD_FLAG_REQ_ONE))
            self._send(P.encode_block_status(req.handle, BASE_ALLOCATION_ID, descriptors))
        else:
            self._send(P.encode_simple_reply(req.handle))

    def _failed(self, req: P.Request, exc: Exception) -> None:
        """Log a backend failure and send the error reply (called from inside an ``except``)."""
        err = nbd_error_for(exc)
        if err == P.EIO:
            log.exception("nbd %s: %s offset=%d length=%d failed", self.peer, req.name, req.offset, req.length)
        else:
            log.warning("nbd %s: %s offset=%d length=%d failed: %s", self.peer, req.name,
                        req.offset, req.length, exc)
        self._reply_error(req, err, str(exc) or type(exc).__name__)

    def _read_extents(self, export: Export, req: P.Request) -> list[tuple[int, int]] | None:
        """Zero/data runs for a structured READ, or None to send one plain data chunk."""
        if not self.structured or req.flags & P.CMD_FLAG_DF or req.length < MIN_HOLE_CHUNK:
            return None
        try:
            runs = P.coalesce_extents(
                (n, P.STATE_ZERO if f & P.STATE_ZERO else 0) for n, f in export.extents(req.offset, req.length)
            )
        except Exception as exc:  # an allocation query failure must not fail the read
            log.debug("nbd %s: extents for READ failed, sending plain data: %s", self.peer, exc)
            return None
        if sum(n for n, _ in runs) != req.length:
            return None
        return runs

    def _reply_read(self, req: P.Request, data: bytes, runs: list[tuple[int, int]] | None) -> None:
        if not self.structured:
            self._send(P.encode_simple_reply(req.handle), data)
            return
        if not data:
            self._send(P.encode_done(req.handle))
            return
        if runs is None:
            runs = [(len(data), 0)]
        # fold holes too short to be worth a chunk into their data neighbours
        runs = P.coalesce_extents((n, f if n >= MIN_HOLE_CHUNK else 0) for n, f in runs)
        pos = 0
        for i, (length, flags) in enumerate(runs):
            last = i == len(runs) - 1
            offset = req.offset + pos
            if flags & P.STATE_ZERO:
                self._send(P.encode_offset_hole(req.handle, offset, length, done=last))
            else:
                chunk = data[pos : pos + length]
                self._send(P.encode_offset_data_header(req.handle, offset, length, done=last), chunk)
            pos += length

    def _reply_error(self, req: P.Request, error: int, message: str) -> None:
        log.debug("nbd %s: %s -> error %d: %s", self.peer, req.name, error, message)
        if self.structured:
            self._send(P.encode_error_chunk(req.handle, error, message))
        else:
            self._send(P.encode_simple_reply(req.handle, error))


def preferred_block_size(export: Export) -> int:
    """The NBD preferred block size for an export: a power of two in [512, 32 MiB].

    Thin pool block sizes are multiples of 64 KiB but need not be powers of two, so
    this is the largest power of two that divides the export's block size.
    """
    bs = max(int(export.block_size), 1)
    pref = bs & -bs
    return min(max(pref, 512), P.MAX_PAYLOAD)


def clip_extents(extents: list[tuple[int, int]], length: int, req_one: bool) -> list[tuple[int, int]]:
    """Sanitise a backend's extents for a BLOCK_STATUS reply.

    Merges equal neighbours, drops empty runs, stops at ``length`` bytes, caps the
    descriptor count, and falls back to one "allocated, unknown content" extent if
    the backend gave nothing usable.
    """
    out: list[tuple[int, int]] = []
    total = 0
    for n, flags in P.coalesce_extents(extents):
        n = min(n, length - total)
        if n <= 0:
            break
        out.append((n, flags & (P.STATE_HOLE | P.STATE_ZERO)))
        total += n
        if req_one or len(out) >= MAX_EXTENTS:
            break
    return out or [(length, 0)]
