"""NBD (Network Block Device) server for thinpool volumes.

* :mod:`thinpool.nbd.protocol` -- constants and pure encode/decode functions.
* :mod:`thinpool.nbd.backend` -- the :class:`Export`/:class:`ExportProvider` interface the
  server serves, plus an in-memory implementation used by tests.
* :mod:`thinpool.nbd.session` -- one client connection (handshake and transmission).
* :mod:`thinpool.nbd.server` -- :class:`NBDServer`: listening sockets, threads, shutdown.
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
