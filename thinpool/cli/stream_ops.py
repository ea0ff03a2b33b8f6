"""Streaming ops (``write``, ``read``, ``import``, ``export``): they move volume data between files and
a pool (:mod:`thinpool.volume_bytes`, :mod:`thinpool.images`), so they run only in-process (never through a serving process's
control socket: ``local_only``).  Here: their registration, the CLI's progress bar and the renderers."""

from __future__ import annotations

from typing import Any

from .registry import register_op

# (thinpool.images and thinpool.volume_bytes are imported by the ops that use them: the commands that
# register these ops -- ls and snapshot among them -- never need them, about 3 ms of their start)


def op_write(pool: Any, name: str, input: str = "-", offset: int = 0, length: int | None = None) -> dict[str, Any]:
    """Write the bytes of file ``input`` (``-``: stdin) into volume ``name`` at ``offset`` (at most
    ``length`` bytes; :func:`thinpool.volume_bytes.write_volume`)."""
    from thinpool import volume_bytes
    return volume_bytes.write_volume(pool, name, input, offset, length)


def op_read(pool: Any, name: str, output: str = "-", offset: int = 0, length: int | None = None) -> dict[str, Any]:
    """Copy ``length`` bytes (default: to the end) of volume ``name`` from ``offset`` to file ``output``
    (``-``: stdout; :func:`thinpool.volume_bytes.read_volume`)."""
    from thinpool import volume_bytes
    return volume_bytes.read_volume(pool, name, output, offset, length)


def op_import(pool: Any, name: str, image: str, size: int | None = None, expect_size: int | None = None,
              sha256: str | None = None, allow_empty: bool = False) -> dict[str, Any]:
    """Import raw image file ``image`` (``-``: stdin) into volume ``name``, sparse-aware, creating it
    if needed, verified (``expect_size``, ``sha256``, ``allow_empty``) and all or nothing
    (:func:`thinpool.images.import_image`), with a progress bar on a terminal."""
    from thinpool import images

    from .common import progress
    return images.import_image(pool, name, image, size, expect_size=expect_size, sha256=sha256,
                               allow_empty=allow_empty, progress=progress)


def render_import(r: dict[str, Any]) -> str:
    """``NAME: imported N bytes, B blocks written[, U unmapped] (M mapped)[, sha256 verified]``."""
    return (f"{r['name']}: imported {r['bytes']} bytes, {r['blocks_written']} blocks written"
            + (f", {r['blocks_unmapped']} unmapped" if r["blocks_unmapped"] else "")
            + f" ({r['mapped_blocks']} mapped)" + (", sha256 verified" if r.get("sha256") else ""))


def op_export(pool: Any, name: str, output: str = "-") -> dict[str, Any]:
    """Export volume ``name`` as a raw image to ``output`` (``-``: stdout), sparse into a regular file
    (:func:`thinpool.images.export_image`), with a progress bar on a terminal."""
    from thinpool import images

    from .common import progress
    return images.export_image(pool, name, output, progress=progress)


def render_export(r: dict[str, Any]) -> str:
    """Nothing for stdout (the image went there), else where the image went."""
    if r["output"] == "-":
        return ""
    return (f"{r['name']}: exported {r['size']} bytes to {r['output']} ({r['blocks_written']} data blocks"
            f"{', sparse' if r['sparse'] else ''})")


register_op("write", op_write, write=True, local_only=True)
register_op("read", op_read, write=False, local_only=True)
register_op("import", op_import, write=True, local_only=True, render=render_import)
register_op("export", op_export, write=False, local_only=True, render=render_export)
