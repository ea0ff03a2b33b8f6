"""What a pool reports of itself: per-volume usage (mapped, exclusive, shared blocks), the status
line's fields, the kernels' I/O counters.

:class:`Accounting` is a mixin of :class:`thinpool.pool.Pool` (the methods are the pool's; they live
here so each module holds one concept).  The values are :mod:`thinpool.status`'s classes, and the
status is computed by :func:`thinpool.rules.pool_status`, which :class:`thinpool.devtable.DeviceTable`
uses too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, overload

import numpy as np

from . import rules
from . import schema as K
from .kernel_context import locked_method as _locked
from .schema import DevFlag
from .spacemap_pages import zeroed
from .status import PoolStatus, Usage

if TYPE_CHECKING:
    from .blockmap import BlockMap
    from .dataspace import DataSpaceMap
    from .mdstore import MetadataStore
    from .nospace import NoSpaceQueue
    from .schema import Mode


def _walks() -> Any:
    from . import walks
    return walks


class Accounting:
    """The accounting methods of :class:`~thinpool.pool.Pool` (see the module docstring)."""

    _devs: np.ndarray
    _by_dev_id: dict[int, str]
    _by_name: dict[str, int]
    _header: dict[str, Any]
    _st: np.ndarray
    # ... and what they use of the rest of Pool (pool.py and its other mixins)
    _store: MetadataStore
    _space: DataSpaceMap
    _nodes_map: BlockMap
    _nospace: NoSpaceQueue
    if TYPE_CHECKING:  # Pool's, declared here for the type checker only (nothing is defined at run time)
        @property
        def block_size(self) -> int: ...
        @property
        def mode(self) -> Mode: ...
        @property
        def time(self) -> int: ...
        def _check_open(self) -> None: ...
        def _slot(self, name: str) -> int: ...
        def _md_reserve(self) -> int: ...

    def _roots(self) -> np.ndarray:
        used = (self._devs["flags"] & DevFlag.IN_USE) != 0
        return self._devs["root"][used].astype(np.int64)

    @overload
    def usage(self, name: str) -> Usage: ...

    @overload
    def usage(self, name: None = None) -> list[Usage]: ...

    @_locked
    def usage(self, name: str | None = None) -> Usage | list[Usage]:
        """Mapped / exclusive / shared blocks of one volume (or of all, in dev-id order).

        Exclusive = mapped blocks whose data block no other mapping entry in the pool references
        (thin_ls's definition); shared = mapped - exclusive.
        """
        self._check_open()
        names = [name] if name is not None else [self._by_dev_id[d] for d in sorted(self._by_dev_id)]
        rows = self._devs[[self._slot(n) for n in names]]
        nodes = self._nodes_map.nodes
        # lazily zeroed, written for the mapped blocks only; uint8: exclusive (1) or shared (more)
        counts = zeroed(self._space.nr_blocks, np.uint8)
        _walks().logical_counts_into(nodes, self._roots(), counts)
        # every tree at once, each shared node summed once (100,000 snapshots of a few origins cost
        # about what the origins do: docs/performance.md, S10)
        mapped, excl, highest = _walks().usage_of_roots(nodes, rows["root"].astype(np.int64), counts)
        bs = self.block_size
        out = [Usage(n, dev_id, bs, m, e, m - e, None if h < 0 else h)
               for n, dev_id, m, e, h in zip(names, rows["dev_id"].tolist(), mapped.tolist(), excl.tolist(),
                                              highest.tolist())]
        return out[0] if name is not None else out

    @_locked
    def io_counters(self) -> dict[str, int]:
        """What the writes did to data blocks since the pool was opened (or last reloaded by an abort),
        counted by the kernels: ``provisioned_blocks`` (writes that mapped an unmapped block),
        ``cow_breaks`` (writes that broke sharing), and the data-device bytes dm-thin spends beside the
        payload: ``cow_bytes_copied`` (a partial write to a shared block copies the whole old block
        first) and ``zeroed_bytes`` (with zero_new_blocks, a partial first write zeroes the whole new
        block first; docs/dm-thin.md).  thinpool's data file needs neither (its new blocks are holes), so
        these are the kernel's costs, computed, not bytes thinpool moved."""
        st, bs = self._st, self.block_size
        zero = bool(self._header.get("zero_new_blocks", True))
        return {"provisioned_blocks": int(st[K.ST_PROVISIONED]), "cow_breaks": int(st[K.ST_COW_BREAKS]),
                "cow_bytes_copied": int(st[K.ST_COW_PARTIAL]) * bs,
                "zeroed_bytes": int(st[K.ST_PROVISIONED_PARTIAL]) * bs if zero else 0}

    @_locked
    def status(self) -> PoolStatus:
        """Pool status (dm-thin's status line fields); does not commit."""
        self._check_open()
        return rules.pool_status(
            self._header, time=self.time, held=self._store.header.get("held"), mode=self.mode,
            used_data_blocks=self._space.used(), total_data_blocks=self._space.nr_blocks,
            used_metadata_blocks=min(self._store.nr_blocks, self._store.used_blocks() + self._dirty_page_estimate()),
            total_metadata_blocks=self._store.nr_blocks, nr_thins=len(self._by_name),
            error_if_no_space=self._nospace.errors_now(), queued_writes=self._nospace.waiting,
            metadata_reserve_blocks=self._md_reserve())

    def _dirty_page_estimate(self) -> int:
        bm = self._nodes_map
        return int(np.count_nonzero(bm.leaf_dirty) + np.count_nonzero(bm.inner_dirty))
