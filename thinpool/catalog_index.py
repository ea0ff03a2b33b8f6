"""The volume catalog's name index (the ``names`` array of a format-2 catalog, :mod:`thinpool.catalog`):
4 KiB pages of names in name order with their device-table slots, and the fence that orders them.

A page holds the names of a range of the name order (sorted by their UTF-8 bytes) and their slots:
``<HH`` (count, bytes of names), ``count`` ``<I`` slots, then the names joined by NUL (a volume name
never contains one).  A page is filled to at most 4096 bytes; a name is at most 1,024 bytes, so a page
always holds three.  The fence (kept in the catalog's JSON part) lists the pages in name order, the
free page numbers and each page's key; names the pages cannot hold are its ``odd`` list
(:class:`NameIndex`).  Adding a name reads one page and writes it (two when it splits); removing one
rewrites its page.  ``ls`` splits each page's names with one C call (:func:`decode_page`).

Plain Python (no numpy), like the store: the light commands import it.
"""

from __future__ import annotations

import bisect
import operator
import struct
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

from .errors import MetadataCorrupt
from .mdpages import BLOCK, PageUpdates

#: the C loops ``ls`` reads its columns with (``thinpool/_lscols.c``, built by the install when a C
#: compiler is there), or None: :meth:`NameIndex.columns` and the device table's lists otherwise
lscols: ModuleType | None
try:
    from . import _lscols as _built
    lscols = _built
except ImportError:
    lscols = None

#: the arrays of a format-2 catalog: the name index, the slot records, the JSON part
INDEX, SLOTS, EXTRA = "names", "vol_slots", "catalog"

_PAGE_HEAD = struct.Struct("<HH")
#: a bulk-built (converted) index fills its pages to about this many bytes, leaving room for inserts
BULK_FILL = 3072

#: reads committed pages of an array: (array name, page numbers) -> {page: 4 KiB}
PageReader = Callable[[str, list[int]], Mapping[int, bytes]]


def _entry_bytes(name: bytes) -> int:
    return len(name) + 5  # its slot, its bytes, its separator


def page_bytes(names: list[bytes]) -> int:
    """Bytes an index page of ``names`` takes."""
    return _PAGE_HEAD.size + sum(map(len, names)) + 5 * len(names) - (1 if names else 0)


def encode_page(names: list[bytes], slots: list[int]) -> bytes:
    """An index page of ``names`` (sorted UTF-8) and their ``slots``."""
    blob = b"\0".join(names)
    raw = _PAGE_HEAD.pack(len(names), len(blob)) + struct.pack(f"<{len(slots)}I", *slots) + blob
    if len(raw) > BLOCK:
        raise ValueError("an index page holds at most 4096 bytes")
    return raw.ljust(BLOCK, b"\0")


def decode_page(raw: bytes, page: int = -1) -> tuple[list[bytes], list[int]]:
    """(names, slots) of an index page; MetadataCorrupt if its layout is not one :func:`encode_page`
    makes (counts past the page, a name empty, too long or not UTF-8, names out of order)."""
    n, nb = _PAGE_HEAD.unpack_from(raw)
    where = f"catalog: name index page {page}"
    if _PAGE_HEAD.size + 4 * n + nb > BLOCK or (n == 0) != (nb == 0):
        raise MetadataCorrupt(f"{where}: counts ({n} names, {nb} bytes) do not fit a page", structure=INDEX)
    slots = list(struct.unpack_from(f"<{n}I", raw, _PAGE_HEAD.size))
    start = _PAGE_HEAD.size + 4 * n
    names = bytes(raw[start:start + nb]).split(b"\0") if n else []
    if len(names) != n or (n and (min(map(len, names)) == 0 or max(map(len, names)) > 1024)):
        raise MetadataCorrupt(f"{where}: its names do not match its count of {n}", structure=INDEX)
    if not all(map(operator.lt, names, names[1:])):  # (C loops: a page is checked in microseconds)
        raise MetadataCorrupt(f"{where}: names out of order", structure=INDEX)
    return names, slots


def _page_blob(raw: bytes, page: int) -> tuple[bytes, list[int]]:
    """(the names' bytes joined by NUL, the slots) of an index page, its counts checked (the names
    are checked by :func:`_bulk_names`)."""
    n, nb = _PAGE_HEAD.unpack_from(raw)
    start = _PAGE_HEAD.size + 4 * n
    if start + nb > BLOCK or n == 0 or nb == 0:  # (a stored page holds at least one name)
        raise MetadataCorrupt(f"catalog: name index page {page}: counts ({n} names, {nb} bytes) do not fit a page",
                              structure=INDEX)
    blob = bytes(raw[start:start + nb])
    if blob.count(b"\0") != n - 1 or blob[0] == 0 or blob[-1] == 0 or b"\0\0" in blob:
        raise MetadataCorrupt(f"catalog: name index page {page}: its names do not match its count of {n}",
                              structure=INDEX)
    return blob, list(struct.unpack_from(f"<{n}I", raw, _PAGE_HEAD.size))


def _bulk_names(blobs: list[bytes], count: int) -> list[str]:
    """The names of consecutive index pages (each page's names joined by NUL), decoded at once and
    checked as :func:`decode_page` checks a page's -- UTF-8, at most 1,024 bytes, in order (across
    the pages too: str order is UTF-8 byte order) -- with C loops over the whole list."""
    names = _decode_names([b"\0".join(blobs)] if blobs else [], "catalog: name index")
    if len(names) != count:
        raise MetadataCorrupt("catalog: name index: its names do not match its pages' counts", structure=INDEX)
    if names and max(map(len, names)) > 256 and any(len(n.encode()) > 1024 for n in names if len(n) > 256):
        raise MetadataCorrupt("catalog: name index: a name is longer than 1,024 bytes", structure=INDEX)
    # operator.lt, not str.__lt__: the slot wrapper's call costs 7x the comparison (100,000 names: 2 ms, not 15)
    if not all(map(operator.lt, names, names[1:])):
        raise MetadataCorrupt("catalog: name index: names out of order", structure=INDEX)
    return names


def _decode_names(names: list[bytes], where: str) -> list[str]:
    try:
        return b"\0".join(names).decode("utf-8").split("\0") if names else []
    except UnicodeDecodeError:
        raise MetadataCorrupt(f"{where}: a volume name is not UTF-8", structure=INDEX) from None


def _key(name: str) -> bytes:
    return name.encode("utf-8")


def _order(name: str) -> bytes:
    """A sort key for any name, an odd one too (a lone surrogate is encoded as it stands)."""
    return name.encode("utf-8", "surrogatepass")


def _index_key(name: str) -> bytes | None:
    """``name``'s UTF-8 bytes if the index pages can hold it (1-1,024 bytes of UTF-8 without NUL),
    else None: an odd name, which the fence holds (see :class:`NameIndex`)."""
    try:
        key = name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return key if 0 < len(key) <= 1024 and b"\0" not in key else None


def _odd_names(odd: Any) -> dict[str, int]:
    """The fence's odd names (``[[name, slot], ...]``) as a dict; MetadataCorrupt unless each is a
    name the pages cannot hold, once, with a slot."""
    if not isinstance(odd, list) or any(not isinstance(e, list) or len(e) != 2 or not isinstance(e[0], str)
                                        or type(e[1]) is not int or e[1] < 0 or _index_key(e[0]) is not None
                                        for e in odd):
        raise MetadataCorrupt("catalog: name fence: odd names are malformed", structure=EXTRA)
    out = {n: s for n, s in odd}
    if len(out) != len(odd):
        raise MetadataCorrupt("catalog: name fence: an odd name is listed twice", structure=EXTRA)
    return out


class NameIndex:
    """The name index (``names`` pages and their fence), read a page at a time.

    Names the pages cannot hold -- ones an older thinpool allowed and a format-1 catalog may still
    hold: a lone surrogate, longer than 1,024 bytes, empty, a NUL -- are kept in the fence's ``odd``
    list (``[[name, slot], ...]``, in the JSON part, which escapes them) and answer like any other:
    looked up, listed, renamed, deleted.  New names are validated before they get here
    (:func:`thinpool.rules.check_new_name`), so the list only ever shrinks in practice."""

    def __init__(self, fence: Mapping[str, Any] | None, npages: int, read: PageReader | None) -> None:
        """``fence``: the committed fence (see the module docstring; None: a new index)."""
        self._read = read
        self.npages = npages
        self.keys: list[bytes] = []
        self.pages: list[int] = []
        self.free: list[int] = []
        self.odd: dict[str, int] = {}  # name -> slot of the names the pages cannot hold
        if fence is not None:
            self._decode_fence(fence)
        self._cache: dict[int, tuple[list[bytes], list[int]]] = {}
        self.dirty: set[int] = set()
        self.dead: set[int] = set()

    def _decode_fence(self, fence: Mapping[str, Any]) -> None:
        try:
            pages, free = [int(p) for p in fence["pages"]], [int(p) for p in fence["free"]]
            keys = [_key(k) for k in fence["keys"]]
        except (KeyError, TypeError, ValueError, AttributeError, UnicodeEncodeError):
            raise MetadataCorrupt("catalog: name fence: malformed", structure=EXTRA) from None
        nums = pages + free
        if len(keys) != len(pages) or any(not 0 <= p < self.npages for p in nums) or len(set(nums)) != len(nums) \
                or (keys and keys[0] != b"") or any(a >= b for a, b in zip(keys[1:], keys[2:])):
            raise MetadataCorrupt("catalog: name fence: page numbers or keys are inconsistent", structure=EXTRA)
        self.pages, self.free, self.keys = pages, free, keys
        self.odd = _odd_names(fence.get("odd", []))

    def fence(self) -> dict[str, Any]:
        """The fence as stored (in the JSON part; ``odd`` only when there is one)."""
        out: dict[str, Any] = {"pages": self.pages, "free": self.free,
                               "keys": _decode_names(self.keys, "catalog: name fence")}
        if self.odd:
            out["odd"] = [[n, self.odd[n]] for n in sorted(self.odd, key=_order)]
        return out

    # ------------------------------------------------------------------ pages
    def _load(self, pages: Iterable[int]) -> None:
        want = sorted(set(p for p in pages if p not in self._cache))
        if not want:
            return
        if self._read is None:
            raise MetadataCorrupt(f"catalog: name index page {want[0]} is not loaded", structure=INDEX)
        got = self._read(INDEX, want)
        for p in want:
            self._cache[p] = decode_page(got[p], p)

    def _page(self, p: int) -> tuple[list[bytes], list[int]]:
        self._load([p])
        return self._cache[p]

    def _where(self, key: bytes) -> int:
        """Position (in name order) of the page that holds or would hold ``key``."""
        return bisect.bisect_right(self.keys, key, 1) - 1  # (the first page's key is empty)

    def get(self, name: str) -> int | None:
        """The slot of volume ``name``, or None."""
        key = _index_key(name)
        if key is None:
            return self.odd.get(name)
        if not self.pages:
            return None
        names, slots = self._page(self.pages[self._where(key)])
        i = bisect.bisect_left(names, key)
        return slots[i] if i < len(names) and names[i] == key else None

    def _take_page(self) -> int:
        if self.free:
            p = self.free.pop(0)
            self.dead.discard(p)
        else:
            p = self.npages
            self.npages += 1
        return p

    def insert(self, name: str, slot: int) -> None:
        """Add ``name`` -> ``slot`` (the caller checked that the name is new)."""
        key = _index_key(name)
        if key is None:
            if name in self.odd:
                raise ValueError(f"name {name!r} is already in the index")
            self.odd[name] = slot
            return
        if not self.pages:
            p = self._take_page()
            self.pages, self.keys = [p], [b""]
            self._cache[p] = ([key], [slot])
            self.dirty.add(p)
            return
        at = self._where(key)
        p = self.pages[at]
        names, slots = self._page(p)
        i = bisect.bisect_left(names, key)
        if i < len(names) and names[i] == key:
            raise ValueError(f"name {name!r} is already in the index")
        names.insert(i, key)
        slots.insert(i, slot)
        self.dirty.add(p)
        if page_bytes(names) <= BLOCK:
            return
        # split at the middle of its bytes: the lower half stays, the upper half takes a free page
        half, acc, cut = page_bytes(names) // 2, 0, 1
        for cut, x in enumerate(names[:-1], 1):
            acc += _entry_bytes(x)
            if acc >= half:
                break
        q = self._take_page()
        self._cache[q] = (names[cut:], slots[cut:])
        del names[cut:], slots[cut:]
        self.pages.insert(at + 1, q)
        self.keys.insert(at + 1, self._cache[q][0][0])
        self.dirty.add(q)

    def remove(self, name: str) -> int:
        """Drop ``name``; returns its slot (KeyError if it is not there)."""
        key = _index_key(name)
        if key is None:
            return self.odd.pop(name)
        if not self.pages:
            raise KeyError(name)
        at = self._where(key)
        p = self.pages[at]
        names, slots = self._page(p)
        i = bisect.bisect_left(names, key)
        if i >= len(names) or names[i] != key:
            raise KeyError(name)
        del names[i]
        slot = slots.pop(i)
        if names:
            self.dirty.add(p)
        else:  # an emptied page is released; its number is kept for the next split
            del self.pages[at], self.keys[at]
            if self.keys:
                self.keys[0] = b""
            bisect.insort(self.free, p)
            self.dirty.discard(p)
            self.dead.add(p)
        return slot

    def columns(self) -> tuple[list[str], list[int]]:
        """Every (name, slot), in name order (the odd names last), as two lists (all index pages read
        in one go).  Pages not yet decoded are not split into names one by one: their name bytes are
        joined and decoded once and checked as a whole (:func:`_bulk_names`), what ``ls`` of 100,000
        volumes needs."""
        want = [p for p in self.pages if p not in self._cache]
        raw: Mapping[int, bytes] = {}
        if want:
            if self._read is None:
                raise MetadataCorrupt(f"catalog: name index page {want[0]} is not loaded", structure=INDEX)
            raw = self._read(INDEX, want)
        blobs: list[bytes] = []
        slots: list[int] = []
        for p in self.pages:
            if p in raw:
                blob, s = _page_blob(raw[p], p)
            else:
                n, s = self._cache[p]
                blob = b"\0".join(n)
            blobs.append(blob)
            slots += s
        out = _bulk_names(blobs, len(slots))
        for odd_name in sorted(self.odd, key=_order):
            out.append(odd_name)
            slots.append(self.odd[odd_name])
        return out, slots

    def name_rows(self, nrows: int, gather: Callable[[str, list[int]], Any] | None = None) -> bytes | None:
        """Every name by slot, when the slots are exactly 0..``nrows`` - 1 and every name is on the
        committed pages (none odd, none read or changed since the open): the UTF-8 names of slots 0,
        1, ... separated by NUL, the pages checked as :meth:`columns` checks them (MetadataCorrupt) --
        one C call over the pages, no str per name (``thinpool/_lscols.c``).  None otherwise, or
        without the C extension.  ``gather(array, pages)``, if given, reads the pages into one buffer
        of whole pages in that order (the store's ``gather_into``: no copy per page)."""
        if lscols is None or self.odd or self._cache or self.dirty or self._read is None:
            return None
        if gather is not None:
            pages: Any = gather(INDEX, self.pages) if self.pages else b""
        else:
            raw = self._read(INDEX, self.pages) if self.pages else {}
            pages = [raw[p] for p in self.pages]
        try:
            got = lscols.name_rows(pages, self.pages, nrows)
        except ValueError as e:
            raise MetadataCorrupt(str(e), structure=INDEX) from None
        return got

    def updates(self) -> PageUpdates:
        """The changed pages of ``names`` for a commit."""
        return PageUpdates(self.npages, {p: encode_page(*self._cache[p]) for p in self.dirty}, self.dead)

    def committed(self) -> None:
        """The last :meth:`updates` are durable."""
        self.dirty.clear()
        self.dead.clear()

    @classmethod
    def build(cls, items: Iterable[tuple[str, int]]) -> "NameIndex":
        """A new index of ``items`` (name, slot), pages filled to :data:`BULK_FILL` bytes (a conversion;
        a name the pages cannot hold goes to the fence's odd names)."""
        idx = cls(None, 0, None)
        rows = []
        for n, s in items:
            key = _index_key(n)
            if key is None:
                idx.odd[n] = s
            else:
                rows.append((key, s))
        rows.sort()
        i = 0
        while i < len(rows):
            names: list[bytes] = []
            slots: list[int] = []
            size = _PAGE_HEAD.size - 1
            while i < len(rows) and (not names or size + _entry_bytes(rows[i][0]) <= BULK_FILL):
                names.append(rows[i][0])
                slots.append(rows[i][1])
                size += _entry_bytes(rows[i][0])
                i += 1
            p = idx._take_page()
            idx._cache[p] = (names, slots)
            idx.pages.append(p)
            idx.keys.append(names[0] if idx.keys else b"")
            idx.dirty.add(p)
        return idx
