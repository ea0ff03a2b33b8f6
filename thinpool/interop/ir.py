"""The intermediate representation shared by every metadata producer and consumer.

A :class:`Metadata` is one consistent, committed view of a pool's metadata in dm-thin's
vocabulary: a superblock and the thin devices with their mappings.  The pool exports to it
(``Pool.to_metadata``) and is built from it (``Pool.from_metadata``); the XML writer and
reader, the binary (real dm-thin) writer and reader and the thin_ls/thin_delta/thin_rmap
equivalents all consume or produce it.  Mappings are numpy arrays (never a Python object per
mapping) so that pools with millions of mappings stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_DEV_ID = (1 << 24) - 1
TIME_MASK = (1 << 24) - 1
SECTOR = 512


@dataclass
class Device:
    """One thin device: its details-tree entry and its mappings, sorted by virtual block.

    ``vblocks``/``dblocks`` are uint64 arrays, ``times`` a uint32 array (24-bit mapping times),
    all the same length and sorted by ``vblocks`` (strictly increasing).
    """

    dev_id: int
    mapped_blocks: int
    transaction: int
    creation_time: int
    snap_time: int
    vblocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    dblocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    times: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))

    def __post_init__(self) -> None:
        self.vblocks = np.ascontiguousarray(self.vblocks, dtype=np.uint64)
        self.dblocks = np.ascontiguousarray(self.dblocks, dtype=np.uint64)
        self.times = np.ascontiguousarray(self.times, dtype=np.uint32)


@dataclass
class Superblock:
    """The superblock fields that thin_dump prints (``data_block_size`` is in 512-byte sectors)."""

    time: int
    transaction: int
    data_block_size: int
    nr_data_blocks: int
    flags: int = 0
    version: int = 2
    uuid: str = ""
    #: block number of a held metadata snapshot (``held_root``), or None
    metadata_snap: int | None = None


@dataclass
class Metadata:
    """A superblock and its devices, sorted by ``dev_id``."""

    superblock: Superblock
    devices: list[Device] = field(default_factory=list)

    def device(self, dev_id: int) -> Device:
        for dev in self.devices:
            if dev.dev_id == dev_id:
                return dev
        raise KeyError(dev_id)
