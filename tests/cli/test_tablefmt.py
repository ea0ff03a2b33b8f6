"""The compiled table formatter (thinpool/cli/_tablefmt.c, built at install) writes `thinpool ls`'s
table byte for byte as the Python renderer does, over lists and over buffers of the device table's
8-byte fields, and refuses bad input with a Python error instead of crashing."""

from __future__ import annotations

import array
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import IN_CI

from thinpool.cli import ops, tables

BS = 64 * 1024


def _compiled():
    """The extension module; skips when it was not built (fails under CI=true: tests/run.sh's
    ``pip install -e '.[test]'`` builds it)."""
    if not tables.compiled():
        msg = ("needs the compiled table formatter thinpool.cli._tablefmt (built by `pip install -e .`; "
               "or `python setup.py build_ext --inplace`)")
        if IN_CI:
            pytest.fail(msg + " -- CI=true, so a missing extension is a failure")
        pytest.skip(msg)
    from thinpool.cli import _tablefmt
    return _tablefmt


def _q(values: list[int]) -> memoryview:
    """``values`` as a strided memoryview of int64 (every other item of a bigger array), the shape of
    a device-table field."""
    buf = array.array("q", [v for x in values for v in (x, -1)])
    return memoryview(buf)[::2]


# names: any text a volume name may be (wide, combining, odd whitespace), and odd ones
NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=12) | \
    st.sampled_from(["ab", "日本語", "e\u0301", "\u3000x\u3000", "x" * 30, "tab\u2009space", "🙂🙂", "a (ro)"])
ORIGIN = st.none() | NAME | st.sampled_from(["/x/golden.img  ", " \u2003", "/a b/\u00a0", "-"])
I64 = st.integers(-(1 << 63), (1 << 64) - 1)
SIZE = st.sampled_from([0, 512, BS, 3 << 30, (1 << 64) - 1, 1023, 1024, 1 << 50]) | st.integers(0, (1 << 64) - 1)


@st.composite
def volume_columns(draw):
    n = draw(st.integers(0, 12))
    col = lambda s: draw(st.lists(s, min_size=n, max_size=n))  # noqa: E731
    mapped = col(st.integers(0, (1 << 40)))
    cols = {"name": col(NAME), "dev_id": col(st.integers(0, (1 << 24) - 1)), "size": col(SIZE),
            "read_only": col(st.booleans()), "mapped_blocks": mapped,
            "creation_time": col(I64), "snap_time": col(I64), "block_size": [BS] * n,
            "mapped_bytes": [m * BS for m in mapped]}
    if draw(st.booleans()):
        cols["external_origin"] = col(ORIGIN)
    if draw(st.booleans()):
        cols["exclusive_bytes"] = col(SIZE)
        cols["shared_bytes"] = col(SIZE)
    return cols


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(volume_columns(), st.booleans())
def test_compiled_volume_table_is_the_python_renderers_byte_for_byte(cols, headers):
    _compiled()
    want = ops.render_volume_columns(cols, headers, compiled=False)
    got = tables.volume_table(cols, headers)
    assert got is not None and got.decode("utf-8") == want
    # the same from buffers: int64 fields as the device table stores them, read-only as bytes,
    # MAPPED from the block count and the block size
    if all(-(1 << 63) <= v < (1 << 63) for k in ("dev_id", "size", "creation_time", "snap_time") for v in cols[k]):
        bufs = dict(cols, read_only=bytes(cols["read_only"]),
                    **{k: _q(cols[k]) for k in ("dev_id", "size", "mapped_blocks", "creation_time", "snap_time")})
        del bufs["mapped_bytes"]
        assert tables.volume_table(bufs, headers, block_size=BS) == got
        if not any("\0" in n for n in cols["name"]):  # the names as ls's C loops give them
            nul = dict(bufs, name=("nul", "\0".join(cols["name"]).encode(), len(cols["name"])))
            assert tables.volume_table(nul, headers, block_size=BS) == got
            assert tables.volume_table_text(nul, headers, block_size=BS) == want
    assert ops.render_volume_columns(cols, headers) == want


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_compiled_table_is_columns_table_for_any_columns(data):
    """The generic formatter against ops._columns_table: str and int columns in any order, any number
    left-justified, a string last column right-stripped."""
    fmt = _compiled()
    n = data.draw(st.integers(0, 8))
    kinds = data.draw(st.lists(st.booleans(), min_size=1, max_size=5))
    cols = [data.draw(st.lists(I64 if k else NAME | st.just(" "), min_size=n, max_size=n)) for k in kinds]
    header = data.draw(st.lists(NAME | st.just(" \u3000"), min_size=len(kinds), max_size=len(kinds)))
    left = data.draw(st.integers(0, len(kinds) + 1))
    headers = data.draw(st.booleans())
    assert fmt.table(header, cols, left, headers).decode() == ops._columns_table(header, cols, left, headers)


def test_a_name_utf8_cannot_encode_or_an_integer_out_of_range_goes_to_the_python_renderer():
    _compiled()
    cols = {"name": ["ok", "bad\udc80"], "dev_id": [1, 2], "size": [BS, BS], "read_only": [False, True],
            "mapped_blocks": [0, 1], "creation_time": [0, 0], "snap_time": [0, 0], "block_size": [BS, BS],
            "mapped_bytes": [0, BS]}
    assert tables.volume_table(cols) is None
    big = dict(cols, name=["a", "b"], creation_time=[0, 1 << 64])
    assert tables.volume_table(big) is None
    assert "18446744073709551616" in ops.render_volume_columns(big)


def test_bad_input_to_the_compiled_formatter_raises_a_python_error():
    fmt = _compiled()
    good = array.array("q", [1, 2, 3])
    cases = [
        ((["A"], [[1, "x", 3]], 0, True), TypeError),           # a list mixing ints and str
        ((["A"], [["x", 1]], 0, True), TypeError),
        ((["A", "B"], [[1, 2], [1, 2, 3]], 0, True), ValueError),  # lengths differ
        ((["A"], [[1], [2]], 0, True), ValueError),              # header and columns differ
        ((["A"], [[1 << 64]], 0, True), OverflowError),
        ((["A"], [[-(1 << 63) - 1]], 0, True), OverflowError),
        ((["A"], [array.array("d", [1.0])], 0, True), TypeError),  # not 8-byte integers
        ((["A"], [array.array("i", [1])], 0, True), TypeError),
        ((["A"], [memoryview(bytes(16)).cast("q", (2, 1))], 0, True), TypeError),  # 2-D
        ((["A"], [3.5], 0, True), TypeError),
        ((["A"], [("map", [1, 2], [1], ["x"])], 0, True), KeyError),       # 2 is not a key
        ((["A"], [("map", [1, 2], [1], ["x", "y"])], 0, True), ValueError),  # keys and cells differ
        ((["A"], [("map", [1, 5], [1, 2], ["x", "y"])], 0, True), KeyError),  # a value not a key
        ((["A"], [("map", [1, 1], [1, 1], ["x", "y"])], 0, True), ValueError),  # a key twice
        ((["A"], [("map", good, "12", ["x", "y"])], 0, True), TypeError),
        ((["A"], [("suffix", ["a", "b"], b"\x01", " (ro)")], 0, True), ValueError),  # flags short
        ((["A"], [("suffix", ["a", 1], b"\x01\x00", " (ro)")], 0, True), TypeError),
        ((["A"], [("suffix", ["a"], b"\x01", 5)], 0, True), TypeError),
        ((["A"], [("other", 1, 2, 3)], 0, True), TypeError),
        ((["A"], [{"x": 1}], 0, True), TypeError),
        (([1], [[1]], 0, True), TypeError),                      # header not str
        (("AB", [[1]], 0, True), TypeError),
        ((["A"], [["x\udc80"]], 0, True), UnicodeEncodeError),
        ((["A"], [("nul", b"a\0b", 3)], 0, True), ValueError),   # fewer cells than n
        ((["A"], [("nul", b"a\0b\0c", 2)], 0, True), ValueError),
        ((["A"], [("nul", b"a", 0)], 0, True), ValueError),
        ((["A"], [("nul", b"a", -1)], 0, True), ValueError),
        ((["A"], [("nul", b"a\xff", 1)], 0, True), ValueError),   # not UTF-8
        ((["A"], [("nul", b"\xed\xa0\x80", 1)], 0, True), ValueError),  # an encoded surrogate
        ((["A"], [("nul", "text", 1)], 0, True), TypeError),
        ((["A"], [("nul", b"a", "1")], 0, True), TypeError),
        ((["A", "B"], [("nul", b"a\0b", 2), [1]], 0, True), ValueError),
        ((["A"], [("suffix", ("nul", b"a\0b", 2), b"\x01", " (ro)")], 0, True), ValueError),
    ]
    for args, exc in cases:
        with pytest.raises(exc):
            fmt.table(*args)
    for bad, exc in ((3, TypeError), ([1, "a"], TypeError), ([1 << 65], OverflowError),
                     (array.array("f", [1.0]), TypeError)):
        with pytest.raises(exc):
            fmt.distinct(bad)
    with pytest.raises(TypeError):
        fmt.table(["A"], [[1]])  # arguments missing
    assert fmt.distinct(good) == [1, 2, 3] and fmt.distinct(memoryview(good)[::2]) == [1, 3]
    assert fmt.distinct([5, 5, -1, 1 << 63]) == [5, -1, 1 << 63]
    assert fmt.table(["A"], [memoryview(array.array("Q", [(1 << 64) - 1]))], 0, False) == b"18446744073709551615"
    assert fmt.table([], [], 0, True) == b""
    assert fmt.table(["NAME", "DEV"], [[], []], 1, True) == b"NAME  DEV"
    assert fmt.table(["NAME", "DEV"], [[], []], 1, False) == b""
    assert fmt.table(["N", "X"], [("nul", "é\0\0b".encode(), 3), [1, 22, 3]], 1, True, True) == \
        "N   X\né   1\n   22\nb   3"
    assert fmt.table(["N"], [("suffix", ("nul", b"a\0bb", 2), b"\x00\x01", "*")], 1, False) == b"a\nbb*"
    assert fmt.table(["N"], [("nul", b"", 0)], 1, True) == b"N"


def test_write_text_writes_every_byte_of_the_str_or_raises(tmp_path):
    """`ls` writes its table straight from the str to stdout's descriptor: all of it (a pipe takes
    64 KiB at a time), non-ASCII text as UTF-8; a closed pipe is BrokenPipeError, a bad descriptor
    OSError, a lone surrogate UnicodeEncodeError, never a crash."""
    fmt = _compiled()
    import threading
    text = ("ünï ✓ " + "x" * 97 + "\n") * 20000  # about 2 MB, more than a pipe holds
    r, w = os.pipe()
    got = []
    reader = threading.Thread(target=lambda: got.append(b"".join(iter(lambda: os.read(r, 1 << 20), b""))))
    reader.start()
    fmt.write_text(w, text)
    os.close(w)
    reader.join()
    os.close(r)
    assert got == [text.encode("utf-8")]
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(BrokenPipeError):
        fmt.write_text(w, "x")
    os.close(w)
    with pytest.raises(OSError):
        fmt.write_text(w, "x")  # closed
    f = tmp_path / "f"
    with open(f, "wb") as out:
        with pytest.raises(UnicodeEncodeError):
            fmt.write_text(out.fileno(), "a\udc80")
        with pytest.raises(TypeError):
            fmt.write_text(out.fileno(), b"bytes")
        fmt.write_text(out.fileno(), "")
    assert f.read_bytes() == b""


def test_table_to_a_file_descriptor_is_the_table_and_a_newline(tmp_path):
    """`ls` streams its table to stdout's descriptor (fd): the bytes of the table and the newline
    click.echo adds, through a buffer far smaller than the table; nothing for an empty table without
    headers; nothing, and NotImplemented, when a cell holds an escape character (click strips ANSI
    sequences from text written to a pipe, so the text path writes those); bad input writes nothing."""
    fmt = _compiled()
    n = 40000
    cols = [[f"näme{i}" for i in range(n)], list(range(n)), ("map", [i % 3 for i in range(n)], [0, 1, 2], ["a", "bb", "ccc"])]
    want = fmt.table(["NAME", "N", "M"], cols, 1, True) + b"\n"
    assert len(want) > 3 << 18  # (more than the buffer: written in several pieces)
    f = tmp_path / "out"
    with open(f, "wb") as out:
        assert fmt.table(["NAME", "N", "M"], cols, 1, True, False, out.fileno()) is None
    assert f.read_bytes() == want
    cases = [((["A"], [[]], 0, False), None, b""), ((["A", "B"], [[], []], 0, True), None, b"A  B\n"),
             ((["A"], [["x", "\x1b[31mred"]], 0, True), NotImplemented, b""),
             ((["A\x1b"], [[1]], 0, True), NotImplemented, b""),
             ((["A"], [["x", "y\udc80"]], 0, True), UnicodeEncodeError, b""),
             ((["A"], [[1, 1 << 64]], 0, True), OverflowError, b"")]
    for args, result, data in cases:
        with open(f, "wb") as out:
            if isinstance(result, type):
                with pytest.raises(result):
                    fmt.table(*args, False, out.fileno())
            else:
                assert fmt.table(*args, False, out.fileno()) is result
        assert f.read_bytes() == data, args
    with pytest.raises(ValueError):
        fmt.table(["A"], [[1]], 0, True, False, -5)
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(BrokenPipeError):
        fmt.table(["A"], [[1]], 0, True, False, w)
    os.close(w)


def test_cli_ls_prints_the_python_renderers_table(tmp_path):
    """`thinpool ls` (the compiled table written as bytes to stdout) prints what the Python renderer
    prints, with and without headers, with read-only volumes, odd names and an external origin; the
    same through click's test runner (a text stream)."""
    _compiled()
    from click.testing import CliRunner

    from thinpool import Pool
    from thinpool.cli import main
    golden = tmp_path / "golden  .img"
    golden.write_bytes(b"g" * BS)
    with Pool.create(tmp_path / "p", data_size=64 * BS, metadata_only=False) as pool:
        pool.create_thin("base", "3GiB", dev_id=9)
        for name in ("ünï ✓ \"q\"", "日本語", "e\u0301", "snap/ns/1", "x" * 300, "\u3000wide\u3000"):
            pool.snapshot("base", name)
        pool.snapshot("base", "ro", read_only=True, dev_id=2)
        pool.create_thin("ext", "1MiB", external_origin=str(golden))
    with Pool.create(tmp_path / "q", data_size=64 * BS, metadata_only=True) as pool:  # volumes in their slots
        pool.create_thin("base", "3GiB")
        for i, name in enumerate(["ünï ✓", "日本語", "e\u0301", "x" * 300, "\u3000wide\u3000", "ro"]):
            pool.snapshot("base", name, read_only=name == "ro")
    from thinpool.devtable import DeviceTable
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    for path in (tmp_path / "p", tmp_path / "q"):
        with DeviceTable.open(path) as table:
            cols = ops.op_ls(table, columns=True)["columns"]
            from thinpool import devtable_columns
            fast = isinstance(table.volume_columns(buffers=True)["name"], tuple)
            assert fast == (path.name == "q" and devtable_columns._lscols is not None)
        for flags in ([], ["--no-headers"]):
            want = ops.render_volume_columns(cols, headers=not flags, compiled=False) + "\n"
            out = subprocess.run([sys.executable, "-m", "thinpool", "ls", str(path), *flags],
                                 capture_output=True, check=True, env=env).stdout
            assert out == want.encode("utf-8")
            assert CliRunner().invoke(main, ["ls", str(path), *flags]).output == want
            assert ("EXTERNAL_ORIGIN" in want) == (not flags and path.name == "p") and "ro (ro)" in want


def test_a_served_pool_answers_ls_with_the_same_table(tmp_path):
    """`thinpool ls` asks the ls op for its table (``table``): a serving process (its full Pool, through
    the control socket's request handler and the CLI's op table) answers with the text the light
    path prints -- as JSON-able text, whatever made it."""
    import json

    from thinpool import Pool
    from thinpool.cli.registry import op_table, run_op
    from thinpool.control.server import handle_request
    with Pool.create(tmp_path / "p", data_size=64 * BS, metadata_only=True) as pool:
        pool.create_thin("base", "3GiB")
        for name in ("ünï ✓", "日本語", "ro"):
            pool.snapshot("base", name, read_only=name == "ro")
    for headers in (True, False):
        local = run_op(str(tmp_path / "p"), "ls", {"table": True, "headers": headers})["text"]
        pool = Pool.open(tmp_path / "p", read_only=True)
        try:
            line = json.dumps({"op": "ls", "args": {"table": True, "headers": headers}}).encode()
            reply = json.loads(handle_request(pool, op_table(), line))
        finally:
            pool.close(commit=False)
        assert reply["ok"] and reply["result"]["text"] == local
        assert local.startswith("NAME") == headers and "ro (ro)" in local
