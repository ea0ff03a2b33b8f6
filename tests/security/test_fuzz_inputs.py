"""Generated and hand-made hostile input at every door: CLI numbers and names, size strings, thin_*
number syntax, XML attributes, scenario TOML and sweeps, trace paths, control-socket JSON, image JSON,
the report outputs of replay/simulate.

The rule checked everywhere: bad input gets a clear error from :mod:`thinpool.errors` naming the
problem (never a traceback, a hang or an allocation the size of the input's claim), and leaves the
pool byte-for-byte as it was.  Each regression below was a traceback, a hang or a damaged pool before.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import require_tool, soak_examples
from thinpool import Pool
from thinpool.cli import main
from thinpool.cli.registry import op_table
from thinpool.control.args import _signature
from thinpool.control.server import handle_request
from thinpool.errors import ImageError, InvalidArgument, ThinpoolError, TraceError
from thinpool.interop.thin_metadata_size import format_metadata_size
from thinpool.interop.thin_rmap import parse_region
from thinpool.interop.xml import dump_xml, load_xml
from thinpool.simulate import parse_scenario, run
from thinpool.simulate.schedule import Every
from thinpool.simulate.sweeps import points
from thinpool.simulate.traces import open_trace
from thinpool.units import parse_size

BS = 64 << 10
EXAMPLES = soak_examples(40)  # 400 under THINPOOL_SOAK=1 (THINPOOL_EXAMPLES_FACTOR)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HUGE = "9" * 5000   # past Python's 4,300-digit limit of int(): ValueError, not a ThinpoolError, if unchecked


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(*args: str, input: bytes | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=True)


def assert_clean_refusal(result, *words: str) -> None:
    """Exit 1 (an error of thinpool.errors) or 2 (a usage error), one message naming the problem."""
    assert result.exit_code in (1, 2), (result.exit_code, result.output[-500:])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for w in words:
        assert w in result.output, (w, result.output[-500:])


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    p = tmp_path / "pool"
    with Pool.create(p, data_size="16MiB") as pl:
        pl.create_thin("base", "4MiB").write(0, b"\x5a" * BS)
        pl.snapshot("base", "snap")
    return p


# ====================================================================================== sizes
@FUZZ
@given(st.one_of(st.text(max_size=40), st.from_regex(r"\A\s*[0-9]{0,30}(\.[0-9]{0,60})?\s*[kKmMgGtTpPsb]?(i?[bB])?\s*\Z")))
def test_rule_a_size_string_is_a_size_or_invalid_argument(text: str) -> None:
    try:
        value = parse_size(text)
    except InvalidArgument:
        return
    assert isinstance(value, int) and value >= 0


@pytest.mark.parametrize("text, words", [
    (HUGE, "too large"), ("0" * 5000 + "1K", None), ("1." + "0" * 100_000 + "1G", "not a whole number"),
    ("1." + "0" * 5000 + "G", None), ("1" + "x" * 5000, "unknown unit"), ("0.0009765625K", None)],
    ids=["digits", "leading-zeros", "long-fraction", "trailing-zeros", "long-unit", "fraction-of-a-unit"])
def test_rule_size_strings_of_thousands_of_digits_are_refused_by_name(text: str, words: str | None) -> None:
    if words is None:
        assert parse_size(text) in (1024, 1 << 30, 1)
        return
    with pytest.raises(InvalidArgument, match=words) as exc:
        parse_size(text)
    assert len(str(exc.value)) < 300  # the message quotes the value cut short, not 100,000 characters


def test_rule_cli_numbers_of_thousands_of_digits_leave_the_pool_unchanged(pool: Path) -> None:
    before = sha(pool / "metadata")
    for args, words in [(("create-thin", str(pool), "v", HUGE), ("too large",)),
                        (("resize", str(pool), HUGE), ("too large",)),
                        (("write", str(pool), "base", "--offset", HUGE), ("too large",)),
                        (("discard", str(pool), "base", "--length", "1." + "0" * 9000 + "1"), ("whole number",)),
                        (("rmap", str(pool), "-r", "0.." + HUGE), ("badly formed region",)),
                        (("set-transaction-id", str(pool), "0", HUGE), ()),
                        (("metadata-size", "-b", "64k", "-s", HUGE, "-m", "1"), ("estimated metadata",))]:
        result = cli(*args, input=b"x")
        if args[0] == "metadata-size":  # thin_metadata_size saturates the number, as atoll does
            assert result.exit_code == 0 and "Traceback" not in result.output, result.output[-300:]
            continue
        assert_clean_refusal(result, *words)
    assert sha(pool / "metadata") == before


def test_rule_thin_tool_numbers_of_any_length_parse_as_the_tools_do() -> None:
    assert parse_region("0..00000000000000000000000000018446744073709551615") == (0, (1 << 64) - 1)
    for text in ("0.." + HUGE, "0..18446744073709551616", HUGE + "..1"):
        with pytest.raises(InvalidArgument, match="badly formed region"):
            parse_region(text)
    saturated = format_metadata_size("64k", HUGE, "1", numeric=True)
    assert saturated == format_metadata_size("64k", str((1 << 63) - 1), "1", numeric=True)


# ====================================================================================== XML
@pytest.mark.parametrize("where", ["time", "origin_block", "nr_data_blocks"])
def test_rule_xml_numbers_of_thousands_of_digits_are_refused_naming_the_line(tmp_path: Path, where: str) -> None:
    attrs = {"time": "0", "nr_data_blocks": "1024", "origin_block": "0"}
    attrs[where] = HUGE
    text = (f'<superblock uuid="" time="{attrs["time"]}" transaction="0" flags="0" version="2" '
            f'data_block_size="128" nr_data_blocks="{attrs["nr_data_blocks"]}">\n'
            f'<device dev_id="1" mapped_blocks="1" transaction="0" creation_time="0" snap_time="0">\n'
            f'<single_mapping origin_block="{attrs["origin_block"]}" data_block="0" time="0"/>\n'
            f'</device></superblock>\n')
    with pytest.raises(InvalidArgument, match=r"line \d+: attribute .*(out of range|does not fit)") as exc:
        load_xml(text)
    assert len(str(exc.value)) < 300
    xml = tmp_path / "x.xml"
    xml.write_text(text)
    assert_clean_refusal(cli("restore", str(tmp_path / "new"), "-i", str(xml)), "line")
    assert not (tmp_path / "new").exists()


# ====================================================================================== transaction ids
def test_kernel_rule_transaction_ids_are_unsigned_64_bit_in_every_record(tmp_path: Path) -> None:
    """dm-thin's set_transaction_id takes any u64, and a device's details store the id of its
    creation as a __le64: a pool whose id is 2^63 or more still creates and snapshots volumes, and
    reports, dumps and restores the id unsigned (it was stored into an int64 field and raised)."""
    top = (1 << 64) - 1
    p = tmp_path / "p"
    with Pool.create(p, data_size="16MiB") as pl:
        pl.create_thin("a", "1MiB")
        pl.set_transaction_id(0, top)
        pl.create_thin("b", "1MiB").write(0, b"b" * BS)
        pl.snapshot("b", "s")
        assert [pl.thin(n).transaction for n in ("a", "b", "s")] == [0, top, top]
    with Pool.open(p) as pl:
        assert pl.transaction_id == top and pl.thin("s").transaction == top
    listing = json.loads(cli("ls", str(p), "-o", "DEV,TRANSACTION", "--json").output)
    assert [row["TRANSACTION"] for row in listing] == [0, top, top]
    dumped = cli("dump", str(p)).output
    assert dumped.count(f'transaction="{top}"') == 3
    xml = tmp_path / "d.xml"
    xml.write_text(dumped)
    assert cli("restore", str(tmp_path / "r"), "-i", str(xml)).exit_code == 0
    assert cli("dump", str(tmp_path / "r")).output == dumped
    require_tool("thin_dump", "thin_check")
    import subprocess
    md = tmp_path / "md.bin"
    assert cli("export-metadata", str(p), str(md)).exit_code == 0
    subprocess.run(["thin_check", str(md)], check=True, capture_output=True)
    assert subprocess.run(["thin_dump", str(md)], check=True, capture_output=True, text=True).stdout == dumped


def test_kernel_rule_low_water_mark_is_an_unsigned_64_bit_block_count(tmp_path: Path) -> None:
    for bad in (1 << 64, 10 ** 5000, -1, True, 1.0):
        with pytest.raises(InvalidArgument, match="low water mark") as exc:
            Pool.create(tmp_path / "p", data_size="16MiB", low_water_mark=bad)
        assert len(str(exc.value)) < 200 and not (tmp_path / "p").exists()
    assert_clean_refusal(cli("create", str(tmp_path / "p"), "--low-water-mark", str(1 << 64)), "low water mark")
    assert not (tmp_path / "p").exists()
    Pool.create(tmp_path / "p", data_size="16MiB", low_water_mark=(1 << 64) - 1).close()


# ====================================================================================== scenarios
SCENARIO = """\
[pool]
data_size = "256MiB"
metadata_only = true
[simulation]
sample_every = 500
[[volume]]
name = "db"
size = "32MiB"
trace = "TRACE"
snapshot_every = 400
keep = 2
"""


@pytest.fixture()
def trace(tmp_path: Path) -> Path:
    t = tmp_path / "w.iolog"
    t.write_text("fio version 2 iolog\n/dev/x add\n/dev/x open\n/dev/x write 0 4096\n/dev/x write 65536 4096\n"
                 "/dev/x close\n")
    return t


@pytest.mark.parametrize("old, new, words", [
    ("keep = 2", 'keep = "\u00b2"', "keep: expected a non-negative integer"),
    ("keep = 2", f'keep = "{HUGE}"', "keep: expected a non-negative integer"),
    ("keep = 2", f"keep = {HUGE}", "an integer of more than 4,300 digits"),
    ("keep = 2", "keep = 99999999999999999999999", "keep: 77-bit integer is too large"),
    ("metadata_only = true", "metadata_only = true\nlow_water_mark = 99999999999999999999999", "low_water_mark"),
    ("snapshot_every = 400", 'snapshot_every = "\u00b2"', "snapshot_every: expected a number of I/Os"),
    ("snapshot_every = 400", f'snapshot_every = "{HUGE}"', r"snapshot_every: 9+\.\.\. is too large \(5000 digits\)"),
    ("sample_every = 500", "sample_every = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("keep = 2", "keep = 2\nx = " + "{a = " * 3000 + "1" + "}" * 3000, "nested too deeply"),
    ('trace = "TRACE"', 'trace = "TR\\u0000ACE"', "trace: a path cannot contain NUL"),
], ids=["superscript-digit", "digits-string", "digits-toml", "past-2^63", "low-water-mark", "every-superscript",
        "every-digits", "deep-array", "deep-table", "nul-path"])
def test_rule_scenario_values_are_type_checked_and_bounded_by_key(trace: Path, old: str, new: str,
                                                                   words: str) -> None:
    text = SCENARIO.replace(old, new).replace("TRACE", str(trace))
    with pytest.raises(InvalidArgument, match=words) as exc:
        parse_scenario(text, "sc.toml")
    assert len(str(exc.value)) < 400


def test_rule_scenario_offset_scale_past_any_volume_names_the_record(trace: Path) -> None:
    text = SCENARIO.replace("keep = 2", "keep = 2\noffset_scale = 1e300").replace("TRACE", str(trace))
    with pytest.raises(InvalidArgument, match=rf"{trace}:5: offset 65536 times offset_scale 1e\+300"):
        run(parse_scenario(text, "sc.toml"))


@FUZZ
@given(st.one_of(st.text(max_size=30), st.integers(min_value=-(1 << 70), max_value=1 << 70), st.floats(),
                 st.booleans(), st.none()))
def test_rule_an_interval_is_an_interval_or_invalid_argument(value: Any) -> None:
    try:
        every = Every.parse(value, "snapshot_every")
    except InvalidArgument:
        return
    assert every is None or (every.ios or 0) >= 1 or every.seconds > 0


def test_rule_a_huge_sweep_is_refused_before_its_product_is_built(trace: Path, monkeypatch) -> None:
    """7 keys of 100 values: 10^14 points, refused by counting (building the list first never ended:
    the product is refused here outright, so a regression fails instead of exhausting memory)."""
    import thinpool.simulate.sweeps as sweeps_module

    def no_product(*_args: Any) -> Any:
        raise AssertionError("the product of a sweep over the limit was built")
    monkeypatch.setattr(sweeps_module.itertools, "product", no_product)
    s = parse_scenario(SCENARIO.replace("TRACE", str(trace)), "sc.toml")
    sweeps = {k: [str(i) for i in range(1, 101)] for k in ("keep", "pool.low_water_mark", "sample_every",
                                                           "snapshot_every", "time_offset", "offset_scale",
                                                           "pool.no_space_timeout")}
    with pytest.raises(InvalidArgument, match="a sweep of 100,000,000,000,000 runs is too many"):
        points(s, sweeps)


# ====================================================================================== trace files
@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_rule_a_trace_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "t"
    if kind == "fifo":
        os.mkfifo(path)
        # if the open ever blocks again, this writer unblocks it after a while: the test then fails on
        # the message instead of hanging the suite
        def unblock() -> None:
            if not done.wait(20):
                with open(path, "wb"):
                    pass
        done = threading.Event()
        threading.Thread(target=unblock, daemon=True).start()
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path.mkdir()
    try:
        with pytest.raises(TraceError, match=f"cannot read trace {path}: (not a regular file|Is a directory)"):
            list(open_trace(path, "csv").chunks())
        with pytest.raises(TraceError, match=f"cannot read trace {path}"):
            open_trace(path)
    finally:
        if kind == "fifo":
            done.set()


@pytest.mark.parametrize("option", ["--json", "--html", "--plot", "--series"])
@pytest.mark.parametrize("target", ["metadata", "lock", "data", "new.csv"])
def test_rule_replay_outputs_never_land_on_a_pool(pool: Path, trace: Path, option: str, target: str) -> None:
    """`replay --json OUT` wrote OUT with a plain open(): aimed at a pool's metadata it destroyed the
    pool.  Every report output goes through safe_output, checked before the replay runs."""
    before = {f: sha(pool / f) for f in ("metadata", "lock", "data")}
    result = cli("replay", str(trace), "--metadata-only", option, str(pool / target))
    assert_clean_refusal(result, "refusing to write into a pool")
    assert {f: sha(pool / f) for f in ("metadata", "lock", "data")} == before
    assert sorted(os.listdir(pool)) == ["data", "lock", "metadata"]


def test_rule_simulate_outputs_never_land_on_a_pool(pool: Path, trace: Path, tmp_path: Path) -> None:
    sc = tmp_path / "sc.toml"
    sc.write_text(SCENARIO.replace("TRACE", str(trace)))
    before = sha(pool / "metadata")
    assert_clean_refusal(cli("simulate", str(sc), "--json", str(pool / "metadata")), "refusing to write into a pool")
    assert sha(pool / "metadata") == before
    out = tmp_path / "out.json"
    assert cli("simulate", str(sc), "--json", str(out)).exit_code == 0
    assert json.loads(out.read_text())["writes"] == 2


# ====================================================================================== control socket
def test_rule_control_request_nested_too_deeply_is_invalid_argument(pool: Path) -> None:
    with Pool.open(pool) as p:
        for line in (b"[" * 100_000, b'{"op": "status", "args": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"):
            reply = json.loads(handle_request(p, op_table(), line))
            assert reply == {"ok": False, "error": "InvalidArgument", "message": "control request is nested too deeply"}


#: ops whose arguments are fuzzed in-process (pool messages and reports; none writes files it is given)
FUZZED_OPS = ("create-thin", "snapshot", "delete", "rename", "resize", "set", "set-autoextend",
              "set-transaction-id", "discard", "usage", "rmap", "delta", "ls", "reserve-metadata-snap",
              "prepare", "view", "commit-snapshot", "remove-snapshot", "update-snapshot", "stat-snapshot")
DOMAIN_ERRORS = {"InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition", "NoSpace", "ReadOnly",
                 "Busy"}
JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from([0, 1, 4096, BS, 1 << 63, (1 << 63) - 1, (1 << 64) - 1, 1 << 64, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["base", "snap", "new", "", "a/../b", "x\x00y", "\udcff", "..", "1G", "-1", "0..1", HUGE,
                     "passdown", "ignore", "/tmp", "\u00b2"]),
    st.text(max_size=12))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=6)


@FUZZ
@given(data=st.data())
def test_rule_control_ops_with_generated_arguments_refuse_cleanly_and_change_nothing(pool: Path, data) -> None:
    ops = op_table()
    name = data.draw(st.sampled_from(FUZZED_OPS))
    sig = _signature(ops[name].func)
    keys = [arg for arg, _hint, _req in sig]
    key = st.one_of(st.sampled_from(keys), st.text(max_size=5)) if keys else st.text(max_size=5)
    args = data.draw(st.dictionaries(key, JSON_VALUE, max_size=4))
    with Pool.open(pool) as p:
        before = (sha(pool / "metadata"), dump_xml(p.to_metadata()))
        reply = json.loads(handle_request(p, ops, json.dumps({"op": name, "args": args}).encode()))
        if not reply["ok"]:
            assert reply["error"] in DOMAIN_ERRORS, (name, str(args)[:300], reply)
            assert "internal error" not in reply["message"], (name, str(args)[:300], reply)
            assert len(reply["message"]) < 2000, (name, reply["message"][:300])
            assert (sha(pool / "metadata"), dump_xml(p.to_metadata())) == before, \
                (name, str(args)[:300], reply)
    with Pool.open(pool, read_only=True) as p:
        assert p.check().ok


# ====================================================================================== image archives
def test_rule_image_json_nested_too_deeply_is_an_image_error(tmp_path: Path) -> None:
    from thinpool.containers.oci import open_image
    layout = tmp_path / "oci"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ImageError, match="index.json: unreadable JSON: nested too deeply"):
        open_image(layout)


def test_every_refusal_here_is_a_thinpool_error() -> None:
    """The classes the cases above expect are the hierarchy's (a bare ValueError would not be)."""
    for cls in (InvalidArgument, TraceError, ImageError):
        assert issubclass(cls, ThinpoolError)


# ====================================================================================== snapshotter records
def test_rule_snapshot_keys_and_labels_are_bounded_so_records_cannot_fill_the_metadata(pool: Path) -> None:
    """Three prepares with 4 MiB keys put a 16 MiB pool's metadata out of space (the records live in
    it).  Keys are now at most 4096 bytes, labels 64 KiB in all, also when grown one labels.<k> update
    at a time; refusals name the limit, quote the key cut short and change nothing."""
    ops = op_table()
    with Pool.open(pool) as p:
        def ask(op: str, **args: Any) -> dict[str, Any]:
            return json.loads(handle_request(p, ops, json.dumps({"op": op, "args": args}).encode()))
        before = sha(pool / "metadata")
        for args, words in [({"key": "k" * (4 << 20)}, "is 4194304 bytes long (at most 4096)"),
                            ({"key": "\u00e9" * 2049}, "is 4098 bytes long"),
                            ({"key": "k", "labels": {str(i): "v" * 1000 for i in range(100)}}, "at most 65536 in all"),
                            ({"key": "k", "labels": {"x" * 5000: ""}}, "longer than 4096 bytes")]:
            reply = ask("prepare", namespace="ns", parent=None, **args)
            assert reply["ok"] is False and reply["error"] == "InvalidArgument", reply
            assert words in reply["message"] and len(reply["message"]) < 300, reply["message"][:400]
        assert sha(pool / "metadata") == before
        assert ask("prepare", namespace="ns", key="k" * 4096, parent=None)["ok"]
        grown = 0
        for i in range(40):
            reply = ask("update-snapshot", namespace="ns", key="k" * 4096, labels={f"l{i}": "v" * 4000},
                        fieldpaths=[f"labels.l{i}"])
            if not reply["ok"]:
                assert "in all" in reply["message"], reply
                break
            grown += 1
        assert grown == 16  # 16 labels of 4002 bytes fit in 64 KiB, the 17th does not
        labels = ask("stat-snapshot", namespace="ns", key="k" * 4096)["result"]["labels"]
        assert len(labels) == 16
        assert p.status().mode == "write"


# ====================================================================================== data files
@pytest.mark.parametrize("target", ["metadata", "lock", "new-file", "symlink-to-metadata", "own-metadata"])
@pytest.mark.parametrize("command", ["create", "restore", "import-metadata"])
def test_rule_a_new_pools_data_file_is_never_another_pools_file(pool: Path, tmp_path: Path, target: str,
                                                                  command: str) -> None:
    """`create NEW --data-file OTHER/metadata --force` made the other pool's metadata the new pool's data
    device: the first write into NEW destroyed OTHER.  Refused now (--force or not), OTHER unchanged,
    nothing of NEW left."""
    new = tmp_path / "new"
    data = {"metadata": pool / "metadata", "lock": pool / "lock", "new-file": pool / "extra.img",
            "symlink-to-metadata": tmp_path / "link", "own-metadata": new / "metadata"}[target]
    if target == "symlink-to-metadata":
        data.symlink_to(pool / "metadata")
    before = {f: sha(pool / f) for f in ("metadata", "lock", "data")}
    xml = tmp_path / "in.xml"
    xml.write_text(cli("dump", str(pool)).output)
    md = tmp_path / "in.md"
    assert cli("export-metadata", str(pool), str(md)).exit_code == 0
    args = {"create": ("create", str(new), "--data-size", "16MiB", "--data-file", str(data), "--force"),
            "restore": ("restore", str(new), "-i", str(xml), "--data-file", str(data)),
            "import-metadata": ("import-metadata", str(md), str(new), "--data", str(data))}[command]
    absent = command == "import-metadata" and target in ("new-file", "own-metadata")  # --data must exist
    assert_clean_refusal(cli(*args), "does not exist" if absent else "data file")
    assert {f: sha(pool / f) for f in ("metadata", "lock", "data")} == before
    assert not (pool / "extra.img").exists() and (not new.exists() or not os.listdir(new))
    with Pool.open(pool, read_only=True) as p:
        assert p.check().ok


# ====================================================================================== XML, generated
XML_BASE = """<superblock uuid="" time="3" transaction="7" flags="0" version="2" data_block_size="128" nr_data_blocks="1024">
  <device dev_id="1" mapped_blocks="4" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="10" data_block="5" time="1"/>
  </device>
  <def name="d1">
    <single_mapping origin_block="20" data_block="9" time="1"/>
  </def>
  <device dev_id="3" mapped_blocks="1" transaction="0" creation_time="1" snap_time="1">
    <ref name="d1"/>
  </device>
</superblock>
"""
XML_TOKENS = ["0", "-1", str((1 << 64) - 1), str(1 << 64), "9" * 30, HUGE, "", " ", "1e3", "&amp;", "&#0;", "<", '"',
              "\udcff", "\u00b2", "ref", "def", "device", '<!DOCTYPE x [<!ENTITY a "aaaa">]>', "&a;", "<![CDATA[x]]>",
              str(1 << 32), str((1 << 24) - 1), str(1 << 24), "x" * 5000]


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10 ** 6), st.sampled_from(XML_TOKENS)), min_size=1,
                max_size=3))
def test_rule_mutated_thin_dump_xml_is_loaded_or_refused_naming_the_line(edits: list[tuple[int, int, str]]) -> None:
    text = XML_BASE
    for kind, at, token in edits:
        if kind == 0:       # replace one attribute value
            parts = text.split('"')
            i = 1 + 2 * (at % (len(parts) // 2))
            parts[i] = token
            text = '"'.join(parts)
        elif kind == 1:     # insert anywhere after the first '<'
            i = 1 + at % (len(text) - 1)
            text = text[:i] + token + text[i:]
        else:               # cut a piece out
            i = 1 + at % (len(text) - 1)
            text = text[:i] + text[i + 1 + at % 37:]
    try:
        load_xml(text)
    except InvalidArgument as exc:
        assert "line " in str(exc) and len(str(exc)) < 600, str(exc)[:700]


# ====================================================================================== CLI integers
@pytest.mark.parametrize("text", ["\u0663", "1_000", "\u0968", "\uff15", HUGE, "0x10", "1e3", "5.0"])
def test_rule_cli_integers_are_ascii_decimal_and_bounded(pool: Path, text: str) -> None:
    """click's int() took '1_000', Arabic-Indic and full-width digits ('set-transaction-id P 0 ٣' set
    the id to 3): every integer option and argument is ASCII decimal now; the pool is unchanged."""
    before = sha(pool / "metadata")
    for args in (("set-transaction-id", str(pool), "0", text), ("set-autoextend", str(pool), "--threshold", text),
                 ("create-thin", str(pool), "v", "1MiB", "--dev-id", text),
                 ("create", str(pool.parent / "new"), "--max-thins", text)):
        result = cli(*args)
        assert_clean_refusal(result, "is not a decimal integer" if len(text) < 40 else "too large")
        assert result.exit_code == 2
    assert sha(pool / "metadata") == before and not (pool.parent / "new").exists()


# ====================================================================================== layer tars
def _tar(pax: dict[str, str], name: str = "a", data: bytes = b"abc") -> bytes:
    import io
    import tarfile
    buf = io.BytesIO()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = pax
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("pax, words", [
    ({"size": "-5"}, "size -5 out of range"),
    ({"uid": "-1"}, "uid -1 out of range"),
    ({"gid": str(1 << 40)}, "gid 1099511627776 out of range"),
    ({"mtime": "9" * 5000}, "modification time inf out of range"),
    ({"mtime": "nan"}, "modification time nan out of range"),
    ({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "a",
      "GNU.sparse.realsize": "9" * 30}, "not a readable tar"),
], ids=["negative-size", "negative-uid", "huge-gid", "infinite-mtime", "nan-mtime", "malformed-gnu-sparse"])
def test_rule_layer_tar_numbers_from_pax_headers_are_bounded(pax: dict[str, str], words: str) -> None:
    """PAX headers set size, ids and times from text: a negative size (which shifted every later member),
    ids outside 0..2^32-1 and non-finite times reached chown/utime; tarfile's own ValueError on a
    malformed GNU sparse map escaped as a traceback.  All are ImageError naming the member now."""
    import io
    from thinpool.containers.oci_tar import iter_tar_entries
    with pytest.raises(ImageError, match=words):
        list(iter_tar_entries(io.BytesIO(_tar(pax)), "layer"))


# ====================================================================================== image JSON, generated
OCI_VALUES = [None, True, 0, -1, 1 << 63, 1 << 64, 1.5, float("nan"), "", "x", "sha256:" + "0" * 64, "sha256:zz",
              "md5:abc", "../../etc/passwd", "sha256:../../x", [], {}, [1], {"a": 1}, "x" * 5000, "\udcff"]


def _oci_layout(root: Path, rnd: Any) -> None:
    """A one-layer OCI layout with one of its three JSON documents randomly edited by ``rnd``."""
    import hashlib
    import io
    import tarfile

    def blob(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / "sha256" / digest).write_bytes(data)
        return "sha256:" + digest, len(data)

    def edit(obj: Any) -> None:
        if isinstance(obj, dict) and obj:
            key = rnd.choice(sorted(obj))
            if rnd.random() < 0.5 or not isinstance(obj[key], (dict, list)):
                obj[key] = rnd.choice(OCI_VALUES)
            else:
                edit(obj[key])
        elif isinstance(obj, list) and obj:
            i = rnd.randrange(len(obj))
            if rnd.random() < 0.5 or not isinstance(obj[i], (dict, list)):
                obj[i] = rnd.choice(OCI_VALUES)
            else:
                edit(obj[i])

    (root / "blobs" / "sha256").mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("etc/hello")
        info.size = 5
        t.addfile(info, io.BytesIO(b"hello"))
    ld, ls = blob(buf.getvalue())
    which = rnd.choice(["index", "manifest", "config"])
    config: dict[str, Any] = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [ld]}}
    if which == "config":
        edit(config)
    cd, cs = blob(json.dumps(config).encode())
    manifest: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]}
    if which == "manifest":
        edit(manifest)
        edit(manifest)
    md, ms = blob(json.dumps(manifest).encode())
    index: dict[str, Any] = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
         "annotations": {"org.opencontainers.image.ref.name": "t:1"}}]}
    if which == "index":
        edit(index)
        edit(index)
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


@FUZZ
@given(st.randoms(use_true_random=False))
def test_rule_edited_oci_documents_open_or_fail_as_image_errors(rnd: Any) -> None:
    """Index, manifest and config with wrong types, huge or negative sizes, bad or escaping digests,
    5,000-character strings: opening and verifying the image gives an ImageError of bounded length (a
    descriptor size or media type of 5,000 characters was quoted whole) or succeeds."""
    import tempfile
    from thinpool.containers.oci import open_image
    with tempfile.TemporaryDirectory() as tmp:
        _oci_layout(Path(tmp), rnd)
        try:
            with open_image(tmp) as image:
                image.verify()
        except ImageError as exc:
            assert len(str(exc)) < 1000, str(exc)[:300]


def test_kernel_rule_no_space_timeout_is_checked_before_any_float_conversion_can_fail(pool: Path) -> None:
    """An integer past the float range raised OverflowError (not InvalidArgument); "-0" was stored and
    shown as -0.0.  The kernel's no_space_timeout is an unsigned number of seconds."""
    with pytest.raises(InvalidArgument, match="got a 1329-bit integer"):
        Pool.create(pool.parent / "other", data_size="16MiB", no_space_timeout=10 ** 400)
    assert not (pool.parent / "other").exists()
    with Pool.open(pool) as p:
        reply = json.loads(handle_request(p, op_table(), b'{"op": "set", "args": {"no_space_timeout": -0.0}}'))
        assert reply["ok"] and json.dumps(reply["result"]["no_space_timeout"]) == "0.0", reply


@pytest.mark.parametrize("name, text, words", [
    ("t.iolog", "fio version 3 iolog\n1 f add\n2 f write 1234567890123456789 1\n", "at most 18 digits"),
    ("t.blk", "  7,0    1        1     0.000000000 20447  Q  WS 99999999999999999 + 8 [fio]\n", r"SECTOR below 2\^54"),
    ("t.csv", "time,op,offset_sectors,length\n1,W,999999999999999999,4096\n", r"below 2\^62 bytes"),
    ("t.msr", "128166372003061629,hm,0,Write,1234567890123456789,512,1\n", "at most 18 digits"),
], ids=["fio", "blkparse", "csv", "msr"])
def test_rule_a_trace_number_too_large_says_the_bound(tmp_path: Path, name: str, text: str, words: str) -> None:
    """A 19-digit offset or a sector past 2^54 was 'must be unsigned decimal numbers' -- which it was:
    the message now says the bound it broke, with file and line."""
    path = tmp_path / name
    path.write_text(text)
    fmt = {"t.iolog": None, "t.blk": "blkparse", "t.csv": None, "t.msr": "msr"}[name]
    with pytest.raises(TraceError, match=words) as exc:
        list(open_trace(path, fmt).chunks())
    assert f"{path}: line " in str(exc.value)


@pytest.mark.parametrize("every", ["1e-300s", "1e-9s", "0.001s"])
def test_rule_a_time_schedule_is_bounded_per_window(tmp_path: Path, every: str) -> None:
    """`--snapshot-every 1e-6s` over a trace spanning 10^6 s looped over 10^12 marks (and at 1e-300 s
    the float sum never moved: for ever); now the marks are counted, at most a million per window."""
    trace = tmp_path / "t.csv"
    trace.write_text("time,op,offset,length\n0,W,0,4096\n1,W,65536,4096\n1000000,W,0,4096\n")
    for option in ("--snapshot-every", "--sample-every"):
        result = cli("replay", str(trace), "--metadata-only", option, every, "--json", "-")
        assert_clean_refusal(result, "more than 1,000,000", "give a longer interval")
    ok = cli("replay", str(trace), "--metadata-only", "--snapshot-every", "250000s", "--keep", "1", "--json", "-")
    assert ok.exit_code == 0 and json.loads(ok.output)["snapshots_taken"] == 4, ok.output[-500:]


def test_rule_a_trailing_newline_never_passes_a_name_or_digest_pattern(pool: Path, trace: Path) -> None:
    """Patterns written ``^...$`` let ``"name\\n"`` through (``$`` matches before a final newline):
    a container name, a snapshotter namespace, an image digest, a scenario volume name.  ``\\Z`` now."""
    from thinpool.containers import runtime
    from thinpool.containers.oci import check_digest
    from thinpool.containers.snapshotter import Snapshotter
    with pytest.raises(InvalidArgument):
        runtime._check_name("web\n")
    with pytest.raises(ImageError, match="not a sha256/sha512 digest"):
        check_digest("sha256:" + "0" * 64 + "\n", "layer")
    with Pool.open(pool) as p:
        with pytest.raises(InvalidArgument, match="namespace"):
            Snapshotter(p, "ns\n")
        Snapshotter(p, "ns")
    with pytest.raises(InvalidArgument, match=r"\[\[volume\]\] #1 name: not a usable volume name"):
        parse_scenario(SCENARIO.replace('name = "db"', 'name = "db\\n"').replace("TRACE", str(trace)), "sc.toml")
    check_digest("sha256:" + "0" * 64, "layer")
    runtime._check_name("web")


@pytest.mark.parametrize("text, words", [("\u0663\u0663\u0663\u0663", "is not a port number"),
                                         ("1_0", "is not a port number"), (HUGE, "5000 characters")])
def test_rule_serve_tcp_port_is_ascii_decimal(text: str, words: str) -> None:
    """`serve --tcp ٣٣٣٣` listened on port 3333 (int() reads Arabic-Indic digits); a 5,000-digit value
    was quoted twice in full."""
    from thinpool.cli.serve_cmds import parse_tcp
    with pytest.raises(InvalidArgument, match=words) as exc:
        parse_tcp(text)
    assert len(str(exc.value)) < 200
    assert parse_tcp("[::1]:10809") == ("::1", 10809)


@pytest.mark.parametrize("text", ["\u0663", "1_0"])
def test_rule_wait_seconds_are_ascii(pool: Path, text: str) -> None:
    """`--wait ٣` waited 3 s and `--wait 1_0` 10 s (float() reads both): a usage error now."""
    assert_clean_refusal(cli("--wait", text, "status", str(pool)), "is not a number of seconds")
