"""Freed blocks keep their bytes (dm-thin never discards a block it frees); ``trim`` is thin_trim.

* Deleting a volume, breaking sharing or unmapping by overwrite frees data blocks without touching
  their bytes: the data file still holds them (SEEK_DATA) and ``check`` is clean.
* A reused block reads as zeroes where the write did not cover it (``zero_new_blocks``, the default:
  the kernels write it whole, zeroes around the data) and shows its old bytes with
  ``zero_new_blocks=False`` (dm-thin's ``skip_block_zeroing``).
* ``Pool.trim`` / ``thinpool trim`` hole-punch exactly the free blocks no durable commit maps; a crash
  at any punch loses nothing committed, not even the previous commit an open falls back to.
* ``punch_freed_blocks`` (an opt-in pool setting) punches every freed block once released; a discard
  with passdown punches its blocks whatever the setting.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from tests.support import require_root, require_tool

from thinpool import Pool
from thinpool.cli import main
from thinpool.datadev import DataDevice
from thinpool.errors import ReadOnly
from thinpool.hostio import DataIO
from thinpool.mdpages import BLOCK

BS = 64 * 1024


def held(pool: Pool) -> set[int]:
    """Data blocks the data file holds bytes for (SEEK_DATA / SEEK_HOLE)."""
    return set(int(b) for b in pool.data.allocated_blocks())


def raw_block(pool: Pool, b: int) -> bytes:
    """Data block ``b`` as the data file holds it."""
    fd = os.open(pool.data_path, os.O_RDONLY)
    try:
        return os.pread(fd, BS, b * BS)
    finally:
        os.close(fd)


def data_blocks(pool: Pool, name: str) -> set[int]:
    return set(pool.thin(name).mappings()[1].tolist())


def filled(pool: Pool, name: str, nblocks: int, byte: int) -> set[int]:
    """A volume of ``nblocks`` blocks written whole with ``byte``; returns its data blocks."""
    v = pool.create_thin(name, nblocks * BS)
    v.write(0, bytes([byte]) * (nblocks * BS))
    return data_blocks(pool, name)


def released(pool: Pool) -> None:
    """Two commits: blocks freed before them are allocatable (no durable commit maps them)."""
    pool.commit()
    pool.commit()


# --------------------------------------------------------------------------- the kernel rule: no discard on free

def test_kernel_rule_delete_frees_blocks_but_keeps_their_bytes(tmp_path):
    pool = Pool.create(tmp_path / "p", data_size=16 * BS)
    blocks = filled(pool, "a", 8, 0xA5)
    pool.commit()
    pool.delete("a")
    released(pool)
    assert pool.status().used_data_blocks == 0
    assert blocks <= held(pool)  # never punched: the bytes are still in the data file
    assert all(raw_block(pool, b) == b"\xa5" * BS for b in blocks)
    assert pool.space.stale_count() == 8
    assert pool.check().ok  # free blocks holding bytes are not an error (thin_check does not look)
    pool.close()


def test_kernel_rule_cow_and_overwrite_unmap_keep_freed_bytes(tmp_path):
    """A copy-on-write break of a snapshot that is then deleted frees the old block; nothing punches it."""
    pool = Pool.create(tmp_path / "p", data_size=16 * BS)
    old = filled(pool, "v", 2, 0x11)
    pool.snapshot("v", "s")
    pool.thin("v").write(0, b"\x22" * (2 * BS))  # CoW: v gets new blocks, s keeps the old ones
    pool.delete("s")                               # the old blocks are freed
    released(pool)
    assert old <= held(pool) and all(raw_block(pool, b) == b"\x11" * BS for b in old)
    pool.close()


# --------------------------------------------------------------------------- zeroing of reused blocks

@pytest.mark.parametrize("path", ["per_call", "batch"])
def test_kernel_rule_zero_new_blocks_reused_block_reads_zeroes_where_not_written(tmp_path, path):
    nr = 8
    pool = Pool.create(tmp_path / "p", data_size=nr * BS)
    filled(pool, "old", nr, 0xEE)
    pool.commit()
    pool.delete("old")
    released(pool)
    new = pool.create_thin("new", 2 * nr * BS)
    offs = [b * BS + 100 * b + 7 for b in range(nr - 2)]  # one small write into each of six blocks
    if path == "per_call":
        for o in offs:
            new.write(o, b"xyz")
    else:
        new.write_many(offs, [b"xyz"] * len(offs))
    new.write(nr * BS - BS // 2, b"\x01" * BS)  # across two blocks, partial in both
    assert pool.status().used_data_blocks == nr  # every block reused
    got = np.frombuffer(new.read(0, nr * BS), np.uint8).copy()
    want = np.zeros(nr * BS, np.uint8)
    for o in offs:
        want[o:o + 3] = list(b"xyz")
    want[nr * BS - BS // 2:] = 1
    assert (got == want).all(), "a reused block showed the deleted volume's bytes"
    assert pool.space.stale_count() == 0
    pool.close()


def test_kernel_rule_skip_block_zeroing_reused_block_shows_old_bytes(tmp_path):
    pool = Pool.create(tmp_path / "p", data_size=2 * BS, zero_new_blocks=False)
    filled(pool, "old", 2, 0xEE)
    pool.commit()
    pool.delete("old")
    released(pool)
    new = pool.create_thin("new", 2 * BS)
    new.write(10, b"x")
    new.write_many([BS + 20], [b"y"])
    assert new.read(0, 12) == b"\xee" * 10 + b"x" + b"\xee"
    assert new.read(BS, 2 * 1024) == b"\xee" * 20 + b"y" + b"\xee" * (2 * 1024 - 21)
    pool.close()


def test_kernel_rule_cow_into_a_reused_block_copies_the_origin_not_old_bytes(tmp_path):
    pool = Pool.create(tmp_path / "p", data_size=4 * BS)
    filled(pool, "old", 2, 0xEE)
    pool.commit()
    pool.delete("old")
    released(pool)
    v = pool.create_thin("v", BS)
    v.write(0, b"\x33" * BS)  # a reused block, written whole
    pool.snapshot("v", "s")
    v.write(5, b"z")          # CoW into the other reused block
    assert v.read(0, BS) == b"\x33" * 5 + b"z" + b"\x33" * (BS - 6)
    assert pool.thin("s").read(0, BS) == b"\x33" * BS
    pool.close()


def test_uncommitted_blocks_keep_bytes_after_crash_and_reuse_reads_zeroes(tmp_path):
    """A crash leaves blocks written after the last commit free and holding bytes: open marks them
    stale instead of punching them, and their reuse reads zeroes where not written."""
    path = tmp_path / "p"
    pool = Pool.create(path, data_size=4 * BS)
    pool.create_thin("v", 4 * BS)
    pool.commit()
    pool.thin("v").write(0, b"\xee" * (4 * BS))  # never committed
    pool.close(commit=False)
    pool = Pool.open(path)
    assert pool.scrubbed_blocks == 4 and pool.space.stale_count() == 4
    assert held(pool) == {0, 1, 2, 3}  # not punched
    v = pool.thin("v")
    for b in range(4):
        v.write(b * BS + 1, b"q")
    assert v.read(0, 4 * BS) == (b"\0q" + bytes(BS - 2)) * 4
    pool.close()


def test_abort_marks_the_aborted_blocks_stale(tmp_path):
    pool = Pool.create(tmp_path / "p", data_size=2 * BS)
    pool.create_thin("v", 2 * BS)
    pool.commit()
    pool.thin("v").write(0, b"\xee" * (2 * BS))
    pool.abort()
    v = pool.thin("v")
    v.write(3, b"a")
    v.write_many([BS + 3], [b"b"])
    assert v.read(0, 2 * BS) == bytes(3) + b"a" + bytes(BS - 4) + bytes(3) + b"b" + bytes(BS - 4)
    pool.close()


# --------------------------------------------------------------------------- trim

def test_thin_trim_punches_exactly_the_free_blocks_no_durable_commit_maps(tmp_path):
    pool = Pool.create(tmp_path / "p", data_size=32 * BS)
    keep = filled(pool, "keep", 4, 1)
    gone = filled(pool, "gone", 8, 2)
    last = filled(pool, "last", 4, 3)
    txn = filled(pool, "txn", 4, 4)
    pool.commit()
    pool.delete("gone")
    released(pool)                 # gone's blocks: free, allocatable, still holding bytes
    pool.delete("last")            # a pool message: it commits; last's blocks: freed by the last commit
    with pool.batch():             # (the previous one maps them)
        pool.delete("txn")         # txn's blocks: freed in the open transaction (the last commit maps them)
        assert gone | last | txn | keep <= held(pool)
        r = pool.trim()
        assert (r.punched_blocks, r.free_blocks, r.held_blocks) == (8, 28, 8)
        assert r.punched_bytes == 8 * BS and r.punched_runs == 1
        assert held(pool) == keep | last | txn
    pool.commit()
    pool.commit()
    r = pool.trim()
    assert r.punched_blocks == 8 and r.held_blocks == 0
    assert held(pool) == keep
    st = os.stat(pool.data_path)
    assert st.st_blocks * 512 <= len(keep) * BS + 2 * BLOCK
    assert pool.trim().punched_blocks == 0  # nothing left
    assert pool.thin("keep").read(0, 4 * BS) == b"\x01" * (4 * BS)
    assert pool.check().ok
    pool.close()


def _holes_and_data(path: str) -> set[int]:
    """Blocks of a file that hold data (SEEK_DATA / SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out, pos, end = set(), 0, os.fstat(fd).st_size
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            out.update(range(start // BS, (stop + BS - 1) // BS))
            pos = stop
        return out
    finally:
        os.close(fd)


def test_trim_punches_exactly_what_thin_trim_discards(tmp_path):
    """The real thin_trim, run on our exported metadata and a copy of the data file behind a loop
    device (its discards punch the copy), leaves the same blocks holding data as Pool.trim.  The pool
    ends with a mapped block: thin_trim 0.9.0 also discards the last in-use block before a free tail
    (an off-by-one of the tool, docs/dm-thin.md §8)."""
    require_tool("thin_trim", "losetup")
    require_root()
    path = tmp_path / "p"
    pool = Pool.create(path, data_size=20 * BS)
    for name, n in (("a", 3), ("b", 5), ("c", 2), ("d", 4), ("e", 6)):
        filled(pool, name, n, ord(name))
    pool.commit()
    pool.delete("b")
    pool.delete("d")
    released(pool)               # nothing pending: the metadata's free blocks are all trimmable
    assert len(held(pool)) == 20
    pool.close()
    meta = tmp_path / "meta.bin"
    res = CliRunner().invoke(main, ["export-metadata", str(path), str(meta)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    copy = str(tmp_path / "data.copy")
    shutil.copyfile(path / "data", copy)  # every block the pool's file holds data for, plus holes
    loop = subprocess.run(["losetup", "-f", "--show", copy], capture_output=True, text=True, check=True).stdout.strip()
    try:
        r = subprocess.run(["thin_trim", "--metadata-dev", str(meta), "--data-dev", loop], input="Y\n",
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    with Pool.open(path) as pool:
        assert pool.trim().punched_blocks == 9
        ours = held(pool)
        assert ours == data_blocks(pool, "a") | data_blocks(pool, "c") | data_blocks(pool, "e")
    assert _holes_and_data(copy) == ours


def test_trim_refuses_a_read_only_pool(tmp_path):
    Pool.create(tmp_path / "p", data_size=4 * BS).close()
    with Pool.open(tmp_path / "p", read_only=True) as pool:
        with pytest.raises(ReadOnly):
            pool.trim()


class _Crash(BaseException):
    """Stands for the process dying in the middle of a trim."""


class _PunchThenDie(DataIO):
    def __init__(self, survive: int) -> None:
        self.survive = survive

    def punch_hole(self, fd: int, offset: int, length: int) -> None:
        if self.survive == 0:
            raise _Crash()
        self.survive -= 1
        DataIO.punch_hole(fd, offset, length)


def _fragmented_pool(path) -> tuple[Pool, dict[str, bytes]]:
    """Eight volumes allocated block by block in turn (so free runs are one block long); the even ones
    deleted and released, v1 freed by the last commit, v3 freed in the open transaction.  Returns the
    open pool and the committed contents of the volumes the last or the previous commit maps."""
    pool = Pool.create(path, data_size=32 * BS)
    vols = [pool.create_thin(f"v{i}", 2 * BS) for i in range(8)]
    for blk in range(2):
        for i, v in enumerate(vols):
            v.write(blk * BS, bytes([16 * i + blk + 1]) * BS)
    want = {f"v{i}": vols[i].read(0, 2 * BS) for i in range(8)}
    pool.commit()
    with pool.batch():
        for i in (0, 2, 4, 6):
            pool.delete(f"v{i}")
    released(pool)
    pool.delete("v1")  # a pool message: it commits
    # v3's delete stays in the open transaction: a batch the test never leaves (it crashes the pool)
    pool._open_batch = contextlib.ExitStack()
    pool._open_batch.enter_context(pool.batch())
    pool.delete("v3")
    return pool, {n: want[n] for n in ("v1", "v3", "v5", "v7")}


@pytest.mark.parametrize("survive", range(0, 10))
def test_crash_at_any_point_of_trim_loses_nothing_committed(tmp_path, survive):
    """Kill the trim after ``survive`` hole punches (there are 8: the even volumes' blocks, one run each):
    the last commit (v3, v5, v7) and the previous one (v1, which an open falls back to if the newest
    superblock is damaged) read exactly their committed bytes."""
    path = tmp_path / "p"
    pool, want = _fragmented_pool(path)
    DataDevice.io = _PunchThenDie(survive)
    try:
        if survive < 8:
            with pytest.raises(_Crash):
                pool.trim()
        else:
            assert pool.trim().punched_runs == 8
    finally:
        DataDevice.io = DataIO()
    newest = pool.store.generation % 2
    pool.close(commit=False)
    with Pool.open(path, read_only=True) as p:
        for name in ("v3", "v5", "v7"):
            assert p.thin(name).read(0, 2 * BS) == want[name], name
        assert "v1" not in p and p.check().ok
    with open(path / "metadata", "r+b") as f:  # damage the newest superblock: open falls back
        f.seek(newest * BLOCK + 100)
        b = f.read(1)[0]
        f.seek(newest * BLOCK + 100)
        f.write(bytes([b ^ 1]))
    with Pool.open(path, read_only=True) as p:
        assert p.recovered_from
        for name in ("v1", "v3", "v5", "v7"):
            assert p.thin(name).read(0, 2 * BS) == want[name], name
        assert p.check().ok


def test_cli_trim_commits_then_punches_every_free_block(tmp_path):
    path = str(tmp_path / "p")
    run = CliRunner()

    def ok(*args):
        res = run.invoke(main, list(args), catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    ok("create", path, "--data-size", str(16 * BS))
    with Pool.open(path) as pool:
        filled(pool, "a", 6, 7)
        filled(pool, "b", 2, 8)
    ok("delete", path, "a")
    r = json.loads(ok("trim", path, "--json"))
    assert r["punched_blocks"] == 6 and r["free_blocks"] == 14
    assert "punched 0 free blocks" in ok("trim", path)
    with Pool.open(path) as pool:
        assert held(pool) == data_blocks(pool, "b")


# --------------------------------------------------------------------------- punching on free, passdown

def test_punch_freed_blocks_punches_every_released_block(tmp_path):
    path = tmp_path / "p"
    pool = Pool.create(path, data_size=16 * BS, punch_freed_blocks=True)
    blocks = filled(pool, "a", 8, 0xA5)
    pool.commit()
    pool.delete("a")  # a pool message: it commits
    assert blocks <= held(pool)  # the previous commit still maps them
    pool.commit()
    assert not blocks & held(pool) and pool.space.stale_count() == 0
    pool.close()
    with Pool.open(path) as pool:
        assert pool.header["punch_freed_blocks"] is True


def test_cli_create_punch_freed_blocks_is_stored_in_the_header(tmp_path):
    res = CliRunner().invoke(main, ["create", str(tmp_path / "p"), "--data-size", "1M", "--punch-freed-blocks"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    with Pool.open(tmp_path / "p", read_only=True) as pool:
        assert pool.header["punch_freed_blocks"] is True
    res = CliRunner().invoke(main, ["create", str(tmp_path / "q"), "--data-size", "1M"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    with Pool.open(tmp_path / "q", read_only=True) as pool:
        assert pool.header["punch_freed_blocks"] is False


def test_kernel_rule_discard_passdown_punches_the_freed_blocks(tmp_path):
    pool = Pool.create(tmp_path / "p", data_size=16 * BS)
    v = pool.create_thin("v", 8 * BS)
    v.write(0, b"\x99" * (8 * BS))
    pool.snapshot("v", "s")
    pool.commit()
    shared = data_blocks(pool, "v")
    pool.thin("s").write(0, b"\x98" * (2 * BS))  # s's first two blocks are its own now
    own = data_blocks(pool, "s") - shared
    pool.commit()
    assert v.discard(0, 8 * BS) == 8           # blocks 2..7 stay mapped by s: not freed, not punched
    assert pool.thin("s").discard(0, 2 * BS) == 2
    pool.commit()
    assert own <= held(pool)                    # the previous commit maps them: kept one more commit
    pool.commit()
    freed = (shared - data_blocks(pool, "s")) | own
    assert len(freed) == 4 and not freed & held(pool)
    assert data_blocks(pool, "s") <= held(pool)
    assert pool.thin("s").read(2 * BS, 6 * BS) == b"\x99" * (6 * BS)
    pool.close()


def test_kernel_rule_discard_passdown_punches_before_the_pool_closes(tmp_path):
    """Passdown is not lost when the pool closes between the commit that frees the blocks and the next
    one (a one-shot ``thinpool discard``): the close commits once more and punches them."""
    path = tmp_path / "p"
    with Pool.create(path, data_size=16 * BS) as pool:
        pool.create_thin("v", 8 * BS).write(0, b"\x99" * (4 * BS))
    with Pool.open(path) as pool:
        before = held(pool)
        assert pool.thin("v").discard(0, 4 * BS) == 4
    with Pool.open(path) as pool:
        assert len(before) == 4 and not before & held(pool) and pool.space.stale_count() == 0
    for args in (["create-thin", str(path), "w", str(4 * BS)], ["write", str(path), "w", "-"],
                 ["discard", str(path), "w"]):
        res = CliRunner().invoke(main, args, input=b"\x77" * (2 * BS), catch_exceptions=False)
        assert res.exit_code == 0, res.output
    with Pool.open(path) as pool:
        assert held(pool) == set() and pool.space.stale_count() == 0


def test_kernel_rule_no_discard_passdown_unmaps_but_keeps_the_bytes(tmp_path):
    """``no_discard_passdown``: the discard unmaps and frees, the data device is not told; the freed
    blocks keep their bytes (stale) until trim, and their reuse still reads zeroes where not written.
    Switching passdown back on (a reload) passes the next discards down again."""
    pool = Pool.create(tmp_path / "p", data_size=8 * BS, discard="nopassdown")
    v = pool.create_thin("v", 8 * BS)
    v.write(0, b"\x99" * (8 * BS))
    pool.commit()
    first = set(v.mappings()[1][:4].tolist())
    assert v.discard(0, 4 * BS) == 4
    released(pool)
    assert data_blocks(pool, "v") | first <= held(pool) and pool.space.stale_count() == 4
    w = pool.create_thin("w", 4 * BS)
    w.write(1, b"w")
    assert w.read(0, BS) == b"\0w" + bytes(BS - 2)
    assert data_blocks(pool, "w") <= first
    pool.set_features(discard="passdown")
    assert v.discard(4 * BS, 4 * BS) == 4
    released(pool)
    assert held(pool) == first  # w's block and the three stale ones; the passed-down four are holes
    assert pool.trim().punched_blocks == 3
    assert held(pool) == data_blocks(pool, "w")
    pool.close()


def test_trim_op_through_a_serving_process_keeps_the_clients_data(tmp_path):
    """``thinpool trim`` on a served pool runs in the serving process (the control socket's op table):
    it commits the open transaction -- what clients wrote survives -- and punches the free blocks."""
    from thinpool.cli.registry import op_table
    from thinpool.control.protocol import decode_reply, encode_request
    from thinpool.control.server import handle_request
    pool = Pool.create(tmp_path / "p", data_size=16 * BS)
    gone = filled(pool, "gone", 4, 1)
    pool.commit()
    pool.delete("gone")                             # commits (a pool message): gone's blocks are pending
    assert pool.trim().punched_blocks == 0          # the previous commit still maps them
    v = pool.create_thin("client", 2 * BS)
    v.write(0, b"\x42" * (2 * BS))                   # uncommitted, as an NBD client's writes may be
    r = decode_reply(handle_request(pool, op_table(), encode_request("trim", {})))
    assert r["punched_blocks"] == 4 and not gone & held(pool)
    pool.close(commit=False)                         # a crash right after: the trim's commit kept them
    with Pool.open(tmp_path / "p", read_only=True) as p:
        assert p.thin("client").read(0, 2 * BS) == b"\x42" * (2 * BS)
