"""The library entry points of a trace replay into one volume: :func:`replay` into a volume of an open
pool, :func:`replay_file` into a fresh pool (``thinpool replay``).  Several volumes driven by several
traces are a scenario (:mod:`.scenario`).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgument
from ..thin import Thin
from ..units import parse_size
from .replay_sources import Source, expected_records, open_trace, windows
from .replayer import Replayer
from .results import ReplayResult
from .schedule import Every, Target, check_keep

if TYPE_CHECKING:
    from ..pool import Pool


def replay(pool: Pool, volume: str | Thin, trace: Any, *, format: str | None = None,
           snapshot_every: int | str | Every | None = None, keep: int | None = None,
           sample_every: int | str | Every | None = None, wrap: bool = False, offset_scale: float = 1.0,
           skip_bad: bool = False, blkparse_event: str = "Q", commit_on_flush: bool = True,
           on_no_space: str = "skip",
           pattern: np.ndarray | None = None, progress: bool | None = None,
           params: dict | None = None) -> ReplayResult:
    """Replay ``trace`` (a path, or an object with ``chunks()`` such as :class:`ArrayTrace`) into the
    volume ``volume`` of an open ``pool``; every record of the trace goes to that volume.

    ``snapshot_every``: snapshot the volume every N I/Os (``10000``) or T seconds of trace time
    (``"60s"``), keeping the last ``keep`` (older ones are deleted; None keeps all).
    ``sample_every``: the time series' interval (default: every 256 I/Os -- coarser from the start for a long
    trace -- doubling whenever the series reaches 512 samples).  ``wrap``: offsets past the
    volume's end wrap around (else the first such record is an error naming its file and line);
    ``offset_scale`` multiplies every offset first.  ``blkparse_event``: which blkparse events are the
    records (``"Q"`` queued, ``"D"`` issued, ``"C"`` completed).  Flushes commit (dm-thin commits on REQ_PREFLUSH)
    unless ``commit_on_flush=False``.  A write that finds no data space fails alone and counts in
    ``enospc_events`` if the pool has ``error_if_no_space``; otherwise (dm-thin's default,
    queue_if_no_space) it waits in trace time -- counted in ``queued_writes`` -- and is retried when a
    commit finds free blocks, or fails once the pool's ``no_space_timeout`` of trace time has passed
    since it ran out (``on_no_space="raise"`` raises NoSpace instead).  In read-only and
    out-of-metadata-space modes writes that need a block fail alone (``eio_events``), scheduled
    snapshots are refused (``snapshots_failed``).  ``pattern``: the bytes writes
    store in a pool with a data file (zeroes by default).  ``progress``: a rich progress bar on a
    terminal.  Returns a :class:`~thinpool.simulate.results.ReplayResult`.
    """
    thin = volume if isinstance(volume, Thin) else pool.thin(volume)
    tr = open_trace(trace, format, skip_bad=skip_bad, blkparse_event=blkparse_event)
    keep = check_keep(keep)
    target = Target(thin, Every.parse(snapshot_every, "snapshot_every"), keep, bool(wrap), float(offset_scale))
    if target.snapshot_every is None and keep is not None:
        raise InvalidArgument("keep needs a snapshot schedule (snapshot_every)")
    src = Source(tr, None)
    r = Replayer(pool, [target], sample_every=Every.parse(sample_every, "sample_every"),
                 commit_on_flush=commit_on_flush, on_no_space=on_no_space, pattern=pattern, progress=progress,
                 paths=[str(getattr(tr, "path", "<trace>"))], expected_records=expected_records(tr))
    try:
        for w in windows([src]):
            r.feed(*w)
    finally:
        r.close()
    p = dict(trace=str(getattr(tr, "path", "<trace>")), format=getattr(tr, "format", None), volume=thin.name,
             block_size=pool.block_size, snapshot_every=target.snapshot_every.as_text() if target.snapshot_every else None,
             keep=keep, metadata_only=bool(getattr(pool, "metadata_only", False)))
    p.update(params or {})
    result = r.finish(ReplayResult, p, bad_records=int(getattr(tr, "bad_records", 0) or 0))
    assert isinstance(result, ReplayResult)  # (finish builds the class it is given)
    return result



def replay_file(trace: Any, *, pool_dir: str | None = None, block_size: int | str = "64KiB",
                data_size: int | str = "64GiB", volume_size: int | str | None = None, metadata_only: bool = False,
                zero_new_blocks: bool = True, error_if_no_space: bool = False, no_space_timeout: float = 60.0,
                flush: bool | None = None, **kw: Any) -> ReplayResult:
    """:func:`replay` into the volume ``vol`` of a fresh pool: in ``pool_dir`` (which must not exist or be
    empty; kept afterwards) or in a temporary directory removed afterwards.  ``volume_size`` defaults to
    the data size.  The pool queues writes that find no space (dm-thin's default; ``no_space_timeout``
    seconds of trace time) unless ``error_if_no_space``.  ``flush``: whether the pool's commits are
    flushed (:meth:`Pool.open <thinpool.pool.Pool.open>`'s ``flush``); by default not for a pool in a
    temporary directory (a scratch pool: removed afterwards, so durability buys nothing), and yes for
    ``pool_dir``.  The other keywords are :func:`replay`'s."""
    import tempfile

    from ..pool import Pool
    data_size = parse_size(data_size, "data size")
    vsize = parse_size(volume_size, "volume size") if volume_size is not None else data_size
    params = dict(data_size=data_size, volume_size=vsize, zero_new_blocks=zero_new_blocks,
                  error_if_no_space=bool(error_if_no_space), no_space_timeout=float(no_space_timeout))
    with contextlib.ExitStack() as stack:
        if flush is None:
            flush = pool_dir is not None
        if pool_dir is None:
            pool_dir = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="thinpool-replay-")), "pool")
        pool = Pool.create(pool_dir, data_size=data_size, block_size=block_size, metadata_only=metadata_only,
                           zero_new_blocks=zero_new_blocks, error_if_no_space=error_if_no_space,
                           no_space_timeout=no_space_timeout, flush=bool(flush))
        with pool:
            pool.create_thin("vol", vsize)
            return replay(pool, "vol", trace, params=params, **kw)
