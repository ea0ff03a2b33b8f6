"""NBD (Network Block Device) server for thinpool volumes.

* :mod:`thinpool.nbd.protocol` -- constants and pure encode/decode functions.
* :mod:`thinpool.nbd.backend` -- the :class:`Export`/:class:`ExportProvider` interface the
  server serves, plus an in-memory implementation used by tests.
* :mod:`thinpool.nbd.session` -- one client connection: socket I/O, timeouts, the transmission loop
  and its fast path for plain READ/WRITE;
* :mod:`thinpool.nbd.handshake` -- option haggling (a mixin of the session);
* :mod:`thinpool.nbd.requests` -- checked requests and their replies (a mixin of the session).
* :mod:`thinpool.nbd.server` -- :class:`NBDServer`: listening sockets, threads, shutdown.
* :mod:`thinpool.nbd.limits` -- the payload budget shared by all connections.
* :mod:`thinpool.nbd.pool_backend` -- exports over a live pool (:class:`PoolProvider`).
* :mod:`thinpool.nbd.served` -- :class:`Served`: a pool served over NBD with its control socket.
"""

from __future__ import annotations

from thinpool.nbd.backend import Export, ExportProvider, MemoryExport, MemoryProvider, split_by_blocks
from thinpool.nbd.protocol import ProtocolError
from thinpool.nbd.server import NBDServer

__all__ = [
    "Export",
    "ExportProvider",
    "MemoryExport",
    "MemoryProvider",
    "NBDServer",
    "ProtocolError",
    "split_by_blocks",
]
