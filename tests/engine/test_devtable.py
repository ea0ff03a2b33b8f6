"""thinpool.devtable.DeviceTable: status, volumes and snapshots from the device table alone.

The claim (module docstring): a snapshot committed by a DeviceTable is the same pool state as one
committed by Pool.snapshot + Pool.commit -- device records, catalog, counts, time and mappings --
and the pool stays fully usable afterwards.  Plus: the CLI's status / ls / snapshot take this path
without importing numpy, errors leave the pool unchanged, a crash at any write of its commit leaves
either the old or the new state, and the pool lock is honoured.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from thinpool import AlreadyExists, InvalidArgument, NotFound, Pool, PoolLocked, ReadOnly
from thinpool.devtable import DeviceTable
from thinpool.interop.xml import dump_xml
from thinpool.mdstore import MetadataStore

BS = 64 * 1024


def _build(path: Path) -> str:
    """A pool with shared and exclusive blocks, a deleted volume (blocks pending release) and a
    recorded namespace, committed."""
    p = Pool.create(path, data_size="32MiB")
    rng = np.random.default_rng(7)
    a = p.create_thin("a", "8MiB")
    a.write(0, rng.integers(0, 256, 5 * BS, dtype=np.uint8).tobytes())
    p.snapshot("a", "a-old")
    a.write(BS, b"new" * 1000)
    p.create_thin("gone", "1MiB").write(0, b"x" * BS)
    p.create_thin("b", "2MiB", read_only=True)
    p.commit()
    p.delete("gone")
    p.commit()
    p.close()
    return str(path)


def _state(path: str) -> dict:
    with Pool.open(path, read_only=True) as p:
        live = np.flatnonzero(p.devs["flags"] & 1)
        return {
            "devs": p.devs[live].tobytes(), "catalog": p.catalog, "time": p.time,
            "transaction": p.transaction_id, "inner_rc": p.nodes_map.inner_rc.tobytes(),
            "leaf_rc": p.nodes_map.leaf_rc.tobytes(), "data_rc": p.space.data_rc.tobytes(),
            "metadata": dump_xml(p.to_metadata()), "status": p.status().as_dict() | {"used_metadata_blocks": 0},
            "data": {t.name: t.read(0, t.size) for t in p.thins()},
        }


def test_snapshot_matches_pool_snapshot(tmp_path: Path) -> None:
    base = _build(tmp_path / "base")
    via_pool, via_table = str(tmp_path / "pool"), str(tmp_path / "table")
    shutil.copytree(base, via_pool)
    shutil.copytree(base, via_table)
    with Pool.open(via_pool) as p:
        p.snapshot("a", "s1")
        p.snapshot("a-old", "s2", dev_id=77, read_only=True)
    with DeviceTable.open(via_table, read_only=False) as t:
        t.snapshot("a", "s1")
        info = t.snapshot("a-old", "s2", dev_id=77, read_only=True)
    assert (info.name, info.dev_id, info.read_only, info.mapped_blocks) == ("s2", 77, True, 5)
    assert _state(via_pool) == _state(via_table)


def test_status_and_volumes_match_pool(tmp_path: Path) -> None:
    path = _build(tmp_path / "p")
    with Pool.open(path, read_only=True) as p:
        want = p.status()
        thins = [(t.name, t.dev_id, t.size, t.mapped_blocks, t.transaction, t.creation_time, t.snap_time,
                  bool(t.read_only), t.external_origin) for t in p.thins()]
    assert want.mode == "read-only"  # a read-only activation reports ro, as dm-thin's read_only feature
    with DeviceTable.open(path) as t:
        # the table is opened only to look: it reports the mode a writable open finds
        assert t.status() == dataclasses.replace(want, mode="write")
        assert [tuple(v) for v in t.thins()] == thins


def test_pool_is_usable_after_a_table_snapshot(tmp_path: Path) -> None:
    path = _build(tmp_path / "p")
    with Pool.open(path, read_only=True) as p:
        before = p.thin("a").read(0, 5 * BS)
    with DeviceTable.open(path, read_only=False) as t:
        t.snapshot("a", "snap")
        t.commit()
        t.snapshot("snap", "snap-of-snap")  # a second tail commit on the same store
    with Pool.open(path) as p:
        counted = p.store.used_blocks()  # the tail commits' count, from the header
        assert counted == p.store.nr_blocks - p.store.state.count(0)  # ... equals a recount of every location
        p.delete("snap-of-snap")
        used = p.status().used_data_blocks
        p.thin("a").write(0, b"\xff" * 4096)  # breaks sharing with the table's snapshot
        assert p.status().used_data_blocks == used + 1
        assert p.thin("snap").read(0, 5 * BS) == before
        assert p.check().ok
    with Pool.open(path) as p:
        p.delete("snap")
        p.delete("a-old")
        p.commit()
        assert p.check().ok


def test_errors_name_the_problem_and_change_nothing(tmp_path: Path) -> None:
    path = _build(tmp_path / "p")
    md = Path(path, "metadata").read_bytes()
    with DeviceTable.open(path, read_only=False) as t:
        with pytest.raises(NotFound, match="'nope'"):
            t.snapshot("nope", "x")
        with pytest.raises(AlreadyExists, match="'b'"):
            t.snapshot("a", "b")
        with pytest.raises(InvalidArgument, match="out of range"):
            t.snapshot("a", "x", dev_id=1 << 24)
        with pytest.raises(AlreadyExists, match="device id 1 is in use"):
            t.snapshot("a", "x", dev_id=1)
        with pytest.raises(InvalidArgument, match="invalid volume name"):
            t.snapshot("a", "bad\nname")
    assert Path(path, "metadata").read_bytes() == md  # nothing to commit: nothing written
    with DeviceTable.open(path) as t:
        with pytest.raises(ReadOnly, match="read-only"):
            t.snapshot("a", "x")


def test_lock_is_shared_with_pool(tmp_path: Path) -> None:
    path = _build(tmp_path / "p")
    with Pool.open(path):
        with pytest.raises(PoolLocked):
            DeviceTable.open(path, read_only=False)
        with pytest.raises(PoolLocked):
            DeviceTable.open(path)
    with DeviceTable.open(path, read_only=False):
        with pytest.raises(PoolLocked):
            Pool.open(path, read_only=True)


class _StopAt:
    """Metadata writes that stop (as a crash would) at the n-th write or sync."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _tick(self) -> None:
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt("simulated crash")

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self._tick()
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        self._tick()
        os.fdatasync(fd)


def test_crash_at_every_write_of_a_table_commit(tmp_path: Path) -> None:
    base = _build(tmp_path / "base")
    old = _state(base)
    seen = set()
    for n in range(40):
        path = str(tmp_path / f"c{n}")
        shutil.copytree(base, path)
        saved, MetadataStore.io = MetadataStore.io, _StopAt(n)
        try:
            t = DeviceTable.open(path, read_only=False)
            crashed = False
            try:
                t.snapshot("a", "s")  # commits (a pool message)
            except KeyboardInterrupt:
                crashed = True
            t.close(commit=False)
        finally:
            MetadataStore.io = saved
        with Pool.open(path) as p:
            names = {x.name for x in p.thins()}
            assert p.check().ok
        assert names in ({"a", "a-old", "b"}, {"a", "a-old", "b", "s"})
        if names == {"a", "a-old", "b"}:
            assert _state(path)["metadata"] == old["metadata"]
        seen.add(crashed)
        if not crashed:
            break
    assert seen == {True, False}  # crashed at every write, then one run got through


def test_cli_status_ls_snapshot_do_not_import_numpy(tmp_path: Path) -> None:
    path = _build(tmp_path / "p")
    probe = ("import sys, runpy; sys.argv = ['thinpool'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('thinpool', run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print('NUMPY' if 'numpy' in sys.modules else 'NO-NUMPY', file=sys.stderr)")
    for args in (["status", path], ["ls", path], ["snapshot", path, "a", "cli-snap"], ["ls", path, "--json"]):
        r = subprocess.run([sys.executable, "-c", probe] + args, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip().endswith("NO-NUMPY"), (args, r.stderr)
    r = subprocess.run([sys.executable, "-m", "thinpool", "ls", path, "--usage"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "EXCLUSIVE" in r.stdout and "cli-snap" in r.stdout
    with Pool.open(path, read_only=True) as p:
        assert p.thin("cli-snap").read(0, 5 * BS) == p.thin("a").read(0, 5 * BS)


def test_metadata_checksum_is_crc32c() -> None:
    """The store loads crc32c's C function without the package's __init__ (import time); it must be
    CRC-32C itself: the standard check value, and the package's own function on random pages."""
    import crc32c

    from thinpool.mdpages import checksum
    assert checksum(b"123456789") == 0xE3069283
    rng = np.random.default_rng(3)
    for _ in range(20):
        page = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        assert checksum(page) == crc32c.crc32c(page)


def test_the_next_device_id_is_checked_in_use_by_a_byte_search_that_matches_only_dev_id_fields(tmp_path):
    """``snapshot`` asks whether its next device id is in use with a byte search of the device table
    (no set of every id): it answers as the set of in-use ids does -- a value equal to another field
    (a size of 512, a creation time) is not an id, a deleted volume's id is free -- and the id picked
    skips an id in use (as dm-thin refuses a device id that exists)."""
    from thinpool.devtable import _DevIds
    with Pool.create(tmp_path / "p", data_size=64 * 65536, metadata_only=True) as p:
        p.create_thin("a", 512)  # size 512: the bytes of id 512 in another field
        for i in range(6):
            p.snapshot("a", f"s{i}")  # creation times 1..6 in another field
        p.snapshot("a", "taken", dev_id=9)
        p.delete("s2")
        gone = p.thin("s3").dev_id
        p.delete("s3")
        p.rename("s4", "s4b")
    with DeviceTable.open(tmp_path / "p", read_only=False) as t:
        in_use = set(t._dev_ids_in_use())
        assert gone not in in_use and 9 in in_use
        for dev_id in range(1, 600):
            assert t._dev_id_in_use(dev_id) == (dev_id in in_use), dev_id
        assert (9 in _DevIds(t)) and (gone not in _DevIds(t)) and (512 not in _DevIds(t))
        t.header["next_dev_id"] = 9  # the next id is in use: the one after it is picked
        assert t.snapshot("a", "after").dev_id == 10


def _store(path) -> MetadataStore:
    store = MetadataStore(os.path.join(path, "metadata"), read_only=True)
    store.load(only=())
    return store


def test_metadata_top_hint_equals_a_recomputation_after_every_kind_of_commit(tmp_path: Path) -> None:
    """Every commit records the highest metadata block its state uses (``metadata_top``), so a
    DeviceTable's tail commit starts past it without a pass over every page location: after
    ordinary commits (allocations, a delete's releases), tail commits (a table's snapshots, one and a
    batch) and a reopen, the hint equals the maximum recomputed from the locations.  A hint whose
    generation is not the state's (carried over by a commit that did not know hints) is ignored."""
    path = _build(tmp_path / "p")

    def check() -> None:
        store = _store(path)
        try:
            assert store.hint("metadata_top") == store.top_located()
        finally:
            store.close()
    check()
    with DeviceTable.open(path, read_only=False) as t:
        t.snapshot("a", "t1")  # a tail commit
        assert t.store.hint("metadata_top") == t.store.top_located()
        with t.batch():
            t.snapshot("a", "t2")
            t.snapshot("b", "t3")
    check()
    with Pool.open(path) as p:
        p.thin("a").write(3 * BS, b"y" * BS)
        p.delete("t1")
        p.commit()
        assert p._store.hint("metadata_top") == p._store.top_located()
    check()
    store = _store(path)
    try:
        store.header["hints"] = dict(store.header["hints"], generation=store.generation - 1)
        assert store.hint("metadata_top") is None and store.hint("dev_id_max") is None
    finally:
        store.close()


def test_dev_id_bound_hint_covers_every_id_in_use_after_create_delete_rename_and_reopen(tmp_path: Path) -> None:
    """Every commit records ``dev_id_max``, an id no device in use exceeds, so ``snapshot`` knows its
    next id is free without searching the device table; the lookup answers as the set of in-use ids
    for every id after creates (an explicit high id too), deletes, a rename, table snapshots and
    reopens, and with a stale hint it falls back to the table."""
    from thinpool.devtable import _DevIds
    path = str(tmp_path / "p")
    with Pool.create(path, data_size=64 * BS, metadata_only=True) as p:
        p.create_thin("a", 512)
        for i in range(4):
            p.snapshot("a", f"s{i}")
        p.create_thin("high", 4096, dev_id=40)
        p.delete("s1")
    steps = [lambda p: p.delete("high"), lambda p: p.rename("s2", "s2b"), lambda p: p.create_thin("c", 4096)]
    for k, step in enumerate(steps + [None]):
        with DeviceTable.open(path, read_only=False) as t:
            in_use = set(t._dev_ids_in_use())
            bound = t.store.hint("dev_id_max")
            assert bound is not None and bound >= max(in_use)
            for dev_id in range(1, 140):
                assert t._dev_id_in_use(dev_id) == (dev_id in in_use), dev_id
            snap = t.snapshot("a", f"t{k}")
            assert snap.dev_id not in in_use
            big = t.snapshot("a", f"u{k}", dev_id=100 + 10 * k)
            assert t._dev_id_bound() >= big.dev_id and big.dev_id in _DevIds(t)
        with Pool.open(path) as p:  # a full open sees the table's snapshots, and its commits record the bound
            assert {v.dev_id for v in p.thins()} == in_use | {snap.dev_id, big.dev_id}
            if step is not None:
                step(p)
    with DeviceTable.open(path, read_only=False) as t:
        in_use = set(t._dev_ids_in_use())
        t.store.header["hints"] = dict(t.store.header["hints"], generation=t.store.generation + 1)
        t._bound = None
        assert t._dev_id_bound() == max(in_use)
        for dev_id in range(1, 140):
            assert t._dev_id_in_use(dev_id) == (dev_id in in_use), dev_id


def _scan(t: DeviceTable) -> tuple[int, int]:
    """(first free slot, devices in use) of a table, counted over every slot."""
    used = t._in_use()
    first = used.find(0)
    return (len(used) if first < 0 else first), used.count(1)


def test_free_slot_and_device_count_hints_match_the_table_and_spare_the_reads(tmp_path: Path) -> None:
    """Every commit records the first free device-table slot and the number of devices, so a
    DeviceTable reads the table a page at a time: ``status`` reads none of its pages, a snapshot only
    the origin's page, its slot's and the pages up to the next free slot.  After deletes (holes that
    the next snapshots take, as Pool.snapshot would), table snapshots filling a page, Pool commits and
    reopens, both hints equal a count over the whole table, and a stale hint falls back to that count."""
    path = str(tmp_path / "p")
    with Pool.create(path, data_size=64 * BS, metadata_only=True) as p:
        p.create_thin("a", 512)
        with p.batch():
            for i in range(70):  # two pages of slots
                p.snapshot("a", f"s{i}")
        p.delete("s3")
        p.delete("s10")
    for round_ in range(3):
        with DeviceTable.open(path) as t:
            used = t._in_use()
            holes = [i for i, u in enumerate(used) if not u][:2]  # where Pool.snapshot would put two
            count = used.count(1)
        with DeviceTable.open(path, read_only=False) as t:
            assert t.store.hint("free_slot") == holes[0] and t.store.hint("nr_thins") == count
            assert t.status().nr_thins == count and t._devs_read == set()  # no page read for the status
            taken = [t.snapshot("a", f"r{round_}-{k}").name for k in range(2)]
            assert t._devs_read is not None and len(t._devs_read) <= 2
            assert [t._find(n) for n in taken] == holes
        with DeviceTable.open(path) as t:
            assert (t.store.hint("free_slot"), t.store.hint("nr_thins")) == _scan(t)
            assert t._nr_thins() == count + 2
        with Pool.open(path) as p:
            if round_ == 0:
                p.delete("s20")
            else:
                p.create_thin(f"c{round_}", 512)
        with DeviceTable.open(path) as t:
            assert (t.store.hint("free_slot"), t.store.hint("nr_thins")) == _scan(t)
    with DeviceTable.open(path, read_only=False) as t:
        expect = _scan(t)
        t.store.header["hints"] = dict(t.store.header["hints"], generation=t.store.generation + 1)
        t._free = t._count = None
        assert (t._first_free(), t._nr_thins()) == expect


def test_a_damaged_device_table_page_is_a_clear_error_of_the_light_commands_and_changes_nothing(tmp_path: Path) -> None:
    """The light path reads device-table pages when first needed (status none, ls all, snapshot a few):
    a damaged page is reported as MetadataCorrupt naming its metadata block, the command fails with
    that message and writes nothing; a command that needs no device-table page still answers."""
    path = _build(tmp_path / "p")
    store = _store(path)
    try:
        block = store.locs["devs"][0] >> 32
    finally:
        store.close()
    assert block
    meta = os.path.join(path, "metadata")
    with open(meta, "r+b") as f:
        f.seek(block * 4096 + 200)
        f.write(b"\x5a" * 16)
    before = Path(meta).read_bytes()
    for args in (["ls", path], ["snapshot", path, "a", "s-new"]):
        r = subprocess.run([sys.executable, "-m", "thinpool"] + args, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0, (args, r.stdout)
        assert f"block {block}" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert Path(meta).read_bytes() == before, args
    r = subprocess.run([sys.executable, "-m", "thinpool", "status", path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(meta).read_bytes() == before
