"""The block map's leaves in the metadata file: dense leaves on their own page, sparse ones grouped.

In memory a leaf is 512 mappings (4 KiB, all-ones = a hole; see :mod:`thinpool.blockmap`).  Stored
one leaf per 4 KiB page (metadata format <= 2, array ``leaves``), a leaf costs a block however few
mappings it holds, where a dm-thin btree leaf packs up to 252 mappings of any keys.  Format 3 (array
``leaf_groups``) stores leaf slots in **groups of 16**; group ``g`` owns the pages ``g * SPAN ...
g * SPAN + SPAN - 1`` of the array:

- a **dense** leaf (live, more than :data:`DENSE` = 192 mapped entries) keeps its own page, ``g *
  SPAN + j`` for slot ``16 g + j``, stored as it is in memory -- so a commit that changes a dense
  leaf writes that one page, as in format 2;
- the group's **sparse** leaves (the others) share one byte stream at pages ``g * SPAN + 16 ...``: a
  uint64 mask of which of the 16 slots are dense, a 1,024-byte bitmap of the sparse leaves' mapped
  entries, then those entries' values (uint64, leaf by leaf, in entry order), cut into 4 KiB pages
  (at most 7: 16 leaves of 192 values).  A commit re-encodes the stream of a group whose sparse
  leaves changed (or one of whose leaves turned dense or sparse), a numpy step per chunk of groups.

Pages a group does not need are absent (the store reads an absent page as zeroes and spends no block
on it); a group with nothing mapped takes no page at all, and a dead leaf (reference count 0) is
stored as empty.  A dense leaf costs 4 KiB for 193..512 mappings (<= 21.3 bytes each, dm-thin's full
leaves about 16.3); a sparse one 8 bytes per mapping plus 64 bytes of bitmap.  Loading decodes every
group at once (:func:`leaves_from_disk`); a pool's open reads the dense leaves' pages straight into
their rows (:func:`load_leaves`), so the leaves are never copied.  Old pools (array ``leaves``) are read as they are; their
first commit writes the groups and drops the old pages.
"""

from __future__ import annotations

import mmap
from typing import Any, Mapping

import numpy as np

from . import schema as K
from .errors import MetadataCorrupt
from .dataspace import stored_pages
from .mdstore import BLOCK, PageUpdates

#: leaf slots per group
GROUP = 16
#: a leaf with more live mappings than this keeps its own page
DENSE = 192
_STREAM_HEAD = 8 + GROUP * K.LEAF_ENTRIES // 8     # dense mask + 1,024 bytes of bitmap
#: pages of a group's stream: 16 sparse leaves of DENSE values at most
STREAM_PAGES = (_STREAM_HEAD + GROUP * DENSE * 8 + BLOCK - 1) // BLOCK
#: pages reserved for one group: 16 own pages, then the stream
SPAN = GROUP + STREAM_PAGES
_PAGE_WORDS = BLOCK // 8
_SPAN_WORDS = SPAN * _PAGE_WORDS
_STREAM_WORD = GROUP * _PAGE_WORDS                  # where the stream starts in a group (words)
_VALUES_WORD = _STREAM_WORD + _STREAM_HEAD // 8     # where its values start
_CAPACITY = _SPAN_WORDS - _VALUES_WORD
OLD_ARRAY = "leaves"
ARRAY = "leaf_groups"
_CHUNK = 4096  # leaf slots handled per numpy step (16 MB of leaves)
#: leaves of at least this many bytes are loaded into memory mapped in at once (:func:`load_leaves`)
POPULATE_MIN = 1 << 24


class LeafPages:
    """The leaf pages one commit writes (the interface of :class:`thinpool.mdstore.PagedArray`):
    a dense leaf's page is a view of the in-memory leaf, a stream page is encoded bytes."""

    def __init__(self, npages: int, leaves: np.ndarray, own: dict[int, int], streams: dict[int, bytes],
                 dead: list[int]) -> None:
        self.npages = npages
        self._leaves, self._own, self._streams = leaves, own, streams
        self.dead = sorted(set(dead) - set(own) - set(streams))
        self.dirty = sorted(set(own) | set(streams) | set(self.dead))

    def page(self, i: int) -> Any:
        slot = self._own.get(i)
        if slot is not None:
            return memoryview(self._leaves[slot]).cast("B")
        return self._streams[i]


def empty_disk_arrays() -> dict[str, PageUpdates]:
    """The leaves of a new pool: none."""
    return {ARRAY: PageUpdates(0, {})}


def leaves_from_disk(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The in-memory leaves (uint64, one row of 512 per leaf slot) from loaded arrays (uint8 views) of
    either layout.  Raises :class:`MetadataCorrupt` if a group's stream is inconsistent (a dense mask
    beyond 16 slots, bitmap bits of a dense leaf, more values than the stream holds)."""
    if ARRAY not in arrays:
        return arrays.get(OLD_ARRAY, np.zeros(0, np.uint8)).view(np.uint64).reshape(-1, K.LEAF_ENTRIES)
    buf = arrays[ARRAY]
    ng = len(buf) // (SPAN * BLOCK)
    if ng == 0:
        return np.full((0, K.LEAF_ENTRIES), K.UNMAPPED, np.uint64)
    words = buf[: ng * SPAN * BLOCK].view(np.uint64).reshape(ng, _SPAN_WORDS)
    dense, mask, counts = _decode_heads(words[:, _STREAM_WORD:])
    leaves = np.empty((ng * GROUP, K.LEAF_ENTRIES), np.uint64)
    by_group = leaves.reshape(ng, GROUP, K.LEAF_ENTRIES)
    own_pages = words.reshape(ng, SPAN, K.LEAF_ENTRIES)[:, :GROUP]
    for g0 in range(0, ng, _CHUNK // GROUP):  # every leaf written once, in place, no temporary copy
        g1 = min(ng, g0 + _CHUNK // GROUP)
        d = dense[g0:g1, :, None]
        np.copyto(by_group[g0:g1], own_pages[g0:g1], where=d)
        if not d.all():
            np.copyto(by_group[g0:g1], np.uint64(K.UNMAPPED), where=~d)
    _scatter_sparse(leaves, words[:, _STREAM_WORD:], mask, counts)
    return leaves


def load_leaves(store: Any) -> np.ndarray | None:
    """:func:`leaves_from_disk` of the store's committed leaves, the dense leaves' pages read straight
    into their rows (:meth:`thinpool.mdstore.MetadataStore.gather_into`): the leaves are the only copy
    of them ever made (100,000,000 mappings are 800 MB of leaves).  None if the store holds the old
    one-leaf-per-page layout (or nothing): then load it with the other arrays."""
    npages = store.npages(ARRAY)
    if npages == 0:
        return None
    ng = npages // SPAN
    if ng == 0:
        return np.full((0, K.LEAF_ENTRIES), K.UNMAPPED, np.uint64)
    groups = np.arange(ng, dtype=np.int64)[:, None] * SPAN
    streams = np.empty((ng * STREAM_PAGES, _PAGE_WORDS), np.uint64)
    stream_pages = (groups + np.arange(GROUP, SPAN, dtype=np.int64)[None, :]).reshape(-1)
    store.gather_into(ARRAY, stream_pages.tolist(), streams, range(len(stream_pages)))
    swords = streams.reshape(ng, STREAM_PAGES * _PAGE_WORDS)
    dense, mask, counts = _decode_heads(swords)
    leaves = _populated(ng * GROUP)
    slots = np.flatnonzero(dense.reshape(-1))
    own = (slots // GROUP) * SPAN + slots % GROUP
    store.gather_into(ARRAY, own.tolist(), leaves, slots.tolist())
    sparse = np.flatnonzero(~dense.reshape(-1))
    if len(sparse):
        leaves[sparse] = np.uint64(K.UNMAPPED)
    _scatter_sparse(leaves, swords, mask, counts)
    return leaves


def _populated(nleaves: int) -> np.ndarray:
    """Room for ``nleaves`` leaves, its memory mapped in at once (``MAP_POPULATE``: one system call
    instead of a page fault per 4 KiB, and no waiting for the kernel to assemble huge pages on a
    fragmented host -- 800 MB of leaves took 0.4 s of system time this way against 0.6-2.5 s)."""
    nbytes = nleaves * K.LEAF_ENTRIES * 8
    flags = getattr(mmap, "MAP_POPULATE", 0)
    if nbytes < POPULATE_MIN or not flags:
        return np.empty((nleaves, K.LEAF_ENTRIES), np.uint64)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    return np.frombuffer(buf, np.uint64).reshape(nleaves, K.LEAF_ENTRIES)


def _decode_heads(swords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense flags (group, slot), mapped-entry mask (group, slot, entry), values per group) of the
    groups' streams ``swords`` (uint64 rows, one per group, each starting at its stream), checked."""
    ng = len(swords)
    dense_mask = swords[:, 0]
    bad = np.flatnonzero(dense_mask >> np.uint64(GROUP))
    if len(bad):
        raise MetadataCorrupt(f"leaf group {int(bad[0])}: dense-leaf mask {int(dense_mask[bad[0]]):#x} "
                              f"names slots past {GROUP}", structure="leaves")
    dense = ((dense_mask[:, None] >> np.arange(GROUP, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(bool)
    heads = np.ascontiguousarray(swords[:, 1:_STREAM_HEAD // 8]).view(np.uint8)
    mask = np.unpackbits(heads, axis=1, bitorder="little").view(bool).reshape(ng, GROUP, K.LEAF_ENTRIES)
    clash = np.flatnonzero((mask.any(axis=2) & dense).any(axis=1))
    if len(clash):
        raise MetadataCorrupt(f"leaf group {int(clash[0])}: a dense leaf also has entries in the stream",
                              structure="leaves")
    counts = mask.reshape(ng, -1).sum(axis=1)
    if counts.max() > _CAPACITY:
        g = int(np.argmax(counts))
        raise MetadataCorrupt(f"leaf group {g}: {int(counts[g])} mapped entries do not fit its pages",
                              structure="leaves")
    return dense, mask, counts


def _scatter_sparse(leaves: np.ndarray, swords: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> None:
    """Put the sparse leaves' values (in the streams ``swords``, after each head) in their entries."""
    total = int(counts.sum())
    if not total:
        return
    firsts = np.repeat(np.cumsum(counts) - counts, counts)
    col = _STREAM_HEAD // 8 + (np.arange(total, dtype=np.int64) - firsts)
    leaves.reshape(-1)[mask.reshape(-1)] = swords[np.repeat(np.arange(len(swords)), counts), col]


def lost_leaves(lost_pages: np.ndarray, nleaves: int) -> np.ndarray:
    """Which leaf slots a repair loses when the array's pages marked in ``lost_pages`` are unreadable:
    a lost own page loses its leaf, a lost stream page its whole group (the dense mask is there)."""
    ng = len(lost_pages) // SPAN
    lost = lost_pages[: ng * SPAN].reshape(ng, SPAN)
    out = lost[:, :GROUP] | lost[:, GROUP:].any(axis=1)[:, None]
    return out.reshape(-1)[:nleaves]


def _dense(leaves: np.ndarray, leaf_rc: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mapped-entry mask, dense flag) of the leaf slots ``slots`` (slots past the end: empty)."""
    inside = slots < len(leaves)
    block = np.full((len(slots), K.LEAF_ENTRIES), K.UNMAPPED, np.uint64)
    block[inside] = leaves[slots[inside]]
    live = np.zeros(len(slots), bool)
    live[inside] = leaf_rc[slots[inside]] > 0
    mask = (block != np.uint64(K.UNMAPPED)) & live[:, None]
    return mask, mask.sum(axis=1) > DENSE


def group_updates(leaves: np.ndarray, leaf_rc: np.ndarray, leaf_dirty: np.ndarray,
                  committed_locs: Mapping[str, Any]) -> dict[str, Any]:
    """The leaf pages a commit writes for the leaves marked in ``leaf_dirty``: a dense leaf's own page;
    the stream of every group whose sparse leaves changed or whose dense mask changes; pages no longer
    needed released.  After a load of an old pool (array ``leaves`` stored), every group is written
    and the old array dropped."""
    nleaves = len(leaves)
    ng = (nleaves + GROUP - 1) // GROUP
    old_layout = OLD_ARRAY in committed_locs and len(committed_locs[OLD_ARRAY]) > 0
    dirty = np.arange(nleaves) if old_layout else np.flatnonzero(leaf_dirty[:nleaves])
    have = stored_pages(committed_locs.get(ARRAY), ng * SPAN)
    own: dict[int, int] = {}
    dead: list[int] = []
    restream: list[np.ndarray] = []
    for i in range(0, len(dirty), _CHUNK):
        slots = dirty[i:i + _CHUNK]
        _, dense = _dense(leaves, leaf_rc, slots)
        pages = (slots // GROUP) * SPAN + slots % GROUP
        was = have[pages]
        own.update(zip(pages[dense].tolist(), slots[dense].tolist()))
        dead += pages[was & ~dense].tolist()
        restream.append(slots[~dense | ~was] // GROUP)
    groups = np.unique(np.concatenate(restream)) if restream else np.zeros(0, np.int64)
    streams: dict[int, bytes] = {}
    per_chunk = _CHUNK // GROUP
    for i in range(0, len(groups), per_chunk):
        gs = groups[i:i + per_chunk]
        slots = (gs[:, None] * GROUP + np.arange(GROUP)[None, :]).reshape(-1)
        mask, dense = _dense(leaves, leaf_rc, slots)
        mask &= ~dense[:, None]
        mask = mask.reshape(len(gs), GROUP * K.LEAF_ENTRIES)
        bits = (dense.reshape(len(gs), GROUP).astype(np.uint64) << np.arange(GROUP, dtype=np.uint64)).sum(axis=1)
        heads = np.packbits(mask, axis=1, bitorder="little")
        counts = mask.sum(axis=1)
        block = np.full((len(slots), K.LEAF_ENTRIES), K.UNMAPPED, np.uint64)
        inside = slots < nleaves
        block[inside] = leaves[slots[inside]]
        values = block.reshape(len(gs), -1)[mask]
        ends = np.cumsum(counts)
        for row, g in enumerate(gs.tolist()):
            n, base = int(counts[row]), g * SPAN + GROUP
            if n == 0 and bits[row] == 0:
                used = 0
            else:
                stream = (bits[row:row + 1].tobytes() + heads[row].tobytes()
                          + values[ends[row] - n:ends[row]].tobytes())
                used = (len(stream) + BLOCK - 1) // BLOCK
                stream = stream.ljust(used * BLOCK, b"\0")
                for p in range(used):
                    streams[base + p] = stream[p * BLOCK:(p + 1) * BLOCK]
            dead += [base + p for p in range(used, STREAM_PAGES) if have[base + p]]
    out: dict[str, Any] = {ARRAY: LeafPages(ng * SPAN, leaves, own, streams, dead)}
    if old_layout:
        out[OLD_ARRAY] = PageUpdates(0, {})
    return out
