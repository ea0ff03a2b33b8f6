"""Hostile image archives through `image import`: a layer can never write outside its own mount.

Each archive is an OCI layout written here with Python's tarfile (tests/containers/oci_images.py): a good
first layer, then a hostile one.  Escaping names and hard links out are refused with an ImageError naming the
blob and the member, and the pool is left exactly as it was (volumes, their mappings, records, data used); a
symlink pointing out is resolved inside the layer's root, as in a chroot, so a file written through it lands
inside the image and the host directory it names is untouched; device nodes and setuid bits are kept as
root and refused (nothing left) when the import is not privileged.
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.containers.oci_images import layer_tar, oci_layout
from tests.containers.test_image_store import BASE, _needs, mounted_ro, new_pool, pool_state
from tests.support import scratch_dir
from thinpool.containers.image_store import import_image, remove_image
from thinpool.errors import ImageError

pytestmark = pytest.mark.realtools
GOOD = [("etc", "dir", None), ("etc/os-release", "file", b"ID=test\n")]


@pytest.fixture(scope="module")
def pool() -> str:
    """A pool whose base device exists (a good image imported), shared by the cases."""
    _needs()
    with scratch_dir("tp-hostile-") as d:
        path = new_pool(d)
        img = oci_layout(os.path.join(d, "good"), [layer_tar(GOOD)])
        import_image(path, img["layout"], base_size=BASE)
        yield path


@pytest.fixture
def host(tmp_path) -> str:
    """A host directory outside every mount holding one file, ``secret``."""
    d = tmp_path / "host"
    d.mkdir()
    (d / "secret").write_bytes(b"secret")
    return str(d)


def _untouched(host: str) -> None:
    assert os.listdir(host) == ["secret"]
    st = os.stat(os.path.join(host, "secret"))
    assert st.st_nlink == 1 and open(os.path.join(host, "secret"), "rb").read() == b"secret"


def _refused(pool: str, tmp_path, members: list[tuple], match: str, **kw) -> None:
    img = oci_layout(str(tmp_path / "hostile"), [layer_tar(GOOD), layer_tar(members)])
    before = pool_state(pool)
    with pytest.raises(ImageError, match=match) as err:
        import_image(pool, img["layout"], base_size=BASE, **kw)
    assert f"layer 1 blob {img['blobs'][1]}" in str(err.value)
    assert pool_state(pool) == before


@pytest.mark.parametrize("kind", ["dotdot", "nested-dotdot", "absolute"])
def test_oci_rule_escaping_member_names_refused_nothing_left(pool: str, host: str, tmp_path, kind: str) -> None:
    name = {"dotdot": "../" * 12 + host.lstrip("/") + "/pwned",
            "nested-dotdot": "etc/../../" + "../" * 10 + host.lstrip("/") + "/pwned",
            "absolute": host + "/pwned"}[kind]
    _refused(pool, tmp_path, [("ok", "file", b"1"), (name, "file", b"x")], r"absolute member name|'\.\.' component")
    _untouched(host)


@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_oci_rule_tar_slip_through_symlink_lands_inside_the_image(pool: str, host: str, tmp_path,
                                                                 target: str) -> None:
    """``a -> HOST`` then ``a/pwned``: the symlink is resolved inside the layer's root (its rootfs), so the
    file is written into the image at ``HOST/pwned`` under the image root; the host directory is untouched."""
    link = host if target == "absolute" else "../" * 12 + host.lstrip("/")
    img = oci_layout(str(tmp_path / "slip"), [layer_tar(GOOD), layer_tar([("a", "sym", link),
                                                                         ("a/pwned", "file", b"pwned")])],
                     tag=f"slip-{target}")
    rec = import_image(pool, img["layout"], base_size=BASE)
    _untouched(host)
    with mounted_ro(pool, rec.layers[-1].volume) as root:
        assert os.readlink(os.path.join(root, "a")) == link
        assert open(os.path.join(root, host.lstrip("/"), "pwned"), "rb").read() == b"pwned"
    _untouched(host)
    remove_image(pool, rec.id)


@pytest.mark.parametrize("case", ["dotdot", "absolute", "through-symlink"])
def test_oci_rule_hard_link_to_outside_refused_nothing_left(pool: str, host: str, tmp_path, case: str) -> None:
    members = {"dotdot": [("h", "link", "../" * 12 + host.lstrip("/") + "/secret")],
               "absolute": [("h", "link", host + "/secret")],
               "through-symlink": [("l", "sym", host), ("h", "link", "l/secret")]}[case]
    _refused(pool, tmp_path, members, r"hard link|'\.\.' component")
    _untouched(host)


def test_oci_rule_device_nodes_and_setuid_kept_as_root(pool: str, tmp_path) -> None:
    img = oci_layout(str(tmp_path / "dev"), [layer_tar(GOOD), layer_tar([("null", "chr", None, 0o666),
                                                                        ("su", "file", b"x", 0o4755)])],
                     tag="devices")
    rec = import_image(pool, img["layout"], base_size=BASE)
    with mounted_ro(pool, rec.layers[-1].volume) as root:
        st = os.lstat(os.path.join(root, "null"))
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
        assert stat.S_IMODE(os.stat(os.path.join(root, "su")).st_mode) == 0o4755
    remove_image(pool, rec.id)


@pytest.mark.parametrize("member,match", [(("null", "chr", None, 0o666), "device node refused"),
                                          (("su", "file", b"x", 0o4755), "setuid/setgid mode 4755 refused")])
def test_oci_rule_device_nodes_and_setuid_refused_unprivileged_nothing_left(pool: str, tmp_path, member: tuple,
                                                                           match: str) -> None:
    _refused(pool, tmp_path, [("ok", "file", b"1"), member], match, privileged=False)


def test_failed_first_import_on_empty_pool_leaves_it_empty(tmp_path, host: str) -> None:
    """The same refusal on a pool without a base device: the base made for the import goes too."""
    _needs()
    with scratch_dir("tp-hostile-empty-") as d:
        path = new_pool(d)
        img = oci_layout(str(tmp_path / "h"), [layer_tar(GOOD), layer_tar([("h", "link", host + "/secret")])])
        with pytest.raises(ImageError, match="hard link to absolute"):
            import_image(path, img["layout"], base_size=BASE)
        state = pool_state(path)
        assert state["volumes"] == {} and state["used"] == 0 and state["snapshots"] == {}
    _untouched(host)
