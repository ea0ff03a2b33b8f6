"""Active volumes: an :class:`Activation` holds a volume the way a loaded dm-thin thin target keeps
its device open, so deleting it is refused (``Busy``) until it is released.  The holding itself is
the pool's kernel context's (``hold`` / ``unhold``); :meth:`thinpool.pool.Pool.activate` makes one.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .thin import Thin


class Activation:
    """A volume held active (dm-thin: a loaded thin target has the device open), from
    :meth:`thinpool.pool.Pool.activate`.  While held, deleting the volume raises
    :class:`~thinpool.errors.Busy`.  :meth:`release` (idempotent) or leaving ``with ... as vol:`` (which
    gives :attr:`thin`) ends it; closing the pool ends every activation."""

    __slots__ = ("thin", "holder", "_held")

    def __init__(self, thin: Thin, holder: str) -> None:
        """Hold ``thin``'s volume for ``holder`` (prefer :meth:`thinpool.pool.Pool.activate`)."""
        ctx = thin._ctx
        with ctx.lock:
            thin._slot()  # NotFound if the volume is gone
            ctx.origin(thin._key)  # activating checks the external origin (FailedPrecondition if it changed)
            ctx.hold(thin._key, holder)
        #: the volume's handle
        self.thin = thin
        #: who holds it (shown by :meth:`thinpool.pool.Pool.holders` and in Busy's message)
        self.holder = holder
        self._held = True

    @property
    def held(self) -> bool:
        """Whether this activation still holds the volume."""
        return self._held

    def release(self) -> None:
        """Stop holding the volume (a second call does nothing)."""
        ctx = self.thin._ctx
        with ctx.lock:
            if self._held:
                self._held = False
                ctx.unhold(self.thin._key, self.holder)

    def __enter__(self) -> Thin:
        return self.thin

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Activation {self.thin.name!r} by {self.holder!r}{'' if self._held else ' released'}>"
