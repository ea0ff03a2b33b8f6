"""Replay of a real filesystem workload: mkfs.ext4, files and an unmount on a served volume, recorded
with ``thinpool serve --record`` (through nbdfuse + loop, as root), then replayed into fresh pools by
``thinpool replay`` -- in data mode and metadata-only -- must map exactly the blocks the served pool
maps, with identical metadata in both modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.serve.test_nbd_pool import BS, MiB, Env, env  # noqa: F401
from tests.serve.test_serve_record import record_ext4
from tests.support import require_root, require_tool
from thinpool import Pool

pytestmark = [pytest.mark.realtools, pytest.mark.slow]  # ~30 s alone, more on a busy machine
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "thinpool", *args], check=True, capture_output=True, text=True,
                          env=env, timeout=300).stdout


def test_kernel_rule_replay_of_recorded_ext4_maps_what_the_served_pool_maps(env: Env) -> None:
    require_root()
    require_tool("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount")
    log, p = record_ext4(env, (1, 4096, 300_000, 3 * MiB, 5 * MiB), rewrite=4)
    try:
        served = set(p.thin("fs").mappings()[0].tolist())
    finally:
        p.close()
    out = {}
    for mode in ("data", "meta"):
        args = ["replay", log, "--block-size", str(BS), "--data-size", "512M", "--volume-size", "128M",
                "--pool", env.path(f"replay-{mode}"), "--json", "-"]
        out[mode] = json.loads(cli(*args, *(["--metadata-only"] if mode == "meta" else [])))
        with Pool.open(env.path(f"replay-{mode}")) as r:
            assert set(r.thin("vol").mappings()[0].tolist()) == served
    d = out["data"]
    assert d["writes"] > 10 and d["discards"] > 0 and d["flushes"] > 0
    assert d["volumes"]["vol"]["mapped_blocks"] == len(served) == d["data_blocks_used"]
    assert {k: v for k, v in d.items() if k != "params"} == {k: v for k, v in out["meta"].items() if k != "params"}
    assert cli("dump", env.path("replay-data")) == cli("dump", env.path("replay-meta"))
