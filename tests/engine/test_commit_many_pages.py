"""A commit of many pages releases and allocates metadata blocks array-at-a-time (numpy): it must pick
the same blocks, in the same order, as the block-by-block path, and a commit that fails half-way must
put every block state back (nothing committed is ever lost, the next commit may reuse nothing it must
not)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from thinpool import Pool, mdcommit, mdspace, mdstore
from thinpool.errors import HostIOError

MiB = 1 << 20
BS = 64 << 10


def _write(v, blocks, byte: int) -> None:
    v.write_many(blocks * BS, np.full((len(blocks), 512), byte, np.uint8))


def _workload(path: str) -> tuple[dict, dict, list, bytes]:
    """A pool whose commits each write hundreds of leaf pages (a snapshot shares every leaf, the
    writes after it shadow them, a delete releases them); its page locations and block states."""
    rng = np.random.default_rng(5)
    with Pool.create(path, data_size=16384 * MiB, metadata_only=True, flush=False) as pool:
        v = pool.create_thin("v", 8192 * MiB)
        blocks = rng.permutation(8192 * MiB // BS)[:100_000]
        _write(v, blocks, 1)
        pool.commit()
        for i in range(3):
            pool.snapshot("v", f"s{i}")
            _write(v, rng.permutation(8192 * MiB // BS)[:3000], 2)
            pool.commit()
        pool.delete("s0")
        _write(v, rng.permutation(8192 * MiB // BS)[:3000], 3)
        pool.commit()
        _write(v, np.arange(0, 8192 * MiB // BS, 1024), 4)  # every other leaf: pages whose nodes lie apart
        pool.commit()
        st = pool._store
        return ({k: list(a) for k, a in st.locs.items()}, {k: list(a) for k, a in st.pm_locs.items()},
                list(st.dir_locs), bytes(st.state))


def test_commit_array_at_a_time_picks_the_same_metadata_blocks_as_block_by_block(tmp_path, monkeypatch):
    fast = _workload(str(tmp_path / "a"))
    monkeypatch.setattr(mdspace, "_NP_MIN", 1 << 60)
    monkeypatch.setattr(mdcommit, "_NP_MIN", 1 << 60)
    slow = _workload(str(tmp_path / "b"))
    assert sum(len(x) for x in fast[0].values()) > 500  # the arrays had many pages
    assert fast == slow


def _files(path: str) -> tuple[dict, bytes]:
    """The workload's page locations (block and CRC of every page) and the bytes of every metadata
    block its last commit uses but the superblocks (they carry the pool's uuid and creation time)."""
    locs, pm, dirs, state = _workload(path)
    with open(f"{path}/metadata", "rb") as f:
        blob = f.read()
    used = b"".join(blob[b * 4096:(b + 1) * 4096] for b, s in enumerate(state) if s & mdspace._USED and b >= 2)
    return {"locs": locs, "pm": pm, "dir": dirs, "state": state}, used


def test_commit_queues_rows_of_buffers_and_writes_the_same_metadata_as_page_by_page(tmp_path, monkeypatch):
    """A commit takes the pages of the nodes, counts and space map as rows of their buffers (no copy,
    no step per page; written straight from them, or gathered where a run of blocks has rows apart):
    the metadata file it leaves -- every used block's bytes, every page's block and CRC -- is the one
    the page-by-page path writes."""
    from thinpool import mdpages, nodestore
    fast = _files(str(tmp_path / "a"))
    for cls in (mdpages.PagedArray, mdpages.RowPages, nodestore._Pages):
        monkeypatch.setattr(cls, "page_rows", lambda self, pages: None)
    slow = _files(str(tmp_path / "b"))
    assert len(fast[1]) > 500 * 4096
    assert fast == slow


class _FailAfter(mdstore.FileIO):
    """Lets ``n`` metadata writes through, then fails every one with EIO."""

    def __init__(self, n: int) -> None:
        self.left = n

    def pwrite(self, fd: int, data, offset: int) -> int:  # type: ignore[override]
        if self.left <= 0:
            raise OSError(errno.EIO, "injected")
        self.left -= 1
        return mdstore.FileIO.pwrite(fd, data, offset)


@pytest.mark.parametrize("after", [0, 3])
def test_failed_commit_of_many_pages_puts_every_block_state_back(tmp_path, monkeypatch, after):
    rng = np.random.default_rng(6)
    with Pool.create(str(tmp_path / "p"), data_size=16384 * MiB, metadata_only=True) as pool:
        v = pool.create_thin("v", 8192 * MiB)
        _write(v, rng.permutation(8192 * MiB // BS)[:100_000], 1)
        pool.commit()
        pool.snapshot("v", "s")
        _write(v, rng.permutation(8192 * MiB // BS)[:3000], 2)  # shadows hundreds of leaves
        st = pool._store
        before = bytes(st.state)
        # the commit's pages go to one run of free blocks (MetadataSpace._reserve_run): written 16 pages
        # a pwrite here, so that a failure can come after some of them
        monkeypatch.setattr(mdcommit, "_RUN_PAGES", 16)
        monkeypatch.setattr(mdstore.MetadataStore, "io", _FailAfter(after))
        with pytest.raises(HostIOError):
            pool.commit()
        assert bytes(st.state) == before
        monkeypatch.setattr(mdstore.MetadataStore, "io", mdstore.FileIO())
        pool.commit()  # the retry commits what the failed one could not
        want = v.read(0, 4096)
    with Pool.open(str(tmp_path / "p")) as pool:
        assert pool.thin("v").read(0, 4096) == want and pool.thin("s") is not None


def test_commit_state_from_the_changed_blocks_is_the_full_scans(tmp_path, monkeypatch):
    """A commit makes the next block-state map from the blocks it changed (in place) and counts its used
    blocks from theirs, instead of translating and counting the whole map: after every commit -- with
    snapshots, deletes, a held metadata snapshot (the full scan) and its release -- the map, the used
    count and the top block it records are those made afresh from the committed page locations."""
    rng = np.random.default_rng(7)
    seen = {"changed": 0, "full": 0}
    real = mdspace.MetadataSpace._commit_state

    def commit_state(self, free_before):
        seen["changed" if free_before is not None and not self.held_blocks else "full"] += 1
        return real(self, free_before)
    monkeypatch.setattr(mdspace.MetadataSpace, "_commit_state", commit_state)

    def check(pool) -> None:
        st = pool._store
        kept = st._state
        st._state = None
        fresh = bytes(st.state)  # built from the committed locations (and the held blocks)
        st._state = kept
        assert bytes(kept) == fresh
        assert st.header["metadata_used_blocks"] == st.nr_blocks - fresh.count(0)
        assert st.hint("metadata_top") == fresh.rfind(mdspace._USED | mdspace._PROTECTED)
        assert st.free_blocks() == fresh.count(0)

    with Pool.create(str(tmp_path / "p"), data_size=16384 * MiB, metadata_only=True, flush=False) as pool:
        v = pool.create_thin("v", 8192 * MiB)
        _write(v, rng.permutation(8192 * MiB // BS)[:50_000], 1)
        pool.commit()
        check(pool)
        for i in range(6):
            pool.snapshot("v", f"s{i}")
            check(pool)
            _write(v, rng.permutation(8192 * MiB // BS)[:2000], 2)
            pool.commit()
            check(pool)
            if i == 2:
                pool.reserve_metadata_snap()
                check(pool)
            if i == 4:
                pool.release_metadata_snap()
                check(pool)
            if i >= 2:
                pool.delete(f"s{i - 2}")
                check(pool)
    assert seen["changed"] >= 8 and seen["full"] >= 3


def _small_commits(path: str, monkeypatch) -> list[tuple[bytes, int, int | None]]:
    """One-write commits (a few blocks allocated and released each), discards, a snapshot and its
    delete, and failed commits (the map put back); after each commit the block-state map, the used
    count and the top block it records -- each also checked against the map made afresh."""
    rng = np.random.default_rng(8)
    out = []
    with Pool.create(path, data_size=256 * MiB, block_size=BS) as pool:
        v = pool.create_thin("v", 256 * MiB)
        st = pool._store
        for i in range(60):
            if i % 15 == 7:
                pool.snapshot("v", f"s{i}")
            elif i % 15 == 11:
                pool.delete(f"s{i - 4}")
            elif i % 10 == 5:
                v.discard(int(rng.integers(0, 256 * MiB // BS)) * BS, BS)
            v.write(int(rng.integers(0, 256 * MiB // BS)) * BS, bytes([i % 250 + 1]) * 4096)
            if i % 9 == 4:
                before = bytes(st.state)
                monkeypatch.setattr(mdstore.MetadataStore, "io", _FailAfter(0))  # (its pages: one run)
                with pytest.raises(HostIOError):
                    pool.commit()
                monkeypatch.setattr(mdstore.MetadataStore, "io", mdstore.FileIO())
                assert bytes(st.state) == before, i
            pool.commit()
            kept = st._state
            st._state = None
            fresh = bytes(st.state)  # built from the committed locations
            st._state = kept
            assert bytes(kept) == fresh, i
            assert st.header["metadata_used_blocks"] == st.nr_blocks - fresh.count(0), i
            assert st.hint("metadata_top") == fresh.rfind(mdspace._USED | mdspace._PROTECTED), i
            out.append((fresh, st.header["metadata_used_blocks"], st.hint("metadata_top")))
    return out


def test_commit_state_of_a_small_commit_block_by_block_is_the_array_at_a_time_one(tmp_path, monkeypatch):
    """A small commit (at most ``_FEW_CHANGED`` block states changed) makes the next block-state map
    block by block in Python: after every commit of a run of small ones -- writes, discards, a snapshot
    and its delete, failed commits between them, each failed one putting the map back -- the map, the
    used count and the top block are those the array-at-a-time path gives and those made afresh."""
    seen = {"few": 0}
    real = mdspace.MetadataSpace._commit_state

    def commit_state(self, free_before):
        if free_before is not None and self._undo is not None and len(self._undo) <= mdspace._FEW_CHANGED:
            seen["few"] += 1
        return real(self, free_before)
    monkeypatch.setattr(mdspace.MetadataSpace, "_commit_state", commit_state)
    fast = _small_commits(str(tmp_path / "a"), monkeypatch)
    assert seen["few"] >= 50
    monkeypatch.setattr(mdspace, "_FEW_CHANGED", -1)
    slow = _small_commits(str(tmp_path / "b"), monkeypatch)
    assert fast == slow
