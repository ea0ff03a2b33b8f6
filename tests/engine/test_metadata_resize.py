"""Growing the metadata (dm-thin grows a pool's metadata device, never shrinks it), LVM's autoextend
policy (thin_pool_autoextend_threshold / _percent) and a data resize that needs more metadata."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from thinpool import Pool, nodestore
from thinpool.errors import InvalidArgument, ReadOnly
from thinpool.mdpages import BLOCK
from thinpool.poolspace import _grown

BS = 64 * 1024


def _files(path) -> dict[str, tuple[int, str]]:
    out = {}
    for name in ("data", "metadata"):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = (os.path.getsize(os.path.join(path, name)), hashlib.sha256(f.read()).hexdigest())
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return subprocess.run([sys.executable, "-m", "thinpool", *args], capture_output=True, text=True, env=env)


def _fill_metadata(pool: Pool, start: int = 0) -> int:
    """Create volumes with scattered writes until a commit runs out of metadata space."""
    i = start
    with pytest.raises(ReadOnly, match="metadata space"):
        while True:
            pool.create_thin(f"v{i}", "64M")
            vol = pool.thin(f"v{i}")
            vol.write_many(np.arange(16, dtype=np.int64) << 22, [b"x" * 100] * 16)  # 16 leaves
            pool.commit()
            i += 1
    return i


def test_kernel_rule_metadata_grows_and_never_shrinks(tmp_path):
    """dm-thin resizes the metadata device up only ("pool metadata device shrunk" is refused):
    ``Pool.resize(metadata_size=...)`` grows the file; a smaller size is refused with nothing changed."""
    path = tmp_path / "p"
    with Pool.create(path, data_size="64M", metadata_size="1M") as p:
        p.create_thin("v", "1M").write(0, b"abc")
    before = _files(path)
    with Pool.open(path) as p:
        with pytest.raises(InvalidArgument, match="cannot shrink the metadata"):
            p.resize(metadata_size="512K")
        p.close(commit=False)
    assert _files(path) == before
    with Pool.open(path) as p:
        p.resize(metadata_size="2M")
        assert p.store.nr_blocks == 512 and p.nr_data_blocks == 1024
    assert os.path.getsize(path / "metadata") == 2 << 20
    with Pool.open(path) as p:
        assert p.thin("v").read(0, 3) == b"abc" and p.check().ok


def test_kernel_rule_out_of_metadata_space_returns_to_rw_after_growing_then_deletes_and_discards(tmp_path):
    """A pool out of metadata space serves no metadata change; growing the metadata device returns it
    to ``rw`` (the kernel's resize of the metadata device clears the mode), and then deletes and
    discards work and commit as usual."""
    path = tmp_path / "p"
    p = Pool.create(path, data_size="256M", metadata_size="256K")
    try:
        n = _fill_metadata(p)
        assert p.mode != "write" and n > 1
        p.resize(metadata_size="1M")
        assert p.mode == "write" and p.status().dmsetup_line().split()[4] == "rw"
        p.thin("v1").discard(0, 4 << 20)
        assert p.thin("v1").read(0, 100) == bytes(100)
        for j in range(2, n // 2):
            p.delete(f"v{j}")
        p.commit()
        p.create_thin("after", "1M").write(0, b"z")
        p.close()
        p = Pool.open(path)
        assert p.mode == "write" and p.check().ok and "v2" not in p.catalog["volumes"]
        assert p.thin("after").read(0, 1) == b"z"
    finally:
        p.close(commit=False)


def test_lvm_rule_autoextend_amount_is_percent_or_what_gets_below_the_threshold():
    """lvm2's _adjust_amount: nothing at or below the threshold; above it, grow by the policy percent,
    or by the percent that brings use back to the threshold when that is more."""
    assert _grown(1000, 800, 80, 20) == 1000          # at the threshold: nothing
    assert _grown(1000, 801, 80, 20) == 1200          # above: + 20 %
    assert _grown(1000, 990, 80, 20) == 1240          # 20 % is not enough: + 24 % (990 / 1240 <= 80 %)
    assert 990 * 100 <= 80 * 1240 and 990 * 100 > 80 * 1230


def test_lvm_rule_autoextend_grows_the_metadata_above_the_threshold(tmp_path):
    """thin_pool_autoextend_threshold=80, _percent=20: once a commit leaves metadata use above 80 %,
    the metadata grows by 20 % (or more) and the pool does not run out of metadata space (as long as
    one transaction fits in what is free: the policy is applied after each commit, as dmeventd applies
    it when it polls)."""
    p = Pool.create(tmp_path / "p", data_size="4G", metadata_size="512K")
    try:
        p.set_autoextend(80, 20)
        assert (p.header["autoextend_threshold"], p.header["autoextend_percent"]) == (80, 20)
        sizes = [p.store.nr_blocks]
        dense = nodestore.DENSE + 1  # mappings that give a leaf a metadata page of its own: two leaves each
        blocks = np.concatenate([np.arange(dense), 512 + np.arange(dense)]).astype(np.int64)
        for i in range(100):
            p.create_thin(f"v{i}", "64M")
            p.thin(f"v{i}").write_many(blocks * BS, [b"x" * 100] * len(blocks))
            p.commit()
            st = p.status()
            assert st.used_metadata_blocks * 100 <= 80 * st.total_metadata_blocks
            if p.store.nr_blocks != sizes[-1]:
                assert p.store.nr_blocks >= sizes[-1] * 1.2
                sizes.append(p.store.nr_blocks)
        assert len(sizes) > 2 and p.mode == "write"
        p.close()
        p = Pool.open(tmp_path / "p")
        assert p.header["autoextend_threshold"] == 80 and p.check().ok
    finally:
        p.close(commit=False)


def test_lvm_rule_autoextend_grows_the_data_above_the_threshold(tmp_path):
    """The same policy for the data device: above the threshold after a commit, the data grows by the
    percent (and by more when that is what gets use back to the threshold)."""
    p = Pool.create(tmp_path / "p", data_size=str(100 * BS))
    try:
        p.set_autoextend(80, 50)
        v = p.create_thin("v", "1G")
        v.write_many(np.arange(81, dtype=np.int64) * BS, [b"d"] * 81)
        assert p.nr_data_blocks == 100
        p.commit()
        assert p.nr_data_blocks == 150 and os.path.getsize(tmp_path / "p" / "data") == 150 * BS
        v.write_many(np.arange(81, 81 + 69, dtype=np.int64) * BS, [b"e"] * 69)  # every block: 100 %
        p.commit()
        assert p.nr_data_blocks == 225 and p.mode == "write"  # + 50 % (150 / 225 <= 80 %)
        p.set_autoextend(100)  # off
        before = p.nr_data_blocks
        v.write_many(np.arange(150, before, dtype=np.int64) * BS, [b"f"] * (before - 150))
        p.commit()
        assert p.nr_data_blocks == before
    finally:
        p.close(commit=False)


@pytest.mark.parametrize("error_if_no_space", [False, True])
def test_lvm_rule_autoextend_grows_a_pool_that_ran_out_of_data_space(tmp_path, error_if_no_space):
    """A write that finds no data block leaves the pool 100 % full in the kernel; dmeventd then extends
    it by the policy: a queued write (queue_if_no_space, the kernel's default) proceeds once the pool
    has grown; under error_if_no_space that write fails with ENOSPC and the next one succeeds."""
    from thinpool.errors import NoSpace
    p = Pool.create(tmp_path / "p", data_size=str(100 * BS), error_if_no_space=error_if_no_space)
    try:
        p.set_autoextend(80, 20)
        v = p.create_thin("v", "1G")
        blocks = np.arange(130, dtype=np.int64)
        if error_if_no_space:
            with pytest.raises(NoSpace):
                v.write_many(blocks * BS, [b"q"] * 130)
            assert p.nr_data_blocks == 125 and p.status().used_data_blocks == 0  # + 25 %: back to 80 %
            v.write_many(blocks[:100] * BS, [b"q"] * 100)
        else:
            v.write_many(blocks * BS, [b"q"] * 130)  # grows 100 -> 125 -> 157 (+ 25 % each) while it waits
            assert p.nr_data_blocks == 157 and v.read(129 * BS, 1) == b"q"
        assert p.mode == "write"
    finally:
        p.close(commit=False)


def test_lvm_rule_data_resize_needs_metadata_room_grows_it_with_autoextend_or_refuses(tmp_path):
    """Extending the data past what the metadata covers: refused with both files unchanged when
    autoextend is off; with autoextend on, the metadata grows first."""
    path = tmp_path / "p"
    with Pool.create(path, data_size="64M", metadata_size="256K") as p:
        p.create_thin("v", "1M").write(0, b"abc")
    before = _files(path)
    with Pool.open(path) as p:
        with pytest.raises(InvalidArgument, match="cannot cover a data size"):
            p.resize("64G")
        assert p.nr_data_blocks == 1024 and p.store.nr_blocks == 64 and p.mode == "write"
        p.close(commit=False)
    assert _files(path) == before
    with Pool.open(path) as p:
        p.set_autoextend(90, 10)
        p.resize("64G")
        assert p.nr_data_blocks == (64 << 30) // BS and p.store.nr_blocks > 64
        p.create_thin("w", "1G").write(5 << 20, b"x" * 100)
    with Pool.open(path) as p:
        assert p.check().ok and p.thin("v").read(0, 3) == b"abc"


def test_autoextend_setting_is_checked(tmp_path):
    with Pool.create(tmp_path / "p", data_size="64M") as p:
        for bad in (-1, 101, 1.5, True, "80"):
            with pytest.raises(InvalidArgument, match="autoextend threshold"):
                p.set_autoextend(bad)
        with pytest.raises(InvalidArgument, match="autoextend percent"):
            p.set_autoextend(80, -5)
        p.set_autoextend(10)  # LVM's minimum threshold is 50
        assert p.header["autoextend_threshold"] == 50 and p.header["autoextend_percent"] == 20


def test_cli_resize_metadata_and_its_old_spelling_and_set_autoextend(tmp_path):
    path = str(tmp_path / "p")
    assert _cli("create", path, "--data-size", "64M", "--metadata-size", "256K").returncode == 0
    r = _cli("resize", path, "--metadata", "512K")
    assert r.returncode == 0, r.stderr
    r = _cli("resize", path, "--metadata-size", "1M")
    assert r.returncode == 0, r.stderr
    r = _cli("resize", path, "--metadata", "512K")
    assert r.returncode == 1 and "cannot shrink the metadata" in r.stderr
    r = _cli("set-autoextend", path, "--threshold", "70", "--percent", "30", "--json")
    assert r.returncode == 0, r.stderr
    assert '"autoextend_threshold": 70' in r.stdout
    with Pool.open(path) as p:
        assert p.store.nr_blocks == (1 << 20) // BLOCK and p.header["autoextend_percent"] == 30
