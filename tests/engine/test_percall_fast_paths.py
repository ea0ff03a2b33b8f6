"""The per-call fast paths of ``Thin.write`` (bytes: one call of the bound ``kernels.write_bytes``;
other buffers: one ``write_one`` call) and ``Thin.read`` (one block: sliced from the data file's map,
a hole as zeroes) keep dm-thin's rules, and give what the general paths give:

* a write to a block shared with a snapshot (dm-thin's time rule) breaks sharing -- never in place;
* a read of an unprovisioned block returns zeroes; a discarded block reads as zeroes again;
* a read-only volume refuses the write, an I/O past the end is refused, and nothing changes;
* in a metadata-only pool nothing is stored, reads are zeroes;
* the bytes path's results, errors and pool state equal the other paths' over random operations; a
  kernel table out of date (an array reallocated) is never used; with a compiled reader registered the
  write moves the lock's generation as ``with lock`` does.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import pytest

from thinpool import Pool
from thinpool.errors import InvalidArgument, ReadOnly, ThinpoolError

KiB = 1024
BS = 64 * KiB


def test_kernel_rule_per_call_overwrite_of_shared_block_breaks_sharing(scratch: str) -> None:
    with Pool.create(f"{scratch}/p", data_size="8MiB", block_size=BS) as p:
        v = p.create_thin("v", "1MiB")
        v.write(0, b"a" * BS)
        v.write(0, b"b" * 4096)  # provisioned, unshared: in place
        assert v.mapped_blocks == 1 and p.status().used_data_blocks == 1
        s = p.snapshot("v", "s")
        v.write(100, b"c" * 10)  # shared by the time rule: a new block, the rest copied
        assert s.read(0, 4096) == b"b" * 4096 and s.read(4096, 10) == b"a" * 10
        assert v.read(0, 200) == b"b" * 100 + b"c" * 10 + b"b" * 90
        assert v.read(4096, 10) == b"a" * 10
        assert p.status().used_data_blocks == 2
        v.write(200, b"d" * 10)  # now exclusive again: in place, no new block
        assert p.status().used_data_blocks == 2
        s.write(0, b"e" * 4)  # the snapshot's block is its own now (the origin moved): in place
        assert s.read(0, 6) == b"eeeebb" and v.read(0, 4) == b"bbbb"


def test_kernel_rule_unprovisioned_and_discarded_blocks_read_zero_per_call(scratch: str) -> None:
    with Pool.create(f"{scratch}/p", data_size="8MiB", block_size=BS) as p:
        v = p.create_thin("v", "1MiB")
        assert v.read(3 * BS + 5, 4096) == bytes(4096)
        v.write(3 * BS, b"x" * BS)
        v.write(4 * BS - 2, b"yyyy")  # across two blocks: the kernel's general case
        assert v.read(4 * BS - 4, 8) == b"xxyyyy\0\0"
        v.discard(3 * BS, BS)
        assert v.read(3 * BS + 5, 4096) == bytes(4096)
        assert v.read(4 * BS, 2) == b"yy"


def test_per_call_fast_paths_refuse_like_the_general_path(scratch: str) -> None:
    with Pool.create(f"{scratch}/p", data_size="8MiB", block_size=BS) as p:
        v = p.create_thin("v", "1MiB")
        v.write(0, b"z" * 4096)
        with pytest.raises(InvalidArgument, match="past the end"):
            v.write(v.size - 10, b"q" * 4096)
        with pytest.raises(InvalidArgument, match="past the end"):
            v.read(v.size - 10, 4096)
        with pytest.raises(InvalidArgument, match="negative"):
            v.read(-4096, 10)
        with pytest.raises(InvalidArgument):
            v.write(1 << 63, b"q")
        p.set_read_only("v", True)
        with pytest.raises(ReadOnly):
            v.write(0, b"w" * 4096)
        assert v.read(0, 4096) == b"z" * 4096


def test_metadata_only_pool_per_call_stores_nothing(scratch: str) -> None:
    with Pool.create(f"{scratch}/p", data_size="1GiB", block_size=BS, metadata_only=True) as p:
        v = p.create_thin("v", "64MiB")
        v.write(0, b"x" * 4096)
        v.write(0, b"y" * 4096)
        assert v.mapped_blocks == 1
        assert v.read(0, 4096) == bytes(4096)
        assert np.asarray(v.read_many([0, BS], 16)).sum() == 0


def test_thin_hole_code_is_the_kernels() -> None:
    from thinpool import kernels, thin_reads
    assert thin_reads._HOLE == kernels.HOLE and thin_reads._HOLE not in (kernels.NOT_HANDLED, kernels.END_OF_FILE,
                                                                        kernels.ORIGIN_ERROR)


# ---------------------------------------------------------------------- the bytes path (kernels.write_bytes)
def _differential_ops(rng: np.random.Generator, size: int, n: int) -> list[tuple]:
    """Random operations for two pools: writes of every kind of offset and length (inside one block,
    across blocks, past the end, at the end, empty, negative), snapshots, discards, read-only flips,
    commits."""
    ops: list[tuple] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.72:
            kind = rng.integers(0, 6)
            if kind == 0:
                off = int(rng.integers(0, size // 4096)) * 4096
                length = 4096
            elif kind == 1:
                off, length = int(rng.integers(0, size)), int(rng.integers(1, 3 * BS))
            elif kind == 2:
                off, length = size - int(rng.integers(0, 300)), int(rng.integers(1, 600))
            elif kind == 3:
                off, length = int(rng.integers(0, size)), 0
            elif kind == 4:
                off, length = -int(rng.integers(1, 5000)), 16
            else:
                off, length = int(rng.integers(0, size // BS)) * BS, BS
            vol = "v" if rng.random() < 0.8 else "s"
            ops.append(("write", vol, off, rng.integers(0, 256, length, dtype=np.uint8).tobytes()))
        elif r < 0.8:
            ops.append(("snapshot",))
        elif r < 0.88:
            ops.append(("discard", int(rng.integers(0, size)), int(rng.integers(0, 4 * BS))))
        elif r < 0.94:
            ops.append(("read_only", "v" if rng.random() < 0.5 else "s", bool(rng.random() < 0.5)))
        else:
            ops.append(("commit",))
    return ops


def _names(p: Pool) -> list[str]:
    return [t.name for t in p.thins()]


def _state(p: Pool, size: int) -> tuple:
    vols = tuple((name, p.thin(name).read(0, size), p.thin(name).mapped_blocks, p.thin(name).read_only)
                 for name in sorted(_names(p)))
    return vols, p.status().used_data_blocks, p.mode


def _apply(p: Pool, op: tuple, how: str, snaps: list[int]) -> object:
    """One operation on pool ``p``; a write goes the way ``how`` names: ``bytes`` (Thin.write's bytes
    path), ``array`` (its path for other buffers: a writable copy) or ``batch`` (write_many)."""
    try:
        if op[0] == "write":
            _, vol, off, data = op
            v = p.thin(vol)
            if how == "bytes":
                return v.write(off, data)
            if how == "array":
                return v.write(off, np.frombuffer(data, np.uint8).copy())
            if off < 0:
                return v.write_many(np.array([off], np.int64), [data])  # (as_offsets refuses it)
            return v.write_many([off], [data])
        if op[0] == "snapshot":
            snaps[0] += 1
            if "s" in _names(p):
                p.delete("s")
            p.snapshot("v", "s")
            return None
        if op[0] == "discard":
            return p.thin("v").discard(op[1], op[2])
        if op[0] == "read_only":
            if op[1] in _names(p):
                p.set_read_only(op[1], op[2])
            return None
        p.commit()
        return None
    except ThinpoolError as e:  # compared between the pools
        return (type(e).__name__, str(e).replace(p.path, "POOL") if how != "batch" else "")


def test_per_call_bytes_write_matches_the_general_paths_over_random_inputs(scratch: str) -> None:
    """The bytes fast path (one compiled write_bytes call) gives the results, the errors and the pool
    state the other paths give for the same operations -- including a pool that runs out of space
    (``error_if_no_space``), snapshots (copy-on-write breaks), read-only volumes and discards."""
    rng = np.random.default_rng(7)
    size = 24 * BS
    ops = _differential_ops(rng, size, 400)
    pools = {how: Pool.create(f"{scratch}/{how}", data_size=20 * BS, block_size=BS, error_if_no_space=True)
             for how in ("bytes", "array", "batch")}
    try:
        snaps = {how: [0] for how in pools}
        for p in pools.values():
            p.create_thin("v", size)
        seen: set[str] = set()
        for i, op in enumerate(ops):
            got = {how: _apply(p, op, how, snaps[how]) for how, p in pools.items()}
            if op[0] == "write":
                seen.add(got["bytes"][0] if isinstance(got["bytes"], tuple) else "written")
            assert got["bytes"] == got["array"], (i, op[:3], got)
            if isinstance(got["bytes"], tuple):
                assert got["batch"][0] == got["bytes"][0], (i, op[:3], got)
            else:
                assert got["batch"] == got["bytes"], (i, op[:3], got)
            if i % 25 == 0:
                assert len({_state(p, size) for p in pools.values()}) == 1, i
        for how, p in pools.items():  # what each path committed is the same after a reopen
            p.close()
            pools[how] = Pool.open(f"{scratch}/{how}")
        assert len({_state(p, size) for p in pools.values()}) == 1
        # every outcome was met: writes, the pool full, the end of the volume, a read-only volume
        assert {"written", "NoSpace", "InvalidArgument", "ReadOnly"} <= seen, seen
    finally:
        for p in pools.values():
            p.close()


def test_per_call_bytes_write_after_the_node_store_grew(scratch: str) -> None:
    """The bound write_bytes entry takes the kernel table with the epoch it was built at: after an
    array was reallocated (here the node store grown: ``st[ST_EPOCH]`` moves) the kernel answers
    STALE_TABLE and does nothing, and the next Thin.write builds the table again and writes."""
    from thinpool import kernels, schema
    with Pool.create(f"{scratch}/p", data_size="64MiB", block_size=BS) as p:
        v = p.create_thin("v", "64MiB")
        v.write(0, b"a" * 4096)
        ctx = p._engine
        old_tab, old_epoch = ctx.tab, ctx.tab_epoch
        ctx.nodes_map.ensure(4096, 4096)  # reallocates the node arrays
        assert int(ctx.st[schema.ST_EPOCH]) != old_epoch
        slot = ctx.slots[v._key]
        assert ctx.write_bytes_fn(old_tab, old_epoch, ctx.devs_i, slot, b"b" * 4096, ctx.data.fd, 0, -1, 0) == \
            kernels.STALE_TABLE
        assert v.read(0, 4096) == b"a" * 4096  # nothing written
        assert v.write(0, b"c" * 4096) == 4096 and v.write(5 * BS, b"d" * 10) == 10
        assert ctx.tab_epoch == int(ctx.st[schema.ST_EPOCH])
        assert v.read(0, 4096) == b"c" * 4096 and v.read(5 * BS, 10) == b"d" * 10 and v.mapped_blocks == 2
        assert kernels.STALE_TABLE not in (kernels.NOT_HANDLED, kernels.END_OF_FILE, kernels.ORIGIN_ERROR,
                                           kernels.HOLE) and kernels.STALE_TABLE < 0



@contextmanager
def _registered_reader(lock: Any) -> Iterator[None]:
    """A compiled reader registered on ``lock`` (as an NBD connection's loop registers one) by another
    thread, for the duration of the block; dropped at its end."""
    registered, done = threading.Event(), threading.Event()

    def reader() -> None:
        with lock:
            lock.add_reader()
        registered.set()
        done.wait(30)
        with lock:
            lock.drop_reader()

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert registered.wait(30)
        yield
    finally:
        done.set()
        t.join(30)


def test_per_call_bytes_write_with_a_compiled_reader_registered_moves_the_generation(scratch: str) -> None:
    """Thin.write takes the pool lock the plain (C) way; with a compiled reader of another thread
    registered it holds it as ``with lock`` does: the generation moves (the reader binds again before
    its next read, never reading a half-changed map) and the write side is released after.  With no
    reader registered nothing moves."""
    import ctypes

    from thinpool import poollock
    with Pool.create(f"{scratch}/p", data_size="8MiB", block_size=BS) as p:
        v = p.create_thin("v", "1MiB")
        v.write(0, b"a" * 4096)
        lock = p._engine.lock
        g = int(lock.gen[0])
        v.write(0, b"b" * 4096)
        v.write(BS, b"b" * 4096)
        assert int(lock.gen[0]) == g
        with _registered_reader(lock):
            g = int(lock.gen[0])
            assert v.write(0, b"c" * 4096) == 4096  # an overwrite in place
            assert int(lock.gen[0]) == g + 1
            assert v.write(2 * BS, b"c" * 4096) == 4096  # a first write
            assert int(lock.gen[0]) == g + 2
            rd = poollock._lib.pthread_rwlock_tryrdlock
            rd.argtypes = [ctypes.c_void_p]
            assert rd(lock.rw_address) == 0  # the write side is free again
            poollock._lib.pthread_rwlock_unlock(lock.rw_address)
        assert v.read(0, 4096) == b"c" * 4096 and v.read(2 * BS, 4096) == b"c" * 4096
        assert lock.acquire(blocking=False)  # released
        lock.release()


def test_per_call_bytes_write_releases_the_lock_when_excluding_readers_fails(scratch: str, monkeypatch) -> None:
    """If taking the write side against a registered reader fails (pthread_rwlock_wrlock's error), the
    write raises and leaves the pool lock as it found it: not held, depth 0 -- no thread is locked out."""

    from thinpool import poollock
    with Pool.create(f"{scratch}/p", data_size="8MiB", block_size=BS) as p:
        v = p.create_thin("v", "1MiB")
        v.write(0, b"a" * 4096)
        lock = p._engine.lock
        with _registered_reader(lock):
            try:
                monkeypatch.setattr(poollock, "_wrlock", lambda addr: 35)  # EDEADLK
                with pytest.raises(OSError, match="pthread_rwlock_wrlock failed"):
                    v.write(0, b"b" * 4096)
            finally:
                monkeypatch.undo()
            assert lock._depth == 0 and not lock._wr
            got: list[bool] = []
            other = threading.Thread(target=lambda: got.append(lock.acquire(timeout=10)) or lock.release())
            other.start()
            other.join(30)
            assert got == [True]  # another thread takes the lock: this one does not hold it
        assert lock.readers == 0 and v.read(0, 4096) == b"a" * 4096
