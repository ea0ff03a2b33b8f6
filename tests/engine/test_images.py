"""thinpool.images as a library: raw sparse image import/export and byte-range read/write, no CLI."""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from thinpool import Pool
from thinpool.errors import InvalidArgument, NotFound
from thinpool.images import export_image, import_image
from thinpool.volume_bytes import byte_range, read_volume, write_volume

BS = 64 * 1024
MiB = 1 << 20


@pytest.fixture()
def pool(tmp_path: Path) -> Iterator[Pool]:
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=16 * MiB, block_size=BS).close()
    with Pool.open(path) as p:
        yield p


def sparse_image(path: Path, size: int, chunks: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in chunks.items():
            f.seek(off)
            f.write(data)


def test_import_export_round_trip_sparse(pool: Pool, tmp_path: Path) -> None:
    img = tmp_path / "in.img"
    sparse_image(img, 2 * MiB + 512, {0: b"A" * 100, 5 * BS + 7: b"B" * (BS + 3), 2 * MiB: b"C" * 512})
    seen: list[tuple[str, int, int]] = []

    @contextmanager
    def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
        done = [0]
        yield lambda n: done.__setitem__(0, done[0] + n)
        seen.append((description, total, done[0]))

    r = import_image(pool, "v", img, progress=progress)
    assert r["created"] and r["size"] == 2 * MiB + 512 and r["bytes"] == 2 * MiB + 512
    assert r["blocks_written"] == 4 and r["mapped_blocks"] == 4  # blocks 0, 5, 6 and the 512-byte tail
    assert seen and seen[0][0] == "import v" and seen[0][1] == seen[0][2]
    out = tmp_path / "out.img"
    e = export_image(pool, "v", str(out))
    assert e == {"name": "v", "output": str(out), "size": 2 * MiB + 512, "sparse": True, "blocks_written": 4}
    assert out.read_bytes() == img.read_bytes()
    assert os.stat(out).st_blocks * 512 <= 5 * BS  # holes stay holes


def test_import_into_existing_volume_reads_as_the_image(pool: Pool, tmp_path: Path) -> None:
    """Blocks that are zero (or holes) in the image are unmapped in an existing volume."""
    thin = pool.create_thin("v", MiB)
    thin.write(0, b"\x11" * MiB)
    img = tmp_path / "in.img"
    sparse_image(img, MiB, {3 * BS: b"\x22" * BS})
    r = import_image(pool, "v", str(img))
    assert not r["created"] and r["mapped_blocks"] == 1 and r["blocks_unmapped"] == MiB // BS - 1
    assert bytes(pool.thin("v").read(0, MiB)) == img.read_bytes()


def test_bad_images_change_nothing(pool: Pool, tmp_path: Path) -> None:
    pool.create_thin("small", BS)
    big = tmp_path / "big.img"
    sparse_image(big, 2 * BS, {BS: b"x"})
    with pytest.raises(InvalidArgument, match="larger than volume 'small'"):
        import_image(pool, "small", str(big))
    with pytest.raises(InvalidArgument, match="--size 4096 does not match"):
        import_image(pool, "small", str(big), size=4096)
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(InvalidArgument, match="is empty"):
        import_image(pool, "new", str(empty))
    with pytest.raises(InvalidArgument, match="size is unknown or zero"):
        import_image(pool, "new", str(empty), allow_empty=True)
    with pytest.raises(InvalidArgument, match="cannot read image"):
        import_image(pool, "new", str(tmp_path / "missing.img"))
    with pytest.raises(InvalidArgument, match="image must be a path"):
        import_image(pool, "new", 3)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        export_image(pool, "nope", str(tmp_path / "o.img"))
    assert [t.name for t in pool.thins()] == ["small"] and pool.thin("small").mapped_blocks == 0
    assert not (tmp_path / "o.img").exists()


def test_import_verification_arguments_are_checked_before_anything(pool: Pool, tmp_path: Path) -> None:
    """expect_size, sha256 and allow_empty are type-checked and bounded; a regular file whose length is
    not the expected one is refused before a volume is created; the digest counts holes as zeroes."""
    img = tmp_path / "in.img"
    sparse_image(img, 3 * BS, {BS + 1: b"xyz"})
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    for kwargs, needle in (({"expect_size": -1}, "whole number of bytes"), ({"expect_size": 1.5}, "whole number"),
                           ({"expect_size": True}, "whole number"), ({"expect_size": 1 << 63}, "whole number"),
                           ({"sha256": "ab"}, "64 hexadecimal"), ({"sha256": "g" * 64}, "64 hexadecimal"),
                           ({"sha256": 5}, "64 hexadecimal"), ({"allow_empty": 1}, "True or False"),
                           ({"expect_size": 0}, "--allow-empty"),
                           ({"expect_size": 3 * BS - 1}, f"is {3 * BS} bytes, not the {3 * BS - 1} expected"),
                           ({"sha256": "0" * 64}, f"its sha256 is {digest}")):
        with pytest.raises(InvalidArgument, match=needle):
            import_image(pool, "new", str(img), **kwargs)  # type: ignore[arg-type]
    assert list(pool.thins()) == [] and pool.status().used_data_blocks == 0
    r = import_image(pool, "new", str(img), expect_size=3 * BS, sha256=digest.upper())
    assert r["sha256"] == digest and r["mapped_blocks"] == 1 and r["created"]


def test_import_into_existing_volume_failing_keeps_its_blocks_and_bytes(pool: Pool, tmp_path: Path) -> None:
    """A failed import into an existing volume (digest mismatch found after every block was written)
    leaves its mappings -- the same data blocks -- and its bytes as committed, though the import wrote
    over every one of its blocks: the volume is held as a snapshot meanwhile, so the writes went to new
    blocks, dropped with the transaction.  A successful one frees the replaced blocks and leaves no
    helper volume."""
    v = pool.create_thin("v", 4 * BS)
    v.write(0, bytes(range(256)) * (4 * BS // 256))
    pool.commit()
    maps, data = v.mappings()[:2], v.read(0, 4 * BS)
    img = tmp_path / "in.img"
    img.write_bytes(b"\x05" * (4 * BS))
    with pytest.raises(InvalidArgument, match="sha256"):
        import_image(pool, "v", str(img), sha256="1" * 64)
    assert [m.tolist() for m in pool.thin("v").mappings()[:2]] == [m.tolist() for m in maps]
    assert pool.thin("v").read(0, 4 * BS) == data and [t.name for t in pool.thins()] == ["v"]
    assert pool.status().used_data_blocks == 4
    r = import_image(pool, "v", str(img), sha256=hashlib.sha256(img.read_bytes()).hexdigest())
    assert r["blocks_written"] == 4 and pool.thin("v").read(0, 4 * BS) == img.read_bytes()
    assert [t.name for t in pool.thins()] == ["v"] and pool.status().used_data_blocks == 4


def test_write_and_read_byte_ranges(pool: Pool, tmp_path: Path) -> None:
    pool.create_thin("v", MiB)
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 1000)
    assert write_volume(pool, "v", str(src), offset=100, length=1000) == \
        {"name": "v", "offset": 100, "bytes_written": 1000}
    dst = tmp_path / "dst"
    assert read_volume(pool, "v", str(dst), offset=100, length=1000)["bytes_read"] == 1000
    assert dst.read_bytes() == src.read_bytes()[:1000]
    with pytest.raises(InvalidArgument, match="goes past the end of the volume"):
        write_volume(pool, "v", str(src), offset=MiB - 10)
    with pytest.raises(InvalidArgument, match="read of 11 bytes at offset 1048566 goes past the end"):
        read_volume(pool, "v", str(dst), offset=MiB - 10, length=11)
    assert byte_range(pool.thin("v"), 10, None, "read") == (10, MiB - 10)
    assert pool.thin("v").mapped_blocks == 1
