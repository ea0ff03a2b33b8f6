"""Metadata size: blocks of metadata used per million mappings, ours vs the dm-thin metadata of the same state.

    python -m perf.metadata [--full]

For each shape the pool is built by real writes (a metadata-only pool: the same kernels and metadata,
no data bytes), then ``status().used_metadata_blocks`` (what the status line reports) is compared with
the blocks used by the dm-thin metadata our exporter writes for the same state (``export-metadata``;
counted from its metadata space map, every block with a reference):

* dense: one volume, every block of it written in order;
* snapshots: one volume written in full, then 10 snapshots, each followed by copy-on-write of 1 % of
  the volume's blocks at random;
* sparse: random writes to 1/16 of the blocks of a volume 16 times as large as what is written;
* very sparse: 100,000 random writes over a 100,000,000-block volume (about one mapping per
  512-block leaf range; the same in quick and full runs, as a volume cannot be 1,000 times 1M
  blocks);
* many volumes: small volumes (containers) of 200 mappings each, at random in their first 800
  blocks, as many as make the mappings.

The ratio is ours / dm-thin's (target <= 1.5x).  Also: where our blocks go (per stored array).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

from .common import KiB, Row, Scratch, log, ratio_row

BS = 64 * KiB
VERY_SPARSE_WRITES = 100_000
VERY_SPARSE_SPAN = 100_000_000
SHAPES = {"dense": "a", "snapshots": "b", "sparse": "c", "very sparse": "d", "many volumes": "e"}


def _write(vol, blocks: np.ndarray) -> None:
    buf = np.ones(512, np.uint8)
    for i in range(0, len(blocks), 200_000):
        part = blocks[i:i + 200_000].astype(np.int64)
        vol.write_many(part * BS, [buf] * len(part))


def build(path: str, shape: str, n: int):
    """A metadata-only pool holding ``shape`` with ``n`` written blocks in the origin volume."""
    from thinpool import Pool
    rng = np.random.default_rng(11)
    if shape == "very sparse":
        n = VERY_SPARSE_WRITES
    spread = {"sparse": 16, "very sparse": VERY_SPARSE_SPAN // VERY_SPARSE_WRITES}.get(shape, 1)
    p = Pool.create(path, data_size=str((2 * n + 4096) * BS), block_size=BS, metadata_only=True,
                    metadata_size="4GiB")  # sparse: room for every shape
    if shape == "many volumes":
        with p.batch():
            for i in range(n // 200):
                _write(p.create_thin(f"c{i}", size=str(800 * BS)), np.sort(rng.choice(800, 200, replace=False)))
        p.commit()
        return p
    v = p.create_thin("v", size=str(spread * n * BS))
    if shape in ("sparse", "very sparse"):
        _write(v, np.sort(rng.choice(spread * n, n, replace=False)))
    else:
        _write(v, np.arange(n))
    p.commit()
    if shape == "snapshots":
        for s in range(10):
            p.snapshot("v", f"s{s}")
            _write(v, np.sort(rng.choice(n, n // 100, replace=False)))
            p.commit()
    p.commit()
    return p


def breakdown(pool) -> dict[str, int]:
    """Stored metadata blocks of the committed state, per array (+ page maps, directory, superblocks)."""
    st = pool.store
    out: dict[str, int] = collections.Counter()
    for name, locs in st.locs.items():
        out[name] += sum(1 for loc in locs if loc >> 32)
    out["page maps"] = sum(1 for pml in st.pm_locs.values() for loc in pml if loc >> 32)
    out["directory+superblocks"] = len(st.dir_locs) + 2
    return dict(out)


def measure(sc: Scratch, shape: str, n: int) -> Row:
    from thinpool.interop.binary import write_binary_metadata
    path = sc.path(f"md-{shape}")
    p = build(path, shape, n)
    try:
        ours = p.status().used_metadata_blocks
        mapped = int(sum(u.mapped_blocks for u in p.usage()))
        parts = breakdown(p)
        out = sc.path(f"md-{shape}.bin")
        theirs = write_binary_metadata(p.to_metadata(), out)
        sc.remove(out)
    finally:
        p.close(commit=False)
        sc.remove(path)
    per = 1e6 / mapped
    where = ", ".join(f"{k} {v:,}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)
    return ratio_row("M1" + SHAPES[shape], f"metadata blocks per 1M mappings, {shape} ({mapped:,} mappings): ours vs "
                     f"the exported dm-thin metadata", "<= 1.5", ours / theirs,
                     note=f"ours: {where}", ours_per_M=round(ours * per), dmthin_per_M=round(theirs * per),
                     ours_blocks=ours, dmthin_blocks=theirs)


def run(sc: Scratch, full: bool) -> tuple[list[Row], dict]:
    n = 1_000_000 if full else 200_000
    rows = []
    for shape in SHAPES:
        log(f"metadata: {shape} ...")
        rows.append(measure(sc, shape, n))
    return rows, {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.metadata", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="1,000,000 mappings per shape (default 200,000)")
    a = ap.parse_args(argv)
    with Scratch() as sc:
        rows, _ = run(sc, a.full)
    for r in rows:
        print(r.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
