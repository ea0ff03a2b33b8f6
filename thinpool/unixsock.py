"""Unix-domain listening sockets shared by the NBD server and the control server.

* :func:`bind_private` binds a socket with mode 0600 from its creation (a socket grants whatever its
  server serves, so it is for the pool's owner only);
* :func:`claim_unix_path` makes a path ready to listen on: an over-long path or a live socket is
  refused, a stale socket left by a dead process is removed.
"""

from __future__ import annotations

import os
import socket
import stat

from thinpool.errors import AlreadyExists, InvalidArgument

#: AF_UNIX path limit (sun_path is 108 bytes including the NUL)
MAX_UNIX_PATH = 107


def bind_private(sock: socket.socket, path: str) -> None:
    """Bind a unix socket at ``path`` with mode 0600 from its creation (umask 0177 around ``bind``;
    the umask is process-wide, so this is done only while starting to serve) and chmod it to be sure."""
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


def claim_unix_path(path: str, what: str, hint: str = "") -> None:
    """Make ``path`` free to bind: InvalidArgument if it is longer than :data:`MAX_UNIX_PATH` bytes
    (``hint`` is appended to the message, e.g. an option that sets another path) or exists and is not
    a socket; AlreadyExists if a process listens on it; a stale socket (no listener) is removed.
    ``what`` names the socket in messages (``"control socket"``)."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise InvalidArgument(f"{what} path {path} is longer than the {MAX_UNIX_PATH} bytes a unix socket "
                              f"path may have; use a shorter pool path" + hint)
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise InvalidArgument(f"{what} {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: its process is gone
    else:
        raise AlreadyExists(f"{what} {path} is live: the pool is already being served")
    finally:
        probe.close()


def remove_socket(path: str) -> None:
    """Remove ``path`` if it is a socket (a server's own, when it stops); never raises."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


__all__ = ["MAX_UNIX_PATH", "bind_private", "claim_unix_path", "remove_socket"]
