"""One data file, exactly one owning pool; explicit data files; truncated data files.

* A data file is stamped with its pool's uuid (``user.thinpool.owner``, or a record file where user
  xattrs are unsupported) and flocked by its open pool: a second pool over it (``restore
  --data-file``, ``import-metadata --data``, ``create --data-file``) is refused unless
  ``--take-over-data``, after which the old pool refuses to open; a failed restore/import/create/
  ``repair -o`` leaves nothing behind; trim and the open-time scrub never punch a file another pool owns.
* ``create --data-file`` refuses a non-empty existing file without ``--force``.
* A data file shorter than the pool is refused by every open when a mapped block lies past its end
  (nothing is re-extended); ``repair`` drops those mappings, reports the loss and re-extends it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from thinpool import Pool
from thinpool import ownership
from thinpool.cli import main
from thinpool.devtable import DeviceTable
from thinpool.errors import AlreadyExists, FailedPrecondition
from thinpool.interop.xml import dump_xml
from thinpool.repair import repair

KB = 1024
MB = 1024 * KB
BS = 64 * KB


def invoke(*args: str, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
    return result


def uuid_of(path: Path) -> str:
    with Pool.open(path, read_only=True) as pool:
        return pool.uuid


def owner_of(path: Path) -> str | None:
    stamp = ownership.read_stamp(str(path))
    return None if stamp is None else stamp.uuid


def blocks_held(path: Path) -> int:
    """Data blocks of ``path`` that hold data on the host filesystem (not holes)."""
    from thinpool.datadev import SEEK_DATA, SEEK_HOLE
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, held = os.fstat(fd).st_size, 0, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, SEEK_HOLE)
            held += stop - start
            pos = stop
        return held // BS
    finally:
        os.close(fd)


@pytest.fixture
def src(tmp_path: Path):
    """The issue's SRC: 4 MiB written to one volume, then 30 snapshots of it."""
    path = tmp_path / "SRC"
    payload = np.random.default_rng(7).integers(0, 256, 4 * MB, dtype=np.uint8).tobytes()
    with Pool.create(path, data_size="64MiB") as pool:
        pool.create_thin("v", "16MiB").write(0, payload)
        for i in range(30):
            pool.snapshot("v", f"s{i}")
    return path, payload


def test_issue_repro_restore_over_another_pools_data_is_refused_and_leaves_nothing(src, tmp_path):
    path, payload = src
    uuid = uuid_of(path)
    invoke("dump", path, "-o", tmp_path / "x.xml")
    new = tmp_path / "NEW"
    for extra in (["--metadata-size", "256K"], []):  # out of metadata space, and big enough
        r = invoke("restore", new, "-i", tmp_path / "x.xml", "--data-file", path / "data", *extra, code=1)
        assert f"data file {path / 'data'} belongs to pool {uuid} at {path}" in r.stderr
        assert "--take-over-data" in r.stderr
        assert not new.exists()
        assert owner_of(path / "data") == uuid
    # what used to follow: `create-thin NEW y 1M` punched every block of SRC
    invoke("create-thin", new, "y", "1M", code=1)
    assert not new.exists()
    with Pool.open(path) as pool:
        assert pool.thin("v").read(0, 4 * MB) == payload
        assert pool.thin("s29").read(0, 4 * MB) == payload
        assert pool.check().ok
    assert blocks_held(path / "data") == 4 * MB // BS


def test_take_over_data_failed_restore_leaves_nothing_and_keeps_the_owner(src, tmp_path):
    path, payload = src
    uuid = uuid_of(path)
    with Pool.open(path) as pool:  # every snapshot its own leaf: a restore keeps sharing, so make none
        for i in range(30):
            pool.thin(f"s{i}").write(i * 65536, b"!")
        # and enough of them dense (a whole 16 MiB volume mapped) that 256K of metadata cannot hold them
        pool.create_thin("w", "16MiB").write(0, b"\x01" * (16 * MB))
        for i in range(80):
            pool.snapshot("w", f"w{i}")
            pool.thin(f"w{i}").write(i * 65536, b"!")
    invoke("dump", path, "-o", tmp_path / "x.xml")
    new = tmp_path / "NEW"
    r = invoke("restore", new, "-i", tmp_path / "x.xml", "--data-file", path / "data", "--metadata-size", "256K",
               "--take-over-data", code=1)
    assert "out of metadata space" in r.stderr
    assert not new.exists()
    assert owner_of(path / "data") == uuid  # the previous stamp is put back
    with Pool.open(path) as pool:
        assert pool.thin("v").read(0, 4 * MB) == payload


def test_take_over_data_makes_the_old_pool_refuse_to_open(src, tmp_path):
    path, payload = src
    invoke("dump", path, "-o", tmp_path / "x.xml")
    new = tmp_path / "NEW"
    invoke("restore", new, "-i", tmp_path / "x.xml", "--data-file", path / "data", "--take-over-data")
    new_uuid = uuid_of(new)
    assert owner_of(path / "data") == new_uuid
    msg = f"its data file {path / 'data'} belongs to pool {new_uuid} at {new}"
    for opener in (lambda: Pool.open(path), lambda: Pool.open(path, read_only=True),
                   lambda: DeviceTable.open(path), lambda: DeviceTable.open(path, read_only=False),
                   lambda: repair(path), lambda: repair(path, tmp_path / "OUT")):
        with pytest.raises(FailedPrecondition, match="belongs to pool"):
            opener()
    assert not (tmp_path / "OUT").exists()
    for args in (["status", path], ["create-thin", path, "y", "1M"], ["check", path]):
        assert msg in invoke(*args, code=1).stderr
    with Pool.open(new) as pool:  # the data is NEW's now, intact
        assert pool.thin("dev1").read(0, 4 * MB) == payload
        assert pool.check().ok


def test_two_pools_never_allocate_the_same_free_blocks(tmp_path):
    """create --data-file onto a pool's data (even with --force) is refused: before, both pools
    handed out block 0 of the same file and each overwrote the other's data."""
    a = tmp_path / "A"
    with Pool.create(a, data_size="4MiB") as pool:
        pool.create_thin("v", "1MiB").write(0, b"A" * BS)
    for kwargs in ({}, {"force": True}):
        with pytest.raises(FailedPrecondition, match="belongs to pool"):
            Pool.create(tmp_path / "B", data_size="4MiB", data_file=a / "data", **kwargs)
        assert not (tmp_path / "B").exists()
    with Pool.open(a) as pool:
        assert pool.thin("v").read(0, BS) == b"A" * BS


def test_a_live_pool_is_never_taken_over(src, tmp_path):
    path, payload = src
    with Pool.open(path, read_only=True) as pool:
        ir = pool.to_metadata()
    for read_only in (False, True):
        live = Pool.open(path, read_only=read_only)
        try:
            with pytest.raises(FailedPrecondition, match="which has it open"):
                Pool.from_metadata(tmp_path / "NEW", ir, data_file=path / "data", take_over_data=True)
            assert not (tmp_path / "NEW").exists()
        finally:
            live.close()
    with Pool.open(path) as pool:
        assert pool.thin("v").read(0, 4 * MB) == payload


def test_import_metadata_over_another_pools_data(src, tmp_path):
    path, payload = src
    invoke("export-metadata", path, tmp_path / "meta.bin")
    new = tmp_path / "NEW"
    r = invoke("import-metadata", tmp_path / "meta.bin", "--data", path / "data", new, code=1)
    assert "belongs to pool" in r.stderr and not new.exists()
    invoke("import-metadata", tmp_path / "meta.bin", "--data", path / "data", "--take-over-data", new)
    with Pool.open(new) as pool:
        assert pool.thin("dev1").read(0, 4 * MB) == payload
    with pytest.raises(FailedPrecondition):
        Pool.open(path)


def test_trim_never_punches_a_file_another_pool_owns(src):
    """abort() leaves the uncommitted block's bytes (marked stale: dm-thin never discards on its own);
    trim, which would punch it, re-checks the stamp first and punches nothing of a taken-over file."""
    path, _ = src
    pool = Pool.open(path)
    try:
        before = blocks_held(path / "data")
        pool.create_thin("w", "1MiB").write(0, b"x" * BS)  # uncommitted: free again after abort()
        os.setxattr(path / "data", ownership.XATTR, ownership.stamp_bytes("someone-else", "/elsewhere"))
        pool.abort()
        assert blocks_held(path / "data") == before + 1
        with pytest.raises(FailedPrecondition, match="someone-else"):
            pool.trim()
        assert blocks_held(path / "data") == before + 1  # nothing punched
    finally:
        pool.close(commit=False)


def test_pools_without_a_stamp_still_open_and_are_adopted(src):
    path, payload = src
    os.removexattr(path / "data", ownership.XATTR)
    with Pool.open(path, read_only=True) as pool:
        assert pool.thin("v").read(0, 4 * MB) == payload
    assert owner_of(path / "data") is None  # a read-only open writes nothing
    with Pool.open(path) as pool:
        uuid = pool.uuid
    assert owner_of(path / "data") == uuid


def test_without_xattrs_a_record_file_carries_the_stamp(tmp_path, monkeypatch):
    def no_xattr(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    for name in ("getxattr", "setxattr", "removexattr"):
        monkeypatch.setattr(os, name, no_xattr)
    a = tmp_path / "A"
    with Pool.create(a, data_size="4MiB") as pool:
        pool.create_thin("v", "1MiB").write(0, b"A" * BS)
        ir = pool.to_metadata()
        uuid = pool.uuid
    assert (a / ".data.thinpool-owner").is_file()
    assert owner_of(a / "data") == uuid
    with pytest.raises(FailedPrecondition, match=f"belongs to pool {uuid}"):
        Pool.from_metadata(tmp_path / "B", ir, data_file=a / "data")
    Pool.from_metadata(tmp_path / "B", ir, data_file=a / "data", take_over_data=True).close()
    with pytest.raises(FailedPrecondition, match="belongs to pool"):
        Pool.open(a)
    with Pool.open(tmp_path / "B") as pool:
        assert pool.thin("dev1").read(0, BS) == b"A" * BS


# ---------------------------------------------------------------- create --data-file EXISTING

def test_create_refuses_a_non_empty_existing_data_file_without_force(tmp_path):
    user = tmp_path / "disk.img"
    user.write_bytes(b"precious" * 1000)
    r = invoke("create", tmp_path / "P", "--data-file", user, "-s", "4M", code=1)
    assert f"data file {user} exists and is not empty (8000 bytes)" in r.stderr and "--force" in r.stderr
    assert user.read_bytes() == b"precious" * 1000 and not (tmp_path / "P").exists()
    with pytest.raises(AlreadyExists, match="force=True"):
        Pool.create(tmp_path / "P", data_size="4MiB", data_file=user)
    assert owner_of(user) is None
    invoke("create", tmp_path / "P", "--data-file", user, "-s", "4M", "--force")
    with Pool.open(tmp_path / "P") as pool:
        assert pool.data_path == str(user) and pool.header["data_file"] == str(user)
    assert user.stat().st_size == 4 * MB


def test_create_accepts_an_empty_or_absent_data_file(tmp_path):
    empty = tmp_path / "empty.img"
    empty.touch()
    invoke("create", tmp_path / "P1", "--data-file", empty, "-s", "4M")
    invoke("create", tmp_path / "P2", "--data-file", tmp_path / "new.img", "-s", "4M")
    invoke("create", tmp_path / "P3", "-s", "4M")
    for p, data in (("P1", empty), ("P2", tmp_path / "new.img")):
        with Pool.open(tmp_path / p) as pool:
            assert pool.header["data_file"] == str(data) and owner_of(data) == pool.uuid
    with Pool.open(tmp_path / "P3") as pool:
        assert pool.header["data_file"] is None  # only an explicit data file is recorded


def test_a_failed_create_removes_what_it_made(tmp_path, monkeypatch):
    from thinpool import mdstore

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mdstore.MetadataStore, "format", boom)
    with pytest.raises(OSError):
        Pool.create(tmp_path / "P", data_size="4MiB", data_file=tmp_path / "new.img")
    assert not (tmp_path / "P").exists() and not (tmp_path / "new.img").exists()
    empty = tmp_path / "empty.img"
    empty.touch()
    (tmp_path / "Q").mkdir()
    with pytest.raises(OSError):
        Pool.create(tmp_path / "Q", data_size="4MiB", data_file=empty)
    assert empty.stat().st_size == 0 and owner_of(empty) is None  # the user's file, as it was
    assert list((tmp_path / "Q").iterdir()) == []


# ---------------------------------------------------------------- truncated data file

@pytest.fixture
def truncated(tmp_path: Path):
    """A pool with 16 mapped blocks (0..15); the data file cut to 10.5 blocks."""
    path = tmp_path / "P"
    payload = np.random.default_rng(3).integers(0, 256, 16 * BS, dtype=np.uint8).tobytes()
    with Pool.create(path, data_size="4MiB") as pool:
        pool.create_thin("v", "4MiB").write(0, payload)
    os.truncate(path / "data", 10 * BS + BS // 2)
    return path, payload


def test_truncated_data_file_is_refused_by_every_open(truncated):
    path, _ = truncated
    size = 10 * BS + BS // 2
    for read_only in (False, True):
        with pytest.raises(FailedPrecondition) as err:
            Pool.open(path, read_only=read_only)
        msg = str(err.value)
        assert f"data file {path / 'data'} is {size} bytes" in msg and f"({4 * MB} bytes)" in msg
        assert "6 mapped data blocks lie past its end (blocks 10, 11, 12, 13, 14, 15)" in msg
        assert "repair" in msg
        assert os.path.getsize(path / "data") == size  # not re-extended
    r = invoke("create-thin", path, "y", "1M", code=1)
    assert "mapped data blocks lie past its end" in r.stderr
    assert os.path.getsize(path / "data") == size


def test_truncated_unmapped_tail_is_re_extended_by_a_write_open(tmp_path):
    path = tmp_path / "P"
    with Pool.create(path, data_size="4MiB") as pool:
        pool.create_thin("v", "4MiB").write(0, b"z" * (2 * BS))
    os.truncate(path / "data", 5 * BS)
    with pytest.raises(FailedPrecondition, match="no mapped block lies past its end"):
        Pool.open(path, read_only=True)
    with Pool.open(path) as pool:
        assert pool.thin("v").read(0, 2 * BS) == b"z" * (2 * BS)
    assert os.path.getsize(path / "data") == 4 * MB


def test_repair_in_place_drops_mappings_past_the_end_and_re_extends(truncated):
    path, payload = truncated
    report = repair(path)
    assert report.data_file_short == {"path": str(path / "data"), "size": 10 * BS + BS // 2,
                                      "expected": 4 * MB, "mappings_dropped": 6, "blocks_lost": 6}
    assert report.mappings_dropped == 6 and report.mappings_kept == 10 and not report.lossless
    assert "truncated" in report.summary()
    assert os.path.getsize(path / "data") == 4 * MB
    with Pool.open(path) as pool:
        v = pool.thin("v")
        assert v.mapped_blocks == 10
        assert v.read(0, 10 * BS) == payload[:10 * BS]  # block 10 was cut mid-way: dropped with the rest
        assert v.read(10 * BS, 6 * BS) == bytes(6 * BS)
        assert pool.check().ok


def test_repair_output_of_a_truncated_pool(truncated, tmp_path):
    path, payload = truncated
    out = tmp_path / "OUT"
    r = invoke("repair", path, "-o", out)
    assert "6 mappings of 6 data blocks past its end dropped" in r.stdout
    with Pool.open(out) as pool:
        assert pool.thin("v").read(0, 10 * BS) == payload[:10 * BS]
        assert pool.thin("v").mapped_blocks == 10 and pool.check().ok
        out_uuid = pool.uuid
    assert os.path.getsize(path / "data") == 10 * BS + BS // 2  # the source is untouched
    assert out_uuid != owner_of(path / "data") and owner_of(out / "data") == out_uuid


def test_a_failed_repair_output_leaves_nothing(src, tmp_path, monkeypatch):
    from thinpool import repair as repair_mod
    path, _ = src

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(repair_mod, "_copy_blocks", boom)
    with pytest.raises(OSError):
        repair(path, tmp_path / "OUT")
    assert not (tmp_path / "OUT").exists()
    (tmp_path / "OUT2").mkdir()
    with pytest.raises(OSError):
        repair(path, tmp_path / "OUT2")
    assert list((tmp_path / "OUT2").iterdir()) == []


# ---------------------------------------------------------------- the class: every entry point x every owner state

ENTRY_POINTS = ("create", "restore", "import-metadata")
OWNER_STATES = ("stamped, closed", "open read-write", "open read-only", "unstamped (old pool), open read-only")


def _claim(entry: str, tmp_path: Path, data: Path, take_over: bool) -> int:
    new = tmp_path / "NEW"
    flags = ["--take-over-data"] if take_over else []
    if entry == "create":
        args = ["create", new, "--data-file", data, "-s", "4M", "--force", *flags]
    elif entry == "restore":
        args = ["restore", new, "-i", tmp_path / "a.xml", "--data-file", data, *flags]
    else:
        args = ["import-metadata", tmp_path / "a.bin", "--data", data, new, *flags]
    return CliRunner().invoke(main, [str(a) for a in args]).exit_code


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("state", OWNER_STATES)
def test_ownership_matrix(entry, state, tmp_path):
    """Every way to put a second pool over a data file, against every state of its owner: refused
    without --take-over-data (nothing created, the owner's data intact); with it, refused while the
    owner is open, else the data changes hands and the owner refuses to open."""
    a = tmp_path / "A"
    with Pool.create(a, data_size="4MiB") as pool:
        pool.create_thin("v", "1MiB").write(0, b"A" * (3 * BS))
        (tmp_path / "a.xml").write_text(dump_xml(pool.to_metadata()))
    invoke("export-metadata", a, tmp_path / "a.bin")
    uuid = uuid_of(a)
    if state.startswith("unstamped"):
        os.removexattr(a / "data", ownership.XATTR)
    live = None
    if "open" in state and "closed" not in state:
        live = Pool.open(a, read_only=state.endswith("read-only"))
    try:
        assert _claim(entry, tmp_path, a / "data", take_over=False) == 1
        assert not (tmp_path / "NEW").exists()
        code = _claim(entry, tmp_path, a / "data", take_over=True)
        if live is not None:
            assert code == 1 and not (tmp_path / "NEW").exists()  # a live owner is never taken over
            assert owner_of(a / "data") == (None if state.startswith("unstamped") else uuid)
            assert live.thin("v").read(0, 3 * BS) == b"A" * (3 * BS)
    finally:
        if live is not None:
            live.close()
    if live is None:
        assert code == 0 and owner_of(a / "data") == uuid_of(tmp_path / "NEW")
        with pytest.raises(FailedPrecondition, match="belongs to pool"):
            Pool.open(a, read_only=True)
    else:
        with Pool.open(a) as pool:
            assert pool.thin("v").read(0, 3 * BS) == b"A" * (3 * BS) and pool.check().ok
        assert blocks_held(a / "data") == 3


FAIL_POINTS = ("DataDevice.create", "MetadataStore.format", "NewPoolFiles.claim", "Pool.__init__",
               "_fill", "Pool.commit", "Pool.resize")


@pytest.mark.parametrize("where", FAIL_POINTS)
@pytest.mark.parametrize("take_over", [False, True])
def test_a_failed_restore_leaves_nothing_at_any_step(where, take_over, tmp_path, monkeypatch):
    """ENOSPC injected at each step of `restore --data-file` (a data file smaller than the XML's
    device, so the restore also grows it): the new pool is gone, the user's file has its old size
    and owner stamp, and its owner still opens with its data."""
    import thinpool.datadev as datadev_mod
    import thinpool.pool_ir as pool_ir_mod
    import thinpool.mdstore as mdstore_mod
    import thinpool.pool as pool_mod
    a = tmp_path / "A"
    with Pool.create(a, data_size="2MiB") as pool:
        pool.create_thin("v", "1MiB").write(0, b"A" * (3 * BS))
        md = pool.to_metadata()
        uuid = pool.uuid
    md.superblock.nr_data_blocks = 64  # 4 MiB: the restore must grow A's 2 MiB file
    (tmp_path / "a.xml").write_text(dump_xml(md))
    if not take_over:
        os.removexattr(a / "data", ownership.XATTR)  # an unstamped file: claimed without the flag
    stamp_before = ownership.read_raw(str(a / "data"))

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {where})")
    owner, name = {"DataDevice.create": (datadev_mod.DataDevice, "create"),
                   "MetadataStore.format": (mdstore_mod.MetadataStore, "format"),
                   "NewPoolFiles.claim": (ownership.NewPoolFiles, "claim"),
                   "Pool.__init__": (pool_mod.Pool, "__init__"),
                   "_fill": (pool_ir_mod, "_fill"),
                   "Pool.commit": (pool_mod.Pool, "commit"),
                   "Pool.resize": (pool_mod.Pool, "resize")}[where]
    monkeypatch.setattr(owner, name, boom)
    args = ["restore", tmp_path / "NEW", "-i", tmp_path / "a.xml", "--data-file", a / "data",
            "--data-size", "8M"] + (["--take-over-data"] if take_over else [])
    r = CliRunner().invoke(main, [str(x) for x in args])
    monkeypatch.undo()
    assert r.exit_code == 1 and "injected" in r.stderr, (r.exit_code, r.stderr)
    assert not (tmp_path / "NEW").exists()
    assert os.path.getsize(a / "data") == 2 * MB
    assert ownership.read_raw(str(a / "data")) == stamp_before
    with Pool.open(a) as pool:
        assert pool.uuid == uuid and pool.thin("v").read(0, 3 * BS) == b"A" * (3 * BS)


@pytest.mark.parametrize("cut", [0, BS // 2, 3 * BS, 7 * BS + 100, 8 * BS, 20 * BS])
def test_truncation_points(cut, tmp_path):
    """The data file cut at several points: opens refuse exactly when a mapped block (0..7) lies at
    or past the cut; repair keeps every whole block before it, byte for byte, and `check` is clean."""
    path = tmp_path / "P"
    payload = np.random.default_rng(cut).integers(0, 256, 8 * BS, dtype=np.uint8).tobytes()
    with Pool.create(path, data_size="4MiB") as pool:
        pool.create_thin("v", "4MiB").write(0, payload)
    os.truncate(path / "data", cut)
    whole = min(cut // BS, 8)
    if whole < 8:
        for read_only in (False, True):
            with pytest.raises(FailedPrecondition, match=f"{8 - whole} mapped data blocks lie past its end"):
                Pool.open(path, read_only=read_only)
        assert os.path.getsize(path / "data") == cut
        report = repair(path)
        assert report.mappings_dropped == 8 - whole and report.data_file_short["blocks_lost"] == 8 - whole
    else:
        with Pool.open(path) as pool:  # only unmapped blocks were cut: re-extended
            pass
    assert os.path.getsize(path / "data") == 4 * MB
    with Pool.open(path) as pool:
        v = pool.thin("v")
        assert v.mapped_blocks == whole and pool.check().ok
        assert v.read(0, 8 * BS) == payload[: whole * BS] + bytes((8 - whole) * BS)


def test_a_pool_open_in_another_process_is_never_taken_over(src, tmp_path):
    """The flock across processes: `serve`-like holder in a subprocess; `restore --take-over-data`
    and `create --data-file --force --take-over-data` are refused while it runs."""
    import subprocess
    import sys
    path, payload = src
    invoke("dump", path, "-o", tmp_path / "x.xml")
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from thinpool import Pool; "
                               f"p = Pool.open({str(path)!r}); print('ready', flush=True); sys.stdin.read(); "
                               "p.close()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for args in (["restore", tmp_path / "NEW", "-i", tmp_path / "x.xml", "--data-file", path / "data"],
                     ["create", tmp_path / "NEW", "--data-file", path / "data", "--force", "-s", "64M"]):
            r = invoke(*args, "--take-over-data", code=1)
            assert f"data file {path / 'data'} is in use by pool" in r.stderr and "which has it open" in r.stderr
            assert not (tmp_path / "NEW").exists()
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    with Pool.open(path) as pool:
        assert pool.thin("v").read(0, 4 * MB) == payload
