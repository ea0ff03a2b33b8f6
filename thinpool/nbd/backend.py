"""What the NBD server serves: the :class:`Export`/:class:`ExportProvider` interface.

The server knows nothing about thin pools.  It talks to an :class:`ExportProvider`
(list and open exports by name; one ``lock`` serialises every call into the backing
store) and to the :class:`Export` objects it hands out (byte-addressed pread/pwrite,
flush, trim, write-zeroes and an allocation query for ``base:allocation``).

:class:`MemoryProvider`/:class:`MemoryExport` implement the interface over a
``bytearray`` with block-granular allocation, like a thin volume: a write maps
(allocates) every block it touches, a trim unmaps the blocks it covers entirely,
unmapped blocks read as zeroes and report ``HOLE|ZERO``.  A provider-wide data
block limit makes writes fail with :class:`~thinpool.errors.NoSpace` the way an
exhausted pool does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from thinpool.errors import InvalidArgument, NoSpace, NotFound, ReadOnly
from thinpool.nbd.wire import STATE_HOLE, STATE_ZERO

#: flags of an unmapped extent in ``base:allocation``
UNMAPPED = STATE_HOLE | STATE_ZERO
#: flags of a mapped (allocated) extent
MAPPED = 0
#: what a WRITE's data arrives as: ``bytes``, or for a long payload (over 128 KiB) a memoryview of the
#: buffer the session received it into (never copied once more)
Payload = bytes | memoryview


@runtime_checkable
class Export(Protocol):
    """One exported volume, as the NBD server sees it.

    Offsets and lengths are bytes.  The server checks bounds and read-only
    before calling, but implementations must still refuse bad requests with
    :class:`~thinpool.errors.InvalidArgument` / :class:`~thinpool.errors.ReadOnly`.
    An optional ``close()`` method, if present, is called (under the provider's
    lock) when the connection that opened the export ends, or right after an
    ``NBD_OPT_INFO``/metadata-context query that only needed to look at it.
    An optional ``description`` string is sent as ``NBD_INFO_DESCRIPTION``.
    An optional ``can_trim`` (default true) false means the export does not support
    discards: ``NBD_FLAG_SEND_TRIM`` is not advertised and a TRIM is refused with EINVAL.
    An optional ``cancel_check`` attribute is set by the server to a callable that says
    whether the connection is gone (or the server stopping): an export whose write
    waits (a thin pool queueing for data space) gives the write up when it turns true.
    """

    name: str
    size: int
    read_only: bool
    block_size: int  # allocation granularity; advertised as the preferred block size

    def pread(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset``; unmapped ranges read as zeroes."""
        ...

    def pwrite(self, offset: int, data: Payload) -> None:
        """Write ``data`` at ``offset``, allocating blocks as needed (may raise NoSpace)."""
        ...

    def flush(self) -> None:
        """Make every completed write durable (for a pool: ``pool.commit()``)."""
        ...

    def trim(self, offset: int, length: int) -> None:
        """Discard the range: blocks it covers entirely are unmapped; partial blocks are kept."""
        ...

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        """Make the range read as zeroes.

        With ``may_trim`` whole blocks are unmapped and only the partial edges are
        zeroed; without it real zeroes are written so the range stays provisioned.
        """
        ...

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Consecutive ``(length, flags)`` runs covering the range; unmapped runs are ``HOLE|ZERO``."""
        ...


@runtime_checkable
class ExportProvider(Protocol):
    """A set of named exports (a pool's thin volumes) and the lock that guards them.

    An optional ``close()`` method is called once by :meth:`NBDServer.shutdown`
    after every client has gone.
    """

    lock: threading.RLock

    def list_exports(self) -> list[str]:
        """Names offered by ``NBD_OPT_LIST``."""
        ...

    def open_export(self, name: str, read_only: bool) -> Export:
        """Open export ``name`` (read-only if asked); raise :class:`~thinpool.errors.NotFound`."""
        ...


# =========================================================================== helpers
@dataclass(frozen=True)
class BlockSplit:
    """A byte range cut at block boundaries: unaligned head, whole blocks, unaligned tail."""

    head_offset: int
    head_length: int
    first_block: int
    block_count: int
    tail_offset: int
    tail_length: int


def split_by_blocks(offset: int, length: int, block_size: int) -> BlockSplit:
    """Cut ``[offset, offset+length)`` into a partial head, whole blocks and a partial tail.

    A range inside one block that covers it only partly is all head.  Used by
    write-zeroes without ``NO_HOLE``: trim the whole blocks, zero the edges.
    """
    if offset < 0 or length < 0 or block_size <= 0:
        raise InvalidArgument(f"bad range offset={offset} length={length} block_size={block_size}")
    end = offset + length
    first_full = -(-offset // block_size)  # ceil
    last_full = end // block_size  # exclusive
    if first_full >= last_full:
        return BlockSplit(offset, length, first_full, 0, end, 0)
    head_len = first_full * block_size - offset
    tail_off = last_full * block_size
    return BlockSplit(offset, head_len, first_full, last_full - first_full, tail_off, end - tail_off)


def check_range(export: Export, offset: int, length: int) -> None:
    """Raise :class:`InvalidArgument` unless ``[offset, offset+length)`` lies inside the export."""
    if offset < 0 or length < 0 or offset + length > export.size:
        raise InvalidArgument(
            f"export {export.name!r}: range offset={offset} length={length} is outside its {export.size} bytes"
        )


class _Space:
    """Provider-wide data block accounting (the pool's free data blocks)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, blocks: int, who: str) -> None:
        if self.limit is not None and self.used + blocks > self.limit:
            raise NoSpace(
                f"memory pool: {who} needs {blocks} more data blocks, "
                f"{self.limit - self.used} of {self.limit} free"
            )
        self.used += blocks

    def give(self, blocks: int) -> None:
        self.used -= blocks


class _Store:
    """The data and the block map of one memory volume, shared by every handle opened on it."""

    def __init__(self, size: int, block_size: int, space: _Space) -> None:
        self.data = bytearray(size)
        self.mapped = bytearray(-(-size // block_size))  # 1 = mapped
        self.space = space
        self.flushes = 0


# =========================================================================== memory backend
class MemoryExport:
    """A ``bytearray``-backed export with block-granular allocation tracking.

    Handles returned by :meth:`MemoryProvider.open_export` share the volume's
    data; only ``read_only`` differs between them.  Not thread-safe on its own:
    callers hold the provider's ``lock`` (the NBD server does).
    """

    def __init__(
        self,
        name: str,
        size: int,
        block_size: int = 64 * 1024,
        *,
        read_only: bool = False,
        description: str = "",
        _store: _Store | None = None,
    ) -> None:
        if size < 0:
            raise InvalidArgument(f"export {name!r}: negative size {size}")
        if block_size <= 0 or block_size % 512:
            raise InvalidArgument(f"export {name!r}: block size {block_size} is not a positive multiple of 512")
        self.name = name
        self.size = size
        self.block_size = block_size
        self.read_only = read_only
        self.description = description
        self._store = _store if _store is not None else _Store(size, block_size, _Space(None))

    # ------------------------------------------------------------------ Export API
    def pread(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset`` (unmapped blocks are kept zeroed)."""
        check_range(self, offset, length)
        return bytes(self._store.data[offset : offset + length])

    def pwrite(self, offset: int, data: Payload) -> None:
        """Write ``data``, mapping every block it touches; NoSpace leaves the volume unchanged."""
        self._check_writable()
        check_range(self, offset, len(data))
        if not data:
            return
        bs = self.block_size
        first, last = offset // bs, (offset + len(data) - 1) // bs
        new = (last - first + 1) - sum(self._store.mapped[first : last + 1])
        if new:
            self._store.space.take(new, f"write to {self.name!r}")
            self._store.mapped[first : last + 1] = b"\x01" * (last - first + 1)
        self._store.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        """Count the flush (memory is as durable as it gets)."""
        self._store.flushes += 1

    def trim(self, offset: int, length: int) -> None:
        """Unmap the blocks the range covers entirely; partial blocks keep their data."""
        self._check_writable()
        check_range(self, offset, length)
        split = split_by_blocks(offset, length, self.block_size)
        self._unmap(split.first_block, split.block_count)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        """Zero the range: unmap whole blocks when ``may_trim``, else write real zeroes."""
        self._check_writable()
        check_range(self, offset, length)
        if not length:
            return
        if not may_trim:
            self._zero_fill(offset, length, allocate=True)
            return
        split = split_by_blocks(offset, length, self.block_size)
        self._unmap(split.first_block, split.block_count)
        self._zero_fill(split.head_offset, split.head_length, allocate=False)
        self._zero_fill(split.tail_offset, split.tail_length, allocate=False)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) runs covering the range: mapped runs 0, unmapped ``HOLE|ZERO``."""
        check_range(self, offset, length)
        out: list[tuple[int, int]] = []
        bs, mapped, end = self.block_size, self._store.mapped, offset + length
        pos = offset
        while pos < end:
            block = pos // bs
            state = mapped[block]
            nxt = mapped.find(b"\x00" if state else b"\x01", block)
            run_end = min(end, nxt * bs if nxt >= 0 else end)
            out.append((run_end - pos, MAPPED if state else UNMAPPED))
            pos = run_end
        return out

    # ------------------------------------------------------------------ test/inspection helpers
    def view(self, read_only: bool) -> MemoryExport:
        """Another handle on the same data (what ``open_export`` returns)."""
        return MemoryExport(
            self.name,
            self.size,
            self.block_size,
            read_only=read_only,
            description=self.description,
            _store=self._store,
        )

    @property
    def allocated_blocks(self) -> int:
        """How many blocks of this volume are mapped."""
        return sum(self._store.mapped)

    @property
    def flush_count(self) -> int:
        """How many times any handle of this volume was flushed."""
        return self._store.flushes

    def allocation_map(self) -> list[tuple[int, int, int]]:
        """The whole volume as merged ``(offset, length, flags)`` runs."""
        out: list[tuple[int, int, int]] = []
        pos = 0
        for length, flags in self.extents(0, self.size):
            out.append((pos, length, flags))
            pos += length
        return out

    def snapshot_bytes(self) -> bytes:
        """A copy of the whole volume's contents."""
        return bytes(self._store.data)

    # ------------------------------------------------------------------ internals
    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"export {self.name!r} is read-only")

    def _unmap(self, first: int, count: int) -> None:
        if count <= 0:
            return
        bs, store = self.block_size, self._store
        freed = sum(store.mapped[first : first + count])
        store.mapped[first : first + count] = bytes(count)
        start, stop = first * bs, min((first + count) * bs, self.size)
        self._zero_bytes(start, stop - start)
        store.space.give(freed)

    def _zero_fill(self, offset: int, length: int, allocate: bool) -> None:
        """Zero bytes; with ``allocate`` map every touched block, else only zero mapped ones."""
        if length <= 0:
            return
        if allocate:
            step = 4 * 1024 * 1024
            pos = offset
            while pos < offset + length:
                n = min(step, offset + length - pos)
                self.pwrite(pos, bytes(n))
                pos += n
            return
        bs = self.block_size
        for block in range(offset // bs, (offset + length - 1) // bs + 1):
            if self._store.mapped[block]:
                lo, hi = max(offset, block * bs), min(offset + length, (block + 1) * bs)
                self._zero_bytes(lo, hi - lo)

    def _zero_bytes(self, offset: int, length: int) -> None:
        data, step, pos = self._store.data, 4 * 1024 * 1024, offset
        while pos < offset + length:
            n = min(step, offset + length - pos)
            data[pos : pos + n] = bytes(n)
            pos += n


class MemoryProvider:
    """A set of :class:`MemoryExport` volumes sharing an optional data block limit.

    ``data_blocks`` caps the total mapped blocks across all volumes (None: no
    limit); ``default_export`` is served for the empty export name.
    """

    def __init__(self, block_size: int = 64 * 1024, data_blocks: int | None = None) -> None:
        self.lock = threading.RLock()
        self.block_size = block_size
        self.default_export: str | None = None
        self.closed = False
        self._space = _Space(data_blocks)
        self._volumes: dict[str, MemoryExport] = {}

    def create(self, name: str, size: int, *, read_only: bool = False, description: str = "") -> MemoryExport:
        """Add a zero-filled, fully unmapped volume and return its (writable unless asked) handle."""
        with self.lock:
            if name in self._volumes:
                raise InvalidArgument(f"memory provider: export {name!r} already exists")
            store = _Store(size, self.block_size, self._space)
            vol = MemoryExport(
                name, size, self.block_size, read_only=read_only, description=description, _store=store
            )
            self._volumes[name] = vol
            return vol

    def volume(self, name: str) -> MemoryExport:
        """The handle :meth:`create` returned for ``name``."""
        with self.lock:
            try:
                return self._volumes[name]
            except KeyError:
                raise NotFound(f"memory provider: no export named {name!r}") from None

    def list_exports(self) -> list[str]:
        """Names of every volume, in creation order."""
        with self.lock:
            return list(self._volumes)

    def open_export(self, name: str, read_only: bool) -> MemoryExport:
        """A new handle on ``name`` (or on ``default_export`` for ``""``); NotFound if absent."""
        with self.lock:
            if name == "" and self.default_export is not None:
                name = self.default_export
            vol = self.volume(name)
            return vol.view(read_only or vol.read_only)

    @property
    def used_blocks(self) -> int:
        """Mapped data blocks across every volume."""
        return self._space.used

    def close(self) -> None:
        """Called by the server's shutdown once every client is gone."""
        self.closed = True
