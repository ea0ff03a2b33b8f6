"""The C loops `ls` reads its columns with (thinpool/_lscols.c, built at install): the name index pages
read by slot in one call accept and refuse exactly what the Python decoder does (same MetadataCorrupt
messages), and the device table's buffer columns list what its list columns list."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import IN_CI

from thinpool import Pool
from thinpool import catalog_index as CI
from thinpool.devtable import DeviceTable
from thinpool.errors import MetadataCorrupt

BS = 64 * 1024


def _lscols():
    from thinpool import devtable_columns
    if devtable_columns._lscols is None:
        msg = "needs the C extension thinpool._lscols (built by `pip install -e .`; or `python setup.py build_ext --inplace`)"
        if IN_CI:
            pytest.fail(msg + " -- CI=true, so a missing extension is a failure")
        pytest.skip(msg)
    return devtable_columns._lscols


def _index(pages: list[bytes]) -> CI.NameIndex:
    """A NameIndex over ``pages`` (in name order), read through a reader of them."""
    fence = {"pages": list(range(len(pages))), "free": [], "keys": [""] + [f"k{i:04d}" for i in range(1, len(pages))]}
    return CI.NameIndex(fence, len(pages), lambda _array, want: {p: pages[p] for p in want})


def _python_rows(pages: list[bytes], nrows: int):
    """What the Python path makes of ``pages``: MetadataCorrupt's message, or the names by slot (None
    when the slots are not exactly 0..nrows-1)."""
    try:
        names, slots = _index(pages).columns()
    except MetadataCorrupt as e:
        return str(e)
    if sorted(slots) != list(range(nrows)):
        return None
    by_slot = [""] * nrows
    for n, s in zip(names, slots):
        by_slot[s] = n
    return by_slot


def _c_rows(pages: list[bytes], nrows: int):
    try:
        got = _index(pages).name_rows(nrows)
        # the same from one buffer of the pages (what the device table's gather gives)
        assert _index(pages).name_rows(nrows, lambda _array, want: b"".join(pages[p] for p in want)) == got
    except MetadataCorrupt as e:
        return str(e)
    if got is None:
        return None
    return got.decode().split("\0") if nrows else ([] if got == b"" else ["?"])


NAMES = st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=6)
                 | st.sampled_from(["a", "é", "日本", "🙂", "x" * 1024, "y" * 300]), min_size=1, max_size=40, unique=True)


@st.composite
def pages_of(draw):
    names = sorted(n.encode() for n in draw(NAMES))
    n = len(names)
    slots = draw(st.permutations(range(n))) if draw(st.booleans()) else \
        draw(st.lists(st.integers(0, n + 2), min_size=n, max_size=n))
    cuts = sorted(set(draw(st.lists(st.integers(1, n), max_size=4))) | {n})
    pages, start = [], 0
    for cut in cuts:
        if cut > start and CI.page_bytes(names[start:cut]) <= CI.BLOCK:
            pages.append(CI.encode_page(names[start:cut], list(slots[start:cut])))
            start = cut
    if start < n:  # the rest, a name or two at a time
        for i in range(start, n, 2):
            pages.append(CI.encode_page(names[i:i + 2], list(slots[i:i + 2])))
    if draw(st.booleans()):  # damage: bytes of one page changed (checksums pass in this test)
        p = draw(st.integers(0, len(pages) - 1))
        raw = bytearray(pages[p])
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, min(CI.BLOCK - 1, 8 + 4 * n + sum(map(len, names)))))
            raw[at] = draw(st.sampled_from([0, 0x80, 0xC0, 0xED, 0xF5, 0xFF, 0x41, 0x7A]))
        pages[p] = bytes(raw)
    if len(pages) > 1 and draw(st.booleans()):  # two pages swapped: names out of order
        pages[0], pages[-1] = pages[-1], pages[0]
    return pages, n


@settings(max_examples=300, deadline=None)
@given(pages_of())
def test_name_rows_accept_and_refuse_exactly_what_the_python_decoder_does(case):
    _lscols()
    pages, n = case
    want, got = _python_rows(pages, n), _c_rows(pages, n)
    if isinstance(want, str) and isinstance(got, str):
        return  # both refuse (the first problem found may differ when a page has several)
    assert got == want


def test_name_rows_refuse_each_broken_rule_with_the_decoders_message():
    _lscols()
    ok = [b"alpha", b"beta"]
    page = CI.encode_page(ok, [0, 1])
    head = struct.pack("<HH", 2, 10)
    cases = {
        "counts": struct.pack("<HH", 2, 4090) + page[4:],
        "count of 2": (head + page[4:12] + b"alpha\0\0eta").ljust(CI.BLOCK, b"\0"),
        "not UTF-8": CI.encode_page([b"alpha", b"b\xed\xa0\x80"], [0, 1]),   # an encoded surrogate
        "overlong": CI.encode_page([b"alpha", b"b\xc0\xaf"], [0, 1]),
        "longer than 1,024": CI.encode_page([b"alpha", b"b" * 1025], [0, 1]),
        "out of order": CI.encode_page([b"beta", b"alpha"], [0, 1]),
        "twice": CI.encode_page([b"alpha", b"alpha"], [0, 1]),
    }
    for what, raw in cases.items():
        want, got = _python_rows([raw], 2), _c_rows([raw], 2)
        assert isinstance(want, str) and want == got, (what, want, got)
    # across pages
    a, b = CI.encode_page([b"m", b"n"], [0, 1]), CI.encode_page([b"c"], [2])
    assert _c_rows([a, b], 3) == _python_rows([a, b], 3) == "catalog: name index: names out of order"
    assert _c_rows([page], 2) == ["alpha", "beta"]
    assert _c_rows([page], 3) is None and _c_rows([CI.encode_page(ok, [1, 1])], 2) is None


def test_bad_arguments_raise_python_errors():
    lc = _lscols()
    page = CI.encode_page([b"a"], [0])
    for args, exc in (((page[:100], [0], 1), ValueError), ((page * 2, [0], 1), ValueError), ((page, 0, 1), TypeError), (([page], [0, 1], 1), TypeError), (([page], [0], -1), ValueError),
                      (([page[:100]], [0], 1), ValueError), (([3], [0], 1), TypeError), (([page], ["x"], 1), TypeError)):
        with pytest.raises(exc):
            lc.name_rows(*args)
    import array
    assert lc.ascending(memoryview(array.array("q", [1, 1, 5]))) is True
    assert lc.ascending(memoryview(array.array("q", [1, 7, 5, 9]))[::2]) is True
    assert lc.ascending(memoryview(array.array("q", [2, 1]))) is False
    for bad in (b"12345678", array.array("d", [1.0]), 5):
        with pytest.raises(TypeError):
            lc.ascending(bad)


def test_buffer_columns_list_what_the_list_columns_list(tmp_path):
    """DeviceTable.volume_columns(buffers=True) -- names by slot from the C loops, the table's fields as
    views -- holds the values of the plain columns, in the layout with the volumes in their first slots
    (odd names, a read-only volume, an external origin) and after a delete (the general path)."""
    _lscols()
    golden = tmp_path / "golden.img"
    golden.write_bytes(b"g" * BS)
    with Pool.create(tmp_path / "p", data_size=64 * BS, metadata_only=True) as pool:
        pool.create_thin("base", "3GiB")
        for i, name in enumerate(["ünï ✓", "日本語", "e\u0301", "snap/ns/1", "x" * 300, "\u3000w", "z"]):
            pool.snapshot("base", name, read_only=i == 2)
    for step in ("plain", "origin", "hole"):
        if step != "plain":
            with Pool.open(tmp_path / "p") as pool:
                if step == "origin":
                    pool.create_thin("ext", "1MiB", external_origin=str(golden))
                else:
                    pool.delete("日本語")
        with DeviceTable.open(tmp_path / "p") as table:
            plain = table.volume_columns()
            bufs = table.volume_columns(buffers=True)
            fast = isinstance(bufs["name"], tuple)
            assert fast == (step != "hole")
            if fast:
                _tag, blob, n = bufs["name"]
                bufs["name"] = blob.decode().split("\0")
                assert len(bufs["name"]) == n
            for key, col in plain.items():
                got = bufs[key]
                got = list(map(bool, got)) if key == "read_only" else got
                got = [t & ((1 << 64) - 1) for t in got] if key == "transaction" else list(got)
                assert got == col, key
            for col in bufs.values():
                if isinstance(col, memoryview):
                    col.release()


def test_device_table_grows_a_page_of_slots_past_its_last_one(tmp_path):
    """The light table's records live in an anonymous map (no 6 MB of zeroing at every open); a
    snapshot past its last slot adds a page of slots (a larger map, the records copied), and the pool
    and the table then list every volume, ls's columns included."""
    from thinpool.devtable import DEVS_PER_PAGE
    with Pool.create(tmp_path / "p", data_size=64 * BS, metadata_only=True) as pool:
        pool.create_thin("base", "1GiB")
    with DeviceTable.open(tmp_path / "p", read_only=False) as table:
        slots = len(table._devs) // 64
        assert slots % DEVS_PER_PAGE == 0
        with table.batch():
            for i in range(slots + 3):
                table.snapshot("base", f"s{i:04d}")
        assert len(table._devs) // 64 == slots + DEVS_PER_PAGE
    names = ["base"] + [f"s{i:04d}" for i in range(slots + 3)]
    with Pool.open(tmp_path / "p") as pool:
        assert sorted(t.name for t in pool.thins()) == names
    with DeviceTable.open(tmp_path / "p") as table:
        assert sorted(table.volume_columns()["name"]) == names
        cols = table.volume_columns(buffers=True)
        assert len(cols["dev_id"]) == len(names) and list(cols["dev_id"]) == sorted(cols["dev_id"])
        for col in cols.values():
            if isinstance(col, memoryview):
                col.release()
