"""The served pool's periodic commit: dm-thin's worker commits every ``COMMIT_PERIOD`` (one second)
when the pool changed (drivers/md/dm-thin.c: ``do_waker``, ``process_deferred_bios`` with
``dm_pool_changed_this_transaction`` and ``need_commit_due_to_time``); nothing is written when
nothing changed.  In-process (:class:`thinpool.nbd.served.Served`), with a short period."""

from __future__ import annotations

import time

import pytest

from thinpool import Pool
from thinpool.errors import InvalidArgument
from thinpool.nbd.served import COMMIT_PERIOD, Served

BS = 64 * 1024


def _wait_for(what, message: str) -> None:
    deadline = time.monotonic() + 60
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def test_kernel_rule_commit_period_is_one_second_and_commits_only_changes(tmp_path) -> None:
    assert COMMIT_PERIOD == 1.0  # COMMIT_PERIOD = HZ
    path = str(tmp_path / "p")
    with Pool.create(path, data_size=64 * BS) as p:
        p.create_thin("v", 16 * BS)
    served = Served(path, socket_path=str(tmp_path / "nbd.sock"), commit_period=0.05)
    try:
        pool = served.pool
        assert served.commit_period == 0.05
        gen = pool.store.generation
        pool.thin("v").write(3 * BS, b"periodic")  # a new mapping, no flush, no commit() call
        _wait_for(lambda: pool.store.generation > gen, "no periodic commit")
        pool.abort()  # back to the last commit: the periodic one kept the write
        assert pool.thin("v").read(3 * BS, 8) == b"periodic"
        gen = pool.store.generation
        time.sleep(0.5)  # ten periods with nothing changed: nothing committed
        assert pool.store.generation == gen
        pool.thin("v").write(3 * BS + 8, b"in place")  # a provisioned, unshared block: no metadata change
        time.sleep(0.5)
        assert pool.store.generation == gen
        with pool.batch():  # inside a batch nothing commits until its end
            pool.create_thin("w", BS)
            time.sleep(0.3)
            assert pool.store.generation == gen
        assert pool.store.generation == gen + 1
    finally:
        served.stop()
    with Pool.open(path) as p:
        assert p.thin("v").read(3 * BS, 16) == b"periodicin place" and p.check().ok


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), 86401, "1", True])
def test_commit_period_is_a_bounded_number_of_seconds(tmp_path, bad) -> None:
    path = str(tmp_path / "p")
    Pool.create(path, data_size=64 * BS).close()
    with pytest.raises(InvalidArgument, match="commit period"):
        Served(path, socket_path=str(tmp_path / "nbd.sock"), commit_period=bad)
    Served(path, socket_path=str(tmp_path / "nbd.sock"), commit_period=0).stop()  # 0: off


def test_kernel_rule_periodic_commit_requeues_writes_waiting_for_space(tmp_path) -> None:
    # commit() ends with check_for_data_space(): blocks a discard freed -> write mode and
    # requeue_bios; the periodic commit is such a commit, so a queued write completes without a FLUSH
    import threading
    path = str(tmp_path / "p")
    with Pool.create(path, data_size=4 * BS) as p:  # queue_if_no_space, the default
        p.create_thin("v", 16 * BS).write(0, b"a" * (4 * BS))
    served = Served(path, socket_path=str(tmp_path / "nbd.sock"), commit_period=0.05)
    try:
        pool = served.pool
        v = pool.thin("v")
        done: list[object] = []
        writer = threading.Thread(target=lambda: done.append(v.write(8 * BS, b"queued")))
        writer.start()
        _wait_for(lambda: pool.status().queued_writes == 1, "the write did not queue")
        assert pool.mode == "out-of-data-space"
        v.discard(0, BS)  # frees a block; no commit is asked for
        writer.join(60)
        assert done and pool.mode == "write" and v.read(8 * BS, 6) == b"queued"
    finally:
        served.stop()
