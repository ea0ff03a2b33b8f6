"""The one error hierarchy of thinpool: every error class thinpool raises is defined here.

Every error names the pool, volume or value at fault.  Library callers catch
:class:`ThinpoolError` (or one of its subclasses).  Over a served pool's control socket an error
crosses by class name and is rebuilt as the same class from this module, so only classes listed
in ``__all__`` survive the trip (a test checks every ThinpoolError subclass in the package is).

Exit statuses of the ``thinpool`` command (one status for every error class; the one-line message
says what failed):

* **0** -- success (``thinpool check``: no problems found);
* **1** -- any :class:`ThinpoolError` (one line ``thinpool: error: <message>`` on stderr), an
  ``OSError`` outside the hierarchy (e.g. a missing input file), ``thinpool check`` finding problems,
  Ctrl-C (click prints ``Aborted!``; ``thinpool serve`` instead shuts down cleanly and exits 0), or a
  closed stdout pipe (silent);
* **2** -- a usage error found by click before the command runs (unknown command or option,
  missing or malformed argument): click prints the usage and ``Error: ...``.
"""

from __future__ import annotations

import errno
from typing import Any


def shown(value: Any, limit: int = 80) -> str:
    """``value`` quoted for an error message (its ``repr``), cut to ``limit`` characters: a value from
    outside (a size string, a snapshot key) may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ThinpoolError(Exception):
    """Base class of every error raised by thinpool."""


class _ErrnoError(OSError):
    """An ``OSError`` whose errno its class fixes (:attr:`ERRNO`): made from the message alone and
    printed as the message (OSError would print ``[Errno N] ...``).  It pickles as it is made, so it
    crosses a process boundary -- a sweep's worker processes, a dask cluster -- as itself (OSError's
    own pickling passes ``(errno, message)`` back to a one-argument constructor: TypeError on loading)."""

    ERRNO = errno.EIO

    def __init__(self, message: str) -> None:
        OSError.__init__(self, self.ERRNO, message)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.strerror,), self.__dict__


class InvalidArgument(ThinpoolError, ValueError):
    """A value is malformed or out of range (bad size, I/O past a volume's end, bad block size...)."""


class TraceError(InvalidArgument):
    """A block I/O trace file is malformed or of an unknown format; names the file and the line number
    of the first malformed record (``path`` and ``line``, None when the file as a whole is at fault)."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


class ImageError(InvalidArgument):
    """A container image archive (OCI layout or docker-archive) is malformed, fails a digest check or breaks a
    safety rule (a member escaping the tree, an oversized document...); the message names the archive, the
    blob and, inside a layer, the member."""


class NotFound(ThinpoolError, LookupError):
    """A named volume, snapshot, device id or pool does not exist."""


class AlreadyExists(ThinpoolError):
    """A name or device id is already in use."""


class FailedPrecondition(ThinpoolError):
    """The operation is valid but the current state forbids it (containerd's FailedPrecondition)."""


class NoSpace(ThinpoolError, _ErrnoError):
    """The pool has no free data block for a write that needs one (ENOSPC)."""

    ERRNO = errno.ENOSPC


class Busy(FailedPrecondition, _ErrnoError):
    """The volume is active (EBUSY): open over NBD, held by :meth:`Pool.activate <thinpool.pool.Pool.activate>`
    or inside a ``with pool.thin(name)`` block, so it cannot be deleted -- dm-thin refuses to delete an
    open thin device (``__delete_device``: ``if (td->open_count) return -EBUSY``).  Nothing changed."""

    ERRNO = errno.EBUSY


class DiscardNotSupported(ThinpoolError, _ErrnoError):
    """A discard to a pool whose discards are turned off (dm-thin's ``ignore_discard``: the thin devices
    advertise no discard support, so the block layer fails a discard with EOPNOTSUPP)."""

    ERRNO = errno.EOPNOTSUPP


class WaitCancelled(ThinpoolError):
    """A write queued for data space (``queue_if_no_space``) was given up by its caller before space
    came (e.g. its NBD client disconnected, or the server is shutting down); nothing was written."""


class ReadOnly(ThinpoolError):
    """The pool (or a volume) is read-only, or metadata space is exhausted."""


class ReadOnlyIO(ReadOnly, _ErrnoError):
    """A write the pool cannot serve in read-only or out-of-metadata-space mode: it needs a new data
    block (unmapped, or shared with a snapshot).  EIO, as dm-thin's ``handle_unserviceable_bio`` in
    those modes; writes to provisioned, unshared blocks are still served."""

    ERRNO = errno.EIO


class PoolLocked(ThinpoolError):
    """Another process holds the pool's lock."""


class PermissionDenied(ThinpoolError, _ErrnoError, PermissionError):
    """The caller may not open a pool file (EACCES/EPERM), or the pool belongs to another user and
    ``allow_foreign`` was not given; names the file (and its owner)."""

    ERRNO = errno.EACCES


class MetadataCorrupt(ThinpoolError):
    """Metadata failed a checksum or structural check; names the structure and block at fault."""

    def __init__(self, message: str, *, structure: str | None = None, block: int | None = None) -> None:
        super().__init__(message)
        self.structure = structure
        self.block = block


class HostIOError(ThinpoolError, _ErrnoError):
    """The host filesystem refused a write, flush or hole punch of a pool file (ENOSPC, EIO, a short
    write that could not be completed), or a read of the data file failed (``Thin.read``, ``read_many``,
    ``pread``: an I/O error, or a file that ends too early because another program truncated it).
    ``errno`` is the system's error number, ``filename`` the file;
    ``blocks`` (a hole punch) the data blocks that were not punched."""

    def __init__(self, message: str, err: int = errno.EIO, path: str | None = None,
                 blocks: Any = None) -> None:
        OSError.__init__(self, err, message)
        self.filename = path
        self.blocks = blocks

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError's pickling would pass (errno, message) to this constructor's (message, err)
        return type(self), (self.strerror, self.errno, self.filename, self.blocks), self.__dict__


class MetadataSpaceExhausted(ReadOnly):
    """No free metadata block for a commit (the pool then turns read-only, as dm-thin does)."""


class DataDeviceError(ThinpoolError, _ErrnoError):
    """A write to the data file failed (e.g. the host filesystem is full); the block is not mapped.
    ``errno`` and ``filename`` are the failed write's; it prints as the message."""

    def __init__(self, message: str, err: int = errno.EIO, path: str | None = None) -> None:
        OSError.__init__(self, err, message)
        self.filename = path

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.strerror, self.errno, self.filename), self.__dict__


class DuplicateDevice(InvalidArgument, AlreadyExists):
    """A device id appears twice in a thin_dump XML document (both a bad argument and an existing id)."""


class ProtocolError(ThinpoolError):
    """An NBD peer sent bytes that violate the NBD protocol (bad magic, truncated or malformed message)."""


class FullOpenRequired(ThinpoolError):
    """Internal signal, not a user-facing failure: the light device-table open
    (:meth:`thinpool.devtable.DeviceTable.open`) cannot serve this pool because its metadata lacks a
    field the table needs (written by an older thinpool, before its next commit).  The CLI catches it
    and opens the pool as a full :class:`~thinpool.pool.Pool` instead; a library caller does the same.
    It is a ThinpoolError so that, should it ever escape, it prints as one line and exits 1."""


class ThinpoolWarning(UserWarning):
    """Something went wrong that did not lose data or fail the operation (e.g. a freed block's hole punch
    failed: the block stays unallocatable until a later punch succeeds)."""


__all__ = [
    "ThinpoolError",
    "InvalidArgument",
    "TraceError",
    "ImageError",
    "NotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "Busy",
    "NoSpace",
    "DiscardNotSupported",
    "WaitCancelled",
    "ReadOnly",
    "ReadOnlyIO",
    "PoolLocked",
    "PermissionDenied",
    "MetadataCorrupt",
    "HostIOError",
    "MetadataSpaceExhausted",
    "DataDeviceError",
    "DuplicateDevice",
    "ProtocolError",
    "FullOpenRequired",
    "ThinpoolWarning",
]
