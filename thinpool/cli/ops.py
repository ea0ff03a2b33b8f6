"""Ops: every pool-touching CLI command, as a plain function, routable to a serving process.

An *op* is ``func(pool, **kwargs) -> JSON-able result`` registered in :data:`OPS` under a name (the CLI
verb, e.g. ``"create-thin"``) with :func:`register_op` / the :func:`op` decorator, plus a text renderer.
Keyword arguments must be JSON-able (paths absolute: the serving process has its own cwd).

Routing (:func:`run_op`)
------------------------
* If ``<pool>/control.sock`` accepts a connection, the pool is being served (``thinpool serve``): the
  request is sent as one JSON line ``{"op": name, "args": kwargs}`` and one JSON line comes back,
  ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "ClassName", "message": "..."}``; the error
  is re-raised as the same :mod:`thinpool.errors` class.  The serving process answers each request line
  with :func:`handle_control_request` (it runs the op under the pool's lock and, for write ops, commits --
  dm-thin commits after every pool message).
* Otherwise the pool is opened locally (read-only for reporting ops), the op runs, write ops commit, and
  the pool is closed.  A failed op commits nothing.

Streaming ops (``write``, ``read``, ``import``, ``export``) are registered with ``local_only=True``: they run
only on a pool that is not being served; on a served pool they fail with FailedPrecondition telling the
user to go through the volume's NBD export instead (e.g. ``nbdcopy``).
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from thinpool import errors as _errors
from thinpool.errors import FailedPrecondition, InvalidArgument, ThinpoolError

CONTROL_SOCKET = "control.sock"
MAX_LINE = 1 << 31


@dataclass(frozen=True)
class OpSpec:
    """A registered op: its function, whether it modifies the pool, its text renderer, and whether it
    must run in-process (streams data through the client's files)."""

    name: str
    func: Callable[..., Any]
    write: bool
    render: Callable[[Any], str] | None = None
    local_only: bool = False


#: All ops by name.
OPS: dict[str, OpSpec] = {}

# Pools opened read-only by run_op only to report on them: their status shows the pool's own mode,
# not the "read-only" that the library reports for a read-only handle.
_REPORTING_HANDLES: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register_op(name: str, func: Callable[..., Any], *, write: bool,
                render: Callable[[Any], str] | None = None, local_only: bool = False) -> OpSpec:
    """Register ``func`` as op ``name`` (ValueError if the name is taken)."""
    if name in OPS:
        raise ValueError(f"op {name!r} is registered twice")
    spec = OpSpec(name, func, write, render, local_only)
    OPS[name] = spec
    return spec


def op(name: str, *, write: bool, render: Callable[[Any], str] | None = None,
       local_only: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator form of :func:`register_op`; returns the function unchanged."""
    def deco(func: Callable[..., Any]) -> Callable[..., Any]:
        register_op(name, func, write=write, render=render, local_only=local_only)
        return func
    return deco


def get_op(name: str) -> OpSpec:
    """The op called ``name`` (InvalidArgument if none)."""
    try:
        return OPS[name]
    except KeyError:
        raise InvalidArgument(f"unknown op {name!r} (known: {', '.join(sorted(OPS))})") from None


def is_reporting_handle(pool: Any) -> bool:
    """True if ``pool`` was opened read-only by :func:`run_op` just to run a reporting op."""
    return pool in _REPORTING_HANDLES


# ---------------------------------------------------------------------------------------------- client side
def control_socket_path(pool_path: str) -> str:
    """Where a serving process listens for control requests: ``<pool>/control.sock``."""
    return os.path.join(os.path.abspath(pool_path), CONTROL_SOCKET)


def connect_control(pool_path: str) -> socket.socket | None:
    """A connection to the pool's live control socket, or None if the pool is not being served
    (no socket, or a stale one left by a process that died)."""
    path = control_socket_path(pool_path)
    if not os.path.exists(path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        raise FailedPrecondition(f"pool {os.path.dirname(path)}: cannot reach the serving process at "
                                 f"{path}: {exc.strerror or exc}") from None
    return sock


def error_class(name: str) -> type[ThinpoolError]:
    """The :mod:`thinpool.errors` class called ``name`` (ThinpoolError if unknown)."""
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, ThinpoolError):
        return cls
    return ThinpoolError


def _read_line(sock: socket.socket) -> bytes:
    chunks = []
    total = 0
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        nl = chunk.find(b"\n")
        if nl >= 0:
            chunks.append(chunk[:nl])
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > MAX_LINE:
            raise ThinpoolError("control socket reply is too long")
    return b"".join(chunks)


def call_server(sock: socket.socket, name: str, args: dict[str, Any], pool_path: str = "") -> Any:
    """Send one request over a connected control socket and return its result (or raise its error)."""
    with sock:
        sock.sendall(json.dumps({"op": name, "args": args}).encode() + b"\n")
        line = _read_line(sock)
    if not line:
        raise FailedPrecondition(f"pool {pool_path}: the serving process closed the control connection "
                                 f"without answering {name!r}")
    try:
        reply = json.loads(line)
    except ValueError:
        raise ThinpoolError(f"pool {pool_path}: malformed control reply {line[:80]!r}") from None
    if reply.get("ok"):
        return reply.get("result")
    raise error_class(str(reply.get("error", "ThinpoolError")))(str(reply.get("message", "request failed")))


def run_op(pool_path: str, name: str, kwargs: dict[str, Any] | None = None, write: bool | None = None) -> Any:
    """Run op ``name`` on the pool at ``pool_path``: through its serving process if it is served,
    else in-process (see the module docstring).  ``write`` overrides the op's registered mode."""
    from thinpool.pool import Pool

    spec = get_op(name)
    kwargs = dict(kwargs or {})
    write = spec.write if write is None else write
    sock = connect_control(pool_path)
    if sock is not None:
        if spec.local_only:
            sock.close()
            raise FailedPrecondition(
                f"pool {os.path.abspath(pool_path)} is being served; '{name}' streams data and runs only on "
                f"a pool that is not served -- use the volume's NBD export instead (e.g. nbdcopy)")
        return call_server(sock, name, kwargs, os.path.abspath(pool_path))
    pool = Pool.open(pool_path, read_only=not write)
    if not write:
        _REPORTING_HANDLES.add(pool)
    try:
        result = spec.func(pool, **kwargs)
        if write:
            pool.commit()
    except BaseException:
        pool.close(commit=False)
        raise
    pool.close(commit=False)
    return result


# ---------------------------------------------------------------------------------------------- server side
def _reply(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def handle_control_request(pool: Any, line: bytes) -> bytes:
    """Answer one control request line for a served ``pool``; returns one JSON reply line (with ``\\n``).

    The op runs while holding the pool's lock (so it is atomic with respect to NBD I/O); write ops are
    committed before the reply.  Never raises for a bad request: errors become ``{"ok": false, ...}``.
    """
    try:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument("control request is not valid JSON") from None
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise InvalidArgument('control request must be a JSON object {"op": NAME, "args": {...}}')
        args = req.get("args") or {}
        if not isinstance(args, dict):
            raise InvalidArgument("control request 'args' must be a JSON object")
        spec = get_op(req["op"])
        if spec.local_only:
            raise FailedPrecondition(f"'{spec.name}' streams data and is not available while the pool is "
                                     f"served; use the volume's NBD export")
        try:
            inspect.signature(spec.func).bind(pool, **args)
        except TypeError as exc:
            raise InvalidArgument(f"bad arguments for op {spec.name!r}: {exc}") from None
        with pool._lock:
            result = spec.func(pool, **args)
            if spec.write:
                pool.commit()
        return _reply({"ok": True, "result": result})
    except ThinpoolError as exc:
        return _reply({"ok": False, "error": type(exc).__name__, "message": str(exc)})
    except Exception as exc:  # a bug must not kill the serving process
        return _reply({"ok": False, "error": "ThinpoolError",
                       "message": f"internal error in op: {type(exc).__name__}: {exc}"})


__all__ = ["OPS", "OpSpec", "op", "register_op", "get_op", "run_op", "handle_control_request",
           "control_socket_path", "connect_control", "call_server", "error_class", "is_reporting_handle",
           "CONTROL_SOCKET"]
