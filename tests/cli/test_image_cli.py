"""`thinpool image import|ls|history|rm`, `thinpool container create|exec|rm` and `thinpool ps -s`."""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.cli.test_cli import cli, error_of, invoke
from tests.containers.oci_images import layer_tar, oci_layout
from tests.containers.test_image_store import BASE, _needs, new_pool
from thinpool.units import format_docker_size

pytestmark = pytest.mark.realtools
#: the --json keys docs/containers.md §7 lists
IMAGE_KEYS = ("id tags format archive fs base_size mkfs block_size created imported new file_bytes top_chain_id "
              "history layers").split()
LAYER_KEYS = "index chain_id diff_id digest media_type blob_bytes file_bytes entries owned_blocks volume".split()
HISTORY_KEYS = ("created_by created layer volume file_bytes blob_bytes owned_blocks block_bytes mapped_blocks "
                "exclusive_blocks shared_blocks").split()
PS_KEYS = "name image image_id image_ref created volume init_volume".split()
PS_SIZE_KEYS = ("block_size owned_blocks size_bytes init_owned_blocks mapped_blocks exclusive_blocks shared_blocks "
                "virtual_size_bytes").split()


@pytest.fixture
def image(tmp_path) -> str:
    """A two-layer OCI layout tagged ``app`` (the second layer deletes a file of the first)."""
    _needs()
    return oci_layout(str(tmp_path / "img"), [
        layer_tar([("etc", "dir", None), ("etc/conf", "file", b"a=1\n"), ("data.bin", "file", os.urandom(300_000)),
                   ("old", "file", b"old\n")]),
        layer_tar([(".wh.old", "file", b""), ("etc/conf", "file", b"a=2\n")])], tag="app")["layout"]


def test_cli_image_and_container_lifecycle(tmp_path, image: str) -> None:
    pool = new_pool(str(tmp_path))
    out = json.loads(invoke("image", "import", pool, image, "--tag", "acme/app:1", "--base-size", BASE,
                         "--json").stdout)
    assert out["tags"] == ["acme/app:1"] and out["new"] and len(out["layers"]) == 2 and out["fs"] == "ext4"
    assert set(out) == set(IMAGE_KEYS) and set(out["layers"][0]) == set(LAYER_KEYS)     # docs/containers.md §7
    assert out["mkfs"].startswith("mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0")
    again = invoke("image", "import", pool, image, "--tag", "acme/app:1", "--base-size", BASE).stdout
    assert "already stored (nothing written)" in again
    ls = json.loads(invoke("image", "ls", pool, "--json").stdout)
    assert [i["id"] for i in ls] == [out["id"]]
    text = invoke("image", "ls", pool).stdout
    assert re.search(r"^acme/app\s+1\s+" + out["id"][7:19] + r"\s+2\s", text, re.M)
    hist = json.loads(invoke("image", "history", pool, "acme/app:1", "--json").stdout)
    assert all(set(h) == set(HISTORY_KEYS) for h in hist)
    assert [h["layer"] for h in hist] == [x["chain_id"] for x in reversed(out["layers"])] + ["base"]
    assert [h["owned_blocks"] for h in hist[:2]] == [x["owned_blocks"] for x in reversed(out["layers"])]
    invoke("container", "create", pool, "acme/app:1", "web1")
    r = cli("container", "exec", pool, "web1", "--", "sh", "-c",
            'cat etc/conf; test ! -e old && head -c 200000 /dev/urandom > "$ROOT/new"; exit 3', check=3)
    assert r.stdout == b"a=2\n"
    ps = json.loads(invoke("ps", "-s", pool, "--json").stdout)
    assert set(ps[0]) == set(PS_KEYS) | set(PS_SIZE_KEYS)
    assert set(json.loads(invoke("ps", pool, "--json").stdout)[0]) == set(PS_KEYS)
    assert [p["name"] for p in ps] == ["web1"] and ps[0]["owned_blocks"] >= 3
    size = f"{format_docker_size(ps[0]['size_bytes'])} (virtual {format_docker_size(ps[0]['virtual_size_bytes'])})"
    table = invoke("ps", "-s", pool).stdout.splitlines()
    assert table[0].split() == ["NAMES", "IMAGE", "VOLUME", "CREATED", "SIZE"]
    assert table[1].startswith("web1") and table[1].endswith(size) and "acme/app:1" in table[1]
    assert "SIZE" not in invoke("ps", pool).stdout
    assert "used by container(s) web1" in invoke("image", "rm", pool, "acme/app:1", code=1).stderr
    invoke("container", "rm", pool, "web1")
    rm = invoke("image", "rm", pool, "acme/app:1").stdout
    assert f"Deleted: {out['id']}" in rm and rm.count("Deleted layer:") == 2
    assert json.loads(invoke("ls", pool, "--json").stdout)[0]["name"] == "snap/images/1"


def test_cli_without_root_says_so_in_one_line(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = new_pool(str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for args in (["image", "import", pool, str(tmp_path)], ["container", "create", pool, "x", "c"],
                 ["container", "exec", pool, "c", "--", "true"]):
        line = error_of(invoke(*args, code=1))
        assert re.match(r"thinpool: error: thinpool (image import|container create|container exec) mounts thin "
                        r"volumes and needs root", line), line


def test_cli_served_pool_reports_but_does_not_import(tmp_path, image: str) -> None:
    """On a pool being served the reporting commands go through the control socket; the mounting ones are
    refused in one line (they serve the pool themselves)."""
    from thinpool.cli.registry import op_table
    from thinpool.nbd.served import Served
    pool = new_pool(str(tmp_path))
    invoke("image", "import", pool, image, "--base-size", BASE)
    local = json.loads(invoke("image", "history", pool, "app", "--json").stdout)
    s = Served(pool, op_table(), socket_path=str(tmp_path / "nbd.sock"))
    s.start()
    try:
        assert json.loads(invoke("image", "history", pool, "app", "--json").stdout) == local
        assert json.loads(invoke("ps", "-s", pool, "--json").stdout) == []
        assert "is being served" in error_of(invoke("image", "import", pool, image, code=1))
    finally:
        s.stop()
