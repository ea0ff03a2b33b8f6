"""The compiled encoder of metadata format 5's pack pages (``thinpool.kernels_pages``) against the
numpy reference encoder it stands for (``nodepacks._encode``): the same bytes for random nodes of
every shape (a single entry, entries at both ends, up to the dense threshold, dense marks; values with
the top bit set; inner nodes' int32 children), and pages that decode back to the same nodes.  Also the
compiled entry count against numpy's."""

from __future__ import annotations

import numpy as np
import pytest

from thinpool import kernels_pages, nodepacks, nodestore
from thinpool.mdpages import BLOCK
from thinpool.nodestore import INNERS, LEAVES, MARK


def _compiled_encode(kind, nodes, stored, page_recs, pos, old=None, old_rows=(), changed=()):
    """``kernels_pages.encode_packs`` as ``nodepacks._encode`` is called (AssertionError for records
    out of step with the nodes)."""
    slots = np.concatenate(page_recs).astype(np.int64)
    out = np.empty((len(page_recs), BLOCK // 2), np.uint16)
    old = np.zeros((0, BLOCK // 2), np.uint16) if old is None else old
    bad = kernels_pages.encode_packs(nodes.view(np.uint32), kind.width // 4, slots, stored[slots].astype(np.int64),
                                     np.array([len(r) for r in page_recs], np.int64), kind.tag, out, old,
                                     np.array(old_rows, np.int64), np.array(changed, np.int64))
    assert bad < 0
    return {p: memoryview(out[i]).cast("B") for i, p in enumerate(pos)}


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
    return nodepacks._cut(nodepacks._record_bytes(stored[recs], kind), recs)


@pytest.mark.parametrize("kind", [LEAVES, INNERS], ids=lambda k: k.name)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_format5_compiled_pack_encoder_writes_the_numpy_reference_bytes(kind, seed):
    rng = np.random.default_rng(seed)
    nodes = _random_nodes(kind, rng, 400)
    stored = _stored(kind, nodes)
    page_recs = _pages_of(kind, stored)
    assert len(page_recs) > 3 and any((stored[r] == MARK).any() for r in page_recs)
    pos = rng.permutation(len(page_recs) + 5)[:len(page_recs)].tolist()
    ref = nodepacks._encode(kind, nodes, stored, page_recs, pos)
    got = _compiled_encode(kind, nodes, stored, page_recs, pos)
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
    # unchanged records copied from the pages just written, changed ones read from their nodes
    old = buf.view(np.uint16).reshape(-1, BLOCK // 2)
    changed = np.flatnonzero((stored > 0) & (stored != MARK))[::3]
    for s in changed.tolist():
        live = np.flatnonzero(nodes[s] != nodes.dtype.type(kind.hole))
        nodes[s, live] = nodes[s, live[::-1]]  # the same entries, other values
    again = _compiled_encode(kind, nodes, stored, page_recs, pos, old, sorted(pos), changed)
    ref = nodepacks._encode(kind, nodes, stored, page_recs, pos)
    assert all(bytes(again[p]) == ref[p] for p in ref)
    assert any(bytes(again[p]) != bytes(got[p]) for p in ref)


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
            _compiled_encode(kind, nodes, bad, page_recs, list(range(len(page_recs))))
        with pytest.raises(AssertionError):
            nodepacks._encode(kind, nodes, bad, page_recs, list(range(len(page_recs))))


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


def _commit_both(disk, nodes, rc, dirty):
    """One commit's updates through the compiled path and the numpy path: (pages, after) of each."""
    got = disk.updates(nodes, rc, dirty)
    real = nodestore._compiled
    nodestore._compiled = lambda: None
    try:
        ref = disk.updates(nodes, rc, dirty)
    finally:
        nodestore._compiled = real
    return got, ref


def _same(got, ref):
    (gp, ga), (rp, ra) = got, ref
    for name in rp:
        g, r = gp[name], rp[name]
        assert (g.npages, g.dirty, g.dead) == (r.npages, r.dirty, r.dead), name
        for i in r.dirty:
            if i not in r.dead:
                assert bytes(g.page(i)) == bytes(r.page(i)), f"{name} page {i}"
    for f in ("stored", "keys", "pos", "size"):
        assert np.array_equal(getattr(ga, f), getattr(ra, f)), f
    assert ga.npages == ra.npages


@pytest.mark.parametrize("kind", [LEAVES, INNERS], ids=lambda k: k.name)
@pytest.mark.parametrize("seed", [5, 6])
def test_format5_compiled_repack_plans_the_pages_the_numpy_commit_writes(kind, seed):
    """A history of commits -- nodes filled, grown dense, thinned, emptied, killed, in clusters and
    scattered -- re-packed by the compiled path (one ``kernels_pages.node_updates`` call per commit) and
    by the numpy one: the same pack pages in the same places, the same pages released, the same record
    of what is stored."""
    rng = np.random.default_rng(seed)
    n = 3000
    nodes = np.full((n, kind.entries), kind.hole, kind.dtype)
    rc = np.ones(n, np.uint32)
    disk = nodestore.NodeDisk.empty(kind)
    for step in range(40):
        dirty = np.zeros(n, np.uint8)
        lo = int(rng.integers(0, n - 200))
        many = rng.integers(1, 400) if step % 5 else 2000
        slots = np.unique(np.concatenate([rng.integers(lo, lo + 200, many // 2), rng.integers(0, n, many // 2)]))
        for s in slots.tolist():
            action = rng.integers(6)
            if action == 0:
                nodes[s] = kind.hole
            elif action == 1:
                rc[s] = 0
            elif action == 2:
                nodes[s, rng.choice(kind.entries, kind.dense + 5, replace=False)] = 3
            else:
                rc[s] = 1
                nodes[s, rng.choice(kind.entries, int(rng.integers(1, 12)), replace=False)] = \
                    rng.integers(0, 1 << 30, dtype=np.int64).astype(kind.dtype)
            dirty[s] = 1
        got, ref = _commit_both(disk, nodes, rc, dirty)
        _same(got, ref)
        disk = got[1] if step % 3 else ref[1]  # the numpy path's pages reach the compiled one's copies too
    assert disk.npages > 3
