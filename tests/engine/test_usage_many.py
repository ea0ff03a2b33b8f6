"""``Pool.usage()`` of many volumes at once (``thinpool ls --usage``): every tree summed in one pass,
each shared node once, gives the same MAPPED / EXCLUSIVE / SHARED / highest block as walking every
volume's mappings on its own (thin_ls's definitions, `walks.device_usage`)."""

from __future__ import annotations

import numpy as np

from thinpool import Pool
from thinpool import walks as W
from thinpool.schema import DevFlag

BS = 64 * 1024


def test_kernel_rule_thin_ls_exclusive_of_many_snapshots_equals_per_volume_walk(tmp_path):
    pool = Pool.create(tmp_path / "p", data_size=4096 * BS, metadata_only=True)
    rng = np.random.default_rng(5)
    one = np.ones((2000, 1), np.uint8)
    with pool.batch():
        for o in range(3):   # origins with different shapes: dense, sparse past one mid node, empty
            v = pool.create_thin(f"o{o}", "64GiB")
            if o == 0:
                v.write_many(np.arange(1500, dtype=np.int64) * BS, one[:1500])
            elif o == 1:
                blocks = np.sort(rng.choice(1 << 20, 600, replace=False)).astype(np.int64)
                v.write_many(blocks * BS, one[:600])
        for i in range(240):
            pool.snapshot(f"o{i % 3}", f"s{i}")
        for i in range(0, 240, 7):   # copy-on-write in some snapshots: own leaves, shared mids
            pool.thin(f"s{i}").write_many(rng.integers(0, 1500, 20).astype(np.int64) * BS, one[:20])
        pool.thin("o0").write_many(np.arange(1400, 1600, dtype=np.int64) * BS, one[:200])
        pool.snapshot("s7", "s7-child")
        pool.delete("s14")
    got = pool.usage()
    nodes = pool.nodes_map.nodes
    in_use = (pool.devs["flags"] & DevFlag.IN_USE) != 0
    roots = pool.devs["root"][in_use].astype(np.int64)
    counts = W.logical_counts(nodes, roots, pool.nr_data_blocks)
    assert len(got) == 3 + 240 - 1 + 1
    assert [u.dev_id for u in got] == sorted(u.dev_id for u in got)
    exclusive = 0
    for u in got:
        (root,) = pool.devs["root"][in_use & (pool.devs["dev_id"] == u.dev_id)].tolist()
        mapped, excl, highest = (int(x) for x in W.device_usage(nodes, root, counts))
        assert (u.mapped_blocks, u.exclusive_blocks, u.shared_blocks) == (mapped, excl, mapped - excl), u.name
        assert u.highest_mapped_block == (None if highest < 0 else highest)
        assert pool.usage(u.name) == u
        assert u.mapped_blocks == pool.thin(u.name).mapped_blocks
        exclusive += u.exclusive_blocks
    assert exclusive > 0 and any(u.shared_blocks for u in got)
    pool.close()


def test_kernel_rule_thin_ls_exclusive_with_counts_past_255_kept_in_one_byte(tmp_path):
    """``Pool.usage`` counts each data block's references in one byte, stopping at 255: a block 300
    mapping entries share is still shared, one entry's block still exclusive (int32 counts agree)."""
    pool = Pool.create(tmp_path / "p", data_size=1024 * BS, metadata_only=True)
    one = np.ones((20, 1), np.uint8)
    with pool.batch():
        pool.create_thin("o", "1GiB").write_many(np.arange(20, dtype=np.int64) * BS, one)
        for i in range(299):
            pool.snapshot("o", f"s{i}")
        pool.thin("s5").write_many(np.arange(3, dtype=np.int64) * BS, one[:3])  # 3 blocks of its own
    nodes = pool.nodes_map.nodes
    in_use = (pool.devs["flags"] & DevFlag.IN_USE) != 0
    roots = pool.devs["root"][in_use].astype(np.int64)
    wide = W.logical_counts(nodes, roots, pool.nr_data_blocks)
    narrow = np.zeros(pool.nr_data_blocks, np.uint8)
    W.logical_counts_into(nodes, roots, narrow)
    assert wide.max() == 300 and np.array_equal(narrow, np.minimum(wide, 255))
    got = {u.name: u for u in pool.usage()}
    assert (got["s5"].exclusive_blocks, got["s5"].shared_blocks) == (3, 17)
    assert (got["o"].exclusive_blocks, got["s0"].exclusive_blocks) == (0, 0)
    for u in got.values():
        (root,) = pool.devs["root"][in_use & (pool.devs["dev_id"] == u.dev_id)].tolist()
        assert (u.mapped_blocks, u.exclusive_blocks) == tuple(int(x) for x in W.device_usage(nodes, root, wide)[:2])
    pool.close()
