"""What ``thin_delta`` 0.9.0 prints, from the IR: the differences between two devices' mappings.

:func:`delta` returns the records (JSON-able), :func:`format_delta` the tool's text (brief or
``--verbose``) byte for byte.  Work over mappings is vectorized with numpy.  Error messages are the
tool's own texts.
"""

from __future__ import annotations

import numpy as np

from ..errors import NotFound
from .ir import Device, Metadata
from .xml import mapping_runs

__all__ = ["delta", "format_delta"]


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
        assert prev is not None, "kind is not empty: its first range set prev"
        lines.append(f"    </{_KINDS[prev]}>\n")
    lines.append("  </diff>\n</superblock>\n")
    return "".join(lines)
