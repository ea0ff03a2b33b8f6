"""Images and containers on overlayfs as Docker's overlay2 lays them out (thinpool/containers/overlay.py).

The image is the small workload image built by ``umoci`` (tests/containers/workload_image.py): layer 1
the files, layer 2 deleting a file and a directory.  What a container's mount shows is checked against
``umoci unpack`` of the same image (an independent extraction), the upper directory's size against
``du``.  Root only (mounts); skips on a laptop, fails under CI=true.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess

import pytest

from tests.containers.workload_image import small_image
from tests.support import IN_CI, require_tool
from thinpool.containers import overlay
from thinpool.containers.overlay import OverlayStore, allocated_bytes, run_in_root
from thinpool.containers.workloads import DELETED_FILE, builtin_workloads
from thinpool.errors import AlreadyExists, ImageError, InvalidArgument

pytestmark = [pytest.mark.realtools, pytest.mark.root]


def require_overlay() -> None:
    missing = overlay.problems()
    if missing:
        msg = "needs " + ", ".join(missing)
        if IN_CI:
            pytest.fail(msg + " -- CI=true, so this is a failure")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_overlay()
    top = str(tmp_path_factory.mktemp("overlay"))
    b = small_image(top)
    store = OverlayStore(os.path.join(top, "store"))
    b["store"] = store
    b["image"] = store.import_image(b["archive"], "small")
    return b


def du_bytes(path: str) -> int:
    require_tool("du")
    out = subprocess.run(["du", "-s", "--block-size=1", path], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def tree(root: str) -> dict[str, tuple]:
    """Every path under ``root``: kind, mode, uid/gid, content digest or link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    out[rel] = ("file", st.st_mode, st.st_uid, st.st_gid, hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            else:
                out[rel] = ("other", st.st_mode, st.st_uid, st.st_gid, st.st_rdev)
    return out


def mounts_under(path: str) -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if path in line]


def test_overlay2_layout_whiteouts_stored_as_overlayfs_char_devices(built: dict) -> None:
    """overlay2's ApplyDiff: each layer in its own diff directory, a whiteout stored as a 0/0 char device."""
    store, image = built["store"], built["image"]
    assert len(image.chain_ids) == 2
    top = store.layer_dir(image.chain_ids[-1])
    for gone in built["deleted"]:
        st = os.lstat(os.path.join(top, gone))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0), gone
        assert os.path.lexists(os.path.join(store.layer_dir(image.chain_ids[0]), gone))
    assert not os.path.exists(os.path.join(top, ".wh." + os.path.basename(DELETED_FILE)))


def test_overlay_mount_shows_exactly_the_unpacked_image_whiteouts_hide_deleted_files(built: dict) -> None:
    """The merged view of a fresh container equals `umoci unpack` of the image: what the deleting layer
    whites out is hidden, every other file reads back identical (content, mode, owner)."""
    store, image = built["store"], built["image"]
    store.create_container(image, "view")
    try:
        with store.mounted("view") as root:
            for gone in built["deleted"]:
                assert not os.path.lexists(os.path.join(root, gone))
            got = tree(root)
        assert got == tree(built["reference"]) and len(got) > 50
        assert allocated_bytes(store.upper_dir("view")) == du_bytes(store.upper_dir("view"))
    finally:
        store.remove_container("view")


def test_overlay_short_lower_names_mount_the_same_tree(built: dict) -> None:
    """overlay2's fallback for long mount data: l/ short names relative to the store mount the same layers."""
    store, image = built["store"], built["image"]
    store.create_container(image, "short")
    try:
        opts, cwd = store.mount_options("short", short=True)
        assert cwd == store.root and "lowerdir=l/" in opts and store.root not in opts
        with store.mounted("short", short=True) as root:
            got = tree(root)
        assert got == tree(built["reference"])
    finally:
        store.remove_container("short")


@pytest.mark.parametrize("wl", builtin_workloads(), ids=lambda w: w.name)
def test_overlay_upper_bytes_equal_du_of_the_upper_directory(built: dict, wl) -> None:
    """The comparison's overlay figure is what `du -s --block-size=1` says of the upper directory."""
    store, image = built["store"], built["image"]
    name = f"du-{wl.name}"
    store.create_container(image, name)
    try:
        r = store.exec(name, list(wl.argv))
        assert r.returncode == 0, r.stderr
        got = store.upper_bytes(name)
        assert got == du_bytes(store.upper_dir(name))
        assert got > 0
    finally:
        store.remove_container(name)


def test_overlay_copy_up_of_a_chmod_is_the_whole_file(built: dict) -> None:
    """overlayfs copies a whole file up on a metadata change (without metacopy): the upper directory holds
    at least the file's size, and the lower layer's copy is untouched."""
    if overlay.kernel_features().get("metacopy") == "Y":
        pytest.skip("the overlay module defaults to metacopy=on here: a chmod copies only the inode")
    store, image = built["store"], built["image"]
    store.create_container(image, "chmod")
    try:
        with store.mounted("chmod") as root:
            size = os.path.getsize(os.path.join(root, "srv/data.bin"))
            assert run_in_root(root, ["chmod", "600", "srv/data.bin"]).returncode == 0
        upper = os.path.join(store.upper_dir("chmod"), "srv/data.bin")
        assert stat.S_IMODE(os.stat(upper).st_mode) == 0o600
        assert store.upper_bytes("chmod") >= size
        lower = os.path.join(store.layer_dir(image.chain_ids[0]), "srv/data.bin")
        assert stat.S_IMODE(os.stat(lower).st_mode) == 0o644
    finally:
        store.remove_container("chmod")


def test_allocated_bytes_counts_hard_links_once_as_du(tmp_path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a").write_bytes(os.urandom(50_000))
    os.link(d / "a", d / "sub" / "b")
    (d / "sparse").touch()
    with open(d / "sparse", "r+b") as f:
        f.truncate(10 << 20)
        f.write(b"x")
    os.symlink("a", d / "l")
    assert allocated_bytes(str(d)) == du_bytes(str(d))


def test_overlay_unmounts_when_the_command_fails_or_raises(built: dict) -> None:
    store, image = built["store"], built["image"]
    store.create_container(image, "fail")
    try:
        r = store.exec("fail", ["sh", "-c", "exit 3"])
        assert r.returncode == 3
        merged = os.path.join(store.container_dir("fail"), "merged")
        assert not os.path.ismount(merged)
        with pytest.raises(RuntimeError):
            with store.mounted("fail") as root:
                assert os.path.ismount(root)
                raise RuntimeError("boom")
        assert not os.path.ismount(merged)
    finally:
        store.remove_container("fail")
    assert not mounts_under(store.container_dir("fail"))


def test_overlay_reimport_extracts_nothing_and_names_are_checked(built: dict) -> None:
    store, image = built["store"], built["image"]
    layer = store.layer_dir(image.chain_ids[0])
    before = os.stat(layer).st_ino
    assert store.import_image(built["archive"], "small") == image
    assert os.stat(layer).st_ino == before
    for bad in ("", "../x", "a/b", "-x", "x" * 200):
        with pytest.raises(InvalidArgument):
            store.create_container(image, bad)
    store.create_container(image, "twice")
    try:
        with pytest.raises(AlreadyExists):
            store.create_container(image, "twice")
    finally:
        store.remove_container("twice")


def test_overlay_import_of_a_damaged_layer_leaves_nothing(built: dict, tmp_path) -> None:
    """A layer whose blob does not match its digest: ImageError naming the blob, no layer directory left."""
    import shutil
    damaged = str(tmp_path / "damaged")
    shutil.copytree(built["archive"], damaged)
    from thinpool.containers.oci import open_image
    with open_image(damaged, "small") as img:
        blob = img.layers[-1].blob
    path = os.path.join(damaged, blob)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)
    store = OverlayStore(str(tmp_path / "store"))
    with pytest.raises(ImageError, match=os.path.basename(blob)):
        store.import_image(damaged, "small")
    left = sorted(os.listdir(store.root))
    assert left == ["containers", "images", "l"] or all(
        os.path.isdir(os.path.join(store.root, x, "diff")) for x in left if x not in ("containers", "images", "l"))
    assert not any(x.startswith(".") for x in left)
    assert os.listdir(os.path.join(store.root, "images")) == []

