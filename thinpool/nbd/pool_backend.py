"""The NBD server's backend over a live :class:`~thinpool.pool.Pool`: every thin volume is an export.

Wiring (the :class:`~thinpool.nbd.backend.Export` interface onto the library):

* export name = volume name; size = the volume's virtual size; ``block_size`` = the pool's data block
  size (advertised as the preferred block size);
* ``pread``/``pwrite`` -> :meth:`Thin.read` / :meth:`Thin.write` (first writes provision blocks, writes
  to shared blocks break sharing by copy-on-write); a write that finds the pool out of data space
  fails with ``ENOSPC`` under ``error_if_no_space``, and under ``queue_if_no_space`` (the default) is
  held -- its connection waits, the pool's lock is released so other connections and the control
  socket go on -- until a resize or freed blocks make room, or ``ENOSPC`` after the pool's
  ``no_space_timeout``; if the client hangs up meanwhile the write is dropped, unwritten;
* ``flush`` (and every FUA write) -> :meth:`Pool.commit` -- dm-thin commits its metadata on FLUSH/FUA,
  so a flushed write survives a crash of the serving process;
* ``trim`` -> :meth:`Thin.discard`: the whole blocks the range covers are unmapped (dm-thin's rule,
  partial blocks keep their data); with discard passdown (the default) the freed data blocks are
  punched out of the data file after the commits that free them.  A pool with ``ignore_discard``
  advertises no TRIM (``can_trim`` false: TRIM gets EINVAL) and its ``write_zeroes`` writes zeroes;
* ``write_zeroes`` with ``may_trim`` (no ``NO_HOLE``): whole blocks are discarded and only the partial
  edges are zeroed, and only where they are mapped (an unmapped edge already reads as zeroes) -- so
  ``nbdcopy`` of a mostly empty image allocates almost nothing; with ``NO_HOLE`` real zeroes are written
  and the range stays provisioned;
* ``extents`` -> :meth:`Thin.mapped_ranges`: unmapped blocks are ``HOLE|ZERO``, mapped ones data;
* a volume on an external origin (:meth:`thinpool.pool.Pool.create_thin`): unmapped blocks read from
  the origin like any READ; below the origin's end every extent is data (an unmapped block is the
  origin's data, not a hole) and ``write_zeroes`` writes real zeroes there (unmapping would expose the
  origin's bytes again); past its end the rules above apply.

The provider's ``lock`` *is* the pool's re-entrant lock, so every NBD request, every control-socket op
(``thinpool snapshot`` while served) and every library call are serialised: a snapshot taken through the
control socket is a point-in-time image of all requests completed before it.

Exports are bound to the volume's device id and creation generation (the catalog's ``gen``, see
:func:`thinpool.devtable.new_catalog_entry`), not its name: renaming a volume that a client has open
keeps the connection working; if the volume goes away (an abort drops a volume created in the open
transaction) the connection's requests fail with ``EIO`` -- also after a new volume was created with
the same device id, which never receives a stale client's writes.
Each connection holds its volume active (:meth:`thinpool.pool.Pool.activate`, holder
``"NBD connection"``) until it ends: deleting a volume a client has open raises
:class:`~thinpool.errors.Busy` (EBUSY), as dm-thin refuses to delete an open thin device.
Read-only: the provider-wide flag, a pool opened read-only, and the volume's own read-only flag
(committed containerd snapshots, snapshotter views) all make the export read-only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from typing import Any

import numpy as np

from thinpool.errors import FailedPrecondition, NotFound, ReadOnly
from thinpool.poollock import read_binding
from thinpool.rules import NO_METADATA_CHANGE
from thinpool.nbd.wire import MAX_STRING
from thinpool.nbd.backend import MAPPED, UNMAPPED, Payload, check_range, split_by_blocks

log = logging.getLogger("thinpool.nbd")
_fstat = os.fstat

#: The most bytes one ``extents`` call looks at; the server accepts shorter answers (BLOCK_STATUS may
#: describe less than was asked; a READ falls back to one data chunk), and 1 GiB is more than any READ.
MAX_EXTENTS_SPAN = 1 << 30
#: the holder an NBD connection counts as (:meth:`thinpool.pool.Pool.holders`)
NBD_HOLDER = "NBD connection"
#: Chunk size for writing real zeroes (``NO_HOLE``).
ZERO_CHUNK = 4 * 1024 * 1024


class PoolExport:
    """One thin volume of a served pool, as an NBD export (see the module docstring).

    Not thread-safe on its own: the NBD session calls it while holding the provider's lock (the
    pool's lock).  Thin's methods take the same re-entrant lock again, so direct calls are safe too.
    """

    def __init__(self, provider: "PoolProvider", name: str, read_only: bool) -> None:
        pool = provider.pool
        thin = pool.thin(name)
        self.provider = provider
        self.pool = pool
        self.dev_id = thin.dev_id
        #: the catalog entry of the volume opened: identity (and its creation generation ``gen``) tell
        #: this volume from a later one that reuses the device id
        self._entry = pool.catalog["volumes"][name]
        self.gen = self._entry.get("gen")
        self.key = (self.dev_id, self.gen)
        self._stale = False
        self.name = name
        self.size = thin.size
        self.block_size = pool.block_size
        self.read_only = bool(read_only or provider.read_only or pool.read_only or thin.read_only)
        self.description = f"thin volume {name!r} (dev id {self.dev_id}) of pool {pool.path}"
        self._closed = False
        self._handle = thin
        #: the volume's external origin's size (None: no origin): unmapped blocks below it are its
        #: data, not holes (extents), and must not be unmapped to make zeroes (write_zeroes)
        origin = thin.external_origin
        self.origin_size: int | None = None if origin is None else int(origin["size"])
        #: the connection holds the volume active (dm-thin's open_count): deleting it raises Busy
        self._activation = pool.activate(name, holder=NBD_HOLDER)
        #: set by the NBD session: true once the connection is gone (a write queued for space gives up)
        self.cancel_check: Any = None
        self._just_read: tuple[int, int] | None = None  # see extents()
        #: the session may send a READ of at most this many bytes as one data chunk without asking
        #: for its extents (the answer would be "allocated", see extents())
        self.dense_read_max = self.block_size

    # ------------------------------------------------------------------ helpers
    def _thin(self) -> Any:
        """The volume's current Thin handle, bound by device id and creation generation (a rename does
        not matter; a volume deleted -- even if another one was created with its device id since --
        is gone for good: NotFound, which the client sees as EIO)."""
        thin = self._handle
        pool = self.pool
        volumes = pool.catalog["volumes"]
        if volumes.get(thin.name) is self._entry:
            return thin  # the cached handle still names our volume (same catalog entry)
        # renamed, deleted, or the catalog was reloaded (an aborted commit): look for our device
        name = pool.name_of(self.dev_id)
        entry = volumes.get(name) if name is not None else None
        if self._stale or entry is None or entry.get("gen") != self.gen or entry.get("dev_id") != self.dev_id:
            self._stale = True
            raise NotFound(f"export {self.name!r}: thin device {self.dev_id} (generation {self.gen}) was "
                           f"deleted while it was being served" +
                           (f"; device id {self.dev_id} now belongs to a new volume {name!r}" if entry else ""))
        self._entry = entry
        self._handle = thin = pool.thin(name)
        return thin

    def read_binding(self) -> Any:
        """The volume's binding for the session's compiled read loop (:func:`thinpool.poollock.read_binding`;
        call with the provider's lock held), or None when its reads must take :meth:`pread`: the volume is
        gone (the Python path answers EIO), reads an external origin, or the pool is closed."""
        try:
            thin = self._thin()
        except NotFound:
            return None
        return read_binding(thin)

    def _check_data_file(self) -> None:
        """Raise FailedPrecondition (the client sees EIO) for a request that may write when the data
        file is shorter than the pool (truncated behind the serving process's back): a write would
        re-extend it, and mapped blocks past the old end would then read zeroes.  One ``fstat``.
        READs need no such check: they use pread (a block past the end is that read's EIO)."""
        data = self.pool.data
        expected = data.nr_blocks * self.block_size
        size = os.fstat(data.fd).st_size
        if size < expected:
            raise FailedPrecondition(f"export {self.name!r}: the data file {data.path} is {size} bytes, shorter "
                                     f"than the pool's {expected} (truncated while being served): writes are "
                                     f"refused until it is repaired")

    @property
    def can_trim(self) -> bool:
        """Whether the export supports discards: not when the pool ignores them (dm-thin's
        ``ignore_discard``: its thin devices advertise no discard support)."""
        return self.pool.discard_mode != "ignore"

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"export {self.name!r} is read-only")

    # ------------------------------------------------------------------ Export API
    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (unmapped blocks read as zeroes).  Mapped data is read with
        pread(2), never through the data file's memory map (:meth:`thinpool.thin.Thin.pread`): a media
        error or a truncation racing with the read fails this request with HostIOError (NBD EIO)
        instead of killing the server with SIGBUS (so no per-READ size check is needed: a mapped block
        past the end of a truncated file is that pread's end of file)."""
        self._just_read = None
        if offset < 0 or length < 0 or offset + length > self.size:
            check_range(self, offset, length)
        data = self._thin().pread(offset, length)
        self._just_read = (offset, length)
        return data

    def pwrite(self, offset: int, data: Payload) -> None:
        """Write ``data`` at ``offset``: provisions / copies-on-write as needed; NoSpace changes nothing."""
        self._just_read = None
        if self.read_only:
            self._check_writable()
        n = len(data)
        if offset < 0 or offset + n > self.size:
            check_range(self, offset, n)
        if n:
            dd = self.pool.data
            if _fstat(dd.fd).st_size < dd.nr_blocks * self.block_size:
                self._check_data_file()
            self._thin().write(offset, data, abort=self.cancel_check)

    def flush(self) -> None:
        """Commit the pool: every completed write becomes durable (dm-thin commits on FLUSH)."""
        self._just_read = None
        self._check_data_file()
        self.pool.commit()

    def trim(self, offset: int, length: int) -> None:
        """Unmap the whole blocks inside the range; partial blocks keep their data."""
        self._just_read = None
        self._check_writable()
        check_range(self, offset, length)
        if length:
            self._check_data_file()
            self._thin().discard(offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        """Make the range read as zeroes (see the module docstring for what gets unmapped)."""
        self._just_read = None
        self._check_writable()
        check_range(self, offset, length)
        if not length:
            return
        self._check_data_file()
        thin = self._thin()
        if self.pool.mode in NO_METADATA_CHANGE:
            # read-only / out-of-metadata-space: nothing is unmapped or provisioned; mapped blocks get
            # real zeroes (served if unshared, EIO if shared), unmapped ones already read zeroes
            # (over an external origin they would need a block: that write fails with EIO)
            for start, run, mapped in thin.mapped_ranges(offset, length):
                if mapped or (self.origin_size is not None and start < self.origin_size):
                    self._write_zeroes(thin, start, run)
            return
        if self.origin_size is not None and offset < self.origin_size:
            # an unmapped block reads the external origin, not zeroes: write real zeroes where the
            # origin has bytes; past its end, unmapping reads as zeroes again
            n = min(length, self.origin_size - offset)
            self._write_zeroes(thin, offset, n)
            offset, length = offset + n, length - n
            if not length:
                return
        if not may_trim or not self.can_trim:
            self._write_zeroes(thin, offset, length)
            return
        split = split_by_blocks(offset, length, self.block_size)
        # Edges first: if one of them fails (NoSpace for a copy-on-write), nothing has been unmapped yet.
        for off, n in ((split.head_offset, split.head_length), (split.tail_offset, split.tail_length)):
            if n > 0:
                for start, run, mapped in thin.mapped_ranges(off, n):
                    if mapped:
                        self._write_zeroes(thin, start, run)
        if split.block_count:
            thin.discard(split.first_block * self.block_size, split.block_count * self.block_size)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, flags)`` runs from the range's start: mapped blocks 0, unmapped ``HOLE|ZERO``.

        At most :data:`MAX_EXTENTS_SPAN` bytes are described (the server handles a shorter answer).

        Small reads: the server asks for the extents of every structured READ right after ``pread`` to
        send holes as hole chunks.  For a READ of at most one block that saves nothing on the wire and
        the allocation query would cost more than the read itself, so a call for exactly the range just
        read (at most ``block_size`` bytes) answers "allocated" without a lookup -- always a valid answer
        in ``base:allocation`` (a clear HOLE bit means "allocated or unknown"), and the bytes sent are
        the volume's real bytes either way.  Every other call looks the mapping up.
        """
        check_range(self, offset, length)
        just_read, self._just_read = self._just_read, None
        if not length:
            return []
        if just_read == (offset, length) and length <= self.block_size:
            return [(length, MAPPED)]
        span = min(length, MAX_EXTENTS_SPAN)
        osize = self.origin_size
        if osize is not None and offset < osize:
            # below the external origin's end every block reads data (the origin's, or its own)
            return [(min(span, osize - offset), MAPPED)]
        ranges = self._thin().mapped_ranges(offset, span)
        return [(n, MAPPED if mapped else UNMAPPED) for _off, n, mapped in ranges]

    def close(self) -> None:
        """Called by the server when the connection that opened this export ends."""
        if not self._closed:
            self._closed = True
            with self.provider.lock:
                self._activation.release()
            self.provider._release(self)

    # ------------------------------------------------------------------ internals
    def _write_zeroes(self, thin: Any, offset: int, length: int) -> None:
        zeros = self.provider._zeros(min(length, ZERO_CHUNK))
        end = offset + length
        pos = offset
        while pos < end:
            n = min(ZERO_CHUNK, end - pos)
            thin.write(pos, zeros[:n], abort=self.cancel_check)
            pos += n

    def __repr__(self) -> str:
        return (f"<PoolExport {self.name!r} dev_id={self.dev_id} size={self.size}"
                f"{' ro' if self.read_only else ''}>")


class PoolProvider:
    """Serve the thin volumes of an open pool (see the module docstring).

    ``read_only`` makes every export read-only.  Volumes created, renamed or deleted while serving are
    seen at once (``NBD_OPT_LIST`` and opening query the pool each time).  The empty export name means
    the pool's only volume when it has exactly one (so ``nbd+unix:///?socket=...`` works for it).
    :meth:`close` (called by :meth:`NBDServer.shutdown` once every client is gone) commits and closes
    the pool unless ``close_pool=False``.
    """

    def __init__(self, pool: Any, read_only: bool = False, *, close_pool: bool = True) -> None:
        self.pool = pool
        self.lock: threading.RLock = pool.locked()
        self.read_only = bool(read_only)
        self.close_pool = close_pool
        self.closed = False
        self.close_error: BaseException | None = None
        self._open: Counter[tuple[int, Any]] = Counter()  # (dev id, gen) -> open exports (connections)
        self._zero_buf = np.zeros(0, np.uint8)
        self._skipped: set[str] = set()  # names list_exports warned about

    # ------------------------------------------------------------------ ExportProvider API
    def list_exports(self) -> list[str]:
        """Every volume's name, in device-id order -- except names that cannot be export names (not
        valid UTF-8, or longer than NBD's 4096 bytes: left by an older thinpool), which are skipped
        with a warning (once per name) instead of breaking ``NBD_OPT_LIST`` for everyone."""
        with self.lock:
            names = [t.name for t in self.pool.thins()]
        out = []
        for name in names:
            try:
                ok = len(name.encode("utf-8")) <= MAX_STRING
            except UnicodeEncodeError:
                ok = False
            if ok:
                out.append(name)
            elif name not in self._skipped:
                self._skipped.add(name)
                log.warning("pool %s: volume %s cannot be an NBD export (its name is not valid UTF-8 or is "
                            "longer than %d bytes); not served -- rename it", self.pool.path,
                            ascii(name)[:120], MAX_STRING)
        return out

    def open_export(self, name: str, read_only: bool) -> PoolExport:
        """Open volume ``name``; NotFound if the pool has no such volume."""
        with self.lock:
            if self.closed:
                raise NotFound(f"pool {self.pool.path} is no longer served")
            if name == "":
                names = self.list_exports()
                if len(names) != 1:
                    raise NotFound(f"pool {self.pool.path} has {len(names)} volumes; name the export "
                                   f"(one of: {', '.join(names[:20]) or 'none'})")
                name = names[0]
            if not isinstance(name, str) or name not in self.pool:
                raise NotFound(f"pool {self.pool.path}: no thin volume named {name!r}")
            export = PoolExport(self, name, read_only)
            self._open[export.key] += 1
            return export

    def close(self) -> None:
        """Commit and close the pool (once; later calls do nothing).  A failure is re-raised and kept in
        :attr:`close_error` (the server only logs what ``close()`` raises)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if self.close_pool:
                try:
                    self.pool.close(commit=True)
                except BaseException as exc:
                    self.close_error = exc
                    raise

    # ------------------------------------------------------------------ bookkeeping
    def open_count(self, name: str) -> int:
        """How many connections have volume ``name`` open right now (0 if there is no such volume)."""
        with self.lock:
            entry = self.pool.catalog["volumes"].get(name) if isinstance(name, str) else None
            if entry is None:
                return 0
            return self._open.get((entry["dev_id"], entry.get("gen")), 0)

    def open_volumes(self) -> dict[str, int]:
        """Volume name -> open connections, for the volumes some connection has open."""
        with self.lock:
            out = {}
            for name, entry in self.pool.catalog["volumes"].items():
                n = self._open.get((entry["dev_id"], entry.get("gen")), 0)
                if n > 0:
                    out[name] = n
            return out

    def _release(self, export: PoolExport) -> None:
        with self.lock:
            n = self._open.get(export.key, 0) - 1
            if n > 0:
                self._open[export.key] = n
            else:
                self._open.pop(export.key, None)

    def _zeros(self, n: int) -> np.ndarray:
        if len(self._zero_buf) < n:
            self._zero_buf = np.zeros(max(n, 64 * 1024), np.uint8)
        return self._zero_buf

    def __repr__(self) -> str:
        return f"<PoolProvider {self.pool.path}{' ro' if self.read_only else ''}>"


def check_not_open(provider: PoolProvider, names: list[str]) -> None:
    """Raise :class:`~thinpool.errors.Busy` if any of ``names`` is active -- open over NBD or held in the
    serving process (dm-thin refuses to delete an open thin device with EBUSY), before any of them is
    deleted.  Names that are not volumes are left to the op to report."""
    pool = provider.pool
    with provider.lock:
        for n in names:
            if isinstance(n, str) and n in pool:
                pool.check_deletable(n)


__all__ = ["PoolExport", "PoolProvider", "check_not_open", "MAX_EXTENTS_SPAN"]
