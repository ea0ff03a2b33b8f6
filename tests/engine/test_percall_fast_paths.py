"""The per-call fast paths of ``Thin.write`` (bytes: an overwrite in place, else one kernel call) and
``Thin.read`` (one block: sliced from the data file's map, a hole as zeroes) keep dm-thin's rules:

* a write to a block shared with a snapshot (dm-thin's time rule) breaks sharing -- never in place;
* a read of an unprovisioned block returns zeroes; a discarded block reads as zeroes again;
* a read-only volume refuses the write, an I/O past the end is refused, and nothing changes;
* in a metadata-only pool nothing is stored, reads are zeroes.
"""

from __future__ import annotations

import numpy as np
import pytest

from thinpool import Pool
from thinpool.errors import InvalidArgument, ReadOnly

KiB = 1024
BS = 64 * KiB


def test_kernel_rule_per_call_overwrite_of_shared_block_breaks_sharing(scratch: str) -> None:
    with Pool.create(f"{scratch}/p", data_size="8MiB", block_size=BS) as p:
        v = p.create_thin("v", "1MiB")
        v.write(0, b"a" * BS)
        v.write(0, b"b" * 4096)  # provisioned, unshared: in place
        assert v.mapped_blocks == 1 and p.status().used_data_blocks == 1
        s = p.snapshot("v", "s")
        v.write(100, b"c" * 10)  # shared by the time rule: a new block, the rest copied
        assert s.read(0, 4096) == b"b" * 4096 and s.read(4096, 10) == b"a" * 10
        assert v.read(0, 200) == b"b" * 100 + b"c" * 10 + b"b" * 90
        assert v.read(4096, 10) == b"a" * 10
        assert p.status().used_data_blocks == 2
        v.write(200, b"d" * 10)  # now exclusive again: in place, no new block
        assert p.status().used_data_blocks == 2
        s.write(0, b"e" * 4)  # the snapshot's block is its own now (the origin moved): in place
        assert s.read(0, 6) == b"eeeebb" and v.read(0, 4) == b"bbbb"


def test_kernel_rule_unprovisioned_and_discarded_blocks_read_zero_per_call(scratch: str) -> None:
    with Pool.create(f"{scratch}/p", data_size="8MiB", block_size=BS) as p:
        v = p.create_thin("v", "1MiB")
        assert v.read(3 * BS + 5, 4096) == bytes(4096)
        v.write(3 * BS, b"x" * BS)
        v.write(4 * BS - 2, b"yyyy")  # across two blocks: the kernel's general case
        assert v.read(4 * BS - 4, 8) == b"xxyyyy\0\0"
        v.discard(3 * BS, BS)
        assert v.read(3 * BS + 5, 4096) == bytes(4096)
        assert v.read(4 * BS, 2) == b"yy"


def test_per_call_fast_paths_refuse_like_the_general_path(scratch: str) -> None:
    with Pool.create(f"{scratch}/p", data_size="8MiB", block_size=BS) as p:
        v = p.create_thin("v", "1MiB")
        v.write(0, b"z" * 4096)
        with pytest.raises(InvalidArgument, match="past the end"):
            v.write(v.size - 10, b"q" * 4096)
        with pytest.raises(InvalidArgument, match="past the end"):
            v.read(v.size - 10, 4096)
        with pytest.raises(InvalidArgument, match="negative"):
            v.read(-4096, 10)
        with pytest.raises(InvalidArgument):
            v.write(1 << 63, b"q")
        p.set_read_only("v", True)
        with pytest.raises(ReadOnly):
            v.write(0, b"w" * 4096)
        assert v.read(0, 4096) == b"z" * 4096


def test_metadata_only_pool_per_call_stores_nothing(scratch: str) -> None:
    with Pool.create(f"{scratch}/p", data_size="1GiB", block_size=BS, metadata_only=True) as p:
        v = p.create_thin("v", "64MiB")
        v.write(0, b"x" * 4096)
        v.write(0, b"y" * 4096)
        assert v.mapped_blocks == 1
        assert v.read(0, 4096) == bytes(4096)
        assert np.asarray(v.read_many([0, BS], 16)).sum() == 0


def test_thin_hole_code_is_the_kernels() -> None:
    from thinpool import kernels, thin_reads
    assert thin_reads._HOLE == kernels.HOLE and thin_reads._HOLE not in (kernels.NOT_HANDLED, kernels.END_OF_FILE,
                                                                        kernels.ORIGIN_ERROR)
