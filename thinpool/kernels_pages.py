"""Numba kernels of the metadata pages: the block map's pack pages (metadata format 5, see
:mod:`thinpool.nodestore`) encoded in one compiled pass.

Pure functions over arrays.  :func:`encode_packs` writes every pack page one commit re-packs, header,
entries and padding, into rows of a caller's array; :func:`count_entries` counts the live entries of
the nodes a commit marked dirty.  :mod:`thinpool.nodestore` keeps the numpy encoder these replace (the
reference, and the path of a process that has not loaded numba: a commit needs only numpy); the two
produce the same bytes (``tests/engine/test_pack_encoder.py``).  The pages' CRC-32C stays with the
``crc32c`` package (hardware CRC: about 0.4 us per 4 KiB page called from Python, against 2 us for a
slice-by-8 table CRC compiled here).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import kernels_cache

_SOURCES_DIGEST = kernels_cache.sources_digest()

_BLOCK = 4096
_HEAD = 8
_MARK = 0xFFFF
_ONES = np.uint32(0xFFFFFFFF)


@njit(cache=True)
def _built_with():
    """The sources this module's cached code was compiled from (see :mod:`thinpool.kernels_cache`)."""
    return _SOURCES_DIGEST


@njit(cache=True)
def count_entries(words, k, rc, slots, dense, mark, out):
    """Per slot of ``slots``: -1 if the node holds no entry or its reference count in ``rc`` is 0
    (dead), ``mark`` if it holds more than ``dense`` entries, else its number of entries; into
    ``out``.  ``words``: the nodes as uint32 words, ``k`` words per entry (a hole: all ones)."""
    entries = words.shape[1] // k
    for i in range(len(slots)):
        s = slots[i]
        n = 0
        if rc[s] != 0:
            row = words[s]
            if k == 1:
                for j in range(entries):
                    n += row[j] != _ONES
            else:
                for j in range(entries):
                    n += (row[2 * j] & row[2 * j + 1]) != _ONES
        out[i] = -1 if n == 0 else (mark if n > dense else n)


@njit(cache=True)
def encode_packs(words, k, slots, counts, page_nrec, tag, out):
    """Pack pages into the rows of ``out`` (uint16, one 4 KiB row per page, every byte written): page
    ``p`` holds the records of the next ``page_nrec[p]`` slots of ``slots``, whose stored counts are
    ``counts`` (:data:`_MARK`: a dense node, no entries).  ``words``: the nodes as uint32 words in
    memory order, ``k`` per entry (1: an inner node's int32 child, 2: a leaf's uint64 mapping; a hole
    is all ones).  Layout: uint16 record count, uint16 entry count, uint32 ``tag``, the entries'
    values, the slots (uint32), the counts (uint16), the entries' indices (uint16).  Returns -1, or
    the index in ``slots`` of a record whose node does not hold ``counts`` entries (nothing of
    ``out`` is then to be trusted)."""
    entries = words.shape[1] // k
    r0 = 0
    for p in range(len(page_nrec)):
        page = out[p]
        nr = page_nrec[p]
        ne = 0
        for r in range(r0, r0 + nr):
            if counts[r] != _MARK:
                ne += counts[r]
        page[0] = nr
        page[1] = ne
        page[2] = tag & 0xFFFF
        page[3] = tag >> 16
        v = 4                        # in uint16 units from here on
        s16 = 4 + 2 * k * ne
        c16 = s16 + 2 * nr
        i16 = c16 + nr
        for r in range(r0, r0 + nr):
            s = slots[r]
            c = counts[r]
            page[s16] = s & 0xFFFF
            page[s16 + 1] = s >> 16
            page[c16] = c
            s16 += 2
            c16 += 1
            if c == _MARK:
                continue
            row = words[s]
            found = 0
            if k == 1:
                for j in range(entries):
                    x = row[j]
                    if x != _ONES:
                        found += 1
                        if found > c:
                            return r
                        page[v] = x & 0xFFFF
                        page[v + 1] = x >> 16
                        page[i16] = j
                        v += 2
                        i16 += 1
            else:
                for j in range(entries):
                    x = row[2 * j]
                    y = row[2 * j + 1]
                    if (x & y) != _ONES:
                        found += 1
                        if found > c:
                            return r
                        page[v] = x & 0xFFFF
                        page[v + 1] = x >> 16
                        page[v + 2] = y & 0xFFFF
                        page[v + 3] = y >> 16
                        page[i16] = j
                        v += 4
                        i16 += 1
            if found != c:
                return r
        for b in range(i16, _BLOCK // 2):
            page[b] = 0
        r0 += nr
    return -1


kernels_cache.check(globals(), _built_with)
