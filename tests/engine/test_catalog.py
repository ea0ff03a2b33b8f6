"""thinpool.catalog: the stored catalog (format 2) -- a paged name index with its fence, fixed-size slot
records and a small JSON part -- and the conversion of the format-1 JSON catalog.

The claims (module docstring): the index answers like a dict through any sequence of inserts and
removes, pages never exceed 4 KiB and stay sorted; a commit writes only the pages a change touches;
Pool and DeviceTable commit the same bytes; a damaged page is refused naming it; a pool written by
the format-1 code opens unchanged and is converted by its first commit, keeping every name, device id,
generation and record; names keep their rules (1-1024 bytes of UTF-8, odd characters allowed); a
name an older thinpool allowed that the index pages cannot hold (a lone surrogate, 5,004 bytes, a NUL,
empty) is kept in the fence's odd names and stays usable."""

from __future__ import annotations

import json
import os
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from thinpool import InvalidArgument, NotFound, Pool
from thinpool import catalog as C
from thinpool import rules
from thinpool.devtable import DeviceTable
from thinpool.errors import MetadataCorrupt
from thinpool.mdpages import BLOCK

from .fixtures import make_catalog1_pool

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
BS = 64 * 1024
LONG = "é" * 512  # 1,024 bytes of UTF-8: the longest name


def _rand_name(rng: random.Random, i: int) -> str:
    kind = i % 5
    if kind == 0:
        return f"snap/{rng.randrange(50)}/{i}"
    if kind == 1:
        return "v" * rng.randrange(200, 1000) + str(i)  # long names: few to a page, many splits
    if kind == 2:
        return f"ünï ✓ {i} (ro)"
    return f"{rng.choice('abcxyz')}-{i:06d}"


def test_name_index_answers_like_a_dict_through_inserts_removes_and_reloads():
    rng = random.Random(5)
    model: dict[str, int] = {}
    stored: dict[int, bytes] = {}
    idx = C.NameIndex(None, 0, None)
    for step in range(6):
        for i in range(step * 700, step * 700 + 700):
            name = _rand_name(rng, i)
            idx.insert(name, i)
            model[name] = i
        for name in rng.sample(sorted(model), 300):
            assert idx.remove(name) == model.pop(name)
        with pytest.raises(KeyError):
            idx.remove("never there")
        # commit: the changed pages reach the page store; reload from it, reading pages on demand
        upd = idx.updates()
        for p in upd.dead:
            stored.pop(p, None)
        stored.update({p: upd.page(p) for p in upd.dirty if p not in upd.dead})
        fence = json.loads(json.dumps(idx.fence()))
        idx.committed()
        idx = C.NameIndex(fence, idx.npages, lambda _a, ps: {p: stored.get(p, bytes(BLOCK)) for p in ps})
        names, slots = idx.columns()
        assert names == sorted(model, key=lambda n: n.encode()) and slots == [model[n] for n in names]
        for name in rng.sample(sorted(model), 50):
            assert idx.get(name) == model[name]
        assert idx.get("zzzz-absent") is None and idx.get("") is None
    for p in idx.pages:  # every page within 4 KiB, sorted, and holding at least one name
        keys, _ = C.decode_page(stored[p], p)
        assert keys and C.page_bytes(keys) <= BLOCK


def test_names_of_1024_bytes_fit_three_to_a_page_and_split_cleanly():
    idx = C.NameIndex(None, 0, None)
    names = [f"{i:03d}" + LONG[: 1021 // 2] + "x" for i in range(40)]  # 1,024 bytes each
    assert all(len(n.encode()) == 1024 for n in names)
    for i, n in enumerate(reversed(names)):
        idx.insert(n, i)
    assert idx.columns()[0] == names
    for p in idx.pages:
        assert 1 <= len(idx._cache[p][0]) <= 3
        assert len(C.encode_page(*idx._cache[p])) == BLOCK


def test_a_corrupt_index_page_layout_is_refused_naming_the_page():
    """A page whose CRC is right but whose layout is not one the encoder makes (a count past the page,
    names out of order, a name that is not UTF-8) is refused with MetadataCorrupt naming the page."""
    good = C.encode_page([b"a", b"b"], [1, 2])
    bad_count = bytearray(good)
    bad_count[0:2] = (2000).to_bytes(2, "little")
    with pytest.raises(MetadataCorrupt, match="name index page 7: counts"):
        C.decode_page(bytes(bad_count), 7)
    with pytest.raises(MetadataCorrupt, match="out of order"):
        C.decode_page(C.encode_page([b"b", b"a"], [1, 2]), 3)
    with pytest.raises(MetadataCorrupt, match="not UTF-8"):
        C._decode_names([b"\xff\xfe"], "catalog: name index page 1")


def _big_pool(path: Path, n: int = 600) -> None:
    with Pool.create(path, data_size=64 * BS, metadata_only=True) as pool, pool.batch():
        pool.create_thin("base", "1GiB")
        for i in range(n):
            pool.snapshot("base", f"volume-with-a-longish-name-{i:05d}")


def test_a_damaged_index_page_on_disk_is_refused_naming_the_block(tmp_path):
    """A name-index page damaged on disk, one the newest commit did not write (a page a commit
    wrote and lists is checked at open: the open falls back, see tests/crash/test_one_flush_commit.py)."""
    _big_pool(tmp_path / "p")
    with Pool.open(tmp_path / "p") as pool:  # a newest commit that writes no name page
        pool.thin("base").write(0, b"x" * 4096)
    with DeviceTable.open(tmp_path / "p") as t:
        page = t._stored.index.pages[-1]
        block = t.store.locs["names"][page] >> 32
    with open(tmp_path / "p" / "metadata", "r+b") as f:
        f.seek(block * BLOCK + 100)
        f.write(b"\x5a\xa5")
    with DeviceTable.open(tmp_path / "p") as t:
        assert t.status().nr_thins == 601  # status reads no name
        with pytest.raises(MetadataCorrupt, match=f"names: bad checksum in metadata block {block}") as ei:
            t.thin("volume-with-a-longish-name-00599")
        assert ei.value.structure == "names" and ei.value.block == block
        assert t.thin("base").dev_id == 1  # a name in another page is still found


def test_pool_and_device_table_commit_the_same_catalog_pages(tmp_path):
    """Snapshots taken in one batch by Pool and by DeviceTable (the light `thinpool snapshot`) leave
    byte-identical name index, fence and slot pages: the changes depend only on the names touched."""
    _big_pool(tmp_path / "base", 900)
    shutil.copytree(tmp_path / "base", tmp_path / "a")
    shutil.copytree(tmp_path / "base", tmp_path / "b")
    new = [f"volume-with-a-longish-name-{i:05d}x" for i in range(0, 900, 7)]  # many pages split
    with Pool.open(tmp_path / "a") as p, p.batch():
        for n in new:
            p.snapshot("base", n)
    with DeviceTable.open(tmp_path / "b", read_only=False) as t, t.batch():
        for n in new:
            t.snapshot("base", n)

    def pages(path: Path) -> dict:
        with DeviceTable.open(path) as t:
            return {a: [t.store.read_pages(a, [i])[i] for i in range(t.store.npages(a))]
                    for a in ("names", "vol_slots", "catalog")}
    assert pages(tmp_path / "a") == pages(tmp_path / "b")


def test_rename_delete_and_snapshot_update_the_index(tmp_path):
    origin = tmp_path / "golden.img"
    origin.write_bytes(b"o" * BS)
    with Pool.create(tmp_path / "p", data_size=64 * BS, metadata_only=True) as p:
        p.create_thin("base", "1GiB")
        p.create_thin("ext", "1GiB", external_origin=str(origin))
        for n in ("with space", "ünïcödé ✓", "snap/ns/17", LONG):
            p.snapshot("base", n)
        p.rename("with space", "renamed ✓")
        p.delete("snap/ns/17")
        gens = {n: v["gen"] for n, v in p.catalog["volumes"].items()}
    with DeviceTable.open(tmp_path / "p", read_only=False) as t:
        assert [v.name for v in t.thins()] == ["base", "ext", "renamed ✓", "ünïcödé ✓", LONG]
        with pytest.raises(NotFound):
            t.thin("with space")
        with pytest.raises(NotFound):
            t.thin("snap/ns/17")
        t.snapshot("ext", "ext-snap")
        t.snapshot("renamed ✓", "snap/ns/17")  # the deleted name is free again
        assert t._stored.origins == [t.thin("ext").external_origin]  # one record, shared by both
    with Pool.open(tmp_path / "p") as p:
        vols = p.catalog["volumes"]
        assert {n: gens[n] for n in gens} == {n: vols[n]["gen"] for n in gens}
        assert vols["ext-snap"]["origin"] == vols["ext"]["origin"]
        assert vols["snap/ns/17"]["gen"] > max(gens.values())
        p.delete("ext")
        p.delete("ext-snap")
    with DeviceTable.open(tmp_path / "p") as t:
        assert t._stored.origins == [] and not t.may_have_external_origins()
        assert sorted(v.name for v in t.thins()) == sorted(["base", "renamed ✓", "ünïcödé ✓", LONG, "snap/ns/17"])


def test_names_are_bounded_as_before(tmp_path):
    with Pool.create(tmp_path / "p", data_size=64 * BS, metadata_only=True) as p:
        p.create_thin("base", "1GiB")
        for bad in ("é" * 513, "a\x00b", "a\nb", "\udcff", "", "a//b"):
            with pytest.raises(InvalidArgument):
                p.snapshot("base", bad)
    with DeviceTable.open(tmp_path / "p", read_only=False) as t:
        for bad in ("é" * 513, "a\x00b", "\udcff", ""):
            with pytest.raises(InvalidArgument):
                t.snapshot("base", bad)
        t.snapshot("base", LONG)
    assert C.NameIndex.build([("a\x00b", 1), ("ok", 2)]).odd == {"a\x00b": 1}  # kept, not refused (below)


def _catalog1(tmp_path: Path, name: str = "old") -> Path:
    path = tmp_path / name
    path.mkdir(mode=0o700)
    with tarfile.open(os.path.join(FIXTURES, "catalog1_pool.tar.gz")) as tar:
        tar.extractall(path, filter="data")
    os.chmod(path / "metadata", 0o600)
    return path


def _seen(path: Path) -> dict:
    with Pool.open(path, read_only=True) as p:
        cat = p.catalog
        return {"volumes": {t.name: (t.dev_id, bool(t.read_only)) for t in p.thins()},
                "records": {ns: p.get_records(ns) for ns in p.record_namespaces()},
                "next_dev_id": cat["next_dev_id"], "next_gen": cat["next_gen"],
                "gens": {n: v["gen"] for n, v in cat["volumes"].items()}}


@pytest.mark.parametrize("via", ["pool", "table"])
def test_a_format1_catalog_opens_and_converts_at_its_first_commit(tmp_path, via):
    """A pool written by the format-1 code (tests/engine/fixtures/make_catalog1_pool.py) opens with every
    name, device id, generation and record; opening it writable and closing without a change writes
    nothing; the first commit (a Pool message, or a DeviceTable snapshot) writes format 2 and the
    JSON part shrinks to its origins and records; nothing is lost."""
    path = _catalog1(tmp_path)
    exp = make_catalog1_pool.expected()
    before = _seen(path)
    assert {k: before[k] for k in ("volumes", "records", "next_dev_id", "next_gen")} == exp
    with DeviceTable.open(path) as t:
        assert "catalog_format" not in t.store.header and t.store.npages("catalog") > 3
        assert {v.name: (v.dev_id, v.read_only) for v in t.thins()} == exp["volumes"]
    mtime = os.stat(path / "metadata").st_mtime_ns
    with Pool.open(path):
        pass
    assert os.stat(path / "metadata").st_mtime_ns == mtime  # no change, no commit, no conversion
    if via == "pool":
        with Pool.open(path) as p:
            p.snapshot("base", "after")
    else:
        with DeviceTable.open(path, read_only=False) as t:
            t.snapshot("base", "after")
    after = _seen(path)
    assert after["volumes"].pop("after") == (exp["next_dev_id"], False)
    assert after["gens"].pop("after") == exp["next_gen"]
    assert after == before | {"next_dev_id": exp["next_dev_id"] + 1, "next_gen": exp["next_gen"] + 1}
    with DeviceTable.open(path) as t:
        assert t.store.header["catalog_format"] == C.FORMAT and t.store.npages("catalog") == 1
        assert t.thin(make_catalog1_pool.LONG).dev_id == exp["volumes"][make_catalog1_pool.LONG][0]
    with Pool.open(path) as p:
        assert p.check().ok


def test_odd_names_answer_like_indexed_names_through_the_fence():
    """Names the pages cannot hold live in the fence's ``odd`` list: get, insert, remove, columns,
    and a round trip through the JSON part (the standard library's escapes) keep them."""
    odd = make_catalog1_pool.UNSTORABLE
    idx = C.NameIndex.build([(n, 10 + i) for i, n in enumerate(odd)] + [("plain", 1)])
    assert idx.odd == {n: 10 + i for i, n in enumerate(odd)} and idx.get("plain") == 1
    upd = idx.updates()
    stored = {p: upd.page(p) for p in upd.dirty}
    fence = rules.catalog_loads(rules.catalog_dumps(idx.fence()))  # as the JSON part stores it
    idx = C.NameIndex(fence, idx.npages, lambda _a, ps: {p: stored[p] for p in ps})
    assert [idx.get(n) for n in odd] == [10, 11, 12, 13]
    assert idx.columns() == (["plain", *sorted(odd, key=C._order)],
                             [1, *[10 + odd.index(n) for n in sorted(odd, key=C._order)]])
    assert idx.remove(odd[0]) == 10 and idx.get(odd[0]) is None
    idx.insert("\udcfe", 20)
    with pytest.raises(ValueError):
        idx.insert("\udcfe", 21)
    assert "odd" in idx.fence() and C.NameIndex.build([("plain", 1)]).fence().keys() == {"pages", "free", "keys"}
    for bad in ([["plain", 1]], [["\udcff", 1], ["\udcff", 2]], [["\udcff", -1]], {"\udcff": 1}, [["\udcff"]]):
        with pytest.raises(MetadataCorrupt, match="odd name"):
            C.NameIndex({"pages": [], "free": [], "keys": [], "odd": bad}, 0, None)


def _odd_pool(tmp_path: Path) -> Path:
    path = tmp_path / "odd"
    path.mkdir(mode=0o700)
    with tarfile.open(os.path.join(FIXTURES, "catalog1_odd_pool.tar.gz")) as tar:
        tar.extractall(path, filter="data")
    os.chmod(path / "metadata", 0o600)
    return path


@pytest.mark.parametrize("via", ["pool", "table"])
def test_a_format1_pool_with_names_no_longer_allowed_converts_keeping_every_name(tmp_path, via):
    """Nothing committed is lost and a pool is never left unable to commit: a format-1 pool holding
    names an older thinpool allowed (tests/engine/fixtures/make_catalog1_pool.py --odd: a lone
    surrogate, 5,004 bytes, a NUL, empty) converts at its first commit; every name is listed and
    opened after a reopen, can be renamed to a valid name and deleted, and the pool checks clean;
    new names are still validated."""
    path = _odd_pool(tmp_path)
    exp = make_catalog1_pool.expected_odd()
    odd = make_catalog1_pool.UNSTORABLE
    assert {k: v for k, v in _seen(path).items() if k != "gens"} == exp
    if via == "pool":
        with Pool.open(path) as p:
            p.snapshot("base", "after")
            with pytest.raises(InvalidArgument):
                p.snapshot("base", "new\udcff")
    else:
        with DeviceTable.open(path, read_only=False) as t:
            t.snapshot("base", "after")
            with pytest.raises(InvalidArgument):
                t.snapshot("base", "new" + "z" * 5000)
    seen = _seen(path)
    assert seen["volumes"] == exp["volumes"] | {"after": (exp["next_dev_id"], False)}
    with DeviceTable.open(path) as t:
        assert t.store.header["catalog_format"] == C.FORMAT
        assert t._stored.index.odd.keys() == set(odd)
        assert [t.thin(n).dev_id for n in odd] == [exp["volumes"][n][0] for n in odd]
        assert sorted(t.volume_columns()["name"], key=C._order) == sorted(seen["volumes"], key=C._order)
    with Pool.open(path) as p:
        assert p.check().ok
        p.thin(odd[0]).write(5 * BS, b"still writable")  # a new mapping (metadata-only: no data kept)
        p.rename(odd[0], "fixed")  # an odd name leaves the fence for the index
        p.delete(odd[1])
        with pytest.raises(InvalidArgument):
            p.rename("snap-a", odd[0])  # the odd names are kept, never given anew
    with DeviceTable.open(path) as t:
        assert t._stored.index.odd.keys() == set(odd[2:])
        assert t.thin("fixed").dev_id == exp["volumes"][odd[0]][0]
        with pytest.raises(NotFound):
            t.thin(odd[1])
    with Pool.open(path) as p:
        assert p.thin("fixed").mapped_blocks == 2
        assert sorted(t.name for t in p.thins()) == sorted(["base", "snap-a", "after", "after-odd", "fixed", *odd[2:]])
        assert p.check().ok


def test_repair_keeps_the_odd_names_of_a_format2_catalog(tmp_path):
    """A repair salvages the fence's odd names with the index pages' names (nothing committed lost)."""
    from thinpool.repair import repair
    path = tmp_path / "p"
    with Pool.create(path, data_size=64 * BS) as p:
        p.create_thin("base", "1MiB")
        p._name_ok = lambda name: None  # what an older thinpool allowed
        for name in make_catalog1_pool.UNSTORABLE:
            p.snapshot("base", name)
    before = _seen(path)["volumes"]
    report = repair(path, tmp_path / "out")
    assert not report.names_lost and not report.devices_dropped and not report.problems
    assert _seen(tmp_path / "out")["volumes"] == before


def test_listing_every_name_refuses_a_bad_page_as_a_lookup_does():
    """``columns`` (what ``ls`` reads: every page's names decoded at once) refuses what
    :func:`decode_page` refuses -- counts that do not fit or do not match, a name that is not UTF-8
    or longer than 1,024 bytes -- and names out of order across pages."""
    def listing(*pages: bytes) -> tuple[list[str], list[int]]:
        fence = {"pages": list(range(len(pages))), "free": [], "keys": ["", "c"][:len(pages)]}
        return C.NameIndex(fence, len(pages), lambda _a, ps: {p: pages[p] for p in ps}).columns()
    a, b = C.encode_page([b"a", b"b"], [1, 2]), C.encode_page([b"c", b"d"], [3, 4])
    assert listing(a, b) == (["a", "b", "c", "d"], [1, 2, 3, 4])
    bad_count = bytearray(a)
    bad_count[0:2] = (3).to_bytes(2, "little")
    with pytest.raises(MetadataCorrupt, match="name index page 0"):
        listing(bytes(bad_count), b)
    with pytest.raises(MetadataCorrupt, match="out of order"):
        listing(C.encode_page([b"c", b"e"], [1, 2]), C.encode_page([b"d", b"f"], [3, 4]))
    with pytest.raises(MetadataCorrupt, match="not UTF-8"):
        listing(a, C.encode_page([b"c", b"\xff\xfe"], [3, 4]))
    with pytest.raises(MetadataCorrupt, match="longer than 1,024"):
        listing(a, C.encode_page([b"c", b"d" * 1025], [3, 4]))


def test_the_cli_lists_renames_and_deletes_a_converted_pools_odd_names(tmp_path):
    """After the conversion the odd names are usable from the command line too: `ls` prints them
    (text and JSON; the text writes a lone surrogate as the undecodable byte it stands for, even where
    stdout's encoding is strict), and `rename`/`delete` take them as the shell passes them (Python's
    surrogateescape)."""
    import subprocess
    import sys
    path = _odd_pool(tmp_path)
    odd = make_catalog1_pool.UNSTORABLE
    cli = [sys.executable, "-m", "thinpool"]

    def run(*args: str | bytes) -> bytes:
        env = dict(os.environ, PYTHONIOENCODING="utf-8:strict")  # (a UTF-8 locale's stdout refuses surrogates)
        r = subprocess.run([*cli, *args], capture_output=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        return r.stdout
    run("snapshot", str(path), "base", "after")  # converts
    listed = json.loads(run("ls", "--json", str(path)))
    assert sorted(v["name"] for v in listed) == sorted([*make_catalog1_pool.expected_odd()["volumes"], "after"])
    assert b"bad\xff" in run("ls", str(path))  # the undecodable byte, as it was given
    run("rename", str(path), os.fsencode(odd[0]), "fixed")
    run("delete", str(path), os.fsencode(odd[1]))
    names = {v["name"] for v in json.loads(run("ls", "--json", str(path)))}
    assert "fixed" in names and odd[0] not in names and odd[1] not in names and set(odd[2:]) <= names
