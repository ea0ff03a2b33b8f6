"""Images and containers on overlayfs, laid out the way Docker's ``overlay2`` driver lays them out.

This is the file-level peer that ``thinpool compare`` measures the thin pool against (root only: it
mounts).  An :class:`OverlayStore` is a directory::

    STORE/
      l/<SHORT>                  -> ../<layer-id>/diff      short names, as overlay2's ``l/`` links
      <layer-id>/diff/           one layer's changes, extracted on their own
      <layer-id>/link            its short name
      <layer-id>/lower           the short names of the layers below it, top first ("l/A:l/B")
      containers/<name>/diff/    the container's upper directory
      containers/<name>/work/    overlayfs' work directory
      containers/<name>/merged/  where it is mounted
      containers/<name>/lower    its lowerdir chain
      images/<id>.json           an image: its layers (chain IDs) bottom-up

* a layer is extracted with :func:`thinpool.containers.oci_apply.apply_layer` in ``whiteouts="overlay"``
  mode (a whiteout is a 0/0 character device, an opaque directory has ``trusted.overlay.opaque=y``, as
  overlay2's ApplyDiff writes them), into a temporary directory renamed into place once the layer's
  digests were verified; a layer's ID is its chain ID (sha256 hex), so a layer shared by two images is
  extracted once and importing an image again extracts nothing;
* a container is mounted ``mount -t overlay overlay -o index=off,lowerdir=TOP:...:BOTTOM,upperdir=...,
  workdir=...``, the options overlay2 gives (``index=off`` where the kernel has it).  As overlay2 does,
  the short ``l/`` names are used, relative to the store (the mount runs there), when the absolute
  paths would not fit in one page of mount data;
* :func:`allocated_bytes` counts what ``du`` counts: ``st_blocks`` x 512 of everything under a
  directory, the directory included, each hard-linked inode once; :meth:`OverlayStore.upper_bytes` is
  that of a container's upper directory -- what the container copied up and wrote.

Docker also gives every container an ``-init`` layer (``/etc/hosts`` and friends); this store does not,
so what a container's upper directory holds is exactly what its own command wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from thinpool.errors import AlreadyExists, FailedPrecondition, ImageError, InvalidArgument, NotFound

#: mount data is one page; overlay2 switches to the short relative names past this
MOUNT_DATA_LIMIT = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: overlayfs' own limit on lower layers (fs/overlayfs: OVL_MAX_STACK)
MAX_LOWER_LAYERS = 500
#: container names: what Docker accepts (``[a-zA-Z0-9][a-zA-Z0-9_.-]``), bounded
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_LINK_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def problems() -> list[str]:
    """Why overlay containers cannot be mounted here (empty when they can): root and the overlay filesystem."""
    out = []
    if os.geteuid() != 0:
        out.append("root (mount -t overlay)")
    try:
        with open("/proc/filesystems", encoding="ascii", errors="replace") as f:
            have = any(line.split()[-1:] == ["overlay"] for line in f)
    except OSError:
        have = False
    if not have and not os.path.exists("/sys/module/overlay"):
        out.append("the overlay filesystem (modprobe overlay)")
    for tool in ("mount", "umount"):
        if shutil.which(tool) is None:
            out.append(f"the tool {tool} (util-linux)")
    return out


def kernel_features() -> dict[str, str]:
    """The overlay module's defaults that change what a copy-up costs (``metacopy``: a chmod copies only
    the inode; ``redirect_dir``, ``index``, ``xino_auto``), as ``/sys/module/overlay/parameters`` shows them."""
    out = {}
    for name in ("metacopy", "redirect_dir", "index", "xino_auto"):
        try:
            with open(f"/sys/module/overlay/parameters/{name}", encoding="ascii") as f:
                out[name] = f.read().strip()
        except OSError:
            pass
    return out


def allocated_bytes(path: str | os.PathLike[str]) -> int:
    """The bytes allocated under ``path`` as ``du -s --block-size=1 PATH`` counts them: ``st_blocks`` x 512
    of ``path`` itself and of everything below it (symlinks not followed, other mounts entered, as du),
    every inode with several links counted once."""
    seen: set[tuple[int, int]] = set()
    root = os.fspath(path)
    st = os.lstat(root)
    total = st.st_blocks * 512
    if not stat.S_ISDIR(st.st_mode):
        return total
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError as e:
            raise FailedPrecondition(f"{d}: cannot list: {e.strerror}") from None
        with it:
            for ent in it:
                s = ent.stat(follow_symlinks=False)
                if stat.S_ISDIR(s.st_mode):
                    stack.append(ent.path)
                elif s.st_nlink > 1:
                    key = (s.st_dev, s.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += s.st_blocks * 512
    return total


@dataclass(frozen=True)
class OverlayImage:
    """An image in an :class:`OverlayStore`: its layers bottom-up (``chain_ids``; each one's directory is
    ``STORE/<hex of the chain ID>/diff``) and the file bytes each layer's tar declared."""

    image_id: str
    ref: str | None
    chain_ids: tuple[str, ...]
    file_bytes: tuple[int, ...]


@dataclass
class RunResult:
    """What a command run in a mounted root did: its exit status, output tails and wall time (seconds)."""

    argv: list[str]
    returncode: int
    seconds: float
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def run_in_root(root: str, argv: Sequence[str], *, chroot: bool = False, timeout: float = 3600.0,
                env: dict[str, str] | None = None) -> RunResult:
    """Run ``argv`` with ``ROOT`` set to ``root`` and ``root`` as its working directory (``chroot``: chrooted
    into it, so ``argv[0]`` is the image's own program), then ``sync -f`` the filesystem under ``root`` so
    what it wrote is on disk.  The returned time covers the command and the sync.  A command that cannot
    be started raises FailedPrecondition; a non-zero exit is reported in the result (callers decide)."""
    if not argv or not all(isinstance(a, str) for a in argv):
        raise InvalidArgument("the command must be a non-empty list of strings")
    full_env = dict(os.environ if env is None else env)
    full_env["ROOT"] = root
    cmd = list(argv)
    if chroot:
        if shutil.which("chroot") is None:
            raise FailedPrecondition("--chroot needs the chroot tool (coreutils)")
        cmd = ["chroot", root, *argv]
        full_env["ROOT"] = "/"
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, timeout=timeout)
    except FileNotFoundError as e:
        raise FailedPrecondition(f"{argv[0]}: cannot run: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"{' '.join(argv)[:200]}: timed out after {timeout} s") from None
    subprocess.run(["sync", "-f", root], capture_output=True)
    seconds = time.perf_counter() - t0
    return RunResult(list(argv), r.returncode, seconds, r.stdout.decode(errors="replace")[-2000:],
                     r.stderr.decode(errors="replace")[-2000:])


def _run(args: Sequence[str], cwd: str | None = None, timeout: float = 120.0) -> None:
    try:
        r = subprocess.run(list(args), cwd=cwd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"{' '.join(args)[:300]}: timed out after {timeout} s") from None
    if r.returncode != 0:
        raise FailedPrecondition(f"{' '.join(args)[:300]} failed ({r.returncode}): "
                                 f"{(r.stderr or r.stdout).decode(errors='replace').strip()[-500:]}")


def _umount(path: str) -> None:
    """Unmount ``path``; a lazy unmount if a plain one fails (something still open), so it never stays."""
    if subprocess.run(["umount", path], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", path], capture_output=True)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(f"container name {str(name)[:140]!r}: use 1-128 of [A-Za-z0-9_.-], "
                              "starting with a letter or digit")
    return name


def _hex(chain_id: str) -> str:
    alg, _, hexpart = chain_id.partition(":")
    if alg not in ("sha256", "sha512") or not re.fullmatch(r"[0-9a-f]{64,128}", hexpart):
        raise ImageError(f"not a chain ID: {chain_id[:140]!r}")
    return hexpart


class OverlayStore:
    """An overlay2-style store in directory ``root`` (created if missing; it must be on a filesystem
    overlayfs accepts as upper: ext4, xfs with d_type, tmpfs...)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        for d in ("", "l", "containers", "images"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)

    # ------------------------------------------------------------------------------------ layers
    def layer_dir(self, chain_id: str) -> str:
        """The ``diff`` directory of the layer with this chain ID."""
        return os.path.join(self.root, _hex(chain_id), "diff")

    def _link_of(self, chain_id: str) -> str:
        with open(os.path.join(self.root, _hex(chain_id), "link"), encoding="ascii") as f:
            return f.read().strip()

    def import_image(self, archive: str | os.PathLike[str], ref: str | None = None) -> OverlayImage:
        """Extract every layer of the image archive (OCI layout or docker-archive; ``ref`` picks a tag) that
        the store does not have yet, each into its own directory, and record the image.  A layer that fails
        to verify or apply leaves nothing behind (ImageError naming the blob)."""
        from thinpool.containers.oci import open_image
        from thinpool.containers.oci_apply import apply_layer

        with open_image(archive, ref) as img:
            if len(img.layers) > MAX_LOWER_LAYERS:
                raise ImageError(f"{archive}: {len(img.layers)} layers, more than overlayfs stacks "
                                 f"({MAX_LOWER_LAYERS})")
            sizes = []
            lowers: list[str] = []          # short names of the layers below, top first
            for layer in img.layers:
                hexid = _hex(layer.chain_id)
                final = os.path.join(self.root, hexid)
                if os.path.isdir(os.path.join(final, "diff")):
                    with open(os.path.join(final, "size"), encoding="ascii") as f:
                        sizes.append(int(f.read()))
                else:
                    tmp = tempfile.mkdtemp(prefix=f".{hexid[:12]}-", dir=self.root)
                    try:
                        os.mkdir(os.path.join(tmp, "diff"), 0o755)
                        stats = apply_layer(img.layer_entries(layer), os.path.join(tmp, "diff"),
                                            whiteouts="overlay")
                        link = "".join(secrets.choice(_LINK_ALPHABET) for _ in range(26))
                        for fname, text in (("link", link), ("lower", ":".join(f"l/{x}" for x in lowers)),
                                            ("size", str(stats.file_bytes))):
                            with open(os.path.join(tmp, fname), "w", encoding="ascii") as f:
                                f.write(text)
                        os.symlink(f"../{hexid}/diff", os.path.join(self.root, "l", link))
                        try:
                            os.rename(tmp, final)
                        except OSError:
                            os.unlink(os.path.join(self.root, "l", link))
                            raise
                    except BaseException:
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise
                    sizes.append(stats.file_bytes)
                lowers.insert(0, self._link_of(layer.chain_id))
            image = OverlayImage(img.config_digest, img.ref, tuple(img.chain_ids), tuple(sizes))
        path = os.path.join(self.root, "images", _hex(image.image_id) + ".json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(asdict(image), f)
        os.replace(path + ".tmp", path)
        return image

    # ------------------------------------------------------------------------------------ containers
    def container_dir(self, name: str) -> str:
        return os.path.join(self.root, "containers", _check_name(name))

    def create_container(self, image: OverlayImage, name: str) -> str:
        """A new container of ``image``: its upper and work directories and its lowerdir chain (top layer
        first, as overlay2).  Returns its directory; AlreadyExists if the name is taken."""
        d = self.container_dir(name)
        if not image.chain_ids:
            raise ImageError(f"image {image.ref or image.image_id}: no layers to mount")
        for cid in image.chain_ids:
            if not os.path.isdir(self.layer_dir(cid)):
                raise NotFound(f"layer {cid} is not in the overlay store {self.root} (import the image)")
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            raise AlreadyExists(f"overlay container {name!r} exists in {self.root}") from None
        for sub in ("diff", "work", "merged"):
            os.mkdir(os.path.join(d, sub), 0o755)
        with open(os.path.join(d, "lower"), "w", encoding="ascii") as f:
            f.write(":".join(f"l/{self._link_of(c)}" for c in reversed(image.chain_ids)))
        with open(os.path.join(d, "image"), "w", encoding="ascii") as f:
            f.write(json.dumps(asdict(image)))
        return d

    def mount_options(self, name: str, *, short: bool | None = None) -> tuple[str, str | None]:
        """The overlay mount data of container ``name`` and the directory to run mount in (None: absolute
        paths).  ``short``: force the ``l/`` names (True) or absolute paths (False); default: as overlay2,
        absolute unless they pass :data:`MOUNT_DATA_LIMIT`."""
        d = self.container_dir(name)
        with open(os.path.join(d, "lower"), encoding="ascii") as f:
            lower_short = f.read().strip().split(":")
        index = "index=off," if os.path.exists("/sys/module/overlay/parameters/index") else ""
        absolute = ":".join(os.path.join(self.root, os.readlink(os.path.join(self.root, s)).replace("../", "", 1))
                            for s in lower_short)
        opts = f"{index}lowerdir={absolute},upperdir={d}/diff,workdir={d}/work"
        if short is False or (short is None and len(opts) < MOUNT_DATA_LIMIT - 1):
            return opts, None
        rel = os.path.relpath(d, self.root)
        return f"{index}lowerdir={':'.join(lower_short)},upperdir={rel}/diff,workdir={rel}/work", self.root

    @contextlib.contextmanager
    def mounted(self, name: str, *, short: bool | None = None) -> Iterator[str]:
        """Mount container ``name`` on its ``merged`` directory for the ``with`` block (yields the mount
        point); it is unmounted whatever happens in the block (lazily if something still holds it)."""
        d = self.container_dir(name)
        if not os.path.isdir(d):
            raise NotFound(f"overlay container {name!r} is not in {self.root}")
        opts, cwd = self.mount_options(name, short=short)
        merged = os.path.join(d, "merged")
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, merged], cwd=cwd)
        try:
            yield merged
        finally:
            _umount(merged)

    def exec(self, name: str, argv: Sequence[str], *, chroot: bool = False, timeout: float = 3600.0) -> RunResult:
        """Mount container ``name``, run ``argv`` in it (:func:`run_in_root`), unmount."""
        with self.mounted(name) as root:
            return run_in_root(root, argv, chroot=chroot, timeout=timeout)

    def upper_dir(self, name: str) -> str:
        return os.path.join(self.container_dir(name), "diff")

    def upper_bytes(self, name: str) -> int:
        """Allocated bytes of container ``name``'s upper directory, as ``du -s --block-size=1`` counts them
        (sync the filesystem first: ext4's delayed allocation is already counted by ``st_blocks``)."""
        return allocated_bytes(self.upper_dir(name))

    def remove_container(self, name: str) -> None:
        """Unmount (if mounted) and delete container ``name``'s directories."""
        d = self.container_dir(name)
        if not os.path.isdir(d):
            raise NotFound(f"overlay container {name!r} is not in {self.root}")
        merged = os.path.join(d, "merged")
        if os.path.ismount(merged):
            _umount(merged)
        shutil.rmtree(d)

    def list_containers(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.root, "containers")))
