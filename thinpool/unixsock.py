"""Unix-domain listening sockets shared by the NBD server and the control server.

* :func:`bind_private` binds a socket with mode 0600 from its creation (a socket grants whatever its
  server serves, so it is for the pool's owner only);
* :func:`listen_private` does that and listens before the path appears: the socket is bound and
  listening under a temporary name beside ``path`` and then hard-linked to ``path``, so a client that
  waits for the path to exist is never refused (``bind`` creates the file before ``listen``);
* :func:`claim_unix_path` makes a path ready to listen on: an over-long path or a live socket is
  refused, a stale socket left by a dead process is removed.
"""

from __future__ import annotations

import errno
import os
import secrets
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


def listen_private(sock: socket.socket, path: str, backlog: int) -> None:
    """Bind ``sock`` (mode 0600, as :func:`bind_private`) and listen with ``backlog`` so that ``path``
    exists only once the socket accepts connections: bound and listening under a temporary name in
    ``path``'s directory, then hard-linked to ``path`` -- which fails with EADDRINUSE, as ``bind``
    would, if ``path`` appeared meanwhile: nothing is replaced -- and the temporary name removed (a
    directory that refuses hard links gets a rename instead).  Where a temporary name would be too
    long for a unix socket it binds ``path`` itself (the file then exists a moment before the socket
    listens)."""
    head = os.path.dirname(path)
    tmp = os.path.join(head, f".tp-{secrets.token_hex(4)}.sock")
    if len(os.fsencode(tmp)) > MAX_UNIX_PATH:
        bind_private(sock, path)
        sock.listen(backlog)
        return
    bind_private(sock, tmp)
    try:
        sock.listen(backlog)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OSError(errno.EADDRINUSE, f"{path}: address already in use") from None
        except OSError:
            if os.path.lexists(path):
                raise OSError(errno.EADDRINUSE, f"{path}: address already in use") from None
            os.rename(tmp, path)
    finally:
        remove_socket(tmp)


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


__all__ = ["MAX_UNIX_PATH", "bind_private", "claim_unix_path", "listen_private", "remove_socket"]
