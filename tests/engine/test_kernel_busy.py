"""Busy volumes: dm-thin refuses to delete an active thin device.

dm-thin-metadata.c ``__delete_device``: ``if (td->open_count) return -EBUSY`` -- a thin device that a
loaded thin target has open cannot be deleted, and the delete message changes nothing.  thinpool's
active volumes: held by ``pool.activate(name)``, inside ``with pool.thin(name)``, or open over NBD
(tests/serve/test_serve_busy.py covers the NBD and control-socket side with a real client).  A plain ``pool.thin(name)`` handle holds nothing.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from tests.support import pool_with_volumes
from thinpool import Pool
from thinpool.errors import Busy, FailedPrecondition, NotFound
from thinpool.control.protocol import rebuild_error

BS = 64 * 1024


def _state(p: Pool) -> tuple:
    return (sorted(t.name for t in p.thins()), p.status().used_data_blocks, p.transaction_id,
            bytes(p.devs.tobytes()), dict(p.catalog["volumes"]))


def test_busy_is_an_oserror_with_ebusy_and_crosses_the_control_socket() -> None:
    exc = Busy("volume 'a' is active")
    assert isinstance(exc, OSError) and exc.errno == errno.EBUSY
    assert isinstance(exc, FailedPrecondition)  # what callers caught before Busy existed
    assert str(exc) == "volume 'a' is active"
    back = rebuild_error("Busy", "volume 'a' is active")
    assert type(back) is Busy and back.errno == errno.EBUSY


def test_kernel_rule_delete_of_an_activated_volume_fails_with_ebusy_and_changes_nothing(tmp_path: Any) -> None:
    with pool_with_volumes(tmp_path) as p:
        before = _state(p)
        act = p.activate("a")
        assert p.holders("a") == {"pool.activate": 1} and p.holders("b") == {}
        with pytest.raises(Busy) as info:
            p.delete("a")
        assert info.value.errno == errno.EBUSY and "'a'" in str(info.value) and "EBUSY" in str(info.value)
        assert _state(p) == before
        assert act.thin.read(0, 1) == b"x"
        p.delete("b")  # another volume is not held
        act.release()
        act.release()  # idempotent
        assert p.holders("a") == {}
        p.delete("a")
        assert "a" not in p


def test_kernel_rule_an_activation_counts_each_holder_until_each_releases(tmp_path: Any) -> None:
    with pool_with_volumes(tmp_path) as p:
        one, two = p.activate("a"), p.activate("a", holder="qemu")
        assert p.holders("a") == {"pool.activate": 1, "qemu": 1}
        one.release()
        with pytest.raises(Busy, match="qemu"):
            p.delete("a")
        two.release()
        p.delete("a")


def test_kernel_rule_with_pool_thin_holds_the_volume_active_until_the_block_ends(tmp_path: Any) -> None:
    with pool_with_volumes(tmp_path) as p:
        with p.thin("a") as vol:
            vol.write(BS, b"y")
            with p.thin("a"):  # nested blocks each hold once
                assert p.holders("a") == {"with block": 2}
            with pytest.raises(Busy):
                p.delete("a")
        assert p.holders("a") == {}
        p.delete("a")
        # an exception leaving the block releases it too
        with pytest.raises(RuntimeError):
            with p.thin("b"):
                raise RuntimeError("boom")
        p.delete("b")


def test_kernel_rule_with_activate_gives_the_volume_and_releases_it(tmp_path: Any) -> None:
    with pool_with_volumes(tmp_path) as p:
        with p.activate("a") as vol:
            assert vol.read(0, 1) == b"x"
            with pytest.raises(Busy):
                p.delete("a")
        p.delete("a")


def test_a_plain_handle_does_not_hold_the_volume(tmp_path: Any) -> None:
    """Decision (docs/dm-thin.md §8): a handle from pool.thin() is a reference, not an activation --
    like naming a device id; the volume can be deleted and the handle then raises NotFound."""
    with pool_with_volumes(tmp_path) as p:
        h = p.thin("a")
        p.delete("a")
        with pytest.raises(NotFound):
            h.read(0, 1)


def test_activation_follows_a_rename_and_is_not_inherited_by_a_snapshot(tmp_path: Any) -> None:
    with pool_with_volumes(tmp_path) as p:
        with p.activate("a"):
            p.rename("a", "a2")
            p.snapshot("a2", "s")
            with pytest.raises(Busy):
                p.delete("a2")
            p.delete("s")  # the snapshot is a different device, not open
        p.delete("a2")


def test_kernel_rule_busy_is_checked_for_every_name_before_any_is_deleted(tmp_path: Any) -> None:
    """``thinpool delete POOL a b`` deletes all or none: a busy ``b`` leaves ``a`` too."""
    from thinpool.cli.registry import op_table
    with pool_with_volumes(tmp_path) as p:
        before = _state(p)
        with p.activate("b"):
            with pytest.raises(Busy):
                op_table()["delete"].func(p, names=["a", "b"])
            assert _state(p) == before


def test_activate_refuses_what_is_not_a_volume_and_a_closedpool_with_volumes(tmp_path: Any) -> None:
    p = pool_with_volumes(tmp_path)
    with pytest.raises(NotFound):
        p.activate("nope")
    with pytest.raises(Exception, match="holder"):
        p.activate("a", holder="")
    act = p.activate("a")
    p.close()
    act.release()  # harmless after close
    with pytest.raises(Exception, match="closed"):
        p.activate("a")
    with Pool.open(str(tmp_path / "pool")) as q:  # activations are process state: a reopen holds nothing
        assert q.holders("a") == {}
        q.delete("a")
