"""A thin volume's reads and mapping queries: the read half of :class:`~thinpool.thin.Thin`.

:class:`ThinReads` is a base class of :class:`~thinpool.thin.Thin` (the methods are the volume's;
they live here to keep each module to one concern): the per-call read with its fast path through the
data file's memory map, reads with pread(2) (one call per run of adjacent data blocks), batch reads
into a caller's buffer, and the volume's mappings.  Like the writes, each validates its arguments
before the one kernel call that does the work, and reaches the pool only through its
:class:`~thinpool.kernel_context.KernelContext`.  The lazy loaders of the JIT kernels live here too
(handles and metadata operations never import numba).
"""

from __future__ import annotations

import errno
from types import ModuleType
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import faultguard as _fg
from . import schema as L
from .blockmap import extents_of_flags
from .errors import HostIOError, InvalidArgument
from .hostio import last_errno
from .io_checks import ORIGIN_ERROR, as_offsets, check_span, io_integer, out_buffer
from .poollock import plain_acquire, plain_release
from .schema import DEV_ROOT, DEV_SIZE, unpack_mapping

if TYPE_CHECKING:
    from .kernel_context import KernelContext
    from .pool import Pool

_NO_ORIGIN = (-1, 0)  # (fd, size) of "no external origin" for the kernels
_FAST_LIMIT = 1 << 62  # offsets below this (and any buffer length) cannot overflow int64 in a kernel
_HOLE = -103  # kernels.HOLE (kept here: importing kernels loads numba)

#: :mod:`thinpool.kernels` once a first I/O has loaded it (the per-call paths test this before calling
#: :func:`kernels_module`)
KERNELS: ModuleType | None = None


def kernels_module() -> ModuleType:
    """The JIT kernels, imported on first I/O (handles and metadata operations don't need numba)."""
    global KERNELS
    if KERNELS is None:
        from . import kernels
        KERNELS = kernels
    return KERNELS


def _walks() -> ModuleType:
    from . import walks
    return walks


class ThinReads:
    """The read and mapping methods of :class:`~thinpool.thin.Thin` (see the module docstring)."""

    __slots__ = ()

    # the handle's state these methods use (set by Thin.__init__)
    pool: Pool
    _ctx: KernelContext
    _key: int
    if TYPE_CHECKING:  # Thin's, declared here for the type checker only (nothing is defined at run time)
        @property
        def name(self) -> str: ...
        @property
        def size(self) -> int: ...
        def _slot(self) -> int: ...
        def _check_range(self, offsets: np.ndarray, lengths: np.ndarray) -> None: ...
        def _origin_failed(self, offset: int) -> None: ...

    # ------------------------------------------------------------------ reads
    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (unmapped blocks read as zeroes).  A media error (EIO)
        or a data file truncated under the pool by another program raises
        :class:`~thinpool.errors.HostIOError` naming the data file (errno EIO for a file that ends too
        early), never wrong bytes: mapped data is read with pread(2), except a read inside one mapped
        block, which is sliced from the data file's memory map.  That map is watched by
        :mod:`thinpool.faultguard`: a page lost to a truncation reads as zeroes and is counted, and the
        read is then thrown away and redone with pread(2), which reports the truncation.  Where no
        guard can be made (not Linux on x86-64 or aarch64, or no llvmlite) an lseek(2) checks the
        file's length before the slice instead, and a truncation in the instant between the two still
        raises SIGBUS (docs/design.md, "Files changed under an open pool"; :meth:`pread` never uses the
        map)."""
        ctx = self._ctx
        if type(offset) is int and type(length) is int and 0 <= offset < _FAST_LIMIT and 0 <= length < _FAST_LIMIT:
            # fast paths (open pool): the kernel checks the range, finds the block and checks that the
            # data file still holds it; one mapped block is sliced from the data file's memory map,
            # one unmapped block reads as zeroes (without an external origin), anything else -- a
            # file too short, a kernel table out of date included -- is one read_one_pread call or the
            # general path
            lock = ctx.lock
            plain_acquire(lock)  # reads only, and only with no compiled reader registered (poollock)
            try:
                slot = ctx.slots.get(self._key)
                if slot is not None and ctx.readable and not lock.readers:
                    data = ctx.data
                    if data.fd >= 0 and not ctx.origins.by_key:
                        pos = (ctx.locate_read_fn or ctx.bind_locate_read())(ctx.tab, ctx.tab_epoch, ctx.devs_i,
                                                                              slot, offset, length, data.lseek_fd)
                        if pos >= 0:
                            got = data.mm[pos:pos + length]
                            if _fg.FAULTS[0] == ctx.faults_seen:
                                return got
                            ctx.fault_check()  # a page faulted (zeroes in got): redone with pread below
                        elif pos == _HOLE:
                            if _fg.FAULTS[0] == ctx.faults_seen:
                                return bytes(length)
                            ctx.fault_check()
            finally:
                plain_release(lock)
        return self._pread(offset, length)

    def pread(self, offset: int, length: int) -> bytes:
        """Read like :meth:`read`, but copy every byte of mapped data from the data file with pread(2),
        never through its memory map: a media error (EIO) or a data file truncated under the pool
        raises :class:`~thinpool.errors.HostIOError` naming the data file, whenever it happens.  One
        system call per run of mapped blocks that follow each other in the data file; the NBD server
        reads this way."""
        return self._pread(offset, length)

    def _pread(self, offset: int, length: int) -> bytes:
        ctx = self._ctx
        with ctx.lock:
            slot = ctx.slots.get(self._key)
            if (type(offset) is int and type(length) is int and slot is not None and ctx.readable
                    and 0 <= offset and 0 <= length and offset + length <= int(ctx.devs_i[slot, DEV_SIZE])):
                pass  # fast path (open pool, in range): no checks beyond these
            else:
                offset = io_integer(self.name, "offset", offset)
                length = io_integer(self.name, "length", length)
                ctx.check_readable()
                check_span(self.name, self.size, offset, length)  # before allocating the output
                slot = self._slot()
            out = np.empty(length, np.uint8)
            ofd, osize = ctx.origin(self._key) if ctx.origins.by_key else _NO_ORIGIN
            code, pos = (KERNELS or kernels_module()).read_one_pread(ctx.table(), ctx.devs_i, slot, ctx.data.fd, out, offset,
                                                          ofd, osize)
            if _fg.FAULTS[0] != ctx.faults_seen:
                ctx.fault_check()  # the pool's mapped metadata rows faulted: raises
            if code != L.OK:
                self._read_failed(code, int(pos), offset)
        return out.tobytes()

    def _read_failed(self, code: int, pos: int, offset: int) -> None:
        """Raise for a read kernel's failure ``code`` at file offset ``pos`` (a read of this volume at
        ``offset``): the external origin's error, or HostIOError naming the data file."""
        if code == ORIGIN_ERROR:
            self._origin_failed(pos)
        ctx = self._ctx
        path = ctx.data.path
        err, why = ctx.data.failure(last_errno() if code == L.IO_ERROR else errno.EIO)
        raise HostIOError(f"pool {ctx.path}: reading volume {self.name!r} at offset {offset}: the data "
                          f"file {path} could not be read at byte {pos} ({why})", err, path)

    def read_into(self, offset: int, out: np.ndarray) -> None:
        """Read ``len(out)`` bytes at ``offset`` into a uint8 array."""
        offs = as_offsets(offset, "offset")
        self._read(offs, np.array([len(out)], np.int64), out.reshape(-1).view(np.uint8), np.zeros(1, np.int64))

    def read_many(self, offsets: Sequence[int] | np.ndarray, length: int, *,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Read ``length`` bytes at each offset in one kernel call; returns a (n, length) uint8 array.

        ``out``: a caller's buffer to read into instead of a new array (as a C program reuses one
        buffer): a writable, C-contiguous uint8 numpy array of exactly n x ``length`` bytes (shape
        (n, length) or flat); returned as it was given.  Anything else raises InvalidArgument before
        anything is read."""
        offs = as_offsets(offsets, "offsets")
        length = io_integer(self.name, "length", length)
        self._ctx.check_open()
        if length < 0 or length > self.size:
            raise InvalidArgument(f"volume {self.name!r}: length {length} is negative or larger than the volume "
                                  f"({self.size} bytes)")
        n = len(offs)
        lengths = np.full(n, length, np.int64)
        self._check_range(offs, lengths)  # before allocating (or touching) the output
        if out is None:
            out = np.empty((n, length), np.uint8)
            flat = out.reshape(-1)
        else:
            flat = out_buffer(self.name, out, n, length)
        starts = np.arange(n, dtype=np.int64) * length
        self._read(offs, lengths, flat, starts)
        return out

    def _read(self, offsets: np.ndarray, lengths: np.ndarray, out: np.ndarray, starts: np.ndarray) -> None:
        ctx = self._ctx
        with ctx.lock:
            ctx.check_readable()
            self._check_range(offsets, lengths)
            root = int(ctx.devs_i[self._slot(), DEV_ROOT])
            ofd, osize = ctx.origin(self._key)
            code, i, pos = kernels_module().read_batch(ctx.nodes_map.nodes, root, ctx.data.fd, ctx.block_size, offsets, lengths,
                                           out, starts, ofd, osize)
            if _fg.FAULTS[0] != ctx.faults_seen:
                ctx.fault_check()
            if code != L.OK:
                self._read_failed(int(code), int(pos), int(offsets[i]))

    # ------------------------------------------------------------------ mappings
    def mapped_ranges(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Cover ``[offset, offset+length)`` with (offset, length, mapped) extents at block granularity
        (clipped to the range): what NBD BLOCK_STATUS and sparse export need."""
        offs = as_offsets(offset, "offset")
        lens = as_offsets(length, "length")
        ctx = self._ctx
        with ctx.lock:
            self._check_range(offs, lens)
            off, end = int(offs[0]), int(offs[0] + lens[0])
            if end <= off:
                return []
            bs = ctx.block_size
            first, last = off // bs, (end - 1) // bs
            flags = np.empty(last - first + 1, np.uint8)
            _walks().mapped_flags(ctx.nodes_map.nodes, int(ctx.devs_i[self._slot(), DEV_ROOT]), first, flags)
            ctx.fault_check()
        return extents_of_flags(flags, first * bs, bs, off, end)

    def mappings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(virtual blocks, data blocks, times) of every mapping, sorted by virtual block."""
        ctx = self._ctx
        with ctx.lock:
            root = int(ctx.devs_i[self._slot(), DEV_ROOT])
            n, _ = _walks().count_mappings(ctx.nodes_map.nodes, root)
            vb = np.empty(n, np.int64)
            vals = np.empty(n, np.uint64)
            _walks().collect_mappings(ctx.nodes_map.nodes, root, vb, vals)
            ctx.fault_check()
        blocks, times = unpack_mapping(vals)
        return vb, blocks.astype(np.int64), times.astype(np.int64)

