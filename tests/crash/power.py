"""Power loss under the metadata store, for the crash tests: the exception that stands for it and a
write path (``MetadataStore.io``) that loses power instead of writing a superblock."""

from __future__ import annotations

import os

from thinpool import mdstore
from thinpool.mdpages import BLOCK, SUPERBLOCKS


class PowerLoss(BaseException):
    """Raised out of the store's I/O layer: the machine lost power here."""


class StopAtSuperblock(mdstore.FileIO):
    """The store's write path; when ``armed``, power is lost instead of the next superblock write
    (every write before it persists)."""

    armed = False

    @staticmethod
    def pwrite(fd: int, data, offset: int) -> int:
        if StopAtSuperblock.armed and offset < SUPERBLOCKS * BLOCK:
            raise PowerLoss()
        return os.pwrite(fd, data, offset)
