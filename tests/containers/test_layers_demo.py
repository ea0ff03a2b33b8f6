"""The Docker-like layer store and the seed walkthrough (``thinpool demo``): measured block-level numbers
at 64 KiB and 512 KiB blocks, file-level versus block-level sizes, and the CLI."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

import pytest
from click.testing import CliRunner

from thinpool import Pool
from thinpool.containers.demo import run_demo
from thinpool.errors import AlreadyExists, InvalidArgument, NotFound
from thinpool.containers.layers import LayerStore, Step, file_content
from thinpool.containers.snapshotter import Snapshotter

K64, K512 = 64 * 1024, 512 * 1024
UBUNTU_FILES = [103_000_000, 745, 2_780, 7]
IMAGE_FILE_BYTES = sum(UBUNTU_FILES) + 100  # 103,003,632: what Docker reports as the image size
NAMES = [f"my_container_{i}" for i in range(1, 6)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def demo64():
    return run_demo()


@pytest.fixture(scope="module")
def demo512():
    return run_demo(block_size="512K")


# ------------------------------------------------------------------------------------------ the demo
def _check_demo(r, bs, big_blocks):
    image_blocks = big_blocks + 4
    assert r["block_size"] == bs
    assert r["pool_used_blocks_after_base"] == 0
    assert r["image_blocks"] == image_blocks and r["image_bytes"] == image_blocks * bs
    assert r["image_top_layer_mapped_blocks"] == image_blocks
    assert r["pool_used_blocks_after_images"] == image_blocks
    assert r["pool_used_blocks_after_start"] == image_blocks and r["containers_added_blocks"] == 0
    assert r["pool_used_blocks_after_writes"] == image_blocks + 3 and r["writes_added_blocks"] == 3
    assert r["pool_used_blocks_after_change"] == image_blocks + 4
    assert r["thin_devices"] == 16  # base, 5 layers, 5 x (-init + container): docs/containers.md §5

    start = r["containers_at_start"]
    assert [c["name"] for c in start] == NAMES
    for c in start:
        assert (c["size_bytes"], c["owned_blocks"], c["file_level_size_bytes"]) == (0, 0, 0)
        assert c["virtual_size_bytes"] == image_blocks * bs and c["mapped_blocks"] == image_blocks
        assert c["file_level_virtual_size_bytes"] == IMAGE_FILE_BYTES

    for w in r["writes"]:
        assert (w["path"], w["bytes_written"], w["block_level_bytes"], w["owned_blocks_added"],
                w["pool_blocks_added"], w["copy_up_bytes"], w["file_level_bytes"]) == ("/out.txt", 5, bs, 1, 1, 0, 5)
    after = {c["name"]: c for c in r["containers_after_writes"]}
    for n in NAMES[:3]:
        assert (after[n]["size_bytes"], after[n]["file_level_size_bytes"], after[n]["mapped_blocks"]) == \
            (bs, 5, image_blocks + 1)
        assert after[n]["virtual_size_bytes"] == bs + image_blocks * bs
    for n in NAMES[3:]:
        assert (after[n]["size_bytes"], after[n]["file_level_size_bytes"]) == (0, 0)

    cu = r["copy_up"]
    assert cu["container"] == "my_container_4" and cu["bytes_changed"] == 4096
    assert (cu["block_level_bytes"], cu["owned_blocks_added"], cu["pool_blocks_added"]) == (bs, 1, 1)
    assert cu["file_level_bytes"] == 103_000_000
    assert cu["other_containers_unchanged"] is True
    final = {c["name"]: c for c in r["containers"]}
    assert final["my_container_4"]["size_bytes"] == bs
    assert final["my_container_4"]["file_level_size_bytes"] == 103_000_000  # Docker: the whole file is "changed"
    assert final["my_container_5"]["size_bytes"] == 0

    hist = r["history"]["acme/my-base-image:1.0"]
    assert [h["size_bytes"] for h in hist] == [100, 0, 7, 2_780, 0, 745, 103_000_000]  # docs/containers.md §4
    assert [h["owned_blocks"] for h in hist] == [1, 0, 1, 1, 0, 1, big_blocks]
    assert [h["block_level_bytes"] for h in hist] == [h["owned_blocks"] * bs for h in hist]
    assert [h["layer"] is None for h in hist] == [False, True, False, False, True, False, False]
    final_hist = r["history"]["acme/my-final-image:1.0"]
    assert len(final_hist) == 8 and final_hist[0]["size_bytes"] == 0 and final_hist[0]["layer"] is None
    assert final_hist[1:] == hist  # every other layer is shared
    images = {f"{i['repository']}:{i['tag']}": i for i in r["images"]}
    for ref in ("acme/my-base-image:1.0", "acme/my-final-image:1.0"):
        assert images[ref]["size_bytes"] == IMAGE_FILE_BYTES and images[ref]["layers"] == 5
        assert images[ref]["mapped_blocks"] == image_blocks
    assert [h["image"] for h in final_hist[:3]] == [images["acme/my-final-image:1.0"]["image_id"],
                                                     images["acme/my-base-image:1.0"]["image_id"],
                                                     images["ubuntu:16.10"]["image_id"]]
    assert {h["image"] for h in final_hist[3:]} == {"<missing>"}
    info = r["info"]
    assert info["pool_blocksize"] == bs and info["base_device_size"] == 10 << 30
    assert info["data_space_used"] == r["pool_used_blocks_after_change"] * bs
    assert info["used_data_blocks"] == r["pool_used_blocks_after_change"]


def test_demo_numbers_64k(demo64):
    _check_demo(demo64, K64, 1_572)
    assert demo64["image_blocks"] == 1_576 and demo64["image_bytes"] == 103_284_736
    assert demo64["copy_up"]["block_level_bytes"] == 65_536


def test_demo_numbers_512k(demo512):
    _check_demo(demo512, K512, 197)
    assert demo512["image_blocks"] == 201 and demo512["image_bytes"] == 105_381_888


def test_demo_is_json_serializable_and_removes_its_temp_dir(demo64):
    json.dumps(demo64)
    assert demo64["pool"] is None
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "thinpool-demo-*")))
    r = run_demo(block_size="1M", data_size="1GiB")
    assert r["image_blocks"] == 99 + 4  # ceil(103e6 / 1 MiB) + 4 one-block files, measured
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "thinpool-demo-*"))) <= before


def test_demo_cli_json_subprocess_keeps_a_consistent_pool(tmp_path):
    pool_dir = tmp_path / "demo-pool"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "thinpool", "demo", "--json", "--dir", str(pool_dir)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    for key in ("block_size", "image_blocks", "pool_used_blocks_after_start", "pool_used_blocks_after_writes",
                "containers", "copy_up"):
        assert key in r
    for c in r["containers"]:
        assert {"name", "size_bytes", "virtual_size_bytes", "file_level_size_bytes"} <= set(c)
    assert {"block_level_bytes", "file_level_bytes"} <= set(r["copy_up"])
    assert (r["block_size"], r["image_blocks"], r["pool_used_blocks_after_start"],
            r["pool_used_blocks_after_writes"]) == (K64, 1_576, 1_576, 1_579)
    assert r["pool"] == str(pool_dir)

    with Pool.open(pool_dir) as pool:  # the kept pool: records and devices agree, Docker view reloads
        assert pool.check().ok
        assert Snapshotter(pool, "moby").check() == []
        assert all(t.name.startswith("snap/moby/") for t in pool.thins()) and len(pool.thins()) == 16
        store = LayerStore(pool)
        rows = {p.name: p for p in store.ps()}
        assert rows["my_container_4"].size_bytes == K64 and rows["my_container_5"].size_bytes == 0
        assert pool.status().used_data_blocks == r["pool_used_blocks_after_change"]


def test_demo_cli_text():
    from thinpool.cli import main
    res = CliRunner().invoke(main, ["demo", "--block-size", "512K"])
    assert res.exit_code == 0, res.output
    out = res.output
    for needle in ("$ docker images", "$ docker history acme/my-base-image:1.0", "$ docker ps -s",
                   "$ docker info", "Pool Blocksize: 524.3 kB", "Base Device Size: 10.74 GB",
                   "image chain: 201 data blocks", "overlay-style copy-up:     103,000,000 bytes",
                   "1 block(s) = 524,288 bytes", "0B (virtual 103MB)", "5B (virtual 103MB)"):
        assert needle in out, needle


def test_demo_cli_refuses_a_non_empty_dir(tmp_path):
    from thinpool.cli import main
    (tmp_path / "junk").write_text("x")
    res = CliRunner().invoke(main, ["demo", "--dir", str(tmp_path)])
    assert res.exit_code == 1 and "thinpool: error:" in res.output and str(tmp_path) in res.output


def test_demo_data_size_just_enough_runs_and_one_block_less_is_refused_at_once(tmp_path):
    # blocks_needed is exactly what the walkthrough maps: a pool of that many blocks completes it full; one
    # block fewer is refused before anything is made (it used to run out half-way and, queue_if_no_space
    # being the default, fail only after waiting the pool's 60 s no_space_timeout)
    from thinpool.containers.demo import blocks_needed
    for bs in (64 << 10, 512 << 10):
        need = blocks_needed(bs)
        r = run_demo(tmp_path / f"ok{bs}", block_size=bs, data_size=need * bs)
        assert r["pool_used_blocks_after_change"] == need, (bs, r["pool_used_blocks_after_change"], need)
        with pytest.raises(InvalidArgument, match=f"maps {need} "):
            run_demo(tmp_path / f"small{bs}", block_size=bs, data_size=(need - 1) * bs)
        assert not os.path.exists(tmp_path / f"small{bs}")
    from thinpool.cli import main
    res = CliRunner().invoke(main, ["demo", "--data-size", "1M"])
    assert res.exit_code == 1 and res.output.startswith("thinpool: error: data size 1048576 bytes holds 16 blocks")


# ------------------------------------------------------------------------------------------ layer store
@pytest.fixture
def store(tmp_path):
    pool = Pool.create(tmp_path / "pool", data_size="64MiB", block_size=K64)
    yield LayerStore(pool, base_size="4MiB", seed=5)
    pool.close(commit=False)


def _image(store):
    store.build("img:1", [Step.of("ADD a b c d", ("/a", 1), ("/b", K64 + 1), ("/c", 0), ("/d", 3 * K64)),
                          Step.of("CMD x"), Step.of("COPY e", ("/e", 10))])
    return "img:1"


def test_files_block_aligned_and_file_vs_block_level_sizes(store):
    _image(store)
    files = store.image_files("img:1")
    assert {p: (f["offset"], f["size"]) for p, f in files.items()} == {
        "/a": (0, 1), "/b": (K64, K64 + 1), "/c": (3 * K64, 0), "/d": (3 * K64, 3 * K64), "/e": (6 * K64, 10)}
    hist = store.history("img:1")
    assert [(h.size_bytes, h.owned_blocks) for h in hist] == [(10, 1), (0, 0), (1 + K64 + 1 + 3 * K64, 6)]
    assert hist[0].image != "<missing>" and {h.image for h in hist[1:]} == {"<missing>"}
    (row,) = store.images()
    assert (row.repository, row.tag, row.size_bytes, row.block_level_bytes, row.mapped_blocks, row.layers) == \
        ("img", "1", 3 * K64 + K64 + 12, 7 * K64, 7, 2)
    assert store.pool.status().used_data_blocks == 7
    stat = store.snapshotter.stat(hist[0].layer)
    assert stat.kind == "committed" and stat.parent == hist[2].layer
    assert store.snapshotter.stat(hist[2].layer).parent == "base"  # lowest layer: snapshot of the base device
    assert store.snapshotter.volume("base").mapped_blocks == 0


def test_content_is_deterministic_pseudo_random(tmp_path, store):
    _image(store)
    cid = store.run("img:1", "c")
    data = store.read_file("c", "/d")
    assert len(data) == 3 * K64 and len(set(data)) > 200
    p2 = Pool.create(tmp_path / "p2", data_size="64MiB")
    other = LayerStore(p2, base_size="4MiB", seed=5)
    _image(other)
    other.run("img:1", "c")
    assert other.read_file("c", "/d") == data
    p3 = Pool.create(tmp_path / "p3", data_size="64MiB")
    third = LayerStore(p3, base_size="4MiB", seed=6)
    _image(third)
    third.run("img:1", "c")
    assert third.read_file("c", "/d") != data
    assert file_content(1, 10).tobytes() == file_content(1, 20).tobytes()[:10]
    assert cid and len(cid) == 64
    p2.close()
    p3.close()


def test_container_devices_and_block_level_cow(store):
    _image(store)
    top = store.image_top_layer("img:1")
    cid = store.run("img:1", "c1")
    store.run("img:1", "c2")
    s = store.snapshotter
    assert s.stat(f"{cid}-init").kind == "committed" and s.stat(f"{cid}-init").parent == top
    assert s.stat(cid).kind == "active" and s.stat(cid).parent == f"{cid}-init"
    assert store.pool.status().used_data_blocks == 7

    w = store.write_file("c1", "/d", K64 - 50, b"x" * 100)  # straddles two blocks of an image file
    assert (w.owned_blocks_added, w.pool_blocks_added, w.block_level_bytes) == (2, 2, 2 * K64)
    assert (w.copy_up_bytes, w.file_level_bytes, w.file_size, w.relocated) == (3 * K64, 3 * K64, 3 * K64, False)
    w2 = store.write_file("c1", "/d", K64, b"y")  # same file, an already-owned block
    assert (w2.owned_blocks_added, w2.pool_blocks_added, w2.copy_up_bytes, w2.file_level_bytes) == (0, 0, 0, 0)
    w3 = store.write_file("c1", "/d", 2 * K64 + 5, b"z")  # same file, an inherited block
    assert (w3.owned_blocks_added, w3.copy_up_bytes) == (1, 0)

    got = store.read_file("c1", "/d")
    orig = store.read_file("c2", "/d")
    assert got[K64 - 50:K64] == b"x" * 50 and got[K64:K64 + 1] == b"y" and got[K64 + 1:K64 + 50] == b"x" * 49
    assert got[2 * K64 + 5:2 * K64 + 6] == b"z" and got[:K64 - 50] == orig[:K64 - 50]
    assert orig != got and store.read_file("c2", "/a") == store.read_file("c1", "/a")

    rows = {r.name: r for r in store.ps()}
    assert (rows["c1"].size_bytes, rows["c1"].owned_blocks, rows["c1"].file_level_size_bytes) == \
        (3 * K64, 3, 3 * K64)
    assert rows["c1"].virtual_size_bytes == 3 * K64 + 7 * K64
    assert rows["c1"].file_level_virtual_size_bytes == 3 * K64 + 3 * K64 + K64 + 12
    assert (rows["c2"].size_bytes, rows["c2"].file_level_size_bytes) == (0, 0)
    assert store.ps(size=False)[0].size_bytes is None


def test_new_files_growth_and_relocation(store):
    _image(store)
    store.run("img:1", "c")
    w = store.write_file("c", "/new", 0, b"hello")
    assert (w.owned_blocks_added, w.file_level_bytes, w.copy_up_bytes) == (1, 5, 0)
    assert store.container_files("c")["/new"]["offset"] == 7 * K64  # after everything the image holds
    w = store.write_file("c", "/new", 2 * K64, b"!")  # the last file grows in place
    assert (w.relocated, w.owned_blocks_added, w.file_size) == (False, 1, 2 * K64 + 1)
    assert store.read_file("c", "/new", 0, 5) == b"hello"

    before_b = store.read_file("c", "/b")
    before_d = store.read_file("c", "/d")
    w = store.write_file("c", "/b", 2 * K64, b"grow")  # /b would run into /c and /d: it moves
    assert w.relocated and w.file_size == 2 * K64 + 4
    files = store.container_files("c")
    assert files["/b"]["offset"] == 10 * K64 and files["/d"]["offset"] == 3 * K64
    b = store.read_file("c", "/b")
    assert b[:K64 + 1] == before_b and b[-4:] == b"grow" and store.read_file("c", "/d") == before_d
    empty_init = store.write_file("c", "/etc/hosts", 0, b"127.0.0.1 localhost\n")  # an empty init file
    assert empty_init.copy_up_bytes == 0 and empty_init.owned_blocks_added == 1


def test_layer_store_errors_leave_the_pool_unchanged(store):
    _image(store)
    store.run("img:1", "c")
    pool = store.pool
    snapshot = lambda: (sorted(t.name for t in pool.thins()), json.dumps(pool.get_records("layers/moby")),  # noqa
                        pool.status().used_data_blocks)
    before = snapshot()
    cases = [
        (AlreadyExists, "'img:1'", lambda: store.build("img:1", [Step.of("x", ("/x", 1))])),
        (NotFound, "'nope:latest'", lambda: store.build("new", [Step.of("x")], base="nope")),
        (NotFound, "'nope:latest'", lambda: store.run("nope", "c9")),
        (NotFound, "'nope:latest'", lambda: store.history("nope")),
        (AlreadyExists, "'c'", lambda: store.run("img:1", "c")),
        (NotFound, "'ghost'", lambda: store.write_file("ghost", "/x", 0, b"x")),
        (NotFound, "'/nothing'", lambda: store.read_file("c", "/nothing")),
        (InvalidArgument, "'rel'", lambda: store.write_file("c", "rel", 0, b"x")),
        (InvalidArgument, "offset", lambda: store.write_file("c", "/x", -1, b"x")),
        (InvalidArgument, "'rel'", lambda: store.build("new", [Step.of("x", ("rel", 1))])),
        (InvalidArgument, "past the end", lambda: store.build("big", [Step.of("ok", ("/ok", K64)),
                                                                       Step.of("x", ("/huge", 8 << 20))])),
        (InvalidArgument, "past the", lambda: store.write_file("c", "/d", 5 << 20, b"x")),
    ]
    for exc, needle, fn in cases:
        with pytest.raises(exc) as info:
            fn()
        assert needle in str(info.value), str(info.value)
        assert snapshot() == before, str(info.value)
    assert store.snapshotter.check() == [] and pool.check().ok


def test_records_persist_and_rm_frees_blocks(tmp_path):
    path = tmp_path / "pool"
    pool = Pool.create(path, data_size="64MiB")
    store = LayerStore(pool, base_size="4MiB", seed=9)
    _image(store)
    store.run("img:1", "c")
    store.write_file("c", "/new", 0, b"data")
    pool.close(commit=False)  # everything was committed by the store

    pool = Pool.open(path)
    store = LayerStore(pool, seed=123)  # the stored seed wins
    assert store.seed == 9 and [i.repository for i in store.images()] == ["img"]
    assert store.read_file("c", "/new") == b"data"
    assert pool.status().used_data_blocks == 8
    store.rm("c")
    pool.commit()
    assert pool.status().used_data_blocks == 7 and [p.name for p in store.ps()] == []
    assert len(pool.thins()) == 3  # base + two layers
    with pytest.raises(NotFound):
        store.rm("c")
    pool.close()
