"""Naive references of the engine's kernels: slow, obvious, pure Python (stumpy's ``naive.py`` idea).

Each function computes, straight from the definition and on plain dicts and lists, what one kernel of
:mod:`thinpool.kernels` / :mod:`thinpool.walks` computes on the node-store arrays.  The tests in
``tests/engine/test_kernel_reference.py`` build random block maps, run both, and compare;
``perf`` times the kernel allocator against :class:`ReferenceAllocator`.

A block map is described by a :class:`Forest`: device roots, mid nodes and leaves as dicts of
``entry index -> child id`` (or ``-> packed mapping`` in a leaf), plus the root of each device (a
snapshot shares its origin's root).  Mappings are packed like dm-thin's:
``(data_block << 24) | (time & 0xFFFFFF)``.

Pure-Python data-block allocator, same semantics as ``kernels.alloc_data_block`` /
``kernels.allocate_many``: search linearly from the cursor (a cursor at or past the end restarts at
0), wrapping once around the device, for a block whose reference count is 0 **and** that was not
freed in this transaction; give it count 1, mark its reference-count page dirty, move the cursor
just past it and decrement the free counters.  It works on plain Python lists (converted once,
outside any timed region) so that it measures what a reasonable pure-Python allocator costs, not
numpy's per-element indexing overhead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RC_PAGE_BITS = 10      # 1024 counts per 4 KiB reference-count page
LEAF_BITS = 9          # 512 mappings per leaf
INNER_BITS = 10        # 1024 children per inner node
TIME_MASK = (1 << 24) - 1
UNMAPPED = (1 << 64) - 1


def pack(block: int, time: int) -> int:
    """A mapping as dm-thin packs it: data block in the high 40 bits, 24-bit time below."""
    return (block << 24) | (time & TIME_MASK)


def block_of(mapping: int) -> int:
    """The data block of a packed mapping."""
    return mapping >> 24


def time_of(mapping: int) -> int:
    """The 24-bit time of a packed mapping."""
    return mapping & TIME_MASK


def split_vb(vb: int) -> tuple[int, int, int]:
    """A virtual block's (root entry, mid entry, leaf entry)."""
    return vb >> (LEAF_BITS + INNER_BITS), (vb >> LEAF_BITS) & ((1 << INNER_BITS) - 1), vb & ((1 << LEAF_BITS) - 1)


def join_vb(r: int, m: int, i: int) -> int:
    """The virtual block at root entry ``r``, mid entry ``m``, leaf entry ``i``."""
    return (r << (LEAF_BITS + INNER_BITS)) | (m << LEAF_BITS) | i


# ----------------------------------------------------------------------------- block maps
@dataclass
class Forest:
    """A block map as plain dicts.  ``roots`` and ``mids`` map node id -> {entry: child id}; ``leaves``
    map leaf id -> {entry: packed mapping}; ``devices[k]`` is device k's root id.  Only nodes reachable
    from a device are live; a node's reference count is the number of its parents' entries (or, for
    a root, of devices) that point at it, counted over distinct live parents."""

    roots: dict[int, dict[int, int]] = field(default_factory=dict)
    mids: dict[int, dict[int, int]] = field(default_factory=dict)
    leaves: dict[int, dict[int, int]] = field(default_factory=dict)
    devices: list[int] = field(default_factory=list)

    def live(self) -> tuple[set[int], set[int], set[int]]:
        """The (roots, mids, leaves) reachable from some device."""
        roots = set(self.devices)
        mids = {m for r in roots for m in self.roots[r].values()}
        leaves = {leaf for m in mids for leaf in self.mids[m].values()}
        return roots, mids, leaves

    def refcounts(self) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
        """Reference counts of the live nodes: (roots and mids together as inner nodes, leaves, data blocks)."""
        roots, mids, leaves = self.live()
        inner: dict[int, int] = {}
        for r in self.devices:
            inner[r] = inner.get(r, 0) + 1
        for r in roots:
            for m in self.roots[r].values():
                inner[m] = inner.get(m, 0) + 1
        leaf_rc: dict[int, int] = {}
        for m in mids:
            for leaf in self.mids[m].values():
                leaf_rc[leaf] = leaf_rc.get(leaf, 0) + 1
        data: dict[int, int] = {}
        for leaf in leaves:
            for v in self.leaves[leaf].values():
                data[block_of(v)] = data.get(block_of(v), 0) + 1
        return inner, leaf_rc, data


def mappings(forest: Forest, dev: int) -> dict[int, int]:
    """Every mapping of device ``dev``: virtual block -> packed mapping."""
    out = {}
    for r, mid in forest.roots[forest.devices[dev]].items():
        for m, leaf in forest.mids[mid].items():
            for i, v in forest.leaves[leaf].items():
                out[join_vb(r, m, i)] = v
    return out


def lookup(forest: Forest, dev: int, vb: int) -> tuple[int, bool]:
    """``kernels.lookup``: the mapping of ``vb`` (UNMAPPED if none) and whether any node on the path
    to it, as far as the path goes, has more than one reference."""
    inner, leaf_rc, _ = forest.refcounts()
    r, m, i = split_vb(vb)
    root = forest.devices[dev]
    shared = inner[root] > 1
    if r not in forest.roots[root]:
        return UNMAPPED, shared
    mid = forest.roots[root][r]
    shared = shared or inner[mid] > 1
    if m not in forest.mids[mid]:
        return UNMAPPED, shared
    leaf = forest.mids[mid][m]
    shared = shared or leaf_rc[leaf] > 1
    return forest.leaves[leaf].get(i, UNMAPPED), shared


def segment_blocks(offset: int, length: int, bs: int) -> range:
    """The virtual blocks a byte range touches (none when ``length`` <= 0)."""
    if length <= 0:
        return range(0)
    return range(offset // bs, (offset + length - 1) // bs + 1)


def blocks_needed(forest: Forest, dev: int, snap_time: int, offsets: list[int], lengths: list[int], bs: int) -> int:
    """``kernels.blocks_needed``: how many distinct virtual blocks of a write batch need a new data
    block -- unmapped, mapped before the device's last snapshot (time < snap_time), or reached
    through a shared node."""
    need = set()
    for off, n in zip(offsets, lengths):
        for vb in segment_blocks(off, n, bs):
            v, shared = lookup(forest, dev, vb)
            if v == UNMAPPED or time_of(v) < snap_time or shared:
                need.add(vb)
    return len(need)


def discard(maps: list[dict[int, int]], dev: int, first: int, last: int) -> tuple[list[dict[int, int]], int, set[int]]:
    """``kernels.discard_range`` on the devices' mappings: device ``dev`` loses virtual blocks
    ``first..last-1``.  Returns (new mappings of every device, mappings removed, data blocks that no
    device references any more)."""
    new = [dict(m) for m in maps]
    removed = [vb for vb in new[dev] if first <= vb < last]
    for vb in removed:
        del new[dev][vb]
    before = {block_of(v) for m in maps for v in m.values()}
    after = {block_of(v) for m in new for v in m.values()}
    return new, len(removed), before - after


def logical_counts(maps: list[dict[int, int]], nr_data_blocks: int) -> list[int]:
    """``walks.logical_counts``: per data block, how many mapping entries of all devices reference it."""
    counts = [0] * nr_data_blocks
    for m in maps:
        for v in m.values():
            counts[block_of(v)] += 1
    return counts


def device_usage(dev_map: dict[int, int], counts: list[int]) -> tuple[int, int, int]:
    """``walks.device_usage``: (mapped, exclusive, highest mapped virtual block or -1) of one device;
    a block is exclusive when no other mapping entry anywhere references it (shared = mapped - exclusive)."""
    exclusive = sum(1 for v in dev_map.values() if counts[block_of(v)] == 1)
    return len(dev_map), exclusive, max(dev_map, default=-1)


# ----------------------------------------------------------------------------- data-block allocation


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
        """Copy the kernel's numpy state (``st`` indexed by ``schema.ST_*``)."""
        from thinpool import schema as K
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
        out: list[int] = []
        append = out.append
        for _ in range(count):
            b = self.alloc()
            if b < 0:
                break
            append(b)
        return out
