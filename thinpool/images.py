"""Raw disk images into and out of volumes, sparse-aware.

:func:`import_image` / :func:`export_image` -- a raw disk image into / out of a volume: holes of the
input are skipped (SEEK_DATA/SEEK_HOLE), zero blocks are never written, and a regular output file is
written sparse.  Byte ranges of a volume, every byte, are :mod:`thinpool.volume_bytes`.

Paths are strings (or path-likes); ``"-"`` means standard input / output.  Outputs are written through
:func:`thinpool.safe_output.atomic_output` (never a file of an open pool; a regular file is replaced
atomically).  The caller commits the pool (these functions change it but do not commit), except after
:func:`import_image`, which is a transaction of its own: committed when the image was imported and
verified, dropped whole by any failure.  numpy is imported only when data moves.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

from thinpool.errors import InvalidArgument
from thinpool.safe_output import atomic_output, check_path
from thinpool.volume_bytes import CHUNK, chunk_bytes, write_all

if TYPE_CHECKING:
    from thinpool.pool import Pool

#: ``progress(description, total_bytes)``: a context manager yielding ``advance(nbytes)`` (the CLI's
#: progress bar); the default shows nothing
Progress = Callable[[str, int], ContextManager[Callable[[int], None]]]


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """The default :data:`Progress`: reports nothing."""
    yield lambda n: None


def _data_extents(fd: int, size: int, bs: int) -> list[tuple[int, int]]:
    """Block-aligned (start, end) byte ranges of a file that may hold data (SEEK_DATA/SEEK_HOLE);
    the whole file if the filesystem cannot tell."""
    seek_data = getattr(os, "SEEK_DATA", 3)
    seek_hole = getattr(os, "SEEK_HOLE", 4)
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, seek_data)
            except OSError as exc:
                if exc.errno == 6:  # ENXIO: no data after pos
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, seek_hole), size)
            start = start // bs * bs
            end = min(size, -(-end // bs) * bs)
            if out and start <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], end))
            else:
                out.append((start, end))
            pos = end
    except OSError:
        return [(0, size)] if size else []
    return out


class _Importer:
    """Writes block-sized chunks of an image into a volume: non-zero blocks are written, zero blocks
    that the volume maps are unmapped (or zeroed, for a partial block), other zero blocks skipped."""

    def __init__(self, thin: Any, block_size: int) -> None:
        self.thin = thin
        self.bs = block_size
        self.mapped_set = thin.mappings()[0]  # virtual blocks mapped before the import
        self.blocks_written = 0
        self.blocks_unmapped = 0

    def _is_mapped(self, vblocks: Any) -> Any:
        import numpy as np
        if len(self.mapped_set) == 0:
            return np.zeros(len(vblocks), bool)
        return np.isin(vblocks, self.mapped_set)

    def feed(self, offset: int, data: Any) -> None:
        """Import ``data`` (a uint8 array) at byte ``offset`` (a multiple of the block size)."""
        import numpy as np
        bs = self.bs
        nfull = len(data) // bs
        if nfull:
            rows = data[: nfull * bs].reshape(nfull, bs)
            nonzero = rows.any(axis=1)
            vblocks = offset // bs + np.arange(nfull, dtype=np.int64)
            idx = np.flatnonzero(nonzero)
            if len(idx):
                self.thin.write_many(vblocks[idx] * bs, rows[idx])
                self.blocks_written += len(idx)
            zero_mapped = np.flatnonzero(~nonzero & self._is_mapped(vblocks))
            for i in zero_mapped:
                self.blocks_unmapped += self.thin.discard(int(vblocks[i]) * bs, bs)
        tail = data[nfull * bs:]
        if len(tail):
            off = offset + nfull * bs
            if tail.any() or self._is_mapped(np.array([off // bs]))[0]:
                self.thin.write(off, tail)
                self.blocks_written += 1


def _import_checks(expect_size: Any, sha256: Any, allow_empty: Any) -> tuple[int | None, str | None]:
    """Type-check and bound :func:`import_image`'s verification arguments: (expect_size, sha256 in
    lower case); InvalidArgument naming the bad one."""
    if expect_size is not None and (type(expect_size) is not int or not 0 <= expect_size < 1 << 63):
        raise InvalidArgument(f"expected image size must be a whole number of bytes, 0 .. 2**63-1 "
                              f"(got {str(expect_size)[:40]!r})")
    if sha256 is not None:
        if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha256):
            raise InvalidArgument(f"sha256 must be 64 hexadecimal digits (got {str(sha256)[:80]!r})")
        sha256 = sha256.lower()
    if type(allow_empty) is not bool:
        raise InvalidArgument(f"allow_empty must be True or False (got {str(allow_empty)[:40]!r})")
    if expect_size == 0 and not allow_empty:
        raise InvalidArgument("an expected size of 0 bytes imports an empty image: say so with --allow-empty")
    return expect_size, sha256


def _not_a_pool_file(pool: Any, st: os.stat_result, where: str) -> None:
    """InvalidArgument if the image (``st``: its fstat) is one of ``pool``'s own files -- its data file
    (wherever it lives) or a file of its directory: the import writes that pool, so the image would
    change while it is read (as an external origin never may: :mod:`thinpool.origin`)."""
    from .safe_output import pool_files
    for f in pool_files(pool)[1]:
        try:
            pst = os.stat(f)
        except OSError:
            continue
        if (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino):
            raise InvalidArgument(f"image {where} is {f}, a file of pool {pool.path} itself: the import writes "
                                  f"that pool, so the image would change while it is read")


def _check_length(got: int, expect_size: int | None, allow_empty: bool, where: str, ended: bool = True) -> None:
    """The whole input is ``got`` bytes (``ended``: else at least): InvalidArgument if it is empty and
    that was not allowed, or if it is not ``expect_size``."""
    if expect_size is not None and not ended and got > expect_size:
        raise InvalidArgument(f"image {where} is longer than the {expect_size} bytes expected (--expect-size)")
    if expect_size is not None and ended and got != expect_size:
        raise InvalidArgument(f"image {where} is {got} bytes, not the {expect_size} expected (--expect-size)" +
                              (": the stream ended early; did its producer fail or get cut short?"
                               if got < expect_size else ""))
    if ended and got == 0 and not allow_empty:
        raise InvalidArgument(f"image {where} is empty (0 bytes): when it comes from a pipe, its producer "
                              f"probably failed; pass --allow-empty to import an empty image")


def import_image(pool: Pool, name: str, source: str | os.PathLike[str], size: int | None = None, *,
                 expect_size: int | None = None, sha256: str | None = None, allow_empty: bool = False,
                 progress: Progress = no_progress) -> dict[str, Any]:
    """Import the raw image file ``source`` (``-``: stdin) into volume ``name``, sparse-aware: only
    non-zero blocks are written; holes are skipped with SEEK_DATA/SEEK_HOLE.  Creates the volume (size:
    the image's, rounded up to 512 bytes, or ``size``; from a pipe, ``expect_size`` rounded up, else the
    stream is first copied to a temporary file to learn its size) if it does not exist; in an existing
    volume, blocks that are zero in the image are unmapped, so afterwards the volume reads exactly as the
    image.

    Verification: an empty image is refused unless ``allow_empty`` (a pipe whose producer failed
    ends at once); ``expect_size`` -- the image's exact length in bytes -- refuses a stream that ends
    early (a producer that died midway) or goes on longer; ``sha256`` (64 hex digits) is compared with
    the digest of every byte of the image, holes included.

    All or nothing: the import is one transaction (:meth:`~thinpool.pool.Pool.batch`; uncommitted
    changes made before it are committed first, as a batch does).  It commits when everything was read,
    written and verified; on any failure -- a bad argument, an image larger than the volume, a read
    error, a short stream or a digest mismatch found at its end, no space, KeyboardInterrupt -- it aborts
    and raises: a volume it created is gone, and an existing volume keeps its committed mappings *and*
    bytes, because for the import's duration it is held as a snapshot, so that every block the import
    writes goes to a new data block (copy-on-write) instead of overwriting one in place.  So an import
    into an existing volume needs free space for every block it writes, even where the volume already
    maps a block; the replaced blocks are freed by its commit.  The helper snapshot is deleted in the
    same transaction, but the volume keeps its snapshot time (dm-thin's time rule), so a block the image
    did not cover is copied once at its next write, as after any deleted snapshot in dm-thin.

    InvalidArgument for any bad input (the checks above, the image larger than the volume, ``size``
    different from an existing volume's, a new volume's size unknown).  Returns ``{"name", "created",
    "size", "bytes", "blocks_written", "blocks_unmapped", "mapped_blocks", "sha256"}`` (``sha256``: the
    image's digest, verified, or None when none was asked)."""
    import stat
    import sys

    image = check_path(source, "image")
    expect_size, digest = _import_checks(expect_size, sha256, allow_empty)
    where = "stdin" if image == "-" else image
    if image == "-":
        fd, close, img_size, regular = -1, False, None, False
        try:  # stdin redirected from a regular file: its size is known
            sfd = sys.stdin.buffer.fileno()
            st = os.fstat(sfd)
            _not_a_pool_file(pool, st, where)
            if stat.S_ISREG(st.st_mode):
                img_size = st.st_size - os.lseek(sfd, 0, os.SEEK_CUR)
        except (OSError, ValueError, AttributeError):
            pass
    else:
        try:
            fd = os.open(image, os.O_RDONLY)
        except OSError as exc:
            raise InvalidArgument(f"cannot read image {image}: {exc.strerror}") from None
        close = True
        st = os.fstat(fd)
        try:
            _not_a_pool_file(pool, st, where)
        except BaseException:
            os.close(fd)
            raise
        regular = stat.S_ISREG(st.st_mode)
        img_size = st.st_size if regular else _seekable_size(fd)  # a pipe (/dev/stdin): unknown
    try:
        if not regular and img_size is None and size is None and expect_size is None and name not in pool:
            # a new volume from a pipe: spool the stream to a temporary file to learn its size
            spool_fd = _spool(sys.stdin.buffer if image == "-" else None, fd, where)
            if close:
                os.close(fd)
            fd, close, regular = spool_fd, True, True
            img_size = os.fstat(fd).st_size
        if img_size is not None:  # known before anything is written
            _check_length(img_size, expect_size, allow_empty, where)
        with pool.batch():  # one transaction: committed at its end, dropped by any exception
            r = _import(pool, name, image, where, fd, regular, img_size, size, expect_size, digest, allow_empty,
                        progress)
    finally:
        if close:
            os.close(fd)
    return r


def _import(pool: Pool, name: str, image: str, where: str, fd: int, regular: bool, img_size: int | None,
            size: int | None, expect_size: int | None, digest: str | None, allow_empty: bool,
            progress: Progress) -> dict[str, Any]:
    """:func:`import_image`'s work inside its transaction."""
    import hashlib
    import sys
    import uuid

    import numpy as np

    bs = pool.block_size
    created = False
    known = img_size if img_size is not None else expect_size  # the image's length, if known now
    held = None  # the snapshot holding an existing volume's blocks while it is imported into
    if name in pool:
        thin = pool.thin(name)
        if size is not None and size != thin.size:
            raise InvalidArgument(f"volume {name!r} exists with size {thin.size}; --size {size} does not match")
        if thin.external_origin is not None:
            raise InvalidArgument(f"volume {name!r} sits on the external origin "
                                  f"{thin.external_origin['path']}: importing an image would leave the "
                                  f"origin's bytes where the image has holes; import into a new volume")
        vsize = thin.size
    else:
        thin = None
        vsize = size if size is not None else (-(-known // 512) * 512 if known else 0)
        if not vsize:
            raise InvalidArgument(f"cannot create volume {name!r} from {where}: its size is unknown or zero "
                                  f"(pass --size)")
    if known is not None and known > vsize:
        raise InvalidArgument(f"image {where} is {known} bytes, larger than volume {name!r} ({vsize} bytes)")
    if thin is None:
        thin = pool.create_thin(name, vsize)
        created = True
    else:
        held = f".import-{uuid.uuid4().hex}"
        pool.snapshot(name, held)  # every block of the volume shared: the import's writes go to new blocks
    h = hashlib.sha256() if digest is not None else None
    imp = _Importer(thin, bs)
    chunk = chunk_bytes(bs)
    total = 0
    if regular:
        assert img_size is not None, "a regular file's size is known (its st_size)"
        extents = _data_extents(fd, img_size, bs)
        with progress(f"import {name}", sum(e - s for s, e in extents)) as advance:
            pos = 0
            for start, end in extents:
                if start > pos:
                    _hash_zeroes(h, start - pos)
                    if not created:
                        _unmap_hole(thin, imp, pos, start, bs)
                off = start
                while off < end:
                    n = min(chunk, end - off)
                    data = np.frombuffer(_pread_input(fd, n, off, where), np.uint8)
                    if len(data) != n:
                        raise InvalidArgument(f"image {where} shrank while being imported")
                    if h is not None:
                        h.update(data.data)
                    imp.feed(off, data)
                    off += n
                    advance(n)
                pos = end
            if pos < img_size:
                _hash_zeroes(h, img_size - pos)
                if not created:
                    _unmap_hole(thin, imp, pos, img_size, bs)
        total = img_size
    else:
        f = sys.stdin.buffer if image == "-" else os.fdopen(os.dup(fd), "rb")
        try:
            with progress(f"import {name}", img_size or expect_size or 0) as advance:
                while True:
                    got = _read_full(f, chunk, where)
                    if not got:
                        break
                    _check_length(total + len(got), expect_size, allow_empty, where, ended=False)
                    if total + len(got) > thin.size:
                        raise InvalidArgument(f"input is larger than volume {name!r} ({thin.size} bytes)")
                    if h is not None:
                        h.update(got)
                    imp.feed(total, np.frombuffer(got, np.uint8))
                    total += len(got)
                    advance(len(got))
        finally:
            if f is not sys.stdin.buffer:
                f.close()
        _check_length(total, expect_size, allow_empty, where)
    if h is not None and h.hexdigest() != digest:
        raise InvalidArgument(f"image {where}: its sha256 is {h.hexdigest()}, not the {digest} expected "
                              f"(--sha256); nothing was imported")
    if held is not None:
        pool.delete(held)
    return {"name": name, "created": created, "size": thin.size, "bytes": total,
            "blocks_written": imp.blocks_written, "blocks_unmapped": imp.blocks_unmapped,
            "mapped_blocks": thin.mapped_blocks, "sha256": None if h is None else h.hexdigest()}


def _hash_zeroes(h: Any, n: int) -> None:
    """Feed ``n`` zero bytes (a hole of the image) to hash ``h`` (None: no digest asked)."""
    if h is None:
        return
    zero = bytes(min(n, CHUNK))
    while n > 0:
        k = min(n, len(zero))
        h.update(zero[:k] if k < len(zero) else zero)
        n -= k


def _pread_input(fd: int, n: int, off: int, where: str) -> bytes:
    try:
        return os.pread(fd, n, off)
    except OSError as exc:
        raise InvalidArgument(f"reading image {where} at byte {off} failed: {exc.strerror}") from None


def _seekable_size(fd: int) -> int | None:
    """The size of a seekable non-regular file (a block device), None for a pipe or socket."""
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return None


def _spool(f: Any, fd: int, where: str) -> int:
    """Copy a stream (file object ``f``, else ``fd``) to an unlinked temporary file; its fd, at 0."""
    import tempfile
    tmp = tempfile.TemporaryFile()
    try:
        while True:
            try:
                data = f.read(CHUNK) if f is not None else os.read(fd, CHUNK)
            except OSError as exc:
                raise InvalidArgument(f"reading image {where} failed: {exc.strerror}") from None
            if not data:
                break
            tmp.write(data)
        tmp.flush()
        return os.dup(tmp.fileno())
    finally:
        tmp.close()


def _read_full(f: Any, n: int, where: str) -> bytes:
    parts = []
    got = 0
    while got < n:
        try:
            b = f.read(n - got)
        except OSError as exc:
            raise InvalidArgument(f"reading image {where} failed after {got} bytes of this chunk: "
                                  f"{exc.strerror}") from None
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _unmap_hole(thin: Any, imp: _Importer, start: int, end: int, bs: int) -> None:
    """A hole of the image in [start, end) (block-aligned start): make the volume read zeros there."""
    import numpy as np
    vb = imp.mapped_set
    if len(vb) == 0:
        return
    first, last = start // bs, -(-end // bs)
    inside = vb[(vb >= first) & (vb < last)]
    for b in inside:
        lo, hi = max(int(b) * bs, start), min((int(b) + 1) * bs, end)
        if hi - lo == bs:
            imp.blocks_unmapped += thin.discard(lo, bs)
        else:
            thin.write(lo, np.zeros(hi - lo, np.uint8))


def export_image(pool: Pool, name: str, output: str | os.PathLike[str] = "-", *,
                 progress: Progress = no_progress) -> dict[str, Any]:
    """Export volume ``name`` as a raw image to ``output`` (``-``: stdout).  A regular output file is
    written sparse: truncated to the volume size, then only mapped non-zero blocks are written (seeking
    over unmapped and zero blocks; on a volume with an external origin, the blocks below the origin's
    end count as mapped: they read the origin's bytes).  Other outputs (stdout, pipes, devices) get every byte.  Returns
    ``{"name", "output", "size", "sparse", "blocks_written"}``."""
    import numpy as np

    output = check_path(output, "output")
    thin = pool.thin(name)
    bs = pool.block_size
    size = thin.size
    written = 0
    with atomic_output(output, pools=[pool]) as out:
        regular = out.regular
        if regular:
            fd = out.fd
            out.truncate(size)
            vb, _, _ = thin.mappings()
            origin = thin.external_origin
            if origin is not None:  # unmapped blocks below the origin's end read the origin's bytes
                vb = np.union1d(vb, np.arange(-(-min(size, origin["size"]) // bs), dtype=np.int64))
            full = vb[(vb + 1) * bs <= size]
            partial = vb[(vb + 1) * bs > size]
            batch = max(1, chunk_bytes(bs) // bs)
            with progress(f"export {name}", len(vb) * bs) as advance:
                for i in range(0, len(full), batch):
                    blocks = full[i:i + batch]
                    rows = thin.read_many(blocks * bs, bs)
                    nz = rows.any(axis=1)
                    for j in np.flatnonzero(nz):
                        out.pwrite_all(rows[j], int(blocks[j]) * bs)
                        written += 1
                    advance(len(blocks) * bs)
                for b in partial:
                    data = thin.read(int(b) * bs, size - int(b) * bs)
                    if any(data):
                        out.pwrite_all(data, int(b) * bs)
                        written += 1
                    advance(bs)
        else:
            f = out.file
            chunk = chunk_bytes(bs)
            buf = np.empty(min(chunk, size), np.uint8)
            with progress(f"export {name}", size) as advance:
                done = 0
                while done < size:
                    n = min(chunk, size - done)
                    view = buf[:n]
                    thin.read_into(done, view)
                    write_all(f, view.data)
                    done += n
                    advance(n)
            f.flush()
            written = thin.mapped_blocks
    return {"name": name, "output": output, "size": size, "sparse": regular, "blocks_written": written}


__all__ = ["Progress", "no_progress", "import_image", "export_image"]
