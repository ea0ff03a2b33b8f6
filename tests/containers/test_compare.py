"""``thinpool compare`` (thinpool/containers/compare.py, cli/compare_cmds.py): the thin pool against overlayfs.

One real run of the command (module fixture) on the small workload image built by umoci, four of the
built-in workloads, block sizes 64K and 512K, with ``--keep`` so that every figure of its JSON report
can be checked against an independent measurement: the overlay side against ``du`` of the kept upper
directories, the thin side against ``thinpool ls --usage`` of the kept container volumes, the replay at
the pool's own block size against what the pool measured.  Root only (mounts, nbdfuse, loop devices).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from tests.containers.test_overlay import du_bytes, require_overlay
from tests.containers.workload_image import small_image
from tests.support import REPO_ROOT, require_root, require_tool
from thinpool.containers.compare import parse_block_sizes, replay_at, written_blocks, _ranges
from thinpool.containers.workloads import MiB, SMALL_SIZES, builtin_workloads
from thinpool.errors import InvalidArgument

WORKLOADS = ("sqlite-0.1pct", "log-append", "config-rewrite", "delete-big")


def thinpool(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    r = subprocess.run([sys.executable, "-m", "thinpool", *args], capture_output=True, text=True, env=env,
                       cwd=REPO_ROOT, timeout=1800)
    if check and r.returncode != 0:
        raise AssertionError(f"thinpool {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    require_root()
    require_overlay()
    require_tool("nbdfuse", "mkfs.ext4", "losetup", "umoci")
    top = str(tmp_path_factory.mktemp("compare"))
    built = small_image(top)
    pool = os.path.join(top, "pool")
    thinpool("create", pool, "--data-size", "4G")
    out_json, out_html, out_png = (os.path.join(top, f"r.{x}") for x in ("json", "html", "png"))
    only = [a for w in WORKLOADS for a in ("--only", w)]
    r = thinpool("compare", pool, built["archive"], "--tag", "small", *only, "--block-sizes", "512K,64K",
                 "--json", out_json, "--html", out_html, "--png", out_png, "--keep",
                 "--workdir", os.path.join(top, "work"), "--base-size", "256M")
    with open(out_json) as f:
        res = json.load(f)
    yield {"pool": pool, "res": res, "stdout": r.stdout, "html": out_html, "png": out_png, "built": built}
    if res["podman"]["used"]:                # --keep kept podman's containers and image too
        for w in res["workloads"]:
            subprocess.run(["podman", "rm", "-f", w["podman"]["container"]], capture_output=True)
        subprocess.run(["podman", "rmi", "-f", res["podman"]["image_id"]], capture_output=True)


def _keys(obj) -> set[str]:
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(k)
            out |= _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= _keys(v)
    return out


def test_compare_json_keys_are_documented(run: dict) -> None:
    with open(os.path.join(REPO_ROOT, "docs", "containers.md")) as f:
        doc = f.read()
    section = doc[doc.index("measured: `thinpool compare`"):]
    documented = set(re.findall(r"`([a-z_]+)`", section))
    res = run["res"]
    assert not sorted(_keys(res) - documented - set(res["overlay"]["kernel"]))   # module parameter names
    assert [w["name"] for w in res["workloads"]] == list(WORKLOADS)
    assert res["block_sizes"] == [64 << 10, 512 << 10] and res["floor_block_size"] == 4096


def test_compare_overlay_bytes_equal_du_of_the_kept_upper_directories(run: dict) -> None:
    for w in run["res"]["workloads"]:
        assert w["overlay"]["upper_bytes"] == du_bytes(w["overlay"]["upper_dir"]), w["name"]


def test_compare_thin_exclusive_blocks_equal_thinpool_ls_usage(run: dict) -> None:
    rows = {r["name"]: r for r in json.loads(thinpool("ls", run["pool"], "--usage", "--json").stdout)}
    for w in run["res"]["workloads"]:
        t = w["thin"]
        assert rows[t["volume"]]["exclusive_blocks"] == t["exclusive_blocks"], w["name"]
        assert t["bytes"] == t["exclusive_blocks"] * run["res"]["block_size"] == rows[t["volume"]]["exclusive_bytes"]


def test_kernel_rule_replay_at_the_pools_block_size_gives_the_measured_exclusive_blocks(run: dict) -> None:
    """The recorded NBD I/O replayed through the simulator at the pool's block size (snapshot of a volume
    mapping what the image maps, dm-thin's CoW on first write to a shared block) owns exactly the blocks the
    real container owns."""
    native = run["res"]["block_size"]
    for w in run["res"]["workloads"]:
        at = {a["block_size"]: a for a in w["thin_at"]}
        assert at[native]["exclusive_blocks"] == w["thin"]["exclusive_blocks"], w["name"]


def test_compare_coarser_blocks_never_cost_less_and_the_floor_is_lowest(run: dict) -> None:
    for w in run["res"]["workloads"]:
        at = w["thin_at"]
        assert at[0]["block_size"] == 4096 and at[0]["floor"]
        assert [a["block_size"] for a in at] == [4096, 64 << 10, 512 << 10]
        b = [a["bytes"] for a in at]
        assert b == sorted(b) and b[0] > 0, w["name"]


def test_compare_log_append_overlay_copies_up_the_whole_log_thin_only_what_changed(run: dict) -> None:
    w = {x["name"]: x for x in run["res"]["workloads"]}["log-append"]
    log = SMALL_SIZES.log_bytes + MiB
    assert w["overlay"]["upper_bytes"] >= log
    floor = w["thin_at"][0]["bytes"]
    assert MiB <= floor < log                 # the appended MiB (+ ext4 metadata, journal), not the old log
    assert w["thin"]["bytes"] < w["overlay"]["upper_bytes"] and w["ratio"] > 1


def test_compare_delete_big_overlay_writes_a_whiteout_thin_writes_metadata(run: dict) -> None:
    w = {x["name"]: x for x in run["res"]["workloads"]}["delete-big"]
    assert w["overlay"]["upper_bytes"] < 64 << 10           # a whiteout and its directory
    assert 0 < w["thin"]["bytes"] < SMALL_SIZES.big_bytes   # inode, bitmaps, journal: blocks stay mapped


def test_compare_report_text_html_and_podman_skip_reason(run: dict) -> None:
    res = run["res"]
    for name in WORKLOADS:
        assert name in run["stdout"]
    with open(run["html"]) as f:
        page = f.read()
    assert page.count("<svg") == len(WORKLOADS) and "sqlite-0.1pct" in page
    with open(run["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    if not res["podman"]["used"]:
        assert res["podman"]["skipped"] and "podman: skipped" in run["stdout"]
        assert all(w["podman"]["skipped"] == res["podman"]["skipped"] for w in res["workloads"])
    else:
        for w in res["workloads"]:
            assert w["podman"]["upper_bytes"] == du_bytes(w["podman"]["upper_dir"])


def test_compare_refuses_bad_input_before_touching_the_pool(run: dict, tmp_path) -> None:
    before = thinpool("ls", run["pool"], "--usage", "--json").stdout
    for args, msg in ((["--block-sizes", "4K"], "block size"), (["--block-sizes", "64K,"], "block sizes"),
                      (["--workload", "bad name=x"], "workload name"), (["--only", "nope"], "no such workload"),
                      (["--no-builtin"], "no workload")):
        r = thinpool("compare", run["pool"], run["built"]["archive"], *args, check=False)
        assert r.returncode == 1 and msg in r.stderr, (args, r.stderr)
    assert thinpool("ls", run["pool"], "--usage", "--json").stdout == before


def test_compare_failing_workload_is_an_error_naming_it_and_leaves_no_container(run: dict) -> None:
    r = thinpool("compare", run["pool"], run["built"]["archive"], "--tag", "small", "--no-builtin",
                 "--workload", "boom=echo broken >&2; exit 7", "--block-sizes", "64K", check=False)
    assert r.returncode == 1 and "workload boom failed" in r.stderr and "broken" in r.stderr
    names = [c["name"] for c in json.loads(thinpool("ps", run["pool"], "--json").stdout)]
    assert not [n for n in names if n.startswith("cmp-boom-")]
    with open("/proc/mounts") as f:
        assert "cmp-boom-" not in f.read()


def test_compare_chroot_runs_the_images_own_shell_on_every_side(run: dict, tmp_path) -> None:
    """--chroot: the command is the image's own /bin/sh (the small image carries one), chrooted on the thin
    and overlay sides; podman starts the container or the report carries podman's reason for not running it."""
    out = str(tmp_path / "r.json")
    thinpool("compare", run["pool"], run["built"]["archive"], "--tag", "small", "--no-builtin", "--chroot",
             "--workload", "w=echo chrooted >> /var/log/app.log",
             "--block-sizes", "64K", "--json", out)
    with open(out) as f:
        res = json.load(f)
    assert res["chroot"] is True
    (w,) = res["workloads"]
    assert w["overlay"]["upper_bytes"] >= SMALL_SIZES.log_bytes       # the log copied up
    assert 0 < w["thin"]["bytes"] < SMALL_SIZES.log_bytes
    assert w["podman"].get("upper_bytes", 0) >= SMALL_SIZES.log_bytes or w["podman"]["skipped"]


@pytest.mark.slow
def test_demo_vs_overlay_builds_its_image_and_prints_every_builtin_workload(tmp_path) -> None:
    """`thinpool demo --vs-overlay` (here with the hidden --small-image): its own umoci image, every built-in
    workload on both sides; the plain demo is unchanged (no comparison in its report)."""
    require_root()
    require_overlay()
    require_tool("nbdfuse", "mkfs.ext4", "losetup", "umoci")
    r = thinpool("demo", "--vs-overlay", "--small-image", "--dir", str(tmp_path / "pool"), "--json")
    res = json.loads(r.stdout)
    assert [w["name"] for w in res["workloads"]] == [w.name for w in builtin_workloads()]
    assert res["built"]["sizes"] == SMALL_SIZES.__dict__ and res["block_size"] == 64 << 10
    for w in res["workloads"]:
        assert w["overlay"]["upper_bytes"] > 0 and w["thin"]["exclusive_blocks"] > 0
    plain = json.loads(thinpool("demo", "--json").stdout)
    assert "workloads" not in plain


# ------------------------------------------------------------------------------ the trace arithmetic
def _iolog(path: str, lines: list[str]) -> str:
    with open(path, "w") as f:
        f.write("fio version 3 iolog\n0 vol add\n0 vol open\n" + "\n".join(lines) + "\n11 vol close\n")
    return path


def test_written_blocks_counts_blocks_written_and_not_discarded_whole_afterwards(tmp_path) -> None:
    t = _iolog(str(tmp_path / "t.iolog"), [
        "1 vol write 0 4096", "2 vol write 65536 8192", "3 vol write 1048576 4096", "4 vol trim 1048576 65536",
        "5 vol write 2097152 131072", "6 vol sync 0 0", "7 vol read 0 4096", "8 vol trim 2097152 2048",
        "9 vol trim 4194304 4096", "10 vol write 4194304 4096"])
    assert written_blocks(t, 4096) == 1 + 2 + 32 + 1       # the partial trim keeps its block
    assert written_blocks(t, 65536) == 1 + 1 + 2 + 1


def test_kernel_rule_replay_cows_shared_blocks_and_provisions_unmapped_ones(tmp_path) -> None:
    """dm-thin: a write to a block the snapshot shares with the image breaks sharing (a copy of the whole
    block unless the write covers it); a write to an unmapped block provisions; a discard of a whole block
    unmaps it.  Exclusive blocks of the snapshot = every block written and not discarded."""
    t = _iolog(str(tmp_path / "t.iolog"), [
        "1 vol write 0 4096", "2 vol write 65536 8192", "3 vol write 1048576 4096", "4 vol trim 1048576 65536",
        "5 vol write 2097152 131072"])
    base = _ranges(np.array([0, 1, 2, 10]), 65536)
    r = replay_at(t, 65536, 1 << 30, base)
    assert (r["exclusive_blocks"], r["cow_breaks"], r["cow_bytes_copied"], r["provisioned_blocks"]) == \
        (4, 2, 2 * 65536, 3)
    r = replay_at(t, 1 << 20, 1 << 30, base)
    assert (r["exclusive_blocks"], r["cow_breaks"], r["provisioned_blocks"]) == (3, 1, 2)


def test_parse_block_sizes() -> None:
    assert parse_block_sizes("1M, 64K,64KiB") == [64 << 10, 1 << 20]
    for bad in ("", "4K", "100K", "64K,,1M", "2G", "x"):
        with pytest.raises(InvalidArgument):
            parse_block_sizes(bad)
