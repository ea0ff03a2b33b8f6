"""Server-wide resource limits shared by the NBD sessions of one server.

See docs/nbd.md, "Limits: hostile or broken clients".
"""

from __future__ import annotations

import threading
import time


class PayloadBudget:
    """Bytes of large WRITE payloads buffered at once by all sessions of a server.

    A client can announce a 32 MiB WRITE and stall; a session holds only what has arrived (its buffer's
    pages are untouched until written) and reserves every chunk here before receiving it, so the memory
    stalled payloads pin is bounded by ``limit`` whatever the number of connections.  A session that
    cannot reserve waits (its client is not read, TCP flow control holds it back) until another session
    finishes or drops its message, or its own message deadline passes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, deadline: float | None, stopping: threading.Event) -> bool:
        """Reserve ``n`` bytes; False if ``deadline`` (monotonic) passes or the server stops first."""
        with self._cond:
            while self.used + n > self.limit:
                if stopping.is_set():
                    return False
                wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if wait <= 0:
                    return False
                self._cond.wait(wait)
            self.used += n
            return True

    def release(self, n: int) -> None:
        """Give back ``n`` reserved bytes."""
        if n:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


__all__ = ["PayloadBudget"]
