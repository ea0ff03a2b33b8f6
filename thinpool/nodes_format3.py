"""Format 3's leaves (array ``leaf_groups``), read only: a pool of that format is read as it is and its
first commit converts the leaves to the current layout (:mod:`thinpool.nodestore`), releasing these pages.

Slots in groups of :data:`GROUP` (16), each group owning :data:`SPAN` (23) consecutive pages: 16 own
pages for its dense leaves, then a stream -- a uint64 mask of the dense slots, a 1,024-byte bitmap of
the sparse leaves' mapped entries, then their values.
"""

from __future__ import annotations

import numpy as np

from . import schema as K
from .errors import MetadataCorrupt
from .mdpages import BLOCK
from .nodepacks import ranges

#: format 3's leaves
GROUPS_ARRAY = "leaf_groups"
GROUP = 16
_STREAM_HEAD = 8 + GROUP * K.LEAF_ENTRIES // 8     # dense mask + 1,024 bytes of bitmap
SPAN = GROUP + (_STREAM_HEAD + GROUP * 192 * 8 + BLOCK - 1) // BLOCK
_PAGE_WORDS = BLOCK // 8
_SPAN_WORDS = SPAN * _PAGE_WORDS
_STREAM_WORD = GROUP * _PAGE_WORDS
_VALUES_WORD = _STREAM_WORD + _STREAM_HEAD // 8
_CAPACITY = _SPAN_WORDS - _VALUES_WORD


def groups_from_disk(buf: np.ndarray) -> np.ndarray:
    """Format 3's leaves: groups of 16 slots owning 23 pages each (16 own pages of dense leaves, then
    a stream: a uint64 mask of the dense slots, a 1,024-byte bitmap of the sparse leaves' mapped
    entries, their values)."""
    ng = len(buf) // (SPAN * BLOCK)
    leaves = np.full((ng * GROUP, K.LEAF_ENTRIES), K.UNMAPPED, np.uint64)
    if ng == 0:
        return leaves
    words = buf[: ng * SPAN * BLOCK].view(np.uint64).reshape(ng, _SPAN_WORDS)
    dense_mask = words[:, _STREAM_WORD]
    bad = np.flatnonzero(dense_mask >> np.uint64(GROUP))
    if len(bad):
        raise MetadataCorrupt(f"leaf group {int(bad[0])}: dense-leaf mask {int(dense_mask[bad[0]]):#x} names "
                              f"slots past {GROUP}", structure="leaves")
    dense = ((dense_mask[:, None] >> np.arange(GROUP, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(bool)
    heads = words[:, _STREAM_WORD + 1:_VALUES_WORD].view(np.uint8)
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
    flat = words.reshape(-1)
    idx = ranges(np.arange(ng, dtype=np.int64) * _SPAN_WORDS + _VALUES_WORD, counts)
    leaves.reshape(-1)[mask.reshape(-1)] = flat[idx]
    own = np.flatnonzero(dense.reshape(-1))
    if len(own):
        leaves[own] = words[:, :_STREAM_WORD].reshape(ng * GROUP, K.LEAF_ENTRIES)[own]
    return leaves


def lost_leaves(lost: np.ndarray, count: int) -> np.ndarray:
    """Which of ``count`` leaves a repair loses when the ``leaf_groups`` pages marked in ``lost`` are
    unreadable: a lost own page loses its leaf, a lost stream page its whole group."""
    ng = len(lost) // SPAN
    lost = lost[: ng * SPAN].reshape(ng, SPAN)
    # (mypy: numpy's stubs type any(axis=1) as possibly a scalar)
    return (lost[:, :GROUP] | lost[:, GROUP:].any(axis=1)[:, None]).reshape(-1)[:count]  # type: ignore[index]


__all__ = ["GROUP", "GROUPS_ARRAY", "SPAN", "groups_from_disk", "lost_leaves"]
