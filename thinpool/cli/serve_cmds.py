"""``thinpool serve``: serve a pool's thin volumes over NBD, and its control socket for the CLI.

The service is :class:`thinpool.nbd.served.Served`; this module parses the options, gives it the CLI's
op table (:func:`thinpool.cli.registry.op_table`, so the control socket answers every pool command) and
runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import click

from .common import IntRange, abspath, pool_argument

SECTION = "Serving (NBD block devices)"


# ============================================================================================== serve
def parse_tcp(value: str) -> tuple[str | None, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT`` -> (host or None for 127.0.0.1, port)."""
    from thinpool.errors import InvalidArgument
    if len(value) > 300:  # a host name has at most 253 characters
        raise InvalidArgument(f"--tcp {value[:40]!r}...: {len(value)} characters is not [HOST:]PORT")
    text = value.strip()
    host: str | None = None
    port_text = text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise InvalidArgument(f"--tcp {value!r}: expected [IPv6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise InvalidArgument(f"--tcp {value!r}: put IPv6 addresses in brackets, e.g. [::1]:10809")
        host = host or None
    if not (port_text.isascii() and port_text.isdigit()):  # int() also took '٣٣٣٣' (port 3333) and '1_0'
        raise InvalidArgument(f"--tcp {value!r}: {port_text!r} is not a port number")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"--tcp {value!r}: port {port} is out of range")
    return host, port


@click.command("serve")
@pool_argument
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None,
              help="Unix socket to listen on (default: <POOL>/nbd.sock).")
@click.option("--tcp", "tcp", metavar="[HOST:]PORT", default=None,
              help="Also listen on TCP (HOST defaults to 127.0.0.1; give 0.0.0.0 or [::] explicitly "
                   "to listen on every address).  WARNING: no authentication and no encryption: every "
                   "local user (and anyone who can reach the port) gets full read-write access to every "
                   "volume served on it, unlike the unix sockets (mode 0600, owner only).  Limit it with "
                   "--tcp-allow-export.")
@click.option("--tcp-allow-export", "tcp_allow", metavar="NAME", multiple=True,
              help="Serve only this volume on TCP (repeatable; the unix socket still serves all). "
                   "Other exports are neither listed nor opened over TCP.")
@click.option("--read-only", is_flag=True, help="Serve every export read-only (the CLI can still snapshot).")
@click.option("--handshake-timeout", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="Drop NBD connections that have not finished the handshake in this time.")
@click.option("--idle-timeout", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="Drop NBD connections that send no request for this long (0: never -- a mounted "
                   "filesystem may be idle for hours).")
@click.option("--max-clients", type=IntRange(1, 4096), default=64, show_default=True,
              help="NBD connections at once (when full, the oldest connection still in its handshake "
                   "is dropped for a new one).")
@click.option("--record", "record", metavar="FILE", default=None,
              help="Write every NBD request of every export to FILE as a fio iolog (version 3: one file "
                   "name per export, times in microseconds), for `thinpool replay` or `fio --read_iolog`. "
                   "Buffered (8,192 requests): written out when full, on every FLUSH/FUA and when serving "
                   "stops.")
@click.option("--commit-period", type=float, default=1.0, show_default=True, metavar="SECONDS",
              help="Commit the pool this often when anything changed, as dm-thin commits every second: "
                   "a client's writes are durable within about this long even without a FLUSH (0: only "
                   "FLUSH/FUA, pool commands and stopping commit).")
@click.option("-v", "--verbose", count=True, help="Log connections (-v) and requests (-vv) on stderr.")
def serve_cmd(pool: str, socket_path: str | None, tcp: str | None, tcp_allow: tuple[str, ...], read_only: bool,
              handshake_timeout: float, idle_timeout: float, max_clients: int, record: str | None,
              commit_period: float, verbose: int) -> None:
    """Serve the pool's thin volumes as NBD block devices until SIGTERM/SIGINT.

    Every volume is an export named after it (volumes created while serving appear as new exports).
    FLUSH and FUA commit the pool, as dm-thin commits on flush, and so does a commit every second
    when anything changed (dm-thin's COMMIT_PERIOD; --commit-period); TRIM and zeroing unmap whole blocks;
    BLOCK_STATUS reports unmapped blocks as holes.  While served, the other pool commands (snapshot,
    create-thin, delete, ls, status, commit, the snapshotter verbs...) are sent to this process over
    <POOL>/control.sock; deleting a volume a client has open is refused.  SIGTERM/SIGINT commit, close
    the pool and remove the sockets.

    Access: the unix sockets (nbd.sock, control.sock) are mode 0600, for the pool's owner only.
    --tcp has no authentication: anyone who can connect to the port -- every local user, for
    127.0.0.1 -- reads and writes every volume served on it; restrict it with --tcp-allow-export.

    \b
    Examples:
      thinpool serve /tmp/pool &
      nbdinfo --list 'nbd+unix:///?socket=/tmp/pool/nbd.sock'
      nbdcopy disk.img 'nbd+unix:///base?socket=/tmp/pool/nbd.sock'
      qemu-io -f raw -c 'read 0 64k' 'nbd+unix:///base?socket=/tmp/pool/nbd.sock'
      thinpool snapshot /tmp/pool base snap1      # through the control socket
      thinpool serve /tmp/pool --tcp 10809 --tcp-allow-export base   # nbd://127.0.0.1:10809/base
      thinpool serve /tmp/pool --record run.iolog   # then: thinpool replay run.iolog ...
    """
    from thinpool.errors import InvalidArgument
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="thinpool serve: %(message)s")
    tcp_addr = parse_tcp(tcp) if tcp is not None else None
    if tcp_allow and tcp is None:
        raise InvalidArgument("--tcp-allow-export needs --tcp")
    for what, value in (("--handshake-timeout", handshake_timeout), ("--idle-timeout", idle_timeout)):
        if not value >= 0:
            raise InvalidArgument(f"{what} must be a number of seconds >= 0, got {value}")
    if tcp is not None:
        scope = (f"only the export(s) {', '.join(tcp_allow)}" if tcp_allow else "EVERY volume of the pool")
        click.echo(f"thinpool serve: WARNING: --tcp {tcp} has no authentication and no encryption: every local "
                   f"user and anyone who can reach the port can read and write {scope}", err=True)
    nbd_options = {"handshake_timeout": handshake_timeout or None, "idle_timeout": idle_timeout or None,
                   "max_clients": max_clients, "tcp_exports": list(tcp_allow) if tcp_allow else None}
    from thinpool.nbd.served import Served

    from .registry import op_table
    served = Served(abspath(pool), op_table(), socket_path=abspath(socket_path) if socket_path else None,
                    tcp=tcp_addr, read_only=read_only, nbd_options=nbd_options,
                    record=abspath(record) if record is not None and record != "-" else record,
                    commit_period=commit_period)

    def on_signal(signum: int, frame: Any) -> None:
        served.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        uris = served.uris()
        out = [f"thinpool serve: pool {served.pool_path}: {len(uris)} volume(s)"
               f"{', read-only' if read_only else ''}",
               f"  nbd socket:     {served.nbd.unix_path}"]
        if served.nbd.tcp_address is not None:
            out.append(f"  tcp:            {served.nbd.tcp_address[0]}:{served.nbd.tcp_address[1]}")
        assert served.control is not None, "served with the op table: it has a control socket"
        out.append(f"  control socket: {served.control.path}")
        if served.recorder is not None:
            out.append(f"  recording to:   {served.recorder.path} (fio iolog v3)")
        out.append(f"  list exports:   nbdinfo --list '{served.nbd.uri}'")
        for name, uri in uris:
            tcp_uri = served.tcp_uri(name)  # None: not on TCP (no --tcp, or not a --tcp-allow-export)
            out.append(f"  {name}: {uri}" + (f"  {tcp_uri}" if tcp_uri else ""))
        out.append("serving (SIGTERM or Ctrl-C to stop)")
        click.echo("\n".join(out))
        sys.stdout.flush()
        served.serve_forever()
    finally:
        try:
            served.stop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    if served.provider.close_error is not None:
        from thinpool.errors import ThinpoolError
        exc = served.provider.close_error
        raise exc if isinstance(exc, ThinpoolError) else ThinpoolError(f"closing the pool failed: {exc}")
    if served.recorder is not None:
        if served.recorder.error is not None:
            from thinpool.errors import HostIOError
            err = served.recorder.error
            raise HostIOError(f"--record {served.recorder.path}: writing the I/O log failed "
                              f"({err.strerror or err}); it holds {served.recorder.records} request(s) at most",
                              err.errno or 5, served.recorder.path)
        click.echo(f"thinpool serve: recorded {served.recorder.records} request(s) to {served.recorder.path}")
    click.echo(f"thinpool serve: stopped; pool committed and closed (time {served.pool.time})")


COMMANDS: list[click.Command] = [serve_cmd]
