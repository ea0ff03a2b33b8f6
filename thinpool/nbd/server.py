"""The NBD server: listening sockets, one thread per client, clean shutdown.

Usage::

    server = NBDServer(provider, unix_path="/run/thinpool/pool.sock")
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    server.serve_forever()

or, in tests, ``with NBDServer(provider, unix_path=p) as server: ...`` which serves
from a background thread and shuts down on exit.

The server listens on a unix socket by default (a private temporary one when no
path is given) and on TCP only when ``tcp=(host, port)`` is passed; an empty host
means ``127.0.0.1``.  :meth:`NBDServer.shutdown` stops accepting, lets requests
already received finish (later ones get ``ESHUTDOWN``), disconnects every client
and finally calls the provider's ``close()`` if it has one.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from types import TracebackType
from typing import Iterable

from thinpool.errors import AlreadyExists, InvalidArgument
from thinpool.nbd.backend import ExportProvider
from thinpool.nbd import protocol as P
from thinpool.nbd.limits import PayloadBudget
from thinpool.nbd.session import Session, SessionContext
from thinpool.unixsock import claim_unix_path, listen_private

log = logging.getLogger("thinpool.nbd")

DEFAULT_TCP_HOST = "127.0.0.1"
NBD_PORT = 10809
#: seconds a client has from connecting to the end of option haggling
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: seconds a request may take to arrive completely once it started (a stalled WRITE payload)
DEFAULT_MESSAGE_TIMEOUT = 30.0
#: large WRITE payload bytes buffered at once over all connections (4 maximal payloads)
DEFAULT_PAYLOAD_BUDGET = 4 * P.MAX_PAYLOAD


class NBDServer:
    """Serve a provider's exports over NBD (fixed newstyle) to several clients at once.

    The listening sockets are bound in the constructor, so clients may connect as
    soon as it returns; they are accepted once :meth:`serve_forever` runs.
    """

    def __init__(
        self,
        provider: ExportProvider,
        unix_path: str | os.PathLike[str] | None = None,
        tcp: tuple[str | None, int] | None = None,
        read_only: bool = False,
        *,
        max_clients: int = 64,
        shutdown_grace: float = 5.0,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = None,
        message_timeout: float | None = DEFAULT_MESSAGE_TIMEOUT,
        payload_budget: int | None = DEFAULT_PAYLOAD_BUDGET,
        tcp_exports: Iterable[str] | None = None,
    ) -> None:
        if max_clients < 1:
            raise InvalidArgument(f"max_clients must be at least 1, got {max_clients}")
        for what, value in (("handshake_timeout", handshake_timeout), ("idle_timeout", idle_timeout),
                            ("message_timeout", message_timeout)):
            if value is not None and not value > 0:
                raise InvalidArgument(f"nbd: {what} must be a positive number of seconds or None, got {value!r}")
        if payload_budget is not None and payload_budget < P.MAX_PAYLOAD:
            raise InvalidArgument(f"nbd: payload_budget must be at least one maximal payload "
                                  f"({P.MAX_PAYLOAD} bytes), got {payload_budget}")
        #: export names TCP connections may list and open (None: every export)
        self.tcp_exports = None if tcp_exports is None else frozenset(tcp_exports)
        self.provider = provider
        self.read_only = read_only
        self.max_clients = max_clients
        self.shutdown_grace = shutdown_grace
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._serving = threading.Event()
        self._serve_thread: threading.Thread | None = None
        self._lock = threading.RLock()  # re-entrant: shutdown() may run in a signal handler
        # held while the listeners close and their socket and directory go: whichever thread closes
        # them (shutdown() or the serving thread), the other waits until it is done (re-entrant: as above)
        self._close_lock = threading.RLock()
        self._sessions: dict[Session, threading.Thread] = {}
        self._listeners: list[socket.socket] = []
        self._shutdown_started = False
        self._closed_io = False
        self._connections = 0
        #: connections evicted to make room (see _accept)
        self.evictions = 0
        self._tempdir: str | None = None
        self.unix_path: str | None = None
        self.tcp_address: tuple[str, int] | None = None
        self._wake_r, self._wake_w = os.pipe()
        # Signals wake the serving loop through their own pipe (signal.set_wakeup_fd): a SIGTERM the
        # kernel delivers to a session thread must not wait for the main thread's poll to return.
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if unix_path is None and tcp is None:
                self._tempdir = tempfile.mkdtemp(prefix="thinpool-nbd-")
                unix_path = os.path.join(self._tempdir, "nbd.sock")
            if unix_path is not None:
                self._listen_unix(os.fspath(unix_path))
            if tcp is not None:
                self._listen_tcp(tcp)
        except BaseException:
            self._close_io()
            raise
        self._ctx = SessionContext(
            provider=provider,
            read_only=read_only,
            stopping=self._stopping,
            wake_fd=self._wake_r,
            grace=shutdown_grace,
            handshake_timeout=handshake_timeout,
            idle_timeout=idle_timeout,
            message_timeout=message_timeout,
            budget=None if payload_budget is None else PayloadBudget(payload_budget),
        )

    # ================================================================= listening
    def _listen_unix(self, path: str) -> None:
        claim_unix_path(path, "nbd: socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listen_private(sock, path, self.max_clients)  # mode 0600 from the start: full access to the volumes
        except BaseException:
            sock.close()
            raise
        self._listeners.append(sock)
        self.unix_path = path

    def _listen_tcp(self, tcp: tuple[str | None, int]) -> None:
        host, port = tcp
        host = host or DEFAULT_TCP_HOST
        if not 0 <= int(port) <= 65535:
            raise InvalidArgument(f"nbd: TCP port {port} out of range")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, int(port)), family=family, backlog=self.max_clients)
        self._listeners.append(sock)
        addr = sock.getsockname()
        self.tcp_address = (addr[0], addr[1])

    @property
    def uri(self) -> str:
        """An NBD URI for the default export (unix socket preferred)."""
        if self.unix_path is not None:
            return f"nbd+unix:///?socket={self.unix_path}"
        assert self.tcp_address is not None
        return f"nbd://{self.tcp_address[0]}:{self.tcp_address[1]}/"

    def export_uri(self, name: str) -> str:
        """An NBD URI naming export ``name``."""
        if self.unix_path is not None:
            return f"nbd+unix:///{name}?socket={self.unix_path}"
        assert self.tcp_address is not None
        return f"nbd://{self.tcp_address[0]}:{self.tcp_address[1]}/{name}"

    @property
    def active_clients(self) -> int:
        """Connections being served right now."""
        with self._lock:
            return len(self._sessions)

    @property
    def total_connections(self) -> int:
        """Connections accepted since the server started."""
        return self._connections

    # ================================================================= serving
    def serve_forever(self) -> None:
        """Accept and serve clients until :meth:`shutdown` is called."""
        if self._stopping.is_set():
            return
        self._serve_thread = threading.current_thread()
        self._serving.set()
        poller = select.poll()
        by_fd = {s.fileno(): s for s in self._listeners}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        poller.register(self._sig_r, select.POLLIN)
        old_wakeup = None
        if threading.current_thread() is threading.main_thread():
            old_wakeup = signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        where = ", ".join(filter(None, [self.unix_path, self.tcp_address and "%s:%d" % self.tcp_address]))
        log.info("nbd: serving on %s%s", where, " (read-only)" if self.read_only else "")
        try:
            while not self._stopping.is_set():
                for fd, _ in poller.poll():
                    if self._stopping.is_set():
                        break
                    if fd == self._sig_r:  # a signal arrived: its Python handler runs as the poll returns
                        try:
                            os.read(self._sig_r, 4096)
                        except OSError:
                            pass
                        continue
                    listener = by_fd.get(fd)
                    if listener is not None:
                        self._accept(listener)
        except KeyboardInterrupt:  # default SIGINT handling: still shut down cleanly
            self.shutdown()
            raise
        finally:
            if old_wakeup is not None:
                signal.set_wakeup_fd(old_wakeup)
            self._serving.clear()
            if self._shutdown_started:
                self._close_listeners()
            if self._stopped.is_set():
                self._close_io()

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, addr = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("nbd: accept failed: %s", exc)
                time.sleep(0.05)
            return
        conn.setblocking(True)
        allowed = None
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a vanished peer ends its session
            peer = "%s:%d" % addr[:2]
            allowed = self.tcp_exports
        else:
            peer = f"unix#{self._connections}"
        with self._lock:
            live = [s for s in self._sessions if not s.evicted]
            if len(live) >= self.max_clients:
                # full: make room by evicting the oldest connection still in its handshake (idle or
                # half-open connections cannot starve a real client); refuse if all are serving
                waiting = [s for s in live if s.in_handshake]
                if not waiting:
                    log.warning("nbd: refusing %s: %d clients already connected", peer, self.max_clients)
                    conn.close()
                    return
                oldest = min(waiting, key=lambda s: s.started)
                log.warning("nbd: %d clients connected; evicting %s (still in its handshake after %.1f s) "
                            "for %s", self.max_clients, oldest.peer, time.monotonic() - oldest.started, peer)
                oldest.evicted = True
                oldest.abort()
                self.evictions += 1
            self._connections += 1
            session = Session(conn, self._ctx, peer, allowed)
            thread = threading.Thread(target=self._run_session, args=(session,), name=f"nbd-{peer}", daemon=True)
            self._sessions[session] = thread
        if self._stopping.is_set():  # shutdown() ran (e.g. from a signal handler) meanwhile
            with self._lock:
                self._sessions.pop(session, None)
            conn.close()
            return
        log.debug("nbd: client %s connected", peer)
        thread.start()

    def _run_session(self, session: Session) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.pop(session, None)
            log.debug("nbd: client %s gone", session.peer)

    def start(self) -> threading.Thread:
        """Run :meth:`serve_forever` in a daemon thread and return that thread."""
        thread = threading.Thread(target=self.serve_forever, name="nbd-server", daemon=True)
        thread.start()
        self._serving.wait(5.0)
        return thread

    def __enter__(self) -> NBDServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

    # ================================================================= shutdown
    def shutdown(self) -> None:
        """Stop accepting, finish in-flight requests, disconnect everyone, close the provider.

        Idempotent; safe to call from another thread or from a signal handler running
        in the thread that is inside :meth:`serve_forever`.
        """
        with self._lock:
            if self._shutdown_started:
                first = False
            else:
                self._shutdown_started = first = True
        if not first:
            if threading.current_thread() is not self._serve_thread:
                self._stopped.wait(self.shutdown_grace + 10.0)
            return
        log.info("nbd: shutting down")
        self._stopping.set()
        self._ctx.stop_flag[0] = 1
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        in_serve_thread = threading.current_thread() is self._serve_thread
        if self._serving.is_set() and not in_serve_thread:
            deadline = time.monotonic() + 5.0
            while self._serving.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        # In the serving thread (a signal handler interrupted its poll) closing is safe too:
        # the retried poll sees the wake pipe, and closed listeners only report POLLNVAL.
        self._close_listeners()
        # Let sessions finish what they already received.
        deadline = time.monotonic() + self.shutdown_grace
        for thread in self._session_threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = list(self._sessions)
        for session in stuck:
            log.warning("nbd: client %s did not finish in time, disconnecting it", session.peer)
            session.abort()
        for thread in self._session_threads():
            thread.join(2.0)
        close = getattr(self.provider, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.exception("nbd: provider close() failed")
        if not self._serving.is_set():
            self._close_io()
        self._stopped.set()
        log.info("nbd: stopped")

    def _session_threads(self) -> list[threading.Thread]:
        with self._lock:
            return [t for t in self._sessions.values() if t.is_alive() and t is not threading.current_thread()]

    def _close_listeners(self) -> None:
        """Close the listening sockets, remove the unix socket and the private directory; a second
        caller returns only when the first is done (shutdown() must not return before the removal)."""
        with self._close_lock:
            with self._lock:
                listeners, self._listeners = self._listeners, []
            for sock in listeners:
                try:
                    sock.close()
                except OSError:
                    pass
            if self.unix_path is not None and listeners:
                try:
                    os.unlink(self.unix_path)
                except OSError:
                    pass
            if self._tempdir is not None and listeners:
                shutil.rmtree(self._tempdir, ignore_errors=True)

    def _close_io(self) -> None:
        self._close_listeners()
        with self._lock:
            if self._closed_io or self._sessions:
                return  # a session stuck past abort() may still poll the wake pipe
            self._closed_io = True
        for fd in (self._wake_r, self._wake_w, self._sig_r, self._sig_w):
            try:
                os.close(fd)
            except OSError:
                pass
