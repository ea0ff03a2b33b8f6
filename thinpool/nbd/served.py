"""A served pool: its volumes over NBD and its control socket, in one object (:class:`Served`).

While a pool is served, the serving process holds the pool (its exclusive lock); other ``thinpool``
commands reach it through ``<pool>/control.sock`` (:mod:`thinpool.control`): one JSON request line per
connection, answered under the pool's lock with the op table the caller gives :class:`Served`.  NBD
requests run under the same lock, so a snapshot taken while a client writes is a point-in-time image
of every request completed before it (of every flushed one after a crash).

Used by ``thinpool serve`` and by :mod:`thinpool.containers.realfs` (which serves a pool from a
background thread).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Mapping

from thinpool.control.server import CONTROL_TIMEOUT, ControlOp, ControlServer

#: the NBD socket's file name inside the pool directory (the default ``socket_path``)
NBD_SOCKET = "nbd.sock"
#: control ops that delete volumes: refused for volumes that are active, e.g. open over NBD (dm-thin's EBUSY)
DELETING_OPS = ("delete", "remove-snapshot")
#: seconds between periodic commits: dm-thin's ``COMMIT_PERIOD`` (HZ: one second)
COMMIT_PERIOD = 1.0
#: the longest period accepted (a day; 0 turns periodic commits off)
MAX_COMMIT_PERIOD = 86400.0

log = logging.getLogger("thinpool.serve")


class Served:
    """A running served pool: the pool, the NBD server and (given an op table) the control server.

    ``ops`` is the op table the control socket answers with (op name -> :class:`ControlOp`; the CLI
    gives its registry); None serves no control socket.  :meth:`stop` stops the control server first
    (so no op runs on a closing pool), then the NBD server, which lets in-flight requests finish and
    then commits and closes the pool.
    """

    def __init__(self, pool_path: str, ops: Mapping[str, ControlOp] | None = None, *,
                 socket_path: str | None = None, tcp: tuple[str | None, int] | None = None,
                 read_only: bool = False, nbd_options: dict[str, Any] | None = None,
                 control_timeout: float = CONTROL_TIMEOUT, record: str | None = None,
                 commit_period: float = COMMIT_PERIOD) -> None:
        """Open the pool at ``pool_path`` (read-only if it cannot be opened writable and ``read_only``
        is set), bind the sockets and start the control server; :meth:`serve_forever` or :meth:`start`
        then serves NBD.  ``socket_path``: the NBD unix socket (default ``<pool>/nbd.sock``); ``tcp``:
        (host or None for 127.0.0.1, port) to listen on TCP too; ``nbd_options`` are passed to
        :class:`~thinpool.nbd.server.NBDServer` (``max_clients``, ``handshake_timeout``,
        ``idle_timeout``, ``message_timeout``, ``payload_budget``, ``tcp_exports``);
        ``control_timeout`` bounds how long a control client may take to send its request; ``record``: a
        file to log every NBD request of every export into, as a fio iolog v3 (:mod:`thinpool.nbd.record`;
        closed by :meth:`stop`); ``commit_period``: commit the pool this many seconds apart when anything
        changed, as dm-thin's worker does every ``COMMIT_PERIOD`` (1 s, the default) -- so a client's
        writes are durable within about a second even without a FLUSH; 0: only FLUSH/FUA, pool
        messages and :meth:`stop` commit."""
        from thinpool.control.protocol import control_socket_path
        from thinpool.errors import ReadOnly
        from thinpool.nbd.pool_backend import PoolProvider
        from thinpool.nbd.server import NBDServer
        from thinpool.pool import Pool
        from thinpool.unixsock import claim_unix_path

        if isinstance(commit_period, bool) or not isinstance(commit_period, (int, float)) or \
                not 0 <= commit_period <= MAX_COMMIT_PERIOD:
            from thinpool.errors import InvalidArgument, shown
            raise InvalidArgument(f"commit period must be a number of seconds from 0 to {MAX_COMMIT_PERIOD:g}, "
                                  f"got {shown(commit_period)}")
        self.commit_period = float(commit_period)
        self.pool_path = os.path.abspath(pool_path)
        if record is not None:
            from thinpool.nbd.record import check_record_path
            check_record_path(record, [self.pool_path])   # before anything is bound or opened
        control_path = control_socket_path(self.pool_path)
        if socket_path is None:
            socket_path = os.path.join(self.pool_path, NBD_SOCKET)
        if ops is not None:
            claim_unix_path(control_path, "control socket")
        claim_unix_path(socket_path, "NBD socket", " or --socket PATH")
        try:
            self.pool = Pool.open(self.pool_path)
        except (PermissionError, ReadOnly):
            if not read_only:
                raise
            self.pool = Pool.open(self.pool_path, read_only=True)
        try:
            warm_up(self.pool)
            self.provider = PoolProvider(self.pool, read_only=read_only)
            self.recorder: Any = None
            nbd_provider: Any = self.provider
            if record is not None:
                from thinpool.nbd.record import IologRecorder, RecordingProvider
                self.recorder = IologRecorder(record, pools=[self.pool])
                nbd_provider = RecordingProvider(self.provider, self.recorder)
            self.control: ControlServer | None = None
            if ops is not None:
                self.control = ControlServer(self.pool, ops, control_path, precheck=self._refuse_busy_delete,
                                             timeout=control_timeout)
            try:
                self.nbd = NBDServer(nbd_provider, unix_path=socket_path, tcp=tcp, read_only=read_only,
                                     **(nbd_options or {}))
            except BaseException:
                if self.control is not None:
                    self.control.stop()
                raise
        except BaseException:
            if getattr(self, "recorder", None) is not None:
                self.recorder.close()
            self.pool.close(commit=False)
            raise
        self._stop_lock = threading.RLock()
        self._stopped = False
        self._stop_commits = threading.Event()
        self._committer: threading.Thread | None = None
        if self.control is not None:
            self.control.start()
        if self.commit_period > 0 and not self.pool.read_only:
            self._committer = threading.Thread(target=self._commit_periodically, name="thinpool-commit", daemon=True)
            self._committer.start()

    def _commit_periodically(self) -> None:
        """Every :attr:`commit_period` seconds, commit the pool if anything changed (dm-thin's
        ``do_waker`` / ``do_worker``); a failed commit is logged (the pool's mode says what it means:
        a commit that failed to flush fails the pool, as the kernel's metadata_operation_failed does)."""
        while not self._stop_commits.wait(self.commit_period):
            try:
                self.pool.commit_if_changed()
            except Exception:
                log.exception("periodic commit failed")

    def _refuse_busy_delete(self, op_name: str, args: dict[str, Any]) -> None:
        """Busy (EBUSY) if the op would delete a volume that is active -- an NBD client has it open
        (dm-thin refuses to delete an open thin device) -- checked for every name before any goes."""
        from thinpool.nbd.pool_backend import check_not_open
        names = volumes_deleted_by(self.pool, op_name, args)
        if names:
            check_not_open(self.provider, names)

    def uris(self) -> list[tuple[str, str]]:
        """(volume, URI) for every volume being served right now."""
        return [(name, self.export_uri(name)) for name in self.provider.list_exports()]

    def export_uri(self, name: str) -> str:
        """The NBD URI of volume ``name`` on the unix socket (name and path percent-encoded)."""
        from urllib.parse import quote
        return f"nbd+unix:///{quote(name, safe='/')}?socket={quote(self.nbd.unix_path or '', safe='/')}"

    def tcp_uri(self, name: str) -> str | None:
        """The NBD URI of volume ``name`` over TCP, if it is served on TCP (serving on TCP, and the
        volume is one of ``--tcp-allow-export`` when that is given)."""
        from urllib.parse import quote
        if self.nbd.tcp_address is None:
            return None
        if self.nbd.tcp_exports is not None and name not in self.nbd.tcp_exports:
            return None
        host, port = self.nbd.tcp_address
        host = f"[{host}]" if ":" in host else host
        return f"nbd://{host}:{port}/{quote(name, safe='/')}"

    def serve_forever(self) -> None:
        """Serve NBD in this thread until :meth:`stop`."""
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
        self._stop_commits.set()
        if self._committer is not None:
            # (a commit under way finishes first; one that starts later finds the pool closed: both hold
            # the pool's lock, so a bounded wait suffices -- this may run in a signal handler)
            self._committer.join(timeout=5.0)
        if self.control is not None:
            self.control.stop()
        self.nbd.shutdown()
        try:
            self.provider.close()  # normally done by the NBD server's shutdown already
        except Exception:
            log.exception("closing the pool failed")  # kept in provider.close_error
        if self.recorder is not None:
            self.recorder.close()  # normally done by the NBD server's shutdown already


def volumes_deleted_by(pool: Any, op_name: str, args: dict[str, Any]) -> list[str]:
    """Volume names a control request would delete (ops :data:`DELETING_OPS`); ``args`` are already
    type-checked.  An unknown snapshot gives [] (the op itself reports it)."""
    if op_name not in DELETING_OPS:
        return []
    if op_name == "delete":
        return list(args.get("names", []))
    from thinpool.containers.snapshotter import Snapshotter
    from thinpool.errors import ThinpoolError
    try:
        return [Snapshotter(pool, args.get("namespace", "default"), autocommit=False).volume_name(args["key"])]
    except (ThinpoolError, KeyError):
        return []


def warm_up(pool: Any) -> None:
    """Run the I/O kernels once (numba compiles or loads them on first use) so the first client does not
    wait for it: a read of the first volume, a mapping query, nothing written; and compile a session's
    request loop for the pool's volumes (:func:`thinpool.nbd.readloop.precompile`)."""
    from thinpool.nbd.readloop import precompile
    precompile(pool)
    thins = pool.thins()
    if thins:
        t = thins[0]
        from thinpool.errors import ThinpoolError
        try:
            t.pread(0, min(4096, t.size))  # the NBD read path (pread, never the map: no SIGBUS)
        except ThinpoolError:
            pass  # an unreadable data file: the client's READ will get EIO too
        t.mapped_ranges(0, min(t.size, pool.block_size))


__all__ = ["NBD_SOCKET", "DELETING_OPS", "COMMIT_PERIOD", "Served", "volumes_deleted_by", "warm_up"]
