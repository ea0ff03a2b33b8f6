"""One NBD client connection: fixed newstyle handshake, then the transmission phase.

A :class:`Session` runs in its own thread (started by :class:`~thinpool.nbd.server.NBDServer`).
It never raises: protocol violations, vanished peers and backend failures end in a clean
disconnect or an NBD error reply, and are logged.  Every call into the backend is made
while holding the provider's ``lock``.

This module holds the connection itself -- its lifecycle, the batched socket I/O with its timeouts,
and the transmission loop with the fast path for plain READs and WRITEs; the option haggling is
:mod:`thinpool.nbd.handshake`, the other requests and their replies :mod:`thinpool.nbd.requests`.
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

import numpy as np

from thinpool.nbd import protocol as P
from thinpool.nbd.backend import Export, ExportProvider, Payload
from thinpool.nbd.handshake import Handshake
from thinpool.nbd.limits import PayloadBudget
from thinpool.nbd.protocol import Disconnect
from thinpool.nbd.readloop import CompiledReads
from thinpool.nbd.requests import MIN_HOLE_CHUNK, RequestHandling

log = logging.getLogger("thinpool.nbd")


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
    #: one int64, set non-zero with ``stopping`` (the compiled loop reads it after every receive)
    stop_flag: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))


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
#: a busy-poll's sched_yield longer than this gave the CPU (or the GIL) to someone else
CONTENDED_NS = 30_000
#: after such a round a session blocks without busy-polling for this long
SPIN_BACKOFF_NS = 100_000_000
#: sessions in the transmission phase right now (a session busy-polls only while it is the only one;
#: an array: the compiled read loop reads it too)
_transmitting = np.zeros(1, np.int64)
_transmitting_lock = threading.Lock()

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
#: after the compiled loop handed a WRITE back, this many WRITEs at the head skip it (see _transmit)
_SKIP_WRITES = 16
_FR_OTHER, _FR_STOP, _FR_IDLE = 1, 4, 5  # kernels_nbd.FR_OTHER, FR_STOP, FR_IDLE (kept here: importing kernels_nbd loads numba)


class Session(Handshake, RequestHandling):
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
        self._hup_poll = select.poll()  # the peer closed or reset the connection (POLLHUP/POLLERR always)
        self._hup_poll.register(sock, select.POLLRDHUP)
        # batched socket I/O: one recv takes many pipelined requests; replies are queued and sent
        # with one sendmsg before the session would block for input (so it can never deadlock).
        # Received bytes not consumed yet are _rbuf[_rpos:_rend].
        self._rbuf = bytearray(_RECV_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self._out: list[bytes | memoryview] = []  # replies queued (a part sent in part: a view of the rest)
        self._outlen = 0
        self._spin = SPIN_NS > 0
        self._spin_backoff = 0  # monotonic ns before which this session does not busy-poll
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

    def _gone(self) -> bool:
        """Whether this connection's peer has hung up (or the server is stopping): a request the export
        holds -- a write queued for data space -- is then given up."""
        if self.ctx.stopping.is_set():
            return True
        try:
            return bool(self._hup_poll.poll(0))
        except (OSError, ValueError):
            return True

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
            if SPIN_NS and idle and not have and self.export is not None:
                # between requests only: a wait inside a message (a WRITE payload not started yet) is
                # bounded by the message deadline, which the spin-wait's idle wait does not apply
                self._spin, readable = self._spin_wait(self._spin)
            else:
                readable = False
            # (a socket the spin-wait found readable needs no second poll; otherwise this wait also
            # handles a shutdown)
            if not readable and not self._wait_readable(idle and not have, deadline):
                raise Disconnect("server shutting down")
            if self._rpos + n > len(self._rbuf) or self._rend == len(self._rbuf):
                # move the unread bytes to the front to make room
                self._rbuf[:have] = self._rview[self._rpos:self._rend]
                self._rpos, self._rend = 0, have
            got = self.sock.recv_into(self._rview[self._rend:])
            if not got:
                raise Disconnect("peer closed the connection" + (" mid-message" if have else ""))
            self._rend += got

    def _spin_wait(self, spin: bool) -> tuple[bool, bool]:
        """Wait for the next request, busy-polling the socket for up to SPIN_NS first if ``spin``;
        return (whether to spin next time, whether the socket is readable now -- False also when the
        wait ended because the server is stopping).

        A request that arrives while we spin is picked up without a wake-up from idle (on a VM a
        cross-CPU wake-up costs tens of microseconds, more than serving a 4 KiB request).  Adaptive,
        like QEMU's AioContext polling: a session spins only while its client keeps sending within
        about the window (an idle or slow client costs no CPU); one session spins at a time, and only
        while it is the only connection in the transmission phase (with two, the spinner's GIL
        hand-overs would delay the other connection's requests); each round yields the CPU, so a
        client sharing it runs at once -- and a yield that took longer than CONTENDED_NS (another task
        wanted this CPU, or another thread the GIL) ends the spinning for SPIN_BACKOFF_NS when no request
        came meanwhile, or when it took longer than the whole window (the request then waited for that
        task's time slice, where a blocked session is woken at once): on a busy machine spinning only
        burns the CPU time the server needs for serving.
        """
        now = time.monotonic_ns
        start = now()
        if spin and start >= self._spin_backoff and _transmitting[0] == 1 and _SPINNER.acquire(blocking=False):
            try:
                poll0 = self._busy_poll.poll
                end = start + SPIN_NS
                while True:
                    if poll0(0):
                        return True, True
                    t = now()
                    if t >= end:
                        break
                    os.sched_yield()
                    took = now() - t
                    if took > CONTENDED_NS:
                        # another task (or thread) ran: back off if no request came meanwhile, or if it
                        # held the CPU longer than the whole window -- the request then waited for that
                        # task's time slice, where the wait below would have been woken at once
                        readable = bool(poll0(0))
                        if not readable or took > SPIN_NS:
                            self._spin_backoff = now() + SPIN_BACKOFF_NS
                        if readable:
                            return True, True
                        break
            finally:
                _SPINNER.release()
        readable = self._wait_readable(True, [])  # False: stopping (the caller's wait handles that)
        return now() - start < 2 * SPIN_NS, readable

    def _recv(self, n: int, idle: bool = False) -> bytes:
        """Receive exactly ``n`` bytes; Disconnect on EOF or shutdown.  Through the session's ring up to
        128 KiB (handshake messages, option data, short WRITE payloads); a longer message through
        :meth:`_recv_large` (the transmission loop calls that itself for a long WRITE payload, whose
        view it keeps instead of a copy)."""
        if n > _LARGE:
            return bytes(self._recv_large(n))
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
        view = out.data
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

    # ================================================================= transmission
    def _compiled_head(self, writes: bool) -> bool:
        """Whether the request at the head of the buffer (a whole header is there) is one the compiled
        loop may serve: a READ, or -- with ``writes`` -- a WRITE (the loop checks the rest)."""
        rbuf = self._rbuf
        p = self._rpos
        return not rbuf[p + 6] and (not rbuf[p + 7] or (writes and rbuf[p + 7] == _CMD_WRITE))

    def _handed_back_plain_write(self) -> bool:
        """Whether the compiled loop stopped at a WRITE without flags (one it could not do in place:
        the next ones at the head skip it for a while -- a FUA write says nothing about them)."""
        rbuf = self._rbuf
        p = self._rpos
        return (self._rend - p >= _HDR and not (rbuf[p + 4] or rbuf[p + 5] or rbuf[p + 6])
                and rbuf[p + 7] == _CMD_WRITE)

    def _transmission(self) -> None:
        with _transmitting_lock:
            _transmitting[0] += 1
        compiled = None
        try:
            compiled = CompiledReads.open(self)
            self._transmit(compiled)
        finally:
            with _transmitting_lock:
                _transmitting[0] -= 1
            if compiled is not None:
                compiled.close()

    def _transmit(self, compiled: CompiledReads | None = None) -> None:
        """The transmission loop.  With ``compiled`` (:mod:`thinpool.nbd.readloop`), plain READs and
        in-place WRITEs are served by the compiled loop without the GIL; it returns here for every
        other request."""
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
        rbuf = self._rbuf
        compiled_waits = False  # whether the compiled loop waits for the next request (after READs)
        # a plain WRITE the compiled loop handed back (not in place: a first write, copy-on-write ...)
        # makes the next _SKIP_WRITES WRITEs at the head go straight to this loop
        wskip = 0
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
            if compiled is not None and not stopping.is_set() and (
                    self._compiled_head(writable and not wskip) if self._rend - self._rpos >= _HDR
                    else compiled_waits):
                # a READ (or WRITE) at the head, or nothing yet after such requests: the compiled loop
                # serves them until a request for this loop (or a wait it leaves to it)
                self._flush_out()
                code = compiled.run(SPIN_NS, CONTENDED_NS, SPIN_BACKOFF_NS, _transmitting,
                                    structured, read_flags, dense, size, writable)
                if code is None:
                    compiled.close()
                    compiled = None
                elif code == _FR_IDLE:
                    raise Disconnect(self._timeout_reason(True))
                elif code == _FR_STOP:
                    continue  # the stopping checks above
                elif code == _FR_OTHER and self._handed_back_plain_write():
                    wskip = _SKIP_WRITES
                # stopped at a request for this loop: wait here for the next one (a connection whose
                # requests the loop hands back does not go through it for every request)
                compiled_waits = code != _FR_OTHER
            if self._rend - self._rpos < _HDR:
                self._fill(_HDR, idle=not stopping.is_set())
                if compiled is not None and self._compiled_head(writable and not wskip):
                    compiled_waits = True  # a request for the compiled loop again
                    continue
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
                payload: Payload = b""
            elif type_ == _CMD_WRITE:
                if wskip:
                    wskip -= 1
                if length > _MAX_PAYLOAD:
                    raise Disconnect(f"WRITE of {length} bytes exceeds {_MAX_PAYLOAD}")
                # a long payload: a view of the buffer it was received into
                payload = (self._recv_large(length) if length > _LARGE else self._recv(length)) if length else b""
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
