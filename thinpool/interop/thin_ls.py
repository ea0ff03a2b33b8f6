"""What ``thin_ls`` 0.9.0 prints, from the IR: per-device mapped, exclusive and shared counts.

:func:`ls_rows` returns the records (JSON-able), :func:`format_ls` the tool's text byte for byte;
:func:`human_size` is the tool's MAPPED/EXCLUSIVE/SHARED size format.  Work over mappings is
vectorized with numpy.  Error messages are the tool's own texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InvalidArgument
from .ir import SECTOR, Metadata

__all__ = ["LS_FIELDS", "DEFAULT_LS_FIELDS", "ls_rows", "format_ls", "human_size", "exclusive_blocks"]

_U64 = (1 << 64) - 1   # the tool's unsigned 64-bit arithmetic wraps modulo 2^64


LS_FIELDS = (
    "DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS",
    "MAPPED_SECTORS", "EXCLUSIVE_SECTORS", "SHARED_SECTORS",
    "MAPPED_BYTES", "EXCLUSIVE_BYTES", "SHARED_BYTES",
    "MAPPED", "EXCLUSIVE", "SHARED", "TRANSACTION", "CREATE_TIME", "SNAP_TIME",
)
DEFAULT_LS_FIELDS = ("DEV", "MAPPED", "CREATE_TIME", "SNAP_TIME")
_HUMAN_SUFFIXES = ("", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(nbytes: int) -> str:
    """A byte count as ``thin_ls`` 0.9.0 prints MAPPED/EXCLUSIVE/SHARED (``192KiB``, ``1250MiB``, ``0``).

    While the count exceeds 1 MiB it is divided (rounding down) by 1024 and the unit goes up;
    then, if it still exceeds 8192, it is divided once more, rounding half up.
    """
    n, unit = nbytes, 0
    while n > 1 << 20:
        n //= 1024
        unit += 1
    if n > 8192:
        n = (n + 512) // 1024
        unit += 1
    return f"{n}{_HUMAN_SUFFIXES[unit]}"


def _parse_fields(fields: str | Sequence[str] | None) -> list[str]:
    if fields is None:
        return list(DEFAULT_LS_FIELDS)
    if isinstance(fields, str):
        # as std::getline(in, item, ','): no token after a trailing comma, "" gives none
        tokens = fields.split(",")
        if tokens and tokens[-1] == "":
            tokens.pop()
    else:
        tokens = list(fields)
    for tok in tokens:
        if tok not in LS_FIELDS:
            raise InvalidArgument(f"unknown field {tok!r} (thin_ls: unknown field)")
    return tokens


def exclusive_blocks(md: Metadata) -> list[int]:
    """Per device (in ``md.devices`` order): mappings whose data block no other mapping entry uses.

    As ``thin_ls`` counts it: over a walk of every device's mappings (not the data space map),
    a block referenced by exactly one mapping entry is exclusive to that entry's device.
    """
    sizes = [len(d.dblocks) for d in md.devices]
    if not sum(sizes):
        return [0] * len(sizes)
    all_d = np.concatenate([d.dblocks for d in md.devices])
    _, inverse, counts = np.unique(all_d, return_inverse=True, return_counts=True)
    single = np.concatenate(([0], np.cumsum(counts[inverse.ravel()] == 1)))
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    return [int(single[bounds[i + 1]] - single[bounds[i]]) for i in range(len(sizes))]


def ls_rows(md: Metadata, fields: str | Sequence[str] | None = None) -> list[dict]:
    """``thin_ls -o FIELDS`` as one dict per device (dev-id order), keyed by field name.

    *fields* is a comma-separated string or a sequence of 0.9.0 field names (default
    ``DEV,MAPPED,CREATE_TIME,SNAP_TIME``); repeats are allowed.  Block, sector and byte counts are
    ints (unsigned 64-bit arithmetic, as the tool's); MAPPED, EXCLUSIVE and SHARED are the tool's
    human-readable strings.  MAPPED_* come from each device's ``mapped_blocks``; SHARED is mapped
    minus exclusive (see :func:`exclusive_blocks`).  Raises :class:`InvalidArgument` on an unknown
    field.
    """
    names = _parse_fields(fields)
    need_excl = any(f.startswith(("EXCLUSIVE", "SHARED")) for f in names)
    excl = exclusive_blocks(md) if need_excl else [0] * len(md.devices)
    bs = md.superblock.data_block_size
    rows = []
    for dev, ex in sorted(zip(md.devices, excl), key=lambda p: p[0].dev_id):
        mapped = dev.mapped_blocks
        blocks = {"MAPPED": mapped, "EXCLUSIVE": ex, "SHARED": (mapped - ex) & _U64}
        row: dict = {}
        for f in names:
            kind, _, unit = f.partition("_")
            if f == "DEV":
                row[f] = dev.dev_id
            elif f == "TRANSACTION":
                row[f] = dev.transaction
            elif f == "CREATE_TIME":
                row[f] = dev.creation_time
            elif f == "SNAP_TIME":
                row[f] = dev.snap_time
            elif unit == "BLOCKS":
                row[f] = blocks[kind]
            elif unit == "SECTORS":
                row[f] = blocks[kind] * bs & _U64
            elif unit == "BYTES":
                row[f] = blocks[kind] * bs * SECTOR & _U64
            else:
                row[f] = human_size(blocks[kind] * bs * SECTOR & _U64)
        rows.append(row)
    return rows


def format_ls(md: Metadata, fields: str | Sequence[str] | None = None, headers: bool = True) -> str:
    """What ``thin_ls [-o FIELDS] [--no-headers]`` 0.9.0 prints.

    A header row of field names (unless ``headers=False``), then one row per device; every cell
    is right-justified to its column's widest cell and followed by one space; rows end with a
    newline.  An empty field list prints nothing.
    """
    names = _parse_fields(fields)
    if not names:
        return ""
    grid = [names] if headers else []
    grid += [[str(row[f]) for f in names] for row in ls_rows(md, names)]
    if not grid:
        return ""
    widths = [max(len(r[i]) for r in grid) for i in range(len(names))]
    return "".join("".join(c.rjust(w) + " " for c, w in zip(r, widths)) + "\n" for r in grid)
