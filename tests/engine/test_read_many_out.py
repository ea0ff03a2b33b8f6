"""``Thin.read_many(..., out=BUF)``: a batch of reads into the caller's buffer.

The reads follow the same rules as :meth:`Thin.read` (dm-thin: an unprovisioned block reads as
zeroes; a snapshot reads its origin's blocks until it writes its own), the buffer is filled in
place and returned, and a buffer of the wrong type, dtype, layout or size is refused before
anything is read (InvalidArgument; the buffer is untouched).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from thinpool import Pool
from thinpool.errors import InvalidArgument

KiB = 1024
BS = 64 * KiB
IO = 4 * KiB


@pytest.fixture
def vols(scratch: str) -> Any:
    rng = np.random.default_rng(3)
    with Pool.create(f"{scratch}/p", data_size="16MiB", block_size=BS) as p:
        v = p.create_thin("v", "4MiB")
        v.write_many(np.arange(8, dtype=np.int64) * BS, rng.integers(0, 256, (8, BS), dtype=np.uint8))
        s = p.snapshot("v", "s")
        s.write(2 * BS + 100, b"\xab" * 5000)  # a CoW break straddling two 4 KiB pages
        yield p, v, s


def test_kernel_rule_unprovisioned_reads_zero_and_snapshot_reads_origin_into_caller_buffer(vols: Any) -> None:
    _p, v, s = vols
    offs = np.array([0, 2 * BS, 2 * BS + IO, 7 * BS + 60 * KiB, 20 * BS, 3 * BS + 17], np.int64)
    for vol in (v, s):
        buf = np.full((len(offs), IO), 0x5A, np.uint8)
        got = vol.read_many(offs, IO, out=buf)
        assert got is buf
        for i, o in enumerate(offs.tolist()):
            assert buf[i].tobytes() == vol.read(o, IO)
        assert not buf[4].any()  # block 20 was never written: zeroes
    # the same buffer, flat, reused for a second batch
    flat = np.empty(len(offs) * IO, np.uint8)
    assert s.read_many(offs, IO, out=flat) is flat
    assert flat.tobytes() == s.read_many(offs, IO).tobytes()
    assert flat[IO + 100:2 * IO].tobytes() + flat[2 * IO:2 * IO + 1004].tobytes() == b"\xab" * 5000


@pytest.mark.parametrize("bad, what", [
    (bytearray(3 * IO), "numpy uint8 array"),
    (np.zeros((3, IO), np.int8), "dtype uint8"),
    (np.zeros((3, IO // 4), np.uint32), "dtype uint8"),
    (np.zeros((IO, 3), np.uint8).T, "C-contiguous"),
    (np.zeros((2, IO), np.uint8), "need (3, 4096)"),
    (np.zeros((3, IO + 1), np.uint8), "need (3, 4096)"),
    (np.zeros((6, IO // 2), np.uint8), "need (3, 4096)"),
    (np.zeros((3, 1, IO), np.uint8), "need (3, 4096)"),
    (np.zeros(3 * IO - 1, np.uint8), "need (3, 4096)"),
])
def test_read_many_out_of_wrong_type_or_size_refused_before_reading(vols: Any, bad: Any, what: str) -> None:
    _p, v, _s = vols
    before = bytes(bad) if not isinstance(bad, np.ndarray) else bad.copy()
    with pytest.raises(InvalidArgument, match="'v'.*out") as ei:
        v.read_many([0, BS, 2 * BS], IO, out=bad)
    assert what in str(ei.value)
    if isinstance(bad, np.ndarray):
        assert np.array_equal(bad, before)
    else:
        assert bytes(bad) == before


def test_read_many_out_read_only_buffer_refused(vols: Any) -> None:
    _p, v, _s = vols
    buf = np.zeros((1, IO), np.uint8)
    buf.flags.writeable = False
    with pytest.raises(InvalidArgument, match="writable"):
        v.read_many([0], IO, out=buf)
    assert not buf.any()


def test_read_many_out_bad_range_checked_before_the_buffer(vols: Any) -> None:
    _p, v, _s = vols
    buf = np.full((2, IO), 7, np.uint8)
    with pytest.raises(InvalidArgument, match="past the end"):
        v.read_many([0, v.size - 10], IO, out=buf)
    assert (buf == 7).all()
