"""The binary exporter builds and writes the mapping trees a window of mappings at a time
(:mod:`thinpool.interop.sharing`, :mod:`thinpool.interop.binary`), so its memory stays bounded however many
mappings the pool holds; its output is byte for byte what the exporter that held every mapping at once
wrote.  The SHA-256 digests below are that exporter's output for the same metadata (recorded before the
windowed build replaced it); each case is written with the default window and with windows so small that
trees, leaf groups and leaves straddle them, and the real tools accept the result.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.interop.test_interop_binary import (
    assert_data_counts,
    assert_same,
    dump,
    make_device,
    random_metadata,
    snapshot_of,
    thin_check_ok,
)
from tests.interop.test_sharing import derived_family
from tests.support import require_tool
from thinpool.interop.binary import write_binary_metadata
from thinpool.interop.binary_read import check_binary_metadata, read_binary_metadata
from thinpool.errors import InvalidArgument
from thinpool.interop.ir import Device, Metadata, Superblock

Case = Callable[[], tuple[Metadata, Metadata | None]]


def _many_volumes() -> tuple[Metadata, Metadata | None]:
    """300 volumes: 3 origins (one sparse with holes), 280 unchanged snapshots sharing their arrays,
    a few edited snapshots, empty devices."""
    rng = np.random.default_rng(11)
    nr = 200_000
    o1 = make_device(rng, 1, 5000, nr)
    vb = np.unique(rng.integers(0, 1 << 22, 3000)).astype(np.uint64)  # sparse: holes everywhere
    o2 = Device(2, vb.size, 0, 0, 0, vb, rng.integers(0, nr, vb.size).astype(np.uint64),
                rng.integers(0, 9, vb.size).astype(np.uint32))
    o3 = make_device(rng, 3, 700, nr)
    devices = [o1, o2, o3]
    for i in range(4, 284):
        o = devices[i % 3]
        devices.append(Device(i, o.mapped_blocks, 1, 2, 3, o.vblocks, o.dblocks, o.times))
    for i in range(284, 296):
        devices.append(snapshot_of(rng, devices[i % 3], i, nr, 0.01))
    devices += [Device(i, 0, 0, 0, 0) for i in range(296, 300)]
    return Metadata(Superblock(5, 6, 128, nr), devices), None


def _held(sharing: str) -> Case:
    def build() -> tuple[Metadata, Metadata | None]:
        rng = np.random.default_rng(3)
        nr = 30000
        held_devices = [make_device(rng, 1, 900, nr), make_device(rng, 2, 40, nr), Device(5, 0, 0, 0, 0)]
        held = Metadata(Superblock(2, 10, 128, nr), held_devices)
        if sharing == "all":
            return Metadata(Superblock(2, 10, 128, nr), list(held_devices)), held
        changed = snapshot_of(rng, held_devices[0], 1, nr, 0.2)
        keep = [held_devices[1]] if sharing == "some" else [make_device(rng, 2, 41, nr)]
        return Metadata(Superblock(3, 11, 128, nr, flags=1), [changed, *keep, make_device(rng, 7, 3, nr)]), held
    return build


def _shared_data() -> tuple[Metadata, Metadata | None]:
    """Deep trees, > 3 data bitmaps, data blocks counted 2, 3 and more (a multi-node ref-count tree)."""
    rng = np.random.default_rng(7)
    nr = 4 * 16320 + 123
    origin = make_device(rng, 1, 70_000, nr)
    devices = [origin] + [snapshot_of(rng, origin, i, nr, 0.05) for i in (2, 3, 4)] + [Device(9, 0, 0, 0, 0)]
    return Metadata(Superblock(4, 99, 128, nr, flags=1), devices), None


def _huge_data_device() -> tuple[Metadata, Metadata | None]:
    """A data device far larger than the mappings (the data space map's counts are gathered sparsely)."""
    rng = np.random.default_rng(5)
    nr = 1 << 27
    devices = [make_device(rng, 1, 3000, nr), make_device(rng, 2, 20, nr)]
    devices.append(snapshot_of(rng, devices[0], 3, nr, 0.3))
    return Metadata(Superblock(1, 2, 128, nr), devices), None


def _dense_origins() -> tuple[Metadata, Metadata | None]:
    """perf/scale.py's shape in small: dense origins (block i -> data block), round-robin snapshots."""
    per, origins = 20_000, 3
    nr = origins * per + 100
    devices = []
    for o in range(origins):
        vb = np.arange(per, dtype=np.uint64)
        devices.append(Device(o + 1, per, 0, 0, 0, vb, vb + np.uint64(o * per), np.zeros(per, np.uint32)))
    for i in range(40):
        o = devices[i % origins]
        devices.append(Device(origins + 1 + i, per, 0, 0, 1, o.vblocks, o.dblocks, o.times))
    return Metadata(Superblock(1, 1, 128, nr), devices), None


def _hot_data_blocks() -> tuple[Metadata, Metadata | None]:
    """300 devices with distinct leaves mapping the same data blocks: counts of 250-259 and 300 (past
    the 255 a byte holds), beside blocks each device maps alone."""
    nr = 5000
    devices = []
    for i in range(300):
        vb = np.arange(110, dtype=np.uint64) + np.uint64(1000 * i)
        db = np.arange(110, dtype=np.uint64)
        alone = np.arange(10) + 250 > i  # block 100 + k: the devices i < 250 + k
        db[100:][~alone] = np.uint64(1000 + 10 * i) + np.flatnonzero(~alone).astype(np.uint64)
        devices.append(Device(i, 110, 0, 0, 0, vb, db, np.full(110, i % 5, np.uint32)))
    return Metadata(Superblock(3, 4, 128, nr), devices), None


CASES: dict[str, Case] = {
    "hot-data-blocks": _hot_data_blocks,
    **{f"random-{s}": (lambda s=s: (random_metadata(s, 6, 3 * 16320 + 7, True), None)) for s in (1, 2, 3)},
    **{f"family-{s}": (lambda s=s: (derived_family(s, 12, 50_000), None)) for s in (0, 1, 2)},
    "many-volumes": _many_volumes,
    **{f"held-{s}": _held(s) for s in ("none", "some", "all")},
    "shared-data": _shared_data,
    "huge-data-device": _huge_data_device,
    "dense-origins": _dense_origins,
    "empty": lambda: (Metadata(Superblock(0, 0, 128, 100), []), None),
}

#: sha256 of the file the exporter that held every mapping at once wrote for each case
GOLDEN: dict[str, str] = {
    "hot-data-blocks": "8689c312c6b9969a7dfe00610877fcac/628",
    "random-1": "adb3fbeffcf12ebf92d514aa006e5090/512",
    "random-2": "a535e092d02512f28e125908fea3d790/512",
    "random-3": "1a9b2be5207c14f7470b94d13394b95c/512",
    "family-0": "16dea5756331b576bc3440577bd94160/512",
    "family-1": "98c7961bd74da0d016d9e78bc9f6eeb3/782",
    "family-2": "32e826a721739c67fc3d4cd23970e50c/512",
    "many-volumes": "d10245eb22f13afa43077d4ec7207426/1887",
    "held-none": "8b01fc123b926673726d88da84a0071a/512",
    "held-some": "82666357bbfeb3cc3ad62705491e2d2b/512",
    "held-all": "4c219bdc9c28b8e524f764f6d657f644/512",
    "shared-data": "d1dd285b70c604337ff451fa430add4f/3880",
    "huge-data-device": "250e2f7c1508dac58d5c6e15276f46dd/1065224",
    "dense-origins": "8a6b39e956c63b393e1f67cd1c1979a3/732",
    "empty": "84dc28e5a161bf2282717c3960df04be/512",
}


def digest(path: Path, used: int) -> str:
    """SHA-256 of the ``used`` blocks written and the file's size (the rest is a hole: checked here)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        h = hashlib.sha256(f.read(used * 4096))
        if size > used * 4096:
            with pytest.raises(OSError):  # ENXIO: no data after the used blocks
                os.lseek(f.fileno(), used * 4096, os.SEEK_DATA)
    return f"{h.hexdigest()[:32]}/{size // 4096}"


@pytest.fixture(params=["default", "tiny"])
def window(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The default window, or windows of 100 mappings: trees, leaf groups and leaves straddle them."""
    if request.param == "tiny":
        import thinpool.interop.binary as binary
        import thinpool.interop.sharing as sharing
        monkeypatch.setattr(sharing, "WINDOW", 100)
        monkeypatch.setattr(binary, "WINDOW", 100)
    return str(request.param)


@pytest.mark.parametrize("case", sorted(CASES))
def test_windowed_export_writes_what_the_whole_array_exporter_wrote(tmp_path: Path, case: str, window: str) -> None:
    """Same metadata, same bytes: snapshots sharing their origin's arrays, shared subtrees found by
    content, holes, 300 volumes, held roots, data blocks counted 3+ times, a data device far larger than
    its mappings -- built a window at a time, the file is the one the exporter that held every mapping
    at once wrote."""
    md, held = CASES[case]()
    meta = tmp_path / "meta"
    used = write_binary_metadata(md, meta, held=held)
    assert digest(meta, used) == GOLDEN[case]


@pytest.mark.parametrize("case", ["many-volumes", "family-1", "held-some", "shared-data"])
def test_kernel_rule_windowed_export_is_what_thin_check_thin_dump_and_thin_ls_accept(tmp_path: Path,
                                                                                     case: str) -> None:
    """Written a hundred mappings at a time, the metadata still passes thin_check, thin_dump prints every
    device's mappings (and the held root's), thin_ls counts them, and every reference count is exact."""
    require_tool("thin_check", "thin_dump", "thin_ls")
    from tests.interop.test_interop_pool import ALL_FIELDS, run
    from thinpool.interop.thin_ls import format_ls
    import thinpool.interop.binary as binary
    import thinpool.interop.sharing as sharing
    md, held = CASES[case]()
    meta = tmp_path / "meta"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sharing, "WINDOW", 100)
        mp.setattr(binary, "WINDOW", 100)
        write_binary_metadata(md, meta, held=held)
    thin_check_ok(meta)
    assert_same(dump(meta), md)
    assert_same(read_binary_metadata(meta), md)
    assert run("thin_ls", "-o", ALL_FIELDS, str(meta)) == format_ls(md, ALL_FIELDS.split(","))
    assert check_binary_metadata(meta) == []
    if held is None:
        assert_data_counts(meta, md)
    else:
        root = read_binary_metadata(meta).superblock.metadata_snap
        assert_same(dump(meta, f"--metadata-snap={root}"), held, nr_data_blocks=False)


def test_windowed_leaf_sharing_survives_hash_collisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leaves are grouped by hash and then compared entry by entry, a window at a time: with every hash
    forced equal, leaves that only collide stay apart -- the file reads back exactly and passes the
    reference-count check; the collisions cost sharing only (more blocks than without them)."""
    md, _ = _many_volumes()
    shared = write_binary_metadata(md, tmp_path / "shared")
    import thinpool.interop.binary as binary
    import thinpool.interop.ir as ir
    import thinpool.interop.sharing as sharing
    monkeypatch.setattr(ir, "_mix_inplace", lambda x: x.fill(0))
    monkeypatch.setattr(sharing, "WINDOW", 100)
    monkeypatch.setattr(binary, "WINDOW", 100)
    meta = tmp_path / "meta"
    used = write_binary_metadata(md, meta)
    assert_same(read_binary_metadata(meta), md)
    assert check_binary_metadata(meta) == []
    assert used > shared


@pytest.mark.parametrize("window", [100, 1 << 21])
def test_windowed_checks_report_the_first_fault_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         window: int) -> None:
    """Unsorted keys (also across a window's edge), a data block beyond the device, a time past 24 bits:
    each named with its device, disorder reported before the others whatever the order of devices, and
    nothing written."""
    import thinpool.interop.binary as binary
    monkeypatch.setattr(binary, "WINDOW", window)
    sb = Superblock(0, 0, 128, 1000)
    ok = np.arange(250, dtype=np.uint64)
    good = Device(1, 250, 0, 0, 0, ok, ok, np.zeros(250, np.uint32))
    unsorted = ok.copy()
    unsorted[100] = 99  # entry 100 of device 2: at the edge of the second window of 100
    cases = [
        ([good, Device(2, 250, 0, 0, 0, unsorted, ok, np.zeros(250, np.uint32))], "device 2: vblocks not strictly"),
        ([Device(1, 250, 0, 0, 0, ok, ok + np.uint64(751), np.zeros(250, np.uint32)),
          Device(2, 250, 0, 0, 0, unsorted, ok, np.zeros(250, np.uint32))], "device 2: vblocks not strictly"),
        ([good, Device(3, 250, 0, 0, 0, ok, ok + np.uint64(751), np.zeros(250, np.uint32))],
         "device 3: data block 1000 beyond the data device"),
        ([Device(4, 250, 0, 0, 0, ok, ok, np.full(250, 1 << 24, np.uint32)),
          Device(5, 250, 0, 0, 0, ok, ok + np.uint64(751), np.zeros(250, np.uint32))],
         "device 5: data block 1000 beyond"),
        ([good, Device(6, 250, 0, 0, 0, ok, ok, np.arange(250, dtype=np.uint32) << np.uint32(17))],
         "device 6: mapping time 16777216 does not fit"),
    ]
    for devices, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            write_binary_metadata(Metadata(sb, devices), tmp_path / "m")
        assert not (tmp_path / "m").exists()
