"""The block map's nodes in the metadata file: dense nodes on their own page, sparse ones packed.

In memory a leaf is 512 mappings and an inner node 1,024 children (4 KiB each, all-ones = a hole;
see :mod:`thinpool.blockmap`).  Stored one node per page, a node would cost a block however few
entries it holds, where a dm-thin btree node packs up to 252 mappings (126 children) of any keys.
Metadata format 5 stores each kind of node (:data:`LEAVES`, :data:`INNERS`) in two arrays (format 4
stored the leaves so, the inner nodes one per page):

- ``leaf_dense`` / ``inner_dense``: a **dense** node (live, more than ``kind.dense`` entries: 192 of
  a leaf, 340 of an inner node) keeps its own page, page ``s`` for slot ``s``, stored as it is in
  memory -- so a commit that changes a dense node writes that one page;
- ``leaf_packs`` / ``inner_packs``: every other live node with an entry is a **record** ``(slot,
  count, count x (entry index, value))``: 6 bytes, plus 10 per mapping of a leaf (8 of value, 2 of
  index) or 6 per child of an inner node, and records are packed into pages of consecutive slots.  A
  page holds the records of the slots from its lowest slot up to the next page's lowest (its
  *key*); a dense node has a record too (count :data:`MARK`, no entries), which says that its own
  page is stored.  Page layout: uint16 record count, uint16 entry count, uint32 tag, then the
  entries' values, the records' slots (uint32), counts (uint16) and the entries' indices (uint16).

A commit re-packs only the pages whose records changed (a sparse node written, a node turning dense,
sparse, empty or dead): their records are cut into as few pages as hold them (of about equal fill
when that takes no more pages); a page left less than half full takes in its neighbour.  So a commit
that changes one sparse node writes one to three pack pages, one that changes a dense node its own
page.  Pages are never overwritten in place: the store writes every changed page to a fresh block
(shadowing, :mod:`thinpool.mdstore`).  A dense leaf costs 4 KiB for 193..512 mappings (<= 21.3
bytes each), a sparse one 6 bytes plus 10 per mapping; a device root or mid node with a few
children a few dozen bytes.

Older layouts are read as they are and converted by the first commit (which releases their pages):
inner nodes one per page (array ``inners``, formats 1-4); leaves one per page (array ``leaves``,
formats 1 and 2) or in format 3's groups (array ``leaf_groups``: slots in groups of 16, dense leaves
on their own page in the group's span, the sparse leaves of a group as one stream of a dense mask, a
bitmap of the mapped entries and their values: :mod:`thinpool.nodes_format3`).
"""

from __future__ import annotations

import mmap
import sys
from typing import Any, Callable, Mapping

import numpy as np

from . import faultguard, nodepacks, nodes_format3
from .errors import MetadataCorrupt
from .mdpages import BLOCK, MAP_SPARSE, PageUpdates, sorted_minus, sorted_unique
from .nodepacks import _CHUNK, _HEAD, _REC, DENSE, DENSE_ARRAY, INNERS, LEAVES, MARK, PACK_ARRAY, Kind, ranges
from .nodes_format3 import GROUPS_ARRAY  # re-exported: format 3's leaves, read by the open and the repair

__all__ = ["ARRAYS", "DENSE", "DENSE_ARRAY", "GROUPS_ARRAY", "INNERS", "Kind", "LEAVES", "MARK", "NodeDisk",
           "PACK_ARRAY", "empty_disk_arrays", "inners_from_disk", "leaves_from_disk", "load", "load_leaves",
           "lost_nodes", "open_nodes"]


#: the arrays a pool's open reads straight into the nodes' rows (:func:`open_nodes`)
ARRAYS = (LEAVES.dense_array, INNERS.dense_array)
#: dirty nodes up to which a commit sorts them out in Python lists (:meth:`NodeDisk.updates`)
_FEW = 16
#: nodes of at least this many bytes are loaded by mapping the dense nodes' pages from the file, or
#: into memory mapped in at once when that cannot be done (:func:`open_nodes`)
POPULATE_MIN = 1 << 24
#: whether a big open maps the dense nodes' pages (False: they are read, as for small pools)
MAP_NODES = True



class _Pages:
    """Pages one commit writes of one array (the interface of :class:`thinpool.mdpages.PagedArray`):
    a dense node's page is a view of the in-memory node, a pack page encoded bytes."""

    def __init__(self, npages: int, nodes: np.ndarray | None, own: Any, packed: dict[int, Any],
                 dead: Any, packed_rows: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """``own``: the dense nodes' pages (their rows of ``nodes``); ``packed``: page -> encoded pack
        page, which ``packed_rows`` (the encoder's output, uint16 rows; the page of each row) holds
        as rows of one buffer when given."""
        self.npages = npages
        self._nodes, self._packed, self._packed_rows = nodes, packed, packed_rows
        if not len(own) and not len(dead):  # (the pack pages of a commit; none of a kind not changed)
            self.dead = []
            self.dirty = sorted(packed)
        elif len(own) + len(packed) + len(dead) <= _FEW:  # a small commit: Python sets cost less
            own_set = set(int(s) for s in own)
            self.dead = sorted(set(int(d) for d in dead) - own_set - set(packed))
            self.dirty = sorted(own_set | set(packed) | set(self.dead))
        else:
            written = sorted_unique(np, np.concatenate([np.asarray(own, np.int64),
                                                        np.fromiter(packed, np.int64, len(packed))]))
            dead_a = sorted_minus(np, sorted_unique(np, dead), written)
            self.dead = dead_a.tolist()
            self.dirty = sorted_unique(np, np.concatenate([written, dead_a])).tolist()

    def page(self, i: int) -> Any:
        page = self._packed.get(i)
        if page is not None:
            return page
        assert self._nodes is not None
        return memoryview(self._nodes[i]).cast("B")

    def page_rows(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The pages ``pages`` (all written by this commit) as rows of one buffer: (a 2-D uint8 array of
        4 KiB rows, their rows) -- the nodes themselves for dense pages, the encoder's output for pack
        pages -- or None when they are not all in one (the store then takes them one by one)."""
        if not self._packed and self._nodes is not None:
            nodes = self._nodes
            if not nodes.flags.c_contiguous or nodes.itemsize * nodes.shape[1] != BLOCK:
                return None
            return nodes.view(np.uint8).reshape(len(nodes), BLOCK), np.asarray(pages, np.int64)
        if self._packed_rows is None or len(pages) != len(self._packed):
            return None
        out, at = self._packed_rows
        order = np.argsort(at, kind="stable")
        pos = np.searchsorted(at[order], pages)
        if (pos >= len(at)).any() or (at[order[np.minimum(pos, len(at) - 1)]] != pages).any():
            return None
        return out.view(np.uint8), order[pos]


class NodeDisk:
    """What the last commit stored of one kind of node, so that the next commit re-packs only what
    changed.

    ``stored[s]``: the count of slot ``s``'s record (-1: no record, :data:`MARK`: dense);
    ``keys``/``pos``/``size``: per pack page, in slot order, its lowest slot, its page in the pack
    array and its bytes; ``npages``: pages of the pack array; ``convert``: an older layout is stored
    under that name (the next commit writes every node and drops it).  ``packs``: the stored pack
    pages (uint16 rows by place; the compiled encoder copies unchanged records from them), shared
    with the state before, and ``fresh`` the pages this state wrote there, put in by its first
    commit (:meth:`_settle`: by then the state before is gone, or this commit could not be written)."""

    def __init__(self, kind: Kind, stored: np.ndarray, keys: np.ndarray, pos: np.ndarray, size: np.ndarray,
                 npages: int, convert: str | None = None, packs: np.ndarray | None = None,
                 fresh: list[tuple[int, Any]] | None = None) -> None:
        self.kind = kind
        self.stored, self.keys, self.pos, self.size = stored, keys, pos, size
        self.npages, self.convert = npages, convert
        self.packs = np.zeros((0, BLOCK // 2), np.uint16) if packs is None else packs
        self.fresh = fresh or []
        #: per slot, whether its row is still a private map of its committed page (:func:`open_nodes`),
        #: or None when no row is
        self.mapped: np.ndarray | None = None
        #: the :func:`thinpool.faultguard.guard` slot watching the nodes' rows mapped from the file (a
        #: truncated file's page is then a fault counted there, its rows holes, not SIGBUS); -1: none
        self.guard = -1

    @classmethod
    def empty(cls, kind: Kind, convert: str | None = None) -> "NodeDisk":
        z = np.zeros(0, np.int64)
        return cls(kind, np.zeros(0, np.int32), z, z, z, 0, convert)

    def _settle(self) -> None:
        """Put the pages this state's commit wrote into :attr:`packs` (grown when they reach past it)."""
        if not self.fresh:
            return
        packs = self.packs
        need = max(p for p, _ in self.fresh) + 1
        if len(packs) < need or not packs.flags.writeable:
            grown = np.empty((max(need, len(packs) + len(packs) // 2), BLOCK // 2), np.uint16)
            grown[:len(packs)] = packs
            packs = grown
        fresh = self.fresh
        if len(fresh) == 1:
            p, page = fresh[0]
            packs[p] = np.frombuffer(page, np.uint16)
        else:  # (one numpy step for them all)
            packs[[p for p, _ in fresh]] = np.frombuffer(b"".join([page for _, page in fresh]),
                                                         np.uint16).reshape(len(fresh), -1)
        self.packs, self.fresh = packs, []

    # ------------------------------------------------------------------ a commit
    def updates(self, nodes: np.ndarray, rc: np.ndarray,
                dirty_flags: np.ndarray) -> tuple[dict[str, Any], "NodeDisk"]:
        """The pages a commit writes for the nodes marked in ``dirty_flags`` (every node after the load
        of an older layout; ``rc``: their reference counts, 0 = dead), and what is stored once that
        commit is durable.  Changes nothing."""
        kind = self.kind
        self._settle()
        n = len(nodes)
        kp = _compiled()
        if kp is not None and not self.convert and self.mapped is None:
            return self._updates_compiled(kp, nodes, rc, dirty_flags)
        dirty = np.arange(n) if self.convert else np.flatnonzero(dirty_flags[:n])
        if self.mapped is not None:  # the blocks of the dirty dense pages are released by this commit
            _privatize(nodes, dirty, self.mapped)
        if len(dirty) == 0 and n == len(self.stored):  # no node changed: no page, the same store
            return {kind.dense_array: _Pages(n, nodes, (), {}, ()),
                    kind.pack_array: _Pages(self.npages, None, (), {}, ())}, self
        if n == len(self.stored):
            stored = self.stored.copy()
        else:
            stored = np.full(n, -1, np.int32)
            keep = min(n, len(self.stored))
            stored[:keep] = self.stored[:keep]
        new = np.empty(len(dirty), np.int32)
        hole = nodes.dtype.type(kind.hole)
        if kp is not None and len(dirty):
            kp.count_entries(_words(nodes), kind.width // 4, rc, dirty.astype(np.int64), kind.dense, MARK, new)
        for i in range(0, len(dirty) if kp is None else 0, _CHUNK):
            slots = dirty[i:i + _CHUNK]
            count = (nodes[slots] != hole).sum(axis=1)
            count[rc[slots] == 0] = 0
            new[i:i + _CHUNK] = np.where(count == 0, -1, np.where(count > kind.dense, MARK, count))
        old = stored[dirty]
        stored[dirty] = new
        if len(dirty) <= _FEW:  # a few nodes (a small commit): Python lists cost less than numpy steps
            trio = list(zip(dirty.tolist(), old.tolist(), new.tolist()))
            own = [d for d, _o, w in trio if w == MARK]
            dead_own = [d for d, o, w in trio if o == MARK and w != MARK]
            changed = np.array([d for d, o, w in trio if not (o == w and o in (MARK, -1))], np.int64)
        else:
            own = dirty[new == MARK]
            dead_own = dirty[(old == MARK) & (new != MARK)]
            changed = dirty[~(((old == MARK) & (new == MARK)) | ((old == -1) & (new == -1)))]
        packed, dead_packs, after, packed_rows = self._repack(nodes, stored, changed)
        after.mapped, after.guard = self.mapped, self.guard
        out: dict[str, Any] = {
            kind.dense_array: _Pages(n, nodes, own, {}, dead_own),
            kind.pack_array: _Pages(after.npages, None, (), packed, dead_packs, packed_rows),
        }
        if self.convert:
            out[self.convert] = PageUpdates(0, {})
        return out, after

    def _updates_compiled(self, kp: Any, nodes: np.ndarray, rc: np.ndarray,
                          dirty_flags: np.ndarray) -> tuple[dict[str, Any], "NodeDisk"]:
        """:meth:`updates` in one compiled call (:func:`thinpool.kernels_pages.node_updates`: the same
        pages as the steps below, which a process without numba, a conversion and a mapped open take)."""
        kind = self.kind
        n = len(nodes)
        stored, out, meta = kp.node_updates(_words(nodes), kind.width // 4, rc, dirty_flags, n, self.stored,
                                            kind.dense, MARK, self.keys, self.pos, self.size, self.npages,
                                            kind.width + 2, kind.tag, self.packs)
        bad, slot, npg, nown, ndead, nrel, nk, npages = meta[:8].tolist()
        assert bad < 0, f"{kind.name} records out of step with the nodes (slot {slot})"
        if npg == 0 and nown == 0 and ndead == 0 and n == len(self.stored) and \
                np.array_equal(stored, self.stored):  # no record changed: no page, the same store
            return {kind.dense_array: _Pages(n, nodes, (), {}, ()),
                    kind.pack_array: _Pages(self.npages, None, (), {}, ())}, self
        j = 8 + nown + ndead + npg + nrel
        lists = meta[8:j].tolist()
        own, dead_own = lists[:nown], lists[nown:nown + ndead]
        at = nown + ndead
        new_pos, released = lists[at:at + npg], lists[at + npg:]
        packed: dict[int, Any] = {}
        if npg:
            rows = memoryview(out).cast("B")  # (the pages as slices of it: no numpy step per page)
            packed = {p: rows[i * BLOCK:(i + 1) * BLOCK] for i, p in enumerate(new_pos)}
        after = NodeDisk(kind, stored, meta[j:j + nk], meta[j + nk:j + 2 * nk], meta[j + 2 * nk:j + 3 * nk], npages,
                         None, self.packs, list(packed.items()))
        return {kind.dense_array: _Pages(n, nodes, own, {}, dead_own),
                kind.pack_array: _Pages(npages, None, (), packed, released, (out, meta[8 + at:8 + at + npg]))}, after

    def _repack(self, nodes: np.ndarray, stored: np.ndarray,
                changed: np.ndarray) -> tuple[dict[int, Any], list[int], "NodeDisk", Any]:
        """Re-pack the pages holding ``changed`` slots (``stored``: the new counts): planned and
        encoded by :mod:`thinpool.kernels_pages` when numba is loaded, else by
        :func:`thinpool.nodepacks.repack` (the same pages).  Returns the pages (page -> bytes), the pack
        pages released, the store after, and the compiled encoder's (rows, page of each row) or None."""
        kind, kp = self.kind, _compiled()
        packed: dict[int, Any] = {}
        packed_rows: tuple[np.ndarray, np.ndarray] | None = None
        changed = changed.astype(np.int64, copy=False)
        if kp is None:
            packed, gone, new_keys, new_pos, new_size, rel = nodepacks.repack(
                kind, self.keys, self.pos, self.npages, nodes, stored, changed)
            released = np.array(rel, np.int64)
        else:
            slots, nrec, new_keys, new_pos, new_size, gone, released = kp.plan_repack(
                stored, self.keys, self.pos, self.npages, changed, kind.width + 2)
        if kp is not None and len(nrec):
            out = np.empty((len(nrec), BLOCK // 2), np.uint16)
            bad = kp.encode_packs(_words(nodes), kind.width // 4, slots, stored[slots].astype(np.int64), nrec,
                                  kind.tag, out, self.packs, self.pos[gone], changed)
            assert bad < 0, f"{kind.name} records out of step with the nodes (slot {int(slots[bad])})"
            packed = {p: memoryview(out[i]).cast("B") for i, p in enumerate(new_pos.tolist())}
            packed_rows = (out, new_pos.astype(np.int64))
        keep = ~gone
        keys = np.concatenate([self.keys[keep], new_keys])
        pos = np.concatenate([self.pos[keep], new_pos])
        size = np.concatenate([self.size[keep], new_size])
        if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
            order = np.argsort(keys, kind="stable")
            keys, pos, size = keys[order], pos[order], size[order]
        npages = int(pos.max()) + 1 if len(pos) else 0
        after = NodeDisk(kind, stored, keys, pos, size, npages, None, self.packs, list(packed.items()))
        return packed, (released[released < npages].tolist() if len(released) else []), after, packed_rows

_KERNELS: list[Any] = []  # kernels_pages, once a commit found numba loaded


def _compiled() -> Any:
    """:mod:`thinpool.kernels_pages` when this process has loaded numba (any kernel call does), else
    None: a commit needs only numpy, and the numpy path (:func:`thinpool.nodepacks.repack`) writes
    the same pages."""
    if _KERNELS:
        return _KERNELS[0]
    if "numba" not in sys.modules or sys.byteorder != "little":  # (the kernels write little-endian)
        return None
    from . import kernels_pages
    _KERNELS.append(kernels_pages)
    return kernels_pages


def _words(nodes: np.ndarray) -> np.ndarray:
    """Nodes as rows of uint32 words (the compiled kernels take one type for both kinds of node)."""
    return nodes.view(np.uint32)


# ---------------------------------------------------------------------------- loading

def empty_disk_arrays() -> dict[str, PageUpdates]:
    """The nodes of a new pool: none."""
    return {name: PageUpdates(0, {}) for kind in (LEAVES, INNERS) for name in (kind.dense_array, kind.pack_array)}


def leaves_from_disk(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The in-memory leaves (uint64, one row of 512 per leaf slot) from loaded arrays (uint8 views) of
    any layout.  Raises :class:`MetadataCorrupt` if the stored leaves are inconsistent."""
    return load(LEAVES, arrays)[0]


def inners_from_disk(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The in-memory inner nodes (int32, one row of 1,024 per slot), as :func:`leaves_from_disk`."""
    return load(INNERS, arrays)[0]


def _olds(kind: Kind) -> tuple[str, ...]:
    return (GROUPS_ARRAY, kind.old_array) if kind is LEAVES else (kind.old_array,)


def load(kind: Kind, arrays: Mapping[str, np.ndarray],
         lost: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, NodeDisk]:
    """One kind's in-memory nodes and what is stored of them (:class:`NodeDisk`), from loaded arrays of
    any layout.  ``lost`` (repair): pages known to be unreadable (read as zeroes), per array; a dense
    node whose page is lost is left empty."""
    if kind.pack_array not in arrays:
        if kind is LEAVES and GROUPS_ARRAY in arrays:
            return nodes_format3.groups_from_disk(arrays[GROUPS_ARRAY]), NodeDisk.empty(kind, GROUPS_ARRAY)
        old = arrays.get(kind.old_array, np.zeros(0, np.uint8))
        return (old.view(kind.dtype).reshape(-1, kind.entries),
                NodeDisk.empty(kind, kind.old_array if len(old) else None))
    convert = next((a for a in _olds(kind) if len(arrays.get(a, ()))), None)
    if convert:
        raise _corrupt(kind, f"{kind.name} nodes stored in both the current layout and the older '{convert}'")
    count = len(arrays.get(f"{kind.name}_rc", ())) // 4
    dense_buf = arrays.get(kind.dense_array, np.zeros(0, np.uint8))
    dense_lost = None if lost is None else lost.get(kind.dense_array)

    def fill(nodes: np.ndarray, dense: np.ndarray) -> None:
        if len(dense) and (dense.max() + 1) * BLOCK > len(dense_buf):
            raise _corrupt(kind, f"dense {kind.name} {int(dense.max())} has no page")
        if dense_lost is not None:  # a lost page: the node left empty
            nodes[dense[dense_lost[dense]]] = kind.hole
            dense = dense[~dense_lost[dense]]
        nodes[dense] = dense_buf.view(kind.dtype).reshape(-1, kind.entries)[dense]

    return _packs_from_disk(kind, arrays[kind.pack_array], count, fill,
                            lambda n: np.empty((n, kind.entries), kind.dtype))


def open_nodes(kind: Kind, store: Any, arrays: Mapping[str, np.ndarray],
               free_rows: bool = False) -> tuple[np.ndarray, NodeDisk] | None:
    """:func:`load` for a pool's open: ``arrays`` loaded without the dense nodes' array (:data:`ARRAYS`),
    whose pages are read straight into their rows (:meth:`thinpool.mdstore.MetadataStore.gather_into`),
    so the nodes are the only copy of them ever made -- or, when the nodes take :data:`POPULATE_MIN` or
    more (100,000,000 mappings are 800 MB of leaves), mapped from the file privately
    (:meth:`~thinpool.mdstore.MetadataStore.map_into`: no copy at all; the rows still mapped are
    flagged in :attr:`NodeDisk.mapped`, and a commit gives a row its own copy before releasing its
    block).  Every page is verified either way.  The rows of free slots without a record are left
    unwritten (nothing reads them before an allocation fills them), unless ``free_rows`` (holes, as
    :func:`load` gives them).  None if the store holds an older layout: load that with the other
    arrays."""
    if kind.pack_array not in arrays:
        return None
    if any(len(arrays.get(a, ())) for a in _olds(kind)):
        raise _corrupt(kind, f"{kind.name} nodes stored in both the current layout and an older one")
    count = len(arrays.get(f"{kind.name}_rc", ())) // 4
    npages = store.npages(kind.dense_array)
    mapped: list[np.ndarray] = []
    guards: list[int] = []

    def fill(nodes: np.ndarray, dense: np.ndarray) -> None:
        if len(dense) and dense.max() >= npages:
            raise _corrupt(kind, f"dense {kind.name} {int(dense.max())} has no page")
        if not len(dense):
            return
        rows = dense.tolist()
        if nodes.nbytes >= POPULATE_MIN and MAP_NODES:
            # a page of the file lost under the open pool reads as a page of holes, counted by the
            # guard (the owner fails: KernelContext.fault_check), instead of raising SIGBUS
            owner = _map_of(nodes)
            guard = -1 if owner is None else faultguard.guard(owner, faultguard.address_of(owner), len(owner), -1)
            if store.map_into(kind.dense_array, rows, nodes, rows):
                flags = np.zeros(len(nodes), bool)
                flags[dense] = True
                mapped.append(flags)
                guards.append(guard)
                return
            faultguard.unguard(guard)
        _populate(nodes)
        store.gather_into(kind.dense_array, rows, nodes, rows)

    rc = np.asarray(arrays.get(f"{kind.name}_rc", np.zeros(0, np.uint8))).view(np.uint32)
    nodes, disk = _packs_from_disk(kind, arrays[kind.pack_array], count, fill, lambda n: _reserved(kind, n),
                                   None if free_rows else rc[:count] != 0)
    disk.mapped = mapped[0] if mapped else None
    disk.guard = guards[0] if guards else -1
    return nodes, disk


def load_leaves(store: Any) -> np.ndarray | None:
    """The store's committed leaves as a pool's open reads them (:func:`open_nodes`; every page read
    straight into place), or None for an older layout."""
    if PACK_ARRAY not in store.locs:
        return None
    npages = store.npages(PACK_ARRAY)
    packs = np.empty(npages * BLOCK, np.uint8)
    if npages:
        store.gather_into(PACK_ARRAY, list(range(npages)), packs, list(range(npages)))
    arrays = {PACK_ARRAY: packs, "leaf_rc": np.zeros(store.npages("leaf_rc") * BLOCK, np.uint8)}
    out = open_nodes(LEAVES, store, arrays, free_rows=True)
    return None if out is None else out[0]


def _reserved(kind: Kind, count: int) -> np.ndarray:
    """Room for ``count`` nodes: when big, an anonymous map that reserves address space only
    (:data:`thinpool.mdpages.MAP_SPARSE`), into which the dense nodes' pages are mapped from the file
    (:meth:`thinpool.mdstore.MetadataStore.map_into`) or read (:func:`_populate` first)."""
    nbytes = count * BLOCK
    if nbytes == 0 or nbytes < POPULATE_MIN:
        return np.empty((count, kind.entries), kind.dtype)
    buf = mmap.mmap(-1, nbytes, flags=MAP_SPARSE)
    return np.frombuffer(buf, kind.dtype).reshape(count, kind.entries)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def _populate(nodes: np.ndarray) -> None:
    """Before reading 800 MB of pages into a reserved map: its memory mapped in by one system call
    (``MADV_POPULATE_WRITE``) instead of a page fault per 4 KiB (800 MB of leaves took 0.4 s of system
    time so, against 0.6-2.5 s of faults); nothing where the host cannot."""
    base = _map_of(nodes)
    if base is not None and sys.platform.startswith("linux"):
        try:
            base.madvise(_MADV_POPULATE_WRITE)
        except (OSError, ValueError):
            pass


def _map_of(nodes: np.ndarray) -> mmap.mmap | None:
    """The anonymous map ``nodes`` views (:func:`_reserved`), or None."""
    base: object = nodes.base  # (numpy's stubs say an ndarray; any buffer's exporter can be the base)
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base if isinstance(base, mmap.mmap) else None


def _privatize(nodes: np.ndarray, slots: np.ndarray, mapped: np.ndarray) -> None:
    """Give the rows ``slots`` that are still private maps of the file (``mapped``) their own copy (a
    write of one word: copy on write), so that the blocks a commit releases can be reused under them."""
    slots = slots[slots < min(len(mapped), len(nodes))]
    slots = slots[mapped[slots]]
    if len(slots):
        nodes[slots, 0] = nodes[slots, 0].copy()
        mapped[slots] = False


def _corrupt(kind: Kind, msg: str) -> MetadataCorrupt:
    return MetadataCorrupt(msg, structure="leaves" if kind is LEAVES else "inners")


def _packs_from_disk(kind: Kind, buf: np.ndarray, count: int, fill: Callable[[np.ndarray, np.ndarray], None],
                     alloc: Callable[[int], np.ndarray], live: np.ndarray | None = None) -> tuple[np.ndarray, NodeDisk]:
    """Decode format 4 (every pack page at once) and check it: headers, slots within the node arrays
    and in one record each, counts and entry indices in range, pages' slot ranges disjoint.  ``alloc(n)``
    makes room for the nodes, ``fill(nodes, slots)`` puts the dense nodes' pages in their rows; every
    other row is written once (holes, then the records' entries) -- but, when ``live`` (per slot: its
    reference count is not 0) is given, the rows of free slots without a record, which nothing reads
    until the slot is allocated again (the allocation fills its row; a freed node's row keeps its old
    entries too), are not written at all: a big pool's open then touches none of their memory."""
    name, w = kind.name, kind.width
    npages = len(buf) // BLOCK
    packs = buf[:npages * BLOCK].view(np.uint16).reshape(npages, BLOCK // 2)  # kept (NodeDisk.packs)
    u16, u32, vw = buf.view(np.uint16), buf.view(np.uint32), buf.view(kind.dtype)
    nrec = u16[0::BLOCK // 2][:npages].astype(np.int64)
    nent = u16[1::BLOCK // 2][:npages].astype(np.int64)
    tag = u32[1::BLOCK // 4][:npages]
    used = nrec > 0
    bad = np.flatnonzero((used & (tag != kind.tag)) | (~used & ((tag != 0) | (nent != 0)))
                         | (_HEAD + (w + 2) * nent + _REC * nrec > BLOCK))
    if len(bad):
        raise _corrupt(kind, f"{name} pack page {int(bad[0])}: bad header (records {int(nrec[bad[0]])}, "
                       f"entries {int(nent[bad[0]])}, tag {int(tag[bad[0]]):#x})")
    pages = np.flatnonzero(used)
    rec_page = np.repeat(pages, nrec[pages])
    rec_j = ranges(np.zeros(len(pages), np.int64), nrec[pages])
    slots = u32[rec_page * (BLOCK // 4) + (_HEAD + w * nent[rec_page]) // 4 + rec_j].astype(np.int64)
    counts = u16[rec_page * (BLOCK // 2) + (_HEAD + w * nent[rec_page] + 4 * nrec[rec_page]) // 2
                 + rec_j].astype(np.int64)
    if len(slots) and slots.max() >= count:
        raise _corrupt(kind, f"{name} record of slot {int(slots.max())}, beyond the {count} {name} slots")
    order = np.argsort(slots, kind="stable")
    twice = np.flatnonzero(np.diff(slots[order]) == 0)
    if len(twice):
        raise _corrupt(kind, f"{name} slot {int(slots[order][twice[0]])} has two records")
    okc = ((counts >= 1) & (counts <= kind.dense)) | (counts == MARK)
    if not okc.all():
        raise _corrupt(kind, f"{name} record of slot {int(slots[~okc][0])}: count {int(counts[~okc][0])}")
    ents = np.where(counts == MARK, 0, counts)
    per_page = np.bincount(rec_page, ents, minlength=npages).astype(np.int64)
    off = np.flatnonzero(per_page != nent)
    if len(off):
        raise _corrupt(kind, f"{name} pack page {int(off[0])}: its records count {int(per_page[off[0]])} "
                       f"entries, its header {int(nent[off[0]])}")
    ent_page = np.repeat(pages, nent[pages])
    ent_k = ranges(np.zeros(len(pages), np.int64), nent[pages])
    ent_rec = np.repeat(np.arange(len(slots)), ents)
    idx = u16[ent_page * (BLOCK // 2) + (_HEAD + w * nent[ent_page] + 6 * nrec[ent_page]) // 2
              + ent_k].astype(np.int64)
    vals = vw[ent_page * (BLOCK // w) + _HEAD // w + ent_k]
    step = np.diff(idx)
    bad = np.flatnonzero((idx >= kind.entries) | (vals == vals.dtype.type(kind.hole))
                         | np.concatenate([[False], (step <= 0) & (np.diff(ent_rec) == 0)]))
    if len(bad):
        raise _corrupt(kind, f"{name} record of slot {int(slots[ent_rec[bad[0]]])}: entry {int(idx[bad[0]])} "
                       f"out of order, out of range or a hole")
    nodes = alloc(count)
    dense = np.sort(slots[counts == MARK])
    is_dense = np.zeros(count, bool)
    is_dense[dense] = True
    hole = nodes.dtype.type(kind.hole)
    if live is not None:  # a free slot's row is never read (new_leaf / new_inner fill it): left as it is
        skip = ~live[:count]
        skip[slots] = False
        is_dense |= skip
    for i in range(0, count, _CHUNK):  # holes in every row but the dense nodes', which are read in
        d = is_dense[i:i + _CHUNK]
        if not d.any():
            nodes[i:i + _CHUNK] = hole
        elif not d.all():
            nodes[i:i + _CHUNK][~d] = hole
    nodes[slots[ent_rec], idx] = vals
    fill(nodes, dense)
    # pages in slot order, their ranges disjoint
    stored = np.full(count, -1, np.int32)
    stored[slots] = counts
    if len(pages) == 0:
        z = np.zeros(0, np.int64)
        return nodes, NodeDisk(kind, stored, z, z, z, npages, None, packs)
    starts = np.cumsum(nrec[pages]) - nrec[pages]
    lows = np.minimum.reduceat(slots, starts)
    highs = np.maximum.reduceat(slots, starts)
    o = np.argsort(lows)
    if len(o) > 1 and (highs[o][:-1] >= lows[o][1:]).any():
        raise _corrupt(kind, f"{name} pack pages hold overlapping ranges of slots")
    size = _HEAD + (w + 2) * nent[pages] + _REC * nrec[pages]
    return nodes, NodeDisk(kind, stored, lows[o], pages[o], size[o], npages, None, packs)


def lost_nodes(kind: Kind, arrays: Mapping[str, np.ndarray], lost_pages: Mapping[str, np.ndarray],
               count: int) -> np.ndarray:
    """Which slots of ``kind`` a repair loses when the pages marked in ``lost_pages`` are unreadable.

    Format 4: a dense node whose own page is lost; and, if a pack page is lost, every slot without a
    record outside the slot ranges of the readable pack pages (where the lost pages' records were).
    Format 3's leaves: a lost own page loses its leaf, a lost stream page its whole group.  One node
    per page: a lost page loses its node."""
    out = np.zeros(count, bool)
    if kind.pack_array not in arrays:
        if kind is not LEAVES or GROUPS_ARRAY not in arrays:
            lost = lost_pages.get(kind.old_array, np.zeros(0, bool))[:count]
            out[:len(lost)] = lost
            return out
        return nodes_format3.lost_leaves(lost_pages[GROUPS_ARRAY], count)
    _, disk = load(kind, arrays, lost_pages)
    stored = np.full(count, -1, np.int32)
    stored[:min(count, len(disk.stored))] = disk.stored[:count]
    dense_lost = lost_pages.get(kind.dense_array, np.zeros(0, bool))
    marks = np.flatnonzero(stored == MARK)
    marks = marks[marks < len(dense_lost)]
    out[marks[dense_lost[marks]]] = True
    pack_lost = lost_pages.get(kind.pack_array, np.zeros(0, bool)).any()
    recs = np.flatnonzero(stored != -1)
    if pack_lost and len(recs):
        # the readable pages' slot ranges (each from its lowest to its highest record)
        page_of = np.searchsorted(disk.keys, recs, "right") - 1
        firsts = np.flatnonzero(np.diff(np.concatenate([[-1], page_of])) != 0)
        cover = np.zeros(count + 1, np.int64)
        np.add.at(cover, recs[firsts], 1)
        np.add.at(cover, np.maximum.reduceat(recs, firsts) + 1, -1)
        out |= (np.cumsum(cover)[:count] == 0) & (stored == -1)
    elif pack_lost:
        out[:] = True
    return out
