"""Trace readers (thinpool/simulate/traces.py) on traces written by the real programs.

Every parsed trace is checked against an independent computation: fio's own replay of the same iolog
(``fio --read_iolog`` with the null engine reports how many reads, writes and trims it issued and their
bytes), and plain Python line splitting of the file.  Malformed files of every format are rejected with
the file and line number, or skipped and counted with ``skip_bad``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import numpy as np
import pytest

from thinpool.errors import InvalidArgument, TraceError
from thinpool.simulate import trace_text
from thinpool.simulate.traces import (OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, TraceChunk, open_trace,
                                      sniff_format)
from tests.support import IN_CI, require_root, require_tool

FIO_OPS = {"read": OP_READ, "write": OP_WRITE, "trim": OP_DISCARD, "sync": OP_FLUSH, "datasync": OP_FLUSH}


# ----------------------------------------------------------------------------------------- helpers
def run_fio(*args: str) -> dict:
    """Run fio with JSON output; its parsed report."""
    out = subprocess.run(["fio", "--output-format=json", *args], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    return json.loads(out[out.index("{"):])


def write_iolog(path: str, target: str, *extra: str, engine: str = "psync") -> str:
    """A real fio iolog: a small job on ``target`` recorded with ``--write_iolog``."""
    run_fio("--name=rec", f"--filename={target}", "--size=8M", "--bs=4k", f"--ioengine={engine}",
            f"--write_iolog={path}", *extra)
    return path


def fio_replay_counts(iolog: str) -> dict[str, tuple[int, int]]:
    """What fio itself replays from an iolog (null engine): {ddir: (ios, bytes)}."""
    job = run_fio("--name=replay", f"--read_iolog={iolog}", "--ioengine=null")["jobs"][0]
    return {d: (job[d]["total_ios"], job[d]["io_bytes"]) for d in ("read", "write", "trim")}


def python_split(path: str) -> list[tuple[int | None, str, str, int, int, int]]:
    """The I/O records of an iolog by plain line splitting: (time, file, action, offset, length, line)."""
    out = []
    with open(path) as f:
        lines = f.read().splitlines()
    v3 = lines[0] == "fio version 3 iolog"
    for no, text in enumerate(lines[1:], start=2):
        parts = text.split()
        t = int(parts.pop(0)) if v3 and parts else None
        if len(parts) == 4 and parts[1] in FIO_OPS:
            out.append((t, parts[0], parts[1], int(parts[2]), int(parts[3]), no))
    return out


def concat(chunks: list[TraceChunk]) -> dict[str, np.ndarray]:
    names = ("time", "op", "offset", "length", "volume", "line")
    return {k: np.concatenate([getattr(c, k) for c in chunks]) for k in names}


def assert_matches_python(path: str, *, chunk_records: int = 1 << 20) -> dict[str, np.ndarray]:
    """Parse ``path`` and check every record against :func:`python_split`."""
    trace = open_trace(path, chunk_records=chunk_records)
    chunks = list(trace.chunks())
    assert all(len(c) <= chunk_records for c in chunks)
    got = concat(chunks)
    want = python_split(path)
    assert len(got["op"]) == len(want) == trace.records
    assert got["op"].tolist() == [FIO_OPS[w[2]] for w in want]
    flush = np.array([w[2] in ("sync", "datasync") for w in want])
    assert got["offset"].tolist() == [0 if fl else w[3] for w, fl in zip(want, flush)]
    assert got["length"].tolist() == [0 if fl else w[4] for w, fl in zip(want, flush)]
    assert got["line"].tolist() == [w[5] for w in want]
    names = trace.volumes
    assert [names[v] for v in got["volume"]] == [w[1] for w in want]
    if want and want[0][0] is not None:
        us = np.array([w[0] for w in want])
        assert np.allclose(got["time"], (us - us[0]) * 1e-6)
    return got


# ---------------------------------------------------------------------------------------- fio iolog
def test_fio_iolog_v3_written_by_fio_matches_fios_own_replay(tmp_path):
    """fio --write_iolog (v3, times in microseconds) of a random read/write job: every record, and the
    totals fio itself replays from the same file."""
    require_tool("fio")
    log = write_iolog(str(tmp_path / "rw.iolog"), str(tmp_path / "f.img"), "--rw=randrw", "--io_size=2M")
    with open(log) as f:
        assert f.readline().strip() == "fio version 3 iolog"
    got = assert_matches_python(log, chunk_records=37)
    counts = fio_replay_counts(log)
    for ddir, op in (("read", OP_READ), ("write", OP_WRITE)):
        sel = got["op"] == op
        assert (int(sel.sum()), int(got["length"][sel].sum())) == counts[ddir]
    assert int(got["length"].sum()) == 2 << 20
    assert np.all(np.diff(got["time"]) >= 0) and got["time"][0] == 0.0


def test_fio_iolog_trims_syncs_and_datasyncs_from_fio(tmp_path):
    """Trims (a discard; the null engine, as a regular file cannot be trimmed), fsync and fdatasync
    (flushes, offset and length 0) as fio logs them."""
    require_tool("fio")
    target = str(tmp_path / "f.img")
    trims = write_iolog(str(tmp_path / "trim.iolog"), target, "--rw=randtrim", "--io_size=256k",
                        engine="null")
    got = assert_matches_python(trims)
    assert set(got["op"].tolist()) == {OP_DISCARD} and len(got["op"]) == 64
    # (fio 3.33's own --read_iolog rejects its trim records, "bad ddir: 2", so it is no referee here)
    for opt in ("--fsync=4", "--fdatasync=4"):
        log = write_iolog(str(tmp_path / f"s{opt[2:4]}.iolog"), target, "--rw=randwrite",
                          "--io_size=128k", opt)
        got = assert_matches_python(log)
        flushes = got["op"] == OP_FLUSH
        assert 1 <= flushes.sum() <= 32 // 4 and not got["length"][flushes].any()
        assert (got["op"] == OP_WRITE).sum() == 32


def test_fio_iolog_v2_replayed_by_fio_reads_the_same(tmp_path):
    """Version 2 (no time column; fio 3.33 writes only v3 but still replays v2): the v3 log of a real
    job with its time column removed is read record for record, and fio replays the same totals."""
    require_tool("fio")
    v3 = write_iolog(str(tmp_path / "v3.iolog"), str(tmp_path / "f.img"), "--rw=randrw", "--io_size=1M")
    v2 = str(tmp_path / "v2.iolog")
    with open(v3) as src, open(v2, "w") as dst:
        src.readline()
        dst.write("fio version 2 iolog\n")
        for line in src:
            dst.write(line.split(" ", 1)[1])
    got2 = assert_matches_python(v2, chunk_records=10)
    got3 = assert_matches_python(v3)
    for k in ("op", "offset", "length", "volume", "line"):
        assert np.array_equal(got2[k], got3[k])
    assert not got2["time"].any()
    assert fio_replay_counts(v2) == fio_replay_counts(v3)


def test_fio_iolog_v2_wait_advances_the_clock(tmp_path):
    """v2 ``wait MICROSECONDS`` lines are no records; they advance the time of the records after them."""
    log = tmp_path / "w.iolog"
    log.write_text("fio version 2 iolog\nf add\nf open\nf write 0 4096\nf wait 250000 0\n"
                   "f write 4096 4096\nf wait 1000000 0\nf read 0 512\nf close\n")
    (chunk,) = open_trace(log).chunks()
    assert chunk.time.tolist() == [0.0, 0.25, 1.25]
    assert chunk.line.tolist() == [4, 6, 8]


def test_fio_iolog_several_files_are_volumes_in_order_of_add(tmp_path):
    """A job over two files (fio's ``--filename=a:b``) names both with ``add``: two volumes."""
    require_tool("fio")
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    log = write_iolog(str(tmp_path / "two.iolog"), f"{a}:{b}", "--rw=randwrite", "--io_size=512k",
                      "--file_service_type=random")
    got = assert_matches_python(log, chunk_records=5)
    trace = open_trace(log)
    assert trace.volumes == [a, b]
    assert set(got["volume"].tolist()) == {0, 1}


def test_fio_job_file_through_the_null_engine_gives_an_iolog(tmp_path):
    """The documented one-liner: a job file run with ``--ioengine=null --write_iolog`` writes the
    job's I/O pattern without doing any I/O; its records are the job's I/Os."""
    require_tool("fio")
    job = tmp_path / "job.fio"
    job.write_text("[seqwrite]\nfilename=/nonexistent-dir/disk.img\nsize=64M\nrw=write\nbs=64k\n"
                   "io_size=4M\n")
    log = str(tmp_path / "job.iolog")
    subprocess.run(["fio", "--ioengine=null", f"--write_iolog={log}", str(job)], check=True,
                   capture_output=True, timeout=60)
    assert not os.path.exists("/nonexistent-dir")
    got = assert_matches_python(log)
    assert len(got["op"]) == 64 and set(got["length"].tolist()) == {65536}
    assert got["offset"].tolist() == [i * 65536 for i in range(64)]


def test_fio_iolog_times_are_microseconds(tmp_path):
    """fio's iolog writer prints ``utime_since_now`` (microseconds) and its replay sleeps that long."""
    log = tmp_path / "t.iolog"
    log.write_text("fio version 3 iolog\n10 f add\n20 f open\n1000020 f write 0 4096\n"
                   "2500020 f read 4096 4096\n2500021 f close\n")
    (chunk,) = open_trace(log).chunks()
    assert chunk.time.tolist() == [0.0, 1.5]


# ------------------------------------------------------------------------------------- chunking
def test_chunks_are_the_same_whatever_the_block_and_chunk_sizes(tmp_path, monkeypatch):
    """Streaming: lines cut across read blocks and records split across chunks give the same arrays."""
    rng = np.random.default_rng(7)
    n = 500
    ops = rng.choice(["read", "write", "trim", "sync"], n)
    offs = rng.integers(0, 1 << 40, n)
    log = tmp_path / "r.iolog"
    names = ["/a", "/bb/ccccccccccccccccccc", "/a2"]
    body = "".join(f"{i * 3} {names[i % 3 // 2]} {o} {off} {i + 1}\n" for i, (o, off) in enumerate(zip(ops, offs)))
    log.write_text("fio version 3 iolog\n" + body)
    whole = concat(list(open_trace(log).chunks()))
    for block, chunk in ((64, 1), (100, 7), (4096, 1000)):
        monkeypatch.setattr(trace_text, "BLOCK_BYTES", block)
        got = concat(list(open_trace(log, chunk_records=chunk).chunks()))
        for k in whole:
            assert np.array_equal(got[k], whole[k]), (block, chunk, k)
    assert whole["offset"][ops != "sync"].tolist() == offs[ops != "sync"].tolist()
    assert whole["line"].tolist() == list(range(2, n + 2))


def test_a_long_path_and_a_last_line_without_newline(tmp_path):
    name = "/" + "x" * 300
    log = tmp_path / "l.iolog"
    log.write_text(f"fio version 3 iolog\n5 {name} add\n7 {name} write 123456789012345678 1")
    trace = open_trace(log)
    (chunk,) = trace.chunks()
    assert chunk.offset.tolist() == [123456789012345678] and trace.volumes == [name]


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("line, reason", [
    ("100 f writ 0 4096", "unknown I/O action"),
    ("100 f write 0x10 4096", "unsigned decimal"),
    ("100 f write 0 -1", "unsigned decimal"),
    ("100 f write 0", "expected 5 fields"),
    ("1e3 f write 0 4096", "time stamp"),
    ("100 f remove", "unknown file action"),
    ("100 f write 0 4096 9", "expected 5 fields"),
    ("100 f write 1234567890123456789 1", "unsigned decimal"),
])
def test_malformed_fio_record_names_file_and_line(tmp_path, line, reason):
    log = tmp_path / "bad.iolog"
    log.write_text("fio version 3 iolog\n1 f add\n2 f open\n3 f write 0 4096\n" + line + "\n9 f read 0 1\n")
    with pytest.raises(TraceError, match=reason) as exc:
        list(open_trace(log).chunks())
    assert f"{log}: line 5:" in str(exc.value)
    assert exc.value.line == 5 and exc.value.path == str(log)
    assert isinstance(exc.value, InvalidArgument)
    trace = open_trace(log, skip_bad=True)
    (chunk,) = trace.chunks()
    assert trace.bad_records == 1 and chunk.line.tolist() == [4, 6]


def test_skip_bad_counts_every_malformed_line(tmp_path):
    log = tmp_path / "bad.iolog"
    good = "".join(f"{i} f write {i * 4096} 4096\n" for i in range(10))
    log.write_text("fio version 3 iolog\n" + good + "x\n1 f w 0 1\n\n" + good + "2 f write a b\n")
    trace = open_trace(log, skip_bad=True, chunk_records=3)
    assert sum(len(c) for c in trace.chunks()) == 20
    assert trace.bad_records == 3


def test_not_an_iolog_is_refused_at_open(tmp_path):
    p = tmp_path / "x.iolog"
    p.write_text("fio version 1 iolog\nf write 0 1\n")
    with pytest.raises(TraceError, match="line 1: not a fio iolog"):
        open_trace(p, "fio-iolog")
    with pytest.raises(TraceError, match="cannot tell the trace format"):
        sniff_format(p)
    with pytest.raises(TraceError, match="unknown trace format"):
        open_trace(p, "tar")
    with pytest.raises(TraceError, match="cannot read trace"):
        open_trace(tmp_path / "missing")
    for bad in (0, -1, 1.5, True, 1 << 40):
        with pytest.raises(TraceError, match="chunk_records"):
            open_trace(p, "csv", chunk_records=bad)


# ----------------------------------------------------------------------------------------- blkparse
TRACEFS = "/sys/kernel/tracing"


@contextlib.contextmanager
def loop_device(path: str, size: int = 64 << 20) -> Iterator[str]:
    """A loop device over a fresh sparse file."""
    with open(path, "wb") as f:
        f.truncate(size)
    dev = subprocess.run(["losetup", "--find", "--show", path], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _drained(path: str) -> None:
    """Wait until ``path`` stops growing (the trace reader has written the last events out)."""
    last, still = -1, 0
    for _ in range(100):
        size = os.path.getsize(path)
        still = still + 1 if size == last else 0
        if still >= 3:
            return
        last = size
        time.sleep(0.1)


@contextlib.contextmanager
def _blktrace(dev: str, out_path: str) -> Iterator[bool]:
    """``blktrace -d DEV -o -`` into ``out_path``; yields False (and records nothing) when blktrace
    cannot trace here (on these machines it cannot open debugfs's relay files: "Operation not
    permitted")."""
    mounted = False
    if not os.path.exists("/sys/kernel/debug/block"):
        mounted = subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"],
                                 capture_output=True).returncode == 0
    try:
        with open(out_path, "wb") as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(["blktrace", "-d", dev, "-o", "-"], stdout=out, stderr=err)
            try:
                time.sleep(0.5)
                err.seek(0)
                if proc.poll() is not None or err.read().strip():   # it gave up, or complains and hangs
                    yield False
                    return
                yield True
                _drained(out_path)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)   # blktrace stops, flushes and tears down on SIGINT
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    finally:
        if mounted:
            subprocess.run(["umount", "/sys/kernel/debug"], capture_output=True)


@contextlib.contextmanager
def blk_traced(dev: str, out_path: str) -> Iterator[str]:
    """Record blktrace's binary events of ``dev`` into ``out_path`` while the block runs; yields which
    tool made them.  ``blktrace -d`` first; where it cannot open debugfs's relay files (these machines),
    the kernel's own blk tracer on tracefs, which writes the same binary records.  The tracer settings
    are global, so a lock file serialises users and everything is put back afterwards."""
    with _blktrace(dev, out_path) as ok:
        if ok:
            yield "blktrace"
            return
    if not os.path.exists(os.path.join(TRACEFS, "current_tracer")):
        os.makedirs(TRACEFS, exist_ok=True)
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=False)
    if not os.path.exists(os.path.join(TRACEFS, "current_tracer")):
        msg = "neither blktrace nor tracefs's blk tracer works here"
        if IN_CI:
            pytest.fail(msg + " -- CI=true, so a missing tracer is a failure")
        pytest.skip(msg)
    enable = f"/sys/block/{os.path.basename(dev)}/trace/enable"

    def put(name: str, value: str) -> None:
        with open(name if name.startswith("/") else os.path.join(TRACEFS, name), "w") as f:
            f.write(value)

    with open("/tmp/thinpool-tracefs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(os.path.join(TRACEFS, "current_tracer")) as f:
            old_tracer = f.read().strip()
        with open(os.path.join(TRACEFS, "trace_options")) as f:
            old_options = [o for o in f.read().split() if o in ("bin", "nobin", "context-info", "nocontext-info")]
        put("current_tracer", "blk")
        put("trace_options", "bin")
        put("trace_options", "nocontext-info")
        put(enable, "1")
        with open(out_path, "wb") as out:
            reader = subprocess.Popen(["cat", os.path.join(TRACEFS, "trace_pipe")], stdout=out)
            try:
                time.sleep(0.2)   # the reader is open before the workload starts
                yield "tracefs blk tracer"
                _drained(out_path)
            finally:
                put(enable, "0")
                reader.terminate()
                reader.wait()
                put("current_tracer", old_tracer)
                for option in old_options:
                    put("trace_options", option)


def blkparse_summary(text: str) -> dict[str, tuple[int, int]]:
    """blkparse's own per-CPU totals, summed: {"Reads Queued": (count, KiB), ...}."""
    sums: dict[str, list[int]] = {}
    cpu_blocks = re.split(r"^CPU\d+ \(\d+,\d+\):$", text, flags=re.M)[1:]
    for block in cpu_blocks:
        block = block.split("\nTotal")[0].split("\nThroughput")[0]
        for name, n, kib in re.findall(r"(\w+ \w+):\s+(\d+),\s+(\d+)KiB", block):
            s = sums.setdefault(name, [0, 0])
            s[0] += int(n)
            s[1] += int(kib)
    return {k: (v[0], v[1]) for k, v in sums.items()}


def test_blkparse_of_a_traced_loop_device_matches_blkparses_totals(tmp_path):
    """blktrace records of a loop device (direct writes and reads, a discard, an fsync's flush) through
    ``blkparse -i -``: the Q, D and C records agree with blkparse's own queued/dispatched/completed
    counts and KiB, and every write the test issued is there at its offset."""
    require_root()
    require_tool("blkparse", "losetup", "blkdiscard")
    raw = str(tmp_path / "trace.bin")
    writes = [(0, 65536), (1 << 20, 4096), (5 << 20, 131072), (3 << 20, 8192)]
    with loop_device(str(tmp_path / "disk.img")) as dev:
        with blk_traced(dev, raw) as tool:
            fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 1 << 20)
                for off, n in writes:
                    assert os.pwritev(fd, [memoryview(buf)[:n]], off) == n
                os.fsync(fd)
                assert os.preadv(fd, [memoryview(buf)[:16384]], 1 << 20) == 16384
            finally:
                os.close(fd)
            subprocess.run(["blkdiscard", "-o", str(8 << 20), "-l", str(2 << 20), dev], check=True)
    text = str(tmp_path / "trace.txt")
    with open(raw, "rb") as src, open(text, "wb") as dst:
        subprocess.run(["blkparse", "-i", "-"], stdin=src, stdout=dst, check=True, timeout=60)
    with open(text) as f:
        parsed_text = f.read()
    summary = blkparse_summary(parsed_text)
    assert sniff_format(text) == "blkparse"
    for event, reads, writes_key in (("Q", "Reads Queued", "Writes Queued"),
                                     ("D", "Read Dispatches", "Write Dispatches"),
                                     ("C", "Reads Completed", "Writes Completed")):
        trace = open_trace(text, blkparse_event=event)
        got = concat(list(trace.chunks()))
        op, length = got["op"], got["length"]
        assert trace.volumes == [f"7,{os.minor(os.stat(dev).st_rdev)}"]
        r = op == OP_READ
        w = (op == OP_WRITE) | (op == OP_DISCARD)
        # bytes: blkparse counts a discard as a write
        assert int(length[r].sum()) // 1024 == summary[reads][1], (event, tool)
        assert int(length[w].sum()) // 1024 == summary[writes_key][1], event
        # requests: blkparse also counts a flush (F..., no data) and an empty completion (WS 0 [0]),
        # which is no record here
        flushes = op == OP_FLUSH
        assert flushes.sum() >= 1 and not length[flushes].any()
        empty = len(re.findall(rf"^\s*\d+,\d+\s+\d+\s+\d+\s+\S+\s+\d+\s+{event}\s+[RWD][A-Z]*\s+\d+\s+\[",
                               parsed_text, flags=re.M))
        assert len(op) + empty == summary[reads][0] + summary[writes_key][0], event
        wrote = {(int(o), int(n)) for o, n, k in zip(got["offset"], length, op) if k == OP_WRITE}
        assert set(writes) <= wrote
        d = op == OP_DISCARD
        assert int(length[d].sum()) == 2 << 20 and int(got["offset"][d].min()) == 8 << 20
        assert np.all(np.diff(got["time"]) >= 0) or event == "C"


BLKPARSE_SAMPLE = """\
  7,0    1        0     0.000000000 20447  Q  WS 0 + 128 [fio]
  7,0    1        0     0.000972183 20447  G  WS 0 + 128 [fio]
  7,0    1        0     0.000973585 20447  P   N [fio]
  7,0    1        0     0.000974126 20447  U   N [fio] 1
  7,0    1        0     0.000975298 20447  D  WS 0 + 128 [fio]
  7,0    0        0     0.000163162 21040  Q FWS [jbd2/loop0-8]
  7,0    0        0     0.000553531    14  C  FN 0 [0]
  8,16   0        0     0.500000000 21040  Q FWFS 2048 + 8 [kworker/u4:2 x]
  8,16   0        0     0.750000000 21040  Q  DS 4096 + 2048 [blkdiscard]
  8,16   0        0     1.000000001 21040  Q  RA 64 + 8 [cat]
  7,0    0        0     1.500000000 21040  m   N some message
CPU0 (7,0):
 Reads Queued:           1,       64KiB	 Writes Queued:           2,       64KiB
Total (7,0):
 Reads Queued:           1,       64KiB	 Writes Queued:           2,       64KiB
Throughput (R/W): 0KiB/s / 0KiB/s
"""


def test_blkparse_rwbs_preflush_fua_discard_and_devices(tmp_path):
    """RWBS: a leading F is a preflush (a flush record, before the data of the same request), W/R/D the
    data direction, later letters (F for FUA, S, A) do not matter; devices are volumes; the summary is
    no record."""
    p = tmp_path / "t.txt"
    p.write_text(BLKPARSE_SAMPLE)
    trace = open_trace(p)
    (c,) = trace.chunks()
    assert trace.format == "blkparse" and trace.volumes == ["7,0", "8,16"]
    assert c.op.tolist() == [OP_WRITE, OP_FLUSH, OP_FLUSH, OP_WRITE, OP_DISCARD, OP_READ]
    assert c.offset.tolist() == [0, 0, 0, 2048 * 512, 4096 * 512, 64 * 512]
    assert c.length.tolist() == [65536, 0, 0, 4096, 2048 * 512, 4096]
    assert c.volume.tolist() == [0, 0, 1, 1, 1, 1]
    assert c.line.tolist() == [1, 6, 8, 8, 9, 10]
    assert np.allclose(c.time, [0.0, 0.000163162, 0.5, 0.5, 0.75, 1.000000001])
    (d,) = open_trace(p, blkparse_event="D").chunks()
    assert d.line.tolist() == [5]
    (cc,) = open_trace(p, blkparse_event="C").chunks()
    assert cc.op.tolist() == [OP_FLUSH] and cc.line.tolist() == [7]


@pytest.mark.parametrize("line, reason", [
    ("  7,0    1        0     0.0x0000000 20447  Q  WS 0 + 128 [fio]", "SECONDS.NANOSECONDS"),
    ("  7,0    1        0     0.000000100 20447  Q  XS 0 + 128 [fio]", "RWBS"),
    ("  7,0    1        0     0.000000100 20447  Q  WS 0 + 1x8 [fio]", "SECTOR"),
    ("garbage here", "not a blkparse record"),
])
def test_malformed_blkparse_line_names_file_and_line(tmp_path, line, reason):
    p = tmp_path / "b.txt"
    lines = BLKPARSE_SAMPLE.splitlines()
    lines.insert(2, line)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=reason) as exc:
        list(open_trace(p, "blkparse").chunks())
    assert exc.value.line == 3 and f"{p}: line 3:" in str(exc.value)
    trace = open_trace(p, "blkparse", skip_bad=True)
    assert sum(len(c) for c in trace.chunks()) == 6 and trace.bad_records == 1


# ------------------------------------------------------------------------------------ MSR and CSV
FILETIME_2007 = 128166372003061629     # a Windows filetime (100 ns ticks since 1601) in February 2007


def fio_records(tmp_path) -> dict[str, np.ndarray]:
    """The records of a real fio job (reads, writes and trims), as the fio reader gives them."""
    require_tool("fio")
    log = write_iolog(str(tmp_path / "src.iolog"), str(tmp_path / "f.img"), "--rw=randtrim",
                      "--io_size=64k", "--bs=4k,8k,16k", engine="null")
    log2 = write_iolog(str(tmp_path / "src2.iolog"), str(tmp_path / "f.img"), "--rw=randrw",
                       "--io_size=512k", "--bsrange=512-64k")
    return {k: np.concatenate([assert_matches_python(log2)[k], assert_matches_python(log)[k]])
            for k in ("op", "offset", "length")}


def test_msr_csv_written_from_a_real_fio_trace(tmp_path):
    """An MSR Cambridge file (no header, filetime ticks, Read/Write, two host/disk volumes) written by
    independent code from a real fio job's reads and writes reads back record for record."""
    rec = fio_records(tmp_path)
    keep = rec["op"] != OP_DISCARD
    ops, offs, lens = rec["op"][keep], rec["offset"][keep], rec["length"][keep]
    ticks = FILETIME_2007 + np.arange(len(ops)) * 12345
    hosts = ["hm,0", "src1,12"]
    p = tmp_path / "hm_0.csv"
    with open(p, "w") as f:
        for i, (o, off, n) in enumerate(zip(ops, offs, lens)):
            f.write(f"{ticks[i]},{hosts[i // 7 % 2]},{'Read' if o == OP_READ else 'Write'},{off},{n},{i}\r\n")
    assert sniff_format(p) == "msr"
    trace = open_trace(p, chunk_records=50)
    got = concat(list(trace.chunks()))
    assert got["op"].tolist() == ops.tolist()
    assert got["offset"].tolist() == offs.tolist() and got["length"].tolist() == lens.tolist()
    assert np.allclose(got["time"], (ticks - ticks[0]) * 1e-7)
    assert trace.volumes == ["hm/0", "src1/12"]
    assert got["volume"].tolist() == [i // 7 % 2 for i in range(len(ops))]


ALIBABA = "2,R,126703644672,4096,1577808000000162\n2,W,1292386304,8192,1577808000000385\n" \
          "7,W,0,4096,1577808000001385\n"
TENCENT = "1538323200,3925808,8,0,1063\n1538323200,3925816,16,1,1063\n1538323201,0,8,1,7\n"


def test_plain_csv_alibaba_and_tencent_after_the_documented_header_line(tmp_path):
    """The public cloud block traces become the plain CSV by adding a header line (docs/simulate.md's
    ``sed`` one-liners, run here): Alibaba (device_id,opcode,offset,length,timestamp in microseconds) and
    Tencent CBS (Timestamp in seconds,Offset and Size in sectors,IOType 0/1,VolumeID)."""
    require_tool("sed")
    cases = [
        (ALIBABA, "volume,op,offset,length,time_us",
         [OP_READ, OP_WRITE, OP_WRITE], [126703644672, 1292386304, 0], [4096, 8192, 4096],
         [0.0, 0.000223, 0.001223], ["2", "7"]),
        (TENCENT, "time,offset_sectors,length_sectors,op,volume",
         [OP_READ, OP_WRITE, OP_WRITE], [3925808 * 512, 3925816 * 512, 0], [4096, 8192, 4096],
         [0.0, 0.0, 1.0], ["1063", "7"]),
    ]
    for i, (body, header, ops, offs, lens, times, vols) in enumerate(cases):
        raw = tmp_path / f"raw{i}.csv"
        raw.write_text(body)
        out = tmp_path / f"named{i}.csv"
        with open(out, "w") as f:
            subprocess.run(["sed", f"1i {header}", str(raw)], stdout=f, check=True)
        assert sniff_format(out) == "csv"
        trace = open_trace(out)
        (c,) = trace.chunks()
        assert c.op.tolist() == ops and c.offset.tolist() == offs and c.length.tolist() == lens
        assert np.allclose(c.time, times) and trace.volumes == vols
        assert c.line.tolist() == [2, 3, 4]


def test_plain_csv_from_a_real_fio_trace_columns_in_any_order(tmp_path):
    rec = fio_records(tmp_path)
    names = {OP_READ: "read", OP_WRITE: "W", OP_DISCARD: "Trim", OP_FLUSH: "flush"}
    p = tmp_path / "t.csv"
    with open(p, "w") as f:
        f.write("length,comment,op,offset,time\n")
        for i, (o, off, n) in enumerate(zip(rec["op"], rec["offset"], rec["length"])):
            f.write(f"{n},x{i},{names[int(o)]},{off},{i * 0.001:.6f}\n")
    trace = open_trace(p, chunk_records=9)
    got = concat(list(trace.chunks()))
    for k in ("op", "offset", "length"):
        assert got[k].tolist() == rec[k].tolist()
    assert np.allclose(got["time"], np.arange(len(rec["op"])) * 0.001)
    assert trace.volumes == ["0"] and not got["volume"].any()


@pytest.mark.parametrize("fmt, text, reason", [
    ("msr", "{ok}\n{ok}\n128166372003061629,hm,0,Raed,0,4096,1\n", "Type must be Read or Write"),
    ("msr", "{ok}\n{ok}\n128166372003061629,hm,0,Read,-5,4096,1\n", "unsigned decimal"),
    ("msr", "{ok}\n{ok}\n128166372003061629,hm,0,Read,0,4096\n", "expected 7"),
    ("msr", "{ok}\n{ok}\n12816637200306162x,hm,0,Read,0,4096,1\n", "Timestamp"),
    ("csv", "time,op,offset,length\n1,R,0,1\n1.5.2,W,0,1\n", "time must be"),
    ("csv", "time,op,offset,length\n1,R,0,1\n2,X,0,1\n", "op must be"),
    ("csv", "time,op,offset,length\n1,R,0,1\n2,W,0\n", "expected 4"),
    ("csv", "time,op,offset,length\n1,R,0,1\n2,W,0,1e3\n", "unsigned decimal"),
])
def test_malformed_msr_and_csv_records_name_file_and_line(tmp_path, fmt, text, reason):
    p = tmp_path / "bad.csv"
    p.write_text(text.format(ok="128166372003061629,hm,0,Read,0,4096,1") + "1,R,0,1\n" * (fmt == "csv"))
    with pytest.raises(TraceError, match=reason) as exc:
        list(open_trace(p, fmt).chunks())
    assert exc.value.line == 3 and f"{p}: line 3:" in str(exc.value)
    trace = open_trace(p, fmt, skip_bad=True)
    assert sum(len(c) for c in trace.chunks()) == 2 and trace.bad_records == 1


def test_csv_header_must_name_the_columns(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("time,op,offset,size\n1,R,0,1\n")
    with pytest.raises(TraceError, match=r"line 1: .*missing: length"):
        open_trace(p, "csv")
    p.write_text("time,op,offset,length,time_us\n1,R,0,1,1\n")
    with pytest.raises(TraceError, match="two time columns"):
        open_trace(p, "csv")


def test_interleaved_volumes_are_numbered_in_order_of_first_appearance(tmp_path, monkeypatch):
    """Volumes that change from record to record (the np.unique path of the name interner) get the
    same indices, in order of first appearance, as a plain dictionary gives, across blocks."""
    rng = np.random.default_rng(3)
    names = ["zeta", "a", "vol 7", "a\x01", "0", "zeta2", "Z" * 200]
    picks = rng.choice(len(names), 3000, p=[0.3, 0.3, 0.2, 0.1, 0.05, 0.04, 0.01])
    p = tmp_path / "v.csv"
    p.write_text("time,op,offset,length,volume\n" +
                 "".join(f"{i},W,{i * 512},512,{names[k]}\n" for i, k in enumerate(picks)))
    seen: dict[str, int] = {}
    want = [seen.setdefault(names[k], len(seen)) for k in picks]
    for block in (1 << 20, 4096):
        monkeypatch.setattr(trace_text, "BLOCK_BYTES", block)
        trace = open_trace(p)
        got = concat(list(trace.chunks()))
        assert got["volume"].tolist() == want and trace.volumes == list(seen)


# ------------------------------------------------------------------------------------ edge cases
def test_empty_and_header_only_traces_have_no_records(tmp_path):
    for name, text, fmt in (("a.iolog", "fio version 3 iolog\n", None), ("b.csv", "time,op,offset,length\n", None),
                            ("c.msr", "", "msr"), ("d.txt", "\n\n", "blkparse")):
        p = tmp_path / name
        p.write_text(text)
        trace = open_trace(p, fmt)
        assert list(trace.chunks()) == [] and trace.records == 0 and trace.volumes == ["0"]


def test_crlf_lines_and_trailing_blanks(tmp_path):
    p = tmp_path / "w.iolog"
    p.write_bytes(b"fio version 3 iolog\r\n1 f add\r\n2 f write 0 4096\r\n3 f read 4096 512 \r\n\r\n4 f trim 0 8192\n")
    (c,) = open_trace(p).chunks()
    assert c.op.tolist() == [OP_WRITE, OP_READ, OP_DISCARD] and c.line.tolist() == [3, 4, 6]
    assert c.length.tolist() == [4096, 512, 8192]


def test_a_line_longer_than_a_mebibyte_is_a_trace_error_with_its_line(tmp_path):
    p = tmp_path / "long.csv"
    p.write_bytes(b"time,op,offset,length\n1,W,0,1\n" + b"9" * (3 * trace_text.MAX_LINE) + b"\n1,W,0,1\n")
    with pytest.raises(TraceError, match=r"line 3: longer than"):
        list(open_trace(p).chunks())


def test_binary_junk_is_not_sniffed_and_is_malformed_when_forced(tmp_path):
    p = tmp_path / "junk.bin"
    p.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(TraceError, match="cannot tell the trace format"):
        open_trace(p)
    with pytest.raises(TraceError, match="line 2: malformed blkparse record"):   # line 1: bytes 0-9, blank
        list(open_trace(p, "blkparse").chunks())


def test_streaming_keeps_memory_bounded_by_the_block_not_the_file(tmp_path):
    """Reading a trace 4x longer allocates no more memory at its peak (tracemalloc sees numpy's
    buffers): the reader holds one block of lines and one chunk, never the whole trace."""
    import tracemalloc

    def peak_of(n: int) -> int:
        p = tmp_path / f"t{n}.iolog"
        with open(p, "w") as f:
            f.write("fio version 3 iolog\n")
            f.write("".join(f"{i} /dev/sdz write {i * 4096} 4096\n" for i in range(n)))
        trace = open_trace(p, chunk_records=5000)
        tracemalloc.start()
        try:
            total = 0
            for chunk in trace.chunks():
                total += int(chunk.length.sum())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert total == n * 4096
        return peak

    small, big = peak_of(100_000), peak_of(400_000)
    assert big < small * 1.25 + (1 << 20), (small, big)
    assert big < 400_000 * 37, big          # the whole trace's arrays would take 37 bytes a record


def test_replay_cli_blkparse_event_selects_q_d_or_c(tmp_path):
    """``thinpool replay --blkparse-event``: the queued, issued or completed events are the records."""
    p = tmp_path / "t.txt"
    p.write_text(BLKPARSE_SAMPLE)
    want = {"Q": (6, 1, 2, 1, 2), "D": (1, 0, 1, 0, 0), "C": (1, 0, 0, 0, 1)}
    for event, (ios, reads, writes, discards, flushes) in want.items():
        out = subprocess.run([sys.executable, "-m", "thinpool", "replay", str(p), "--metadata-only",
                              "--data-size", "1G", "--blkparse-event", event, "--json", "-"],
                             capture_output=True, text=True, timeout=300, check=True).stdout
        r = json.loads(out)
        got = (r["ios"], r["reads"], r["writes"], r["discards"], r["flushes"])
        assert got == (ios, reads, writes, discards, flushes), (event, got)


def test_blkparse_only_a_real_summary_header_ends_the_records(tmp_path):
    """A garbage line that merely starts like the summary ("CPU", "Total") is malformed, not the end of
    the records: nothing after it is dropped silently."""
    lines = BLKPARSE_SAMPLE.splitlines()
    for junk in ("Totally broken line", "CPU0 (7,0)", "CPUs are busy: 3"):
        p = tmp_path / "s.txt"
        p.write_text("\n".join(lines[:3] + [junk] + lines[3:]) + "\n")
        with pytest.raises(TraceError, match="line 4: malformed blkparse record"):
            list(open_trace(p, "blkparse").chunks())
        trace = open_trace(p, "blkparse", skip_bad=True)
        assert sum(len(c) for c in trace.chunks()) == 6 and trace.bad_records == 1


def test_gzip_bzip2_and_xz_traces_are_read_as_they_are(tmp_path):
    """Public traces ship compressed (hm_0.csv.gz): gzip, bzip2 and xz files (told by their magic
    bytes, whatever their name) give the same records; a truncated one is a TraceError."""
    import bz2
    import gzip
    import lzma
    require_tool("fio")
    log = write_iolog(str(tmp_path / "rw.iolog"), str(tmp_path / "f.img"), "--rw=randrw", "--io_size=1M")
    raw = open(log, "rb").read()
    want = concat(list(open_trace(log, chunk_records=100).chunks()))
    for name, data in (("a.gz", gzip.compress(raw)), ("b.bz2", bz2.compress(raw)), ("c", lzma.compress(raw))):
        p = tmp_path / name
        p.write_bytes(data)
        assert sniff_format(p) == "fio-iolog"
        trace = open_trace(p, chunk_records=100)
        got = concat(list(trace.chunks()))
        for k in want:
            assert np.array_equal(got[k], want[k]), (name, k)
        assert trace.volumes == [str(tmp_path / "f.img")]
    p = tmp_path / "cut.gz"
    packed = gzip.compress(raw)
    p.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(TraceError, match="cannot read trace"):
        list(open_trace(p, "fio-iolog").chunks())
