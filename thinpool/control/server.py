"""The control socket's server: answer control requests for a served pool.

:class:`ControlServer` listens on ``<pool>/control.sock`` (mode 0600: the socket grants every op in its
table); each connection sends one request line and gets one reply line (:mod:`thinpool.control.protocol`).
The server does not know any op itself: its caller GIVES it the op table, a mapping from op name to an
object with the :class:`ControlOp` attributes (the CLI passes its registry, so a served pool answers the
same ops as the command line).  :func:`handle_request` answers one line; it never raises.

Each request, in order: decode the line; look the op up (InvalidArgument if unknown); refuse an op that
streams through the client's files (``local_only``: FailedPrecondition); type-check the arguments
against the op's signature (:func:`thinpool.control.args.check_op_args`); then, holding the pool's lock
(atomic with respect to NBD I/O), run the caller's ``precheck(op_name, args)`` if any, and run the op
-- a write op inside one :meth:`~thinpool.pool.Pool.batch`: its messages commit once, before the
reply (dm-thin commits after every pool message), and a failed op is aborted, changing nothing.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable, Mapping, Protocol

from thinpool.errors import FailedPrecondition, InvalidArgument
from thinpool.unixsock import claim_unix_path, listen_private, remove_socket

from .args import check_op_args
from .protocol import MAX_REQUEST, decode_request, encode_error, encode_result, error_reply

#: seconds a control client may take to send its request line (from connecting; the CLI sends at once)
CONTROL_TIMEOUT = 60.0
#: control connections handled at once; when full, the oldest connection that has not sent its
#: request yet is dropped to make room (idle connections cannot lock the CLI out)
MAX_CONTROL_CLIENTS = 64

log = logging.getLogger("thinpool.serve")

#: ``precheck(op_name, args)``: raises to refuse a request (arguments already type-checked)
Precheck = Callable[[str, dict[str, Any]], None]


class ControlOp(Protocol):
    """What the server needs of an op in its table (it only reads them: a frozen record will do)."""

    @property
    def name(self) -> str:
        """The op's name (the CLI verb)."""

    @property
    def func(self) -> Callable[..., Any]:
        """``func(pool, **args) -> JSON-able result``."""

    @property
    def write(self) -> bool:
        """True if the op modifies the pool (it is committed before the reply)."""

    @property
    def local_only(self) -> bool:
        """True if the op streams data through the client's files (refused over the socket)."""


def handle_request(pool: Any, ops: Mapping[str, ControlOp], line: bytes,
                   precheck: Precheck | None = None) -> bytes:
    """Answer one control request ``line`` for a served ``pool`` with the ops of ``ops``; returns one
    JSON reply line (with ``\\n``).  Never raises for a bad request or a failing op: errors become
    ``{"ok": false, ...}`` replies (see the module docstring for the order of checks)."""
    try:
        name, args = decode_request(line)
        spec = ops.get(name)
        if spec is None:
            raise InvalidArgument(f"unknown op {name[:80]!r} (known: {', '.join(sorted(ops))})")
        if spec.local_only:
            raise FailedPrecondition(f"'{spec.name}' streams data and is not available while the pool is "
                                     f"served; use the volume's NBD export")
        check_op_args(spec.name, spec.func, args)
        with pool.locked():
            if precheck is not None:
                precheck(spec.name, args)
            if spec.write:
                with pool.batch():  # one commit for the op; a failure drops what it did
                    result = spec.func(pool, **args)
            else:
                result = spec.func(pool, **args)
        return encode_result(result)
    except Exception as exc:  # a ThinpoolError keeps its class; a bug must not kill the serving process
        return encode_error(exc)


class ControlServer:
    """``<pool>/control.sock``: one JSON request line per connection, one reply line, then close.

    ``ops`` is the op table (op name -> :class:`ControlOp`), ``precheck`` an optional check run under
    the pool's lock before each op (the NBD server refuses to delete volumes open over NBD there).
    Each connection is handled in its own thread (a client that connects and sends nothing -- a
    liveness probe -- costs nothing and blocks no one); at most ``max_clients`` at once, and a client
    has ``timeout`` seconds to send its request.  :meth:`stop` closes the listener, waits for requests
    in progress and removes the socket file.
    """

    def __init__(self, pool: Any, ops: Mapping[str, ControlOp], path: str, *, precheck: Precheck | None = None,
                 timeout: float = CONTROL_TIMEOUT, max_clients: int = MAX_CONTROL_CLIENTS) -> None:
        self.pool = pool
        self.ops = ops
        self.precheck = precheck
        self.path = path
        self.timeout = timeout
        self.max_clients = max_clients
        self._stopping = threading.Event()
        #: connection thread -> [socket, accepted at (monotonic), still reading its request]
        self._threads: dict[threading.Thread, list[Any]] = {}
        self._tlock = threading.Lock()
        self.requests = 0
        self.evictions = 0
        claim_unix_path(path, "control socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listen_private(self.sock, path, 64)  # 0600 from the start: the socket grants every pool op
        except BaseException:
            self.sock.close()
            raise
        self._thread = threading.Thread(target=self._accept_loop, name="thinpool-control", daemon=True)

    def start(self) -> None:
        """Accept connections from a background thread."""
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            if self._stopping.is_set():
                conn.close()
                return
            t = threading.Thread(target=self._serve_one, args=(conn,), name="thinpool-control-req", daemon=True)
            with self._tlock:
                if len(self._threads) >= self.max_clients:
                    reading = [(info[1], info[0]) for info in self._threads.values() if info[2]]
                    if not reading:
                        log.warning("control: %d requests in progress, refusing a connection", len(self._threads))
                        conn.close()
                        continue
                    _, victim = min(reading, key=lambda r: r[0])
                    log.warning("control: %d connections; dropping the oldest one that sent no request yet",
                                len(self._threads))
                    self.evictions += 1
                    try:
                        victim.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                self._threads[t] = [conn, time.monotonic(), True]
            t.start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            line = recv_request_line(conn, time.monotonic() + self.timeout)
            with self._tlock:
                info = self._threads.get(threading.current_thread())
                if info is not None:
                    info[2] = False  # no longer evictable: its request runs
            if line is None or not line.strip():
                return  # a liveness probe (connect and close), or nothing useful: no-op
            conn.settimeout(self.timeout)  # for sending the reply
            if self._stopping.is_set():
                reply = error_reply("FailedPrecondition", f"pool {self.pool.path}: the serving process is "
                                                          f"shutting down")
            else:
                reply = self.handle(line)
            conn.sendall(reply)
        except OSError as exc:
            log.debug("control: client error: %s", exc)
        except Exception:  # never let a request kill the serving process
            log.exception("control: internal error")
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self._tlock:
                self._threads.pop(threading.current_thread(), None)

    def handle(self, line: bytes) -> bytes:
        """Answer one request line with :func:`handle_request` (the arguments are type-checked before
        the precheck runs, so it sees well-typed arguments)."""
        with self.pool.locked():
            self.requests += 1
            return handle_request(self.pool, self.ops, line, precheck=self.precheck)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in progress finish, remove the socket file (idempotent)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._tlock:
            pending = list(self._threads)
            for conn, _, reading in self._threads.values():
                if reading:  # no request yet: nothing to finish
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        for t in pending:
            t.join(timeout)
        remove_socket(self.path)


def recv_request_line(conn: socket.socket, deadline: float, limit: int = MAX_REQUEST) -> bytes | None:
    """One request line (without the newline); None on EOF before any byte or when ``deadline``
    (monotonic) passes first (a client that connects and sends nothing, or dribbles).  Past ``limit``
    bytes the part read so far is returned (it is then rejected as invalid JSON)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.info("control: no request line within the timeout; closing the connection")
            return None
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            return b"".join(chunks) if chunks else None
        nl = chunk.find(b"\n")
        if nl >= 0:
            chunks.append(chunk[:nl])
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            return b"".join(chunks)


__all__ = ["CONTROL_TIMEOUT", "MAX_CONTROL_CLIENTS", "ControlOp", "Precheck", "handle_request", "ControlServer",
           "recv_request_line"]
