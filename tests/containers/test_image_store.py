"""Real images on a thin pool (thinpool/containers/image_store.py), as Docker's devicemapper stored them.

The images are made by umoci and skopeo (tests/containers/oci_images.py): three layers with files, symlinks,
a hard link, an xattr, a 3 MiB file, a deletion (whiteout) and an opaque directory, in the forms OCI layout,
docker-archive and zstd layout.  Every layer is read back from its own thin volume through a read-only ext4
mount and compared with the tree umoci made for that tag.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.containers.oci_images import build_test_images, copy_tree, layer_tar, oci_layout, snapshot
from tests.support import require_root, require_tool, scratch_dir
from thinpool import Pool
from thinpool.containers import image_store
from thinpool.containers.image_store import (image_history, import_image, list_images, load_records, recover,
                                             remove_image, snapshotter)
from thinpool.errors import FailedPrecondition, ImageError, InvalidArgument

pytestmark = pytest.mark.realtools
BASE = "256M"


def _needs() -> None:
    require_root()
    require_tool("umoci", "skopeo", "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "tune2fs")


def new_pool(parent: str, name: str = "pool") -> str:
    path = os.path.join(parent, name)
    Pool.create(path, data_size="1G", block_size="64K").close()
    return path


@contextlib.contextmanager
def mounted_ro(pool_path: str, volume: str):
    """The image root (``rootfs``) of ``volume``, mounted read-only through NBD + nbdfuse + loop."""
    from thinpool.containers.volmount import PoolMounts
    pool = Pool.open(pool_path)
    try:
        with PoolMounts(pool) as mounts:
            a = mounts.mount(volume, read_only=True)
            yield os.path.join(a.mountpoint, "rootfs")
    finally:
        pool.close()


def pool_state(pool_path: str) -> dict:
    """What must be identical after a failed import: volumes and their mappings, the records, data used."""
    pool = Pool.open(pool_path, read_only=True)
    try:
        snaps = pool.get_records("snapshots/images").get("snapshots", {})
        return {"volumes": {t.name: (t.mapped_blocks, bool(t.read_only)) for t in pool.thins()},
                "used": pool.status().used_data_blocks, "images": pool.get_records("images"),
                "snapshots": {k: (v["kind"], v["parent"]) for k, v in snaps.items()}}
    finally:
        pool.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    _needs()
    return build_test_images(tmp_path_factory.mktemp("img"))


@pytest.fixture(scope="module")
def store(built: dict) -> dict:
    """A pool with v1 imported, then v3 (which shares v1's layer)."""
    with scratch_dir("tp-imgstore-") as d:
        path = new_pool(d)
        r1 = import_image(path, built["img"], ref="v1", base_size=BASE)
        used1 = pool_state(path)["used"]
        said: list[str] = []
        r3 = import_image(path, built["img"], ref="v3", tag="test/img:v3", base_size=BASE, progress=said.append)
        yield {"path": path, "v1": r1, "v3": r3, "used_after_v1": used1, "dir": d, "said": said}


def test_devicemapper_rule_every_file_of_every_layer_reads_back_identical(built: dict, store: dict) -> None:
    """Each layer is a snapshot of its parent with the layer applied through ext4: mounted from its own thin
    volume, layer n shows exactly the tree of tag v(n+1) -- files, modes, symlinks, the hard link, the user
    xattr, the whiteout of ``gone`` (layer 2) and the opaque ``d`` (layer 3)."""
    r3 = store["v3"]
    assert [x.index for x in r3.layers] == [0, 1, 2]
    for layer, tag in zip(r3.layers, ("v1", "v2", "v3")):
        with mounted_ro(store["path"], layer.volume) as root:
            got = snapshot(root)
        assert got == snapshot(built["trees"][tag]), tag
    assert "gone" in snapshot(built["trees"]["v1"]) and "gone" not in got
    assert sorted(k for k in got if k.startswith("d/")) == ["d/z"]


def test_devicemapper_rule_layers_shared_between_images_are_stored_once(store: dict) -> None:
    """v3's first layer has v1's chain ID: it is the same committed snapshot, not a copy; importing v3
    added exactly the blocks its two new layers own."""
    r1, r3 = store["v1"], store["v3"]
    assert r1.layers[0].chain_id == r3.layers[0].chain_id and r1.layers[0].volume == r3.layers[0].volume
    state = pool_state(store["path"])
    assert sorted(state["volumes"]) == sorted({"snap/images/1"} | {x.volume for x in r3.layers})
    assert all(ro for _, ro in state["volumes"].values())          # committed snapshots are read-only
    assert state["used"] - store["used_after_v1"] == r3.layers[1].owned_blocks + r3.layers[2].owned_blocks
    assert set(state["images"]["layers"]) == {x.chain_id for x in r3.layers}
    assert {tuple(i.tags) for i in list_images(store["path"])} == {("v1",), ("test/img:v3",)}
    assert [m.split(": ", 1)[1].split()[0] for m in store["said"]] == ["stored,", "applying", "applying"]


def test_history_block_usage_equals_thinpool_ls_usage(store: dict) -> None:
    """`image history`'s per-layer mapped/exclusive/shared blocks are `thinpool ls --usage`'s for the layer's
    volume; the blocks the layers own add up to the pool's used data blocks (one chain holds them all); the
    top layer (no child) owns exactly its exclusive blocks; file sizes are the layer tars' (Docker's SIZE)."""
    rows = image_history(store["path"], "test/img:v3")
    assert [r["layer"] for r in rows] == [x.chain_id for x in reversed(store["v3"].layers)] + ["base"]
    proc = subprocess.run([sys.executable, "-m", "thinpool", "ls", "--usage", "--json", store["path"]],
                          capture_output=True, text=True, check=True)
    ls = {v["name"]: v for v in json.loads(proc.stdout)}
    for r in rows:
        v = ls[r["volume"]]
        assert (r["mapped_blocks"], r["exclusive_blocks"], r["shared_blocks"]) == \
            (v["mapped_blocks"], v["exclusive_blocks"], v["shared_blocks"])
        assert r["block_bytes"] == r["owned_blocks"] * 65536
    assert sum(r["owned_blocks"] for r in rows) == pool_state(store["path"])["used"]
    assert rows[0]["owned_blocks"] == rows[0]["exclusive_blocks"] > 0
    assert rows[2]["file_bytes"] == (3 << 20) + 6 + 2 + 2 + 2 + 2 + 20      # layer 0: the hard link adds nothing
    assert rows[2]["owned_blocks"] >= (3 << 20) // 65536                   # the 3 MiB file at least
    assert rows[1]["file_bytes"] == (3 << 20) + 4 and rows[0]["file_bytes"] == 2
    assert store["v3"].layers[2].owned_blocks == rows[0]["owned_blocks"]   # recorded at import = measured now


def test_devicemapper_rule_reimport_is_a_noop(built: dict, store: dict) -> None:
    """Importing an image that is stored writes nothing: the metadata file is byte-identical after it."""
    meta = os.path.join(store["path"], Pool.METADATA)
    before = open(meta, "rb").read()
    again = import_image(store["path"], built["img"], ref="v3", tag="test/img:v3", base_size=BASE)
    assert not again.new and again.id == store["v3"].id
    assert [x.volume for x in again.layers] == [x.volume for x in store["v3"].layers]
    assert open(meta, "rb").read() == before


def test_base_device_must_match(built: dict, store: dict) -> None:
    with pytest.raises(InvalidArgument, match="base device of 268435456 bytes"):
        import_image(store["path"], built["img"], ref="v2", base_size="512M")


@pytest.mark.parametrize("form,ref", [("docker", "test/img:v3"), ("zstd", "v3z")])
def test_oci_rule_docker_archive_and_zstd_layers_import_identically(built: dict, form: str, ref: str,
                                                                   tmp_path) -> None:
    """A docker-save tarball and a layout of zstd layers give the same layers (chain IDs) and the same tree."""
    path = new_pool(str(tmp_path))
    rec = import_image(path, built[form], ref=ref, base_size=BASE)
    assert rec.format == ("docker-archive" if form == "docker" else "oci")
    with mounted_ro(path, rec.layers[-1].volume) as root:
        assert snapshot(root) == snapshot(built["expected"])


def test_podman_save_archives_import_identically(built: dict, tmp_path) -> None:
    """`podman save --format oci-archive` and `podman save` (docker-archive, as `docker save` writes) of the
    image, loaded into podman from the docker-archive skopeo made: both import to the same tree."""
    require_tool("podman")
    tag = f"localhost/thinpool-test-{os.getpid()}:v3"
    subprocess.run(["podman", "load", "-q", "-i", built["docker"]], check=True, capture_output=True, timeout=300)
    try:
        subprocess.run(["podman", "tag", "docker.io/test/img:v3", tag], check=True, capture_output=True)
        archives = {}
        for fmt in ("oci-archive", "docker-archive"):
            archives[fmt] = str(tmp_path / f"{fmt}.tar")
            subprocess.run(["podman", "save", "--format", fmt, "-o", archives[fmt], tag], check=True,
                           capture_output=True, timeout=300)
    finally:
        subprocess.run(["podman", "rmi", "-f", tag, "docker.io/test/img:v3"], capture_output=True)
    for fmt, archive in archives.items():
        path = new_pool(str(tmp_path), fmt)                # each applied from scratch, not shared
        rec = import_image(path, archive, base_size=BASE)
        assert rec.format == ("oci" if fmt == "oci-archive" else "docker-archive")
        with mounted_ro(path, rec.layers[-1].volume) as root:
            assert snapshot(root) == snapshot(built["expected"]), fmt


def test_oci_rule_ownership_modes_mtimes_and_xattrs_kept_through_ext4(tmp_path) -> None:
    """As root the import keeps what the tar headers say: uid/gid, modes (setgid directory, 0640 file),
    mtimes, and xattrs outside ``user.`` (``trusted.*``), on the ext4 of the layer's volume."""
    _needs()
    import io
    import stat
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, mode, uid, gid in (("srv", tarfile.DIRTYPE, 0o2750, 33, 33),
                                           ("srv/app.conf", tarfile.REGTYPE, 0o640, 1234, 5678),
                                           ("srv/link", tarfile.SYMTYPE, 0o777, 1234, 5678)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, 1_600_000_000
            data = b"key=value\n" if kind == tarfile.REGTYPE else b""
            ti.size = len(data)
            if kind == tarfile.SYMTYPE:
                ti.linkname = "app.conf"
            if name == "srv/app.conf":
                ti.pax_headers = {"SCHILY.xattr.trusted.note": "kept", "SCHILY.xattr.user.colour": "blue"}
            t.addfile(ti, io.BytesIO(data))
    img = oci_layout(str(tmp_path / "own"), [buf.getvalue()])
    path = new_pool(str(tmp_path))
    rec = import_image(path, img["layout"], base_size=BASE)
    with mounted_ro(path, rec.layers[0].volume) as root:
        d, f, ln = (os.lstat(os.path.join(root, p)) for p in ("srv", "srv/app.conf", "srv/link"))
        assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid) == (0o2750, 33, 33)
        assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid, f.st_mtime) == (0o640, 1234, 5678, 1_600_000_000)
        assert (ln.st_uid, ln.st_gid, os.readlink(os.path.join(root, "srv/link"))) == (1234, 5678, "app.conf")
        assert os.getxattr(os.path.join(root, "srv/app.conf"), "trusted.note") == b"kept"
        assert os.getxattr(os.path.join(root, "srv/app.conf"), "user.colour") == b"blue"


# -- the import is one transaction ------------------------------------------------------------------

def _broken(built: dict, tmp_path, how: str) -> tuple[str, str]:
    """A copy of the layout with one thing broken; returns (layout, text the error must contain)."""
    layout = copy_tree(built["img"], str(tmp_path / "broken"))
    index = json.load(open(f"{layout}/index.json"))
    desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "v3")
    mpath = f"{layout}/blobs/sha256/{desc['digest'].split(':')[1]}"
    manifest = json.load(open(mpath))
    blob = "blobs/sha256/" + manifest["layers"][2]["digest"].split(":")[1]
    full = f"{layout}/{blob}"
    if how == "manifest":
        with open(mpath, "wb") as f:
            f.write(b"{not json")
        return layout, f"manifest blob blobs/sha256/{desc['digest'].split(':')[1]}"
    if how == "missing":
        os.unlink(full)
        return layout, f"blob {blob} missing"
    data = bytearray(open(full, "rb").read())
    if how == "digest":
        data[len(data) // 2] ^= 0xFF
    elif how == "truncated":
        data = data[: len(data) // 2]
    with open(full, "wb") as f:
        f.write(bytes(data))
    return layout, f"blob {blob}"


@pytest.mark.parametrize("how", ["digest", "truncated", "missing", "manifest"])
def test_import_failure_leaves_nothing(built: dict, tmp_path, how: str) -> None:
    """A digest mismatch or truncated stream in the last layer (after layer 2 was applied), a missing blob,
    an unreadable manifest: ImageError naming the blob, and the pool as it was (volumes and their
    mappings, records, used data blocks)."""
    layout, names = _broken(built, tmp_path, how)
    path = new_pool(str(tmp_path))
    import_image(path, built["img"], ref="v1", base_size=BASE)
    before = pool_state(path)
    with pytest.raises(ImageError) as err:
        import_image(path, layout, ref="v3", base_size=BASE)
    assert names in str(err.value)
    if how in ("digest", "truncated"):
        assert "layer 2" in str(err.value)
    assert pool_state(path) == before
    assert "pending" not in load_records(Pool.open(path, read_only=True))


def test_layer_that_fails_to_apply_leaves_nothing_not_even_the_base(tmp_path) -> None:
    """On an empty pool the base device is part of the transaction: a second layer whose hard link has no
    target fails after the base and layer 1 were made, and the pool is empty again."""
    _needs()
    img = oci_layout(str(tmp_path / "bad"), [layer_tar([("a", "file", b"1" * 100_000)]),
                                             layer_tar([("h", "link", "nothing-here")])])
    path = new_pool(str(tmp_path))
    before = pool_state(path)
    with pytest.raises(ImageError, match=f"layer 1 blob {img['blobs'][1]}: .*member 'h'.*hard link target"):
        import_image(path, img["layout"], base_size=BASE)
    assert pool_state(path) == before and before["volumes"] == {}


def test_import_out_of_data_space_fails_at_once_and_leaves_nothing(tmp_path) -> None:
    """A layer bigger than the pool's free space: ext4 buffers the writes, so the import watches the block
    requests themselves -- the writes that find no data space fail at once (no 60 s wait for space), the
    import fails naming the layer's blob, and nothing is left, not even the base.  A filesystem that lost
    writes is never committed as a layer."""
    _needs()
    img = oci_layout(str(tmp_path / "big"), [layer_tar([("a", "file", b"1" * 1000)]),
                                             layer_tar([("big", "file", os.urandom(6 << 20))])])
    path = os.path.join(str(tmp_path), "small")
    Pool.create(path, data_size="4M", block_size="64K").close()
    with pytest.raises(FailedPrecondition, match=f"layer 1 blob {img['blobs'][1]}: the pool failed .* block "
                                                 r"request\(s\) .*data space"):
        import_image(path, img["layout"], base_size="32M")
    state = pool_state(path)
    assert state["volumes"] == {} and state["used"] == 0 and state["snapshots"] == {}


def test_killed_import_is_cleaned_up_by_the_next_write(tmp_path) -> None:
    """An import that died half-way left snapshots listed in its pending record: the next write of the
    store removes them (and only them)."""
    path = new_pool(str(tmp_path))
    pool = Pool.open(path)
    s = snapshotter(pool, 64 << 20)
    s.prepare("keep", None)
    s.prepare("extract/base", None)
    recs = load_records(pool)
    recs["pending"] = {"keys": ["extract/base", "base", "extract/sha256:x"]}
    pool.put_records("images", recs)
    pool.commit()
    assert recover(pool) == ["extract/base"]
    assert [i.name for i in s.walk()] == ["keep"] and "pending" not in load_records(pool)
    assert recover(pool) == []
    pool.close()


def test_remove_image_keeps_shared_layers(built: dict, tmp_path) -> None:
    """`image rm` of v3 removes its two own layers but not the one v1 shares; removing v1 then leaves
    only the base device; a tag of several only untags."""
    path = new_pool(str(tmp_path))
    r1 = import_image(path, built["img"], ref="v1", base_size=BASE)
    r3 = import_image(path, built["img"], ref="v3", base_size=BASE)
    import_image(path, built["img"], ref="v3", tag="other:tag", base_size=BASE)
    import_image(path, built["img"], ref="v3", tag="docker.io/library/third:latest", base_size=BASE)
    assert remove_image(path, "other:tag") == {"untagged": ["other:tag"], "deleted": None, "layers_removed": []}
    assert remove_image(path, "third")["untagged"] == ["docker.io/library/third:latest"]   # docker's short form
    out = remove_image(path, "v3")
    assert out["deleted"] == r3.id and out["layers_removed"] == [r3.layers[2].chain_id, r3.layers[1].chain_id]
    assert sorted(pool_state(path)["volumes"]) == sorted(["snap/images/1", r1.layers[0].volume])
    remove_image(path, r1.id[7:19])                                       # an ID prefix names it too
    state = pool_state(path)
    assert list(state["volumes"]) == ["snap/images/1"] and state["images"]["images"] == {}
    assert state["used"] == state["volumes"]["snap/images/1"][0]
    assert image_store.BASE_KEY in state["snapshots"]


def test_without_root_one_line_refusal(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(Exception, match=r"^thinpool image import mounts thin volumes and needs root"):
        import_image(str(tmp_path / "nopool"), str(tmp_path))
    assert "\n" not in str(pytest.raises(Exception, import_image, str(tmp_path), str(tmp_path)).value)
    shutil.rmtree(tmp_path, ignore_errors=True)
