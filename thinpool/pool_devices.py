"""The pool's thin devices: create, snapshot, delete, rename, handles and records.

:class:`DeviceOps` is a mixin of :class:`thinpool.pool.Pool` (the methods are the pool's; they live
here so each module holds one concept).  The shared rules (the snapshot records, the catalog entry
of a new volume, free slots) are :mod:`thinpool.rules`'s, which :class:`~thinpool.devtable.DeviceTable`
applies too.  The ``_import_forest`` / ``_import_device_at`` / ``_set_superblock`` / ``_restore_volume`` methods are the
narrow internal interface of :mod:`thinpool.pool_ir` and :mod:`thinpool.repair` (the engine's IR
bridge): nothing outside the pool writes its state.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np

from . import rules
from . import schema as K
from .devtable import DEVS_PER_PAGE, check_new_name
from .errors import Busy, InvalidArgument, NotFound
from .kernel_context import locked_method as _locked
from .kernel_context import volume_key
from .origin import check_new_origin
from .schema import DEV_FIELDS, DevFlag, dev_dtype
from .units import parse_size

if TYPE_CHECKING:
    from .blockmap import BlockMap
    from .dataspace import DataSpaceMap
    from .kernel_context import KernelContext
    from .pool import Pool
    from .thin import Activation, Thin


def _kernels():
    from . import kernels_map  # imported on first use: opening a pool does not need numba
    return kernels_map


class DeviceOps:
    """The device methods of :class:`~thinpool.pool.Pool` (see the module docstring)."""

    # the pool's state these methods use (set by Pool._install)
    _devs: np.ndarray
    _devs_i: np.ndarray
    _devs_dirty: set[int]
    _catalog: dict[str, Any]
    _catalog_dirty: bool
    _catalog_touched: set[str]
    _by_name: dict[str, int]
    _by_dev_id: dict[int, str]
    _gen_floor: int
    # ... and what they use of the rest of Pool (pool.py and its other mixins)
    DATA: ClassVar[str]
    METADATA: ClassVar[str]
    LOCK: ClassVar[str]
    path: str
    _header: dict[str, Any]
    _st: np.ndarray
    _space: DataSpaceMap
    _nodes_map: BlockMap
    _engine: KernelContext
    if TYPE_CHECKING:  # Pool's, declared here for the type checker only (nothing is defined at run time)
        @property
        def block_size(self) -> int: ...
        @property
        def data_path(self) -> str: ...
        @property
        def time(self) -> int: ...
        @property
        def transaction_id(self) -> int: ...
        def _check_open(self) -> None: ...
        def _check_writable(self) -> None: ...
        def _refresh_engine(self) -> None: ...
        def _message_done(self) -> None: ...

    # ------------------------------------------------------------------ lookups
    def _slot(self, name: str) -> int:
        try:
            return self._engine.slots[self._by_name[name]]
        except (KeyError, TypeError):
            raise NotFound(f"pool {self.path}: no thin volume named {name!r}") from None

    def _name_ok(self, name: str) -> None:
        check_new_name(self.path, name, self._by_name)

    def _pick_dev_id(self, dev_id: int | None) -> int:
        return rules.pick_dev_id(self.path, dev_id, self._by_dev_id, int(self._catalog.get("next_dev_id", 1)))

    def _new_slot(self) -> int:
        slot = rules.free_slot(self._devs["flags"])
        if slot is not None:
            return slot
        old = len(self._devs)
        self._devs = np.concatenate([self._devs, np.zeros(DEVS_PER_PAGE, dev_dtype())])
        self._devs_i = self._devs.view(np.int64).reshape(-1, K.DEV_COLUMNS)
        self._devs_dirty.update(range(old, len(self._devs)))
        self._refresh_engine()
        return old

    def _register(self, name: str, record: dict[str, int], origin: dict[str, Any] | None = None) -> int:
        """Put a new device ``record`` in a free slot and name it ``name`` in the catalog (with its
        external ``origin`` record, if any: :mod:`thinpool.origin`)."""
        slot = self._new_slot()
        self._devs[slot] = tuple(record[f] for f in DEV_FIELDS)
        self._devs_dirty.add(slot)
        entry = rules.add_volume(self._catalog, name, record["dev_id"], slot, origin=origin)
        self._gen_floor = int(self._catalog["next_gen"])  # never reissued in this process, even after an abort
        self._catalog_dirty = True
        self._catalog_touched.add(name)
        key = volume_key(record["dev_id"], entry["gen"])
        self._by_name[name] = key
        self._engine.slots[key] = slot
        self._engine.names[key] = name
        self._engine.origins.add(key, origin)
        self._by_dev_id[record["dev_id"]] = name
        return slot

    def _check_size(self, size: int | str) -> int:
        nbytes = parse_size(size, "volume size")
        if nbytes <= 0 or nbytes % 512:
            raise InvalidArgument(f"volume size {nbytes} bytes must be a positive multiple of 512 (a sector)")
        limit = K.MAX_VBLOCKS * self.block_size
        if nbytes > limit:
            raise InvalidArgument(f"volume size {nbytes} bytes exceeds the limit of {limit} bytes "
                                  f"({K.MAX_VBLOCKS} blocks of {self.block_size})")
        return nbytes

    # ------------------------------------------------------------------ dm-thin's device messages
    @_locked
    def create_thin(self, name: str, size: int | str, *, dev_id: int | None = None,
                    read_only: bool = False, external_origin: str | os.PathLike | None = None) -> "Thin":
        """Create an empty thin volume of virtual ``size`` bytes (dm-thin's ``create_thin``).

        Like every pool message (create, snapshot, delete, rename, set_read_only, put_records,
        set_transaction_id, the metadata snapshot's reserve/release) it commits when it succeeds, as
        dm-thin's ``pool_message`` does; inside :meth:`batch` the commit waits for the batch's end.

        ``external_origin``: a read-only file (or block device) under the volume, dm-thin's
        ``external-origin`` thin argument: unmapped blocks read from it, the first partial write to a
        block copies the rest of the block from it, bytes past its end read as zeroes; snapshots of
        the volume share it.  Refused (InvalidArgument) if the pool writes it: a pool file, a file in
        the pool's directory, a data file a pool owns.  Its path, size and modification time are
        recorded; if it changes, the volume's I/O fails with FailedPrecondition naming it (see
        :mod:`thinpool.origin`).  dm-thin's metadata has no place for it: exported metadata does not
        carry it."""
        self._check_writable()
        self._name_ok(name)
        nbytes = self._check_size(size)
        origin = None
        if external_origin is not None:
            origin = check_new_origin(external_origin, self.path,
                                      [os.path.join(self.path, f) for f in (self.DATA, self.METADATA, self.LOCK)]
                                      + [self.data_path])
        dev_id = self._pick_dev_id(dev_id)
        root = self._nodes_map.new_root()
        self._register(name, rules.device_record(dev_id, root, 0, self.transaction_id, self.time, self.time, nbytes,
                                                 read_only), origin)
        self._message_done()
        return self.thin(name)

    @_locked
    def snapshot(self, origin: str, name: str, *, dev_id: int | None = None, read_only: bool = False) -> "Thin":
        """Snapshot ``origin`` as ``name`` (dm-thin's ``create_snap``): O(1) whatever the origin maps.

        The pool time increments; origin and snapshot are stamped with it, so every existing mapping
        becomes shared and the next write to it on either side breaks sharing by copy-on-write.
        """
        self._check_writable()
        oslot = self._slot(origin)
        self._name_ok(name)
        dev_id = self._pick_dev_id(dev_id)
        o = self._devs[oslot]
        t = self.time + 1
        new_origin, snap = rules.snapshot_records({f: int(o[f]) for f in DEV_FIELDS}, dev_id, self.transaction_id, t,
                                                  read_only)
        self._st[K.ST_TIME] = t
        self._devs[oslot] = tuple(new_origin[f] for f in DEV_FIELDS)
        self._devs_dirty.add(oslot)
        self._nodes_map.share_root(snap["root"])
        self._register(name, snap, rules.inherited_origin(self._catalog, origin))
        self._message_done()
        return self.thin(name)

    @_locked
    def delete(self, name: str) -> None:
        """Delete a thin volume (dm-thin's ``delete``; commits, see :meth:`create_thin`).  Blocks only
        it maps are freed by that commit; the volume's snapshots and origin are unaffected.  Handles
        to it raise NotFound.  :class:`~thinpool.errors.Busy` (EBUSY), with nothing changed, while the
        volume is active (:meth:`activate`, a ``with pool.thin(name)`` block, an NBD connection): see
        :meth:`holders`."""
        self._check_writable()
        self.check_deletable(name)
        slot = self._slot(name)
        root = int(self._devs[slot]["root"])
        sp = self._space
        _kernels().release_inner(self._nodes_map.nodes, sp.arrays, self._st, root, 0)
        dev_id = int(self._devs[slot]["dev_id"])
        self._devs[slot] = np.zeros(1, dev_dtype())[0]
        self._devs_dirty.add(slot)
        del self._catalog["volumes"][name]
        key = self._by_name.pop(name)
        del self._engine.slots[key]
        self._engine.gone[key] = self._engine.names.pop(key)
        del self._by_dev_id[dev_id]
        self._engine.origins.drop(key)
        self._catalog_dirty = True
        self._catalog_touched.add(name)
        self._message_done()

    @_locked
    def rename(self, old: str, new: str) -> None:
        """Rename a thin volume (names are thinpool's; dm-thin only knows device ids).  Handles to
        it keep working (they are bound to the device, not the name)."""
        self._check_writable()
        self._slot(old)
        self._name_ok(new)
        entry = self._catalog["volumes"].pop(old)
        self._catalog["volumes"][new] = entry
        key = self._by_name.pop(old)
        self._by_name[new] = key
        self._engine.names[key] = new
        self._by_dev_id[entry["dev_id"]] = new
        self._catalog_dirty = True
        self._catalog_touched.update((old, new))
        self._message_done()

    @_locked
    def set_read_only(self, name: str, read_only: bool = True) -> None:
        """Make a volume read-only (writes and discards raise ReadOnly) or writable again."""
        self._check_writable()
        slot = self._slot(name)
        flags = DevFlag(int(self._devs[slot]["flags"]))
        self._devs[slot]["flags"] = int(flags | DevFlag.READ_ONLY if read_only else flags & ~DevFlag.READ_ONLY)
        self._devs_dirty.add(slot)
        self._message_done()

    # ------------------------------------------------------------------ activation (dm-thin's open_count)
    @_locked
    def activate(self, name: str, *, holder: str = "pool.activate") -> "Activation":
        """Make volume ``name`` active until the returned :class:`~thinpool.thin.Activation` is released
        (``release()``, or leaving ``with pool.activate(name) as vol:``, which gives the volume's
        :class:`~thinpool.thin.Thin`).  An active volume cannot be deleted (:class:`~thinpool.errors.Busy`),
        as dm-thin refuses to delete a thin device a loaded thin target has open.  ``holder`` names who
        holds it in that error (the NBD server passes ``"NBD connection"``).  NotFound if no such volume."""
        from .thin import Activation
        self._check_open()
        if not isinstance(holder, str) or not holder:
            raise InvalidArgument(f"pool {self.path}: activation holder must be a non-empty string, got {holder!r}")
        return Activation(self._handle(name), holder)

    def holders(self, name: str) -> dict[str, int]:
        """Who holds volume ``name`` active right now: holder -> count (``{}`` when it is not active).
        A plain handle from :meth:`thin` holds nothing; :meth:`activate`, a ``with pool.thin(name)``
        block (holder ``"with block"``) and an NBD connection each hold it once."""
        self._check_open()
        self._slot(name)
        return self._engine.holders(self._by_name[name])

    def check_deletable(self, name: str) -> None:
        """NotFound if there is no volume ``name``; :class:`~thinpool.errors.Busy` if it is active
        (see :meth:`holders`).  :meth:`delete` checks this first; a caller deleting several volumes
        checks them all before deleting any."""
        self._check_open()
        self._slot(name)
        held = self._engine.holders(self._by_name[name])
        if held:
            who = ", ".join(f"{h} x{n}" for h, n in sorted(held.items()))
            raise Busy(f"pool {self.path}: cannot delete thin volume {name!r}: it is active (held by {who}"
                       f"{'; open over NBD: disconnect the client first' if 'NBD connection' in held else ''}); "
                       f"dm-thin refuses to delete an open thin device with EBUSY")

    # ------------------------------------------------------------------ handles
    def _handle(self, name: str) -> "Thin":
        from .thin import Thin
        return Thin(cast("Pool", self), name)

    def thin(self, name: str) -> "Thin":
        """The thin volume called ``name`` (NotFound if none): a handle bound to the device (its id
        and creation generation), so it follows a rename and raises NotFound once the volume is deleted.
        A plain handle does not hold the volume active (it may be deleted under it); ``with
        pool.thin(name) as vol:`` does, until the block ends (see :meth:`activate`)."""
        self._check_open()
        self._slot(name)
        return self._handle(name)

    def thins(self) -> list["Thin"]:
        """All thin volumes, in device-id order."""
        self._check_open()
        return [self._handle(self._by_dev_id[d]) for d in sorted(self._by_dev_id)]

    def by_dev_id(self, dev_id: int) -> "Thin":
        """The thin volume with device id ``dev_id``."""
        if dev_id not in self._by_dev_id:
            raise NotFound(f"pool {self.path}: no thin device with id {dev_id}")
        return self._handle(self._by_dev_id[dev_id])

    def name_of(self, dev_id: int) -> str | None:
        """The name of the volume with device id ``dev_id`` (None if there is none)."""
        return self._by_dev_id.get(dev_id)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    # ------------------------------------------------------------------ records (snapshotter etc.)
    def may_have_external_origins(self) -> bool:
        """Whether a volume may have an external origin (the light ops' question, see
        :class:`~thinpool.rules.LightPool`; the pool has its catalog parsed, so it knows)."""
        return any(v.get("origin") is not None for v in self._catalog["volumes"].values())

    def record_namespaces(self) -> list[str]:
        """Namespaces that hold records (see :meth:`get_records`)."""
        return sorted(self._catalog["records"])

    def get_records(self, namespace: str) -> dict[str, Any]:
        """A copy of the records stored under ``namespace`` in the pool's own metadata."""
        return json.loads(json.dumps(self._catalog["records"].get(namespace, {})))

    @_locked
    def put_records(self, namespace: str, records: dict[str, Any]) -> None:
        """Replace the records under ``namespace``; committed in the same transaction as the devices."""
        self._check_writable()
        if not isinstance(namespace, str) or not namespace:
            raise InvalidArgument(f"pool {self.path}: record namespace must be a non-empty string, got {namespace!r}")
        try:
            copy = json.loads(json.dumps(records))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"pool {self.path}: records for {namespace!r} are not JSON-serialisable ({exc})") \
                from None
        self._catalog["records"][namespace] = copy
        self._catalog_dirty = True
        self._message_done()

    # ------------------------------------------------------------------ the IR bridge's interface
    def _import_forest(self, leaves: tuple, mids: tuple, roots: tuple, counts: tuple,
                       data_blocks: np.ndarray) -> np.ndarray:
        """Install a block map with shared nodes built by :mod:`thinpool.pool_ir` (restore/import; see
        :meth:`BlockMap.add_forest <thinpool.blockmap.BlockMap.add_forest>`) and raise the counts of
        ``data_blocks`` (one entry per mapping of every distinct leaf); returns the roots' slots for
        :meth:`_import_device_at`."""
        root_slots = self._nodes_map.add_forest(leaves, mids, roots, counts)
        self._space.add_refs(data_blocks)
        return root_slots

    def _import_device_at(self, name: str, dev_id: int, root: int, mapped: int, *, transaction: int,
                          creation_time: int, snap_time: int, size: int) -> None:
        """A new device ``name`` whose mappings are the tree at ``root`` (from :meth:`_import_forest`,
        which counted this device's reference)."""
        self._register(name, rules.device_record(dev_id, root, mapped, transaction, creation_time, snap_time, size))

    def _set_superblock(self, *, time: int, transaction_id: int) -> None:
        """The imported metadata's pool time and transaction id (restore/import), and recount the space map."""
        self._st[K.ST_TIME] = time
        self._header["transaction_id"] = transaction_id
        self._space.recount()

    def _restore_volume(self, name: str, *, size: int, read_only: bool, origin: dict[str, Any] | None = None) -> None:
        """A salvaged volume's size, read-only flag and external origin record, which the IR does not
        carry (repair)."""
        slot = self._slot(name)
        if origin is not None:
            self._engine.origins.add(self._by_name[name], origin)  # MetadataCorrupt if malformed
            self._catalog["volumes"][name]["origin"] = dict(origin)
            self._catalog_dirty = True
            self._catalog_touched.add(name)
        row = self._devs[slot]
        row["size"] = size
        if read_only:
            row["flags"] = int(DevFlag(int(row["flags"])) | DevFlag.READ_ONLY)
        self._devs_dirty.add(slot)

    def _set_needs_check(self, reason: str) -> None:
        """Imported metadata whose superblock has needs_check set (pool_ir): the flag is kept, and
        the pool is read-only once the import is committed."""
        self._header["needs_check"] = True
        self.read_only_reason = reason

    def _restore_header(self, fields: dict[str, Any], *, next_dev_id: int) -> None:
        """Superblock fields a repair keeps from the damaged pool (low water mark, uuid, data file ...)."""
        self._header.update(fields)
        self._catalog["next_dev_id"] = next_dev_id
        self._catalog_dirty = True
