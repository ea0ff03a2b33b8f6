"""`thinpool ls [--usage]` rows of a full pool, read from its device table in one pass, are what each
volume's handle reports (names, sizes, mapped blocks, times, read-only, external origin, usage)."""

from __future__ import annotations

import numpy as np

from thinpool import Pool
from thinpool.cli import ops

BS = 64 * 1024


def _slow_rows(pool: Pool) -> list[dict]:
    us = {u.name: u for u in pool.usage()}
    out = []
    for t in pool.thins():
        row = {"name": t.name, "dev_id": t.dev_id, "size": t.size, "read_only": bool(t.read_only),
               "mapped_blocks": t.mapped_blocks, "transaction": t.transaction, "creation_time": t.creation_time,
               "snap_time": t.snap_time, "block_size": BS, "mapped_bytes": t.mapped_blocks * BS}
        if t.external_origin is not None:
            row["external_origin"] = t.external_origin["path"]
        u = us[t.name]
        row.update(exclusive_blocks=u.exclusive_blocks, shared_blocks=u.shared_blocks,
                   highest_mapped_block=u.highest_mapped_block, exclusive_bytes=u.exclusive_bytes,
                   shared_bytes=u.shared_blocks * BS)
        out.append(row)
    return out


def test_ls_usage_rows_of_a_full_pool_equal_each_volumes_own_figures(tmp_path):
    golden = tmp_path / "golden.img"
    golden.write_bytes(b"g" * (2 * BS))
    with Pool.create(tmp_path / "p", data_size=512 * BS) as pool:
        a = pool.create_thin("a", "1GiB", dev_id=7)
        a.write_many(np.arange(40, dtype=np.int64) * BS, np.ones((40, 16), np.uint8))
        pool.snapshot("a", "snap-ro", read_only=True)
        pool.snapshot("a", "b", dev_id=3)
        pool.thin("b").write(5 * BS, b"x")
        pool.create_thin("ext", "1MiB", external_origin=str(golden))
        pool.snapshot("ext", "ext-snap")
        rows = ops._volume_rows(pool, True)
        assert rows == _slow_rows(pool)
        assert [r["dev_id"] for r in rows] == sorted(r["dev_id"] for r in rows)
        assert {r["name"]: r["read_only"] for r in rows}["snap-ro"] is True
        assert sum("external_origin" in r for r in rows) == 2
        plain = ops._volume_rows(pool, False)
        assert plain == [{k: v for k, v in r.items() if k in plain[0] or k == "external_origin"} for r in rows]


def _reference_table(rows: list[dict], headers: bool = True) -> str:
    """thinpool's volume table written the plain way: a cell per value, ljust/rjust, one row at a time."""
    from thinpool.units import format_size
    header = ["NAME", "DEV", "SIZE", "MAPPED", "CREATE_TIME", "SNAP_TIME"]
    origin = any("external_origin" in r for r in rows)
    body = [[r["name"] + (" (ro)" if r["read_only"] else ""), str(r["dev_id"]), format_size(r["size"]),
             format_size(r["mapped_bytes"]), str(r["creation_time"]), str(r["snap_time"])]
            + ([r.get("external_origin", "-")] if origin else []) for r in rows]
    table = ([header + (["EXTERNAL_ORIGIN"] if origin else [])] if headers else []) + body
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     .rstrip() for row in table)


def test_ls_columns_print_what_the_rows_print_text_and_json(tmp_path):
    """`thinpool ls` builds its table and its --json from columns (no object per volume): the text is
    the plain per-row table's and the JSON is json.dumps of the rows, byte for byte, for a full pool
    and for the device table alone (the light path), with odd names, read-only and origin rows."""
    import json
    from thinpool.devtable import DeviceTable
    golden = tmp_path / "golden.img"
    golden.write_bytes(b"g" * BS)
    def check(src, rows: list[dict]) -> None:
        cols = ops.op_ls(src, columns=True)["columns"]
        assert ops.volume_rows(cols) == rows
        assert ops.volume_columns_json(cols) == json.dumps(rows, indent=2)
        assert ops.render_volume_columns(cols) == _reference_table(rows)
        assert ops.render_volume_columns(cols, headers=False) == _reference_table(rows, headers=False)

    for origin in (False, True):
        with (Pool.open(tmp_path / "p") if origin else Pool.create(tmp_path / "p", data_size=64 * BS,
                                                                     metadata_only=True)) as pool:
            if origin:
                pool.create_thin("ext", "1MiB", external_origin=str(golden))
            else:
                pool.create_thin("base", "3GiB", dev_id=9)
                for name in ("ünï ✓ \"q\" \\", "snap/ns/1", "x" * 300, "tab\u2009space"):
                    pool.snapshot("base", name)
                pool.snapshot("base", "ro", read_only=True, dev_id=2)
            rows = ops._volume_rows(pool, False)
            assert len(rows) == 6 + origin and sum("external_origin" in r for r in rows) == origin
            check(pool, rows)
        with DeviceTable.open(tmp_path / "p") as table:
            check(table, rows)


def test_ls_columns_of_a_table_in_device_id_order_and_with_holes_print_what_the_rows_print(tmp_path):
    """The device table's columns take a shortcut when the volumes fill the first slots in device-id
    order (slices of the table, no sort); the table, the JSON and the rows stay those of the plain
    per-volume path -- in that layout, with a read-only volume and an external origin, and once a
    delete leaves a hole (the general path)."""
    import json
    from thinpool.devtable import DeviceTable
    golden = tmp_path / "golden.img"
    golden.write_bytes(b"g" * BS)
    with Pool.create(tmp_path / "p", data_size=64 * BS, metadata_only=True) as pool:
        pool.create_thin("base", "3GiB")
        for i in range(40):
            pool.snapshot("base", f"s-{i:02d}", read_only=i == 7)
    for step in ("ordered", "origin", "hole"):
        with Pool.open(tmp_path / "p") as pool:
            if step == "origin":
                pool.create_thin("ext", "1MiB", external_origin=str(golden))
            if step == "hole":
                pool.delete("s-03")
            rows = ops._volume_rows(pool, False)
        assert [r["dev_id"] for r in rows] == sorted(r["dev_id"] for r in rows)
        with DeviceTable.open(tmp_path / "p") as table:
            cols = ops.op_ls(table, columns=True)["columns"]
        assert ops.volume_rows(cols) == rows
        assert ops.volume_columns_json(cols) == json.dumps(rows, indent=2)
        assert ops.render_volume_columns(cols) == _reference_table(rows)
