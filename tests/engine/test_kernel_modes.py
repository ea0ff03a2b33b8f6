"""The pool modes, messages and commits as dm-thin has them (drivers/md/dm-thin.c,
dm-thin-metadata.c; docs/dm-thin.md).  Each test names the kernel rule it checks."""

from __future__ import annotations

import pytest

from thinpool import Pool
from thinpool.errors import NoSpace

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
