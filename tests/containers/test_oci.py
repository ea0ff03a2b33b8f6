"""Reading image archives (thinpool/containers/oci.py) and applying layers (oci_apply.py).

Images are made by the real tools from trees the test creates: ``umoci`` (init/new/unpack/repack for the
first two layers, ``raw add-layer`` for a third layer holding an opaque directory, since ``umoci insert
--opaque`` writes a broken tar in 0.4.7), then ``skopeo copy`` to docker-archive, oci-archive and a
zstd-compressed layout.  Hostile layers are built with Python's tarfile.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile

import pytest

from tests.containers.oci_images import build_test_images, layer_tar, run, snapshot, xattrs_ok  # noqa: F401 (shared helpers)
from tests.support import require_root
from thinpool.containers.oci import open_image
from thinpool.containers.oci_tar import MAX_TAR_HEADER_BYTES, WHITEOUT, iter_tar_entries
from thinpool.containers.oci_apply import apply_layer
from thinpool.errors import ImageError, InvalidArgument


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An image of three layers in four archive forms, and the tree it should unpack to."""
    return build_test_images(tmp_path_factory.mktemp("oci"))


def _independent_ids(img: str, tag: str) -> tuple[list[str], list[str]]:
    """Diff IDs hashed here from the layer blobs umoci wrote, and chain IDs by the OCI rule."""
    index = json.load(open(f"{img}/index.json"))
    desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.load(open(f"{img}/blobs/sha256/{desc['digest'].split(':')[1]}"))
    diffs = []
    for layer in manifest["layers"]:
        with gzip.open(f"{img}/blobs/sha256/{layer['digest'].split(':')[1]}") as f:
            diffs.append("sha256:" + hashlib.sha256(f.read()).hexdigest())
    chains = [diffs[0]]
    for d in diffs[1:]:
        chains.append("sha256:" + hashlib.sha256((chains[-1] + " " + d).encode()).hexdigest())
    return diffs, chains


@pytest.mark.realtools
@pytest.mark.parametrize("form", ["img", "ociar", "docker", "zstd"])
def test_oci_rule_applied_tree_equals_source_after_whiteouts(built: dict, form: str, tmp_path) -> None:
    """Every form skopeo/umoci write opens; diff IDs and chain IDs follow the OCI rule (checked against
    hashes of umoci's blobs made here); the three layers applied give exactly the expected tree: files,
    modes, symlinks, the hard link, the user xattr, the whiteout of ``gone`` and the opaque ``d``."""
    ref = {"img": "v3", "ociar": "v3", "docker": "test/img:v3", "zstd": "v3z"}[form]
    diffs, chains = _independent_ids(built["img"], "v3")
    root = str(tmp_path / "root")
    os.mkdir(root)
    with open_image(built[form], ref) as image:
        assert image.format == ("docker-archive" if form == "docker" else "oci")
        assert image.diff_ids == diffs
        assert image.chain_ids == chains
        image.verify()
        stats = [apply_layer(image.layer_entries(layer), root) for layer in image.layers]
    assert stats[0].hardlinks == 1 and stats[0].symlinks == 2
    assert stats[1].whiteouts == 1 and stats[2].opaques == 1
    assert stats[0].file_bytes == (3 << 20) + 6 + 2 + 2 + 2 + 2 + 20   # the hard link adds no bytes
    got, want = snapshot(root), snapshot(built["expected"])
    assert got == want
    assert "gone" not in got and sorted(os.listdir(f"{root}/d")) == ["z"]
    # mtimes: exact where our tar set them; umoci's headers hold whole seconds (rounded)
    assert os.stat(f"{root}/d/z").st_mtime == 1_700_000_000
    for rel in ("etc/a", "big", "bin/tool"):
        assert abs(os.stat(f"{root}/{rel}").st_mtime - os.stat(f"{built['expected']}/{rel}").st_mtime) <= 1
    if built["xattrs"]:
        assert got["etc/a"][4] == {"user.colour": b"blue"}


@pytest.mark.realtools
def test_oci_rule_tag_resolution(built: dict) -> None:
    """Tags resolve through index.json's ref.name annotation and docker's RepoTags; an unknown tag, or no tag
    where several images are stored, is refused with the tags listed."""
    with open_image(built["img"], "v1") as image:
        assert len(image.layers) == 1
    with pytest.raises(ImageError, match="no image tagged 'nope'.*v1"):
        open_image(built["img"], "nope")
    with pytest.raises(ImageError, match="images match; name one"):
        open_image(built["img"])
    with open_image(built["docker"]) as image:
        assert image.ref == "docker.io/test/img:v3" and len(image.layers) == 3
    with pytest.raises(ImageError, match="no image tagged"):
        open_image(built["docker"], "other:tag")


def _copy_layout(built: dict, tmp_path, form: str = "img") -> str:
    d = str(tmp_path / "layout")
    shutil.copytree(built[form], d)
    return d


def _layer_blob(layout: str, n: int, tag: str = "v3") -> str:
    with open_image(layout, tag) as image:
        return image.layers[n].blob


def _rewrite(layout: str, old: str, data: bytes) -> str:
    """Replace blob ``old`` by ``data`` and fix every descriptor up the chain (manifest, index)."""
    new = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(f"{layout}/blobs/sha256/{new.split(':')[1]}", "wb") as f:
        f.write(data)
    index = json.load(open(f"{layout}/index.json"))
    for m in index["manifests"]:
        path = f"{layout}/blobs/sha256/{m['digest'].split(':')[1]}"
        manifest = json.load(open(path))
        if m["digest"] == old:
            m["digest"], m["size"] = new, len(data)
            continue
        if any(layer["digest"] == old for layer in manifest["layers"]):
            for layer in manifest["layers"]:
                if layer["digest"] == old:
                    layer["digest"], layer["size"] = new, len(data)
            body = json.dumps(manifest).encode()
            m["digest"], m["size"] = "sha256:" + hashlib.sha256(body).hexdigest(), len(body)
            with open(f"{layout}/blobs/sha256/{m['digest'].split(':')[1]}", "wb") as f:
                f.write(body)
    with open(f"{layout}/index.json", "w") as f:
        json.dump(index, f)
    return new


@pytest.mark.realtools
def test_oci_rule_blob_digest_mismatch_names_the_blob(built: dict, tmp_path) -> None:
    layout = _copy_layout(built, tmp_path)
    blob = _layer_blob(layout, 0)
    with open(f"{layout}/{blob}", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with open_image(layout, "v3") as image, pytest.raises(ImageError) as e:
        image.verify()
    assert blob in str(e.value) and "digest mismatch" in str(e.value)
    # a valid gzip of the same tar but other bytes: the stream reads fine, the digest check catches it
    with gzip.open(f"{built['img']}/{blob}") as f:
        tar = f.read()
    with open(f"{layout}/{blob}", "wb") as f:
        f.write(gzip.compress(tar, compresslevel=1, mtime=0))
    with open_image(layout, "v3") as image, pytest.raises(ImageError, match=f"{blob}: digest mismatch"):
        image.verify()


@pytest.mark.realtools
def test_oci_rule_missing_blob_names_the_blob(built: dict, tmp_path) -> None:
    layout = _copy_layout(built, tmp_path)
    blob = _layer_blob(layout, 1)
    os.unlink(f"{layout}/{blob}")
    with pytest.raises(ImageError, match=f"layer 1 blob {blob} missing"):
        open_image(layout, "v3")


@pytest.mark.realtools
def test_oci_rule_truncated_gzip_names_the_blob(built: dict, tmp_path) -> None:
    """A truncated gzip whose descriptor was made to match it: the gzip stream itself is found short."""
    layout = _copy_layout(built, tmp_path)
    blob = _layer_blob(layout, 0)
    data = open(f"{layout}/{blob}", "rb").read()
    new = _rewrite(layout, "sha256:" + blob.rsplit("/", 1)[1], data[: len(data) // 2])
    root = str(tmp_path / "root")
    os.mkdir(root)
    with open_image(layout, "v3") as image, pytest.raises(ImageError) as e:
        apply_layer(image.layer_entries(image.layers[0]), root)
    assert new.split(":")[1] in str(e.value) and "end-of-stream" in str(e.value)


@pytest.mark.realtools
def test_oci_rule_truncated_zstd_names_the_blob(built: dict, tmp_path) -> None:
    """A truncated zstd layer whose descriptor was made to match it: the zstd reader itself reports no
    truncation, so the short stream ends the tar inside the member being read (the 3 MiB random ``big``,
    which spans the cut), named by blob and member."""
    layout = _copy_layout(built, tmp_path, "zstd")
    blob = _layer_blob(layout, 0, "v3z")
    data = open(f"{layout}/{blob}", "rb").read()
    new = _rewrite(layout, "sha256:" + blob.rsplit("/", 1)[1], data[: len(data) // 2])
    with open_image(layout, "v3z") as image, pytest.raises(ImageError) as e:
        image.verify()
    assert f"layer 0 blob blobs/sha256/{new.split(':')[1]}" in str(e.value)
    assert "member 'big': unreadable content: unexpected end of data" in str(e.value)


@pytest.mark.realtools
def test_oci_rule_docker_archive_layer_checked_by_diff_id(built: dict, tmp_path) -> None:
    """A docker-archive has no blob digests: a changed layer tar is caught by its diff ID, named by path."""
    src = tarfile.open(built["docker"])
    manifest = json.load(src.extractfile("manifest.json"))
    victim = manifest[0]["Layers"][1]
    out = str(tmp_path / "bad.tar")
    with tarfile.open(out, "w") as dst:
        for ti in src.getmembers():
            f = src.extractfile(ti) if ti.isreg() else None
            if ti.name == victim:
                layer = bytearray(f.read())
                layer[layer.index(b"changed")] ^= 1          # same size, one bit of file content
                ti.size = len(layer)
                f = io.BytesIO(bytes(layer))
            dst.addfile(ti, f)
    src.close()
    with open_image(out) as image, pytest.raises(ImageError, match=f"layer 1 blob {victim}: diff ID mismatch"):
        image.verify()


@pytest.mark.realtools
def test_oci_rule_nested_index_resolves_to_host_platform(built: dict, tmp_path) -> None:
    """An index pointing to an image index (a multi-platform image) picks the host's linux/<arch> manifest."""
    import platform as _platform
    layout = _copy_layout(built, tmp_path)
    index = json.load(open(f"{layout}/index.json"))
    v3 = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "v3")
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(_platform.machine(), _platform.machine())
    inner = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        dict(v3, annotations={}, platform={"os": "linux", "architecture": "other"}),
        dict(v3, annotations={}, platform={"os": "linux", "architecture": arch})]}
    inner["manifests"][0]["digest"] = "sha256:" + "0" * 64          # the other platform's blob is absent
    body = json.dumps(inner).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    with open(f"{layout}/blobs/sha256/{digest.split(':')[1]}", "wb") as f:
        f.write(body)
    index["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest,
                               "size": len(body), "annotations": {"org.opencontainers.image.ref.name": "multi"}})
    with open(f"{layout}/index.json", "w") as f:
        json.dump(index, f)
    with open_image(layout, "multi") as image, open_image(built["img"], "v3") as direct:
        assert image.chain_ids == direct.chain_ids and image.ref == "multi"


@pytest.mark.realtools
def test_oci_rule_unreadable_manifest_names_the_blob(built: dict, tmp_path) -> None:
    layout = _copy_layout(built, tmp_path)
    index = json.load(open(f"{layout}/index.json"))
    old = next(m["digest"] for m in index["manifests"]
               if m["annotations"]["org.opencontainers.image.ref.name"] == "v3")
    new = _rewrite(layout, old, b"{not json")
    with pytest.raises(ImageError, match=f"manifest blobs/sha256/{new.split(':')[1]}: unreadable JSON"):
        open_image(layout, "v3")
    # a manifest whose bytes do not match its descriptor
    with open(f"{layout}/blobs/sha256/{new.split(':')[1]}", "wb") as f:
        f.write(b"{}")
    with pytest.raises(ImageError, match="digest mismatch"):
        open_image(layout, "v3")


def test_oci_rule_oversized_json_refused_before_reading(tmp_path) -> None:
    d = tmp_path / "l"
    (d / "blobs" / "sha256").mkdir(parents=True)
    (d / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "a" * 64,
         "size": 1 << 40}]}))
    with pytest.raises(ImageError, match="limit"):
        open_image(str(d))
    (d / "index.json").write_bytes(b" " * (5 << 20) + b"{}")
    with pytest.raises(ImageError, match="longer than"):
        open_image(str(d))
    assert issubclass(ImageError, InvalidArgument)
    # the outer tar of an archive is read with the same header bounds as a layer
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("manifest.json")
        ti.pax_headers = {"comment": "x" * (MAX_TAR_HEADER_BYTES + 10)}
        t.addfile(ti, io.BytesIO(b""))
    (tmp_path / "outer.tar").write_bytes(buf.getvalue())
    with pytest.raises(ImageError, match="outer.tar: extended tar header"):
        open_image(str(tmp_path / "outer.tar"))


# -- hostile layers -------------------------------------------------------------------------------

def _tar(members: list[tuple]) -> io.BytesIO:
    """A layer tar from (name, kind, data-or-target[, mode]) tuples (:func:`oci_images.layer_tar`)."""
    return io.BytesIO(layer_tar(members))


@pytest.fixture
def jail(tmp_path):
    """A root to apply into and a sibling directory outside it holding a secret file."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    return str(root), str(outside)


def _apply(buf: io.BytesIO, root: str, **kw) -> None:
    apply_layer(iter_tar_entries(buf, "blob hostile.tar"), root, **kw)


def _outside_untouched(outside: str) -> None:
    assert os.listdir(outside) == ["secret"]
    st = os.stat(f"{outside}/secret")
    assert st.st_nlink == 1 and open(f"{outside}/secret", "rb").read() == b"secret"


@pytest.mark.parametrize("name", ["../outside/pwned", "a/../../outside/pwned", "/tmp/pwned"])
def test_oci_rule_escaping_member_names_refused(jail, name: str) -> None:
    root, outside = jail
    with pytest.raises(ImageError, match=r"blob hostile.tar: member .*(absolute|'\.\.')"):
        _apply(_tar([("ok", "file", b"1"), (name, "file", b"x")]), root)
    _outside_untouched(outside)
    assert not os.path.exists("/tmp/pwned")


@pytest.mark.parametrize("target_kind", ["relative", "absolute"])
def test_oci_rule_tar_slip_through_symlink_stays_in_root(jail, target_kind: str) -> None:
    """``a -> OUTSIDE`` then ``a/secret``: the symlink is resolved inside the root (as in a chroot), so the
    write lands under the root and the outside file is untouched."""
    root, outside = jail
    target = outside if target_kind == "absolute" else "../../../../../../" + outside.lstrip("/")
    _apply(_tar([("a", "sym", target), ("a/secret", "file", b"pwned")]), root)
    _outside_untouched(outside)
    inside = os.path.join(root, outside.lstrip("/"), "secret")
    assert open(inside, "rb").read() == b"pwned"
    assert os.readlink(f"{root}/a") == target          # the symlink itself is kept as written


def test_oci_rule_last_component_symlink_replaced_not_followed(jail) -> None:
    """A file, directory or hard link named like an existing symlink to the outside replaces the symlink
    (the leaf is never followed), in the same layer or a later one."""
    root, outside = jail
    _apply(_tar([("f", "sym", f"{outside}/secret"), ("d", "sym", outside), ("h", "sym", f"{outside}/secret")]),
           root)
    _apply(_tar([("f", "file", b"pwned"), ("d", "dir", None, 0o755), ("d/secret", "file", b"pwned"),
                 ("src", "file", b"s"), ("h", "link", "src")]), root)
    _outside_untouched(outside)
    assert open(f"{root}/f", "rb").read() == b"pwned" and not os.path.islink(f"{root}/f")
    assert os.path.isdir(f"{root}/d") and not os.path.islink(f"{root}/d")
    assert os.stat(f"{root}/h").st_ino == os.stat(f"{root}/src").st_ino


@pytest.mark.realtools
def test_oci_rule_docker_archive_directory_form(built: dict, tmp_path) -> None:
    """An unpacked docker-archive (a directory) opens like the tar; layers named by the legacy
    ``<id>/layer.tar`` symlinks skopeo also writes (as ``docker save`` did) are followed inside the archive,
    in the directory and in a tar of it."""
    d = str(tmp_path / "unpacked")
    os.mkdir(d)
    run("tar", "-xf", built["docker"], "-C", d)
    with open_image(d) as a, open_image(built["docker"]) as b:
        assert a.chain_ids == b.chain_ids and a.config_digest == b.config_digest
        a.verify()
    links = {os.path.basename(os.readlink(os.path.join(d, e, "layer.tar"))): f"{e}/layer.tar"
             for e in os.listdir(d) if os.path.islink(os.path.join(d, e, "layer.tar"))}
    manifest = json.load(open(f"{d}/manifest.json"))
    assert len(links) == len(manifest[0]["Layers"])
    manifest[0]["Layers"] = [links[p] for p in manifest[0]["Layers"]]
    with open(f"{d}/manifest.json", "w") as f:
        json.dump(manifest, f)
    retar = str(tmp_path / "legacy.tar")
    run("tar", "-cf", retar, "-C", d, ".")
    for path in (d, retar):
        with open_image(path) as image, open_image(built["docker"]) as b:
            assert image.chain_ids == b.chain_ids and image.layers[0].blob.endswith("/layer.tar")
            image.verify()


def test_oci_rule_hard_link_outside_refused(jail) -> None:
    root, outside = jail
    with pytest.raises(ImageError, match="hard link target"):
        _apply(_tar([("h", "link", "../outside/secret")]), root)
    with pytest.raises(ImageError, match="hard link to absolute"):
        _apply(_tar([("h", "link", f"{outside}/secret")]), root)
    # through a symlink pointing out: resolved inside the root, where no such file exists
    with pytest.raises(ImageError, match="missing or a directory"):
        _apply(_tar([("l", "sym", outside), ("h", "link", "l/secret")]), root)
    _outside_untouched(outside)
    assert not os.path.exists(f"{root}/h")


def test_oci_rule_devices_and_setuid_only_when_privileged(jail) -> None:
    root, outside = jail
    with pytest.raises(ImageError, match="device node refused"):
        _apply(_tar([("null", "chr", None)]), root, privileged=False)
    with pytest.raises(ImageError, match="setuid/setgid mode 4755 refused"):
        _apply(_tar([("su", "file", b"x", 0o4755)]), root, privileged=False)
    assert not os.path.exists(f"{root}/null") and not os.path.exists(f"{root}/su")
    if os.geteuid() == 0:
        _apply(_tar([("null", "chr", None, 0o666), ("su", "file", b"x", 0o4755)]), root)
        st = os.lstat(f"{root}/null")
        assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
        assert stat.S_IMODE(os.stat(f"{root}/su").st_mode) == 0o4755


def test_oci_rule_unprivileged_skips_ownership_and_system_xattrs(jail) -> None:
    """Not privileged: uid/gid are not applied and xattrs outside user. are skipped, both counted."""
    root, _ = jail
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("f")
        ti.uid, ti.gid, ti.size = 1234, 5678, 1
        ti.pax_headers = {"SCHILY.xattr.user.k": "v", "SCHILY.xattr.security.capability": "x"}
        t.addfile(ti, io.BytesIO(b"1"))
    buf.seek(0)
    stats = apply_layer(iter_tar_entries(buf, "blob b"), root, privileged=False)
    st = os.stat(f"{root}/f")
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert stats.skipped_ownership == 1 and stats.skipped_xattrs == 1
    if xattrs_ok(root):
        assert os.getxattr(f"{root}/f", "user.k") == b"v"
        assert "security.capability" not in os.listxattr(f"{root}/f")


def test_oci_rule_bounds_on_entries_and_tar_headers(jail) -> None:
    root, _ = jail
    with pytest.raises(ImageError, match="more than 3 members"):
        list(iter_tar_entries(_tar([(f"f{i}", "file", b"") for i in range(5)]), "blob b", max_entries=3))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("f")
        ti.pax_headers = {"comment": "x" * (MAX_TAR_HEADER_BYTES + 10)}
        t.addfile(ti, io.BytesIO(b""))
    buf.seek(0)
    with pytest.raises(ImageError, match="blob b: .*extended tar header"):
        list(iter_tar_entries(buf, "blob b"))
    # a long run of global PAX headers (tarfile reads a run recursively): refused, not a RecursionError
    one = tarfile.TarInfo._create_pax_generic_header({"comment": "x"}, tarfile.XGLTYPE, "utf-8")
    member = tarfile.TarInfo("f").tobuf(tarfile.USTAR_FORMAT)
    buf = io.BytesIO(one * 3000 + member + b"\0" * 1024)
    with pytest.raises(ImageError, match="blob b: .*extended tar headers in a row"):
        list(iter_tar_entries(buf, "blob b"))


def test_oci_rule_whiteouts_hide_lower_only(jail) -> None:
    """A whiteout or opaque marker hides what lower layers put there, not what the same layer adds, whatever
    the member order (OCI image spec, whiteouts)."""
    root, _ = jail
    _apply(_tar([("d/old", "file", b"1"), ("e/keep", "file", b"1"), ("gone", "file", b"1")]), root)
    _apply(_tar([("d/new", "file", b"2"), ("d/.wh..wh..opq", "file", b""), ("e/.wh.keep", "file", b""),
                 ("gone", "file", b"again"), (".wh.gone", "file", b""), (".wh.never", "file", b"")]), root)
    assert sorted(os.listdir(f"{root}/d")) == ["new"]
    assert os.listdir(f"{root}/e") == []
    assert open(f"{root}/gone", "rb").read() == b"again"
    entries = list(iter_tar_entries(_tar([("x/.wh.y", "file", b"")]), "blob b"))
    assert [(e.kind, e.path) for e in entries] == [(WHITEOUT, "x/y")]


@pytest.mark.realtools
def test_overlay2_layout_mounted_by_kernel_overlayfs_equals_tree(built: dict, tmp_path) -> None:
    """whiteouts="overlay": each layer in its own directory as overlay2 keeps it (0/0 char devices,
    trusted.overlay.opaque); the kernel's overlayfs over those directories shows exactly the expected tree."""
    require_root()
    with open_image(built["img"], "v3") as image:
        dirs = []
        for layer in image.layers:
            d = str(tmp_path / f"l{layer.index}")
            os.mkdir(d)
            apply_layer(image.layer_entries(layer), d, whiteouts="overlay")
            dirs.append(d)
    st = os.lstat(f"{dirs[1]}/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(f"{dirs[2]}/d", "trusted.overlay.opaque") == b"y"
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(reversed(dirs)), mnt],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"overlayfs mount failed here: {r.stderr.strip()}")
    try:
        assert snapshot(mnt) == snapshot(built["expected"])
    finally:
        subprocess.run(["umount", mnt], check=True)
