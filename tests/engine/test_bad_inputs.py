"""Bad inputs, table-driven, over the library and the CLI.

Every row of the matrix is one bad input: the error class (library) or exit status (CLI: 1 for a
refused operation, 2 for a usage error), text the message must contain to name the culprit (the
bad value, name or path), and the promise that nothing changed:

* the pool's metadata and data files hash the same before and after (byte for byte);
* for library rows, the open pool's in-memory state (volumes, mappings, contents, records,
  accounting) is also unchanged after the error, so a later commit cannot persist a half-applied
  change.

Pools that must not come into existence (restore/import/create of bad input) must not exist
afterwards.  Counts go to ``.reliability/bad_inputs.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
from click.testing import CliRunner

from tests.support import REPO_ROOT, REPORTS
from thinpool import Pool
from thinpool.cli import main
from thinpool.containers.snapshotter import Snapshotter
from thinpool.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, MetadataCorrupt, NotFound,
                             PoolLocked, ReadOnly, ThinpoolError)
from thinpool.units import parse_size

BS = 64 * 1024
VOL = 4 * BS
STATS = REPORTS.counter("bad_inputs", lambda c: {"bad_inputs_tried": sum(c.values()), "counts": dict(c)})


@dataclass
class Case:
    id: str
    action: Callable[..., Any]          # library: action(pool) ; cli: argv list (POOL substituted)
    exc: type | int                     # error class, or CLI exit status
    culprit: tuple[str, ...]            # every string must appear in the message
    read_only: bool = False             # open the pool read-only for this library case


def _hash_pool(path: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if name in ("lock",) or os.path.isdir(p):
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


def _state(pool: Pool) -> Any:
    vols = []
    for t in pool.thins():
        vbs, dbs, times = t.mappings()
        vols.append((t.name, t.dev_id, t.size, t.read_only, t.mapped_blocks, vbs.tolist(), dbs.tolist(),
                     times.tolist(), hashlib.sha256(t.read(0, t.size)).hexdigest()))
    s = pool.status()
    return (vols, json.dumps(pool.catalog["records"], sort_keys=True), pool.transaction_id, pool.time,
            s.used_data_blocks, s.total_data_blocks, s.held_root, pool.mode)


@pytest.fixture(scope="module")
def pool_path(module_scratch):
    path = os.path.join(module_scratch, "pool")
    pool = Pool.create(path, data_size=200 * BS, block_size=BS)
    base = pool.create_thin("base", VOL)
    base.write(0, os.urandom(VOL - 1000))
    pool.snapshot("base", "snap")
    pool.thin("base").write(10, b"changed after the snapshot")
    pool.create_thin("ro", 2 * BS, read_only=True)
    pool.create_thin("solo", 2 * BS).write(0, b"s" * (2 * BS))     # exclusive blocks: writes go in place
    pool.create_thin("wide", 9 << 20).write(0, b"w" * (9 << 20))    # wider than the CLI's 8 MiB chunk
    sn = Snapshotter(pool, base_size=2 * BS)
    sn.prepare("a0")
    sn.commit("c1", "a0")
    sn.prepare("a1", "c1")
    pool.close()
    return path


def _run_lib(path: str, case: Case) -> None:
    STATS["library_inputs"] += 1
    before = _hash_pool(path)
    pool = Pool.open(path, read_only=case.read_only)
    try:
        pre = _state(pool)
        with pytest.raises(case.exc) as ei:
            case.action(pool)
        msg = str(ei.value)
        for c in case.culprit:
            assert c in msg, f"{case.id}: message does not name {c!r}: {msg}"
        assert _state(pool) == pre, f"{case.id}: the failed call changed the pool in memory"
    finally:
        pool.close(commit=False)
    assert _hash_pool(path) == before, f"{case.id}: the pool's files changed"


# ---------------------------------------------------------------------------------------------- the library matrix
def _lib_cases() -> list[Case]:
    L = []

    def add(id_, fn, exc, *culprit, ro=False):
        L.append(Case(id_, fn, exc, tuple(culprit), ro))

    t = lambda p, n="base": p.thin(n)  # noqa: E731
    # offsets, lengths, sizes
    add("write negative offset", lambda p: t(p).write(-1, b"x"), InvalidArgument, "base", "-1")
    add("write offset 2**62", lambda p: t(p).write(1 << 62, b"x"), InvalidArgument, "base", str(1 << 62))
    add("write offset 2**70", lambda p: t(p).write(1 << 70, b"x"), InvalidArgument, "base", str(1 << 70))
    add("write float offset", lambda p: t(p).write(1.5, b"x"), InvalidArgument, "base", "1.5")
    add("write bool offset", lambda p: t(p).write(True, b"x"), InvalidArgument, "base", "True")
    add("write past end", lambda p: t(p).write(VOL - 10, b"x" * 20), InvalidArgument, "base", "past the end")
    add("write at end", lambda p: t(p).write(VOL, b"x"), InvalidArgument, "base", str(VOL))
    add("write past end (in-place volume)", lambda p: t(p, "solo").write(0, b"y" * (2 * BS + 1)),
        InvalidArgument, "solo", "past the end")
    add("write str data", lambda p: t(p).write(0, "text"), InvalidArgument, "base")
    add("write_many mismatched", lambda p: t(p).write_many([0, 1], [b"a"]), InvalidArgument, "base", "2 offsets")
    add("write_many one past end", lambda p: t(p, "solo").write_many([0, 2 * BS], [b"a", b"b"]),
        InvalidArgument, "solo", str(2 * BS))
    add("write_many negative", lambda p: t(p).write_many([5, -7], [b"a", b"b"]), InvalidArgument, "base", "-7")
    add("read negative offset", lambda p: t(p).read(-5, 1), InvalidArgument, "base", "-5")
    add("read negative length", lambda p: t(p).read(0, -1), InvalidArgument, "base", "-1")
    add("read past end", lambda p: t(p).read(VOL - 1, 2), InvalidArgument, "base", "past the end")
    add("read huge length", lambda p: t(p).read(0, 1 << 40), InvalidArgument, "base", str(1 << 40))
    add("read length 2**70", lambda p: t(p).read(0, 1 << 70), InvalidArgument, "base", str(1 << 70))
    add("read_many huge length", lambda p: t(p).read_many([0, 1], 1 << 40), InvalidArgument, "base", str(1 << 40))
    add("read_many float offsets", lambda p: t(p).read_many([0.5], 1), InvalidArgument, "offsets")
    add("read_into negative", lambda p: t(p).read_into(-3, np.zeros(4, np.uint8)), InvalidArgument, "base", "-3")
    add("discard negative", lambda p: t(p).discard(-1, 10), InvalidArgument, "base", "-1")
    add("discard past end", lambda p: t(p).discard(0, VOL + 1), InvalidArgument, "base", "past the end")
    add("discard length 2**70", lambda p: t(p).discard(0, 1 << 70), InvalidArgument, "base", str(1 << 70))
    # names and ids
    add("create duplicate name", lambda p: p.create_thin("base", BS), AlreadyExists, "'base'")
    add("create empty name", lambda p: p.create_thin("", BS), InvalidArgument, "''")
    add("create control char name", lambda p: p.create_thin("a\nb", BS), InvalidArgument, "'a\\nb'")
    add("create name too long", lambda p: p.create_thin("x" * 1025, BS), InvalidArgument, "1-1024")
    add("create name not a string", lambda p: p.create_thin(7, BS), InvalidArgument, "7")
    add("create size 0", lambda p: p.create_thin("n", 0), InvalidArgument, "0 bytes")
    add("create size negative", lambda p: p.create_thin("n", -512), InvalidArgument, "-512")
    add("create size not sectors", lambda p: p.create_thin("n", 1000), InvalidArgument, "1000")
    add("create size huge", lambda p: p.create_thin("n", 1 << 70), InvalidArgument, str(1 << 70))
    add("create size float", lambda p: p.create_thin("n", 1.5), InvalidArgument, "float")
    add("create size malformed", lambda p: p.create_thin("n", "10X"), InvalidArgument, "10X")
    add("create size fraction", lambda p: p.create_thin("n", "0.1K"), InvalidArgument, "0.1K")
    add("create dev id 2**24", lambda p: p.create_thin("n", BS, dev_id=1 << 24), InvalidArgument, "16777216")
    add("create dev id -1", lambda p: p.create_thin("n", BS, dev_id=-1), InvalidArgument, "-1")
    add("create dev id bool", lambda p: p.create_thin("n", BS, dev_id=True), InvalidArgument, "True")
    add("create dev id in use", lambda p: p.create_thin("n", BS, dev_id=p.thin("base").dev_id), AlreadyExists,
        "'base'")
    add("snapshot missing origin", lambda p: p.snapshot("nope", "n"), NotFound, "'nope'")
    add("snapshot onto existing", lambda p: p.snapshot("base", "snap"), AlreadyExists, "'snap'")
    add("snapshot dev id 2**24", lambda p: p.snapshot("base", "n", dev_id=1 << 24), InvalidArgument, "16777216")
    add("snapshot dev id in use", lambda p: p.snapshot("base", "n", dev_id=p.thin("snap").dev_id), AlreadyExists,
        "'snap'")
    add("delete missing", lambda p: p.delete("nope"), NotFound, "'nope'")
    add("delete None", lambda p: p.delete(None), NotFound, "None")
    add("rename missing", lambda p: p.rename("nope", "x"), NotFound, "'nope'")
    add("rename onto existing", lambda p: p.rename("base", "snap"), AlreadyExists, "'snap'")
    add("thin missing", lambda p: p.thin("nope"), NotFound, "'nope'")
    add("by_dev_id missing", lambda p: p.by_dev_id(999), NotFound, "999")
    add("usage missing", lambda p: p.usage("nope"), NotFound, "'nope'")
    add("records not JSON", lambda p: p.put_records("ns", {"x": object()}), InvalidArgument, "ns")
    # pool-level
    add("resize shrink", lambda p: p.resize(BS), InvalidArgument, "shrink")
    add("resize malformed", lambda p: p.resize("abc"), InvalidArgument, "'abc'")
    add("resize negative", lambda p: p.resize(-1), InvalidArgument, "-1")
    add("resize huge", lambda p: p.resize(1 << 80), InvalidArgument, str(1 << 80))
    add("transaction id mismatch", lambda p: p.set_transaction_id(5, 6), InvalidArgument, "5")
    add("transaction id negative", lambda p: p.set_transaction_id(p.transaction_id, -1), InvalidArgument, "-1")
    add("transaction id 2**64", lambda p: p.set_transaction_id(p.transaction_id, 1 << 64), InvalidArgument,
        str(1 << 64))
    add("release unheld metadata snap", lambda p: p.release_metadata_snap(), InvalidArgument, "metadata snapshot")
    # read-only volume and read-only pool
    add("write read-only volume", lambda p: t(p, "ro").write(0, b"x"), ReadOnly, "'ro'")
    add("discard read-only volume", lambda p: t(p, "ro").discard(0, BS), ReadOnly, "'ro'")
    add("ro pool: write", lambda p: t(p).write(0, b"x"), ReadOnly, "read-only", ro=True)
    add("ro pool: create", lambda p: p.create_thin("n", BS), ReadOnly, "read-only", ro=True)
    add("ro pool: snapshot", lambda p: p.snapshot("base", "n"), ReadOnly, "read-only", ro=True)
    add("ro pool: delete", lambda p: p.delete("snap"), ReadOnly, "read-only", ro=True)
    add("ro pool: discard", lambda p: t(p).discard(0, VOL), ReadOnly, "read-only", ro=True)
    add("ro pool: resize", lambda p: p.resize(64 * BS), ReadOnly, "read-only", ro=True)
    add("ro pool: rename", lambda p: p.rename("base", "x"), ReadOnly, "read-only", ro=True)
    add("ro pool: set transaction id", lambda p: p.set_transaction_id(p.transaction_id, 9), ReadOnly,
        "read-only", ro=True)
    S = lambda p: Snapshotter(p, base_size=2 * BS)  # noqa: E731
    add("snapshotter: remove parent of a child", lambda p: S(p).remove("c1"), FailedPrecondition, "'c1'", "'a1'")
    add("snapshotter: prepare missing parent", lambda p: S(p).prepare("k", "nope"), NotFound, "'nope'")
    add("snapshotter: prepare active parent", lambda p: S(p).prepare("k", "a1"), InvalidArgument, "'a1'")
    add("snapshotter: prepare existing key", lambda p: S(p).prepare("a1"), AlreadyExists, "'a1'")
    add("snapshotter: commit to existing name", lambda p: S(p).commit("c1", "a1"), AlreadyExists, "'c1'")
    add("snapshotter: commit a committed", lambda p: S(p).commit("n", "c1"), FailedPrecondition, "'c1'")
    add("snapshotter: commit missing key", lambda p: S(p).commit("n", "nope"), NotFound, "'nope'")
    add("snapshotter: remove missing", lambda p: S(p).remove("nope"), NotFound, "'nope'")
    add("snapshotter: empty key", lambda p: S(p).prepare(""), InvalidArgument, "''")
    add("snapshotter: bad label", lambda p: S(p).prepare("k", labels={"": "v"}), InvalidArgument, "label")
    add("snapshotter: bad namespace", lambda p: Snapshotter(p, namespace="a/b"), InvalidArgument, "'a/b'")
    add("snapshotter: mounts of committed", lambda p: S(p).mounts("c1"), FailedPrecondition, "'c1'")
    add("snapshotter: ro pool prepare", lambda p: S(p).prepare("k"), ReadOnly, "read-only", ro=True)
    return L


#: Rows that fail today because of open engine bugs (notes/requests.txt, "[reliability]" R2..R8).
#: xfail(strict=True): each turns into a failure the moment it is fixed, so the mark is removed then.
KNOWN: dict[str, str] = {}


def _params(cases, prefix=""):
    return [pytest.param(c, id=c.id, marks=pytest.mark.xfail(strict=True, reason=KNOWN[prefix + c.id]))
            if prefix + c.id in KNOWN else pytest.param(c, id=c.id) for c in cases]


LIB_CASES = _lib_cases()


@pytest.mark.parametrize("case", _params(LIB_CASES))
def test_library(pool_path, case):
    _run_lib(pool_path, case)


SIZE_STRINGS = ["", " ", "abc", "-5", "1e3", "10X", "1.5", "0x10", "1,000", "K", "5KiBB", "nan", "inf", "0.1K",
                "1..5K", "5 K B", "\u0663", "1.00000000000000001K"]


@pytest.mark.parametrize("text", [
    pytest.param(t, id=f"size {t!r}", marks=[pytest.mark.xfail(strict=True, reason=KNOWN[f"size {t!r}"])]
                 if f"size {t!r}" in KNOWN else []) for t in SIZE_STRINGS])
def test_malformed_size_strings(text):
    STATS["size_strings"] += 1
    with pytest.raises(InvalidArgument) as ei:
        parse_size(text, "volume size")
    assert "volume size" in str(ei.value) and repr(text) in str(ei.value), str(ei.value)


def test_pool_creation_inputs(tmp_path):
    """Invalid create arguments create nothing; an existing pool is not touched."""
    existing = str(tmp_path / "existing")
    Pool.create(existing, data_size=4 * BS, block_size=BS).close()
    before = _hash_pool(existing)
    rows = [
        (dict(block_size="4K"), InvalidArgument, "4096"),
        (dict(block_size="100K"), InvalidArgument, "102400"),
        (dict(block_size="2G"), InvalidArgument, "2147483648"),
        (dict(block_size=0), InvalidArgument, "0"),
        (dict(block_size="abc"), InvalidArgument, "'abc'"),
        (dict(data_size="1K"), InvalidArgument, "1024"),
        (dict(data_size=-5), InvalidArgument, "-5"),
        (dict(data_size="12Q"), InvalidArgument, "12Q"),
        (dict(metadata_size="4K"), InvalidArgument, "4K"),
        (dict(metadata_size="20T"), InvalidArgument, "metadata size"),
        (dict(low_water_mark=-1), InvalidArgument, "-1"),
    ]
    for i, (kw, exc, culprit) in enumerate(rows):
        target = str(tmp_path / f"new{i}")
        kw.setdefault("data_size", 4 * BS)
        with pytest.raises(exc) as ei:
            Pool.create(target, **kw)
        assert culprit in str(ei.value), (kw, str(ei.value))
        assert not os.path.exists(target), f"{kw}: a failed create left {target}"
        STATS["library_inputs"] += 1
    with pytest.raises(AlreadyExists, match="existing"):
        Pool.create(existing, data_size=4 * BS, block_size=BS)
    assert _hash_pool(existing) == before
    STATS["library_inputs"] += 1


def test_not_a_pool(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "metadata").write_bytes(os.urandom(3 * 4096))
    before = (tmp_path / "fake" / "metadata").read_bytes()
    rows = [(str(tmp_path / "dir"), InvalidArgument, "not a thin pool"),
            (str(tmp_path / "missing"), NotFound, "missing"),
            (str(tmp_path / "fake"), MetadataCorrupt, "superblock")]
    for path, exc, culprit in rows:
        with pytest.raises(exc) as ei:
            Pool.open(path)
        assert culprit in str(ei.value), str(ei.value)
        res = CliRunner().invoke(main, ["status", path])
        assert res.exit_code == 1 and culprit in res.output, (path, res.output)
        STATS["library_inputs"] += 1
        STATS["cli_inputs"] += 1
    assert (tmp_path / "fake" / "metadata").read_bytes() == before
    assert os.listdir(tmp_path / "dir") == []


def test_open_a_file(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="not a directory|not a thin pool"):
        Pool.open(str(tmp_path / "file"))


def test_locked_pool(pool_path):
    """A second process holds the pool: open (rw or ro) and every CLI verb refuse, naming the pid."""
    before = _hash_pool(pool_path)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from thinpool import Pool; p = Pool.open(sys.argv[1]);"
                               " print('ready', flush=True); sys.stdin.read()", pool_path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for ro in (False, True):
            with pytest.raises(PoolLocked) as ei:
                Pool.open(pool_path, read_only=ro)
            assert str(holder.pid) in str(ei.value) and pool_path in str(ei.value)
            STATS["library_inputs"] += 1
        for argv in (["status", pool_path], ["create-thin", pool_path, "n", "64K"], ["check", pool_path],
                     ["repair", pool_path]):
            res = CliRunner().invoke(main, argv)
            assert res.exit_code == 1 and "locked" in res.output and str(holder.pid) in res.output, res.output
            STATS["cli_inputs"] += 1
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert _hash_pool(pool_path) == before


# ---------------------------------------------------------------------------------------------- the CLI matrix
def _cli_cases() -> list[Case]:
    big, huge = "BIG", "HUGE"
    C = []

    def add(id_, argv, code, *culprit):
        C.append(Case(id_, argv, code, tuple(culprit)))

    add("create-thin malformed size", ["create-thin", "POOL", "n", "10X"], 2, "10X")
    add("create-thin size 0", ["create-thin", "POOL", "n", "0"], 1, "0 bytes")
    add("create-thin not sectors", ["create-thin", "POOL", "n", "1000"], 1, "1000")
    add("create-thin duplicate", ["create-thin", "POOL", "base", "64K"], 1, "'base'")
    add("create-thin dev id 2**24", ["create-thin", "POOL", "n", "64K", "--dev-id", "16777216"], 2, "16777216")
    add("create-thin dev id in use", ["create-thin", "POOL", "n", "64K", "--dev-id", "1"], 1, "device id 1")
    add("create-thin bad name", ["create-thin", "POOL", "a\tb", "64K"], 1, "a\\tb")
    add("snapshot missing origin", ["snapshot", "POOL", "nope", "n"], 1, "'nope'")
    add("snapshot onto existing", ["snapshot", "POOL", "base", "snap"], 1, "'snap'")
    add("delete missing", ["delete", "POOL", "nope"], 1, "'nope'")
    add("delete all-or-none", ["delete", "POOL", "snap", "nope"], 1, "'nope'")
    add("rename onto existing", ["rename", "POOL", "base", "snap"], 1, "'snap'")
    add("read past end", ["read", "POOL", "base", "--offset", str(VOL - 1), "--length", "2"], 1, "base")
    add("read offset beyond", ["read", "POOL", "base", "--offset", "1T"], 1, "base")
    add("read negative offset", ["read", "POOL", "base", "--offset", "-1"], 2, "-1")
    add("read missing volume", ["read", "POOL", "nope"], 1, "'nope'")
    add("write offset beyond", ["write", "POOL", "base", big, "--offset", "1G"], 1, "base")
    add("write more than fits (in place)", ["write", "POOL", "solo", big], 1, "solo")
    add("write more than fits (two chunks, in place)", ["write", "POOL", "wide", huge], 1, "wide")
    add("write read-only volume", ["write", "POOL", "ro", big, "--length", "10"], 1, "'ro'")
    add("write missing input", ["write", "POOL", "base", "MISSING"], 1, "no-such-file")
    add("discard past end", ["discard", "POOL", "base", "--offset", "64K", "--length", str(VOL)], 1, "base")
    add("discard malformed", ["discard", "POOL", "base", "--length", "lots"], 2, "lots")
    add("resize shrink", ["resize", "POOL", "64K"], 1, "shrink")
    add("resize malformed", ["resize", "POOL", "big"], 2, "big")
    add("set-transaction-id mismatch", ["set-transaction-id", "POOL", "77", "78"], 1, "77")
    add("release unheld", ["release-metadata-snap", "POOL"], 1, "metadata snapshot")
    add("usage missing", ["usage", "POOL", "nope"], 1, "'nope'")
    add("ls bad field", ["ls", "POOL", "-o", "NOT_A_FIELD"], 1, "NOT_A_FIELD")
    add("delta missing volume", ["delta", "POOL", "base", "nope"], 1, "nope")
    add("remove parent of a child", ["remove-snapshot", "POOL", "c1"], 1, "'c1'")
    add("prepare missing parent", ["prepare", "POOL", "k", "--parent", "nope"], 1, "'nope'")
    add("prepare active parent", ["prepare", "POOL", "k", "--parent", "a1"], 1, "'a1'")
    add("commit committed", ["commit-snapshot", "POOL", "n", "c1"], 1, "'c1'")
    add("commit onto existing", ["commit-snapshot", "POOL", "c1", "a1"], 1, "'c1'")
    add("stat missing", ["stat-snapshot", "POOL", "nope"], 1, "'nope'")
    add("bad label", ["prepare", "POOL", "k", "--label", "novalue"], 2, "novalue")
    add("bad namespace", ["prepare", "POOL", "k", "--namespace", "a/b"], 1, "'a/b'")
    return C


@pytest.fixture(scope="module")
def input_files(module_scratch):
    d = os.path.join(module_scratch, "inputs")
    os.mkdir(d)
    files = {"BIG": os.path.join(d, "big.bin"), "HUGE": os.path.join(d, "huge.bin"),
             "MISSING": os.path.join(d, "no-such-file")}
    with open(files["BIG"], "wb") as f:
        f.write(b"B" * (2 * BS + 1))
    with open(files["HUGE"], "wb") as f:
        f.write(b"H" * ((9 << 20) + 1))
    return files


CLI_CASES = _cli_cases()


@pytest.mark.parametrize("case", _params(CLI_CASES, "cli "))
def test_cli(pool_path, input_files, case):
    argv = [pool_path if a == "POOL" else input_files.get(a, a) for a in case.action]
    before = _hash_pool(pool_path)
    res = CliRunner().invoke(main, argv)
    STATS["cli_inputs"] += 1
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        f"uncaught {type(res.exception).__name__}: {res.exception}"
    assert res.exit_code == case.exc, res.output
    for c in case.culprit:
        assert c in res.output, f"message lacks {c!r}: {res.output}"
    assert _hash_pool(pool_path) == before, f"the pool's files changed: {res.output}"


# ---------------------------------------------------------------------------------------------- restore / import
def _bad_xml(valid: str) -> list[tuple[str, str, str]]:
    """(id, text, culprit) of malformed thin_dump XML, derived from a valid dump."""
    lines = valid.splitlines()
    sb = lines[0]
    rows = [
        ("not XML", "this is not xml", "line"),
        ("unclosed superblock", sb, "line"),
        ("truncated", valid[: len(valid) // 2], "line"),
        ("unknown tag", valid.replace("</superblock>", "<bogus/></superblock>"), "bogus"),
        ("data_block_size 100", valid.replace('data_block_size="128"', 'data_block_size="100"'), "data_block_size"),
        ("dev id 2**24", valid.replace('dev_id="1"', 'dev_id="16777216"', 1), "16777216"),
        ("negative attribute", valid.replace('dev_id="1"', 'dev_id="-1"', 1), "-1"),
        ("mapping beyond data device", valid.replace('nr_data_blocks="200"', 'nr_data_blocks="1"'), "beyond end"),
        ("duplicate device", valid.replace("</superblock>", "\n".join(
            ln for ln in lines if ln.strip().startswith('<device dev_id="1"') or False) +
            '<device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0"></device>'
            "</superblock>"), "1"),
        ("text content", valid.replace("</superblock>", "hello</superblock>"), "line"),
    ]
    return rows


def test_restore_and_import_bad_metadata(pool_path, tmp_path):
    from thinpool.interop.xml import dump_xml, load_xml
    with Pool.open(pool_path, read_only=True) as pool:
        valid = dump_xml(pool.to_metadata())
    assert 'nr_data_blocks="200"' in valid and 'data_block_size="128"' in valid
    load_xml(valid)  # sanity: the template is valid
    runner = CliRunner()
    failures = []
    for id_, text, culprit in _bad_xml(valid):
        with pytest.raises(InvalidArgument) as ei:
            load_xml(io.StringIO(text))
        if culprit not in str(ei.value):
            failures.append(f"load_xml {id_}: message lacks {culprit!r}: {ei.value}")
        src = tmp_path / "bad.xml"
        src.write_text(text)
        target = str(tmp_path / "restored")
        res = runner.invoke(main, ["restore", target, "-i", str(src)])
        if res.exit_code != 1 or culprit not in res.output:
            failures.append(f"restore {id_}: exit {res.exit_code}: {res.output.strip()[:200]}")
        if os.path.exists(target):
            failures.append(f"restore {id_}: left {target} behind")
            shutil.rmtree(target)
        STATS["metadata_inputs"] += 2
    # restoring onto an existing pool
    before = _hash_pool(pool_path)
    src = tmp_path / "good.xml"
    src.write_text(valid)
    res = runner.invoke(main, ["restore", pool_path, "-i", str(src)])
    if res.exit_code != 1 or pool_path not in res.output:
        failures.append(f"restore onto an existing pool: exit {res.exit_code}: {res.output.strip()[:200]}")
    assert _hash_pool(pool_path) == before
    # binary metadata: garbage, truncated, a thinpool metadata file (not dm-thin's format)
    from thinpool.interop.binary import write_binary_metadata
    from thinpool.interop.binary_read import read_binary_metadata
    with Pool.open(pool_path, read_only=True) as pool:
        md = pool.to_metadata()
    good_bin = str(tmp_path / "good.bin")
    write_binary_metadata(md, good_bin)
    raw = open(good_bin, "rb").read()
    cases = {"garbage": os.urandom(64 * 4096), "empty": b"", "truncated": raw[: 2 * 4096],
             "thinpool format": open(os.path.join(pool_path, "metadata"), "rb").read()[: 256 * 4096]}
    for id_, blob in cases.items():
        f = tmp_path / f"{id_.replace(' ', '_')}.bin"
        f.write_bytes(blob)
        with pytest.raises(ThinpoolError) as ei:
            read_binary_metadata(str(f))
        if not isinstance(ei.value, (MetadataCorrupt, InvalidArgument)):
            failures.append(f"read_binary_metadata {id_}: {type(ei.value).__name__}: {ei.value}")
        elif isinstance(ei.value, MetadataCorrupt) and (ei.value.structure is None or ei.value.block is None):
            failures.append(f"read_binary_metadata {id_}: MetadataCorrupt without structure/block: {ei.value}")
        target = str(tmp_path / "imported")
        res = runner.invoke(main, ["import-metadata", str(f), target])
        if res.exit_code != 1 or "thinpool: error:" not in res.output:
            failures.append(f"import-metadata {id_}: exit {res.exit_code}: {res.output.strip()[:200]}")
        if os.path.exists(target):
            failures.append(f"import-metadata {id_}: left {target} behind")
            shutil.rmtree(target)
        STATS["metadata_inputs"] += 2
    assert not failures, "\n".join(failures)
