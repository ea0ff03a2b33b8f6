"""Pool's public surface: real signatures, the public lock, read-only views, handles bound to the
device (id, generation), the shared rules and the one ``__exit__`` policy of Pool and DeviceTable."""

from __future__ import annotations

import inspect
import threading

import numpy as np
import pytest

from thinpool import Pool
from thinpool.devtable import DeviceTable
from thinpool.errors import InvalidArgument, NotFound, ReadOnly
from thinpool.rules import LightPool, VolumeInfo, derive_mode, free_slot, snapshot_records
from thinpool.schema import DevFlag, Mode
from thinpool.thin import Thin


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(tmp_path / "pool", data_size="16MiB")
    yield p
    p.close(commit=False)


def _public_methods(cls):
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") or not callable(member) or isinstance(member, type):
            continue
        yield name, member


@pytest.mark.parametrize("cls", [Pool, Thin, DeviceTable])
def test_every_public_method_has_its_real_signature(cls):
    """The locking wrapper keeps signatures (help() and IDEs show them, not ``*args, **kwargs``)."""
    seen = 0
    for name, fn in _public_methods(cls):
        sig = inspect.signature(fn)
        assert list(sig.parameters)[-2:] != ["args", "kwargs"], f"{cls.__name__}.{name}{sig}"
        seen += 1
    assert seen >= 5
    if cls is Pool:
        assert list(inspect.signature(Pool.snapshot).parameters) == ["self", "origin", "name", "dev_id", "read_only"]
        assert inspect.signature(Pool.snapshot).parameters["dev_id"].kind is inspect.Parameter.KEYWORD_ONLY
        assert Pool.snapshot.__wrapped__ is not None  # functools.wraps: the undecorated function is reachable


def test_locked_is_the_pool_lock_and_reentrant(pool):
    v = pool.create_thin("v", "1MiB")
    got = []
    with pool.locked():
        v.write(0, b"x" * 10)  # the handle takes the same re-entrant lock

        def other():
            got.append("waiting")
            with pool.locked():
                got.append(v.read(0, 1))
        t = threading.Thread(target=other)
        t.start()
        t.join(0.2)
        assert t.is_alive() and got == ["waiting"]  # blocked while we hold it
    t.join(5)
    assert got == ["waiting", b"x"]


def test_views_are_read_only(pool):
    pool.create_thin("v", "1MiB")
    for arr in (pool.devs, pool.st):
        with pytest.raises(ValueError):
            arr[0] = 1
    with pytest.raises(TypeError):
        pool.header["transaction_id"] = 7  # type: ignore[index]
    with pytest.raises(AttributeError):
        pool.devs = np.zeros(1)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        pool.mode = "fail"  # type: ignore[misc]
    assert pool.transaction_id == 0


def test_handle_follows_a_rename(pool):
    v = pool.create_thin("a", "1MiB")
    v.write(0, b"abc")
    pool.rename("a", "b")
    assert v.name == "b" and v.read(0, 3) == b"abc"
    v.write(3, b"d")
    assert pool.thin("b").read(0, 4) == b"abcd" and v == pool.thin("b")


def test_deleted_handle_raises_not_found_naming_it_even_if_the_id_is_reused(pool):
    v = pool.create_thin("a", "1MiB", dev_id=5)
    v.write(0, b"old")
    pool.delete("a")
    with pytest.raises(NotFound, match="'a'"):
        v.read(0, 3)
    w = pool.create_thin("a", "1MiB", dev_id=5)  # same name, same device id: a different volume
    w.write(0, b"new")
    for call in (lambda: v.read(0, 3), lambda: v.write(0, b"x"), lambda: v.size, lambda: v.mappings(),
                 lambda: v.discard(0, 1 << 16)):
        with pytest.raises(NotFound, match="'a'"):
            call()
    assert w.read(0, 3) == b"new" and v != w


def test_a_handle_to_an_aborted_volume_never_addresses_its_successor(pool):
    pool.commit()
    with pool.batch():  # the create waits for the batch's commit
        v = pool.create_thin("a", "1MiB", dev_id=5)  # never committed
        v.write(0, b"old")
        pool.abort()
        w = pool.create_thin("a", "1MiB", dev_id=5)  # same name, id and (catalog-wise) generation
        w.write(0, b"new")
    with pytest.raises(NotFound, match="'a'"):
        v.read(0, 3)
    assert w.read(0, 3) == b"new"


def test_handle_survives_abort_and_reload(pool):
    v = pool.create_thin("a", "1MiB")
    pool.commit()
    v.write(0, b"abc")
    pool.abort()
    assert v.read(0, 3) == bytes(3)
    with pool.batch():
        pool.snapshot("a", "s")
        pool.abort()
    assert "s" not in pool and v.name == "a"


def test_pool_exit_commits_only_on_success(tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, data_size="16MiB") as p:
        p.create_thin("kept", "1MiB").write(0, b"k")
    with pytest.raises(RuntimeError):
        with Pool.open(path) as p:
            p.create_thin("message", "1MiB")  # a pool message commits at once (dm-thin's rule)
            p.thin("kept").write(1 << 17, b"X")  # a new block: its mapping is metadata
            raise RuntimeError("the block failed")
    with Pool.open(path, read_only=True) as p:
        kept = p.thin("kept")
        assert "message" in p and kept.read(0, 1) == b"k" and kept.read(1 << 17, 1) == b"\0"
        assert kept.mapped_blocks == 1


def test_devtable_exit_commits_only_on_success(tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, data_size="16MiB") as p:
        p.create_thin("o", "1MiB")
    with pytest.raises(RuntimeError):
        with DeviceTable.open(path, read_only=False) as t, t.batch():
            t.snapshot("o", "s")
            raise RuntimeError("the block failed")
    with DeviceTable.open(path, read_only=False) as t:
        assert [v.name for v in t.thins()] == ["o"]
        t.snapshot("o", "s")
        t.snapshot("o", "s2")
    with DeviceTable.open(path) as t:
        assert [v.name for v in t.thins()] == ["o", "s", "s2"]
    with pytest.raises(RuntimeError):
        with DeviceTable.open(path, read_only=False) as t:
            t.snapshot("o", "s3")  # outside a batch a snapshot commits at once, as Pool.snapshot
            raise RuntimeError("the block failed")
    with DeviceTable.open(path) as t:
        assert [v.name for v in t.thins()] == ["o", "s", "s2", "s3"]


def test_shared_rules():
    assert derive_mode(True) is Mode.READ_ONLY
    assert derive_mode(False, read_only=True) is Mode.READ_ONLY
    assert derive_mode(False) is Mode.WRITE  # out-of-data-space is entered by an allocation, never derived
    assert free_slot([1, 3, 0, 1]) == 2 and free_slot([1, 3]) is None and free_slot([2]) == 0
    origin = dict(dev_id=1, root=9, mapped=4, transaction=0, creation_time=0, snap_time=0, size=512, flags=1)
    o, s = snapshot_records(origin, 2, 3, 7, True)
    assert o["snap_time"] == 7 and origin["snap_time"] == 0
    assert s == dict(dev_id=2, root=9, mapped=4, transaction=3, creation_time=7, snap_time=7, size=512,
                     flags=int(DevFlag.IN_USE | DevFlag.READ_ONLY))


def test_pool_and_devtable_are_light_pools(pool, tmp_path):
    v = pool.create_thin("v", "1MiB")
    assert isinstance(pool, LightPool) and isinstance(v, VolumeInfo)
    pool.close()
    with DeviceTable.open(pool.path) as t:
        assert isinstance(t, LightPool) and isinstance(t.thin("v"), VolumeInfo)


def test_closed_and_read_only_rules_are_shared(pool, tmp_path):
    pool.create_thin("v", "1MiB")
    pool.close()
    with pytest.raises(InvalidArgument, match="closed"):
        pool.status()
    with DeviceTable.open(pool.path) as t:
        with pytest.raises(ReadOnly, match="opened read-only"):
            t.snapshot("v", "s")
    with Pool.open(pool.path, read_only=True) as p:
        with pytest.raises(ReadOnly, match="opened read-only"):
            p.snapshot("v", "s")
