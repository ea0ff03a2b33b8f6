"""Numba kernels of the I/O path: write and read batches, discards, and the single-I/O entry
points over the kernel table -- pure functions over numpy arrays.

Nothing here knows about files, names or transactions on disk.  The caller (``pool.py`` /
``thin.py``) passes the block map (``nodes``), the data space map (``space``), the state vector
``st``, a device record and the data device's file descriptor (data moves with pread/pwrite: the
data file is never memory-mapped, so a file truncated under the pool is an error code, never
SIGBUS); the block-map and allocation kernels these use are :mod:`thinpool.kernels_map` (the tuples
are described there).
Cached kernels here call kernels of that module: see :mod:`thinpool.kernels_cache`.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic

from . import kernels_cache
from .kernels_map import (UNMAPPED, alloc_data_block, copy_bytes, dec_data, dec_data_passdown, fill_bytes, lookup,
                          mapping_block, needs_new_block, pack_mapping, take_stale, unallocate_data_block,
                          writable_leaf)
from .schema import (DEV_FLAGS, DEV_MAPPED, DEV_ROOT, DEV_SIZE, DEV_SNAP_TIME, FLAG_READ_ONLY, INNER_BITS,
                     INNER_ENTRIES, IO_ERROR, KROW_COUNT, KROW_DATA_RC, KROW_FREED_TXN, KROW_INNER_DIRTY,
                     KROW_INNER_FREE, KROW_INNER_RC, KROW_INNER_RC_DIRTY, KROW_INNERS, KROW_LEAF_DIRTY,
                     KROW_LEAF_FREE, KROW_LEAF_RC, KROW_LEAF_RC_DIRTY, KROW_LEAVES, KROW_RC_DIRTY, KROW_SCRATCH,
                     KROW_ST, LEAF_BITS, LEAF_ENTRIES, NEED_NODES, NO_SPACE, NONE, OK, ST_BLOCK_SIZE, ST_INNER_FREE,
                     ST_COW_BREAKS, ST_COW_PARTIAL, ST_LEAF_FREE, ST_NR_ALLOCATABLE, ST_PROVISIONED,
                     ST_PROVISIONED_PARTIAL, ST_SIZE, ST_TIME, ST_ZERO_NEW, ST_DISCARD_PASSDOWN, ST_EPOCH)

# libc's pwrite/pread, resolved by symbol name at link time (so cache=True still works): data writes
# go to the data file with one system call per block segment instead of faulting mmap pages in.
c_pwrite = types.ExternalFunction("pwrite", types.intp(types.int32, types.voidptr, types.uintp, types.int64))
c_pread = types.ExternalFunction("pread", types.intp(types.int32, types.voidptr, types.uintp, types.int64))
c_lseek = types.ExternalFunction("lseek", types.int64(types.int32, types.int64, types.int32))
_SEEK_END = 2

#: write_one's answer for an I/O it leaves to the caller's general path (out of range, read-only)
NOT_HANDLED = -100
#: read_one_pread's answer when the data file ended before a mapped block's bytes (a truncated file)
END_OF_FILE = -101
#: a read of the external origin failed (errno left set) or found the file shorter than recorded
ORIGIN_ERROR = -102
#: locate's answer for a read inside one unmapped block (it reads as zeroes without an external origin)
HOLE = -103
#: the per-call entries' answer (:func:`write_bytes`, :func:`locate_read`) when the kernel table they
#: were handed is out of date -- an array was reallocated since it was built (``st[ST_EPOCH]`` moved):
#: nothing done, the caller's general path builds the table again
STALE_TABLE = -104

_SOURCES_DIGEST = kernels_cache.sources_digest()


@njit(cache=True)
def _built_with():
    """The sources this module's cached code was compiled from (see :mod:`thinpool.kernels_cache`)."""
    return _SOURCES_DIGEST


# --------------------------------------------------------------------------- data-file writes

@njit(cache=True)
def pwrite_all(fd, arr, start, n, off):
    """Write ``arr[start:start+n]`` at file offset ``off``: a short count continues with the rest; a
    count of 0 or -1 (errno left set for the caller) returns False.  True when all ``n`` are written.
    A write that took more than one call is read back and compared, and written again once if it
    differs (a layer that reports bytes it did not store); a second mismatch returns False."""
    for attempt in range(2):
        done = 0
        calls = 0
        while done < n:
            w = c_pwrite(fd, arr[start + done:].ctypes.data, n - done, off + done)
            if w <= 0:
                return False
            done += w
            calls += 1
        if calls <= 1:
            return True
        back = np.empty(n, np.uint8)
        if c_pread(fd, back.ctypes.data, n, off) == n:
            same = True
            for i in range(n):
                if back[i] != arr[start + i]:
                    same = False
                    break
            if same:
                return True
    return False


# --------------------------------------------------------------------------- I/O batches

@njit(cache=True)
def count_segments(offsets, lengths, bs):
    n = 0
    for i in range(offsets.shape[0]):
        if lengths[i] > 0:
            n += (offsets[i] + lengths[i] - 1) // bs - offsets[i] // bs + 1
    return n


@njit(cache=True)
def blocks_needed(nodes, dev, offsets, lengths, bs):
    """Distinct virtual blocks of a write batch that need a new data block (unmapped, or shared by
    the time rule).  Computed before anything changes so a batch that cannot fit changes nothing."""
    nseg = count_segments(offsets, lengths, bs)
    need = np.empty(nseg, np.int64)
    k = 0
    root = dev[DEV_ROOT]
    snap_time = dev[DEV_SNAP_TIME]
    for i in range(offsets.shape[0]):
        if lengths[i] <= 0:
            continue
        first = offsets[i] // bs
        last = (offsets[i] + lengths[i] - 1) // bs
        for vb in range(first, last + 1):
            v, path_shared = lookup(nodes, root, vb)
            if needs_new_block(v, path_shared, snap_time):
                need[k] = vb
                k += 1
    if k <= 1:
        return k
    s = np.sort(need[:k])
    distinct = 1
    for i in range(1, k):
        if s[i] != s[i - 1]:
            distinct += 1
    return distinct


@njit(cache=True)
def write_batch(nodes, space, st, dev, fd, tmp, offsets, lengths, buf, buf_starts, start, ofd, osize):
    """Write I/Os ``start..`` of a batch to the data file ``fd``.  Returns (code, next_io, need).
    ``ofd``/``osize``: the device's external origin (fd -1: none; see :func:`write_span`).

    ``dev`` is the device's record (int64 row: root and mapped count are updated in place); ``tmp``
    a scratch buffer of one block.  When ``start`` is 0 the batch's data-block need is counted
    first (:func:`blocks_needed`); if fewer blocks are allocatable the code is NO_SPACE and nothing
    has changed.  NEED_NODES: the node store must grow before I/O ``next_io`` is retried (the I/Os
    before it are complete); IO_ERROR: a data-file write failed at I/O ``next_io`` (earlier I/Os
    are complete, the failed block is not mapped).
    Per block: mapped and unshared -> write in place; unmapped -> allocate and write (a never-used
    block is a hole, so the rest reads zero; a reused one that may hold old bytes is written whole,
    zeroes around the data, when ``st[ST_ZERO_NEW]`` -- dm-thin's zeroing of new blocks -- else its
    old bytes show through, as with dm-thin's skip_block_zeroing); shared (time rule) -> allocate,
    copy the whole old block unless the write covers it, then write; the old block loses one reference.
    """
    bs = st[ST_BLOCK_SIZE]
    need = 0
    if start == 0:
        need = blocks_needed(nodes, dev, offsets, lengths, bs)
        if need > st[ST_NR_ALLOCATABLE]:
            return NO_SPACE, 0, need
    for i in range(start, offsets.shape[0]):
        off = offsets[i]
        remaining = lengths[i]
        if remaining <= 0:
            continue
        nblk = (off + remaining - 1) // bs - off // bs + 1
        if st[ST_INNER_FREE] < 2 * nblk + 1 or st[ST_LEAF_FREE] < nblk:
            return NEED_NODES, i, need
        code = write_span(nodes, space, st, dev, fd, tmp, off, remaining, buf, buf_starts[i], bs, ofd, osize)
        if code != OK:
            return code, i, need
    return OK, offsets.shape[0], need


@njit(cache=True, inline="always")
def write_span(nodes, space, st, dev, fd, tmp, off, remaining, buf, src, bs, ofd, osize):
    """Write ``remaining`` bytes of ``buf[src:]`` at virtual byte ``off``, block by block (see
    :func:`write_batch`; node room must have been checked).  Returns OK, IO_ERROR or
    :data:`ORIGIN_ERROR` (blocks before the failed one are complete, the failed block is not mapped).
    ``ofd`` >= 0: the device's external origin, ``osize`` bytes long -- a partial write to an unmapped
    block first copies the block from the origin (dm-thin's ``schedule_external_copy``: the part
    inside the origin, zeroes past its end -- under skip_block_zeroing a reused block keeps its old
    bytes there, as ``schedule_copy`` zeroes the tail only when zeroing) and writes the block; a block wholly past the
    origin's end is provisioned as without an origin.  ``fd`` -1 (a metadata-only pool):
    the mappings change exactly as with a data file, but no byte is read or written (``buf`` unused).
    Counts first writes and copy-on-write breaks in ``st`` (``ST_PROVISIONED``, ``ST_COW_BREAKS`` and
    their partial-block parts)."""
    leaves, leaf_dirty = nodes[0], nodes[4]
    snap_time = dev[DEV_SNAP_TIME]
    now = st[ST_TIME]
    while remaining > 0:
        vb = off // bs
        inblk = off - vb * bs
        seg = min(remaining, bs - inblk)
        v, path_shared = lookup(nodes, dev[DEV_ROOT], vb)
        if not needs_new_block(v, path_shared, snap_time):
            d = mapping_block(v)
            if fd >= 0 and not pwrite_all(fd, buf, src, seg, d * bs + inblk):
                return IO_ERROR
        else:
            leaf = writable_leaf(nodes, space, st, dev, vb)
            li = vb & (LEAF_ENTRIES - 1)
            v = leaves[leaf, li]  # re-read: shadowing may have moved the path
            d = alloc_data_block(space, st)
            stale = take_stale(space, d)
            ok = True
            if fd < 0:
                pass
            elif v == UNMAPPED and ofd >= 0 and seg != bs and vb * bs < osize:
                # copy-on-write from the external origin: origin bytes + this write, one block-sized write
                n = min(bs, osize - vb * bs)
                if pread_all(ofd, tmp, 0, n, vb * bs) != OK:
                    unallocate_data_block(space, st, d)
                    return ORIGIN_ERROR
                if n < bs and stale and st[ST_ZERO_NEW] == 0:
                    # skip_block_zeroing: only the origin's part is copied (schedule_copy zeroes the
                    # tail only when zeroing new blocks); the rest of a reused block keeps its bytes
                    ok = pwrite_all(fd, tmp, 0, n, d * bs) and pwrite_all(fd, buf, src, seg, d * bs + inblk)
                else:
                    if n < bs:
                        fill_bytes(tmp, n, bs - n, 0)
                    copy_bytes(tmp, inblk, buf, src, seg)
                    ok = pwrite_all(fd, tmp, 0, bs, d * bs)
            elif v != UNMAPPED and seg != bs:
                # break sharing: old block + this write merged in memory, one block-sized write
                old = mapping_block(v)
                ok = c_pread(fd, tmp.ctypes.data, bs, old * bs) == bs
                if ok:
                    copy_bytes(tmp, inblk, buf, src, seg)
                    ok = pwrite_all(fd, tmp, 0, bs, d * bs)
            elif stale and seg != bs and st[ST_ZERO_NEW] != 0:
                # a reused block holding old bytes: zeroes + this write, one block-sized write
                fill_bytes(tmp, 0, bs, 0)
                copy_bytes(tmp, inblk, buf, src, seg)
                ok = pwrite_all(fd, tmp, 0, bs, d * bs)
            else:
                ok = pwrite_all(fd, buf, src, seg, d * bs + inblk)
            if not ok:
                unallocate_data_block(space, st, d)  # not mapped; may hold part of this write
                return IO_ERROR
            if v != UNMAPPED:
                dec_data(space, st, mapping_block(v))
                st[ST_COW_BREAKS] += 1
                if seg != bs:
                    st[ST_COW_PARTIAL] += 1
            else:
                dev[DEV_MAPPED] += 1
                st[ST_PROVISIONED] += 1
                if seg != bs:
                    st[ST_PROVISIONED_PARTIAL] += 1
            leaves[leaf, li] = pack_mapping(d, now)
            leaf_dirty[leaf] = 1
        off += seg
        src += seg
        remaining -= seg
    return OK


@njit(cache=True, inline="always")
def read_hole(out, dst, seg, off, ofd, osize):
    """Fill ``out[dst:dst+seg]`` for an unmapped range at virtual byte ``off``: the external origin's
    bytes where it has them (``ofd`` >= 0, ``osize`` bytes long), zeroes elsewhere.  OK or
    :data:`ORIGIN_ERROR`."""
    n = 0
    if ofd >= 0 and off < osize:
        n = min(seg, osize - off)
        if pread_all(ofd, out, dst, n, off) != OK:
            return ORIGIN_ERROR
    if n < seg:
        fill_bytes(out, dst + n, seg - n, 0)
    return OK


@njit(cache=True, inline="always")
def read_span(nodes, root, fd, bs, off, remaining, out, dst, ofd, osize):
    """Copy ``remaining`` bytes at virtual byte ``off`` into ``out[dst:]`` with pread(2) from the data
    file ``fd`` (never through a memory map: a media error or a file truncated under the pool is an
    error code, not SIGBUS); mapped blocks that follow each other in the data file are read with one
    call.  Holes read as zeroes, or from the external origin ``ofd`` (see :func:`read_hole`; -1: none);
    ``fd`` -1 -- a metadata-only pool -- reads zeroes everywhere.  Returns (code, file offset): OK, or
    IO_ERROR / :data:`END_OF_FILE` with the data file's byte offset of the read that failed, or
    :data:`ORIGIN_ERROR` with the origin's (``out`` is then partly filled)."""
    run_pos = 0  # a pending run of mapped bytes: data-file offset, destination, length
    run_dst = 0
    run_len = 0
    while remaining > 0:
        vb = off // bs
        inblk = off - vb * bs
        seg = min(remaining, bs - inblk)
        v, _ = lookup(nodes, root, vb)
        if fd < 0:
            fill_bytes(out, dst, seg, 0)
        elif v == UNMAPPED:
            if ofd < 0:
                fill_bytes(out, dst, seg, 0)
            elif read_hole(out, dst, seg, off, ofd, osize) != OK:
                return ORIGIN_ERROR, off
        else:
            pos = mapping_block(v) * bs + inblk
            if run_len and pos == run_pos + run_len and dst == run_dst + run_len:
                run_len += seg
            else:
                if run_len:
                    code = pread_all(fd, out, run_dst, run_len, run_pos)
                    if code != OK:
                        return code, run_pos
                run_pos, run_dst, run_len = pos, dst, seg
        off += seg
        dst += seg
        remaining -= seg
    if run_len:
        code = pread_all(fd, out, run_dst, run_len, run_pos)
        if code != OK:
            return code, run_pos
    return OK, 0


@njit(cache=True, inline="always")
def pread_all(fd, out, dst, n, off):
    """Read ``n`` bytes at file offset ``off`` into ``out[dst:]`` with pread(2), continuing after a
    short count.  Returns OK, IO_ERROR (a count of -1: errno left set for the caller) or
    :data:`END_OF_FILE` (a count of 0: the file ends before ``off + n``)."""
    done = 0
    while done < n:
        r = c_pread(fd, out[dst + done:].ctypes.data, n - done, off + done)
        if r < 0:
            return IO_ERROR
        if r == 0:
            return END_OF_FILE
        done += r
    return OK


@njit(cache=True)
def read_one_pread(tab, devs, slot, fd, out, offset, ofd, osize):
    """One read of ``len(out)`` bytes at ``offset`` of the device in row ``slot`` of ``devs`` (node
    arrays from ``tab``), mapped data copied from the data file ``fd`` with pread(2) (see
    :func:`read_span`: a media error or a truncated file is an error code, never SIGBUS).  Returns
    (code, file_offset): OK, or IO_ERROR / :data:`END_OF_FILE` with the data-file byte offset of the
    read that failed, or :data:`ORIGIN_ERROR` with the origin's byte offset (``out`` is then partly
    filled).  Unmapped blocks read from the external origin ``ofd`` (-1: none)."""
    nodes = _table_nodes(tab)
    st = _table_st(tab)
    return read_span(nodes, devs[slot, DEV_ROOT], fd, st[ST_BLOCK_SIZE], offset, out.shape[0], out, 0, ofd, osize)


@njit(cache=True)
def read_batch(nodes, root, fd, bs, offsets, lengths, out, out_starts, ofd, osize):
    """Read a batch with pread(2) from the data file ``fd`` (see :func:`read_span`): holes read as
    zeroes or from the external origin ``ofd`` (-1: none).  Returns (code, index of the read that
    failed, its file offset as :func:`read_span` gives it)."""
    for i in range(offsets.shape[0]):
        code, pos = read_span(nodes, root, fd, bs, offsets[i], lengths[i], out, out_starts[i], ofd, osize)
        if code != OK:
            return code, i, pos
    return OK, offsets.shape[0], 0


@njit(cache=True)
def discard_range(nodes, space, st, dev, first, last):
    """Unmap virtual blocks ``first..last-1`` (whole blocks only).  Returns (code, next_vb).  With
    ``st[ST_DISCARD_PASSDOWN]`` a data block this frees is passed down: marked to be hole-punched when
    released (dm-thin's discard passdown; a block still shared is not freed, so not punched); without
    it the block keeps its bytes like any freed block (``no_discard_passdown``)."""
    passdown = st[ST_DISCARD_PASSDOWN] != 0
    leaves, inners, leaf_dirty = nodes[0], nodes[1], nodes[4]
    vb = first
    span_mid = 1 << (LEAF_BITS + INNER_BITS)
    span_leaf = 1 << LEAF_BITS
    while vb < last:
        root = dev[DEV_ROOT]
        mid = inners[root, vb >> (LEAF_BITS + INNER_BITS)]
        if mid == NONE:
            vb = (vb // span_mid + 1) * span_mid
            continue
        leaf = inners[mid, (vb >> LEAF_BITS) & (INNER_ENTRIES - 1)]
        if leaf == NONE:
            vb = (vb // span_leaf + 1) * span_leaf
            continue
        # any mapping left in this leaf inside the range?
        end = min(last, (vb // span_leaf + 1) * span_leaf)
        found = False
        for x in range(vb, end):
            if leaves[leaf, x & (span_leaf - 1)] != UNMAPPED:
                found = True
                break
        if not found:
            vb = end
            continue
        if st[ST_INNER_FREE] < 3 or st[ST_LEAF_FREE] < 1:
            return NEED_NODES, vb
        leaf = writable_leaf(nodes, space, st, dev, vb)
        for x in range(vb, end):
            li = x & (span_leaf - 1)
            v = leaves[leaf, li]
            if v != UNMAPPED:
                leaves[leaf, li] = UNMAPPED
                if passdown:
                    dec_data_passdown(space, st, mapping_block(v))
                else:
                    dec_data(space, st, mapping_block(v))
                dev[DEV_MAPPED] -= 1
        leaf_dirty[leaf] = 1
        vb = end
    return OK, last


# --------------------------------------------------------------------------- single-I/O entry point
# Passing twenty arrays costs ~5 us of argument unboxing per call; the per-call write path passes
# one table of (address, length) rows instead, one row per array in the order of schema.KRow (the
# pool packs it by row name and keeps the arrays alive), and the views are rebuilt here for free.

@intrinsic
def _address(typingctx, addr):
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return sig, codegen


@njit(cache=True, inline="always")
def _table_nodes(tab):
    """The ``nodes`` tuple (its order: :data:`thinpool.schema.NODE_ROWS`) from a kernel table."""
    return (carray(_address(tab[KROW_LEAVES, 0]), (tab[KROW_LEAVES, 1], LEAF_ENTRIES), np.uint64),
            carray(_address(tab[KROW_INNERS, 0]), (tab[KROW_INNERS, 1], INNER_ENTRIES), np.int32),
            carray(_address(tab[KROW_LEAF_RC, 0]), (tab[KROW_LEAF_RC, 1],), np.uint32),
            carray(_address(tab[KROW_INNER_RC, 0]), (tab[KROW_INNER_RC, 1],), np.uint32),
            carray(_address(tab[KROW_LEAF_DIRTY, 0]), (tab[KROW_LEAF_DIRTY, 1],), np.uint8),
            carray(_address(tab[KROW_INNER_DIRTY, 0]), (tab[KROW_INNER_DIRTY, 1],), np.uint8),
            carray(_address(tab[KROW_LEAF_RC_DIRTY, 0]), (tab[KROW_LEAF_RC_DIRTY, 1],), np.uint8),
            carray(_address(tab[KROW_INNER_RC_DIRTY, 0]), (tab[KROW_INNER_RC_DIRTY, 1],), np.uint8),
            carray(_address(tab[KROW_LEAF_FREE, 0]), (tab[KROW_LEAF_FREE, 1],), np.int32),
            carray(_address(tab[KROW_INNER_FREE, 0]), (tab[KROW_INNER_FREE, 1],), np.int32))


@njit(cache=True, inline="always")
def _table_space(tab):
    """The ``space`` tuple (its order: :data:`thinpool.schema.SPACE_ROWS`) from a kernel table."""
    return (carray(_address(tab[KROW_DATA_RC, 0]), (tab[KROW_DATA_RC, 1],), np.uint32),
            carray(_address(tab[KROW_FREED_TXN, 0]), (tab[KROW_FREED_TXN, 1],), np.uint8),
            carray(_address(tab[KROW_RC_DIRTY, 0]), (tab[KROW_RC_DIRTY, 1],), np.uint8))


@njit(cache=True, inline="always")
def _table_st(tab):
    return carray(_address(tab[KROW_ST, 0]), (ST_SIZE,), np.int64)


@njit(cache=True, inline="always")
def _table_scratch(tab):
    return carray(_address(tab[KROW_SCRATCH, 0]), (tab[KROW_SCRATCH, 1],), np.uint8)


@njit(cache=True, inline="always")
def _put(out, row, a):
    out[row, 0] = a.ctypes.data
    out[row, 1] = a.shape[0]


@njit(cache=True)
def table_addresses(tab):
    """``(address, length)`` of each array as the kernels decode a table, in the row of the array's
    name (the decoding half of the row contract, for tests/engine/test_schema.py)."""
    nodes, space = _table_nodes(tab), _table_space(tab)
    out = np.full((KROW_COUNT, 2), -1, np.int64)
    _put(out, KROW_LEAVES, nodes[0])
    _put(out, KROW_INNERS, nodes[1])
    _put(out, KROW_LEAF_RC, nodes[2])
    _put(out, KROW_INNER_RC, nodes[3])
    _put(out, KROW_LEAF_DIRTY, nodes[4])
    _put(out, KROW_INNER_DIRTY, nodes[5])
    _put(out, KROW_LEAF_RC_DIRTY, nodes[6])
    _put(out, KROW_INNER_RC_DIRTY, nodes[7])
    _put(out, KROW_LEAF_FREE, nodes[8])
    _put(out, KROW_INNER_FREE, nodes[9])
    _put(out, KROW_DATA_RC, space[0])
    _put(out, KROW_FREED_TXN, space[1])
    _put(out, KROW_RC_DIRTY, space[2])
    _put(out, KROW_ST, _table_st(tab))
    _put(out, KROW_SCRATCH, _table_scratch(tab))
    return out


@njit(cache=True)
def write_one(tab, devs, slot, buf, fd, offset, ofd, osize):
    """:func:`write_batch` for one I/O of ``len(buf)`` bytes at ``offset`` (>= 0); the pool's arrays
    come from ``tab`` (one row per array: :class:`thinpool.schema.KRow`).
    The device is row ``slot`` of the device records ``devs`` (indexing here is cheaper than passing
    the row).  Returns (code, need); code NOT_HANDLED (nothing done) when the I/O goes past the device's
    end or the device is read-only -- the caller's general path reports those."""
    dev = devs[slot]
    n = buf.shape[0]
    if offset + n > dev[DEV_SIZE] or dev[DEV_FLAGS] & FLAG_READ_ONLY:
        return NOT_HANDLED, 0
    if n <= 0:
        return OK, 0
    nodes = _table_nodes(tab)
    st = _table_st(tab)
    bs = st[ST_BLOCK_SIZE]
    first = offset // bs
    nblk = (offset + n - 1) // bs - first + 1
    root = dev[DEV_ROOT]
    snap_time = dev[DEV_SNAP_TIME]
    need = 0
    for vb in range(first, first + nblk):
        v, path_shared = lookup(nodes, root, vb)
        if needs_new_block(v, path_shared, snap_time):
            need += 1
    if need > st[ST_NR_ALLOCATABLE]:
        return NO_SPACE, need
    if st[ST_INNER_FREE] < 2 * nblk + 1 or st[ST_LEAF_FREE] < nblk:
        return NEED_NODES, need
    return write_span(nodes, _table_space(tab), st, dev, fd, _table_scratch(tab), offset, n, buf, 0, bs, ofd,
                      osize), need


#: the array type of a ``bytes`` object's bytes (``np.frombuffer(b"", np.uint8)``), which
#: :func:`write_bytes` hands to :func:`write_one`
_READ_ONLY_BYTES = types.Array(types.uint8, 1, "C", readonly=True)


@intrinsic
def _bytes_array(typingctx, data):
    """A ``bytes`` object (numba's ``Bytes``) as the read-only uint8 array of its bytes, without a
    copy: both types have the same native layout (numba's array model), so the value is the same."""
    if not isinstance(data, types.Bytes) or data.dtype != types.uint8 or data.ndim != 1 or data.layout != "C":
        return None
    sig = _READ_ONLY_BYTES(data)

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, signature.return_type, args[0])
    return sig, codegen


@njit(cache=True)
def write_bytes(tab, epoch, devs, slot, data, fd, offset, ofd, osize):
    """:func:`write_one` of a ``bytes`` object passed as it is, for the per-call ``Thin.write``: no
    array is made of the bytes in Python (``np.frombuffer``: 0.3 us a call), and the code that runs is
    :func:`write_one`'s for read-only uint8 arrays (the same as for a read-only array's bytes: one
    compiled write path for both), after :func:`locate` found no block to write in place.  ``epoch``: ``st[ST_EPOCH]`` when ``tab`` was built -- if it
    moved since (an array was reallocated), nothing is done and the answer is :data:`STALE_TABLE`.
    Returns the data blocks the write allocated (>= 0: it is done) or write_one's negative code
    (NEED_NODES, NO_SPACE, IO_ERROR, ORIGIN_ERROR, NOT_HANDLED: the caller's general path acts)."""
    if _table_st(tab)[ST_EPOCH] != epoch:
        return STALE_TABLE
    buf = _bytes_array(data)
    n = len(buf)
    # an overwrite of one provisioned, unshared block first (the common case): one lookup and the
    # write in place -- what write_one does for it, without its block count and second lookup; a
    # failed write is written again by write_one, which reports it
    pos = locate(tab, devs, slot, offset, n, True)
    if pos >= 0 and (fd < 0 or pwrite_all(fd, buf, 0, n, pos)):
        return 0
    code, need = write_one(tab, devs, slot, buf, fd, offset, ofd, osize)
    return need if code == OK else code


@njit(cache=True)
def locate(tab, devs, slot, offset, n, write):
    """Where ``n`` (> 0) bytes at ``offset`` of the device in row ``slot`` of ``devs`` are in the data
    file, when they lie inside the device and inside one virtual block: its byte offset if the block is
    mapped -- for a ``write``, only if the device is writable and the block may be written in place
    (unshared by dm-thin's time rule, on an unshared path: no new block needed) -- :data:`HOLE` for a
    read of an unmapped block, else :data:`NOT_HANDLED` (the caller's general path decides).  Changes
    nothing: the per-call fast paths of :mod:`thinpool.thin` do the I/O on the returned offset."""
    dev = devs[slot]
    if offset < 0 or n <= 0 or offset + n > dev[DEV_SIZE]:
        return NOT_HANDLED
    bs = _table_st(tab)[ST_BLOCK_SIZE]
    vb = offset // bs
    inblk = offset - vb * bs
    if inblk + n > bs:
        return NOT_HANDLED
    v, path_shared = lookup(_table_nodes(tab), dev[DEV_ROOT], vb)
    if write:
        if dev[DEV_FLAGS] & FLAG_READ_ONLY or needs_new_block(v, path_shared, dev[DEV_SNAP_TIME]):
            return NOT_HANDLED
    elif v == UNMAPPED:
        return HOLE
    return mapping_block(v) * bs + inblk


@njit(cache=True)
def locate_read(tab, epoch, devs, slot, offset, n, fd):
    """:func:`locate` for a read whose bytes the caller then takes from the data file's memory map:
    the same answers, except that a mapped range the data file ``fd`` no longer holds (the file is
    shorter than its end: truncated under the pool by another program) is :data:`END_OF_FILE`
    instead of its offset -- the caller then reads with pread(2), which reports the error, where
    the map would raise SIGBUS.  One lseek(2) per mapped read; none when ``fd`` is -1 (the caller's
    map is watched by :mod:`thinpool.faultguard`, which counts such a fault instead).  ``epoch``: as
    :func:`write_bytes`' (:data:`STALE_TABLE` when ``tab`` is out of date)."""
    if _table_st(tab)[ST_EPOCH] != epoch:
        return STALE_TABLE
    pos = locate(tab, devs, slot, offset, n, False)
    if pos >= 0 and fd >= 0 and c_lseek(fd, 0, _SEEK_END) < pos + n:
        return END_OF_FILE
    return pos


kernels_cache.check(globals(), _built_with)
