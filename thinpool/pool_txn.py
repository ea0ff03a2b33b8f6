"""The pool's transactions: commit, abort, the metadata-space watch, the metadata snapshot.

:class:`Transactions` is a mixin of :class:`thinpool.pool.Pool` (the methods are the pool's; they
live here so each module holds one concept).  A commit flushes the data device, then writes the
changed pages through :class:`~thinpool.mdstore.MetadataStore` (copy-on-write, one atomic
superblock switch); see :meth:`Transactions.commit` for what a failure leaves.
"""

from __future__ import annotations

import contextlib
import errno
import functools
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast

import numpy as np

from . import catalog as cat_format
from . import rules
from . import schema as K
from .devtable import DEVS_PER_PAGE, pad_pages
from .errors import HostIOError, InvalidArgument, MetadataSpaceExhausted, ReadOnly
from .hostio import DataIO
from .kernel_context import locked_method as _locked
from .mdstore import FileIO
from .nodestore import NodeDisk
from .mdpages import BLOCK, STORE_KEYS, PagedArray
from .schema import DevFlag, Mode

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

    from .blockmap import BlockMap
    from .check import CheckReport
    from .datadev import DataDevice, NullDataDevice
    from .dataspace import DataSpaceMap
    from .kernel_context import KernelContext
    from .mdstore import MetadataStore
    from .pool import Pool
    from .poolspace import TrimResult


class NoFlushFileIO(FileIO):
    """The metadata store's system calls for a pool opened with ``flush=False`` (a scratch pool):
    writes as usual, flushes skipped.  Commits stay ordered and atomic against a crash of the process
    (the page cache holds every write), not against a crash of the host."""

    @staticmethod
    def fdatasync(fd: FileDescriptorLike) -> None:
        """No flush (see the class)."""


class NoFlushDataIO(DataIO):
    """The data file's system calls for a pool opened with ``flush=False``: flushes skipped, hole
    punches as usual."""

    @staticmethod
    def fdatasync(fd: FileDescriptorLike) -> None:
        """No flush (see :class:`NoFlushFileIO`)."""


@functools.cache
def _poolspace() -> Any:
    """:mod:`thinpool.poolspace` (imported on first use: it imports this module's users; a commit
    asks for it every time, so the module is kept rather than imported again)."""
    from . import poolspace
    return poolspace


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class Transactions:
    """The transaction methods of :class:`~thinpool.pool.Pool` (see the module docstring)."""

    _devs: np.ndarray
    _devs_dirty: set[int]
    _catalog: dict[str, Any]
    _catalog_dirty: bool
    _catalog_convert: bool
    _catalog_touched: set[str]
    _stored_catalog: cat_format.StoredCatalog
    _header: dict[str, Any]
    _st: np.ndarray
    _unpunched: np.ndarray
    _lwm_fired: bool
    _md_check_below: int
    _md_fixed: int  # _md_fixed_pages() as a commit's bookkeeping counted it (see commit)
    _leaf_disk: NodeDisk        # what the last commit stored of the leaves (set by Pool._install)
    _inner_disk: NodeDisk       # ... and of the inner nodes
    _disk_next: tuple[NodeDisk, NodeDisk]  # what the commit being written stores of both
    _batch_depth: int = 0
    # what these methods use of the rest of Pool (pool.py; set by Pool.__init__ and Pool._install)
    path: str
    read_only: bool
    on_low_water: Callable[[Pool], None] | None
    on_metadata_low_water: Callable[[Pool], None] | None
    _md_low: bool | None  # free metadata was at or below its low water mark at the last check (None: no check yet)
    _closed: bool
    _store: MetadataStore
    _space: DataSpaceMap
    _nodes_map: BlockMap
    _engine: KernelContext
    _data: DataDevice | NullDataDevice
    _devs_i: np.ndarray
    if TYPE_CHECKING:  # Pool's, declared here for the type checker only (nothing is defined at run time)
        @property
        def mode(self) -> Mode: ...
        @property
        def time(self) -> int: ...
        @property
        def transaction_id(self) -> int: ...
        def _set_mode(self, value: Mode | str) -> None: ...
        def _check_open(self) -> None: ...
        def _check_writable(self) -> None: ...
        def _load(self) -> None: ...
        def check(self) -> CheckReport: ...
    #: the last hints (:meth:`_hints`) and the table they were counted from: (per slot whether it is in
    #: use, its device id; the hints); None: count them from the whole table (after a load)
    _hints_of: tuple[np.ndarray, np.ndarray, dict[str, int]] | None = None

    #: superblock fields a commit rewrites itself (never a reason to commit)
    _STORE_FIELDS = frozenset(("pending_blocks", "catalog_bytes", "metadata_used_blocks") + STORE_KEYS)

    def _hints(self) -> dict[str, int]:
        """What a commit records of the devices for a light open (:mod:`thinpool.device_hints`:
        ``dev_id_max``, ``nr_thins``, ``free_slot``), kept up to date from the slots changed since the
        last call (every slot changed is marked dirty: the commit writes its page), so a commit of a
        100,000-volume pool does not scan its table; counted from the whole table after a load
        (``Pool._install`` drops what was kept), when the device with the largest id leaves its slot,
        or when more slots changed than :data:`thinpool.device_hints.MANY_DEVS`."""
        from . import device_hints
        devs = self._devs
        kept = self._hints_of
        if kept is not None:
            updated = device_hints.update(kept, devs, self._devs_i, self._devs_dirty)
            if updated is not None:
                self._hints_of = updated
                return dict(updated[2])
        self._hints_of = device_hints.count(devs)
        return dict(self._hints_of[2])

    def commit_passdown(self) -> None:
        """If the last commit freed blocks a discard passed down, commit once more: they are released and
        hole-punched now.  Passdown punches a block once no durable commit maps it (after the commit that
        frees it and the next one); the pending list a commit records does not say which blocks a discard
        passed down, so a pool closed before that next commit would leave them holding their bytes.
        :meth:`close` calls it, and so does the CLI after each command's commit."""
        sp = self._space
        if not self._closed and len(sp.pending) and len(sp.to_punch(sp.pending)):
            self.commit()

    # ------------------------------------------------------------------ has anything changed?
    def _header_now(self) -> dict[str, Any]:
        """The superblock fields the next commit writes (those the pool keeps, with the live counters)."""
        hdr = dict(self._header)
        hdr.update(time=self.time, cursor=int(self._st[K.ST_CURSOR]), nr_data_blocks=self._space.nr_blocks,
                   used_data_blocks=self._space.used())
        return hdr

    def _changed(self, *, release: bool = True) -> bool:
        """Whether anything would reach the metadata since the last commit: a dirty page, a freed
        block, a superblock field -- and, with ``release``, blocks the last commit freed, which the
        next one releases.  dm-thin's ``in_service`` flag: ``__commit_transaction`` writes nothing
        without a change."""
        bm, sp = self._nodes_map, self._space
        if self._catalog_dirty or self._devs_dirty:
            return True
        if release and (len(sp.pending) or len(self._unpunched)):
            return True
        if bm.leaf_dirty.any() or bm.inner_dirty.any() or bm.leaf_rc_dirty.any() or bm.inner_rc_dirty.any() \
                or sp.rc_dirty.any():
            return True
        committed = self._store.header
        return any(committed.get(k) != v for k, v in self._header_now().items() if k not in self._STORE_FIELDS)

    # ------------------------------------------------------------------ messages and batches
    def _message_done(self) -> None:
        """A pool message succeeded: commit, as dm-thin's ``pool_message`` does -- unless a
        :meth:`batch` is open, which commits once at its end."""
        if self._batch_depth == 0:
            self.commit()

    @contextlib.contextmanager
    def batch(self) -> Iterator[Any]:
        """``with pool.batch(): ...``: pool messages inside (create, snapshot, delete, rename, ...)
        skip their own commit; leaving the block commits once.  The batch is one transaction:
        uncommitted changes made before it are committed when it opens, and if the block raises,
        the pool aborts back to that commit (everything the batch did is dropped) and the exception
        goes on.  Batches nest (only the outermost one commits or aborts) and are pool-wide: a
        message another thread sends meanwhile is part of the batch too.  The kernel has no batches
        (every message commits); this is thinpool's explicit option for bulk work (docs/design.md,
        "Differences from the kernel")."""
        with self._engine.lock:
            self._check_open()
            outer = self._batch_depth == 0
            if outer and not self.read_only and self._changed(release=False):
                self.commit()
            self._batch_depth += 1
        try:
            yield self
        except BaseException:
            with self._engine.lock:
                self._batch_depth -= 1
                if outer and not self._closed:
                    self.abort()
            raise
        with self._engine.lock:
            self._batch_depth -= 1
            if outer and not self._closed:
                self.commit()

    def commit_if_changed(self) -> bool:
        """dm-thin's periodic commit (``do_waker`` wakes the worker every ``COMMIT_PERIOD``, one
        second, and ``process_deferred_bios`` commits if ``dm_pool_changed_this_transaction``): commit
        if anything changed since the last commit; returns whether it did.  Does nothing -- returns
        False -- on a closed or read-only pool, in a mode that allows no commit (out-of-metadata-space,
        read-only, fail) and inside a :meth:`batch`, which commits once at its end.  A served pool
        (``thinpool serve``) calls it every second."""
        with self._engine.lock:
            if self._closed or self.read_only or self._batch_depth or \
                    self.mode not in (Mode.WRITE, Mode.OUT_OF_DATA_SPACE) or not self._changed(release=False):
                return False
            self.commit()
            return True

    # ------------------------------------------------------------------ transactions
    def _paged(self) -> dict[str, Any]:
        bm, sp = self._nodes_map, self._space
        # the nodes' pages (see nodestore); what they store becomes the pool's once the commit is durable
        leaf_pages, leaf_next = self._leaf_disk.updates(bm.leaves, bm.leaf_rc, bm.leaf_dirty)
        inner_pages, inner_next = self._inner_disk.updates(bm.inners, bm.inner_rc, bm.inner_dirty)
        self._disk_next = (leaf_next, inner_next)
        arrays = {
            **leaf_pages,
            **inner_pages,
            "leaf_rc": PagedArray(bm.leaf_rc.view(np.uint8), bm.leaf_rc_dirty.nonzero()[0]),
            "inner_rc": PagedArray(bm.inner_rc.view(np.uint8), bm.inner_rc_dirty.nonzero()[0]),
            **sp.disk_updates(self._store.locs),
            # (a few device ids: a set of Python ints costs less than numpy steps)
            "devs": PagedArray(self._devs.view(np.uint8), sorted({d // DEVS_PER_PAGE for d in self._devs_dirty})),
        }
        if self._catalog_dirty or self._catalog_convert:
            # the names touched since the last commit reach the stored catalog: a page or two of
            # its name index and slot records (thinpool.catalog), the whole of it when converting
            stored = self._stored_catalog
            cat_format.apply_changes(stored, self._catalog["volumes"], self._catalog_touched)
            self._header.update(next_dev_id=int(self._catalog.get("next_dev_id", 1)),
                                next_gen=int(self._catalog.get("next_gen", 1)))
            arrays.update(stored.updates(len(self._devs), rules.catalog_dumps, self._header))
        return arrays

    @_locked
    def _check_file_length(self, check: Callable[[], None]) -> None:
        """Run ``check`` (a file's length check: HostIOError when another program truncated it); on a
        short file the pool goes to ``fail`` mode and the commit is refused, nothing of it durable."""
        try:
            check()
        except HostIOError as exc:
            self._set_mode(Mode.FAIL)
            self.read_only_reason = str(exc)
            raise HostIOError(f"pool {self.path}: commit refused, nothing of it is durable (the pool has failed: "
                              f"reopen it): {exc}", exc.errno or errno.EIO, exc.filename) from None

    def commit(self) -> None:
        """Make everything done so far durable, atomically (data is flushed before metadata).

        Blocks freed by the previous commit become allocatable (blocks freed in this transaction after the
        next commit); they keep their bytes, as in dm-thin, unless a discard passed them down or the pool
        has ``punch_freed_blocks``: those are hole-punched first (a block whose punch fails stays
        unallocatable, with a :class:`~thinpool.errors.ThinpoolWarning`, until a later punch succeeds).  If
        the host filesystem refuses a write (ENOSPC, EIO, a short write that cannot be completed) the commit
        raises :class:`~thinpool.errors.HostIOError` and nothing of it is durable: the pool keeps its
        changes and a later commit may retry.  If a *flush* fails the pool goes to ``fail`` mode (Linux may
        report a lost write to one flush only, so no retry can be trusted): every further commit raises
        until the pool is reopened, which finds the last durable commit.  A pool in ``fail`` mode never
        reports a commit as done.
        """
        self._check_open()
        self._engine.fault_check()  # rows mapped from a truncated metadata file faulted: fail, never commit them
        if self.mode == Mode.FAIL:
            raise HostIOError(f"pool {self.path} has failed and must be reopened; nothing since its last "
                              f"durable commit was committed ({getattr(self, 'read_only_reason', '')})")
        if self.read_only:
            return
        # the data file as long as the pool: another program's truncation took mapped blocks
        self._check_file_length(self._data.check_length)
        if self.mode in (Mode.READ_ONLY, Mode.OUT_OF_METADATA_SPACE):
            # no metadata change is possible in these modes (dm-thin's commit() refuses); the writes
            # they serve (provisioned, unshared blocks) reach the data file, and a FLUSH flushes it
            self._sync_data()
            return
        if not self._changed():
            # nothing for the metadata (dm-thin's commit writes nothing when not in_service); a
            # FLUSH of such a pool still reaches the data device, as the kernel remaps it there
            self._sync_data()
            return
        # the metadata file as long as the store knows it, before a row mapped from it is read
        self._check_file_length(self._store.check_length)
        # the data file's flush starts now on the helper thread (datadev.BackgroundFlush) and runs while
        # the pages are made, written and flushed; the store ends it (``before_superblock``) before it
        # writes the superblock: data and pages durable, then the superblock that refers to them
        self._data.start_sync()
        try:
            try:
                freed = self._space.freed_blocks()
                record = np.union1d(freed, self._unpunched) if len(self._unpunched) else freed
                arrays = self._paged()
                if len(record) or len(self._space.pending):
                    arrays["pending"] = PagedArray(pad_pages(record.astype(np.uint64).tobytes()),
                                                   np.arange(max(1, _round_up(len(record) * 8, BLOCK) // BLOCK)))
                self._header["pending_blocks"] = len(record)  # always: a stale count would resurrect an old list
                self._header.update(time=self.time, cursor=int(self._st[K.ST_CURSOR]),
                                    nr_data_blocks=self._space.nr_blocks,
                                    used_data_blocks=self._space.used())  # for readers that skip the space map
                # before the first page is written, no metadata row read while the pages were made
                # faulted (fault_check); the data file's flush ends inside the store's commit, once the
                # pages are written and before the superblock is; the superblock is made while the
                # pages' write-back runs, and the commit's bookkeeping runs while the superblock's does
                # (mdcommit.START_WRITEBACK)
                self._store.commit(arrays, self._header, hints=self._hints, before_write=self._engine.fault_check,
                                   before_superblock=self._sync_data, while_flushing=self._committed_in_memory)
            except BaseException:
                self._end_data_flush()  # (a commit that failed before the store ended the flush)
                raise
        except MetadataSpaceExhausted as exc:
            # the reserve did not cover this commit (one batch of writes larger than it): a metadata
            # operation really failed -- dm-thin's metadata_operation_failed()
            self._metadata_operation_failed(f"commit: {exc}")
            raise ReadOnly(f"pool {self.path}: a commit found no metadata space even in the reserve; the "
                           f"transaction was aborted, needs_check is set and the pool is read-only ({exc}); "
                           f"run 'thinpool check --clear-needs-check' or 'thinpool repair', then grow the "
                           f"metadata") from None
        except HostIOError as exc:
            flushed = bool(self._store.failed)
            if flushed:
                self._set_mode(Mode.FAIL)
                self.read_only_reason = str(exc)
            raise HostIOError(f"pool {self.path}: commit failed, nothing of it is durable" +
                              (" (the pool has failed: reopen it; the last durable commit is kept)" if flushed
                               else " (the changes are kept; a later commit retries)") + f": {exc}",
                              exc.errno or errno.EIO, exc.filename) from None
        # blocks freed by the previous commit: no superblock maps them any more (punched if passed down)
        released = len(self._space.pending) or len(freed)
        _poolspace().release_pending(self, freed)
        if self.mode == Mode.OUT_OF_DATA_SPACE and self._st[K.ST_NR_FREE] > 0:
            # dm-thin's check_for_data_space after every commit: free blocks -> write mode at once.
            # Blocks this commit freed are free (the kernel's count) though released only by the
            # next commit, which the allocating write makes itself (see thin.Thin._submit)
            self._set_mode(Mode.WRITE)
        # (the pages counted by the bookkeeping, while the superblock's I/O ran: counted again if
        # blocks were released, whose failed punch marks pages live)
        self._set_md_check(None if released else self._md_fixed)
        self._check_metadata_low_water()
        if "autoextend_threshold" in self._header:  # (not set: off, poolspace.autoextend_settings)
            self._autoextend()  # LVM's thin_pool_autoextend policy, when set
        self._check_for_metadata_space()

    def _committed_in_memory(self) -> None:
        """A commit's bookkeeping: what it wrote is the stored state, nothing is dirty.  The store calls
        it once the superblock is written and its write-back started, before its ``fdatasync``: the
        commit can then fail only by that flush, which puts the pool in ``fail`` mode (nothing
        commits again before a reopen).  What others may see -- freed blocks released or punched,
        mode changes, low water events -- waits for :meth:`commit`'s end, after the flush."""
        self._leaf_disk, self._inner_disk = self._disk_next
        bm = self._nodes_map
        bm.leaf_dirty[:] = 0
        bm.inner_dirty[:] = 0
        bm.leaf_rc_dirty[:] = 0
        bm.inner_rc_dirty[:] = 0
        self._space.committed()  # the pages changed stay live (scans visit those only)
        self._devs_dirty.clear()
        if self._catalog_dirty or self._catalog_convert:
            self._stored_catalog.committed()
        self._catalog_touched.clear()
        self._catalog_dirty = self._catalog_convert = False
        self._md_fixed = self._md_fixed_pages()  # (for _set_md_check once the flush returned)

    def _md_reserve(self) -> int:
        """The metadata blocks kept back for the commit that enters out-of-metadata-space mode: dm-thin's
        reserve, and at least what a small commit needs (a tiny metadata file's tenth may not hold one)."""
        return max(rules.metadata_reserve(self._store.nr_blocks), self._store.commit_floor())

    def _md_room(self) -> int:
        """Free metadata blocks beyond the reserve, less what a commit with nothing dirty needs
        (dm-thin's free metadata count, which hides the reserve)."""
        return self._store.free_blocks() - self._md_reserve() - self._store.estimate_commit_blocks({})

    def _check_metadata_low_water(self) -> None:
        """dm-thin's metadata threshold (``check_threshold`` in dm-space-map-metadata.c, registered by
        ``pool_ctr`` with ``calc_metadata_threshold``): after the metadata blocks a commit allocated,
        free metadata blocks (all of them: the reserve counts as free here) at or below
        min(1024, metadata blocks / 4) raise the event -- edge-triggered: once when the count falls
        to the mark, and again only after an allocation saw it above the mark (grown metadata, a
        delete), not on resume as the data mark."""
        low = self._store.free_blocks() <= min(1024, self._store.nr_blocks // 4)
        was, self._md_low = self._md_low, low
        if low and not was and self.on_metadata_low_water is not None:
            self.on_metadata_low_water(cast("Pool", self))

    def _check_for_metadata_space(self) -> None:
        """After a commit (dm-thin's check_for_metadata_space): no room beyond the reserve -> the
        out-of-metadata-space mode, which serves only writes that need no metadata change."""
        if self.mode in (Mode.WRITE, Mode.OUT_OF_DATA_SPACE) and self._md_room() <= 0:
            self._set_mode(Mode.OUT_OF_METADATA_SPACE)
            self.read_only_reason = (f"{self._store.free_blocks()} of {self._store.nr_blocks} metadata blocks "
                                     f"free, a reserve of {self._md_reserve()} kept")

    def _metadata_operation_failed(self, reason: str) -> None:
        """dm-thin's metadata_operation_failed(): abort the transaction, set needs_check (written
        to the superblock: it survives a reopen) and go read-only."""
        fired = self._lwm_fired
        self._load()
        self._lwm_fired = fired  # (an abort is no resume: the low water event stays fired)
        self._header["needs_check"] = True
        try:
            self._store.commit({}, self._header_now(), hints=self._hints())  # the superblock only (and its directory)
        except (MetadataSpaceExhausted, HostIOError) as exc:
            reason += f"; needs_check could not be written ({exc})"
        self._set_mode(Mode.READ_ONLY)
        self.read_only_reason = reason

    def _sync_data(self) -> None:
        try:
            self._data.sync()
        except HostIOError:
            self._store.failed = self._store.failed or "the data file's flush failed"
            raise

    def _end_data_flush(self) -> None:
        """End the data file's flush a commit started, if the commit failed before the store ended it:
        a failed flush fails the store (Linux reports a lost write once), and the commit's own error
        goes on."""
        try:
            self._data.end_sync()
        except HostIOError:
            self._store.failed = self._store.failed or "the data file's flush failed"

    @_locked
    def abort(self) -> None:
        """Drop everything since the last commit (dm-thin's transaction abort).  The low water event
        stays fired (only a resume re-arms it: a reopen, a resize, :meth:`set_features`)."""
        self._check_open()
        fired = self._lwm_fired
        self._load()
        self._lwm_fired = fired
        if self._data.nr_blocks != self._space.nr_blocks:  # a resize since the last commit is undone too
            self._data.resize(self._space.nr_blocks)
        if not self.read_only:
            _poolspace().scrub_on_open(self)

    @_locked
    def clear_needs_check(self) -> "CheckReport":
        """thin_check's ``--clear-needs-check-flag``: check the metadata and, if it is sound, clear
        the superblock's needs_check flag (one superblock write) and leave read-only mode.  Returns the
        check report; with problems nothing changes (``thinpool repair`` is the way then)."""
        self._check_open()
        if self.read_only:
            raise ReadOnly(f"pool {self.path} is opened read-only: reopen it writable to clear needs_check")
        report = self.check()
        if report.ok and self._header.get("needs_check"):
            hdr = self._header_now()
            hdr["needs_check"] = False
            self._store.commit({}, hdr, hints=self._hints())
            self._header["needs_check"] = False
            self._set_mode(rules.derive_mode(False))
            self.read_only_reason = ""
        return report

    @_locked
    def set_transaction_id(self, old: int, new: int) -> None:
        """dm-thin's ``set_transaction_id <old> <new>``: compare-and-swap of the userspace id."""
        self._check_writable()
        if old != self.transaction_id:
            raise InvalidArgument(f"pool {self.path}: mismatched transaction id (pool has "
                                  f"{self.transaction_id}, caller said {old})")
        if not isinstance(new, int) or not 0 <= new < 1 << 64:
            raise InvalidArgument(f"transaction id {new!r} must be an unsigned 64-bit integer")
        self._header["transaction_id"] = new
        self._message_done()

    @_locked
    def resize(self, data_size: int | str | None = None, metadata_size: int | str | None = None) -> None:
        """Grow the data device (dm-thin cannot shrink) and/or the metadata file (never shrinks);
        leaves out-of-data-space mode; commits.  ``pool.resize(metadata_size="64MiB")`` grows only the
        metadata (:meth:`resize_metadata`).

        Before anything changes, the metadata's room for the bigger data space map is checked: if the
        metadata file cannot hold it, it is grown first -- to ``metadata_size`` if given, else by the
        autoextend percent when autoextend is on (:meth:`set_autoextend`) -- and otherwise the resize
        is refused (InvalidArgument) with both files unchanged.  A resize whose commit fails is rolled
        back (the data file keeps its old size)."""
        _poolspace().resize(self, data_size, metadata_size)

    @_locked
    def set_autoextend(self, threshold: int, percent: int | None = None) -> None:
        """LVM's autoextend policy as a pool setting (``thin_pool_autoextend_threshold`` /
        ``thin_pool_autoextend_percent``): after each commit, when metadata or data use is above
        ``threshold`` percent, that space grows by ``percent`` percent of its size (or more, if needed
        to get back to the threshold).  ``threshold=100`` turns it off (the default); below 50 counts as
        50, as in LVM; ``percent`` defaults to 20 (LVM's) or the value set before.  Commits."""
        _poolspace().set_autoextend(self, threshold, percent)

    @_locked
    def trim(self) -> "TrimResult":
        """thin_trim: hole-punch every free data block that still holds bytes, returning the host space
        (a :class:`~thinpool.poolspace.TrimResult`).  Freed blocks keep their bytes otherwise, as in
        dm-thin.  Only blocks no durable commit maps are punched: those free in the last commit and
        not freed since (blocks freed in the open transaction or by the last commit are trimmed after
        the next commit), so a crash during a trim loses nothing committed.  ``thinpool trim POOL``
        commits first, so on an idle pool it punches every free block."""
        return _poolspace().trim(self)

    @_locked
    def resize_metadata(self, metadata_size: int | str) -> None:
        """Grow the metadata file to ``metadata_size`` bytes (never shrinks; at most 15.87 GiB).

        The way out of metadata space: a pool in out-of-metadata-space mode returns to write mode
        (then e.g. ``delete`` frees space).  Nothing else changes;
        the next commit uses the new room.  ``thinpool resize POOL --metadata-size SIZE``."""
        _poolspace().resize_metadata(self, metadata_size)

    def _autoextend(self, data_full: bool = False) -> None:
        """Apply the autoextend policy now: after a commit, and when a write runs out of data space
        (``data_full``: the data device counts as 100 % used)."""
        _poolspace().autoextend(self, data_full=data_full)

    def _md_fixed_pages(self) -> int:
        """A bound of the metadata pages besides the nodes' (reference counts, space map, device table)."""
        bm = self._nodes_map
        return (len(bm.leaf_rc) + len(bm.inner_rc)) // 1024 + self._space.disk_pages_bound() + \
            len(self._devs) // DEVS_PER_PAGE + 8

    def _set_md_check(self, fixed: int | None = None) -> None:
        """Live node count below which a commit surely fits in the metadata file (see _after_alloc);
        refreshed at every load and commit (the other pages only grow between them).  ``fixed``:
        :meth:`_md_fixed_pages` if counted already for the pool as it is (a commit's bookkeeping)."""
        if fixed is None:
            fixed = self._md_fixed_pages()
        reserve = self._md_reserve()
        self._md_check_below = (self._store.nr_blocks - 16 - reserve) // 2 - fixed - 64

    def _check_low_water(self, free: int) -> None:
        """dm-thin's check_low_water_mark(pool, free): an allocation that saw ``free`` data blocks at or
        below the low water mark raises the event once (again only after the kernel's resume: here a
        reopen, a data or metadata resize, set_features; not an abort)."""
        if not self._lwm_fired and free <= self._header["low_water_mark"]:
            self._lwm_fired = True
            if self.on_low_water is not None:
                self.on_low_water(cast("Pool", self))

    def _after_alloc(self) -> None:
        item = self._st.item  # Python ints: this runs after every allocating write
        # dm-thin's check_low_water_mark runs in alloc_data_block *before* each allocation, on the
        # free count then (blocks allocatable in this transaction, ours plus those pending release):
        # the write's last allocation saw one more free block than there is now
        if not self._lwm_fired:
            self._check_low_water(item(K.ST_NR_ALLOCATABLE) + len(self._space.pending) + 1)
        if item(K.ST_LEAVES_LIVE) + item(K.ST_INNERS_LIVE) < self._md_check_below:
            return  # far from the metadata limit: skip the estimate
        bm = self._nodes_map
        live = int(self._st[K.ST_LEAVES_LIVE] + self._st[K.ST_INNERS_LIVE]) + \
            (len(bm.leaf_rc) + len(bm.inner_rc)) // 1024 + self._space.disk_pages_bound() + \
            len(self._devs) // DEVS_PER_PAGE + 8
        reserve = self._md_reserve()
        if 2 * live + 16 + reserve > self._store.nr_blocks:
            needed = self._store.estimate_commit_blocks(self._paged())
            if needed > self._store.free_blocks() - reserve:
                # dm-thin's alloc_data_block: "commit before we use up the metadata reserve"; the
                # reserve lets this commit through, and the check after it enters
                # out-of-metadata-space mode if there is still no room
                self.commit()

    # ------------------------------------------------------------------ metadata snapshot
    @_locked
    def reserve_metadata_snap(self) -> None:
        """Commit and hold a read-only view of the metadata (dm-thin's ``reserve_metadata_snap``).

        Only one is held at a time: with one held this raises AlreadyExists (the kernel's EBUSY) --
        after committing, as the kernel does (``process_reserve_metadata_snap_mesg`` commits, then
        ``__reserve_metadata_snap`` commits again before it finds the held root).

        Every data block the snapshot maps stays in use until it is released, whatever the volumes do
        meanwhile (delete, discard, copy-on-write): the kernel's held root references the mapping
        trees, so their leaves keep their data blocks' counts; here each such block gains one
        reference (:meth:`held_data_blocks`), dropped by :meth:`release_metadata_snap`.  So a backup
        reading the data blocks the held view maps (``thin_delta -m``, ``thin_dump -m``) never reads a
        block reused by another volume."""
        from . import metadata_snap
        metadata_snap.reserve(cast("Pool", self))

    @_locked
    def release_metadata_snap(self) -> None:
        """Release the held metadata snapshot (dm-thin's ``release_metadata_snap``): the data blocks only
        it mapped are freed (allocatable after the commits, as any freed block)."""
        from . import metadata_snap
        metadata_snap.release(cast("Pool", self))

    def held_data_blocks(self) -> np.ndarray:
        """The data blocks the held metadata snapshot maps, each once, that it keeps in use (one
        reference each, taken by :meth:`reserve_metadata_snap`); empty when none is held."""
        from . import metadata_snap
        return metadata_snap.held_data_blocks(cast("Pool", self))
