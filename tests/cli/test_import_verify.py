"""``thinpool import`` from real pipes whose producer fails: an empty stream, a producer killed midway, a
digest that does not match, Ctrl-C during the import.  Each is refused with one ``thinpool: error:`` line
(exit 1) and leaves the pool as it was -- the same volumes, the same data blocks in use and the same
mappings after a reopen, an existing volume's bytes unchanged -- while the same commands with the
right checks (``--allow-empty``, ``--expect-size``, ``--sha256``) import.

The shell builds the pipelines (``sh -c 'false | thinpool import ...'``), so thinpool sees exactly what
it sees in a user's pipeline: the end of the stream, never the producer's exit status.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from thinpool import Pool

BS = 64 * 1024
THINPOOL = f"{shlex.quote(sys.executable)} -m thinpool"


def _sh(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=timeout)


def _error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln != "Killed"]  # (the shell's note on a killed producer)
    assert len(lines) == 1 and lines[0].startswith("thinpool: error: "), r.stderr
    return lines[0]


def _state(path: Path) -> dict[str, Any]:
    """What must not change: volumes, data blocks in use, every volume's mappings and bytes."""
    with Pool.open(path, read_only=True) as p:
        vols = {}
        for t in p.thins():
            vb, db, _ = t.mappings()
            vols[t.name] = (t.size, vb.tolist(), db.tolist(), hashlib.sha256(t.read(0, t.size)).hexdigest())
        return {"used": p.status().used_data_blocks, "vols": vols}


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    path = tmp_path / "pool"
    with Pool.create(path, data_size="64MiB", block_size="64KiB") as p:
        v = p.create_thin("old", "4MiB")
        v.write_many([i * BS for i in range(40)], [bytes([i + 1]) * BS for i in range(40)])
    return path


def test_empty_stream_is_refused_unless_allowed(pool: Path) -> None:
    """``false | thinpool import`` (the producer failed before writing a byte) is refused -- with and
    without --size, into a new or an existing volume -- and nothing changes; --allow-empty imports it."""
    before = _state(pool)
    for name, extra in (("new", ""), ("new", "--size 1M"), ("old", "")):
        line = _error_line(_sh(f"false | {THINPOOL} import {pool} {name} - {extra}"))
        assert "is empty (0 bytes)" in line and "--allow-empty" in line, line
    assert _state(pool) == before
    r = _sh(f"false | {THINPOOL} import {pool} new - --size 1M --allow-empty")
    assert r.returncode == 0, r.stderr
    after = _state(pool)
    assert after["vols"]["new"][:2] == (1 << 20, []) and after["used"] == before["used"]


def test_producer_killed_midway_is_refused_with_expect_size(pool: Path) -> None:
    """A producer killed after 3,000,000 of the 4 MiB it should send (``kill -9`` of the shell that
    feeds the pipe): with --expect-size the short stream is refused, a new volume is not created and
    an existing one keeps its mappings and bytes (its overwritten blocks were written to new blocks,
    dropped with the transaction); the whole stream imports."""
    before = _state(pool)
    producer = "sh -c 'head -c 3000000 /dev/urandom; kill -9 $$'"
    for name in ("new", "old"):
        line = _error_line(_sh(f"{producer} | {THINPOOL} import {pool} {name} - --expect-size 4M"))
        assert "3000000 bytes, not the 4194304 expected" in line and "ended early" in line, line
        assert _state(pool) == before, name
    # too long is refused as well, before the rest of the stream is read
    line = _error_line(_sh(f"head -c 5000000 /dev/urandom | {THINPOOL} import {pool} old - --expect-size 4M"))
    assert "longer than the 4194304 bytes expected" in line, line
    assert _state(pool) == before
    r = _sh(f"head -c 4194304 /dev/urandom | {THINPOOL} import {pool} old - --expect-size 4M")
    assert r.returncode == 0, r.stderr
    after = _state(pool)
    assert set(after["vols"]) == {"old"} and after["vols"]["old"][3] != before["vols"]["old"][3]
    assert len(after["vols"]["old"][1]) == 64 and after["used"] == 64  # the 40 replaced blocks freed


def test_sha256_mismatch_imports_nothing_and_a_match_imports(pool: Path, tmp_path: Path) -> None:
    """--sha256 is checked over every byte (holes of a sparse file as zeroes) before the commit: a
    stream with other bytes is refused naming both digests, the pool unchanged; the right digest
    imports, from a pipe and from a sparse file, and the output says it was verified."""
    img = tmp_path / "img"
    with open(img, "wb") as f:
        f.truncate(3 * BS + 100)
        f.seek(BS + 5)
        f.write(b"payload")
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    before = _state(pool)
    line = _error_line(_sh(f"head -c {3 * BS + 100} /dev/zero | {THINPOOL} import {pool} old - --sha256 {digest}"))
    assert f"not the {digest} expected" in line, line
    assert _state(pool) == before
    r = _sh(f"cat {shlex.quote(str(img))} | {THINPOOL} import {pool} piped - --sha256 {digest.upper()}")
    assert r.returncode == 0 and r.stdout.endswith("sha256 verified\n"), (r.stdout, r.stderr)
    r = _sh(f"{THINPOOL} import {pool} old {shlex.quote(str(img))} --sha256 {digest}")
    assert r.returncode == 0 and "sha256 verified" in r.stdout, r.stderr
    with Pool.open(pool, read_only=True) as p:
        assert p.thin("old").read(0, 3 * BS + 100) == img.read_bytes() == p.thin("piped").read(0, 3 * BS + 100)
        # image blocks 0 and 2 (zero) unmapped, 1 written, 3 (the image's last 100 bytes, zero) rewritten
        # in its block, 4..39 kept
        assert p.thin("old").mapped_blocks == 40 - 2
        assert sorted(t.name for t in p.thins()) == ["old", "piped"]  # no helper snapshot left behind
    r = _sh(f"{THINPOOL} import {pool} x {shlex.quote(str(img))} --sha256 12ab")
    assert r.returncode == 2 and "64 hexadecimal digits" in r.stderr, r.stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_an_import_leaves_the_pool_unchanged(pool: Path, tmp_path: Path) -> None:
    """SIGINT to thinpool while it imports a stream (12 MiB sent, so a whole 8 MiB chunk was written; the
    producer then waits), into an existing volume and into a new one: exit 1, and after a reopen the
    pool is as it was -- the blocks already written are not mapped, the existing volume reads its old
    bytes, the new volume does not exist."""
    with Pool.open(pool) as p:
        p.create_thin("big", "16MiB").write(5 * BS, b"\x09" * (3 * BS))
    before = _state(pool)
    for name, extra in (("big", ""), ("fresh", "--size 16M")):
        flag = tmp_path / f"sent-{name}"
        producer = f"sh -c 'head -c 12582912 /dev/urandom; touch {shlex.quote(str(flag))}; sleep 60'"
        # SIGINT at its default in the shells and in thinpool, whatever this process inherited: run as a
        # background job (``.ci/run &``) it is ignored here, a shell keeps a signal ignored on entry
        # ignored, and so does Python -- then nothing would see the Ctrl-C
        proc = subprocess.Popen(["sh", "-c", f"{producer} | {THINPOOL} import {pool} {name} - {extra}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=_default_sigint)
        try:
            # the producer's writes block until thinpool has read all but a pipe buffer of them
            deadline = time.monotonic() + 120
            while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert flag.exists() and proc.poll() is None, proc.communicate(timeout=5)
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode != 0, (name, out, err)
        assert _state(pool) == before, name
