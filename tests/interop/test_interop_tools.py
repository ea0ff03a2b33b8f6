"""thin_ls / thin_delta / thin_rmap / thin_metadata_size equivalents against the real 0.9.0 tools.

Random IRs (the strategy from ``test_interop_xml.py``) go through our XML writer and
``thin_restore`` into binary metadata; every tool's stdout must then equal ours byte for byte.
"""

from __future__ import annotations

import subprocess
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import require_tool, soak_examples
from tests.interop.test_interop_xml import make_device, metadata_irs, restore
from thinpool.errors import InvalidArgument, NotFound
from thinpool.interop.ir import Metadata, Superblock
from thinpool.interop.thin_delta import delta, format_delta
from thinpool.interop.thin_ls import DEFAULT_LS_FIELDS, LS_FIELDS, exclusive_blocks, format_ls, human_size, ls_rows
from thinpool.interop.thin_metadata_size import BLOCK_SIZE_MESSAGE, format_metadata_size, metadata_size_blocks
from thinpool.interop.thin_rmap import _libstdcxx_sort, format_rmap, parse_region, rmap
from thinpool.interop.xml import dump_xml

ALL_FIELDS = ",".join(LS_FIELDS)
TOOLS = ("thin_restore", "thin_ls", "thin_delta", "thin_rmap")


def run_all(cmds: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run read-only tool invocations concurrently (each costs ~40 ms of mostly waiting)."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    out = []
    for c, p in zip(cmds, procs):
        stdout, stderr = p.communicate()
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    return out


def ls_cmds(meta: str) -> list[tuple[list[str], str]]:
    return [(["thin_ls", "-o", ALL_FIELDS, meta], "all"), (["thin_ls", meta], "default"),
            (["thin_ls", "--no-headers", "-o", ALL_FIELDS, meta], "all-nh"),
            (["thin_ls", "--no-headers", meta], "default-nh")]


def ours_ls(md: Metadata, which: str) -> str:
    fields = ALL_FIELDS if which.startswith("all") else None
    return format_ls(md, fields, headers=not which.endswith("-nh"))


# ----------------------------------------------------------------------------------------------
# everything at once against the real tools


@pytest.mark.realtools
@settings(max_examples=soak_examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(md=metadata_irs(), data=st.data())
def test_tools_match_real_tools(md: Metadata, data: st.DataObject) -> None:
    require_tool(*TOOLS)
    ids = [d.dev_id for d in md.devices]
    pairs = []
    if ids:
        for _ in range(2):
            pairs.append((data.draw(st.sampled_from(ids)), data.draw(st.sampled_from(ids))))
    nr = md.superblock.nr_data_blocks
    region_sets = [[(0, nr)]]
    region_sets.append([
        (b, b + data.draw(st.integers(1, 60)))
        for b in data.draw(st.lists(st.integers(0, nr - 1), min_size=1, max_size=3))
    ])
    with tempfile.TemporaryDirectory() as tmp:
        meta = restore(dump_xml(md, emit_metadata_snap=True), tmp)
        jobs = ls_cmds(meta)
        for left, right in pairs:
            for verbose in (False, True):
                cmd = ["thin_delta", "--thin1", str(left), "--thin2", str(right)]
                jobs.append((cmd + ["--verbose"] * verbose + [meta], ("delta", left, right, verbose)))
        for regions in region_sets:
            cmd = ["thin_rmap"] + [a for b, e in regions for a in ("--region", f"{b}..{e}")] + [meta]
            jobs.append((cmd, ("rmap", regions)))
        results = run_all([c for c, _ in jobs])
    for (cmd, what), res in zip(jobs, results):
        assert res.returncode == 0, (cmd, res.stderr)
        if isinstance(what, str):
            ours = ours_ls(md, what)
        elif what[0] == "delta":
            ours = format_delta(md, what[1], what[2], what[3])
        else:
            ours = format_rmap(md, what[1])
        assert ours == res.stdout, cmd


# ----------------------------------------------------------------------------------------------
# thin_ls


def pool_with_sharing() -> Metadata:
    """dev 1 = origin, dev 2 = its snapshot with two blocks rewritten, dev 3 empty, dev 4 maps a block twice."""
    origin = {v: (10 + v, 0) for v in range(10)}
    snap = dict(origin)
    snap[3] = (50, 1)
    snap[4] = (51, 1)
    snap[30] = (60, 1)
    return Metadata(Superblock(time=2, transaction=7, data_block_size=128, nr_data_blocks=1000), [
        make_device(1, origin, transaction=1), make_device(2, snap, transaction=5, creation_time=1, snap_time=1),
        make_device(3, {}), make_device(4, {0: (70, 1), 1: (70, 1), 2: (71, 1)}),
    ])


def test_ls_rows_values() -> None:
    md = pool_with_sharing()
    assert exclusive_blocks(md) == [2, 3, 0, 1]
    rows = ls_rows(md, LS_FIELDS)
    assert rows[0] == {
        "DEV": 1, "MAPPED_BLOCKS": 10, "EXCLUSIVE_BLOCKS": 2, "SHARED_BLOCKS": 8,
        "MAPPED_SECTORS": 1280, "EXCLUSIVE_SECTORS": 256, "SHARED_SECTORS": 1024,
        "MAPPED_BYTES": 655360, "EXCLUSIVE_BYTES": 131072, "SHARED_BYTES": 524288,
        "MAPPED": "640KiB", "EXCLUSIVE": "128KiB", "SHARED": "512KiB",
        "TRANSACTION": 1, "CREATE_TIME": 0, "SNAP_TIME": 0,
    }
    assert [r["SHARED_BLOCKS"] for r in rows] == [8, 8, 0, 2]
    assert ls_rows(md) == [{"DEV": 1, "MAPPED": "640KiB", "CREATE_TIME": 0, "SNAP_TIME": 0},
                           {"DEV": 2, "MAPPED": "704KiB", "CREATE_TIME": 1, "SNAP_TIME": 1},
                           {"DEV": 3, "MAPPED": "0", "CREATE_TIME": 0, "SNAP_TIME": 0},
                           {"DEV": 4, "MAPPED": "192KiB", "CREATE_TIME": 0, "SNAP_TIME": 0}]
    assert tuple(DEFAULT_LS_FIELDS) == ("DEV", "MAPPED", "CREATE_TIME", "SNAP_TIME")
    assert format_ls(md, "DEV,TRANSACTION", headers=False) == "1 1 \n2 5 \n3 0 \n4 0 \n"
    assert format_ls(md, "DEV,") == "DEV \n  1 \n  2 \n  3 \n  4 \n"
    assert format_ls(md, "") == ""


@pytest.mark.parametrize("fields", ["FOO", "DEV,,MAPPED", ",DEV", "dev", "DEV_ID"])
def test_ls_unknown_field(fields: str) -> None:
    with pytest.raises(InvalidArgument, match="unknown field"):
        format_ls(pool_with_sharing(), fields)


@pytest.mark.realtools
def test_ls_field_parsing_and_sizes_match_tool() -> None:
    """Field-list quirks (repeats, trailing comma, empty list, unknown) and big human sizes."""
    require_tool(*TOOLS)
    counts = [0, 1, 2, 3, 5, 8, 9, 1023, 1024, 1025, 5000, 9000]
    devices = []
    base = 0
    for i, n in enumerate(counts):
        devices.append(make_device(i, {v: (base + v, 0) for v in range(n)}))
        base += n
    for bs in (128, 2097152):
        md = Metadata(Superblock(time=0, transaction=0, data_block_size=bs, nr_data_blocks=base + 10), devices)
        with tempfile.TemporaryDirectory() as tmp:
            meta = restore(dump_xml(md), tmp, size=16 << 20)
            fields = ["DEV,DEV,MAPPED", "SHARED,MAPPED_BYTES,", "", "MAPPED,EXCLUSIVE,SHARED,MAPPED_SECTORS", "BOGUS"]
            results = run_all([["thin_ls", "-o", f, meta] for f in fields] + [c for c, _ in ls_cmds(meta)])
        for f, res in zip(fields, results):
            if res.returncode:
                assert "unknown field" in res.stderr
                with pytest.raises(InvalidArgument, match="unknown field"):
                    format_ls(md, f)
            else:
                assert format_ls(md, f) == res.stdout, f
        for (_, which), res in zip(ls_cmds("m"), results[len(fields):]):
            assert ours_ls(md, which) == res.stdout


@pytest.mark.parametrize("nbytes,text", [
    (0, "0"), (3072, "3072"), (7680, "7680"), (8192, "8192"), (8704, "9KiB"), (10752, "11KiB"),
    (17920, "18KiB"), (23040, "23KiB"), (26112, "26KiB"), (196608, "192KiB"), (283136, "277KiB"),
    (524800, "513KiB"), (1048064, "1024KiB"), (1048576, "1024KiB"), (1049088, "1024KiB"),
    (1114112, "1088KiB"), (8389120, "8192KiB"), (18034176, "17MiB"), (102134784, "97MiB"),
    (1310720000, "1250MiB"), (7516192768, "7168MiB"), (17179869184, "16GiB"), (1098437885952, "1023GiB"),
    (151568322134016, "138TiB"), (9006099743113216, "8191TiB"), (9355744440745984, "8PiB"),
    (26402572717785088, "23PiB"),
])
def test_human_size_table(nbytes: int, text: str) -> None:
    """Values observed from thin_ls 0.9.0 (sizes from mapped blocks × block sizes 1 to 2^31 sectors)."""
    assert human_size(nbytes) == text


# ----------------------------------------------------------------------------------------------
# thin_delta


def test_delta_records_and_text() -> None:
    sb = Superblock(time=1, transaction=5, data_block_size=128, nr_data_blocks=1000)
    left = {**{v: (10 + v, 0) for v in range(5)}, **{5 + v: (100 + v, 0) for v in range(5)},
            **{20 + v: (300 + v, v // 3) for v in range(6)}}
    right = {**{v: (200 + v, 0) for v in range(10)}, **{20 + v: (300 + v, 0) for v in range(6)},
             **{30 + v: (400 + v, 0) for v in range(4)}}
    md = Metadata(sb, [make_device(0, left), make_device(1, right)])
    assert delta(md, 0, 1) == [
        {"kind": "different", "begin": 0, "length": 5, "left_data_begin": 10, "right_data_begin": 200},
        {"kind": "different", "begin": 5, "length": 5, "left_data_begin": 100, "right_data_begin": 205},
        {"kind": "same", "begin": 20, "length": 6, "data_begin": 300},
        {"kind": "right_only", "begin": 30, "length": 4, "data_begin": 400},
    ]
    head = '<superblock uuid="" time="1" transaction="5" data_block_size="128" nr_data_blocks="1000">\n'
    assert format_delta(md, 0, 1) == head + (
        '  <diff left="0" right="1">\n'
        '    <different begin="0" length="10"/>\n'
        '    <same begin="20" length="6"/>\n'
        '    <right_only begin="30" length="4"/>\n'
        '  </diff>\n</superblock>\n')
    assert format_delta(md, 0, 1, verbose=True) == head + (
        '  <diff left="0" right="1">\n'
        '    <different>\n'
        '      <range begin="0" left_data_begin="10" right_data_begin="200" length="5"/>\n'
        '      <range begin="5" left_data_begin="100" right_data_begin="205" length="5"/>\n'
        '    </different>\n'
        '    <same>\n'
        '      <range begin="20" data_begin="300" length="6"/>\n'
        '    </same>\n'
        '    <right_only>\n'
        '      <range begin="30" data_begin="400" length="4"/>\n'
        '    </right_only>\n'
        '  </diff>\n</superblock>\n')
    md.superblock.metadata_snap = 12
    assert format_delta(md, 1, 1).startswith(head.replace('">', '" metadata_snap="12">'))
    empty = Metadata(sb, [make_device(0, {}), make_device(1, {})])
    assert format_delta(empty, 0, 1, verbose=True).endswith('<diff left="0" right="1">\n  </diff>\n</superblock>\n')


@pytest.mark.realtools
@pytest.mark.parametrize("left,right", [(9, 1), (1, 9), (8, 9)])
def test_delta_missing_device_matches_tool(left: int, right: int) -> None:
    require_tool(*TOOLS)
    md = pool_with_sharing()
    with tempfile.TemporaryDirectory() as tmp:
        meta = restore(dump_xml(md), tmp)
        res = run_all([["thin_delta", "--thin1", str(left), "--thin2", str(right), meta]])[0]
    assert res.returncode == 1
    with pytest.raises(NotFound) as info:
        format_delta(md, left, right)
    assert res.stderr.splitlines()[0] == str(info.value)
    with pytest.raises(NotFound):
        delta(md, left, right)


# ----------------------------------------------------------------------------------------------
# thin_rmap


def test_rmap_records() -> None:
    md = pool_with_sharing()
    assert rmap(md, [(10, 14), (50, 52)]) == [
        {"data_begin": 10, "data_end": 14, "dev_id": 1, "thin_begin": 0, "thin_end": 4},
        {"data_begin": 10, "data_end": 13, "dev_id": 2, "thin_begin": 0, "thin_end": 3},
        {"data_begin": 50, "data_end": 52, "dev_id": 2, "thin_begin": 3, "thin_end": 5},
    ]
    assert format_rmap(md, ["70..72"]) == ("data 70..71 -> thin(4) 0..1\ndata 70..72 -> thin(4) 1..3\n")
    assert format_rmap(md, [(900, 999)]) == ""
    with pytest.raises(InvalidArgument, match=r"^No regions provided\.$"):
        rmap(md, [])
    with pytest.raises(InvalidArgument, match=r"end <= begin"):
        rmap(md, [(5, 5)])


def test_libstdcxx_sort_sorts() -> None:
    rng = np.random.default_rng(1)
    for n in (0, 1, 2, 16, 17, 100, 1000):
        keys = rng.integers(0, max(1, n // 4), n).tolist()
        perm = _libstdcxx_sort(keys)
        assert sorted(perm) == list(range(n))
        assert [keys[i] for i in perm] == sorted(keys)
    many_equal = [5] * 300 + [1] * 300  # exercise partitioning around equal pivots
    assert [many_equal[i] for i in _libstdcxx_sort(many_equal)] == sorted(many_equal)


def snapshot_farm(n_devices: int, seed: int) -> Metadata:
    """Many devices sharing the same data blocks, fragmented differently: many rmap ties."""
    rng = np.random.default_rng(seed)
    devices = []
    for i in range(n_devices):
        m = {}
        for v in range(120):
            if rng.random() < 0.15:
                continue  # a hole
            m[v] = (v if rng.random() < 0.8 else 500 + int(rng.integers(0, 40)), int(rng.integers(0, 2)))
        devices.append(make_device(i * 3 + 1, m))
    return Metadata(Superblock(time=1, transaction=1, data_block_size=128, nr_data_blocks=1000), devices)


@pytest.mark.realtools
@pytest.mark.parametrize("n_devices,seed", [(5, 0), (25, 1), (60, 2)])
def test_rmap_ties_match_tool(n_devices: int, seed: int) -> None:
    """Hundreds of records with equal data blocks: the order is whatever std::sort leaves."""
    require_tool(*TOOLS)
    md = snapshot_farm(n_devices, seed)
    region_sets = [[(0, 1000)], [(0, 3)], [(10, 20), (500, 540), (15, 30)]]
    with tempfile.TemporaryDirectory() as tmp:
        meta = restore(dump_xml(md), tmp)
        cmds = [["thin_rmap"] + [a for b, e in rs for a in ("--region", f"{b}..{e}")] + [meta] for rs in region_sets]
        results = run_all(cmds)
    for rs, res in zip(region_sets, results):
        assert res.returncode == 0, res.stderr
        assert format_rmap(md, rs) == res.stdout, rs


REGIONS = ["5..5", "5", "", "..", "a..b", "5..b", "5...10", "9..7", "5.", "99999999999999999999..5",
           "5..99999999999999999999", "-5..10", "0x5..10", "5..7x", " 5..7", "5.. 7", "+5..+10", "5..-1", "5..10..20"]


@pytest.mark.realtools
def test_parse_region_matches_tool() -> None:
    require_tool(*TOOLS)
    md = pool_with_sharing()
    with tempfile.TemporaryDirectory() as tmp:
        meta = restore(dump_xml(md), tmp)
        results = run_all([["thin_rmap", "--region", r, meta] for r in REGIONS] + [["thin_rmap", meta]])
    for r, res in zip(REGIONS, results):
        if res.returncode:
            with pytest.raises(InvalidArgument) as info:
                parse_region(r)
            assert res.stderr.splitlines()[0] == str(info.value), r
        else:
            assert format_rmap(md, [parse_region(r)]) == res.stdout, r
    assert results[-1].returncode == 1 and results[-1].stderr.startswith("No regions provided.")
    assert parse_region("5..-1") == (5, (1 << 64) - 1)


# ----------------------------------------------------------------------------------------------
# thin_metadata_size

SIZE_CASES = [
    ("64k", "1t", "1000", None, False), ("128", "2097152", "10", "k", False),
    ("128", "2097152", "10", "m", "short"), ("128", "2097152", "10", "m", "long"),
    ("128", "2097152", "10", "m", "s"), ("128", "2097152", "10", "m", "lo"), ("128", "2097152", "10", "m", True),
    ("64k", "1t", "1", "g", "lo"), ("64k", "1t", "1", "G", True), ("64k", "1T", "1", None, False),
    ("64k", "1t", "1", "b", True), ("64k", "1t", "1", "", False), ("64k", "1t", "1", "bytes", "short"),
    ("128", "2097152", "10", "Z", False), ("128", "2097152", "10", "Y", False), ("128", "2097152", "10", "y", False),
    ("128", "2097152", "10", "e", True), ("128", "2097152", "10", "E", "short"), ("1000b", "2097152", "10", None, False),
    ("64kibi", "1petabytes", "1mega", None, False), ("64k", "1t", "1k", None, False), ("64k", "1t", "1kilo", "t", True),
    ("64k", "1t", "99999999999999999999", None, False), ("1m", "100g", "7", "mebi", "long"),
    ("512b", "1M", "3", "s", False), ("1g", "1p", "1000000", "p", True), ("128", "129", "1", None, False),
    # errors
    ("100", "2097152", "10", None, False), ("64K", "1T", "1", None, False), ("64k", "64k", "1", None, False),
    ("64k", "32k", "1", None, False), ("64x", "1t", "1", None, False), ("64k", "1t", "1", "q", False),
    ("64k", "1t", "1", "kibi", "foo"), ("64k", "1t", "1", None, ""), ("", "1t", "1", None, False),
    ("64k", "", "1", None, False), ("64k", "1t", "", None, False), ("64k", "1t", "0x", None, False),
    ("64KB", "1t", "1", None, False), ("100b", "1t", "1", None, False), ("64k", "1t", "1", "xx", False),
]


def size_argv(b: str, s: str, m: str, u: str | None, n: bool | str) -> list[str]:
    argv = ["thin_metadata_size", "-b", b, "-s", s, "-m", m]
    if u is not None:
        argv += ["-u", u]
    if n is True:
        argv.append("-n")
    elif isinstance(n, str):
        argv.append("-n" + n) if n else argv.append("--numeric-only=")
    return argv


@pytest.mark.realtools
def test_metadata_size_matches_tool() -> None:
    require_tool("thin_metadata_size")
    results = run_all([size_argv(*case) for case in SIZE_CASES])
    for case, res in zip(SIZE_CASES, results):
        b, s, m, u, n = case
        if res.returncode == 0:
            assert format_metadata_size(b, s, m, unit=u, numeric=n) == res.stdout, case
        else:
            with pytest.raises(InvalidArgument) as info:
                format_metadata_size(b, s, m, unit=u, numeric=n)
            if str(info.value).startswith(BLOCK_SIZE_MESSAGE):  # ours goes on to say what else is accepted
                assert res.stderr == f"thin_metadata_size - {BLOCK_SIZE_MESSAGE}\n", case
            else:
                assert res.stderr == f"thin_metadata_size - {info.value}\n", case


@pytest.mark.realtools
@pytest.mark.parametrize("block,pool,thins", [
    (64 << 10, 1 << 40, 1000), (65536, 10 << 30, 1), (1 << 30, 1 << 50, 100000), (4096, 8192, 1),
    (512 << 10, 3 * 10**12, 77),
])
def test_metadata_size_blocks_matches_tool(block: int, pool: int, thins: int) -> None:
    require_tool("thin_metadata_size")
    res = run_all([["thin_metadata_size", "-b", f"{block}b", "-s", f"{pool}b", "-m", str(thins), "-n", "-u", "s"]])[0]
    assert res.returncode == 0, res.stderr
    assert metadata_size_blocks(block, pool, thins) * 8 == int(res.stdout)
    assert format_metadata_size(f"{block}b", f"{pool}b", thins, unit="b", numeric=True) == \
        f"{metadata_size_blocks(block, pool, thins) * 4096}\n"


def test_metadata_size_blocks_formula_and_errors() -> None:
    assert metadata_size_blocks(64 << 10, 1 << 40, 1000) == 1073224 // 8 == 1 + 133152 + 1000
    with pytest.raises(InvalidArgument, match=r"block size must be 2\^\^N \(or a multiple of 64KiB from 64KiB to 1GiB"):
        metadata_size_blocks(96 << 10, 1 << 40, 1)
    for args, msg in [((0, 1 << 40, 1), "block size required!"),
                      ((64 << 10, 0, 1), "pool size required!"), ((64 << 10, 1 << 40, 0), "max thins required!"),
                      ((64 << 10, 64 << 10, 1), "pool size must be larger than block size")]:
        with pytest.raises(InvalidArgument) as info:
            metadata_size_blocks(*args)
        assert str(info.value) == msg


@pytest.mark.realtools
def test_kernel_rule_metadata_size_accepts_every_pool_block_size() -> None:
    """dm-thin accepts any multiple of 64 KiB from 64 KiB to 1 GiB as a data block size
    (DATA_DEV_BLOCK_SIZE_MIN/MAX_SECTORS); `thinpool metadata-size` estimates for all of them, with the
    tool's output wherever thin_metadata_size accepts the size (powers of two), its formula elsewhere."""
    require_tool("thin_metadata_size")
    from thinpool.rules import check_block_size
    sizes = [k * (64 << 10) for k in range(1, (1 << 30) // (64 << 10) + 1)]
    pool, thins = 3 << 40, 1000
    for bs in sizes:
        assert check_block_size(bs) == bs
        sectors = bs // 512
        assert metadata_size_blocks(bs, pool, thins) == 1 + 2 * (pool // 512) // sectors // 252 + thins, bs
    # every power of two among them, and a spread of the others, against the real tool (-u b, -n: bytes)
    powers = [bs for bs in sizes if bs & (bs - 1) == 0]
    others = [bs for bs in sizes if bs & (bs - 1)][::1500] + [192 << 10, (1 << 30) - (64 << 10)]
    cases = [(f"{bs}b", f"{pool}b", str(thins)) for bs in powers + others]
    results = run_all([["thin_metadata_size", "-b", b, "-s", s, "-m", m, "-u", "b", "-n"] for b, s, m in cases])
    assert len(powers) == 15
    for (b, s, m), res in zip(cases, results):
        bs = int(b[:-1])
        ours = format_metadata_size(b, s, m, unit="b", numeric=True)
        assert ours == f"{metadata_size_blocks(bs, pool, thins) * 4096}\n"
        if bs & (bs - 1) == 0:
            assert res.returncode == 0 and res.stdout == ours, (b, res.stderr)
        else:  # the tool refuses what is not a power of two; a pool takes it, and so do we
            assert res.returncode != 0 and res.stderr == f"thin_metadata_size - {BLOCK_SIZE_MESSAGE}\n"
    # the CLI verb takes them too
    from click.testing import CliRunner
    from thinpool.cli import main
    res = CliRunner().invoke(main, ["metadata-size", "-b", "192k", "-s", f"{pool}b", "-m", str(thins), "-u", "b", "-n"])
    assert res.exit_code == 0 and res.stdout == f"{metadata_size_blocks(192 << 10, pool, thins) * 4096}\n"
    # outside the pool's rule and not a power of two: refused, naming both rules
    for bad in (96 << 10, 100 * 512, (1 << 30) + (64 << 10) * 3):
        with pytest.raises(InvalidArgument, match="multiple of 64KiB from 64KiB to 1GiB"):
            metadata_size_blocks(bad, pool, thins)
