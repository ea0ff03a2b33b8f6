"""A byte range of a volume to and from a file: every byte, zeros included.

* :func:`write_volume` -- the bytes of a file (or stdin) into a byte range of a volume, all or nothing:
  the input's length is known (a pipe spooled) before anything is written;
* :func:`read_volume` -- a byte range of a volume into a file (or stdout), in chunks of about
  :data:`CHUNK` bytes;
* :func:`byte_range` -- the bounds check every byte-range operation shares.

Sparse whole-image import and export (holes skipped, zero blocks unmapped) are :mod:`thinpool.images`.
Outputs are written through :func:`thinpool.safe_output.atomic_output` (never a file of an open pool; a
regular file is replaced atomically).  The caller commits the pool.  numpy is imported only when data
moves.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from thinpool.errors import InvalidArgument
from thinpool.safe_output import atomic_output, check_path

if TYPE_CHECKING:
    from thinpool.pool import Pool
    from thinpool.thin import Thin


def byte_range(thin: Thin, offset: int, length: int | None, what: str) -> tuple[int, int]:
    """(offset, length) of ``thin`` for an operation ``what`` (``"read"``, ``"discard"``): ``length``
    None means up to the end; InvalidArgument naming the volume if the range is not inside it."""
    if offset < 0 or offset > thin.size:
        raise InvalidArgument(f"volume {thin.name!r}: {what} offset {offset} is outside the volume "
                              f"({thin.size} bytes)")
    if length is None:
        length = thin.size - offset
    if length < 0 or offset + length > thin.size:
        raise InvalidArgument(f"volume {thin.name!r}: {what} of {length} bytes at offset {offset} goes past "
                              f"the end of the volume ({thin.size} bytes)")
    return offset, length


#: bytes moved per step (rounded to whole blocks)
CHUNK = 8 << 20


def chunk_bytes(block_size: int) -> int:
    """Bytes moved per step for a pool of ``block_size``: :data:`CHUNK` rounded down to whole blocks (at
    least one block)."""
    return max(block_size, CHUNK // block_size * block_size)


def _open_input(path: str) -> tuple[Any, bool]:
    """(binary file object, close_it) for ``path`` or ``-`` (stdin)."""
    import sys
    if path == "-":
        return sys.stdin.buffer, False
    return open(path, "rb"), True


def write_all(f: Any, data: memoryview) -> None:
    """Write all of ``data`` (a buffered write to a pipe whose reader went away can return short)."""
    data = data.cast("B")
    while len(data):
        n = f.write(data)
        if n is None or n <= 0:
            raise BrokenPipeError(32, "short write")
        data = data[n:]


def _checked_input(f: Any, name: str, room: int, length: int | None) -> Any:
    """Make sure the input fits in ``room`` bytes before anything is written: a regular file is
    measured; a pipe is spooled (in memory up to 64 MiB, then a temporary file) up to room + 1 bytes."""
    import stat
    import tempfile
    want = room + 1 if length is None else length
    try:
        st = os.fstat(f.fileno())
        regular = stat.S_ISREG(st.st_mode)
    except (OSError, ValueError, AttributeError):
        regular = False
    if regular:
        avail = st.st_size - f.tell()
        if min(avail, want) > room:
            raise InvalidArgument(f"volume {name!r}: the input ({avail} bytes) goes past the end of the volume: "
                                  f"only {room} bytes from the offset to the end")
        return f
    spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)
    copied = 0
    while copied < want:
        data = f.read(min(8 << 20, want - copied))
        if not data:
            break
        spool.write(data)
        copied += len(data)
    if copied > room:
        spool.close()
        raise InvalidArgument(f"volume {name!r}: the input goes past the end of the volume (only {room} bytes "
                              f"from the offset to the end)")
    spool.seek(0)
    return spool


def write_volume(pool: Pool, name: str, source: str | os.PathLike[str] = "-", offset: int = 0,
                 length: int | None = None) -> dict[str, Any]:
    """Write the bytes of file ``source`` (``-``: stdin) into volume ``name`` at ``offset`` (at most
    ``length`` bytes).  Every byte is written, zeros included (:func:`import_image` for sparse images).
    All or nothing: InvalidArgument before anything is written if the input goes past the volume's end
    (a pipe is spooled first to learn its size).  Returns ``{"name", "offset", "bytes_written"}``."""
    path = check_path(source, "input")
    thin = pool.thin(name)
    if offset < 0 or offset > thin.size:
        raise InvalidArgument(f"volume {name!r}: write offset {offset} is outside the volume ({thin.size} bytes)")
    if length is not None and length > thin.size - offset:
        raise InvalidArgument(f"volume {name!r}: {length} bytes at offset {offset} go past the end of the volume "
                              f"({thin.size} bytes)")
    stream, close = _open_input(path)
    total = 0
    f = stream
    try:
        f = _checked_input(stream, name, thin.size - offset, length)  # all or nothing: size known first
        chunk = chunk_bytes(pool.block_size)
        while length is None or total < length:
            want = chunk if length is None else min(chunk, length - total)
            data = f.read(want)
            if not data:
                break
            thin.write(offset + total, data)
            total += len(data)
    finally:
        if f is not stream:
            f.close()
        if close:
            stream.close()
    return {"name": name, "offset": offset, "bytes_written": total}



def read_volume(pool: Pool, name: str, output: str | os.PathLike[str] = "-", offset: int = 0,
                length: int | None = None) -> dict[str, Any]:
    """Copy ``length`` bytes (default: to the end) of volume ``name`` from ``offset`` to file ``output``
    (``-``: stdout), every byte.  Returns ``{"name", "offset", "bytes_read"}``."""
    import numpy as np
    output = check_path(output, "output")
    thin = pool.thin(name)
    offset, length = byte_range(thin, offset, length, "read")
    with atomic_output(output, pools=[pool]) as out:
        f = out.file
        chunk = chunk_bytes(pool.block_size)
        buf = np.empty(min(chunk, length), np.uint8)
        done = 0
        while done < length:
            n = min(chunk, length - done)
            view = buf[:n]
            thin.read_into(offset + done, view)
            write_all(f, view.data)
            done += n
        f.flush()
    return {"name": name, "offset": offset, "bytes_read": length}


__all__ = ["CHUNK", "byte_range", "chunk_bytes", "write_all", "write_volume", "read_volume"]
