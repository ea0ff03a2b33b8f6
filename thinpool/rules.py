"""The rules a pool's device table follows, as pure functions shared by the two ways to open a pool.

:class:`~thinpool.pool.Pool` (the whole engine) and :class:`~thinpool.devtable.DeviceTable` (the
device table only, for ``status``, ``ls`` and ``snapshot`` without numpy) apply the same rules; they
are written once here: the mode a pool opens in, the open / writable checks, what a volume may be
named, the records a snapshot writes, which slot a new device takes, the catalog entry of a new
volume and the status report.  Nothing here does I/O or imports numpy.

:class:`LightPool` is what the light control ops need of either (the typing ``Protocol`` both
classes satisfy); :class:`VolumeInfo` is what they read of a volume (:class:`~thinpool.thin.Thin`
and :class:`~thinpool.devtable.VolumeRecord` both provide it).
"""

from __future__ import annotations

import operator
import re
from typing import TYPE_CHECKING, Any, Container, Iterable, Mapping, Protocol, cast, runtime_checkable

from .errors import AlreadyExists, InvalidArgument, MetadataCorrupt, NoSpace, ReadOnly
from .schema import DEV_FIELDS, DISCARD_WORDS, DevFlag, Mode, transaction_field
from .units import parse_size

if TYPE_CHECKING:
    from .catalog import StoredCatalog
    from .status import PoolStatus

_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,1024}$")
#: the longest volume name, in UTF-8 bytes (an NBD export name may have 4096)
MAX_NAME_BYTES = 1024


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a volume name (the rule it breaks), or None if it can.

    A volume name is a string of 1 to :data:`MAX_NAME_BYTES` bytes of valid UTF-8 (so no lone
    surrogates: a name the CLI got as undecodable bytes is refused, it could not be an NBD export
    name), with no NUL or other control character, and ``/`` only between non-empty components that
    are not ``.`` or ``..`` (the snapshotter's ``snap/<namespace>/<id>`` names; a name is never a
    path that leaves a directory).
    """
    if not isinstance(name, str):
        return f"a volume name must be a string, not {type(name).__name__}"
    if not name:
        return "a volume name must not be empty"
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return "a volume name must be valid UTF-8 (it contains a lone surrogate / undecodable byte)"
    if len(raw) > MAX_NAME_BYTES:
        return f"a volume name must be 1-{MAX_NAME_BYTES} bytes of UTF-8 (this one has {len(raw)})"
    if "\x00" in name:
        return "a volume name must not contain NUL"
    if not _NAME_RE.fullmatch(name):  # fullmatch: "$" alone would let a trailing newline through
        return "a volume name must not contain control characters"
    if "/" in name and any(part in ("", ".", "..") for part in name.split("/")):
        return "'/' may only separate non-empty components other than '.' and '..'"
    return None


def check_new_name(pool_path: str, name: Any, by_name: Container[str]) -> None:
    """A new volume name: InvalidArgument naming the rule it breaks (see :func:`name_problem`),
    AlreadyExists if it is in use."""
    problem = name_problem(name)
    if problem is not None:
        shown = repr(name[:80] + ("..." if len(name) > 80 else "")) if isinstance(name, str) else repr(name)[:80]
        raise InvalidArgument(f"invalid volume name {shown}: {problem}")
    if name in by_name:
        raise AlreadyExists(f"pool {pool_path}: a thin volume named {name!r} already exists")


_orjson: Any = False  # not imported yet (None: not installed); see _json_lib


def _json_lib() -> Any:
    """orjson, imported on first use (about 3 ms of import, with zoneinfo, that ``status`` never needs),
    or None when it is not installed."""
    global _orjson
    if _orjson is False:
        try:
            import orjson
            _orjson = orjson
        except ImportError:  # pragma: no cover - orjson is a dependency; the standard library still works
            _orjson = None
    return _orjson


#: catalogs up to this many bytes are read by the standard library (already imported by the CLI):
#: a format-2 catalog's JSON part (origins, records, the name fence: 11 KB for 100,000 volumes) parses
#: in well under a millisecond there, less than importing orjson costs
SMALL_JSON = 64 * 1024

MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 1 << 30
DEFAULT_MAX_THINS = 1000


def check_block_size(block_size: int | str) -> int:
    """Validate a data block size: a multiple of 64 KiB within 64 KiB .. 1 GiB (dm-thin's rule)."""
    bs = parse_size(block_size, "block size")
    if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs % MIN_BLOCK_SIZE:
        raise InvalidArgument(f"block size {bs} bytes is invalid: it must be a multiple of 64KiB "
                              f"between 64KiB and 1GiB")
    return bs


def default_metadata_blocks(nr_data_blocks: int, max_thins: int = DEFAULT_MAX_THINS) -> int:
    """Metadata size in 4 KiB blocks: thin_metadata_size's formula, doubled for
    copy-on-write headroom, plus two pages per thin device, at least 2 MiB."""
    formula = 1 + (2 * nr_data_blocks) // 252 + max_thins
    return max(512, 2 * formula + 2 * max_thins + 64)


#: device ids are 24 bits, as dm-thin's
MAX_DEV_ID = (1 << 24) - 1


def catalog_dumps(catalog: Mapping[str, Any]) -> bytes:
    """The catalog as stored (JSON, UTF-8).  orjson when installed: a format-1 pool of 100,000 volumes
    has a 6 MB catalog, which the standard library takes 0.1-0.7 s to write and orjson 10 ms
    (docs/performance.md, S10), and a format-2 catalog's JSON part holds the snapshotter's records;
    the standard library otherwise, or for what orjson refuses (a name with a lone surrogate).
    Either's output is read by both; :class:`~thinpool.pool.Pool` and
    :class:`~thinpool.devtable.DeviceTable` both write through here, so they commit the same bytes."""
    lib = _json_lib()
    if lib is not None:
        try:
            return lib.dumps(catalog)
        except TypeError:
            pass
    import json
    return json.dumps(catalog).encode()


def catalog_loads(raw: bytes) -> dict[str, Any]:
    """The catalog from its stored bytes (:func:`catalog_dumps`); ValueError if it is not JSON.  A
    small document (:data:`SMALL_JSON`) is read by the standard library, a large one by orjson."""
    lib = _json_lib() if len(raw) > SMALL_JSON else None
    if lib is not None:
        try:
            return lib.loads(raw)
        except lib.JSONDecodeError:
            pass  # the standard library's verdict (and error) below: it also reads what orjson refuses
    import json
    return json.loads(raw)


def open_catalog(raw: bytes, format2: bool, npages: Any, read_pages: Any, where: str
                 ) -> "tuple[StoredCatalog, dict[str, Any] | None]":
    """A pool's stored catalog from its JSON part ``raw``, and the format-1 catalog it came from (None
    for format 2): format 2 opened (:class:`thinpool.catalog.StoredCatalog`: the index pages read through
    ``npages(name)`` and ``read_pages(name, pages)`` when needed), or a format-1 JSON catalog parsed whole
    and built into the form its first commit writes (``records`` defaulted).  MetadataCorrupt naming
    ``where`` when a format-1 catalog is not JSON."""
    from .catalog import StoredCatalog
    if format2:
        return StoredCatalog.open(npages, read_pages, raw, catalog_loads), None
    try:
        old = catalog_loads(raw)
    except ValueError:
        raise MetadataCorrupt(f"{where}: catalog is not valid JSON", structure="catalog") from None
    old.setdefault("records", {})
    return StoredCatalog.build(old["volumes"], old["records"]), old


def new_catalog_entry(catalog: dict[str, Any], dev_id: int, slot: int) -> dict[str, int]:
    """The catalog entry of a volume being created: its device id, table slot and creation
    generation (``gen``, from the catalog's ``next_gen`` counter, which it advances).  A device id can
    be reused after a delete; (dev id, gen) never is -- handles and NBD exports bind to it."""
    gen = int(catalog.get("next_gen", 1))
    catalog["next_gen"] = gen + 1
    return {"dev_id": dev_id, "slot": slot, "gen": gen}


class DevIdsInUse(Protocol):
    """What :func:`pick_dev_id` asks of the ids in use: ``id in ids``, and ``ids[id]`` (the name) for the error."""

    def __contains__(self, dev_id: object) -> bool: ...

    def __getitem__(self, dev_id: int) -> str: ...


def pick_dev_id(pool_path: str, dev_id: Any, by_dev_id: DevIdsInUse, next_dev_id: int) -> int:
    """``dev_id`` if given and free (24 bits, as dm-thin), else the first free id from ``next_dev_id``."""
    if dev_id is not None:
        try:
            value = operator.index(dev_id) if not isinstance(dev_id, bool) else -1
        except TypeError:
            value = -1
        if not 0 <= value <= MAX_DEV_ID:
            raise InvalidArgument(f"device id {dev_id!r} is out of range (0..{MAX_DEV_ID}, 24 bits)")
        if value in by_dev_id:
            raise AlreadyExists(f"pool {pool_path}: device id {value} is in use by {by_dev_id[value]!r}")
        return value
    for i in range(MAX_DEV_ID + 1):
        cand = (next_dev_id + i) & MAX_DEV_ID
        if cand not in by_dev_id:
            return cand
    raise NoSpace(f"pool {pool_path}: all 2^24 device ids are in use")


def derive_mode(needs_check: bool, read_only: bool = False) -> Mode:
    """The mode a pool opens in: read-only if its metadata needs checking or it is opened read-only
    (dm-thin's ``read_only`` feature), else write.  Out-of-data-space is never derived at load: as
    in the kernel it is entered by the first allocation that finds no free block (a pool that is
    exactly full opens in write mode and serves writes to provisioned blocks), and
    out-of-metadata-space by a commit that leaves no metadata room beyond the reserve."""
    if needs_check or read_only:
        return Mode.READ_ONLY
    return Mode.WRITE


def check_open(path: str, closed: bool) -> None:
    """InvalidArgument if the pool at ``path`` has been closed."""
    if closed:
        raise InvalidArgument(f"pool {path} is closed")


def way_out(path: str, mode: str, needs_check: bool, reason: str = "") -> str:
    """Why a pool in ``mode`` refuses pool messages, and what gets it out (for the error message)."""
    if needs_check:
        return (f"pool {path} is {mode} and its metadata needs checking: run 'thinpool check --clear-needs-check "
                f"{path}' (clears the flag if the metadata is sound) or 'thinpool repair'")
    if mode == Mode.OUT_OF_METADATA_SPACE:
        return (f"pool {path} is out of metadata space" + (f" ({reason})" if reason else "") +
                f": grow the metadata ('thinpool resize {path} --metadata-size SIZE', Pool.resize_metadata)")
    if mode == Mode.FAIL:
        return f"pool {path} has failed" + (f" ({reason})" if reason else "") + ": reopen it"
    return f"pool {path} is {mode}" + (f" ({reason})" if reason else "")


def check_writable(path: str, *, closed: bool, read_only: bool, mode: str, needs_check: bool,
                   reason: str = "") -> None:
    """The check before a pool message: InvalidArgument if closed; ReadOnly (saying why and the way
    out) if opened read-only or in a mode that refuses messages (out-of-metadata-space, read-only,
    fail: dm-thin's ``pool_message`` refuses them in those modes)."""
    check_open(path, closed)
    if read_only:
        raise ReadOnly(f"pool {path} is opened read-only: reopen it writable to change it")
    if mode in (Mode.OUT_OF_METADATA_SPACE, Mode.READ_ONLY, Mode.FAIL):
        raise ReadOnly(way_out(path, mode, needs_check, reason))


def check_io_writable(path: str, *, closed: bool, read_only: bool, mode: str, needs_check: bool,
                      reason: str = "") -> None:
    """The check before a write or discard: those are served in every mode but fail (dm-thin serves
    writes to provisioned, unshared blocks in read-only and out-of-metadata-space mode, and completes
    discards there without unmapping); a pool opened read-only has its files opened read-only."""
    check_open(path, closed)
    if read_only:
        raise ReadOnly(f"pool {path} is opened read-only: reopen it writable to write")
    if mode == Mode.FAIL:
        raise ReadOnly(way_out(path, mode, needs_check, reason))


#: the modes that serve only writes to provisioned, unshared blocks (no metadata change)
NO_METADATA_CHANGE = (Mode.OUT_OF_METADATA_SPACE, Mode.READ_ONLY)


def metadata_reserve(nr_metadata_blocks: int) -> int:
    """Metadata blocks kept back for the commit that enters out-of-metadata-space mode: dm-thin's
    ``__set_metadata_reserve`` (a tenth of the device, at most 4096 blocks; at least 8 here)."""
    return min(4096, max(8, nr_metadata_blocks // 10))


def free_slot(flags: Iterable[int]) -> int | None:
    """The first device-table slot not in use (``flags`` of every slot, in order), or None if all
    are (the caller then appends a page of slots).  A numpy array is searched in one vectorised pass
    (a pool with 100,000 volumes creates the next one in microseconds, not a Python loop over all)."""
    mask = int(DevFlag.IN_USE)
    if hasattr(flags, "dtype"):
        import numpy as np
        free = np.flatnonzero((cast("np.ndarray", flags) & mask) == 0)  # (has a dtype: an array)
        return int(free[0]) if len(free) else None
    for slot, f in enumerate(flags):
        if not int(f) & mask:
            return slot
    return None


def snapshot_records(origin: Mapping[str, int], dev_id: int, transaction: int, time: int,
                     read_only: bool) -> tuple[dict[str, int], dict[str, int]]:
    """dm-thin's ``create_snap`` on the device table: ``(origin, snapshot)`` records after
    snapshotting ``origin`` at pool time ``time`` (already incremented).  The snapshot shares the
    origin's root, mapped count and size; both are stamped with ``time``."""
    new_origin = {f: int(origin[f]) for f in DEV_FIELDS}
    new_origin["snap_time"] = time
    snap = device_record(dev_id, int(origin["root"]), int(origin["mapped"]), transaction, time, time,
                         int(origin["size"]), read_only)
    return new_origin, snap


def device_record(dev_id: int, root: int, mapped: int, transaction: int, creation_time: int, snap_time: int,
                  size: int, read_only: bool = False, flags: int = 0) -> dict[str, int]:
    """A new device's record (in use; read-only if asked); ``flags`` adds further bits."""
    return dict(dev_id=dev_id, root=root, mapped=mapped, transaction=transaction_field(transaction),
                creation_time=creation_time,
                snap_time=snap_time, size=size,
                flags=int(DevFlag.IN_USE | (DevFlag.READ_ONLY if read_only else 0) | flags))


def add_volume(catalog: dict[str, Any], name: str, dev_id: int, slot: int,
               origin: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Record a new volume ``name`` in ``catalog`` (its entry, with a fresh generation, and its external
    ``origin`` record if any) and advance the catalog's next device id past ``dev_id``; returns the entry."""
    entry: dict[str, Any] = dict(new_catalog_entry(catalog, dev_id, slot))
    if origin is not None:
        entry["origin"] = dict(origin)
    catalog["volumes"][name] = entry
    catalog["next_dev_id"] = (dev_id + 1) & MAX_DEV_ID
    return entry


def inherited_origin(catalog: Mapping[str, Any], origin_name: str) -> dict[str, Any] | None:
    """The external origin a snapshot of volume ``origin_name`` inherits (its record, or None): every
    snapshot of an external-origin thin reads the same origin, as dm-thin requires all its internal
    snapshots to be activated with the same origin argument."""
    rec = catalog["volumes"][origin_name].get("origin")
    return dict(rec) if rec is not None else None


def pool_status(header: Mapping[str, Any], *, time: int, held: Mapping[str, Any] | None, mode: str,
                used_data_blocks: int, total_data_blocks: int, used_metadata_blocks: int, total_metadata_blocks: int,
                nr_thins: int, error_if_no_space: bool | None = None, queued_writes: int = 0,
                metadata_reserve_blocks: int = 0) -> PoolStatus:
    """The status report from the superblock's fields and what only the caller knows (the live pool
    time, counts, the mode, and the no-space policy in force if a queue's timeout changed it)."""
    from .status import PoolStatus  # (a dataclass: about 2 ms of import that `snapshot` and `ls` never need)
    return PoolStatus(
        transaction_id=int(header["transaction_id"]), time=time,
        data_block_size=int(header["block_size"]), used_data_blocks=used_data_blocks,
        total_data_blocks=total_data_blocks, used_metadata_blocks=used_metadata_blocks,
        total_metadata_blocks=total_metadata_blocks, mode=str(mode), low_water_mark=int(header["low_water_mark"]),
        held_root=int(held["root_block"]) if held else None, needs_check=bool(header.get("needs_check")),
        error_if_no_space=bool(header.get("error_if_no_space", True)) if error_if_no_space is None
        else bool(error_if_no_space),
        zero_new_blocks=bool(header.get("zero_new_blocks", True)), nr_thins=nr_thins,
        discard=str(header.get("discard", "passdown")),
        no_space_timeout=float(header.get("no_space_timeout", 60.0)), queued_writes=queued_writes,
        metadata_reserve_blocks=metadata_reserve_blocks)


#: the discard settings (LVM's names for dm-thin's pool features, docs/dm-thin.md §6)
DISCARD_MODES = tuple(DISCARD_WORDS)


def check_discard(value: Any) -> str:
    """A discard setting: ``passdown`` (dm-thin's default), ``nopassdown`` (``no_discard_passdown``) or
    ``ignore`` (``ignore_discard``); the kernel's feature words are accepted too."""
    if isinstance(value, str):
        v = value.strip().lower().replace("-", "_")
        for mode, word in DISCARD_WORDS.items():
            if v in (mode, word) or v.replace("_", "") == mode:
                return mode
    raise InvalidArgument(f"discard setting must be one of {', '.join(DISCARD_MODES)} (dm-thin: "
                          f"{', '.join(DISCARD_WORDS.values())}), got {value!r}")


def check_discard_change(path: str, old: str, new: str) -> None:
    """dm-thin's rule for a table reload of an active pool (``pool_ctr``): passdown may change, but
    turning discards on or off may not -- "Discard support cannot be disabled once enabled" (nor
    enabled once disabled): the thin devices' discard limits are set when they are activated.  The
    pool must be deactivated (closed) and activated again (:meth:`Pool.open` with ``discard=``)."""
    if (old == "ignore") != (new == "ignore"):
        raise InvalidArgument(f"pool {path}: cannot change discard from {old} to {new} while the pool is active "
                              f"(dm-thin: \"Discard support cannot be disabled once enabled\"); close the pool "
                              f"and open it with the new setting (thinpool set on a pool that is not served)")


@runtime_checkable
class VolumeInfo(Protocol):
    """What a light op reads of a volume."""

    @property
    def name(self) -> str: ...
    @property
    def dev_id(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def mapped_blocks(self) -> int: ...
    @property
    def transaction(self) -> int: ...
    @property
    def creation_time(self) -> int: ...
    @property
    def snap_time(self) -> int: ...
    @property
    def read_only(self) -> bool: ...


@runtime_checkable
class LightPool(Protocol):
    """What the light control ops (``status``, plain ``ls``, ``snapshot``) need of a pool: both
    :class:`~thinpool.pool.Pool` and :class:`~thinpool.devtable.DeviceTable` provide it."""

    METADATA: str
    path: str
    read_only: bool

    @property
    def block_size(self) -> int: ...
    @property
    def time(self) -> int: ...
    @property
    def transaction_id(self) -> int: ...
    @property
    def data_path(self) -> str: ...
    @property
    def catalog(self) -> Mapping[str, Any]: ...
    def status(self) -> PoolStatus: ...
    def may_have_external_origins(self) -> bool: ...
    def thin(self, name: str) -> Any: ...
    def thins(self) -> list[Any]: ...
    def snapshot(self, origin: str, name: str, *, dev_id: int | None = None, read_only: bool = False) -> Any: ...
    def batch(self) -> Any: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...
    def close(self, commit: bool = True) -> None: ...
