"""The text outputs of ``thin_ls``, ``thin_delta``, ``thin_rmap`` and ``thin_metadata_size``.

Each tool has a function returning JSON-able records computed from the IR
(:func:`ls_rows`, :func:`delta`, :func:`rmap`, :func:`metadata_size_blocks`) and a ``format_*``
function that reproduces, byte for byte, what thin-provisioning-tools 0.9.0 prints on stdout for
binary metadata holding the same IR.  Error messages are the tools' own texts.  Work over
mappings is vectorized with numpy; nothing loops in Python per mapping.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidArgument, NotFound
from .ir import SECTOR, Device, Metadata
from .xml import mapping_runs

__all__ = [
    "LS_FIELDS", "DEFAULT_LS_FIELDS", "ls_rows", "format_ls", "human_size", "exclusive_blocks",
    "delta", "format_delta", "rmap", "format_rmap", "parse_region",
    "metadata_size_blocks", "format_metadata_size",
]

_U64 = (1 << 64) - 1

# ----------------------------------------------------------------------------------------------
# thin_ls

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


# ----------------------------------------------------------------------------------------------
# thin_delta

_KINDS = ("left_only", "right_only", "different", "same")
_LEFT, _RIGHT, _DIFF, _SAME = range(4)


def _find_device(md: Metadata, dev_id: int, which: str) -> Device:
    for dev in md.devices:
        if dev.dev_id == dev_id:
            return dev
    raise NotFound(f"Unable to find mapping tree for {which} ({dev_id})")


def _covering(starts: np.ndarray, vb: np.ndarray, ln: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each point in *starts*: is it inside one of the runs, and which data block it maps to."""
    if len(vb) == 0:
        return np.zeros(len(starts), bool), np.zeros(len(starts), np.uint64)
    idx = np.searchsorted(vb, starts, side="right").astype(np.int64) - 1
    ok = idx >= 0
    j = np.where(ok, idx, 0)
    inside = ok & (starts < vb[j] + ln[j])
    return inside, db[j] + (starts - vb[j])


def _delta_pieces(md: Metadata, left_id: int, right_id: int) -> tuple[np.ndarray, ...]:
    left = _find_device(md, left_id, "snap1")
    right = _find_device(md, right_id, "snap2")
    lv, ld, ll, _ = mapping_runs(left, split_on_time=False)
    rv, rd, rl, _ = mapping_runs(right, split_on_time=False)
    bounds = np.unique(np.concatenate([lv, lv + ll, rv, rv + rl]))
    if len(bounds) < 2:
        z = np.zeros(0, np.uint64)
        return np.zeros(0, np.int8), z, z, z, z
    begins, ends = bounds[:-1], bounds[1:]
    lin, ldat = _covering(begins, lv, ll, ld)
    rin, rdat = _covering(begins, rv, rl, rd)
    kind = np.full(len(begins), -1, np.int8)
    kind[lin & ~rin] = _LEFT
    kind[rin & ~lin] = _RIGHT
    both = lin & rin
    kind[both & (ldat != rdat)] = _DIFF
    kind[both & (ldat == rdat)] = _SAME
    keep = kind >= 0
    return kind[keep], begins[keep], (ends - begins)[keep], ldat[keep], rdat[keep]


def delta(md: Metadata, left_id: int, right_id: int) -> list[dict]:
    """The differences between two devices' mappings, as ``thin_delta --verbose`` reports them.

    Mappings are compared by data block only (times are ignored).  Each record is
    ``{"kind", "begin", "length", ...}`` with kind ``same``/``left_only``/``right_only`` carrying
    ``data_begin`` and ``different`` carrying ``left_data_begin`` and ``right_data_begin``; units
    are blocks.  Records are split wherever either device's run of consecutive data blocks
    breaks, exactly as the tool's verbose records are.  Raises :class:`NotFound` ("Unable to find
    mapping tree for snap1 (N)") when a device does not exist.
    """
    kind, begin, length, ldat, rdat = _delta_pieces(md, left_id, right_id)
    out = []
    for k, b, n, l_, r_ in zip(kind.tolist(), begin.tolist(), length.tolist(), ldat.tolist(), rdat.tolist()):
        rec = {"kind": _KINDS[k], "begin": b, "length": n}
        if k == _DIFF:
            rec["left_data_begin"] = l_
            rec["right_data_begin"] = r_
        else:
            rec["data_begin"] = r_ if k == _RIGHT else l_
        out.append(rec)
    return out


def _superblock_open(md: Metadata) -> str:
    sb = md.superblock
    snap = f' metadata_snap="{sb.metadata_snap}"' if sb.metadata_snap else ""
    return (f'<superblock uuid="" time="{sb.time}" transaction="{sb.transaction}" '
            f'data_block_size="{sb.data_block_size}" nr_data_blocks="{sb.nr_data_blocks}"{snap}>\n')


def format_delta(md: Metadata, left: int, right: int, verbose: bool = False) -> str:
    """What ``thin_delta --thin1 LEFT --thin2 RIGHT [--verbose]`` 0.9.0 prints.

    The superblock line carries no flags/version but ``metadata_snap`` when one is held.  Brief
    output merges contiguous records of one kind into ``<same begin= length=/>`` etc.; verbose
    output groups consecutive records of one kind under ``<same>``… with one ``<range>`` each.
    """
    kind, begin, length, ldat, rdat = _delta_pieces(md, left, right)
    lines = [_superblock_open(md), f'  <diff left="{left}" right="{right}">\n']
    if not verbose:
        if len(kind):
            end = begin + length
            new = np.ones(len(kind), bool)
            new[1:] = (kind[1:] != kind[:-1]) | (begin[1:] != end[:-1])
            first = np.flatnonzero(new)
            last = np.append(first[1:], len(kind)) - 1
            lines += [f'    <{_KINDS[k]} begin="{b}" length="{e - b}"/>\n'
                      for k, b, e in zip(kind[first].tolist(), begin[first].tolist(), end[last].tolist())]
    elif len(kind):
        new = np.ones(len(kind), bool)
        new[1:] = kind[1:] != kind[:-1]
        starts = set(np.flatnonzero(new).tolist())
        prev = None
        for i, (k, b, n, l_, r_) in enumerate(zip(kind.tolist(), begin.tolist(), length.tolist(),
                                                  ldat.tolist(), rdat.tolist())):
            if i in starts:
                if prev is not None:
                    lines.append(f"    </{_KINDS[prev]}>\n")
                lines.append(f"    <{_KINDS[k]}>\n")
                prev = k
            if k == _DIFF:
                lines.append(f'      <range begin="{b}" left_data_begin="{l_}" right_data_begin="{r_}" length="{n}"/>\n')
            else:
                lines.append(f'      <range begin="{b}" data_begin="{r_ if k == _RIGHT else l_}" length="{n}"/>\n')
        lines.append(f"    </{_KINDS[prev]}>\n")
    lines.append("  </diff>\n</superblock>\n")
    return "".join(lines)


# ----------------------------------------------------------------------------------------------
# thin_rmap

_NUMBER_RE = re.compile(r"\s*([+-]?)(\d+)")


def _istream_u64(text: str, pos: int) -> tuple[int | None, int]:
    """``istream >> uint64_t`` at *pos*: (value or None on failure, position after it).

    Blanks are skipped and a sign is allowed; a minus wraps modulo 2^64 as libstdc++ does.
    """
    m = _NUMBER_RE.match(text, pos)
    if not m or int(m.group(2)) > _U64:
        return None, pos
    value = int(m.group(2))
    return ((-value) & _U64 if m.group(1) == "-" else value), m.end()


def parse_region(text: str) -> tuple[int, int]:
    """Parse a ``thin_rmap --region`` argument ``BEGIN..END`` (END exclusive) as the tool does.

    Like the tool's ``istream`` parsing, blanks before a number are skipped, a sign is accepted
    (``-1`` wraps to 2^64-1) and anything after END is ignored.  Raises :class:`InvalidArgument`
    with the tool's texts: "badly formed region (no dots)", "badly formed region (couldn't parse
    numbers)", "badly formed region (end <= begin)".
    """
    begin, pos = _istream_u64(text, 0)
    if begin is None or text[pos:pos + 2] != "..":
        raise InvalidArgument("badly formed region (no dots)")
    end, _ = _istream_u64(text, pos + 2)
    if end is None:
        raise InvalidArgument("badly formed region (couldn't parse numbers)")
    if end <= begin:
        raise InvalidArgument("badly formed region (end <= begin)")
    return begin, end


def _check_regions(regions: Sequence[tuple[int, int] | str]) -> list[tuple[int, int]]:
    if not regions:
        raise InvalidArgument("No regions provided.")
    out = []
    for r in regions:
        b, e = parse_region(r) if isinstance(r, str) else (int(r[0]), int(r[1]))
        if e <= b:
            raise InvalidArgument("badly formed region (end <= begin)")
        out.append((b, e))
    return out


def _libstdcxx_sort(keys: list[int]) -> list[int]:
    """The permutation GNU libstdc++'s ``std::sort`` (introsort) leaves equal *keys* in.

    thin_rmap sorts its records with ``std::sort`` on the data block alone, so records with
    equal data blocks come out in whatever order the (unstable) introsort leaves them; this
    replays libstdc++'s algorithm (median-of-three quicksort down to 16 elements, heapsort at
    the depth limit, then a final insertion sort) on indices.
    """
    a = list(range(len(keys)))
    k = keys

    def adjust_heap(first: int, hole: int, length: int, value: int) -> None:
        top = hole
        child = hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if k[a[first + child]] < k[a[first + child - 1]]:
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and k[a[first + parent]] < k[value]:
            a[first + hole] = a[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        a[first + hole] = value

    def heap_sort(first: int, last: int) -> None:
        length = last - first
        if length >= 2:
            parent = (length - 2) // 2
            while True:
                adjust_heap(first, parent, length, a[first + parent])
                if parent == 0:
                    break
                parent -= 1
        while last - first > 1:
            last -= 1
            value = a[last]
            a[last] = a[first]
            adjust_heap(first, 0, last - first, value)

    def move_median_to_first(result: int, x: int, y: int, z: int) -> None:
        kx, ky, kz = k[a[x]], k[a[y]], k[a[z]]
        if kx < ky:
            m = y if ky < kz else (z if kx < kz else x)
        elif kx < kz:
            m = x
        elif ky < kz:
            m = z
        else:
            m = y
        a[result], a[m] = a[m], a[result]

    def introsort(first: int, last: int, depth: int) -> None:
        while last - first > 16:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            mid = first + (last - first) // 2
            move_median_to_first(first, first + 1, mid, last - 1)
            pivot = k[a[first]]
            lo, hi = first + 1, last
            while True:
                while k[a[lo]] < pivot:
                    lo += 1
                hi -= 1
                while pivot < k[a[hi]]:
                    hi -= 1
                if not lo < hi:
                    break
                a[lo], a[hi] = a[hi], a[lo]
                lo += 1
            introsort(lo, last, depth)
            last = lo

    def insertion_sort(first: int, last: int, guarded: bool) -> None:
        for i in range(first + (1 if guarded else 0), last):
            v = a[i]
            kv = k[v]
            if guarded and kv < k[a[first]]:
                a[first + 1:i + 1] = a[first:i]
                a[first] = v
                continue
            j = i
            while kv < k[a[j - 1]]:
                a[j] = a[j - 1]
                j -= 1
            a[j] = v

    n = len(a)
    if n > 1:
        introsort(0, n, 2 * (n.bit_length() - 1))
        if n > 16:
            insertion_sort(0, 16, True)
            insertion_sort(16, n, False)
        else:
            insertion_sort(0, n, True)
    return a


def rmap(md: Metadata, regions: Sequence[tuple[int, int] | str]) -> list[dict]:
    """Reverse map data-block *regions* (half-open ``(begin, end)`` or ``"B..E"``) to devices.

    Records ``{"data_begin", "data_end", "dev_id", "thin_begin", "thin_end"}`` (half-open, in
    blocks), as ``thin_rmap`` 0.9.0 builds them: walking every device in dev-id order and its
    mappings in virtual order, keeping those whose data block lies in any region, a record grows
    while the same device maps the next virtual block to the next data block; records are then
    sorted by data block with libstdc++'s unstable ``std::sort`` (ties keep the order it gives).
    Raises :class:`InvalidArgument` ("No regions provided.", "badly formed region …").
    """
    regs = _check_regions(regions)
    devs = sorted(md.devices, key=lambda d: d.dev_id)
    sizes = [len(d.vblocks) for d in devs]
    if not sum(sizes):
        return []
    dev_ids = np.repeat(np.array([d.dev_id for d in devs], np.int64), sizes)
    v = np.concatenate([d.vblocks for d in devs])
    d = np.concatenate([d.dblocks for d in devs])
    mask = np.zeros(len(d), bool)
    for b, e in regs:
        mask |= (d >= np.uint64(b)) & (d < np.uint64(e))
    dev_ids, v, d = dev_ids[mask], v[mask], d[mask]
    if not len(d):
        return []
    new = np.ones(len(d), bool)
    one = np.uint64(1)
    new[1:] = (dev_ids[1:] != dev_ids[:-1]) | (d[1:] != d[:-1] + one) | (v[1:] != v[:-1] + one)
    first = np.flatnonzero(new)
    length = np.diff(np.append(first, len(d))).astype(np.uint64)
    dbeg, vbeg, ids = d[first], v[first], dev_ids[first]
    if len(np.unique(dbeg)) == len(dbeg):
        order = np.argsort(dbeg, kind="stable")
    else:
        order = np.array(_libstdcxx_sort(dbeg.tolist()), np.int64)
    return [
        {"data_begin": db, "data_end": db + n, "dev_id": i, "thin_begin": vb, "thin_end": vb + n}
        for db, n, i, vb in zip(dbeg[order].tolist(), length[order].tolist(), ids[order].tolist(),
                                vbeg[order].tolist())
    ]


def format_rmap(md: Metadata, regions: Sequence[tuple[int, int] | str]) -> str:
    """What ``thin_rmap --region B..E [--region …]`` 0.9.0 prints: ``data B..E -> thin(D) V..W`` lines."""
    return "".join(f"data {r['data_begin']}..{r['data_end']} -> thin({r['dev_id']}) "
                   f"{r['thin_begin']}..{r['thin_end']}\n" for r in rmap(md, regions))


# ----------------------------------------------------------------------------------------------
# thin_metadata_size

_UNIT_CHARS = "bskKmMgGtTpPeEzZyY"
_UNIT_NAMES = ("bytes", "sectors", "kibibytes", "kilobytes", "mebibytes", "megabytes",
               "gibibytes", "gigabytes", "tebibytes", "terabytes", "pebibytes", "petabytes",
               "ebibytes", "exabytes", "zebibytes", "zetabytes", "yobibytes", "yottabytes")


def _unit_factors() -> list[int]:
    f = [1, 512, 1024, 1000]
    for u in range(4, len(_UNIT_NAMES), 2):
        f.append(f[u - 2] * 1024 & _U64)   # unsigned long long: the biggest units wrap, as in the tool
        f.append(f[u - 1] * 1000 & _U64)
    return f


_UNIT_FACTORS = _unit_factors()
_MAPPINGS_PER_BLOCK = (4096 - 64) // 16   # 252, the 0.9.0 estimate


def _unit_index(text: str) -> int:
    """The tool's unit lookup: one character from ``bskKmM…``, else a prefix of a unit name."""
    if len(text) == 1:
        return _UNIT_CHARS.find(text)
    for i, name in enumerate(_UNIT_NAMES):
        if name.startswith(text):
            return i
    return -1


def metadata_size_blocks(block_size_bytes: int, pool_size_bytes: int, max_thins: int) -> int:
    """thin_metadata_size 0.9.0's estimate, in 4 KiB metadata blocks.

    ``1 + 2 × pool_sectors ÷ block_sectors ÷ 252 + max_thins`` (integer divisions; sizes are
    taken in whole 512-byte sectors as the tool does).  Raises :class:`InvalidArgument` with the
    tool's texts when a value is zero, the block size is not a power of two ("block size must be
    2^^N") or the pool is not larger than a block.
    """
    block = block_size_bytes // SECTOR
    pool = pool_size_bytes // SECTOR
    _check_sizes(block, pool, max_thins)
    return 1 + 2 * pool // block // _MAPPINGS_PER_BLOCK + max_thins


def _check_sizes(block: int, pool: int, max_thins: int) -> None:
    if not block:
        raise InvalidArgument("block size required!")
    if not pool:
        raise InvalidArgument("pool size required!")
    if not max_thins:
        raise InvalidArgument("max thins required!")
    if block & (block - 1):
        raise InvalidArgument("block size must be 2^^N")
    if pool <= block:
        raise InvalidArgument("pool size must be larger than block size")


def _size_option(arg: str, is_max_thins: bool, default_unit: int) -> tuple[int, str]:
    """One -b/-s/-m value as the tool reads it: (sectors, or a count for -m; its echo string)."""
    digits = arg[:len(arg) - len(arg.lstrip("0123456789"))]
    suffix = arg[len(digits):]
    number = min(int(digits) if digits else 0, (1 << 63) - 1)   # atoll saturates
    if suffix:
        idx = _unit_index(suffix)
        if idx < 0:
            raise InvalidArgument("Invalid unit specifier!")
        value = number * _UNIT_FACTORS[idx] & _U64
        if not is_max_thins:
            value //= SECTOR
        return value, digits + _UNIT_NAMES[idx]
    value = (number * SECTOR & _U64) // SECTOR
    return value, digits if is_max_thins else digits + _UNIT_NAMES[default_unit]


def format_metadata_size(block_size: str | int, pool_size: str | int, max_thins: str | int,
                         unit: str | None = None, numeric: bool | str = False) -> str:
    """What ``thin_metadata_size -b B -s S -m M [-u U] [-n[ARG]]`` 0.9.0 prints (with the newline).

    Values take the tool's suffixes: one of ``bskKmMgGtTpPeEzZyY`` (lower case binary, upper case
    decimal; ``s`` = sectors, the default) or a prefix of a long name (``64kibi``, ``1petabytes``,
    ``1mega``); a suffix on -m multiplies the count.  *unit* is the ``-u`` output unit (default
    sectors).  *numeric*: False prints the full sentence, True is ``-n`` (the number alone), a
    string is ``-nARG`` (a prefix of ``short`` appends the unit letter, of ``long`` the unit name).
    The number is printed as an integer when whole, else ``%0.2f`` (``%0.2e`` if the fraction is
    below 0.01).  Raises :class:`InvalidArgument` carrying the tool's message (e.g. "block size
    must be 2^^N", "Invalid unit specifier!", "output unit specifier invalid!", "-n invalid option
    argument").  The arguments are taken in the order written above (the tool's echo of a value
    without a suffix names the -u unit only if -u came first).
    """
    sectors = 1
    block, s_block = _size_option(str(block_size), False, sectors)
    pool, s_pool = _size_option(str(pool_size), False, sectors)
    thins, s_thins = _size_option(str(max_thins), True, sectors)
    out_unit = sectors
    if unit is not None:
        out_unit = _unit_index(unit)
        if out_unit < 0:
            raise InvalidArgument("output unit specifier invalid!")
    mode = "full"
    if numeric is True:
        mode = "number"
    elif isinstance(numeric, str):
        is_long = "long".startswith(numeric)
        if not numeric or not (is_long or "short".startswith(numeric)):
            raise InvalidArgument("-n invalid option argument")
        mode = "long" if is_long else "short"
    _check_sizes(block, pool, thins)

    blocks = ((2 * pool & _U64) // block // _MAPPINGS_PER_BLOCK + thins) & _U64
    r = (1.0 + float(blocks)) * 4096.0
    factor = _UNIT_FACTORS[out_unit]
    r = r / factor if factor else math.inf
    if math.isinf(r):
        text = "0"  # the tool prints (unsigned long long)inf, which is 0 on x86-64
    elif r == math.floor(r):
        text = str(int(r))
    else:
        text = ("%0.2e" if r - math.floor(r) < 1e-2 else "%0.2f") % r
    if mode == "full":
        return (f"thin_metadata_size - {text} {_UNIT_NAMES[out_unit]} estimated metadata area size for "
                f'"--block-size={s_block} --pool-size={s_pool} --max-thins={s_thins}"\n')
    if mode == "short":
        text += _UNIT_CHARS[out_unit]
    elif mode == "long":
        text += _UNIT_NAMES[out_unit]
    return text + "\n"
