"""The block map's leaves in the metadata file: grouped, with the holes left out.

In memory a leaf is 512 mappings (4 KiB, all-ones = a hole; see :mod:`thinpool.blockmap`).  Stored
one leaf per 4 KiB page (metadata format <= 2, array ``leaves``), a leaf costs a block however few
mappings it holds, where a dm-thin btree leaf packs up to 252 mappings of any keys.  Format 3 stores
them in **groups of 16 leaves** (array ``leaf_groups``): a group is one byte stream -- a 1,024-byte
bitmap of which of its 16 x 512 entries are mapped, then the mapped entries' values (uint64, leaf by
leaf, in entry order) -- cut into 4 KiB pages at page indices ``group * 17 ...`` of the array (17
pages hold even 16 full leaves); the pages a group does not need are absent (the store reads an
absent page as zeroes and spends no block on it).  A group with nothing mapped takes no page at all,
and a dead leaf (reference count 0) is stored as empty.

A commit re-encodes only the groups holding a leaf changed in the transaction
(:func:`group_updates`), a numpy step per chunk of groups; loading decodes every group at once
(:func:`leaves_from_disk`).  Old pools (array ``leaves``) are read as they are; their first commit
writes the groups and drops the old pages.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from . import schema as K
from .errors import MetadataCorrupt
from .mdstore import BLOCK, PageUpdates

#: leaves per group
GROUP = 16
#: pages reserved for one group (a group of 16 full leaves needs 16.25 pages)
SPAN = 17
_HEADER = GROUP * K.LEAF_ENTRIES // 8     # 1,024 bytes of bitmap per group
_HEADER_WORDS = _HEADER // 8
_SPAN_WORDS = SPAN * BLOCK // 8
OLD_ARRAY = "leaves"
ARRAY = "leaf_groups"
_CHUNK = 256  # groups encoded per numpy step (16 MB of leaves)


def _present(locs: Any, n: int) -> np.ndarray:
    out = np.zeros(n, bool)
    if locs is not None and len(locs):
        have = np.frombuffer(memoryview(locs).cast("B"), np.uint64)[:n] >> np.uint64(32) != 0
        out[: len(have)] = have
    return out


def empty_disk_arrays() -> dict[str, PageUpdates]:
    """The leaves of a new pool: none."""
    return {ARRAY: PageUpdates(0, {})}


def leaves_from_disk(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The in-memory leaves (uint64, one row of 512 per leaf slot) from loaded arrays (uint8 views) of
    either layout.  Raises :class:`MetadataCorrupt` if a group's bitmap counts more values than its
    pages can hold."""
    if ARRAY not in arrays:
        return arrays.get(OLD_ARRAY, np.zeros(0, np.uint8)).view(np.uint64).reshape(-1, K.LEAF_ENTRIES)
    buf = arrays[ARRAY]
    ng = len(buf) // (SPAN * BLOCK)
    leaves = np.full((ng * GROUP, K.LEAF_ENTRIES), K.UNMAPPED, np.uint64)
    if ng == 0:
        return leaves
    groups = buf[: ng * SPAN * BLOCK].reshape(ng, SPAN * BLOCK)
    mask = np.unpackbits(groups[:, :_HEADER], axis=1, bitorder="little").view(bool)  # (ng, 8192)
    counts = mask.sum(axis=1)
    if counts.max() > _SPAN_WORDS - _HEADER_WORDS:  # cannot happen with 8192 entries, kept as a guard
        g = int(np.argmax(counts))
        raise MetadataCorrupt(f"leaf group {g}: {int(counts[g])} mapped entries do not fit its pages",
                              structure="leaves")
    words = buf[: ng * SPAN * BLOCK].view(np.uint64)
    starts = np.arange(ng, dtype=np.int64) * _SPAN_WORDS + _HEADER_WORDS
    total = int(counts.sum())
    firsts = np.repeat(np.cumsum(counts) - counts, counts)
    idx = np.repeat(starts, counts) + (np.arange(total, dtype=np.int64) - firsts)
    leaves.reshape(-1)[mask.reshape(-1)] = words[idx]
    return leaves


def group_updates(leaves: np.ndarray, leaf_rc: np.ndarray, leaf_dirty: np.ndarray,
                  committed_locs: Mapping[str, Any]) -> dict[str, PageUpdates]:
    """The leaf pages a commit writes: every group holding a leaf marked in ``leaf_dirty`` re-encoded
    (pages it no longer needs released).  After a load of an old pool (array ``leaves`` stored), every
    group is written and the old array dropped."""
    nleaves = len(leaves)
    ng = (nleaves + GROUP - 1) // GROUP
    old_layout = OLD_ARRAY in committed_locs and len(committed_locs[OLD_ARRAY]) > 0
    if old_layout:
        dirty_groups = np.arange(ng)
    else:
        dirty_groups = np.unique(np.flatnonzero(leaf_dirty[:nleaves]) // GROUP)
    have = _present(committed_locs.get(ARRAY), ng * SPAN)
    pages: dict[int, bytes] = {}
    dead: list[int] = []
    flat = leaves.reshape(-1, K.LEAF_ENTRIES)
    for i in range(0, len(dirty_groups), _CHUNK):
        gs = dirty_groups[i:i + _CHUNK]
        slots = (gs[:, None] * GROUP + np.arange(GROUP)[None, :]).reshape(-1)
        inside = slots < nleaves
        block = np.full((len(slots), K.LEAF_ENTRIES), K.UNMAPPED, np.uint64)
        block[inside] = flat[slots[inside]]
        live = np.zeros(len(slots), bool)
        live[inside] = leaf_rc[slots[inside]] > 0
        mask = (block != np.uint64(K.UNMAPPED)) & live[:, None]
        mask = mask.reshape(len(gs), GROUP * K.LEAF_ENTRIES)
        heads = np.packbits(mask, axis=1, bitorder="little")
        counts = mask.sum(axis=1)
        values = block.reshape(len(gs), -1)[mask]
        ends = np.cumsum(counts)
        for row, g in enumerate(gs.tolist()):
            n = int(counts[row])
            base = g * SPAN
            if n == 0:
                used = 0
            else:
                stream = heads[row].tobytes() + values[ends[row] - n:ends[row]].tobytes()
                used = (len(stream) + BLOCK - 1) // BLOCK
                stream = stream.ljust(used * BLOCK, b"\0")
                for p in range(used):
                    pages[base + p] = stream[p * BLOCK:(p + 1) * BLOCK]
            dead += [base + p for p in range(used, SPAN) if have[base + p]]
    out = {ARRAY: PageUpdates(ng * SPAN, pages, dead=dead)}
    if old_layout:
        out[OLD_ARRAY] = PageUpdates(0, {})
    return out
