"""``thinpool repair``: salvage what is consistent from damaged metadata (thin_repair's job).

The metadata file (:mod:`thinpool.mdstore`) is read *tolerantly*: every 4 KiB page is still checked
against its CRC-32C, but a bad page only loses what it holds instead of failing the whole load:

============================  ==============================================================
damaged                        lost
============================  ==============================================================
newest superblock / directory  that commit: the previous one (the other superblock) is used
a page-map page                the (up to 512) pages it locates
a device-table page            the devices in it (by name when the catalog is readable)
the catalog                    volume names (devices become ``dev<ID>``) and stored records
a device's root node           that device
a mid node / a leaf            the mappings under it (reported as nodes lost)
a mapping                      dropped if it points beyond the data device or the volume
============================  ==============================================================

The salvage is written as a new pool: ``out_path`` (a new pool directory holding a copy of the data
blocks still referenced -- the damaged pool is left untouched) or, without ``out_path``, in place
(the old metadata file is kept as ``metadata.damaged[.N]`` and the pool gets fresh metadata; data
blocks no surviving mapping references are freed when the pool is next opened).  The
:class:`RepairReport` says exactly what was lost.  Mapped blocks that are holes in the data file
are reported as *suspect* (their data was freed by a commit that was lost) but kept.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import replace
from typing import Any

import numpy as np

from . import pooldir
from .errors import InvalidArgument, NotFound
from .interop.ir import Metadata
from .mdpages import BLOCK
from .salvage import RepairReport, salvage  # re-exported: the report is part of repair's interface


def _holes(data_path: str, block_size: int, blocks: np.ndarray) -> int:
    """How many of ``blocks`` hold no data at all in the (sparse) data file."""
    if len(blocks) == 0 or not os.path.exists(data_path):
        return 0
    fd = pooldir.open_pool_file(data_path, os.O_RDONLY, what="data file")
    try:
        n = 0
        for b in np.unique(blocks).tolist():
            try:
                pos = os.lseek(fd, b * block_size, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                pos = -1
            if pos < 0 or pos >= (b + 1) * block_size:
                n += 1
        return n
    finally:
        os.close(fd)


def _lock(pool_path: str, exclusive: bool) -> int:
    # the pool's lock, taken like Pool.open takes it (no symlink, owner checked, real holder named)
    return pooldir.lock(pool_path, read_only=not exclusive, purpose="; stop it before repairing")


def _build(out_dir: str, md: Metadata, names: dict[int, str], attrs: dict[int, tuple[int, bool, Any]],
           records: dict[str, Any], hdr: dict[str, Any], data_file: str | None, *, keep_uuid: bool) -> None:
    """Write the salvage as a new pool at ``out_dir``; ``keep_uuid`` keeps the damaged pool's identity
    (in place: the data file's owner stamp names it), else the new pool keeps its own (``-o``: a new
    pool with its own data file)."""
    from .pool import Pool
    from .rules import default_metadata_blocks
    md_blocks = max(int(hdr.get("metadata_blocks_hint", 0)),
                    default_metadata_blocks(md.superblock.nr_data_blocks, max(1000, 2 * len(md.devices))))
    pool = Pool.from_metadata(out_dir, md, names=names, metadata_size=md_blocks * BLOCK)
    try:
        for dev in md.devices:
            size, ro, origin = attrs[dev.dev_id]
            pool._restore_volume(names[dev.dev_id], size=size, read_only=ro, origin=origin)
        with pool.batch():  # the records commit once, with the rest
            for ns, recs in records.items():
                pool.put_records(ns, recs)
        kept: dict[str, Any] = {key: hdr[key] for key in ("low_water_mark", "error_if_no_space", "zero_new_blocks",
                                                          "discard", "no_space_timeout", "punch_freed_blocks",
                                                          "uuid", "created")
                if key in hdr and (keep_uuid or key != "uuid")}
        kept["data_file"] = data_file
        pool._restore_header(kept, next_dev_id=max([d.dev_id for d in md.devices], default=0) + 1)
        pool.commit()
    finally:
        pool.close(commit=False)


def repair(pool_path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> RepairReport:
    """Salvage the consistent part of ``pool_path``'s metadata (see the module docstring).

    With ``out_path``: a new pool directory with the salvaged devices and a copy of their data blocks
    (``pool_path`` is not modified).  Without: in place; the damaged metadata file is kept next to
    the new one.  Raises PoolLocked if the pool is in use, MetadataCorrupt if nothing at all can be
    salvaged (no readable superblock/directory), NotFound if ``pool_path`` is not a pool.
    """
    pool_path = os.path.abspath(os.fspath(pool_path))
    if not os.path.isdir(pool_path):
        if os.path.lexists(pool_path):
            raise NotFound(f"{pool_path} is not a thin pool (not a directory)")
        raise NotFound(f"pool {pool_path} does not exist")
    pooldir.check_owner(pool_path, os.stat(pool_path), what="pool directory")
    if not os.path.lexists(os.path.join(pool_path, "metadata")):
        # (before the lock: taking it would leave a lock file in a directory that is no pool)
        raise NotFound(f"{pool_path} is not a thin pool (no metadata file)")
    if out_path is not None:
        out_path = os.path.abspath(os.fspath(out_path))
        if os.path.exists(out_path) and (not os.path.isdir(out_path) or os.listdir(out_path)):
            raise InvalidArgument(f"repair output {out_path}: path exists and is not an empty directory")
        if out_path == pool_path:
            raise InvalidArgument("repair output must differ from the pool (omit -o to repair in place)")
    report = RepairReport(pool=pool_path, output=out_path or pool_path, in_place=out_path is None)
    lock_fd = _lock(pool_path, exclusive=out_path is None)
    data_fd = -1
    try:
        md, names, attrs, records, hdr = salvage(pool_path, report)
        hdr = dict(hdr, metadata_blocks_hint=os.path.getsize(os.path.join(pool_path, "metadata")) // BLOCK)
        bs = int(hdr["block_size"])
        data_path = hdr.get("data_file") or os.path.join(pool_path, "data")
        data_fd = _open_data(data_path, hdr, pool_path, in_place=out_path is None)
        if data_fd >= 0:
            md = _drop_past_end(md, data_path, os.fstat(data_fd).st_size, bs, report)
        referenced = np.concatenate([d.dblocks.astype(np.int64) for d in md.devices]) if md.devices \
            else np.zeros(0, np.int64)
        report.suspect_blocks = _holes(data_path, bs, referenced)
        if report.suspect_blocks:
            report.problems.append(f"{report.suspect_blocks} mapped data blocks are holes in the data file")
        if out_path is not None:
            made_dir = not os.path.exists(out_path)
            try:
                _build(out_path, md, names, attrs, records, hdr, None, keep_uuid=False)
                _copy_blocks(data_path, os.path.join(out_path, "data"), bs, referenced)
            except BaseException:
                _remove_new_pool(out_path, made_dir)  # a failed repair -o leaves nothing behind
                raise
        else:
            tmp = tempfile.mkdtemp(prefix=".repair-", dir=pool_path)
            try:
                _build(os.path.join(tmp, "pool"), md, names, attrs, records, hdr, hdr.get("data_file"),
                       keep_uuid=True)
                md_path = os.path.join(pool_path, "metadata")
                backup = md_path + ".damaged"
                n = 1
                while os.path.exists(backup):
                    backup = f"{md_path}.damaged.{n}"
                    n += 1
                os.rename(md_path, backup)
                os.rename(os.path.join(tmp, "pool", "metadata"), md_path)
                _fsync_dir(pool_path)
                report.backup = backup
                if report.data_file_short:  # nothing maps past the end any more: re-extend
                    os.ftruncate(data_fd, int(hdr["nr_data_blocks"]) * bs)
                    os.fsync(data_fd)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if data_fd >= 0:
            os.close(data_fd)
        os.close(lock_fd)
    return report


def _open_data(data_path: str, hdr: dict[str, Any], pool_path: str, *, in_place: bool) -> int:
    """Open the damaged pool's data file for the repair (-1 if it is missing): its flock is taken
    (exclusive in place) and its owner stamp must name this pool (:mod:`thinpool.ownership`)."""
    from . import ownership
    try:
        fd = pooldir.open_pool_file(data_path, os.O_RDWR if in_place else os.O_RDONLY, what="data file")
    except FileNotFoundError:
        return -1
    try:
        ownership.lock(fd, data_path, read_only=not in_place)
        ownership.check_owner(data_path, str(hdr.get("uuid", "")), pool_path, fd=fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _drop_past_end(md: Metadata, data_path: str, size: int, bs: int, report: RepairReport) -> Metadata:
    """A data file truncated below the pool's size has lost every block past its end: drop the
    mappings to them (recorded in ``report``); the rest is kept."""
    nr_data = md.superblock.nr_data_blocks
    valid = size // bs
    if valid >= nr_data:
        return md
    devices = []
    dropped = 0
    lost: set[int] = set()
    for dev in md.devices:
        keep = dev.dblocks < np.uint64(valid)
        n = int((~keep).sum())
        if n:
            dropped += n
            lost.update(dev.dblocks[~keep].astype(np.int64).tolist())
            report.problems.append(f"device {dev.dev_id}: {n} mappings point past the end of the truncated data "
                                   f"file: dropped")
            for d in report.devices_kept:
                if d["dev_id"] == dev.dev_id:
                    d["mappings"] -= n
            dev = replace(dev, mapped_blocks=int(keep.sum()), vblocks=dev.vblocks[keep], dblocks=dev.dblocks[keep],
                          times=dev.times[keep])
        devices.append(dev)
    report.mappings_dropped += dropped
    report.mappings_kept -= dropped
    report.data_file_short = {"path": data_path, "size": size, "expected": nr_data * bs,
                              "mappings_dropped": dropped, "blocks_lost": len(lost)}
    return Metadata(md.superblock, devices)


def _remove_new_pool(out_path: str, made_dir: bool) -> None:
    """Remove the pool a failed ``repair -o`` was writing (the directory was empty or absent)."""
    if made_dir:
        shutil.rmtree(out_path, ignore_errors=True)
        return
    for name in os.listdir(out_path) if os.path.isdir(out_path) else []:
        p = os.path.join(out_path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


def _copy_blocks(src: str, dst: str, bs: int, blocks: np.ndarray) -> None:
    from .hostio import sync_or_fail, write_all
    sfd = pooldir.open_pool_file(src, os.O_RDONLY, what="data file")
    dfd = os.open(dst, os.O_WRONLY)
    try:
        for b in np.unique(blocks).tolist():
            buf = os.pread(sfd, bs, b * bs)
            if buf.count(0) != len(buf):
                write_all(os.pwrite, dfd, buf, b * bs, dst)   # a short count continues, never ignored
        sync_or_fail(os.fdatasync, dfd, dst)
    finally:
        os.close(sfd)
        os.close(dfd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["RepairReport", "repair", "salvage"]
