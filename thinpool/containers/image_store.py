"""Real images on a thin pool, as Docker's ``devicemapper`` driver stores them (root only: it mounts).

:func:`import_image` reads an OCI image layout (directory or tar: ``umoci``, ``skopeo``, ``podman save
--format oci-archive``) or a ``docker save`` tarball with :func:`thinpool.containers.oci.open_image` (every
blob's digest and every layer's diff ID verified; gzip, zstd or plain layers) and stores it like
devicemapper did:

1. once per pool, a **base device**: a thin volume of ``base_size`` with a fresh filesystem (ext4 made with
   Docker's options, :data:`~thinpool.containers.realfs.MKFS_EXT4`, then ``tune2fs -c -1 -i 0``; both
   recorded) holding an empty ``rootfs`` directory -- the image's ``/`` (devicemapper's ``<mnt>/rootfs``,
   which keeps ext4's ``lost+found`` out of the container);
2. each layer: an active snapshot of its parent (the base for the first), mounted, the layer's changes
   applied through the mounted filesystem by :func:`thinpool.containers.oci_apply.apply_layer` (whiteouts
   and opaque directories applied, hard links, symlinks, xattrs, modes, ownership; never outside the
   mount), unmounted (ext4 flushes; the FLUSH commits the pool), then **committed** in the snapshotter
   (namespace :data:`NAMESPACE`) under its **chain ID**.  A layer whose chain ID is already stored is
   not applied again, so layers shared between images are stored once and re-importing an image writes
   nothing.

The import is one transaction: every snapshot it creates is listed in a *pending* record first; on any
failure (a digest mismatch, a missing blob, a truncated stream, an unreadable manifest, a layer that
fails to apply, a mount that fails) they are all removed, the records restored and the pool committed,
so nothing is left -- and an import killed half-way is cleaned up by the next write through this module
(:func:`recover`).  Errors about the archive are :class:`~thinpool.errors.ImageError` naming the blob.

Records live in the pool's own metadata (records namespace :data:`RECORDS`), committed with the devices.
Every function takes a pool path or an open :class:`~thinpool.pool.Pool` (the CLI's ops pass the open
pool, inside their batch).  Block figures are measured from the pool: a layer's *owned blocks* are the
mappings it does not share identically with its parent (:meth:`Snapshotter.usage`), i.e. the blocks the
layer really added.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from ..errors import FailedPrecondition, ImageError, InvalidArgument, NotFound
from ..units import parse_size

#: snapshotter namespace of the base device, the layers and the containers (volumes ``snap/images/<id>``)
NAMESPACE = "images"
#: the pool records key of the image store (base, layers, images, pending import)
RECORDS = "images"
#: the pool records key of the containers (:mod:`thinpool.containers.runtime`)
CONTAINER_RECORDS = "containers"
#: committed snapshot name of the base device
BASE_KEY = "base"
#: the image's root directory inside every layer's filesystem (devicemapper's ``<mnt>/rootfs``)
ROOTFS = "rootfs"
#: filesystems a base device can be made with: mkfs command, then tuning command
FILESYSTEMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ext4": (("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"),
             ("tune2fs", "-c", "-1", "-i", "0")),
}
#: largest base device accepted (mkfs of a larger one would run for hours)
MAX_BASE_SIZE = 64 << 40
_HEX = re.compile(r"^(sha256:)?([0-9a-f]{4,64})\Z")
_MAX_TAG = 256


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ============================================================================================== values
@dataclass(frozen=True)
class LayerRecord:
    """One stored layer of an image, bottom-up.  ``file_bytes``: the regular files' sizes in the layer tar
    (Docker's per-layer SIZE); ``blob_bytes``: the compressed blob; ``owned_blocks``: blocks the layer's
    snapshot added on the pool (measured when it was stored); ``volume``: its thin volume."""

    index: int
    chain_id: str
    diff_id: str
    digest: str | None
    media_type: str
    blob_bytes: int | None
    file_bytes: int
    entries: int
    owned_blocks: int
    volume: str


@dataclass(frozen=True)
class ImageRecord:
    """A stored image: its ID (the config digest), tags, layers bottom-up and the base it sits on.
    ``new`` is False when :func:`import_image` found everything already stored (nothing written)."""

    id: str
    tags: tuple[str, ...]
    format: str
    archive: str
    layers: tuple[LayerRecord, ...]
    fs: str
    base_size: int
    mkfs: str
    block_size: int
    created: str
    imported: str
    new: bool = True
    history: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    @property
    def top_chain_id(self) -> str:
        """The chain ID of the top layer (the snapshot containers are made from; the base's name if none)."""
        return self.layers[-1].chain_id if self.layers else BASE_KEY

    @property
    def file_bytes(self) -> int:
        """Docker's image SIZE: the sum of the layers' file sizes."""
        return sum(layer.file_bytes for layer in self.layers)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d["tags"] = list(self.tags)
        d["layers"] = [asdict(x) for x in self.layers]
        d["history"] = [dict(h) for h in self.history]
        d["top_chain_id"] = self.top_chain_id
        d["file_bytes"] = self.file_bytes
        return d


# ============================================================================================== pool plumbing
@contextlib.contextmanager
def opened_pool(pool: Any, write: bool) -> Iterator[Any]:
    """``pool`` itself when it is an open pool; else the pool at that path, opened (read-only unless
    ``write``) and closed after (committed when ``write``)."""
    if not isinstance(pool, (str, os.PathLike)):
        yield pool
        return
    from ..pool import Pool
    p = Pool.open(os.fspath(pool), read_only=not write)
    try:
        yield p
    except BaseException:
        p.close(commit=False)
        raise
    p.close(commit=write)  # (a cycle holding a view of the data file's map: DataDevice._unmap collects)


def snapshotter(pool: Any, base_size: int | None = None) -> Any:
    """The image store's :class:`~thinpool.containers.snapshotter.Snapshotter` on ``pool``."""
    from .snapshotter import DEFAULT_BASE_SIZE, Snapshotter
    return Snapshotter(pool, NAMESPACE, base_size=base_size or DEFAULT_BASE_SIZE)


def load_records(pool: Any) -> dict[str, Any]:
    """The image store's records (a copy): ``base``, ``layers``, ``images`` and maybe ``pending``."""
    recs = pool.get_records(RECORDS) if hasattr(pool, "get_records") else {}
    recs.setdefault("base", None)
    recs.setdefault("layers", {})
    recs.setdefault("images", {})
    return recs


def recover(pool: Any) -> list[str]:
    """Remove what an import that died half-way left (the snapshots listed in its pending record) and
    drop the record; returns the keys removed.  Called by every write of this module and the runtime."""
    recs = load_records(pool)
    pending = recs.get("pending")
    if not pending:
        return []
    s = snapshotter(pool)
    existing = {i.name for i in s.walk()}
    removed = []
    for key in reversed(pending.get("keys", [])):
        if key in existing:
            s.remove(key)
            removed.append(key)
    del recs["pending"]
    pool.put_records(RECORDS, recs)
    return removed


def matching_tag(tags: list[str], ref: str) -> str | None:
    """The tag of ``tags`` that ``ref`` names (``repo`` alone means ``repo:latest``; ``docker.io/`` and
    ``docker.io/library/`` prefixes optional), or None."""
    wanted = [ref]
    if ":" not in ref.rsplit("/", 1)[-1]:
        wanted.append(ref + ":latest")
    wanted += [p + w for w in list(wanted) for p in ("docker.io/", "docker.io/library/")]
    return next((w for w in wanted if w in tags), None)


def resolve(recs: dict[str, Any], ref: str) -> str:
    """The image ID that ``ref`` names: a tag (``repo:tag``; ``repo`` alone means ``repo:latest``;
    ``docker.io/`` and ``docker.io/library/`` prefixes optional) or an ID or unique ID prefix (4+ hex
    digits, ``sha256:`` optional).  NotFound / InvalidArgument (ambiguous) otherwise."""
    if not isinstance(ref, str) or not ref or len(ref) > _MAX_TAG:
        raise InvalidArgument(f"bad image reference {str(ref)[:100]!r}")
    images = recs["images"]
    for image_id, img in images.items():
        if matching_tag(img.get("tags", []), ref) is not None:
            return image_id
    m = _HEX.match(ref)
    if m:
        hits = [i for i in images if i.split(":", 1)[1].startswith(m.group(2))]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise InvalidArgument(f"image ID prefix {ref!r} is ambiguous ({len(hits)} images)")
    raise NotFound(f"no image {ref!r} in the pool (thinpool image ls POOL lists them)")


# ============================================================================================== import
def import_image(pool_path: Any, archive: str | os.PathLike[str], *, tag: str | None = None,
                 fs: str = "ext4", base_size: int | str = "10G", ref: str | None = None,
                 privileged: bool | None = None, progress: Callable[[str], None] | None = None) -> ImageRecord:
    """Import the image archive ``archive`` onto the pool (path or open pool) and return its record.

    ``tag``: the name to give it (default: the archive's own tag); ``ref``: which image of the archive
    when it holds several; ``fs``/``base_size``: the base device's filesystem and size (used when the pool
    has no base yet; a different one is InvalidArgument, since layers are shared only over one base);
    ``privileged``: keep device nodes and setuid/setgid bits (default: when running as root);
    ``progress``: called with a line of text as each step starts.  One transaction (see the module
    docstring): on failure nothing is left in the pool."""
    from .volmount import require_mounts
    require_mounts("thinpool image import")
    if fs not in FILESYSTEMS:
        raise InvalidArgument(f"filesystem {fs!r} is not supported (supported: {', '.join(sorted(FILESYSTEMS))})")
    size = parse_size(base_size, "base size")
    if not (16 << 20) <= size <= MAX_BASE_SIZE:
        raise InvalidArgument(f"base size {size} bytes: a filesystem needs at least 16 MiB, and at most "
                              f"{MAX_BASE_SIZE >> 40} TiB is accepted")
    if tag is not None and (not isinstance(tag, str) or not tag or len(tag) > _MAX_TAG
                            or any(c.isspace() or ord(c) < 0x20 for c in tag)):
        raise InvalidArgument(f"bad tag {str(tag)[:100]!r}: a non-empty name without spaces, at most {_MAX_TAG}")
    archive = os.path.abspath(os.fspath(archive))
    from .oci import open_image
    with opened_pool(pool_path, write=True) as pool, open_image(archive, ref) as image:
        recover(pool)
        return _import(pool, image, tag if tag is not None else image.ref, fs, size, privileged,
                       progress or (lambda msg: None))


def _import(pool: Any, image: Any, tag: str | None, fs: str, size: int, privileged: bool | None,
            say: Callable[[str], None]) -> ImageRecord:
    raw_before = pool.get_records(RECORDS)     # restored as it was on failure
    before = load_records(pool)
    base = before["base"]
    if base is not None and (base["fs"] != fs or base["size"] != size):
        raise InvalidArgument(f"pool {pool.path} stores images on a {base['fs']} base device of {base['size']} "
                              f"bytes; an import with --fs {fs} --base-size {size} cannot share its layers "
                              f"(use the pool's, or another pool)")
    s = snapshotter(pool, size)
    stored = {i.name for i in s.walk()}
    todo = [layer for layer in image.layers if layer.chain_id not in stored]
    # layers already stored: their blobs are still verified (nothing is written for them)
    for layer in image.layers:
        if layer.chain_id in stored:
            say(f"layer {layer.index + 1}/{len(image.layers)} {layer.chain_id[:19]}: stored, verifying its blob")
            _drain(image, layer)
    image_id = image.config_digest
    old = before["images"].get(image_id)
    if not todo and base is not None and old is not None and (tag is None or tag in old["tags"]):
        return _record(pool, before, image_id, new=False)
    keys: list[str] = []
    if base is None:
        keys += ["extract/" + BASE_KEY, BASE_KEY]
    for layer in todo:
        keys += ["extract/" + layer.chain_id, layer.chain_id]
    recs = load_records(pool)
    recs["pending"] = {"keys": keys, "archive": image.path, "started": _now()}
    pool.put_records(RECORDS, recs)
    from .volmount import PoolMounts
    mounts = None
    try:
        from ..nbd.served import warm_up
        warm_up(pool)
        mounts = PoolMounts(pool)
        if base is None:
            say(f"base device: {size:,} bytes, {' '.join(FILESYSTEMS[fs][0])}")
            recs["base"] = base = _make_base(pool, s, mounts, fs, size)
        for layer in image.layers:
            if layer.chain_id in stored:
                continue
            say(f"layer {layer.index + 1}/{len(image.layers)} {layer.chain_id[:19]}: applying {layer.blob}")
            recs["layers"][layer.chain_id] = _apply(pool, s, mounts, image, layer, privileged)
            stored.add(layer.chain_id)
        mounts.close()
        mounts = None
        for other in recs["images"].values():       # a tag names one image: moved here (Docker does)
            if tag is not None and tag in other["tags"] and other["id"] != image_id:
                other["tags"].remove(tag)
        entry = recs["images"].get(image_id) or {
            "id": image_id, "tags": [], "format": image.format, "archive": image.path,
            "chain_ids": image.chain_ids, "created": str(image.config.get("created", "")),
            "imported": _now(), "history": _history(image.config)}
        if tag is not None and tag not in entry["tags"]:
            entry["tags"].append(tag)
        recs["images"][image_id] = entry
        del recs["pending"]
        pool.put_records(RECORDS, recs)
        pool.commit()
    except BaseException:
        if mounts is not None:
            mounts.close()
        _rollback(pool, s, keys, raw_before)
        raise
    return _record(pool, recs, image_id, new=True)


def _drain(image: Any, layer: Any) -> None:
    for entry in image.layer_entries(layer):
        if entry.reader is not None:
            while entry.reader.read(1 << 20):
                pass


def _rollback(pool: Any, s: Any, keys: list[str], before: dict[str, Any]) -> None:
    """Remove the snapshots this import created (top-down), restore the records, commit."""
    existing = {i.name for i in s.walk()}
    for key in reversed(keys):
        if key in existing:
            s.remove(key)
    pool.put_records(RECORDS, before)
    pool.commit()


def _make_base(pool: Any, s: Any, mounts: Any, fs: str, size: int) -> dict[str, Any]:
    from .realfs import run
    mkfs, tune = FILESYSTEMS[fs]
    key = "extract/" + BASE_KEY
    mount = s.prepare(key, None, {"thinpool.image/role": "base"})
    a = mounts.attach(mount.source)
    assert a.device is not None
    run(*mkfs, a.device, timeout=600)
    run(*tune, a.device)
    mounts.detach(a)
    a = mounts.mount(mount.source)
    os.mkdir(os.path.join(a.mountpoint or "", ROOTFS), 0o755)
    a.syncfs()
    mounts.detach(a)
    mounts.check("the base device")
    s.commit(BASE_KEY, key, {"thinpool.image/role": "base"})
    return {"key": BASE_KEY, "fs": fs, "size": size, "mkfs": " ".join(mkfs) + " && " + " ".join(tune),
            "rootfs": ROOTFS, "owned_blocks": s.usage(BASE_KEY).owned_blocks, "created": _now()}


def _apply(pool: Any, s: Any, mounts: Any, image: Any, layer: Any, privileged: bool | None) -> dict[str, Any]:
    from .oci_apply import apply_layer
    parent = image.layers[layer.index - 1].chain_id if layer.index else BASE_KEY
    key = "extract/" + layer.chain_id
    labels = {"thinpool.image/diff-id": layer.diff_id}
    mount = s.prepare(key, parent, labels)
    a = mounts.mount(mount.source)
    root = os.path.join(a.mountpoint or "", ROOTFS)
    where = f"{image.path}: layer {layer.index} blob {layer.blob}"
    try:
        stats = apply_layer(image.layer_entries(layer), root, whiteouts="apply", privileged=privileged)
    except ImageError as e:
        msg = str(e).replace(root, "<layer rootfs>")
        raise ImageError(msg if layer.blob in msg else f"{where}: {msg}") from None
    except OSError as e:        # the filesystem itself refused (full, read-only): still the layer's failure
        mounts.check(where)
        raise ImageError(f"{where}: applying it failed: {e.strerror or e}") from None
    try:
        a.syncfs()              # writeback errors surface here (syncfs reports them)
    except FailedPrecondition:
        mounts.check(where)
        raise
    mounts.detach(a)
    mounts.check(where)         # nothing the filesystem sent was refused: the layer is whole
    s.commit(layer.chain_id, key, labels)
    return {"chain_id": layer.chain_id, "diff_id": layer.diff_id, "parent": parent, "digest": layer.digest,
            "media_type": layer.media_type, "blob_bytes": layer.size, "file_bytes": stats.file_bytes,
            "entries": stats.entries, "owned_blocks": s.usage(layer.chain_id).owned_blocks, "created": _now()}


def _history(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config's history rows (``created_by``, ``empty_layer``), bounded and type-checked."""
    rows = config.get("history")
    out = []
    if isinstance(rows, list):
        for h in rows[:1024]:
            if isinstance(h, dict):
                out.append({"created_by": str(h.get("created_by", ""))[:1024],
                            "created": str(h.get("created", ""))[:64],
                            "empty_layer": bool(h.get("empty_layer", False))})
    return out


def _record(pool: Any, recs: dict[str, Any], image_id: str, new: bool) -> ImageRecord:
    img, base = recs["images"][image_id], recs["base"] or {}
    layers = []
    s = snapshotter(pool)
    for i, chain in enumerate(img["chain_ids"]):
        lr = recs["layers"].get(chain, {})
        try:
            volume = s.volume_name(chain)
        except NotFound:
            volume = ""
        layers.append(LayerRecord(i, chain, lr.get("diff_id", ""), lr.get("digest"), lr.get("media_type", ""),
                                  lr.get("blob_bytes"), int(lr.get("file_bytes", 0)), int(lr.get("entries", 0)),
                                  int(lr.get("owned_blocks", 0)), volume))
    return ImageRecord(id=image_id, tags=tuple(img["tags"]), format=img["format"], archive=img["archive"],
                       layers=tuple(layers), fs=base.get("fs", ""), base_size=int(base.get("size", 0)),
                       mkfs=base.get("mkfs", ""), block_size=pool.block_size, created=img.get("created", ""),
                       imported=img.get("imported", ""), new=new, history=tuple(img.get("history", [])))


# ============================================================================================== reporting
def list_images(pool_path: Any) -> list[ImageRecord]:
    """Every stored image (tagged or not), newest import first."""
    with opened_pool(pool_path, write=False) as pool:
        recs = load_records(pool)
        out = [_record(pool, recs, i, new=False) for i in recs["images"]]
    return sorted(out, key=lambda r: (r.imported, r.id), reverse=True)


def get_image(pool_path: Any, ref: str) -> ImageRecord:
    """The stored image ``ref`` names (:func:`resolve`)."""
    with opened_pool(pool_path, write=False) as pool:
        recs = load_records(pool)
        return _record(pool, recs, resolve(recs, ref), new=False)


def image_history(pool_path: Any, ref: str) -> list[dict[str, Any]]:
    """``docker history`` of image ``ref``, top row first, measured on the pool: per layer the
    file-level size from the archive (``file_bytes``), the blocks the layer really added on the pool
    (``owned_blocks``: mappings not shared identically with its parent) and their bytes
    (``block_bytes``), plus thin_ls's view of its volume (``mapped_blocks``, ``exclusive_blocks``,
    ``shared_blocks``: what ``thinpool ls --usage`` shows).  History rows of the config without a layer
    (``empty_layer``) have no volume; the last row is the base device (its filesystem's blocks)."""
    with opened_pool(pool_path, write=False) as pool:
        recs = load_records(pool)
        image_id = resolve(recs, ref)
        img = recs["images"][image_id]
        s = snapshotter(pool)
        bs = pool.block_size
        hist = list(img.get("history") or [])
        nonempty = [h for h in hist if not h["empty_layer"]]
        if len(nonempty) != len(img["chain_ids"]):   # no usable history: one row per layer
            hist = [{"created_by": "", "created": "", "empty_layer": False} for _ in img["chain_ids"]]
        rows: list[dict[str, Any]] = []
        chains = iter(img["chain_ids"])
        for h in hist:
            row: dict[str, Any] = {"created_by": h["created_by"], "created": h["created"], "layer": None,
                                   "volume": None, "file_bytes": 0, "blob_bytes": 0, "owned_blocks": 0,
                                   "block_bytes": 0, "mapped_blocks": 0, "exclusive_blocks": 0,
                                   "shared_blocks": 0}
            if not h["empty_layer"]:
                chain = next(chains)
                row.update(_layer_usage(s, chain, bs), layer=chain,
                           file_bytes=int(recs["layers"][chain]["file_bytes"]),
                           blob_bytes=recs["layers"][chain].get("blob_bytes") or 0)
            rows.append(row)
        base = recs["base"]
        rows.append({"created_by": f"thinpool: base device, {base['fs']} ({base['mkfs']})",
                     "created": base.get("created", ""), "layer": BASE_KEY, "file_bytes": 0, "blob_bytes": 0,
                     **_layer_usage(s, BASE_KEY, bs)})
    return list(reversed(rows[:-1])) + [rows[-1]]


def _layer_usage(s: Any, key: str, bs: int) -> dict[str, Any]:
    u = s.usage(key)
    return {"volume": s.volume_name(key), "owned_blocks": u.owned_blocks, "block_bytes": u.owned_blocks * bs,
            "mapped_blocks": u.mapped_blocks, "exclusive_blocks": u.exclusive_blocks,
            "shared_blocks": u.shared_blocks}


# ============================================================================================== removal
def remove_image(pool_path: Any, ref: str) -> dict[str, Any]:
    """``docker rmi``: a tag that is one of several of its image only untags; otherwise the image goes,
    with every layer no other image uses (top-down; the base stays).  FailedPrecondition while a
    container uses the image.  Returns ``{"untagged": [...], "deleted": image ID or None,
    "layers_removed": [chain IDs]}``."""
    with opened_pool(pool_path, write=True) as pool:
        recover(pool)
        recs = load_records(pool)
        image_id = resolve(recs, ref)
        img = recs["images"][image_id]
        tags = img["tags"]
        tag = matching_tag(tags, ref)
        if tag is not None and len(tags) > 1:
            tags.remove(tag)
            pool.put_records(RECORDS, recs)
            return {"untagged": [tag], "deleted": None, "layers_removed": []}
        users = sorted(n for n, c in (pool.get_records(CONTAINER_RECORDS).get("containers") or {}).items()
                       if c.get("image") == image_id)
        if users:
            raise FailedPrecondition(f"image {ref!r} ({image_id[:19]}) is used by container(s) "
                                     f"{', '.join(users[:5])}: `thinpool container rm POOL NAME` first")
        del recs["images"][image_id]
        used = {c for other in recs["images"].values() for c in other["chain_ids"]}
        s = snapshotter(pool)
        removed = []
        with pool.batch():
            for chain in reversed(img["chain_ids"]):
                if chain in used or chain not in recs["layers"]:
                    break            # a lower layer another image uses: everything below it is used too
                s.remove(chain)
                del recs["layers"][chain]
                removed.append(chain)
            pool.put_records(RECORDS, recs)
        return {"untagged": list(tags), "deleted": image_id, "layers_removed": removed}


__all__ = ["import_image", "list_images", "get_image", "image_history", "remove_image", "recover", "resolve",
           "matching_tag",
           "ImageRecord", "LayerRecord", "opened_pool", "snapshotter", "load_records", "NAMESPACE", "RECORDS",
           "CONTAINER_RECORDS", "BASE_KEY", "ROOTFS", "FILESYSTEMS"]
