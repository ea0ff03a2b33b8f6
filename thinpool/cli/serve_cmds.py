"""``thinpool serve``: serve a pool's thin volumes over NBD, and its control socket for the CLI.

While a pool is served, the serving process holds the pool (its exclusive lock); other ``thinpool``
commands reach it through ``<pool>/control.sock`` (see :mod:`thinpool.cli.ops`): one JSON request line
per connection, answered by :func:`~thinpool.cli.ops.handle_control_request` under the pool's lock.
NBD requests run under the same lock, so a ``thinpool snapshot`` taken while a client writes is a
point-in-time image of every request completed before it (of every flushed one after a crash).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from typing import Any

import click

from .common import abspath, pool_argument

SECTION = "Serving (NBD block devices)"

NBD_SOCKET = "nbd.sock"
#: AF_UNIX path limit (sun_path is 108 bytes including the NUL)
MAX_UNIX_PATH = 107
#: seconds a control client may take to send its request line (from connecting; the CLI sends at once)
CONTROL_TIMEOUT = 60.0
#: control connections handled at once; when full, the oldest connection that has not sent its
#: request yet is dropped to make room (idle connections cannot lock the CLI out)
MAX_CONTROL_CLIENTS = 64
#: control ops that delete volumes: refused for volumes a client has open (dm-thin's EBUSY)
_DELETING_OPS = ("delete", "remove-snapshot")

log = logging.getLogger("thinpool.serve")


# ============================================================================================== control
class ControlServer:
    """``<pool>/control.sock``: one JSON request line per connection, one reply line, then close.

    Each connection is handled in its own thread (a client that connects and sends nothing -- a
    liveness probe -- costs nothing and blocks no one).  :meth:`stop` closes the listener, waits for
    requests in progress and removes the socket file.
    """

    def __init__(self, pool: Any, provider: Any, path: str, *, timeout: float = CONTROL_TIMEOUT,
                 max_clients: int = MAX_CONTROL_CLIENTS) -> None:
        from thinpool.nbd.server import bind_private
        self.pool = pool
        self.provider = provider
        self.path = path
        self.timeout = timeout
        self.max_clients = max_clients
        self._stopping = threading.Event()
        #: connection thread -> [socket, accepted at (monotonic), still reading its request]
        self._threads: dict[threading.Thread, list[Any]] = {}
        self._tlock = threading.Lock()
        self.requests = 0
        self.evictions = 0
        _claim_unix_path(path, "control socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bind_private(self.sock, path)  # 0600 from the start: the socket grants every pool op
            self.sock.listen(64)
        except BaseException:
            self.sock.close()
            raise
        self._thread = threading.Thread(target=self._accept_loop, name="thinpool-control", daemon=True)

    def start(self) -> None:
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
            line = _recv_line(conn, time.monotonic() + self.timeout)
            with self._tlock:
                info = self._threads.get(threading.current_thread())
                if info is not None:
                    info[2] = False  # no longer evictable: its request runs
            if line is None or not line.strip():
                return  # a liveness probe (connect and close), or nothing useful: no-op
            conn.settimeout(self.timeout)  # for sending the reply
            if self._stopping.is_set():
                reply = _error_reply("FailedPrecondition", f"pool {self.pool.path}: the serving process is "
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
        """Answer one request line (refuses to delete volumes that NBD clients have open).

        The arguments are type-checked before the busy check runs (see
        :func:`~thinpool.cli.ops.handle_control_request`), so ``names`` is a list of strings by then."""
        from thinpool.cli.ops import handle_control_request
        with self.pool._lock:
            self.requests += 1
            return handle_control_request(self.pool, line, precheck=self._refuse_busy_delete)

    def _refuse_busy_delete(self, op_name: str, args: dict[str, Any]) -> None:
        """FailedPrecondition if the op would delete a volume an NBD client has open (dm-thin's EBUSY)."""
        from thinpool.nbd.pool_backend import check_not_open
        names = _volumes_deleted_by(self.pool, op_name, args)
        if names:
            check_not_open(self.provider, names)

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
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass


def _recv_line(conn: socket.socket, deadline: float, limit: int = 1 << 24) -> bytes | None:
    """One request line (without the newline); None on EOF before any byte or when ``deadline``
    (monotonic) passes first (a client that connects and sends nothing, or dribbles)."""
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
            return b"".join(chunks)  # handle_control_request rejects it as invalid JSON


def _error_reply(error: str, message: str) -> bytes:
    return json.dumps({"ok": False, "error": error, "message": message}, separators=(",", ":")).encode() + b"\n"


def _volumes_deleted_by(pool: Any, op_name: str, args: dict[str, Any]) -> list[str]:
    """Volume names a control request would delete; ``args`` are already type-checked."""
    if op_name not in _DELETING_OPS:
        return []
    if op_name == "delete":
        return list(args.get("names", []))
    from thinpool.errors import ThinpoolError
    from thinpool.containers.snapshotter import Snapshotter
    try:
        return [Snapshotter(pool, args.get("namespace", "default"), autocommit=False).volume_name(args["key"])]
    except (ThinpoolError, KeyError):
        return []  # no such snapshot: the op itself reports it


def _claim_unix_path(path: str, what: str) -> None:
    """Refuse an over-long path or a live socket; remove a stale socket left by a dead process."""
    from thinpool.errors import AlreadyExists, InvalidArgument
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise InvalidArgument(f"{what} path {path} is longer than the {MAX_UNIX_PATH} bytes a unix socket "
                              f"path may have; use a shorter pool path" +
                              (" or --socket PATH" if what == "NBD socket" else ""))
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise InvalidArgument(f"{what} {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: its process is gone
    else:
        raise AlreadyExists(f"{what} {path} is live: the pool is already being served")
    finally:
        probe.close()


# ============================================================================================== serve
def parse_tcp(value: str) -> tuple[str | None, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT`` -> (host or None for 127.0.0.1, port)."""
    from thinpool.errors import InvalidArgument
    text = value.strip()
    host: str | None = None
    port_text = text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise InvalidArgument(f"--tcp {value!r}: expected [IPv6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise InvalidArgument(f"--tcp {value!r}: put IPv6 addresses in brackets, e.g. [::1]:10809")
        host = host or None
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidArgument(f"--tcp {value!r}: {port_text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"--tcp {value!r}: port {port} is out of range")
    return host, port


class Served:
    """A running ``thinpool serve``: the pool, the NBD server and the control server.

    Used by the CLI command and by :mod:`thinpool.containers.realfs` (which serves a pool from a background
    thread).  :meth:`stop` stops the control server first (so no op runs on a closing pool), then the
    NBD server, which lets in-flight requests finish and then commits and closes the pool.
    """

    def __init__(self, pool_path: str, *, socket_path: str | None = None, tcp: tuple[str | None, int] | None = None,
                 read_only: bool = False, nbd_options: dict[str, Any] | None = None,
                 control_timeout: float = CONTROL_TIMEOUT) -> None:
        """``nbd_options`` are passed to :class:`~thinpool.nbd.server.NBDServer` (``max_clients``,
        ``handshake_timeout``, ``idle_timeout``, ``message_timeout``, ``payload_budget``,
        ``tcp_exports``); ``control_timeout`` bounds how long a control client may take to send its
        request."""
        from thinpool.errors import ReadOnly
        from thinpool.nbd.pool_backend import PoolProvider
        from thinpool.nbd.server import NBDServer
        from thinpool.pool import Pool
        from .ops import control_socket_path

        self.pool_path = os.path.abspath(pool_path)
        control_path = control_socket_path(self.pool_path)
        if socket_path is None:
            socket_path = os.path.join(self.pool_path, NBD_SOCKET)
        _claim_unix_path(control_path, "control socket")
        _claim_unix_path(socket_path, "NBD socket")
        try:
            self.pool = Pool.open(self.pool_path)
        except (PermissionError, ReadOnly):
            if not read_only:
                raise
            self.pool = Pool.open(self.pool_path, read_only=True)
        try:
            _warm_up(self.pool)
            self.provider = PoolProvider(self.pool, read_only=read_only)
            self.control = ControlServer(self.pool, self.provider, control_path, timeout=control_timeout)
            try:
                self.nbd = NBDServer(self.provider, unix_path=socket_path, tcp=tcp, read_only=read_only,
                                     **(nbd_options or {}))
            except BaseException:
                self.control.stop()
                raise
        except BaseException:
            self.pool.close(commit=False)
            raise
        self._stop_lock = threading.RLock()
        self._stopped = False
        self.control.start()

    def uris(self) -> list[tuple[str, str]]:
        """(volume, URI) for every volume being served right now."""
        return [(name, self.export_uri(name)) for name in self.provider.list_exports()]

    def export_uri(self, name: str) -> str:
        """The NBD URI of volume ``name`` on the unix socket (name and path percent-encoded)."""
        from urllib.parse import quote
        return f"nbd+unix:///{quote(name, safe='/')}?socket={quote(self.nbd.unix_path or '', safe='/')}"

    def tcp_uri(self, name: str) -> str | None:
        """The NBD URI of volume ``name`` over TCP, if serving on TCP."""
        from urllib.parse import quote
        if self.nbd.tcp_address is None:
            return None
        host, port = self.nbd.tcp_address
        host = f"[{host}]" if ":" in host else host
        return f"nbd://{host}:{port}/{quote(name, safe='/')}"

    def serve_forever(self) -> None:
        self.nbd.serve_forever()

    def start(self) -> None:
        """Serve from a background thread."""
        self.nbd.start()

    def stop(self) -> None:
        """Control server, then NBD server (which commits and closes the pool); idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.control.stop()
        self.nbd.shutdown()
        try:
            self.provider.close()  # normally done by the NBD server's shutdown already
        except Exception:
            log.exception("closing the pool failed")  # kept in provider.close_error


def _warm_up(pool: Any) -> None:
    """Run the I/O kernels once (numba compiles or loads them on first use) so the first client does not
    wait for it: a read of the first volume, a mapping query, nothing written."""
    thins = pool.thins()
    if thins:
        t = thins[0]
        if os.fstat(pool.data.fd).st_size >= pool.data.nr_blocks * pool.block_size:  # never SIGBUS
            t.read(0, min(4096, t.size))
        t.mapped_ranges(0, min(t.size, pool.block_size))


@click.command("serve")
@pool_argument
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None,
              help="Unix socket to listen on (default: <POOL>/nbd.sock).")
@click.option("--tcp", "tcp", metavar="[HOST:]PORT", default=None,
              help="Also listen on TCP (HOST defaults to 127.0.0.1; give 0.0.0.0 or [::] explicitly "
                   "to listen on every address).  WARNING: no authentication and no encryption: every "
                   "local user (and anyone who can reach the port) gets full read-write access to every "
                   "volume served on it, unlike the unix sockets (mode 0600, owner only).  Limit it with "
                   "--tcp-allow-export.")
@click.option("--tcp-allow-export", "tcp_allow", metavar="NAME", multiple=True,
              help="Serve only this volume on TCP (repeatable; the unix socket still serves all). "
                   "Other exports are neither listed nor opened over TCP.")
@click.option("--read-only", is_flag=True, help="Serve every export read-only (the CLI can still snapshot).")
@click.option("--handshake-timeout", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="Drop NBD connections that have not finished the handshake in this time.")
@click.option("--idle-timeout", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="Drop NBD connections that send no request for this long (0: never -- a mounted "
                   "filesystem may be idle for hours).")
@click.option("--max-clients", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="NBD connections at once (when full, the oldest connection still in its handshake "
                   "is dropped for a new one).")
@click.option("-v", "--verbose", count=True, help="Log connections (-v) and requests (-vv) on stderr.")
def serve_cmd(pool: str, socket_path: str | None, tcp: str | None, tcp_allow: tuple[str, ...], read_only: bool,
              handshake_timeout: float, idle_timeout: float, max_clients: int, verbose: int) -> None:
    """Serve the pool's thin volumes as NBD block devices until SIGTERM/SIGINT.

    Every volume is an export named after it (volumes created while serving appear as new exports).
    FLUSH and FUA commit the pool, as dm-thin commits on flush; TRIM and zeroing unmap whole blocks;
    BLOCK_STATUS reports unmapped blocks as holes.  While served, the other pool commands (snapshot,
    create-thin, delete, ls, status, commit, the snapshotter verbs...) are sent to this process over
    <POOL>/control.sock; deleting a volume a client has open is refused.  SIGTERM/SIGINT commit, close
    the pool and remove the sockets.

    Access: the unix sockets (nbd.sock, control.sock) are mode 0600, for the pool's owner only.
    --tcp has no authentication: anyone who can connect to the port -- every local user, for
    127.0.0.1 -- reads and writes every volume served on it; restrict it with --tcp-allow-export.

    \b
    Examples:
      thinpool serve /tmp/pool &
      nbdinfo --list 'nbd+unix:///?socket=/tmp/pool/nbd.sock'
      nbdcopy disk.img 'nbd+unix:///base?socket=/tmp/pool/nbd.sock'
      qemu-io -f raw -c 'read 0 64k' 'nbd+unix:///base?socket=/tmp/pool/nbd.sock'
      thinpool snapshot /tmp/pool base snap1      # through the control socket
      thinpool serve /tmp/pool --tcp 10809 --tcp-allow-export base   # nbd://127.0.0.1:10809/base
    """
    from thinpool.errors import InvalidArgument
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="thinpool serve: %(message)s")
    tcp_addr = parse_tcp(tcp) if tcp is not None else None
    if tcp_allow and tcp is None:
        raise InvalidArgument("--tcp-allow-export needs --tcp")
    for what, value in (("--handshake-timeout", handshake_timeout), ("--idle-timeout", idle_timeout)):
        if not value >= 0:
            raise InvalidArgument(f"{what} must be a number of seconds >= 0, got {value}")
    if tcp is not None:
        scope = (f"only the export(s) {', '.join(tcp_allow)}" if tcp_allow else "EVERY volume of the pool")
        click.echo(f"thinpool serve: WARNING: --tcp {tcp} has no authentication and no encryption: every local "
                   f"user and anyone who can reach the port can read and write {scope}", err=True)
    nbd_options = {"handshake_timeout": handshake_timeout or None, "idle_timeout": idle_timeout or None,
                   "max_clients": max_clients, "tcp_exports": list(tcp_allow) if tcp_allow else None}
    served = Served(abspath(pool), socket_path=abspath(socket_path) if socket_path else None, tcp=tcp_addr,
                    read_only=read_only, nbd_options=nbd_options)

    def on_signal(signum: int, frame: Any) -> None:
        served.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        uris = served.uris()
        out = [f"thinpool serve: pool {served.pool_path}: {len(uris)} volume(s)"
               f"{', read-only' if read_only else ''}",
               f"  nbd socket:     {served.nbd.unix_path}"]
        if served.nbd.tcp_address is not None:
            out.append(f"  tcp:            {served.nbd.tcp_address[0]}:{served.nbd.tcp_address[1]}")
        out.append(f"  control socket: {served.control.path}")
        out.append(f"  list exports:   nbdinfo --list '{served.nbd.uri}'")
        for name, uri in uris:
            out.append(f"  {name}: {uri}" + (f"  {served.tcp_uri(name)}" if served.nbd.tcp_address else ""))
        out.append("serving (SIGTERM or Ctrl-C to stop)")
        click.echo("\n".join(out))
        sys.stdout.flush()
        served.serve_forever()
    finally:
        try:
            served.stop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    if served.provider.close_error is not None:
        from thinpool.errors import ThinpoolError
        exc = served.provider.close_error
        raise exc if isinstance(exc, ThinpoolError) else ThinpoolError(f"closing the pool failed: {exc}")
    click.echo(f"thinpool serve: stopped; pool committed and closed (time {served.pool.time})")


COMMANDS: list[click.Command] = [serve_cmd]
