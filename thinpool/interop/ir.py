"""The intermediate representation shared by every metadata producer and consumer.

A :class:`Metadata` is one consistent, committed view of a pool's metadata in dm-thin's
vocabulary: a superblock and the thin devices with their mappings.  The pool exports to it
(``Pool.to_metadata``) and is built from it (``Pool.from_metadata``); the XML writer and
reader, the binary (real dm-thin) writer and reader and the thin_ls/thin_delta/thin_rmap
equivalents all consume or produce it.  Mappings are numpy arrays (never a Python object per
mapping) so that pools with millions of mappings stay cheap.

Sharing.  dm-thin shares btree subtrees between devices (a snapshot shares its origin's whole tree
until either is written).  The IR carries it in two ways, both optional: devices whose mappings are
the very same array objects (a producer hands a snapshot and its unchanged origin the same arrays,
so consumers treat the arrays as read-only) are known identical without looking; and
:func:`identical_runs` finds identical runs of mappings by content (hash, then exact comparison),
which is how the binary exporter writes shared nodes and the pool importer rebuilds shared leaves
from any source: our pool, kernel metadata, or thin_dump XML with or without 1.x ``def``/``ref``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_DEV_ID = (1 << 24) - 1
TIME_MASK = (1 << 24) - 1
SECTOR = 512


@dataclass
class Device:
    """One thin device: its details-tree entry and its mappings, sorted by virtual block.

    ``vblocks``/``dblocks`` are uint64 arrays, ``times`` a uint32 array (24-bit mapping times),
    all the same length and sorted by ``vblocks`` (strictly increasing).
    """

    dev_id: int
    mapped_blocks: int
    transaction: int
    creation_time: int
    snap_time: int
    vblocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    dblocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    times: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))

    def __post_init__(self) -> None:
        self.vblocks = np.ascontiguousarray(self.vblocks, dtype=np.uint64)
        self.dblocks = np.ascontiguousarray(self.dblocks, dtype=np.uint64)
        self.times = np.ascontiguousarray(self.times, dtype=np.uint32)


@dataclass
class Superblock:
    """The superblock fields that thin_dump prints (``data_block_size`` is in 512-byte sectors)."""

    time: int
    transaction: int
    data_block_size: int
    nr_data_blocks: int
    flags: int = 0
    version: int = 2
    uuid: str = ""
    #: block number of a held metadata snapshot (``held_root``), or None
    metadata_snap: int | None = None


@dataclass
class Metadata:
    """A superblock and its devices, sorted by ``dev_id``."""

    superblock: Superblock
    devices: list[Device] = field(default_factory=list)

    def device(self, dev_id: int) -> Device:
        for dev in self.devices:
            if dev.dev_id == dev_id:
                return dev
        raise KeyError(dev_id)


# ---------------------------------------------------------------------------------------------
# Sharing: identical runs


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix_inplace(x: np.ndarray) -> None:
    """splitmix64's finaliser, element-wise and in place on a uint64 array (wraps modulo 2^64)."""
    t = x >> np.uint64(30)
    x ^= t
    x *= _MIX1
    np.right_shift(x, np.uint64(27), out=t)
    x ^= t
    x *= _MIX2
    np.right_shift(x, np.uint64(31), out=t)
    x ^= t


def row_hashes(pos: np.ndarray, columns: list[np.ndarray]) -> np.ndarray:
    """Each row's hash for :func:`identical_runs`: splitmix64 over its position in its run (``pos``,
    uint64, overwritten and returned) and its value in each column, in order; a run's hash is the sum
    (modulo 2^64) of its rows' hashes, so runs may be hashed a part at a time."""
    h = pos
    h *= _GOLDEN
    for col in columns:
        h ^= col.astype(np.uint64, copy=False)
        _mix_inplace(h)
    return h


def first_of_equal_hashes(counts: np.ndarray, run_hash: np.ndarray) -> np.ndarray:
    """For each run, the lowest-numbered run of the same length and hash (itself if none): the
    candidate representative :func:`identical_runs` then confirms by comparing the rows."""
    n = len(counts)
    order = np.lexsort((np.arange(n), run_hash, counts))
    new_group = np.ones(n, bool)
    new_group[1:] = (run_hash[order][1:] != run_hash[order][:-1]) | (counts[order][1:] != counts[order][:-1])
    group_first = order[np.flatnonzero(new_group)]  # the lowest run index of each (length, hash) group
    rep = np.empty(n, np.int64)
    rep[order] = group_first[np.cumsum(new_group) - 1]
    return rep


def identical_runs(starts: np.ndarray, counts: np.ndarray, columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Which runs of rows are identical: ``(rep, unique)``.

    Run ``r`` is rows ``starts[r] .. starts[r] + counts[r]`` of every array in ``columns`` (equal-length
    integer arrays).  ``rep[r]`` is the first run (lowest index) holding exactly the same values in every
    column, ``r`` itself if none; ``unique`` lists the runs that are their own ``rep``, ascending.
    Runs are hashed (splitmix64 over each row's values and its position in the run, summed per run),
    grouped by (length, hash), and every run then compared element by element with its group's first
    run, so a hash collision only costs sharing, never correctness.  Vectorised: a few passes over the
    rows, no Python loop per run or row.
    """
    starts = np.asarray(starts, np.int64)
    counts = np.asarray(counts, np.int64)
    n = len(starts)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    total = int(counts.sum())
    first = np.cumsum(counts) - counts  # each run's first row in the gathered order
    pos = np.arange(total, dtype=np.uint64)
    pos -= np.repeat(first.astype(np.uint64), counts)
    contiguous = n == 1 or bool(np.all(starts[1:] == starts[:-1] + counts[:-1]))
    if contiguous:  # the runs tile one slice: no gather
        lo = int(starts[0])
        gathered = [np.asarray(col)[lo:lo + total] for col in columns]
    else:
        rows = np.repeat(starts, counts) + pos.astype(np.int64)
        gathered = [np.asarray(col)[rows] for col in columns]
    h = row_hashes(pos, gathered)
    del gathered
    run_hash = np.zeros(n, np.uint64)
    nonempty = counts > 0
    if total:
        run_hash[nonempty] = np.add.reduceat(h, first[nonempty])
    del h, pos
    rep = first_of_equal_hashes(counts, run_hash)
    check = np.flatnonzero(rep != np.arange(n))
    if check.size and total:
        ccount = counts[check]
        cpos = np.arange(int(ccount.sum()), dtype=np.int64) - np.repeat(np.cumsum(ccount) - ccount, ccount)
        mine = np.repeat(starts[check], ccount) + cpos
        theirs = np.repeat(starts[rep[check]], ccount) + cpos
        differs = np.zeros(mine.size, bool)
        for col in columns:
            col = np.asarray(col)
            differs |= col[mine] != col[theirs]
        if differs.any():  # a collision: those runs stay their own
            bad = np.unique(np.repeat(np.arange(check.size), ccount)[differs])
            rep[check[bad]] = check[bad]
    return rep, np.flatnonzero(rep == np.arange(n))
