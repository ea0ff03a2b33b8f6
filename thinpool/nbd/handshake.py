"""NBD option haggling (the fixed newstyle handshake) of a :class:`~thinpool.nbd.session.Session`.

:class:`Handshake` is the part of a session that runs before the transmission phase: the greeting, the
client flags, and the options (EXPORT_NAME, ABORT, LIST, INFO/GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT).
It is a mixin: the session provides the socket I/O (``_send``, ``_recv``, ``_gone``) and the state it sets
(``structured``, ``contexts_export``, ``export``, ...).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from thinpool.errors import NotFound, ThinpoolError
from thinpool.nbd import protocol as P
from thinpool.nbd.backend import Export
from thinpool.nbd.protocol import Disconnect

if TYPE_CHECKING:
    from thinpool.nbd.session import SessionContext

log = logging.getLogger("thinpool.nbd")

#: context id we hand out for ``base:allocation``
BASE_ALLOCATION_ID = 1


class Handshake:
    """Option haggling; mixed into :class:`~thinpool.nbd.session.Session`."""

    ctx: SessionContext
    peer: str
    allowed: frozenset[str] | None
    client_flags: int
    structured: bool
    contexts_export: str | None
    export: Export | None
    export_read_only: bool
    in_handshake: bool
    _send: Callable[..., None]
    _recv: Callable[..., bytes]
    _gone: Callable[[], bool]

    def _reply(self, option: int, reply_type: int, payload: bytes = b"") -> None:
        self._send(P.encode_option_reply(option, reply_type, payload))

    def _error(self, option: int, reply_type: int, message: str) -> None:
        log.debug("nbd %s: option %d -> error %#x: %s", self.peer, option, reply_type, message)
        self._reply(option, reply_type, message.encode("utf-8", "replace")[: P.MAX_STRING])

    def _handshake(self) -> bool:
        """Run option haggling; True when the transmission phase starts."""
        self._send(P.encode_greeting(self.ctx.handshake_flags))
        self.client_flags = P.decode_client_flags(self._recv(P.CLIENT_FLAGS_SIZE), self.ctx.handshake_flags)
        handlers: dict[int, Callable[[int, bytes], bool]] = {
            P.OPT_ABORT: self._opt_abort,
            P.OPT_LIST: self._opt_list,
            P.OPT_INFO: self._opt_info_go,
            P.OPT_GO: self._opt_info_go,
            P.OPT_STRUCTURED_REPLY: self._opt_structured_reply,
            P.OPT_LIST_META_CONTEXT: self._opt_meta_context,
            P.OPT_SET_META_CONTEXT: self._opt_meta_context,
        }
        while True:
            header = P.decode_option_header(self._recv(P.OPTION_HEADER_SIZE, idle=True))
            if header.length > P.MAX_OPTION_DATA:
                raise Disconnect(f"option {header.option} carries {header.length} bytes (denial of service?)")
            data = self._recv(header.length) if header.length else b""
            if header.option == P.OPT_EXPORT_NAME:
                return self._opt_export_name(data)
            handler = handlers.get(header.option)
            if handler is None:
                self._error(header.option, P.REP_ERR_UNSUP, f"option {header.option} is not supported")
                continue
            if handler(header.option, data):
                return True

    def _open(self, name: str) -> Export:
        with self.ctx.provider.lock:
            export = self.ctx.provider.open_export(name, self.ctx.read_only)
        if self.allowed is not None and getattr(export, "name", name) not in self.allowed:
            self._release(export)
            raise NotFound(f"export {name!r} is not available on this listener")
        return export

    def _release(self, export: Export | None) -> None:
        """Call the export's optional ``close()`` hook (errors are logged, not raised)."""
        close = getattr(export, "close", None)
        if not callable(close):
            return
        try:
            with self.ctx.provider.lock:
                close()
        except Exception:
            log.exception("nbd %s: closing export %r failed", self.peer, getattr(export, "name", "?"))

    def _transmission_flags(self, export: Export) -> int:
        flags = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_CAN_MULTI_CONN
        if self.ctx.read_only or export.read_only:
            flags |= P.FLAG_READ_ONLY
        else:
            flags |= P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO
            if getattr(export, "can_trim", True):  # not with dm-thin's ignore_discard
                flags |= P.FLAG_SEND_TRIM
        if self.structured:
            flags |= P.FLAG_SEND_DF
        return flags

    def _enter(self, export: Export, name: str) -> None:
        self.export = export
        try:  # a write the export holds (a pool queueing for data space) is given up when we are gone
            setattr(export, "cancel_check", self._gone)  # (an optional attribute: see Export)
        except AttributeError:
            pass
        self.in_handshake = False
        self.export_read_only = self.ctx.read_only or export.read_only
        if self.contexts_export != name:
            self.contexts_export = None  # contexts were negotiated for another export
        log.info("nbd %s: serving export %r (%d bytes%s)", self.peer, export.name, export.size,
                 ", read-only" if self.export_read_only else "")

    def _opt_export_name(self, data: bytes) -> bool:
        try:
            name = P.decode_string(data, "export name")
            export = self._open(name)
        except (P.ProtocolError, ThinpoolError) as exc:
            raise Disconnect(f"NBD_OPT_EXPORT_NAME failed: {exc}") from exc  # this option cannot error
        no_zeroes = bool(self.client_flags & P.FLAG_C_NO_ZEROES)
        flags = self._transmission_flags(export)
        self._enter(export, name)  # before the reply, as for NBD_OPT_GO
        self._send(P.encode_export_name_reply(export.size, flags, no_zeroes))
        return True

    def _opt_abort(self, option: int, data: bytes) -> bool:
        try:
            self._reply(option, P.REP_ACK)
        except OSError:
            pass  # the client may close without waiting for the ACK
        raise Disconnect("client sent NBD_OPT_ABORT")

    def _opt_list(self, option: int, data: bytes) -> bool:
        if data:
            self._error(option, P.REP_ERR_INVALID, "NBD_OPT_LIST carries no data")
            return False
        with self.ctx.provider.lock:
            names = self.ctx.provider.list_exports()
        if self.allowed is not None:
            names = [n for n in names if n in self.allowed]
        for name in names:
            self._reply(option, P.REP_SERVER, P.encode_rep_server(name))
        self._reply(option, P.REP_ACK)
        return False

    def _opt_structured_reply(self, option: int, data: bytes) -> bool:
        if data:
            self._error(option, P.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY carries no data")
            return False
        self.structured = True
        self._reply(option, P.REP_ACK)
        return False

    def _opt_info_go(self, option: int, data: bytes) -> bool:
        try:
            name, requests = P.decode_go_request(data)
        except P.ProtocolError as exc:
            self._error(option, P.REP_ERR_INVALID, str(exc))
            return False
        try:
            export = self._open(name)
        except NotFound as exc:
            self._error(option, P.REP_ERR_UNKNOWN, str(exc))
            return False
        except Exception as exc:
            log.warning("nbd %s: opening export %r failed: %s", self.peer, name, exc)
            self._error(option, P.REP_ERR_UNKNOWN, f"export {name!r} is not available: {exc}")
            return False
        self._reply(option, P.REP_INFO, P.encode_info_export(export.size, self._transmission_flags(export)))
        if P.INFO_NAME in requests:
            self._reply(option, P.REP_INFO, P.encode_info_name(export.name))
        description = getattr(export, "description", "")
        if P.INFO_DESCRIPTION in requests and description:
            self._reply(option, P.REP_INFO, P.encode_info_description(description))
        self._reply(option, P.REP_INFO, P.encode_info_block_size(1, preferred_block_size(export), P.MAX_PAYLOAD))
        if option == P.OPT_GO:
            # in transmission before the client hears so: a client that has its ACK is never counted as
            # still in its handshake (the max_clients eviction rule)
            self._enter(export, name)
            self._reply(option, P.REP_ACK)
            return True
        self._reply(option, P.REP_ACK)
        self._release(export)
        return False

    def _opt_meta_context(self, option: int, data: bytes) -> bool:
        setting = option == P.OPT_SET_META_CONTEXT
        if setting:
            self.contexts_export = None  # replaced even when this request fails
        if not self.structured:
            self._error(option, P.REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return False
        try:
            name, queries = P.decode_meta_context_request(data)
        except P.ProtocolError as exc:
            self._error(option, P.REP_ERR_INVALID, str(exc))
            return False
        try:
            self._release(self._open(name))
        except Exception as exc:
            self._error(option, P.REP_ERR_UNKNOWN, str(exc))
            return False
        found = False
        if not queries and not setting:
            found = True
        for query in queries:
            namespace, sep, leaf = query.partition(":")
            if not sep:
                self._error(option, P.REP_ERR_INVALID, f"metadata context query {query!r} has no namespace")
                return False
            if namespace == "base" and (leaf == "allocation" or (leaf == "" and not setting)):
                found = True
        if found:
            ctx_id = BASE_ALLOCATION_ID if setting else 0
            self._reply(option, P.REP_META_CONTEXT, P.encode_rep_meta_context(ctx_id, P.META_CONTEXT_BASE_ALLOCATION))
            if setting:
                self.contexts_export = name
        self._reply(option, P.REP_ACK)
        return False


def preferred_block_size(export: Export) -> int:
    """The NBD preferred block size for an export: a power of two in [512, 32 MiB].

    Thin pool block sizes are multiples of 64 KiB but need not be powers of two, so
    this is the largest power of two that divides the export's block size.
    """
    bs = max(int(export.block_size), 1)
    pref = bs & -bs
    return min(max(pref, 512), P.MAX_PAYLOAD)
