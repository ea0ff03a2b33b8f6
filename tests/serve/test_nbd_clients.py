"""Real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-io, fio) against the thinpool NBD server.

The server runs in a background thread on a unix socket and serves a MemoryProvider,
so every result can be checked against the backend's bytes and allocation map.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from typing import Iterator

import pytest
from tests.support import require_tool

from thinpool.nbd.backend import MemoryProvider
from thinpool.nbd.server import NBDServer

pytestmark = pytest.mark.realtools

KiB, MiB = 1024, 1024 * 1024
BS = 64 * KiB


class Env:
    """One provider, one server, and a scratch directory for image files."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.provider = MemoryProvider(block_size=BS)
        self.vol = self.provider.create("vol", 32 * MiB, description="client test volume")
        self.ro = self.provider.create("ro", 4 * MiB, read_only=True)
        self.server = NBDServer(self.provider, unix_path=os.path.join(root, "nbd.sock"))

    def uri(self, name: str = "vol") -> str:
        return self.server.export_uri(name)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)


@pytest.fixture()
def env() -> Iterator[Env]:
    root = tempfile.mkdtemp(prefix="nbdc", dir="/tmp")  # short: unix socket paths are limited to 108 bytes
    e = Env(root)
    e.server.start()
    try:
        yield e
    finally:
        e.server.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def run(*args: str, cwd: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def ok(*args: str, cwd: str | None = None, timeout: float = 60) -> str:
    r = run(*args, cwd=cwd, timeout=timeout)
    assert r.returncode == 0, f"{args[0]} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


# =========================================================================== nbdinfo
def test_nbdinfo_reports_size_flags_and_exports(env: Env) -> None:
    require_tool("nbdinfo")
    assert int(ok("nbdinfo", "--size", env.uri()).strip()) == 32 * MiB
    info = json.loads(ok("nbdinfo", "--json", env.uri()))
    (export,) = info["exports"]
    assert info["structured"] is True and info["protocol"] == "newstyle-fixed"
    assert export["export-size"] == 32 * MiB and export["contexts"] == ["base:allocation"]
    assert export["description"] == "client test volume"
    assert not export["is_read_only"] and export["can_trim"] and export["can_zero"] and export["can_fast_zero"]
    assert export["can_flush"] and export["can_fua"] and export["can_multi_conn"] and export["can_df"]
    assert (export["block_size_minimum"], export["block_size_preferred"], export["block_size_maximum"]) == (
        1, BS, 32 * MiB)
    listing = json.loads(ok("nbdinfo", "--list", "--json", env.server.uri))
    by_name = {e["export-name"]: e for e in listing["exports"]}
    assert set(by_name) == {"vol", "ro"}
    assert by_name["ro"]["is_read_only"] and not by_name["ro"]["can_trim"]
    assert by_name["ro"]["export-size"] == 4 * MiB
    r = run("nbdinfo", env.uri("missing"))
    assert r.returncode != 0 and "missing" in r.stderr


def test_nbdinfo_map_equals_backend_allocation(env: Env) -> None:
    require_tool("nbdinfo")
    rnd = random.Random(7)
    for _ in range(12):
        env.vol.pwrite(rnd.randrange(0, 32 * MiB - 300 * KiB), rnd.randbytes(rnd.randrange(1, 300 * KiB)))
    env.vol.trim(4 * MiB, 2 * MiB)
    expected = [(o, n, f) for o, n, f in env.vol.allocation_map()]
    assert len(expected) > 3
    got = json.loads(ok("nbdinfo", "--map", "--json", env.uri()))
    assert [(e["offset"], e["length"], e["type"]) for e in got] == expected
    assert {e["description"] for e in got} == {"data", "hole,zero"}
    totals = {}
    for line in ok("nbdinfo", "--map", "--totals", env.uri()).splitlines():
        nbytes, _pct, type_, _desc = line.split(maxsplit=3)
        totals[int(type_)] = int(nbytes)
    assert totals == {0: env.vol.allocated_blocks * BS, 3: 32 * MiB - env.vol.allocated_blocks * BS}


def test_nbdinfo_over_tcp() -> None:
    require_tool("nbdinfo")
    provider = MemoryProvider(block_size=BS)
    provider.create("t", 3 * MiB).pwrite(MiB, b"tcp")
    with NBDServer(provider, tcp=(None, 0)) as server:
        assert server.tcp_address is not None
        host, port = server.tcp_address
        assert host == "127.0.0.1" and server.unix_path is None
        assert int(ok("nbdinfo", "--size", f"nbd://{host}:{port}/t").strip()) == 3 * MiB
        got = json.loads(ok("nbdinfo", "--map", "--json", server.export_uri("t")))
        assert [(e["offset"], e["length"], e["type"]) for e in got] == [(0, MiB, 3), (MiB, BS, 0),
                                                                          (MiB + BS, 2 * MiB - BS, 3)]


# =========================================================================== nbdcopy
def _sparse_source(path: str, size: int, seed: int) -> list[tuple[int, int]]:
    """A fully written (not sparse on disk) image that is mostly zeroes; returns its data runs."""
    rnd = random.Random(seed)
    image = bytearray(size)
    runs = []
    for _ in range(6):
        off, n = rnd.randrange(0, size - 200 * KiB), rnd.randrange(1, 200 * KiB)
        image[off : off + n] = rnd.randbytes(n)
        runs.append((off, n))
    with open(path, "wb") as f:
        f.write(image)
    return runs


def test_nbdcopy_in_is_exact_and_sparse(env: Env) -> None:
    require_tool("nbdcopy")
    src = env.path("src.img")
    runs = _sparse_source(src, 32 * MiB, seed=1)
    env.vol.pwrite(0, b"\xaa" * (32 * MiB))  # stale data everywhere: zero runs must really be zeroed
    assert env.vol.allocated_blocks == 512
    before = env.server.total_connections
    ok("nbdcopy", "--connections=4", src, env.uri())
    with open(src, "rb") as f:
        assert env.vol.snapshot_bytes() == f.read()
    touched = {b for off, n in runs for b in range(off // BS, (off + n - 1) // BS + 1)}
    # only blocks that hold data stay allocated: the zero runs were trimmed, not written
    assert env.vol.allocated_blocks <= len(touched) + 2 * len(runs)
    assert env.vol.allocated_blocks < 512 // 8
    assert env.server.total_connections - before >= 2  # CAN_MULTI_CONN: nbdcopy used several connections


def test_nbdcopy_out_is_byte_identical(env: Env) -> None:
    require_tool("nbdcopy")
    rnd = random.Random(3)
    for _ in range(20):
        env.vol.pwrite(rnd.randrange(0, 31 * MiB), rnd.randbytes(rnd.randrange(1, 512 * KiB)))
    out = env.path("out.img")
    ok("nbdcopy", env.uri(), out)
    with open(out, "rb") as f:
        assert f.read() == env.vol.snapshot_bytes()
    # and a round trip through a second volume leaves identical bytes and allocation
    copy = env.provider.create("copy", 32 * MiB)
    ok("nbdcopy", env.uri(), env.uri("copy"))
    assert copy.snapshot_bytes() == env.vol.snapshot_bytes()
    assert copy.allocated_blocks <= env.vol.allocated_blocks


# =========================================================================== qemu-io
def test_qemu_io_patterns(env: Env) -> None:
    require_tool("qemu-io")
    writes = [
        "write -P 0x5a 0 64k",
        "write -P 0xa5 1M 100k",
        "write -P 0x33 3000 5000",  # unaligned, inside the first block
        "write -P 0x11 4M 256k",
        "write -z 4M 64k",  # NO_HOLE zeroes: stays allocated
        "write -P 0x22 8M 256k",
        "write -z -u 8M 128k",  # may unmap: whole blocks become holes
        "write -P 0x44 16M 128k",
        "discard 16M 64k",
    ]
    # -d unmap: without it qemu drops discards and the may-unmap hint before they reach the server
    ok("qemu-io", "-f", "raw", "-d", "unmap", *[a for w in writes for a in ("-c", w)], env.uri())
    reads = [
        "read -P 0x5a 0 3000",
        "read -P 0x33 3000 5000",
        "read -P 0x5a 8000 57536",
        "read -P 0xa5 1M 100k",
        "read -P 0 4M 64k",
        "read -P 0x11 4160k 192k",
        "read -P 0 8M 128k",
        "read -P 0x22 8320k 128k",
        "read -P 0 12M 1M",
        "read -P 0x44 16448k 64k",
    ]
    out = ok("qemu-io", "-f", "raw", "-r", *[a for r in reads for a in ("-c", r)], env.uri())
    assert "verification failed" not in out and out.count("read ") == len(reads)
    vol = env.vol
    assert vol.pread(3000, 5000) == b"\x33" * 5000 and vol.pread(1 * MiB, 100 * KiB) == b"\xa5" * (100 * KiB)
    allocated = {b for off, n, f in vol.allocation_map() if f == 0 for b in range(off // BS, (off + n) // BS)}
    assert 64 in allocated  # 4M: zeroed with NO_HOLE, still provisioned
    assert 128 not in allocated and 129 not in allocated and 130 in allocated  # 8M..8M+128k unmapped
    assert 256 not in allocated and 257 in allocated  # discard of 16M..16M+64k
    # a wrong pattern must be reported
    bad = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x77 0 64k", env.uri())
    assert bad.returncode != 0 and "Pattern verification failed" in bad.stdout


def test_qemu_io_read_only_export(env: Env) -> None:
    require_tool("qemu-io")
    env.ro.view(read_only=False).pwrite(0, b"\x42" * 4096)
    out = ok("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x42 0 4k", "-c", "read -P 0 4k 60k", env.uri("ro"))
    assert "verification failed" not in out
    r = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", env.uri("ro"))
    assert r.returncode != 0 and env.ro.pread(0, 4096) == b"\x42" * 4096


# =========================================================================== fio
def test_fio_randrw_verify(env: Env) -> None:
    require_tool("fio")
    out = ok(
        "fio", "--name=thinpool-nbd", "--ioengine=nbd", f"--uri={env.uri()}", "--rw=randrw", "--bs=4k",
        "--size=16M", "--iodepth=8", "--runtime=3", "--time_based", "--verify=crc32c", "--do_verify=1",
        "--verify_fatal=1", "--verify_state_save=0", "--output-format=json",
        cwd=env.root, timeout=120,
    )
    result = json.loads(out[out.index("{"):])
    (job,) = result["jobs"]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] > 0
    assert job["write"]["total_ios"] >= 100
    assert env.vol.allocated_blocks > 0
    assert env.vol.allocated_blocks <= 16 * MiB // BS  # fio stayed inside --size
