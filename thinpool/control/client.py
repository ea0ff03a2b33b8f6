"""The control socket's client: reach a serving process and run one op there.

:func:`connect` tells whether a pool is being served (a connection, or None); :func:`call` sends one
request on it and returns the op's result or raises its error, rebuilt as the same
:mod:`thinpool.errors` class (:mod:`thinpool.control.protocol`).  Both are bounded in time, so a hung
server never hangs the caller: :data:`CONNECT_TIMEOUT` to connect and send, :data:`REPLY_TIMEOUT` for
the answer (the environment variable ``THINPOOL_CONTROL_TIMEOUT`` overrides the latter, and caps the
former).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from thinpool.errors import FailedPrecondition

from .protocol import CONTROL_SOCKET, control_socket_path, decode_reply, encode_request, read_reply_line

if TYPE_CHECKING:
    import socket

#: seconds a client waits to connect to a serving process and to send its request
CONNECT_TIMEOUT = 10.0
#: seconds a client waits for a served op's answer (``THINPOOL_CONTROL_TIMEOUT`` overrides it; a long
#: ``check`` or ``dump`` of a large pool runs within it, a hung server does not hang the CLI forever)
REPLY_TIMEOUT = 600.0
#: environment variable overriding :data:`REPLY_TIMEOUT` (seconds, > 0)
TIMEOUT_ENV = "THINPOOL_CONTROL_TIMEOUT"


def reply_timeout() -> float:
    """:data:`REPLY_TIMEOUT`, or ``$THINPOOL_CONTROL_TIMEOUT`` when that is a number > 0."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, REPLY_TIMEOUT))
    except ValueError:
        return REPLY_TIMEOUT
    return value if value > 0 else REPLY_TIMEOUT


def connect(pool_path: str) -> socket.socket | None:
    """A connection to the pool's live control socket, or None if the pool is not being served
    (no socket, or a stale one left by a process that died).  FailedPrecondition naming the socket
    if the serving process does not accept within the connect timeout or cannot be reached.

    Note for servers: a client may connect only to learn that the pool is served (before refusing a
    streaming op) and close without sending anything; treat EOF before a request line as a no-op."""
    path = control_socket_path(pool_path)
    if not os.path.exists(path):
        return None
    import socket  # here: most commands run on a pool that is not served
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    timeout = min(CONNECT_TIMEOUT, reply_timeout())
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None
    except socket.timeout:
        sock.close()
        raise FailedPrecondition(f"pool {os.path.dirname(path)}: the serving process is not answering: no "
                                 f"connection to {path} within {timeout:g} s") from None
    except OSError as exc:
        sock.close()
        raise FailedPrecondition(f"pool {os.path.dirname(path)}: cannot reach the serving process at "
                                 f"{path}: {exc.strerror or exc}") from None
    return sock


def call(sock: socket.socket, name: str, args: dict[str, Any], pool_path: str = "") -> Any:
    """Send one request for op ``name`` over a connected control socket (closed afterwards) and return
    its result, or raise its error as the same :mod:`thinpool.errors` class with the same message.

    Bounded: FailedPrecondition naming the socket if the request cannot be sent within
    :data:`CONNECT_TIMEOUT` or no answer comes within :func:`reply_timeout` seconds, or if the server
    drops the connection without answering."""
    import socket as _socket
    timeout = reply_timeout()
    where = f"{pool_path}/{CONTROL_SOCKET}" if pool_path else "the control socket"
    with sock:
        try:
            sock.settimeout(min(CONNECT_TIMEOUT, timeout))
            sock.sendall(encode_request(name, args))
            sock.settimeout(timeout)
            line = read_reply_line(sock)
        except _socket.timeout:
            raise FailedPrecondition(f"pool {pool_path}: the serving process is not answering: no reply to "
                                     f"{name!r} on {where} within {timeout:g} s "
                                     f"({TIMEOUT_ENV} sets the limit)") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise FailedPrecondition(f"pool {pool_path}: the serving process dropped the connection on {where} "
                                     f"before answering {name!r}: {exc.strerror or exc}") from None
    if not line:
        raise FailedPrecondition(f"pool {pool_path}: the serving process closed the control connection "
                                 f"without answering {name!r}")
    return decode_reply(line, f"pool {pool_path}")


__all__ = ["CONNECT_TIMEOUT", "REPLY_TIMEOUT", "TIMEOUT_ENV", "reply_timeout", "connect", "call"]
