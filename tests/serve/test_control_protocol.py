"""The control socket as a library: errors cross it faithfully, the server knows only the ops it is given,
and the serving stack does not depend on the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from thinpool import Pool, errors
from thinpool.control import client, protocol
from thinpool.control.server import ControlServer, handle_request
from thinpool.errors import FailedPrecondition, InvalidArgument, ThinpoolError

MiB = 1 << 20


@dataclass(frozen=True)
class Op:
    """A minimal op-table entry (what ControlServer needs of the CLI's OpSpec)."""

    name: str
    func: Callable[..., Any]
    write: bool = False
    local_only: bool = False


class LocalOnlyError(ThinpoolError):
    """A ThinpoolError subclass that is not in thinpool.errors (a client cannot know it)."""


def _raise(pool: Any, cls: str, message: str) -> None:
    raise getattr(errors, cls)(message)


def _raise_detailed(pool: Any, kind: str) -> None:
    if kind == "corrupt":
        raise errors.MetadataCorrupt("btree node 7: bad checksum", structure="btree node", block=7)
    if kind == "hostio":
        raise errors.HostIOError("pool /p: write to data failed: No space left", 28, "/p/data")
    if kind == "local":
        raise LocalOnlyError("from a class the errors module does not have")
    raise KeyError(kind)  # a bug in an op


def _ping(pool: Any) -> str:
    return "pong"


OPS = {"raise": Op("raise", _raise), "detailed": Op("detailed", _raise_detailed), "ping": Op("ping", _ping),
       "stream": Op("stream", _ping, local_only=True)}
ERROR_CLASSES = [name for name in errors.__all__
                 if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), ThinpoolError)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("ctl") / "pool")
    Pool.create(path, data_size=4 * MiB).close()
    pool = Pool.open(path)
    server = ControlServer(pool, OPS, protocol.control_socket_path(path))
    server.start()
    try:
        yield path
    finally:
        server.stop()
        pool.close()


def call(path: str, name: str, args: dict[str, Any]) -> Any:
    sock = client.connect(path)
    assert sock is not None, "the pool is served"
    return client.call(sock, name, args, path)


def test_every_error_class_is_known() -> None:
    """Every class the library can raise is in errors.__all__, so the client can name it."""
    assert {"ThinpoolError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition", "NoSpace",
            "ReadOnly", "PoolLocked", "PermissionDenied", "MetadataCorrupt", "HostIOError"} <= set(ERROR_CLASSES)
    assert protocol.error_class("ThinpoolWarning") is ThinpoolError  # in __all__, but not an error
    assert protocol.error_class("os") is ThinpoolError  # a module attribute that is no class of __all__


@pytest.mark.parametrize("name", ERROR_CLASSES)
def test_error_class_crosses_the_socket(served: str, name: str) -> None:
    """Raised in the serving process, the client gets exactly the same class and message."""
    message = f"pool {served}: a {name} with 'quotes', ünïcode and a\ttab"
    with pytest.raises(ThinpoolError) as info:
        call(served, "raise", {"cls": name, "message": message})
    assert type(info.value) is getattr(errors, name)
    assert str(info.value) == message


def test_error_details_cross_the_socket(served: str) -> None:
    with pytest.raises(errors.MetadataCorrupt) as corrupt:
        call(served, "detailed", {"kind": "corrupt"})
    assert (str(corrupt.value), corrupt.value.structure, corrupt.value.block) == \
        ("btree node 7: bad checksum", "btree node", 7)
    with pytest.raises(errors.HostIOError) as hostio:
        call(served, "detailed", {"kind": "hostio"})
    assert str(hostio.value) == "pool /p: write to data failed: No space left"
    assert (hostio.value.errno, hostio.value.filename) == (28, "/p/data")
    assert isinstance(hostio.value, OSError)


def test_unknown_and_internal_errors(served: str) -> None:
    """A class the client does not know arrives as ThinpoolError with its message; a bug in an op is
    an internal error, and the server keeps serving."""
    with pytest.raises(ThinpoolError) as local:
        call(served, "detailed", {"kind": "local"})
    assert type(local.value) is ThinpoolError and str(local.value) == "from a class the errors module does not have"
    with pytest.raises(ThinpoolError) as bug:
        call(served, "detailed", {"kind": "oops"})
    assert type(bug.value) is ThinpoolError and "internal error in op: KeyError" in str(bug.value)
    assert call(served, "ping", {}) == "pong"
    line = protocol.error_reply("SomeFutureError", "newer server")
    with pytest.raises(ThinpoolError) as future:
        protocol.decode_reply(line.rstrip(b"\n"))
    assert type(future.value) is ThinpoolError and str(future.value) == "newer server"


def test_server_answers_only_its_op_table(served: str) -> None:
    with pytest.raises(InvalidArgument, match=r"unknown op 'ls' \(known: detailed, ping, raise, stream\)"):
        call(served, "ls", {})
    with pytest.raises(FailedPrecondition, match="streams data"):
        call(served, "stream", {})
    with pytest.raises(InvalidArgument, match="unknown argument 'x'"):
        call(served, "ping", {"x": 1})


def test_handle_request_commits_write_ops_only(tmp_path: Path) -> None:
    """A write op is committed before the reply; a reporting op is not (its change would be lost)."""
    path = str(tmp_path / "pool")
    Pool.create(path, data_size=4 * MiB).close()
    ops = {"mk": Op("mk", lambda pool, name: pool.thin(name).write(0, b"x"), write=True),
           "mk-read": Op("mk-read", lambda pool, name: pool.thin(name).write(0, b"y"))}
    with Pool.open(path) as pool:
        pool.create_thin("a", MiB)
        pool.create_thin("b", MiB)
    pool = Pool.open(path)
    try:
        assert json.loads(handle_request(pool, ops, b'{"op": "mk", "args": {"name": "a"}}')) == \
            {"ok": True, "result": 1}
        assert json.loads(handle_request(pool, ops, b'{"op": "mk-read", "args": {"name": "b"}}'))["ok"]
    finally:
        pool.close(commit=False)
    with Pool.open(path, read_only=True) as pool:  # a new block's mapping is metadata
        assert pool.thin("a").mapped_blocks == 1 and pool.thin("b").mapped_blocks == 0


def test_serving_stack_does_not_import_the_cli() -> None:
    """control/, nbd/served.py, images.py and volume_bytes.py are library code: importing them loads no thinpool.cli
    module (and images, volume_bytes and the control client no numpy)."""
    code = ("import sys, thinpool.control.server, thinpool.control.client, thinpool.nbd.served, thinpool.images, "
            "thinpool.volume_bytes;"
            "print(sorted(m for m in sys.modules if m.startswith('thinpool.cli')));"
            "import thinpool.control.client, thinpool.images;")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout
    assert out.strip() == "[]"
    code = ("import sys, thinpool.control.client, thinpool.images, thinpool.volume_bytes, thinpool.cli.registry, "
            "thinpool.cli.stream_ops;"
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
