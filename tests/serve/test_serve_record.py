"""``thinpool serve POOL --record FILE``: every NBD request of every export as a fio iolog v3.

The recorded log is checked three ways: against the requests the test's client sent (qemu-io), against
the pool itself (the blocks it maps after the run equal the blocks a replay of the log's writes and
trims maps, computed here), and against fio, which replays the log (``fio --read_iolog``) and reports
the same reads and writes.  A real filesystem workload (mkfs.ext4, files, unmount) is recorded through
nbdfuse + loop as root.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from tests.serve.test_nbd_pool import BS, MiB, Env, env, make_pool, ok, run, stopped_and_checked  # noqa: F401
from tests.support import require_root, require_tool
from thinpool import Pool
from thinpool.nbd.record import iolog_name
from thinpool.simulate.traces import OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, open_trace

pytestmark = pytest.mark.realtools


def records(log: str) -> tuple[dict[str, np.ndarray], list[str]]:
    trace = open_trace(log)
    assert trace.format == "fio-iolog"
    chunks = list(trace.chunks())
    cols = {k: np.concatenate([getattr(c, k) for c in chunks]) for k in ("op", "offset", "length", "volume", "time")}
    return cols, trace.volumes


def mapped_by_replay(rec: dict[str, np.ndarray], vol: int, block_size: int) -> set[int]:
    """The blocks a pool maps after these records (dm-thin's rules): a write maps every block it
    touches, a discard unmaps the blocks it covers entirely; reads and flushes change nothing."""
    mapped: set[int] = set()
    for op, off, n, v in zip(rec["op"].tolist(), rec["offset"].tolist(), rec["length"].tolist(),
                             rec["volume"].tolist()):
        if v != vol or n == 0:
            continue
        if op == OP_WRITE:
            mapped.update(range(off // block_size, (off + n - 1) // block_size + 1))
        elif op == OP_DISCARD:
            mapped.difference_update(range(-(-off // block_size), (off + n) // block_size))
    return mapped


def fio_replay(log: str, workdir: str, sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Replay ``log`` with fio (psync, no stalls) onto sparse files named after the exports in
    ``workdir`` (fio opens the log's relative names from its working directory); {ddir: (ios, bytes)}."""
    for name, size in sizes.items():
        with open(os.path.join(workdir, iolog_name(name)), "wb") as f:
            f.truncate(size)
    out = ok("fio", "--name=replay", f"--read_iolog={log}", "--ioengine=psync", "--replay_no_stall=1",
             "--output-format=json", cwd=workdir)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return {d: (job[d]["total_ios"], job[d]["io_bytes"]) for d in ("read", "write")}


def totals(rec: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    out = {}
    for ddir, op in (("read", OP_READ), ("write", OP_WRITE)):
        sel = rec["op"] == op
        out[ddir] = (int(sel.sum()), int(rec["length"][sel].sum()))
    return out


def test_serve_record_logs_every_request_of_every_export_in_order(env: Env) -> None:
    """qemu-io's writes, reads, discards, write-zeroes (with and without holes) and flushes on two
    exports (one named with a space) are in the log in order; the pool maps exactly the blocks a replay
    of the log maps; fio replays the same reads and writes."""
    require_tool("qemu-io", "fio")
    make_pool(env, {"vol": 64 * MiB, "data 2": 16 * MiB})
    log = env.path("rec.iolog")
    srv = env.serve("--record", log)
    assert f"recording to:   {log}" in srv.output()
    q = ["qemu-io", "-f", "raw", "-t", "writeback", "-d", "unmap"]
    ok(*q, "-c", "write -P 1 0 64k", "-c", "write 1M 4k", "-c", "read 0 4k", "-c", "discard 2M 128k",
       "-c", "write -z -u 4M 64k", "-c", "write -z 5M 4k", "-c", "flush", "-c", "write -P 3 6M 192k",
       srv.uri("vol"))
    ok(*q, "-c", "write -P 2 64k 8k", "-c", "read 64k 8k", srv.uri("data%202"))
    p = stopped_and_checked(srv)
    try:
        rec, volumes = records(log)
        assert volumes == ["vol", "data%202"]          # the log's names: space percent-encoded
        io = rec["op"] != OP_FLUSH
        got = list(zip(rec["volume"][io].tolist(), rec["op"][io].tolist(), rec["offset"][io].tolist(),
                       rec["length"][io].tolist()))
        assert got == [(0, OP_WRITE, 0, 65536), (0, OP_WRITE, 1 * MiB, 4096), (0, OP_READ, 0, 4096),
                       (0, OP_DISCARD, 2 * MiB, 131072), (0, OP_DISCARD, 4 * MiB, 65536),
                       (0, OP_WRITE, 5 * MiB, 4096), (0, OP_WRITE, 6 * MiB, 196608),
                       (1, OP_WRITE, 65536, 8192), (1, OP_READ, 65536, 8192)]
        assert (rec["op"] == OP_FLUSH).sum() >= 1          # the explicit flush (qemu adds one at close)
        assert np.all(np.diff(rec["time"]) >= 0)
        assert f"recorded {len(rec['op'])} request(s)" in srv.out
        for i, name in enumerate(volumes):
            assert mapped_by_replay(rec, i, BS) == set(p.thin(name.replace("%20", " ")).mappings()[0].tolist())
        sizes = {n: p.thin(n).size for n in ("vol", "data 2")}
    finally:
        p.close()
    with open(log) as f:
        text = f.read()
    assert text.startswith("fio version 3 iolog\n") and " data%202 add\n" in text
    assert fio_replay(log, env.root, sizes) == totals(rec)


def test_serve_record_refuses_pool_files_and_leaves_the_pool_alone(env: Env) -> None:
    """--record never writes onto a pool's files (or into its directory): an error naming the file,
    exit status 1, no server left behind."""
    make_pool(env, {"vol": 4 * MiB})
    before = {f: os.stat(os.path.join(env.pool, f)).st_mtime_ns for f in ("metadata", "data")}
    for target in (os.path.join(env.pool, "metadata"), os.path.join(env.pool, "data"),
                   os.path.join(env.pool, "new.iolog"), "-"):
        r = run("python3", "-m", "thinpool", "serve", env.pool, "--record", target, timeout=120)
        assert r.returncode == 1, (target, r.stdout, r.stderr)
        assert "--record" in r.stderr and ("pool" in r.stderr or "needs a file" in r.stderr), r.stderr
        assert not os.path.exists(os.path.join(env.pool, "nbd.sock"))
    assert not os.path.exists(os.path.join(env.pool, "new.iolog"))
    assert {f: os.stat(os.path.join(env.pool, f)).st_mtime_ns for f in ("metadata", "data")} == before


def record_ext4(env: Env, sizes: tuple[int, ...], *, rewrite: int | None = None) -> tuple[str, Pool]:
    """A real filesystem workload recorded by ``serve --record``: a new pool with one 128 MiB volume
    ``fs`` served, and through nbdfuse + loop mkfs.ext4 (with its discard of the device), a mount, files
    ``f0``.. of ``sizes`` random bytes, syncfs, ``f3`` deleted, the first MiB of ``f{rewrite}`` rewritten
    (if given), unmount.  Returns the log's path and the stopped server's pool, checked (close it)."""
    from thinpool.containers.realfs import Attached
    make_pool(env, {"fs": 128 * MiB}, data_size="512MiB")
    log = env.path("fs.iolog")
    srv = env.serve("--record", log)
    with Attached(srv.uri("fs"), env.root, "rec") as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev.device], check=True, capture_output=True, timeout=120)
        mnt = dev.mount(env.path("mnt"))
        for i, size in enumerate(sizes):
            with open(os.path.join(mnt, f"f{i}"), "wb") as f:
                f.write(os.urandom(size))
        dev.syncfs()
        os.unlink(os.path.join(mnt, "f3"))
        if rewrite is not None:
            with open(os.path.join(mnt, f"f{rewrite}"), "r+b") as f:  # rewrite part of a file
                f.write(os.urandom(MiB))
        dev.umount()
    return log, stopped_and_checked(srv)


def test_serve_record_mkfs_ext4_and_files_replayed_by_fio(env: Env) -> None:
    """A real filesystem workload recorded: mkfs.ext4 (with its discard of the device), a mount, a few
    files, unmount -- through nbdfuse + loop.  The pool maps exactly what the log's writes and discards
    map; fio replays the log's reads and writes; the log parses with thinpool's reader."""
    require_root()
    require_tool("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount", "fio")
    log, p = record_ext4(env, (1, 4096, 300_000, 3 * MiB))
    try:
        rec, volumes = records(log)
        assert volumes == ["fs"]
        w = rec["op"] == OP_WRITE
        assert w.sum() > 10 and (rec["op"] == OP_DISCARD).any() and (rec["op"] == OP_FLUSH).any()
        assert int(rec["length"][w].sum()) >= 3 * MiB      # the files' bytes at least
        assert mapped_by_replay(rec, 0, BS) == set(p.thin("fs").mappings()[0].tolist())
        size = p.thin("fs").size
    finally:
        p.close()
    assert fio_replay(log, env.root, {"fs": size}) == totals(rec)


def test_serve_record_killed_server_keeps_every_request_up_to_the_last_flush(env: Env) -> None:
    """SIGKILL after a client's FLUSH: the log on disk holds every request up to that flush (the buffer
    is written out at every FLUSH), it parses, and it maps what the pool's last commit maps."""
    require_tool("qemu-io")
    make_pool(env, {"vol": 64 * MiB})
    log = env.path("killed.iolog")
    srv = env.serve("--record", log)
    q = ["qemu-io", "-f", "raw", "-t", "writeback", "-d", "unmap"]
    ok(*q, *[a for i in range(40) for a in ("-c", f"write -P {i} {i * 192}k 64k")], "-c", "flush",
       "-c", "discard 0 1M", "-c", "flush", srv.uri("vol"))
    srv.proc.kill()
    srv.proc.wait()
    rec, volumes = records(log)
    io = rec["op"] != OP_FLUSH
    assert volumes == ["vol"] and int(io.sum()) == 41
    assert (rec["op"][io] == OP_WRITE).sum() == 40 and rec["op"][io][-1] == OP_DISCARD
    with open(log) as f:
        assert f.read().endswith(" vol sync 0 0\n")       # no close lines: the server never stopped
    from thinpool import Pool
    with Pool.open(env.pool) as p:
        assert mapped_by_replay(rec, 0, BS) == set(p.thin("vol").mappings()[0].tolist())
