"""thinpool: a faithful, fast simulator of Linux device-mapper thin provisioning (dm-thin).

>>> from thinpool import Pool
>>> pool = Pool.create("/tmp/pool", data_size="1GiB")          # doctest: +SKIP
>>> base = pool.create_thin("base", size="10GiB")               # doctest: +SKIP
>>> snap = pool.snapshot("base", "snap1")                       # O(1), copies nothing
"""

from .errors import (AlreadyExists, FailedPrecondition, InvalidArgument, MetadataCorrupt, NoSpace, NotFound,
                     PoolLocked, ReadOnly, ThinpoolError)
from .pool import Pool, PoolStatus, Usage
from .thin import Thin
from .units import parse_size

__all__ = ["Pool", "Thin", "PoolStatus", "Usage", "parse_size", "ThinpoolError", "InvalidArgument", "NotFound",
           "AlreadyExists", "FailedPrecondition", "NoSpace", "ReadOnly", "PoolLocked", "MetadataCorrupt"]
__version__ = "0.1.0"
