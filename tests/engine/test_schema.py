"""The record formats of :mod:`thinpool.schema` agree with every place that uses them: the struct,
the numpy dtype, the kernels' column and state indices, the kernel table's rows (packed by the
pool, decoded by the kernels), the mapping packing -- and numba's cache never runs kernels compiled
from other sources than today's (:mod:`thinpool.kernels_cache`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from thinpool import Pool, schema
from thinpool.schema import (DEV_FIELDS, DEV_RECORD, DevCol, DevFlag, KRow, Mode, St, dev_dtype, pack_mapping,
                             unpack_mapping)

BS = 64 * 1024


def _engine(pool):
    """(kernel table, int64 device rows) of an open pool."""
    ctx = pool._engine
    return ctx.table(), ctx.devs_i


def test_struct_dtype_and_columns_describe_one_record():
    dt = dev_dtype()
    assert dt.names == DEV_FIELDS
    assert tuple(c.name.lower() for c in DevCol) == DEV_FIELDS  # one column per field, in order
    assert dt.itemsize == DEV_RECORD.size == 8 * len(DEV_FIELDS) == 8 * schema.DEV_COLUMNS
    values = tuple(range(11, 11 + len(DEV_FIELDS)))
    raw = DEV_RECORD.pack(*values)
    rec = np.frombuffer(raw, dt)[0]
    row = np.frombuffer(raw, np.int64)
    for i, f in enumerate(DEV_FIELDS):
        col = DevCol[f.upper()]
        assert col == i == getattr(schema, "DEV_ID" if f == "dev_id" else f"DEV_{f.upper()}")
        assert rec[f] == row[col] == values[i]


def test_kernels_index_records_and_state_by_the_schema(tmp_path):
    """The columns and state slots the kernels were compiled with are the dtype's fields: a kernel
    write through the table updates the record's ``mapped``/``root`` fields and the state's counters,
    and a READ_ONLY flag set through the dtype's ``flags`` field stops the kernel."""
    import thinpool.kernels as kernels
    for name in ("DEV_ROOT", "DEV_MAPPED", "DEV_SIZE", "DEV_SNAP_TIME", "DEV_FLAGS"):
        field = name[4:].lower()
        assert getattr(kernels, name) == dev_dtype().names.index(field) == dev_dtype().fields[field][1] // 8
    assert kernels.ST_SIZE == len(St) and sorted(St) == list(range(len(St)))
    assert kernels.UNMAPPED == np.uint64(schema.UNMAPPED)
    with Pool.create(str(tmp_path / "p"), "4MiB", BS) as pool:
        pool.create_thin("a", "1MiB")
        pool.create_thin("ro", "1MiB", read_only=True)
        pool.thin("a").write(0, b"first")  # through the pool: the node store grows to have room
        free = int(pool.st[St.NR_ALLOCATABLE])
        tab, devs_i = _engine(pool)
        slot = int(np.flatnonzero(pool.devs["dev_id"] == pool.thin("a").dev_id)[0])
        for k in (1, 2, 3):
            code, need = kernels.write_one(tab, devs_i, slot, np.full(10, 7, np.uint8), pool._engine.data.fd, k * BS,
                                           -1, 0)
            assert (code, need) == (schema.OK, 1)
        rec = pool.devs[slot]
        assert rec["mapped"] == 4 and rec["root"] == devs_i[slot, kernels.DEV_ROOT]
        assert int(pool.st[St.NR_ALLOCATABLE]) == free - 3
        ro = int(np.flatnonzero(pool.devs["dev_id"] == pool.thin("ro").dev_id)[0])
        assert pool.devs[ro]["flags"] & DevFlag.READ_ONLY
        code, _ = kernels.write_one(tab, devs_i, ro, np.zeros(10, np.uint8), pool._engine.data.fd, 0, -1, 0)
        assert code == kernels.NOT_HANDLED
        assert pool.thin("a").read(BS, 10) == b"\x07" * 10


def _arrays_by_row(pool) -> dict[KRow, np.ndarray]:
    nm, sp = pool.nodes_map, pool.space
    return {KRow.LEAVES: nm.leaves, KRow.INNERS: nm.inners, KRow.LEAF_RC: nm.leaf_rc, KRow.INNER_RC: nm.inner_rc,
            KRow.LEAF_DIRTY: nm.leaf_dirty, KRow.INNER_DIRTY: nm.inner_dirty, KRow.LEAF_RC_DIRTY: nm.leaf_rc_dirty,
            KRow.INNER_RC_DIRTY: nm.inner_rc_dirty, KRow.LEAF_FREE: nm.leaf_free, KRow.INNER_FREE: nm.inner_free,
            KRow.DATA_RC: sp.data_rc, KRow.FREED_TXN: sp.freed_txn, KRow.RC_DIRTY: sp.rc_dirty, KRow.ST: pool.st,
            KRow.SCRATCH: pool.data.scratch}


def test_kernel_table_rows_are_packed_and_decoded_by_name(tmp_path):
    """Each row of the pool's kernel table is the (address, length) of the array its KRow names
    (packing side), and the kernels decode each row as that array (decoding side): a table packed
    or decoded in another order fails here instead of corrupting memory."""
    import thinpool.kernels as kernels
    with Pool.create(str(tmp_path / "p"), "4MiB", BS) as pool:
        pool.create_thin("a", "1MiB")
        pool.thin("a").write(0, b"x")
        tab, _ = _engine(pool)
        named = _arrays_by_row(pool)
        assert len(tab) == len(KRow) == len(named)
        decoded = kernels.table_addresses(tab)
        for row, arr in named.items():
            assert tab[row, 0] == arr.ctypes.data and tab[row, 1] == arr.shape[0], f"packed {row.name}"
            assert tuple(decoded[row]) == (arr.ctypes.data, arr.shape[0]), f"decoded {row.name}"
        assert [named[r] is a for r, a in zip(schema.NODE_ROWS, pool.nodes_map.nodes)] == [True] * 10
        assert [named[r] is a for r, a in zip(schema.SPACE_ROWS, pool.space.arrays)] == [True] * 3


def test_kernel_table_refuses_an_array_it_cannot_address():
    arrays = [np.zeros(4, np.uint8) for _ in KRow]
    nodes, space = tuple(arrays[:10]), tuple(arrays[10:13])
    schema.kernel_table(nodes, space, arrays[13], arrays[14])
    with pytest.raises(ValueError, match="SCRATCH"):
        schema.kernel_table(nodes, space, arrays[13], np.zeros(8, np.uint8)[::2])


def test_flags_and_modes():
    assert DevFlag.IN_USE == 1 and DevFlag.READ_ONLY == 2
    assert [m.value for m in Mode] == ["write", "out-of-data-space", "out-of-metadata-space", "read-only", "fail"]
    assert f"{Mode.OUT_OF_DATA_SPACE}" == "out-of-data-space" and Mode.WRITE == "write"


@pytest.mark.parametrize("block,time", [(0, 0), (1, 1), (123456, (1 << 24) - 1), ((1 << 40) - 1, 5)])
def test_pack_unpack_mapping_python_and_kernels_agree(block, time):
    import thinpool.kernels_map as km
    m = pack_mapping(block, time)
    assert m == (block << 24) | time
    assert unpack_mapping(m) == (block, time)
    arr = np.array([m, m], np.uint64)
    b, t = unpack_mapping(arr)
    assert list(b) == [block, block] and list(t) == [time, time]
    assert pack_mapping(block, time + (1 << 24)) == m  # only 24 bits of time are kept
    assert int(km.pack_mapping(block, time + (1 << 24))) == m
    assert km.unpack_mapping(np.uint64(m)) == (block, time)
    assert km.mapping_block(np.uint64(m)) == block


def test_needs_new_block_is_dm_thins_time_rule():
    import thinpool.kernels_map as km
    unmapped = np.uint64(schema.UNMAPPED)
    at5 = np.uint64(pack_mapping(9, 5))
    assert km.needs_new_block(unmapped, False, 0)           # a hole
    assert km.needs_new_block(at5, True, 0)                 # a shared node on the path
    assert km.needs_new_block(at5, False, 6)                # written before the last snapshot
    assert not km.needs_new_block(at5, False, 5)            # written since: in place
    assert not km.needs_new_block(at5, False, 0)


_PROBE = """
import numpy as np
from thinpool import kernels_cache, kernels_map
print(int(kernels_map.mapping_block(np.uint64(1 << 24))), kernels_cache.flushed)
"""


def test_cache_follows_a_change_in_another_module(tmp_path):
    """numba keys a cached kernel on its own file only: a constant taken from schema.py is frozen
    into kernels_map's cached code.  With the guard, changing schema.py alone recompiles it."""
    pkg = tmp_path / "pkg"
    src = os.path.dirname(schema.__file__)
    shutil.copytree(src, pkg / "thinpool", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(pkg))
    env.pop("NUMBA_DISABLE_JIT", None)

    def probe() -> str:
        r = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip()

    assert probe() == "1 []"          # compiled and cached
    assert probe() == "1 []"          # loaded from the cache
    schema_py = pkg / "thinpool" / "schema.py"
    text = schema_py.read_text()
    assert text.count("TIME_BITS = 24\n") == 1
    schema_py.write_text(text.replace("TIME_BITS = 24\n", "TIME_BITS = 20\n"))
    # the stale cached code would still answer 1; the guard drops it and compiles with 20 bits
    assert probe() == "16 ['thinpool.kernels_map']"
    assert probe() == "16 []"         # and the fresh code was cached
