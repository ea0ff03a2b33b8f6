"""Numba kernels of the metadata pages: the block map's pack pages (metadata format 5, see
:mod:`thinpool.nodestore`) encoded in one compiled pass.

Pure functions over arrays.  :func:`encode_packs` writes every pack page one commit re-packs, header,
entries and padding, into rows of a caller's array; :func:`count_entries` counts the live entries of
the nodes a commit marked dirty; :func:`node_updates` does a commit's whole part for one kind of node
(counts, plan, pages, what is stored after) in one call.  :mod:`thinpool.nodestore` keeps the numpy encoder these replace (the
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
_REC = 6
_CAP = _BLOCK - _HEAD


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
def _sources(old, old_rows, k):
    """The records of the stored pack pages ``old[old_rows]``, sorted by slot: (slots, rows, offsets
    of their values and of their indices in uint16 units, counts)."""
    nsrc = 0
    for row in old_rows:
        nsrc += old[row, 0]
    slot = np.empty(nsrc, np.int64)
    where = np.empty((nsrc, 4), np.int64)
    t = 0
    for row in old_rows:
        pg = old[row]
        nr, ne = np.int64(pg[0]), np.int64(pg[1])
        s16 = 4 + 2 * k * ne
        c16 = s16 + 2 * nr
        v, i16 = np.int64(4), c16 + nr
        for r in range(nr):
            c = np.int64(pg[c16 + r])
            slot[t] = np.int64(pg[s16 + 2 * r]) | (np.int64(pg[s16 + 2 * r + 1]) << 16)
            where[t, 0], where[t, 1], where[t, 2], where[t, 3] = row, v, i16, c
            if c != _MARK:
                v += 2 * k * c
                i16 += c
            t += 1
    order = np.argsort(slot, kind="mergesort")
    return slot[order], where[order]


@njit(cache=True)
def encode_packs(words, k, slots, counts, page_nrec, tag, out, old, old_rows, changed):
    """Pack pages into the rows of ``out`` (uint16, one 4 KiB row per page, every byte written): page
    ``p`` holds the records of the next ``page_nrec[p]`` slots of ``slots``, whose stored counts are
    ``counts`` (:data:`_MARK`: a dense node, no entries).  ``words``: the nodes as uint32 words in
    memory order, ``k`` per entry (1: an inner node's int32 child, 2: a leaf's uint64 mapping; a hole
    is all ones).  Layout: uint16 record count, uint16 entry count, uint32 ``tag``, the entries'
    values, the slots (uint32), the counts (uint16), the entries' indices (uint16).  Returns -1, or
    the index in ``slots`` of a record whose node does not hold ``counts`` entries (nothing of
    ``out`` is then to be trusted).

    A record of a slot not in ``changed`` (sorted) whose node is unchanged since the pages ``old``
    (uint16 rows) ``old_rows`` were written is copied from there instead of read from its node (a
    re-packed page mostly holds records that did not change: the copy reads a few bytes where the
    node is 4 KiB)."""
    entries = words.shape[1] // k
    src_slot, src = _sources(old, old_rows, k)
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
            j = _after(src_slot, s) - 1
            if j >= 0 and src_slot[j] == s and src[j, 3] == c:
                h = _after(changed, s) - 1
                if h < 0 or changed[h] != s:
                    pg = old[src[j, 0]]
                    sv, si = src[j, 1], src[j, 2]
                    for q in range(2 * k * c):
                        page[v + q] = pg[sv + q]
                    for q in range(c):
                        page[i16 + q] = pg[si + q]
                    v += 2 * k * c
                    i16 += c
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


@njit(cache=True, inline="always")
def _after(a, x):
    """Index of the first element of sorted ``a`` greater than ``x`` (``searchsorted(a, x, "right")``)."""
    lo, hi = 0, len(a)
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, inline="always")
def _rec_bytes(c, wb):
    """Bytes of a record whose stored count is ``c`` (:data:`_MARK`: no entries), ``wb`` per entry."""
    return _REC + (0 if c == _MARK else wb * c)


@njit(cache=True)
def _cut(stored, recs, wb, edges_out):
    """``nodepacks._cut`` compiled: ``recs`` (slots) cut into pages; the cut points, from 0 to
    ``len(recs)``, into ``edges_out``; returns how many pieces."""
    n = len(recs)
    if n == 0:
        return 0
    cum = np.empty(n, np.int64)
    t = 0
    for i in range(n):
        t += _rec_bytes(stored[recs[i]], wb)
        cum[i] = t
    edges = [0]
    while edges[-1] < n:  # filled in order: the fewest pages
        base = cum[edges[-1] - 1] if edges[-1] else 0
        edges.append(_after(cum, base + _CAP))
    pieces = len(edges) - 1
    if pieces > 1:
        total = cum[n - 1]
        even = [0]
        for j in range(1, pieces):
            target = total * j / pieces
            bnd = _after(cum, target)  # records wholly below the target ...
            over = min(bnd, n - 1)
            below = cum[max(bnd - 1, 0)] if bnd > 0 else 0
            if (cum[over] - target) < (target - below):  # ... or one more, if nearer
                bnd += 1
            even.append(bnd)
        even.append(n)
        ok = True
        prev = 0
        for j in range(1, len(even)):
            if even[j] - even[j - 1] <= 0:
                ok = False
            c = cum[max(even[j] - 1, 0)]
            if c - prev > _CAP:
                ok = False
            prev = c
        if ok:
            edges = even
        elif total - cum[edges[-2] - 1] < _CAP // 2:  # a small last page: share with the one before
            lo = cum[edges[-3] - 1] if edges[-3] else 0
            mid = (lo + total) / 2
            cut = _after(cum, mid)
            if cut < n and cum[cut] - mid < mid - cum[cut - 1]:
                cut += 1
            if edges[-3] < cut < n and cum[cut - 1] - lo <= _CAP and total - cum[cut - 1] <= _CAP:
                edges[-2] = cut
    for j in range(len(edges)):
        edges_out[j] = edges[j]
    return len(edges) - 1


@njit(cache=True)
def plan_repack(stored, keys, pos, npages, changed, wb):
    """``nodepacks.repack``'s plan, compiled: which pack pages the records of the slots
    ``changed`` (sorted) go to.  ``stored``: every slot's new count (-1: no record); ``keys``/``pos``:
    the stored pages' lowest slots and places, in slot order; ``npages``: pages of the pack array;
    ``wb``: bytes per entry.  Returns (the pages' slots in order, records per page, each page's key,
    place and bytes, which stored pages are replaced (by index), the places released)."""
    n, k = len(stored), len(keys)
    # runs of consecutive stored pages holding the changed slots
    ra = [np.int64(0)] * 0
    rb = [np.int64(0)] * 0
    if len(changed):
        if k == 0:
            ra.append(0)
            rb.append(-1)
        else:
            last = -2
            for c in changed:
                pg = max(_after(keys, c) - 1, 0)
                if pg == last:
                    continue
                if len(ra) and pg == rb[-1] + 1:
                    rb[-1] = pg
                elif not len(ra) or pg > rb[-1]:
                    ra.append(pg)
                    rb.append(pg)
                last = pg
    # a run left under half a page takes in a neighbour (reaching another run merges the two)
    oa = [np.int64(0)] * 0
    ob = [np.int64(0)] * 0
    olo = [np.int64(0)] * 0
    ohi = [np.int64(0)] * 0
    i = 0
    while i < len(ra):
        a, b = ra[i], rb[i]
        lo = hi = 0
        while True:
            lo = 0 if a <= 0 else keys[a]
            hi = n if b + 1 >= k else keys[b + 1]
            size = 0
            for s in range(lo, hi):
                if stored[s] != -1:
                    size += _rec_bytes(stored[s], wb)
            if size >= _CAP // 2 or b - a + 1 >= k:
                break
            if b + 1 < k:
                b += 1
                if i + 1 < len(ra) and ra[i + 1] <= b + 1:  # reached the next run
                    b = max(b, rb[i + 1])
                    ra.pop(i + 1)
                    rb.pop(i + 1)
            elif a > 0:
                a -= 1
                if len(oa) and ob[-1] >= a - 1:  # reached the previous run
                    a = oa.pop()
                    ob.pop()
                    olo.pop()
                    ohi.pop()
            else:
                break
        oa.append(a)
        ob.append(b)
        olo.append(lo)
        ohi.append(hi)
        i += 1
    # cut every run into pages, reusing its pages' places first
    gone = np.zeros(k, np.bool_)
    nrecs = 0
    for r in range(len(oa)):
        if k:
            gone[max(oa[r], 0):ob[r] + 1] = True
        for s in range(olo[r], ohi[r]):
            if stored[s] != -1:
                nrecs += 1
    slots = np.empty(nrecs, np.int64)
    page_nrec = np.empty(nrecs, np.int64)
    new_keys = np.empty(nrecs, np.int64)
    new_pos = np.empty(nrecs, np.int64)
    new_size = np.empty(nrecs, np.int64)
    edges = np.empty(nrecs + 2, np.int64)
    released = [np.int64(0)] * 0
    free = np.zeros(0, np.int64)
    have_free = False
    next_free = 0
    next_new = npages
    npg = 0
    at = 0
    for r in range(len(oa)):
        start = at
        for s in range(olo[r], ohi[r]):
            if stored[s] != -1:
                slots[at] = s
                at += 1
        reuse = np.sort(pos[max(oa[r], 0):ob[r] + 1]) if k else np.zeros(0, np.int64)
        used = 0
        pieces = _cut(stored, slots[start:at], wb, edges)
        for q in range(pieces):
            if used < len(reuse):
                p = reuse[used]
                used += 1
            else:
                if not have_free:
                    unused = np.ones(npages, np.bool_)
                    unused[pos] = False
                    free = np.flatnonzero(unused)
                    have_free = True
                if next_free < len(free):
                    p = free[next_free]
                    next_free += 1
                else:
                    p = next_new
                    next_new += 1
            e0, e1 = start + edges[q], start + edges[q + 1]
            size = _HEAD
            for j in range(e0, e1):
                size += _rec_bytes(stored[slots[j]], wb)
            new_keys[npg] = slots[e0]
            new_pos[npg] = p
            new_size[npg] = size
            page_nrec[npg] = e1 - e0
            npg += 1
        for j in range(used, len(reuse)):
            released.append(reuse[j])
    return (slots, page_nrec[:npg], new_keys[:npg], new_pos[:npg], new_size[:npg], gone,
            np.array(released, np.int64) if len(released) else np.zeros(0, np.int64))



@njit(cache=True)
def node_updates(words, k, rc, dirty_flags, n, stored_old, dense, mark, keys, pos, size, npages, wb, tag, old):
    """One commit's pages of one kind of node in one call (what :meth:`thinpool.nodestore.NodeDisk.updates`
    computes with :func:`count_entries`, :func:`plan_repack` and :func:`encode_packs` one by one: the
    same pages): the slots flagged in ``dirty_flags[:n]`` counted against ``rc``, their records
    re-packed.  ``stored_old``/``keys``/``pos``/``size``/``npages``: what the last commit stored;
    ``old``: its pack pages (uint16 rows).

    Returns (``stored``: every slot's new count, int32; the re-packed pages, uint16 rows; ``meta``,
    int64: the index in the pages' slots of a record out of step with its node or -1, that slot, then
    the numbers of pages, dense pages written, dense pages dropped, pack places released, stored
    pages, then the pack array's pages, followed by those lists in that order and the new keys,
    places and sizes).  One call returns three arrays where the three kernels returned eleven:
    boxing an array for Python costs about a microsecond."""
    nd = 0
    for s in range(n):
        if dirty_flags[s]:
            nd += 1
    dirty = np.empty(nd, np.int64)
    j = 0
    for s in range(n):
        if dirty_flags[s]:
            dirty[j] = s
            j += 1
    stored = np.full(n, -1, np.int32)
    for s in range(min(n, len(stored_old))):
        stored[s] = stored_old[s]
    new = np.empty(nd, np.int32)
    count_entries(words, k, rc, dirty, dense, mark, new)
    nown = ndead = nch = 0
    own = np.empty(nd, np.int64)
    dead_own = np.empty(nd, np.int64)
    changed = np.empty(nd, np.int64)
    for i in range(nd):
        d, w = dirty[i], new[i]
        o = stored[d]
        stored[d] = w
        if w == mark:
            own[nown] = d
            nown += 1
        elif o == mark:
            dead_own[ndead] = d
            ndead += 1
        if not (o == w and (o == mark or o == -1)):
            changed[nch] = d
            nch += 1
    changed = changed[:nch]
    slots, nrec, new_keys, new_pos, new_size, gone, released = plan_repack(stored, keys, pos, npages, changed, wb)
    npg = len(nrec)
    out = np.empty((npg, _BLOCK // 2), np.uint16)
    bad = -1
    if npg:
        counts = np.empty(len(slots), np.int64)
        for i in range(len(slots)):
            counts[i] = stored[slots[i]]
        nold = 0
        for i in range(len(gone)):
            nold += gone[i]
        old_rows = np.empty(nold, np.int64)
        j = 0
        for i in range(len(gone)):
            if gone[i]:
                old_rows[j] = pos[i]
                j += 1
        bad = encode_packs(words, k, slots, counts, nrec, tag, out, old, old_rows, changed)
    # what is stored after: the pages kept and the new ones, in slot order
    nk = 0
    for i in range(len(gone)):
        nk += not gone[i]
    nk += npg
    mk = np.empty(nk, np.int64)
    mp = np.empty(nk, np.int64)
    ms = np.empty(nk, np.int64)
    j = 0
    for i in range(len(gone)):
        if not gone[i]:
            mk[j], mp[j], ms[j] = keys[i], pos[i], size[i]
            j += 1
    for i in range(npg):
        mk[j], mp[j], ms[j] = new_keys[i], new_pos[i], new_size[i]
        j += 1
    ordered = True
    for i in range(1, nk):
        if mk[i] <= mk[i - 1]:
            ordered = False
            break
    if not ordered:
        order = np.argsort(mk, kind="mergesort")
        mk, mp, ms = mk[order], mp[order], ms[order]
    after = 0
    for i in range(nk):
        after = max(after, mp[i] + 1)
    nrel = 0
    for r in released:
        nrel += r < after
    meta = np.empty(8 + nown + ndead + npg + nrel + 3 * nk, np.int64)
    meta[0] = bad
    meta[1] = slots[bad] if bad >= 0 else -1
    meta[2], meta[3], meta[4], meta[5], meta[6], meta[7] = npg, nown, ndead, nrel, nk, after
    j = 8
    for i in range(nown):
        meta[j] = own[i]
        j += 1
    for i in range(ndead):
        meta[j] = dead_own[i]
        j += 1
    for i in range(npg):
        meta[j] = new_pos[i]
        j += 1
    for r in released:
        if r < after:
            meta[j] = r
            j += 1
    meta[j:j + nk] = mk
    meta[j + nk:j + 2 * nk] = mp
    meta[j + 2 * nk:j + 3 * nk] = ms
    return stored, out, meta


kernels_cache.check(globals(), _built_with)
