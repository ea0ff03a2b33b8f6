"""Trace readers (thinpool/simulate/traces.py) on traces written by the real programs.

Every parsed trace is checked against an independent computation: fio's own replay of the same iolog
(``fio --read_iolog`` with the null engine reports how many reads, writes and trims it issued and their
bytes), and plain Python line splitting of the file.  Malformed files of every format are rejected with
the file and line number, or skipped and counted with ``skip_bad``.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from thinpool.errors import InvalidArgument, TraceError
from thinpool.simulate import trace_text
from thinpool.simulate.traces import (OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, TraceChunk, open_trace,
                                      sniff_format)
from tests.support import require_tool

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
