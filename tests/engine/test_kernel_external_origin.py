"""External origins: dm-thin's ``external-origin`` thin argument.

Kernel rules (drivers/md/dm-thin.c; Documentation/admin-guide/device-mapper/thin-provisioning.rst,
"External snapshots"):

* a read of an unprovisioned block is remapped to the origin; the part of a read past the origin's
  end is zero-filled, a read wholly past it returns zeroes (``process_cell`` / ``thin_bio_map``);
* a write to an unprovisioned block that does not cover it copies the block from the origin first
  (``schedule_external_copy``): the part inside the origin, zeroes past its end; a block wholly past
  the origin's end is provisioned as without an origin; a whole-block write copies nothing;
* the origin is never written; internal snapshots of such a thin share its origin (they must be
  activated with the same origin argument);
* the metadata carries no origin (it is a table argument): exported metadata is the same as without.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import numpy as np
import pytest

from tests.support import require_tool
from thinpool import Pool
from thinpool.devtable import DeviceTable
from thinpool.errors import FailedPrecondition, InvalidArgument, NotFound, ThinpoolWarning

KiB, MiB = 1024, 1024 * 1024
BS = 64 * KiB
ORIGIN_BYTES = 3 * BS + 1000  # not a multiple of the block size: block 3 straddles the origin's end
VOL = 8 * BS


@pytest.fixture
def env(tmp_path: Any) -> dict[str, Any]:
    origin = str(tmp_path / "golden.img")
    data = np.random.default_rng(7).integers(1, 256, ORIGIN_BYTES, dtype=np.uint8).tobytes()  # no zero byte
    with open(origin, "wb") as f:
        f.write(data)
    os.chmod(origin, 0o444)
    return {"dir": tmp_path, "pool": str(tmp_path / "pool"), "origin": origin, "data": data}


def _expected(data: bytes, size: int = VOL) -> bytearray:
    return bytearray(data[:size] + bytes(max(0, size - len(data))))


def _data_block(p: Pool, vol: str, vb: int) -> bytes:
    """The bytes of the data block that ``vol`` maps at virtual block ``vb``, straight from the data file."""
    vbs, dbs, _ = p.thin(vol).mappings()
    d = int(dbs[list(vbs).index(vb)])
    with open(p.data_path, "rb") as f:
        f.seek(d * BS)
        return f.read(BS)


def test_kernel_rule_unprovisioned_blocks_read_from_the_external_origin(env: dict[str, Any]) -> None:
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        exp = bytes(_expected(env["data"]))
        assert v.read(0, VOL) == exp
        assert v.pread(0, VOL) == exp
        assert v.read(BS - 10, 30) == exp[BS - 10:BS + 20]  # across a block boundary
        got = v.read_many([0, BS + 5, 2 * BS], 1000)
        assert [r.tobytes() for r in got] == [exp[0:1000], exp[BS + 5:BS + 1005], exp[2 * BS:2 * BS + 1000]]
        out = np.empty(VOL, np.uint8)
        v.read_into(0, out)
        assert out.tobytes() == exp
        assert v.mapped_blocks == 0 and p.status().used_data_blocks == 0  # reads allocate nothing
        assert v.external_origin["path"] == os.path.realpath(env["origin"])
        assert v.external_origin["size"] == ORIGIN_BYTES


def test_kernel_rule_reads_past_the_origins_end_are_zeroes(env: dict[str, Any]) -> None:
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        # straddling the end: the origin's part, then zeroes
        assert v.read(ORIGIN_BYTES - 10, 20) == env["data"][-10:] + bytes(10)
        assert v.pread(ORIGIN_BYTES - 10, 20) == env["data"][-10:] + bytes(10)
        # wholly past the end
        assert v.read(4 * BS, BS) == bytes(BS)
        # an origin larger than the volume: the volume's size bounds the reads
        small = p.create_thin("small", BS, external_origin=env["origin"])
        assert small.read(0, BS) == env["data"][:BS]
        with pytest.raises(InvalidArgument):
            small.read(0, BS + 1)


def test_kernel_rule_partial_write_copies_the_block_from_the_origin(env: dict[str, Any]) -> None:
    """schedule_external_copy: the new data block holds the origin's block with the write merged in."""
    data = env["data"]
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        exp = _expected(data)
        v.write(100, b"ABC")
        exp[100:103] = b"ABC"
        assert v.mapped_blocks == 1
        assert _data_block(p, "v", 0) == bytes(exp[:BS])  # copied into the data file, not read through
        v.write(3 * BS + 7, b"Z")  # the block straddling the origin's end: origin part + zeroes
        exp[3 * BS + 7] = ord("Z")
        assert _data_block(p, "v", 3) == bytes(exp[3 * BS:4 * BS])
        assert _data_block(p, "v", 3)[1000:] == bytes(BS - 1000)  # zeroes past the origin's end
        v.write(5 * BS + 1, b"past")  # wholly past the end: as without an origin
        exp[5 * BS + 1:5 * BS + 5] = b"past"
        v.write(BS, b"\x01" * BS)  # a whole-block write copies nothing
        exp[BS:2 * BS] = b"\x01" * BS
        assert v.read(0, VOL) == bytes(exp)
        assert v.pread(0, VOL) == bytes(exp)
        assert v.mapped_blocks == 4
        # the batch path does the same
        w = p.create_thin("w", VOL, external_origin=env["origin"])
        w.write_many([100, 3 * BS + 7, 5 * BS + 1, BS], [b"ABC", b"Z", b"past", b"\x01" * BS])
        assert w.read(0, VOL) == bytes(exp)
        p.commit()
    with Pool.open(env["pool"]) as p:
        assert p.thin("v").read(0, VOL) == bytes(exp) and p.thin("w").read(0, VOL) == bytes(exp)
        assert p.check().ok


@pytest.mark.parametrize("zero_new_blocks", [True, False])
def test_kernel_rule_tail_past_the_origin_is_zeroed_only_when_zeroing_new_blocks(env: dict[str, Any],
                                                                                zero_new_blocks: bool) -> None:
    """schedule_copy: a partial write to the block straddling the origin's end copies the origin's
    part, and zeroes the rest only ``if (len < pool->sectors_per_block && pool->pf.zero_new_blocks)``:
    under skip_block_zeroing the rest of a reused block keeps its old bytes."""
    data = env["data"]
    with Pool.create(env["pool"], data_size=2 * BS, block_size=BS, zero_new_blocks=zero_new_blocks) as p:
        g = p.create_thin("g", 2 * BS)
        g.write(0, b"\xee" * (2 * BS))  # both data blocks hold old bytes
        p.delete("g")
        p.commit()
        p.commit()  # (freed blocks are allocatable after the next commit)
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        v.write(3 * BS + 7, b"Z")  # the block straddling the origin's end (its first 1000 bytes)
        got = _data_block(p, "v", 3)
        assert got[:7] == data[3 * BS:3 * BS + 7] and got[7:8] == b"Z" and got[8:1000] == data[3 * BS + 8:]
        assert got[1000:] == (bytes(BS - 1000) if zero_new_blocks else b"\xee" * (BS - 1000))
        assert v.read(3 * BS, BS) == got


def test_kernel_rule_the_external_origin_is_never_written(env: dict[str, Any]) -> None:
    before = os.stat(env["origin"])
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        v.write(0, b"x" * 10)
        v.write_many([BS + 1, 2 * BS], [b"y", b"z" * BS])
        v.discard(0, 2 * BS)
        s = p.snapshot("v", "s")
        s.write(10, b"s")
        v.read(0, VOL)
        # the descriptor the pool holds is read-only
        fd = p.data.fd  # any fd of ours; find the origin's among /proc/self/fd
        origin_fds = [int(n) for n in os.listdir("/proc/self/fd")
                      if os.path.realpath(f"/proc/self/fd/{n}") == os.path.realpath(env["origin"])]
        assert origin_fds and fd not in origin_fds
        for n in origin_fds:
            with open(f"/proc/self/fdinfo/{n}") as f:
                flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
            assert flags & os.O_ACCMODE == os.O_RDONLY
    after = os.stat(env["origin"])
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with open(env["origin"], "rb") as f:
        assert f.read() == env["data"]


def test_kernel_rule_snapshots_share_the_external_origin(env: dict[str, Any]) -> None:
    data = env["data"]
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        v.write(10, b"v")
        s = p.snapshot("v", "s")
        ss = p.snapshot("s", "ss")
        for t in (s, ss):
            assert t.external_origin == v.external_origin
        s.write(BS + 3, b"s")  # an unmapped block of the snapshot: copied from the origin
        exp_v = _expected(data)
        exp_v[10] = ord("v")
        exp_s = bytearray(exp_v)
        exp_s[BS + 3] = ord("s")
        assert v.read(0, VOL) == bytes(exp_v) and ss.read(0, VOL) == bytes(exp_v)
        assert s.read(0, VOL) == bytes(exp_s)
        plain = p.create_thin("plain", VOL)
        assert plain.external_origin is None and p.snapshot("plain", "ps").external_origin is None
    # the light snapshot (the device table alone) inherits it too
    with DeviceTable.open(env["pool"], read_only=False) as t:
        rec = t.snapshot("ss", "light")
        assert rec.external_origin is not None and rec.external_origin["path"] == os.path.realpath(env["origin"])
    with Pool.open(env["pool"]) as p:
        assert p.thin("light").read(0, VOL) == bytes(exp_v)
        p.rename("light", "renamed")
        assert p.thin("renamed").external_origin is not None
        p.delete("v")  # deleting the first volume leaves the snapshots on the origin
        assert p.thin("s").read(0, VOL) == bytes(exp_s)


def test_kernel_rule_a_discarded_block_reads_the_origin_again(env: dict[str, Any]) -> None:
    """Discard unmaps; an unmapped block of an external-origin thin reads from the origin."""
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        v.write(0, b"\x00" * BS)
        assert v.read(0, 4) == bytes(4)
        assert v.discard(0, BS) == 1
        assert v.read(0, BS) == env["data"][:BS]


@pytest.mark.parametrize("which", ["data", "metadata", "lock", "dir", "file-in-dir", "hardlink-data",
                                   "other-pool-data", "directory", "fifo"])
def test_an_origin_the_pool_could_write_is_refused_and_nothing_changes(env: dict[str, Any], which: str) -> None:
    d = env["dir"]
    external = str(d / "ext.data")
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS, data_file=external) as p:
        p.create_thin("keep", VOL).write(0, b"k")
        p.commit()
        if which == "data":
            path = p.data_path
        elif which in ("metadata", "lock"):
            path = os.path.join(p.path, which)
        elif which == "dir":
            path = p.path
        elif which == "file-in-dir":
            path = os.path.join(p.path, "golden.img")
            with open(path, "wb") as f:
                f.write(b"g" * BS)
        elif which == "hardlink-data":
            path = str(d / "link.img")
            os.link(external, path)
        elif which == "other-pool-data":
            Pool.create(str(d / "other"), data_size=MiB, data_file=str(d / "other.data")).close()
            path = str(d / "other.data")
        elif which == "directory":
            path = str(d)
        else:
            path = str(d / "fifo")
            os.mkfifo(path)
        before = (p.transaction_id, dict(p.catalog["volumes"]), p.devs.tobytes())
        with pytest.raises(InvalidArgument) as info:
            p.create_thin("v", VOL, external_origin=path)
        assert os.path.basename(path) in str(info.value)
        assert (p.transaction_id, dict(p.catalog["volumes"]), p.devs.tobytes()) == before
        assert "v" not in p


def test_a_missing_origin_and_bad_values_are_refused(env: dict[str, Any]) -> None:
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        with pytest.raises(NotFound, match="nothere"):
            p.create_thin("v", VOL, external_origin=str(env["dir"] / "nothere"))
        for bad in (3, b"/etc/passwd", "", "a\0b", "/\ud800x", "/x" * 100_000):
            with pytest.raises(InvalidArgument):
                p.create_thin("v", VOL, external_origin=bad)
        assert "v" not in p


@pytest.mark.parametrize("change", ["grow", "shrink", "touch", "replace", "remove"])
def test_an_origin_that_changes_fails_the_volumes_io_naming_the_file(env: dict[str, Any], change: str) -> None:
    """The origin's size and mtime are recorded at creation and checked at activation and before every
    I/O call (one fstat); a changed origin fails that volume's I/O with FailedPrecondition naming the
    file, and nothing else."""
    origin = env["origin"]
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=origin)
        plain = p.create_thin("plain", VOL)
        assert v.read(0, 10) == env["data"][:10]  # opened
        os.chmod(origin, 0o644)
        if change == "grow":
            with open(origin, "ab") as f:
                f.write(b"more")
        elif change == "shrink":
            os.truncate(origin, 100)
        elif change == "touch":
            st = os.stat(origin)
            os.utime(origin, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        elif change == "replace":
            tmp = origin + ".new"
            with open(tmp, "wb") as f:
                f.write(env["data"])
            os.replace(tmp, origin)
        else:
            os.unlink(origin)
        if change in ("replace", "remove"):
            # the open descriptor still reads the original file: its volumes keep working until the
            # pool opens it again (a reopen finds the change)
            assert v.read(0, 10) == env["data"][:10]
        else:
            for op in (lambda: v.read(0, 10), lambda: v.pread(0, 10), lambda: v.write(5, b"w"),
                       lambda: v.read_many([0], 10), lambda: p.activate("v")):
                with pytest.raises(FailedPrecondition, match=os.path.basename(origin)):
                    op()
            assert v.mapped_blocks == 0
        plain.write(0, b"p")  # other volumes are unaffected
        assert plain.read(0, 1) == b"p"
    with pytest.warns(ThinpoolWarning, match=os.path.basename(origin)):  # checked when the pool opens
        p = Pool.open(env["pool"])
    with p:
        report = p.check()  # the metadata is fine; the changed origin is a warning naming the volume and file
        assert report.ok and any("'v'" in w and os.path.basename(origin) in w for w in report.warnings)
        with pytest.raises(FailedPrecondition, match=os.path.basename(origin)) as info:
            p.thin("v").read(0, 10)
        assert {"grow": "size", "shrink": "size", "touch": "modified", "replace": "replaced",
                "remove": "missing"}[change] in str(info.value)
        assert p.thin("plain").read(0, 1) == b"p"
        p.delete("v")  # the volume can still be deleted


def test_kernel_rule_partial_write_copies_from_the_origin_in_a_trace_replay_too(env: dict[str, Any]) -> None:
    """A trace replay (thin.apply_io) writes an origin volume exactly as Thin.write does."""
    from thinpool.thin import apply_io
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        w = p.create_thin("w", VOL, external_origin=env["origin"])
        offs = np.array([100, 3 * BS + 7, 0, 2 * BS], np.int64)
        lens = np.array([3, 1, 4096, BS], np.int64)
        pattern = np.frombuffer(b"\x09" * BS, np.uint8)
        apply_io([w], np.zeros(4, np.int64), np.array([1, 1, 0, 0], np.uint8), offs, lens, pattern=pattern)
        for o, n in ((100, 3), (3 * BS + 7, 1)):
            v.write(o, b"\x09" * n)
        assert w.read(0, VOL) == v.read(0, VOL)


def test_kernel_rule_exported_metadata_carries_no_origin(env: dict[str, Any]) -> None:
    """dm-thin's metadata has no field for the origin (it is a thin table argument): export-metadata
    writes the same devices and mappings whether or not a volume sits on an origin, and thin_check /
    thin_dump accept it."""
    require_tool("thin_check", "thin_dump")
    from thinpool.interop.binary import write_binary_metadata
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        v.write(100, b"A")
        p.snapshot("v", "s")
        p.commit()
        md = p.to_metadata()
        out = str(env["dir"] / "meta.bin")
        write_binary_metadata(md, out)
    subprocess.run(["thin_check", out], check=True, capture_output=True)
    dump = subprocess.run(["thin_dump", out], check=True, capture_output=True, text=True).stdout
    assert "origin" not in dump.replace("origin_begin", "").replace("origin_block", "")
    assert dump.count("<device ") == 2 and dump.count("mapping") == 2


@pytest.mark.parametrize("in_place", [True, False])
def test_repair_keeps_each_volumes_external_origin(env: dict[str, Any], in_place: bool) -> None:
    """The kernel keeps the origin outside the metadata (the thin table); thinpool keeps it in the
    catalog, and a repair that can read the catalog carries it over."""
    from thinpool.repair import repair
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        v.write(100, b"R")
        p.snapshot("v", "s")
        p.create_thin("plain", VOL)
    out = None if in_place else str(env["dir"] / "repaired")
    repair(env["pool"], out)
    exp = _expected(env["data"])
    exp[100] = ord("R")
    with Pool.open(out or env["pool"]) as p:
        for name in ("v", "s"):
            assert p.thin(name).external_origin["path"] == os.path.realpath(env["origin"])
            assert p.thin(name).read(0, VOL) == bytes(exp)
        assert p.thin("plain").external_origin is None


def test_a_failed_origin_read_is_an_error_naming_the_file_and_maps_nothing(env: dict[str, Any], monkeypatch) -> None:
    """A pread of the origin that fails in the kernels (here EISDIR: the descriptor is a directory's)
    is a HostIOError with that errno naming the origin, for reads and for the copy of a partial write
    (the block stays unmapped)."""
    import errno as E

    from thinpool.errors import HostIOError
    from thinpool.origin import OriginFile
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        dfd = os.open(str(env["dir"]), os.O_RDONLY)
        try:
            monkeypatch.setattr(OriginFile, "use", lambda self: (dfd, ORIGIN_BYTES))
            for op in (lambda: v.read(0, 10), lambda: v.pread(0, 10), lambda: v.read_many([0], 10),
                       lambda: v.write(5, b"w"), lambda: v.write_many([5], [b"w"])):
                with pytest.raises(HostIOError, match="golden.img") as info:
                    op()
                assert info.value.errno == E.EISDIR
            assert v.mapped_blocks == 0 and p.status().used_data_blocks == 0
        finally:
            os.close(dfd)
        monkeypatch.undo()
        assert v.read(0, 10) == env["data"][:10]  # reopened: works again
        assert p.check().ok


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kernel_rules_random_io_on_an_external_origin_volume_match_a_byte_model(env: dict[str, Any],
                                                                                   seed: int) -> None:
    """Random writes (any offset and length, across blocks and the origin's end), whole-block discards
    and snapshots, per call and batched, against a model: a bytearray per volume that starts as the
    origin's bytes (zeroes past its end), takes every write, and reads the origin again where a discard
    unmapped a whole block."""
    rng = np.random.default_rng(seed)
    base = bytes(_expected(env["data"]))
    with Pool.create(env["pool"], data_size=32 * MiB, block_size=BS) as p:
        p.create_thin("v0", VOL, external_origin=env["origin"])
        model = {"v0": bytearray(base)}
        for step in range(150):
            name = list(model)[int(rng.integers(len(model)))]
            vol = p.thin(name)
            op = rng.random()
            if op < 0.6:
                off = int(rng.integers(0, VOL - 1))
                n = int(rng.integers(1, min(3 * BS, VOL - off) + 1))
                data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                if rng.random() < 0.5:
                    vol.write(off, data)
                else:
                    half = n // 2
                    vol.write_many([off, off + half], [data[:half], data[half:]])
                model[name][off:off + n] = data
            elif op < 0.75:
                first = int(rng.integers(0, VOL // BS))
                count = int(rng.integers(1, VOL // BS - first + 1))
                vol.discard(first * BS, count * BS)
                model[name][first * BS:(first + count) * BS] = base[first * BS:(first + count) * BS]
            elif op < 0.85 and len(model) < 6:
                new = f"v{step}"
                p.snapshot(name, new)
                model[new] = bytearray(model[name])
            else:
                off = int(rng.integers(0, VOL))
                n = int(rng.integers(0, VOL - off + 1))
                assert vol.read(off, n) == bytes(model[name][off:off + n])
                assert vol.pread(off, n) == bytes(model[name][off:off + n])
        for name, want in model.items():
            assert p.thin(name).read(0, VOL) == bytes(want), name
        assert p.check().ok
    with Pool.open(env["pool"]) as p:
        for name, want in model.items():
            assert p.thin(name).read(0, VOL) == bytes(want), name


def test_import_into_an_origin_volume_is_refused_and_a_metadata_only_pool_reads_zeroes(env: dict[str, Any]) -> None:
    """Importing an image into an existing origin volume would leave the origin's bytes where the image
    has holes: refused, the volume unchanged.  A metadata-only pool (no data file) stores no bytes and
    reads zeroes everywhere, the origin's blocks included, while its mappings follow the same rules."""
    from thinpool.images import import_image
    image = str(env["dir"] / "image.raw")
    with open(image, "wb") as f:
        f.write(b"i" * BS)
    with Pool.create(env["pool"], data_size=16 * MiB, block_size=BS) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        with pytest.raises(InvalidArgument, match="external origin"):
            import_image(p, "v", image)
        assert v.mapped_blocks == 0 and v.read(0, 10) == env["data"][:10]
    with Pool.create(str(env["dir"] / "md"), data_size=16 * MiB, block_size=BS, metadata_only=True) as p:
        v = p.create_thin("v", VOL, external_origin=env["origin"])
        v.write(100, b"x")
        assert v.mapped_blocks == 1 and v.read(0, VOL) == bytes(VOL)
