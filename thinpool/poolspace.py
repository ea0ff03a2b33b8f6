"""Growing a pool's data and metadata, and what happens to freed blocks after a commit.

* :func:`resize` grows the data device only after checking that the metadata file can hold the
  bigger data space map (one 4 KiB page of reference counts per 1024 data blocks, written in full by
  the commit); if it cannot, the metadata file is grown first (to thin_metadata_size's size for the
  new data size, at most dm-thin's 15.87 GiB), and when even that cannot cover it the resize is
  refused before anything changes.  A resize whose commit fails is rolled back: the data file
  keeps its old size.
* :func:`resize_metadata` grows the metadata file (dm-thin allows growing the metadata device).  It
  is the way out of metadata space: a pool that went read-only because a commit found no free
  metadata block returns to write mode, and ``delete`` can then commit.
* :func:`punch_released` hole-punches the blocks a commit released and returns only those whose
  punch succeeded to the allocator; a block whose punch failed keeps its "needs zeroing" mark (it
  stays pending, recorded in the next commit's pending list) and is tried again at every commit.
"""

from __future__ import annotations

import errno
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np

from . import schema as K
from .schema import Mode
from .errors import HostIOError, InvalidArgument, ReadOnly, ThinpoolError, ThinpoolWarning
from .mdstore import BLOCK, PM_ENTRIES
from .units import parse_size

if TYPE_CHECKING:
    from .pool import Pool

#: dm-thin's metadata device limit, in 4 KiB blocks (15.87 GiB)
MAX_METADATA_BLOCKS = 4161600


def _rc_pages(nr_data_blocks: int) -> int:
    per = 1 << K.RC_PAGE_BITS
    return (max(nr_data_blocks, 1) + per - 1) // per


def metadata_blocks_needed(pool: "Pool", nr_data_blocks: int) -> int:
    """Metadata blocks the pool needs to commit a data device of ``nr_data_blocks`` and go on working:
    what its current state uses plus the new reference-count pages and their page-map pages, doubled
    for copy-on-write (a commit writes fresh copies while the last commit's stay), plus slack."""
    added = max(0, _rc_pages(nr_data_blocks) - len(pool.space.data_rc) // (1 << K.RC_PAGE_BITS))
    used = pool.store.used_blocks() + pool._dirty_page_estimate()
    return 2 * (used + added + added // PM_ENTRIES + 8) + 64


def _check_md_size(pool: "Pool", nbytes: int) -> int:
    blocks = nbytes // BLOCK
    if blocks > MAX_METADATA_BLOCKS:
        raise InvalidArgument(f"pool {pool.path}: metadata size {nbytes} bytes exceeds dm-thin's 15.87GiB limit")
    if blocks < pool.store.nr_blocks:
        raise InvalidArgument(f"pool {pool.path}: cannot shrink the metadata from {pool.store.nr_blocks * BLOCK} "
                              f"to {nbytes} bytes (only growing is supported)")
    return blocks


def _after_metadata_growth(pool: "Pool") -> None:
    """Leave the read-only mode that running out of metadata space caused."""
    if pool.mode == Mode.READ_ONLY and not pool.header.get("needs_check") and \
            getattr(pool, "read_only_reason", "").find("out of metadata space") >= 0:
        pool._set_mode(Mode.WRITE if pool.st[K.ST_NR_ALLOCATABLE] > 0 else Mode.OUT_OF_DATA_SPACE)
        pool.read_only_reason = ""
    pool._set_md_check()


def _grow_store(pool: "Pool", blocks: int) -> None:
    old = pool.store.nr_blocks
    pool.store.resize(blocks)
    try:
        pool.store.sync()
    except HostIOError:
        pool.store.resize(old)
        raise


def resize_metadata(pool: "Pool", metadata_size: int | str) -> None:
    """Grow the metadata file to ``metadata_size`` bytes (see :meth:`Pool.resize_metadata`)."""
    pool._check_open()
    if pool.read_only:
        raise ReadOnly(f"pool {pool.path} is opened read-only")
    if pool.mode == Mode.FAIL:
        raise ReadOnly(f"pool {pool.path} has failed ({getattr(pool, 'read_only_reason', '')}); reopen it first")
    if pool.header.get("needs_check"):
        raise ReadOnly(f"pool {pool.path} needs check: its metadata cannot be resized until repaired")
    blocks = _check_md_size(pool, parse_size(metadata_size, "metadata size"))
    if blocks == pool.store.nr_blocks:
        _after_metadata_growth(pool)
        return
    _grow_store(pool, blocks)
    _after_metadata_growth(pool)


def resize(pool: "Pool", data_size: int | str | None, metadata_size: int | str | None = None) -> None:
    """Grow the data device and, when needed or asked, the metadata file (see :meth:`Pool.resize`)."""
    from .rules import default_metadata_blocks
    pool._check_open()
    if pool.read_only:
        raise ReadOnly(f"pool {pool.path} is opened read-only")
    if pool.header.get("needs_check"):
        raise ReadOnly(f"pool {pool.path} needs check: it cannot be resized until repaired")
    if data_size is None:
        if metadata_size is None:
            raise InvalidArgument(f"pool {pool.path}: resize needs a data size, a metadata size or both")
        resize_metadata(pool, metadata_size)
        return
    nbytes = parse_size(data_size, "data size")
    nr = nbytes // pool.block_size
    if nr < pool.space.nr_blocks:
        raise InvalidArgument(f"pool {pool.path}: cannot shrink the data device from "
                              f"{pool.space.nr_blocks} to {nr} blocks (dm-thin does not support shrinking)")
    md_asked = None if metadata_size is None else _check_md_size(pool, parse_size(metadata_size, "metadata size"))
    need = metadata_blocks_needed(pool, nr)
    if md_asked is not None and md_asked < need:
        raise InvalidArgument(f"pool {pool.path}: a metadata size of {md_asked * BLOCK} bytes cannot cover a data "
                              f"size of {nbytes} bytes (needs at least {need * BLOCK} bytes)")
    target = md_asked if md_asked is not None else pool.store.nr_blocks
    if target < need:
        target = max(need, min(default_metadata_blocks(nr), MAX_METADATA_BLOCKS))
    if need > MAX_METADATA_BLOCKS:
        raise InvalidArgument(f"pool {pool.path}: data size {nbytes} bytes is too large: its space map needs "
                              f"{need * BLOCK} bytes of metadata, more than dm-thin's 15.87GiB limit")
    if nr == pool.space.nr_blocks and target == pool.store.nr_blocks:
        return
    if pool.mode == Mode.FAIL or (pool.mode == Mode.READ_ONLY and target == pool.store.nr_blocks):
        pool._check_writable()  # says why
    # make what was done so far durable on its own: a failed resize then only rolls back itself
    if target > pool.store.nr_blocks:
        resize_metadata(pool, target * BLOCK)
    pool._check_writable()
    pool.commit()
    if nr == pool.space.nr_blocks:
        return
    old_nr = pool.space.nr_blocks
    try:
        try:
            pool.data.resize(nr)
        except OSError as exc:
            if isinstance(exc, ThinpoolError):
                raise
            err = exc.errno or errno.EIO
            raise HostIOError(f"pool {pool.path}: growing the data file {pool.data.path} to {nr * pool.block_size} "
                              f"bytes failed: {os.strerror(err)}", err, pool.data.path) from None
        pool.space.resize(nr)
        pool._header["nr_data_blocks"] = nr
        pool._lwm_fired = False
        if pool.mode == Mode.OUT_OF_DATA_SPACE and pool.st[K.ST_NR_ALLOCATABLE] > 0:
            pool._set_mode(Mode.WRITE)
        pool.commit()
    except BaseException:
        _roll_back_resize(pool, old_nr)
        raise


def _roll_back_resize(pool: "Pool", old_nr: int) -> None:
    """After a failed resize commit: the last commit's state (which had ``old_nr`` blocks) and a data
    file of its old size.  A failed pool (flush error) is not reloaded: it must be reopened, and
    reopening reads whichever commit is durable."""
    if pool.mode != Mode.FAIL and not pool.store.failed:
        pool._load()
    # also when the pool failed: the blocks past the old end are mapped by no commit (the resize's
    # commit held nothing else), and a reopen re-extends the file if that commit proves durable.
    # Always remapped: a failed grow may have left the file unmapped.
    pool.data.resize(old_nr)


def punch_released(pool: "Pool", released: np.ndarray) -> np.ndarray:
    """Hole-punch ``released`` (blocks no durable commit maps any more) and return those whose punch
    failed: they must not be handed out (they hold old bytes).  Warns with :class:`ThinpoolWarning`."""
    if len(released) == 0:
        return np.zeros(0, np.int64)
    try:
        pool.data.punch(released)
    except HostIOError as exc:
        if exc.blocks is None:
            raise
        failed = np.intersect1d(np.asarray(exc.blocks, np.int64), released)
        warnings.warn(f"pool {pool.path}: {len(failed)} freed data blocks could not be hole-punched ({exc}); "
                      f"they stay unallocatable until a later commit or open punches them", ThinpoolWarning,
                      stacklevel=4)
        return failed
    return np.zeros(0, np.int64)


def scrub_on_open(pool: "Pool") -> int:
    """The open-time punch of free blocks that hold data (see :meth:`DataDevice.scrub`); a block whose
    punch fails is kept unallocatable (pending) rather than failing the open."""
    try:
        return pool.data.scrub(pool.space.data_rc, keep=pool.space.pending)
    except HostIOError as exc:
        if exc.blocks is None:
            raise
        failed = np.asarray(exc.blocks, np.int64)
        failed = failed[pool.space.data_rc[failed] == 0]
        pool.space.set_pending(np.union1d(pool.space.pending, failed))
        pool.space.recount()
        pool._unpunched = np.union1d(pool._unpunched, failed)
        warnings.warn(f"pool {pool.path}: {len(failed)} free data blocks holding data could not be "
                      f"hole-punched ({exc}); they stay unallocatable until a commit punches them",
                      ThinpoolWarning, stacklevel=3)
        return 0
