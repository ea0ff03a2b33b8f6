"""The engine's kernels against the naive references of :mod:`tests.engine.reference`, under Hypothesis.

Random block maps -- device roots shared by snapshots, mid nodes and leaves shared between trees,
mappings of several times -- are built as plain dicts (``reference.Forest``), loaded into node-store
arrays through ``BlockMap.from_arrays`` (the loader the pool uses), and every kernel's answer is
compared with the naive one: lookup, blocks-needed, discard, logical counts (mapped / exclusive /
shared), the reference-count recount of ``check``, and data-block allocation.

``tests/run.sh`` runs this module a second time with ``NUMBA_DISABLE_JIT=1`` so that the kernel
bodies run as Python (coverage, Python's bounds checks); that run uses fewer examples.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine import reference as R
from tests.support import soak_examples
from thinpool import kernels as K
from thinpool import kernels_map as M
from thinpool import schema as S
from thinpool import walks as W
from thinpool.blockmap import BlockMap

JIT_OFF = os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0")
EXAMPLES = soak_examples(40 if JIT_OFF else 200)
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NODE_CAP = 1024            # node slots per kind (a whole reference-count page)
NR_DATA = 96               # data blocks of the generated space maps
DATA_CAP = 1024
BS = 4096                  # the kernels only divide by it
ROOT_POS = [0, 1, 1023]    # entries exercised at each level: first, second, last
MID_POS = [0, 1, 2, 1023]
LEAF_POS = [0, 1, 2, 255, 510, 511]
TIMES = 8


# ----------------------------------------------------------------------------- random block maps
@st.composite
def forests(draw) -> R.Forest:
    """A random block map whose node ids are random slots (so slot/index mix-ups show)."""
    nleaves = draw(st.integers(1, 6))
    nmids = draw(st.integers(1, 4))
    nroots = draw(st.integers(1, 3))
    mapping = st.builds(R.pack, st.integers(0, NR_DATA - 1), st.integers(0, TIMES - 1))
    leaf_slots = draw(st.lists(st.integers(0, NODE_CAP - 1), min_size=nleaves, max_size=nleaves, unique=True))
    inner_slots = draw(st.lists(st.integers(0, NODE_CAP - 1), min_size=nmids + nroots, max_size=nmids + nroots,
                                unique=True))
    mid_slots, root_slots = inner_slots[:nmids], inner_slots[nmids:]
    f = R.Forest()
    for s in leaf_slots:
        f.leaves[s] = draw(st.dictionaries(st.sampled_from(LEAF_POS), mapping, max_size=5))
    for s in mid_slots:
        f.mids[s] = draw(st.dictionaries(st.sampled_from(MID_POS), st.sampled_from(leaf_slots), max_size=3))
    for s in root_slots:
        f.roots[s] = draw(st.dictionaries(st.sampled_from(ROOT_POS), st.sampled_from(mid_slots), max_size=3))
    f.devices = draw(st.lists(st.sampled_from(root_slots), min_size=1, max_size=4))
    return f


class Arrays:
    """A forest loaded into the kernels' arrays: node store, data space map, state and device rows."""

    def __init__(self, f: R.Forest, snap_times: list[int] | None = None) -> None:
        self.st = np.zeros(S.ST_SIZE, np.int64)
        leaves = np.full((NODE_CAP, S.LEAF_ENTRIES), S.UNMAPPED, np.uint64)
        inners = np.full((NODE_CAP, S.INNER_ENTRIES), S.NONE, np.int32)
        inner_rc, leaf_rc, data_rc = f.refcounts()
        live_roots, live_mids, live_leaves = f.live()
        for node, table in [(r, f.roots[r]) for r in live_roots] + [(m, f.mids[m]) for m in live_mids]:
            for i, child in table.items():
                inners[node, i] = child
        for leaf in live_leaves:
            for i, v in f.leaves[leaf].items():
                leaves[leaf, i] = v
        self.bm = BlockMap.from_arrays(self.st, leaves, inners, _dense(leaf_rc, NODE_CAP, np.uint32),
                                       _dense(inner_rc, NODE_CAP, np.uint32))
        self.data_rc = _dense(data_rc, DATA_CAP, np.uint32)
        self.freed_txn = np.zeros(DATA_CAP, np.uint8)
        self.rc_dirty = np.zeros(DATA_CAP >> S.RC_PAGE_BITS, np.uint8)
        nfree = int(np.count_nonzero(self.data_rc[:NR_DATA] == 0))
        self.st[S.ST_NR_BLOCKS] = NR_DATA
        self.st[S.ST_NR_FREE] = nfree
        self.st[S.ST_NR_ALLOCATABLE] = nfree
        self.st[S.ST_TIME] = TIMES
        self.st[S.ST_BLOCK_SIZE] = BS
        self.devs = np.zeros((len(f.devices), S.DEV_COLUMNS), np.int64)
        for k, root in enumerate(f.devices):
            self.devs[k, S.DEV_ROOT] = root
            self.devs[k, S.DEV_MAPPED] = len(R.mappings(f, k))
            self.devs[k, S.DEV_SNAP_TIME] = snap_times[k] if snap_times else 0
            self.devs[k, S.DEV_FLAGS] = int(S.DevFlag.IN_USE)

    @property
    def nodes(self) -> tuple:
        return self.bm.nodes

    def roots(self) -> np.ndarray:
        return self.devs[:, S.DEV_ROOT].astype(np.int64)

    def forest(self) -> R.Forest:
        """Read the arrays back naively (only what the devices reach)."""
        leaves, inners = self.nodes[0], self.nodes[1]
        f = R.Forest(devices=[int(r) for r in self.devs[:, S.DEV_ROOT]])
        for r in set(f.devices):
            f.roots[r] = {i: int(inners[r, i]) for i in range(S.INNER_ENTRIES) if inners[r, i] != S.NONE}
            for m in f.roots[r].values():
                f.mids[m] = {i: int(inners[m, i]) for i in range(S.INNER_ENTRIES) if inners[m, i] != S.NONE}
                for leaf in f.mids[m].values():
                    f.leaves[leaf] = {i: int(leaves[leaf, i]) for i in range(S.LEAF_ENTRIES)
                                      if leaves[leaf, i] != S.UNMAPPED}
        return f


def _dense(counts: dict[int, int], n: int, dtype) -> np.ndarray:
    out = np.zeros(n, dtype)
    for k, v in counts.items():
        out[k] = v
    return out


def _vbs() -> list[int]:
    """Virtual blocks worth asking about: every combination of the generated entries and of empty ones."""
    return [R.join_vb(r, m, i) for r, m, i in itertools.product(ROOT_POS + [5], MID_POS + [7], LEAF_POS + [100])]


# ----------------------------------------------------------------------------- constants
def test_reference_shares_the_schema_constants():
    assert (R.LEAF_BITS, R.INNER_BITS, R.RC_PAGE_BITS) == (S.LEAF_BITS, S.INNER_BITS, S.RC_PAGE_BITS)
    assert (R.UNMAPPED, R.TIME_MASK) == (S.UNMAPPED, S.TIME_MASK)
    assert R.pack(123456, (1 << 24) + 5) == S.pack_mapping(123456, (1 << 24) + 5)
    assert S.unpack_mapping(R.pack(99, 7)) == (99, 7)


# ----------------------------------------------------------------------------- the block map kernels
@SETTINGS
@given(f=forests())
def test_loaded_arrays_read_back_and_recount_like_the_reference(f):
    """The harness itself: the arrays hold the forest, and check()'s recount (walks.expected_counts)
    equals the naive reference counts."""
    a = Arrays(f)
    back = a.forest()
    for k in range(len(f.devices)):
        assert R.mappings(back, k) == R.mappings(f, k)
    inner, leaf, data, bad = W.expected_counts(a.nodes, a.roots(), NR_DATA)
    want_inner, want_leaf, want_data = f.refcounts()
    assert bad == 0
    assert inner.tolist() == _dense(want_inner, NODE_CAP, np.int64).tolist()
    assert leaf.tolist() == _dense(want_leaf, NODE_CAP, np.int64).tolist()
    assert data.tolist() == _dense(want_data, NR_DATA, np.int64).tolist()


@SETTINGS
@given(f=forests())
def test_lookup(f):
    a = Arrays(f)
    for k, root in enumerate(f.devices):
        for vb in _vbs():
            v, shared = M.lookup(a.nodes, root, vb)
            assert (int(v), bool(shared)) == R.lookup(f, k, vb), (k, R.split_vb(vb))


def segments(vbs: list[int]):
    """Write batches: up to six byte ranges starting in (mostly) the given virtual blocks."""
    start = st.one_of(st.sampled_from(vbs), st.sampled_from(_vbs())) if vbs else st.sampled_from(_vbs())
    seg = st.tuples(start, st.integers(0, BS - 1), st.sampled_from([-1, 0, 1, 100, BS - 1, BS, BS + 1, 3 * BS + 7]))
    # the kernels' contract: a batch stays inside a device (at most 2^29 blocks, checked by the caller)
    seg = seg.filter(lambda s: s[0] * BS + s[1] + s[2] <= S.MAX_VBLOCKS * BS)
    return st.lists(seg, min_size=1, max_size=6)


@SETTINGS
@given(f=forests(), data=st.data())
def test_blocks_needed(f, data):
    snap_times = data.draw(st.lists(st.integers(0, TIMES), min_size=len(f.devices), max_size=len(f.devices)))
    mapped = sorted({vb for k in range(len(f.devices)) for vb in R.mappings(f, k)})
    batch = data.draw(segments(mapped))
    a = Arrays(f, snap_times)
    offsets = np.array([vb * BS + off for vb, off, _ in batch], np.int64)
    lengths = np.array([n for _, _, n in batch], np.int64)
    for k in range(len(f.devices)):
        got = K.blocks_needed(a.nodes, a.devs[k], offsets, lengths, BS)
        assert got == R.blocks_needed(f, k, snap_times[k], offsets.tolist(), lengths.tolist(), BS)


@SETTINGS
@given(f=forests(), data=st.data())
def test_discard(f, data):
    dev = data.draw(st.integers(0, len(f.devices) - 1))
    first, last = sorted(data.draw(st.lists(st.sampled_from(_vbs() + [1 << 29]), min_size=2, max_size=2)))
    a = Arrays(f)
    maps = [R.mappings(f, k) for k in range(len(f.devices))]
    free_before = int(a.st[S.ST_NR_FREE])
    want_maps, removed, freed = R.discard(maps, dev, first, last)

    code, nxt = K.discard_range(a.nodes, (a.data_rc, a.freed_txn, a.rc_dirty), a.st, a.devs[dev], first, last)

    assert (code, nxt) == (S.OK, last)
    back = a.forest()
    assert [R.mappings(back, k) for k in range(len(f.devices))] == want_maps
    assert int(a.devs[dev, S.DEV_MAPPED]) == len(maps[dev]) - removed
    assert set(np.flatnonzero(a.freed_txn).tolist()) == freed
    assert int(a.st[S.ST_NR_FREE]) == free_before + len(freed)
    inner, leaf, data_rc = back.refcounts()       # counts stay exact through shadowing
    assert a.data_rc[:NR_DATA].tolist() == _dense(data_rc, NR_DATA, np.uint32).tolist()
    assert a.nodes[2].tolist() == _dense(leaf, NODE_CAP, np.uint32).tolist()
    assert a.nodes[3].tolist() == _dense(inner, NODE_CAP, np.uint32).tolist()


@SETTINGS
@given(f=forests(), data=st.data())
def test_kernel_rule_delete_drops_the_root_and_descends_only_into_nodes_reaching_zero(f, data):
    """dm_btree_del: deleting a device drops one reference to its root; only a node whose count reaches
    zero releases its children (a leaf its data blocks), so subtrees still shared by other devices keep
    everything.  The counts after it are the reference's for the forest without that device, and the
    blocks reaching zero are marked freed-and-stale."""
    dev = data.draw(st.integers(0, len(f.devices) - 1))
    a = Arrays(f)
    before = a.data_rc.copy()
    free_before = int(a.st[S.ST_NR_FREE])

    M.release_inner(a.nodes, (a.data_rc, a.freed_txn, a.rc_dirty), a.st, f.devices[dev], 0)

    rest = R.Forest(f.roots, f.mids, f.leaves, f.devices[:dev] + f.devices[dev + 1:])
    inner, leaf, data_rc = rest.refcounts()
    assert a.data_rc[:NR_DATA].tolist() == _dense(data_rc, NR_DATA, np.uint32).tolist()
    assert a.nodes[2].tolist() == _dense(leaf, NODE_CAP, np.uint32).tolist()
    assert a.nodes[3].tolist() == _dense(inner, NODE_CAP, np.uint32).tolist()
    freed = set(np.flatnonzero((before > 0) & (a.data_rc == 0)).tolist())
    assert set(np.flatnonzero(a.freed_txn).tolist()) == freed
    assert (a.freed_txn[sorted(freed)] == S.BLOCK_FREED | S.BLOCK_STALE).all()
    assert int(a.st[S.ST_NR_FREE]) == free_before + len(freed)
    assert set(np.flatnonzero(a.rc_dirty).tolist()) >= {b >> S.RC_PAGE_BITS for b in freed}
    _, live_mids, live_leaves = rest.live()
    for k in range(len(rest.devices)):       # the other devices' mappings are untouched
        assert R.mappings(rest, k) == R.mappings(f, k if k < dev else k + 1)
    assert int(a.st[S.ST_LEAVES_LIVE]) == len(live_leaves)


@SETTINGS
@given(f=forests(), data=st.data())
def test_kernel_rule_shadowing_a_shared_leaf_gives_its_blocks_one_more_reference(f, data):
    """Making a path writable (writable_leaf) copies every shared node on it; a copied leaf's data blocks
    each gain one reference (data counts are per distinct leaf).  Every device's mappings are unchanged
    and every count equals the reference recount of the forest read back."""
    dev = data.draw(st.integers(0, len(f.devices) - 1))
    vbs = data.draw(st.lists(st.sampled_from(_vbs()), min_size=1, max_size=4))
    a = Arrays(f)
    maps = [R.mappings(f, k) for k in range(len(f.devices))]
    for vb in vbs:
        leaf = M.writable_leaf(a.nodes, (a.data_rc, a.freed_txn, a.rc_dirty), a.st, a.devs[dev], vb)
        assert leaf != S.NONE
        assert int(a.nodes[2][leaf]) == 1
    back = a.forest()
    assert [R.mappings(back, k) for k in range(len(f.devices))] == maps
    inner, leaf_rc, data_rc = back.refcounts()
    assert a.data_rc[:NR_DATA].tolist() == _dense(data_rc, NR_DATA, np.uint32).tolist()
    assert a.nodes[2].tolist() == _dense(leaf_rc, NODE_CAP, np.uint32).tolist()
    assert a.nodes[3].tolist() == _dense(inner, NODE_CAP, np.uint32).tolist()
    assert not a.freed_txn.any()


@SETTINGS
@given(f=forests())
def test_logical_counts_and_device_usage(f):
    a = Arrays(f)
    maps = [R.mappings(f, k) for k in range(len(f.devices))]
    counts = W.logical_counts(a.nodes, a.roots(), NR_DATA)
    want = R.logical_counts(maps, NR_DATA)
    assert counts.tolist() == want
    for k, root in enumerate(f.devices):
        mapped, exclusive, highest = W.device_usage(a.nodes, root, counts)
        assert (int(mapped), int(exclusive), int(highest)) == R.device_usage(maps[k], want)


@SETTINGS
@given(f=forests())
def test_usage_of_roots_sums_shared_nodes_once_to_thin_ls_figures(f):
    """thin_ls's MAPPED/EXCLUSIVE of every device at once (each shared node summed once) equals the
    per-device walk and the naive reference, devices sharing roots, mids and leaves included."""
    a = Arrays(f)
    maps = [R.mappings(f, k) for k in range(len(f.devices))]
    counts = W.logical_counts(a.nodes, a.roots(), NR_DATA)
    want = R.logical_counts(maps, NR_DATA)
    roots = np.array(f.devices + f.devices[::-1], np.int64)   # every root twice: the memo is reused
    mapped, exclusive, highest = W.usage_of_roots(a.nodes, roots, counts)
    for k, root in enumerate(roots.tolist()):
        dev = k if k < len(f.devices) else len(roots) - 1 - k
        assert (int(mapped[k]), int(exclusive[k]), int(highest[k])) == R.device_usage(maps[dev], want)
        assert (int(mapped[k]), int(exclusive[k]), int(highest[k])) == \
            tuple(int(x) for x in W.device_usage(a.nodes, root, counts))


# ----------------------------------------------------------------------------- data-block allocation
def _state(nr_blocks: int, used_frac: float, freed_frac: float, cursor: int, seed: int):
    rng = np.random.default_rng(seed)
    cap = -(-max(nr_blocks, 1) // 1024) * 1024
    data_rc = np.zeros(cap, np.uint32)
    used = rng.random(nr_blocks) < used_frac
    data_rc[:nr_blocks][used] = rng.integers(1, 5, int(used.sum()), dtype=np.uint32)
    freed = np.zeros(cap, np.uint8)
    candidates = np.flatnonzero(~used)
    freed[candidates[rng.random(len(candidates)) < freed_frac]] = 1
    rc_dirty = np.zeros(cap >> S.RC_PAGE_BITS, np.uint8)
    s = np.zeros(S.ST_SIZE, np.int64)
    s[S.ST_NR_BLOCKS] = nr_blocks
    s[S.ST_CURSOR] = cursor
    nfree = int(np.count_nonzero(data_rc[:nr_blocks] == 0))
    s[S.ST_NR_FREE] = nfree
    s[S.ST_NR_ALLOCATABLE] = nfree - int(np.count_nonzero(freed[:nr_blocks]))
    return data_rc, freed, rc_dirty, s


def _compare(nr_blocks, used_frac, freed_frac, cursor, count, seed):
    data_rc, freed, rc_dirty, s = _state(nr_blocks, used_frac, freed_frac, cursor, seed)
    ref = R.ReferenceAllocator.from_kernel_state(data_rc, freed, rc_dirty, s)
    out = np.full(count, -7, np.int64)
    got = M.allocate_many((data_rc, freed, rc_dirty), s, count, out)
    expected = ref.allocate_many(count)
    assert got == len(expected)
    assert out[:got].tolist() == expected
    assert data_rc.tolist() == ref.counts
    assert rc_dirty.tolist() == ref.rc_dirty
    assert freed.tolist() == ref.freed
    assert int(s[S.ST_CURSOR]) == ref.cursor
    assert int(s[S.ST_NR_FREE]) == ref.nr_free
    assert int(s[S.ST_NR_ALLOCATABLE]) == ref.nr_allocatable
    # one more single allocation continues identically (including -1 when exhausted)
    assert M.alloc_data_block((data_rc, freed, rc_dirty), s) == ref.alloc()


@settings(max_examples=soak_examples(60 if JIT_OFF else 300), deadline=None)
@given(nr_blocks=st.integers(1, 3000), used_frac=st.floats(0, 1), freed_frac=st.floats(0, 1),
       cursor=st.integers(0, 3500), count=st.integers(0, 3500), seed=st.integers(0, 2**32 - 1))
def test_allocation(nr_blocks, used_frac, freed_frac, cursor, count, seed):
    _compare(nr_blocks, used_frac, freed_frac, cursor, count, seed)


def test_allocation_exhaustion_and_wrap():
    # cursor past the end restarts at 0; all blocks allocatable then exhausted
    _compare(100, 0.0, 0.0, 150, 120, 1)
    # everything used: nothing allocatable
    _compare(64, 1.0, 0.0, 10, 5, 2)
    # only freed-this-transaction blocks are free: they are never handed out
    _compare(64, 0.5, 1.0, 3, 64, 3)


def test_allocation_large_state():
    _compare(200_000, 0.3, 0.1, 12345, 150_000, 4)


def test_blocks_needed_time_rule_boundary():
    """A block mapped at time t on an unshared path needs no new block while the device's last
    snapshot is at time <= t, and needs one from snapshot time t + 1 on (dm-thin's time rule)."""
    t = 3
    f = R.Forest(roots={10: {0: 11}}, mids={11: {0: 5}}, leaves={5: {7: R.pack(40, t)}}, devices=[10])
    for snap_time, want in [(t - 1, 0), (t, 0), (t + 1, 1)]:
        a = Arrays(f, [snap_time])
        batch = (np.array([7 * BS], np.int64), np.array([BS], np.int64))
        assert K.blocks_needed(a.nodes, a.devs[0], *batch, BS) == want
        assert R.blocks_needed(f, 0, snap_time, [7 * BS], [BS], BS) == want


@pytest.mark.parametrize("dirty_pages", [1, 3, 40, 64])
def test_kernel_rule_blocks_freed_in_a_transaction_are_found_on_its_dirty_count_pages(dirty_pages):
    """DataSpaceMap.freed_blocks (what a commit records as pending): exactly the blocks whose state is
    FREED, in order -- whether few count pages are dirty (they are gathered) or most (the whole map
    is scanned); PENDING blocks of the last commit and blocks on clean pages are not this transaction's."""
    from thinpool.dataspace import DataSpaceMap
    rng = np.random.default_rng(dirty_pages)
    n = 64 << S.RC_PAGE_BITS
    stt = np.zeros(S.ST_SIZE, np.int64)
    ds = DataSpaceMap(stt, n, rng.integers(0, 4, n).astype(np.uint32))
    pages = rng.choice(64, dirty_pages, replace=False)
    ds.rc_dirty[pages] = 1
    blocks = (pages[:, None] << S.RC_PAGE_BITS) + rng.integers(0, 1 << S.RC_PAGE_BITS, (dirty_pages, 5))
    ds.freed_txn[blocks.reshape(-1)] = S.BLOCK_FREED | S.BLOCK_STALE
    ds.freed_txn[rng.integers(0, n, 50)] |= S.BLOCK_PENDING          # not freed in this transaction
    want = [b for b in range(n) if ds.freed_txn[b] & S.BLOCK_STATE == S.BLOCK_FREED and ds.rc_dirty[b >> S.RC_PAGE_BITS]]
    got = ds.freed_blocks()
    assert got.dtype == np.int64 and got.tolist() == want and len(want) > 0


@pytest.mark.parametrize("seed,chunk", [(s, 4096) for s in range(6)] + [(0, 3), (1, 5)])
def test_space_map_pages_compiled_equal_the_numpy_pages(seed, chunk, monkeypatch):
    """A commit's data space map pages (two-bit bitmap, overflow counts of 3 or more, pages released
    when they become all zeroes) from the compiled pass (kernels_map.pack_space_pages) are byte for
    byte the numpy reference's, a partial last bitmap page, counts past 255 and released pages included
    -- also when the pass runs in several chunks (whose pages are handed over gathered)."""
    from thinpool import dataspace as D
    from thinpool import spacemap_pages
    monkeypatch.setattr(spacemap_pages, "_COMPILED_CHUNK", chunk)
    rng = np.random.default_rng(seed)
    nr = 3 * D.SM_PER_PAGE + int(rng.integers(1, D.SM_PER_PAGE))
    counts = rng.choice(np.array([0, 0, 0, 1, 2, 3, 5, 300], np.uint32), nr)
    for lo in rng.integers(0, nr, 4):                              # runs of zeroes and of low counts
        counts[lo:lo + int(rng.integers(1, 3 * D.RC_PER_PAGE))] = rng.integers(0, 3)
    ds = D.DataSpaceMap(np.zeros(S.ST_SIZE, np.int64), nr, None)
    ds.data_rc[:nr] = counts
    ds.rc_dirty[rng.random(len(ds.rc_dirty)) < (0.3 if seed % 2 else 1.0)] = 1
    def locs(npages):                                              # some pages stored, some absent
        return (rng.integers(0, 2, npages).astype(np.uint64) << np.uint64(32)) | np.uint64(7)
    committed = {"data_sm": locs(D.sm_pages(nr)), "data_rc_over": locs(len(ds.rc_dirty))}
    assert D._compiled_pack() is not None                          # numba is loaded: the compiled pass
    got = ds.disk_updates(committed)
    monkeypatch.setattr(D, "_compiled_pack", lambda: None)
    want = ds.disk_updates(committed)
    assert D._compiled_pack() is None and set(got) == set(want) == {"data_sm", "data_rc_over"}
    for name in want:
        g, w = got[name], want[name]
        assert (g.npages, g.dirty, g.dead) == (w.npages, w.dirty, w.dead), name
        assert all(g.page(p) == w.page(p) for p in w.dirty if p not in w.dead), name
    assert want["data_sm"].dead or want["data_rc_over"].dead or seed % 2
