"""Regressions found by an adversarial sweep of the CLI (every command with empty, hostile and
malformed values): each refusal is one line naming what is wrong, and nothing is written that the
user did not name -- no lock file left in a directory that is no pool, no output guessed from an
empty string."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from thinpool import Pool
from thinpool.cli import main
from thinpool.errors import NotFound
from thinpool.repair import repair


def invoke(*args: object, code: int) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == code, (args, r.exit_code, r.stdout, r.stderr)
    return r.stderr


def tree(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
            for f in sorted(path.rglob("*"))}


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    path = tmp_path / "pool"
    with Pool.create(path, data_size="8MiB", block_size="64KiB") as p:
        p.create_thin("base", "1MiB").write(0, b"hello")
    return path


def test_repair_of_a_directory_that_is_no_pool_writes_nothing_into_it(tmp_path: Path) -> None:
    """``thinpool repair DIR`` of a directory without a metadata file is refused naming it -- before the
    pool lock is taken, which used to leave a ``lock`` file behind in the user's directory."""
    d = tmp_path / "notapool"
    d.mkdir()
    (d / "keep").write_text("mine")
    err = invoke("repair", d, code=1)
    assert f"{d} is not a thin pool (no metadata file)" in err, err
    assert sorted(os.listdir(d)) == ["keep"]
    f = tmp_path / "afile"  # (the CLI's POOL argument refuses a file itself: exit 2)
    f.write_text("x")
    with pytest.raises(NotFound, match="is not a thin pool .not a directory."):
        repair(f)


@pytest.mark.parametrize("args", [
    ("status", ""), ("ls", ""), ("create-thin", "", "v", "1M"), ("check", ""),
    ("export", "{pool}", "base", ""), ("read", "{pool}", "base", "--output", ""),
    ("export-metadata", "{pool}", ""),
])
def test_an_empty_path_is_a_usage_error_not_the_current_directory(pool: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  args: tuple[str, ...]) -> None:
    """An empty POOL or output path names no file: a usage error (exit 2) saying so -- it used to be
    taken for the current directory ("/cwd is not a thin pool", "output /cwd: is a directory")."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = tree(pool)
    err = invoke(*[a.format(pool=pool) for a in args], code=2)
    assert "empty" in err and str(cwd) not in err, err
    assert tree(pool) == before and os.listdir(cwd) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("args", [("export", "{pool}", "base", "/dev/full"), ("dump", "{pool}", "-o", "/dev/full"),
                                  ("read", "{pool}", "base", "--output", "/dev/full")])
def test_an_output_device_that_refuses_writes_is_named_in_the_error(pool: Path, args: tuple[str, ...]) -> None:
    """An output that is a device failing its writes (``/dev/full``: ENOSPC) names the output in the
    one-line error -- it used to say only "No space left on device"."""
    before = tree(pool)
    err = invoke(*[a.format(pool=pool) for a in args], code=1)
    assert "/dev/full" in err and "No space left on device" in err, err
    assert tree(pool) == before


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_metadata_errors_name_the_metadata_file(pool: Path, damage: str) -> None:
    """A metadata page that fails its checksum or lies past the end of a truncated file: every command's
    error names the pool's metadata file (it used to name only the structure and block)."""
    md = pool / "metadata"
    if damage == "flip":
        data = bytearray(md.read_bytes())
        for k in range(3 * 4096 + 100, len(data), 4096):  # one byte of every page past both superblocks
            data[k] ^= 0xFF
        md.write_bytes(bytes(data))
    else:
        os.truncate(md, 3 * 4096)
    before = tree(pool)
    for cmd in (("status",), ("ls",), ("create-thin", "v", "1M")):
        err = invoke(cmd[0], pool, *cmd[1:], code=1)
        assert str(md) in err, (cmd, err)
    assert tree(pool) == before


@pytest.mark.parametrize("blob", [b"", b"\0" * 100, b"\0" * 8192, bytes(range(256)) * 32])
def test_import_metadata_of_a_file_that_is_not_metadata_names_the_file(tmp_path: Path, blob: bytes) -> None:
    """``thinpool import-metadata FILE POOL`` of an empty, short, zeroed or random file: the error names
    FILE (it used to name only "superblock" and a block), and no pool is left behind."""
    src = tmp_path / "meta.bin"
    src.write_bytes(blob)
    err = invoke("import-metadata", src, tmp_path / "new", code=1)
    assert f"{src}: superblock: " in err, err
    assert not (tmp_path / "new").exists() or os.listdir(tmp_path / "new") == []


def test_a_pool_is_never_created_inside_another_pools_directory(pool: Path, tmp_path: Path) -> None:
    """``create``, ``restore`` and ``import-metadata`` of a new pool whose directory would lie in an
    existing pool's directory are refused naming it (``create POOL/inner`` used to succeed, putting a
    directory among the pool's own files); the pool is unchanged."""
    before = tree(pool)
    err = invoke("create", pool / "inner", "--data-size", "16M", code=1)
    assert f"would lie in the directory of pool {pool}" in err, err
    xml = tmp_path / "dump.xml"
    invoke("dump", pool, "-o", xml, code=0)
    err = invoke("restore", pool / "inner", "-i", xml, code=1)
    assert f"would lie in the directory of pool {pool}" in err, err
    assert tree(pool) == before


@pytest.mark.parametrize("name", ["data", "metadata"])
def test_import_of_the_pools_own_file_is_refused(pool: Path, name: str) -> None:
    """``thinpool import POOL NEW POOL/data`` (or its metadata) would read a file the import itself
    writes: refused naming it, the pool unchanged (it used to import a changing image)."""
    before = tree(pool)
    err = invoke("import", pool, "copy", pool / name, code=1)
    assert f"a file of pool {pool} itself" in err, err
    assert tree(pool) == before


def test_snapshot_labels_with_control_characters_print_escaped(pool: Path) -> None:
    """A containerd label may hold any characters (containerd bounds only their length), but the text
    output shows a newline in one escaped, so it cannot pass for another label on a line of its own."""
    invoke("snapshotter", "prepare", pool, "k1", code=0)
    r = CliRunner().invoke(main, ["snapshotter", "update", str(pool), "k1", "--label", "a\nb=c"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert "a\\nb=c" in r.stdout and len(r.stdout.strip().splitlines()) == 1, r.stdout
