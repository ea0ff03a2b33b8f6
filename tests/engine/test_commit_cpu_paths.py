"""The shortcuts a small commit takes to cost less CPU give what the long way gives (docs/performance.md,
CF1): the hints kept from the last commit while no device slot changed its device, the superblock's
JSON through a C encoder made once.
"""

from __future__ import annotations

import json
import random

import numpy as np

from thinpool import Pool
from thinpool.mdcommit import _SB_JSON, _sb_json
from thinpool.schema import DevFlag

BS = 64 * 1024


def _scan(pool: Pool) -> dict[str, int]:
    """The hints counted from the whole device table (what a commit without the kept ones records)."""
    devs = pool._devs
    used = (devs["flags"] & int(DevFlag.IN_USE)) != 0
    ids = devs["dev_id"][used]
    free = np.flatnonzero(~used)
    return {"dev_id_max": int(ids.max()) if len(ids) else 0, "nr_thins": len(ids),
            "free_slot": int(free[0]) if len(free) else len(devs)}


def test_kernel_rule_every_commit_records_the_device_hints_of_the_table_it_commits(tmp_path) -> None:
    """Creates, snapshots, deletes and writes in random order, each committed: after every commit the
    recorded hints (``dev_id_max``, ``nr_thins``, ``free_slot``) are those of a scan of the table --
    also when a slot is reused by another device id, and across a table that grows past a page."""
    rng = random.Random(7)
    p = Pool.create(tmp_path / "p", data_size=64 * BS, block_size=BS)
    names: list[str] = []
    made = 0
    for step in range(160):
        op = rng.random()
        if not names or op < 0.35:
            made += 1
            names.append(f"v{made}")
            p.create_thin(names[-1], 16 * BS, dev_id=rng.choice([None, 1000 + made]))
        elif op < 0.5:
            made += 1
            origin = rng.choice(names)
            names.append(f"s{made}")
            p.snapshot(origin, names[-1])
        elif op < 0.75:
            p.delete(names.pop(rng.randrange(len(names))))
        else:
            p.thin(rng.choice(names)).write(rng.randrange(16) * BS, b"x" * 4096)
            p.commit()
        hints = p._store.header["hints"]
        assert {k: hints[k] for k in ("dev_id_max", "nr_thins", "free_slot")} == _scan(p), step
    assert made > 64  # the table grew past one page of slots
    p.close()


def test_superblock_json_is_what_the_encoder_gives() -> None:
    """Random headers (nested, non-ASCII, NaN, bools beside ints) encode to exactly the text of
    ``json.JSONEncoder(separators=(",", ":")).encode`` and load back equal."""
    rng = random.Random(3)
    vals = [0, 1, True, False, 1.0, -0.0, None, "a", "é\n\"\\", 2 ** 63, -3, float("inf"), 3.25,
            [1, 2], [1, True, None], [], {"a": 1}, {"a": {"b": [1.5, "x"]}}]
    for _ in range(3000):
        keys = rng.sample(["block_size", "pages", "time", "hints", "directory", "ü", "held", "x"],
                          rng.randint(0, 8))
        header = {k: rng.choice(vals) for k in keys}
        text = _sb_json(header)
        assert text == _SB_JSON.encode(header)
        assert json.loads(text) == header
