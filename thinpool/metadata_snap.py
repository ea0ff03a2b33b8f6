"""The held metadata snapshot (dm-thin's ``reserve_metadata_snap`` / ``release_metadata_snap``) and
the data blocks it keeps in use.

The pool's :meth:`~thinpool.pool.Pool.reserve_metadata_snap`, :meth:`~thinpool.pool.Pool.release_metadata_snap`
and :meth:`~thinpool.pool.Pool.held_data_blocks` call these under the pool's lock.  The store keeps the
held state's pages (:meth:`thinpool.mdstore.MetadataStore.hold`); the kernel's held root references
the mapping trees, so their leaves keep their data blocks' counts: here each data block the held view
maps gains one reference at the reserve and loses it at the release, so no block the held view maps
is reused while it is held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import schema as K
from .errors import AlreadyExists, InvalidArgument
from .schema import DevFlag

if TYPE_CHECKING:
    from .pool import Pool


def reserve(pool: Pool) -> None:
    """Commit, refuse a second held snapshot (AlreadyExists, after the commit, as the kernel's
    EBUSY), hold the committed metadata and take one reference on every data block it maps; commits."""
    pool._check_writable()
    pool.commit()
    if pool._store.header.get("held"):
        raise AlreadyExists(f"pool {pool.path}: a metadata snapshot is already held: release it before "
                            f"taking another")
    pool._store.hold()
    pool._store.header["held"]["pinned_data"] = True  # (holds taken before pins existed have none)
    pool._space.add_refs(mapped_blocks(pool._space.nr_blocks, pool._nodes_map.nodes, pool._devs))  # == the held state's
    pool._catalog_dirty = True
    pool.commit()


def release(pool: Pool) -> None:
    """Drop the held snapshot's references and the hold (InvalidArgument when none is held); commits."""
    pool._check_writable()
    if not pool._store.header.get("held"):
        raise InvalidArgument(f"pool {pool.path}: no metadata snapshot is held")
    pool._space.drop_refs(held_data_blocks(pool))
    pool._store.release_hold()
    pool._catalog_dirty = True
    pool.commit()


def held_data_blocks(pool: Pool) -> np.ndarray:
    """The data blocks the held metadata snapshot maps, each once (empty when none is held, or for a
    hold taken before holds kept their blocks)."""
    held = pool._store.header.get("held")
    if not held or not held.get("pinned_data"):
        return np.zeros(0, np.int64)
    from .blockmap import BlockMap
    from .nodestore import inners_from_disk, leaves_from_disk  # any layout
    arrays = {k: np.frombuffer(v, np.uint8) for k, v in pool._store.load_held().items()}
    bm = BlockMap.from_arrays(np.zeros(K.ST_SIZE, np.int64), leaves_from_disk(arrays), inners_from_disk(arrays),
                              arrays["leaf_rc"].view(np.uint32), arrays["inner_rc"].view(np.uint32))
    return mapped_blocks(pool._space.nr_blocks, bm.nodes, arrays["devs"].view(K.dev_dtype()))


def mapped_blocks(nr_blocks: int, nodes: Any, devs: np.ndarray) -> np.ndarray:
    """The data blocks (of ``nr_blocks``) any device of ``devs`` maps in the trees ``nodes``, each
    once, in order."""
    from . import walks
    from .spacemap_pages import zeroed
    roots = devs["root"][(devs["flags"] & DevFlag.IN_USE) != 0].astype(np.int64)
    counts = zeroed(nr_blocks, np.uint8)
    walks.logical_counts_into(nodes, roots, counts)
    return np.flatnonzero(counts).astype(np.int64)
