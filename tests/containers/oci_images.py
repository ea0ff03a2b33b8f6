"""Test images shared by the container tests: built by the real tools (umoci, skopeo) from trees made
here, and compared file by file (:func:`snapshot`).

:func:`build_test_images` makes an image of three layers -- files, a symlink, an absolute symlink, a hard
link, an executable, a user xattr and a 3 MiB file; then a deletion (whiteout), a changed and a new file;
then an opaque directory -- with ``umoci`` (``raw add-layer`` for the third layer, since ``umoci insert
--opaque`` writes a broken tar in 0.4.7), and copies it with ``skopeo`` to docker-archive, oci-archive and
a zstd-compressed layout.  :func:`oci_layout` writes an OCI layout from layer tars made with Python's
tarfile (hostile ones included).
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

from tests.support import require_tool


def run(*args: str, cwd: str | None = None) -> None:
    subprocess.run(args, check=True, cwd=cwd, capture_output=True)


def _umoci(*args: str) -> None:
    run("umoci", *args, *(["--rootless"] if os.geteuid() != 0 and args[0] in ("unpack",) else []))


def xattrs_ok(path: str) -> bool:
    try:
        os.setxattr(path, "user.t", b"1")
        os.removexattr(path, "user.t")
        return True
    except OSError:
        return False


def build_test_images(top) -> dict:
    """An image of three layers (tags v1, v2, v3 in the layout ``img``) in four archive forms, the trees
    each tag should unpack to (``trees``: tag -> directory; ``expected`` is v3's) and whether user
    xattrs work here."""
    require_tool("umoci", "skopeo")
    img = str(top / "img")
    _umoci("init", "--layout", img)
    _umoci("new", "--image", f"{img}:base")
    # layer 1: files, a symlink, a hard link, an executable, a user xattr, a 3 MiB file
    b1 = str(top / "b1")
    _umoci("unpack", "--image", f"{img}:base", b1)
    r = os.path.join(b1, "rootfs")
    os.makedirs(f"{r}/etc")
    os.makedirs(f"{r}/d/sub")
    os.makedirs(f"{r}/bin")
    for p, data in {"etc/a": b"hello\n", "d/x": b"x\n", "d/y": b"y\n", "d/sub/s": b"s\n", "gone": b"g\n",
                    "bin/tool": b"#!/bin/sh\necho tool\n", "big": os.urandom(3 << 20)}.items():
        with open(f"{r}/{p}", "wb") as f:
            f.write(data)
    os.chmod(f"{r}/bin/tool", 0o755)
    os.symlink("a", f"{r}/etc/sl")
    os.symlink("/etc/a", f"{r}/abs")
    os.link(f"{r}/etc/a", f"{r}/etc/hl")
    xattrs = xattrs_ok(f"{r}/etc/a")
    if xattrs:
        os.setxattr(f"{r}/etc/a", "user.colour", b"blue")
    _umoci("repack", "--image", f"{img}:v1", b1)
    # layer 2: a deletion (whiteout), a changed file, a new file
    b2 = str(top / "b2")
    _umoci("unpack", "--image", f"{img}:v1", b2)
    r2 = os.path.join(b2, "rootfs")
    os.unlink(f"{r2}/gone")
    with open(f"{r2}/big", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"changed")
    with open(f"{r2}/new", "wb") as f:
        f.write(b"new\n")
    _umoci("repack", "--image", f"{img}:v2", b2)
    # layer 3: d made opaque (its lower contents hidden) with a new member d/z
    layer3 = str(top / "layer3.tar")
    with tarfile.open(layer3, "w", format=tarfile.PAX_FORMAT) as t:
        for name, data in (("d/z", b"z\n"), ("d/.wh..wh..opq", b"")):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            t.addfile(ti, io.BytesIO(data))
    run("umoci", "raw", "add-layer", "--image", f"{img}:v2", "--tag", "v3", layer3)
    # the expected tree: layer 2's rootfs with d emptied but for z
    expected = str(top / "expected")
    run("cp", "-a", r2, expected)                       # cp -a keeps the hard link
    shutil.rmtree(f"{expected}/d")
    os.mkdir(f"{expected}/d")
    with open(f"{expected}/d/z", "wb") as f:
        f.write(b"z\n")
    os.utime(f"{expected}/d/z", (1_700_000_000, 1_700_000_000))
    docker = str(top / "docker.tar")
    run("skopeo", "copy", "-q", f"oci:{img}:v3", f"docker-archive:{docker}:test/img:v3")
    ociar = str(top / "oci.tar")
    run("skopeo", "copy", "-q", f"oci:{img}:v3", f"oci-archive:{ociar}:v3")
    zst = str(top / "zstd")
    run("skopeo", "copy", "-q", "--dest-compress", "--dest-compress-format", "zstd", f"oci:{img}:v3",
        f"oci:{zst}:v3z")
    return {"top": str(top), "img": img, "docker": docker, "ociar": ociar, "zstd": zst, "expected": expected,
            "xattrs": xattrs, "trees": {"v1": f"{b1}/rootfs", "v2": r2, "v3": expected}}


def snapshot(root: str) -> dict[str, tuple]:
    """Every path under ``root``: kind, mode, content or target, hard-link group, user xattrs."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(os.path.relpath(os.path.join(dirpath, name), root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full))
                continue
            xa = {k: os.getxattr(full, k) for k in os.listxattr(full) if k.startswith("user.")}
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), xa)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                group = min(inodes[st.st_ino]) if st.st_nlink > 1 else None
                out[rel] = ("file", stat.S_IMODE(st.st_mode), digest, group, xa)
            else:
                out[rel] = ("other", st.st_mode, st.st_rdev)
    return out




def snapshot_without(root: str, skip: tuple[str, ...]) -> dict[str, tuple]:
    """:func:`snapshot` of ``root`` without the paths in ``skip`` (and anything under them)."""
    return {k: v for k, v in snapshot(root).items() if not any(k == s or k.startswith(s + "/") for s in skip)}


def layer_tar(members: list[tuple]) -> bytes:
    """A layer tar from ``(name, kind, data-or-target[, mode])`` tuples; kind is file, dir, sym, link, chr."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, arg, *rest in members:
            ti = tarfile.TarInfo(name)
            ti.mode = rest[0] if rest else (0o755 if kind == "dir" else 0o644)
            ti.mtime = 1_700_000_000
            if kind == "file":
                ti.size = len(arg)
                t.addfile(ti, io.BytesIO(arg))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "link": tarfile.LNKTYPE,
                       "chr": tarfile.CHRTYPE}[kind]
            if kind in ("sym", "link"):
                ti.linkname = arg
            if kind == "chr":
                ti.devmajor, ti.devminor = 1, 3
            t.addfile(ti)
    return buf.getvalue()


def _blob(layout: str, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest.split(":")[1]), "wb") as f:
        f.write(data)
    return digest, len(data)


def oci_layout(layout: str, layers: list[bytes], tag: str = "latest") -> dict:
    """Write an OCI image layout at ``layout`` whose image ``tag`` has these layer tars (gzip-compressed,
    bottom-up); returns ``{"layout", "blobs": [layer blob paths], "config", "manifest"}``."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    descs, diffs = [], []
    for tar in layers:
        diffs.append("sha256:" + hashlib.sha256(tar).hexdigest())
        digest, size = _blob(layout, gzip.compress(tar, mtime=0))
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size})
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diffs},
              "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}
    cdigest, csize = _blob(layout, json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest,
                           "size": csize}, "layers": descs}
    mdigest, msize = _blob(layout, json.dumps(manifest).encode())
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
             "annotations": {"org.opencontainers.image.ref.name": tag}}]}, f)
    return {"layout": layout, "blobs": [f"blobs/sha256/{d['digest'].split(':')[1]}" for d in descs],
            "config": cdigest, "manifest": mdigest}


def copy_tree(src: str, dst: str) -> str:
    """``cp -a`` (keeps hard links, xattrs, modes)."""
    run("cp", "-a", src, dst)
    return dst


__all__ = ["build_test_images", "snapshot", "snapshot_without", "layer_tar", "oci_layout", "copy_tree", "run",
           "xattrs_ok"]
