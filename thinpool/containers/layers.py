"""A Docker-like image/container layer model on a thin pool (Docker's ``devicemapper`` graph driver).

The objects mirror Docker's devicemapper graph driver (docs/containers.md §1 and §5):

* a **base device**: an empty thin volume of ``base_size`` (Docker's ``dm.basesize``, default 10 GiB);
  every image's lowest layer is a snapshot of it;
* **image layers**: each layer is a snapshot of the previous one; a build step with files adds a layer,
  a metadata-only step (``CMD``, ``LABEL``, an empty diff) adds a history row but no device;
* **containers**: ``<id>-init`` (a snapshot of the image's top layer holding Docker's empty init files)
  and ``<id>`` (the writable snapshot of ``-init``).

All of them are snapshots of a :class:`~thinpool.containers.snapshotter.Snapshotter` (namespace ``moby`` by default,
so their volumes are ``snap/moby/<n>``): layers and ``-init`` are committed, containers are active.

There is no filesystem: files are laid out **block-aligned, one after another** on the volume (a layer's
files start at the first block after everything below it), and their content is deterministic
pseudo-random bytes (PCG64 seeded from the store's seed, the layer and the path).  This is the idealized
model of docs/containers.md §5: data blocks only, no filesystem metadata, so block numbers are exact.

Sizes are reported both ways:

* **file-level**, as Docker reports them: a layer's size is the sum of its files' bytes; a container's
  SIZE is the sum of the sizes of the files it added or modified (whole files); VIRTUAL SIZE adds the
  image's size.  This is also what an overlay driver copies up: the whole file on first modification.
* **block-level**, measured from the pool: a layer or container owns the blocks whose mapping differs
  from its parent's (:meth:`~thinpool.containers.snapshotter.Snapshotter.usage`); a container's block-level SIZE is
  ``owned(rw) x block size`` and its VIRTUAL SIZE adds ``mapped(image top layer) x block size`` (the
  ``-init`` layer is left out, as Docker does).

The store keeps its own records (layers, images, containers, file tables) in the pool's metadata under
``layers/<namespace>``, next to the snapshotter's, and commits the pool after every mutation, so records
and devices always agree.  A mutation that fails part-way aborts the pool to that last commit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ..errors import AlreadyExists, InvalidArgument, NotFound
from ..units import parse_size
from .snapshotter import Snapshotter

if TYPE_CHECKING:
    from ..pool import Pool

RECORDS_PREFIX = "layers/"
BASE = "base"
METADATA_BLOCK = 4096
#: What Docker puts in a fresh ``-init`` layer (all empty: they cost no data blocks here).
INIT_FILES = ("/.dockerenv", "/etc/resolv.conf", "/etc/hosts", "/etc/hostname", "/dev/console")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def file_content(seed: int, size: int) -> np.ndarray:
    """``size`` deterministic pseudo-random bytes for file seed ``seed`` (PCG64 raw output), read-only:
    the same kind of buffer as ``bytes`` data, so the demo's writes need one compiled variant of each
    write kernel, not one for writable and one for read-only buffers (a cold start compiles less)."""
    if size <= 0:
        out = np.zeros(0, np.uint8)
    else:
        out = np.random.PCG64(seed).random_raw(-(-size // 8)).view(np.uint8)[:size]
    out.flags.writeable = False
    return out


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class FileSpec:
    """A file a build step adds: ``path`` and ``size`` bytes of pseudo-random content."""

    path: str
    size: int


@dataclass(frozen=True)
class Step:
    """One Dockerfile step: ``created_by`` (the history text) and the files it adds.

    A step without files adds a history row with size 0 and no layer (no thin device), like
    ``CMD``/``LABEL`` or a ``RUN`` whose diff is empty.
    """

    created_by: str
    files: tuple[FileSpec, ...] = ()

    @staticmethod
    def of(created_by: str, *files: tuple[str, int] | FileSpec) -> "Step":
        """Convenience: ``Step.of("ADD file", ("/rootfs", 103_000_000))``."""
        return Step(created_by, tuple(f if isinstance(f, FileSpec) else FileSpec(*f) for f in files))


# ------------------------------------------------------------------------------------------------ outputs
@dataclass(frozen=True)
class ImageRow:
    """One ``docker images`` row; ``size_bytes`` is Docker's (file-level), plus the block-level size
    (blocks mapped by the image's top layer)."""

    repository: str
    tag: str
    image_id: str
    created: str
    size_bytes: int
    block_level_bytes: int
    mapped_blocks: int
    layers: int

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class HistoryRow:
    """One ``docker history`` row (top row first).  ``image`` is ``<missing>`` for rows built elsewhere;
    ``layer`` is the layer's snapshot name, None for a metadata-only step."""

    image: str
    created: str
    created_by: str
    size_bytes: int
    block_level_bytes: int
    owned_blocks: int
    layer: str | None
    comment: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class PsRow:
    """One ``docker ps -s`` row.  ``size_bytes``/``virtual_size_bytes`` are block-level (owned blocks of
    the writable layer; plus blocks mapped by the image), ``file_level_*`` are what Docker prints.
    Sizes are None when ``ps(size=False)``."""

    container_id: str
    image: str
    command: str
    created: str
    name: str
    size_bytes: int | None = None
    virtual_size_bytes: int | None = None
    file_level_size_bytes: int | None = None
    file_level_virtual_size_bytes: int | None = None
    owned_blocks: int | None = None
    mapped_blocks: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class WriteResult:
    """What a container write cost, measured from the pool.

    * ``block_level_bytes``: growth of the container's owned blocks x block size (its block-level SIZE
      delta); ``pool_blocks_added``: growth of the pool's used data blocks;
    * ``copy_up_bytes``: what an overlay driver copies up for this write: the whole file when a file from
      a lower layer is modified for the first time, else 0;
    * ``file_level_bytes``: growth of the container's file-level SIZE (Docker's SizeRw).
    """

    container: str
    path: str
    offset: int
    bytes_written: int
    file_size: int
    block_level_bytes: int
    owned_blocks_added: int
    pool_blocks_added: int
    copy_up_bytes: int
    file_level_bytes: int
    relocated: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return asdict(self)


# ------------------------------------------------------------------------------------------------ the store
class LayerStore:
    """Docker's devicemapper graph on a pool: base device, image layer chains, ``-init`` + writable
    containers (see the module docstring).  Creates the base device on first use.

    ``seed`` makes all file content deterministic; ``base_size`` is the base device's virtual size
    (every layer and container inherits it).
    """

    def __init__(self, pool: Pool, *, namespace: str = "moby", base_size: int | str = "10GiB", seed: int = 0) -> None:
        self.pool = pool
        self.snapshotter = Snapshotter(pool, namespace, base_size=base_size, autocommit=False)
        self.namespace = namespace
        self.records_key = RECORDS_PREFIX + namespace
        self._lock = pool.locked()
        with self._lock:
            recs = pool.get_records(self.records_key)
            if not recs:
                recs = {"seed": int(seed), "base_size": parse_size(base_size, "base size"), "counter": 0,
                        "layers": {}, "images": {}, "containers": {}}
                with self.pool.batch():  # one transaction: one commit, or an abort if it fails
                    self.snapshotter.prepare(BASE + ".create")
                    self.snapshotter.commit(BASE, BASE + ".create", labels={"thinpool.io/role": "base-device"})
                    recs["layers"][BASE] = {"parent": "", "files": [], "diff_size": 0, "end": 0,
                                            "created_by": "base device", "created": _now()}
                    self._save(recs)
            self.seed = int(recs["seed"])
            self.base_size = int(recs["base_size"])

    def __repr__(self) -> str:
        return f"<LayerStore {self.pool.path} namespace={self.namespace!r}>"

    @property
    def block_size(self) -> int:
        """The pool's data block size in bytes."""
        return self.pool.block_size

    # ------------------------------------------------------------------ records / transactions
    def _load(self) -> dict[str, Any]:
        recs = self.pool.get_records(self.records_key)
        if not recs:
            raise NotFound(f"pool {self.pool.path}: no layer store records in namespace {self.namespace!r}")
        return recs

    def _save(self, recs: dict[str, Any]) -> None:
        self.pool.put_records(self.records_key, recs)  # inside the mutation's batch: committed with it

    def _new_id(self, recs: dict[str, Any], what: str) -> str:
        recs["counter"] += 1
        return hashlib.sha256(f"{self.seed}:{recs['counter']}:{what}".encode()).hexdigest()

    def _file_seed(self, layer: str, path: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.seed}:{layer}:{path}".encode()).digest()[:8], "little")

    # ------------------------------------------------------------------ file tables
    def _chain(self, recs: dict[str, Any], layer: str) -> list[str]:
        out = []
        while layer:
            out.append(layer)
            layer = recs["layers"][layer]["parent"]
        return out[::-1]

    def _layer_files(self, recs: dict[str, Any], layer: str) -> dict[str, dict[str, int]]:
        files: dict[str, dict[str, int]] = {}
        for name in self._chain(recs, layer):
            for f in recs["layers"][name]["files"]:
                files[f["path"]] = {"offset": f["offset"], "size": f["size"]}
        return files

    def _image(self, recs: dict[str, Any], ref: str) -> dict[str, Any]:
        ref = self._normalize_ref(ref)
        try:
            return recs["images"][ref]
        except KeyError:
            raise NotFound(f"image {ref!r} does not exist") from None

    @staticmethod
    def _normalize_ref(ref: str) -> str:
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument(f"image reference must be a non-empty string, got {ref!r}")
        last = ref.rsplit("/", 1)[-1]
        return ref if ":" in last else ref + ":latest"

    def _container(self, recs: dict[str, Any], name: str) -> dict[str, Any]:
        try:
            return recs["containers"][name]
        except (KeyError, TypeError):
            raise NotFound(f"container {name!r} does not exist") from None

    # ------------------------------------------------------------------ images
    def build(self, ref: str, steps: Iterable[Step], *, base: str | None = None) -> str:
        """Build (or "pull") image ``ref`` from image ``base`` (None: from the base device) by applying
        ``steps`` bottom to top; returns the image id.  Each step with files becomes a layer: a snapshot
        of the layer below, the files written block-aligned after everything below them (each file in
        one write), then committed.  AlreadyExists if ``ref`` exists, NotFound if ``base`` does not."""
        ref = self._normalize_ref(ref)
        steps = list(steps)
        for s in steps:
            if not isinstance(s, Step):
                raise InvalidArgument(f"build {ref!r}: steps must be Step objects, got {type(s).__name__}")
            for f in s.files:
                if not isinstance(f.path, str) or not f.path.startswith("/"):
                    raise InvalidArgument(f"build {ref!r}: file path {f.path!r} must be absolute")
                if not isinstance(f.size, int) or f.size < 0:
                    raise InvalidArgument(f"build {ref!r}: file {f.path!r} size must be a non-negative int")
        bs = self.block_size
        with self._lock:
            recs = self._load()
            if ref in recs["images"]:
                raise AlreadyExists(f"image {ref!r} already exists")
            if base is not None:
                bimg = self._image(recs, base)
                top, history = bimg["top"], [dict(h) for h in bimg["history"]]
            else:
                top, history = BASE, []
            end = recs["layers"][top]["end"]
            with self.pool.batch():  # one transaction: one commit, or an abort if it fails
                for step in steps:
                    row = {"created_by": step.created_by, "size": sum(f.size for f in step.files),
                           "layer": None, "image_id": None, "created": _now()}
                    if step.files:
                        layer = self._new_id(recs, f"layer:{ref}:{step.created_by}")
                        key = layer + ".extract"
                        vol = self.snapshotter.prepare(key, top).thin
                        files = []
                        for f in step.files:
                            if f.size:
                                vol.write(end, file_content(self._file_seed(layer, f.path), f.size))
                            files.append({"path": f.path, "offset": end, "size": f.size})
                            end = _round_up(end + f.size, bs)
                        self.snapshotter.commit(layer, key, labels={"thinpool.io/role": "layer"})
                        recs["layers"][layer] = {"parent": top, "files": files, "diff_size": row["size"],
                                                 "end": end, "created_by": step.created_by, "created": row["created"]}
                        row["layer"] = layer
                        top = layer
                    history.append(row)
                digest = hashlib.sha256(repr((ref, top, [(h["created_by"], h["size"], h["layer"])
                                                         for h in history])).encode()).hexdigest()
                if steps:
                    history[-1]["image_id"] = digest
                recs["images"][ref] = {"id": digest, "top": top, "base": base and self._normalize_ref(base),
                                       "history": history, "created": _now()}
                self._save(recs)
            return digest

    def images(self) -> list[ImageRow]:
        """``docker images``: newest first."""
        with self._lock:
            recs = self._load()
            rows = []
            for ref, img in recs["images"].items():
                repo, tag = ref.rsplit(":", 1)
                mapped = self.snapshotter.usage(img["top"]).mapped_blocks if img["top"] != BASE else 0
                rows.append(ImageRow(repository=repo, tag=tag, image_id=img["id"][:12], created=img["created"],
                                     size_bytes=sum(h["size"] for h in img["history"]),
                                     block_level_bytes=mapped * self.block_size, mapped_blocks=mapped,
                                     layers=len(self._chain(recs, img["top"])) - 1))
        return sorted(rows, key=lambda r: r.created, reverse=True)

    def history(self, ref: str) -> list[HistoryRow]:
        """``docker history ref``: top row first; block-level size = blocks owned by the row's layer."""
        with self._lock:
            recs = self._load()
            img = self._image(recs, ref)
            rows = []
            for h in reversed(img["history"]):
                owned = self.snapshotter.usage(h["layer"]).owned_blocks if h["layer"] else 0
                rows.append(HistoryRow(image=h["image_id"][:12] if h["image_id"] else "<missing>",
                                       created=h["created"], created_by=h["created_by"], size_bytes=h["size"],
                                       block_level_bytes=owned * self.block_size, owned_blocks=owned,
                                       layer=h["layer"]))
        return rows

    def image_top_layer(self, ref: str) -> str:
        """The snapshot name of image ``ref``'s top layer (``base`` for an image with no layers)."""
        with self._lock:
            return self._image(self._load(), ref)["top"]

    # ------------------------------------------------------------------ containers
    def run(self, image: str, name: str, command: str = "bash") -> str:
        """``docker run --name name image command`` (storage part): create ``<id>-init`` as a snapshot of
        the image's top layer with Docker's empty init files, commit it, then the writable ``<id>`` as a
        snapshot of it.  Returns the container id.  AlreadyExists if ``name`` is taken."""
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"container name must be a non-empty string, got {name!r}")
        with self._lock:
            recs = self._load()
            if name in recs["containers"]:
                raise AlreadyExists(f"container name {name!r} is already in use")
            img = self._image(recs, image)
            with self.pool.batch():  # one transaction: one commit, or an abort if it fails
                cid = self._new_id(recs, f"container:{name}")
                init = f"{cid}-init"
                self.snapshotter.prepare(init + ".populate", img["top"])
                # Docker's init files are all empty: they cost no data block in this model.
                self.snapshotter.commit(init, init + ".populate", labels={"thinpool.io/role": "container-init"})
                self.snapshotter.prepare(cid, init, labels={"thinpool.io/role": "container",
                                                            "thinpool.io/container-name": name})
                end = recs["layers"][img["top"]]["end"]
                recs["containers"][name] = {"id": cid, "image": self._normalize_ref(image), "image_id": img["id"],
                                            "top": img["top"], "init": init, "rw": cid, "command": command,
                                            "init_files": list(INIT_FILES), "files": {}, "end": end,
                                            "created": _now()}
                self._save(recs)
            return cid

    def rm(self, name: str) -> None:
        """``docker rm``: delete the container's writable and ``-init`` devices."""
        with self._lock:
            recs = self._load()
            c = self._container(recs, name)
            with self.pool.batch():  # one transaction: one commit, or an abort if it fails
                self.snapshotter.remove(c["rw"])
                self.snapshotter.remove(c["init"])
                del recs["containers"][name]
                self._save(recs)

    def container_files(self, name: str) -> dict[str, dict[str, int]]:
        """The container's merged file table: ``path -> {offset, size}`` (image files, init files, its own)."""
        with self._lock:
            recs = self._load()
            return self._merged(recs, self._container(recs, name))

    def _merged(self, recs: dict[str, Any], c: dict[str, Any]) -> dict[str, dict[str, int]]:
        files = self._layer_files(recs, c["top"])
        for p in c["init_files"]:
            files[p] = {"offset": c["end"], "size": 0}
        for p, f in c["files"].items():
            files[p] = {"offset": f["offset"], "size": f["size"]}
        return files

    def image_files(self, ref: str) -> dict[str, dict[str, int]]:
        """Image ``ref``'s file table: ``path -> {offset, size}``."""
        with self._lock:
            recs = self._load()
            return self._layer_files(recs, self._image(recs, ref)["top"])

    def read_file(self, container: str, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read a file as container ``container`` sees it (NotFound if it has no such file)."""
        with self._lock:
            recs = self._load()
            c = self._container(recs, container)
            f = self._merged(recs, c).get(path)
            if f is None:
                raise NotFound(f"container {container!r}: no file {path!r}")
            if offset < 0 or offset > f["size"]:
                raise InvalidArgument(f"container {container!r}: offset {offset} is outside {path!r} "
                                      f"({f['size']} bytes)")
            n = f["size"] - offset if length is None else min(length, f["size"] - offset)
            return self.snapshotter.volume(c["rw"]).read(f["offset"] + offset, n)

    def write_file(self, container: str, path: str, offset: int, data: bytes | bytearray | memoryview) -> WriteResult:
        """Write ``data`` at ``offset`` of file ``path`` inside container ``container`` (creating it if
        missing): a block-level copy-on-write of just the touched blocks.  Returns the measured cost and,
        for comparison, the whole-file copy-up an overlay driver would do.

        A new file goes at the first free block after everything the container holds.  A file that
        grows past its block-aligned extent is moved there (its old blocks are discarded in the container).
        """
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidArgument(f"container {container!r}: file path {path!r} must be absolute")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgument(f"container {container!r}: offset must be a non-negative int, got {offset!r}")
        buf = bytes(data)
        bs = self.block_size
        with self._lock:
            recs = self._load()
            c = self._container(recs, container)
            rw = c["rw"]
            vol = self.snapshotter.volume(rw)
            own = c["files"]
            size_rw_before = sum(f["size"] for f in own.values())
            copy_up = 0
            if path in own:
                f = dict(own[path])
            else:
                lower = self._layer_files(recs, c["top"]).get(path)
                if lower is not None and lower["size"] > 0:
                    f = {"offset": lower["offset"], "size": lower["size"], "origin": "modified"}
                    copy_up = lower["size"]
                else:  # a new file (or an empty init/image file, which has no blocks yet)
                    f = {"offset": c["end"], "size": 0,
                         "origin": "modified" if lower is not None or path in c["init_files"] else "new"}
            new_size = max(f["size"], offset + len(buf))
            extent_end = _round_up(f["offset"] + f["size"], bs)
            is_last = f["size"] == 0 or extent_end >= c["end"]
            relocate = not is_last and f["offset"] + new_size > extent_end
            if f["offset"] + new_size > vol.size:
                raise InvalidArgument(f"container {container!r}: file {path!r} would end at byte "
                                      f"{f['offset'] + new_size}, past the {vol.size}-byte device")
            owned_before = self.snapshotter.usage(rw).owned_blocks
            used_before = self.pool.status().used_data_blocks
            with self.pool.batch():  # one transaction: one commit, or an abort if it fails
                if relocate:
                    old = vol.read(f["offset"], f["size"])
                    new_off = c["end"]
                    vol.write(new_off, old)
                    vol.discard(f["offset"], extent_end - f["offset"])
                    f["offset"] = new_off
                if buf:
                    vol.write(f["offset"] + offset, buf)
                f["size"] = new_size
                own[path] = f
                c["end"] = max(c["end"], _round_up(f["offset"] + new_size, bs))
                self._save(recs)
            owned_after = self.snapshotter.usage(rw).owned_blocks
            used_after = self.pool.status().used_data_blocks
            return WriteResult(container=container, path=path, offset=offset, bytes_written=len(buf),
                               file_size=new_size, block_level_bytes=(owned_after - owned_before) * bs,
                               owned_blocks_added=owned_after - owned_before,
                               pool_blocks_added=used_after - used_before, copy_up_bytes=copy_up,
                               file_level_bytes=sum(x["size"] for x in own.values()) - size_rw_before,
                               relocated=relocate)

    def ps(self, size: bool = True) -> list[PsRow]:
        """``docker ps [-s]``: newest first.  With ``size``, block-level SIZE/VIRTUAL SIZE (measured) beside
        Docker's file-level figures."""
        with self._lock:
            recs = self._load()
            rows = []
            for name, c in recs["containers"].items():
                row = dict(container_id=c["id"][:12], image=c["image"], command=c["command"],
                           created=c["created"], name=name)
                if size:
                    u = self.snapshotter.usage(c["rw"])
                    top_mapped = self.snapshotter.usage(c["top"]).mapped_blocks if c["top"] != BASE else 0
                    size_rw = sum(f["size"] for f in c["files"].values())
                    img_size = sum(h["size"] for h in recs["images"][c["image"]]["history"]) \
                        if c["image"] in recs["images"] else 0
                    row.update(size_bytes=u.size_bytes, virtual_size_bytes=u.size_bytes + top_mapped * self.block_size,
                               file_level_size_bytes=size_rw, file_level_virtual_size_bytes=size_rw + img_size,
                               owned_blocks=u.owned_blocks, mapped_blocks=u.mapped_blocks)
                rows.append(PsRow(**row))
        return sorted(rows, key=lambda r: r.created, reverse=True)

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        """``docker info``'s storage block, in bytes (Docker's computation, docs/containers.md §2): pool block
        size, base device size, data and metadata space used/total/available (available capped by the
        free space of the host filesystem, Docker's loopback rule), minimum free space (10%)."""
        with self._lock:
            recs = self._load()
            st = self.pool.status()
            bs = st.data_block_size
            data_path = getattr(getattr(self.pool, "data", None), "path", os.path.join(self.pool.path, "data"))
            md_path = os.path.join(self.pool.path, "metadata")
            host_free = shutil.disk_usage(os.path.dirname(os.path.abspath(data_path))).free
            data_total = st.total_data_blocks * bs
            data_used = st.used_data_blocks * bs
            md_total = st.total_metadata_blocks * METADATA_BLOCK
            md_used = st.used_metadata_blocks * METADATA_BLOCK
            return {
                "storage_driver": "thinpool (devicemapper model)",
                "pool_name": self.pool.path,
                "pool_blocksize": bs,
                "base_device_size": self.base_size,
                "backing_filesystem": "none (files block-aligned; no filesystem metadata modeled)",
                "data_file": data_path,
                "metadata_file": md_path,
                "data_space_used": data_used,
                "data_space_total": data_total,
                "data_space_available": min(data_total - data_used, host_free),
                "metadata_space_used": md_used,
                "metadata_space_total": md_total,
                "metadata_space_available": min(md_total - md_used, host_free),
                "thin_pool_minimum_free_space": st.total_data_blocks * 10 // 100 * bs,
                "used_data_blocks": st.used_data_blocks,
                "total_data_blocks": st.total_data_blocks,
                "thin_devices": st.nr_thins,
                "images": len(recs["images"]),
                "containers": len(recs["containers"]),
                "transaction_id": st.transaction_id,
                "dmsetup_status": st.dmsetup_line(),
            }


__all__ = ["LayerStore", "Step", "FileSpec", "ImageRow", "HistoryRow", "PsRow", "WriteResult", "file_content",
           "INIT_FILES", "BASE"]
