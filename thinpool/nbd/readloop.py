"""A session's compiled request loop (:mod:`thinpool.kernels_nbd`: plain READs, and WRITEs that overwrite
provisioned blocks in place): registering it with the pool's lock, binding it to the export's volume,
running it and taking over where it stops.

Used by :class:`thinpool.nbd.session.Session` for the pool's volumes
(:class:`thinpool.nbd.pool_backend.PoolExport` itself, not wrapped) on a provider whose lock is a
:class:`~thinpool.poollock.PoolLock`; other exports are served by the Python path alone.
``THINPOOL_NBD_COMPILED_READS=0`` turns the compiled loop off (for A/B measurements).
"""

from __future__ import annotations

import os
import select
import socket
import struct
from typing import Any

import numpy as np

from thinpool.poollock import PoolLock

#: reads up to this many bytes are served by the compiled loop (the reply buffer holds two)
MAX_READ = 256 * 1024
#: writes up to this many bytes (the session's receive buffer holds two with their headers; longer
#: payloads are the Python path's, received into a buffer of their own under the payload budget)
MAX_WRITE = 128 * 1024
OUT_CAP = 2 * (MAX_READ + 28)
ENABLED = os.environ.get("THINPOOL_NBD_COMPILED_READS", "1") != "0"
#: ``THINPOOL_NBD_COMPILED_WRITES=0`` leaves every WRITE to the Python path (for A/B measurements)
WRITES = os.environ.get("THINPOOL_NBD_COMPILED_WRITES", "1") != "0"
#: the compiled loop waits for the next request in one blocking ``recv`` of at most this long (the
#: socket's ``SO_RCVTIMEO``), then in ``poll`` with the server's wake-up descriptor: a stopping server
#: ends a session idle in the loop within this time (the Python path receives only what ``poll`` said
#: is there, so the timeout never ends one of its receives)
RECV_WAIT_MS = 50


_ENTRIES: dict[tuple, Any] = {}


def _entry(args: tuple) -> Any:
    """``serve_reads``' compiled entry point for exactly these argument types: called directly it skips
    the dispatcher's type resolution of its 22 arguments."""
    from numba import typeof

    from thinpool import kernels_nbd
    sig = tuple(typeof(a) for a in args)
    fn = _ENTRIES.get(sig)
    if fn is None:
        fn = _ENTRIES[sig] = kernels_nbd.serve_reads.compile(sig)
    return fn


def _loop_args(sock: int, rbuf: np.ndarray, state: np.ndarray, out: np.ndarray, b: Any, size: int,
               structured: bool, read_flags: int, max_len: int, idle_ms: int, spin_ns: int, contended_ns: int,
               backoff_ns: int, transmitting: np.ndarray, pollfds: np.ndarray, ts: np.ndarray,
               wmax: int, stop: np.ndarray) -> tuple:
    """``serve_reads``' arguments for binding ``b`` (one place: :meth:`CompiledReads.run` and
    :func:`precompile` must give it the same types)."""
    return (int(sock), rbuf, state, out, b.table, b.devs, b.slot, b.fd, min(size, b.size), bool(structured),
            int(read_flags), int(max_len), b.lock.rw, b.lock.gen, b.gen, int(idle_ms), int(spin_ns),
            int(contended_ns), int(backoff_ns), transmitting, pollfds, ts, int(wmax), int(b.data_bytes), stop)


def precompile(pool: Any) -> bool:
    """Compile ``serve_reads`` for the argument types a session of ``pool``'s volumes gives it (or load it
    from numba's cache), so that the first client of a served pool does not wait for it: on a cold kernel
    cache (a fresh clone or install) that compile took 5-7 s of the first request, on a loaded machine.
    Runs nothing and keeps no binding.  False when there is nothing to compile for (the loop is turned
    off, the pool has no volume, its lock is not a :class:`~thinpool.poollock.PoolLock`, or the first
    volume's reads take the Python path)."""
    from thinpool import kernels_nbd
    from thinpool.poollock import read_binding
    lock = pool.locked()
    thins = pool.thins()
    if not ENABLED or not isinstance(lock, PoolLock) or not thins:
        return False
    with lock.inspecting():  # looked at only: the binding is dropped before anything could change it
        b = read_binding(thins[0])
    if b is None:
        return False
    pollfds = np.array([-1, select.POLLIN, -1, select.POLLIN], np.int32)
    _entry(_loop_args(-1, np.frombuffer(bytearray(16), np.uint8), np.zeros(kernels_nbd.STATE_SIZE, np.int64),
                      np.empty(16, np.uint8), b, 0, True, 0, 0, -1, 0, 0, 0, np.zeros(1, np.int64), pollfds,
                      np.zeros(2, np.int64), 0, np.zeros(1, np.int64)))
    return True


class CompiledReads:
    """The compiled read loop of one session (see the module docstring); :meth:`open` returns None
    when the export or provider does not support it."""

    def __init__(self, session: Any, lock: PoolLock) -> None:
        from thinpool import kernels_nbd
        self.fr = kernels_nbd
        self.session = session
        self.lock = lock
        self.export = session.export
        self.state = np.zeros(kernels_nbd.STATE_SIZE, np.int64)
        self.state[kernels_nbd.S_SPIN] = 1
        self.out = np.empty(OUT_CAP, np.uint8)
        self.rbuf = np.frombuffer(session._rbuf, np.uint8)
        self.pollfds = np.array([session.sock.fileno(), select.POLLIN, session.ctx.wake_fd, select.POLLIN],
                                np.int32)
        self.ts = np.zeros(2, np.int64)
        self.stop = session.ctx.stop_flag
        # the loop's blocking receive between requests ends after RECV_WAIT_MS (or the idle timeout)
        idle = session.ctx.idle_timeout
        wait_us = RECV_WAIT_MS * 1000 if idle is None else max(1000, min(RECV_WAIT_MS * 1000, int(idle * 1e6)))
        session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                struct.pack("@ll", wait_us // 1_000_000, wait_us % 1_000_000))
        self.binding: Any = None
        self.registered = False
        self.binds = 0  # bindings taken (the first, and one after every FR_STALE)
        self._fn: Any = None  # serve_reads compiled for this binding's argument types (see _entry)

    @classmethod
    def open(cls, session: Any) -> "CompiledReads | None":
        """The compiled read loop for ``session``'s export, or None (not supported, or turned off).  It
        registers with the pool's lock at its first :meth:`run` (a connection that only writes never
        makes the pool lock's holders exclude it)."""
        from thinpool.nbd.pool_backend import PoolExport
        lock = getattr(session.ctx.provider, "lock", None)
        # a PoolExport itself: a wrapper (the recorder of ``serve --record``) sees every request
        if not ENABLED or not isinstance(lock, PoolLock) or type(session.export) is not PoolExport:
            return None
        return cls(session, lock)

    def close(self) -> None:
        """Unregister (idempotent); the loop must not be running."""
        if self.registered:
            with self.lock.inspecting():
                self.lock.drop_reader()
            self.registered = False
            self.binding = None

    def run(self, spin_ns: int, contended_ns: int, backoff_ns: int, transmitting: np.ndarray,
            structured: bool, read_flags: int, max_len: int, size: int, writable: bool = False) -> int | None:
        """Serve READs (and, if ``writable`` -- the export is -- in-place WRITEs) in the compiled loop
        from the session's buffer position on; return its ``FR_*`` code with the session's buffer
        positions updated and every reply sent -- or None when the volume cannot be bound (the caller
        stops using the loop: its requests get the Python path's answers)."""
        fr = self.fr
        s = self.session
        st = self.state
        idle = s.ctx.idle_timeout
        idle_ms = -1 if idle is None else max(1, min(int(idle * 1000), 2**31 - 1))
        max_len = min(max_len, MAX_READ)
        while True:
            b = self.binding
            if b is None:
                self.binds += 1
                with self.lock.inspecting():  # (binding changes nothing: other connections' bindings stay valid)
                    if not self.registered:
                        self.lock.add_reader()
                        self.registered = True
                    b = self.binding = self.export.read_binding()
                if b is None:
                    return None
                self._fn = None
            st[fr.S_RPOS] = s._rpos
            st[fr.S_REND] = s._rend
            wmax = MAX_WRITE if writable and WRITES and b.writable else 0
            args = _loop_args(int(self.pollfds[0]), self.rbuf, st, self.out, b, size, structured, read_flags,
                              max_len, idle_ms, spin_ns, contended_ns, backoff_ns, transmitting, self.pollfds,
                              self.ts, wmax, self.stop)
            fn = self._fn
            if fn is None:
                fn = self._fn = _entry(args)
            code = fn(*args)
            s._rpos = int(st[fr.S_RPOS])
            s._rend = int(st[fr.S_REND])
            if st[fr.S_OSENT] < st[fr.S_OLEN]:
                s.sock.sendall(self.out.data[int(st[fr.S_OSENT]):int(st[fr.S_OLEN])])
                st[fr.S_OSENT] = st[fr.S_OLEN] = 0
            if code == fr.FR_STALE:
                self.binding = None
                continue
            if code == fr.FR_SEND:
                continue
            return int(code)

    @property
    def served(self) -> int:
        """READs the compiled loop has served on this connection."""
        return int(self.state[self.fr.S_SERVED])

    @property
    def written(self) -> int:
        """WRITEs the compiled loop has served on this connection."""
        return int(self.state[self.fr.S_WRITTEN])

    @property
    def waits(self) -> int:
        """Blocking waits for the next request (the others were caught by busy-polling)."""
        return int(self.state[self.fr.S_WAITS])

    @property
    def contended(self) -> int:
        """Busy-polls ended because a ``sched_yield`` ran another task on this CPU (each starts a back-off)."""
        return int(self.state[self.fr.S_CONTENDED])


__all__ = ["CompiledReads", "precompile", "MAX_READ", "MAX_WRITE", "ENABLED", "WRITES", "RECV_WAIT_MS"]
