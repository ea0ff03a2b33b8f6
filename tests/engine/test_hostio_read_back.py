"""hostio.write_all's read-back of a write that took several calls compares the file in pieces: one
pread returns at most 2 GiB - 4 KiB on Linux, so a whole-range pread of a bigger write (a 1 PiB pool's
exported metadata is a 4.3 GB image) came back short and the write was reported as not stored."""

from __future__ import annotations

import os

import pytest

from thinpool import hostio
from thinpool.errors import HostIOError


def _short_pwrite(fd: int, data, offset: int) -> int:
    """A pwrite that stores at most 5,000 bytes a call (as the kernel caps one call at 2 GiB - 4 KiB)."""
    return os.pwrite(fd, bytes(data[:5000]), offset)


def test_a_write_taken_in_several_calls_is_read_back_in_pieces_each_within_one_pread(tmp_path, monkeypatch):
    real_pread = os.pread
    # one pread returns at most 8 KiB here, as Linux returns at most 2 GiB - 4 KiB; the pieces compared
    # are 4 KiB, as 1 GiB is beside a 4 GB write
    monkeypatch.setattr(os, "pread", lambda fd, n, off: real_pread(fd, min(n, 8192), off))
    monkeypatch.setattr(hostio, "_READ_BACK", 4096)
    data = os.urandom(3 * 4096 + 123)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        hostio.write_all(_short_pwrite, fd, data, 100, str(tmp_path / "f"))
        with open(tmp_path / "f", "rb") as f:
            assert f.read()[100:] == data

        def lying_pwrite(fd: int, buf, offset: int) -> int:  # reports bytes it never stored
            return min(len(buf), 5000)

        with pytest.raises(HostIOError, match="read back differ"):
            hostio.write_all(lying_pwrite, fd, os.urandom(len(data)), 100, str(tmp_path / "f"))
    finally:
        os.close(fd)
