"""NBD requests of the transmission phase that leave the fast path, and their replies.

:class:`RequestHandling` is the part of a :class:`~thinpool.nbd.session.Session` that checks a request
(flags, range, read-only, negotiated contexts), runs it on the export under the provider's lock (READ,
WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, with FUA) and sends the reply: simple or structured
(data and hole chunks, block-status descriptors, error chunks).  The session's transmission loop serves
plain in-range READs and WRITEs itself (the fast path) and hands everything else here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from thinpool.errors import DiscardNotSupported, InvalidArgument, NoSpace, ReadOnly, ThinpoolError, WaitCancelled
from thinpool.nbd import protocol as P
from thinpool.nbd.backend import Export, Payload
from thinpool.nbd.handshake import BASE_ALLOCATION_ID

if TYPE_CHECKING:
    from thinpool.nbd.session import SessionContext

log = logging.getLogger("thinpool.nbd")

#: most descriptors sent in one BLOCK_STATUS reply (the spec lets a server send fewer)
MAX_EXTENTS = 2048
#: holes shorter than this are sent inline as data in structured READ replies
MIN_HOLE_CHUNK = 4096

# command -> command flags it may carry (DF only once structured replies are on)
_ALLOWED_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_FLUSH: P.CMD_FLAG_FUA,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
}
WRITES = (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES)


def nbd_error_for(exc: BaseException) -> int:
    """Translate a backend exception into an NBD error value."""
    if isinstance(exc, NoSpace):
        return P.ENOSPC
    if isinstance(exc, WaitCancelled):
        return P.ESHUTDOWN
    if isinstance(exc, DiscardNotSupported):
        return P.ENOTSUP
    if isinstance(exc, InvalidArgument):
        return P.EINVAL
    if isinstance(exc, ReadOnly) and not isinstance(exc, OSError):
        return P.EPERM  # a read-only export or volume; ReadOnlyIO (a pool mode) is EIO, as dm-thin
    if isinstance(exc, ThinpoolError):
        return P.EIO
    if isinstance(exc, OSError) and exc.errno:
        return P.errno_to_nbd(exc.errno)
    return P.EIO


class RequestHandling:
    """Checked requests and their replies; mixed into :class:`~thinpool.nbd.session.Session`."""

    ctx: SessionContext
    peer: str
    structured: bool
    contexts_export: str | None
    export: Export | None
    export_read_only: bool
    _send: Callable[..., None]

    def _check(self, req: P.Request) -> tuple[int, str] | None:
        """Validate a request before touching the backend; (error, message) if it must fail."""
        assert self.export is not None
        allowed = _ALLOWED_FLAGS.get(req.type)
        if allowed is None:
            return P.EINVAL, f"unknown command {req.type}"
        if not self.structured:
            allowed &= ~P.CMD_FLAG_DF
        if req.flags & ~allowed:
            return P.EINVAL, f"{req.name}: unsupported command flags {req.flags & ~allowed:#x}"
        if req.type in WRITES and self.export_read_only:
            return P.EPERM, f"{req.name}: export {self.export.name!r} is read-only"
        if req.type == P.CMD_FLUSH:
            return None
        if not getattr(self.export, "can_trim", True):
            # discards are off (dm-thin's ignore_discard): TRIM was not advertised, so the client must
            # not send it; answered with EINVAL, as for a command the server does not support
            if req.type == P.CMD_TRIM:
                return P.EINVAL, f"TRIM: export {self.export.name!r} does not support discards (not advertised)"
            if req.type == P.CMD_WRITE_ZEROES and req.flags & P.CMD_FLAG_FAST_ZERO:
                return P.ENOTSUP, "fast zero: the export cannot unmap (discards are off), zeroes would be written"
        if req.offset + req.length > self.export.size:
            err = P.ENOSPC if req.type in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            return err, (f"{req.name}: offset {req.offset} + length {req.length} "
                         f"is beyond the export's {self.export.size} bytes")
        if req.type == P.CMD_READ and req.length > P.MAX_PAYLOAD:
            return P.EINVAL, f"READ of {req.length} bytes exceeds the {P.MAX_PAYLOAD}-byte maximum"
        if req.type == P.CMD_BLOCK_STATUS:
            if not self.structured or self.contexts_export is None:
                return P.EINVAL, "BLOCK_STATUS needs a negotiated metadata context"
            if req.length == 0:
                return P.EINVAL, "BLOCK_STATUS of length 0"
        if (req.type == P.CMD_WRITE_ZEROES and req.flags & P.CMD_FLAG_FAST_ZERO
                and req.flags & P.CMD_FLAG_NO_HOLE):
            return P.ENOTSUP, "fast zero with NO_HOLE is no faster than a write"
        return None

    def _serve(self, req: P.Request, payload: Payload) -> None:
        problem = self._check(req)
        if problem is not None:
            self._reply_error(req, *problem)
            return
        export = self.export
        assert export is not None
        fua = bool(req.flags & P.CMD_FLAG_FUA) and req.type in WRITES
        data = b""
        extents: list[tuple[int, int]] | None = None
        status: list[tuple[int, int]] = []
        try:
            with self.ctx.provider.lock:
                if req.type == P.CMD_READ:
                    data = export.pread(req.offset, req.length) if req.length else b""
                    extents = self._read_extents(export, req)
                elif req.type == P.CMD_WRITE:
                    if payload:
                        export.pwrite(req.offset, payload)
                elif req.type == P.CMD_FLUSH:
                    export.flush()
                elif req.type == P.CMD_TRIM:
                    if req.length:
                        export.trim(req.offset, req.length)
                elif req.type == P.CMD_WRITE_ZEROES:
                    if req.length:
                        export.write_zeroes(req.offset, req.length, may_trim=not req.flags & P.CMD_FLAG_NO_HOLE)
                elif req.type == P.CMD_BLOCK_STATUS:
                    status = list(export.extents(req.offset, req.length))
                if fua:
                    export.flush()
        except Exception as exc:
            self._failed(req, exc)
            return
        if req.type == P.CMD_READ:
            self._reply_read(req, data, extents)
        elif req.type == P.CMD_BLOCK_STATUS:
            descriptors = clip_extents(status, req.length, bool(req.flags & P.CMD_FLAG_REQ_ONE))
            self._send(P.encode_block_status(req.handle, BASE_ALLOCATION_ID, descriptors))
        else:
            self._send(P.encode_simple_reply(req.handle))

    def _failed(self, req: P.Request, exc: Exception) -> None:
        """Log a backend failure and send the error reply (called from inside an ``except``).  A write
        given up while it waited for data space because the client hung up is dropped: no reply, the
        session ends (:class:`Disconnect`); when the server is stopping it gets ESHUTDOWN."""
        if isinstance(exc, WaitCancelled) and not self.ctx.stopping.is_set():
            raise P.Disconnect(f"{req.name} offset={req.offset} length={req.length} dropped: the client hung up "
                             f"while it waited for data space")
        err = nbd_error_for(exc)
        if err == P.EIO:
            log.exception("nbd %s: %s offset=%d length=%d failed", self.peer, req.name, req.offset, req.length)
        else:
            log.warning("nbd %s: %s offset=%d length=%d failed: %s", self.peer, req.name,
                        req.offset, req.length, exc)
        self._reply_error(req, err, str(exc) or type(exc).__name__)

    def _read_extents(self, export: Export, req: P.Request) -> list[tuple[int, int]] | None:
        """Zero/data runs for a structured READ, or None to send one plain data chunk."""
        if not self.structured or req.flags & P.CMD_FLAG_DF or req.length < MIN_HOLE_CHUNK:
            return None
        try:
            runs = P.coalesce_extents(
                (n, P.STATE_ZERO if f & P.STATE_ZERO else 0) for n, f in export.extents(req.offset, req.length)
            )
        except Exception as exc:  # an allocation query failure must not fail the read
            log.debug("nbd %s: extents for READ failed, sending plain data: %s", self.peer, exc)
            return None
        if sum(n for n, _ in runs) != req.length:
            return None
        return runs

    def _reply_read(self, req: P.Request, data: bytes, runs: list[tuple[int, int]] | None) -> None:
        if not self.structured:
            self._send(P.encode_simple_reply(req.handle), data)
            return
        if not data:
            self._send(P.encode_done(req.handle))
            return
        if runs is None:
            runs = [(len(data), 0)]
        # fold holes too short to be worth a chunk into their data neighbours
        runs = P.coalesce_extents((n, f if n >= MIN_HOLE_CHUNK else 0) for n, f in runs)
        pos = 0
        for i, (length, flags) in enumerate(runs):
            last = i == len(runs) - 1
            offset = req.offset + pos
            if flags & P.STATE_ZERO:
                self._send(P.encode_offset_hole(req.handle, offset, length, done=last))
            else:
                chunk = data[pos : pos + length]
                self._send(P.encode_offset_data_header(req.handle, offset, length, done=last), chunk)
            pos += length

    def _reply_error(self, req: P.Request, error: int, message: str) -> None:
        log.debug("nbd %s: %s -> error %d: %s", self.peer, req.name, error, message)
        if self.structured:
            self._send(P.encode_error_chunk(req.handle, error, message))
        else:
            self._send(P.encode_simple_reply(req.handle, error))


def clip_extents(extents: list[tuple[int, int]], length: int, req_one: bool) -> list[tuple[int, int]]:
    """Sanitise a backend's extents for a BLOCK_STATUS reply.

    Merges equal neighbours, drops empty runs, stops at ``length`` bytes, caps the
    descriptor count, and falls back to one "allocated, unknown content" extent if
    the backend gave nothing usable.
    """
    out: list[tuple[int, int]] = []
    total = 0
    for n, flags in P.coalesce_extents(extents):
        n = min(n, length - total)
        if n <= 0:
            break
        out.append((n, flags & (P.STATE_HOLE | P.STATE_ZERO)))
        total += n
        if req_one or len(out) >= MAX_EXTENTS:
            break
    return out or [(length, 0)]
