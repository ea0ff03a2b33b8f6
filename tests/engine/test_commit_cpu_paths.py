"""The shortcuts a small commit takes to cost less CPU give what the long way gives (docs/performance.md,
CF1): the hints kept from the last commit while no device slot changed its device, the superblock's
JSON through a C encoder made once, the directory's parts and ``commit_floor`` carried over from the
commit before, the metadata check's page bound counted before the last flush.
"""

from __future__ import annotations

import random

import numpy as np

from thinpool import Pool
from thinpool.schema import DevFlag

BS = 64 * 1024


def _scan(pool: Pool) -> dict[str, int]:
    """The hints counted from the whole device table (what a commit without the kept ones records)."""
    devs = pool._devs
    used = (devs["flags"] & int(DevFlag.IN_USE)) != 0
    ids = devs["dev_id"][used]
    free = np.flatnonzero(~used)
    return {"dev_id_max": int(ids.max()) if len(ids) else 0, "nr_thins": len(ids),
            "free_slot": int(free[0]) if len(free) else len(devs)}


def test_kernel_rule_every_commit_records_the_device_hints_of_the_table_it_commits(tmp_path, monkeypatch) -> None:
    """Creates, snapshots, deletes (the largest id too), writes, batches of several messages, aborted
    messages and reopens in random order, each committed: after every commit the recorded hints
    (``dev_id_max``, ``nr_thins``, ``free_slot``) are those of a scan of the table -- also when a slot
    is reused by another device id, across a table that grows past a page, and after a reopen or an
    abort (the hints kept by the pool are counted again from the table it loads).  Most commits update
    the kept hints from the changed slots instead of scanning (the point of keeping them)."""
    from thinpool import device_hints
    kept = []
    update = device_hints.update

    def counting(*args):
        out = update(*args)
        kept.append(out is not None)
        return out
    monkeypatch.setattr(device_hints, "update", counting)
    rng = random.Random(7)
    path = tmp_path / "p"
    p = Pool.create(path, data_size=64 * BS, block_size=BS)
    names: list[str] = []
    made = 0

    def create() -> None:
        nonlocal made
        made += 1
        names.append(f"v{made}")
        p.create_thin(names[-1], 16 * BS, dev_id=rng.choice([None, 1000 + made]))

    for step in range(240):
        op = rng.random()
        if not names or op < 0.3:
            create()
        elif op < 0.45:
            made += 1
            origin = rng.choice(names)
            names.append(f"s{made}")
            p.snapshot(origin, names[-1])
        elif op < 0.6:
            p.delete(names.pop(rng.randrange(len(names))))
        elif op < 0.65:  # the device with the largest id leaves
            largest = max(names, key=lambda n: p.thin(n).dev_id)
            names.remove(largest)
            p.delete(largest)
        elif op < 0.72:  # several messages, one commit
            with p.batch():
                for _ in range(rng.randint(2, 5)):
                    if names and rng.random() < 0.4:
                        p.delete(names.pop(rng.randrange(len(names))))
                    else:
                        create()
        elif op < 0.77:  # messages dropped by an abort, then a commit of something else
            before = list(names)
            with p.batch():
                create()
                p.delete(names.pop(0))
                p.abort()
            names[:] = before
            p.thin(rng.choice(names)).write(rng.randrange(16) * BS, b"y" * 4096)
            p.commit()
        elif op < 0.8:
            p.close()
            p = Pool.open(path)
            create()
        else:
            p.thin(rng.choice(names)).write(rng.randrange(16) * BS, b"x" * 4096)
            p.commit()
        hints = p._store.header["hints"]
        assert {k: hints[k] for k in ("dev_id_max", "nr_thins", "free_slot")} == _scan(p), step
    assert made > 64  # the table grew past one page of slots
    assert kept.count(True) > 2 * kept.count(False) > 0
    p.close()


def test_kernel_rule_a_commit_after_an_abort_records_the_hints_of_the_table_it_reloaded(tmp_path) -> None:
    """A commit that failed (the host refused its writes: the changes are kept) made hints for a table
    the abort that follows throws away; the next commit records the hints of the table the abort
    reloaded (the last committed one), not the kept ones of the dropped table."""
    from thinpool.errors import HostIOError
    p = Pool.create(tmp_path / "p", data_size=64 * BS, block_size=BS)
    for i in range(3):
        p.create_thin(f"v{i}", 16 * BS)
    real = p._store.commit

    def refused(*args, **kwargs):
        raise HostIOError("injected: the host refused the commit's writes")
    with p.batch():
        p.create_thin("new", 16 * BS, dev_id=77)
        p.delete("v0")
        p._store.commit = refused
        try:
            p.commit()
        except HostIOError:
            pass
        p._store.commit = real
        p.abort()
    assert sorted(t.name for t in p.thins()) == ["v0", "v1", "v2"]
    p.thin("v1").write(0, b"z" * 4096)
    p.commit()
    hints = p._store.header["hints"]
    assert {k: hints[k] for k in ("dev_id_max", "nr_thins", "free_slot")} == _scan(p) == \
        {"dev_id_max": 3, "nr_thins": 3, "free_slot": 3}


def _floor_counted(store) -> int:
    """``commit_floor`` counted from the page maps (what it gives without the carried-over count)."""
    return 2 * sum(1 for pml in store.pm_locs.values() if any(pml)) + max(1, len(store.dir_locs))


def test_commit_floor_and_directory_carried_over_are_those_counted_afresh(tmp_path) -> None:
    """Commits of random writes, trims, snapshots and deletes, a failed commit and reopens between
    them: after each, the store's ``commit_floor`` (carried over from commit to commit, counting only
    the arrays a commit changed) equals the count over every page map, the pool's metadata check
    threshold (its page bound counted while the superblock's write-back ran) equals one counted
    after the commit, and the directory a reopen reads (written with the parts of unchanged arrays
    kept from the commit before) is the page maps the store holds."""
    from thinpool import mdstore
    from thinpool.errors import HostIOError

    class FailingWrite(mdstore.FileIO):
        @staticmethod
        def pwrite(fd: int, data, offset: int) -> int:
            raise OSError(5, "injected")

    rng = random.Random(11)
    path = tmp_path / "p"
    p = Pool.create(path, data_size=256 * BS, block_size=BS)
    p.create_thin("v", 256 * BS)
    for step in range(120):
        op = rng.random()
        v = p.thin("v")
        if op < 0.6:
            v.write(rng.randrange(256) * BS, b"y" * 4096)
        elif op < 0.7:
            v.discard(rng.randrange(256) * BS, BS)
        elif op < 0.8:
            name = f"s{step}"
            p.snapshot("v", name)
            if rng.random() < 0.5:
                p.delete(name)
        elif op < 0.85:
            v.write(rng.randrange(256) * BS, b"z" * 4096)
            p._store.io = FailingWrite()
            try:
                try:
                    p.commit()
                except HostIOError:
                    pass
            finally:
                p._store.io = mdstore.FileIO()
        elif op < 0.9:
            p.close()
            p = Pool.open(path)
        p.commit()
        store = p._store
        assert store.commit_floor() == _floor_counted(store), step
        kept = p._md_check_below  # (its page bound counted by the bookkeeping, before the last flush)
        p._set_md_check()
        assert p._md_check_below == kept, step
        again = mdstore.MetadataStore(store.path, read_only=True)
        try:
            again.load(only=())
            assert {k: list(v) for k, v in again.pm_locs.items()} == {k: list(v) for k, v in store.pm_locs.items()}
        finally:
            again.close()
    p.close()
