"""Power lost in the commit that releases the held metadata snapshot.

The last committed superblock still names the held state (its directory, page maps and pages) until
the release's commit is durable, and a load of that superblock reads and verifies the held state.
So the release's commit must not write into the held state's blocks: power lost before its
superblock would leave the previous commit -- the one to reopen at -- with a held state that is no
longer there (the reopened pool's check, or its open, failed with a bad checksum).
"""

from __future__ import annotations

import pytest

from tests.crash.power import PowerLoss, StopAtSuperblock
from thinpool import Pool, mdstore
from thinpool.mdspace import _USED

BS = 64 * 1024


def _held_pool(path: str, n: int) -> Pool:
    """A pool holding a metadata snapshot of a volume ``w`` of ``n`` mapped blocks, then ``w`` deleted
    and ``v`` written over five commits: the held state's pages are left in blocks only it uses."""
    pool = Pool.create(path, data_size="256MiB", block_size=BS)
    v = pool.create_thin("v", "1GiB")
    w = pool.create_thin("w", "1GiB")
    for i in range(n):
        w.write(i * BS, b"w" * 512)
    v.write(0, b"a" * 4096)
    pool.commit()
    pool.reserve_metadata_snap()
    pool.delete("w")  # (commits)
    for i in range(1, 6):
        v.write(i * BS, bytes([65 + i]) * 4096)
        pool.commit()
    return pool


def test_power_lost_in_the_release_commit_keeps_the_held_state(tmp_path, monkeypatch):
    n = 50
    path = str(tmp_path / "p")
    pool = _held_pool(path, n)
    try:
        store = pool._store
        gen = store.generation
        held_only = [b for b in store.held_blocks if not store.state[b] & _USED]
        assert held_only, "the held state has no block of its own: nothing to protect"
        pool._store.io = StopAtSuperblock()
        monkeypatch.setattr(StopAtSuperblock, "armed", True)
        with pytest.raises(PowerLoss):
            pool.release_metadata_snap()
    finally:
        monkeypatch.setattr(StopAtSuperblock, "armed", False)
        pool._store.io = mdstore.FileIO()
        pool.close(commit=False)
    with Pool.open(path) as pool:
        assert pool._store.generation == gen and pool._store.header.get("held")
        assert not pool.recovered_from, pool.recovered_from
        rep = pool.check()  # (reads the held state: a held page overwritten was MetadataCorrupt)
        assert rep.ok and not rep.warnings, (rep.errors, rep.warnings)
        pool._store.load_held()
        assert len(pool.held_data_blocks()) == n + 1
        assert pool.thin("v").mappings()[0].tolist() == [0, 1, 2, 3, 4, 5]
        pool.release_metadata_snap()  # (the release, done again, completes)
        assert not pool._store.header.get("held") and pool.check().ok


def test_a_completed_release_frees_the_held_blocks(tmp_path):
    """Once the release's commit is durable the held state's blocks are free (the map the commit made
    counts them free, as a reopen does)."""
    path = str(tmp_path / "p")
    pool = _held_pool(path, 200)
    try:
        free_held = pool._store.free_blocks()
        pool.release_metadata_snap()
        free_after = pool._store.free_blocks()
        assert free_after > free_held
    finally:
        pool.close()
    with Pool.open(path) as pool:
        assert pool._store.free_blocks() == free_after
        assert pool.check().ok
