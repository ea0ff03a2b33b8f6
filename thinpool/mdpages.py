"""The metadata file's primitives: 4 KiB pages, their CRC-32C, the superblock's layout constants and
the two ways the pool hands an array's changed pages to the store (:class:`PagedArray`,
:class:`PageUpdates`).

What the pages mean and how a commit writes them is :mod:`thinpool.mdstore`'s; which blocks are free
is :mod:`thinpool.mdspace`'s.  Like them this module is plain Python (no numpy): the light commands
(:mod:`thinpool.devtable`) import it.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from typing import Any, Iterable, Mapping


def _crc32c_function() -> Any:
    """The ``crc32c`` package's C function (hardware CRC-32C).

    ``import crc32c`` runs the package's ``__init__``, which imports ``importlib.metadata`` (and with it
    email, zipfile, argparse...) only to set ``__version__``: about 25 ms, a sixth of what a whole
    ``thinpool status`` costs.  So the extension module is loaded by itself when it is where that
    package keeps it; anything unexpected falls back to the plain import."""
    import importlib.machinery
    import importlib.util
    try:
        spec = importlib.util.find_spec("crc32c")  # locates the package without running it
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(folder, "_crc32c" + suffix)
                if os.path.isfile(path):
                    ext = importlib.util.spec_from_file_location("crc32c._crc32c", path)
                    if ext is None or ext.loader is None:
                        continue
                    module = importlib.util.module_from_spec(ext)
                    ext.loader.exec_module(module)
                    return module.crc32c
    except (ImportError, OSError, AttributeError):
        pass
    import crc32c
    return crc32c.crc32c


_crc32c = _crc32c_function()

BLOCK = 4096
MAGIC = b"TPOOLMD1"
#: the superblock's format version: 2 since the data space map is stored as a two-bit bitmap plus
#: overflow counts (:mod:`thinpool.dataspace`), 3 since the leaves are stored in groups without their
#: holes, 4 since sparse leaves are records packed across pages, 5 since inner nodes are too
#: (:mod:`thinpool.nodestore`), 6 since a superblock may list the pages its commit wrote
#: (:data:`COMMIT_PAGES`: such a superblock is used only if every one of them verifies); the store's
#: own layout is otherwise the same in 1 to 6, so all are read (the pool tells the layouts apart by
#: their arrays' names).  A reader of 5 or older refuses a version 6 superblock: it would not check
#: the listed pages.
FORMAT_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
#: the superblock field listing every page a *one-flush commit* wrote (``block << 32 | CRC-32C``):
#: such a commit writes its pages and its superblock and then flushes once, so after a crash the
#: superblock may be durable while a page it reaches is not; the listed pages tell (see
#: :meth:`thinpool.mdstore.MetadataStore.load`)
COMMIT_PAGES = "commit_pages"
def commit_pages_valid(listed: Any) -> bool:
    """Whether a superblock's :data:`COMMIT_PAGES` value has its form: a list of 64-bit locations."""
    return isinstance(listed, list) and all(type(x) is int and 0 <= x < 1 << 64 for x in listed)


#: superblock fields that belong to the store, not to the pool's header
STORE_KEYS = ("directory", "directory_bytes", "pages", "held", "recovered_from", "hints", COMMIT_PAGES)
PM_ENTRIES = BLOCK // 8
_SB_HEADER = struct.Struct("<I8sIQI")  # crc, magic, version, generation, json length
SUPERBLOCKS = 2
_HI, _LO = (1, 0) if sys.byteorder == "little" else (0, 1)  # uint32 halves of a block<<32|crc location


def checksum(page: Any) -> int:
    """CRC-32C of a 4 KiB page (the metadata's only checksum)."""
    return _crc32c(page)


def _ints(xs: Any) -> list[int]:
    """A list of Python ints from a list, range or numpy array."""
    return xs.tolist() if hasattr(xs, "tolist") else [int(x) for x in xs]


#: what the store returns for an array: a writable buffer of its bytes
Buffer = bytearray | mmap.mmap


def _map_noreserve() -> int:
    """Linux's ``MAP_NORESERVE`` (the ``mmap`` module names it from Python 3.13 on): 0x4000 in the
    generic ABI, other values on a few architectures; 0 elsewhere (the flag is then left out)."""
    if hasattr(mmap, "MAP_NORESERVE"):
        return int(mmap.MAP_NORESERVE)
    if not sys.platform.startswith("linux"):
        return 0
    arch = os.uname().machine
    if arch.startswith(("ppc", "powerpc", "sparc")):
        return 0x40
    if arch.startswith("mips"):
        return 0x400
    if arch.startswith("alpha"):
        return 0x10000
    return 0x4000


#: flags of a private anonymous map that reserves address space only (a page is allocated when first
#: written, and nothing is charged against the machine's memory before: the kernel's overcommit
#: heuristic refuses one allocation larger than the machine's memory, a 1 PiB pool's space map is 64 GiB)
MAP_SPARSE = mmap.MAP_PRIVATE | _map_noreserve()


def _zeroed(n: int) -> Buffer:
    """A writable zero-filled buffer of ``n`` bytes.  Big ones are private anonymous memory maps: their
    pages are zero until touched, so reading 100 MB of pages into one costs no memset beforehand, and a
    page never written (an absent page) costs no memory even when read (:data:`MAP_SPARSE`)."""
    if n < 1 << 20:
        return bytearray(n)
    return mmap.mmap(-1, n, flags=MAP_SPARSE)



_MAP_FIXED = 0x10  # Linux's MAP_FIXED (the same value on every architecture Linux supports)


def _libc_mmap() -> Any:
    """libc's ``mmap`` through ctypes (the ``mmap`` module cannot map at a given address), or None where
    that is not Linux on a 64-bit machine."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.mmap
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    return fn


_MMAP: Any = None


def map_private(addr: int, length: int, fd: int, offset: int) -> bool:
    """Map ``length`` bytes of file ``fd`` from ``offset`` at address ``addr`` (page-aligned, inside a
    mapping the caller owns), **private** and writable: reads see the file's pages (the page cache, no
    copy), a write makes a private copy of its page and never reaches the file.  False if this host
    cannot (not Linux, or mmap failed): the range then holds anonymous zeroes, as before the call."""
    global _MMAP
    if _MMAP is None:
        _MMAP = _libc_mmap() or False
    if not _MMAP or length <= 0:
        return False
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    got = _MMAP(addr, length, prot, mmap.MAP_PRIVATE | _MAP_FIXED, fd, offset)
    if got == addr:
        return True
    # a failed MAP_FIXED may have unmapped the range: put anonymous memory back (or give up loudly)
    again = _MMAP(addr, length, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
    if again != addr:
        raise MemoryError(f"mmap of {length} bytes at {addr:#x} failed and the range could not be restored")
    return False


class PagedArray:
    """How the pool hands one array to the store.

    ``data`` is the array's bytes (any C-contiguous buffer -- a numpy array, a bytearray -- whose
    length is a multiple of 4 KiB); ``dirty`` the page indices changed since the last commit; ``dead``
    the subset of those pages that are no longer used (their blocks are released instead of written).
    """

    def __init__(self, data: Any, dirty: Any, dead: Any = ()) -> None:
        self.data = memoryview(data).cast("B")
        self.npages = len(self.data) // BLOCK
        self.dirty = _ints(dirty)
        self.dead = _ints(dead) if len(dead) else []

    def page(self, i: int) -> memoryview:
        return self.data[i * BLOCK:(i + 1) * BLOCK]

    def page_rows(self, pages: Any) -> tuple[Any, Any]:
        """The pages ``pages`` (a numpy array of page indices) as rows of one buffer: (the array as a
        2-D uint8 numpy array of 4 KiB rows, the rows) -- how the store queues many pages without a
        step per page (numpy is loaded whenever it asks)."""
        np = sys.modules["numpy"]
        return np.frombuffer(self.data, np.uint8).reshape(-1, BLOCK), pages


def sorted_unique(np: Any, x: Any) -> Any:
    """The distinct values of ``x`` in order, as int64 (``np.unique``'s result; numpy's own unique
    hashes before it sorts, which costs several times more on the few thousand pages of a commit)."""
    a = np.sort(np.asarray(x, np.int64))
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) > 1 else a


def sorted_minus(np: Any, a: Any, b: Any) -> Any:
    """The values of ``a`` not in ``b`` (both sorted, distinct int64): ``np.setdiff1d`` of such arrays."""
    if not len(a) or not len(b):
        return a
    at = np.minimum(np.searchsorted(b, a), len(b) - 1)
    return a[b[at] != a]


class RowPages:
    """Changed pages of an array handed over as rows of one 2-D buffer (what a compiled encoder fills):
    page ``pages[k]`` is row ``rows[k]`` of ``base`` (a C-contiguous uint8 numpy array of 4 KiB rows).
    The interface of :class:`PageUpdates`, plus :meth:`page_rows`, so the store queues the pages
    without a copy or a step per page.  Only for callers that have numpy (arrays in, numpy used)."""

    def __init__(self, npages: int, pages: Any, base: Any, rows: Any, dead: Any = ()) -> None:
        """``pages``: distinct page indices; ``dead``: pages released (read as zeroes after)."""
        np = sys.modules["numpy"]
        self.npages = npages
        self._pages = np.asarray(pages, np.int64)
        self._rows = np.asarray(rows, np.int64)
        if base.ndim != 2 or base.shape[1] != BLOCK or base.dtype != np.uint8 or not base.flags.c_contiguous \
                or len(self._pages) != len(self._rows):
            raise ValueError("row pages must be distinct rows of a C-contiguous uint8 array of 4 KiB rows")
        self._base = base
        self._index: dict[int, int] | None = None
        order = np.argsort(self._pages, kind="stable")
        self._sorted, self._order = self._pages[order], order
        dead = sorted_minus(np, sorted_unique(np, dead), self._sorted)
        self.dead = dead.tolist()
        self.dirty = sorted_unique(np, np.concatenate([self._sorted, dead])).tolist()

    def _rows_of(self, pages: Any) -> Any:
        np = sys.modules["numpy"]
        pages = np.asarray(pages, np.int64)
        at = np.minimum(np.searchsorted(self._sorted, pages), max(len(self._sorted) - 1, 0))
        if len(pages) and (not len(self._sorted) or (self._sorted[at] != pages).any()):
            raise KeyError("a page asked for is not one of these updates")
        return self._rows[self._order[at]]

    def page(self, i: int) -> memoryview:
        if self._index is None:  # (the store takes a few pages one by one: a dict, built once)
            self._index = dict(zip(self._pages.tolist(), self._rows.tolist()))
        return memoryview(self._base[self._index[i]]).cast("B")

    def page_rows(self, pages: Any) -> tuple[Any, Any]:
        """The pages ``pages`` as (``base``, their rows in it)."""
        return self._base, self._rows_of(pages)


class PageUpdates:
    """A few changed pages of an array whose other pages stay as committed (the array is not
    loaded whole; see :class:`thinpool.devtable.DeviceTable`)."""

    def __init__(self, npages: int, pages: Mapping[int, bytes | bytearray], dead: Iterable[int] = ()) -> None:
        """``pages``: page index -> its new 4 KiB; ``dead``: pages released (read as zeroes after)."""
        if any(len(p) != BLOCK for p in pages.values()):
            raise ValueError("a page update must be exactly one 4 KiB page")
        self.npages = npages
        self._pages = dict(pages)
        dead = list(dead)
        if dead:
            self.dead = sorted(set(dead) - set(pages))
            self.dirty = sorted(set(pages) | set(self.dead))
        else:  # (most updates: pages written, none released)
            self.dead = []
            self.dirty = sorted(self._pages)

    def page(self, i: int) -> bytes | bytearray:
        return self._pages[i]
