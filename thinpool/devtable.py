"""The device table, the catalog and the superblock's fields, without the block map.

What ``status``, ``ls`` and ``snapshot`` need of a pool is small: the superblock's scalar fields,
the device table (one 64-byte record per thin device: dev id, root, mapped blocks, transaction,
creation time, snap time, size, flags), the catalog (names), and -- for a snapshot -- one page of
inner-node reference counts.  dm-thin's ``create_snap`` is O(1) for the same reason: it shares the
origin's root and touches nothing else.  :class:`DeviceTable` reads just those pages through the
pool's one transaction manager (:class:`~thinpool.mdstore.MetadataStore`) and commits a snapshot
the way :meth:`thinpool.pool.Pool.snapshot` + :meth:`~thinpool.pool.Pool.commit` do -- byte for
byte the same device record, catalog and counts (``tests/test_devtable.py`` checks this) -- in plain
Python: no numpy, no numba, no node pages.  The CLI uses it for those commands on a pool that is
not being served, so they cost about as much as starting Python.

What it does not do: anything that touches mappings or data (the block map lives in
:mod:`thinpool.pool`).  Blocks freed by the previous commit stay reserved one more commit (the next
full :class:`~thinpool.pool.Pool` commit releases and punches them), so no data block is ever
written, punched or reused here.  The record format is defined here and used by
:class:`~thinpool.pool.Pool` too; the name and device-id rules both follow are :mod:`thinpool.rules`'.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from itertools import compress
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple

from . import catalog as cat_format
from . import pooldir, rules, safe_output
from .errors import AlreadyExists, FullOpenRequired, InvalidArgument, NotFound, ReadOnly  # noqa: F401 (API)
from .errors import MetadataSpaceExhausted
from .mdpages import BLOCK, STORE_KEYS, PagedArray, PageUpdates
from .devtable_columns import VolumeColumns
from .mdstore import MetadataStore
from .rules import MAX_DEV_ID, new_catalog_entry, pick_dev_id  # noqa: F401 (the pool's id rules)
from .rules import MAX_NAME_BYTES, check_new_name, name_problem  # noqa: F401 (re-exported: the name rules)
from .schema import (DEV_CREATION_TIME, DEV_FIELDS, DEV_FLAGS, DEV_ID, DEV_MAPPED, DEV_RECORD, DEV_SIZE,
                     DEV_SNAP_TIME, DEV_TRANSACTION, U64_MASK, DevFlag, Mode)

if TYPE_CHECKING:
    from types import TracebackType

    from .status import PoolStatus

DEVS_PER_PAGE = BLOCK // DEV_RECORD.size
_FLAGS_AT = DEV_FIELDS.index("flags") * 8  # the low byte of a record's flags (every field is "<q")
_READ_ONLY = int(DevFlag.READ_ONLY)
# a record's flag byte -> 1 if it marks the slot in use (read-only), else 0; built from plain ints (an
# enum's & makes an enum member: 512 of them cost every command importing this module about 10 ms)
_IN_USE = int(DevFlag.IN_USE)
_IN_USE_BYTE = bytes(1 if b & _IN_USE else 0 for b in range(256))
RC_PER_PAGE = BLOCK // 4


def _zeroed(size: int) -> Any:
    """A writable buffer of ``size`` zero bytes whose memory the system hands out on first touch (an
    anonymous map): the device table of 100,000 volumes is 6.4 MB, which ``status`` never reads and
    ``snapshot`` reads a page or two of, and a bytearray of it costs 3-9 ms of zeroing and page faults
    at every open."""
    return mmap.mmap(-1, size) if size else bytearray()


def pad_pages(raw: bytes) -> bytes:
    """``raw`` zero-padded to whole 4 KiB pages (at least one)."""
    return raw.ljust(max(1, -(-len(raw) // BLOCK)) * BLOCK, b"\0")


def _origin_copy(entry: dict[str, Any]) -> dict[str, Any] | None:
    """A copy of a catalog entry's external origin record (None when it has none)."""
    rec = entry.get("origin")
    return dict(rec) if rec is not None else None


class VolumeRecord(NamedTuple):
    """One thin volume as the device table records it (the fields of :class:`thinpool.thin.Thin`
    that need no block map)."""

    name: str
    dev_id: int
    size: int
    mapped_blocks: int
    transaction: int
    creation_time: int
    snap_time: int
    read_only: bool
    external_origin: dict[str, Any] | None = None  #: its external origin's record (:mod:`thinpool.origin`)


class _DevIds:
    """The device ids in use, as :func:`~thinpool.rules.pick_dev_id` asks for them (``id in ids``,
    ``ids[id]`` for the error): from the device table's in-use records, the name (for the error
    only) from the catalog."""

    def __init__(self, table: "DeviceTable") -> None:
        self._table = table
        self._ids: set[int] | None = None

    def __contains__(self, dev_id: object) -> bool:
        if self._ids is None:
            if type(dev_id) is int and 0 < dev_id <= MAX_DEV_ID:
                # the first question (the next id, which is usually free): a byte search of the table
                # for the id's record field, no set of every id in use
                return self._table._dev_id_in_use(dev_id)
            self._ids = set(self._table._dev_ids_in_use())
        return dev_id in self._ids

    def __getitem__(self, dev_id: int) -> str:
        return next(v.name for v in self._table.thins() if v.dev_id == dev_id)


class _Names:
    """``name in names`` over the stored name index (for :func:`check_new_name`)."""

    def __init__(self, table: "DeviceTable") -> None:
        self._table = table

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._table._find(name) is not None


class DeviceTable(VolumeColumns):
    """A pool opened for its device table only (see the module docstring); a context manager.

    ``read_only=True`` takes the pool's shared lock, else the exclusive one, exactly like
    :meth:`thinpool.pool.Pool.open`."""

    METADATA = pooldir.METADATA

    def __init__(self, path: str | os.PathLike, *, read_only: bool = True, wait: float | None = None,
                 allow_foreign: bool | None = None) -> None:
        self.path = pooldir.resolve(path, allow_foreign=allow_foreign)
        self.read_only = read_only
        self._batch_depth = 0
        self._lock_fd = pooldir.lock(self.path, read_only, wait=wait, allow_foreign=allow_foreign)
        try:
            self.store = MetadataStore(os.path.join(self.path, self.METADATA), read_only=read_only,
                                       allow_foreign=allow_foreign)
            try:
                self._load()
                self._check_data_owner()
            except BaseException:
                self.store.close()
                raise
        except BaseException:
            pooldir.unlock(self._lock_fd)
            raise
        self._closed = False
        safe_output.register_pool(self)  # no output is ever written onto its files

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = True, wait: float | None = None,
             allow_foreign: bool | None = None) -> "DeviceTable":
        """Open the pool at ``path`` (same arguments and errors as :meth:`thinpool.pool.Pool.open`,
        plus :class:`FullOpenRequired`)."""
        return cls(path, read_only=read_only, wait=wait, allow_foreign=allow_foreign)

    def _check_data_owner(self) -> None:
        """Refuse a pool whose data file another pool has taken over (:mod:`thinpool.ownership`)."""
        from .ownership import check_owner
        try:
            check_owner(self.data_path, self.header.get("uuid", ""), self.path)
        except FileNotFoundError:
            pass  # a missing data file is the full open's to report

    def _load(self) -> None:
        arrays = self.store.load(only=(cat_format.EXTRA,))
        hdr = self.store.header
        if "used_data_blocks" not in hdr or "pending_blocks" not in hdr:
            raise FullOpenRequired(f"pool {self.path}: metadata predates the device table's fields")
        self.recovered_from = hdr.get("recovered_from")
        self.header = {k: v for k, v in hdr.items() if k not in STORE_KEYS}
        # the device table's pages are read when first needed (see _need): ``snapshot`` reads two of a
        # 100,000-volume table's 1,563 and ``status`` none (the hints count the devices)
        self._devs = _zeroed(self.store.npages("devs") * BLOCK)
        self._devs_read: set[int] | None = set()  # the pages read so far; None: all of them
        # the catalog's JSON part: origins, records, name fence (format 2), or the whole format-1 catalog,
        # which is parsed (and converted at the next commit) only when a name is asked for
        self._catalog_raw = bytes(arrays["catalog"][: hdr["catalog_bytes"]])
        self._format2 = hdr.get("catalog_format") == cat_format.FORMAT
        self._stored_catalog: cat_format.StoredCatalog | None = None
        self._pending: dict[str, dict[str, Any]] = {}  # volumes made since the last commit
        self._devs_dirty: set[int] = set()
        self._rc_pages: dict[int, bytearray] = {}
        self._dirty = False
        self._bound: int | None = None  # see _dev_id_bound
        self._free: int | None = None  # see _first_free
        self._count: int | None = None  # see _nr_thins
        # the pool's own mode (a table opened only to look reports the mode a writable open finds)
        self.mode: Mode = rules.derive_mode(bool(hdr.get("needs_check")))

    # ------------------------------------------------------------------ reading
    def _need(self, pages: Iterable[int] | None = None) -> None:
        """Read (and verify) the device-table pages ``pages`` (None: every page) not read yet, straight
        into the table's buffer; pages past the stored ones (a page of slots added since) are not read."""
        done = self._devs_read
        if done is None:
            return
        stored = self.store.npages("devs")
        want = sorted({p for p in (range(stored) if pages is None else pages) if p < stored} - done)
        if want:
            self.store.gather_into("devs", want, self._devs, want)
            done.update(want)
        if pages is None:
            self._devs_read = None

    def _need_slot(self, slot: int) -> None:
        self._need([slot // DEVS_PER_PAGE])

    @property
    def _stored(self) -> cat_format.StoredCatalog:
        """The stored catalog (:mod:`thinpool.catalog`), its pages read as they are needed; a format-1
        catalog parsed whole (its conversion is written by the next commit)."""
        if self._stored_catalog is None:
            stored, old = rules.open_catalog(self._catalog_raw, self._format2, self.store.npages,
                                             self.store.read_pages, f"pool {self.path}")
            if old is not None:
                self.header.setdefault("next_dev_id", int(old.get("next_dev_id", 1)))
                self.header.setdefault("next_gen", int(old.get("next_gen", 1)))
            self._stored_catalog = stored
        return self._stored_catalog

    def _find(self, name: str) -> int | None:
        """The slot of volume ``name`` (None if there is none)."""
        if name in self._pending:
            return int(self._pending[name]["slot"])
        return self._stored.index.get(name)

    def _origin_of(self, name: str, slot: int) -> dict[str, Any] | None:
        if name in self._pending:
            return _origin_copy(self._pending[name])
        return self._stored.origin_of(slot)

    @property
    def catalog(self) -> dict[str, Any]:
        """The catalog as :attr:`thinpool.pool.Pool.catalog` has it: volume names (name -> dev id, slot,
        generation, external origin), the counters, records.  Reads every page of the name index."""
        st = self._stored
        self._need()
        dev_ids = memoryview(self._devs).cast("q")[DEV_FIELDS.index("dev_id")::len(DEV_FIELDS)]
        volumes = cat_format.volumes_of(st, dev_ids.__getitem__)
        volumes.update((n, dict(e)) for n, e in self._pending.items())
        return {"volumes": volumes, "next_dev_id": int(self.header.get("next_dev_id", 1)),
                "next_gen": int(self.header.get("next_gen", 1)), "records": st.records}

    def may_have_external_origins(self) -> bool:
        """False when no volume has an external origin, known without reading the names (format 2:
        the origins are listed in the catalog's small JSON part); True when one may."""
        if not self._format2 and self._stored_catalog is None:
            return self._dirty or b'"origin"' in self._catalog_raw  # (the committed catalog's bytes)
        return self._stored.has_origins() or any("origin" in e for e in self._pending.values())

    def _dev_ids_in_use(self) -> list[int]:
        """The device ids of the records in use."""
        self._need()
        col = memoryview(self._devs).cast("q")[DEV_FIELDS.index("dev_id")::len(DEV_FIELDS)].tolist()
        return list(compress(col, self._in_use()))  # (a C loop: 100,000 slots in a few ms)

    def _dev_id_in_use(self, dev_id: int) -> bool:
        """Whether a record in use has device id ``dev_id`` (> 0): ``bytes.find`` of its 8 bytes, each
        hit checked to be a record's dev_id field (a C scan of the table; an id 0 matches every free,
        zeroed record, so it is not asked here)."""
        if dev_id > self._dev_id_bound():
            return False  # (the usual question: the next id, above every id in use)
        self._need()
        devs, size, at = self._devs, DEV_RECORD.size, DEV_ID * 8
        needle = struct.pack("<q", dev_id)
        i = devs.find(needle)
        while i >= 0:
            if i % size == at and devs[i - at + _FLAGS_AT] & _IN_USE:
                return True
            i = devs.find(needle, i + 1)
        return False

    def _dev_id_bound(self) -> int:
        """An id no device in use exceeds: the ``dev_id_max`` the last commit recorded (the pool and
        this table record it with every commit: :meth:`thinpool.mdstore.MetadataStore.hint`) or, when it
        did not, the largest id in the table; with the snapshots made since."""
        if self._bound is None:
            bound = self.store.hint("dev_id_max")
            self._bound = max(self._dev_ids_in_use(), default=0) if bound is None else bound
        return max([self._bound] + [int(e["dev_id"]) for e in self._pending.values()])

    def _in_use(self) -> bytes:
        """One byte per device-table slot: 1 if the slot holds a device, else 0 (C loops over the
        records' flag bytes, no unpacking)."""
        self._need()
        flags = bytes(self._devs[_FLAGS_AT::DEV_RECORD.size])
        return flags.translate(_IN_USE_BYTE)

    @property
    def block_size(self) -> int:
        return int(self.header["block_size"])

    @property
    def time(self) -> int:
        return int(self.header["time"])

    @property
    def transaction_id(self) -> int:
        return int(self.header["transaction_id"])

    @property
    def data_path(self) -> str:
        """The data device's file."""
        return self.header.get("data_file") or os.path.join(self.path, pooldir.DATA)

    def _record(self, slot: int) -> dict[str, int]:
        self._need_slot(slot)
        return dict(zip(DEV_FIELDS, DEV_RECORD.unpack_from(self._devs, slot * DEV_RECORD.size)))

    def _slot(self, name: str) -> int:
        slot = self._find(name) if isinstance(name, str) else None
        if slot is None:
            raise NotFound(f"pool {self.path}: no thin volume named {name!r}")
        return slot

    def thin(self, name: str) -> VolumeRecord:
        """The volume called ``name`` (NotFound if none)."""
        self._check_open()
        slot = self._slot(name)
        r = self._record(slot)
        return VolumeRecord(name, r["dev_id"], r["size"], r["mapped"], r["transaction"] & U64_MASK,
                            r["creation_time"], r["snap_time"], bool(r["flags"] & DevFlag.READ_ONLY), self._origin_of(name, slot))

    def thins(self) -> list[VolumeRecord]:
        """All volumes, in device-id order."""
        self._check_open()
        names, slots = self._stored.index.columns()
        for n, e in self._pending.items():
            names.append(n)
            slots.append(int(e["slot"]))
        self._need()
        recs = list(DEV_RECORD.iter_unpack(self._devs))
        rows = sorted(zip(map(recs.__getitem__, slots), names, slots))  # dev_id first
        ro = _READ_ONLY  # a plain int: an enum's & costs microseconds, 100,000 volumes a second
        u64 = U64_MASK   # (a transaction id of 2^63 or more is stored negative)
        if not self.may_have_external_origins():
            return [VolumeRecord(name, r[DEV_ID], r[DEV_SIZE], r[DEV_MAPPED], r[DEV_TRANSACTION] & u64, r[DEV_CREATION_TIME],
                                 r[DEV_SNAP_TIME], r[DEV_FLAGS] & ro != 0, None) for r, name, _s in rows]
        return [VolumeRecord(name, r[DEV_ID], r[DEV_SIZE], r[DEV_MAPPED], r[DEV_TRANSACTION] & u64, r[DEV_CREATION_TIME],
                             r[DEV_SNAP_TIME], r[DEV_FLAGS] & ro != 0, self._origin_of(name, slot))
                for r, name, slot in rows]

    def status(self) -> PoolStatus:
        """The pool's status, as :meth:`thinpool.pool.Pool.status` reports it just after opening."""
        self._check_open()
        hdr = self.header
        return rules.pool_status(hdr, time=self.time, held=self.store.header.get("held"), mode=self.mode,
                                 used_data_blocks=int(hdr["used_data_blocks"]),
                                 total_data_blocks=int(hdr["nr_data_blocks"]),
                                 used_metadata_blocks=self.store.used_blocks(),
                                 total_metadata_blocks=self.store.nr_blocks, nr_thins=self._nr_thins(),
                                 metadata_reserve_blocks=max(rules.metadata_reserve(self.store.nr_blocks),
                                                             self.store.commit_floor()))

    # ------------------------------------------------------------------ the one change: a snapshot
    def snapshot(self, origin: str, name: str, *, dev_id: int | None = None,
                 read_only: bool = False) -> VolumeRecord:
        """Snapshot ``origin`` as ``name``: what :meth:`thinpool.pool.Pool.snapshot` does (the pool
        time increments; origin and snapshot are stamped with it; the origin's root gains a
        reference).  Commits, as every pool message does (inside :meth:`batch`: at its end)."""
        self._check_writable()
        oslot = self._slot(origin)
        check_new_name(self.path, name, _Names(self))
        hdr = self.header
        dev_id = pick_dev_id(self.path, dev_id, _DevIds(self), int(hdr.get("next_dev_id", 1)))
        o = self._record(oslot)
        root = o["root"]
        page = self._rc_page(root // RC_PER_PAGE)
        off = (root % RC_PER_PAGE) * 4
        struct.pack_into("<I", page, off, struct.unpack_from("<I", page, off)[0] + 1)
        t = self.time + 1
        hdr["time"] = t
        o, snap = rules.snapshot_records(o, dev_id, self.transaction_id, t, read_only)
        self._put(oslot, o)
        slot = self._new_slot()
        self._put(slot, snap)
        # the catalog entry rules.add_volume makes for Pool.snapshot: a fresh generation, the origin's
        # external origin; the counters are superblock fields here
        gen = int(hdr.get("next_gen", 1))
        entry: dict[str, Any] = {"dev_id": dev_id, "slot": slot, "gen": gen}
        inherited = self._origin_of(origin, oslot)
        if inherited is not None:
            entry["origin"] = inherited
        hdr["next_gen"] = gen + 1
        hdr["next_dev_id"] = (dev_id + 1) & MAX_DEV_ID
        self._pending[name] = entry
        self._dirty = True
        if not self._batch_depth:
            self.commit()  # a pool message commits (dm-thin's pool_message), as Pool.snapshot
        return self.thin(name)

    @contextlib.contextmanager
    def batch(self) -> Iterator["DeviceTable"]:
        """Snapshots inside commit once, when the block ends; if it raises, they are dropped (as
        :meth:`thinpool.pool.Pool.batch`)."""
        self._check_open()
        outer = self._batch_depth == 0
        self._batch_depth += 1
        try:
            yield self
        except BaseException:
            self._batch_depth -= 1
            if outer and not self._closed:
                self.abort()
            raise
        self._batch_depth -= 1
        if outer and not self._closed:
            self.commit()

    def _rc_page(self, index: int) -> bytearray:
        if index not in self._rc_pages:
            self._rc_pages[index] = bytearray(self.store.read_pages("inner_rc", [index])[index])
        return self._rc_pages[index]

    def _put(self, slot: int, rec: dict[str, int]) -> None:
        self._need_slot(slot)  # (the page is written whole: its other records must be the stored ones)
        DEV_RECORD.pack_into(self._devs, slot * DEV_RECORD.size, *(rec[f] for f in DEV_FIELDS))
        self._devs_dirty.add(slot)

    def _new_slot(self) -> int:
        """The first unused slot, or a new page of slots (as Pool._new_slot); the next free slot is
        then searched from it, a page at a time."""
        n = len(self._devs) // DEV_RECORD.size
        slot = self._first_free()  # rules.free_slot's rule: the first slot not in use
        if slot >= n:
            grown = _zeroed(len(self._devs) + BLOCK)
            grown[:len(self._devs)] = self._devs
            self._devs = grown
            self._devs_dirty.update(range(n, n + DEVS_PER_PAGE))
            slot = n
        self._free = self._free_from(slot + 1)
        self._count = self._nr_thins() + 1
        return slot

    def _first_free(self) -> int:
        """The first slot not in use (the number of slots when every one is): the ``free_slot`` the last
        commit recorded (:meth:`thinpool.mdstore.MetadataStore.hint`), else a search of the table."""
        if self._free is None:
            hint = self.store.hint("free_slot")
            self._free = self._free_from(0) if hint is None else hint
        return self._free

    def _free_from(self, slot: int) -> int:
        """The first slot from ``slot`` on that is not in use (the number of slots if none is), reading
        the table's pages from there until one is found."""
        size, n = DEV_RECORD.size, len(self._devs) // DEV_RECORD.size
        page = slot // DEVS_PER_PAGE
        while page * DEVS_PER_PAGE < n:
            self._need([page])
            end = min(n, (page + 1) * DEVS_PER_PAGE)
            flags = bytes(self._devs[max(slot, page * DEVS_PER_PAGE) * size + _FLAGS_AT:end * size:size])
            i = flags.translate(_IN_USE_BYTE).find(0)
            if i >= 0:
                return max(slot, page * DEVS_PER_PAGE) + i
            page += 1
        return n

    def _nr_thins(self) -> int:
        """Devices in use: the ``nr_thins`` the last commit recorded, else a count over the table."""
        if self._count is None:
            hint = self.store.hint("nr_thins")
            self._count = self._in_use().count(1) if hint is None else hint
        return self._count

    def commit(self) -> None:
        """Commit the snapshots taken so far, atomically (nothing is written if there are none)."""
        self._check_open()
        if not self._dirty:
            return
        stored = self._stored
        cat_format.apply_changes(stored, self._pending, list(self._pending))
        arrays: dict[str, Any] = {
            "devs": PagedArray(self._devs, sorted({s // DEVS_PER_PAGE for s in self._devs_dirty})),
            "inner_rc": PageUpdates(self.store.npages("inner_rc"), self._rc_pages),
            **stored.updates(len(self._devs) // DEV_RECORD.size, rules.catalog_dumps, self.header),
        }
        bound = self._dev_id_bound()
        hints = {"dev_id_max": bound, "free_slot": self._first_free(), "nr_thins": self._nr_thins()}
        try:
            self.store.commit(arrays, self.header, tail=True, hints=hints)
        except MetadataSpaceExhausted as exc:
            self._load()
            raise ReadOnly(f"pool {self.path}: out of metadata space; the snapshot was not committed "
                           f"({exc})") from None
        stored.committed()
        self._bound = bound
        self._format2 = True
        self._pending.clear()
        self._devs_dirty.clear()
        self._rc_pages.clear()
        self._dirty = False

    def abort(self) -> None:
        """Drop the snapshots not yet committed."""
        self._check_open()
        self._load()

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        rules.check_open(self.path, self._closed)

    def _check_writable(self) -> None:
        rules.check_writable(self.path, closed=self._closed, read_only=self.read_only, mode=self.mode,
                             needs_check=bool(self.header.get("needs_check")))

    def close(self, commit: bool = True) -> None:
        """Commit (unless ``commit=False``) and release the pool."""
        if self._closed:
            return
        try:
            if commit and not self.read_only:
                self.commit()
        finally:
            self._closed = True
            self.store.close()
            pooldir.unlock(self._lock_fd)

    def __enter__(self) -> "DeviceTable":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close: commit if the block succeeded; if it raised, drop everything since the last
        commit (the same policy as :class:`~thinpool.pool.Pool`)."""
        self.close(commit=exc_type is None)
