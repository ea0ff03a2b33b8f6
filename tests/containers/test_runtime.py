"""Containers of imported images (thinpool/containers/runtime.py), as Docker's devicemapper made them.

The image is the three-layer one umoci and skopeo build (tests/containers/oci_images.py); a second image holds
the host's /bin/sh and the libraries it needs, for ``--chroot``.  Sizes are checked against the snapshotter's
usage and `thinpool ls --usage`, and the recorded block I/O against what the container wrote.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile

import pytest

from tests.containers.oci_images import oci_layout, snapshot, snapshot_without
from tests.containers.test_image_store import BASE, _needs, new_pool, pool_state
from tests.support import scratch_dir
from thinpool import Pool
from thinpool.containers.image_store import import_image, remove_image, snapshotter
from thinpool.containers.realfs import INIT_DIRS, INIT_FILES, INIT_LINKS
from thinpool.containers.runtime import (create_container, exec_in_container, list_containers,
                                         mounted_container, remove_container)
from thinpool.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

pytestmark = pytest.mark.realtools
INIT = tuple(p.strip("/") for p in INIT_FILES + INIT_DIRS + tuple(link for link, _ in INIT_LINKS)) + ("dev", "etc/mtab")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    _needs()
    from tests.containers.oci_images import build_test_images
    built = build_test_images(tmp_path_factory.mktemp("img"))
    with scratch_dir("tp-runtime-") as d:
        path = new_pool(d)
        rec = import_image(path, built["img"], ref="v3", tag="test/img:v3", base_size=BASE)
        yield {"path": path, "built": built, "image": rec}


def _snap(path: str, fn):
    """``fn(snapshotter)`` on the pool opened read-only (closed after)."""
    pool = Pool.open(path, read_only=True)
    try:
        return fn(snapshotter(pool))
    finally:
        pool.close()


def _usage(path: str, volume: str) -> dict:
    out = subprocess.run(["python3", "-m", "thinpool", "ls", "--usage", "--json", path], capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONPATH=os.getcwd())).stdout
    import json
    return next(v for v in json.loads(out) if v["name"] == volume)


def test_docker_rule_container_sees_the_image_plus_init_files(env: dict) -> None:
    """A new container shows exactly the image's tree plus Docker's -init files and directories; the
    -init layer is its own committed snapshot of the image's top layer."""
    row = create_container(env["path"], "test/img:v3", "c1")
    try:
        assert row["image"] == "test/img:v3" and row["image_id"] == env["image"].id
        with mounted_container(env["path"], "c1") as root:
            got = snapshot(root)
            assert snapshot_without(root, INIT) == snapshot(env["built"]["expected"])
            for f in INIT_FILES:
                assert got[f.strip("/")][0] == "file"
            assert got["etc/mtab"] == ("symlink", "/proc/mounts")
        init, rw = _snap(env["path"], lambda s: (s.stat("ctr/c1-init"), s.stat("ctr/c1")))
        assert init.kind == "committed" and init.parent == env["image"].top_chain_id
        assert rw.kind == "active" and rw.parent == "ctr/c1-init"
        with pytest.raises(AlreadyExists):
            create_container(env["path"], "test/img:v3", "c1")
    finally:
        remove_container(env["path"], "c1")


def test_docker_rule_ps_size_is_owned_blocks_virtual_is_mapped(env: dict, tmp_path) -> None:
    """`ps -s`: SIZE = blocks the container's volume owns (not shared with its -init) x block size; virtual =
    every block its volume maps -- equal to the snapshotter's usage and to `thinpool ls --usage`; writing
    1 MiB of new data costs at least 16 blocks of 64 KiB and leaves the image's layers unchanged.  The
    container's block I/O is recorded as a fio iolog v3 of its volume's writes."""
    create_container(env["path"], env["image"].id[7:19], "c2")
    layers = {x.volume: pool_state(env["path"])["volumes"][x.volume] for x in env["image"].layers}
    try:
        before = next(r for r in list_containers(env["path"]) if r["name"] == "c2")
        log = str(tmp_path / "c2.iolog")
        rc = exec_in_container(env["path"], "c2", ["sh", "-c", 'test "$PWD" = "$ROOT" && '
                               'head -c 1048576 /dev/urandom > "$ROOT/new.bin" && exit 7'], record=log)
        assert rc == 7
        row = next(r for r in list_containers(env["path"]) if r["name"] == "c2")
        u = _snap(env["path"], lambda s: s.usage("ctr/c2"))
        assert row["owned_blocks"] == u.owned_blocks >= before["owned_blocks"] + 16
        assert row["size_bytes"] == u.owned_blocks * 65536
        ls = _usage(env["path"], row["volume"])
        assert row["virtual_size_bytes"] == ls["mapped_blocks"] * 65536 == u.mapped_blocks * 65536
        assert (row["exclusive_blocks"], row["shared_blocks"]) == (ls["exclusive_blocks"], ls["shared_blocks"])
        assert {v: pool_state(env["path"])["volumes"][v] for v in layers} == layers
        text = open(log).read()
        assert text.startswith("fio version 3 iolog\n")
        writes = [line.split() for line in text.splitlines() if re.match(r"^\d+ \S+ write ", line)]
        assert {w[1] for w in writes} == {row["volume"]}
        assert sum(int(w[4]) for w in writes) >= 1 << 20
        with mounted_container(env["path"], "c2") as root:
            assert os.path.getsize(os.path.join(root, "new.bin")) == 1 << 20
    finally:
        remove_container(env["path"], "c2")


def test_docker_rule_rm_container_and_image_order(env: dict, tmp_path) -> None:
    """`image rm` is refused while a container uses the image; `container rm` removes both its devices and
    its record, leaving the image's layers."""
    path = new_pool(str(tmp_path))
    rec = import_image(path, env["built"]["img"], ref="v1", base_size=BASE)
    create_container(path, "v1", "c3")
    with pytest.raises(FailedPrecondition, match="used by container"):
        remove_image(path, "v1")
    vols = set(pool_state(path)["volumes"])
    assert len(vols) == 4                       # base, layer, c3-init, c3
    assert remove_container(path, "c3")["removed"] == "c3"
    assert set(pool_state(path)["volumes"]) == {"snap/images/1", rec.layers[0].volume}
    assert list_containers(path) == []
    with pytest.raises(NotFound):
        remove_container(path, "c3")
    remove_image(path, "v1")


def _shell_layer() -> bytes:
    """/bin/sh and the libraries ``ldd`` names, at their paths, as one layer tar."""
    sh = os.path.realpath("/bin/sh")
    paths = [sh] + re.findall(r"(/\S+) \(0x", subprocess.run(["ldd", sh], capture_output=True, text=True).stdout)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        dirs = set()
        for p in paths:
            real = os.path.realpath(p)
            parts = p.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                    t.addfile(ti)
            ti = tarfile.TarInfo(p.strip("/"))
            ti.size, ti.mode = os.path.getsize(real), 0o755
            with open(real, "rb") as f:
                t.addfile(ti, f)
        ti = tarfile.TarInfo("bin/sh")
        ti.type, ti.linkname = tarfile.SYMTYPE, sh
        t.addfile(ti)
    return buf.getvalue()


def test_exec_chroot_runs_the_image_own_shell(env: dict, tmp_path) -> None:
    """--chroot: the command runs with the container's root as / (the image's own /bin/sh)."""
    img = oci_layout(str(tmp_path / "sh"), [_shell_layer()], tag="sh")
    import_image(env["path"], img["layout"], base_size=BASE)
    create_container(env["path"], "sh", "c4")
    try:
        rc = exec_in_container(env["path"], "c4", ["/bin/sh", "-c", 'echo "$ROOT" > /where; test -e /.dockerenv'],
                               chroot=True)
        assert rc == 0
        with mounted_container(env["path"], "c4") as root:
            assert open(os.path.join(root, "where")).read().strip().endswith("/rootfs")
    finally:
        remove_container(env["path"], "c4")
        remove_image(env["path"], "sh")


def test_bad_names_and_commands_refused(env: dict) -> None:
    for bad in ("", "-x", "a/b", "x" * 200, "a b"):
        with pytest.raises(InvalidArgument, match="bad container name"):
            create_container(env["path"], "test/img:v3", bad)
    with pytest.raises(NotFound, match="no image"):
        create_container(env["path"], "nope:1", "c5")
    with pytest.raises(InvalidArgument, match="needs a command"):
        exec_in_container(env["path"], "c5", [])
    assert list_containers(env["path"]) == []
