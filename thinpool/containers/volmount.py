"""An open pool's volumes as mounted filesystems, from inside one process (root only).

:class:`PoolMounts` serves an **already open** :class:`~thinpool.pool.Pool` over NBD from a background
thread (a private unix socket in a temporary directory; the pool stays open when it stops) and attaches
volumes as block devices the way :mod:`thinpool.containers.realfs` does (``nbdfuse`` + a loop device,
:class:`~thinpool.containers.realfs.Attached`).  Every FLUSH the filesystem sends commits the pool, as
dm-thin commits on FLUSH.  ``record=FILE`` logs every NBD request as a fio iolog v3, exactly as
``thinpool serve --record`` does (:mod:`thinpool.nbd.record`).

Unlike ``thinpool serve``, a write that finds the pool out of data space is failed at once (after one
poll of the no-space wait) instead of waiting up to ``no_space_timeout``, and every request the pool
fails is noted in :attr:`PoolMounts.errors`: a filesystem that lost writes must never be committed as an
image layer, and a page-cache write that succeeded tells nothing about the block device below it.

The image store (:mod:`thinpool.containers.image_store`) and the container runtime
(:mod:`thinpool.containers.runtime`) use it so that a CLI op, which is given an open pool, can mount.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from ..errors import FailedPrecondition
from .realfs import Attached, problems

if TYPE_CHECKING:
    from ..nbd.backend import Payload
    from ..nbd.server import NBDServer


def _give_up() -> bool:
    return True


class _WatchedExport:
    """An export whose failed requests are noted, and whose writes never wait for data space."""

    def __init__(self, inner: Any, errors: list[str]) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_errors", errors)
        inner.cancel_check = _give_up

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr != "cancel_check":          # the session's "client gone" check: we never wait anyway
            setattr(self._inner, attr, value)

    def _run(self, what: str, fn: Any, *args: Any) -> Any:
        from ..errors import NoSpace, WaitCancelled
        try:
            return fn(*args)
        except WaitCancelled:       # the no-space wait we gave up at once: the client gets ENOSPC
            exc = NoSpace(f"pool {self._inner.pool.path}: no free data space for volume {self._inner.name!r} "
                          f"(not waited for)")
            self._note(what, exc)
            raise exc from None
        except Exception as e:
            self._note(what, e)
            raise

    def _note(self, what: str, exc: BaseException) -> None:
        if len(self._errors) < 100:
            self._errors.append(f"{what} on {self._inner.name}: {exc}")

    def pread(self, offset: int, length: int) -> bytes:
        return self._run(f"read {length} bytes at {offset}", self._inner.pread, offset, length)

    def pwrite(self, offset: int, data: Payload) -> None:
        self._run(f"write of {len(data)} bytes at {offset}", self._inner.pwrite, offset, data)

    def flush(self) -> None:
        self._run("flush", self._inner.flush)

    def trim(self, offset: int, length: int) -> None:
        self._run(f"trim of {length} bytes at {offset}", self._inner.trim, offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        self._run(f"write-zeroes of {length} bytes at {offset}", self._inner.write_zeroes, offset, length,
                  may_trim)


def _watched_provider(pool: Any, errors: list[str]) -> Any:
    from ..nbd.pool_backend import PoolProvider

    class WatchedProvider(PoolProvider):
        def open_export(self, name: str, read_only: bool) -> Any:
            return _WatchedExport(super().open_export(name, read_only), errors)

    return WatchedProvider(pool, close_pool=False)


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

    server: NBDServer | None = None  # (None until serving, and after close)

    def __init__(self, pool: Any, *, record: str | None = None) -> None:
        from ..nbd.server import NBDServer

        self.pool = pool
        self.attached: list[Attached] = []
        self.recorder: Any = None
        #: the requests the pool failed (at most 100), e.g. writes that found no data space
        self.errors: list[str] = []
        self.workdir = tempfile.mkdtemp(prefix="tp-mnt-")   # short: unix socket, FUSE dirs, mount points
        self.socket = os.path.join(self.workdir, "nbd.sock")
        try:
            provider: Any = _watched_provider(pool, self.errors)
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

    def check(self, what: str) -> None:
        """FailedPrecondition naming ``what`` if the pool failed any request so far (the first ones
        quoted); a filesystem that lost writes is not to be trusted."""
        if self.errors:
            first = "; ".join(self.errors[:2])
            with self.pool.locked():
                st = self.pool.status()
            raise FailedPrecondition(f"{what}: the pool failed {len(self.errors)} block request(s) (pool "
                                     f"{self.pool.path}: {st.used_data_blocks} of {st.total_data_blocks} data "
                                     f"blocks used, mode {self.pool.mode.value}; first: {first})")

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
        if self.server is not None:
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
