"""The volume catalog as stored: a paged name index, fixed-size slot records and a small JSON part.

The catalog says which name each device has (volume name -> device-table slot), each volume's
creation generation (``gen``: handles and NBD exports bind to (dev id, gen)) and external origin, and
holds the pool's stored records (the snapshotter's).  Until format 2 it was one JSON document: a pool
of 100,000 volumes had a 6 MB catalog that ``ls`` parsed whole and every snapshot parsed, extended
and wrote again.  Format 2 (the superblock field ``catalog_format``) stores it in four arrays of the
metadata, committed with the transaction and checksummed page by page like every other array:

``names`` (the name index)
    4 KiB pages, each holding the names of a range of the name order (sorted by their UTF-8 bytes)
    and their slots: ``<HH`` (count, bytes of names), ``count`` ``<I`` slots, then the names joined
    by NUL (a volume name never contains one).  A page is filled to at most 4096 bytes; a name is at
    most 1,024 bytes, so a page always holds three.
``vol_slots``
    One 16-byte record per device-table slot, ``<QII``: gen, external origin (index + 1 into the
    JSON part's ``origins``; 0: none), flags (1: in use).
``catalog``
    JSON ``{"origins": [record or null, ...], "records": {namespace: ...}, "fence": {"pages": [...],
    "free": [...], "keys": [...]}}`` (the superblock's ``catalog_bytes`` is its length).  The fence is
    the order of the index pages: their numbers in name order, the free page numbers, and each page's
    key -- the first page's is empty, another's is the first name it held when a split made it; a
    name lives in the last page whose key is <= the name (about 20 bytes a page: 9 KB for 100,000
    volumes; it comes last, so a split rewrites the JSON part's last page).  The fence's ``odd``
    (only when there is one): ``[[name, slot], ...]``, the names the pages cannot hold -- a format-1
    catalog may hold names an older thinpool allowed (a lone surrogate, more than 1,024 bytes); they
    are kept, and stay usable, there rather than refused (the JSON escapes them).  The pool's
    ``next_dev_id`` and ``next_gen`` counters are superblock fields.

Adding a name reads one index page and writes it (two, and the JSON part's last page, when it splits:
the upper half goes to a free page or a new one at the end); removing a name rewrites its
page (an emptied page is released and its number kept free); a slot record change rewrites one
``vol_slots`` page.  The changes are a function of the committed catalog and the set of names
touched since (:func:`apply_changes`), so :class:`thinpool.pool.Pool` and
:class:`thinpool.devtable.DeviceTable` commit the same bytes for the same messages.  ``ls`` reads
the index pages and splits each page's names with one C call, no per-volume JSON object.

A pool whose superblock has no ``catalog_format`` holds the old JSON catalog: it is read as before
and converted (every array written whole) at its first commit.

Plain Python (no numpy), like the store: the light commands import it.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Iterable, Mapping

# the name index (the ``names`` array) and the array names are catalog_index's; re-exported: code and
# tests import them from here
from .catalog_index import (BULK_FILL, EXTRA, INDEX, SLOTS, NameIndex, PageReader,  # noqa: F401
                            _decode_names, _odd_names, _order, decode_page, encode_page, page_bytes)
from .errors import MetadataCorrupt
from .mdpages import BLOCK, PageUpdates

FORMAT = 2
#: the arrays of a format-2 catalog
ARRAYS = (INDEX, SLOTS, EXTRA)
SLOT_REC = struct.Struct("<QII")  # gen, origin index + 1, flags
SLOTS_PER_PAGE = BLOCK // SLOT_REC.size
IN_USE = 1


def changed_pages(old: bytes, new: bytes) -> PageUpdates:
    """``new`` (bytes of an array whose committed bytes are ``old``) as the updates of its changed
    pages: a page equal to the committed one is not written again."""
    pad_old = old.ljust(-(-len(old) // BLOCK) * BLOCK, b"\0")
    n = -(-len(new) // BLOCK)
    pad = new.ljust(n * BLOCK, b"\0")
    return PageUpdates(n, {i: pad[i * BLOCK:(i + 1) * BLOCK] for i in range(n)
                           if pad[i * BLOCK:(i + 1) * BLOCK] != pad_old[i * BLOCK:(i + 1) * BLOCK]})


class SlotTable:
    """The ``vol_slots`` records (gen, origin, flags per device-table slot), read a page at a time."""

    def __init__(self, npages: int, read: PageReader | None) -> None:
        self._read = read
        self.npages = npages
        self._cache: dict[int, bytearray] = {}
        self.dirty: set[int] = set()

    def _page(self, p: int) -> bytearray:
        if p not in self._cache:
            if p >= self.npages or self._read is None:
                self._cache[p] = bytearray(BLOCK)  # past the stored pages: zeroes (no volume)
            else:
                self._cache[p] = bytearray(self._read(SLOTS, [p])[p])
        return self._cache[p]

    def load_all(self) -> None:
        """Read every stored page in one go."""
        want = [p for p in range(self.npages) if p not in self._cache]
        if want and self._read is not None:
            for p, raw in self._read(SLOTS, want).items():
                self._cache[p] = bytearray(raw)

    def get(self, slot: int) -> tuple[int, int]:
        """(gen, origin index + 1) of ``slot`` ((0, 0) if none is recorded)."""
        gen, origin, _flags = SLOT_REC.unpack_from(self._page(slot // SLOTS_PER_PAGE),
                                                   (slot % SLOTS_PER_PAGE) * SLOT_REC.size)
        return gen, origin

    def put(self, slot: int, gen: int, origin: int, flags: int = IN_USE) -> None:
        """Record ``slot``'s volume (flags 0: clear the slot)."""
        p = slot // SLOTS_PER_PAGE
        SLOT_REC.pack_into(self._page(p), (slot % SLOTS_PER_PAGE) * SLOT_REC.size, gen, origin, flags)
        self.dirty.add(p)

    def origins_in_use(self) -> set[int]:
        """The origin indices (+ 1) some slot records (reads every page)."""
        self.load_all()
        out: set[int] = set()
        for page in self._cache.values():
            out.update(memoryview(page).cast("I")[2::4])
        out.discard(0)
        return out

    def updates(self, nslots: int) -> PageUpdates:
        """The changed pages, for a table of ``nslots`` device slots."""
        self.npages = max(self.npages, -(-nslots // SLOTS_PER_PAGE))
        return PageUpdates(self.npages, {p: bytes(self._cache[p]) for p in self.dirty})

    def committed(self) -> None:
        self.dirty.clear()


class StoredCatalog:
    """A format-2 catalog: the index, the slot records, the origins and records (JSON), and the
    committed JSON bytes.  Pages are read as they are needed (``read``: the store's reader)."""

    def __init__(self, index: NameIndex, slots: SlotTable, extra: dict[str, Any], extra_raw: bytes) -> None:
        self.index = index
        self.slots = slots
        self.origins: list[dict[str, Any] | None] = extra.get("origins", [])
        self.records: dict[str, Any] = extra.get("records", {})
        self._extra_raw = extra_raw

    @classmethod
    def open(cls, npages: Callable[[str], int], read: PageReader, extra_raw: bytes,
             loads: Callable[[bytes], Any]) -> "StoredCatalog":
        """The committed catalog (``extra_raw``: the JSON part's bytes; ``loads``: the JSON reader;
        ``npages(array)`` and ``read``: the store's)."""
        try:
            extra = loads(extra_raw)
            if not isinstance(extra, dict) or not isinstance(extra.get("origins"), list) \
                    or not isinstance(extra.get("records"), dict) or not isinstance(extra.get("fence"), dict):
                raise ValueError
        except ValueError:
            raise MetadataCorrupt("catalog: origins, records and name fence are not valid JSON",
                                  structure=EXTRA) from None
        return cls(NameIndex(extra["fence"], npages(INDEX), read), SlotTable(npages(SLOTS), read), extra, extra_raw)

    @classmethod
    def build(cls, volumes: Mapping[str, Mapping[str, Any]], records: dict[str, Any]) -> "StoredCatalog":
        """A new catalog holding ``volumes`` (name -> {slot, gen, origin}) and ``records``, every page
        to be written (a new pool, or the conversion of a format-1 catalog)."""
        cat = cls(NameIndex.build((n, int(v["slot"])) for n, v in volumes.items()), SlotTable(0, None),
                  {"origins": [], "records": records}, b"")
        for v in sorted(volumes.values(), key=lambda v: int(v["slot"])):
            cat.slots.put(int(v["slot"]), int(v["gen"]), cat.origin_index(v.get("origin")))
        return cat

    def origin_index(self, rec: Mapping[str, Any] | None) -> int:
        """The origin number (index + 1) of external origin record ``rec``, adding it if new (0: None)."""
        if rec is None:
            return 0
        rec = dict(rec)
        for i, o in enumerate(self.origins):
            if o == rec:
                return i + 1
        if None in self.origins:
            i = self.origins.index(None)
            self.origins[i] = rec
            return i + 1
        self.origins.append(rec)
        return len(self.origins)

    def origin_of(self, slot: int) -> dict[str, Any] | None:
        """A copy of the external origin record of the volume at ``slot`` (None if it has none)."""
        i = self.slots.get(slot)[1]
        if not i:
            return None
        rec = self.origins[i - 1] if i <= len(self.origins) else None
        if rec is None:
            raise MetadataCorrupt(f"catalog: slot {slot} names external origin {i}, which is not recorded",
                                  structure=SLOTS)
        return dict(rec)

    def has_origins(self) -> bool:
        return any(o is not None for o in self.origins)

    def extra_bytes(self, dumps: Callable[[Any], bytes]) -> bytes:
        return dumps({"origins": self.origins, "records": self.records, "fence": self.index.fence()})

    def updates(self, nslots: int, dumps: Callable[[Any], bytes], header: dict[str, Any]) -> dict[str, Any]:
        """The arrays a commit writes (only changed pages) and ``header``'s catalog fields set."""
        out: dict[str, Any] = {INDEX: self.index.updates(), SLOTS: self.slots.updates(nslots)}
        raw = self.extra_bytes(dumps)
        if raw != self._extra_raw or not self._extra_raw:
            out[EXTRA] = changed_pages(self._extra_raw, raw)
        header["catalog_bytes"] = len(raw)
        header["catalog_format"] = FORMAT
        self._pending_raw = raw
        return out

    def committed(self) -> None:
        """The last :meth:`updates` are durable."""
        self.index.committed()
        self.slots.committed()
        self._extra_raw = self._pending_raw


def apply_changes(cat: StoredCatalog, volumes: Mapping[str, Mapping[str, Any]], touched: Iterable[str]) -> None:
    """Bring ``cat`` (the committed catalog) to ``volumes`` for the names in ``touched`` (created,
    deleted, renamed, given an origin since the last commit; ``volumes`` needs to answer only for
    those).  Deterministic: the same committed catalog and changes give the same pages, whoever
    commits them."""
    names = sorted(set(touched), key=_order)
    old = {n: cat.index.get(n) for n in names}
    unused: set[int] = set()
    for n in names:  # the names that went or moved, and their slots' records
        o, e = old[n], volumes.get(n)
        if o is not None and (e is None or int(e["slot"]) != o):
            cat.index.remove(n)
        if o is not None:
            origin = cat.slots.get(o)[1]
            if origin:
                unused.add(origin)
            cat.slots.put(o, 0, 0, 0)
    for n in names:  # the names that are there now
        e = volumes.get(n)
        if e is None:
            continue
        slot = int(e["slot"])
        if old[n] != slot:
            cat.index.insert(n, slot)
        origin = cat.origin_index(e.get("origin"))
        unused.discard(origin)
        cat.slots.put(slot, int(e["gen"]), origin)
    if unused:  # an origin no volume has any more is dropped (its number is reused)
        for i in unused - cat.slots.origins_in_use():
            cat.origins[i - 1] = None
        while cat.origins and cat.origins[-1] is None:
            cat.origins.pop()


def volumes_of(cat: StoredCatalog, dev_ids: Callable[[int], int]) -> dict[str, dict[str, Any]]:
    """Every volume as the pool's catalog dict holds them (name -> {dev_id, slot, gen[, origin]}), in
    slot order; ``dev_ids(slot)`` is the device id in that slot."""
    names, slots = cat.index.columns()
    cat.slots.load_all()
    out: dict[str, dict[str, Any]] = {}
    for slot, name in sorted(zip(slots, names)):
        gen, origin = cat.slots.get(slot)
        entry: dict[str, Any] = {"dev_id": dev_ids(slot), "slot": slot, "gen": gen}
        if origin:
            entry["origin"] = cat.origin_of(slot)
        out[name] = entry
    return out


def salvage(pages: Callable[[str], list[bytes | None]], extra: bytes | None,
            loads: Callable[[bytes], Any]) -> tuple[dict[int, str], dict[int, dict[str, Any]], dict[str, Any] | None,
                                                    list[str], bool]:
    """What a repair keeps of a damaged format-2 catalog: (name by slot, external origin record by slot,
    records or None if lost, problems, whether names were lost).  ``pages(array)`` lists an array's
    pages (None: unreadable); ``extra``: the JSON part's bytes (None: unreadable).  Every index page is
    read on its own (the fence is not needed), so a bad page loses only its names."""
    problems: list[str] = []
    names: dict[int, str] = {}
    names_lost = False
    for p, raw in enumerate(pages(INDEX)):
        try:
            if raw is None:
                raise MetadataCorrupt(f"catalog: name index page {p} is unreadable", structure=INDEX)
            keys, slots = decode_page(raw, p)
            names.update(zip(slots, _decode_names(keys, f"catalog: name index page {p}")))
        except MetadataCorrupt as exc:
            names_lost = True
            problems.append(f"{exc}: its names are lost")
    origins: list[Any] = []
    records: dict[str, Any] | None = None
    try:
        if extra is None:
            raise ValueError
        doc = loads(extra)
        origins, records = list(doc.get("origins", [])), dict(doc.get("records", {}))
    except (ValueError, TypeError, AttributeError):
        problems.append("catalog: origins and records are unreadable: lost")
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("fence"), dict) and "odd" in doc["fence"]:
        try:  # the names the index pages cannot hold
            names.update((s, n) for n, s in _odd_names(doc["fence"]["odd"]).items())
        except MetadataCorrupt as exc:
            names_lost = True
            problems.append(f"{exc}: they are lost")
    by_slot: dict[int, dict[str, Any]] = {}
    for p, raw in enumerate(pages(SLOTS)):
        if raw is None:
            problems.append(f"catalog: slot records page {p} is unreadable: its volumes' external origins are lost")
            continue
        for i, (_gen, origin, flags) in enumerate(SLOT_REC.iter_unpack(raw)):
            if flags & IN_USE and 0 < origin <= len(origins) and isinstance(origins[origin - 1], dict):
                by_slot[p * SLOTS_PER_PAGE + i] = origins[origin - 1]
    return names, by_slot, records, problems, names_lost
