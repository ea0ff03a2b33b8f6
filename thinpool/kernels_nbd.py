"""The NBD session's compiled request loop: plain READs and in-place WRITEs served without the GIL and
without the pool's lock.

An engine kernel module (it is in :data:`thinpool.kernels_cache.SOURCES` and calls the I/O kernels);
the NBD server (:mod:`thinpool.nbd.readloop`) runs it.

:func:`serve_reads` is one numba ``nogil`` kernel that does, for as long as it can, what the Python
fast path in :mod:`thinpool.nbd.session` does for a READ or a WRITE: take a request header (and a
WRITE's payload) from the session's receive buffer, check it, look the blocks up in the block map,
``pread`` them into a reply buffer behind the reply header -- or ``pwrite`` the payload in place --
and send the replies (libc ``recv``/``send``/``poll`` called directly).  The sessions of several
connections so serve their requests on several CPUs at once.  Every complete request in the buffer is
served before the replies go out in one ``send`` and before the loop waits for more.

It serves only what the Python fast path would serve the same way -- a READ with the request magic,
no flags but FUA (and DF with structured replies), a length of 1 .. ``max_len`` bytes, entirely inside
the export; a WRITE (only when ``wmax`` > 0) with no flags, 1 .. ``wmax`` bytes inside the export, that
:func:`thinpool.kernels.locate` places inside one provisioned block that may be written in place
(unshared, writable device: no metadata changes), with the data file at least ``min_data`` bytes long
(the Python path's truncation check) -- and hands everything else back untouched (the request stays at
the head of the buffer): other commands, malformed or out-of-range requests, a write that needs a new
block or copy-on-write, a read or write that failed (the Python path does it again under the pool's
lock and answers with the protocol's error), a partial header or WRITE payload it cannot complete
without waiting (a payload gets one short wait first), the server stopping, an idle timeout.  So the
bytes on the wire are the Python path's, and every error reply stays the Python path's.

Synchronisation (:mod:`thinpool.poollock`): each READ takes the read side of the pool lock's
reader-writer lock, each WRITE its write side (as a Python-path write excludes the compiled readers of
other connections: a read sees a block's bytes before or after a write, never a mix), and first checks
the lock's generation against the binding's; a changed generation (some thread held the pool lock
since the binding) returns :data:`FR_STALE` before anything of the binding is touched, and the session
binds again under the pool lock.  An in-place write changes only data bytes of a block its volume owns
alone -- no mapping, no reference count, nothing a commit writes -- so it needs nothing else of the
pool's lock.

Return codes: :data:`FR_OTHER` (the request at the head is for Python), :data:`FR_NEED` (fewer than
a header buffered and the socket has nothing more right now, or a receive failed: Python's receive
path takes over), :data:`FR_STALE`, :data:`FR_STOP` (the server's wake-up descriptor is readable),
:data:`FR_IDLE` (no request within the idle timeout), :data:`FR_SEND` (a send failed or was
interrupted: Python sends the rest of the reply buffer, ``out[state[S_OSENT]:state[S_OLEN]]``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

from . import kernels_cache
from .kernels import c_pwrite, locate, read_one_pread
from .schema import OK

c_recv = types.ExternalFunction("recv", types.intp(types.int32, types.voidptr, types.uintp, types.int32))
c_send = types.ExternalFunction("send", types.intp(types.int32, types.voidptr, types.uintp, types.int32))
c_poll = types.ExternalFunction("poll", types.int32(types.voidptr, types.uint64, types.int32))
c_rdlock = types.ExternalFunction("pthread_rwlock_rdlock", types.int32(types.voidptr))
c_wrlock = types.ExternalFunction("pthread_rwlock_wrlock", types.int32(types.voidptr))
c_rwunlock = types.ExternalFunction("pthread_rwlock_unlock", types.int32(types.voidptr))
c_clock_gettime = types.ExternalFunction("clock_gettime", types.int32(types.int32, types.voidptr))
c_sched_yield = types.ExternalFunction("sched_yield", types.int32())
c_lseek = types.ExternalFunction("lseek", types.int64(types.int32, types.int64, types.int32))

FR_OTHER = 1
FR_NEED = 2
FR_STALE = 3
FR_STOP = 4
FR_IDLE = 5
FR_SEND = 6

#: ``state`` columns: receive buffer start / end of unread bytes, reply bytes sent / queued, whether
#: to busy-poll at the next wait, monotonic ns before which not to, READs served, receives, blocking waits,
#: WRITEs served, waits for the rest of a WRITE payload, busy-polls ended by a yield that ran another task
S_RPOS, S_REND, S_OSENT, S_OLEN, S_SPIN, S_BACKOFF, S_SERVED, S_RECVS, S_WAITS = 0, 1, 2, 3, 4, 5, 6, 7, 8
S_WRITTEN, S_PAYLOAD_WAITS, S_CONTENDED = 9, 10, 11
STATE_SIZE = 12
#: how long the loop waits for the rest of a WRITE payload before handing the request to Python (whose
#: receive path applies the message deadline)
PAYLOAD_WAIT_MS = 20

_HDR = 28
_SOURCES_DIGEST = kernels_cache.sources_digest()
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698
_STRUCTURED_REPLY_MAGIC = 0x668E33EF
_MSG_DONTWAIT = 0x40
_MSG_NOSIGNAL = 0x4000
_POLLIN = 1
_CLOCK_MONOTONIC = 1
_SEEK_END = 2


@njit(cache=True)
def _built_with():
    """The sources this module's cached code was compiled from (see :mod:`thinpool.kernels_cache`)."""
    return _SOURCES_DIGEST


@njit(cache=True, inline="always")
def _be(buf, p, n):
    v = np.int64(0)
    for i in range(n):
        v = (v << 8) | np.int64(buf[p + i])
    return v


@njit(cache=True, inline="always")
def _put_be(buf, p, n, v):
    for i in range(n):
        buf[p + n - 1 - i] = np.uint8((v >> (8 * i)) & 0xFF)


@njit(cache=True, inline="always")
def _now(ts):
    c_clock_gettime(_CLOCK_MONOTONIC, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]


@njit(cache=True)
def _flush(sock, out, state):
    """Send the queued replies ``out[state[S_OSENT]:state[S_OLEN]]``; False if a send failed."""
    pos = state[S_OSENT]
    end = state[S_OLEN]
    while pos < end:
        r = c_send(sock, out[pos:].ctypes.data, end - pos, _MSG_NOSIGNAL)
        if r <= 0:
            state[S_OSENT] = pos
            return False
        pos += r
    state[S_OSENT] = 0
    state[S_OLEN] = 0
    return True


@njit(cache=True, inline="always")
def _to_front(rbuf, rpos, have, state):
    """Move the ``have`` unread bytes at ``rpos`` to the front of the receive buffer (the buffer
    positions in ``state`` follow); returns the new end of the buffered bytes."""
    for i in range(have):
        rbuf[i] = rbuf[rpos + i]
    state[S_RPOS] = 0
    state[S_REND] = have
    return have


@njit(cache=True)
def _fail(sock, out, state, code):
    """Send the queued replies, then return ``code`` (:data:`FR_SEND` if the send failed)."""
    if not _flush(sock, out, state):
        return FR_SEND
    return code


@njit(cache=True)
def _write_in_place(rbuf, p, length, offset, tab, devs, slot, fd, min_data):
    """Write the payload ``rbuf[p:p + length]`` at ``offset`` of the volume in place; False (nothing
    changed but maybe some of these bytes: the Python path writes them all again) if it is not an
    in-place overwrite, the data file is shorter than ``min_data`` or a ``pwrite`` failed."""
    if c_lseek(fd, 0, _SEEK_END) < min_data:
        return False
    pos = locate(tab, devs, slot, offset, length, True)
    if pos < 0:
        return False
    done = 0
    while done < length:
        w = c_pwrite(fd, rbuf[p + done:].ctypes.data, length - done, pos + done)
        if w <= 0:
            return False
        done += w
    return True


@njit(cache=True)
def _wait_request(sock, rbuf, state, cap, stop, idle_ms, spin_ns, contended_ns, backoff_ns, transmitting,
                  pollfds, ts):
    """Receive the next request(s) into the empty ``rbuf``; the bytes received (> 0), 0 (end of file, or a
    receive error: Python's receive path reports it) or minus an ``FR_*`` code (FR_STOP, FR_IDLE).

    First, while the session may (``state[S_SPIN]``, ``transmitting[0] == 1``, not backing off), a
    busy-poll of up to ``spin_ns``: non-blocking receives with a ``sched_yield`` between them.  A yield
    that took longer than ``contended_ns`` ran another task on this CPU: the busy-poll ends there, and
    it stops for ``backoff_ns`` if no request came meanwhile, or if the yield took longer than the whole
    window ``spin_ns`` -- a request that arrived then waited for another task's time slice (a
    millisecond and more), where a blocking receive would have been woken at once.  (A shorter yield
    that brought the request is the client itself running on this CPU: that is what the busy-poll is
    for, with fio's 16 completions and resubmissions at iodepth 16 taking 30-60 us.)  Then one blocking ``recv``: the
    socket's receive timeout (``SO_RCVTIMEO``, :data:`thinpool.nbd.readloop.RECV_WAIT_MS`) bounds it,
    after which the wait goes on in ``poll`` with the server's wake-up descriptor (``pollfds``) and the
    idle timeout ``idle_ms`` (-1: none).  ``stop[0]`` (set when the server stops) is checked after
    every receive: a stopping server answers what arrives in Python (ESHUTDOWN)."""
    start = _now(ts)
    got = -1
    if spin_ns > 0 and state[S_SPIN] != 0 and transmitting[0] == 1 and start >= state[S_BACKOFF]:
        end = start + spin_ns
        while True:
            got = c_recv(sock, rbuf.ctypes.data, cap, _MSG_DONTWAIT)
            if got >= 0:
                break
            t = _now(ts)
            if t >= end:
                break
            c_sched_yield()
            t2 = _now(ts)
            if t2 - t > contended_ns:
                got = c_recv(sock, rbuf.ctypes.data, cap, _MSG_DONTWAIT)
                if got < 0 or t2 - t > spin_ns:
                    state[S_BACKOFF] = t2 + backoff_ns
                    state[S_CONTENDED] += 1
                break
    if got < 0:
        state[S_WAITS] += 1
        while True:
            got = c_recv(sock, rbuf.ctypes.data, cap, 0)
            if got >= 0:
                break
            # the receive timeout (or a signal, or an error): wait in poll, where the server's wake-up
            # descriptor and the idle timeout count
            t = _now(ts)
            wait_ms = idle_ms
            if idle_ms >= 0:
                left = idle_ms - (t - start) // 1_000_000
                if left <= 0:
                    return -FR_IDLE
                wait_ms = left
            pollfds[1] = _POLLIN
            pollfds[3] = _POLLIN
            r = c_poll(pollfds.ctypes.data, 2, wait_ms)
            if (pollfds[3] >> 16) != 0 or stop[0] != 0:
                return -FR_STOP
            if r > 0 and (pollfds[1] >> 16) != 0:
                got = c_recv(sock, rbuf.ctypes.data, cap, _MSG_DONTWAIT)
                if got < 0:
                    got = 0  # an error: Python's receive reports it
                break
    state[S_SPIN] = 1 if _now(ts) - start < 2 * spin_ns else 0
    if stop[0] != 0:
        if got > 0:
            state[S_REND] = got  # received: Python answers it (ESHUTDOWN)
            state[S_RECVS] += 1
        return -FR_STOP
    return got



@njit(cache=True, nogil=True)
def serve_reads(sock, rbuf, state, out, tab, devs, slot, fd, size, structured, read_flags, max_len,
                rw, gen, bound_gen, idle_ms, spin_ns, contended_ns, backoff_ns, transmitting, pollfds, ts,
                wmax, min_data, stop):
    """Serve READs and in-place WRITEs from ``rbuf``/the socket until one of the ``FR_*`` conditions
    (module docstring).

    ``sock`` the connection's descriptor, ``pollfds`` two ``struct pollfd`` as int32 words (the socket,
    the server's wake-up descriptor); ``rbuf`` the session's receive buffer; ``out`` the reply buffer
    (at least ``max_len`` + 28 bytes); ``tab``/``devs``/``slot``/``fd``/``size`` the volume's binding
    (:func:`thinpool.poollock.read_binding`), valid while ``gen[0] == bound_gen``; ``rw`` the
    ``pthread_rwlock_t`` memory; ``read_flags`` the command flags a served READ may carry; ``idle_ms``
    the poll timeout between requests (-1: none); ``spin_ns`` the busy-poll window (0: none), used only
    while ``transmitting[0] == 1`` (the session's rule, :meth:`thinpool.nbd.session.Session._spin_wait`);
    ``wmax`` the longest WRITE served (0: none -- a read-only export, a pool not in write mode, no data
    file; at most half of ``rbuf``), ``min_data`` the data file's expected size in bytes; ``stop`` one
    int64, non-zero once the server is stopping.  The socket is blocking, with a receive timeout
    (:func:`_wait_request`).
    """
    cap = rbuf.shape[0]
    ocap = out.shape[0]
    rhdr = 28 if structured else 16
    rwp = rw.ctypes.data
    while True:
        rpos = state[S_RPOS]
        rend = state[S_REND]
        if rend - rpos >= _HDR:
            p = rpos
            magic = _be(rbuf, p, 4)
            flags = _be(rbuf, p + 4, 2)
            ctype = _be(rbuf, p + 6, 2)
            length = _be(rbuf, p + 24, 4)
            if ctype == 1:
                # WRITE: plain, in range, its payload buffered (or coming at once)
                if not (magic == _REQUEST_MAGIC and flags == 0 and 0 < length <= wmax and rbuf[p + 16] < 0x80):
                    return _fail(sock, out, state, FR_OTHER)
                offset = _be(rbuf, p + 16, 8)
                if offset > size or length > size - offset:
                    return _fail(sock, out, state, FR_OTHER)
                need_in = _HDR + length
                if rend - rpos < need_in:
                    if rpos + need_in > cap:
                        rend = _to_front(rbuf, rpos, rend - rpos, state)
                    got = c_recv(sock, rbuf[rend:].ctypes.data, cap - rend, _MSG_DONTWAIT)
                    if got > 0:
                        state[S_REND] = rend + got
                        state[S_RECVS] += 1
                        continue
                    if got == 0:
                        return _fail(sock, out, state, FR_OTHER)  # EOF: Python's receive reports it
                    # the rest is not here yet: send the replies (never wait with them held back), then
                    # wait a little for it
                    if not _flush(sock, out, state):
                        return FR_SEND
                    state[S_PAYLOAD_WAITS] += 1
                    pollfds[1] = _POLLIN
                    pollfds[3] = _POLLIN
                    r = c_poll(pollfds.ctypes.data, 2, PAYLOAD_WAIT_MS)
                    if r <= 0 or (pollfds[3] >> 16) != 0 or (pollfds[1] >> 16) == 0:
                        return FR_OTHER  # Python waits under the message deadline and shutdown rules
                    got = c_recv(sock, rbuf[rend:].ctypes.data, cap - rend, _MSG_DONTWAIT)
                    if got <= 0:
                        return FR_OTHER
                    state[S_REND] = rend + got
                    state[S_RECVS] += 1
                    continue
                if state[S_OLEN] + 16 > ocap:
                    if not _flush(sock, out, state):
                        return FR_SEND
                c_wrlock(rwp)  # a read of this block on another connection sees it whole, before or after
                if gen[0] != bound_gen:
                    c_rwunlock(rwp)
                    return _fail(sock, out, state, FR_STALE)
                ok = _write_in_place(rbuf, p + _HDR, length, offset, tab, devs, slot, fd, min_data)
                c_rwunlock(rwp)
                if not ok:
                    return _fail(sock, out, state, FR_OTHER)
                o = state[S_OLEN]
                _put_be(out, o, 4, _SIMPLE_REPLY_MAGIC)
                _put_be(out, o + 4, 4, 0)
                for i in range(8):
                    out[o + 8 + i] = rbuf[p + 8 + i]  # the handle, as sent
                state[S_OLEN] = o + 16
                state[S_RPOS] = p + need_in
                state[S_WRITTEN] += 1
                continue
            fast = (magic == _REQUEST_MAGIC and ctype == 0 and (flags & ~read_flags) == 0
                    and 0 < length <= max_len and rbuf[p + 16] < 0x80)
            offset = _be(rbuf, p + 16, 8) if fast else np.int64(0)
            if fast and (offset > size or length > size - offset):
                fast = False
            if not fast:
                return _fail(sock, out, state, FR_OTHER)
            need = rhdr + length
            if state[S_OLEN] + need > ocap:
                if not _flush(sock, out, state):
                    return FR_SEND
            o = state[S_OLEN]
            c_rdlock(rwp)
            if gen[0] != bound_gen:
                c_rwunlock(rwp)
                return _fail(sock, out, state, FR_STALE)
            code, _where = read_one_pread(tab, devs, slot, fd, out[o + rhdr:o + need], offset, -1, 0)
            if gen[0] != bound_gen:  # a row of the block map faulted in that lookup (thinpool.faultguard)
                c_rwunlock(rwp)
                return _fail(sock, out, state, FR_STALE)
            c_rwunlock(rwp)
            if code != OK:
                return _fail(sock, out, state, FR_OTHER)
            if structured:
                _put_be(out, o, 4, _STRUCTURED_REPLY_MAGIC)
                _put_be(out, o + 4, 2, 1)          # NBD_REPLY_FLAG_DONE
                _put_be(out, o + 6, 2, 1)          # NBD_REPLY_TYPE_OFFSET_DATA
                for i in range(8):
                    out[o + 8 + i] = rbuf[p + 8 + i]  # the handle, as sent
                _put_be(out, o + 16, 4, 8 + length)
                _put_be(out, o + 20, 8, offset)
            else:
                _put_be(out, o, 4, _SIMPLE_REPLY_MAGIC)
                _put_be(out, o + 4, 4, 0)
                for i in range(8):
                    out[o + 8 + i] = rbuf[p + 8 + i]
            state[S_OLEN] = o + need
            state[S_RPOS] = p + _HDR
            state[S_SERVED] += 1
            continue
        # fewer than a header buffered: send the replies, then receive
        if not _flush(sock, out, state):
            return FR_SEND
        have = rend - rpos
        if have == 0:
            # between requests: one receive that waits -- no poll before it (a request at iodepth 1
            # costs a recv, its pread and a send); see _wait_request
            state[S_RPOS] = 0
            state[S_REND] = 0
            got = _wait_request(sock, rbuf, state, cap, stop, idle_ms, spin_ns, contended_ns, backoff_ns,
                                transmitting, pollfds, ts)
            if got <= 0:
                return FR_NEED if got == 0 else -got
            state[S_REND] = got
            state[S_RECVS] += 1
            continue
        if rpos + _HDR > cap or rend == cap:
            rend = _to_front(rbuf, rpos, have, state)
        got = c_recv(sock, rbuf[rend:].ctypes.data, cap - rend, _MSG_DONTWAIT)
        if got <= 0:
            return FR_NEED
        state[S_REND] = rend + got
        state[S_RECVS] += 1


kernels_cache.check(globals(), _built_with)

__all__ = ["serve_reads", "FR_OTHER", "FR_NEED", "FR_STALE", "FR_STOP", "FR_IDLE", "FR_SEND", "STATE_SIZE",
           "S_RPOS", "S_REND", "S_OSENT", "S_OLEN", "S_SPIN", "S_BACKOFF", "S_SERVED",
           "S_RECVS", "S_WAITS", "S_WRITTEN", "S_PAYLOAD_WAITS", "S_CONTENDED", "PAYLOAD_WAIT_MS"]
