"""Model-based stateful test of the public Pool/Thin API.

A hypothesis ``RuleBasedStateMachine`` drives a tiny pool (a handful of 64 KiB blocks, volumes of a
few blocks) through create/snapshot/write/read/discard/delete/commit/abort/close-reopen/crash/
resize and the containerd snapshotter (:mod:`thinpool.containers.snapshotter`) and compares it after every step
with a pure-Python reference model:

* **bytes**: every volume is kept as a dict ``virtual block -> 64 KiB of bytes`` (absent = zeroes);
* **sharing**: every mapped virtual block carries a *token* naming the data block that backs it.
  A snapshot copies tokens; a write to a block whose token is referenced elsewhere must get a new
  token (copy-on-write); a whole-block discard drops it.  The engine may additionally copy an
  exclusive block (dm-thin's conservative time rule); the model then gives it a new token too, so
  the token <-> data-block relation stays a bijection that the invariant checks against
  ``Thin.mappings()``.  From tokens alone the model computes used data blocks and each volume's
  mapped/exclusive/shared counts (exclusive = referenced by exactly one mapping entry in the pool).
* **crash model** (docs/reliability.md): after ``close(commit=False)`` + reopen (or ``abort()``),
  the metadata is the last commit's.  A block that was mapped and exclusive at that commit and was
  overwritten in place since (same volume, same virtual block, same data block) may read back as
  the committed bytes or as any version written to it since; every other byte must be exactly the
  committed byte.  Nothing else is tolerated.
* **no space**: a write raises NoSpace exactly when it must (it needs more blocks than are free:
  at least its unmapped/shared blocks, at most all its blocks) and then changes nothing.

Counts (examples, steps, crashes...) are written to ``.reliability/stateful.json``.
``THINPOOL_SOAK=1`` runs far more examples.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from tests.support import REPORTS, SOAK, scratch_root, soak_scaled
from thinpool import Pool
from thinpool.containers.snapshotter import Snapshotter
from thinpool.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NoSpace, NotFound, ReadOnly

MAX_EXAMPLES = soak_scaled("THINPOOL_STATEFUL_EXAMPLES", 2000, 30000)
STEPS = soak_scaled("THINPOOL_STATEFUL_STEPS", 25, 60)

BS = 64 * 1024
ZERO = bytes(BS)
NAMES = [f"v{i}" for i in range(7)]
SKEYS = ["k0", "k1", "k2", "c0", "c1"]    # snapshotter keys and names share one key space
SNAP_BASE = 2 * BS
BIG = (1 << 19) + 8          # a sparse volume spanning two mid nodes (the radix tree's 2nd level)
EDGES = [0, 1, 510, 511, 512, 513, 1023, 1024, (1 << 19) - 1, 1 << 19, (1 << 19) + 1, BIG - 1]
MAX_VOLUMES = 6


STATS: Counter = Counter()


class Vol:
    """Model of one thin volume: size, bytes per virtual block, and a token per mapped block."""

    __slots__ = ("uid", "size", "ro", "blocks", "tok")

    def __init__(self, uid: int, size: int, ro: bool, blocks: dict | None = None, tok: dict | None = None):
        self.uid = uid
        self.size = size
        self.ro = ro
        self.blocks: dict[int, bytes] = dict(blocks or {})
        self.tok: dict[int, int] = dict(tok or {})

    def copy(self) -> "Vol":
        return Vol(self.uid, self.size, self.ro, self.blocks, self.tok)

    @property
    def nblocks(self) -> int:
        return -(-self.size // BS)

    def content(self) -> bytes:
        return self.expected(0, self.size)

    def expected(self, off: int, n: int) -> bytes:
        """The model's bytes of ``[off, off + n)`` (built from the mapped blocks only: volumes can be huge)."""
        out = bytearray(n)
        for vb, blk in self.blocks.items():
            lo, hi = max(off, vb * BS), min(off + n, (vb + 1) * BS)
            if lo < hi:
                out[lo - off:hi - off] = blk[lo - vb * BS:hi - vb * BS]
        return bytes(out)


def _payload(seed: int, n: int, kind: int) -> bytes:
    if kind == 0:
        return bytes(n)                      # zeroes still provision blocks
    if kind == 1:
        return bytes([seed & 0xFF]) * n
    return random.Random(seed).randbytes(n)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        STATS["examples"] += 1
        self.dir = tempfile.mkdtemp(prefix="tp-model-", dir=scratch_root())
        self.path = os.path.join(self.dir, "pool")
        self.pool: Pool | None = None
        self.vols: dict[str, Vol] = {}
        self.nr_blocks = 0
        self.next_uid = 1
        self.next_tok = 1
        self.dblock_of: dict[int, int] = {}   # token -> data block (fixed for the token's lifetime)
        self.commit_events: list[str] = []
        self.snap_model: dict[str, dict] = {}    # snapshotter key -> {"kind", "parent", "volume"}
        self.txid = 0
        self.handles: dict[str, tuple] = {}      # name when taken -> (Thin handle, the model volume's uid)
        self.held: dict[int, list] | None = None  # held metadata snapshot: dev_id -> [(vb, dblock)]

    # ------------------------------------------------------------------ model helpers
    def _new_tok(self) -> int:
        self.next_tok += 1
        return self.next_tok

    def _refcounts(self) -> Counter:
        c: Counter = Counter()
        for v in self.vols.values():
            c.update(v.tok.values())
        return c

    def _held_only_blocks(self) -> set[int]:
        """Data blocks only the held metadata snapshot maps: still in use (dm-thin's held root keeps
        its trees' data blocks referenced until release_metadata_snap)."""
        if self.held is None:
            return set()
        live = {self.dblock_of[t] for t in self._refcounts() if t in self.dblock_of}
        return {d for pairs in self.held.values() for _, d in pairs} - live

    def _free_blocks(self) -> int:
        return self.nr_blocks - len(self._refcounts()) - len(self._held_only_blocks())

    def _mark_committed(self) -> None:
        """The current model state is now the durable one (explicit or implicit commit)."""
        self.committed = {n: v.copy() for n, v in self.vols.items()}
        self.committed_nr = self.nr_blocks
        self.committed_txid = self.txid
        refs = self._refcounts()
        self.owner: dict[int, tuple[int, int]] = {}
        self.candidates: dict[int, list[bytes]] = {}
        for v in self.vols.values():
            for vb, t in v.tok.items():
                if refs[t] == 1:
                    self.owner[t] = (v.uid, vb)
                    self.candidates[t] = [v.blocks[vb]]
        self.committed_snap = json.loads(json.dumps(self.snap_model))

    def _hook_commits(self) -> None:
        """Record every commit the engine makes, and who asked (implicit commits happen inside
        writes: before the write when blocks freed in this transaction are needed)."""
        pool = self.pool
        orig = Pool.commit.__get__(pool)

        def commit() -> None:
            self.commit_events.append(sys._getframe(1).f_code.co_name)
            return orig()
        pool.commit = commit

    def _open(self) -> None:
        self.pool = Pool.open(self.path)
        self._hook_commits()

    def _engine_dblock(self, name: str, vb: int) -> int | None:
        vbs, dbs, _ = self.pool.thin(name).mappings()
        i = np.searchsorted(vbs, vb)
        return int(dbs[i]) if i < len(vbs) and vbs[i] == vb else None

    # ------------------------------------------------------------------ setup
    @initialize(nr=st.integers(3, 14))
    def setup(self, nr: int) -> None:
        # error_if_no_space: the model checks ENOSPC at once (the queue: tests/engine/test_kernel_discard_queue.py)
        self.pool = Pool.create(self.path, data_size=nr * BS, block_size=BS, error_if_no_space=True)
        self._hook_commits()
        self.nr_blocks = nr
        self._mark_committed()

    def teardown(self) -> None:
        if self.pool is not None:
            try:
                self.pool.close(commit=False)
            except Exception:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ rules: devices
    @rule(name=st.sampled_from(NAMES), nblocks=st.sampled_from([1, 2, 3, 4, 1, 2, 3, 600, BIG]),
          tail=st.sampled_from([0, 0, 512, BS // 2]),
          ro=st.sampled_from([False, False, False, True]))
    def create_thin(self, name: str, nblocks: int, tail: int, ro: bool) -> None:
        size = (nblocks - 1) * BS + tail if tail else nblocks * BS
        if name in self.vols:
            with pytest.raises(AlreadyExists, match=name):
                self.pool.create_thin(name, size)
            return
        if len(self.vols) >= MAX_VOLUMES:
            return
        self.pool.create_thin(name, size, read_only=ro)
        self.vols[name] = Vol(self.next_uid, size, ro)
        self.next_uid += 1
        self._mark_committed()  # every pool message commits (dm-thin's pool_message)
        STATS["create"] += 1

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), name=st.sampled_from(NAMES), ro=st.sampled_from([False, False, True]))
    def snapshot(self, data, name: str, ro: bool) -> None:
        origin = data.draw(st.sampled_from(sorted(self.vols)), label="origin")
        if name in self.vols:
            with pytest.raises(AlreadyExists):
                self.pool.snapshot(origin, name)
            return
        if len(self.vols) >= MAX_VOLUMES:
            return
        self.pool.snapshot(origin, name, read_only=ro)
        o = self.vols[origin]
        self.vols[name] = Vol(self.next_uid, o.size, ro, o.blocks, o.tok)
        self.next_uid += 1
        self._mark_committed()
        STATS["snapshot"] += 1

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name: str) -> None:
        if name not in self.vols:
            with pytest.raises(NotFound, match=name):
                self.pool.delete(name)
            return
        self.pool.delete(name)
        del self.vols[name]
        self._mark_committed()
        STATS["delete"] += 1

    # ------------------------------------------------------------------ rules: I/O
    # Writes are the interesting operation: three entries in hypothesis's uniform choice of rules.
    @precondition(lambda self: self.vols)
    @rule(data=st.data(), shape=st.sampled_from(["aligned", "small", "crossing", "tail", "whole", "past_end"]),
          seed=st.integers(0, 2**32 - 1), kind=st.sampled_from([0, 1, 2, 2]))
    def write(self, data, shape: str, seed: int, kind: int) -> None:
        self._write(data, shape, seed, kind)

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), shape=st.sampled_from(["aligned", "small", "crossing"]), seed=st.integers(0, 2**32 - 1))
    def write_more(self, data, shape: str, seed: int) -> None:
        self._write(data, shape, seed, 2)

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), shape=st.sampled_from(["aligned", "small", "crossing", "tail", "whole"]),
          seed=st.integers(0, 2**32 - 1))
    def write_yet_more(self, data, shape: str, seed: int) -> None:
        self._write(data, shape, seed, 1)

    def _vb(self, data, v: Vol, lo: int = 0) -> int:
        """A virtual block to work on: any block of a small volume; in a big sparse one, a block at a
        leaf or mid-node boundary, or one already mapped."""
        if v.nblocks <= 8:
            return data.draw(st.integers(lo, v.nblocks - 1), label="vb")
        cands = sorted({b for b in EDGES + list(v.tok) if lo <= b < v.nblocks})
        return data.draw(st.sampled_from(cands), label="vb")

    def _write(self, data, shape: str, seed: int, kind: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.vols)), label="volume")
        v = self.vols[name]
        if shape == "whole" and v.nblocks > 8:
            shape = "aligned"
        if shape == "aligned":
            vb = self._vb(data, v)
            off, n = vb * BS, min(BS * data.draw(st.integers(1, 2), label="nblk"), v.size - vb * BS)
        elif shape == "whole":
            off, n = 0, v.size
        elif shape == "small":
            vb = self._vb(data, v)
            off = min(v.size - 1, vb * BS + data.draw(st.integers(0, BS - 1), label="inblk"))
            n = data.draw(st.integers(1, min(600, v.size - off)), label="len")
        elif shape == "crossing":
            if v.nblocks < 2:
                return
            vb = self._vb(data, v, 1)
            back = data.draw(st.integers(1, 3000), label="back")
            off = max(0, vb * BS - back)
            n = data.draw(st.integers(back + 1, min(v.size - off, back + BS + 100)), label="len")
        elif shape == "tail":
            n = data.draw(st.integers(1, min(v.size, 2 * BS)), label="len")
            off = v.size - n
        else:  # past the end: InvalidArgument and nothing changes
            off = data.draw(st.integers(max(0, v.size - 100), v.size), label="off")
            n = v.size - off + data.draw(st.integers(1, 100), label="over")
        payload = _payload(seed, n, kind)
        if v.ro:
            with pytest.raises(ReadOnly, match=name):
                self.pool.thin(name).write(off, payload)
            return
        if shape == "past_end":
            with pytest.raises(InvalidArgument, match="past the end"):
                self.pool.thin(name).write(off, payload)
            STATS["bad_write"] += 1
            return
        self._do_write(name, [(off, payload)])

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1), count=st.integers(2, 4))
    def write_batch(self, data, seed: int, count: int) -> None:
        """write_many: one kernel call, all-or-nothing for space; I/Os may overlap and repeat blocks."""
        name = data.draw(st.sampled_from(sorted(self.vols)), label="volume")
        v = self.vols[name]
        ios = []
        for i in range(count):
            vb = self._vb(data, v)
            off = min(v.size - 1, vb * BS + data.draw(st.sampled_from([0, 1, BS // 2, BS - 1]), label="inblk"))
            n = data.draw(st.integers(1, min(BS + 100, v.size - off)), label="len")
            ios.append((off, _payload(seed + i, n, 2)))
        if v.ro:
            with pytest.raises(ReadOnly, match=name):
                self.pool.thin(name).write_many([o for o, _ in ios], [b for _, b in ios])
            return
        self._do_write(name, ios)
        STATS["write_many"] += 1

    def _do_write(self, name: str, ios: list[tuple[int, bytes]]) -> None:
        v = self.vols[name]
        touched = sorted({vb for off, p in ios for vb in range(off // BS, (off + len(p) - 1) // BS + 1)})
        refs = self._refcounts()
        lower = sum(1 for vb in touched if vb not in v.tok or refs[v.tok[vb]] > 1)
        free = self._free_blocks()
        self.commit_events.clear()
        try:
            if len(ios) == 1:
                self.pool.thin(name).write(ios[0][0], ios[0][1])
            else:
                self.pool.thin(name).write_many([o for o, _ in ios], [p for _, p in ios])
        except NoSpace as exc:
            assert len(touched) > free, (
                f"NoSpace although the write needs at most {len(touched)} blocks and {free} are free: {exc}")
            assert self.pool.mode == "out-of-data-space"
            STATS["nospace"] += 1
            for ev in self.commit_events:
                assert ev == "_submit", ev
                self._mark_committed()
            return
        assert lower <= free, f"write needing {lower} new blocks succeeded with only {free} free"
        for ev in self.commit_events:
            STATS["implicit_commit"] += 1
        if "_submit" in self.commit_events:   # committed before the write touched anything
            self._mark_committed()
        exclusive_before = {vb: v.tok[vb] for vb in touched if vb in v.tok and refs[v.tok[vb]] == 1}
        for off, payload in ios:
            n, pos = len(payload), 0
            while pos < n:
                vb = (off + pos) // BS
                start = off + pos - vb * BS
                seg = min(n - pos, BS - start)
                blk = bytearray(v.blocks.get(vb, ZERO))
                blk[start:start + seg] = payload[pos:pos + seg]
                v.blocks[vb] = bytes(blk)
                pos += seg
        for vb in touched:
            if vb in exclusive_before:
                t = exclusive_before[vb]
                if self._engine_dblock(name, vb) != self.dblock_of[t]:
                    v.tok[vb] = self._new_tok()          # time-rule copy of an exclusive block
                    STATS["cow_exclusive"] += 1
                else:
                    STATS["in_place"] += 1
                    if self.owner.get(t) == (v.uid, vb):
                        self.candidates[t].append(v.blocks[vb])
            else:
                v.tok[vb] = self._new_tok()
        STATS["write"] += 1
        if any(ev != "_submit" for ev in self.commit_events):   # committed after the write
            self._mark_committed()

    @precondition(lambda self: self.vols)
    @rule(data=st.data())
    def read(self, data) -> None:
        name = data.draw(st.sampled_from(sorted(self.vols)), label="volume")
        v = self.vols[name]
        if v.nblocks <= 8:
            off = data.draw(st.integers(0, v.size), label="off")
            n = data.draw(st.integers(0, v.size - off), label="len")
        else:
            off = min(v.size, self._vb(data, v) * BS + data.draw(st.integers(-100, 100), label="d") % BS)
            n = data.draw(st.integers(0, min(3 * BS, v.size - off)), label="len")
        assert self.pool.thin(name).read(off, n) == v.expected(off, n)
        offs = [min(v.size - 1, self._vb(data, v) * BS + data.draw(st.integers(0, BS), label="o"))
                for _ in range(3)]
        ln = min(v.size - max(offs), 777)
        got = self.pool.thin(name).read_many(offs, ln)
        for i, o in enumerate(offs):
            assert got[i].tobytes() == v.expected(o, ln)

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), mode=st.sampled_from(["partial", "whole", "all", "unaligned"]))
    def discard(self, data, mode: str) -> None:
        name = data.draw(st.sampled_from(sorted(self.vols)), label="volume")
        v = self.vols[name]
        if mode == "partial":
            off = data.draw(st.integers(0, v.size - 1), label="off")
            n = data.draw(st.integers(1, min(BS - 1, v.size - off)), label="len")
        elif mode == "whole":
            vb = self._vb(data, v)
            off, n = vb * BS, min(BS * data.draw(st.sampled_from([1, 1, 3]), label="nblk"), v.size - vb * BS)
        elif mode == "all":
            off, n = 0, v.size
        else:
            off = data.draw(st.integers(0, v.size - 1), label="off")
            n = data.draw(st.integers(0, v.size - off), label="len")
        if v.ro:
            with pytest.raises(ReadOnly):
                self.pool.thin(name).discard(off, n)
            return
        got = self.pool.thin(name).discard(off, n)
        first, last = -(-off // BS), (off + n) // BS
        expect = 0
        for vb in sorted(v.tok):
            if first <= vb < last:
                del v.tok[vb]
                del v.blocks[vb]
                expect += 1
        assert got == expect
        STATS["discard"] += 1

    # ------------------------------------------------------------------ rules: transactions
    @rule(op=st.sampled_from(["commit", "commit", "reopen", "crash", "crash", "crash", "abort", "resize", "shrink",
                              "txid", "txid_mismatch"]),
          extra=st.integers(1, 6))
    def lifecycle(self, op: str, extra: int) -> None:
        if op == "commit":
            self.commit()
        elif op == "txid":
            self.pool.set_transaction_id(self.txid, self.txid + extra)
            self.txid += extra
            self._mark_committed()
        elif op == "txid_mismatch":
            with pytest.raises(InvalidArgument, match="mismatched"):
                self.pool.set_transaction_id(self.txid + extra, 0)
        elif op == "reopen":
            self.close_reopen()
        elif op in ("crash", "abort"):
            self.crash(op)
        elif op == "resize":
            self.resize(extra)
        else:
            self.shrink_refused()

    def commit(self) -> None:
        self.pool.commit()
        self._mark_committed()
        assert self.pool.mode in ("write", "out-of-data-space")
        STATS["commit"] += 1

    def close_reopen(self) -> None:
        self.pool.close()
        self._mark_committed()
        self._open()
        self._check_open_mode()
        STATS["reopen"] += 1

    def crash(self, how: str) -> None:
        if how == "crash":
            self.pool.close(commit=False)
            self._open()
        else:
            self.pool.abort()
        self.vols = {n: v.copy() for n, v in self.committed.items()}
        self.nr_blocks = self.committed_nr
        self.snap_model = json.loads(json.dumps(self.committed_snap))
        self.txid = self.committed_txid
        # blocks overwritten in place since the commit: any version written to them is allowed
        for name, v in self.vols.items():
            for vb, t in v.tok.items():
                cands = self.candidates.get(t)
                if cands and len(cands) > 1:
                    lo = vb * BS
                    n = min(BS, v.size - lo)
                    got = self.pool.thin(name).read(lo, n)
                    assert any(got == c[:n] for c in cands), (
                        f"after a crash, {name} block {vb} holds bytes never written to it "
                        f"({len(cands)} candidate versions)")
                    if got != cands[0][:n]:
                        STATS["crash_kept_new_bytes"] += 1
                    v.blocks[vb] = got + cands[0][n:]
        self._mark_committed()
        self._check_open_mode()
        STATS[how] += 1

    def _check_open_mode(self) -> None:
        # dm-thin: out-of-data-space is entered by a failed allocation, never at open (even when full)
        assert self.pool.mode == "write"

    def resize(self, extra: int) -> None:
        self.pool.resize((self.nr_blocks + extra) * BS)
        self.nr_blocks += extra
        self._mark_committed()
        assert self.pool.mode == "write"
        STATS["resize"] += 1

    def shrink_refused(self) -> None:
        with pytest.raises(InvalidArgument, match="shrink"):
            self.pool.resize((self.nr_blocks - 1) * BS)

    @precondition(lambda self: self.vols)
    @rule(data=st.data())
    def old_handle(self, data) -> None:
        """A Thin handle taken earlier, used after renames, deletes, re-creations, aborts, crashes.  A
        handle is bound to its volume (device id and generation), not its name: it follows renames,
        and raises NotFound naming the volume while it is deleted (a later volume with its name or
        device id is another volume)."""
        name = data.draw(st.sampled_from(sorted(self.vols)), label="volume")
        if name not in self.handles or data.draw(st.booleans(), label="refresh"):
            self.handles[name] = (self.pool.thin(name), self.vols[name].uid)
        old = data.draw(st.sampled_from(sorted(self.handles)), label="handle")
        h, uid = self.handles[old]
        now = [n for n, v in self.vols.items() if v.uid == uid]
        if h.pool is not self.pool:
            with pytest.raises(InvalidArgument, match="closed"):
                h.read(0, 1)
            del self.handles[old]
        elif not now:
            with pytest.raises(NotFound, match=re.escape(repr(h.name))):
                h.read(0, 1)
        else:
            v = self.vols[now[0]]
            n = min(v.size, 2 * BS)
            assert h.name == now[0]
            assert h.read(0, n) == v.expected(0, n) and h.size == v.size
        STATS["old_handle"] += 1

    @precondition(lambda self: any(n in NAMES for n in self.vols))
    @rule(data=st.data(), new=st.sampled_from(NAMES))
    def rename(self, data, new: str) -> None:
        old = data.draw(st.sampled_from(sorted(n for n in self.vols if n in NAMES)), label="old")
        if new in self.vols:
            with pytest.raises(AlreadyExists, match=new):
                self.pool.rename(old, new)
            return
        self.pool.rename(old, new)
        self.vols[new] = self.vols.pop(old)
        self._mark_committed()
        STATS["rename"] += 1

    @rule(op=st.sampled_from(["reserve", "release"]))
    def metadata_snap(self, op: str) -> None:
        """dm-thin's reserve/release_metadata_snap: the held view's mappings never change."""
        self.commit_events.clear()
        if op == "reserve":
            if self.held is not None:
                with pytest.raises(AlreadyExists):
                    self.pool.reserve_metadata_snap()
                self._mark_committed()  # the kernel commits before it finds the held root
                return
            self.pool.reserve_metadata_snap()
            held = {}
            for t in self.pool.thins():
                vbs, dbs, _ = t.mappings()
                held[t.dev_id] = list(zip(vbs.tolist(), dbs.tolist()))
            self.held = held
        else:
            if self.held is None:
                with pytest.raises(InvalidArgument, match="metadata snapshot"):
                    self.pool.release_metadata_snap()
                return
            self.pool.release_metadata_snap()
            self.held = None
        self._mark_committed()
        STATS[f"metadata_snap_{op}"] += 1

    # ------------------------------------------------------------------ rules: the snapshotter
    def _sn(self):
        return Snapshotter(self.pool, base_size=SNAP_BASE)

    def _after_snapshotter_op(self) -> None:
        if self.commit_events:       # autocommit: records and devices committed together
            self._mark_committed()
        self.commit_events.clear()

    @rule(key=st.sampled_from(SKEYS), parent=st.sampled_from([None, None] + SKEYS), view=st.booleans())
    def snap_prepare(self, key: str, parent: str | None, view: bool) -> None:
        sn, recs = self._sn(), self.snap_model
        create = sn.view if view else sn.prepare
        self.commit_events.clear()
        if key in recs:
            with pytest.raises(AlreadyExists, match=key):
                create(key, parent)
        elif parent and parent not in recs:
            with pytest.raises(NotFound, match=parent):
                create(key, parent)
        elif parent and recs[parent]["kind"] != "committed":
            with pytest.raises(InvalidArgument, match=parent):
                create(key, parent)
        elif len(self.vols) < MAX_VOLUMES:
            mount = create(key, parent)
            vol = mount.source
            assert vol not in self.vols
            if parent:
                p = self.vols[recs[parent]["volume"]]
                self.vols[vol] = Vol(self.next_uid, p.size, view, p.blocks, p.tok)
            else:
                self.vols[vol] = Vol(self.next_uid, SNAP_BASE, view)
            self.next_uid += 1
            recs[key] = {"kind": "view" if view else "active", "parent": parent or "", "volume": vol}
            STATS["snapshotter_prepare"] += 1
        self._after_snapshotter_op()

    @rule(name=st.sampled_from(["c0", "c1", "c0", "k0"]), key=st.sampled_from(["k0", "k1", "k2", "c0"]))
    def snap_commit(self, name: str, key: str) -> None:
        sn, recs = self._sn(), self.snap_model
        self.commit_events.clear()
        if name in recs:
            with pytest.raises(AlreadyExists, match=name):
                sn.commit(name, key)
        elif key not in recs:
            with pytest.raises(NotFound, match=key):
                sn.commit(name, key)
        elif recs[key]["kind"] != "active":
            with pytest.raises(FailedPrecondition, match=key):
                sn.commit(name, key)
        else:
            sn.commit(name, key)
            rec = recs.pop(key)
            recs[name] = dict(rec, kind="committed")
            v = self.vols[rec["volume"]]
            v.ro = True                    # the same device, now read-only (handles to it stay valid)
            STATS["snapshotter_commit"] += 1
        self._after_snapshotter_op()

    @rule(key=st.sampled_from(SKEYS))
    def snap_remove(self, key: str) -> None:
        sn, recs = self._sn(), self.snap_model
        self.commit_events.clear()
        if key not in recs:
            with pytest.raises(NotFound, match=key):
                sn.remove(key)
        elif any(r["parent"] == key for r in recs.values()):
            with pytest.raises(FailedPrecondition, match=key):
                sn.remove(key)
            STATS["snapshotter_remove_refused"] += 1
        else:
            sn.remove(key)
            del self.vols[recs.pop(key)["volume"]]
            STATS["snapshotter_remove"] += 1
        self._after_snapshotter_op()

    # ------------------------------------------------------------------ the invariant
    @invariant()
    def matches_model(self) -> None:
        if self.pool is None:
            return
        pool = self.pool
        assert sorted(t.name for t in pool.thins()) == sorted(self.vols)
        refs = self._refcounts()
        seen_d: dict[int, int] = {}
        live: dict[int, int] = {}
        for name, v in self.vols.items():
            t = pool.thin(name)
            assert t.size == v.size and t.read_only == v.ro, name
            if v.nblocks <= 16:
                assert t.read(0, v.size) == v.content(), f"volume {name} differs from the model"
            else:  # a big sparse volume: every mapped block, and the edges of the tree
                for vb in sorted(set(v.tok) | {b for b in EDGES if b < v.nblocks}):
                    lo = vb * BS
                    n = min(BS, v.size - lo)
                    assert t.read(lo, n) == v.expected(lo, n), f"volume {name} block {vb} differs from the model"
            vbs, dbs, _ = t.mappings()
            assert vbs.tolist() == sorted(v.tok), f"{name}: mapped blocks {vbs.tolist()} != model {sorted(v.tok)}"
            for vb, d in zip(vbs.tolist(), dbs.tolist()):
                tok = v.tok[vb]
                if tok in live:
                    assert live[tok] == d, f"{name} block {vb}: shares with the model's token but maps {d}"
                else:
                    assert d not in seen_d, (f"{name} block {vb}: data block {d} is shared in the pool "
                                             f"but not in the model")
                    live[tok] = d
                    seen_d[d] = tok
                if tok in self.dblock_of:
                    assert self.dblock_of[tok] == d, f"{name} block {vb}: data block moved"
                self.dblock_of[tok] = d
            u = t.usage()
            excl = sum(1 for x in v.tok.values() if refs[x] == 1)
            assert (u.mapped_blocks, u.exclusive_blocks, u.shared_blocks) == (len(v.tok), excl, len(v.tok) - excl)
            assert u.highest_mapped_block == (max(v.tok) if v.tok else None)
            assert t.mapped_blocks == len(v.tok)
        s = pool.status()
        assert s.used_data_blocks == len(refs) + len(self._held_only_blocks()) and len(refs) == len(seen_d)
        assert s.total_data_blocks == self.nr_blocks
        assert s.nr_thins == len(self.vols)
        rep = pool.check()
        assert rep.ok, rep.errors
        assert pool.transaction_id == self.txid
        assert (s.held_root is not None) == (self.held is not None)
        if self.held is not None:
            md = pool.to_metadata(held=True)
            got = {d.dev_id: list(zip(d.vblocks.tolist(), d.dblocks.tolist())) for d in md.devices}
            assert got == self.held, "the held metadata snapshot changed"
        sn = self._sn()
        assert sn.check() == []
        assert {i.name: i.kind for i in sn.walk()} == {k: r["kind"] for k, r in self.snap_model.items()}
        for k, r in self.snap_model.items():
            assert sn.volume_name(k) == r["volume"]
            assert (sn.stat(k).parent or "") == r["parent"]
        STATS["steps_checked"] += 1


@pytest.mark.slow
def test_model_stateful():
    t0 = time.time()
    STATS.clear()
    run_state_machine_as_test(
        PoolMachine,
        settings=settings(max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None,
                          suppress_health_check=list(HealthCheck), print_blob=True))
    elapsed = time.time() - t0
    report = {"examples": STATS["examples"], "max_examples": MAX_EXAMPLES, "steps_per_example": STEPS,
              "seconds": round(elapsed, 1), "soak": SOAK, "counts": dict(sorted(STATS.items()))}
    REPORTS.record("stateful", report)
    print(f"\nstateful model test: {STATS['examples']} examples, {STATS['steps_checked']} checked steps, "
          f"{elapsed:.0f}s: {dict(STATS)}")
    assert STATS["examples"] >= MAX_EXAMPLES


def test_node_store_growth_against_the_model(tmp_path):
    """More than 1024 leaves (the node store's growth step) in one write_many batch, then through
    single writes, then by shadowing them all behind a snapshot; crash and reopen in between.  The
    kernels keep raw addresses of the node arrays, so every growth must be seen by the next call."""
    path = str(tmp_path / "pool")
    n_leaves = 1100
    pool = Pool.create(path, data_size=4 * n_leaves * BS, block_size=BS)
    size = (n_leaves * 2 + 1) * 512 * BS
    a = pool.create_thin("a", size)
    model: dict[int, bytes] = {}
    rng = random.Random(3)

    def put(vb: int, off: int, data: bytes) -> None:
        blk = bytearray(model.get(vb, ZERO))
        blk[off:off + len(data)] = data
        model[vb] = bytes(blk)

    def verify(p: Pool, name: str, m: dict[int, bytes]) -> None:
        t = p.thin(name)
        assert t.mappings()[0].tolist() == sorted(m)
        for vb, blk in m.items():
            assert t.read(vb * BS, BS) == blk, f"{name} block {vb}"
        assert p.check().ok

    offs, bufs = [], []
    for i in range(n_leaves):              # one batch: NEED_NODES mid-batch, grow, resume
        vb, off = i * 512, rng.randrange(BS - 8)
        data = rng.randbytes(8)
        offs.append(vb * BS + off)
        bufs.append(data)
        put(vb, off, data)
    a.write_many(offs, bufs)
    verify(pool, "a", model)
    for i in range(n_leaves):              # single writes into new leaves: the fast path grows too
        vb = (n_leaves + i) * 512 + 7
        data = rng.randbytes(16)
        a.write(vb * BS + 100, data)
        put(vb, 100, data)
    verify(pool, "a", model)
    pool.commit()
    pool.snapshot("a", "s")
    snap_model = dict(model)
    for vb in sorted(model)[::2]:          # copy-on-write behind the snapshot: shadow ~1100 leaves
        data = rng.randbytes(32)
        a.write(vb * BS + 5, data)
        put(vb, 5, data)
    verify(pool, "a", model)
    verify(pool, "s", snap_model)
    pool.close(commit=False)               # crash: back to the snapshot's own commit (a pool message)
    pool = Pool.open(path)
    committed = {vb: blk for vb, blk in snap_model.items()}
    verify(pool, "a", committed)
    verify(pool, "s", committed)
    assert [t.name for t in pool.thins()] == ["a", "s"]
    pool.close()
