"""The pool and thin status lines and the pool's events as dm-thin reports them (drivers/md/dm-thin.c:
``pool_status``, ``thin_status``, ``check_low_water_mark``, ``alloc_data_block``; dm-thin-metadata.c:
``dm_pool_get_free_metadata_block_count``; persistent-data/dm-space-map-metadata.c: ``check_threshold``).
Each test names the kernel rule it checks."""

from __future__ import annotations

import numpy as np
import pytest

from thinpool import Pool
from thinpool.devtable import DeviceTable
from thinpool.errors import HostIOError, NoSpace, ReadOnly

BS = 64 * 1024


# --------------------------------------------------------------------------- pool status line
@pytest.mark.parametrize("metadata_size", ["1MiB", "16MiB", "64MiB"])
def test_kernel_rule_status_line_counts_metadata_reserve_as_used(tmp_path, metadata_size) -> None:
    # pool_status prints nr_blocks_metadata - nr_free_blocks_metadata, and
    # dm_pool_get_free_metadata_block_count subtracts pmd->metadata_reserve (__set_metadata_reserve:
    # min(4096, nr_blocks / 10)) from the free count: a fresh kernel pool reports about a tenth used
    with Pool.create(tmp_path / "p", data_size="64MiB", metadata_size=metadata_size) as p:
        st = p.status()
        total = st.total_metadata_blocks
        reserve = min(4096, total // 10)
        assert st.metadata_reserve_blocks >= reserve
        meta = p.status().dmsetup_line().split()[1]
        assert meta == f"{min(total, st.used_metadata_blocks + st.metadata_reserve_blocks)}/{total}"
        assert int(meta.split("/")[0]) >= st.used_metadata_blocks + reserve
        assert st.as_dict()["reported_used_metadata_blocks"] == int(meta.split("/")[0])
    # the light device-table status (``thinpool status`` without a full open) prints the same line
    with Pool.open(tmp_path / "p") as p:
        line = p.status().dmsetup_line()
    dt = DeviceTable.open(tmp_path / "p")
    try:
        assert dt.status().dmsetup_line().split()[1] == line.split()[1] == meta
    finally:
        dt.close()


# --------------------------------------------------------------------------- thin status line
@pytest.mark.parametrize("block_size", [64 * 1024, 192 * 1024])
def test_kernel_rule_thin_status_line_mapped_and_highest_sector(tmp_path, block_size) -> None:
    # thin_status: "<mapped blocks x sectors per block> <(highest mapped block + 1) x sectors per
    # block - 1>", and "-" for the highest when dm_thin_get_highest_mapped_block finds no mapping
    spb = block_size // 512
    with Pool.create(tmp_path / "p", data_size=str(16 * block_size), block_size=str(block_size)) as p:
        v = p.create_thin("v", str(64 * block_size))
        assert v.usage().dmsetup_line() == "0 -"
        v.write(0, b"x")
        assert v.usage().dmsetup_line() == f"{spb} {spb - 1}"  # block 0 ends at sector spb - 1
        v.write(5 * block_size + 7, b"y")
        assert v.usage().dmsetup_line() == v.status_line() == f"{2 * spb} {6 * spb - 1}"
        s = p.snapshot("v", "s")
        v.discard(5 * block_size, block_size)  # the origin's highest goes; the snapshot keeps it
        assert v.usage().dmsetup_line() == f"{spb} {spb - 1}"
        assert s.usage().dmsetup_line() == f"{2 * spb} {6 * spb - 1}"
        v.discard(0, block_size)
        assert v.usage().dmsetup_line() == "0 -"
        assert v.usage().as_dict()["dmsetup_line"] == "0 -"


# --------------------------------------------------------------------------- data low water mark
@pytest.mark.parametrize("mark", [0, 1])
def test_kernel_rule_low_water_event_fires_when_a_write_finds_no_data_block(tmp_path, mark) -> None:
    # alloc_data_block calls check_low_water_mark(pool, free_blocks) before it finds there is no
    # block (free_blocks 0 <= any mark, the default 0 included); the kernel allocates block by
    # block, so a write needing more blocks than are free ends at an allocation that saw 0
    p = Pool.create(tmp_path / "p", data_size=4 * BS, low_water_mark=mark, error_if_no_space=True)
    fired: list[str] = []
    p.on_low_water = lambda pool: fired.append(pool.mode)
    v = p.create_thin("v", "1GiB")
    v.write(0, b"a" * (2 * BS))  # free before each allocation: 4, 3 (above either mark)
    assert fired == []
    with pytest.raises(NoSpace):
        v.write_many([2 * BS, 3 * BS, 4 * BS], [b"x", b"y", b"z"])  # needs 3 blocks, 2 free
    assert fired == ["out-of-data-space"]  # once, seen in the mode the write left the pool in
    with pytest.raises(NoSpace):
        v.write(4 * BS, b"x" * (3 * BS))
    assert len(fired) == 1  # edge-triggered: again only after a resume (here: a resize or reopen)
    p.resize(16 * BS)
    v.write(2 * BS, b"x")  # 14 free before: above the mark
    assert len(fired) == 1
    p.close()


def test_kernel_rule_low_water_event_is_rearmed_by_a_resume_not_by_an_abort(tmp_path) -> None:
    # pool->low_water_triggered is cleared only in pool_resume (every table reload's resume: a data or
    # metadata resize, new features); metadata_operation_failed's abort leaves it set
    p = Pool.create(tmp_path / "p", data_size=16 * BS, low_water_mark=14)
    fired: list[int] = []
    p.on_low_water = lambda pool: fired.append(1)
    v = p.create_thin("v", "1GiB")
    v.write(0, b"a" * (3 * BS))  # free before the third allocation: 14
    assert fired == [1]
    p.abort()  # (the three blocks are dropped: 16 free again)
    v.write(0, b"a" * (3 * BS))
    assert fired == [1]  # not re-armed by the abort
    p.resize_metadata(p.store.nr_blocks * 4096)  # a reload + resume of the same size
    v.write(3 * BS, b"b")
    assert fired == [1, 1]
    p.set_features(discard="passdown")  # a reload with the same features: resumed all the same
    v.write(4 * BS, b"c")
    assert fired == [1, 1, 1]
    p.close()


# --------------------------------------------------------------------------- metadata low water mark
def _fill_metadata_until(p: Pool, v, first: int, events: list[int]) -> int:
    """Write 2048 scattered blocks and commit, batch after batch from ``first``, until ``events``
    grows; returns the next batch number."""
    n0, i = len(events), first
    while len(events) == n0:
        assert i < first + 100, "no metadata low water event"
        offs = np.arange(i * 2048 * 7, (i + 1) * 2048 * 7, 7, dtype=np.int64) * BS
        v.write_many(offs, [b"x"] * len(offs))
        p.commit()
        i += 1
    return i


def test_kernel_rule_metadata_low_water_is_edge_triggered_on_free_metadata(tmp_path) -> None:
    # pool_ctr registers calc_metadata_threshold(pt) = min(1024, metadata blocks / 4) with
    # dm_pool_register_metadata_threshold; check_threshold runs at every metadata allocation on the
    # space map's free count and calls metadata_low_callback (a dm event) when the count is at or
    # below the threshold and the previous count was not: once per crossing, re-armed when free
    # metadata is seen above the mark again (not by a resume, unlike the data mark)
    events: list[int] = []
    # (flush=False: a scratch pool; durability is not what this checks)
    with Pool.create(tmp_path / "p", data_size="8GiB", metadata_size="1MiB", flush=False,
                     on_metadata_low_water=lambda pool: events.append(pool.store.free_blocks())) as p:
        assert p.status().metadata_low_water_mark == 64 and p.status().dmsetup_line().split()[-1] == "64"
        v = p.create_thin("v", "100GiB")
        i = _fill_metadata_until(p, v, 0, events)
        assert len(events) == 1 and events[0] <= 64
        v.write(0, b"more")  # a commit still at or below the mark: no second event
        p.commit()
        assert len(events) == 1 and p.store.free_blocks() <= 64
        p.resize_metadata("2MiB")  # the mark is now 128, and free metadata above it: re-armed ...
        p.commit()
        assert p.status().metadata_low_water_mark == 128 and p.store.free_blocks() > 128 and len(events) == 1
        _fill_metadata_until(p, v, i, events)  # ... so falling to it again raises a second event
        assert len(events) == 2 and events[1] <= 128


# --------------------------------------------------------------------------- fail mode
def test_kernel_rule_fail_mode_errors_every_io_reads_included(tmp_path) -> None:
    # thin_bio_map: "if (get_pool_mode(tc->pool) == PM_FAIL) { bio_io_error(bio); ... }" -- every bio,
    # reads too; pool_status prints "Fail".  thinpool fails when a flush of the host files fails.
    import errno

    from thinpool.datadev import DataDevice
    from thinpool.hostio import DataIO

    class BadSync(DataIO):
        @staticmethod
        def fdatasync(fd: int) -> None:
            raise OSError(errno.EIO, "injected")

    p = Pool.create(tmp_path / "p", data_size=16 * BS)
    v = p.create_thin("v", 4 * BS)
    v.write(0, b"committed")
    p.commit()
    v.write(BS, b"x")
    DataDevice.io = BadSync()
    try:
        with pytest.raises(HostIOError):
            p.commit()
    finally:
        DataDevice.io = DataIO()
    assert p.mode == "fail" and p.status().dmsetup_line() == "Fail"
    assert v.status_line() == "Fail"  # thin_status: "if (get_pool_mode(tc->pool) == PM_FAIL) DMEMIT("Fail")"
    for read in (lambda: v.read(0, 9), lambda: v.pread(0, 9), lambda: v.read_many([0], 9),
                 lambda: v.read(0, 3 * BS)):
        with pytest.raises(HostIOError, match="reads included") as ei:
            read()
        assert ei.value.errno == errno.EIO
    with pytest.raises(ReadOnly):
        v.write(0, b"y")
    p.close(commit=False)
    with Pool.open(tmp_path / "p") as p:  # reopening finds the last durable commit
        assert p.mode == "write" and p.thin("v").read(0, 9) == b"committed"
