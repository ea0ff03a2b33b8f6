"""The record formats of :mod:`thinpool.schema` agree with every place that uses them: the struct,
the numpy dtype, the kernels' column and state indices, the kernel table's rows, the mapping
packing."""

from __future__ import annotations

import numpy as np
import pytest

from thinpool import Pool, schema
from thinpool.schema import (DEV_FIELDS, DEV_RECORD, KRow, Mode, St, DevCol, DevFlag, dev_dtype, pack_mapping,
                             unpack_mapping)

BS = 64 * 1024


def test_struct_dtype_and_columns_describe_one_record():
    dt = dev_dtype()
    assert dt.names == DEV_FIELDS
    assert dt.itemsize == DEV_RECORD.size == 8 * len(DEV_FIELDS)
    values = tuple(range(11, 11 + len(DEV_FIELDS)))
    raw = DEV_RECORD.pack(*values)
    rec = np.frombuffer(raw, dt)[0]
    row = np.frombuffer(raw, np.int64)
    for i, f in enumerate(DEV_FIELDS):
        col = DevCol[f.upper()]
        assert col == i == getattr(schema, f"DEV_{f.upper()}" if f != "dev_id" else "DEV_ID")
        assert rec[f] == row[col] == values[i]
    assert schema.DEV_COLUMNS == len(DEV_FIELDS)


def test_kernels_use_the_schema_indices():
    kernels = pytest.importorskip("thinpool.kernels")
    for name in ("DEV_ROOT", "DEV_MAPPED", "DEV_SIZE", "DEV_SNAP_TIME", "DEV_FLAGS", "ST_SIZE", "ST_TIME",
                 "ST_BLOCK_SIZE", "ST_NR_ALLOCATABLE", "ST_INNER_FREE", "ST_LEAF_FREE", "TIME_MASK"):
        assert getattr(kernels, name) == getattr(schema, name), name
    assert schema.ST_SIZE == len(St) and sorted(St) == list(range(len(St)))
    assert sorted(KRow) == list(range(len(KRow)))
    assert kernels.UNMAPPED == np.uint64(schema.UNMAPPED)


def _arrays_by_row(pool) -> dict[KRow, np.ndarray]:
    nm, sp = pool.nodes_map, pool.space
    return {KRow.LEAVES: nm.leaves, KRow.INNERS: nm.inners, KRow.LEAF_RC: nm.leaf_rc, KRow.INNER_RC: nm.inner_rc,
            KRow.LEAF_DIRTY: nm.leaf_dirty, KRow.INNER_DIRTY: nm.inner_dirty, KRow.LEAF_RC_DIRTY: nm.leaf_rc_dirty,
            KRow.INNER_RC_DIRTY: nm.inner_rc_dirty, KRow.LEAF_FREE: nm.leaf_free, KRow.INNER_FREE: nm.inner_free,
            KRow.DATA_RC: sp.data_rc, KRow.FREED_TXN: sp.freed_txn, KRow.RC_DIRTY: sp.rc_dirty, KRow.ST: pool.st,
            KRow.SCRATCH: pool.data.scratch}


def test_kernel_table_rows_hold_the_named_arrays(tmp_path):
    """Each row of the pool's kernel table is the (address, length) of the array its KRow names: a
    table packed in another order than the kernels decode fails here instead of corrupting memory."""
    with Pool.create(str(tmp_path / "p"), "4MiB", BS) as pool:
        pool.create_thin("a", "1MiB")
        pool.thin("a").write(0, b"x")
        tab = pool._kernel_table()
        named = _arrays_by_row(pool)
        assert len(tab) == len(KRow) == len(named)
        for row, arr in named.items():
            assert tab[row, 0] == arr.ctypes.data and tab[row, 1] == arr.shape[0], row.name
        nodes = pool.nodes_map.nodes
        assert len(nodes) == schema.NODE_ARRAYS
        for i, arr in enumerate(nodes):
            assert arr is named[KRow(i)]


def test_flags_and_modes():
    assert DevFlag.IN_USE == 1 and DevFlag.READ_ONLY == 2
    assert [m.value for m in Mode] == ["write", "out-of-data-space", "read-only", "fail"]
    assert f"{Mode.OUT_OF_DATA_SPACE}" == "out-of-data-space" and Mode.WRITE == "write"


@pytest.mark.parametrize("block,time", [(0, 0), (1, 1), (123456, (1 << 24) - 1), ((1 << 40) - 1, 5)])
def test_pack_unpack_mapping(block, time):
    m = pack_mapping(block, time)
    assert m == (block << 24) | time
    assert unpack_mapping(m) == (block, time)
    arr = np.array([m, m], np.uint64)
    b, t = unpack_mapping(arr)
    assert list(b) == [block, block] and list(t) == [time, time]
    assert pack_mapping(block, time + (1 << 24)) == m  # only 24 bits of time are kept
