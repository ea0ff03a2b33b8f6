"""Growing a pool's data and metadata, what happens to freed blocks after a commit, and trim.

* :func:`resize` grows the data device only after checking that the metadata file can hold the
  bigger data space map (one two-bit bitmap page per 16,384 data blocks, see
  :mod:`thinpool.dataspace`, doubled for copy-on-write); if it cannot, the metadata file is grown
  first when autoextend is on (see below) or to the ``metadata_size`` asked for, else the resize is
  refused with nothing changed (as LVM refuses to extend a pool's data past what its metadata
  covers).  A resize whose commit fails is rolled back: the data file keeps its old size.
* :func:`resize_metadata` grows the metadata file (dm-thin allows growing the metadata device; it
  never shrinks).  It is the way out of metadata space: a pool that went read-only because a commit
  found no free metadata block returns to write mode, and ``delete`` can then commit.
* :func:`set_autoextend` / :func:`autoextend`: LVM's ``thin_pool_autoextend_threshold`` and
  ``thin_pool_autoextend_percent`` as a pool setting.  After every commit, when metadata use (or data
  use) is above the threshold percent, the metadata file (or the data device) grows by the percent
  of its size -- or by more, when that is what brings use back to the threshold (lvm2's
  ``_adjust_amount``).  A threshold of 100 turns it off (LVM's default); a threshold below 50 counts
  as 50 (LVM's minimum).
* Freed blocks keep their bytes, as in dm-thin (which never discards a block it frees): after a
  commit, :func:`release_pending` makes the blocks freed by the previous commit allocatable and
  hole-punches only those a discard passed down -- or all of them with the pool setting
  ``punch_freed_blocks``.  :func:`punch_released` punches; a block whose punch failed stays pending
  (recorded in the next commit's pending list) and is tried again at every commit.  A freed block
  that is not punched is marked stale in the data space map, and the write kernels zero what a
  write to it does not cover when it is reused (``zero_new_blocks``).
* :func:`scrub_on_open` finds the free blocks the data file holds bytes for (written after the last
  commit by a process that crashed, or freed without a punch) and marks them stale -- or, with
  ``punch_freed_blocks``, punches them.
* :func:`trim` is thin_trim: it punches every free block no durable commit maps.
"""

from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import schema as K
from .schema import Mode
from .errors import HostIOError, InvalidArgument, ReadOnly, ThinpoolError, ThinpoolWarning
from .spacemap_pages import sm_pages
from .mdpages import BLOCK, PM_ENTRIES
from .units import parse_size

if TYPE_CHECKING:
    from .pool import Pool

#: dm-thin's metadata device limit, in 4 KiB blocks (15.87 GiB)
MAX_METADATA_BLOCKS = 4161600


#: LVM's defaults: ``thin_pool_autoextend_threshold = 100`` (off), ``thin_pool_autoextend_percent = 20``
AUTOEXTEND_OFF = 100
DEFAULT_AUTOEXTEND_PERCENT = 20
#: LVM treats a threshold below 50 as 50
MIN_AUTOEXTEND_THRESHOLD = 50


def metadata_blocks_needed(pool: "Pool", nr_data_blocks: int) -> int:
    """Metadata blocks the pool needs to commit a data device of ``nr_data_blocks`` and go on working:
    what its current state uses plus the bitmap pages the new range can take (all of it in use) and
    their page-map pages, doubled for copy-on-write (a commit writes fresh copies while the last
    commit's stay), plus slack."""
    added = max(0, sm_pages(nr_data_blocks) - sm_pages(pool.space.nr_blocks))
    used = pool.store.used_blocks() + pool._dirty_page_estimate()
    return 2 * (used + added + added // PM_ENTRIES + 8) + 64


def autoextend_settings(pool: "Pool") -> tuple[int, int]:
    """The pool's (threshold, percent) autoextend setting; (100, 20) -- off -- unless set."""
    return (int(pool.header.get("autoextend_threshold", AUTOEXTEND_OFF)),
            int(pool.header.get("autoextend_percent", DEFAULT_AUTOEXTEND_PERCENT)))


def _autoextend_on(pool: "Pool") -> bool:
    threshold, percent = autoextend_settings(pool)
    return threshold < AUTOEXTEND_OFF and percent > 0


def set_autoextend(pool: "Pool", threshold: int, percent: int | None = None) -> None:
    """Set LVM's autoextend policy on the pool (see :meth:`Pool.set_autoextend`); commits."""
    pool._check_writable()
    for what, value, low, high in (("threshold", threshold, 0, 100), ("percent", percent, 0, 10000)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high):
            raise InvalidArgument(f"pool {pool.path}: autoextend {what} must be an integer from {low} to {high}, "
                                  f"got {value!r}")
    pool._header["autoextend_threshold"] = max(threshold, MIN_AUTOEXTEND_THRESHOLD)
    if percent is not None or "autoextend_percent" not in pool._header:
        pool._header["autoextend_percent"] = DEFAULT_AUTOEXTEND_PERCENT if percent is None else percent
    pool._catalog_dirty = True  # the header alone changed: make the commit write (a new superblock)
    pool.commit()


def _grown(size: int, used: int, threshold: int, percent: int) -> int:
    """lvm2's rule: above ``threshold`` percent use, grow by ``percent`` -- or by the percent that
    brings use back to the threshold, if that is more.  Returns the new size (``size`` if not above)."""
    if size <= 0 or used * 100 <= threshold * size:
        return size
    needed = -(-used * 100 * 100 // (threshold * size)) - 100  # percent growth to get to the threshold
    return size + -(-size * max(percent, needed) // 100)


def autoextend(pool: "Pool", data_full: bool = False) -> None:
    """After a commit: grow the metadata file, then the data device, whichever is above the autoextend
    threshold (a no-op when autoextend is off).  ``data_full``: a write found no data block (the
    kernel's pool is then 100 % full: it allocates block by block, where our batch changes nothing
    when it cannot finish), so the data device counts as fully used.  A failed growth is a warning:
    the commit stands, and the next commit tries again."""
    if not _autoextend_on(pool) or getattr(pool, "_autoextending", False) or pool.read_only or \
            pool.mode in (Mode.FAIL, Mode.READ_ONLY) or pool.header.get("needs_check"):
        return
    threshold, percent = autoextend_settings(pool)
    pool._autoextending = True
    try:
        md = _grown(pool.store.nr_blocks, pool.store.used_blocks(), threshold, percent)
        if md > pool.store.nr_blocks:
            resize_metadata(pool, min(md, MAX_METADATA_BLOCKS) * BLOCK)
        nr = pool.space.nr_blocks
        grown = _grown(nr, nr if data_full else pool.space.used(), threshold, percent)
        if grown > nr:
            resize(pool, grown * pool.block_size)
    except (ThinpoolError, OSError) as exc:
        warnings.warn(f"pool {pool.path}: autoextend failed: {exc}", ThinpoolWarning, stacklevel=3)
    finally:
        pool._autoextending = False


def _check_md_size(pool: "Pool", nbytes: int) -> int:
    blocks = nbytes // BLOCK
    if blocks > MAX_METADATA_BLOCKS:
        raise InvalidArgument(f"pool {pool.path}: metadata size {nbytes} bytes exceeds dm-thin's 15.87GiB limit")
    if blocks < pool.store.nr_blocks:
        raise InvalidArgument(f"pool {pool.path}: cannot shrink the metadata from {pool.store.nr_blocks * BLOCK} "
                              f"to {nbytes} bytes (only growing is supported)")
    return blocks


def _after_metadata_growth(pool: "Pool") -> None:
    """Leave out-of-metadata-space mode (dm-thin: growing the metadata device gets the pool out of
    it) if the grown file has room beyond the reserve."""
    pool._set_md_check()
    if pool.mode == Mode.OUT_OF_METADATA_SPACE and pool._md_room() > 0:
        pool._set_mode(Mode.WRITE)
        pool.read_only_reason = ""


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
    if blocks != pool.store.nr_blocks:
        _grow_store(pool, blocks)
    _after_metadata_growth(pool)
    pool._lwm_fired = False  # a reload and resume for the kernel: pool_resume re-arms the low water event


def resize(pool: "Pool", data_size: int | str | None = None, metadata_size: int | str | None = None) -> None:
    """Grow the data device and, when needed or asked, the metadata file (see :meth:`Pool.resize`)."""
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
    if need > MAX_METADATA_BLOCKS:
        raise InvalidArgument(f"pool {pool.path}: data size {nbytes} bytes is too large: its space map needs "
                              f"{need * BLOCK} bytes of metadata, more than dm-thin's 15.87GiB limit")
    target = md_asked if md_asked is not None else pool.store.nr_blocks
    if target < need:
        if not _autoextend_on(pool):
            raise InvalidArgument(f"pool {pool.path}: the metadata ({pool.store.nr_blocks * BLOCK} bytes) cannot cover a "
                                  f"data size of {nbytes} bytes (needs at least {need * BLOCK} bytes): grow it too "
                                  f"(resize --metadata SIZE, Pool.resize(metadata_size=...)) or turn on autoextend")
        _threshold, percent = autoextend_settings(pool)
        target = min(max(need, pool.store.nr_blocks + -(-pool.store.nr_blocks * percent // 100)), MAX_METADATA_BLOCKS)
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


def punch_freed_blocks(pool: "Pool") -> bool:
    """The pool setting ``punch_freed_blocks``: hole-punch every freed block once it is released
    (off by default: dm-thin keeps a freed block's bytes until something discards it)."""
    return bool(pool._header.get("punch_freed_blocks", False))


def punch_released(pool: "Pool", released: np.ndarray) -> np.ndarray:
    """Hole-punch ``released`` (blocks no durable commit maps any more) and return those whose punch
    failed: they stay pending (retried at the next commit).  Warns with :class:`ThinpoolWarning`."""
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


def release_pending(pool: "Pool", freed: np.ndarray) -> None:
    """After a durable commit: the blocks freed by the previous commit (no superblock maps them now)
    become allocatable -- hole-punched first if a discard passed them down or the pool punches freed
    blocks, else keeping their bytes (stale) -- and the blocks ``freed`` in the committed transaction
    become pending (with any whose punch failed, which are retried)."""
    sp = pool._space
    released = sp.pending
    if len(released) == 0 and len(freed) == 0:  # nothing pending, nothing freed (most commits)
        pool._unpunched = released
        return
    released = released[sp.data_rc[released] == 0]
    punch = released if punch_freed_blocks(pool) else sp.to_punch(released)
    unpunched = punch_released(pool, punch)
    pool._unpunched = unpunched
    if len(unpunched):
        sp.release(np.setdiff1d(released, unpunched), np.setdiff1d(punch, unpunched))
        sp.set_pending(np.union1d(freed, unpunched))
    else:
        sp.release(released, punch)
        sp.set_pending(freed)


def _free_blocks_holding_data(pool: "Pool") -> np.ndarray:
    """Free blocks (count 0) the data file holds bytes for (SEEK_DATA / SEEK_HOLE)."""
    held = pool.data.allocated_blocks()
    sp = pool._space
    held = held[held < sp.nr_blocks]
    if len(held) == 0:  # (a metadata-only pool: the counts need not be decoded)
        return held
    return held[sp.data_rc[held] == 0]


def scrub_on_open(pool: "Pool", punch: bool = True) -> int:
    """At open (and after an abort): the free blocks that hold bytes on the data file (written after
    the last commit by a process that crashed, or freed without a hole punch) are marked stale, so a
    reuse zeroes what its write does not cover.  With ``punch_freed_blocks`` (and ``punch``) they are
    hole-punched instead, except the pending ones (the previous commit still maps them), which are
    marked.  Returns the number of such blocks.  A block whose punch fails is kept unallocatable
    (pending) rather than failing the open."""
    stale = _free_blocks_holding_data(pool)
    if len(stale) == 0:
        return 0
    sp = pool._space
    if not (punch and punch_freed_blocks(pool)):
        sp.mark_stale(stale)
        return len(stale)
    keep = np.isin(stale, sp.pending)
    sp.mark_stale(stale[keep])
    todo = stale[~keep]
    try:
        pool.data.check_stamp()  # never punch a file another pool has taken over
        pool.data.punch(todo)
    except HostIOError as exc:
        if exc.blocks is None:
            raise
        failed = np.asarray(exc.blocks, np.int64)
        failed = failed[sp.data_rc[failed] == 0]
        sp.mark_stale(failed)
        sp.set_pending(np.union1d(sp.pending, failed))
        sp.recount()
        pool._unpunched = np.union1d(pool._unpunched, failed)
        warnings.warn(f"pool {pool.path}: {len(failed)} free data blocks holding data could not be "
                      f"hole-punched ({exc}); they stay unallocatable until a commit punches them",
                      ThinpoolWarning, stacklevel=3)
        return len(stale)
    sp.clear_stale(todo)
    return len(stale)


@dataclass(frozen=True)
class TrimResult:
    """What :func:`trim` did: ``punched_blocks`` free blocks that held bytes were hole-punched (in
    ``punched_runs`` runs of consecutive blocks; ``punched_bytes`` = blocks x block size);
    ``free_blocks`` blocks are free and now all holes; ``held_blocks`` free blocks were left alone
    because a durable commit may still map them (freed in the open transaction or by the last
    commit: trimmed after the next commit)."""

    punched_blocks: int
    punched_runs: int
    punched_bytes: int
    free_blocks: int
    held_blocks: int

    def as_dict(self) -> dict[str, int]:
        """Every field, JSON-ready (what ``thinpool trim --json`` prints)."""
        return {"punched_blocks": self.punched_blocks, "punched_runs": self.punched_runs,
                "punched_bytes": self.punched_bytes, "free_blocks": self.free_blocks,
                "held_blocks": self.held_blocks}


def trim(pool: "Pool") -> TrimResult:
    """thin_trim on the pool: hole-punch every free data block that holds bytes on the data file
    (see :meth:`Pool.trim`).  Only blocks free in the last commit and in the open transaction, and not
    freed by the last commit, are punched: no durable commit (neither the last nor the one before it,
    which open falls back to) maps them, so a crash at any point loses nothing committed."""
    pool._check_writable()
    if pool.header.get("needs_check"):
        raise ReadOnly(f"pool {pool.path} needs check: its free blocks cannot be trimmed until repaired")
    sp = pool._space
    held = pool.data.allocated_blocks()
    held = held[held < sp.nr_blocks]
    todo = held[sp.is_allocatable(held)]
    nruns = 0
    if len(todo):
        pool.data.check_stamp()  # never punch a file another pool has taken over
        try:
            nruns = pool.data.punch(todo)
        except HostIOError as exc:
            if exc.blocks is not None:  # the others were punched: they are holes now
                sp.clear_stale(np.setdiff1d(todo, np.asarray(exc.blocks, np.int64)))
            raise HostIOError(f"pool {pool.path}: trim could not hole-punch every free block: {exc}",
                              exc.errno or errno.EIO, exc.filename, blocks=exc.blocks) from None
    sp.clear_stale_allocatable()
    free = sp.nr_blocks - sp.used()
    return TrimResult(punched_blocks=len(todo), punched_runs=nruns, punched_bytes=len(todo) * pool.block_size,
                      free_blocks=free, held_blocks=sp.held_free_count())
