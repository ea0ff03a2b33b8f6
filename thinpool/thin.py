"""Thin volumes: byte-addressed I/O over the pool's JIT kernels.

Every method validates its arguments first (offsets, lengths, the volume's end) so bad input
changes nothing, then hands the whole batch to one kernel call.  A :class:`Thin` reaches the pool's
state only through the pool's :class:`~thinpool.kernel_context.KernelContext` (and the pool's
public methods); it is bound to its volume's device id and creation generation, not its name.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from . import faultguard as _fg
from . import rules
from . import schema as L
from . import thin_reads as _tr
from .activation import Activation  # re-exported: callers import it from here
from .batch_io import BatchOutcome, apply_io  # re-exported: callers import them from here
from .errors import DataDeviceError, DiscardNotSupported, InvalidArgument, NoSpace, ReadOnly, ReadOnlyIO
from .hostio import last_errno, libc
from .io_checks import ORIGIN_ERROR, as_offsets, check_span, io_integer
from .poollock import plain_acquire, plain_release
from .schema import (DEV_CREATION_TIME, DEV_FLAGS, DEV_MAPPED, DEV_SIZE, DEV_SNAP_TIME, DEV_TRANSACTION,
                     FLAG_READ_ONLY, U64_MASK, Mode)
from .thin_reads import _FAST_LIMIT, _NO_ORIGIN, ThinReads
from .thin_reads import kernels_module as _k

if TYPE_CHECKING:
    from .pool import Pool
    from .status import Usage

libc()  # loaded now: last_errno() after a failed kernel call must not be its first use

_ZERO1 = np.zeros(1, np.int64)
_U8 = np.dtype(np.uint8)


#: the holder a ``with pool.thin(name)`` block counts as (see :meth:`thinpool.pool.Pool.holders`)
WITH_BLOCK = "with block"


class _Waited(Exception):
    """Internal: a single write found no space and must wait; it is redone with arrays of its own (the
    context's scratch may be used by other writers meanwhile)."""


class Thin(ThinReads):
    """A thin volume of a :class:`~thinpool.pool.Pool`: a cheap handle bound to the volume itself
    (its device id and creation generation), so it follows a rename, and raises NotFound naming the
    volume once it is deleted -- even if a later volume reuses its name or device id."""

    __slots__ = ("pool", "_ctx", "_key", "_name")

    def __init__(self, pool: Pool, name: str) -> None:
        """The handle of ``pool``'s volume called ``name`` now (NotFound if none); prefer :meth:`Pool.thin`."""
        ctx = pool._engine
        self.pool = pool
        self._ctx = ctx
        with ctx.lock:
            key = ctx.keys.get(name) if isinstance(name, str) else None
            if key is None:
                pool.thin(name)  # raises NotFound (or InvalidArgument if closed)
            assert key is not None, f"pool.thin({name!r}) found a volume the engine has no key for"
            self._key: int = key
        self._name = name

    # ------------------------------------------------------------------ attributes
    @property
    def name(self) -> str:
        """The volume's current name (its last name if it was deleted)."""
        ctx = self._ctx
        name = ctx.names.get(self._key) or ctx.gone.get(self._key)
        if name is not None:
            self._name = name
        return self._name

    def _slot(self) -> int:
        return self._ctx.slot(self._key, self.name)

    @property
    def _row(self) -> np.ndarray:
        ctx = self._ctx
        return ctx.devs_i[ctx.slot(self._key, self.name)]

    @property
    def dev_id(self) -> int:
        """dm-thin device id (24 bits)."""
        return self._key & 0xFFFFFF

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return int(self._row[DEV_SIZE])

    @property
    def read_only(self) -> bool:
        """Whether the volume refuses writes and discards."""
        return bool(self._row[DEV_FLAGS] & FLAG_READ_ONLY)

    @property
    def mapped_blocks(self) -> int:
        """Blocks this volume maps."""
        return int(self._row[DEV_MAPPED])

    @property
    def creation_time(self) -> int:
        """The pool time the volume was created at."""
        return int(self._row[DEV_CREATION_TIME])

    @property
    def snap_time(self) -> int:
        """dm-thin's ``snapshotted_time``: mappings older than this are shared."""
        return int(self._row[DEV_SNAP_TIME])

    @property
    def transaction(self) -> int:
        """The pool transaction id when the volume was created."""
        return int(self._row[DEV_TRANSACTION]) & U64_MASK

    def __repr__(self) -> str:
        return f"<Thin {self.name!r} dev_id={self.dev_id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Thin) and other._ctx is self._ctx and other._key == self._key

    def __hash__(self) -> int:
        return hash((id(self._ctx), self._key))

    # ------------------------------------------------------------------ the external origin
    @property
    def external_origin(self) -> dict | None:
        """The volume's external origin (dm-thin's ``external-origin`` thin argument): a copy of its
        record ``{"path", "size", "mtime_ns", "dev", "ino"}``, or None.  Unmapped blocks read from it;
        a snapshot inherits it (see :mod:`thinpool.origin`)."""
        ctx = self._ctx
        with ctx.lock:
            self._slot()
            f = ctx.origins.by_key.get(self._key)
            return None if f is None else dict(f.rec)

    def check_external_origin(self) -> None:
        """Check the volume's external origin as its I/O does (open, same file, same size and mtime):
        FailedPrecondition naming the file if it changed; nothing when the volume has none."""
        ctx = self._ctx
        with ctx.lock:
            self._slot()
            ctx.origin(self._key)

    def _origin_failed(self, offset: int) -> None:
        """A kernel could not read the external origin at ``offset``: see :meth:`Origins.read_failed`."""
        ctx = self._ctx
        ctx.origins.read_failed(self._key, f"pool {ctx.path}: volume {self.name!r}", last_errno(), offset)

    # ------------------------------------------------------------------ activation
    def __enter__(self) -> "Thin":
        """``with pool.thin(name) as vol:`` holds the volume active until the block ends: deleting it
        meanwhile raises :class:`~thinpool.errors.Busy` (see :meth:`thinpool.pool.Pool.activate`).
        Blocks nest; each holds once."""
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            self._slot()  # NotFound if the volume is gone
            ctx.origin(self._key)  # activating checks the external origin (FailedPrecondition if it changed)
            ctx.hold(self._key, WITH_BLOCK)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        """Release the hold taken by :meth:`__enter__`."""
        with self._ctx.lock:
            self._ctx.unhold(self._key, WITH_BLOCK)

    def usage(self) -> Usage:
        """This volume's :class:`~thinpool.status.Usage` (mapped, exclusive and shared blocks); NotFound
        if it was deleted."""
        with self._ctx.lock:
            self._slot()
            return self.pool.usage(self.name)

    def status_line(self) -> str:
        """The thin target's status line as dm-thin's ``thin_status`` prints it: ``Fail`` when the
        pool is in fail mode, else ``<nr mapped sectors> <highest mapped sector>``
        (:meth:`Usage.dmsetup_line <thinpool.status.Usage.dmsetup_line>`)."""
        with self._ctx.lock:
            if self.pool.mode == Mode.FAIL:
                return "Fail"
            return self.usage().dmsetup_line()

    # ------------------------------------------------------------------ validation
    def _check_range(self, offsets: np.ndarray, lengths: np.ndarray) -> None:
        size = int(self._row[DEV_SIZE])
        if offsets.size == 1:
            off, length = int(offsets[0]), int(lengths[0])
            if off >= 0 and length >= 0 and off + length <= size:
                return
        if offsets.size == 0:
            return
        if (offsets < 0).any():
            raise InvalidArgument(f"volume {self.name!r}: negative offset {int(offsets[offsets < 0][0])}")
        if (lengths < 0).any():
            raise InvalidArgument(f"volume {self.name!r}: negative length {int(lengths[lengths < 0][0])}")
        ends = offsets + lengths
        bad = (ends > size) | (ends < offsets)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidArgument(f"volume {self.name!r}: I/O at offset {int(offsets[i])} length {int(lengths[i])} "
                                  f"goes past the end of the volume ({size} bytes)")

    def _check_write(self) -> None:
        ctx = self._ctx
        if not ctx.fast_write:
            ctx.check_io_writable()
        if self._row[DEV_FLAGS] & FLAG_READ_ONLY:
            raise ReadOnly(f"volume {self.name!r} is read-only")

    # ------------------------------------------------------------------ writes
    def write(self, offset: int, data: bytes | bytearray | memoryview | np.ndarray, *,
              abort: Callable[[], bool] | None = None) -> int:
        """Write ``data`` at byte ``offset``; returns the bytes written.  Provisions on first write,
        breaks sharing by copy-on-write.  When the pool has no data block for it: raises NoSpace
        (changing nothing) under ``error_if_no_space``; under ``queue_if_no_space`` (the default)
        waits -- without holding the pool's lock -- until a resize or freed blocks make room, then
        writes, or raises NoSpace once the pool's ``no_space_timeout`` has passed
        (:mod:`thinpool.nospace`).  ``abort()``, looked at while waiting, gives the write up
        (:class:`~thinpool.errors.WaitCancelled`, nothing written)."""
        ctx = self._ctx
        if type(data) is bytes and type(offset) is int and 0 <= offset < _FAST_LIMIT:
            # fast path for bytes (writable pool): one call of kernels.write_bytes' compiled entry for
            # exactly these argument types (no dispatcher type resolution), the bytes passed as they
            # are (no np.frombuffer), with the kernel table last built (the kernel answers STALE_TABLE
            # if an array was reallocated since).  The kernel checks the range and the read-only flag,
            # writes a provisioned, unshared block in place and provisions or breaks sharing as
            # write_batch does.  Anything unusual (out of range, read-only volume, no space, node
            # growth, an I/O error, a stale table) is redone or reported by the general path below.
            # The pool lock is taken as the C lock it is while no compiled reader is registered
            # (poollock.plain_acquire), else held as ``with lock`` holds it (PoolLock.hold_plain: the
            # readers excluded, the generation moved).
            lock = ctx.lock
            plain_acquire(lock)
            excluding = lock.readers
            try:
                if excluding:
                    lock.hold_plain()  # (if it fails, release() below undoes what it did)
                slot = ctx.slots.get(self._key)
                if slot is not None and ctx.fast_write:
                    ofd, osize = ctx.origin(self._key) if ctx.origins.by_key else _NO_ORIGIN
                    # (the callee first: binding builds the table that ctx.tab then names)
                    need = (ctx.write_bytes_fn or ctx.bind_write_bytes())(ctx.tab, ctx.tab_epoch, ctx.devs_i, slot,
                                                                          data, ctx.data.fd, offset, ofd, osize)
                    if _fg.FAULTS[0] != ctx.faults_seen:
                        ctx.fault_check()
                    if need >= 0:  # done; a rewrite of provisioned, unshared blocks changes no record
                        if need:
                            ctx.devs_dirty.add(slot)
                            ctx.after_alloc()
                        return len(data)
            finally:
                if excluding:
                    lock.release()
                else:
                    plain_release(lock)
        if type(data) is bytes:
            buf = np.frombuffer(data, _U8)
        elif type(data) is np.ndarray and data.dtype is _U8 and data.ndim == 1 and data.flags.c_contiguous:
            buf = data
        elif isinstance(data, np.ndarray):
            buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        else:
            try:
                buf = np.frombuffer(data, np.uint8)
            except TypeError:
                raise InvalidArgument(f"volume {self.name!r}: data must be bytes-like, got "
                                      f"{type(data).__name__}") from None
        if type(offset) is not int:
            offset = io_integer(self.name, "offset", offset)
        n = len(buf)
        with ctx.lock:
            slot = ctx.slots.get(self._key)
            if slot is not None and 0 <= offset < _FAST_LIMIT and ctx.fast_write:
                # fast path for other buffers (writable pool): one kernel call, as above (bytes that
                # came here found something unusual: the kernel says what, the general path acts)
                ofd, osize = ctx.origin(self._key) if ctx.origins.by_key else _NO_ORIGIN
                code, need = (_tr.KERNELS or _k()).write_one(ctx.table(), ctx.devs_i, slot, buf, ctx.data.fd, offset,
                                                          ofd, osize)
                if _fg.FAULTS[0] != ctx.faults_seen:
                    ctx.fault_check()
                if code == 0:  # OK
                    if need:  # a rewrite of provisioned, unshared blocks changes no record
                        ctx.devs_dirty.add(slot)
                        ctx.after_alloc()
                    return n
            self._check_write()  # closed or read-only first, then the range (as the batch path)
            check_span(self.name, int(self._row[DEV_SIZE]), offset, n)
            one = ctx.one_io  # preallocated [offset, length] scratch, used under the lock
            one[0, 0] = offset
            one[1, 0] = n
            try:
                self._submit(one[0], one[1], buf, _ZERO1, abort)
            except _Waited:  # the scratch may have been reused while this write waited for space
                self._submit(np.array([offset], np.int64), np.array([n], np.int64), buf, _ZERO1, abort)
        return n

    def write_many(self, offsets: Sequence[int] | np.ndarray,
                   buffers: np.ndarray | Sequence[bytes], *, abort: Callable[[], bool] | None = None) -> int:
        """Write a batch in one kernel call: ``buffers`` is a 2-D uint8 array (one row per offset)
        or a sequence of bytes-like objects.  Returns the total bytes written.  All-or-nothing with
        respect to data space: if the batch cannot be provisioned it waits for space or raises
        NoSpace with nothing changed, as :meth:`write` does."""
        offs = as_offsets(offsets, "offsets")
        if isinstance(buffers, np.ndarray) and buffers.ndim == 2:
            if len(buffers) != len(offs):
                raise InvalidArgument(f"volume {self.name!r}: {len(offs)} offsets but {len(buffers)} buffers")
            buf = np.ascontiguousarray(buffers, dtype=np.uint8).reshape(-1)
            lengths = np.full(len(offs), buffers.shape[1], np.int64)
        else:
            parts = [np.frombuffer(b, np.uint8) if not isinstance(b, np.ndarray) else b.reshape(-1).view(np.uint8)
                     for b in buffers]
            if len(parts) != len(offs):
                raise InvalidArgument(f"volume {self.name!r}: {len(offs)} offsets but {len(parts)} buffers")
            lengths = np.array([len(p) for p in parts], np.int64)
            buf = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        starts = np.zeros(len(offs), np.int64)
        if len(offs) > 1:
            np.cumsum(lengths[:-1], out=starts[1:])
        self._submit(offs, lengths, buf, starts, abort, copy=False)
        return int(lengths.sum())

    def _submit(self, offsets: np.ndarray, lengths: np.ndarray, buf: np.ndarray, starts: np.ndarray,
                abort: Callable[[], bool] | None = None, copy: bool = True) -> None:
        """Run a write batch; ``copy``: ``offsets``/``lengths`` are the context's shared scratch, which
        must not be used after waiting for space (raises :class:`_Waited` first; the caller retries
        with its own arrays)."""
        ctx = self._ctx
        with ctx.lock:
            self._check_write()
            self._check_range(offsets, lengths)
            slot = self._slot()
            ofd, osize = ctx.origin(self._key)
            st = ctx.st
            if not ctx.fast_write and ctx.no_metadata_change():
                self._refuse_allocation(offsets, lengths, slot)
            start = 0
            need = needed = 0
            try:
                while True:
                    space = ctx.space
                    code, start, need = _k().write_batch(ctx.nodes_map.nodes, space.arrays, st, ctx.devs_i[slot],
                                                         ctx.data.fd, ctx.data.scratch, offsets, lengths, buf, starts,
                                                         start, ofd, osize)
                    if _fg.FAULTS[0] != ctx.faults_seen:
                        ctx.fault_check()
                    needed = max(needed, need)
                    if code == L.OK:
                        break
                    if code == L.NO_SPACE:
                        if need <= st[L.ST_NR_FREE]:
                            # blocks freed earlier become allocatable once the commits that free them
                            # are durable (dm-thin commits when allocation finds no free block)
                            self.pool.commit()
                            if need > st[L.ST_NR_ALLOCATABLE]:
                                self.pool.commit()
                            if need <= st[L.ST_NR_ALLOCATABLE]:
                                continue
                        ctx.out_of_data_space()
                        if not ctx.nospace.errors_now():
                            if copy and offsets.base is ctx.one_io:
                                raise _Waited()  # nothing of this write happened yet: start over unshared
                            waited = ctx.wait_for_space(lambda: self._recheck(offsets, lengths), abort)
                            slot, st = self._slot(), ctx.st
                            if waited:
                                continue
                        raise NoSpace(f"pool {ctx.path}: no free data space for volume {self.name!r} "
                                      f"({need} blocks needed, {int(st[L.ST_NR_ALLOCATABLE])} free)" +
                                      ("" if ctx.nospace.error_if_no_space else
                                       f"; queued writes waited the pool's no_space_timeout "
                                       f"({ctx.nospace.timeout:g} s) and now fail until it gets space"))
                    if code == L.IO_ERROR:
                        err, why = ctx.data.failure(last_errno())
                        exc = DataDeviceError(f"pool {ctx.path}: writing volume {self.name!r} at offset "
                                              f"{int(offsets[start])} to the data file {ctx.data.path} failed "
                                              f"({why}; the block is not mapped)", err, ctx.data.path)
                        raise exc
                    if code == ORIGIN_ERROR:
                        self._origin_failed(int(offsets[start]))
                    bs = ctx.block_size
                    nblk = int((offsets[start] + lengths[start] - 1) // bs - offsets[start] // bs + 1)
                    ctx.nodes_map.ensure(2 * nblk + 1, nblk)
            finally:
                if needed:  # a rewrite of provisioned, unshared blocks changes no record
                    ctx.devs_dirty.add(slot)
            if needed:
                ctx.after_alloc()

    def _refuse_allocation(self, offsets: np.ndarray, lengths: np.ndarray, slot: int) -> None:
        """Read-only and out-of-metadata-space modes: ReadOnlyIO (EIO) if the batch needs a new block
        (unmapped, or shared: dm-thin's ``process_bio_read_only``), before anything is written."""
        ctx = self._ctx
        need = _k().blocks_needed(ctx.nodes_map.nodes, ctx.devs_i[slot], offsets, lengths, ctx.block_size)
        if need:
            pool = self.pool
            why = rules.way_out(ctx.path, pool.mode, bool(pool.header.get("needs_check")),
                                getattr(pool, "read_only_reason", ""))
            raise ReadOnlyIO(f"volume {self.name!r}: the write needs {need} new data block(s) and only "
                             f"provisioned, unshared blocks can be written now: {why}")

    def discard(self, offset: int, length: int) -> int:
        """Unmap the whole blocks inside ``[offset, offset+length)``; partial blocks are untouched
        (dm-thin's rule).  Returns the number of blocks unmapped.  With the pool's discard setting
        ``passdown`` (the default) the freed blocks are hole-punched once the commits that free them
        are durable; ``nopassdown`` only unmaps; ``ignore`` refuses every discard with
        :class:`~thinpool.errors.DiscardNotSupported` (EOPNOTSUPP), changing nothing."""
        offset = io_integer(self.name, "offset", offset)
        length = io_integer(self.name, "length", length)
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            if self.pool.discard_mode == "ignore":
                raise DiscardNotSupported(f"pool {ctx.path}: discards are turned off (ignore_discard): cannot "
                                          f"discard volume {self.name!r} at offset {offset} length {length}")
            self._check_write()
            check_span(self.name, self.size, offset, length)
            bs = ctx.block_size
            first = -(-offset // bs)
            last = (offset + length) // bs
            if last <= first or (not ctx.fast_write and ctx.no_metadata_change()):
                return 0  # read-only / out-of-metadata-space: the discard succeeds, unmapping nothing
            slot = self._slot()
            before = int(ctx.devs_i[slot, DEV_MAPPED])
            vb = first
            while True:
                sp = ctx.space
                code, vb = _k().discard_range(ctx.nodes_map.nodes, sp.arrays, ctx.st, ctx.devs_i[slot], vb, last)
                if code == L.OK:
                    break
                ctx.nodes_map.ensure(3, 1)
            if _fg.FAULTS[0] != ctx.faults_seen:
                ctx.fault_check()
            unmapped = before - int(ctx.devs_i[slot, DEV_MAPPED])
            if unmapped:
                ctx.devs_dirty.add(slot)
            return unmapped

    def _recheck(self, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """After waiting for space: the write can still go on (pool open and writable, volume there and
        writable, range inside it) -- else raise as a new write would."""
        self._check_write()
        self._slot()
        self._check_range(offsets, lengths)


__all__ = ["Activation", "BatchOutcome", "Thin", "WITH_BLOCK", "apply_io"]
