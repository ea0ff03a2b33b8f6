"""The compiled encoder of metadata format 5's pack pages (``thinpool.kernels_pages``) against the
numpy reference encoder it replaces (``nodestore._encode_numpy``): the same bytes for random nodes of
every shape (a single entry, entries at both ends, up to the dense threshold, dense marks; values with
the top bit set; inner nodes' int32 children), and pages that decode back to the same nodes.  Also the
compiled entry count against numpy's."""

from __future__ import annotations

import numpy as np
import pytest

from thinpool import kernels_pages, nodestore
from thinpool.mdpages import BLOCK
from thinpool.nodestore import INNERS, LEAVES, MARK


def _random_nodes(kind, rng, n):
    """``n`` nodes of every shape: empty, 1 entry (first, last, anywhere), up to ``kind.dense``
    entries, dense ones, full ones; values anywhere in the type's range but the hole."""
    nodes = np.full((n, kind.entries), kind.hole, kind.dtype)
    info = np.iinfo(kind.dtype)
    for s in range(n):
        shape = s % 8
        if shape == 0:
            continue
        if shape == 1:
            idx = np.array([0 if s % 3 == 0 else kind.entries - 1 if s % 3 == 1 else int(rng.integers(kind.entries))])
        elif shape == 2:
            idx = rng.choice(kind.entries, kind.dense, replace=False)  # the most a record holds
        elif shape == 3:
            idx = rng.choice(kind.entries, kind.dense + 1, replace=False)  # the least a dense node holds
        elif shape == 4:
            idx = np.arange(kind.entries)
        else:
            idx = rng.choice(kind.entries, int(rng.integers(1, kind.dense)), replace=False)
        lo = 0 if kind is INNERS else int(info.min)
        vals = rng.integers(lo, int(info.max), len(idx), dtype=kind.dtype, endpoint=False)
        if kind is LEAVES:
            vals[::2] |= np.uint64(1) << np.uint64(63)  # the top bit set: still not the hole
        nodes[s, idx] = vals
    return nodes


def _stored(kind, nodes):
    count = (nodes != nodes.dtype.type(kind.hole)).sum(axis=1)
    return np.where(count == 0, -1, np.where(count > kind.dense, MARK, count)).astype(np.int32)


def _pages_of(kind, stored):
    """The live records cut into pages the way a commit cuts them."""
    recs = np.flatnonzero(stored != -1)
    return nodestore._cut(nodestore._record_bytes(stored[recs], kind), recs)


@pytest.mark.parametrize("kind", [LEAVES, INNERS], ids=lambda k: k.name)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_format5_compiled_pack_encoder_writes_the_numpy_reference_bytes(kind, seed):
    rng = np.random.default_rng(seed)
    nodes = _random_nodes(kind, rng, 400)
    stored = _stored(kind, nodes)
    page_recs = _pages_of(kind, stored)
    assert len(page_recs) > 3 and any((stored[r] == MARK).any() for r in page_recs)
    pos = rng.permutation(len(page_recs) + 5)[:len(page_recs)].tolist()
    ref = nodestore._encode_numpy(kind, nodes, stored, page_recs, pos)
    got = nodestore._encode(kind, nodes, stored, page_recs, pos)  # numba is loaded: the compiled path
    assert nodestore._compiled() is kernels_pages
    assert sorted(got) == sorted(ref)
    for p in ref:
        assert bytes(got[p]) == ref[p], f"{kind.name} pack page {p} differs"
    # and the pages decode to the nodes they were made from
    buf = np.zeros((max(pos) + 1) * BLOCK, np.uint8)
    for p, page in got.items():
        buf[p * BLOCK:(p + 1) * BLOCK] = np.frombuffer(page, np.uint8)
    dense = np.flatnonzero(stored == MARK)
    decoded, disk = nodestore._packs_from_disk(
        kind, buf, len(nodes), lambda out, d: out.__setitem__(d, nodes[d]),
        lambda n: np.empty((n, kind.entries), kind.dtype))
    assert np.array_equal(decoded, nodes)
    assert np.array_equal(disk.stored, stored) and len(dense)


@pytest.mark.parametrize("kind", [LEAVES, INNERS], ids=lambda k: k.name)
def test_format5_compiled_encoder_refuses_records_out_of_step_with_the_nodes(kind):
    """A record whose stored count is not what its node holds is never written (both encoders)."""
    rng = np.random.default_rng(7)
    nodes = _random_nodes(kind, rng, 64)
    stored = _stored(kind, nodes)
    page_recs = _pages_of(kind, stored)
    s = int(np.flatnonzero((stored > 1) & (stored != MARK))[0])
    for delta in (-1, 1):
        bad = stored.copy()
        bad[s] += delta
        with pytest.raises(AssertionError):
            nodestore._encode(kind, nodes, bad, page_recs, list(range(len(page_recs))))
        with pytest.raises(AssertionError):
            nodestore._encode_numpy(kind, nodes, bad, page_recs, list(range(len(page_recs))))


@pytest.mark.parametrize("kind", [LEAVES, INNERS], ids=lambda k: k.name)
def test_format5_compiled_entry_count_matches_numpy(kind):
    """Per dirty node: no record (-1) when empty or dead, MARK when dense, else its entry count."""
    rng = np.random.default_rng(11)
    nodes = _random_nodes(kind, rng, 300)
    rc = rng.integers(0, 3, len(nodes)).astype(np.uint32)
    slots = rng.permutation(len(nodes))[:200].astype(np.int64)
    out = np.empty(len(slots), np.int32)
    kernels_pages.count_entries(nodes.view(np.uint32), kind.width // 4, rc, slots, kind.dense, MARK, out)
    want = _stored(kind, nodes)[slots]
    want[rc[slots] == 0] = -1
    assert np.array_equal(out, want)
