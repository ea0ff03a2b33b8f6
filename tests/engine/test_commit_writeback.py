"""The metadata writes' write-back started early, and what a commit does while it runs.

A commit of more pages than a superblock lists (``mdcommit.ONE_FLUSH_PAGES``) starts the write-back
of its pages right after their ``pwrite`` and makes the superblock while that I/O runs, then
flushes; a smaller one (a one-flush commit) makes the superblock, listing the pages, right after
them.  Either starts the superblock's write-back (with its pages', in a one-flush commit) right after
its ``pwrite`` and does its bookkeeping (``Pool._committed_in_memory``) while that I/O runs, then
flushes (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: it never reports a write-back error, the
``fdatasync`` after it does).  The kernel's rules hold (dm-thin-metadata.c's commit: the dirty
blocks, then the superblock, flushed before the commit is reported done): strace checks them on
every commit of a real process, and a flush that fails after the bookkeeping still fails the pool.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.support import require_tool
from thinpool import Pool, mdstore
from thinpool.errors import HostIOError
from thinpool import mdcommit
from thinpool.mdpages import BLOCK, COMMIT_PAGES, SUPERBLOCKS

_COMMITS = """
import os, sys
from thinpool import Pool
pool = Pool.open(sys.argv[1])
v = pool.thin("v")
for i in range(24):
    v.write(i * 131072, bytes([i + 1]) * 4096)
    pool.commit()
    os.access("/thinpool-commit-returned", os.F_OK)  # (a marker in the trace)
pool.close()
"""


def test_kernel_rule_pages_then_superblock_durable_before_commit_returns(tmp_path):
    """strace -f of a process making 24 one-write commits, on the metadata file: every commit's
    superblock write follows its pages' writes, and no page is written after it before the flush;
    every write's write-back is started (sync_file_range) before the flush after it; commit()
    returns only after a flush that returned after the superblock's write (dm-thin: the superblock
    written last, with FUA); and each of these small commits flushes the metadata file once (a
    one-flush commit: its superblock lists its pages, see test_commit_pages)."""
    require_tool("strace")
    path = str(tmp_path / "p")
    with Pool.create(path, data_size="64MiB") as pool:
        pool.create_thin("v", "8MiB")
    log = tmp_path / "trace"
    script = tmp_path / "commits.py"
    script.write_text(textwrap.dedent(_COMMITS))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    r = subprocess.run(["strace", "-f", "-y", "-qq", "-e",
                        "trace=fdatasync,pwrite64,sync_file_range,access,faccessat,faccessat2",
                        "-o", str(log), sys.executable, str(script), path],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    meta = os.path.realpath(os.path.join(path, "metadata"))
    pending: dict[str, str] = {}  # pid -> the path of its unfinished fdatasync
    pages_written = sb_written = False  # since the last flush of the metadata file returned
    started = True  # the write-back of the last write started since it
    markers = flushes = 0
    for line in log.read_text().splitlines():
        m = re.match(r"(\d+)\s+(.*)", line)
        if not m:
            continue
        pid, rest = m.groups()
        if "thinpool-commit-returned" in rest:
            markers += 1
            assert not pages_written and not sb_written, f"commit {markers} returned before its flush returned"
            continue
        if rest.startswith("<... fdatasync resumed>"):
            if pending.pop(pid, None) == meta and rest.rstrip().endswith("= 0"):
                pages_written = sb_written = False
            continue
        call = re.match(r"(fdatasync|pwrite64|sync_file_range)\(\d+<([^>]*)>(.*)", rest)
        if call is None or call.group(2) != meta:
            continue
        name, args = call.group(1), call.group(3)
        if name == "pwrite64":
            offset = int(re.search(r", (\d+)(?:\)| <unfinished)", args).group(1))  # (its last argument)
            if offset < SUPERBLOCKS * BLOCK:
                assert pages_written, f"commit {markers + 1}: the superblock written before its pages"
                sb_written = True
            else:
                assert not sb_written, f"commit {markers + 1}: a page written after the superblock"
                pages_written = True
            started = False
        elif name == "sync_file_range":
            started = True
        else:
            assert started, f"commit {markers + 1}: a flush without the write-back started first"
            flushes += 1
            if rest.endswith("<unfinished ...>"):
                pending[pid] = meta
            elif rest.rstrip().endswith("= 0"):
                pages_written = sb_written = False
    assert markers == 24 and flushes == 24, (markers, flushes)


class _FailingSuperblockFlush(mdstore.FileIO):
    """The store's write path, whose metadata flush after a superblock write fails with EIO once armed."""

    armed = False
    sb_written = False

    @staticmethod
    def pwrite(fd: int, data, offset: int) -> int:
        if _FailingSuperblockFlush.armed and offset < SUPERBLOCKS * BLOCK:
            _FailingSuperblockFlush.sb_written = True
        return os.pwrite(fd, data, offset)

    @staticmethod
    def fdatasync(fd: int) -> None:
        if _FailingSuperblockFlush.armed and _FailingSuperblockFlush.sb_written:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fdatasync(fd)


def test_failed_superblock_flush_after_the_bookkeeping_fails_the_commit_and_the_pool(tmp_path, monkeypatch):
    """The commit's bookkeeping runs before the superblock's flush returns; a flush that then fails
    (EIO) fails the commit with HostIOError and puts the pool in fail mode (Linux reports a lost
    write once: no retry can be trusted), every I/O and commit refused until a reopen, which finds a
    durable commit and a consistent pool."""
    path = str(tmp_path / "p")
    pool = Pool.create(path, data_size="64MiB")
    try:
        v = pool.create_thin("v", "8MiB")
        v.write(0, b"a" * 4096)
        pool.commit()
        ran: list[bool] = []
        real = pool._committed_in_memory

        def bookkeeping() -> None:
            ran.append(True)
            real()

        pool._committed_in_memory = bookkeeping  # type: ignore[method-assign]
        monkeypatch.setattr(_FailingSuperblockFlush, "armed", False)
        monkeypatch.setattr(_FailingSuperblockFlush, "sb_written", False)
        pool._store.io = _FailingSuperblockFlush()
        v.write(65536, b"b" * 4096)
        _FailingSuperblockFlush.armed = True
        with pytest.raises(HostIOError) as err:
            pool.commit()
        assert err.value.errno == errno.EIO and "metadata" in str(err.value)
        assert ran == [True] and _FailingSuperblockFlush.sb_written
        assert pool.mode == "fail" and pool._store.failed
        with pytest.raises(HostIOError):
            v.read(0, 4096)  # (fail mode errors every I/O)
        with pytest.raises(HostIOError):
            pool.commit()
    finally:
        pool.close(commit=False)
    with Pool.open(path) as pool:  # (the superblock reached the file: the new commit, else the one before)
        v = pool.thin("v")
        assert v.read(0, 4096) == b"a" * 4096
        assert v.read(65536, 4096) in (b"b" * 4096, bytes(4096))
        assert pool.check().ok


class _Logged(mdstore.FileIO):
    """The store's write path, logging its calls (pwrite of pages or superblock, fdatasync)."""

    log: list[str] = []

    @staticmethod
    def pwrite(fd: int, data, offset: int) -> int:
        _Logged.log.append("superblock" if offset < SUPERBLOCKS * BLOCK else "pages")
        return os.pwrite(fd, data, offset)

    @staticmethod
    def fdatasync(fd: int) -> None:
        _Logged.log.append("flush")
        os.fdatasync(fd)


def test_kernel_rule_superblock_made_after_the_pages_are_written_and_before_their_flush(tmp_path, monkeypatch):
    """What only the superblock needs -- the block-state map once the commit is durable and the
    device hints it records -- is made after the pages' write and before the flush (while their
    write-back runs), not before the first write; the writes and flushes go pages, superblock, flush
    for a small commit (its superblock lists the pages) and pages, flush, superblock, flush for one of
    more pages than a superblock lists; the superblock records the hints and the block counts a
    reopen reads back."""
    from thinpool import mdspace
    path = str(tmp_path / "p")
    with Pool.create(path, data_size="64MiB") as pool:
        v = pool.create_thin("v", "8MiB")
        pool.commit()
        monkeypatch.setattr(_Logged, "log", [])
        pool._store.io = _Logged()
        real_state = mdspace.MetadataSpace._commit_state

        def commit_state(self, free_before):
            _Logged.log.append("block states")
            return real_state(self, free_before)
        monkeypatch.setattr(mdspace.MetadataSpace, "_commit_state", commit_state)
        real_hints = pool._hints

        def hints() -> dict[str, int]:
            _Logged.log.append("hints")
            return real_hints()
        pool._hints = hints  # type: ignore[method-assign]
        for i in range(3):
            v.write(i * 65536, bytes([i + 1]) * 4096)
            _Logged.log.clear()
            pool.commit()
            assert _Logged.log == ["pages", "block states", "hints", "superblock", "flush"], _Logged.log
            assert COMMIT_PAGES in pool._store.header
        # a commit of more pages than a superblock lists (here: 3): its pages flushed before the superblock
        monkeypatch.setattr(mdcommit, "ONE_FLUSH_PAGES", 3)
        v.write(3 * 65536, bytes([4]) * 4096)
        _Logged.log.clear()
        pool.commit()
        assert _Logged.log == ["pages", "block states", "hints", "flush", "superblock", "flush"], _Logged.log
        assert COMMIT_PAGES not in pool._store.header
        store = pool._store
        top, used, nr_thins = store.hint("metadata_top"), store.used_blocks(), store.hint("nr_thins")
        pool._store.io = mdstore.FileIO()
    with Pool.open(path) as pool:
        st = pool._store
        assert (st.hint("metadata_top"), st.header["metadata_used_blocks"], st.hint("nr_thins")) == (top, used, 1)
        assert nr_thins == 1
        assert pool.thin("v").read(2 * 65536, 4096) == bytes([3]) * 4096
