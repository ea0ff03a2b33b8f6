"""The JIT allocator (kernels.allocate_many / alloc_data_block) and the pure-Python reference in
perf/reference_alloc.py give identical block sequences and end states on random states."""

from __future__ import annotations

import os
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))

from perf.reference_alloc import ReferenceAllocator  # noqa: E402
from thinpool import kernels as K  # noqa: E402


def _state(nr_blocks: int, used_frac: float, freed_frac: float, cursor: int, seed: int):
    rng = np.random.default_rng(seed)
    cap = -(-max(nr_blocks, 1) // 1024) * 1024
    data_rc = np.zeros(cap, np.uint32)
    used = rng.random(nr_blocks) < used_frac
    data_rc[:nr_blocks][used] = rng.integers(1, 5, int(used.sum()), dtype=np.uint32)
    freed = np.zeros(cap, np.uint8)
    candidates = np.flatnonzero(~used)
    freed[candidates[rng.random(len(candidates)) < freed_frac]] = 1
    rc_dirty = np.zeros(cap >> K.RC_PAGE_BITS, np.uint8)
    s = np.zeros(K.ST_SIZE, np.int64)
    s[K.ST_NR_BLOCKS] = nr_blocks
    s[K.ST_CURSOR] = cursor
    nfree = int(np.count_nonzero(data_rc[:nr_blocks] == 0))
    s[K.ST_NR_FREE] = nfree
    s[K.ST_NR_ALLOCATABLE] = nfree - int(np.count_nonzero(freed[:nr_blocks]))
    return data_rc, freed, rc_dirty, s


def _compare(nr_blocks, used_frac, freed_frac, cursor, count, seed):
    data_rc, freed, rc_dirty, s = _state(nr_blocks, used_frac, freed_frac, cursor, seed)
    ref = ReferenceAllocator.from_kernel_state(data_rc, freed, rc_dirty, s)
    out = np.full(count, -7, np.int64)
    got = K.allocate_many(data_rc, freed, rc_dirty, s, count, out)
    expected = ref.allocate_many(count)
    assert got == len(expected)
    assert out[:got].tolist() == expected
    assert data_rc.tolist() == ref.counts
    assert rc_dirty.tolist() == ref.rc_dirty
    assert freed.tolist() == ref.freed
    assert int(s[K.ST_CURSOR]) == ref.cursor
    assert int(s[K.ST_NR_FREE]) == ref.nr_free
    assert int(s[K.ST_NR_ALLOCATABLE]) == ref.nr_allocatable
    # one more single allocation continues identically (including -1 when exhausted)
    assert K.alloc_data_block(data_rc, freed, rc_dirty, s) == ref.alloc()


@settings(max_examples=300, deadline=None)
@given(nr_blocks=st.integers(1, 3000), used_frac=st.floats(0, 1), freed_frac=st.floats(0, 1),
       cursor=st.integers(0, 3500), count=st.integers(0, 3500), seed=st.integers(0, 2**32 - 1))
def test_kernel_matches_reference(nr_blocks, used_frac, freed_frac, cursor, count, seed):
    _compare(nr_blocks, used_frac, freed_frac, cursor, count, seed)


def test_exhaustion_and_wrap():
    # cursor past the end restarts at 0; all blocks allocatable then exhausted
    _compare(100, 0.0, 0.0, 150, 120, 1)
    # everything used: nothing allocatable
    _compare(64, 1.0, 0.0, 10, 5, 2)
    # only freed-this-transaction blocks are free: they are never handed out
    _compare(64, 0.5, 1.0, 3, 64, 3)


def test_large_state():
    _compare(200_000, 0.3, 0.1, 12345, 150_000, 4)
