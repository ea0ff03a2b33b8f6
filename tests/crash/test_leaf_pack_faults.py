"""Power loss during a commit that re-packs node records (metadata format 5,
``thinpool/nodestore.py``).

A pool holds a few hundred sparse leaves (records packed across several pages) and some dense ones
(their own pages). One transaction then grows, empties and adds sparse leaves, turns a dense leaf
sparse and a sparse one dense -- so its commit splits, merges, drops and adds pack pages, writes and
releases dense pages, and re-packs the mid nodes above the leaves it adds. For every pwrite and
fdatasync of that commit, power is lost there (``stop``: the event never happens; ``tear``: the
write stops at a random byte; ``lose``: every write since the last sync is lost too), using the
fault layer of ``test_torn_writes``. The reopened pool must hold exactly the previous commit's
mappings, or the new commit's once its superblock is durable, and pass ``check()``; and no write of
the commit may touch a metadata block the previous commit's superblock references (shadowing:
dm-thin never writes over a block of the committed transaction).
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest

from thinpool import Pool, nodestore
from thinpool.mdstore import BLOCK, MetadataStore

from .test_torn_writes import FaultIO, PowerLoss

BS = 64 * 1024


def _mappings(pool: Pool) -> tuple:
    return tuple(tuple(a.tolist()) for a in pool.thin("v").mappings())


def _write(vol, blocks, tag: int) -> None:
    blocks = np.asarray(sorted(set(int(b) for b in blocks)), np.int64)
    vol.write_many(blocks * BS, [np.full(64, tag, np.uint8)] * len(blocks))


def _base(path: str) -> None:
    rng = np.random.default_rng(21)
    with Pool.create(path, data_size=str(60000 * BS), metadata_only=True, error_if_no_space=True) as p:
        v = p.create_thin("v", size=str((1 << 23) * BS))
        leaves = rng.choice(8000, 700, replace=False)
        _write(v, [leaf * 512 + int(o) for leaf in leaves.tolist() for o in rng.choice(512, int(rng.integers(1, 30)),
                                                                                        replace=False)], 1)
        _write(v, [leaf * 512 + o for leaf in (9000, 9001, 9002) for o in range(300)], 2)  # three dense leaves
        p.commit()
        assert p.store.npages(nodestore.PACK_ARRAY) > 20


def _change(p: Pool) -> None:
    """One transaction touching every kind of leaf change."""
    rng = np.random.default_rng(22)
    v = p.thin("v")
    _write(v, [int(leaf) * 512 + int(o) for leaf in rng.choice(8000, 60, replace=False)
               for o in rng.choice(512, 8, replace=False)], 3)        # leaves grow, new leaves
    for leaf in rng.choice(8000, 40, replace=False).tolist():
        v.discard(leaf * 512 * BS, 512 * BS)                           # leaves emptied
    v.discard(9000 * 512 * BS, 250 * BS)                               # a dense leaf turns sparse
    _write(v, [100 * 512 + o for o in range(400)], 4)                  # a sparse leaf turns dense


def _committed_blocks(store: MetadataStore) -> set[int]:
    out = {loc >> 32 for arr in list(store.locs.values()) + list(store.pm_locs.values()) for loc in arr}
    out |= {loc >> 32 for loc in store.dir_locs}
    return out - {0}


@pytest.fixture(scope="module")
def base(module_scratch):
    path = os.path.join(module_scratch, "base")
    _base(path)
    with Pool.open(path) as p:
        before = _mappings(p)
        committed = _committed_blocks(p.store)
        _change(p)
        io = FaultIO("count")
        saved, MetadataStore.io = MetadataStore.io, io
        try:
            p.commit()
        finally:
            MetadataStore.io = saved
        after = _mappings(p)
        assert before != after
    # the commit wrote every changed page somewhere the committed state does not use
    written = {off // BLOCK + i for kind, off, n in io.log if kind == "write" for i in range(n // BLOCK)}
    assert written and not written & committed
    shutil.rmtree(path)
    _base(path)
    return path, before, after, io.events, io.log


@pytest.mark.parametrize("mode", ["stop", "tear", "lose"])
def test_kernel_rule_a_crash_during_a_repacking_commit_leaves_the_last_commit(base, module_scratch, mode):
    path, before, after, events, log = base
    sb = max(i for i, (kind, off, _n) in enumerate(log, 1) if kind == "write" and off < 2 * BLOCK)
    rng = random.Random(len(mode))
    seen = set()
    for n in range(1, events + 1):
        work = os.path.join(module_scratch, f"{mode}-{n}")
        shutil.copytree(path, work)
        p = Pool.open(work)
        committed = _committed_blocks(p.store)
        _change(p)
        io = FaultIO(mode, n, random.Random(rng.random()))
        saved, MetadataStore.io = MetadataStore.io, io
        try:
            with pytest.raises(PowerLoss):
                p.commit()
        finally:
            MetadataStore.io = saved
            p.close(commit=False)
        assert not {off // BLOCK + i for kind, off, m in io.log if kind == "write" for i in range(m // BLOCK)} \
            & committed, f"{mode} at event {n}: a block of the committed state was written"
        with Pool.open(work) as q:
            got = _mappings(q)
            assert q.check().ok
            if n < sb or mode == "lose" or (mode == "stop" and n == sb):
                assert got == before, f"{mode} at event {n}: not the previous commit"
            else:
                assert got in (before, after), f"{mode} at event {n}: neither commit"
            seen.add(got == after)
            q.close(commit=False)
        shutil.rmtree(work)
    assert False in seen and (mode == "lose" or True in seen)
