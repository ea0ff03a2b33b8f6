"""Layout constants shared by the kernels and the pure-Python layers.

Kept apart from :mod:`thinpool.kernels` so that code which only needs the layout (opening a pool,
status, snapshots, commits) does not import numba.
"""

import numpy as np

LEAF_BITS = 9
INNER_BITS = 10
LEAF_ENTRIES = 1 << LEAF_BITS          # 512 mappings per leaf (4 KiB)
INNER_ENTRIES = 1 << INNER_BITS        # 1024 children per inner node (4 KiB)
MAX_VBLOCKS = 1 << (LEAF_BITS + 2 * INNER_BITS)   # 2^29 virtual blocks per device
RC_PAGE_BITS = 10                       # 1024 uint32 counts per 4 KiB page

UNMAPPED = np.uint64(0xFFFFFFFFFFFFFFFF)
NONE = -1
TIME_MASK = 0xFFFFFF

# indices into the int64 state vector ``st``
ST_CURSOR = 0        # data allocation cursor (next block to try)
ST_NR_FREE = 1       # data blocks with count 0 (including those freed in this transaction)
ST_NR_ALLOCATABLE = 2  # free and not freed in this transaction
ST_LEAF_FREE = 3     # entries on the leaf free stack
ST_INNER_FREE = 4    # entries on the inner free stack
ST_TIME = 5          # pool time (snapshot counter)
ST_BLOCK_SIZE = 6    # data block size in bytes
ST_NR_BLOCKS = 7     # data blocks in the pool
ST_LEAVES_LIVE = 8   # leaves with count > 0
ST_INNERS_LIVE = 9   # inner nodes with count > 0
ST_EPOCH = 10        # bumped whenever an array the kernels use is reallocated (see Pool._kernel_table)
ST_SIZE = 11

# columns of a device record (the pool's device table viewed as int64[n, 8]); kernels take one row
DEV_ID = 0
DEV_ROOT = 1
DEV_MAPPED = 2
DEV_TRANSACTION = 3
DEV_CREATION_TIME = 4
DEV_SNAP_TIME = 5
DEV_SIZE = 6
DEV_FLAGS = 7
DEV_COLUMNS = 8

# return codes
OK = 0
NEED_NODES = -1
NO_SPACE = -2
IO_ERROR = -3
