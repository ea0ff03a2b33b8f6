"""The device hints a commit records for a light open: ``dev_id_max`` (the largest device id in use,
0: none), ``nr_thins`` (the devices in use) and ``free_slot`` (the first device-table slot not in
use: the number of slots when all are).  They let :class:`~thinpool.devtable.DeviceTable` pick a
snapshot's id and slot and report the status without reading the whole table
(:meth:`thinpool.mdstore.MetadataStore.hint`).

:func:`count` counts them from the whole table; :func:`update` from what was counted before and the
slots changed since (a commit of a 100,000-volume pool does not scan its table: that scan was
0.26-0.44 ms of CPU, 15-20 % of a small commit's).  Both return ``Kept``: per slot whether it is in
use and its device id, and the hints.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import schema as K
from .schema import DevFlag

#: per slot whether it is in use, its device id; the hints counted from them
Kept = tuple[np.ndarray, np.ndarray, dict[str, int]]

#: changed slots up to which :func:`update` works from them (more: counted from the whole table,
#: which costs about as much)
MANY_DEVS = 4096
#: changed slots up to which they are looked at one by one (fewer steps than numpy's for a few)
FEW_DEVS = 16


def count(devs: np.ndarray) -> Kept:
    """The hints of the device table ``devs`` (a structured array of device records), counted whole."""
    used = (devs["flags"] & int(DevFlag.IN_USE)) != 0
    all_ids = devs["dev_id"].astype(np.int64)
    ids = all_ids[used]
    free = np.flatnonzero(~used)
    hints = {"dev_id_max": int(ids.max()) if len(ids) else 0, "nr_thins": len(ids),
             "free_slot": int(free[0]) if len(free) else len(devs)}
    return used, all_ids, hints


def update(kept: Kept, devs: np.ndarray, devs_i: Any, dirty: set[int]) -> Kept | None:
    """The hints of ``devs`` from ``kept`` (counted from the table before) and the ``dirty`` slots
    changed since (``kept``'s arrays updated in place; ``devs_i``: the table as rows of int64 words);
    None when they must be counted from the whole table: too many slots changed, the table shrank,
    or the device with the largest id may have left its slot."""
    used0, ids0, hints = kept
    if len(dirty) > MANY_DEVS or len(devs) < len(used0):
        return None
    if len(devs) > len(used0):  # the table grew: its new slots are all dirty (Pool._new_slot)
        grow = len(devs) - len(used0)
        used0 = np.concatenate([used0, np.zeros(grow, bool)])
        ids0 = np.concatenate([ids0, np.zeros(grow, np.int64)])
    if dirty and len(dirty) <= FEW_DEVS:  # (a few slots: Python steps cost less than numpy's)
        item, in_use, top = devs_i.item, int(DevFlag.IN_USE), hints["dev_id_max"]
        seen = [(slot, item(slot, K.DEV_FLAGS) & in_use != 0, item(slot, K.DEV_ID), bool(used0[slot]),
                 int(ids0[slot])) for slot in dirty]
        if any(ou and (not nu or ni != oi) and oi >= top for _s, nu, ni, ou, oi in seen):
            return None  # the largest id may be gone: counted again
        dev_id_max, nr_thins, free_slot = top, hints["nr_thins"], hints["free_slot"]
        for slot, nu, ni, ou, oi in seen:
            used0[slot], ids0[slot] = nu, ni
            if nu and (not ou or ni != oi):
                dev_id_max = max(dev_id_max, ni)
            nr_thins += nu - ou
            if not nu:
                free_slot = min(free_slot, slot)
    elif dirty:
        d = np.fromiter(dirty, np.int64, len(dirty))
        new_used = (devs["flags"][d] & int(DevFlag.IN_USE)) != 0
        new_ids = devs["dev_id"][d].astype(np.int64)
        old_used, old_ids = used0[d], ids0[d]
        left = old_used & (~new_used | (new_ids != old_ids))  # a device left the slot
        if left.any() and int(old_ids[left].max()) >= hints["dev_id_max"]:
            return None  # the largest id may be gone: counted again
        used0[d], ids0[d] = new_used, new_ids
        came = new_ids[new_used & (~old_used | (new_ids != old_ids))]
        dev_id_max = max(hints["dev_id_max"], int(came.max()) if len(came) else 0)
        nr_thins = hints["nr_thins"] + int(new_used.sum()) - int(old_used.sum())
        freed = d[~new_used]
        free_slot = min(hints["free_slot"], int(freed.min()) if len(freed) else len(used0))
    else:
        dev_id_max, nr_thins, free_slot = hints["dev_id_max"], hints["nr_thins"], hints["free_slot"]
    if free_slot < len(used0) and used0[free_slot]:  # the first free slot was taken: the next one
        rest = np.flatnonzero(~used0[free_slot:])
        free_slot = free_slot + int(rest[0]) if len(rest) else len(used0)
    return used0, ids0, {"dev_id_max": dev_id_max if nr_thins else 0, "nr_thins": nr_thins, "free_slot": free_slot}
