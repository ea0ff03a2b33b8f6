"""A one-flush commit (``mdcommit.ONE_FLUSH_PAGES``) whose flush is cut by power loss.

A small commit writes its pages and its superblock and then flushes once; its superblock lists the
pages (``block << 32 | crc``).  Power lost in that flush may keep the superblock and lose any subset
of the pages (the disk orders unflushed writes as it likes).  For every page of such a commit, lost
alone while everything else of the commit persists, the reopened pool must be exactly the previous
commit, pass ``check()`` and say (a check warning) that the newest commit was not used; with nothing
lost it is the new commit; a commit of more pages than a superblock lists keeps the two flushes.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from tests.crash.power import PowerLoss, StopAtSuperblock
from thinpool import Pool, mdcommit, mdstore
from thinpool.devtable import DeviceTable
from thinpool.errors import HostIOError, MetadataCorrupt
from thinpool.repair import repair
from thinpool.mdpages import BLOCK, COMMIT_PAGES, SUPERBLOCKS

BS = 64 * 1024
A, B, C = b"a" * 4096, b"b" * 4096, b"c" * 4096


class LoseOneWrite(mdstore.FileIO):
    """The store's write path, counting the writes since the last flush; when ``armed``, the next
    flush is power lost instead: write number ``lose`` since the last flush (1-based; None: none) is
    put back as it was, every other write persists."""

    armed = False
    lose: int | None = None
    unsynced: list[tuple[int, int, bytes]] = []
    written: list[int] = []  # the offsets written since the last flush

    @staticmethod
    def pwrite(fd: int, data, offset: int) -> int:
        cls = LoseOneWrite
        cls.unsynced.append((fd, offset, os.pread(fd, len(memoryview(data).cast("B")), offset)))
        cls.written.append(offset)
        return os.pwrite(fd, data, offset)

    @staticmethod
    def fdatasync(fd: int) -> None:
        cls = LoseOneWrite
        if cls.armed:
            if cls.lose is not None:
                wfd, offset, old = cls.unsynced[cls.lose - 1]
                os.pwrite(wfd, old, offset)
            raise PowerLoss()
        cls.unsynced, cls.written = [], []
        os.fdatasync(fd)


def _crash_in_commit(path: str, lose: int | None, monkeypatch) -> list[int]:
    """A pool at commit N (``A`` at block 0), then a write of ``B`` at block 5 whose commit loses
    power in its flush, losing its ``lose``-th write.  Returns the offsets that commit wrote."""
    pool = Pool.create(path, data_size="64MiB", block_size=BS)
    try:
        v = pool.create_thin("v", "1GiB")
        v.write(0, A)
        pool.commit()
        monkeypatch.setattr(LoseOneWrite, "armed", False)
        monkeypatch.setattr(LoseOneWrite, "lose", lose)
        monkeypatch.setattr(LoseOneWrite, "unsynced", [])
        monkeypatch.setattr(LoseOneWrite, "written", [])
        pool._store.io = LoseOneWrite()
        v.write(5 * BS, B)
        LoseOneWrite.armed = True
        with pytest.raises(PowerLoss):
            pool.commit()
        return list(LoseOneWrite.written)
    finally:
        LoseOneWrite.armed = False
        pool.close(commit=False)


def test_a_lost_page_of_a_one_flush_commit_leaves_the_previous_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(mdcommit, "_RUN_PAGES", 1)  # (every page its own write: any one can be lost)
    written = _crash_in_commit(str(tmp_path / "probe"), None, monkeypatch)
    pages = [i for i, off in enumerate(written, 1) if off >= SUPERBLOCKS * BLOCK]
    sb = [i for i, off in enumerate(written, 1) if off < SUPERBLOCKS * BLOCK]
    assert len(sb) == 1 and sb[0] == len(written) and len(pages) >= 7, written  # pages, then the superblock
    with Pool.open(str(tmp_path / "probe")) as pool:  # nothing lost: the new commit
        assert pool.thin("v").read(5 * BS, 4096) == B and pool.check().ok and not pool.check().warnings
        listed = sorted(loc >> 32 for loc in pool._store.header[COMMIT_PAGES])
        assert listed == sorted(written[i - 1] // BLOCK for i in pages)
    for k in pages + sb:
        path = str(tmp_path / f"lose{k}")
        _crash_in_commit(path, k, monkeypatch)
        with Pool.open(path) as pool:
            v = pool.thin("v")
            assert v.read(0, 4096) == A, k
            assert v.read(5 * BS, 4096) == bytes(4096), f"write {k} lost: the torn commit was used"
            assert v.mappings()[0].tolist() == [0], k
            rep = pool.check()
            assert rep.ok, (k, rep.errors)
            if k != sb[0]:  # (a lost superblock write is an ordinary crash: nothing to say)
                lost = written[k - 1] // BLOCK
                assert any(f"metadata block {lost}" in w for w in rep.warnings), (k, rep.warnings)
        out = str(tmp_path / f"repaired{k}")  # thin_repair's way: the salvage prefers the complete commit
        report = repair(path, out)
        with Pool.open(out) as pool:
            assert (pool.thin("v").read(0, 4096), pool.thin("v").read(5 * BS, 4096)) == (A, bytes(4096)), k
            assert report.mappings_kept == 1 and report.mappings_dropped == 0, (k, report)
        shutil.rmtree(out)
        with DeviceTable.open(path) as table:  # the light commands' open (reads a few pages) too
            assert table.status().nr_thins == 1 and table.status().used_data_blocks == 1, k
            if k != sb[0]:
                assert f"metadata block {written[k - 1] // BLOCK}" in (table.recovered_from or ""), k
        with Pool.open(path) as pool:
            v = pool.thin("v")
            v.write(7 * BS, C)  # the pool goes on from the previous commit
            pool.commit()
        with Pool.open(path) as pool:
            v = pool.thin("v")
            assert (v.read(0, 4096), v.read(5 * BS, 4096), v.read(7 * BS, 4096)) == (A, bytes(4096), C)
            assert pool.check().ok and not pool.check().warnings
        shutil.rmtree(path)


def test_a_malformed_page_list_is_not_trusted(tmp_path):
    """A superblock whose list of pages is not a list of 64-bit integers is not used (the previous
    one is); one listing a block past the end of the file neither."""
    path = str(tmp_path / "p")
    with Pool.create(path, data_size="64MiB", block_size=BS) as pool:
        v = pool.create_thin("v", "1GiB")
        v.write(0, A)
        pool.commit()
        v.write(5 * BS, B)
        pool.commit()
        store = pool._store
        gen, header = store.generation, dict(store.header)
    for bad in (["1"], [-1], [1 << 64], "x", [True], [(1 << 40) << 32]):
        store = mdstore.MetadataStore(os.path.join(path, "metadata"))
        try:
            raw = store._superblock_bytes(gen, {**header, COMMIT_PAGES: bad})
            os.pwrite(store.fd, bytes(raw), (gen % SUPERBLOCKS) * BLOCK)
        finally:
            store.close()
        with Pool.open(path, read_only=True) as pool:
            assert pool.thin("v").read(5 * BS, 4096) == bytes(4096), bad
            assert pool.thin("v").read(0, 4096) == A
            assert pool.recovered_from and "generation" in pool.recovered_from, bad


def test_the_commit_pages_error_names_structure_and_block(tmp_path):
    """With no older superblock to fall back to, a lost listed page is MetadataCorrupt naming its
    structure and block, for the full open and for the light commands' (which reads few pages)."""
    path = str(tmp_path / "p")
    with Pool.create(path, data_size="64MiB", block_size=BS) as pool:
        pool.create_thin("v", "1GiB")
        listed = pool._store.header[COMMIT_PAGES]
    md = os.path.join(path, "metadata")
    store = mdstore.MetadataStore(md)
    try:
        older = [g for g, _slot, _h in store.superblocks()][1:]
        for g in older:  # (the format's first superblock: make it unreadable)
            os.pwrite(store.fd, bytes(BLOCK), (g % SUPERBLOCKS) * BLOCK)
        block = listed[0] >> 32
        os.pwrite(store.fd, b"\xff" * BLOCK, block * BLOCK)
    finally:
        store.close()
    for opener in (Pool.open, DeviceTable.open):
        with pytest.raises(MetadataCorrupt) as err:
            opener(path)
        assert err.value.block == block and f"bad checksum in metadata block {block}" in str(err.value)
        assert err.value.structure and str(err.value).split(": ")[1] == err.value.structure, str(err.value)


def test_a_rejected_superblock_never_comes_back(tmp_path, monkeypatch):
    """A commit lost a page in its flush; the reopened pool (the previous commit) redoes the same
    change, whose commit writes the same pages to the same blocks -- and loses power before its
    superblock.  The first commit's superblock, still in its slot, now finds every page it lists:
    it must not be used (the pool clears a slot it rejected before it writes any page again), so
    the pool reopens at the previous commit, whose bytes are all there."""
    monkeypatch.setattr(mdcommit, "_RUN_PAGES", 1)
    path = str(tmp_path / "p")
    written = _crash_in_commit(path, 1, monkeypatch)  # (its first page lost)
    assert written[0] >= SUPERBLOCKS * BLOCK
    with Pool.open(path) as pool:
        assert pool.thin("v").read(5 * BS, 4096) == bytes(4096) and pool.recovered_from
        pool._store.io = StopAtSuperblock()
        pool.thin("v").write(5 * BS, C)  # the same block, other bytes
        monkeypatch.setattr(StopAtSuperblock, "armed", True)
        with pytest.raises(PowerLoss):
            pool.commit()
        monkeypatch.setattr(StopAtSuperblock, "armed", False)
        pool._store.io = mdstore.FileIO()
        pool.close(commit=False)
    with Pool.open(path) as pool:
        v = pool.thin("v")
        assert v.mappings()[0].tolist() == [0], "a superblock the pool had rejected was used"
        assert v.read(0, 4096) == A and v.read(5 * BS, 4096) == bytes(4096)
        assert pool.check().ok


def test_a_list_too_long_for_the_superblock_falls_back_to_two_flushes(tmp_path, monkeypatch):
    """A commit whose list of pages does not fit beside the rest of its superblock's header (here:
    the superblock's encoder refuses any header with a list, as it refuses a header over 4 KiB) is
    made durable the two-flush way -- pages, flush, superblock, flush -- with no list, and reopens to
    its state."""
    from thinpool.errors import MetadataSpaceExhausted
    real = mdcommit.MetadataCommit._superblock_bytes

    def no_room_for_a_list(self, generation, header):
        if COMMIT_PAGES in header:
            raise MetadataSpaceExhausted("superblock header too large")
        return real(self, generation, header)

    path = str(tmp_path / "p")
    with Pool.create(path, data_size="64MiB", block_size=BS) as pool:
        v = pool.create_thin("v", "1GiB")
        v.write(0, A)
        pool.commit()
        calls: list[str] = []

        class Logged(mdstore.FileIO):
            @staticmethod
            def pwrite(fd: int, data, offset: int) -> int:
                calls.append("superblock" if offset < SUPERBLOCKS * BLOCK else "pages")
                return os.pwrite(fd, data, offset)

            @staticmethod
            def fdatasync(fd: int) -> None:
                calls.append("flush")
                os.fdatasync(fd)

        pool._store.io = Logged()
        monkeypatch.setattr(mdcommit.MetadataCommit, "_superblock_bytes", no_room_for_a_list)
        v.write(5 * BS, B)
        pool.commit()
        monkeypatch.setattr(mdcommit.MetadataCommit, "_superblock_bytes", real)
        pool._store.io = mdstore.FileIO()
        assert calls == ["pages", "flush", "superblock", "flush"], calls
        assert COMMIT_PAGES not in pool._store.header
    with Pool.open(path) as pool:
        assert (pool.thin("v").read(0, 4096), pool.thin("v").read(5 * BS, 4096)) == (A, B)
        assert pool.check().ok and not pool.check().warnings


def test_a_load_that_finds_no_usable_superblock_changes_nothing(tmp_path):
    """Both superblocks list a page that no longer verifies (the newest one's leaf page, the older
    one's space-map page, which the open's first pass does not read): the abort's reload fails, and the
    store keeps the locations of the state it had -- not those of a superblock the load tried and did
    not use, which the next commit would build on."""
    from thinpool.spacemap_pages import DISK_ARRAYS
    path = str(tmp_path / "p")
    with Pool.create(path, data_size="64MiB", block_size=BS) as pool:
        v = pool.create_thin("v", "1GiB")
        v.write(0, A)
        pool.commit()
        store = pool._store
        older = [loc for loc in store.header[COMMIT_PAGES] if store._structure_of(loc) in DISK_ARRAYS]
        v.write(5 * BS, B)
        pool.commit()
        assert older and not set(older) & {loc for a in store.locs.values() for loc in a}
        for loc in (older[0], store.header[COMMIT_PAGES][0]):
            os.pwrite(store.fd, b"\xff" * BLOCK, (loc >> 32) * BLOCK)
        before = (store.pm_locs, store.locs, store.dir_locs, store.held_blocks, store._state, store.generation)
        v.write(7 * BS, C)
        with pytest.raises(MetadataCorrupt):
            pool.abort()
        after = (store.pm_locs, store.locs, store.dir_locs, store.held_blocks, store._state, store.generation)
        assert all(a is b for a, b in zip(after[:5], before[:5])) and after[5] == before[5]
        pool.close(commit=False)


class CacheKeeps(mdstore.FileIO):
    """The metadata file's write path with a flush that fails as Linux's does: ``fail_next`` makes the
    next ``fdatasync`` raise EIO once; the writes it did not make durable stay in the host's page
    cache -- every read until a reboot sees them -- but not on the disk.  ``lost``: offset -> the bytes
    on the disk, for each such 4 KiB block not written again since (:func:`reboot` puts them back)."""

    fail_next = False
    unsynced: dict[int, bytes] = {}
    lost: dict[int, bytes] = {}

    @staticmethod
    def pwrite(fd: int, data, offset: int) -> int:
        cls = CacheKeeps
        n = len(memoryview(data).cast("B"))
        for off in range(offset, offset + n, BLOCK):
            if off not in cls.unsynced:
                cls.unsynced[off] = cls.lost.pop(off, None) or os.pread(fd, BLOCK, off)
        return os.pwrite(fd, data, offset)

    @staticmethod
    def fdatasync(fd: int) -> None:
        cls = CacheKeeps
        if cls.fail_next:
            cls.fail_next = False
            cls.lost.update(cls.unsynced)
            cls.unsynced = {}
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        cls.unsynced = {}
        os.fdatasync(fd)


def reboot(md_path: str) -> None:
    """The host restarts: what a failed flush left only in its cache is gone."""
    fd = os.open(md_path, os.O_WRONLY)
    try:
        for off, old in CacheKeeps.lost.items():
            os.pwrite(fd, old, off)
    finally:
        os.close(fd)
    CacheKeeps.lost = {}


def test_a_failed_flush_then_a_reopen_before_a_reboot(tmp_path, monkeypatch):
    """A one-flush commit's flush fails (EIO): its superblock and pages may be in the host's cache only,
    where Linux keeps them readable.  The pool is reopened (what a failed flush asks for) before the
    host restarts, and commits again, successfully.  After a reboot that commit must be there: it must
    not be built on the failed commit's pages, which the disk may never have had."""
    monkeypatch.setattr(mdstore.MetadataStore, "io", CacheKeeps())
    monkeypatch.setattr(CacheKeeps, "unsynced", {})
    monkeypatch.setattr(CacheKeeps, "lost", {})
    path = str(tmp_path / "p")
    with Pool.create(path, data_size="64MiB", block_size=BS) as pool:
        v = pool.create_thin("v", "1GiB")
        v.write(0, A)
        pool.commit()
        CacheKeeps.fail_next = True
        with pytest.raises(HostIOError):
            pool.create_thin("w", "1GiB")  # (a pool message: its own commit, whose flush fails)
        pool.close(commit=False)
    with Pool.open(path) as pool:  # the same boot
        pool.thin("v").write(7 * BS, C)
        pool.commit()
        names = sorted(t.name for t in pool.thins())
    assert CacheKeeps.lost, "the failed flush lost nothing"
    reboot(os.path.join(path, "metadata"))
    with Pool.open(path) as pool:
        assert not pool.recovered_from, pool.recovered_from
        assert sorted(t.name for t in pool.thins()) == names
        v = pool.thin("v")
        assert (v.read(0, 4096), v.read(7 * BS, 4096)) == (A, C)
        assert pool.check().ok
