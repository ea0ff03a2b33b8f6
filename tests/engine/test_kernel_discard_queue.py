"""dm-thin's discard features and its queue for writes that find no data space (docs/dm-thin.md §6, §9,
§10), in the library.

Kernel rules (drivers/md/dm-thin.c):

* ``pool_status`` prints ``<discard>`` (``ignore_discard`` / ``discard_passdown`` / ``no_discard_passdown``)
  then ``<error_if_no_space|queue_if_no_space>`` after the mode; the defaults (``pool_features_init``) are
  discards with passdown and queueing;
* ``ignore_discard``: the thin devices have no discard support, a discard fails with EOPNOTSUPP;
* ``pool_ctr`` on a pool already active: "Discard support cannot be disabled once enabled" -- only a new
  activation may turn discards on or off; passdown and the no-space policy may change on a reload;
* ``queue_if_no_space``: a write needing a block while out of data space waits (``retry_on_resume``)
  until the pool leaves the mode (``check_for_data_space`` after a commit, a resize) and is retried
  (``requeue_bios``); ``do_no_space_timeout`` fails the waiting writes with ENOSPC after
  ``no_space_timeout`` and sets ``error_if_no_space`` until ``set_pool_mode(PM_WRITE)``.

Timeouts here are short (0.5 s) or infinite (0); nothing assumes speed: the tests wait on the pool's
``queued_writes`` count and on threads with generous limits.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any, Callable

import pytest

from thinpool import Pool
from thinpool.errors import DiscardNotSupported, InvalidArgument, NoSpace, WaitCancelled

BS = 64 * 1024
LIMIT = 60.0  # generous bound for waits that normally take milliseconds


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Writer(threading.Thread):
    """One write in a thread: ``result`` is the return value or the exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 -- handed to the test
            self.result = exc

    def finish(self) -> Any:
        self.join(LIMIT)
        assert not self.is_alive(), "the queued write never finished"
        return self.result


def full_pool(tmp_path, blocks: int = 4, **features: Any) -> tuple[Pool, Any]:
    """A pool of ``blocks`` blocks, all mapped by volume ``v`` (blocks 0..blocks-1)."""
    p = Pool.create(tmp_path / "p", data_size=blocks * BS, block_size=BS, **features)
    v = p.create_thin("v", "16MiB")
    for i in range(blocks):
        v.write(i * BS, bytes([i + 1]) * 100)
    p.commit()
    return p, v


def queued(p: Pool, n: int = 1) -> None:
    _wait_for(lambda: p.status().queued_writes >= n, f"{n} queued write(s)")


# ------------------------------------------------------------------------------- status line
@pytest.mark.parametrize("discard,word", [("passdown", "discard_passdown"), ("nopassdown", "no_discard_passdown"),
                                          ("ignore", "ignore_discard")])
@pytest.mark.parametrize("error", [False, True])
def test_kernel_rule_status_line_prints_discard_then_no_space_policy(tmp_path, discard, word, error) -> None:
    with Pool.create(tmp_path / "p", data_size="1MiB", discard=discard, error_if_no_space=error) as p:
        fields = p.status().dmsetup_line().split(" ")
        # <tid> <meta> <data> <held> <mode> <discard> <policy> <needs_check> <metadata low water mark> ""
        assert fields[4] == "rw" and fields[5] == word
        assert fields[6] == ("error_if_no_space" if error else "queue_if_no_space")
        assert fields[7] == "-" and fields[8].isdigit() and fields[9] == ""
        assert p.features["discard"] == discard and p.status().discard == discard


def test_kernel_rule_default_features_are_passdown_and_queue_with_60s_timeout(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size="1MiB") as p:
        assert p.features == {"discard": "passdown", "error_if_no_space": False, "no_space_timeout": 60.0}
        assert " rw discard_passdown queue_if_no_space - " in p.status().dmsetup_line()


def test_kernel_rule_existing_pools_keep_their_stored_no_space_policy(tmp_path) -> None:
    Pool.create(tmp_path / "p", data_size="1MiB", error_if_no_space=True).close()
    with Pool.open(tmp_path / "p") as p:
        assert p.features["error_if_no_space"] and " error_if_no_space " in p.status().dmsetup_line()


# ------------------------------------------------------------------------------- discards
def test_kernel_rule_ignore_discard_fails_discards_with_eopnotsupp(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size="1MiB", discard="ignore") as p:
        v = p.create_thin("v", "1MiB")
        v.write(0, b"k" * BS)
        with pytest.raises(DiscardNotSupported) as ei:
            v.discard(0, BS)
        assert isinstance(ei.value, OSError) and ei.value.errno == errno.EOPNOTSUPP
        assert v.mapped_blocks == 1 and v.read(0, 1) == b"k"


def test_kernel_rule_discard_passdown_unmaps_and_punches(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size="1MiB") as p:
        v = p.create_thin("v", "1MiB")
        v.write(0, b"k" * BS)
        p.commit()
        assert v.discard(0, BS) == 1 and v.mapped_blocks == 0
        p.commit()
        p.commit()  # freed blocks are released (and passed down) once no durable commit maps them
        assert 0 not in p.data.allocated_blocks().tolist()


def test_kernel_rule_reload_may_switch_passdown_and_discards_follow_at_once(tmp_path) -> None:
    # pool_ctr on an active pool: no_discard_passdown may come and go (bind_control_target ->
    # set_discard_callbacks); without passdown a discard unmaps and the data device keeps the bytes
    with Pool.create(tmp_path / "p", data_size="1MiB") as p:
        v = p.create_thin("v", "1MiB")
        v.write(0, b"a" * (2 * BS))
        p.commit()
        p.set_features(discard="nopassdown")
        assert v.discard(0, BS) == 1
        p.set_features(discard="passdown")
        assert v.discard(BS, BS) == 1
        p.commit()
        p.commit()  # both freed blocks are released now
        held = set(p.data.allocated_blocks().tolist())
        assert 0 in held and 1 not in held, held  # block 0 kept its bytes, block 1 was passed down
        assert v.mapped_blocks == 0


def test_kernel_rule_discard_support_cannot_be_turned_on_or_off_while_active(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size="1MiB") as p:
        for bad in ("ignore",):
            with pytest.raises(InvalidArgument, match="Discard support cannot be disabled once enabled"):
                p.set_features(discard=bad)
        assert p.features["discard"] == "passdown"
        assert p.set_features(discard="nopassdown")["discard"] == "nopassdown"  # passdown may change
        assert " no_discard_passdown " in p.status().dmsetup_line()
    with Pool.open(tmp_path / "p", discard="ignore") as p:  # a new activation may
        assert " ignore_discard " in p.status().dmsetup_line()
        with pytest.raises(InvalidArgument, match="cannot change discard"):
            p.set_features(discard="passdown")
    with Pool.open(tmp_path / "p") as p:  # stored
        assert p.features["discard"] == "ignore"


def test_bad_features_are_refused_and_change_nothing(tmp_path) -> None:
    for bad in ({"discard": "sometimes"}, {"no_space_timeout": -1}, {"no_space_timeout": float("nan")},
                {"no_space_timeout": "60"}, {"error_if_no_space": "yes"}, {"no_space_timeout": 1e9}):
        with pytest.raises(InvalidArgument):
            Pool.create(tmp_path / "bad", data_size="1MiB", **bad)
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    with Pool.create(tmp_path / "p", data_size="1MiB") as p:
        before = p.features
        with pytest.raises(InvalidArgument):
            p.set_features(discard="passdown", no_space_timeout=-5)
        assert p.features == before
    with pytest.raises(InvalidArgument):
        Pool.open(tmp_path / "p", read_only=True, discard="ignore")


# ------------------------------------------------------------------------------- queue_if_no_space
def test_kernel_rule_error_if_no_space_fails_at_once(tmp_path) -> None:
    p, v = full_pool(tmp_path, error_if_no_space=True, no_space_timeout=0)
    w = Writer(lambda: v.write(10 * BS, b"n"))
    w.start()
    assert isinstance(w.finish(), NoSpace)  # with a queue (timeout 0: for ever) this would never end
    assert p.mode == "out-of-data-space" and v.mapped_blocks == 4
    p.close()


def test_kernel_rule_queued_write_completes_after_resize_from_another_thread(tmp_path) -> None:
    p, v = full_pool(tmp_path, no_space_timeout=0)
    w = Writer(lambda: v.write(10 * BS, b"q" * 10))
    w.start()
    queued(p)
    st = p.status()
    assert st.mode == "out-of-data-space" and " queue_if_no_space " in st.dmsetup_line()
    assert v.read(0, 1) == b"\x01"  # the waiting writer does not hold the pool's lock
    p.resize(8 * BS)
    assert w.finish() == 10
    assert v.read(10 * BS, 10) == b"q" * 10 and p.mode == "write" and p.status().queued_writes == 0
    p.close()


def test_kernel_rule_queued_writes_complete_after_discard_and_commit(tmp_path) -> None:
    p, v = full_pool(tmp_path, no_space_timeout=0)
    writers = [Writer(lambda i=i: v.write((10 + i) * BS, b"d")) for i in range(2)]
    for w in writers:
        w.start()
    queued(p, 2)
    assert v.discard(0, 2 * BS) == 2
    p.commit()  # check_for_data_space: free blocks -> write mode, the queued writes are retried
    assert [w.finish() for w in writers] == [1, 1]
    assert v.read(10 * BS, 1) == v.read(11 * BS, 1) == b"d"
    p.close()


def test_kernel_rule_no_space_timeout_fails_queued_write_then_errors_until_space(tmp_path) -> None:
    p, v = full_pool(tmp_path, no_space_timeout=0.5)
    w = Writer(lambda: v.write(10 * BS, b"t"))
    w.start()
    exc = w.finish()
    assert isinstance(exc, NoSpace) and exc.errno == errno.ENOSPC and "no_space_timeout" in str(exc)
    assert v.mapped_blocks == 4
    # do_no_space_timeout: error_if_no_space until the pool leaves out-of-data-space
    assert " out_of_data_space discard_passdown error_if_no_space " in p.status().dmsetup_line()
    assert p.features["error_if_no_space"] is False  # the requested (stored) policy is unchanged
    w2 = Writer(lambda: v.write(11 * BS, b"t"))
    w2.start()
    assert isinstance(w2.finish(), NoSpace)
    p.resize(8 * BS)
    assert " rw discard_passdown queue_if_no_space " in p.status().dmsetup_line()
    assert v.write(11 * BS, b"t") == 1
    p.close()


def test_kernel_rule_switching_to_error_if_no_space_fails_queued_writes(tmp_path) -> None:
    p, v = full_pool(tmp_path, no_space_timeout=0)
    w = Writer(lambda: v.write_many([10 * BS, 11 * BS], [b"a", b"b"]))
    w.start()
    queued(p)
    p.set_features(error_if_no_space=True)  # a table reload with error_if_no_space
    assert isinstance(w.finish(), NoSpace) and v.mapped_blocks == 4
    p.close()


def test_queued_write_gives_up_when_aborted_or_pool_closes(tmp_path) -> None:
    p, v = full_pool(tmp_path, no_space_timeout=0)
    stop = threading.Event()
    w = Writer(lambda: v.write(10 * BS, b"x", abort=stop.is_set))
    w.start()
    queued(p)
    stop.set()
    assert isinstance(w.finish(), WaitCancelled) and v.mapped_blocks == 4
    w = Writer(lambda: v.write(10 * BS, b"x"))
    w.start()
    queued(p)
    p.close()
    exc = w.finish()
    assert isinstance(exc, InvalidArgument) and "closed" in str(exc)
    with Pool.open(tmp_path / "p") as p:
        assert p.thin("v").mapped_blocks == 4


def test_queued_write_to_a_volume_deleted_meanwhile_fails(tmp_path) -> None:
    p, v = full_pool(tmp_path, no_space_timeout=0)
    p.create_thin("w", "1MiB")
    w = Writer(lambda: p.thin("w").write(0, b"x"))
    w.start()
    queued(p)
    p.delete("w")
    p.resize(8 * BS)
    assert type(w.finish()).__name__ == "NotFound"
    p.close()
