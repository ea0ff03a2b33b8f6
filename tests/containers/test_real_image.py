"""A real Debian rootfs through `image import` -- only with THINPOOL_REAL_IMAGES=1 (it downloads packages
and takes a few minutes).

``mmdebstrap --variant=minbase`` makes the rootfs tar, ``podman import`` turns it into an image and ``podman
save --format oci-archive`` writes the archive; the imported layer, mounted read-only from its thin volume,
is compared file by file with the tar extracted here, and a container runs the image's own programs
(``--chroot``).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.containers.oci_images import snapshot
from tests.containers.test_image_store import _needs, mounted_ro, new_pool
from tests.support import require_tool, scratch_dir
from thinpool.containers.image_store import image_history, import_image
from thinpool.containers.runtime import create_container, exec_in_container, list_containers, mounted_container

pytestmark = [pytest.mark.realtools, pytest.mark.skipif(os.environ.get("THINPOOL_REAL_IMAGES") != "1",
                                                        reason="a real Debian image only with THINPOOL_REAL_IMAGES=1")]


def test_debian_minbase_reads_back_identical_and_runs(tmp_path) -> None:
    _needs()
    require_tool("mmdebstrap", "podman")
    rootfs = str(tmp_path / "debian.tar")
    subprocess.run(["mmdebstrap", "--variant=minbase", "--quiet", "stable", rootfs], check=True, timeout=1800)
    tag = f"localhost/thinpool-debian-{os.getpid()}:minbase"
    archive = str(tmp_path / "debian-oci.tar")
    subprocess.run(["podman", "import", "-q", rootfs, tag], check=True, capture_output=True, timeout=600)
    try:
        subprocess.run(["podman", "save", "-q", "--format", "oci-archive", "-o", archive, tag], check=True,
                       capture_output=True, timeout=600)
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
    tree = str(tmp_path / "tree")
    os.mkdir(tree)
    subprocess.run(["tar", "-xpf", rootfs, "--xattrs", "--xattrs-include=*", "--numeric-owner", "-C", tree],
                   check=True)
    with scratch_dir("tp-debian-") as d:
        path = new_pool(d)
        rec = import_image(path, archive, tag="debian:minbase", base_size="2G")
        with mounted_ro(path, rec.layers[-1].volume) as root:
            assert snapshot(root) == snapshot(tree)
        rows = image_history(path, "debian:minbase")
        assert rows[0]["owned_blocks"] * 65536 >= rows[0]["file_bytes"] > 50 << 20
        create_container(path, "debian:minbase", "deb1")
        assert exec_in_container(path, "deb1", ["/bin/sh", "-c", "cat /etc/debian_version > /out; dpkg -l > /pkgs"],
                                 chroot=True) == 0
        with mounted_container(path, "deb1") as root:
            assert open(os.path.join(root, "out")).read() == open(os.path.join(tree, "etc/debian_version")).read()
            assert "ii  dpkg" in open(os.path.join(root, "pkgs")).read()
        assert list_containers(path)[0]["owned_blocks"] >= 1
