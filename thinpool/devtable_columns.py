"""The device table's volumes as columns (:meth:`VolumeColumns.volume_columns`, a mixin of
:class:`thinpool.devtable.DeviceTable`): what ``thinpool ls`` lists, one list (or buffer) per field,
built by C loops over the table and the name index -- no object per volume.  With the optional C
extension ``thinpool._lscols`` (thinpool/_lscols.c) the name index pages are read by slot in one call,
no str per name, for the CLI's compiled table formatter.

Plain Python (no numpy), like the device table: the light commands import it.
"""

from __future__ import annotations

import operator
from itertools import repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from .catalog_index import lscols as _lscols
from .mdpages import BLOCK
from .schema import (DEV_CREATION_TIME, DEV_FIELDS, DEV_ID, DEV_MAPPED, DEV_RECORD, DEV_SIZE, DEV_SNAP_TIME,
                     DEV_TRANSACTION, U64_MASK, DevFlag)

if TYPE_CHECKING:
    from . import catalog as cat_format
    from .mdstore import MetadataStore


_FLAGS_AT = DEV_FIELDS.index("flags") * 8  # the low byte of a record's flags (every field is "<q")
_READ_ONLY = int(DevFlag.READ_ONLY)
_READ_ONLY_BYTE = bytes(1 if b & _READ_ONLY else 0 for b in range(256))


def _u64s(transactions: list[int]) -> list[int]:
    """Transaction ids as stored (int64) -> as dm-thin has them (unsigned 64-bit)."""
    return [t & U64_MASK for t in transactions] if transactions and min(transactions) < 0 else transactions


class VolumeColumns:
    """:meth:`volume_columns` of :class:`~thinpool.devtable.DeviceTable` (see the module docstring)."""

    # the device table's state these methods use (set by DeviceTable)
    _devs: Any  # (an anonymous map, or an empty bytearray)
    _pending: dict[str, dict[str, Any]]
    _format2: bool
    store: MetadataStore
    if TYPE_CHECKING:  # DeviceTable's, declared here for the type checker only
        @property
        def _stored(self) -> cat_format.StoredCatalog: ...
        def _check_open(self) -> None: ...
        def _in_use(self) -> bytes: ...
        def _origin_of(self, name: str, slot: int) -> dict[str, Any] | None: ...
        def may_have_external_origins(self) -> bool: ...

    def volume_columns(self, buffers: bool = False) -> dict[str, Any]:
        """Every volume in device-id order as columns (what :meth:`thins` gives, one list per field:
        ``name``, ``dev_id``, ``size``, ``read_only``, ``mapped_blocks``, ``transaction``,
        ``creation_time``, ``snap_time``, and ``external_origin`` -- records or None -- when a volume
        has one).  Each column is built by C loops over the device table and the name index, no
        object per volume: what ``ls`` of 100,000 volumes needs.  With ``buffers``, when the volumes
        fill the first slots in device-id order, the integer columns are memoryviews of the table's
        int64 fields (``transaction`` as stored: signed; release them before changing the table,
        which cannot grow while they are held), ``read_only`` is bytes of 0/1, and ``name`` is
        ``("nul", blob, n)`` (the names by slot, NUL-separated) when the C loops are built, for a
        reader in C (:mod:`thinpool.cli.tables`)."""
        self._check_open()
        if buffers and not self._pending:
            fast = self._buffer_columns()
            if fast is not None:
                return fast
        names, slots = self._stored.index.columns()
        for pending_name, e in self._pending.items():
            names.append(pending_name)
            slots.append(int(e["slot"]))
        used = self._in_use()  # (every page read)
        q = memoryview(self._devs).cast("q")
        width = len(DEV_FIELDS)
        n = len(names)
        if used[:n].count(1) == n and 1 not in used[n:]:
            # the common layout: the volumes fill the first n slots and their device ids rise with the
            # slot (no deletes since): the columns are slices of the table, no sort, no reordering
            dev_ids = q[DEV_ID:n * width:width].tolist()
            by_slot: list[Any] = [None] * n
            try:
                list(map(operator.setitem, repeat(by_slot, n), slots, names))  # (no slot wrapper call)
            except IndexError:
                by_slot = [None]
            if dev_ids == sorted(dev_ids) and None not in by_slot:
                return self._columns_of(q, width, by_slot, slice(0, n * width), dev_ids, buffers)

        def field(f: str) -> list[int]:
            return q[DEV_FIELDS.index(f)::width].tolist()
        dev_ids = field("dev_id")
        order = sorted(range(len(slots)), key=list(map(dev_ids.__getitem__, slots)).__getitem__)
        by_dev = [slots[i] for i in order] if len(order) < 2 else list(itemgetter(*order)(slots))

        def pick(col: list[Any], at: list[int]) -> list[Any]:
            return [col[i] for i in at] if len(at) < 2 else list(itemgetter(*at)(col))
        flags = pick(field("flags"), by_dev)
        out: dict[str, list[Any]] = {
            "name": pick(names, order), "dev_id": pick(dev_ids, by_dev), "size": pick(field("size"), by_dev),
            "read_only": list(map(bool, map(_READ_ONLY.__and__, flags))),
            "mapped_blocks": pick(field("mapped"), by_dev), "transaction": _u64s(pick(field("transaction"), by_dev)),
            "creation_time": pick(field("creation_time"), by_dev), "snap_time": pick(field("snap_time"), by_dev)}
        if self.may_have_external_origins():
            out["external_origin"] = [self._origin_of(n, s) for n, s in zip(out["name"], by_dev)]
        return out

    def _buffer_columns(self) -> dict[str, Any] | None:
        """:meth:`volume_columns` with ``buffers`` in one C pass over the name index (``name`` as
        ``("nul", blob, n)``, see :meth:`thinpool.catalog_index.NameIndex.name_rows`),
        when the volumes fill the first slots in device-id order; None otherwise."""
        used = self._in_use()  # (every page read)
        n = used.count(1)
        if used[:n].count(1) != n or not self._format2 or _lscols is None:
            return None
        rows = self._stored.index.name_rows(n, self._gather_pages)
        q = memoryview(self._devs)[:n * DEV_RECORD.size].cast("q")
        dev_ids = q[DEV_ID::len(DEV_FIELDS)]
        if rows is None or not _lscols.ascending(dev_ids):
            return None
        return self._columns_of(q, len(DEV_FIELDS), ("nul", rows, n), slice(0, len(q)), dev_ids, True)

    def _gather_pages(self, array: str, pages: list[int]) -> bytearray:
        """The committed pages ``pages`` of ``array``, read and verified into one buffer in that order."""
        out = bytearray(len(pages) * BLOCK)
        self.store.gather_into(array, pages, out, range(len(pages)))
        return out

    def _columns_of(self, q: memoryview, width: int, names: Any, rows: slice,
                    dev_ids: Any, buffers: bool = False) -> dict[str, Any]:
        """:meth:`volume_columns` of the device records in ``rows`` (a slice of the table, in slot
        order, which is device-id order) named ``names``."""
        n = len(dev_ids)

        def field(i: int) -> Any:
            col = q[rows.start + i:rows.stop:width]
            return col if buffers else col.tolist()
        ro = bytes(self._devs[_FLAGS_AT:rows.stop * 8:DEV_RECORD.size]).translate(_READ_ONLY_BYTE)
        out: dict[str, Any] = {
            "name": names, "dev_id": dev_ids, "size": field(DEV_SIZE),
            "read_only": ro if buffers else list(map(bool, ro)) if 1 in ro else [False] * n,
            "mapped_blocks": field(DEV_MAPPED),
            "transaction": field(DEV_TRANSACTION) if buffers else _u64s(field(DEV_TRANSACTION)),
            "creation_time": field(DEV_CREATION_TIME), "snap_time": field(DEV_SNAP_TIME)}
        if self.may_have_external_origins():
            out["external_origin"] = [self._origin_of(name, slot) for slot, name in enumerate(names)] \
                if isinstance(names, list) else list(map(self._stored.origin_of, range(n)))
        return out
