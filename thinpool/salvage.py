"""The read side of ``thinpool repair`` (thin_repair's): damaged metadata read *tolerantly* into the
IR, and the :class:`RepairReport` of what was kept and what was lost.

Every 4 KiB page is still checked against its CRC-32C, but a bad page only loses what it holds (the
table in :mod:`thinpool.repair`'s docstring): :func:`salvage` picks the newest superblock whose
directory is readable, walks each device's tree from its root keeping every verified leaf's mappings
that point inside the data device and the volume, and reads the catalog (either format) for names,
external origins and stored records.  Writing the salvage as a pool is :mod:`thinpool.repair`'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import schema as K
from . import catalog as cat_format
from . import nodestore, pooldir
from .errors import MetadataCorrupt, NotFound
from .interop.ir import Device, Metadata, Superblock, SECTOR, TIME_MASK
from .origin import valid_record
from .mdpages import _SB_HEADER, BLOCK, COMMIT_PAGES, MAGIC, PM_ENTRIES, SUPERBLOCKS, checksum, commit_pages_valid


_REQUIRED = ("block_size", "nr_data_blocks", "directory", "directory_bytes", "pages", "catalog_bytes")
_NONE = -1
_UNMAPPED = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class RepairReport:
    """What :func:`repair` salvaged and what it lost."""

    pool: str
    output: str
    in_place: bool
    generation: int = -1                      # superblock generation salvaged
    newest_generation: int = -1               # newest generation found (lost if != generation)
    superblocks: list[str] = field(default_factory=list)
    devices_kept: list[dict[str, Any]] = field(default_factory=list)
    devices_dropped: list[dict[str, Any]] = field(default_factory=list)
    mappings_kept: int = 0
    mappings_dropped: int = 0                 # individual mappings known and dropped
    nodes_lost: int = 0                       # unreadable tree nodes (their mappings are unknown)
    pages_lost: dict[str, int] = field(default_factory=dict)
    names_lost: bool = False
    records_lost: bool = False
    held_snapshot_dropped: bool = False
    suspect_blocks: int = 0                   # mapped blocks that are holes in the data file
    data_file_short: dict[str, Any] | None = None  # a truncated data file: sizes and mappings dropped
    backup: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def lossless(self) -> bool:
        """True when nothing at all was lost (the metadata was intact)."""
        return (self.generation == self.newest_generation and not self.devices_dropped
                and not self.mappings_dropped and not self.nodes_lost and not self.names_lost
                and not self.records_lost and not self.suspect_blocks and not any(self.pages_lost.values()))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lossless"] = self.lossless
        return d

    def summary(self) -> str:
        """Human-readable lines (what ``thinpool repair`` prints)."""
        lines = [f"repaired {self.pool} -> {self.output}" + (" (in place)" if self.in_place else "")]
        if self.backup:
            lines.append(f"damaged metadata kept as {self.backup}")
        lines.append(f"salvaged commit generation {self.generation}" +
                     ("" if self.generation == self.newest_generation
                      else f" (generation {self.newest_generation} was unreadable: its changes are lost)"))
        lines.append(f"devices kept: {len(self.devices_kept)}, dropped: {len(self.devices_dropped)}; "
                     f"mappings kept: {self.mappings_kept}, dropped: {self.mappings_dropped}; "
                     f"tree nodes lost: {self.nodes_lost}")
        for d in self.devices_dropped:
            lines.append(f"  dropped device {d.get('dev_id')} ({d.get('name') or '?'}): {d['reason']}")
        if self.data_file_short:
            d = self.data_file_short
            lines.append(f"data file {d['path']} was truncated to {d['size']} bytes ({d['expected']} expected): "
                         f"{d['mappings_dropped']} mappings of {d['blocks_lost']} data blocks past its end dropped "
                         f"(their data is lost)" + ("; the file was re-extended" if self.in_place else ""))
        if self.suspect_blocks:
            lines.append(f"suspect: {self.suspect_blocks} mapped data blocks are holes in the data file "
                         f"(freed by a lost commit?); they read as zeroes")
        if self.names_lost:
            lines.append("volume names lost: devices are named dev<ID>")
        if self.records_lost:
            lines.append("stored records (snapshotter etc.) lost")
        if self.held_snapshot_dropped:
            lines.append("the held metadata snapshot was dropped")
        lines.append("nothing was lost" if self.lossless else "SOME METADATA WAS LOST (see above)")
        return "\n".join(lines)


class _Reader:
    """Tolerant reader of one metadata file."""

    def __init__(self, path: str) -> None:
        self.path = path
        with os.fdopen(pooldir.open_pool_file(path, os.O_RDONLY, what="metadata file"), "rb") as f:
            self.raw = f.read()
        self.nr_blocks = len(self.raw) // BLOCK

    def block(self, b: int) -> bytes | None:
        if b < 0 or b >= self.nr_blocks:
            return None
        return self.raw[b * BLOCK:(b + 1) * BLOCK]

    def superblock(self, slot: int) -> tuple[int, dict[str, Any] | None, str]:
        raw = self.block(slot)
        if raw is None:
            return -1, None, f"superblock {slot}: beyond the end of the file (truncated)"
        crc, magic, version, generation, length = _SB_HEADER.unpack_from(raw)
        if magic != MAGIC:
            return -1, None, f"superblock {slot} (metadata block {slot}): bad magic"
        ok = crc == checksum(raw[4:])
        try:
            header = json.loads(raw[_SB_HEADER.size:_SB_HEADER.size + length])
            if not isinstance(header, dict) or any(k not in header for k in _REQUIRED):
                raise ValueError("missing fields")
        except ValueError:
            return -1, None, f"superblock {slot} (metadata block {slot}): unreadable"
        if not ok:
            return generation, None, f"superblock {slot} (metadata block {slot}): bad checksum (generation {generation}?)"
        return generation, header, f"superblock {slot}: generation {generation} ok"

    def page(self, loc: int) -> np.ndarray | None:
        """A verified page at ``loc`` (block << 32 | crc); zeroes for 0; None if bad."""
        if loc == 0:
            return np.zeros(BLOCK, np.uint8)
        raw = self.block(loc >> 32)
        if raw is None or checksum(raw) != loc & 0xFFFFFFFF:
            return None
        return np.frombuffer(raw, np.uint8)


@dataclass
class _Salvage:
    generation: int
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    lost_pages: dict[str, np.ndarray]          # per array: bool per page (True = lost)
    problems: list[str]


def _salvage_state(r: _Reader, generation: int, header: dict[str, Any]) -> _Salvage:
    dir_locs = [int(x) for x in header["directory"]]
    pages = [r.page(loc) for loc in dir_locs]
    if any(p is None for p in pages):
        bad = [loc >> 32 for loc, p in zip(dir_locs, pages) if p is None]
        raise MetadataCorrupt(f"{r.path}: directory of generation {generation}: bad checksum in metadata "
                              f"block {bad[0]}", structure="directory", block=bad[0])
    raw = b"".join(p.tobytes() for p in pages if p is not None)[: header["directory_bytes"]]  # (all are)
    try:
        directory = json.loads(raw)
    except ValueError:
        raise MetadataCorrupt(f"{r.path}: directory of generation {generation} is not valid",
                              structure="directory", block=dir_locs[0] >> 32 if dir_locs else None) from None
    problems: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    lost_pages: dict[str, np.ndarray] = {}
    for name, pm in directory.items():
        npages = int(header["pages"].get(name, 0))
        locs = np.zeros(npages, np.uint64)
        lost = np.zeros(npages, bool)
        for i, loc in enumerate(int(x) for x in pm):
            page = r.page(loc)
            lo, hi = i * PM_ENTRIES, min(npages, (i + 1) * PM_ENTRIES)
            if page is None:
                problems.append(f"page map of {name}: page {i} (metadata block {loc >> 32}) is bad: "
                                f"{hi - lo} pages of {name} lost")
                lost[lo:hi] = True
            elif hi > lo:
                locs[lo:hi] = page.view(np.uint64)[: hi - lo]
        data = np.zeros(npages * BLOCK, np.uint8)
        for i in range(npages):
            if lost[i]:
                continue
            page = r.page(int(locs[i]))
            if page is None:
                problems.append(f"{name}: page {i} (metadata block {int(locs[i]) >> 32}) is bad")
                lost[i] = True
            else:
                data[i * BLOCK:(i + 1) * BLOCK] = page
        arrays[name] = data
        lost_pages[name] = lost
    for kind in (nodestore.LEAVES, nodestore.INNERS):  # packed (format 4) or grouped (3): see nodestore
        if kind.pack_array in arrays or (kind is nodestore.LEAVES and nodestore.GROUPS_ARRAY in arrays):
            nodes, _ = nodestore.load(kind, arrays, lost_pages)
            lost_pages[kind.old_array] = nodestore.lost_nodes(kind, arrays, lost_pages, len(nodes))
            arrays[kind.old_array] = nodes.reshape(-1).view(np.uint8)
    for name in ("leaves", "inners", "devs", "catalog"):
        arrays.setdefault(name, np.zeros(0, np.uint8))
        lost_pages.setdefault(name, np.zeros(0, bool))
    return _Salvage(generation, header, arrays, lost_pages, problems)


def _salvage_catalog1(s: _Salvage, hdr: dict[str, Any], report: "RepairReport",
                      names_by_slot: dict[int, tuple[str, int | None]], origins_by_slot: dict[int, dict[str, Any]],
                      records: dict[str, Any]) -> bool:
    """A format-1 catalog (one JSON document): fills the three dicts; True if it is lost."""
    if s.lost_pages["catalog"].any() or len(s.arrays["catalog"]) == 0:
        return True
    try:
        catalog = json.loads(s.arrays["catalog"].tobytes()[: int(hdr["catalog_bytes"])])
        for name, v in catalog["volumes"].items():
            names_by_slot[int(v["slot"])] = (name, int(v["dev_id"]))
            if v.get("origin") is not None:
                if valid_record(v["origin"]):
                    origins_by_slot[int(v["slot"])] = v["origin"]
                else:
                    report.problems.append(f"volume {name!r}: its external origin record is malformed: dropped")
        records.update(catalog.get("records", {}))
    except (ValueError, KeyError, TypeError, AttributeError):
        report.problems.append("catalog: not valid: names and records lost")
        return True
    return False


def _commit_pages_verify(r: _Reader, gen: int, header: dict[str, Any], report: RepairReport) -> bool:
    """Whether every page a one-flush commit lists in its superblock (``commit_pages``) verifies;
    a problem is reported for one that does not (True for a superblock without the list)."""
    listed = header.get(COMMIT_PAGES)
    if listed is None:
        return True
    if not commit_pages_valid(listed):
        report.problems.append(f"generation {gen}: its list of the pages its commit wrote is malformed")
        return False
    bad = [loc >> 32 for loc in listed if r.page(loc) is None]
    if bad:
        report.problems.append(f"generation {gen}: the page its commit wrote to metadata block {bad[0]} does not "
                               f"verify (the commit did not complete, or the page was damaged since)"
                               f"{f'; {len(bad) - 1} more' if len(bad) > 1 else ''}")
    return not bad


def _choose(r: _Reader, report: RepairReport) -> _Salvage:
    found = []
    bad_gens = []
    for slot in range(SUPERBLOCKS):
        gen, header, status = r.superblock(slot)
        report.superblocks.append(status)
        if header is not None:
            found.append((gen, slot, header))
        else:
            bad_gens.append(gen)
    if found:
        newest = max(g for g, _, _ in found)
        # a bad superblock may be the newer one: unless its (unverified) generation says it is the
        # older, the commit it held is counted as lost
        report.newest_generation = newest + (1 if any(g != newest - 1 for g in bad_gens) else 0)
    if not found:
        raise MetadataCorrupt(f"{r.path}: cannot repair: neither superblock (metadata blocks 0 and 1) is "
                              f"readable", structure="superblock", block=0)
    errors = []
    # a one-flush commit whose listed pages do not all verify did not complete (or was damaged since):
    # the commits that verify are tried first, newest first, and it last
    incomplete = {gen for gen, _slot, header in found if not _commit_pages_verify(r, gen, header, report)}
    for gen, slot, header in sorted(found, key=lambda x: (x[0] not in incomplete, x[0]), reverse=True):
        try:
            return _salvage_state(r, gen, header)
        except (MetadataCorrupt, ValueError, TypeError, KeyError, AttributeError) as exc:
            errors.append(str(exc))
            report.problems.append(f"generation {gen} unusable: {exc}")
    raise MetadataCorrupt(f"{r.path}: cannot repair: no superblock leads to a readable directory "
                          f"({'; '.join(errors)})", structure="directory")


def _walk(s: _Salvage, root: int, size_blocks: int, nr_data: int, report: RepairReport, label: str
          ) -> tuple[np.ndarray, np.ndarray]:
    """Mappings of one device (vblocks, values), tolerating lost/invalid nodes."""
    inners = s.arrays["inners"].view(np.int32).reshape(-1, K.INNER_ENTRIES)
    leaves = s.arrays["leaves"].view(np.uint64).reshape(-1, K.LEAF_ENTRIES)
    lost_i, lost_l = s.lost_pages["inners"], s.lost_pages["leaves"]
    vbs: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for ri in np.flatnonzero(inners[root] != _NONE):
        mid = int(inners[root, ri])
        if not 0 <= mid < len(inners) or lost_i[mid]:
            report.nodes_lost += 1
            report.problems.append(f"{label}: mid node {mid} unreadable: the mappings of virtual blocks "
                                   f"{int(ri) << 19}..{((int(ri) + 1) << 19) - 1} are lost")
            continue
        for mi in np.flatnonzero(inners[mid] != _NONE):
            leaf = int(inners[mid, mi])
            base = (int(ri) << (K.LEAF_BITS + K.INNER_BITS)) | (int(mi) << K.LEAF_BITS)
            if not 0 <= leaf < len(leaves) or lost_l[leaf]:
                report.nodes_lost += 1
                report.problems.append(f"{label}: leaf {leaf} unreadable: the mappings of virtual blocks "
                                       f"{base}..{base + K.LEAF_ENTRIES - 1} are lost")
                continue
            row = leaves[leaf]
            idx = np.flatnonzero(row != _UNMAPPED)
            vbs.append(base + idx.astype(np.int64))
            vals.append(row[idx])
    vb = np.concatenate(vbs) if vbs else np.zeros(0, np.int64)
    val = np.concatenate(vals) if vals else np.zeros(0, np.uint64)
    ok = ((val >> np.uint64(24)) < np.uint64(nr_data)) & (vb < size_blocks)
    if not ok.all():
        n = int((~ok).sum())
        report.mappings_dropped += n
        report.problems.append(f"{label}: {n} mappings point beyond the data device or the volume: dropped")
    return vb[ok], val[ok]


def salvage(pool_path: str, report: RepairReport) -> tuple[Metadata, dict[int, str], dict[int, tuple[int, bool, Any]],
                                                          dict[str, Any], dict[str, Any]]:
    """Read the pool's metadata tolerantly.  Returns (IR, names, {dev_id: (size, read_only, external
    origin record or None)}, records, header)."""
    from .schema import DevFlag, dev_dtype
    DEV_DTYPE = dev_dtype()
    md_path = os.path.join(pool_path, "metadata")
    if not os.path.isfile(md_path):
        raise NotFound(f"{pool_path} is not a thin pool (no metadata file)")
    r = _Reader(md_path)
    s = _choose(r, report)
    report.generation = s.generation
    report.problems.extend(s.problems)
    hdr = s.header
    bs = int(hdr["block_size"])
    nr_data = int(hdr["nr_data_blocks"])
    report.pages_lost = {k: int(v.sum()) for k, v in s.lost_pages.items() if v.any()}
    if hdr.get("held"):
        report.held_snapshot_dropped = True
    # catalog: names and records
    names_by_slot: dict[int, tuple[str, int | None]] = {}
    origins_by_slot: dict[int, dict[str, Any]] = {}  # external origins (thinpool/origin.py), kept by a repair
    records: dict[str, Any] = {}
    if hdr.get("catalog_format") == cat_format.FORMAT:  # the name index, slot records and JSON part
        def pages(name: str) -> list[bytes | None]:
            data, lost = s.arrays.get(name, np.zeros(0, np.uint8)), s.lost_pages.get(name, np.zeros(0, bool))
            return [None if lost[i] else data[i * BLOCK:(i + 1) * BLOCK].tobytes() for i in range(len(lost))]
        extra = None if s.lost_pages["catalog"].any() else s.arrays["catalog"].tobytes()[: int(hdr["catalog_bytes"])]
        by_slot, origins, kept, lost_problems, cat_lost = cat_format.salvage(pages, extra, json.loads)
        names_by_slot = {slot: (name, None) for slot, name in by_slot.items()}
        for slot, rec in origins.items():
            if valid_record(rec):
                origins_by_slot[slot] = rec
            else:
                report.problems.append(f"slot {slot}: its external origin record is malformed: dropped")
        report.problems.extend(lost_problems)
        records = kept if kept is not None else {}
        report.records_lost = kept is None
        if cat_lost:
            report.names_lost = True
    else:
        cat_lost = _salvage_catalog1(s, hdr, report, names_by_slot, origins_by_slot, records)
        if cat_lost:
            report.names_lost = True
            report.records_lost = True
    # devices
    devs_raw = s.arrays["devs"]
    devs = devs_raw[: len(devs_raw) // DEV_DTYPE.itemsize * DEV_DTYPE.itemsize].view(DEV_DTYPE)
    per_page = BLOCK // DEV_DTYPE.itemsize
    lost_dev_pages = s.lost_pages["devs"]
    inners_n = len(s.arrays["inners"]) // BLOCK
    devices: list[Device] = []
    names: dict[int, str] = {}
    attrs: dict[int, tuple[int, bool, Any]] = {}
    seen: set[int] = set()
    used_names: set[str] = set()
    for slot, (lost_name, dev_id) in sorted(names_by_slot.items()):
        page = slot // per_page
        if page < len(lost_dev_pages) and lost_dev_pages[page]:
            report.devices_dropped.append({"name": lost_name, "dev_id": dev_id,
                                           "reason": f"its device-table page {page} is unreadable"})
    for slot in range(len(devs)):
        if slot // per_page < len(lost_dev_pages) and lost_dev_pages[slot // per_page]:
            continue
        d = devs[slot]
        if not d["flags"] & DevFlag.IN_USE:
            continue
        dev_id = int(d["dev_id"])
        name, cat_id = names_by_slot.get(slot, (None, None))
        label = f"device {dev_id}" + (f" ({name!r})" if name else "")
        if name is None or (cat_id is not None and cat_id != dev_id):
            if not cat_lost:
                report.problems.append(f"{label}: no catalog entry: named dev{dev_id}")
            name = f"dev{dev_id}"
        if not 0 <= dev_id < 1 << 24:
            report.devices_dropped.append({"name": name, "dev_id": dev_id, "reason": "device id out of range"})
            continue
        if dev_id in seen or name in used_names:
            report.devices_dropped.append({"name": name, "dev_id": dev_id, "reason": "duplicate device id or name"})
            continue
        root = int(d["root"])
        if not 0 <= root < inners_n or s.lost_pages["inners"][root]:
            report.devices_dropped.append({"name": name, "dev_id": dev_id,
                                           "reason": f"root node {root} is unreadable: all its mappings are lost"})
            continue
        size = int(d["size"])
        size_blocks = -(-size // bs) if size > 0 else K.MAX_VBLOCKS
        vb, val = _walk(s, root, min(size_blocks, K.MAX_VBLOCKS), nr_data, report, label)
        seen.add(dev_id)
        used_names.add(name)
        times = (val & np.uint64(TIME_MASK)).astype(np.uint32)
        devices.append(Device(dev_id=dev_id, mapped_blocks=len(vb), transaction=int(d["transaction"]) & K.U64_MASK,
                              creation_time=int(d["creation_time"]), snap_time=int(d["snap_time"]),
                              vblocks=vb.astype(np.uint64), dblocks=val >> np.uint64(24), times=times))
        names[dev_id] = name
        attrs[dev_id] = (size if size > 0 else bs, bool(d["flags"] & DevFlag.READ_ONLY), origins_by_slot.get(slot))
        report.mappings_kept += len(vb)
        if int(d["mapped"]) != len(vb):
            report.problems.append(f"{label}: recorded {int(d['mapped'])} mapped blocks, salvaged {len(vb)}")
        report.devices_kept.append({"name": name, "dev_id": dev_id, "mappings": len(vb)})
    devices.sort(key=lambda x: x.dev_id)
    sb = Superblock(time=int(hdr.get("time", 0)), transaction=int(hdr.get("transaction_id", 0)),
                    data_block_size=bs // SECTOR, nr_data_blocks=nr_data)
    return Metadata(sb, devices), names, attrs, records, hdr
