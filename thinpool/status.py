"""What a pool reports: dm-thin's status fields (:class:`PoolStatus`) and per-volume block
accounting (:class:`Usage`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .schema import DISCARD_WORDS, Mode  # noqa: F401 (DISCARD_WORDS: re-exported)


@dataclass(frozen=True)
class PoolStatus:
    """What ``dmsetup status`` reports for a thin-pool, plus a few derived values."""

    transaction_id: int
    time: int
    data_block_size: int
    used_data_blocks: int
    total_data_blocks: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    mode: str
    low_water_mark: int
    held_root: int | None
    needs_check: bool
    error_if_no_space: bool
    zero_new_blocks: bool
    nr_thins: int
    #: the discard setting: ``passdown`` (the default), ``nopassdown`` or ``ignore``
    discard: str = "passdown"
    #: seconds a write queued for data space waits (``queue_if_no_space``; 0: for ever)
    no_space_timeout: float = 60.0
    #: writes waiting for data space right now (``queue_if_no_space``)
    queued_writes: int = 0
    #: metadata blocks kept back for the commit that enters out-of-metadata-space mode (dm-thin's
    #: ``metadata_reserve``); the status line counts them as used, ``used_metadata_blocks`` does not
    metadata_reserve_blocks: int = 0

    @property
    def reported_used_metadata_blocks(self) -> int:
        """Used metadata as dm-thin's status line reports it: total less the free count, which
        ``dm_pool_get_free_metadata_block_count`` gives *less the reserve* -- so the reserve counts as
        used (``min(total, used + reserve)``; a fresh kernel pool shows about a tenth used)."""
        return min(self.total_metadata_blocks, self.used_metadata_blocks + self.metadata_reserve_blocks)

    @property
    def free_data_blocks(self) -> int:
        """Data blocks not in use: ``total_data_blocks - used_data_blocks``."""
        return self.total_data_blocks - self.used_data_blocks

    @property
    def metadata_low_water_mark(self) -> int:
        """dm-thin's metadata low-water mark in 4 KiB metadata blocks: a quarter of the metadata
        device, at most 4 MiB (1024 blocks): the status line's last field (docs/dm-thin.md §10)."""
        return min(1024, self.total_metadata_blocks // 4)

    @property
    def discard_word(self) -> str:
        """The status line's discard field as dm-thin's ``pool_status`` prints it."""
        return DISCARD_WORDS.get(self.discard, "discard_passdown")

    def dmsetup_line(self) -> str:
        """The thin-pool status line exactly as dm-thin formats it (docs/dm-thin.md §10).

        ``error_if_no_space`` is the policy in force: true also while a queue's ``no_space_timeout``
        has run out (the kernel prints ``pool->pf.error_if_no_space``, which its timeout sets)."""
        shown: dict[str, str] = {Mode.WRITE: "rw", Mode.OUT_OF_DATA_SPACE: "out_of_data_space"}
        mode = shown.get(self.mode, "ro")
        if self.mode == Mode.FAIL:
            return "Fail"
        held = str(self.held_root) if self.held_root is not None else "-"
        return (f"{self.transaction_id} {self.reported_used_metadata_blocks}/{self.total_metadata_blocks} "
                f"{self.used_data_blocks}/{self.total_data_blocks} {held} {mode} {self.discard_word} "
                f"{'error_if_no_space' if self.error_if_no_space else 'queue_if_no_space'} "
                f"{'needs_check' if self.needs_check else '-'} {self.metadata_low_water_mark} ")

    def as_dict(self) -> dict[str, Any]:
        """Every field plus the derived ``free_data_blocks``, ``metadata_low_water_mark`` and
        ``reported_used_metadata_blocks`` (JSON-ready)."""
        d = asdict(self)
        d["free_data_blocks"] = self.free_data_blocks
        d["metadata_low_water_mark"] = self.metadata_low_water_mark
        d["reported_used_metadata_blocks"] = self.reported_used_metadata_blocks
        return d


@dataclass(frozen=True)
class Usage:
    """Block accounting of one thin device (thin_ls's MAPPED/EXCLUSIVE/SHARED)."""

    name: str
    dev_id: int
    block_size: int
    mapped_blocks: int
    exclusive_blocks: int
    shared_blocks: int
    highest_mapped_block: int | None

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the blocks the volume maps (``mapped_blocks`` x ``block_size``)."""
        return self.mapped_blocks * self.block_size

    @property
    def exclusive_bytes(self) -> int:
        """Bytes of the mapped blocks no other volume shares (what deleting the volume would free)."""
        return self.exclusive_blocks * self.block_size

    def dmsetup_line(self) -> str:
        """The thin target's status line exactly as dm-thin's ``thin_status`` formats it:
        ``<nr mapped sectors> <highest mapped sector>``, in 512-byte sectors -- the mapped blocks times
        the block size, and the *last* sector of the highest mapped block, ``(highest + 1) x block
        size - 1``; ``-`` for the highest when nothing is mapped (no trailing space)."""
        spb = self.block_size // 512
        highest = "-" if self.highest_mapped_block is None else str((self.highest_mapped_block + 1) * spb - 1)
        return f"{self.mapped_blocks * spb} {highest}"

    def as_dict(self) -> dict[str, Any]:
        """Every field plus ``mapped_bytes``, ``exclusive_bytes``, ``shared_bytes`` and the thin status
        line ``dmsetup_line`` (JSON-ready)."""
        d = asdict(self)
        d.update(mapped_bytes=self.mapped_bytes, exclusive_bytes=self.exclusive_bytes,
                 shared_bytes=self.shared_blocks * self.block_size, dmsetup_line=self.dmsetup_line())
        return d
