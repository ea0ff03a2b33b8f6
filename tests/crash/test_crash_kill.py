"""Crash injection for real: a workload process is killed with SIGKILL at random points.

One pool lives for the whole test.  Each *cycle* forks a workload process (from this already
warmed-up interpreter, so a cycle costs milliseconds) that opens the pool and runs a deterministic
random workload -- writes of every shape, snapshots of snapshots, deletes, discards, creates, commits --
and after every commit appends ``{"commit": k, "op": i, "digest": ...}`` to a side log and fsyncs it.
The test kills it with SIGKILL at a random instant (half the kills are aimed at the inside of a
commit, through a phase word the workload keeps in shared memory), reopens the pool, runs
``check()`` and verifies every committed byte:

* the workload is a pure function of (start state, seed), so the test replays it without a pool to
  obtain each commit's exact state (and checks the replay against the digests in the side log);
* with K the last commit in the log, the pool must hold commit K -- every byte exact, except that a
  block mapped and exclusive at K that the same volume overwrote in place after K may hold, in each
  4 KiB page, any version written to it (a write the kill interrupts is torn page by page;
  docs/reliability.md, the crash model) -- or commit K+1 exactly (killed after the commit, before
  its log record);
* volumes, sizes, used data blocks and each volume's exclusive/shared split must match too.

The next cycle starts from the verified state.  Counts go to ``.reliability/crash_kill.json``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import signal
import struct
import time
import traceback
from collections import Counter

import numpy as np

from tests.support import REPORTS, SOAK, soak_scaled
from thinpool import Pool

KILLS = soak_scaled("THINPOOL_KILLS", 60, 600)
BS = 64 * 1024
NR_BLOCKS = 160
VOL_BLOCKS = 8
MAX_VOLS = 6
OPS_PER_RUN = 600

PH_IDLE, PH_OP, PH_COMMIT, PH_LOG = 0, 1, 2, 3
_SHM = struct.Struct("<qqq")  # phase, commits done, ops done


# ---------------------------------------------------------------------------- the workload (pure part)
class MVol:
    __slots__ = ("data", "tok")

    def __init__(self, data: bytearray, tok: dict):
        self.data = data
        self.tok = tok


class Model:
    """Volume bytes plus a sharing token per mapped block (see test_model_stateful.py)."""

    def __init__(self, vols: dict[str, MVol], next_tok: int, run: int):
        self.vols = vols
        self.next_tok = next_tok
        self.run = run
        self.fresh = 0
        self.since_commit = 0

    def new_tok(self) -> int:
        self.next_tok += 1
        return self.next_tok

    def refs(self) -> Counter:
        c: Counter = Counter()
        for v in self.vols.values():
            c.update(v.tok.values())
        return c

    def snapshot_state(self) -> dict:
        return {n: (bytes(v.data), dict(v.tok)) for n, v in self.vols.items()}


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for n in sorted(state):
        h.update(n.encode() + b"\0" + state[n][0])
    return h.hexdigest()[:16]


def next_op(rng: random.Random, m: Model) -> tuple:
    names = sorted(m.vols)
    r = rng.random()
    m.since_commit += 1
    if m.since_commit > 25:  # bound a transaction's allocations: no implicit commit, ever
        r = 0.05
    if not names or (r < 0.04 and len(names) < MAX_VOLS):
        m.fresh += 1
        return ("create", f"r{m.run}c{m.fresh}", rng.choice([VOL_BLOCKS * BS, VOL_BLOCKS * BS - BS // 2, 3 * BS]))
    if r < 0.12 and names:
        m.since_commit = 0
        return ("commit",)
    if r < 0.18 and len(names) < MAX_VOLS:
        m.fresh += 1
        return ("snapshot", rng.choice(names), f"r{m.run}s{m.fresh}")
    if r < 0.22 and len(names) > 1:
        return ("delete", rng.choice(names))
    name = rng.choice(names)
    size = len(m.vols[name].data)
    if r < 0.28:
        off = rng.randrange(size)
        return ("discard", name, off, rng.randrange(1, size - off + 1))
    shape = rng.random()
    if shape < 0.3:       # whole aligned blocks
        vb = rng.randrange(-(-size // BS))
        off, n = vb * BS, min(size - vb * BS, BS * rng.randint(1, 2))
    elif shape < 0.7:     # small unaligned
        off = rng.randrange(size)
        n = rng.randint(1, min(4096, size - off))
    else:                 # crossing block boundaries
        off = rng.randrange(size)
        n = rng.randint(1, min(3 * BS, size - off))
    return ("write", name, off, n, rng.getrandbits(32))


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def apply_op(m: Model, op: tuple, on_write=None) -> None:
    kind = op[0]
    if kind == "create":
        m.vols[op[1]] = MVol(bytearray(op[2]), {})
    elif kind == "snapshot":
        o = m.vols[op[1]]
        m.vols[op[2]] = MVol(bytearray(o.data), dict(o.tok))
    elif kind == "delete":
        del m.vols[op[1]]
    elif kind == "discard":
        _, name, off, n = op
        v = m.vols[name]
        for vb in range(-(-off // BS), (off + n) // BS):
            if vb in v.tok:
                del v.tok[vb]
                v.data[vb * BS:(vb + 1) * BS] = bytes(len(v.data[vb * BS:(vb + 1) * BS]))
    elif kind == "write":
        _, name, off, n, seed = op
        v = m.vols[name]
        v.data[off:off + n] = payload(seed, n)
        refs = m.refs()
        for vb in range(off // BS, (off + n - 1) // BS + 1):
            t = v.tok.get(vb)
            if t is None or refs[t] > 1:
                v.tok[vb] = m.new_tok()
            elif on_write is not None:
                on_write(name, vb, t, bytes(v.data[vb * BS:(vb + 1) * BS]))


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
        pool.thin(op[1]).write(op[2], payload(op[4], op[3]))


def workload(path: str, log_path: str, m: Model, seed: int, shm: mmap.mmap) -> None:
    """The child: run OPS_PER_RUN ops, committing and logging as it goes (never returns normally
    to the caller's stack: the caller ``os._exit``s)."""
    rng = random.Random(seed)
    pool = Pool.open(path)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    commits = 0
    # one batch for the run: the messages wait for the explicit commits the model makes (a message
    # outside a batch commits by itself, which the replay tests elsewhere)
    with pool.batch():
        for i in range(OPS_PER_RUN):
            op = next_op(rng, m)
            apply_op(m, op)
            gen = pool.store.generation
            if op[0] == "commit":
                shm[:_SHM.size] = _SHM.pack(PH_COMMIT, commits, i)
                pool.commit()  # writes nothing if nothing changed: the state is the previous commit's
                commits += 1
                shm[:_SHM.size] = _SHM.pack(PH_LOG, commits, i)
                os.write(log, (json.dumps({"commit": commits, "op": i, "digest": digest(m.snapshot_state())})
                               + "\n").encode())
                os.fsync(log)
            else:
                shm[:_SHM.size] = _SHM.pack(PH_OP, commits, i)
                do_op(pool, op)
                if pool.store.generation != gen:
                    raise AssertionError(f"unexpected implicit commit at op {i} ({op[0]}): the replay cannot follow")
        shm[:_SHM.size] = _SHM.pack(PH_IDLE, commits, OPS_PER_RUN)
        pool.close(commit=False)


# ---------------------------------------------------------------------------- verification
def replay(m0: Model, seed: int, upto_commit: int):
    """States of commits 0..upto_commit+1 of a run (0 = start), and for each commit k the versions
    written in place after k (before k+1) to blocks exclusive at k, by (volume, vblock)."""
    m = Model({n: MVol(bytearray(v.data), dict(v.tok)) for n, v in m0.vols.items()}, m0.next_tok, m0.run)
    rng = random.Random(seed)
    states = [m.snapshot_state()]
    cands: list[dict] = []

    def start_commit():
        refs = m.refs()
        c = {}
        for n, v in m.vols.items():
            for vb, t in v.tok.items():
                if refs[t] == 1:
                    c[(n, vb)] = (t, [])
        cands.append(c)
    start_commit()

    def on_write(name, vb, t, block):
        owner = cands[-1].get((name, vb))
        if owner is not None and owner[0] == t:
            owner[1].append(block)

    for _ in range(OPS_PER_RUN):
        op = next_op(rng, m)
        apply_op(m, op, on_write)
        if op[0] == "commit":
            states.append(m.snapshot_state())
            if len(states) > upto_commit + 2:
                break
            start_commit()
    return states, cands


def compare(pool: Pool, state: dict, cands: dict | None) -> tuple[list[str], int, int]:
    """Problems of the pool against a committed state; (problems, bytes verified, in-place blocks)."""
    problems = []
    verified = 0
    newer = 0
    names = sorted(t.name for t in pool.thins())
    if names != sorted(state):
        return [f"volumes {names} != {sorted(state)}"], 0, 0
    for n, (data, _tok) in state.items():
        t = pool.thin(n)
        if t.size != len(data):
            problems.append(f"{n}: size {t.size} != {len(data)}")
            continue
        got = t.read(0, t.size)
        if got == data:
            verified += len(data)
            continue
        for vb in range(-(-len(data) // BS)):
            a, b = got[vb * BS:(vb + 1) * BS], data[vb * BS:(vb + 1) * BS]
            if a == b:
                verified += len(a)
                continue
            c = cands.get((n, vb)) if cands is not None else None
            if c is not None and _each_page_is_one_of(a, [b] + [x[:len(a)] for x in c[1]]):
                newer += 1
                continue
            bad = int(np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))[0])
            problems.append(f"{n} block {vb}: byte {bad} is {a[bad]:#x}, committed {b[bad]:#x}")
    return problems, verified, newer


def _each_page_is_one_of(got: bytes, versions: list[bytes], page: int = 4096) -> bool:
    """Every 4 KiB page of ``got`` equals the same page of one of ``versions``.  An in-place write
    that SIGKILL interrupts is torn at page granularity (the kernel copies a write into the page
    cache page by page and stops at a fatal signal), exactly as a disk may tear a multi-sector write;
    so a block overwritten in place after the commit may mix versions, page by page."""
    return all(any(v[i:i + page] == got[i:i + page] for v in versions) for i in range(0, len(got), page))


def accounting(pool: Pool, state: dict) -> list[str]:
    """Used blocks and exclusive/shared counts against the state's sharing tokens."""
    problems = []
    refs: Counter = Counter()
    for _, tok in state.values():
        refs.update(tok.values())
    tok_to_d: dict = {}
    d_to_tok: dict = {}
    for n, (_, tok) in state.items():
        vbs, dbs, _ = pool.thin(n).mappings()
        if vbs.tolist() != sorted(tok):
            problems.append(f"{n}: mapped blocks {vbs.tolist()} != {sorted(tok)}")
            continue
        for vb, d in zip(vbs.tolist(), dbs.tolist()):
            t = tok[vb]
            if tok_to_d.setdefault(t, d) != d or d_to_tok.setdefault(d, t) != t:
                problems.append(f"{n} block {vb}: sharing differs from the workload's")
        u = pool.usage(n)
        excl = sum(1 for t in tok.values() if refs[t] == 1)
        if (u.mapped_blocks, u.exclusive_blocks) != (len(tok), excl):
            problems.append(f"{n}: usage {u.mapped_blocks}/{u.exclusive_blocks} != {len(tok)}/{excl}")
    if pool.status().used_data_blocks != len(refs):
        problems.append(f"used data blocks {pool.status().used_data_blocks} != {len(refs)}")
    return problems


def read_log(path: str) -> list[dict]:
    out = []
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f.read().split(b"\n")[:-1]:     # a torn last line has no newline
                out.append(json.loads(line))
    return out


def model_from_pool(pool: Pool, run: int) -> Model:
    vols = {}
    for t in pool.thins():
        vbs, dbs, _ = t.mappings()
        vols[t.name] = MVol(bytearray(t.read(0, t.size)), {int(v): ("d", int(d)) for v, d in zip(vbs, dbs)})
    return Model(vols, 0, run)


# ---------------------------------------------------------------------------- the test
def test_sigkill_workload(tmp_path):
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=NR_BLOCKS * BS, block_size=BS).close()
    shm = mmap.mmap(-1, 4096)
    stats: Counter = Counter()
    # the run's seed is printed by every failure: THINPOOL_KILL_SEED=<it> replays the same workloads (where the
    # kills land still depends on timing)
    master_seed = int(os.environ.get("THINPOOL_KILL_SEED", "0")) or random.randrange(1, 1 << 30)
    master = random.Random(master_seed)
    t0 = time.time()
    with Pool.open(path) as pool:
        m = model_from_pool(pool, 0)
    cycle = 0
    while stats["kills"] < KILLS:
        cycle += 1
        assert cycle < KILLS * 3, f"THINPOOL_KILL_SEED={master_seed}: too few kills landed: {dict(stats)}"
        seed = master.randrange(1 << 30)
        m.run = cycle
        log_path = str(tmp_path / f"log.{cycle}")
        shm[:_SHM.size] = _SHM.pack(PH_IDLE, 0, -1)
        err_path = str(tmp_path / "child.err")
        pid = os.fork()
        if pid == 0:  # the workload process
            code = 0
            try:
                workload(path, log_path, m, seed, shm)
            except BaseException:
                with open(err_path, "w") as f:
                    f.write(traceback.format_exc())
                code = 3
            os._exit(code)
        status = None
        if cycle % 2 == 0:  # aimed: kill inside the target-th commit
            target = master.randint(1, 12)
            deadline = time.time() + 10
            while time.time() < deadline:
                phase, commits, ops = _SHM.unpack(shm[:_SHM.size])
                if phase == PH_COMMIT and commits + 1 >= target:
                    time.sleep(master.random() * 0.003)
                    break
                done, st_ = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = st_
                    break
                time.sleep(0.0002)
        else:
            time.sleep(master.uniform(0.002, 0.3))
        phase, commits, ops = _SHM.unpack(shm[:_SHM.size])
        if status is None:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, f"THINPOOL_KILL_SEED={master_seed}: " + open(err_path).read()
            stats["runs_completed"] += 1
        else:
            assert os.WTERMSIG(status) == signal.SIGKILL
            stats["kills"] += 1
            stats[f"killed_in_{['op', 'op', 'commit', 'log'][phase]}"] += 1
        # ---- verify
        log = read_log(log_path)
        k = len(log)
        states, cands = replay(m, seed, k)
        for rec, st_ in zip(log, states[1:]):
            assert rec["digest"] == digest(st_), \
                f"THINPOOL_KILL_SEED={master_seed}: replay diverged from the workload at commit {rec['commit']}"
        with Pool.open(path) as pool:
            rep = pool.check()
            assert rep.ok, f"THINPOOL_KILL_SEED={master_seed}, cycle {cycle}: check fails: {rep.errors}"
            problems, verified, newer = compare(pool, states[k], cands[k])
            landed = k
            if problems and len(states) > k + 1:
                p2, v2, n2 = compare(pool, states[k + 1], None)
                if not p2:
                    problems, verified, newer, landed = [], v2, 0, k + 1
                    stats["commit_landed_before_log"] += 1
            assert not problems, (f"THINPOOL_KILL_SEED={master_seed}, cycle {cycle} (seed {seed}, killed in phase {phase} "
                                  f"after {commits} commits, op {ops}): committed bytes lost or wrong: {problems[:5]}")
            acc = accounting(pool, states[landed])
            assert not acc, \
                f"THINPOOL_KILL_SEED={master_seed}, cycle {cycle}: accounting differs after the crash: {acc[:5]}"
            stats["bytes_verified"] += verified
            stats["inplace_blocks_with_newer_bytes"] += newer
            stats["commits_logged"] += k
            m = model_from_pool(pool, cycle)
        if os.path.exists(log_path):
            os.unlink(log_path)
    elapsed = time.time() - t0
    report = {"kill_points": stats["kills"], "cycles": cycle, "seconds": round(elapsed, 1), "soak": SOAK,
              "seed": master_seed, "bytes_lost": 0, "counts": dict(sorted(stats.items()))}
    REPORTS.record("crash_kill", report)
    print(f"\nSIGKILL crash test: {stats['kills']} kill points survived in {elapsed:.0f}s: {dict(stats)}")
    assert stats["kills"] >= KILLS
    assert stats["killed_in_commit"] > 0
