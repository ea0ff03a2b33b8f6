"""A file's ``fdatasync`` run by a helper thread that never takes the GIL (numba ``nogil`` kernels).

An engine kernel module (it is in :data:`thinpool.kernels_cache.SOURCES`); the pool's commit uses it
through :class:`thinpool.datadev.BackgroundFlush` to flush the data file while it makes the commit's
metadata pages (:meth:`thinpool.pool_txn.Transactions.commit`).

The helper thread enters :func:`flush_loop` once and stays in compiled code until it is stopped: it
waits on a condition variable, runs each requested ``fdatasync`` and reports its errno.  Because it
never needs the GIL, it starts the flush as soon as the request reaches it, whatever Python code the
requesting thread runs meanwhile.  The requesting thread calls :func:`flush_start`, then
:func:`flush_finish`, which waits only a bounded time, and only for a flush the helper began: a
request the helper has not taken up by then is taken back at once (:data:`NOT_STARTED`), one whose
``fdatasync`` has not returned within the bound is abandoned (:data:`IN_FLIGHT`), and the caller
flushes the file itself -- on its own descriptor (the helper's is another open of the file, so each
call reports a write-back error to its own caller: Linux reports one once per open file) -- which
waits for the write-back under way and nothing else.  So a helper that waits for a CPU (a loaded
machine) makes a commit wait at most that bound longer than its own flush would.

``ctl`` is one int64 array: a ``pthread_mutex_t`` and a ``pthread_cond_t`` (:data:`LOCK_WORDS` words
each, initialised by the caller), then the request's state, descriptor, result, the stop flag,
whether the requester gave up on the flush under way (indices :data:`C_STATE`, :data:`C_FD`,
:data:`C_RESULT`, :data:`C_STOP`, :data:`C_ABANDONED`), all read and written with the mutex held, and
when the helper's last flush began and ended (:data:`C_T_START`, :data:`C_T_END`: monotonic
nanoseconds, for measurements).  Every word is read and written as an atomic (:func:`_get`,
:func:`_set`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import kernels_cache

c_mutex_lock = types.ExternalFunction("pthread_mutex_lock", types.int32(types.voidptr))
c_mutex_unlock = types.ExternalFunction("pthread_mutex_unlock", types.int32(types.voidptr))
c_cond_wait = types.ExternalFunction("pthread_cond_wait", types.int32(types.voidptr, types.voidptr))
c_cond_broadcast = types.ExternalFunction("pthread_cond_broadcast", types.int32(types.voidptr))
c_cond_timedwait = types.ExternalFunction("pthread_cond_timedwait",
                                          types.int32(types.voidptr, types.voidptr, types.voidptr))
c_fdatasync = types.ExternalFunction("fdatasync", types.int32(types.int32))
c_errno_location = types.ExternalFunction("__errno_location", types.CPointer(types.int32)())
c_clock_gettime = types.ExternalFunction("clock_gettime", types.int32(types.int32, types.voidptr))

#: int64 words reserved for each of the mutex and the condition variable (40 and 48 bytes on x86-64
#: glibc; 64 bytes cover every glibc ABI)
LOCK_WORDS = 8
C_STATE, C_FD, C_RESULT, C_STOP, C_ABANDONED, C_T_START, C_T_END = (2 * LOCK_WORDS + i for i in range(7))
CTL_WORDS = 2 * LOCK_WORDS + 8
#: request states
IDLE, REQUESTED, RUNNING, DONE = 0, 1, 2, 3
#: :func:`flush_finish`: the helper never took the request up (the caller flushes itself)
NOT_STARTED = -1
#: :func:`flush_finish`: the helper's ``fdatasync`` has not returned yet (the caller flushes itself)
IN_FLIGHT = -3
#: :func:`flush_start`: a request is still under way (the caller flushes itself)
BUSY = -2

_SOURCES_DIGEST = kernels_cache.sources_digest()
_CLOCK_MONOTONIC = 1
_CLOCK_REALTIME = 0
_ETIMEDOUT = 110


@intrinsic
def _get(typingctx, ctl, i):
    """``ctl[i]`` read as a sequentially consistent atomic load: never cached in a register nor
    moved across the lock calls (the compiler does not see that those calls publish the other
    thread's writes)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, "seq_cst", 8)
    return types.int64(ctl, i), codegen


@intrinsic
def _set(typingctx, ctl, i, v):
    """``ctl[i] = v`` as a sequentially consistent atomic store (see :func:`_get`)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        val = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(val, ptr, "seq_cst", 8)
        return context.get_dummy_value()
    return types.void(ctl, i, v), codegen


@njit(cache=True)
def _built_with():
    """The sources this module's cached code was compiled from (see :mod:`thinpool.kernels_cache`)."""
    return _SOURCES_DIGEST


@njit(cache=True, inline="always")
def _now(ts):
    c_clock_gettime(_CLOCK_MONOTONIC, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]


@njit(cache=True, nogil=True)
def flush_loop(ctl):
    """The helper thread's life: wait for a request, ``fdatasync`` its descriptor, post the result
    (0 or the errno), until ``ctl[C_STOP]`` is set.  Returns 0."""
    mu = ctl.ctypes.data
    cv = mu + 8 * LOCK_WORDS
    ts = np.zeros(2, np.int64)
    c_mutex_lock(mu)
    while True:
        while _get(ctl, C_STATE) != REQUESTED and _get(ctl, C_STOP) == 0:
            c_cond_wait(cv, mu)
        if _get(ctl, C_STOP) != 0:
            break
        _set(ctl, C_STATE, RUNNING)
        fd = np.int32(_get(ctl, C_FD))
        c_mutex_unlock(mu)
        _set(ctl, C_T_START, _now(ts))  # (when the flush began and ended: for measurements)
        err = np.int64(0)
        if c_fdatasync(fd) != 0:
            err = np.int64(c_errno_location()[0])
            if err == 0:
                err = np.int64(5)  # (EIO: a failure always carries an errno)
        t_end = _now(ts)
        c_mutex_lock(mu)
        _set(ctl, C_T_END, t_end)
        _set(ctl, C_RESULT, err)
        if _get(ctl, C_ABANDONED) != 0:  # (the requester flushed itself meanwhile: nobody reads this result)
            _set(ctl, C_ABANDONED, 0)
            _set(ctl, C_STATE, IDLE)
        else:
            _set(ctl, C_STATE, DONE)
        c_cond_broadcast(cv)
    c_mutex_unlock(mu)
    return 0


@njit(cache=True, nogil=True)
def flush_start(ctl, fd):
    """Ask the helper to flush ``fd``.  0, or :data:`BUSY` when a request is still under way."""
    mu = ctl.ctypes.data
    c_mutex_lock(mu)
    if _get(ctl, C_STATE) != IDLE:
        c_mutex_unlock(mu)
        return BUSY
    _set(ctl, C_FD, fd)
    _set(ctl, C_RESULT, 0)
    _set(ctl, C_STATE, REQUESTED)
    c_cond_broadcast(mu + 8 * LOCK_WORDS)
    c_mutex_unlock(mu)
    return 0


@njit(cache=True, nogil=True)
def flush_finish(ctl, wait_ns):
    """The end of the request :func:`flush_start` made: its ``fdatasync``'s result (0 or the errno)
    when the helper is done with it; :data:`NOT_STARTED` when the helper had not taken it up (or
    nothing was requested: taken back); :data:`IN_FLIGHT` when its ``fdatasync`` has not returned
    within ``wait_ns`` nanoseconds (abandoned: the helper drops its result).  Either way the
    request is over.  Waits only for a flush the helper began, and at most ``wait_ns``."""
    mu = ctl.ctypes.data
    c_mutex_lock(mu)
    if wait_ns > 0 and _get(ctl, C_STATE) == RUNNING:
        ts = np.zeros(2, np.int64)  # (a struct timespec: the deadline on the realtime clock)
        c_clock_gettime(_CLOCK_REALTIME, ts.ctypes.data)
        end = ts[0] * 1_000_000_000 + ts[1] + wait_ns
        ts[0], ts[1] = end // 1_000_000_000, end % 1_000_000_000
        while _get(ctl, C_STATE) == RUNNING:
            if c_cond_timedwait(mu + 8 * LOCK_WORDS, mu, ts.ctypes.data) == _ETIMEDOUT:
                break
    st = _get(ctl, C_STATE)
    r = _get(ctl, C_RESULT)
    if st == RUNNING:
        _set(ctl, C_ABANDONED, 1)
        r = IN_FLIGHT
    else:
        if st != DONE:
            r = NOT_STARTED
        _set(ctl, C_STATE, IDLE)
    c_mutex_unlock(mu)
    return r


@njit(cache=True, nogil=True)
def flush_stop(ctl):
    """Tell the helper to leave :func:`flush_loop` (after a flush under way, if any).  Returns 0."""
    mu = ctl.ctypes.data
    c_mutex_lock(mu)
    _set(ctl, C_STOP, 1)
    c_cond_broadcast(mu + 8 * LOCK_WORDS)
    c_mutex_unlock(mu)
    return 0


kernels_cache.check(globals(), _built_with)
