"""Mixed I/O batches over several volumes of one pool, in order, in as few kernel calls as possible:
:func:`apply_io`, a trace replay's path (:mod:`thinpool.simulate.replayer` feeds it), and what it
reports, :class:`BatchOutcome`.  The per-block work is :mod:`thinpool.kernels_replay`'s; the checks
and accounting match :class:`~thinpool.thin.Thin`'s own writes, reads and discards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np

from . import rules
from . import schema as L
from .errors import DataDeviceError, DiscardNotSupported, InvalidArgument, NoSpace, ReadOnly, ReadOnlyIO
from .hostio import last_errno
from .io_checks import ORIGIN_ERROR, as_offsets

if TYPE_CHECKING:
    from types import ModuleType

    from .kernel_context import KernelContext
    from .thin import Thin


class BatchOutcome(NamedTuple):
    """What :func:`apply_io` reports beside the pool's own counters."""

    failed_writes: int          #: writes that found no data space and failed alone (``on_no_space="skip"``)
    failed_bytes: int           #: their bytes
    peak_data_blocks_used: int  #: the most data blocks in use at any point of the batch
    #: writes that needed a new block while the pool was read-only or out of metadata space and failed
    #: alone with EIO (``on_no_space="skip"``; dm-thin's ``process_bio_read_only``)
    refused_writes: int = 0
    refused_bytes: int = 0      #: their bytes
    #: positions in the batch of the writes that failed for want of data space, in order (the first
    #: ``failed_writes`` of them)
    failed_at: np.ndarray | None = None


def _kr() -> ModuleType:
    from . import kernels_replay
    return kernels_replay


def apply_io(thins: Sequence[Thin], vol: np.ndarray, ops: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
             *, pattern: np.ndarray | None = None, on_no_space: str = "raise", cuts: Sequence[int] = (),
             on_cut: Callable[[int, BatchOutcome], None] | None = None,
             on_space: Callable[[int, BatchOutcome], None] | None = None) -> BatchOutcome:
    """Apply a batch of mixed I/Os to volumes of one pool, in order, in as few kernel calls as
    possible (a trace replay's path: no Python per I/O).  I/O ``i`` is ``ops[i]`` (0 read, 1 write,
    2 discard) of ``lengths[i]`` bytes at ``offsets[i]`` of ``thins[vol[i]]``.

    Writes do exactly what :meth:`Thin.write` does and store ``pattern`` (its first ``length`` bytes;
    zeroes when None); reads copy mapped bytes from the data file into a scratch block (their bytes
    are not returned: this is for timing and accounting); discards unmap whole blocks like
    :meth:`Thin.discard`.  A metadata-only pool moves no bytes.  Everything is checked first (op
    codes, ranges, read-only volumes, a pool that takes writes), so bad input changes nothing.  Not
    all-or-nothing: when a write finds no data space (after committing, as dm-thin does), the I/Os
    before it are complete; then ``on_no_space="raise"`` raises NoSpace and ``"skip"`` fails just that
    write (dm-thin's error_if_no_space) and goes on.

    In the read-only and out-of-metadata-space modes (entered before the batch or during it, when the
    metadata runs out) each I/O is served as dm-thin's ``process_bio_read_only`` serves a bio, like the
    per-call path: a write to provisioned, unshared blocks is done, a write that needs a block (an
    unmapped one, or a sharing break) fails with EIO -- ``"raise"``: ReadOnlyIO at that I/O, the ones
    before it complete; ``"skip"``: that write alone, counted in ``refused_writes`` -- and a discard
    succeeds unmapping nothing.

    ``cuts``: increasing positions where ``on_cut(position, outcome so far)`` is called once the I/Os
    before it are done (under the pool's lock; it may take snapshots, delete volumes other than
    ``thins``, commit).  ``on_space(position, outcome so far)``: called, the same way, right after the
    write whose commit took the pool from out-of-data-space back to write mode (dm-thin's
    ``check_for_data_space``, which requeues the bios waiting for space) -- a trace replay retries its
    queued writes there.
    Returns a :class:`BatchOutcome`.
    """
    if on_no_space not in ("raise", "skip"):
        raise InvalidArgument(f"on_no_space must be 'raise' or 'skip', got {on_no_space!r}")
    if not thins:
        raise InvalidArgument("apply_io: no volumes given")
    pool = thins[0].pool
    if any(t.pool is not pool for t in thins):
        raise InvalidArgument("apply_io: every volume must belong to the same pool")
    ops = np.ascontiguousarray(ops, np.uint8)
    vol = np.ascontiguousarray(vol, np.int64)
    offsets = as_offsets(offsets, "offsets")
    lengths = as_offsets(lengths, "lengths")
    n = len(ops)
    if not (len(vol) == len(offsets) == len(lengths) == n):
        raise InvalidArgument(f"apply_io: arrays of different lengths ({n}, {len(vol)}, {len(offsets)}, {len(lengths)})")
    cut_list = [int(c) for c in cuts]
    if any(not 0 <= c <= n for c in cut_list) or any(b < a for a, b in zip(cut_list, cut_list[1:])):
        raise InvalidArgument(f"apply_io: cuts must be increasing positions within 0..{n}")
    if cut_list and on_cut is None:
        raise InvalidArgument("apply_io: cuts given without on_cut")
    opmax = int(ops.max()) if n else 0
    if opmax > 2:
        raise InvalidArgument(f"apply_io: unknown op code {opmax} (0 read, 1 write, 2 discard)")
    if n and (int(vol.min()) < 0 or int(vol.max()) >= len(thins)):
        raise InvalidArgument(f"apply_io: volume index out of range (0..{len(thins) - 1})")
    ctx = thins[0]._ctx
    with ctx.lock:
        ctx.check_readable()  # (fail mode: every I/O fails, dm-thin's thin_bio_map)
        slots = np.array([t._slot() for t in thins], np.int64)
        sizes = ctx.devs_i[slots, L.DEV_SIZE]
        if n and (int(offsets.min()) < 0 or int(lengths.min()) < 0):
            raise InvalidArgument("apply_io: negative offset or length")
        ends = offsets + lengths
        # one pass when every I/O ends within the smallest volume (and no sum wrapped: both are >= 0)
        if n and (int(ends.min()) < 0 or int(ends.max()) > int(sizes.min())):
            bad = (ends > sizes[vol]) | (ends < offsets)
        else:
            bad = np.zeros(0, bool)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidArgument(f"volume {thins[int(vol[i])].name!r}: I/O at offset {int(offsets[i])} length "
                                  f"{int(lengths[i])} goes past the end of the volume ({int(sizes[vol[i]])} bytes)")
        if opmax == 2 and pool.discard_mode == "ignore" and (ops == 2).any():
            raise DiscardNotSupported(f"pool {ctx.path}: discards are turned off (ignore_discard): the batch holds "
                                      f"{int((ops == 2).sum())} discards")
        any_change = opmax > 0
        if any_change:
            ctx.check_io_writable()
            ro = (ctx.devs_i[slots, L.DEV_FLAGS] & L.FLAG_READ_ONLY) != 0
            hit = ro[vol[ops != 0]] if ro.any() else np.zeros(0, bool)
            if hit.any():
                raise ReadOnly(f"volume {thins[int(vol[ops != 0][hit][0])].name!r} is read-only")
        fd = ctx.data.fd
        if fd >= 0:
            w = ops == 1
            wmax = int(lengths[w].max()) if w.any() else 0
            if pattern is None or len(pattern) < wmax:
                pattern = np.zeros(wmax, np.uint8) if pattern is None else np.resize(np.asarray(pattern, np.uint8), wmax)
            pattern = np.ascontiguousarray(pattern, np.uint8)
        else:
            pattern = np.zeros(0, np.uint8)
        origins = [ctx.origin(t._key) for t in thins]
        ofds = np.array([o[0] for o in origins], np.int64)
        osizes = np.array([o[1] for o in origins], np.int64)
        out = np.zeros(6, np.int64)  # the kernel's five counters; [5]: failures the pool's mode reflects
        failed_at = np.empty(n if on_no_space == "skip" else 0, np.int64)
        out[2] = st_used = int(ctx.st[L.ST_NR_BLOCKS] - ctx.st[L.ST_NR_FREE])
        skip = on_no_space == "skip"
        kr = _kr()
        start = 0
        try:
            for end in cut_list:
                if end > start:
                    start = _apply_range(ctx, thins, kr, slots, fd, pattern, vol, ops, offsets, lengths, start, end,
                                         skip, out, failed_at, ofds, osizes, on_space, st_used)
                ctx.devs_dirty.update(slots.tolist())
                _enter_out_of_data_space(ctx, out)  # if a write failed for want of space before this cut
                assert on_cut is not None  # (checked first: cuts come with on_cut)
                on_cut(end, _outcome(out, st_used, failed_at))
                slots = np.array([t._slot() for t in thins], np.int64)  # a snapshot may have moved the table
                if any_change and end < n:
                    ctx.check_io_writable()
            if n > start:
                _apply_range(ctx, thins, kr, slots, fd, pattern, vol, ops, offsets, lengths, start, n, skip, out,
                             failed_at, ofds, osizes, on_space, st_used)
        finally:
            ctx.devs_dirty.update(slots.tolist())
        _enter_out_of_data_space(ctx, out)
        if any_change:
            ctx.after_alloc()
        return _outcome(out, st_used, failed_at)


def _outcome(out: np.ndarray, st_used: int, failed_at: np.ndarray) -> BatchOutcome:
    return BatchOutcome(int(out[0]), int(out[1]), max(st_used, int(out[2])), int(out[3]), int(out[4]),
                        failed_at[:int(out[0])])


def _enter_out_of_data_space(ctx: KernelContext, out: np.ndarray) -> None:
    """Writes failed for want of space since the mode last reflected it: the pool enters dm-thin's
    out-of-data-space mode (allocation failed)."""
    if out[0] > out[5]:
        out[5] = out[0]
        if ctx.pool.mode != L.Mode.OUT_OF_DATA_SPACE:
            ctx.out_of_data_space()


def _apply_range(ctx: KernelContext, thins: Sequence[Thin], kr: ModuleType, slots: np.ndarray, fd: int,
                 pattern: np.ndarray, vol: np.ndarray, ops: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                 start: int, end: int, skip: bool, out: np.ndarray, failed_at: np.ndarray, ofds: np.ndarray,
                 osizes: np.ndarray, on_space: Callable[[int, BatchOutcome], None] | None, st_used: int) -> int:
    """Run I/Os ``start`` up to ``end`` of the batch through the kernel, handling each stop it makes
    (a metadata check, no data space, a write refused, the data file failing, an origin failing) and
    calling ``on_space`` where the pool leaves out-of-data-space mode; returns ``end``."""
    st = ctx.st
    pool = thins[0].pool
    skip_at, committed_at = -1, -1
    resume_at = -1  # on_space is due once the I/O before this position is done
    while True:
        if 0 <= resume_at <= start:
            resume_at = -1
            ctx.devs_dirty.update(slots.tolist())
            assert on_space is not None  # (resume_at is set only when there is one)
            on_space(start, _outcome(out, st_used, failed_at))
        if start >= end:
            return end
        no_alloc = not ctx.fast_write and ctx.no_metadata_change()  # the mode may change at every return
        stop = resume_at if resume_at > start else end
        code, start, need = kr.apply_batch(ctx.nodes_map.nodes, ctx.space.arrays, st, ctx.devs_i, slots, fd,
                                           ctx.data.scratch, pattern, vol, ops, offsets, lengths, start, stop,
                                           skip_at, skip, no_alloc, ctx.md_check_below(), out, failed_at, ofds,
                                           osizes)
        if code == L.OK:
            continue  # start == stop: on_space is due there, or the range is done
        if code == kr.MD_CHECK:
            ctx.after_alloc()  # dm-thin checks metadata space at each allocation; may commit, change the mode
            continue
        if code == kr.NO_BLOCK:
            pool = thins[0].pool
            why = rules.way_out(ctx.path, pool.mode, bool(pool.header.get("needs_check")),
                                getattr(pool, "read_only_reason", ""))
            raise ReadOnlyIO(f"volume {thins[int(vol[start])].name!r}: I/O {start} of the batch (offset "
                             f"{int(offsets[start])}) needs a new data block and only provisioned, unshared "
                             f"blocks can be written now: {why}")
        if code == L.NO_SPACE:
            if need <= st[L.ST_NR_FREE] and committed_at != start:
                committed_at = start  # dm-thin commits when allocation finds no free block
                _enter_out_of_data_space(ctx, out)
                was_out = pool.mode == L.Mode.OUT_OF_DATA_SPACE
                pool.commit()
                if need > st[L.ST_NR_ALLOCATABLE]:
                    pool.commit()
                if was_out and on_space is not None and pool.mode == L.Mode.WRITE:
                    resume_at = start + 1  # the bios waiting for space are requeued behind this one
                continue
            ctx.out_of_data_space()
            if skip:
                skip_at = start
                continue
            raise NoSpace(f"pool {ctx.path}: no free data space for volume {thins[int(vol[start])].name!r} "
                          f"({need} blocks needed, {int(st[L.ST_NR_ALLOCATABLE])} free)")
        if code == L.IO_ERROR:
            err, why = ctx.data.failure(last_errno())
            exc = DataDeviceError(f"pool {ctx.path}: I/O {start} of the batch (volume "
                                  f"{thins[int(vol[start])].name!r}, offset {int(offsets[start])}) failed on "
                                  f"the data file {ctx.data.path} ({why})", err, ctx.data.path)
            raise exc
        if code == ORIGIN_ERROR:
            thins[int(vol[start])]._origin_failed(int(offsets[start]))
        if ops[start] == 1:
            bs = ctx.block_size
            nblk = int((offsets[start] + lengths[start] - 1) // bs - offsets[start] // bs + 1)
            ctx.nodes_map.ensure(2 * nblk + 1, nblk)
        else:
            ctx.nodes_map.ensure(3, 1)  # a discard shadows one path at a time
