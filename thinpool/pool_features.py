"""The pool's features: dm-thin's discard mode (passdown, nopassdown, ignore) and no-space policy
(``error_if_no_space``, ``no_space_timeout``), as stored with the pool and put in force.

:class:`Features` is a mixin of :class:`thinpool.pool.Pool` (the methods are the pool's; they live
here so each module holds one concept).  :func:`check_features` checks the values a caller gives
(creation, open, :meth:`Features.set_features`); :func:`kernel_flags` puts the settings the kernels
read into the pool's state array.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from . import rules
from . import schema as K
from .errors import InvalidArgument, ReadOnly
from .kernel_context import locked_method as _locked
from .nospace import DEFAULT_NO_SPACE_TIMEOUT, NoSpaceQueue, check_timeout


class Features:
    """The feature methods of :class:`~thinpool.pool.Pool` (see the module docstring)."""

    path: str
    read_only: bool
    _header: dict[str, Any]
    _st: np.ndarray
    _catalog_dirty: bool
    _lwm_fired: bool
    _nospace: NoSpaceQueue
    if TYPE_CHECKING:  # Pool's, declared here for the type checker only (nothing is defined at run time)
        def _check_writable(self) -> None: ...
        def commit(self) -> None: ...

    @property
    def features(self) -> dict[str, Any]:
        """The pool's features as stored: ``discard`` (passdown, nopassdown, ignore),
        ``error_if_no_space`` and ``no_space_timeout`` (seconds; 0: queued writes wait for ever)."""
        return {"discard": str(self._header.get("discard", "passdown")),
                "error_if_no_space": bool(self._header.get("error_if_no_space", True)),
                "no_space_timeout": float(self._header.get("no_space_timeout", DEFAULT_NO_SPACE_TIMEOUT))}

    @property
    def discard_mode(self) -> str:
        """``passdown``, ``nopassdown`` or ``ignore`` (see :meth:`set_features`)."""
        return str(self._header.get("discard", "passdown"))

    @_locked
    def set_features(self, *, discard: str | None = None, error_if_no_space: bool | None = None,
                     no_space_timeout: float | None = None) -> dict[str, Any]:
        """Change features of the open (active) pool, as a reload of dm-thin's pool table does, and
        store them (commits).  None keeps a feature.  Returns the features now in force.

        dm-thin's rules (``pool_ctr`` on a pool already active): passdown may be switched on or off
        and the no-space policy changed (writes waiting for space fail with ENOSPC when it becomes
        ``error_if_no_space``); discards cannot be turned off or on (``ignore``) -- InvalidArgument,
        nothing changed: close the pool and :meth:`open` it with ``discard=`` (a new activation).
        ``no_space_timeout`` applies to queued writes at once (it counts from the pool's entry into
        out-of-data-space)."""
        self._check_writable()
        features = check_features(discard, error_if_no_space, no_space_timeout)
        if "discard" in features:
            rules.check_discard_change(self.path, self.discard_mode, features["discard"])
        self._activate_features(features)
        self._lwm_fired = False  # a table reload and resume: dm-thin's pool_resume re-arms the low water event
        return self.features

    def _activate_features(self, features: dict[str, Any]) -> None:
        """Store ``features`` (already checked) and put them in force; commits if anything changed."""
        changed = {k: v for k, v in features.items() if self.features.get(k) != v}
        if not changed:
            return
        self._check_writable()
        if self.read_only:
            raise ReadOnly(f"pool {self.path} is opened read-only: its features cannot be changed")
        self._header.update(changed)
        kernel_flags(self._st, self._header)
        self._catalog_dirty = True  # a commit with only a header change still writes a new superblock
        self._nospace.configure(error_if_no_space=features.get("error_if_no_space"),
                                timeout=features.get("no_space_timeout"))
        self.commit()


def check_features(discard: Any, error_if_no_space: Any, no_space_timeout: Any) -> dict[str, Any]:
    """The given (not None) pool features, checked: InvalidArgument naming a bad one."""
    out: dict[str, Any] = {}
    if discard is not None:
        out["discard"] = rules.check_discard(discard)
    if error_if_no_space is not None:
        if not isinstance(error_if_no_space, bool):
            raise InvalidArgument(f"error_if_no_space must be true or false, got {error_if_no_space!r}")
        out["error_if_no_space"] = error_if_no_space
    if no_space_timeout is not None:
        out["no_space_timeout"] = check_timeout(no_space_timeout)
    return out


def kernel_flags(st: np.ndarray, header: Mapping[str, Any]) -> None:
    """The pool settings the kernels read from ``st``: zeroing of new blocks, discard passdown."""
    st[K.ST_ZERO_NEW] = bool(header.get("zero_new_blocks", True))
    st[K.ST_DISCARD_PASSDOWN] = header.get("discard", "passdown") == "passdown"
