"""Pure-Python reference of the data-block allocator in :mod:`thinpool.kernels`.

Same semantics as ``kernels.alloc_data_block`` / ``kernels.allocate_many``: search linearly from the
cursor (a cursor at or past the end restarts at 0), wrapping once around the device, for a block whose
reference count is 0 **and** that was not freed in this transaction; give it count 1, mark its
reference-count page dirty, move the cursor just past it and decrement the free counters.

It works on plain Python lists (converted once, outside any timed region) so that it measures what a
reasonable pure-Python allocator costs, not numpy's per-element indexing overhead.
"""

from __future__ import annotations

RC_PAGE_BITS = 10  # kernels.RC_PAGE_BITS: 1024 counts per 4 KiB page


class ReferenceAllocator:
    """State: ``counts`` (list of int), ``freed`` (list of 0/1), ``rc_dirty`` (list of 0/1 per page),
    ``cursor``, ``nr_free``, ``nr_allocatable``, ``nr_blocks``."""

    def __init__(self, counts, freed, rc_dirty, cursor: int, nr_free: int, nr_allocatable: int,
                 nr_blocks: int | None = None) -> None:
        self.counts = list(counts)
        self.freed = list(freed)
        self.rc_dirty = list(rc_dirty)
        self.cursor = int(cursor)
        self.nr_free = int(nr_free)
        self.nr_allocatable = int(nr_allocatable)
        self.nr_blocks = len(self.counts) if nr_blocks is None else int(nr_blocks)

    @classmethod
    def from_kernel_state(cls, data_rc, freed_txn, rc_dirty, st) -> "ReferenceAllocator":
        """Copy the kernel's numpy state (``st`` indexed by ``kernels.ST_*``)."""
        from thinpool import kernels as K
        return cls(data_rc.tolist(), freed_txn.tolist(), rc_dirty.tolist(), int(st[K.ST_CURSOR]),
                   int(st[K.ST_NR_FREE]), int(st[K.ST_NR_ALLOCATABLE]), int(st[K.ST_NR_BLOCKS]))

    def find_free(self) -> int:
        n = self.nr_blocks
        c = self.cursor
        if c >= n:
            c = 0
        counts, freed = self.counts, self.freed
        # two linear passes instead of a modulo per step: [c, n) then [0, c)
        for b in range(c, n):
            if counts[b] == 0 and not freed[b]:
                return b
        for b in range(0, c):
            if counts[b] == 0 and not freed[b]:
                return b
        return -1

    def alloc(self) -> int:
        """Allocate one block; -1 when none is allocatable."""
        b = self.find_free()
        if b < 0:
            return -1
        self.counts[b] = 1
        self.rc_dirty[b >> RC_PAGE_BITS] = 1
        self.cursor = b + 1
        self.nr_free -= 1
        self.nr_allocatable -= 1
        return b

    def allocate_many(self, count: int) -> list[int]:
        """Allocate up to ``count`` blocks; returns them (fewer when space runs out)."""
        out = []
        append = out.append
        for _ in range(count):
            b = self.alloc()
            if b < 0:
                break
            append(b)
        return out
