"""The pool's in-memory and on-disk record formats, defined once: the contract between the
pure-Python layers and the numba kernels.

- the block-map geometry (``LEAF_BITS`` ...) and the mapping value ``(data_block << 24) | time``
  (:func:`pack_mapping` / :func:`unpack_mapping`; the kernels inline the same rule);
- the device record: :data:`DEV_FIELDS` is the one list of fields; the ``struct`` (:data:`DEV_RECORD`),
  the numpy dtype (:func:`dev_dtype`) and the kernels' column indices (:class:`DevCol`, ``DEV_*``) are
  derived from it;
- :class:`DevFlag` (a device record's ``flags``) and :class:`Mode` (the pool's mode);
- :class:`St`, the indices of the kernels' int64 state vector ``st``; :class:`BlockState`, the bits of
  the data space map's per-block byte;
- :class:`KRow`, the rows of the kernel table (``KernelContext.table`` packs one ``(address, length)``
  row per array in this order; the kernels rebuild each array from its row);
- the kernels' return codes.

This module imports neither numpy nor numba: ``status``, ``ls`` and ``snapshot`` start without
them (:mod:`thinpool.devtable`).  The ``ST_*`` / ``DEV_*`` / ``KROW_*`` module constants are plain
ints equal to the enum members, for the hot paths and for the kernels (numba folds module-level
ints into the compiled code).
"""

from __future__ import annotations

import enum
import struct
from typing import Any

#: the discard setting -> the word dm-thin's pool_status prints for it
DISCARD_WORDS = {"passdown": "discard_passdown", "nopassdown": "no_discard_passdown", "ignore": "ignore_discard"}

# --------------------------------------------------------------------------- block map geometry
LEAF_BITS = 9
INNER_BITS = 10
LEAF_ENTRIES = 1 << LEAF_BITS          # 512 mappings per leaf (4 KiB)
INNER_ENTRIES = 1 << INNER_BITS        # 1024 children per inner node (4 KiB)
MAX_VBLOCKS = 1 << (LEAF_BITS + 2 * INNER_BITS)   # 2^29 virtual blocks per device
RC_PAGE_BITS = 10                       # 1024 uint32 counts per 4 KiB page

#: a hole in a leaf (all ones; the kernels compare against ``np.uint64(UNMAPPED)``)
UNMAPPED = 0xFFFF_FFFF_FFFF_FFFF
#: an empty child slot in an inner node, an exhausted free stack
NONE = -1

# --------------------------------------------------------------------------- mapping values
TIME_BITS = 24
TIME_MASK = (1 << TIME_BITS) - 1


def pack_mapping(block: Any, time: Any) -> Any:
    """A leaf's mapping value: data block ``block`` written at pool time ``time`` (dm-thin keeps
    the low 24 bits of the time); ints, or numpy uint64 arrays (element-wise)."""
    return (block << TIME_BITS) | (time & TIME_MASK)


def unpack_mapping(m: Any) -> tuple[Any, Any]:
    """``(data_block, time)`` of a mapping value (an int, or a numpy uint64 array: element-wise)."""
    try:
        return m >> TIME_BITS, m & TIME_MASK
    except TypeError:  # numpy uint64 arrays do not mix with Python ints in shifts
        import numpy as np
        return m >> np.uint64(TIME_BITS), m & np.uint64(TIME_MASK)


# --------------------------------------------------------------------------- the device record
#: one device record, 8 little-endian int64 fields (64 bytes); the order is the on-disk order
DEV_FIELDS = ("dev_id", "root", "mapped", "transaction", "creation_time", "snap_time", "size", "flags")
DEV_RECORD = struct.Struct("<" + "q" * len(DEV_FIELDS))
DEV_COLUMNS = len(DEV_FIELDS)

class DevCol(enum.IntEnum):
    """The column of each field in the int64 view of the device table (``devs_i[slot, DevCol.ROOT]``):
    :data:`DEV_FIELDS` in order (tests/engine/test_schema.py checks that they agree)."""

    DEV_ID = 0
    ROOT = 1
    MAPPED = 2
    TRANSACTION = 3
    CREATION_TIME = 4
    SNAP_TIME = 5
    SIZE = 6
    FLAGS = 7


DEV_ID = int(DevCol.DEV_ID)
DEV_ROOT = int(DevCol.ROOT)
DEV_MAPPED = int(DevCol.MAPPED)
DEV_TRANSACTION = int(DevCol.TRANSACTION)
DEV_CREATION_TIME = int(DevCol.CREATION_TIME)
DEV_SNAP_TIME = int(DevCol.SNAP_TIME)
DEV_SIZE = int(DevCol.SIZE)
DEV_FLAGS = int(DevCol.FLAGS)
#: a record's ``transaction`` is dm-thin's unsigned 64-bit transaction id (``set_transaction_id`` takes
#: any); its int64 field holds the same 8 bytes, so one of 2^63 or more reads back negative: mask with
#: this (``field & U64_MASK``) to get the id, and store :func:`transaction_field` of it
U64_MASK = (1 << 64) - 1


def transaction_field(transaction_id: int) -> int:
    """The int64 a record stores for the unsigned 64-bit ``transaction_id`` (the same 8 bytes)."""
    return transaction_id - (1 << 64) if transaction_id >= 1 << 63 else transaction_id

_dev_dtype = None


def dev_dtype() -> Any:
    """The device record as a numpy structured dtype (field names :data:`DEV_FIELDS`, each ``<i8``);
    numpy is imported on first use only."""
    global _dev_dtype
    if _dev_dtype is None:
        import numpy as np
        _dev_dtype = np.dtype([(f, "<i8") for f in DEV_FIELDS])
        assert _dev_dtype.itemsize == DEV_RECORD.size
    return _dev_dtype


class DevFlag(enum.IntFlag):
    """Bits of a device record's ``flags``."""
    IN_USE = 1       # the slot holds a device
    READ_ONLY = 2    # the device refuses writes and discards


# plain ints for the kernels (numba folds module-level ints, not enum members)
FLAG_IN_USE = int(DevFlag.IN_USE)
FLAG_READ_ONLY = int(DevFlag.READ_ONLY)


class Mode(enum.StrEnum):
    """The pool's mode (dm-thin's pool modes; the values are what status reports)."""
    WRITE = "write"
    OUT_OF_DATA_SPACE = "out-of-data-space"
    OUT_OF_METADATA_SPACE = "out-of-metadata-space"
    READ_ONLY = "read-only"
    FAIL = "fail"


# --------------------------------------------------------------------------- the state vector


class St(enum.IntEnum):
    """Indices into the kernels' int64 state vector ``st``."""
    CURSOR = 0          # data allocation cursor (next block to try)
    NR_FREE = 1         # data blocks with count 0 (including those freed in this transaction)
    NR_ALLOCATABLE = 2  # free and not freed in this transaction
    LEAF_FREE = 3       # entries on the leaf free stack
    INNER_FREE = 4      # entries on the inner free stack
    TIME = 5            # pool time (snapshot counter)
    BLOCK_SIZE = 6      # data block size in bytes
    NR_BLOCKS = 7       # data blocks in the pool
    LEAVES_LIVE = 8     # leaves with count > 0
    INNERS_LIVE = 9     # inner nodes with count > 0
    EPOCH = 10          # bumped whenever an array the kernels use is reallocated (see KernelContext.table)
    # I/O counters since the state was loaded (Pool.io_counters; the kernels add, nothing resets them)
    PROVISIONED = 11    # writes that mapped an unmapped virtual block (first writes)
    PROVISIONED_PARTIAL = 12  # of those, the ones that did not cover the whole block
    COW_BREAKS = 13     # writes to a shared block that broke sharing (a new block)
    COW_PARTIAL = 14    # of those, the ones that did not cover the whole block (the old block is copied)
    ZERO_NEW = 15       # 1: a new block reads as zeroes where not written (zero_new_blocks); 0: old bytes show
    DISCARD_PASSDOWN = 16  # 1: a discard's freed blocks are hole-punched when released (discard passdown)


ST_SIZE = len(St)
ST_CURSOR = int(St.CURSOR)
ST_NR_FREE = int(St.NR_FREE)
ST_NR_ALLOCATABLE = int(St.NR_ALLOCATABLE)
ST_LEAF_FREE = int(St.LEAF_FREE)
ST_INNER_FREE = int(St.INNER_FREE)
ST_TIME = int(St.TIME)
ST_BLOCK_SIZE = int(St.BLOCK_SIZE)
ST_NR_BLOCKS = int(St.NR_BLOCKS)
ST_LEAVES_LIVE = int(St.LEAVES_LIVE)
ST_INNERS_LIVE = int(St.INNERS_LIVE)
ST_EPOCH = int(St.EPOCH)
ST_PROVISIONED = int(St.PROVISIONED)
ST_PROVISIONED_PARTIAL = int(St.PROVISIONED_PARTIAL)
ST_COW_BREAKS = int(St.COW_BREAKS)
ST_COW_PARTIAL = int(St.COW_PARTIAL)
ST_ZERO_NEW = int(St.ZERO_NEW)
ST_DISCARD_PASSDOWN = int(St.DISCARD_PASSDOWN)


class BlockState(enum.IntFlag):
    """Bits of the data space map's per-block byte (``freed_txn``, the kernel table's FREED_TXN row).

    The low two bits are the allocator's state (a block is allocatable iff they are 0 and its count is
    0); the others say what the block's bytes are."""
    FREED = 1       # freed in this transaction: not allocatable until the commits that free it are durable
    PENDING = 2     # freed by the last commit: released (allocatable) after the next one
    STATE = 3       # mask of the two state bits
    STALE = 4       # may hold old bytes (freed without a hole punch): a reuse must zero what it does not write
    PASSDOWN = 8    # freed by a discard with passdown: hole-punched when released


BLOCK_FREED = int(BlockState.FREED)
BLOCK_PENDING = int(BlockState.PENDING)
BLOCK_STATE = int(BlockState.STATE)
BLOCK_STALE = int(BlockState.STALE)
BLOCK_PASSDOWN = int(BlockState.PASSDOWN)


# --------------------------------------------------------------------------- the kernel table


class KRow(enum.IntEnum):
    """Rows of the kernel table: one ``(address, length)`` row per array, in this order.  The first
    ten are the node store (the ``nodes`` tuple, in the same order); the next three the data space
    map (the ``space`` tuple)."""
    LEAVES = 0           # uint64[n, LEAF_ENTRIES]
    INNERS = 1           # int32[n, INNER_ENTRIES]
    LEAF_RC = 2          # uint32[n]
    INNER_RC = 3         # uint32[n]
    LEAF_DIRTY = 4       # uint8[n]
    INNER_DIRTY = 5      # uint8[n]
    LEAF_RC_DIRTY = 6    # uint8[n >> RC_PAGE_BITS]
    INNER_RC_DIRTY = 7   # uint8[n >> RC_PAGE_BITS]
    LEAF_FREE = 8        # int32[n]: free stack
    INNER_FREE = 9       # int32[n]: free stack
    DATA_RC = 10         # uint32[nr_data_blocks]
    FREED_TXN = 11       # uint8[nr_data_blocks]: BlockState bits (freed in this transaction, pending, stale)
    RC_DIRTY = 12        # uint8[nr_data_blocks >> RC_PAGE_BITS]
    ST = 13              # int64[ST_SIZE]
    SCRATCH = 14         # uint8[block_size]: one block of scratch


KROW_COUNT = len(KRow)
KROW_LEAVES = int(KRow.LEAVES)
KROW_INNERS = int(KRow.INNERS)
KROW_LEAF_RC = int(KRow.LEAF_RC)
KROW_INNER_RC = int(KRow.INNER_RC)
KROW_LEAF_DIRTY = int(KRow.LEAF_DIRTY)
KROW_INNER_DIRTY = int(KRow.INNER_DIRTY)
KROW_LEAF_RC_DIRTY = int(KRow.LEAF_RC_DIRTY)
KROW_INNER_RC_DIRTY = int(KRow.INNER_RC_DIRTY)
KROW_LEAF_FREE = int(KRow.LEAF_FREE)
KROW_INNER_FREE = int(KRow.INNER_FREE)
KROW_DATA_RC = int(KRow.DATA_RC)
KROW_FREED_TXN = int(KRow.FREED_TXN)
KROW_RC_DIRTY = int(KRow.RC_DIRTY)
KROW_ST = int(KRow.ST)
KROW_SCRATCH = int(KRow.SCRATCH)

#: the rows of the ``nodes`` tuple's arrays, in the tuple's order (BlockMap.nodes, kernels' ``nodes[i]``)
NODE_ROWS = (KRow.LEAVES, KRow.INNERS, KRow.LEAF_RC, KRow.INNER_RC, KRow.LEAF_DIRTY, KRow.INNER_DIRTY,
             KRow.LEAF_RC_DIRTY, KRow.INNER_RC_DIRTY, KRow.LEAF_FREE, KRow.INNER_FREE)
#: the rows of the ``space`` tuple's arrays, in the tuple's order (DataSpaceMap.arrays)
SPACE_ROWS = (KRow.DATA_RC, KRow.FREED_TXN, KRow.RC_DIRTY)
NODE_ARRAYS = len(NODE_ROWS)


def kernel_table(nodes: tuple, space: tuple, st: Any, scratch: Any) -> Any:
    """The kernel table: an int64 array of one ``(address, length)`` row per array, each array in
    the row :class:`KRow` names (the kernels decode it by the same names).  The caller keeps the
    arrays alive as long as the table is used."""
    import numpy as np
    named = dict(zip(NODE_ROWS, nodes))
    named.update(zip(SPACE_ROWS, space))
    named[KRow.ST] = st
    named[KRow.SCRATCH] = scratch
    tab = np.empty((KROW_COUNT, 2), np.int64)
    for row in KRow:
        a = named[row]
        if not (a.flags.c_contiguous and a.flags.writeable):
            raise ValueError(f"kernel table row {row.name}: the array must be C-contiguous and writable")
        tab[row] = a.ctypes.data, a.shape[0]
    return tab

# --------------------------------------------------------------------------- kernel return codes
OK = 0
NEED_NODES = -1
NO_SPACE = -2
IO_ERROR = -3
