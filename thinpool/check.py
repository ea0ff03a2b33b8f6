"""``thinpool check``: a structural check of a pool's metadata, like thin_check but deeper.

Recomputes every reference count from the trees (device roots -> inner nodes -> leaves -> data
blocks) and compares with the stored counts; checks mapped_blocks per device, the free counters,
data blocks beyond the data device, device ids and names, mapping times.  Errors are collected,
not thrown at the first fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import schema as K
from .spacemap_pages import RC_PER_PAGE, zeroed
from .errors import FailedPrecondition, MetadataCorrupt
from .schema import DevFlag

if TYPE_CHECKING:
    from .pool import Pool


def _walks():
    from . import walks
    return walks


@dataclass
class CheckReport:
    """Outcome of :func:`check_pool`: ``ok`` and the list of problems found (empty when ok)."""

    errors: list[str] = field(default_factory=list)
    #: non-fatal findings (e.g. the newest commit was unreadable and the previous one was used)
    warnings: list[str] = field(default_factory=list)
    devices: int = 0
    mappings: int = 0
    data_blocks_used: int = 0

    @property
    def ok(self) -> bool:
        """True when the check found no error (warnings do not count)."""
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (what ``thinpool check --json`` prints)."""
        return {"ok": self.ok, "errors": self.errors, "warnings": self.warnings, "devices": self.devices, "mappings": self.mappings,
                "data_blocks_used": self.data_blocks_used}


def _compare(errors: list[str], what: str, expected: np.ndarray, actual: np.ndarray, limit: int = 5,
             at: np.ndarray | None = None) -> None:
    """Report the entries where ``expected`` and ``actual`` differ; with ``at``, the two hold the
    entries at those indices (the indices are what is reported)."""
    n = min(len(expected), len(actual))
    diff = np.flatnonzero(expected[:n] != actual[:n].astype(np.int64))
    for i in diff[:limit]:
        name = int(i) if at is None else int(at[i])
        errors.append(f"{what} {name}: reference count is {int(actual[i])}, expected {int(expected[i])}")
    if len(diff) > limit:
        errors.append(f"{what}: {len(diff) - limit} more reference-count mismatches")


def _data_counts(rep: CheckReport, pool: Any, roots: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The data blocks' counts recomputed from the trees, compared with the space map on the count pages
    that are live (:meth:`~thinpool.dataspace.DataSpaceMap.live_pages`: after an open, exactly those
    holding a nonzero count) or that a tree references -- on a pool of 2^34 blocks, the pages in use, not
    the whole map.  Returns (inner, leaf, data blocks in use)."""
    bm, sp = pool.nodes_map, pool.space
    nr = sp.nr_blocks
    exp_data = zeroed(nr, np.int64)  # lazily zeroed: the kernel writes the entries of mapped blocks
    touched = np.zeros(len(sp.rc_dirty), np.uint8)
    exp_inner, exp_leaf, bad = _walks().expected_counts_into(bm.nodes, roots, exp_data, touched)
    if bad:
        rep.errors.append(f"{bad} tree entries point outside the node store or beyond the data device "
                          f"({nr} blocks)")
    pinned = pool.held_data_blocks()  # the held metadata snapshot keeps one reference on each
    pinned = pinned[pinned < nr]
    exp_data[pinned] += 1
    touched[np.unique(pinned >> K.RC_PAGE_BITS)] = 1
    pages = np.union1d(np.flatnonzero(touched), sp.live_pages())
    if len(pages) * 4 >= len(touched):  # most pages: one contiguous pass
        _compare(rep.errors, "data block", exp_data, sp.data_rc[:nr])
        used = nr - int(np.count_nonzero(sp.data_rc[:nr] == 0))
    else:
        idx = (pages[:, None] * RC_PER_PAGE + np.arange(RC_PER_PAGE)[None, :]).reshape(-1)
        idx = idx[idx < nr]
        _compare(rep.errors, "data block", exp_data[idx], sp.data_rc[idx], at=idx)
        used = int(np.count_nonzero(sp.data_rc[idx]))
    return exp_inner, exp_leaf, used


def check_pool(pool: Pool) -> CheckReport:
    """Check the in-memory state of an open pool (call after open to check what is on disk)."""
    rep = CheckReport()
    if getattr(pool, "recovered_from", None):
        rep.warnings.append(f"the newest commit could not be read and the previous one was used: {pool.recovered_from}")
    for vol in pool.thins():  # an external origin that changed: the volume's I/O fails until it is back
        try:
            vol.check_external_origin()
        except FailedPrecondition as exc:
            rep.warnings.append(f"volume {vol.name!r}: {exc}")
    bm, sp, st = pool.nodes_map, pool.space, pool.st
    used = (pool.devs["flags"] & DevFlag.IN_USE) != 0
    devs = pool.devs[used]
    roots = devs["root"].astype(np.int64)
    rep.devices = int(used.sum())
    bad_root = (roots < 0) | (roots >= len(bm.inner_rc))
    for r in roots[bad_root]:
        rep.errors.append(f"device root {int(r)} is not a valid inner node")
    if bad_root.any():
        return rep
    try:  # an open keeps the space map's pages undecoded: a bitmap that disagrees with its overflow
        sp.arrays  # counts shows when they are decoded, and is a finding of the check, not its failure
    except MetadataCorrupt as exc:
        rep.errors.append(f"data space map: {exc}")
        return rep
    exp_inner, exp_leaf, used_blocks = _data_counts(rep, pool, roots)
    _compare(rep.errors, "inner node", exp_inner, bm.inner_rc)
    _compare(rep.errors, "leaf", exp_leaf, bm.leaf_rc)
    beyond = np.flatnonzero(sp.data_rc[sp.nr_blocks:])
    if len(beyond):
        rep.errors.append(f"{len(beyond)} data blocks beyond the data device have references")
    free = sp.nr_blocks - used_blocks
    if free != st[K.ST_NR_FREE]:
        rep.errors.append(f"free data block counter is {int(st[K.ST_NR_FREE])}, expected {free}")
    rep.data_blocks_used = sp.nr_blocks - free
    names = pool.catalog["volumes"]
    by_slot = {v["slot"]: (n, v["dev_id"]) for n, v in names.items()}
    seen_ids: set[int] = set()
    for slot in np.flatnonzero(used):
        d = pool.devs[slot]
        dev_id = int(d["dev_id"])
        if slot not in by_slot or by_slot[slot][1] != dev_id:
            rep.errors.append(f"device {dev_id} (slot {int(slot)}) has no matching name in the catalog")
        if dev_id in seen_ids:
            rep.errors.append(f"device id {dev_id} is used twice")
        seen_ids.add(dev_id)
        mapped, _ = _walks().count_mappings(bm.nodes, int(d["root"]))
        rep.mappings += int(mapped)
        if mapped != d["mapped"]:
            rep.errors.append(f"device {dev_id}: mapped_blocks is {int(d['mapped'])} but it maps {int(mapped)} blocks")
        if d["snap_time"] > pool.time or d["creation_time"] > pool.time:
            rep.errors.append(f"device {dev_id}: times ({int(d['creation_time'])}, {int(d['snap_time'])}) are "
                              f"later than the pool time {pool.time}")
    for slot, (n, _) in by_slot.items():
        if slot >= len(pool.devs) or not used[slot]:
            rep.errors.append(f"volume {n!r} names an unused device slot {slot}")
    return rep
