"""The pool modes, messages and commits as dm-thin has them (drivers/md/dm-thin.c,
dm-thin-metadata.c; docs/dm-thin.md).  Each test names the kernel rule it checks."""

from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest

from tests.support import require_tool
from thinpool import Pool, nodestore
from thinpool.errors import NoSpace, ReadOnly, ReadOnlyIO

BS = 64 * 1024


# --------------------------------------------------------------------------- out of data space
def _full_pool(tmp_path, blocks: int = 4) -> tuple[Pool, object]:
    # error_if_no_space: these rules are about the mode, not the queue (new pools queue by default)
    p = Pool.create(tmp_path / "p", data_size=blocks * BS, error_if_no_space=True)
    v = p.create_thin("v", "1GiB")
    v.write(0, b"a" * (blocks * BS))
    return p, v


def test_kernel_rule_check_for_data_space_after_commit_returns_to_rw_at_once(tmp_path):
    # dm-thin: commit() ends with check_for_data_space(), which leaves out-of-data-space as soon
    # as the free count is non-zero: one commit after freeing blocks gives rw
    p, v = _full_pool(tmp_path)
    with pytest.raises(NoSpace):
        v.write(4 * BS, b"x")
    assert p.status().mode == "out-of-data-space"
    assert p.status().dmsetup_line().split()[4] == "out_of_data_space"
    v.discard(0, 2 * BS)
    assert p.status().mode == "out-of-data-space"  # no commit yet
    p.commit()
    assert p.status().mode == "write" and p.status().dmsetup_line().split()[4] == "rw"
    v.write(4 * BS, b"x")  # the freed blocks serve the allocation
    v.write(5 * BS, b"y")
    assert v.read(4 * BS, 1) == b"x" and v.read(5 * BS, 1) == b"y"
    with pytest.raises(NoSpace):
        v.write(6 * BS, b"z")
    p.close()


def test_kernel_rule_check_for_data_space_after_delete_and_commit(tmp_path):
    p, v = _full_pool(tmp_path)
    w = p.create_thin("w", "1GiB")
    with pytest.raises(NoSpace):
        w.write(0, b"x")
    assert p.mode == "out-of-data-space"
    p.delete("v")
    p.commit()  # the commit finds free blocks
    assert p.mode == "write"
    w.write(0, b"x" * (4 * BS))
    p.close()


def test_kernel_rule_out_of_data_space_is_entered_by_allocation_not_at_open(tmp_path):
    # a pool that is exactly full reopens in rw (dm-thin does not store the mode); the next write
    # that needs a block enters out-of-data-space, a rewrite of a provisioned block does not
    p, v = _full_pool(tmp_path)
    p.close()
    p = Pool.open(tmp_path / "p")
    assert p.status().free_data_blocks == 0
    assert p.mode == "write" and p.status().dmsetup_line().split()[4] == "rw"
    v = p.thin("v")
    v.write(BS, b"rewrite")
    assert p.mode == "write"
    with pytest.raises(NoSpace):
        v.write(10 * BS, b"new")
    assert p.mode == "out-of-data-space"
    p.close()
    from thinpool.devtable import DeviceTable
    with DeviceTable.open(tmp_path / "p") as t:
        assert t.status().mode == "write"


# --------------------------------------------------------------------------- read-only open
def test_kernel_rule_read_only_pool_reports_ro(tmp_path):
    # dm-thin's read_only feature puts the pool in PM_READ_ONLY, which status prints as "ro"
    Pool.create(tmp_path / "p", data_size=16 * BS).close()
    with Pool.open(tmp_path / "p", read_only=True) as p:
        st = p.status()
        assert st.mode == "read-only" and p.mode == "read-only"
        assert st.dmsetup_line().split()[4] == "ro"
    with Pool.open(tmp_path / "p") as p:
        assert p.status().dmsetup_line().split()[4] == "rw"


# --------------------------------------------------------------------------- low water mark
@pytest.mark.parametrize("mark", [1, 3, 5])
def test_kernel_rule_low_water_mark_checked_before_each_allocation(tmp_path, mark):
    # dm-thin's alloc_data_block calls check_low_water_mark(pool, free) with the free count
    # *before* allocating: the event fires at the allocation that finds free <= mark
    n = 8
    p = Pool.create(tmp_path / "p", data_size=n * BS, low_water_mark=mark)
    seen: list[int] = []
    p.on_low_water = lambda pool: seen.append(pool.status().free_data_blocks)
    v = p.create_thin("v", "1GiB")
    fired_at = None
    for i in range(n):
        free_before = p.status().free_data_blocks
        v.write(i * BS, b"x")
        if seen and fired_at is None:
            fired_at = free_before
    assert fired_at == mark and len(seen) == 1
    p.close()


def test_kernel_rule_low_water_mark_multi_block_write(tmp_path):
    # a write allocating several blocks fires when its last allocation saw free <= mark
    p = Pool.create(tmp_path / "p", data_size=8 * BS, low_water_mark=2)
    seen: list[int] = []
    p.on_low_water = lambda pool: seen.append(1)
    v = p.create_thin("v", "1GiB")
    v.write(0, b"x" * (6 * BS))  # free before each: 8 .. 3
    assert seen == []
    v.write(6 * BS, b"x")  # free before: 2
    assert seen == [1]
    p.close()


# --------------------------------------------------------------------------- every message commits
def _dump(pool: Pool, tmp_path, name: str = "md.bin") -> str:
    """thin_dump's XML of the pool's metadata exported as real dm-thin metadata."""
    from thinpool.interop.binary import write_binary_metadata
    require_tool("thin_dump", "thin_check")
    out = str(tmp_path / name)
    write_binary_metadata(pool.to_metadata(), out)
    subprocess.run(["thin_check", out], check=True, capture_output=True)
    return subprocess.run(["thin_dump", out], check=True, capture_output=True, text=True).stdout


MESSAGES = {
    "create_thin": lambda p: p.create_thin("new", "1MiB"),
    "create_snap": lambda p: p.snapshot("base", "snap"),
    "delete": lambda p: p.delete("base"),
    "set_transaction_id": lambda p: p.set_transaction_id(0, 7),
    "rename": lambda p: p.rename("base", "renamed"),
    "set_read_only": lambda p: p.set_read_only("base"),
    "put_records": lambda p: p.put_records("ns", {"k": 1}),
    "reserve_metadata_snap": lambda p: p.reserve_metadata_snap(),
}


@pytest.mark.parametrize("message", sorted(MESSAGES))
def test_kernel_rule_every_pool_message_commits(tmp_path, message):
    # dm-thin's pool_message() ends with commit(): a message that succeeded survives a crash
    path = tmp_path / "p"
    p = Pool.create(path, data_size=64 * BS)
    p.create_thin("base", "1MiB").write(0, b"x")
    p.commit()
    gen = p.store.generation
    MESSAGES[message](p)
    assert p.store.generation == gen + 1 or message == "reserve_metadata_snap"
    want = (sorted(p.catalog["volumes"]), p.transaction_id, p.get_records("ns"),
            [t.read_only for t in p.thins()], p.status().held_root is not None)
    p.close(commit=False)  # a crash right after the message
    p = Pool.open(path)
    assert (sorted(p.catalog["volumes"]), p.transaction_id, p.get_records("ns"),
            [t.read_only for t in p.thins()], p.status().held_root is not None) == want
    p.close()


def test_kernel_rule_messages_commit_visible_to_thin_dump(tmp_path):
    path = tmp_path / "p"
    p = Pool.create(path, data_size=64 * BS)
    p.create_thin("a", "1MiB", dev_id=3).write(0, b"x")
    p.snapshot("a", "s", dev_id=9)
    p.set_transaction_id(0, 42)
    p.close(commit=False)  # nothing but the messages' own commits
    with Pool.open(path, read_only=True) as p:
        xml = _dump(p, tmp_path)
    assert 'transaction="42"' in xml and '<device dev_id="3"' in xml and '<device dev_id="9"' in xml


def test_batch_defers_message_commits_to_one_commit(tmp_path):
    p = Pool.create(tmp_path / "p", data_size=64 * BS)
    p.create_thin("base", "1MiB").write(0, b"x")
    p.commit()
    gen = p.store.generation
    with p.batch():
        for i in range(50):
            p.snapshot("base", f"s{i}")
        with p.batch():  # nested: only the outermost commits
            p.delete("s0")
        assert p.store.generation == gen  # nothing committed yet
    assert p.store.generation == gen + 1 and len(p.thins()) == 50
    p.close()


def test_batch_that_raises_drops_what_it_did(tmp_path):
    # our option (the kernel has no batches): a batch is one transaction, an exception aborts it;
    # what was pending before the batch was committed when it opened
    path = tmp_path / "p"
    p = Pool.create(path, data_size=64 * BS)
    v = p.create_thin("base", "1MiB")
    v.write(0, b"before")  # uncommitted when the batch opens
    with pytest.raises(KeyError):
        with p.batch():
            p.snapshot("base", "s1")
            v.write(BS, b"inside")
            raise KeyError("the batch failed")
    assert "s1" not in p and v.read(0, 6) == b"before" and v.read(BS, 6) == bytes(6)
    p.close(commit=False)
    with Pool.open(path) as p:
        assert [t.name for t in p.thins()] == ["base"] and p.thin("base").read(0, 6) == b"before"


# --------------------------------------------------------------------------- a commit with no change
class _CountingIO:
    def __init__(self) -> None:
        self.writes = self.syncs = 0

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self.writes += 1
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        self.syncs += 1
        os.fdatasync(fd)


@pytest.fixture
def counting_io():
    from thinpool.mdstore import MetadataStore
    saved, io = MetadataStore.io, _CountingIO()
    MetadataStore.io = io
    try:
        yield io
    finally:
        MetadataStore.io = saved


def test_kernel_rule_commit_without_changes_writes_nothing(tmp_path, counting_io, monkeypatch):
    # dm-thin's __commit_transaction returns at once when nothing changed (pmd->in_service); a
    # FLUSH of a thin with no change in this transaction is passed down to the data device only
    path = tmp_path / "p"
    p = Pool.create(path, data_size=64 * BS)
    v = p.create_thin("v", "1MiB")
    v.write(0, b"a" * (2 * BS))
    p.commit()
    data_syncs = []
    real = type(p.data).sync
    monkeypatch.setattr(type(p.data), "sync", lambda self: (data_syncs.append(1), real(self))[1])
    with open(path / "metadata", "rb") as f:
        before = f.read()
    gen, io0 = p.store.generation, (counting_io.writes, counting_io.syncs)
    p.commit()  # nothing at all
    v.write(10, b"rewrite")  # a provisioned, unshared block: no metadata change
    v.write_many([BS + 5, 100], [b"again", b"more"])
    p.commit()
    assert v.read(10, 7) == b"rewrite"
    assert p.store.generation == gen and (counting_io.writes, counting_io.syncs) == io0
    with open(path / "metadata", "rb") as f:
        assert f.read() == before
    assert len(data_syncs) == 2  # the flushes still reach the data file
    v.write(2 * BS, b"new block")  # a mapping: the next commit writes
    p.commit()
    assert p.store.generation == gen + 1 and counting_io.syncs > io0[1]
    p.close()


# --------------------------------------------------------------------------- read-only, out of metadata space
def _needs_check_pool(tmp_path) -> Pool:
    """A pool in read-only mode with needs_check: v maps blocks 0-2 (1 and 2 shared with snapshot s),
    block 0 exclusive; imported from metadata whose superblock has needs_check set."""
    from thinpool.pool_ir import NEEDS_CHECK_FLAG
    src = Pool.create(tmp_path / "src", data_size=64 * BS)
    v = src.create_thin("v", "1MiB")
    v.write(0, b"a" * (3 * BS))
    src.snapshot("v", "s")
    v.write(0, b"b" * BS)  # block 0 is v's own again
    md = src.to_metadata()
    src.close()
    md.superblock.flags |= NEEDS_CHECK_FLAG
    p = Pool.from_metadata(tmp_path / "p", md, names={1: "v", 2: "s"}, data_file=tmp_path / "src" / "data",
                           take_over_data=True)
    return p


def test_kernel_rule_needs_check_survives_import_and_reopen(tmp_path):
    # dm-thin keeps THIN_METADATA_NEEDS_CHECK_FLAG in the superblock: a pool whose metadata has it
    # opens read-only and refuses messages until the check clears it (thin_check --clear-needs-check-flag)
    p = _needs_check_pool(tmp_path)
    assert p.mode == "read-only" and p.status().needs_check
    line = p.status().dmsetup_line().split()
    assert (line[4], line[7]) == ("ro", "needs_check")
    p.close()
    p = Pool.open(tmp_path / "p")
    assert p.mode == "read-only" and p.header["needs_check"]
    with pytest.raises(ReadOnly, match="check --clear-needs-check"):
        p.create_thin("w", "1MiB")
    xml = _dump(p, tmp_path)
    assert 'flags="1"' in xml  # thin_dump sees the flag on the exported metadata
    report = p.clear_needs_check()
    assert report.ok and p.mode == "write" and not p.status().needs_check
    p.create_thin("w", "1MiB")
    p.close()
    with Pool.open(tmp_path / "p") as p:
        assert p.mode == "write" and 'flags="0"' in _dump(p, tmp_path, "again.bin")


def test_kernel_rule_read_only_mode_serves_provisioned_unshared_writes(tmp_path):
    # dm-thin's process_bio_read_only: a write to a mapped, unshared block is remapped and served;
    # one that needs a block (unmapped, or shared: a sharing break) fails with EIO; discards succeed
    # and unmap nothing; pool messages are refused (pool_message: EOPNOTSUPP in read-only mode)
    p = _needs_check_pool(tmp_path)
    v = p.thin("v")
    v.write(100, b"served")
    assert v.read(100, 6) == b"served"
    with pytest.raises(ReadOnlyIO) as ei:
        v.write(BS + 5, b"shared")  # shared with s: a sharing break needs a block
    assert ei.value.errno == errno.EIO and "check --clear-needs-check" in str(ei.value)
    with pytest.raises(ReadOnlyIO):
        v.write(10 * BS, b"unmapped")
    with pytest.raises(ReadOnlyIO):
        v.write_many([200, 10 * BS], [b"ok", b"no"])  # all or nothing
    assert v.read(200, 2) == b"bb"  # nothing of the refused batch was written
    assert v.discard(0, 3 * BS) == 0 and v.mapped_blocks == 3
    for msg in (lambda: p.snapshot("v", "t"), lambda: p.delete("s"), lambda: p.set_transaction_id(0, 1)):
        with pytest.raises(ReadOnly, match="needs checking"):
            msg()
    p.commit()  # flushes the data file; no metadata can change
    p.close()
    with Pool.open(tmp_path / "p") as p:
        assert p.thin("v").read(100, 6) == b"served"


#: mappings per leaf that make it dense: it takes a metadata page of its own (see thinpool.nodestore;
#: sparse leaves share pages, so one mapping per leaf would hardly use the metadata)
PER_LEAF = nodestore.DENSE + 1


def _dense_leaves(first: int, count: int) -> np.ndarray:
    """Offsets of PER_LEAF blocks in each of ``count`` leaves from leaf ``first`` on."""
    leaves = np.arange(first, first + count, dtype=np.int64)
    return ((leaves[:, None] * 512 + np.arange(PER_LEAF)[None, :]) * BS).reshape(-1)


def _fill_metadata(p: Pool, v, limit: int = 400) -> int:
    """Write one dense leaf after another until the pool leaves write mode; returns the leaves
    written."""
    for i in range(limit):
        if p.mode != "write":
            return i
        v.write_many(_dense_leaves(i, 1), [b"x"] * PER_LEAF)
    raise AssertionError("the metadata never ran out")


def test_kernel_rule_out_of_metadata_space_mode_keeps_a_reserve(tmp_path):
    # dm-thin: when free metadata (beyond the reserve) runs out, alloc_data_block commits "before we
    # use up the metadata reserve", and check_for_metadata_space then enters out-of-metadata-space:
    # the open transaction is committed, no needs_check; growing the metadata returns to write mode
    path = tmp_path / "p"
    p = Pool.create(path, data_size="8GiB", metadata_size="512KiB", error_if_no_space=True)
    v = p.create_thin("v", "8GiB")
    n = _fill_metadata(p, v)
    assert p.mode == "out-of-metadata-space" and not p.status().needs_check
    st = p.status()
    assert st.dmsetup_line().split()[4] == "ro" and st.dmsetup_line().split()[7] == "-"
    with pytest.raises(ReadOnly, match="--metadata-size"):
        p.delete("v")
    v.write(0, b"rewrite")  # provisioned, unshared: served
    with pytest.raises(ReadOnlyIO):
        v.write((n + 5) * 512 * BS, b"new")
    assert v.discard(0, BS) == 0
    p.close(commit=False)  # a crash: every write that returned was committed (the reserve held)
    p = Pool.open(path)
    assert p.thin("v").mapped_blocks == n * PER_LEAF and not p.header.get("needs_check")
    v = p.thin("v")
    _fill_metadata(p, v)
    p.resize_metadata("2MiB")
    assert p.mode == "write"
    p.delete("v")
    p.create_thin("w", "1MiB").write(0, b"w")
    p.close()


def test_kernel_rule_failed_metadata_operation_aborts_with_needs_check(tmp_path):
    # dm-thin's metadata_operation_failed: abort the transaction, set needs_check, read-only; the
    # flag is in the superblock, so it survives a reopen.  Here a single batch of writes needs more
    # metadata than even the reserve holds.
    path = tmp_path / "p"
    p = Pool.create(path, data_size="8GiB", metadata_size="256KiB", error_if_no_space=True)
    v = p.create_thin("v", "8GiB")
    v.write(0, b"kept")
    p.commit()
    with pytest.raises(ReadOnly, match="needs_check"):
        v.write_many(_dense_leaves(1, 80), np.full((80 * PER_LEAF, 8), 7, np.uint8))  # > 64 pages
    assert p.mode == "read-only" and p.status().needs_check
    assert v.mapped_blocks == 1 and v.read(0, 4) == b"kept"  # aborted to the last commit
    p.close()
    with Pool.open(path) as p:
        assert p.mode == "read-only" and p.header["needs_check"]
        assert 'flags="1"' in _dump(p, tmp_path)


def test_kernel_rule_thin_check_clears_needs_check_from_the_cli(tmp_path):
    # thin_check --clear-needs-check-flag: our 'thinpool check --clear-needs-check'
    import sys
    p = _needs_check_pool(tmp_path)
    p.close()
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}
    run = lambda *a: subprocess.run([sys.executable, "-m", "thinpool", *a], capture_output=True, text=True, env=env)
    r = run("create-thin", str(tmp_path / "p"), "w", "1M")
    assert r.returncode == 1 and "--clear-needs-check" in r.stderr
    r = run("check", str(tmp_path / "p"), "--clear-needs-check")
    assert r.returncode == 0, r.stderr
    r = run("create-thin", str(tmp_path / "p"), "w", "1M")
    assert r.returncode == 0, r.stderr
    with Pool.open(tmp_path / "p") as p:
        assert p.mode == "write" and not p.header["needs_check"] and "w" in p
