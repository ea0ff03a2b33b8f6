"""Listening unix sockets (thinpool.unixsock.listen_private): a server's socket path appears only once
the socket listens, so a client that waits for the path to exist is never refused; nothing that
already exists at the path is replaced; no temporary name is left behind."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from thinpool import Pool
from thinpool.control.server import ControlServer
from thinpool.nbd.backend import MemoryProvider
from thinpool.nbd.server import NBDServer
from thinpool.unixsock import MAX_UNIX_PATH, listen_private

from tests.support import unix_socket_accepts


def _watch_listen(monkeypatch: pytest.MonkeyPatch, path: str) -> list[bool]:
    """Record, at every listen() call, whether ``path`` exists."""
    seen: list[bool] = []
    listen = socket.socket.listen

    def watching(self: socket.socket, *args: Any) -> None:
        seen.append(os.path.lexists(path))
        listen(self, *args)
    monkeypatch.setattr(socket.socket, "listen", watching)
    return seen


def _leftovers(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(".tp-")]


def test_the_nbd_socket_path_appears_only_once_it_listens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "nbd.sock")
    seen = _watch_listen(monkeypatch, path)
    provider = MemoryProvider(block_size=4096)
    provider.create("a", 1 << 20)
    server = NBDServer(provider, unix_path=path)
    try:
        assert seen == [False]  # listen() ran before the path existed
        assert unix_socket_accepts(path)
        assert (os.stat(path).st_mode & 0o777) == 0o600
        assert _leftovers(str(tmp_path)) == []
    finally:
        server.shutdown()
    assert not os.path.lexists(path)


def test_the_control_socket_path_appears_only_once_it_listens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = Pool.create(tmp_path / "pool", data_size="4MiB")
    path = str(tmp_path / "ctl.sock")
    seen = _watch_listen(monkeypatch, path)
    server = ControlServer(pool, {}, path)
    try:
        assert seen == [False]
        assert unix_socket_accepts(path)
        assert (os.stat(path).st_mode & 0o777) == 0o600
        assert _leftovers(str(tmp_path)) == []
    finally:
        server.stop()
        pool.close()


def test_a_path_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    Path(path).write_bytes(b"someone else's")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(OSError) as e:
            listen_private(sock, path, 4)
        assert e.value.errno == errno.EADDRINUSE and path in str(e.value)
    finally:
        sock.close()
    assert Path(path).read_bytes() == b"someone else's"
    assert _leftovers(str(tmp_path)) == []


def test_a_path_too_long_for_a_temporary_name_still_listens(tmp_path: Path) -> None:
    room = MAX_UNIX_PATH - len(os.fsencode(str(tmp_path))) - 1  # the longest name that fits
    if room < 8:
        pytest.skip(f"temporary directory {tmp_path} leaves no room for a socket name")
    path = str(tmp_path / ("s" * room))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listen_private(sock, path, 4)
        assert unix_socket_accepts(path)
        assert _leftovers(str(tmp_path)) == []
    finally:
        sock.close()
