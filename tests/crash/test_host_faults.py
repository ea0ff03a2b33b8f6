"""Host-filesystem faults: short writes, EIO/ENOSPC, failed flushes and failed hole punches.

Four methods, each counted into ``.reliability/host_faults.json`` (docs/reliability.md keeps the figures):

* **the store's I/O seam** (``MetadataStore.io``): for every pwrite and fdatasync of a commit, one
  fault -- a short count (bytes really stored, or claimed and not stored), a short count then
  ENOSPC, ENOSPC, EIO, a count of 0; a failed flush that keeps or loses the unflushed writes.  The
  commit must either succeed and reopen to the new state, or raise HostIOError and reopen to the
  previous commit (after a failed *flush* of the superblock: either one -- the pool did not claim
  success and goes to ``fail`` mode), every byte intact, ``check()`` ok.  A clean failure (no flush
  failed) keeps the changes: a retried commit succeeds and reopens to the new state;
* **strace** (``-e inject=pwrite64:retval=512`` and ``:error=ENOSPC``, ``when=N`` for every N) on a
  subprocess ``python3 -m thinpool write``: metadata and data writes from compiled code alike;
* **a real small filesystem**: a loop-mounted ext4 image filled to every few KiB of headroom, a
  snapshot + copy-on-write + new-block workload and a commit on it (root; skipped with a reason
  otherwise, a failure under CI=true);
* **hole punches** (``DataDevice.io``) failing after a delete, and a data write that fails half way
  (RLIMIT_FSIZE): no block is ever handed out holding another volume's bytes.

Also the metadata space items: a resize the metadata cannot cover, and the way out of metadata space.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections import Counter

import numpy as np
import pytest

from tests.support import require_tool, IN_CI, REPORTS, SOAK
from thinpool import Pool
from thinpool.datadev import DataDevice
from thinpool.errors import HostIOError, InvalidArgument, NoSpace, ReadOnly, ThinpoolError, ThinpoolWarning
from thinpool.hostio import DataIO
from thinpool.mdstore import FileIO, MetadataStore

BS = 64 * 1024
STATS = REPORTS.counter("host_faults")


def _pattern(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _state(pool: Pool) -> dict[str, bytes]:
    """Every volume's whole content (the volumes here are small)."""
    return {t.name: pool.thin(t.name).read(0, t.size) for t in pool.thins()}


def _reopened(path: str) -> tuple[dict[str, bytes], bool]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThinpoolWarning)
        pool = Pool.open(path)
    try:
        return _state(pool), bool(pool.check().ok)
    finally:
        pool.close(commit=False)


def _lost(expected: dict[str, bytes], got: dict[str, bytes]) -> int:
    """Bytes of ``expected`` that ``got`` does not hold (a missing volume loses all of its bytes)."""
    lost = 0
    for name, data in expected.items():
        other = got.get(name)
        if other is None or len(other) != len(data):
            lost += len(data)
        else:
            lost += int(np.count_nonzero(np.frombuffer(data, np.uint8) != np.frombuffer(other, np.uint8)))
    return lost


# ---------------------------------------------------------------------------- the store's I/O seam
class HostFaultIO:
    """A ``MetadataStore.io`` that injects one host fault at event ``at`` (pwrite and fdatasync calls
    are numbered from 1) and otherwise writes through."""

    WRITE_MODES = ("short", "short_lie", "short_enospc", "enospc", "eio", "zero")
    SYNC_MODES = ("sync_eio_keep", "sync_eio_lose")

    def __init__(self, mode: str = "count", at: int = 0) -> None:
        self.mode, self.at = mode, at
        self.events = 0
        self.kinds: list[str] = []
        self.unsynced: list[tuple[int, int, bytes]] = []
        self.fired = ""
        self._fail_next_write = False

    def pwrite(self, fd: int, data, offset: int) -> int:
        self.events += 1
        self.kinds.append("write")
        data = bytes(data)
        if self._fail_next_write:
            self._fail_next_write = False
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.events == self.at and self.mode in self.WRITE_MODES:
            self.fired = f"{self.mode} at write event {self.events}"
            half = max(1, len(data) // 2)
            if self.mode == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.mode == "eio":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            if self.mode == "zero":
                return 0
            if self.mode == "short_lie":
                return half            # claims bytes it never stored
            self._store(fd, data[:half], offset)
            if self.mode == "short_enospc":
                self._fail_next_write = True
            return half
        self._store(fd, data, offset)
        return len(data)

    def _store(self, fd: int, data: bytes, offset: int) -> None:
        self.unsynced.append((fd, offset, os.pread(fd, len(data), offset)))
        os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        self.events += 1
        self.kinds.append("sync")
        if self.events == self.at and self.mode in self.SYNC_MODES:
            self.fired = f"{self.mode} at sync event {self.events}"
            if self.mode == "sync_eio_lose":  # the failed writeback dropped every unflushed write
                for fd_, off, old in reversed(self.unsynced):
                    os.pwrite(fd_, old, off)
            self.unsynced.clear()
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.unsynced.clear()


def _commit_scenario(path: str) -> tuple[Pool, dict[str, bytes], dict[str, bytes]]:
    """A pool with a committed state P and uncommitted changes whose commit gives N: (pool, P, N).
    The changes touch every kind of page: new blocks, copy-on-write, snapshot, delete, catalog."""
    pool = Pool.create(path, data_size="4M", metadata_size="512K")
    pool.create_thin("a", 512 * 1024)
    pool.thin("a").write(0, _pattern(1, 300 * 1024))
    pool.snapshot("a", "b")
    pool.create_thin("gone", 128 * 1024)
    pool.thin("gone").write(0, _pattern(2, 128 * 1024))
    pool.commit()
    before = _state(pool)
    # the changes stay uncommitted in an open batch (a pool message outside one commits by itself);
    # the tests commit explicitly, and the batch is never left (closing the pool ends it)
    pool._scenario_batch = contextlib.ExitStack()
    pool._scenario_batch.enter_context(pool.batch())
    pool.thin("a").write(64 * 1024, _pattern(3, 200 * 1024))   # copy-on-write away from b
    pool.snapshot("a", "c")
    pool.thin("c").write(400 * 1024, _pattern(4, 100 * 1024))  # new blocks
    pool.delete("gone")
    pool.create_thin("d", 256 * 1024)
    pool.thin("d").write(1000, _pattern(5, 70 * 1024))
    after = _state(pool)
    return pool, before, after


def _commit_events(tmp: str) -> list[str]:
    pool, _, _ = _commit_scenario(os.path.join(tmp, "count"))
    io = HostFaultIO()
    MetadataStore.io = io
    try:
        pool.commit()
    finally:
        MetadataStore.io = FileIO()
    pool.close(commit=False)
    return io.kinds


def _cases() -> list[tuple[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        kinds = _commit_events(tmp)
    out = []
    for n, kind in enumerate(kinds, 1):
        modes = HostFaultIO.WRITE_MODES if kind == "write" else HostFaultIO.SYNC_MODES
        out.extend((m, n) for m in modes)
    return out


@pytest.mark.parametrize("one_flush", [True, False], ids=["one-flush", "two-flush"])
def test_store_seam_fault_at_every_write_and_sync_of_a_commit(tmp_path, monkeypatch, one_flush):
    """Every pwrite/fdatasync of a commit x every fault: a clean failure with the previous commit
    intact, or a complete success; never a commit that reports success and reopens to the old state.
    The scenario's commit is small: a one-flush commit; and again with the store flushing the pages
    before the superblock, as it does for a commit of more pages than a superblock lists."""
    # a commit's pages go to one run of free blocks (MetadataSpace._reserve_run), one pwrite of up to
    # mdcommit._RUN_PAGES pages: two a pwrite here, so that faults also come after some of the pages
    monkeypatch.setattr("thinpool.mdcommit._RUN_PAGES", 2)
    if not one_flush:
        monkeypatch.setattr("thinpool.mdcommit.ONE_FLUSH_PAGES", 0)
    cases = _cases()
    # the scenario's commit writes its pages in several pwrites, (syncs,) writes the superblock and
    # syncs
    kinds = [k for k, _ in sorted({("write" if m in HostFaultIO.WRITE_MODES else "sync", n) for m, n in cases},
                                   key=lambda kn: kn[1])]
    if one_flush:
        assert kinds[-2:] == ["write", "sync"] and kinds.count("sync") == 1 and kinds.count("write") >= 4, kinds
    else:
        assert kinds[-3:] == ["sync", "write", "sync"] and kinds[:-3].count("write") >= 3, kinds
    outcomes: Counter = Counter()
    for i, (mode, at) in enumerate(cases):
        path = str(tmp_path / f"p{i}")
        pool, before, after = _commit_scenario(path)
        io = HostFaultIO(mode, at)
        MetadataStore.io = io
        try:
            pool.commit()
            raised = None
        except HostIOError as exc:
            raised = exc
        finally:
            MetadataStore.io = FileIO()
        assert io.fired, f"{mode}@{at}: the fault did not fire"
        if raised is None:
            # a short count the store completed (or a lie it caught by reading back)
            assert mode in ("short", "short_lie"), f"{mode}@{at}: the commit reported success"
            pool.close(commit=False)
            got, ok = _reopened(path)
            assert got == after and ok, f"{mode}@{at}: success, but reopen does not give the new commit"
            outcomes["success"] += 1
            STATS["seam committed bytes lost"] += _lost(after, got)
            continue
        assert raised.errno in (errno.EIO, errno.ENOSPC), raised
        if mode.startswith("sync"):
            assert pool.mode == "fail", f"{mode}@{at}: a failed flush must fail the pool"
            with pytest.raises(HostIOError, match="reopen"):
                pool.commit()                  # never claims success afterwards
            with pytest.raises(ReadOnly):
                pool.thin("a").write(0, b"x")
            pool.close(commit=False)
            got, ok = _reopened(path)
            assert ok and got in (before, after), f"{mode}@{at}: reopen gives neither commit"
            outcomes["flush failed -> " + ("previous" if got == before else "new (flushed anyway)")] += 1
            STATS["seam committed bytes lost"] += _lost(before if got == before else after, got)
            continue
        # a write failed: nothing of the commit is durable, the changes are kept for a retry
        assert pool.mode == "write"
        shadow = str(tmp_path / f"s{i}")
        shutil.copytree(path, shadow)          # the files as they are right after the failure
        got, ok = _reopened(shadow)
        assert ok and got == before, f"{mode}@{at}: a failed commit changed the committed state"
        STATS["seam committed bytes lost"] += _lost(before, got)
        pool.commit()
        pool.close(commit=False)
        got, ok = _reopened(path)
        assert ok and got == after, f"{mode}@{at}: the retried commit is not the new state"
        outcomes["clean failure, retry ok"] += 1
    STATS["seam cases"] += len(cases)
    for k, v in outcomes.items():
        STATS[f"seam: {k}"] += v
    assert STATS["seam committed bytes lost"] == 0


def test_data_flush_failure_fails_the_commit(tmp_path):
    """fdatasync of the data file fails before the metadata is written: no superblock, fail mode."""
    path = str(tmp_path / "p")
    pool, before, _ = _commit_scenario(path)

    class BadSync(DataIO):
        @staticmethod
        def fdatasync(fd: int) -> None:
            raise OSError(errno.EIO, "injected")

    gen = pool.store.generation
    DataDevice.io = BadSync()
    try:
        with pytest.raises(HostIOError, match="commit failed"):
            pool.commit()
    finally:
        DataDevice.io = DataIO()
    assert pool.mode == "fail" and pool.store.generation == gen
    with pytest.raises(HostIOError):
        pool.commit()
    pool.close(commit=False)
    got, ok = _reopened(path)
    assert ok and got == before
    STATS["data flush cases"] += 1


# ---------------------------------------------------------------------------- strace on a subprocess
def _strace_baseline(path: str) -> bytes:
    pool = Pool.create(path, data_size="4M", metadata_size="512K")
    pool.create_thin("v", 1024 * 1024)
    pool.thin("v").write(0, _pattern(10, 256 * 1024))
    pool.snapshot("v", "s")
    base = pool.thin("v").read(0, 1024 * 1024)
    pool.close()
    return base


def _thinpool(args: list[str], strace: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "thinpool"] + args
    if strace is not None:
        cmd = ["/usr/bin/strace", "-f", "-qq", "-o", "/dev/null"] + strace + cmd
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_strace_injected_short_writes_and_enospc(tmp_path):
    """strace replaces the N-th pwrite64 of `thinpool write` (data from the kernels, metadata, superblock)
    by a short count it never stored (retval=512) or by ENOSPC: exit 0 with the new bytes, or an
    error with the previous commit intact."""
    require_tool("strace")  # skip here, fail under CI=true
    blob = tmp_path / "blob"
    new = _pattern(11, 192 * 1024)
    blob.write_bytes(new)
    probe = str(tmp_path / "probe")
    _strace_baseline(probe)
    log = tmp_path / "trace"
    args = ["write", probe, "v", str(blob), "--offset", "32K"]
    r = subprocess.run(["/usr/bin/strace", "-f", "-qq", "-e", "trace=pwrite64", "-o", str(log),
                        sys.executable, "-m", "thinpool"] + args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    events = sum(1 for line in log.read_text().splitlines() if "pwrite64(" in line)
    assert events >= 5, log.read_text()
    injections = ["retval=512", "error=ENOSPC"] + (["error=EIO"] if SOAK else [])
    outcomes: Counter = Counter()
    # by default each write N gets one of the injections in turn (both kinds reach data, metadata and
    # superblock writes); THINPOOL_SOAK=1 tries every injection at every N
    cases = [(n, inj) for n in range(1, events + 1) for i, inj in enumerate(injections)
             if SOAK or (n + i) % len(injections) == 0]
    for n, inj in cases:
        if True:
            path = str(tmp_path / f"p{n}{inj[:3]}")
            base = _strace_baseline(path)
            expect = bytearray(base)
            expect[32 * 1024:32 * 1024 + len(new)] = new
            r = _thinpool(["write", path, "v", str(blob), "--offset", "32K"],
                          ["-e", f"inject=pwrite64:{inj}:when={n}"])
            got, ok = _reopened(path)
            assert ok, f"{inj}@{n}: check fails after {r.returncode}: {r.stderr}"
            assert got["s"] == base[:len(got["s"])], f"{inj}@{n}: the snapshot lost committed bytes"
            if r.returncode == 0:
                assert got["v"] == bytes(expect), f"{inj}@{n}: exit 0 but the written bytes are not there"
                outcomes["success"] += 1
            else:
                assert "Traceback" not in r.stderr, r.stderr
                assert got["v"] == base, f"{inj}@{n}: failed ({r.stderr.strip()}) but the volume changed"
                outcomes["clean failure"] += 1
            STATS["strace committed bytes lost"] += _lost({"s": base}, {"s": got["s"]})
            shutil.rmtree(path)
    STATS["strace cases"] += len(cases)
    for k, v in outcomes.items():
        STATS[f"strace: {k}"] += v
    assert outcomes["success"] and outcomes["clean failure"]
    assert STATS["strace committed bytes lost"] == 0


# ---------------------------------------------------------------------------- a real full filesystem
def _require_loop_mount() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("root (to mount a loop device)")
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            problems.append(tool)
    if problems:
        msg = f"needs {', '.join(problems)}"
        if IN_CI:
            pytest.fail(msg + " -- CI=true, so this is a failure")
        pytest.skip(msg)


@pytest.fixture
def small_ext4(tmp_path):
    _require_loop_mount()
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(24 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(img)], check=True,
                   capture_output=True)
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"cannot loop-mount an ext4 image here: {r.stderr.strip()}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(mnt: str, headroom: int) -> None:
    """Leave about ``headroom`` bytes free on the filesystem at ``mnt``."""
    with open(os.path.join(mnt, "filler"), "wb") as f:
        want = _free_bytes(mnt) - headroom
        chunk = b"\xff" * (1 << 20)
        while want > 0:
            try:
                want -= f.write(chunk[:min(len(chunk), want)])
                f.flush()
            except OSError:
                break
        os.fsync(f.fileno())
    while _free_bytes(mnt) > headroom + 4096:  # extent blocks of the filler: top up
        with open(os.path.join(mnt, "filler"), "ab") as f:
            f.write(b"\xff" * (_free_bytes(mnt) - headroom))


def test_full_ext4_every_few_kib_of_headroom(small_ext4):
    """On a real ext4 filled to H KiB of free space: snapshot, copy-on-write, new blocks, commit.  Each H
    gives a complete success or a clean failure; the previous commit is always intact."""
    mnt = small_ext4
    step = 1 if SOAK else 8
    outcomes: Counter = Counter()
    headrooms = list(range(0, 1000, step))
    for h in headrooms:
        path = os.path.join(mnt, "pool")
        pool = Pool.create(path, data_size="16M", metadata_size="1M")
        pool.create_thin("v", 1024 * 1024)
        pool.thin("v").write(0, _pattern(20, 384 * 1024))
        pool.close()
        pool = Pool.open(path)
        before = _state(pool)
        pool.close(commit=False)
        _fill(mnt, h * 1024)
        error = None
        pool = None
        try:
            pool = Pool.open(path)
            with pool.batch():  # one transaction, one commit (messages inside wait for it)
                pool.snapshot("v", "s")
                pool.thin("v").write(100 * 1024, _pattern(21, 200 * 1024))   # copy-on-write
                pool.thin("v").write(640 * 1024, _pattern(22, 300 * 1024))   # new blocks
                pool.create_thin("w", 256 * 1024)
                pool.thin("w").write(0, _pattern(23, 256 * 1024))
                after = _state(pool)
                pool.commit()
        except (ThinpoolError, OSError) as exc:
            error = exc
        finally:
            if pool is not None:
                pool.close(commit=False)
        os.unlink(os.path.join(mnt, "filler"))
        got, ok = _reopened(path)
        assert ok, f"headroom {h} KiB: check fails"
        if error is None:
            assert got == after, f"headroom {h} KiB: the commit succeeded but reopen differs"
            outcomes["success"] += 1
            STATS["ext4 committed bytes lost"] += _lost(after, got)
        else:
            assert got == before, f"headroom {h} KiB: failed with {error!r} but the committed state changed"
            outcomes[f"clean failure ({type(error).__name__})"] += 1
            STATS["ext4 committed bytes lost"] += _lost(before, got)
        shutil.rmtree(path)
    STATS["ext4 cases"] += len(headrooms)
    for k, v in outcomes.items():
        STATS[f"ext4: {k}"] += v
    assert outcomes["success"] and sum(outcomes.values()) > outcomes["success"]
    assert STATS["ext4 committed bytes lost"] == 0


# ---------------------------------------------------------------------------- failed hole punches
class PunchFails(DataIO):
    """Every hole punch fails with ``err``."""

    def __init__(self, err: int = errno.ENOSPC) -> None:
        self.err = err
        self.calls = 0

    def punch_hole(self, fd: int, offset: int, length: int) -> None:
        self.calls += 1
        raise OSError(self.err, os.strerror(self.err))


@pytest.mark.filterwarnings("ignore::thinpool.errors.ThinpoolWarning")
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("how", ["delete_punch_freed_blocks", "discard_passdown"])
def test_failed_punch_never_hands_out_old_bytes(tmp_path, err, how):
    """Blocks due for a hole punch (a deleted volume's with ``punch_freed_blocks``; a discard's, passed
    down, by default) whose punch fails stay unallocatable (with a warning); a new volume that takes
    every block reads zeros wherever it did not write; the punch is retried later."""
    path = str(tmp_path / "p")
    nr = 16
    pool = Pool.create(path, data_size=nr * BS, metadata_size="512K", error_if_no_space=True,
                       punch_freed_blocks=how == "delete_punch_freed_blocks")
    pool.create_thin("old", nr * BS)
    secret = b"\xa5" * (nr * BS)
    pool.thin("old").write(0, secret)
    pool.commit()
    if how == "discard_passdown":
        assert pool.thin("old").discard(0, nr * BS) == nr
    else:
        pool.delete("old")
    fault = PunchFails(err)
    DataDevice.io = fault
    try:
        pool.commit()                                   # frees the blocks (pending)
        with pytest.warns(ThinpoolWarning, match="could not be hole-punched"):
            pool.commit()                               # would release them: the punch fails
        assert fault.calls
        pool.create_thin("new", nr * BS)
        new = pool.thin("new")
        with pytest.raises(NoSpace):             # none may be handed out
            new.write(0, b"\x01")
        assert pool.thin("new").read(0, nr * BS) == bytes(nr * BS)
    finally:
        DataDevice.io = DataIO()
    pool.commit()                                       # the punch is retried and succeeds
    new = pool.thin("new")
    for b in range(nr):
        new.write(b * BS, b"\x01")                      # one byte per block: the rest must read zero
    data = np.frombuffer(new.read(0, nr * BS), np.uint8).reshape(nr, BS)
    assert (data[:, 0] == 1).all() and not data[:, 1:].any(), "a new block held the deleted volume's bytes"
    pool.close()
    assert _reopened(path)[1]
    STATS["punch failure cases"] += 1


@pytest.mark.filterwarnings("ignore::thinpool.errors.ThinpoolWarning")
def test_failed_punch_is_remembered_across_reopen(tmp_path):
    """The unpunched blocks go into the next commit's pending list: a reopen keeps them unallocatable,
    and a failing scrub at open keeps its blocks unallocatable instead of failing the open."""
    path = str(tmp_path / "p")
    nr = 8
    pool = Pool.create(path, data_size=nr * BS, metadata_size="512K", error_if_no_space=True,
                       punch_freed_blocks=True)
    pool.create_thin("old", nr * BS)
    pool.thin("old").write(0, b"\x5a" * (nr * BS))
    pool.commit()
    pool.delete("old")
    DataDevice.io = PunchFails()
    try:
        pool.commit()
        with pytest.warns(ThinpoolWarning):
            pool.commit()
        with pytest.warns(ThinpoolWarning):
            pool.commit()  # retried, fails again; the blocks are in this commit's pending list
        pool.close(commit=False)
        pool = Pool.open(path)
        assert pool.st[__import__("thinpool.schema", fromlist=["x"]).ST_NR_ALLOCATABLE] == 0
        pool.create_thin("new", nr * BS)
        with pytest.raises(NoSpace):
            pool.thin("new").write(0, b"\x01")
    finally:
        DataDevice.io = DataIO()
    pool.commit()
    pool.thin("new").write(0, b"\x01" * 10)
    assert pool.thin("new").read(0, BS) == b"\x01" * 10 + bytes(BS - 10)
    pool.close()
    STATS["punch failure cases"] += 1


@pytest.mark.filterwarnings("ignore::thinpool.errors.ThinpoolWarning")
def test_failed_scrub_at_open_keeps_blocks_unallocatable(tmp_path):
    """With ``punch_freed_blocks``, blocks written but never committed before a crash are punched at open;
    if that punch fails the open still succeeds (with a warning) and those blocks are not handed out
    until punched."""
    path = str(tmp_path / "p")
    nr = 8
    pool = Pool.create(path, data_size=nr * BS, metadata_size="512K", error_if_no_space=True,
                       punch_freed_blocks=True)
    pool.create_thin("v", nr * BS)
    pool.commit()
    pool.thin("v").write(0, b"\x77" * (4 * BS))    # never committed: a crash follows
    pool.close(commit=False)
    DataDevice.io = PunchFails(errno.EIO)
    try:
        with pytest.warns(ThinpoolWarning, match="could not be hole-punched"):
            pool = Pool.open(path)
        w = pool.thin("v")
        for b in range(4, nr):
            w.write(b * BS, b"\x01")                   # the four clean blocks
        with pytest.raises(NoSpace):
            w.write(0, b"\x01")                        # no fifth: the others hold old bytes
    finally:
        DataDevice.io = DataIO()
    pool.commit()
    pool.commit()
    for b in range(4):
        w.write(b * BS, b"\x01")
    data = np.frombuffer(w.read(0, nr * BS), np.uint8).reshape(nr, BS)
    assert (data[:, 0] == 1).all() and not data[:, 1:].any()
    pool.close()
    STATS["punch failure cases"] += 1


def test_data_write_failing_half_way_never_leaks_the_partial_block(tmp_path):
    """A data write the file-size limit cuts short (a short count, then EFBIG) fails with the errno; the
    half-written block is not mapped and is punched before anyone gets it."""
    path = str(tmp_path / "p")
    nr = 8
    pool = Pool.create(path, data_size=nr * BS, metadata_size="512K")
    pool.create_thin("a", nr * BS)
    pool.thin("a").write(0, b"\x00" * 1)                 # compile the kernels, map block 0
    pool.commit()
    cursor = int(pool.st[__import__("thinpool.schema", fromlist=["ST_CURSOR"]).ST_CURSOR])
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cursor * BS + 1000, hard))
    try:
        with pytest.raises(OSError) as info:
            pool.thin("a").write(BS, b"\xee" * BS)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert info.value.errno == errno.EFBIG, info.value
    assert pool.thin("a").read(BS, BS) == bytes(BS)      # not mapped
    pool.commit()
    pool.commit()
    pool.create_thin("b", nr * BS)
    b = pool.thin("b")
    for k in range(nr - 1):
        b.write(k * BS, b"\x01")
    data = np.frombuffer(b.read(0, (nr - 1) * BS), np.uint8).reshape(nr - 1, BS)
    assert not data[:, 1:].any(), "a block held the bytes of a failed write"
    pool.close()
    assert _reopened(path)[1]


# ---------------------------------------------------------------------------- metadata space
def _digest(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return os.path.getsize(path), h.hexdigest()


def _files(path: str) -> dict[str, tuple[int, str]]:
    return {n: _digest(os.path.join(path, n)) for n in ("data", "metadata")}


def test_resize_refused_leaves_both_files_byte_identical(tmp_path):
    path = str(tmp_path / "p")
    pool = Pool.create(path, data_size="64M", metadata_size="256K")
    pool.create_thin("v", "1M")
    pool.thin("v").write(0, b"abc")
    pool.close()
    before = _files(path)
    pool = Pool.open(path)
    with pytest.raises(InvalidArgument, match="15.87GiB"):
        pool.resize("15P")                           # its space map alone exceeds the metadata limit
    with pytest.raises(InvalidArgument, match="cannot cover"):
        pool.resize("64G", metadata_size="256K")     # an explicit metadata size too small for it
    with pytest.raises(InvalidArgument, match="shrink"):
        pool.resize_metadata("128K")
    assert pool.mode == "write"
    pool.close(commit=False)
    assert _files(path) == before
    r = _thinpool(["resize", path, "15P"])
    assert r.returncode == 1 and "15.87GiB" in r.stderr and "Traceback" not in r.stderr
    assert _files(path) == before


def test_resize_grows_metadata_it_needs(tmp_path):
    """64 MiB -> 64 GiB needs 64 more space-map bitmap pages, doubled for copy-on-write: with autoextend
    on, the 256 KiB metadata grows first (tests/engine/test_metadata_resize.py: refused when off)."""
    path = str(tmp_path / "p")
    pool = Pool.create(path, data_size="64M", metadata_size="256K")
    pool.create_thin("v", "1M")
    pool.thin("v").write(0, b"abc")
    pool.set_autoextend(80, 20)
    pool.resize("64G")
    assert pool.nr_data_blocks == (64 << 30) // BS
    assert pool.store.nr_blocks > 2 * 64
    pool.create_thin("w", "1G")
    pool.thin("w").write(5 << 20, b"x" * 100)
    pool.close()
    pool = Pool.open(path)
    assert pool.check().ok and pool.thin("v").read(0, 3) == b"abc" and pool.mode == "write"
    assert os.path.getsize(os.path.join(path, "data")) == 64 << 30
    pool.close()


def test_failed_resize_commit_leaves_the_data_file_size(tmp_path):
    """The resize's commit fails on the host (ENOSPC): rolled back, data file at its old size, and a
    retry succeeds."""
    path = str(tmp_path / "p")
    pool = Pool.create(path, data_size="64M", metadata_size="4M")
    pool.create_thin("v", "1M")
    pool.thin("v").write(0, b"abc")
    pool.commit()
    size = os.path.getsize(os.path.join(path, "data"))
    # events: the grown metadata's sync (nothing is pending: the commit of an unchanged pool writes
    # nothing), then the resize's own commit: its first page write fails
    io = HostFaultIO("enospc", 2)
    MetadataStore.io = io
    try:
        with pytest.raises(HostIOError):
            pool.resize("1T", metadata_size="16M")  # 1 TiB needs more metadata than 4 MiB
    finally:
        MetadataStore.io = FileIO()
    assert io.fired and io.kinds[:2] == ["sync", "write"]
    assert os.path.getsize(os.path.join(path, "data")) == size
    assert pool.nr_data_blocks == size // BS and pool.mode == "write"
    assert pool.thin("v").read(0, 3) == b"abc"
    pool.resize("128M")
    pool.close()
    assert os.path.getsize(os.path.join(path, "data")) == 128 << 20


def test_resize_the_host_cannot_grow_the_data_file_to(tmp_path):
    """ftruncate fails (EFBIG: here the file-size limit; on ext4, anything past 16 TiB) for the metadata
    growth a 15 TiB resize needs, or for the data file itself: HostIOError naming the file, both files'
    sizes and the pool as they were, and the pool still works."""
    path = str(tmp_path / "p")
    pool = Pool.create(path, data_size="64M", metadata_size="4M")
    pool.create_thin("v", "1M")
    pool.thin("v").write(0, b"abc")
    pool.commit()
    data = os.path.join(path, "data")
    size = os.path.getsize(data)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, hard))
    md = os.path.join(path, "metadata")
    md_size = os.path.getsize(md)
    try:
        with pytest.raises(HostIOError, match="metadata") as first:
            pool.resize("15T", metadata_size="2G")  # its metadata must grow first: that fails
        with pytest.raises(HostIOError, match="growing the data file") as info:
            pool.resize("4G")                       # the metadata suffices; the data file cannot grow
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert first.value.errno == info.value.errno == errno.EFBIG
    assert os.path.getsize(md) == md_size and pool.store.nr_blocks * 4096 == md_size
    assert os.path.getsize(data) == size and pool.nr_data_blocks == size // BS and pool.mode == "write"
    assert pool.thin("v").read(0, 3) == b"abc"
    pool.thin("v").write(BS, b"more")
    pool.close()
    pool = Pool.open(path)
    assert pool.check().ok and pool.thin("v").read(BS, 4) == b"more" and os.path.getsize(data) == size
    pool.close()


@pytest.mark.parametrize("mode", ["sync_eio_keep", "sync_eio_lose"])
def test_resize_whose_superblock_flush_fails(tmp_path, mode):
    """The flush of the resize's superblock fails: the pool fails, the data file is put back to its old
    size, and a reopen finds a consistent pool -- the old size, or the new one (file re-extended)."""
    path = str(tmp_path / "p")
    pool = Pool.create(path, data_size="64M", metadata_size="4M")
    pool.create_thin("v", "1M")
    pool.thin("v").write(0, b"abc")
    pool.commit()
    size = os.path.getsize(os.path.join(path, "data"))
    probe = Pool.create(str(tmp_path / "probe"), data_size="64M", metadata_size="4M")
    probe.create_thin("v", "1M")  # the same state, so the same events
    probe.thin("v").write(0, b"abc")
    probe.commit()
    count = HostFaultIO()
    MetadataStore.io = count
    try:
        probe.resize("1T", metadata_size="16M")
    finally:
        MetadataStore.io = FileIO()
    probe.close()
    io = HostFaultIO(mode, len(count.kinds))      # the last event: the resize's superblock flush
    MetadataStore.io = io
    try:
        with pytest.raises(HostIOError):
            pool.resize("1T", metadata_size="16M")
    finally:
        MetadataStore.io = FileIO()
    assert io.fired and count.kinds[-1] == "sync" and pool.mode == "fail"
    assert os.path.getsize(os.path.join(path, "data")) == size
    pool.close(commit=False)
    pool = Pool.open(path)
    assert pool.check().ok and pool.thin("v").read(0, 3) == b"abc"
    assert pool.nr_data_blocks in (size // BS, (1 << 40) // BS)
    assert os.path.getsize(os.path.join(path, "data")) == pool.nr_data_blocks * BS
    pool.close()


def test_out_of_metadata_space_has_a_way_out(tmp_path):
    """Fill the metadata until the pool is out of metadata space; `delete` is refused; growing the
    metadata (library and CLI) returns the pool to write mode, then delete and write work again."""
    path = str(tmp_path / "p")
    # data enough for metadata to run out first (16 blocks per volume)
    pool = Pool.create(path, data_size="4G", metadata_size="256K", error_if_no_space=True)
    i = 0
    with pytest.raises(ReadOnly, match="out of metadata space"):
        while True:
            pool.create_thin(f"v{i}", "16M")
            for k in range(16):
                pool.thin(f"v{i}").write(k << 20, b"x" * 100)
            pool.commit()
            i += 1
    assert pool.mode == "out-of-metadata-space" and i > 1 and not pool.status().needs_check
    with pytest.raises(ReadOnly):
        pool.delete("v0")
    pool.resize_metadata("512K")
    assert pool.mode == "write"
    for j in range(i // 2):
        pool.delete(f"v{j}")
    pool.commit()
    pool.create_thin("again", "16M")
    pool.thin("again").write(0, b"y" * 4096)
    pool.close()
    # the same way out from the command line, after filling it again
    pool = Pool.open(path)
    with pytest.raises(ReadOnly, match="out of metadata space"):
        while True:
            i += 1
            pool.create_thin(f"v{i}", "16M")
            for k in range(16):
                pool.thin(f"v{i}").write(k << 20, b"x" * 100)
            pool.commit()
    pool.close(commit=False)
    r = _thinpool(["resize", path, "--metadata-size", "2M"])
    assert r.returncode == 0, r.stderr
    r = _thinpool(["delete", path, "again"])
    assert r.returncode == 0, r.stderr
    pool = Pool.open(path)
    assert pool.store.nr_blocks == 512 and pool.check().ok and pool.mode == "write"
    pool.create_thin("after", "1M")
    pool.thin("after").write(0, b"z")
    pool.close()


def test_repair_copy_completes_short_writes(tmp_path, monkeypatch):
    """`repair -o` copies the referenced data blocks into the new pool: every short count is continued
    (each pwrite here stores at most 1000 bytes), so the repaired pool holds every byte."""
    from thinpool.repair import repair
    path, out = str(tmp_path / "p"), str(tmp_path / "out")
    pool = Pool.create(path, data_size="4M", metadata_size="512K")
    pool.create_thin("v", 512 * 1024)
    data = _pattern(30, 300 * 1024)
    pool.thin("v").write(0, data)
    pool.close()
    real = os.pwrite
    calls = Counter()

    def short(fd, buf, offset):
        calls["pwrite"] += 1
        return real(fd, bytes(buf)[:1000], offset)

    monkeypatch.setattr(os, "pwrite", short)
    repair(path, out)
    monkeypatch.setattr(os, "pwrite", real)
    assert calls["pwrite"] > 5 * 64
    got, ok = _reopened(out)
    assert ok and got["v"][:len(data)] == data
    STATS["repair copy short-write cases"] += 1


def test_nbd_flush_is_never_acknowledged_when_the_commit_fails(tmp_path):
    """`thinpool serve` under strace, its first fdatasync failing (EIO) and later ones succeeding (what
    Linux does after a lost writeback: the error is reported once): the NBD FLUSH gets an error reply,
    and so does every later FLUSH and FUA write -- a retried flush proves nothing; after the server
    dies the pool reopens to its last commit."""
    require_tool("strace")  # skip here, fail under CI=true
    import time
    from tests.serve.test_nbd_pool import Raw
    from tests.support import unix_socket_accepts
    from thinpool.nbd import protocol as P
    path = str(tmp_path / "p")
    pool = Pool.create(path, data_size="4M", metadata_size="512K")
    pool.create_thin("vol", 1024 * 1024)
    pool.thin("vol").write(0, b"A" * 4096)
    pool.close()
    err = open(tmp_path / "serve.err", "w")
    proc = subprocess.Popen(["/usr/bin/strace", "-f", "-qq", "-o", "/dev/null", "-e",
                             "inject=fdatasync:error=EIO:when=1", sys.executable, "-m", "thinpool", "serve", path,
                             "--commit-period", "0"],  # (only the FLUSH commits: its fdatasync is the first)
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
        sock = os.path.join(path, "nbd.sock")
        # the socket appears after warm_up compiled the NBD session loop (a cold numba cache: 35 s under
        # strace at load 4-6); the deadline only catches a server that never comes up
        deadline = time.monotonic() + 600
        while not unix_socket_accepts(sock):
            assert proc.poll() is None, (tmp_path / "serve.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        c = Raw(sock, "vol")
        # the first request compiles the server's request loop (kernels_nbd.serve_reads) unless numba's
        # cache has it (a fresh clone, or any change to a kernel source): 18 s under strace at load 5,
        # more at load 7 -- past Raw's 30 s; the timeout only catches a hung server (the replies are
        # what is asserted, not how soon they come)
        c.sock.settimeout(600)
        assert c.cmd(P.CMD_WRITE, 65536, data=b"B" * 4096)[0] == 0
        assert c.cmd(P.CMD_FLUSH, 0, 0)[0] == P.EIO          # the commit failed: not acknowledged
        assert c.cmd(P.CMD_FLUSH, 0, 0)[0] != 0               # the next flush would succeed: not trusted
        assert c.cmd(P.CMD_WRITE, 0, data=b"C" * 4096, flags=P.CMD_FLAG_FUA)[0] != 0
        c.close()
    finally:
        # the server (strace's child) is killed: under strace's injection a SIGTERM is sometimes never
        # acted upon (seen with an injection on a syscall thinpool never makes, so a ptrace artefact)
        children = []
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/children") as f:
                children += [int(x) for x in f.read().split()]
        for child in children:
            os.kill(child, signal.SIGKILL)
        proc.wait(timeout=60)
        err.close()
    got, ok = _reopened(path)
    assert ok and got["vol"][:4096] == b"A" * 4096 and got["vol"][65536:65536 + 4096] == bytes(4096)
    STATS["nbd flush failure cases"] += 1


_TRUNCATED_UNDER_THE_POOL = """
import os, sys
from thinpool import nodestore
nodestore.POPULATE_MIN = 1  # the dense leaves' pages mapped from the file, as a big pool's open maps them
from thinpool import Pool
from thinpool.errors import HostIOError, ThinpoolError
path = sys.argv[1]
p = Pool.open(path)
mapped = p._leaf_disk.mapped
print("mapped rows:", 0 if mapped is None else int(mapped.sum()), flush=True)
os.truncate(os.path.join(path, "metadata"), 16 * 4096)  # another program, under the open pool
try:
    p.create_thin("after", 1 << 20)
    print("committed", flush=True)
except HostIOError as exc:
    print("refused:", exc.errno, exc, flush=True)
print("mode:", p.mode.value, flush=True)
for what, call in (("create", lambda: p.create_thin("again", 1 << 20)), ("commit", p.commit),
                   ("write", lambda: p.thin("v").write(0, b"x"))):
    try:
        call()
        print(what, "done", flush=True)
    except ThinpoolError as exc:
        print(what, "refused:", type(exc).__name__, flush=True)
p.close(commit=False)
"""


def test_a_metadata_file_truncated_under_an_open_pool_fails_its_commits_without_sigbus(tmp_path):
    """Another program truncates the metadata file of an open pool whose dense leaves are mapped from
    it (what a big pool's open does; the pool's lock keeps only thinpool's own programs off): the next
    commit checks the file's length before it reads a mapped row (``nodestore._privatize``) or writes a
    superblock referring to the lost pages, and refuses with HostIOError (EIO) naming the truncation;
    the pool is in ``fail`` mode, later messages, commits and writes refused too (before they touch a
    mapped row) -- the process is not killed by SIGBUS."""
    path = tmp_path / "p"
    with Pool.create(path, data_size="64MiB", block_size="64KiB") as p:
        vol = p.create_thin("v", "32MiB")
        vol.write_many(np.arange(300, dtype=np.int64) * 65536, np.full((300, 512), 7, np.uint8))  # a dense leaf
    r = subprocess.run([sys.executable, "-c", _TRUNCATED_UNDER_THE_POOL, str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert lines[0] != "mapped rows: 0", r.stdout
    assert lines[1].startswith(f"refused: {errno.EIO} ") and "truncated to 65536 bytes" in lines[1], r.stdout
    assert lines[2:] == ["mode: fail", "create refused: ReadOnly", "commit refused: HostIOError",
                         "write refused: ReadOnly"], r.stdout
