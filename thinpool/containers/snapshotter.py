"""A containerd-style snapshotter on a thin pool (containerd's ``Snapshotter`` interface, block-level).

Model (containerd ``core/snapshots``; docs/containers.md §3)
-----------------------------------------------------------------------------------
* A snapshot is **active** (writable, from :meth:`Snapshotter.prepare`), a **view** (read-only, from
  :meth:`Snapshotter.view`) or **committed** (from :meth:`Snapshotter.commit`; read-only; the only kind
  that can be a parent).  Active and view snapshots are addressed by *key*, committed ones by *name*;
  keys and names share one key space per namespace.
* Each snapshot is one thin volume of the pool.  A snapshot with a parent is a dm-thin snapshot
  (``create_snap``) of the parent's volume; a parentless one is an empty thin volume of ``base_size``.
  Commit turns the active volume into a read-only volume *under the same volume name* (an O(1)
  read-only snapshot of it replaces it), so children snapshot exactly the committed blocks.
* Volume names are ``snap/<namespace>/<id>`` where ``<id>`` is a per-namespace number that never
  changes for the life of the snapshot (commit keeps it, as containerd's devmapper snapshotter does).
  :meth:`Snapshotter.parse_volume_name` and :meth:`Snapshotter.key_for_volume` reverse the mapping.
* A record is bound to its volume's identity -- the device id and, where the pool keeps one, the
  volume's creation generation -- not to the name alone: a volume that merely carries a snapshot's
  name (the snapshot's volume was deleted or renamed away outside the snapshotter) is never removed,
  made read-only or mounted as that snapshot.  Plain volume commands refuse to delete or rename a
  volume that a record owns (:func:`snapshot_owner`), naming the snapshot and ``thinpool snapshotter remove``.
* Records (kind, parent, labels, timestamps, id) live in the pool's own metadata under the records
  namespace ``snapshots/<namespace>`` (:meth:`thinpool.pool.Pool.put_records`), so they are committed in
  the **same transaction** as the thin devices they describe: after a crash at any point there is never
  a record without its device nor a device without its record (containerd keeps two journals and has
  had exactly that bug, containerd#5646).  By default every mutation is one pool batch
  (:meth:`thinpool.pool.Pool.batch`): its device message and its records commit together, once;
  ``autocommit=False`` leaves that to the caller, who runs mutations inside its own batch (a pool
  message outside any batch commits on its own, as dm-thin's do).

Errors (containerd ``errdefs`` kinds mapped onto :mod:`thinpool.errors`)
--------------------------------------------------------------------------
=================  ====================================================================================
AlreadyExists      prepare/view with a key that exists (any kind); commit to a name that exists
NotFound           any method on a missing key; prepare/view with a missing parent
InvalidArgument    prepare/view with a parent that is not committed; update of a field other than
                   labels; malformed key, labels or filter
FailedPrecondition commit of a key that is not active; commit whose parent is not committed;
                   remove of a snapshot that has children; mounts of a committed snapshot
=================  ====================================================================================

Usage is block-level and exact: a snapshot *owns* the mapped blocks whose data block differs from its
parent's mapping at the same virtual block (newly provisioned or copy-on-write broken).  containerd's
devmapper snapshotter reports the growth of mapped sectors instead, which misses overwrites of
inherited blocks; :class:`SnapshotUsage` carries that figure too (``mapped_growth_blocks``) for comparison.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable

import numpy as np

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ..units import parse_size
from .filters import KINDS, parse_filter
from .snapshot_rules import check_key, check_labels, check_namespace

if TYPE_CHECKING:
    from ..pool import Pool
    from ..thin import Thin

VOLUME_PREFIX = "snap/"
RECORDS_PREFIX = "snapshots/"
DEFAULT_BASE_SIZE = 10 << 30  # Docker's dm.basesize default
_VOLUME_RE = re.compile(r"^snap/([^/]+)/([0-9]+)\Z")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


# ------------------------------------------------------------------------------------------------ values
@dataclass(frozen=True)
class Info:
    """containerd's ``snapshots.Info``: what :meth:`Snapshotter.stat` returns.

    ``parent`` is ``""`` for a snapshot without a parent (as in containerd).  ``labels`` is the only
    field :meth:`Snapshotter.update` changes.
    """

    kind: str
    name: str
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (timestamps as ISO 8601 strings)."""
        return {"kind": self.kind, "name": self.name, "parent": self.parent, "labels": dict(self.labels),
                "created": self.created.isoformat() if self.created else None,
                "updated": self.updated.isoformat() if self.updated else None}


@dataclass(frozen=True)
class Mount:
    """Where a snapshot's content lives: thin volume ``source`` of the pool at ``pool``.

    containerd returns a list of mounts; a thin-pool snapshot is always exactly one volume, so the
    snapshotter returns this one mount.  ``thin`` is the live :class:`~thinpool.thin.Thin` handle.
    """

    type: str
    source: str
    options: tuple[str, ...]
    dev_id: int
    pool: str
    thin: Any = field(default=None, compare=False, repr=False)

    @property
    def read_only(self) -> bool:
        """Whether the mount is read-only (``"ro"`` in its options: a view)."""
        return "ro" in self.options

    def as_dict(self) -> dict[str, Any]:
        """The mount as JSON-ready data (the live ``thin`` handle left out)."""
        return {"type": self.type, "source": self.source, "options": list(self.options),
                "dev_id": self.dev_id, "pool": self.pool}


@dataclass(frozen=True)
class SnapshotUsage:
    """Resource use of one snapshot, excluding its parents (containerd's ``Usage``, block-level).

    * ``size_bytes`` = ``owned_blocks`` x ``block_size``;
    * ``owned_blocks``: mapped blocks whose data block differs from the parent's mapping at the same
      virtual block (new or copy-on-write broken); all mapped blocks for a parentless snapshot;
    * ``mapped_blocks`` / ``exclusive_blocks`` / ``shared_blocks``: thin_ls's view of the volume
      (exclusive = referenced by no other mapping in the pool);
    * ``mapped_growth_blocks``: mapped(snapshot) - mapped(parent), which is what containerd's devmapper
      snapshotter reports (it misses overwrites of inherited blocks and can go negative);
    * ``inodes`` is -1: a block device has no inode count to report.
    """

    size_bytes: int
    inodes: int
    block_size: int
    owned_blocks: int
    mapped_blocks: int
    exclusive_blocks: int
    shared_blocks: int
    mapped_growth_blocks: int

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return {"size_bytes": self.size_bytes, "inodes": self.inodes, "block_size": self.block_size,
                "owned_blocks": self.owned_blocks, "mapped_blocks": self.mapped_blocks,
                "exclusive_blocks": self.exclusive_blocks, "shared_blocks": self.shared_blocks,
                "mapped_growth_blocks": self.mapped_growth_blocks}


def owned_blocks(vblocks: np.ndarray, dblocks: np.ndarray,
                 parent_vblocks: np.ndarray | None, parent_dblocks: np.ndarray | None) -> int:
    """Count the mappings ``(vblocks[i] -> dblocks[i])`` that the parent does not have identically.

    Both mapping lists must be sorted by virtual block (as :meth:`~thinpool.thin.Thin.mappings` returns
    them).  Vectorized: one ``np.searchsorted`` of the child's virtual blocks into the parent's.
    """
    n = len(vblocks)
    if parent_vblocks is None or len(parent_vblocks) == 0 or n == 0:
        return int(n)
    assert parent_dblocks is not None, "a parent's mappings are two lists (virtual, data blocks) or none"
    idx = np.searchsorted(parent_vblocks, vblocks)
    inside = idx < len(parent_vblocks)
    idx_c = np.where(inside, idx, 0)
    inherited = inside & (parent_vblocks[idx_c] == vblocks) & (parent_dblocks[idx_c] == dblocks)
    return int(n - np.count_nonzero(inherited))


# ------------------------------------------------------------------------------------------------ records vs volumes
def _identity(pool: Any, volume: str) -> dict[str, int] | None:
    """``{"dev_id": .., "gen": ..}`` of volume ``volume`` (``gen`` only when the pool's catalog keeps
    creation generations), or None if no such volume."""
    if volume not in pool:
        return None
    ident = {"dev_id": int(pool.thin(volume).dev_id)}
    entry = getattr(pool, "catalog", {}).get("volumes", {}).get(volume)
    if isinstance(entry, dict) and entry.get("gen") is not None:
        ident["gen"] = int(entry["gen"])
    return ident


def _bound(rec: dict[str, Any], ident: dict[str, int] | None) -> bool:
    """Whether record ``rec`` describes the volume of identity ``ident`` (records from before binding
    carry no dev_id and match by name, as they always did)."""
    if ident is None:
        return False
    if "dev_id" in rec and rec["dev_id"] != ident["dev_id"]:
        return False
    return not ("gen" in rec and "gen" in ident and rec["gen"] != ident["gen"])


def snapshot_owner(pool: Any, volume: Any) -> tuple[str, str] | None:
    """``(namespace, key)`` of the snapshotter record that owns volume ``volume`` (bound to its device
    id and creation generation), or None when no record does -- plain volume commands use it to refuse
    deleting or renaming a snapshot's volume behind the snapshotter's back."""
    parsed = Snapshotter.parse_volume_name(volume)
    if parsed is None or not hasattr(pool, "get_records"):
        return None
    namespace, snap_id = parsed
    recs = pool.get_records(RECORDS_PREFIX + namespace) or {}
    ident = _identity(pool, volume)
    for key, rec in (recs.get("snapshots") or {}).items():
        if isinstance(rec, dict) and rec.get("id") == snap_id and _bound(rec, ident):
            return namespace, key
    return None


def refuse_snapshot_volumes(pool: Any, names: Iterable[Any], verb: str = "delete") -> None:
    """FailedPrecondition if any of ``names`` is the volume of a snapshotter record, naming the
    snapshot key and the command to use instead."""
    for name in names:
        owner = snapshot_owner(pool, name)
        if owner is not None:
            namespace, key = owner
            raise FailedPrecondition(
                f"cannot {verb} volume {name!r}: it holds snapshot {key!r} of snapshotter namespace "
                f"{namespace!r}; use `thinpool snapshotter remove POOL {key} --namespace {namespace}` "
                f"(or the snapshotter API) so the record goes with it")


# ------------------------------------------------------------------------------------------------ snapshotter
class Snapshotter:
    """containerd's Snapshotter on a :class:`~thinpool.pool.Pool` (see the module docstring).

    ``namespace`` separates snapshot key spaces (containerd namespaces); ``base_size`` is the virtual
    size of parentless snapshots (children inherit their parent's size); with ``autocommit`` (default)
    every mutation commits the pool, records and devices together.
    """

    def __init__(self, pool: Pool, namespace: str = "default", *, base_size: int | str = DEFAULT_BASE_SIZE,
                 autocommit: bool = True) -> None:
        check_namespace(namespace)
        self.pool = pool
        self.namespace = namespace
        self.base_size = parse_size(base_size, "base size")
        self.autocommit = bool(autocommit)
        self.records_key = RECORDS_PREFIX + namespace
        self._lock: ContextManager[Any] = pool.locked() if hasattr(pool, "locked") else threading.RLock()

    def __repr__(self) -> str:
        return f"<Snapshotter {self.pool.path} namespace={self.namespace!r}>"

    def __enter__(self) -> "Snapshotter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release nothing: the snapshotter holds no resources of its own (idempotent, like containerd's)."""

    # ------------------------------------------------------------------ naming
    def volume_name_for_id(self, snap_id: int) -> str:
        """The thin volume name of snapshot id ``snap_id`` in this namespace: ``snap/<namespace>/<id>``."""
        return f"{VOLUME_PREFIX}{self.namespace}/{int(snap_id)}"

    @staticmethod
    def parse_volume_name(volume: str) -> tuple[str, int] | None:
        """``(namespace, id)`` for a snapshotter volume name ``snap/<namespace>/<id>``, else None."""
        m = _VOLUME_RE.match(volume) if isinstance(volume, str) else None
        return (m.group(1), int(m.group(2))) if m else None

    def volume_name(self, key: str) -> str:
        """The thin volume that holds snapshot ``key`` (NotFound if no such snapshot)."""
        with self._lock:
            return self.volume_name_for_id(self._get(self._load(), key)["id"])

    def key_for_volume(self, volume: str) -> str:
        """The snapshot key/name whose volume is ``volume`` (NotFound if it is not one of ours)."""
        parsed = self.parse_volume_name(volume)
        if parsed is None or parsed[0] != self.namespace:
            raise NotFound(f"volume {volume!r} is not a snapshot volume of namespace {self.namespace!r}")
        with self._lock:
            for key, rec in self._load()["snapshots"].items():
                if rec["id"] == parsed[1]:
                    return key
        raise NotFound(f"volume {volume!r}: no snapshot record in namespace {self.namespace!r}")

    # ------------------------------------------------------------------ records
    def _load(self) -> dict[str, Any]:
        recs = self.pool.get_records(self.records_key)
        recs.setdefault("next_id", 1)
        recs.setdefault("snapshots", {})
        return recs

    def _get(self, recs: dict[str, Any], key: str) -> dict[str, Any]:
        check_key(key, "key")
        try:
            return recs["snapshots"][key]
        except KeyError:
            raise NotFound(f"snapshot {key!r} does not exist (namespace {self.namespace!r})") from None

    def _info(self, key: str, rec: dict[str, Any]) -> Info:
        return Info(kind=rec["kind"], name=key, parent=rec.get("parent", ""), labels=dict(rec.get("labels", {})),
                    created=datetime.fromisoformat(rec["created"]), updated=datetime.fromisoformat(rec["updated"]))

    def _volume_of(self, key: str, rec: dict[str, Any]) -> str:
        """The volume name of record ``rec`` after checking the volume there is still the snapshot's
        (same device id / generation): FailedPrecondition otherwise."""
        volume = self.volume_name_for_id(rec["id"])
        if not _bound(rec, _identity(self.pool, volume)):
            what = "is missing" if volume not in self.pool else "is another volume now (its device id differs)"
            raise FailedPrecondition(f"snapshot {key!r} (namespace {self.namespace!r}): its volume {volume!r} "
                                     f"{what}; it was deleted or replaced outside the snapshotter "
                                     f"(`thinpool snapshotter remove` drops the record and leaves the volume alone)")
        return volume

    def _bind(self, rec: dict[str, Any], volume: str) -> dict[str, Any]:
        ident = _identity(self.pool, volume)
        if ident is not None:
            rec.update(ident)
        return rec

    def _mount(self, rec: dict[str, Any], key: str = "") -> Mount:
        vol = self.pool.thin(self._volume_of(key, rec))
        return Mount(type="thin", source=vol.name, options=("rw",) if rec["kind"] == "active" else ("ro",),
                     dev_id=vol.dev_id, pool=self.pool.path, thin=vol)

    def _alloc_id(self, recs: dict[str, Any]) -> int:
        snap_id = int(recs["next_id"])
        while self.volume_name_for_id(snap_id) in self.pool:  # a stray volume (not ours): skip its id
            snap_id += 1
        recs["next_id"] = snap_id + 1
        return snap_id

    def _transaction(self) -> ContextManager[Any]:
        """With autocommit, one :meth:`~thinpool.pool.Pool.batch` per mutation: its device message
        and its records commit together, once.  Without, nothing: the caller's batch (or the pool
        messages' own commits) decide."""
        return self.pool.batch() if self.autocommit else contextlib.nullcontext()

    def _store(self, recs: dict[str, Any], undo: list[Callable[[], None]]) -> None:
        """Write the records (same transaction as the device changes already made, when a batch is
        open); on failure run ``undo`` so the pool is left as it was."""
        try:
            self.pool.put_records(self.records_key, recs)
        except BaseException:
            self._rollback(undo)
            raise

    @staticmethod
    def _rollback(undo: list[Callable[[], None]]) -> None:
        for fn in reversed(undo):
            try:
                fn()
            except Exception:  # best effort; the pool's own commit keeps records and devices together
                pass

    # ------------------------------------------------------------------ containerd API
    def stat(self, key: str) -> Info:
        """Info of an active, view or committed snapshot (NotFound if missing)."""
        with self._lock:
            return self._info(key, self._get(self._load(), key))

    def update(self, info: Info, fieldpaths: Iterable[str] | None = None) -> Info:
        """Update the labels of snapshot ``info.name``; returns the new Info (``updated`` bumped).

        ``fieldpaths``: ``"labels"`` replaces all labels with ``info.labels``; ``"labels.<k>"`` sets label
        ``k`` from ``info.labels`` (or deletes it when ``info.labels`` lacks ``k``); none given replaces all
        labels.  Any other path is InvalidArgument; a missing snapshot is NotFound.
        """
        given = getattr(info, "name", None)  # an outside value: checked (labels first, then the key)
        new_labels = check_labels(getattr(info, "labels", None) or {}, str(given))
        paths = list(fieldpaths or [])
        with self._lock, self._transaction():
            recs = self._load()
            name = check_key(given, "key")
            rec = self._get(recs, name)
            labels = dict(rec.get("labels", {}))
            if not paths:
                labels = new_labels
            for path in paths:
                if path == "labels":
                    labels = dict(new_labels)
                elif isinstance(path, str) and path.startswith("labels.") and len(path) > len("labels."):
                    k = path[len("labels."):]
                    if k in new_labels:
                        labels[k] = new_labels[k]
                    else:
                        labels.pop(k, None)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {name!r}: only labels "
                                          f"(\"labels\" or \"labels.<key>\") can be updated")
            rec["labels"] = check_labels(labels, name)  # merged labels.<k> paths: the total again
            rec["updated"] = _now()
            self._store(recs, [])
            return self._info(name, rec)

    def prepare(self, key: str, parent: str | None = None, labels: dict[str, str] | None = None) -> Mount:
        """Create an active (writable) snapshot ``key`` of committed snapshot ``parent`` (or an empty
        volume of ``base_size`` when ``parent`` is None/"") and return its mount.

        AlreadyExists if ``key`` exists; NotFound if ``parent`` does not; InvalidArgument if ``parent`` is
        not committed.
        """
        return self._create("active", key, parent, labels)

    def view(self, key: str, parent: str | None = None, labels: dict[str, str] | None = None) -> Mount:
        """Create a read-only view ``key`` of committed snapshot ``parent`` (errors as :meth:`prepare`).
        A view cannot be committed; it must still be removed."""
        return self._create("view", key, parent, labels)

    def _create(self, kind: str, key: str, parent: str | None, labels: dict[str, str] | None) -> Mount:
        check_key(key, "key")
        parent = parent or ""
        labels = check_labels(labels, key)
        with self._lock, self._transaction():
            recs = self._load()
            if key in recs["snapshots"]:
                raise AlreadyExists(f"snapshot {key!r} already exists (namespace {self.namespace!r}, kind "
                                    f"{recs['snapshots'][key]['kind']})")
            if parent:
                prec = recs["snapshots"].get(parent)
                if prec is None:
                    raise NotFound(f"cannot prepare {key!r}: parent snapshot {parent!r} does not exist")
                if prec["kind"] != "committed":
                    raise InvalidArgument(f"cannot prepare {key!r}: parent {parent!r} is {prec['kind']}, "
                                          f"only committed snapshots can be parents")
            snap_id = self._alloc_id(recs)
            volume = self.volume_name_for_id(snap_id)
            ro = kind == "view"
            if parent:
                self.pool.snapshot(self._volume_of(parent, prec), volume, read_only=ro)
            else:
                self.pool.create_thin(volume, self.base_size, read_only=ro)
            now = _now()
            rec = self._bind({"id": snap_id, "kind": kind, "parent": parent, "labels": labels, "created": now,
                              "updated": now}, volume)
            recs["snapshots"][key] = rec
            self._store(recs, [lambda: self.pool.delete(volume)])
            return self._mount(rec, key)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> Info:
        """Commit active snapshot ``key`` as ``name`` (``key`` goes away; the labels become ``labels``).

        containerd's Commit, not the pool's metadata commit (:meth:`thinpool.pool.Pool.commit`, which
        follows it when ``autocommit`` is set). The volume keeps its name and becomes read-only.
        AlreadyExists if ``name`` exists; NotFound if ``key`` does not; FailedPrecondition if ``key`` is not
        active or its parent is not committed.
        """
        check_key(name, "name")
        check_key(key, "key")
        labels = check_labels(labels, name)
        with self._lock, self._transaction():
            recs = self._load()
            snaps = recs["snapshots"]
            if name in snaps:
                raise AlreadyExists(f"cannot commit {key!r} as {name!r}: snapshot {name!r} already exists")
            rec = self._get(recs, key)
            if rec["kind"] != "active":
                raise FailedPrecondition(f"cannot commit snapshot {key!r}: it is {rec['kind']}, not active")
            parent = rec.get("parent", "")
            if parent and snaps.get(parent, {}).get("kind") != "committed":
                raise FailedPrecondition(f"cannot commit snapshot {key!r}: its parent {parent!r} is not committed")
            volume = self._volume_of(key, rec)
            self.pool.set_read_only(volume, True)
            now = _now()
            del snaps[key]
            snaps[name] = self._bind({"id": rec["id"], "kind": "committed", "parent": parent, "labels": labels,
                                      "created": now, "updated": now}, volume)
            self._store(recs, [lambda: self.pool.set_read_only(volume, False)])
            return self._info(name, snaps[name])

    def remove(self, key: str) -> None:
        """Remove snapshot ``key`` (any kind) and its volume.  NotFound if missing; FailedPrecondition if
        another snapshot has it as parent.  A volume that merely carries the snapshot's name (not the
        device the record is bound to) is left alone: only the stale record goes."""
        with self._lock, self._transaction():
            recs = self._load()
            rec = self._get(recs, key)
            children = sorted(k for k, r in recs["snapshots"].items() if r.get("parent") == key)
            if children:
                shown = ", ".join(repr(c) for c in children[:5]) + (" ..." if len(children) > 5 else "")
                raise FailedPrecondition(f"cannot remove snapshot {key!r} with child: {len(children)} "
                                         f"snapshot(s) depend on it ({shown})")
            volume = self.volume_name_for_id(rec["id"])
            if _bound(rec, _identity(self.pool, volume)):
                self.pool.delete(volume)
            del recs["snapshots"][key]
            self._store(recs, [])

    def mounts(self, key: str) -> Mount:
        """The mount (thin volume) of an active or view snapshot.  FailedPrecondition for a committed
        snapshot (containerd: "not active or view"), NotFound if missing."""
        with self._lock:
            rec = self._get(self._load(), key)
            if rec["kind"] == "committed":
                raise FailedPrecondition(f"snapshot {key!r} is committed, not active or view: it has no mounts")
            return self._mount(rec, key)

    def volume(self, key: str) -> Thin:
        """The :class:`~thinpool.thin.Thin` volume of any snapshot (committed ones included); NotFound
        if there is no snapshot ``key``."""
        with self._lock:
            return self.pool.thin(self._volume_of(key, self._get(self._load(), key)))

    def usage(self, key: str) -> SnapshotUsage:
        """Block-level usage of ``key`` excluding its parents (see :class:`SnapshotUsage`)."""
        with self._lock:
            recs = self._load()
            rec = self._get(recs, key)
            volume = self._volume_of(key, rec)
            vb, db, _ = self.pool.thin(volume).mappings()
            parent = rec.get("parent", "")
            pvb: np.ndarray | None
            pdb: np.ndarray | None
            if parent:
                pvol = self.pool.thin(self._volume_of(parent, recs["snapshots"][parent]))
                pvb, pdb, _ = pvol.mappings()
            else:
                pvb = pdb = None
            owned = owned_blocks(vb, db, pvb, pdb)
            u = self.pool.usage(volume)
            bs = self.pool.block_size
            return SnapshotUsage(size_bytes=owned * bs, inodes=-1, block_size=bs, owned_blocks=owned,
                                 mapped_blocks=u.mapped_blocks, exclusive_blocks=u.exclusive_blocks,
                                 shared_blocks=u.shared_blocks,
                                 mapped_growth_blocks=u.mapped_blocks - (len(pvb) if pvb is not None else 0))

    def walk(self, filters: str | Iterable[str] | None = None,
             fn: Callable[[Info], None] | None = None) -> list[Info]:
        """Snapshots matching ``filters`` (sorted by name); ``fn`` is also called on each.

        ``filters`` is one containerd filter string or a list of them; a snapshot matches if it matches
        **any** of the filters (OR), and a filter matches if **all** its comma-separated selectors match
        (AND).  See :func:`parse_filter` for the supported syntax.  No filters: every snapshot.
        """
        if filters is None:
            flist: list[str] = []
        elif isinstance(filters, str):
            flist = [filters]
        else:
            flist = list(filters)
        parsed = [parse_filter(f) for f in flist]
        with self._lock:
            recs = self._load()
            infos = [self._info(k, r) for k, r in sorted(recs["snapshots"].items())]
        out = [i for i in infos if not parsed or any(all(s.matches(i) for s in sel) for sel in parsed)]
        if fn is not None:
            for info in out:
                fn(info)
        return out

    # ------------------------------------------------------------------ consistency
    def check(self) -> list[str]:
        """Problems between records and volumes of this namespace (empty when consistent): a record
        without its volume, a ``snap/<namespace>/*`` volume without a record, a parent that is missing or
        not committed, a volume whose read-only flag does not match the snapshot's kind."""
        problems: list[str] = []
        with self._lock:
            recs = self._load()
            by_id = {}
            for key, rec in recs["snapshots"].items():
                by_id[rec["id"]] = key
                vol = self.volume_name_for_id(rec["id"])
                if vol not in self.pool:
                    problems.append(f"snapshot {key!r}: record without its volume {vol!r}")
                    continue
                if not _bound(rec, _identity(self.pool, vol)):
                    problems.append(f"snapshot {key!r}: volume {vol!r} is not the device the record is bound "
                                    f"to (dev_id {rec.get('dev_id')})")
                    continue
                ro = self.pool.thin(vol).read_only
                if ro != (rec["kind"] != "active"):
                    problems.append(f"snapshot {key!r} ({rec['kind']}): volume {vol!r} read_only={ro}")
                parent = rec.get("parent", "")
                if parent and recs["snapshots"].get(parent, {}).get("kind") != "committed":
                    problems.append(f"snapshot {key!r}: parent {parent!r} is missing or not committed")
            for thin in self.pool.thins():
                parsed = self.parse_volume_name(thin.name)
                if thin.name.startswith(f"{VOLUME_PREFIX}{self.namespace}/") and (
                        parsed is None or parsed[1] not in by_id):
                    problems.append(f"volume {thin.name!r}: no snapshot record in namespace {self.namespace!r}")
        return problems


__all__ = ["Snapshotter", "Info", "Mount", "SnapshotUsage", "owned_blocks", "parse_filter", "KINDS",
           "snapshot_owner", "refuse_snapshot_volumes"]
