"""Torn and lost writes under the metadata store, lost writes in the data file.

``MetadataStore.io`` (the pwrite/fdatasync layer every metadata write goes through) is replaced by
:class:`FaultIO`, which numbers every write and sync of a whole deterministic workload (creates,
snapshots of snapshots, writes of every shape, discards, deletes, freed-block reuse, commits) and
injects one fault at event N, for every N:

* ``stop``   -- power is lost instead of performing event N (everything before it persists);
* ``tear``   -- write N persists only up to a random byte, then power is lost;
* ``lose``   -- power is lost at event N and *every* write not yet followed by an fdatasync is lost;
* ``lose_some`` -- the same, but a random subset of the unsynced writes persists (reordering).

After each fault the pool is reopened.  It must hold exactly the state of the last commit that
completed (or of the commit in flight, when the fault left its superblock durable) -- volumes,
sizes, every mapping, every byte under the crash model -- and pass ``check()``.  MetadataCorrupt is
tolerated by the issue but never expected with two superblocks, so it is counted and asserted 0.

The data file is checked the same way without a fault layer (its writes are pwrite calls from the
JIT kernels): the test snapshots the file at every ``DataDevice.sync`` (the flush before each commit)
and, after any operation of the workload, simulates power loss by reverting every unsynced 512-byte
sector to its flushed content (all, none, or a random subset).  Blocks mapped by the last commit may
then differ from the committed bytes only where the crash model allows (blocks exclusive at the
commit, overwritten in place by the same volume, each sector old or new).

Also here: the freed-block hazard (delete a snapshot, need its blocks elsewhere, crash before the
commit).  ``THINPOOL_SOAK=1`` runs both fault tests over four more, longer workloads of other seeds
(``THINPOOL_TORN_WORKLOADS`` sets the total, the default one included), every second one writing each
metadata page by its own pwrite.  Counts go to ``.reliability/torn_writes.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from collections import Counter

import pytest

from tests.support import REPORTS, SOAK, soak_scaled
from thinpool import Pool
from thinpool.containers.snapshotter import Snapshotter
from thinpool.datadev import DataDevice
from thinpool.errors import MetadataCorrupt
from thinpool.mdstore import BLOCK, MetadataStore


BS = 64 * 1024
SECTOR = 512
NR_BLOCKS = 40


def _summary(stats: Counter) -> dict:
    """The .reliability/torn_writes.json record: totals first, then every count."""
    return {"metadata_fault_points": sum(v for k, v in stats.items() if k.startswith("fault_points_")),
            "data_crash_points": sum(v for k, v in stats.items() if k.startswith("data_crash_points_")),
            "metadata_corrupt": stats["metadata_corrupt"], "bytes_lost": 0, "soak": SOAK,
            "counts": dict(sorted(stats.items()))}


STATS = REPORTS.counter("torn_writes", _summary)


class PowerLoss(BaseException):
    """Raised out of the I/O layer: the machine lost power here."""


class FaultIO:
    """A fault-injecting ``MetadataStore.io``: counts events (pwrite and fdatasync calls) and
    injects ``mode`` at event ``at`` (never, when ``at`` is 0)."""

    def __init__(self, mode: str = "count", at: int = 0, rng: random.Random | None = None) -> None:
        self.mode = mode
        self.at = at
        self.rng = rng or random.Random(0)
        self.events = 0
        self.log: list[tuple[str, int, int]] = []          # (kind, offset, length) per event
        self.unsynced: list[tuple[int, int, bytes]] = []   # (fd, offset, previous bytes)
        self.fired: str | None = None

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self.events += 1
        self.log.append(("write", offset, len(data)))
        if self.events == self.at:
            if self.mode == "tear":
                cut = self.rng.randrange(len(data))
                os.pwrite(fd, data[:cut], offset)
                self.fired = f"tear write {self.events} at byte {cut}/{len(data)}"
            elif self.mode in ("lose", "lose_some"):
                self.unsynced.append((fd, offset, os.pread(fd, len(data), offset)))
                os.pwrite(fd, data, offset)
                self._lose()
            else:
                self.fired = f"stop before write {self.events}"
            raise PowerLoss(self.fired)
        self.unsynced.append((fd, offset, os.pread(fd, len(data), offset)))
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        self.events += 1
        self.log.append(("sync", -1, 0))
        if self.events == self.at:
            if self.mode in ("lose", "lose_some"):
                self._lose()
            else:
                self.fired = f"stop before sync {self.events}"
            raise PowerLoss(self.fired)
        self.unsynced.clear()    # the files live in tmpfs: durability is simulated, not requested

    def _lose(self) -> None:
        lost = 0
        for fd, offset, old in reversed(self.unsynced):
            if self.mode == "lose" or self.rng.random() < 0.5:
                os.pwrite(fd, old, offset)
                lost += 1
        self.fired = f"{self.mode}: {lost} of {len(self.unsynced)} unsynced writes lost at event {self.events}"
        self.unsynced.clear()


# ---------------------------------------------------------------------------- the workload
def make_ops(seed: int = 5, n: int = 80) -> list[tuple]:
    """A fixed workload over a 40-block pool: enough churn that the allocator wraps and reuses
    blocks freed by earlier commits; never so full that a write commits implicitly."""
    rng = random.Random(seed)
    ops: list[tuple] = []
    sizes: dict[str, int] = {}
    fresh = 0
    skinds: dict[str, str] = {}        # snapshotter key -> kind ("active" | "committed")
    sparent: dict[str, str] = {}
    for i in range(n):
        r = rng.random()
        names = sorted(sizes)
        if 0.9 < r:    # snapshotter verbs (each commits by itself, once: after a commit, their batch opens clean)
            ops.append(("commit",))
            active = sorted(k for k, v in skinds.items() if v == "active")
            committed = sorted(k for k, v in skinds.items() if v == "committed")
            leaves = sorted(k for k in skinds if k not in sparent.values())
            q = rng.random()
            if q < 0.35 or not skinds:
                fresh += 1
                parent = rng.choice(committed + [""])
                skinds[f"k{fresh}"], sparent[f"k{fresh}"] = "active", parent
                ops.append(("sprepare", f"k{fresh}", parent))
            elif q < 0.55 and active:
                key = rng.choice(active)
                fresh += 1
                skinds[f"c{fresh}"], sparent[f"c{fresh}"] = "committed", sparent.pop(key)
                del skinds[key]
                ops.append(("scommit", f"c{fresh}", key))
            elif q < 0.7 and leaves:
                key = rng.choice(leaves)
                del skinds[key], sparent[key]
                ops.append(("sremove", key))
            elif active:
                ops.append(("swrite", rng.choice(active), rng.randrange(2 * BS), rng.choice([10, BS, BS + 10]),
                            rng.getrandbits(32)))
            continue
        if not names or (r < 0.08 and len(names) < 5):
            fresh += 1
            name, size = f"v{fresh}", rng.choice([4 * BS, 3 * BS + SECTOR, 2 * BS])
            sizes[name] = size
            ops.append(("create", name, size))
        elif r < 0.2:
            ops.append(("commit",))
        elif r < 0.3 and len(names) < 5:
            fresh += 1
            o = rng.choice(names)
            sizes[f"s{fresh}"] = sizes[o]
            ops.append(("snapshot", o, f"s{fresh}"))
        elif r < 0.36 and len(names) > 1:
            name = rng.choice(names)
            del sizes[name]
            ops.append(("delete", name))
        else:
            name = rng.choice(names)
            size = sizes[name]
            off = rng.randrange(size)
            if r < 0.42:
                ops.append(("discard", name, off, rng.randrange(1, size - off + 1)))
            else:
                n_ = rng.choice([1, 700, BS, BS + 1000, 2 * BS, size - off])
                ops.append(("write", name, off, min(n_, size - off), rng.getrandbits(32)))
    ops.append(("commit",))
    return ops


def do_op(pool: Pool, op: tuple) -> None:
    kind = op[0]
    if kind == "create":
        pool.create_thin(op[1], op[2])
    elif kind == "snapshot":
        pool.snapshot(op[1], op[2])
    elif kind == "delete":
        pool.delete(op[1])
    elif kind == "discard":
        pool.thin(op[1]).discard(op[2], op[3])
    elif kind == "write":
        pool.thin(op[1]).write(op[2], random.Random(op[4]).randbytes(op[3]))
    elif kind == "commit":
        pool.commit()
    elif kind == "sprepare":
        Snapshotter(pool, base_size=2 * BS).prepare(op[1], op[2] or None)
    elif kind == "scommit":
        Snapshotter(pool, base_size=2 * BS).commit(op[1], op[2])
    elif kind == "sremove":
        Snapshotter(pool, base_size=2 * BS).remove(op[1])
    elif kind == "swrite":
        vol = Snapshotter(pool).volume(op[1])
        off = min(op[2], vol.size - 1)
        vol.write(off, random.Random(op[4]).randbytes(min(op[3], vol.size - off)))


def snapshot_state(pool: Pool) -> dict:
    """{name: (size, bytes, {vb: dblock})} of every volume, and the blocks mapped exclusively."""
    vols = {}
    for t in pool.thins():
        vbs, dbs, _ = t.mappings()
        vols[t.name] = (t.size, t.read(0, t.size), dict(zip(vbs.tolist(), dbs.tolist())))
    count: Counter = Counter(d for _, _, m in vols.values() for d in m.values())
    excl = {(n, vb): d for n, (_, _, m) in vols.items() for vb, d in m.items() if count[d] == 1}
    return {"vols": vols, "excl": excl, "records": _records(pool)}


def _records(pool: Pool) -> str:
    """The pool's stored records without wall-clock timestamps (they differ between runs)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("created", "updated")}
        return x
    return json.dumps(strip(pool.catalog["records"]), sort_keys=True)


class Reference:
    """The workload run without faults: each commit's state, the I/O events of each commit, and
    the versions written in place after each commit to the blocks it mapped exclusively."""

    def __init__(self, base: str, ops: list[tuple]) -> None:
        self.ops = ops
        self.base = base
        self.salt = 0
        path = os.path.join(base, "ref")
        pool = Pool.create(path, data_size=NR_BLOCKS * BS, block_size=BS)
        io = FaultIO()
        saved, MetadataStore.io = MetadataStore.io, io
        try:
            self.states = [snapshot_state(pool)]
            self.versions: list[dict] = [{}]
            self.commit_events: list[tuple[int, int]] = []   # (first event, last event) of commit c+1
            gen0 = pool.store.generation
            for op in ops:
                first = io.events + 1
                do_op(pool, op)
                commits = pool.store.generation - gen0 - len(self.commit_events)
                # pool messages and snapshotter verbs commit once; an explicit commit of an unchanged
                # pool writes nothing (dm-thin's in_service rule); writes never commit here
                want = {1} if op[0] in ("create", "snapshot", "delete", "sprepare", "scommit", "sremove") else \
                    {0, 1} if op[0] == "commit" else {0}
                assert commits in want, \
                    f"{op[0]} made {commits} commits: the reference cannot see intermediate states"
                if commits:
                    self.commit_events.append((first, io.events))
                    self.states.append(snapshot_state(pool))
                    self.versions.append({})
                elif op[0] == "write":
                    self._record_in_place(pool, op)
                elif op[0] == "swrite":
                    vol = Snapshotter(pool).volume(op[1])
                    off = min(op[2], vol.size - 1)
                    self._record_in_place(pool, ("write", vol.name, off, min(op[3], vol.size - off), 0))
            self.total_events = io.events
            self.event_log = list(io.log)
        finally:
            MetadataStore.io = saved
            pool.close(commit=False)
        assert len(self.states) >= 6 and self.total_events >= 40

    def _record_in_place(self, pool: Pool, op: tuple) -> None:
        _, name, off, n, _ = op
        excl = self.states[-1]["excl"]
        t = pool.thin(name)
        vbs, dbs, _ = t.mappings()
        now = dict(zip(vbs.tolist(), dbs.tolist()))
        for vb in range(off // BS, (off + n - 1) // BS + 1):
            d = excl.get((name, vb))
            if d is not None and now.get(vb) == d:
                lo = vb * BS
                self.versions[-1].setdefault((name, vb), []).append(t.read(lo, min(BS, t.size - lo)))

    def commit_of_event(self, n: int) -> int:
        """The commit (1-based) during which metadata I/O event ``n`` happens."""
        for c, (a, b) in enumerate(self.commit_events, 1):
            if a <= n <= b:
                return c
        raise AssertionError(f"event {n} outside every commit")


def compare(pool: Pool, ref: Reference, c: int, *, sectors: bool = False) -> list[str]:
    """Problems of the reopened pool against commit ``c`` under the crash model."""
    want = ref.states[c]
    problems = []
    if _records(pool) != want["records"]:
        return [f"stored records differ from commit {c}'s"]
    if Snapshotter(pool).check():
        return [f"snapshotter records and volumes disagree: {Snapshotter(pool).check()}"]
    names = sorted(t.name for t in pool.thins())
    if names != sorted(want["vols"]):
        return [f"volumes {names} != commit {c}'s {sorted(want['vols'])}"]
    for name, (size, data, mapping) in want["vols"].items():
        t = pool.thin(name)
        vbs, dbs, _ = t.mappings()
        if t.size != size or dict(zip(vbs.tolist(), dbs.tolist())) != mapping:
            problems.append(f"{name}: size or mappings differ from commit {c}")
            continue
        got = t.read(0, size)
        if got == data:
            continue
        for vb in range(-(-size // BS)):
            a, b = got[vb * BS:(vb + 1) * BS], data[vb * BS:(vb + 1) * BS]
            if a == b:
                continue
            allowed = [b] + ref.versions[c].get((name, vb), [])
            if len(allowed) > 1 and (any(a == x for x in allowed) or (sectors and all(
                    any(a[s:s + SECTOR] == x[s:s + SECTOR] for x in allowed) for s in range(0, len(a), SECTOR)))):
                STATS["in_place_blocks_with_newer_bytes"] += 1
                continue
            problems.append(f"{name} block {vb}: wrong bytes (commit {c})")
    return problems


def reopen_and_verify(path: str, ref: Reference, acceptable: list[int], what: str, *, sectors: bool = False) -> int:
    try:
        pool = Pool.open(path)
    except MetadataCorrupt as exc:
        STATS["metadata_corrupt"] += 1
        raise AssertionError(f"{what}: MetadataCorrupt after a crash with two superblocks: {exc}") from None
    try:
        rep = pool.check()
        assert rep.ok, f"{what}: check failed: {rep.errors}"
        tried = {}
        for c in acceptable:
            tried[c] = compare(pool, ref, c, sectors=sectors)
            if not tried[c]:
                used = len({d for _, _, m in ref.states[c]["vols"].values() for d in m.values()})
                assert pool.status().used_data_blocks == used, f"{what}: used data blocks differ"
                return c
        raise AssertionError(f"{what}: the reopened pool is none of commits {acceptable}: {tried}")
    finally:
        pool.close(commit=False)


# ---------------------------------------------------------------------------- tests
#: the workloads the fault tests run, as (make_ops seed, operations, pages per metadata pwrite or None for
#: the store's own run length): one by default; THINPOOL_SOAK=1 adds longer ones of other seeds, every
#: second one writing each metadata page by its own pwrite (so a fault can fall between any two pages of a
#: commit, and ``lose_some`` keeps a random subset of them)
WORKLOADS = [(5, 80, None)] + [(1000 + i, 160, 1 if i % 2 == 0 else None)
                               for i in range(soak_scaled("THINPOOL_TORN_WORKLOADS", 1, 5) - 1)]


@pytest.fixture(scope="module", params=WORKLOADS, ids=lambda w: f"seed{w[0]}-ops{w[1]}-run{w[2] or 'max'}")
def reference(module_scratch, request):
    seed, n_ops, run_pages = request.param
    base = os.path.join(module_scratch, f"w{seed}")
    os.mkdir(base)
    with pytest.MonkeyPatch.context() as mp:
        if run_pages is not None:
            mp.setattr("thinpool.mdcommit._RUN_PAGES", run_pages)
        ref = Reference(base, make_ops(seed, n_ops))
        ref.salt = 0 if seed == 5 else seed    # the default workload keeps its fault positions
        yield ref
    shutil.rmtree(base, ignore_errors=True)


def _run_until_fault(path: str, ops: list[tuple], io: FaultIO) -> int:
    """Run the workload with ``io`` under the store; returns the number of commits completed."""
    pool = Pool.create(path, data_size=NR_BLOCKS * BS, block_size=BS)
    saved, MetadataStore.io = MetadataStore.io, io
    gen0 = pool.store.generation
    try:
        for op in ops:
            do_op(pool, op)
    except PowerLoss:
        pass
    finally:
        done = pool.store.generation - gen0
        MetadataStore.io = saved
        pool.close(commit=False)    # the process is gone: nothing else reaches the disk
    assert io.fired, "the fault never fired"
    return done


@pytest.mark.parametrize("mode", ["stop", "tear", "lose", "lose_some"])
def test_metadata_fault_at_every_event(reference, mode):
    ref = reference
    rng = random.Random(zlib.crc32(mode.encode()) + ref.salt)
    points = range(1, ref.total_events + 1)
    if not SOAK and mode == "lose_some":
        points = range(1, ref.total_events + 1, 2)
    outcomes: Counter = Counter()
    for n in points:
        path = os.path.join(ref.base, f"{mode}-{n}")
        io = FaultIO(mode, n, random.Random(rng.random()))
        done = _run_until_fault(path, ref.ops, io)
        c = ref.commit_of_event(n)
        assert done == c - 1
        first, last = ref.commit_events[c - 1]
        sbe = max(i for i in range(first, last + 1)
                  if ref.event_log[i - 1][0] == "write" and ref.event_log[i - 1][1] < 2 * BLOCK)
        assert sbe == last - 1, "a commit ends with its superblock write and one sync"
        if mode == "lose" or n < sbe or (mode == "stop" and n == sbe):
            acceptable = [c - 1]          # the new superblock never reached the disk
        elif n == sbe and mode in ("tear", "lose_some") or (mode == "lose_some" and n == last):
            acceptable = [c - 1, c]       # torn or possibly lost: either superblock may win
        else:
            acceptable = [c]              # the superblock persisted, only its sync was cut
        got = reopen_and_verify(path, ref, acceptable, f"{mode} at event {n} ({io.fired})")
        outcomes["previous commit" if got == c - 1 else "commit in flight"] += 1
        STATS[f"fault_points_{mode}"] += 1
        shutil.rmtree(path)
    assert outcomes["previous commit"] > 0
    STATS[f"outcomes_{mode}"] = dict(Counter(STATS[f"outcomes_{mode}"] or {}) + outcomes)   # every workload's


@pytest.mark.parametrize("variant", ["all_old", "random_sectors"])
def test_data_cache_loss_after_every_op(reference, monkeypatch, variant):
    """Power loss after op j: unsynced data sectors revert (all, or a random subset); the pool must
    be the last commit under the crash model (sector granularity)."""
    ref = reference
    images: dict[str, bytes] = {}
    orig_sync = DataDevice.sync

    def sync(self):
        orig_sync(self)
        with open(self.path, "rb") as f:
            images[self.path] = f.read()
    monkeypatch.setattr(DataDevice, "sync", sync)
    rng = random.Random(7)
    for j in range(1, len(ref.ops)):
        if ref.ops[j - 1][0] in ("commit", "sprepare", "scommit", "sremove"):
            continue
        path = os.path.join(ref.base, f"data-{variant}-{j}")
        pool = Pool.create(path, data_size=NR_BLOCKS * BS, block_size=BS)
        data_path = pool.data.path
        with open(data_path, "rb") as f:
            images[data_path] = f.read()
        gen0 = pool.store.generation
        for op in ref.ops[:j]:
            do_op(pool, op)
        done = pool.store.generation - gen0
        pool.close(commit=False)
        with open(data_path, "r+b") as f:
            now = f.read()
            old = images[data_path]
            reverted = 0
            for s in range(0, len(now), SECTOR):
                if now[s:s + SECTOR] != old[s:s + SECTOR] and (variant == "all_old" or rng.random() < 0.5):
                    f.seek(s)
                    f.write(old[s:s + SECTOR])
                    reverted += 1
        STATS["data_sectors_reverted"] += reverted
        reopen_and_verify(path, ref, [done], f"data cache loss after op {j} ({variant})", sectors=True)
        STATS[f"data_crash_points_{variant}"] += 1
        shutil.rmtree(path)
    assert STATS[f"data_crash_points_{variant}"] > 0, "no data crash point was tried"


@pytest.mark.parametrize("crash", ["close", "data_lost"])
def test_freed_block_hazard(tmp_path, crash):
    """Delete a committed snapshot, need blocks elsewhere, crash before the commit: the snapshot
    is intact.  When the only free blocks are the snapshot's, the write commits first (dm-thin's
    rule), so after the crash the delete is durable and the new volume exists but is empty."""
    path = str(tmp_path / "pool")
    pool = Pool.create(path, data_size=6 * BS, block_size=BS)
    a = pool.create_thin("a", 2 * BS)
    a.write(0, b"A" * 2 * BS)
    pool.snapshot("a", "s")
    a.write(0, b"a" * 2 * BS)          # a now owns 2 new blocks; s keeps the first 2
    pool.create_thin("b", 2 * BS)
    pool.commit()                       # 4 of 6 blocks used
    data_path = pool.data.path
    with open(data_path, "rb") as f:
        synced = f.read()               # what the disk holds at the commit
    with pool.batch():                  # the delete is not committed when the crash comes
        pool.delete("s")                # frees 2 blocks, not reusable before the next commit
        pool.thin("b").write(0, b"B" * 2 * BS)   # takes the 2 never-used blocks
        assert {int(d) for d in pool.thin("b").mappings()[1]}.isdisjoint({0, 1})
        pool.close(commit=False)
    if crash == "data_lost":            # nothing written since the commit reached the disk
        with open(data_path, "r+b") as f:
            f.write(synced)
    with Pool.open(path) as pool:
        assert pool.check().ok
        assert sorted(t.name for t in pool.thins()) == ["a", "b", "s"]
        assert pool.thin("s").read(0, 2 * BS) == b"A" * 2 * BS
        assert pool.thin("a").read(0, 2 * BS) == b"a" * 2 * BS
        assert pool.thin("b").read(0, 2 * BS) == bytes(2 * BS)
        # now the only free blocks are the deleted snapshot's: the write commits the delete first
        with pool.batch():
            pool.thin("b").write(0, b"B" * 2 * BS)
            pool.delete("s")
            pool.create_thin("c", 2 * BS).write(0, b"C" * 2 * BS)
            pool.close(commit=False)
    with Pool.open(path) as pool:
        assert pool.check().ok
        assert sorted(t.name for t in pool.thins()) == ["a", "b", "c"]
        assert pool.thin("a").read(0, 2 * BS) == b"a" * 2 * BS
        assert pool.thin("b").read(0, 2 * BS) == b"B" * 2 * BS
        assert pool.thin("c").read(0, 2 * BS) == bytes(2 * BS)   # written after the implicit commit
    STATS["freed_block_hazard_cases"] += 1
