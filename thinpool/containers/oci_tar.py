"""A layer's tar members as typed entries, with the safety rules enforced while reading.

:func:`iter_tar_entries` reads an uncompressed layer tar once, as a stream (``tarfile`` in ``r|`` mode,
whose member list is cleared as it goes), and yields :class:`Entry` values: regular files (with a reader
of the content), directories, symlinks, hard links, whiteouts (``.wh.NAME``), opaque directories
(``.wh..wh..opq``), character and block devices, FIFOs -- with mode, uid, gid, mtime and xattrs (PAX
``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``).  Refused, with an :class:`~thinpool.errors.ImageError`
naming the blob and the member: absolute names, any ``..`` component, hard links whose target is absolute
or leaves the tree, tar extended headers over :data:`MAX_TAR_HEADER_BYTES` (refused before tarfile reads
them) and runs of more than :data:`MAX_EXTENDED_RUN` of them, more than ``max_entries`` members, names or link targets over :data:`MAX_PATH`, xattrs over
:data:`MAX_XATTR_VALUE` / :data:`MAX_XATTRS`, unknown member types.  Other ``.wh..wh.*`` names (aufs
metadata) are skipped, as Docker does.  Device nodes and setuid/setgid modes are flagged
(:attr:`Entry.privileged`) for :func:`thinpool.containers.oci_apply.apply_layer`.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO

from thinpool.errors import ImageError

#: default bound on the members of one layer (a large distribution image has ~100,000); the applier keeps
#: a set of the paths a layer wrote, so this bounds its memory (~200 bytes a path)
MAX_ENTRIES = 1_000_000
#: largest tar extended header (PAX, GNU long name) accepted in a layer
MAX_TAR_HEADER_BYTES = 1 << 20
#: most extended headers (PAX, GNU long names) before one member
MAX_EXTENDED_RUN = 16
#: longest member name / link target (Linux PATH_MAX)
MAX_PATH = 4096
#: largest xattr value (Linux XATTR_SIZE_MAX) and most xattrs on one member
MAX_XATTR_VALUE = 65536
MAX_XATTRS = 128

#: read size for blob and member content
CHUNK = 1 << 20
WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"

#: Entry kinds
FILE, DIR, SYMLINK, HARDLINK, WHITEOUT, OPAQUE_DIR, CHAR, BLOCK, FIFO = (
    "file", "dir", "symlink", "hardlink", "whiteout", "opaque", "char", "block", "fifo")


def normalize_member(name: str, what: str) -> str:
    """A layer member's name made relative and canonical (``./a//b/`` -> ``a/b``; the root is ``""``).

    Absolute names, any ``..`` component, NUL bytes and names over :data:`MAX_PATH` are refused."""
    if len(name) > MAX_PATH or "\0" in name:
        raise ImageError(f"{what}: member name too long or contains NUL")
    if name.startswith("/"):
        raise ImageError(f"{what}: absolute member name {name[:200]!r} refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{what}: member name {name[:200]!r} has a '..' component (it could leave the tree)")
    return "/".join(parts)


# -- entries --------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One change of a layer, in archive order.

    ``path`` is normalised and relative to the root (``""`` is the root itself).  For :data:`WHITEOUT`
    it is the path deleted (``a/.wh.b`` -> ``a/b``), for :data:`OPAQUE_DIR` the directory made opaque.
    ``linkname`` is a symlink's target as stored (never followed by the applier) or a hard link's
    normalised target path.  ``reader`` (regular files only) reads the content; it is valid until the
    next entry is taken from the iterator.  ``privileged`` is True for device nodes and for setuid or
    setgid modes: the applier keeps those only as root."""

    kind: str
    path: str
    member: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 0.0
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    reader: io.RawIOBase | None = None

    @property
    def privileged(self) -> bool:
        return self.kind in (CHAR, BLOCK) or bool(self.mode & (stat.S_ISUID | stat.S_ISGID))


_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized extended headers before tarfile reads them into memory, long runs
    of them (tarfile reads a run recursively: a hostile run would end in RecursionError) and global PAX
    headers accumulating past :data:`MAX_TAR_HEADER_BYTES`."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED:
            if self.size > MAX_TAR_HEADER_BYTES:
                raise ImageError(f"extended tar header of {self.size} bytes (limit {MAX_TAR_HEADER_BYTES})")
            run = getattr(tarfile_, "_thinpool_ext_run", 0) + 1
            if run > MAX_EXTENDED_RUN:
                raise ImageError(f"more than {MAX_EXTENDED_RUN} extended tar headers in a row")
            setattr(tarfile_, "_thinpool_ext_run", run)  # (our own counter on the TarFile, read above)
        else:
            setattr(tarfile_, "_thinpool_ext_run", 0)
            if tarfile_.pax_headers and (len(tarfile_.pax_headers) > 1024 or sum(
                    len(k) + len(v) for k, v in tarfile_.pax_headers.items()) > MAX_TAR_HEADER_BYTES):
                raise ImageError(f"global PAX headers past {MAX_TAR_HEADER_BYTES} bytes or 1024 keys")
        return super()._proc_member(tarfile_)  # type: ignore[misc]  # (TarInfo._proc_member: private, not in typeshed)


def _xattrs(ti: tarfile.TarInfo, what: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in ti.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name, raw = key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            import base64
            import urllib.parse
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            try:
                raw = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError as e:
                raise ImageError(f"{what}: bad LIBARCHIVE xattr {name!r}: {e}") from None
        else:
            continue
        if not name or len(name) > 255 or len(raw) > MAX_XATTR_VALUE:
            raise ImageError(f"{what}: xattr {name[:100]!r} name or value out of bounds")
        out[name] = raw
        if len(out) > MAX_XATTRS:
            raise ImageError(f"{what}: more than {MAX_XATTRS} xattrs")
    return out


def iter_tar_entries(stream: BinaryIO, what: str, max_entries: int = MAX_ENTRIES) -> Iterator[Entry]:
    """The typed entries of an uncompressed layer tar read as a stream (``what`` names the blob in
    errors).  Member safety rules as in the module docstring; the tar is read once, front to back."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=BoundedTarInfo)
    except ImageError as e:
        raise ImageError(f"{what}: {e}") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
        raise ImageError(f"{what}: not a readable tar: {e}") from None
    count = 0
    with tar:
        while True:
            try:
                ti = tar.next()
            except ImageError as e:
                raise ImageError(f"{what}: after member {count}: {e}") from None
            except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
                # (ValueError: tarfile's own parsing of malformed GNU sparse or PAX fields)
                raise ImageError(f"{what}: unreadable tar after {count} members: {e}") from None
            if ti is None:
                return
            # stream mode keeps every TarInfo otherwise (TarFile.members: not in typeshed)
            tar.members.clear()  # type: ignore[attr-defined]
            count += 1
            if count > max_entries:
                raise ImageError(f"{what}: more than {max_entries} members")
            entry = _entry(ti, what)
            if entry is None:
                continue
            if entry.kind == FILE:
                entry.reader = _MemberReader(tar.extractfile(ti), f"{what}: member {ti.name!r}")
            yield entry


def _entry(ti: tarfile.TarInfo, what: str) -> Entry | None:
    where = f"{what}: member {ti.name[:200]!r}"
    path = normalize_member(ti.name, where)
    # PAX headers set these from text: a negative size shifted every later member; a negative or
    # 5,000-digit id, or an infinite time, would reach chown/utime
    if not 0 <= ti.size < 1 << 63:
        raise ImageError(f"{where}: size {ti.size} out of range")
    for field in ("uid", "gid"):
        if not 0 <= getattr(ti, field) < 1 << 32:
            raise ImageError(f"{where}: {field} {getattr(ti, field)} out of range (0 to 2^32-1)")
    if not (isinstance(ti.mtime, (int, float)) and abs(ti.mtime) < 1 << 40):
        raise ImageError(f"{where}: modification time {ti.mtime!r} out of range")
    xattrs = _xattrs(ti, where)

    def entry(kind: str, entry_path: str, *, size: int = 0, linkname: str = "",
              devmajor: int = 0, devminor: int = 0) -> Entry:
        """The entry of this member (its owner, mode, time and xattrs) as ``kind`` at ``entry_path``."""
        return Entry(kind, entry_path, ti.name, mode=ti.mode & 0o7777, uid=ti.uid, gid=ti.gid,
                     mtime=float(ti.mtime), size=size, linkname=linkname, devmajor=devmajor,
                     devminor=devminor, xattrs=xattrs)

    head, _, leaf = path.rpartition("/")
    if leaf.startswith(WHITEOUT_PREFIX):
        if leaf == OPAQUE:
            return entry(OPAQUE_DIR, head)
        if leaf.startswith(".wh..wh."):
            return None                  # other reserved names (aufs metadata): ignored, as Docker does
        name = leaf[len(WHITEOUT_PREFIX):]
        if name in ("", ".", ".."):
            raise ImageError(f"{where}: whiteout of {name!r} refused")
        return entry(WHITEOUT, f"{head}/{name}" if head else name)
    if ti.isreg():
        return entry(FILE, path, size=ti.size)
    if ti.isdir():
        return entry(DIR, path)
    if ti.issym():
        if not ti.linkname or len(ti.linkname) > MAX_PATH or "\0" in ti.linkname:
            raise ImageError(f"{where}: bad symlink target")
        if path == "":
            raise ImageError(f"{where}: the root cannot be a symlink")
        return entry(SYMLINK, path, linkname=ti.linkname)
    if ti.islnk():
        if ti.linkname.startswith("/"):
            raise ImageError(f"{where}: hard link to absolute {ti.linkname[:200]!r} refused")
        target = normalize_member(ti.linkname, f"{where}: hard link target")
        if target == "" or path == "":
            raise ImageError(f"{where}: hard link to or as the root refused")
        return entry(HARDLINK, path, linkname=target)
    if ti.ischr() or ti.isblk():
        return entry(CHAR if ti.ischr() else BLOCK, path, devmajor=ti.devmajor, devminor=ti.devminor)
    if ti.isfifo():
        return entry(FIFO, path)
    raise ImageError(f"{where}: unsupported tar member type {ti.type!r}")


class _MemberReader(io.RawIOBase):
    """A layer member's content; tar read errors become ImageError naming the member."""

    def __init__(self, raw: IO[bytes] | None, what: str) -> None:
        super().__init__()
        self._raw, self._what = raw, what

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:  # (None: all, as io's readers take it)
        if self._raw is None:
            return b""
        try:
            return self._raw.read(size if size is not None and size >= 0 else -1)
        except ImageError:
            raise
        except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
            raise ImageError(f"{self._what}: unreadable content: {e}") from None

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)
