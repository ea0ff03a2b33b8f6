"""What ``thin_rmap`` 0.9.0 prints, from the IR: data-block regions mapped back to devices.

:func:`parse_region` reads a ``--region BEGIN..END`` argument as the tool does, :func:`rmap` returns
the records (JSON-able, in the order the tool's libstdc++ sort leaves them), :func:`format_rmap` the
tool's text byte for byte.  Error messages are the tool's own texts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidArgument
from .ir import Metadata

__all__ = ["rmap", "format_rmap", "parse_region"]

_U64 = (1 << 64) - 1   # the tool's unsigned 64-bit arithmetic wraps modulo 2^64


_NUMBER_RE = re.compile(r"\s*([+-]?)(\d+)")


def _istream_u64(text: str, pos: int) -> tuple[int | None, int]:
    """``istream >> uint64_t`` at *pos*: (value or None on failure, position after it).

    Blanks are skipped and a sign is allowed; a minus wraps modulo 2^64 as libstdc++ does.
    """
    m = _NUMBER_RE.match(text, pos)
    # more than 20 significant digits is past 2^64 (checked before int(): Python refuses to convert
    # a number of more than 4,300 digits at all)
    if not m or len(m.group(2).lstrip("0")) > 20 or int(m.group(2)) > _U64:
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
