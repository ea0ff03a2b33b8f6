"""thinpool: a faithful, fast simulator of Linux device-mapper thin provisioning (dm-thin).

>>> from thinpool import Pool
>>> pool = Pool.create("/tmp/pool", data_size="1GiB")          # doctest: +SKIP
>>> base = pool.create_thin("base", size="10GiB")               # doctest: +SKIP
>>> snap = pool.snapshot("base", "snap1")                       # O(1), copies nothing

Names are imported lazily so that ``import thinpool`` (and the CLI) stays fast; numba is only
loaded when a kernel first runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import jit_cache as _jit_cache
from .errors import (AlreadyExists, Busy, FailedPrecondition, InvalidArgument, MetadataCorrupt, NoSpace, NotFound,
                     PoolLocked, ReadOnly, ThinpoolError)
from .units import parse_size

_jit_cache.configure()  # before numba is imported: a usable kernel cache even without a writable HOME

_LAZY = {"Pool": "pool", "PoolStatus": "status", "Usage": "status", "Thin": "thin"}

if TYPE_CHECKING:
    from .pool import Pool
    from .status import PoolStatus, Usage
    from .thin import Thin


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'thinpool' has no attribute {name!r}")


__all__ = ["Pool", "Thin", "PoolStatus", "Usage", "parse_size", "ThinpoolError", "InvalidArgument", "NotFound",
           "AlreadyExists", "Busy", "FailedPrecondition", "NoSpace", "ReadOnly", "PoolLocked", "MetadataCorrupt"]
__version__ = "0.1.0"
