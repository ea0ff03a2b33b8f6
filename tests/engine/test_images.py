"""thinpool.images as a library: raw sparse image import/export and byte-range read/write, no CLI."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from thinpool import Pool
from thinpool.errors import InvalidArgument, NotFound
from thinpool.images import byte_range, export_image, import_image, read_volume, write_volume

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
    with pytest.raises(InvalidArgument, match="size is unknown or zero"):
        import_image(pool, "new", str(empty))
    with pytest.raises(InvalidArgument, match="cannot read image"):
        import_image(pool, "new", str(tmp_path / "missing.img"))
    with pytest.raises(InvalidArgument, match="image must be a path"):
        import_image(pool, "new", 3)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        export_image(pool, "nope", str(tmp_path / "o.img"))
    assert [t.name for t in pool.thins()] == ["small"] and pool.thin("small").mapped_blocks == 0
    assert not (tmp_path / "o.img").exists()


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
