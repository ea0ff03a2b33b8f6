"""thin_dump XML: our writer against the real thin_dump (through thin_restore), and the reader.

The Hypothesis strategy :func:`metadata_irs` (random pools: several devices, shared data blocks,
runs with equal and different times, empty devices, snapshot-like edited copies) is also used
by ``test_interop_tools.py``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import re
import subprocess
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import require_tool, soak_examples
from thinpool.errors import AlreadyExists, InvalidArgument
from thinpool.interop.ir import Device, Metadata, Superblock
from thinpool.interop.xml import DuplicateDevice, dump_xml, load_xml, mapping_runs

# ----------------------------------------------------------------------------------------------
# helpers shared with test_interop_tools.py


def make_device(dev_id: int, mapping: dict[int, tuple[int, int]], transaction: int = 0,
                creation_time: int = 0, snap_time: int = 0) -> Device:
    """A Device from {vblock: (dblock, time)} with a correct mapped_blocks."""
    keys = sorted(mapping)
    return Device(dev_id, len(keys), transaction, creation_time, snap_time,
                  np.array(keys, np.uint64), np.array([mapping[k][0] for k in keys], np.uint64),
                  np.array([mapping[k][1] for k in keys], np.uint32))


@st.composite
def metadata_irs(draw: st.DrawFn, max_devices: int = 6) -> Metadata:
    """Random metadata whose mappings are all valid for thin_restore 0.9.0."""
    nr_data_blocks = draw(st.integers(40, 3000))
    pool_time = draw(st.integers(0, 40))
    maps: list[dict[int, tuple[int, int]]] = []
    for _ in range(draw(st.integers(0, max_devices))):
        action = draw(st.sampled_from(["new", "new", "empty", "snap", "snap"]))
        if action == "empty":
            maps.append({})
            continue
        if action == "snap" and maps:
            m = dict(maps[draw(st.integers(0, len(maps) - 1))])
            keys = sorted(m)
            for _ in range(draw(st.integers(0, 6))):  # edits: delete, remap (a write), add
                op = draw(st.sampled_from(["del", "remap", "add"]))
                if op != "add" and keys:
                    k = keys[draw(st.integers(0, len(keys) - 1))]
                    n = draw(st.integers(1, 5))
                    for i in range(n):
                        if op == "del":
                            m.pop(k + i, None)
                        elif k + i in m:
                            m[k + i] = (draw(st.integers(0, nr_data_blocks - 1)), pool_time)
                else:
                    m[draw(st.integers(0, 400))] = (draw(st.integers(0, nr_data_blocks - 1)), pool_time)
            maps.append(m)
            continue
        m = {}
        v = draw(st.integers(0, 50))
        for _ in range(draw(st.integers(1, 8))):
            length = draw(st.integers(1, 40))
            d0 = draw(st.integers(0, nr_data_blocks - length))
            t = draw(st.integers(0, 3))
            split_time = draw(st.booleans())
            for i in range(length):
                m[v + i] = (d0 + i, t + (i >= length // 2 if split_time else 0))
            v += length + draw(st.sampled_from([0, 0, 1, 7, 1000]))
        if draw(st.booleans()):  # a far-away block
            m[draw(st.integers(1 << 20, 1 << 40))] = (draw(st.integers(0, nr_data_blocks - 1)), 0)
        maps.append(m)
    ids = draw(st.lists(st.one_of(st.integers(0, 20), st.integers(0, (1 << 24) - 1)),
                        min_size=len(maps), max_size=len(maps), unique=True))
    devices = [make_device(i, m, draw(st.integers(0, 1 << 40)), draw(st.integers(0, pool_time)),
                           draw(st.integers(0, pool_time)))
               for i, m in sorted(zip(ids, maps), key=lambda p: p[0])]
    sb = Superblock(time=pool_time, transaction=draw(st.integers(0, (1 << 64) - 1)),
                    data_block_size=draw(st.sampled_from([128, 256, 1024, 8192, 2097152])),
                    nr_data_blocks=nr_data_blocks, flags=draw(st.sampled_from([0, 0, 1])),
                    version=draw(st.sampled_from([1, 2, 2])),
                    metadata_snap=draw(st.sampled_from([None, None, 5, 77])))
    return Metadata(sb, devices)


def restore(xml_text: str, workdir: str, *, size: int = 8 << 20) -> str:
    """thin_restore *xml_text* into a fresh metadata file in *workdir*; return its path."""
    src = os.path.join(workdir, "in.xml")
    meta = os.path.join(workdir, "meta")
    with open(src, "w") as f:
        f.write(xml_text)
    if os.path.exists(meta):
        os.unlink(meta)
    with open(meta, "wb") as f:
        f.truncate(size)
    r = subprocess.run(["thin_restore", "-i", src, "-o", meta], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return meta


def assert_same_ir(a: Metadata, b: Metadata) -> None:
    assert a.superblock == b.superblock
    assert [d.dev_id for d in a.devices] == [d.dev_id for d in b.devices]
    for x, y in zip(a.devices, b.devices):
        assert (x.mapped_blocks, x.transaction, x.creation_time, x.snap_time) == \
            (y.mapped_blocks, y.transaction, y.creation_time, y.snap_time)
        assert x.vblocks.dtype == y.vblocks.dtype == np.uint64
        assert x.times.dtype == y.times.dtype == np.uint32
        np.testing.assert_array_equal(x.vblocks, y.vblocks)
        np.testing.assert_array_equal(x.dblocks, y.dblocks)
        np.testing.assert_array_equal(x.times, y.times)


# ----------------------------------------------------------------------------------------------
# the writer against the real tools


@pytest.mark.realtools
@settings(max_examples=soak_examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(metadata_irs())
def test_dump_is_byte_identical_to_thin_dump_and_round_trips(md: Metadata) -> None:
    require_tool("thin_restore", "thin_dump")
    ours = dump_xml(md)
    with tempfile.TemporaryDirectory() as tmp:
        meta = restore(dump_xml(md, emit_metadata_snap=True), tmp)
        theirs = subprocess.run(["thin_dump", meta], capture_output=True, text=True, check=True).stdout
    assert theirs == ours
    expected = Metadata(dataclasses.replace(md.superblock, metadata_snap=None, uuid=""), md.devices)
    assert_same_ir(load_xml(ours), expected)  # 0.9.0 prints neither metadata_snap nor the uuid


def test_worked_example_text() -> None:
    """A worked example (two devices sharing data blocks 10-11, one remapped at time 1, as thin_dump
    0.9.0 prints them), plus an empty device and a time change inside a run."""
    md = Metadata(Superblock(time=1, transaction=5, data_block_size=128, nr_data_blocks=1000, version=2), [
        make_device(0, {0: (10, 0), 1: (11, 0), 2: (12, 0)}),
        make_device(1, {0: (10, 0), 1: (11, 0), 2: (20, 1), 3: (21, 2), 9: (22, 2)}, transaction=3,
                    creation_time=1, snap_time=1),
        make_device(7, {}),
    ])
    assert dump_xml(md) == (
        '<superblock uuid="" time="1" transaction="5" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">\n'
        '  <device dev_id="0" mapped_blocks="3" transaction="0" creation_time="0" snap_time="0">\n'
        '    <range_mapping origin_begin="0" data_begin="10" length="3" time="0"/>\n'
        '  </device>\n'
        '  <device dev_id="1" mapped_blocks="5" transaction="3" creation_time="1" snap_time="1">\n'
        '    <range_mapping origin_begin="0" data_begin="10" length="2" time="0"/>\n'
        '    <single_mapping origin_block="2" data_block="20" time="1"/>\n'
        '    <single_mapping origin_block="3" data_block="21" time="2"/>\n'
        '    <single_mapping origin_block="9" data_block="22" time="2"/>\n'
        '  </device>\n'
        '  <device dev_id="7" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">\n'
        '  </device>\n'
        '</superblock>\n'
    )
    buf = io.StringIO()
    assert dump_xml(md, buf) is None
    assert buf.getvalue() == dump_xml(md)
    md.superblock.metadata_snap = 12
    assert 'nr_data_blocks="1000" metadata_snap="12">' in dump_xml(md, emit_metadata_snap=True)
    assert "metadata_snap" not in dump_xml(md)


def test_no_devices_and_uuid_never_printed() -> None:
    md = Metadata(Superblock(time=0, transaction=0, data_block_size=128, nr_data_blocks=10, uuid="abc"))
    assert dump_xml(md) == ('<superblock uuid="" time="0" transaction="0" flags="0" version="2" '
                            'data_block_size="128" nr_data_blocks="10">\n</superblock>\n')


def test_mapping_runs() -> None:
    dev = make_device(0, {0: (5, 1), 1: (6, 1), 2: (7, 2), 3: (8, 2), 5: (9, 2), 6: (3, 2)})
    vb, db, ln, tm = mapping_runs(dev)
    assert (vb.tolist(), db.tolist(), ln.tolist(), tm.tolist()) == ([0, 2, 5, 6], [5, 7, 9, 3], [2, 2, 1, 1], [1, 2, 2, 2])
    vb, db, ln, _ = mapping_runs(dev, split_on_time=False)
    assert (vb.tolist(), db.tolist(), ln.tolist()) == ([0, 5, 6], [5, 9, 3], [4, 1, 1])


def test_dump_rejects_inconsistent_ir() -> None:
    sb = Superblock(time=0, transaction=0, data_block_size=128, nr_data_blocks=10)
    with pytest.raises(InvalidArgument, match="not sorted"):
        dump_xml(Metadata(sb, [make_device(2, {}), make_device(1, {})]))
    bad = Device(1, 2, 0, 0, 0, np.array([3, 3], np.uint64), np.array([1, 2], np.uint64), np.zeros(2, np.uint32))
    with pytest.raises(InvalidArgument, match="strictly increasing"):
        dump_xml(Metadata(sb, [bad]))


# ----------------------------------------------------------------------------------------------
# the reader

HEAD = '<superblock uuid="" time="1" transaction="5" flags="0" version="2" data_block_size="128" nr_data_blocks="100">\n'
DEV = '  <device dev_id="1" mapped_blocks="{}" transaction="0" creation_time="0" snap_time="0">\n'
TAIL = "  </device>\n</superblock>\n"


def single(v: int, d: int, t: int = 0) -> str:
    return f'    <single_mapping origin_block="{v}" data_block="{d}" time="{t}"/>\n'


def test_load_sources(tmp_path: pathlib.Path) -> None:
    text = HEAD + DEV.format(2) + single(4, 9) + single(5, 10) + TAIL
    path = tmp_path / "x.xml"
    path.write_text(text)
    for src in (text, str(path), path, io.StringIO(text)):
        md = load_xml(src)
        assert md.devices[0].vblocks.tolist() == [4, 5]
        assert md.devices[0].dblocks.tolist() == [9, 10]
    with pytest.raises(InvalidArgument, match=r"x\.xml: line 3: mapping beyond end"):
        path.write_text(HEAD + DEV.format(1) + single(4, 100) + TAIL)
        load_xml(path)


def test_load_tolerated_forms() -> None:
    """XML declaration, comments, attribute order, <device/>, devices out of order, blank lines."""
    text = ('<?xml version="1.0"?>\n<!-- a comment -->\n'
            '<superblock nr_data_blocks="100" uuid="u-1" time="1" transaction="5" data_block_size="256">\n'
            '  <device dev_id="9" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0"/>\n\n'
            '  <device snap_time="2" creation_time="1" transaction="4" mapped_blocks="3" dev_id="3">\n'
            '    <single_mapping time="7" data_block="1" origin_block="3"/>\n'
            '    <range_mapping length="2" time="1" data_begin="50" origin_begin="10"></range_mapping>\n'
            '  </device>\n</superblock>\n')
    md = load_xml(text)
    assert md.superblock == Superblock(time=1, transaction=5, data_block_size=256, nr_data_blocks=100,
                                       flags=0, version=2, uuid="u-1", metadata_snap=None)
    assert load_xml(text, default_version=1).superblock.version == 1
    assert [d.dev_id for d in md.devices] == [3, 9]
    d = md.devices[0]
    assert (d.mapped_blocks, d.transaction, d.creation_time, d.snap_time) == (3, 4, 1, 2)
    assert d.vblocks.tolist() == [3, 10, 11] and d.dblocks.tolist() == [1, 50, 51] and d.times.tolist() == [7, 1, 1]


def test_load_1x_defs_and_refs() -> None:
    """thin_dump 1.x: shared <def> groups spliced in by <ref>, metadata_snap, no flags attribute."""
    text = ('<superblock uuid="" time="2" transaction="9" version="2" data_block_size="128" '
            'nr_data_blocks="1000" metadata_snap="21">\n'
            '  <def name="33">\n'
            '    <range_mapping origin_begin="0" data_begin="100" length="4" time="0"/>\n'
            '  </def>\n'
            '  <def name="34">\n'
            '    <ref name="33"/>\n'
            '    <single_mapping origin_block="9" data_block="7" time="1"/>\n'
            '  </def>\n'
            '  <device dev_id="1" mapped_blocks="6" transaction="0" creation_time="0" snap_time="1">\n'
            '    <ref name="34"/>\n'
            '    <single_mapping origin_block="20" data_block="500" time="2"/>\n'
            '  </device>\n'
            '  <device dev_id="2" mapped_blocks="5" transaction="1" creation_time="1" snap_time="1">\n'
            '    <ref name="33"/>\n'
            '    <single_mapping origin_block="4" data_block="104" time="2"/>\n'
            '  </device>\n'
            '</superblock>\n')
    md = load_xml(text)
    assert md.superblock.metadata_snap == 21 and md.superblock.flags == 0 and md.superblock.version == 2
    d1, d2 = md.devices
    assert d1.vblocks.tolist() == [0, 1, 2, 3, 9, 20]
    assert d1.dblocks.tolist() == [100, 101, 102, 103, 7, 500]
    assert d1.times.tolist() == [0, 0, 0, 0, 1, 2]
    assert d2.vblocks.tolist() == [0, 1, 2, 3, 4] and d2.dblocks.tolist() == [100, 101, 102, 103, 104]
    # and our writer turns it into 0.9.0 form, runs merged across the ref boundary
    assert '<range_mapping origin_begin="0" data_begin="100" length="4" time="0"/>\n    <single_mapping origin_block="4"' \
        in dump_xml(md)


MAP2 = single(1, 1) + single(2, 2)
BAD_INPUTS = [
    ("unknown tag", HEAD + DEV.format(0) + "    <foo/>\n" + TAIL, 3, "unknown tag <foo>"),
    ("unknown attribute", HEAD + DEV.format(1) + single(1, 1).replace("/>", ' x="1"/>') + TAIL, 3,
     "unknown attribute 'x'"),
    ("missing attribute", HEAD + DEV.format(1) + '    <single_mapping origin_block="1" time="0"/>\n' + TAIL, 3,
     "missing attribute 'data_block'"),
    ("missing sb attribute", HEAD.replace(' transaction="5"', ""), 1, "missing attribute 'transaction'"),
    ("missing device attribute", HEAD + DEV.format(0).replace(' snap_time="0"', "") + TAIL, 2,
     "missing attribute 'snap_time'"),
    ("non-integer", HEAD + DEV.format(1) + single(1, 1).replace('data_block="1"', 'data_block="0x1"') + TAIL, 3,
     "not a non-negative integer"),
    ("negative", HEAD + DEV.format(2) + single(1, 1) + single(2, 2).replace('"2"', '"-2"', 1) + TAIL, 4,
     "not a non-negative integer"),
    ("non-integer range", HEAD + DEV.format(2)
     + '    <range_mapping origin_begin="1" data_begin="1" length="2 " time="0"/>\n' + TAIL, 3,
     "not a non-negative integer"),
    ("non-integer device", HEAD + DEV.format("x") + TAIL, 2, "not a non-negative integer"),
    ("too big for 64 bits", HEAD + DEV.format(1) + single(18446744073709551616, 1) + TAIL, 3, "64 bits"),
    ("beyond data device", HEAD + DEV.format(2) + single(1, 1) + single(2, 100) + TAIL, 4,
     r"mapping beyond end of data device \(100 >= 100\)"),
    ("range beyond data device", HEAD + DEV.format(5)
     + '    <range_mapping origin_begin="0" data_begin="97" length="5" time="0"/>\n' + TAIL, 3,
     r"mapping beyond end of data device \(100 >= 100\)"),
    ("duplicate device", HEAD + DEV.format(0) + "  </device>\n" + DEV.format(0) + TAIL, 4, "duplicate device"),
    ("duplicate mapping", HEAD + DEV.format(2) + single(1, 1) + single(1, 2) + TAIL, 4, "duplicate/overlapping"),
    ("overlapping range", HEAD + DEV.format(4)
     + '    <range_mapping origin_begin="0" data_begin="1" length="3" time="0"/>\n' + single(2, 9) + TAIL, 4,
     "duplicate/overlapping"),
    ("unsorted", HEAD + DEV.format(2) + single(5, 1) + single(2, 2) + TAIL, 4, "unsorted keys"),
    ("block size not multiple of 128", HEAD.replace('"128"', '"100"') + "</superblock>\n", 1, "bad data_block_size 100"),
    ("block size too big", HEAD.replace('"128"', '"4194304"') + "</superblock>\n", 1, "bad data_block_size"),
    ("block size zero", HEAD.replace('"128"', '"0"') + "</superblock>\n", 1, "bad data_block_size"),
    ("dev id too big", HEAD + DEV.format(0).replace('dev_id="1"', 'dev_id="16777216"') + TAIL, 2, r"larger than 16777215 \(2\^24-1\)"),
    ("mapping time too big", HEAD + DEV.format(1) + single(1, 1, 1 << 32) + TAIL, 3, "< 2\\^32"),
    ("device time too big", HEAD + DEV.format(0).replace('snap_time="0"', 'snap_time="4294967296"') + TAIL, 2,
     "out of range"),
    ("mapping in superblock", HEAD + single(1, 1) + "</superblock>\n", 2, "mapping outside a device"),
    ("mapping after device", HEAD + DEV.format(0) + "  </device>\n" + single(1, 1) + "</superblock>\n", 4,
     "mapping outside a device"),
    ("mapping inside mapping", HEAD + DEV.format(1) + single(1, 1).replace("/>", ">") + "  " + single(2, 2)
     + "    </single_mapping>\n" + TAIL, 4, "mapping outside a device"),
    ("device in device", HEAD + DEV.format(0) + DEV.format(0) + "  </device>\n" + TAIL, 3, "directly inside"),
    ("unclosed device", HEAD + DEV.format(0), 3, "<device> opened at line 2 is not closed"),
    ("unclosed superblock", HEAD + DEV.format(0) + "  </device>\n", 4, "<superblock> opened at line 1"),
    ("mismatched tag", HEAD + DEV.format(0) + "  </devic>\n</superblock>\n", 3, "malformed XML: mismatched tag"),
    ("mapped_blocks disagrees", HEAD + DEV.format(3) + MAP2 + TAIL, 2, 'device 1: mapped_blocks="3"'),
    ("zero length range", HEAD + DEV.format(0)
     + '    <range_mapping origin_begin="1" data_begin="1" length="0" time="0"/>\n' + TAIL, 3, "length 0"),
    ("ref to nothing", HEAD + DEV.format(0) + '    <ref name="7"/>\n' + TAIL, 3, "names no <def>"),
    ("stray text", HEAD + DEV.format(2) + MAP2 + "    oops\n" + TAIL, 5, "unexpected text 'oops'"),
    ("two superblocks", HEAD + "</superblock>\n" + HEAD + "</superblock>\n", 3, "malformed XML"),
    ("no superblock", "<device/>\n", 1, "must be directly inside"),
]


@pytest.mark.parametrize("text,line,problem", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_load_rejects_bad_input_naming_the_line(text: str, line: int, problem: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        load_xml(text)
    msg = str(info.value)
    assert re.match(rf"line {line}: ", msg), msg
    assert re.search(problem, msg), msg


def test_duplicate_device_is_also_already_exists() -> None:
    with pytest.raises(AlreadyExists) as info:
        load_xml(HEAD + DEV.format(0) + "  </device>\n" + DEV.format(0) + TAIL)
    assert isinstance(info.value, DuplicateDevice) and isinstance(info.value, InvalidArgument)


# ----------------------------------------------------------------------------------------------
# speed


def big_metadata(n_devices: int = 100, per_device: int = 10_000, seed: int = 0) -> Metadata:
    """*n_devices* × *per_device* mappings, every mapping its own run (the writer's and reader's worst case)."""
    rng = np.random.default_rng(seed)
    devices = []
    for i in range(n_devices):
        v = np.cumsum(rng.integers(2, 100, per_device)).astype(np.uint64)  # gaps: no two mappings merge
        d = rng.integers(0, 10_000_000, per_device).astype(np.uint64)
        t = rng.integers(0, 5, per_device).astype(np.uint32)
        devices.append(Device(i, per_device, 0, 0, 0, v, d, t))
    return Metadata(Superblock(time=5, transaction=1, data_block_size=128, nr_data_blocks=10_000_000), devices)


def test_speed_quarter_million_mappings(tmp_path: pathlib.Path) -> None:
    """Worst-case (all single_mapping) speed on 250k mappings over 25 devices.

    Target: 1M mappings dump in ~1 s and load in a few seconds on an idle machine, i.e. about
    0.25 s and 1 s here; the CPU-time bounds are 4x looser so that a busy CI box does not fail,
    while a per-mapping Python slow path (10x and more) still would.
    """
    md = big_metadata(n_devices=25)
    t0 = time.process_time()
    text = dump_xml(md)
    dump_s = time.process_time() - t0
    assert text.count("\n") == 250_000 + 2 * 25 + 2
    path = tmp_path / "big.xml"
    path.write_text(text)
    del text
    t0 = time.process_time()
    back = load_xml(path)
    load_s = time.process_time() - t0
    assert_same_ir(back, md)
    assert dump_s < 1.0, f"dump_xml took {dump_s:.2f}s CPU for 250k mappings"
    assert load_s < 4.0, f"load_xml took {load_s:.2f}s CPU for 250k mappings"
