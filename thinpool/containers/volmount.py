"""An open pool's volumes as mounted filesystems, from inside one process (root only).

:class:`PoolMounts` serves an **already open** :class:`~thinpool.pool.Pool` over NBD from a background
thread (a private unix socket in a temporary directory; the pool stays open when it stops) and attaches
volumes as block devices the way :mod:`thinpool.containers.realfs` does (``nbdfuse`` + a loop device,
:class:`~thinpool.containers.realfs.Attached`).  Every FLUSH the filesystem sends commits the pool, as
dm-thin commits on FLUSH.  ``record=FILE`` logs every NBD request as a fio iolog v3, exactly as
``thinpool serve --record`` does (:mod:`thinpool.nbd.record`).

The image store (:mod:`thinpool.containers.image_store`) and the container runtime
(:mod:`thinpool.containers.runtime`) use it so that a CLI op, which is given an open pool, can mount.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from ..errors import FailedPrecondition
from .realfs import Attached, problems


def require_mounts(what: str) -> None:
    """FailedPrecondition in one line when mounting cannot work here (not root, no /dev/fuse, tools)."""
    missing = problems()
    if missing:
        raise FailedPrecondition(f"{what} mounts thin volumes and needs " + " and ".join(missing))


class PoolMounts:
    """Serve open pool ``pool`` over NBD (a background thread) and attach/mount its volumes.

    A context manager; :meth:`close` unmounts and detaches everything still attached, stops the server
    (the pool stays open; a final :meth:`~thinpool.pool.Pool.commit` is left to the caller) and removes
    the temporary directory.  ``record``: a file for a fio iolog v3 of every request."""

    def __init__(self, pool: Any, *, record: str | None = None) -> None:
        from ..nbd.pool_backend import PoolProvider
        from ..nbd.server import NBDServer

        self.pool = pool
        self.attached: list[Attached] = []
        self.recorder: Any = None
        self.workdir = tempfile.mkdtemp(prefix="tp-mnt-")   # short: unix socket, FUSE dirs, mount points
        self.socket = os.path.join(self.workdir, "nbd.sock")
        try:
            provider: Any = PoolProvider(pool, close_pool=False)
            if record is not None:
                from ..nbd.record import IologRecorder, RecordingProvider
                self.recorder = IologRecorder(record, pools=[pool])
                provider = RecordingProvider(provider, self.recorder)
            self.server = NBDServer(provider, unix_path=self.socket)
            self.server.start()
        except BaseException:
            if self.recorder is not None:
                self.recorder.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def uri(self, volume: str) -> str:
        """The NBD URI of ``volume`` on the private socket."""
        from urllib.parse import quote
        return f"nbd+unix:///{quote(volume, safe='/')}?socket={quote(self.socket, safe='/')}"

    def attach(self, volume: str, *, read_only: bool = False) -> Attached:
        """``volume`` as a block device (``.device``), detached by :meth:`detach` or :meth:`close`."""
        tag = "".join(c if c.isalnum() else "_" for c in volume)[-16:]
        a = Attached(self.uri(volume), self.workdir, tag, read_only=read_only)
        self.attached.append(a)
        return a

    def mount(self, volume: str, *, read_only: bool = False) -> Attached:
        """Attach ``volume`` and mount its filesystem on a fresh directory (``.mountpoint``)."""
        a = self.attach(volume, read_only=read_only)
        try:
            a.mount(tempfile.mkdtemp(prefix="m-", dir=self.workdir), "ro" if read_only else "")
        except BaseException:
            self.detach(a)
            raise
        return a

    def detach(self, a: Attached) -> None:
        """Unmount (the filesystem's final FLUSH commits the pool) and detach ``a``."""
        mnt = a.mountpoint
        try:
            a.umount()
        finally:
            a.close()
            if a in self.attached:
                self.attached.remove(a)
            if mnt is not None:
                try:
                    os.rmdir(mnt)
                except OSError:
                    pass

    def close(self) -> None:
        """Detach everything (lazily if it must), stop serving, remove the work directory (idempotent)."""
        for a in reversed(list(self.attached)):
            a.close()
        self.attached.clear()
        if getattr(self, "server", None) is not None:
            self.server.shutdown()      # closes the (recording) provider; the pool stays open
            self.server = None
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "PoolMounts":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["PoolMounts", "require_mounts"]
