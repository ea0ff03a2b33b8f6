"""Writes that wait for data space: dm-thin's ``queue_if_no_space`` and ``no_space_timeout``.

When a write needs a data block and the pool has none (even after the commits that release the
blocks freed earlier), the pool enters out-of-data-space mode.  What happens to that write is the
pool's no-space policy (docs/dm-thin.md §9):

* ``error_if_no_space``: it fails at once with ENOSPC (:class:`~thinpool.errors.NoSpace`);
* ``queue_if_no_space`` (the kernel's default): it waits -- an NBD request is held, a library call
  blocks -- until the pool leaves out-of-data-space mode (a ``resize``, or a commit that finds free
  blocks after discards or deletes), then it is retried.  If the pool is still out of space
  ``no_space_timeout`` seconds after it entered that mode (60 by default, the kernel module's
  ``no_space_timeout``; 0 waits for ever), every waiting write fails with ENOSPC and the pool then
  behaves as ``error_if_no_space`` -- and its status line says so -- until it leaves the mode (the
  kernel's ``do_no_space_timeout`` sets ``pf.error_if_no_space``; ``set_pool_mode(PM_WRITE)``
  restores the requested policy).

A waiting writer holds nothing: it waits on a :class:`threading.Condition` of the pool's own
re-entrant lock, which ``wait`` releases completely (however deeply the writer held it), so a resize,
discard, delete or commit from another thread -- or another NBD connection, or the control socket --
runs meanwhile.  :meth:`NoSpaceQueue.mode_changed` wakes every waiter when the pool leaves the mode,
and :meth:`NoSpaceQueue.wake_all` when it closes.  Nothing here does I/O; the pool owns the object
and the write path (:mod:`thinpool.thin`) calls :meth:`NoSpaceQueue.wait`.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

from .errors import InvalidArgument, WaitCancelled
from .schema import Mode

#: the kernel's default ``no_space_timeout`` (dm-thin.c ``NO_SPACE_TIMEOUT_SECS``), in seconds
DEFAULT_NO_SPACE_TIMEOUT = 60.0
#: the longest ``no_space_timeout`` accepted (a day; 0 means for ever)
MAX_NO_SPACE_TIMEOUT = 86400.0
#: how often a waiter with an ``abort`` check looks at it (seconds)
ABORT_POLL = 0.1


def check_timeout(value: Any) -> float:
    """A ``no_space_timeout`` in seconds: a finite number 0 .. :data:`MAX_NO_SPACE_TIMEOUT` (0 queues
    for ever); InvalidArgument naming the value otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"no_space_timeout must be a number of seconds, got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int past the float range
        v = math.inf
    if not math.isfinite(v) or v < 0 or v > MAX_NO_SPACE_TIMEOUT:
        shown = repr(value) if not isinstance(value, int) or value.bit_length() <= 128 else \
            f"a {value.bit_length()}-bit integer"
        raise InvalidArgument(f"no_space_timeout must be between 0 (wait for ever) and {MAX_NO_SPACE_TIMEOUT:g} "
                              f"seconds, got {shown}")
    return v + 0.0  # -0.0 (a JSON or CLI "-0") is stored and shown as 0.0


class NoSpaceQueue:
    """The no-space policy of one open pool and the writers waiting under it (see the module docstring).

    ``lock`` is the pool's re-entrant lock; every method is called with it held or takes it.
    """

    def __init__(self, lock: Any) -> None:
        self.cond = threading.Condition(lock)
        #: the requested policy: fail at once (True) or queue (False)
        self.error_if_no_space = True
        #: seconds a queued write may wait from the pool's entry into out-of-data-space (0: for ever)
        self.timeout = DEFAULT_NO_SPACE_TIMEOUT
        self._entered: float | None = None  # monotonic time of the entry into out-of-data-space
        self._expired = False               # the timeout passed: error_if_no_space until the mode is left
        #: writers waiting right now
        self.waiting = 0

    # ------------------------------------------------------------------ policy
    def configure(self, *, error_if_no_space: bool | None = None, timeout: float | None = None) -> None:
        """Change the requested policy (a reload of the pool's table).  Switching to queueing while out
        of data space starts the timeout afresh (the kernel queues its timeout work then); switching
        to erroring fails the waiting writes."""
        with self.cond:
            if timeout is not None:
                self.timeout = check_timeout(timeout)
            if error_if_no_space is not None:
                was = self.error_if_no_space
                self.error_if_no_space = bool(error_if_no_space)
                if was and not self.error_if_no_space and self._entered is not None:
                    self._entered = time.monotonic()
                    self._expired = False
            self.cond.notify_all()

    def errors_now(self) -> bool:
        """Whether a write needing a block fails at once now: the policy is ``error_if_no_space``, or
        the queue's timeout has passed since the pool ran out of space."""
        if self.error_if_no_space or self._expired:
            return True
        if self._entered is not None and self.timeout > 0 and time.monotonic() >= self._entered + self.timeout:
            self._expired = True
            with self.cond:
                self.cond.notify_all()
            return True
        return False

    def deadline(self) -> float | None:
        """Monotonic time at which queued writes fail (None: no timeout running)."""
        if self._entered is None or self.timeout <= 0 or self.error_if_no_space:
            return None
        return self._entered + self.timeout

    # ------------------------------------------------------------------ mode changes
    def mode_changed(self, old: Mode, new: Mode) -> None:
        """The pool went from mode ``old`` to ``new``: entering out-of-data-space starts the timeout;
        leaving it (for any mode) restores the requested policy and wakes every waiting writer."""
        if new == old:
            return
        if new == Mode.OUT_OF_DATA_SPACE:
            self._entered = time.monotonic()
            self._expired = False
        elif old == Mode.OUT_OF_DATA_SPACE:
            self._entered = None
            self._expired = False
            self.wake_all()

    def wake_all(self) -> None:
        """Wake every waiting writer (it re-checks the pool: mode, open, volume)."""
        with self.cond:
            self.cond.notify_all()

    # ------------------------------------------------------------------ waiting
    def wait(self, out_of_space: Callable[[], bool], check: Callable[[], None],
             abort: Callable[[], bool] | None = None) -> bool:
        """Wait, with the pool's lock released, while ``out_of_space()``; call with the lock held.

        Returns True when the write should be retried (the pool left out-of-data-space), False when it
        must fail with ENOSPC (the policy is, or has become, ``error_if_no_space``: the timeout passed).
        ``check()`` runs after every wake-up and raises if the write cannot go on (pool closed, turned
        read-only, volume deleted).  ``abort()`` (looked at every :data:`ABORT_POLL` seconds) gives the
        write up: :class:`~thinpool.errors.WaitCancelled`.
        """
        with self.cond:
            self.waiting += 1
            try:
                while out_of_space():
                    if self.errors_now():
                        return False
                    deadline = self.deadline()
                    step = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if abort is not None:
                        step = ABORT_POLL if step is None else min(step, ABORT_POLL)
                    self.cond.wait(step)
                    check()
                    if abort is not None and abort():
                        raise WaitCancelled("the write waiting for data space was given up by its caller")
                return True
            finally:
                self.waiting -= 1
