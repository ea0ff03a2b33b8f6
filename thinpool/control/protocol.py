"""The control protocol's wire format: one JSON request line, one JSON reply line, per connection.

Request::

    {"op": NAME, "args": {KEYWORD: VALUE, ...}}\\n

Reply::

    {"ok": true, "result": RESULT}\\n
    {"ok": false, "error": CLASS_NAME, "message": TEXT, "attrs": {...}}\\n

``CLASS_NAME`` is the name of a class in :data:`thinpool.errors.__all__`; the client raises that class
again with the same message (:func:`rebuild_error`), so a caller of a served op catches exactly what it
would catch in-process.  ``attrs`` (optional) carries the error's JSON-able details that are not in its
message: ``errno`` and ``filename`` of the OSError-based classes, ``structure`` and ``block`` of
:class:`~thinpool.errors.MetadataCorrupt`.  An unknown class name (a newer server) becomes a plain
:class:`~thinpool.errors.ThinpoolError`.  A request line may be empty (a liveness probe: no reply).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from thinpool import errors as _errors
from thinpool.errors import InvalidArgument, ThinpoolError

if TYPE_CHECKING:
    import socket

#: the control socket's file name inside the pool directory
CONTROL_SOCKET = "control.sock"
#: longest reply line a client accepts (bytes)
MAX_REPLY = 1 << 31
#: longest request line a server reads (bytes); a longer one is answered as invalid JSON
MAX_REQUEST = 1 << 24
#: error attributes carried across the socket (when JSON-able and set)
ERROR_ATTRS = ("errno", "filename", "structure", "block")


def control_socket_path(pool_path: str) -> str:
    """Where a serving process listens for control requests: ``<pool>/control.sock``."""
    return os.path.join(os.path.abspath(pool_path), CONTROL_SOCKET)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# ---------------------------------------------------------------------------------------------- requests
def encode_request(name: str, args: dict[str, Any]) -> bytes:
    """The request line (with ``\\n``) asking for op ``name`` with keyword arguments ``args``."""
    return json.dumps({"op": name, "args": args}).encode() + b"\n"


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """(op name, args) of a request line; InvalidArgument if it is not a well-formed request."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("control request is not valid JSON") from None
    except RecursionError:
        raise InvalidArgument("control request is nested too deeply") from None
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise InvalidArgument('control request must be a JSON object {"op": NAME, "args": {...}}')
    args = req.get("args", {})
    if not isinstance(args, dict):
        raise InvalidArgument("control request 'args' must be a JSON object")
    return req["op"], args


# ---------------------------------------------------------------------------------------------- replies
def encode_result(result: Any) -> bytes:
    """The reply line of a successful op."""
    return _line({"ok": True, "result": result})


def error_reply(error: str, message: str, attrs: dict[str, Any] | None = None) -> bytes:
    """The reply line of a failed op: ``error`` is a class name of :mod:`thinpool.errors`."""
    reply: dict[str, Any] = {"ok": False, "error": error, "message": message}
    if attrs:
        reply["attrs"] = attrs
    return _line(reply)


def encode_error(exc: BaseException) -> bytes:
    """The reply line for ``exc`` raised by an op: a :class:`ThinpoolError` keeps its class name,
    message and :data:`ERROR_ATTRS`; anything else is an internal error (a bug), sent as a
    ThinpoolError naming the Python exception."""
    if not isinstance(exc, ThinpoolError):
        return error_reply("ThinpoolError", f"internal error in op: {type(exc).__name__}: {exc}")
    attrs = {}
    for key in ERROR_ATTRS:
        value = getattr(exc, key, None)
        if value is not None and isinstance(value, (int, str)) and not isinstance(value, bool):
            attrs[key] = value
    return error_reply(type(exc).__name__, str(exc), attrs)


def error_class(name: str) -> type[ThinpoolError]:
    """The class of :data:`thinpool.errors.__all__` called ``name``; ThinpoolError if there is none
    (or it is not a ThinpoolError, e.g. ThinpoolWarning)."""
    if name not in _errors.__all__:
        return ThinpoolError
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, ThinpoolError):
        return cls
    return ThinpoolError


def rebuild_error(name: str, message: str, attrs: dict[str, Any] | None = None) -> ThinpoolError:
    """The exception a reply describes: class :func:`error_class` (``name``) built from ``message``,
    with the known :data:`ERROR_ATTRS` set from ``attrs``.  A class whose constructor does not take a
    lone message gives a ThinpoolError ``"<name>: <message>"`` (never a TypeError)."""
    cls = error_class(name)
    try:
        exc = cls(message)
    except TypeError:
        exc = ThinpoolError(f"{name}: {message}")
    for key, value in (attrs or {}).items():
        if key in ERROR_ATTRS and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                setattr(exc, key, value)
            except (AttributeError, TypeError):
                pass
    return exc


def decode_reply(line: bytes, what: str = "") -> Any:
    """The result of a reply line, or raise the error it carries (:func:`rebuild_error`); ``what``
    (e.g. ``"pool /p"``) prefixes the message of a malformed reply."""
    prefix = f"{what}: " if what else ""
    try:
        reply = json.loads(line)
    except ValueError:
        raise ThinpoolError(f"{prefix}malformed control reply {line[:80]!r}") from None
    if not isinstance(reply, dict):
        raise ThinpoolError(f"{prefix}malformed control reply {line[:80]!r}")
    if reply.get("ok"):
        return reply.get("result")
    attrs = reply.get("attrs")
    raise rebuild_error(str(reply.get("error", "ThinpoolError")), str(reply.get("message", "request failed")),
                        attrs if isinstance(attrs, dict) else None)


def read_reply_line(sock: socket.socket, limit: int = MAX_REPLY) -> bytes:
    """Read one line (without its ``\\n``) from ``sock``: up to the newline or EOF (b"" if nothing
    came); ThinpoolError past ``limit`` bytes.  The socket's timeout applies to each receive."""
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
        if total > limit:
            raise ThinpoolError("control socket reply is too long")
    return b"".join(chunks)


__all__ = ["CONTROL_SOCKET", "MAX_REPLY", "MAX_REQUEST", "ERROR_ATTRS", "control_socket_path",
           "encode_request", "decode_request", "encode_result", "error_reply", "encode_error", "error_class",
           "rebuild_error", "decode_reply", "read_reply_line"]
