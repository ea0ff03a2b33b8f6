"""The built-in workloads of ``thinpool compare`` (thinpool/containers/workloads.py): each one, run in an
overlay container of the small workload image, changes what it says it changes -- and nothing the
others are about -- and the image carries what they need.  Root only (mounts).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import tarfile

import pytest

from tests.containers.test_overlay import require_overlay
from tests.containers.workload_image import small_image
from thinpool.containers.overlay import OverlayStore, run_in_root
from thinpool.containers.workloads import (BIG_PATH, BUNDLE_PATH, CONFIG_PATH, DATA_PATH, DB_PATH, LOG_PATH, MiB,
                                           SMALL_SIZES, UNPACK_DIR, ImageSizes, builtin_workloads,
                                           parse_workload)
from thinpool.errors import InvalidArgument

pytestmark = [pytest.mark.realtools, pytest.mark.root]
WORKLOADS = {w.name: w for w in builtin_workloads()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_overlay()
    top = str(tmp_path_factory.mktemp("workloads"))
    b = small_image(top)
    b["store"] = OverlayStore(os.path.join(top, "store"))
    b["image"] = b["store"].import_image(b["archive"], "small")
    return b


def run_workload(built: dict, name: str, argv: list[str] | None = None) -> tuple[str, str]:
    """Run workload ``name`` (or ``argv``) in a fresh overlay container; returns the reference tree (the
    image as `umoci unpack` extracts it) and the container's name (unmounted: callers mount it again)."""
    store = built["store"]
    cname = f"w-{name}"
    store.create_container(built["image"], cname)
    r = store.exec(cname, argv or list(WORKLOADS[name].argv))
    assert r.returncode == 0, r.stderr
    return built["reference"], cname


def rows(db: str) -> dict[int, tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r[0]: r[1:] for r in con.execute("SELECT id, k, v, updated FROM rows")}
    finally:
        con.close()


@pytest.mark.parametrize("name,percent", [("sqlite-0.1pct", 0.1), ("sqlite-1pct", 1.0)])
def test_workload_sqlite_updates_the_stated_share_of_rows(built: dict, name: str, percent: float) -> None:
    ref, cname = run_workload(built, name)
    before = rows(os.path.join(ref, DB_PATH))
    assert len(before) == built["db_rows"]
    with built["store"].mounted(cname) as root:
        after = rows(os.path.join(root, DB_PATH))
        assert not os.path.exists(os.path.join(root, DB_PATH + "-journal"))
    changed = [i for i in before if after[i] != before[i]]
    assert sorted(after) == sorted(before)
    assert len(changed) == max(1, round(len(before) * percent / 100))
    for i in changed:
        assert after[i][2] == 1 and after[i][0] == before[i][0] and len(after[i][1]) == len(before[i][1])
        assert after[i][1] != before[i][1]


def test_workload_log_append_adds_1_mib_and_keeps_the_log(built: dict) -> None:
    ref, cname = run_workload(built, "log-append")
    with open(os.path.join(ref, LOG_PATH), "rb") as f:
        old = f.read()
    with built["store"].mounted(cname) as root:
        with open(os.path.join(root, LOG_PATH), "rb") as f:
            new = f.read()
    assert len(old) == SMALL_SIZES.log_bytes and len(new) == len(old) + MiB and new[:len(old)] == old


def test_workload_touch_chmod_changes_mode_and_mtime_not_bytes(built: dict) -> None:
    ref, cname = run_workload(built, "touch-chmod")
    st0 = os.stat(os.path.join(ref, DATA_PATH))
    with open(os.path.join(ref, DATA_PATH), "rb") as f:
        old = f.read()
    with built["store"].mounted(cname) as root:
        st1 = os.stat(os.path.join(root, DATA_PATH))
        with open(os.path.join(root, DATA_PATH), "rb") as f:
            assert f.read() == old
    assert stat.S_IMODE(st0.st_mode) == 0o644 and stat.S_IMODE(st1.st_mode) == 0o600
    assert st1.st_mtime > st0.st_mtime and len(old) == SMALL_SIZES.file_bytes


def test_workload_config_rewrite_changes_one_line_of_4_kib(built: dict) -> None:
    ref, cname = run_workload(built, "config-rewrite")
    with open(os.path.join(ref, CONFIG_PATH), "rb") as f:
        old = f.read()
    with built["store"].mounted(cname) as root:
        with open(os.path.join(root, CONFIG_PATH), "rb") as f:
            new = f.read()
    assert len(old) == len(new) == 4096
    assert b"\nworkers = 4\n" in old and new == old.replace(b"\nworkers = 4\n", b"\nworkers = 8\n")


def test_workload_unpack_small_creates_the_bundles_files(built: dict) -> None:
    ref, cname = run_workload(built, "unpack-small")
    with tarfile.open(os.path.join(ref, BUNDLE_PATH)) as t:
        members = {m.name: m.size for m in t.getmembers() if m.isfile()}
    assert len(members) == SMALL_SIZES.small_files
    assert not os.path.exists(os.path.join(ref, UNPACK_DIR))
    with built["store"].mounted(cname) as root:
        got = {}
        for dirpath, _, files in os.walk(os.path.join(root, UNPACK_DIR)):
            for fn in files:
                full = os.path.join(dirpath, fn)
                got[os.path.relpath(full, os.path.join(root, UNPACK_DIR))] = os.path.getsize(full)
    assert got == members


def test_workload_delete_big_removes_a_file_of_the_image(built: dict) -> None:
    ref, cname = run_workload(built, "delete-big")
    assert os.path.getsize(os.path.join(ref, BIG_PATH)) == SMALL_SIZES.big_bytes
    with built["store"].mounted(cname) as root:
        assert not os.path.lexists(os.path.join(root, BIG_PATH))
        assert os.path.exists(os.path.join(root, DATA_PATH))
    st = os.lstat(os.path.join(built["store"].upper_dir(cname), BIG_PATH))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0       # overlayfs' whiteout


def test_user_workload_runs_in_the_root_with_ROOT_set(built: dict) -> None:
    w = parse_workload('mine=echo "$ROOT" > here && pwd >> here && ls srv > srv-list')
    assert w.argv[:2] == ("sh", "-c")
    ref, cname = run_workload(built, "mine", list(w.argv))
    with built["store"].mounted(cname) as root:
        with open(os.path.join(root, "here")) as f:
            assert f.read().split() == [root, root]
        with open(os.path.join(root, "srv-list")) as f:
            assert "data.bin" in f.read().split()


def test_run_in_root_chroot_runs_the_images_own_program(tmp_path) -> None:
    """--chroot: argv[0] is looked up inside the root (here a root holding no shell: the run fails)."""
    root = str(tmp_path / "r")
    os.mkdir(root)
    r = run_in_root(root, ["/bin/true"], chroot=True)
    assert r.returncode != 0
    assert run_in_root(root, ["true"]).returncode == 0


@pytest.mark.parametrize("spec", ["noequals", "=cmd", "bad name=x", "x=", "x=   ", "../x=ls", "x=a\0b"])
def test_parse_workload_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_workload(spec)


def test_image_sizes_are_checked() -> None:
    with pytest.raises(InvalidArgument):
        ImageSizes(db_bytes=0)
    with pytest.raises(InvalidArgument):
        ImageSizes(log_bytes=True)
    with pytest.raises(InvalidArgument):
        ImageSizes(db_bytes=1000)
