"""A superblock whose checksum verifies but whose header is malformed (crafted: thinpool never writes
one) is a damaged superblock: the open uses the other one, or raises MetadataCorrupt naming the
superblock -- never a TypeError or ValueError from deep inside the load."""

from __future__ import annotations

import json
import os
import struct

import pytest

from thinpool import Pool, mdcommit
from thinpool.devtable import DeviceTable
from thinpool.errors import MetadataCorrupt
from thinpool.mdpages import _SB_HEADER, BLOCK, FORMAT_VERSION, MAGIC, SUPERBLOCKS, checksum
from thinpool.mdstore import MetadataStore

BS = 64 * 1024


def _superblock(generation: int, header: object) -> bytes:
    """A checksummed superblock carrying ``header`` as JSON, whatever it is."""
    body = json.dumps(header).encode()
    raw = bytearray(BLOCK)
    _SB_HEADER.pack_into(raw, 0, 0, MAGIC, FORMAT_VERSION, generation, len(body))
    raw[_SB_HEADER.size:_SB_HEADER.size + len(body)] = body
    struct.pack_into("<I", raw, 0, checksum(memoryview(raw)[4:]))
    return bytes(raw)


BAD = {
    "not an object": lambda h: [],
    "directory a string": lambda h: {**h, "directory": "x"},
    "directory of strings": lambda h: {**h, "directory": ["1"]},
    "directory length past its pages": lambda h: {**h, "directory_bytes": len(h["directory"]) * BLOCK + 1},
    "page counts a list": lambda h: {**h, "pages": [1]},
    "a negative page count": lambda h: {**h, "pages": {**h["pages"], "devs": -1}},
    "block_size a string": lambda h: {**h, "block_size": "x"},
    "block_size 0": lambda h: {**h, "block_size": 0},
    "nr_data_blocks negative": lambda h: {**h, "nr_data_blocks": -5},
    "time null": lambda h: {**h, "time": None},
    "time a boolean": lambda h: {**h, "time": True},
    "cursor 2^64": lambda h: {**h, "cursor": 1 << 64},
    "no_space_timeout a boolean": lambda h: {**h, "no_space_timeout": True},
    "data_file a number": lambda h: {**h, "data_file": 7},
    "held a list": lambda h: {**h, "held": [1]},
    "held without a directory": lambda h: {**h, "held": {"pages": {}}},
}


@pytest.fixture
def two_commits(tmp_path):
    """A pool whose newest commit maps blocks 0 and 1 of ``v`` and whose previous one maps block 0."""
    path = str(tmp_path / "p")
    with Pool.create(path, data_size="64MiB", block_size=BS) as pool:
        v = pool.create_thin("v", "1GiB")
        v.write(0, b"a" * 4096)
        pool.commit()
        v.write(BS, b"b" * 4096)
        pool.commit()
    store = MetadataStore(os.path.join(path, "metadata"), read_only=True)
    try:
        (gen, slot, header), (old_gen, old_slot, old_header) = store.superblocks()
    finally:
        store.close()
    return path, (gen, slot, header), (old_gen, old_slot, old_header)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_malformed_newest_header_falls_back_naming_the_superblock(two_commits, kind):
    path, (gen, slot, header), _old = two_commits
    with open(os.path.join(path, "metadata"), "r+b") as f:
        f.seek(slot * BLOCK)
        f.write(_superblock(gen, BAD[kind](header)))
    with Pool.open(path, read_only=True) as pool:
        v = pool.thin("v")
        assert v.read(0, 4096) == b"a" * 4096 and v.read(BS, 4096) == bytes(4096), kind
        assert f"superblock in metadata block {slot}" in (pool.recovered_from or ""), pool.recovered_from
        assert pool.check().warnings
    with DeviceTable.open(path) as table:
        assert table.status().used_data_blocks == 1 and table.recovered_from


@pytest.mark.parametrize("kind", ["not an object", "time null", "directory a string"])
def test_both_headers_malformed_is_metadata_corrupt(two_commits, kind):
    path, (gen, slot, header), (old_gen, old_slot, old_header) = two_commits
    with open(os.path.join(path, "metadata"), "r+b") as f:
        for g, s, h in ((gen, slot, header), (old_gen, old_slot, old_header)):
            f.seek(s * BLOCK)
            f.write(_superblock(g, BAD[kind](h)))
    for opener in (Pool.open, DeviceTable.open):
        with pytest.raises(MetadataCorrupt) as err:
            opener(path)
        assert err.value.structure == "superblock" and err.value.block in range(SUPERBLOCKS)
        assert "superblock in metadata block" in str(err.value)
