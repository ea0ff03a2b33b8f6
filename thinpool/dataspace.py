"""The data space map in memory: one reference count per data block, and the allocator's bookkeeping
(the on-disk space-map format of the interop tools is :mod:`thinpool.interop.sm_disk`).

``data_rc[b]`` counts the distinct leaves that map block ``b`` (dm-thin's rule).  A block whose
count drops to zero is marked in ``freed_txn`` (1) and is not allocatable in this transaction
(docs/dm-thin.md §7), so a crash can never expose a block the last commit still maps.  One step
stricter than the kernel, the commit that frees it keeps it reserved (2, "pending") until the
*next* commit is durable: the previous commit -- the one a damaged newest superblock falls back
to -- still maps it, so it must be neither punched nor reused before then.
"""

from __future__ import annotations

import numpy as np

from . import schema as K


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class DataSpaceMap:
    """Reference counts, the freed-this-transaction marks and page dirty flags for the data device."""

    def __init__(self, st: np.ndarray, nr_blocks: int, data_rc: np.ndarray | None = None) -> None:
        self.st = st
        cap = _round_up(max(nr_blocks, 1), 1 << K.RC_PAGE_BITS)
        if data_rc is not None and len(data_rc) == cap and data_rc.flags.writeable:
            self.data_rc = data_rc  # the loaded pages, used in place
        else:
            self.data_rc = np.zeros(cap, np.uint32)
            if data_rc is not None:
                n = min(len(data_rc), cap)
                self.data_rc[:n] = data_rc[:n]
        self.freed_txn = np.zeros(cap, np.uint8)
        self.rc_dirty = np.zeros(cap >> K.RC_PAGE_BITS, np.uint8)
        self.pending = np.zeros(0, np.int64)  # freed by the last commit, released by the next
        st[K.ST_NR_BLOCKS] = nr_blocks
        self.recount()

    @property
    def arrays(self) -> tuple:
        """The ``space`` tuple every kernel takes: (data_rc, freed_txn, rc_dirty) (see
        :mod:`thinpool.kernels_map`)."""
        return (self.data_rc, self.freed_txn, self.rc_dirty)

    @property
    def nr_blocks(self) -> int:
        return int(self.st[K.ST_NR_BLOCKS])

    def recount(self) -> None:
        """Recompute the free counters from the counts (after load, import or a commit)."""
        n = self.nr_blocks
        free = int(np.count_nonzero(self.data_rc[:n] == 0))
        self.st[K.ST_NR_FREE] = free
        self.st[K.ST_NR_ALLOCATABLE] = free - int(np.count_nonzero(self.freed_txn[:n]))

    def used(self) -> int:
        return self.nr_blocks - int(self.st[K.ST_NR_FREE])

    def freed_blocks(self) -> np.ndarray:
        """Blocks freed in this transaction (scanning only the dirty count pages)."""
        pages = np.flatnonzero(self.rc_dirty)
        if len(pages) == 0:
            return np.zeros(0, np.int64)
        per = 1 << K.RC_PAGE_BITS
        idx = (pages[:, None] * per + np.arange(per)[None, :]).reshape(-1)
        return idx[self.freed_txn[idx] == 1]

    def set_pending(self, blocks: np.ndarray) -> None:
        """Blocks freed by the commit just made: reserved until the next commit is durable."""
        self.pending = np.asarray(blocks, np.int64)
        self.freed_txn[self.pending] = 2

    def release(self, freed: np.ndarray) -> None:
        """After a commit: blocks freed in the committed transaction become allocatable."""
        self.freed_txn[freed] = 0
        self.st[K.ST_NR_ALLOCATABLE] += len(freed)

    def resize(self, nr_blocks: int) -> None:
        """Grow to ``nr_blocks`` (shrinking is not supported, as in dm-thin)."""
        cap = _round_up(nr_blocks, 1 << K.RC_PAGE_BITS)
        self.st[K.ST_EPOCH] += 1
        if cap > len(self.data_rc):
            extra = cap - len(self.data_rc)
            self.data_rc = np.concatenate([self.data_rc, np.zeros(extra, np.uint32)])
            self.freed_txn = np.concatenate([self.freed_txn, np.zeros(extra, np.uint8)])
            self.rc_dirty = np.concatenate([self.rc_dirty, np.ones(extra >> K.RC_PAGE_BITS, np.uint8)])
        self.st[K.ST_NR_BLOCKS] = nr_blocks
        self.recount()
