"""`thinpool demo --real-fs`: the seed scenario with ext4 on thin devices (nbdfuse + loop + mkfs + mount).

Root only (skips on a laptop, fails under CI=true).  The figures come from what ext4 really wrote, so the
checks are bounds and exact consistency relations between the measured numbers, not fixed values.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import shutil

import pytest
from tests.support import require_root, require_tool

from thinpool.errors import FailedPrecondition

pytestmark = pytest.mark.realtools

FILES = [103_000_000, 745, 2_780, 7, 100]


def _leftovers(root: str) -> list[str]:
    """Loop devices and mounts that still refer to ``root`` (the run's private temporary directory; other
    processes may attach loop devices meanwhile, so only ours count)."""
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()
    with open("/proc/mounts") as f:
        mounts = f.read().splitlines()
    return [x for x in loops + mounts if root in x]


def _check_result(r: dict, bs: int) -> None:
    assert r["block_size"] == bs and r["thin_devices"] == 16 and r["check_ok"]
    # mkfs.ext4 wrote something, but a tiny part of the 10 GiB base device
    base = r["base"]["mapped_blocks"]
    assert 1 <= base < r["base_device_size"] // bs // 50
    assert r["pool_used_blocks_after_base"] == base
    # layers: one per step with files; the idealized figure is ceil(file bytes / block size)
    layers = [x for x in r["layers"] if x["layer"]]
    assert [x["file_bytes"] for x in layers] == FILES and len(r["layers"]) == 7
    assert [x["ideal_blocks"] for x in layers] == [math.ceil(n / bs) for n in FILES]
    for x in layers:  # ext4 writes the data plus inode, bitmap, directory and journal blocks
        assert x["owned_blocks"] >= x["ideal_blocks"], x
        assert x["owned_blocks"] <= x["ideal_blocks"] + max(64, 2 * 1024 * 1024 // bs), x
        assert x["shared_blocks"] > 0 and x["mapped_blocks"] >= base
    # every block a layer owns is a block the pool allocated for it (nothing is freed in this scenario)
    assert r["image_blocks"] == sum(x["owned_blocks"] for x in layers)
    assert r["pool_used_blocks_after_images"] == base + r["image_blocks"]
    assert r["ideal_image_blocks"] == sum(math.ceil(n / bs) for n in FILES) and r["image_blocks"] > \
        r["ideal_image_blocks"]
    # containers: -init files and the mount-time writes cost metadata blocks only, all accounted for
    start = r["containers_at_start"]
    assert [c["name"] for c in start] == [f"my_container_{i}" for i in range(1, 6)]
    assert r["pool_used_blocks_after_start"] - r["pool_used_blocks_after_images"] == \
        sum(c["init_owned_blocks"] + c["owned_blocks"] for c in start)
    assert all(c["init_owned_blocks"] >= 1 for c in start)
    assert all(c["owned_blocks"] < c["init_owned_blocks"] + 64 for c in start)
    # the 5-byte writes: at least the data block each, exactly what the pool allocated
    for w in r["writes"]:
        assert w["owned_blocks_added"] >= 1 and w["block_level_bytes"] == w["owned_blocks_added"] * bs
        assert w["pool_blocks_added"] == w["owned_blocks_added"]
    after = {c["name"]: c for c in r["containers_after_writes"]}
    before = {c["name"]: c for c in start}
    for name in ("my_container_1", "my_container_2", "my_container_3"):
        assert after[name]["owned_blocks"] > before[name]["owned_blocks"]
    for name in ("my_container_4", "my_container_5"):
        assert after[name]["owned_blocks"] == before[name]["owned_blocks"]
    assert r["pool_used_blocks_after_writes"] - r["pool_used_blocks_after_start"] == \
        sum(w["pool_blocks_added"] for w in r["writes"])
    # 4 KiB changed in the 103 MB file: block-level copy-on-write, nowhere near the overlay copy-up
    cu = r["copy_up"]
    assert cu["other_containers_unchanged"] and cu["owned_blocks_added"] >= 1
    assert cu["block_level_bytes"] * 20 < cu["file_level_bytes"] == FILES[0]
    assert cu["ideal_block_level_bytes"] == bs
    assert r["pool_used_blocks_after_stop"] >= r["pool_used_blocks_after_writes"] + cu["pool_blocks_added"]
    # the idealized run is the plain demo's
    assert r["ideal"]["pool_used_blocks_after_images"] == r["ideal_image_blocks"]
    assert r["ideal"]["writes_added_blocks"] == 3


def test_demo_real_fs_cli_64k() -> None:
    require_root()
    require_tool("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "tune2fs", "fsfreeze")
    root = tempfile.mkdtemp(prefix="tprfs", dir="/tmp")
    try:
        env = {**os.environ, "TMPDIR": root}  # the demo's temporary directory goes in here
        r = subprocess.run([sys.executable, "-m", "thinpool", "demo", "--real-fs", "--json"], capture_output=True,
                           text=True, timeout=240, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(r.stdout)
        assert not _leftovers(root) and os.listdir(root) == []  # unmounted, detached, removed
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert res["pool"] is None and res["elapsed_seconds"] < 120
    _check_result(res, 64 * 1024)
    from thinpool.containers.realfs import render_realfs
    text = render_realfs(res)
    assert "REAL EXT4 blk" in text and "IDEALIZED blk" in text and "pool check: ok" in text
    assert f"{res['layers'][0]['owned_blocks']:,}" in text and "1,572" in text
    assert "other containers still read the original bytes: yes" in text


def test_demo_real_fs_512k_keeps_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    require_root()
    require_tool("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "tune2fs", "fsfreeze")
    from thinpool import Pool
    from thinpool.containers.realfs import run_realfs_demo
    root = tempfile.mkdtemp(prefix="tprfs", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", root)  # the demo's scratch directory goes in here
    try:
        res = run_realfs_demo(os.path.join(root, "pool"), "512KiB", base_size="2GiB")
        assert not _leftovers(root) and os.listdir(root) == ["pool"]
        assert res["pool"] == os.path.join(root, "pool") and res["base_device_size"] == 2 << 30
        _check_result(res, 512 * 1024)
        with Pool.open(res["pool"], read_only=True) as p:  # kept, closed cleanly, consistent
            assert p.check().ok
            names = [t.name for t in p.thins()]
            assert names[:6] == ["base", "layer1", "layer2", "layer3", "layer4", "layer5"] and len(names) == 16
            usage = {u.name: u for u in p.usage()}
            assert usage["layer1"].mapped_blocks == res["layers"][0]["mapped_blocks"]
            assert {v["name"]: v["mapped_blocks"] for v in res["volumes"]} == \
                {n: u.mapped_blocks for n, u in usage.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_demo_real_fs_refuses_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from thinpool.containers import realfs
    monkeypatch.setattr(realfs.os, "geteuid", lambda: 1000)
    assert any("root" in p for p in realfs.problems())
    with pytest.raises(FailedPrecondition, match="needs root"):
        realfs.run_realfs_demo(None)
    monkeypatch.setattr(realfs.shutil, "which", lambda name: None)
    assert any("nbdfuse" in p for p in realfs.problems())


def test_demo_real_fs_refuses_a_data_size_too_small_with_nothing_made(tmp_path) -> None:
    require_root()
    require_tool("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "tune2fs", "fsfreeze")
    from thinpool.containers.realfs import run_realfs_demo
    from thinpool.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match="the walkthrough maps 1580"):
        run_realfs_demo(str(tmp_path / "pool"), "64KiB", data_size="1MiB")
    assert not os.path.exists(tmp_path / "pool")  # refused before the pool was made
