"""Reading container image archives safely: OCI image layouts and ``docker save`` tarballs.

:func:`open_image` opens

* an **OCI image layout** (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``) as a directory or as a
  tar file, as ``umoci``, ``skopeo copy ... oci:DIR`` / ``oci-archive:FILE`` and
  ``podman save --format oci-archive`` write it; the tag is matched against the index's
  ``org.opencontainers.image.ref.name`` annotations (nested indexes are followed; a multi-platform index
  resolves to the host's platform);
* a **docker-archive** (``manifest.json`` with ``Config``, ``RepoTags``, ``Layers``, the config JSON and
  one tar per layer), as ``docker save`` and ``skopeo copy ... docker-archive:FILE`` write it, as a tar file
  or an unpacked directory; the tag is matched against ``RepoTags``.

The :class:`Image` it returns lists the layers bottom-up (:class:`Layer`: blob, media type, diff ID and
chain ID -- ``chainID(L0) = diffID(L0)``, ``chainID(Ln) = sha256(chainID(Ln-1) + " " + diffID(Ln))``).
:meth:`Image.layer_entries` iterates one layer's changes as typed :class:`Entry` values, and
:func:`thinpool.containers.oci_apply.apply_layer` applies them to a directory.

Checks (each failure is an :class:`~thinpool.errors.ImageError` naming the archive, the blob and, inside a
layer, the member):

* every blob read is streamed through sha256 (never held whole in memory) and must match its descriptor's
  digest and size; every layer's uncompressed stream must hash to the config's ``rootfs.diff_ids`` entry;
  in a docker-archive, whose manifest carries no digests, the config is checked against its file name
  when that name is a digest, and the layers through the diff IDs;
* layers are gzip, zstd or plain tar, told apart by their magic bytes; a media type that names a
  compression must agree with the bytes;
* JSON documents (index, manifests, config) are bounded (:data:`MAX_JSON_BYTES`) and type-checked; the
  number of layers (:data:`MAX_LAYERS`), entries per layer (``max_entries``), path lengths, xattrs and tar
  extended headers (:data:`MAX_TAR_HEADER_BYTES`) are bounded, so a hostile archive cannot exhaust memory;
* member names are normalised (``./`` and empty components dropped); absolute names and any ``..``
  component are refused, as are hard links whose target is absolute or leaves the tree; device nodes and
  setuid/setgid bits are flagged (:attr:`Entry.privileged`) for the applier, which keeps them only as root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from thinpool.containers.oci_tar import (CHUNK, MAX_ENTRIES, BoundedTarInfo, Entry, iter_tar_entries,
                                         normalize_member)
from thinpool.errors import ImageError

#: largest index / manifest / config / manifest.json accepted (bytes); real ones are a few KiB
MAX_JSON_BYTES = 4 << 20
#: most layers an image may have (Docker's limit is 125; overlayfs' lowerdir chain is shorter still)
MAX_LAYERS = 256
#: most members of an archive file (the outer tar of an oci-archive or docker-archive)
MAX_ARCHIVE_MEMBERS = 100_000
#: deepest chain of nested image indexes followed
MAX_INDEX_DEPTH = 4

REF_NAME = "org.opencontainers.image.ref.name"
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\Z")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain IDs of layers with these diff IDs, bottom-up:
    ``chainID(L0) = diffID(L0)``, ``chainID(Ln) = "sha256:" + sha256(chainID(Ln-1) + " " + diffID(Ln))``."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def check_digest(value: Any, what: str) -> str:
    """``value`` as a digest string (``sha256:<64 hex>`` or ``sha512:<128 hex>``), else ImageError."""
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise ImageError(f"{what}: not a sha256/sha512 digest: {str(value)[:100]!r}")
    return value


# -- hashing / decompression --------------------------------------------------------------------

class _Hashing(io.RawIOBase):
    """Reads through ``raw``, hashing and counting every byte; :meth:`verify` checks the result."""

    def __init__(self, raw: IO[bytes] | gzip.GzipFile, algorithm: str, what: str, limit: int | None = None) -> None:
        super().__init__()
        self._raw, self._what, self._limit = raw, what, limit
        self.hash = hashlib.new(algorithm)
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self._raw.read(len(b))
        except ImageError:
            raise
        except (OSError, EOFError, zlib.error) as e:
            raise ImageError(f"{self._what}: unreadable: {e}") from None
        except Exception as e:           # zstandard.ZstdError is not an OSError
            if type(e).__name__ == "ZstdError":
                raise ImageError(f"{self._what}: unreadable zstd: {e}") from None
            raise
        n = len(data)
        b[:n] = data
        self.hash.update(data)
        self.count += n
        if self._limit is not None and self.count > self._limit:
            raise ImageError(f"{self._what}: longer than its descriptor's {self._limit} bytes")
        return n

    def drain(self) -> None:
        buf = bytearray(CHUNK)
        while self.readinto(buf):
            pass

    def hexdigest(self) -> str:
        return f"{self.hash.name}:{self.hash.hexdigest()}"


def _decompressed(raw: IO[bytes], magic: bytes, what: str) -> IO[bytes] | gzip.GzipFile:
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")    # multi-member; EOFError when truncated
    if magic.startswith(_ZSTD_MAGIC):
        try:
            import zstandard
        except ImportError:
            raise ImageError(f"{what}: a zstd layer needs the 'zstandard' package "
                             "(pip install 'thinpool[images]')") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
    return raw


def compression_of(media_type: str) -> str | None:
    """``"gzip"``, ``"zstd"``, ``""`` (plain) or None (unknown: decided by magic bytes) for a layer media type."""
    if media_type.endswith("+gzip") or media_type.endswith(".tar.gzip"):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    if media_type.endswith(".tar") or media_type.endswith("diff.tar"):
        return ""
    return None


# -- images ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """One layer, bottom-up: where its blob is, what it should hash to, and its chain ID."""

    index: int
    blob: str            # the blob's name in the archive (``blobs/sha256/<hex>`` or a docker path)
    digest: str | None   # the compressed blob's digest (None in a docker-archive: not recorded)
    size: int | None     # the blob's size from its descriptor (None in a docker-archive)
    media_type: str
    diff_id: str
    chain_id: str


class _Source:
    """Files of an image archive, by relative name: a directory or a tar file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if os.path.isdir(path):
            return
        try:
            self._tar = tarfile.open(path, mode="r:", tarinfo=BoundedTarInfo)
            n = 0
            for ti in self._tar:     # bounded count; names normalised
                n += 1
                if n > MAX_ARCHIVE_MEMBERS:
                    raise ImageError(f"{path}: more than {MAX_ARCHIVE_MEMBERS} members")
                name = "/".join(p for p in ti.name.split("/") if p not in ("", "."))
                self._members[name] = ti
            self._tar.members = []  # type: ignore[attr-defined]  # we keep our own index (not in typeshed)
        except ImageError as e:
            self.close()
            raise ImageError(f"{path}: {e}" if not str(e).startswith(path) else str(e)) from None
        except (tarfile.TarError, OSError, EOFError) as e:
            self.close()
            raise ImageError(f"{path}: not an image layout directory or tar archive: {e}") from None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def exists(self, name: str) -> bool:
        if self._tar is None:
            return os.path.isfile(self._fs_path(name))
        return name in self._members

    def _fs_path(self, name: str) -> str:
        rel = normalize_member(name, f"{self.path}: file {name!r}")
        full = os.path.join(self.path, rel)
        real, root = os.path.realpath(full), os.path.realpath(self.path)
        if not real.startswith(root + os.sep):
            raise ImageError(f"{self.path}: {name!r} leaves the image directory")
        return real

    def open(self, name: str) -> IO[bytes]:
        """The file ``name`` (a member's symlinks resolved inside the archive), or ImageError (missing)."""
        if self._tar is None:
            full = self._fs_path(name)
            try:
                return open(full, "rb")
            except OSError as e:
                raise ImageError(f"{self.path}: blob {name!r} missing or unreadable: {e.strerror}") from None
        rel = normalize_member(name, f"{self.path}: file {name!r}")
        ti = self._members.get(rel)
        for _ in range(8):               # docker save links identical layer.tar files to one another
            if ti is None or not ti.issym():
                break
            target = os.path.normpath(os.path.join(os.path.dirname(rel), ti.linkname))
            if target.startswith("..") or os.path.isabs(target):
                raise ImageError(f"{self.path}: {name!r} links out of the archive")
            rel, ti = target, self._members.get(target)
        if ti is None or not ti.isreg():
            raise ImageError(f"{self.path}: blob {name!r} missing from the archive")
        f = self._tar.extractfile(ti)
        assert f is not None
        return f


class Image:
    """An opened image (use :func:`open_image`): its config, layers and tag; a context manager."""

    def __init__(self, source: _Source, fmt: str, ref: str | None, manifest: dict[str, Any] | None,
                 config_blob: str, config_digest: str, config: dict[str, Any], layers: list[Layer]) -> None:
        self._source = source
        self.path = source.path
        self.format = fmt                   #: "oci" or "docker-archive"
        self.ref = ref                      #: the tag it was opened by (or the only one)
        self.manifest = manifest            #: the OCI manifest (None for docker-archive)
        self.config_blob = config_blob
        self.config_digest = config_digest  #: the image ID (sha256 of the config)
        self.config = config
        self.layers = layers

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._source.close()

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def chain_ids(self) -> list[str]:
        return [layer.chain_id for layer in self.layers]

    def layer_entries(self, layer: Layer, max_entries: int = MAX_ENTRIES) -> Iterator[Entry]:
        """The entries of ``layer`` in archive order.  The blob digest (OCI) and the diff ID are verified
        when the stream ends: the last ``next()`` raises ImageError if either is wrong, so a caller applies
        into something it can throw away (a snapshot, a fresh directory), or calls :meth:`verify` first."""
        what = f"{self.path}: layer {layer.index} blob {layer.blob}"
        raw = self._source.open(layer.blob)
        try:
            algorithm = (layer.digest or "sha256").split(":")[0]
            blob = _Hashing(raw, algorithm, what, limit=layer.size)
            buffered = io.BufferedReader(blob, CHUNK)
            magic = buffered.peek(4)[:4]
            want = compression_of(layer.media_type)
            got = "gzip" if magic.startswith(_GZIP_MAGIC) else "zstd" if magic.startswith(_ZSTD_MAGIC) else ""
            if want and want != got:
                raise ImageError(f"{what}: media type {layer.media_type} but the blob is "
                                 f"{got or 'not compressed'}")
            diff = _Hashing(_decompressed(buffered, magic, what), layer.diff_id.split(":")[0], what)
            try:
                yield from iter_tar_entries(io.BufferedReader(diff, CHUNK), what, max_entries)
                diff.drain()               # the tar's end padding is part of the diff ID
                while got and buffered.read(CHUNK):
                    pass                   # trailing bytes after the compressed stream: part of the blob
            except ImageError as e:        # a damaged stream: if the blob's digest is wrong, say that
                if layer.digest is not None:
                    try:
                        blob.drain()
                    except ImageError:
                        pass
                    else:
                        if blob.hexdigest() != layer.digest:
                            raise ImageError(f"{what}: digest mismatch: blob is {blob.hexdigest()}, descriptor "
                                             f"says {layer.digest} (reading it: {e})") from None
                raise
            blob.drain()
            if layer.digest is not None and (blob.hexdigest() != layer.digest or blob.count != layer.size):
                raise ImageError(f"{what}: digest mismatch: blob is {blob.hexdigest()} ({blob.count} bytes), "
                                 f"descriptor says {layer.digest} ({layer.size} bytes)")
            if diff.hexdigest() != layer.diff_id:
                raise ImageError(f"{what}: diff ID mismatch: uncompressed content is {diff.hexdigest()}, "
                                 f"config says {layer.diff_id}")
        finally:
            raw.close()

    def verify(self) -> None:
        """Read every layer once (nothing written): digests, diff IDs and member rules all checked."""
        for layer in self.layers:
            for entry in self.layer_entries(layer):
                if entry.reader is not None:
                    while entry.reader.read(CHUNK):
                        pass


def _read_json(source: _Source, name: str, what: str, digest: str | None = None,
               size: int | None = None) -> tuple[Any, str]:
    """A bounded JSON document and its sha256 digest; checks digest/size when given."""
    if size is not None and size > MAX_JSON_BYTES:
        raise ImageError(f"{source.path}: {what} {name}: {size} bytes (limit {MAX_JSON_BYTES})")
    algorithm = digest.split(":")[0] if digest else "sha256"
    with source.open(name) as f:
        h = _Hashing(f, algorithm, f"{source.path}: {what} {name}")
        parts, n = [], 0
        while n <= MAX_JSON_BYTES:
            part = h.read(MAX_JSON_BYTES + 1 - n)
            if not part:
                break
            parts.append(part)
            n += len(part)
        data = b"".join(parts)
    if len(data) > MAX_JSON_BYTES:
        raise ImageError(f"{source.path}: {what} {name}: longer than {MAX_JSON_BYTES} bytes")
    got = h.hexdigest()
    if digest is not None and (got != digest or (size is not None and len(data) != size)):
        raise ImageError(f"{source.path}: {what} blob {name}: digest mismatch: blob is {got} "
                         f"({len(data)} bytes), descriptor says {digest} ({size} bytes)")
    try:
        return json.loads(data), got
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{source.path}: {what} {name}: unreadable JSON: {e}") from None
    except RecursionError:
        raise ImageError(f"{source.path}: {what} {name}: unreadable JSON: nested too deeply") from None


def _blob_name(digest: str) -> str:
    alg, hexd = digest.split(":")
    return f"blobs/{alg}/{hexd}"


def _descriptor(d: Any, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ImageError(f"{what}: descriptor is not an object")
    check_digest(d.get("digest"), f"{what}: digest")
    size = d.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what}: descriptor size {size!r:.80} is not a non-negative integer")
    if not isinstance(d.get("mediaType", ""), str):
        raise ImageError(f"{what}: mediaType is not a string")
    return d


def _diff_ids(config: Any, where: str) -> list[str]:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        raise ImageError(f"{where}: config has no rootfs.diff_ids list")
    if len(ids) > MAX_LAYERS:
        raise ImageError(f"{where}: {len(ids)} layers (limit {MAX_LAYERS})")
    return [check_digest(d, f"{where}: diff_ids[{i}]") for i, d in enumerate(ids)]


def _host_platform() -> tuple[str, str]:
    m = platform.machine().lower()
    return "linux", {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(m, m)


def _ref_matches(name: str, ref: str) -> bool:
    return name == ref or name.rsplit(":", 1)[-1] == ref or name.endswith("/" + ref)


def _open_oci(source: _Source, ref: str | None) -> Image:
    index, _ = _read_json(source, "index.json", "index")
    where = f"{source.path}: index.json"
    candidates = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(candidates, list) or len(candidates) > 10_000:
        raise ImageError(f"{where}: no 'manifests' list")
    descs = [_descriptor(d, f"{where}: manifests[{i}]") for i, d in enumerate(candidates)]
    names = [str((d.get("annotations") or {}).get(REF_NAME, "")) if isinstance(d.get("annotations"), (dict, type(None)))
             else "" for d in descs]
    if ref is not None:
        picked = [d for d, n in zip(descs, names) if n and _ref_matches(n, ref)]
        if not picked:
            tags = ", ".join(n for n in names if n)[:500]
            raise ImageError(f"{where}: no image tagged {ref!r} (tags: {tags or 'none'})")
    else:
        picked = descs
    if len(picked) != 1:
        raise ImageError(f"{where}: {len(picked)} images match; name one with a tag "
                         f"(tags: {', '.join(n for n in names if n) or 'none'})")
    desc = picked[0]
    tag = ref if ref is not None else (names[descs.index(desc)] or None)
    for depth in range(MAX_INDEX_DEPTH + 1):
        name = _blob_name(desc["digest"])
        doc, _ = _read_json(source, name, "manifest", desc["digest"], desc["size"])
        mt = desc.get("mediaType") or (doc.get("mediaType") if isinstance(doc, dict) else "")
        if not isinstance(doc, dict):
            raise ImageError(f"{source.path}: manifest blob {name}: not a JSON object")
        if mt in INDEX_TYPES or "manifests" in doc:
            if depth == MAX_INDEX_DEPTH:
                raise ImageError(f"{source.path}: image indexes nested deeper than {MAX_INDEX_DEPTH}")
            host = _host_platform()
            subs = doc.get("manifests")
            if not isinstance(subs, list) or len(subs) > 10_000:
                raise ImageError(f"{source.path}: index blob {name}: no 'manifests' list")
            subs = [_descriptor(d, f"{source.path}: index blob {name}") for d in subs]
            match = [d for d in subs if isinstance(d.get("platform"), dict)
                     and (d["platform"].get("os"), d["platform"].get("architecture")) == host]
            if len(subs) == 1:
                match = subs
            if not match:
                raise ImageError(f"{source.path}: index blob {name}: no manifest for {host[0]}/{host[1]}")
            desc = match[0]
            continue
        if mt and mt not in MANIFEST_TYPES:
            raise ImageError(f"{source.path}: manifest blob {name}: media type {mt!r:.80} is not an image manifest")
        return _oci_manifest(source, tag, name, doc)
    raise AssertionError("unreachable")


def _oci_manifest(source: _Source, tag: str | None, name: str, manifest: dict[str, Any]) -> Image:
    where = f"{source.path}: manifest blob {name}"
    cdesc = _descriptor(manifest.get("config"), f"{where}: config")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{where}: no 'layers' list")
    if len(layers) > MAX_LAYERS:
        raise ImageError(f"{where}: {len(layers)} layers (limit {MAX_LAYERS})")
    ldescs = [_descriptor(d, f"{where}: layers[{i}]") for i, d in enumerate(layers)]
    cname = _blob_name(cdesc["digest"])
    config, cdigest = _read_json(source, cname, "config", cdesc["digest"], cdesc["size"])
    diff_ids = _diff_ids(config, f"{source.path}: config blob {cname}")
    if len(diff_ids) != len(ldescs):
        raise ImageError(f"{where}: {len(ldescs)} layers but the config lists {len(diff_ids)} diff IDs")
    out = [Layer(i, _blob_name(d["digest"]), d["digest"], d["size"], d.get("mediaType", ""), diff, chain)
           for i, (d, diff, chain) in enumerate(zip(ldescs, diff_ids, chain_ids(diff_ids)))]
    for layer in out:
        if not source.exists(layer.blob):
            raise ImageError(f"{source.path}: layer {layer.index} blob {layer.blob} missing")
    return Image(source, "oci", tag, manifest, cname, cdigest, config, out)


def _open_docker(source: _Source, ref: str | None) -> Image:
    doc, _ = _read_json(source, "manifest.json", "docker manifest")
    where = f"{source.path}: manifest.json"
    if not isinstance(doc, list) or not doc or len(doc) > 10_000:
        raise ImageError(f"{where}: not a non-empty list of images")
    entries = []
    for i, e in enumerate(doc):
        if not isinstance(e, dict) or not isinstance(e.get("Config"), str) or not isinstance(e.get("Layers"), list):
            raise ImageError(f"{where}: entry {i} lacks Config or Layers")
        tags = e.get("RepoTags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ImageError(f"{where}: entry {i}: RepoTags is not a list of strings")
        entries.append((e, tags))
    all_tags = [t for _, tags in entries for t in tags]
    if ref is not None:
        picked = [(e, [t for t in tags if _ref_matches(t, ref)]) for e, tags in entries]
        picked = [(e, t) for e, t in picked if t]
        if not picked:
            raise ImageError(f"{where}: no image tagged {ref!r} (tags: {', '.join(all_tags)[:500] or 'none'})")
    else:
        picked = entries
    if len(picked) != 1:
        raise ImageError(f"{where}: {len(picked)} images match; name one with a tag (tags: {', '.join(all_tags)})")
    entry, tags = picked[0]
    tag = ref if ref is not None else (tags[0] if tags else None)
    cname = entry["Config"]
    hexname = os.path.basename(cname).removesuffix(".json")
    expect = f"sha256:{hexname}" if re.fullmatch(r"[0-9a-f]{64}", hexname) else None
    config, cdigest = _read_json(source, cname, "config", expect)
    diff_ids = _diff_ids(config, f"{source.path}: config {cname}")
    paths = entry["Layers"]
    if len(paths) != len(diff_ids) or not all(isinstance(p, str) for p in paths):
        raise ImageError(f"{where}: {len(paths)} layer paths but the config lists {len(diff_ids)} diff IDs")
    out = []
    for i, (p, diff, chain) in enumerate(zip(paths, diff_ids, chain_ids(diff_ids))):
        m = re.fullmatch(r"blobs/(sha256)/([0-9a-f]{64})", normalize_member(p, f"{where}: layer path"))
        digest = f"{m.group(1)}:{m.group(2)}" if m else None
        out.append(Layer(i, p, digest, None, "", diff, chain))
        if not source.exists(p) and not _is_link(source, p):
            raise ImageError(f"{source.path}: layer {i} blob {p} missing")
    return Image(source, "docker-archive", tag, None, cname, cdigest, config, out)


def _is_link(source: _Source, name: str) -> bool:
    try:
        source.open(name).close()
        return True
    except ImageError:
        return False


def open_image(path: str | os.PathLike[str], ref: str | None = None) -> Image:
    """Open the image archive at ``path`` (OCI layout or docker-archive, directory or tar) and resolve
    ``ref`` (a tag such as ``latest`` or ``repo:tag``; None when the archive holds one image).
    Reads and checks the index/manifest/config; layer blobs are read by :meth:`Image.layer_entries`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such image archive")
    if ref is not None and (not isinstance(ref, str) or not ref or len(ref) > 512):
        raise ImageError(f"{path}: bad image reference {str(ref)[:100]!r}")
    source = _Source(path)
    try:
        if source.exists("index.json") and source.exists("oci-layout"):
            layout, _ = _read_json(source, "oci-layout", "oci-layout")
            if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
                raise ImageError(f"{path}: oci-layout has no imageLayoutVersion")
            return _open_oci(source, ref)
        if source.exists("manifest.json"):
            return _open_docker(source, ref)
        raise ImageError(f"{path}: neither an OCI image layout (oci-layout, index.json) nor a docker-archive "
                         "(manifest.json)")
    except BaseException:
        source.close()
        raise
