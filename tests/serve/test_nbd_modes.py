"""The pool modes over NBD, as dm-thin serves them: in read-only (and out-of-metadata-space) mode a
WRITE to a provisioned, unshared block is served, one that needs a block fails with EIO
(dm-thin's handle_unserviceable_bio), TRIM succeeds and unmaps nothing, FLUSH flushes the data; a
FLUSH of a pool with no metadata change writes no metadata."""

from __future__ import annotations

import pytest

from thinpool import Pool
from thinpool.errors import ReadOnlyIO
from thinpool.nbd import protocol as P
from thinpool.nbd.pool_backend import PoolProvider
from thinpool.nbd.requests import nbd_error_for
from thinpool.pool_ir import NEEDS_CHECK_FLAG

BS = 64 * 1024


@pytest.fixture
def read_only_mode_pool(tmp_path):
    src = Pool.create(tmp_path / "src", data_size=64 * BS)
    v = src.create_thin("v", 8 * BS)
    v.write(0, b"a" * (2 * BS))
    src.snapshot("v", "s")
    v.write(0, b"b" * BS)  # block 0: v's own; block 1: shared with s
    md = src.to_metadata()
    src.close()
    md.superblock.flags |= NEEDS_CHECK_FLAG
    p = Pool.from_metadata(tmp_path / "p", md, names={1: "v", 2: "s"}, data_file=tmp_path / "src" / "data",
                           take_over_data=True)
    assert p.mode == "read-only"
    provider = PoolProvider(p)
    yield provider.open_export("v", read_only=False)
    provider.close()


def test_kernel_rule_read_only_mode_over_nbd(read_only_mode_pool):
    export = read_only_mode_pool
    export.pwrite(10, b"served")                       # provisioned, unshared
    assert export.pread(10, 6) == b"served"
    for offset in (BS + 10, 5 * BS):                   # shared (a sharing break), unmapped
        with pytest.raises(ReadOnlyIO) as ei:
            export.pwrite(offset, b"x")
        assert nbd_error_for(ei.value) == P.EIO       # the client sees EIO, as from dm-thin
    export.trim(0, 2 * BS)                             # succeeds, unmaps nothing
    assert export.pread(0, 1) == b"b" and export.pread(BS, 1) == b"a"
    export.write_zeroes(0, BS, may_trim=True)          # real zeroes in the provisioned block
    assert export.pread(0, BS) == bytes(BS)
    export.write_zeroes(4 * BS, 2 * BS, may_trim=True)  # unmapped: already zeroes, nothing to do
    with pytest.raises(ReadOnlyIO):
        export.write_zeroes(BS, BS, may_trim=False)    # shared: needs a block
    export.flush()


def test_kernel_rule_flush_of_an_unchanged_pool_writes_no_metadata(tmp_path):
    # dm-thin: a FLUSH to a thin with no change in this transaction is passed down to the data device
    # (bio_triggers_commit is false); __commit_transaction writes nothing when not in_service
    p = Pool.create(tmp_path / "p", data_size=64 * BS)
    p.create_thin("v", 8 * BS).write(0, b"a" * (2 * BS))
    p.commit()
    provider = PoolProvider(p)
    export = provider.open_export("v", read_only=False)
    try:
        with open(tmp_path / "p" / "metadata", "rb") as f:
            before = f.read()
        gen = p.store.generation
        export.flush()
        export.pwrite(100, b"rewrite")  # a provisioned, unshared block
        export.flush()
        assert p.store.generation == gen
        with open(tmp_path / "p" / "metadata", "rb") as f:
            assert f.read() == before
        export.pwrite(4 * BS, b"new")  # a new mapping: this flush commits
        export.flush()
        assert p.store.generation == gen + 1
    finally:
        provider.close()
