"""Corruption and repair.

A pool with a known history (snapshots of snapshots, CoW, deletes, discards, records, a read-only
volume) is damaged on purpose -- random bit flips in written metadata blocks, whole blocks of
garbage, truncations of the metadata file -- and every outcome is predicted exactly from which
metadata blocks the newest and the previous commit use:

* damage only outside the newest commit's blocks -> open gives the newest commit, byte for byte;
* damage in the newest commit's blocks only -> open gives the previous commit (the other superblock);
* damage in blocks both use -> MetadataCorrupt whose ``structure``/``block`` (and message) name the
  damaged structure and block.

The fixture's last transaction frees data blocks (a delete, a discard, copy-on-write of a
snapshot's only reference), so recovering the previous commit is exact only because blocks a
commit frees stay reserved until the next commit (reliability bug R1, fixed; see also
``test_fallback_after_bit_rot_must_not_return_freed_blocks``).  ``thinpool check`` reports MetadataCorrupt with exit status 1; ``thinpool repair`` /
:func:`thinpool.repair.repair` salvages into a pool that passes ``check()`` and whose every
salvaged byte is the committed byte.  Counts go to ``.reliability/corruption.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from tests.support import REPO_ROOT, REPORTS, SOAK, soak_scaled
from thinpool import Pool
from thinpool.errors import MetadataCorrupt
from thinpool.mdstore import BLOCK, MetadataStore
from thinpool.repair import repair

TRIALS = soak_scaled("THINPOOL_CORRUPTION_TRIALS", 240, 3000)
BS = 64 * 1024
STATS = REPORTS.counter("corruption")


def state_of(pool: Pool) -> dict:
    return {t.name: (t.size, t.read_only, t.read(0, t.size)) for t in pool.thins()}


def build(path: str) -> tuple[dict, dict]:
    """The fixture pool: returns (previous commit's state, newest commit's state)."""
    rng = random.Random(11)
    pool = Pool.create(path, data_size=320 * BS, block_size=BS)
    with pool.batch():  # each transaction one batch: its messages commit together, at its end
        # a dense leaf (a metadata page of its own) no later commit changes: a block both commits use
        pool.create_thin("steady", 256 * BS).write(0, rng.randbytes(200 * BS))
        base = pool.create_thin("base", 6 * BS)
        base.write(0, rng.randbytes(6 * BS))
        pool.snapshot("base", "s1", read_only=True)
        base.write(BS + 17, rng.randbytes(3 * BS))
        pool.snapshot("s1", "s2")
        pool.thin("s2").write(4 * BS - 100, rng.randbytes(300))
        pool.create_thin("tmp", 2 * BS).write(0, rng.randbytes(2 * BS))
    with pool.batch():
        pool.delete("tmp")
        pool.thin("base").discard(5 * BS, BS)
        pool.put_records("snapshots/default", {"snapshots": {"k": {"id": 1}}, "next_id": 2})
    # the newest transaction also frees blocks the previous commit maps
    with pool.batch():
        pool.create_thin("new", 2 * BS + 512).write(100, rng.randbytes(BS))
        pool.snapshot("s2", "s3")
        pool.thin("s3").write(0, rng.randbytes(700))
        pool.create_thin("doomed", 2 * BS).write(0, rng.randbytes(2 * BS))
    prev = state_of(pool)
    with pool.batch():
        pool.delete("doomed")
        pool.thin("base").discard(0, BS)
        pool.snapshot("new", "s4")
        pool.delete("new")                                 # s4 keeps the blocks
        pool.thin("s4").write(0, rng.randbytes(2 * BS))    # CoW of s4's now-exclusive blocks frees them
    last = state_of(pool)
    pool.close(commit=False)
    return prev, last


def used_blocks(md_path: str) -> tuple[set[int], set[int], int]:
    """Metadata blocks used by the newest and by the previous commit, and the newest's slot."""
    store = MetadataStore(md_path, read_only=True)
    try:
        sbs = store.superblocks()
        assert len(sbs) == 2
        out = []
        for gen, slot, header in sbs:
            store._load_state(header)
            used = set(store.blocks_in_use()) - {0, 1}
            out.append(used | {slot})
        return out[0], out[1], sbs[0][1]
    finally:
        store.close()


@pytest.fixture(scope="module")
def fixture_pool(module_scratch):
    d = module_scratch
    path = os.path.join(d, "pristine")
    prev, last = build(path)
    newest, previous, _ = used_blocks(os.path.join(path, "metadata"))
    with Pool.open(path, read_only=True) as pool:
        ids = {t.dev_id: t.name for t in pool.thins()}
    return {"dir": d, "path": path, "prev": prev, "last": last, "newest": newest, "previous": previous, "ids": ids}


def _copy(fx: dict, name: str) -> str:
    dst = os.path.join(fx["dir"], name)
    shutil.copytree(fx["path"], dst)
    return dst


def _expect(fx: dict, damaged: set[int]) -> str:
    if not damaged & fx["newest"]:
        return "last"
    if not damaged & fx["previous"]:
        return "prev"
    return "corrupt"


def _outcome(path: str, fx: dict, expected: str, damaged: set[int], what: str) -> str:
    try:
        pool = Pool.open(path)
    except MetadataCorrupt as exc:
        assert expected == "corrupt", f"{what}: expected the {expected} commit, got MetadataCorrupt: {exc}"
        assert exc.structure, f"{what}: MetadataCorrupt without a structure: {exc}"
        assert exc.structure in str(exc) or exc.structure == "file", f"{what}: message lacks the structure: {exc}"
        assert exc.block is not None, f"{what}: MetadataCorrupt without a block: {exc}"
        assert str(exc.block) in str(exc), f"{what}: message lacks the block: {exc}"
        if damaged and exc.structure != "superblock":
            assert exc.block in damaged or exc.block >= min(damaged), f"{what}: names block {exc.block}, damaged {damaged}"
        return "corrupt"
    try:
        got = state_of(pool)
        rep = pool.check()
        assert rep.ok, f"{what}: opened but check fails: {rep.errors}"
        # a fallback past a commit whose superblock verified is never silent: check() warns about it
        # (a bad superblock itself looks exactly like a torn superblock write, a normal crash outcome)
        if expected == "prev" and damaged - {0, 1}:
            assert rep.warnings, f"{what}: fell back to the previous commit without a check() warning"
        if expected == "last":
            assert not rep.warnings, f"{what}: check warnings {rep.warnings}"
    finally:
        pool.close(commit=False)
    want = fx["last"] if expected == "last" else fx["prev"] if expected == "prev" else None
    assert want is not None, f"{what}: expected MetadataCorrupt, but the pool opened"
    assert got == want, f"{what}: opened to wrong contents (expected the {expected} commit)"
    return expected


def _verify_repaired(out: str, fx: dict, report) -> None:
    """Every salvaged byte is a committed byte of the salvaged generation; check() passes."""
    with Pool.open(out) as pool:
        assert pool.check().ok
        got = state_of(pool)
        refs = [fx["last"], fx["prev"]]
        for name, (size, ro, data) in got.items():
            orig = fx["ids"].get(pool.thin(name).dev_id) if report.names_lost else name
            cands = [r[orig] for r in refs if orig in r]
            assert cands, f"repair invented volume {name}"
            vbs = pool.thin(name).mappings()[0].tolist()
            ok = False
            for csize, cro, cdata in cands:
                if csize != size:
                    continue
                if all(data[vb * BS:(vb + 1) * BS] == cdata[vb * BS:(vb + 1) * BS] for vb in vbs):
                    ok = True
            assert ok, f"repaired volume {name} holds bytes that were never committed"
        if report.lossless:
            assert got in (fx["last"], fx["prev"])


def test_intact_pool_opens_and_repairs_losslessly(fixture_pool):
    fx = fixture_pool
    path = _copy(fx, "intact")
    assert _outcome(path, fx, "last", set(), "intact") == "last"
    report = repair(path, os.path.join(fx["dir"], "intact-out"))
    assert report.lossless, report.summary()
    with Pool.open(os.path.join(fx["dir"], "intact-out")) as pool:
        assert state_of(pool) == fx["last"]
        assert pool.get_records("snapshots/default") == {"snapshots": {"k": {"id": 1}}, "next_id": 2}
    report = repair(path)                                  # in place
    assert report.lossless and report.backup and os.path.exists(report.backup)
    with Pool.open(path) as pool:
        assert state_of(pool) == fx["last"] and pool.check().ok


def test_random_bit_flips(fixture_pool):
    fx = fixture_pool
    rng = random.Random(int(os.environ.get("THINPOOL_CORRUPTION_SEED", "1")))
    written = sorted(fx["newest"] | fx["previous"] | {0, 1})
    outcomes: Counter = Counter()
    repaired = 0
    runner = CliRunner()
    from thinpool.cli import main
    for i in range(TRIALS):
        path = _copy(fx, f"flip{i}")
        md = os.path.join(path, "metadata")
        size = os.path.getsize(md)
        how = rng.choice(["bit", "bit", "bit", "garbage_block", "any_bit"])
        if how == "any_bit":
            block = rng.randrange(size // BLOCK)
        else:
            block = rng.choice(written)
        with open(md, "r+b") as f:
            if how == "garbage_block":
                f.seek(block * BLOCK)
                f.write(rng.randbytes(BLOCK))
            else:
                pos = block * BLOCK + rng.randrange(BLOCK)
                f.seek(pos)
                b = f.read(1)[0]
                f.seek(pos)
                f.write(bytes([b ^ (1 << rng.randrange(8))]))
        damaged = {block}
        expected = _expect(fx, damaged)
        got = _outcome(path, fx, expected, damaged, f"trial {i}: {how} in block {block}")
        outcomes[got] += 1
        if got == "corrupt":
            res = runner.invoke(main, ["check", path])
            assert res.exit_code == 1 and "thinpool: error:" in res.output, res.output
            if outcomes["corrupt"] <= 40 or SOAK:
                out = os.path.join(fx["dir"], f"flip{i}-out")
                report = repair(path, out)
                assert not report.lossless, report.summary()
                _verify_repaired(out, fx, report)
                repaired += 1
                shutil.rmtree(out)
        shutil.rmtree(path)
    STATS["bit_flip_trials"] = TRIALS
    STATS["bit_flip_outcomes"] = dict(outcomes)
    STATS["repairs_verified"] += repaired
    assert outcomes["last"] and outcomes["prev"] and outcomes["corrupt"], outcomes


def test_truncations(fixture_pool):
    fx = fixture_pool
    rng = random.Random(3)
    md_size = os.path.getsize(os.path.join(fx["path"], "metadata"))
    top = max(fx["newest"] | fx["previous"]) + 1
    lengths = [0, 1, BLOCK - 1, BLOCK, BLOCK + 7, 2 * BLOCK, md_size - 1, top * BLOCK]
    lengths += [rng.randrange(2 * BLOCK, top * BLOCK + BLOCK) for _ in range(40 if not SOAK else 400)]
    outcomes: Counter = Counter()
    for i, length in enumerate(lengths):
        path = _copy(fx, f"trunc{i}")
        md = os.path.join(path, "metadata")
        os.truncate(md, length)
        keep = length // BLOCK
        damaged = set(range(keep, top + 1))
        expected = _expect(fx, damaged) if keep >= 2 else "corrupt"   # every page lives past block 1
        got = _outcome(path, fx, expected, damaged if keep >= 2 else set(), f"truncated to {length} bytes")
        outcomes[got] += 1
        if got == "corrupt" and keep >= 2:
            out = os.path.join(fx["dir"], f"trunc{i}-out")
            try:
                report = repair(path, out)
            except MetadataCorrupt as exc:   # both commits' directories were cut off: nothing to go on
                assert exc.structure == "directory", exc
                outcomes["unsalvageable"] += 1
            else:
                _verify_repaired(out, fx, report)
                outcomes["repaired"] += 1
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(path)
    STATS["truncation_trials"] = len(lengths)
    STATS["truncation_outcomes"] = dict(outcomes)
    assert outcomes["corrupt"] and outcomes["last"], outcomes


def test_cli_check_and_repair_subprocess(fixture_pool):
    """The real command line: check exits 1 naming the structure and block; repair salvages."""
    fx = fixture_pool
    path = _copy(fx, "cli")
    shared = sorted(fx["newest"] & fx["previous"] - {0, 1})
    assert shared
    block = shared[len(shared) // 2]
    with open(os.path.join(path, "metadata"), "r+b") as f:
        f.seek(block * BLOCK + 10)
        f.write(b"\xff\x00\xff")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    res = subprocess.run([sys.executable, "-m", "thinpool", "check", path], capture_output=True, text=True, env=env)
    assert res.returncode == 1, res
    assert f"block {block}" in res.stderr and res.stderr.startswith("thinpool: error:"), res.stderr
    out = os.path.join(fx["dir"], "cli-out")
    res = subprocess.run([sys.executable, "-m", "thinpool", "repair", path, "-o", out, "--json"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["lossless"] is False and rep["output"] == out
    res = subprocess.run([sys.executable, "-m", "thinpool", "check", out], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res
    res = subprocess.run([sys.executable, "-m", "thinpool", "repair", path], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "damaged metadata kept as" in res.stdout, res
    res = subprocess.run([sys.executable, "-m", "thinpool", "check", path], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res


def test_repair_reports_what_was_lost(fixture_pool):
    """Damage each kind of structure of the newest commit *and* the previous superblock (so no
    fallback exists) and check the report names the loss."""
    fx = fixture_pool
    md0 = os.path.join(fx["path"], "metadata")
    store = MetadataStore(md0, read_only=True)
    header = store.superblocks()[0][2]
    store._load_state(header)
    blocks = {name: sorted(int(x) >> 32 for x in locs if int(x)) for name, locs in store.locs.items()}
    older_slot = store.superblocks()[1][1]
    store.close()
    cases = {"leaf_packs": "nodes_lost", "devs": "devices_dropped", "names": "names_lost",  # leaves: packed records
             "catalog": "records_lost"}  # the name index; the catalog's JSON part (origins, records)
    for structure, field in cases.items():
        path = _copy(fx, f"lost-{structure}")
        md = os.path.join(path, "metadata")
        with open(md, "r+b") as f:
            for b in (blocks[structure][0], older_slot):
                f.seek(b * BLOCK + 123)
                f.write(b"\x5a\xa5")
        with pytest.raises(MetadataCorrupt) as ei:
            Pool.open(path).close()
        assert ei.value.structure and ei.value.block is not None
        out = os.path.join(fx["dir"], f"lost-{structure}-out")
        report = repair(path, out)
        assert getattr(report, field), f"{structure}: {report.summary()}"
        assert not report.lossless
        _verify_repaired(out, fx, report)
        STATS["repair_structures_verified"] += 1


def test_nothing_salvageable(scratch):
    d = scratch
    os.makedirs(os.path.join(d, "p"))
    with open(os.path.join(d, "p", "metadata"), "wb") as f:
        f.write(os.urandom(3 * BLOCK))
    with pytest.raises(MetadataCorrupt, match="superblock") as ei:
        Pool.open(os.path.join(d, "p"))
    assert ei.value.structure == "superblock" and ei.value.block == 0
    with pytest.raises(MetadataCorrupt, match="superblock"):
        repair(os.path.join(d, "p"), os.path.join(d, "out"))


@pytest.mark.parametrize("punch_freed_blocks", [False, True])
def test_fallback_after_bit_rot_must_not_return_freed_blocks(tmp_path, punch_freed_blocks):
    path = str(tmp_path / "p")
    pool = Pool.create(path, data_size=8 * BS, block_size=BS, punch_freed_blocks=punch_freed_blocks)
    pool.create_thin("a", BS).write(0, b"A" * BS)
    pool.commit()                       # commit N-1: "a" holds A
    pool.delete("a")
    pool.commit()                       # commit N: "a" deleted; its block is freed (pending: neither
    pool.trim()                         # punched -- by trim or punch_freed_blocks -- nor reused yet)
    slot = pool.store.generation % 2
    pool.close(commit=False)
    with open(os.path.join(path, "metadata"), "r+b") as f:   # one bit of rot in superblock N
        f.seek(slot * BLOCK + 100)
        b = f.read(1)[0]
        f.seek(slot * BLOCK + 100)
        f.write(bytes([b ^ 1]))
    try:
        pool = Pool.open(path)
    except MetadataCorrupt:
        return                          # refusing is fine
    try:
        if "a" in pool:                 # recovered N-1: then "a" must read what it held, or be flagged
            assert pool.thin("a").read(0, BS) == b"A" * BS or not pool.check().ok or pool.mode != "write", \
                "silently returned zeroes for a committed block"
    finally:
        pool.close(commit=False)

