"""Keeps numba's on-disk kernel cache honest across the kernel modules.

numba's ``cache=True`` keys a cached kernel on its *own* source file (modification time and size)
and on its bytecode.  What the kernel took from other modules at compile time is frozen into the
cached machine code without being part of that key: a callee from another module (inlined or
linked in), and every module-level constant (the :mod:`thinpool.schema` indices, table rows and
masks).  Change ``schema.py`` or ``kernels_map.py`` alone and ``kernels.py``'s cached ``write_one``
would keep running the old rules: with a reordered kernel table, on the wrong arrays.

The kernel modules (``kernels_map``, ``kernels``, ``walks``) therefore share one guard: each defines
a trivial cached kernel returning :func:`sources_digest` as it was when the module was compiled,
and calls :func:`check` at the end of its import.  When the digest of the sources it depends on
(:data:`SOURCES`) differs from what its cached code was built with, every cached kernel of that
module is dropped from the cache and compiled afresh on first use.  So kernels may call kernels of
another module in this list: callers and callees are always compiled from the same sources.  A
kernel module outside :data:`SOURCES` must not call these kernels (add it to the list).

Importing this module also registers thinpool's machine kernel cache with numba
(:func:`thinpool.jit_cache.install_locator`: one directory per digest of :data:`SOURCES`, shared by
every checkout of the same sources), so every kernel module imports it before defining a kernel.
Only the kernel modules import it; they import numba anyway.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from . import jit_cache

#: the files whose contents every cached kernel may have been compiled from
SOURCES = ("schema.py", "kernels_cache.py", "kernels_map.py", "kernels.py", "walks.py", "kernels_replay.py",
           "kernels_pages.py", "kernels_nbd.py", "kernels_flush.py")

_digest: int | None = None
#: the kernel modules whose cached code :func:`check` dropped in this process (for tests and debugging)
flushed: list[str] = []


def sources_digest() -> int:
    """A 63-bit digest of :data:`SOURCES` (0 when a source file cannot be read: an install
    without sources has no cache to keep honest either)."""
    global _digest
    if _digest is None:
        h = hashlib.blake2b(digest_size=8)
        here = os.path.dirname(os.path.abspath(__file__))
        try:
            for name in SOURCES:
                with open(os.path.join(here, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
            _digest = int.from_bytes(h.digest(), "little") >> 1
        except OSError:
            _digest = 0
    return _digest


def check(namespace: dict[str, Any], built_with: Callable[[], int]) -> bool:
    """Drop the cached code of every kernel in ``namespace`` (a kernel module's globals) when
    ``built_with()`` -- that module's cached digest kernel -- was compiled from other sources than
    today's.  Returns True when it dropped something.  First makes the module's kernels compile one
    process at a time machine-wide (:func:`thinpool.jit_cache.serialize_compiles`)."""
    jit_cache.serialize_compiles(namespace)
    if built_with() == sources_digest():
        return False
    from numba.core.dispatcher import Dispatcher
    module = namespace["__name__"]
    for obj in list(namespace.values()):
        if isinstance(obj, Dispatcher) and obj.py_func.__module__ == module:
            # the cache's index for this kernel: every saved overload forgotten (mypy: numba's private _cache)
            obj._cache.flush()  # type: ignore[attr-defined]
    # compiled (and saved) from today's sources: the next process agrees (mypy: a Dispatcher, typed as the function)
    built_with.recompile()  # type: ignore[attr-defined]
    flushed.append(module)
    return True


jit_cache.install_locator(sources_digest(), SOURCES)  # before any kernel module defines a kernel
