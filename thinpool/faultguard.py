"""SIGBUS on a pool's memory maps: a counted fault instead of a dead process.

A page of a file mapping that lies past the file's end -- the file truncated by another program under
the open pool -- raises SIGBUS at its next touch, and its default action kills the process.  Two kinds
of map are exposed: the data file's read-only map (``Thin.read``'s one-block fast path) and a big
pool's node rows mapped privately from the metadata file (:meth:`thinpool.mdstore.MetadataStore.map_into`).

:func:`guard` registers such a map's address range with a small native SIGBUS handler (LLVM IR
compiled once per process with llvmlite, numba's own code generator: about 15 ms; no numba cache, so
the state's addresses are this process's).  A fault in a registered range is answered by mapping a
fresh anonymous page over the faulting one (``MAP_FIXED``), filled with the range's ``fill`` word,
counting the fault -- in :data:`FAULTS` (all ranges), in the range's own counter (:func:`hits`) and
in an int64 of the owner's (:func:`set_bump`: a pool's lock generation, which the NBD read loop
checks after each read) -- and returning: the faulting copy or kernel goes on with that page in place of the lost one.  The map's
owner compares :data:`FAULTS` with the value it last saw after each use, and on a change throws the
result away (a data read is redone with pread(2), which reports the truncation; a pool whose metadata
rows faulted fails: :meth:`thinpool.kernel_context.KernelContext.fault_check`).  A fault anywhere else,
or one sent by ``kill``, goes to the handler that was there before (Python's ``faulthandler``, or the
default: the process dies as it would have).

Where the handler cannot be made (not Linux on x86-64 or aarch64, llvmlite missing) :func:`guard`
returns -1 and callers keep their length checks.  A handler replaced by someone else later (e.g. a
later ``faulthandler.enable()``) is put back at the next :func:`guard`.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import signal
import sys
import threading
import weakref
from typing import Any

#: regions the handler can watch at once (a map beyond them is not guarded: its owner keeps its checks)
SLOTS = 256
_FREE = (1 << 63) - 1  # a region's start while its slot is free (no address is at or past it)

_IR = r"""
@regions = global [%(pairs)d x i64] zeroinitializer
@fills = global [%(slots)d x i64] zeroinitializer
@hits = global [%(slots)d x i64] zeroinitializer
@bumps = global [%(slots)d x i64] zeroinitializer
@faults = global i64 0
@prev = global [32 x i64] zeroinitializer
@cfg = global [8 x i64] zeroinitializer

define void @thinpool_sigbus(i32 %%sig, ptr %%info, ptr %%uctx) {
entry:
  %%codep = getelementptr i8, ptr %%info, i64 8
  %%code = load i32, ptr %%codep
  %%ap = getelementptr i8, ptr %%info, i64 16
  %%addr = load i64, ptr %%ap
  %%kern = icmp sgt i32 %%code, 0
  br i1 %%kern, label %%loop, label %%chain
loop:
  %%i = phi i64 [0, %%entry], [%%inext, %%next]
  %%i2 = shl i64 %%i, 1
  %%sp = getelementptr [%(pairs)d x i64], ptr @regions, i64 0, i64 %%i2
  %%s = load atomic i64, ptr %%sp acquire, align 8
  %%i2e = add i64 %%i2, 1
  %%ep = getelementptr [%(pairs)d x i64], ptr @regions, i64 0, i64 %%i2e
  %%e = load atomic i64, ptr %%ep acquire, align 8
  %%ge = icmp uge i64 %%addr, %%s
  %%lt = icmp ult i64 %%addr, %%e
  %%in = and i1 %%ge, %%lt
  br i1 %%in, label %%hit, label %%next
next:
  %%inext = add i64 %%i, 1
  %%more = icmp ult i64 %%inext, %(slots)d
  br i1 %%more, label %%loop, label %%chain
hit:
  %%pgszp = getelementptr [8 x i64], ptr @cfg, i64 0, i64 2
  %%pgsz = load i64, ptr %%pgszp
  %%mask = sub i64 0, %%pgsz
  %%pg = and i64 %%addr, %%mask
  %%mmapp = getelementptr [8 x i64], ptr @cfg, i64 0, i64 0
  %%mmapi = load i64, ptr %%mmapp
  %%mmapf = inttoptr i64 %%mmapi to ptr
  %%protp = getelementptr [8 x i64], ptr @cfg, i64 0, i64 3
  %%prot64 = load i64, ptr %%protp
  %%prot = trunc i64 %%prot64 to i32
  %%flp = getelementptr [8 x i64], ptr @cfg, i64 0, i64 4
  %%fl64 = load i64, ptr %%flp
  %%fl = trunc i64 %%fl64 to i32
  %%pgp = inttoptr i64 %%pg to ptr
  %%r = call ptr %%mmapf(ptr %%pgp, i64 %%pgsz, i32 %%prot, i32 %%fl, i32 -1, i64 0)
  %%ok = icmp eq ptr %%r, %%pgp
  br i1 %%ok, label %%fill, label %%chain
fill:
  %%fp = getelementptr [%(slots)d x i64], ptr @fills, i64 0, i64 %%i
  %%fv = load i64, ptr %%fp
  %%words = lshr i64 %%pgsz, 3
  %%zero = icmp eq i64 %%fv, 0
  br i1 %%zero, label %%done, label %%floop
floop:
  %%j = phi i64 [0, %%fill], [%%jn, %%floop]
  %%wp = getelementptr i64, ptr %%pgp, i64 %%j
  store volatile i64 %%fv, ptr %%wp
  %%jn = add i64 %%j, 1
  %%fm = icmp ult i64 %%jn, %%words
  br i1 %%fm, label %%floop, label %%done
done:
  %%hp = getelementptr [%(slots)d x i64], ptr @hits, i64 0, i64 %%i
  %%h0 = atomicrmw add ptr %%hp, i64 1 seq_cst
  %%f0 = atomicrmw add ptr @faults, i64 1 seq_cst
  %%bp = getelementptr [%(slots)d x i64], ptr @bumps, i64 0, i64 %%i
  %%bv = load atomic i64, ptr %%bp acquire, align 8
  %%nob = icmp eq i64 %%bv, 0
  br i1 %%nob, label %%out, label %%bump
bump:
  %%bpp = inttoptr i64 %%bv to ptr
  %%b0 = atomicrmw add ptr %%bpp, i64 1 seq_cst
  br label %%out
out:
  ret void
chain:
  %%sap = getelementptr [8 x i64], ptr @cfg, i64 0, i64 1
  %%sai = load i64, ptr %%sap
  %%saf = inttoptr i64 %%sai to ptr
  %%sgp = getelementptr [8 x i64], ptr @cfg, i64 0, i64 5
  %%sg64 = load i64, ptr %%sgp
  %%sg = trunc i64 %%sg64 to i32
  %%rr = call i32 %%saf(i32 %%sg, ptr @prev, ptr null)
  ret void
}
""" % {"pairs": 2 * SLOTS, "slots": SLOTS}

_SA_SIGINFO = 4
_SA_RESTART = 0x10000000
_SIGACTION_WORDS = 19  # glibc's struct sigaction on 64-bit Linux: handler, 128-byte mask, flags, restorer

#: faults answered so far in this process (any range): ``FAULTS[0]``, one index of a memoryview (the
#: per-call read compares it); a zero that never changes where no handler could be made
FAULTS: memoryview = memoryview(bytearray(8)).cast("q")

_lock = threading.Lock()
_state: dict[str, Any] = {}
_used: set[int] = set()


def _supported() -> bool:
    return (sys.platform.startswith("linux") and ctypes.sizeof(ctypes.c_void_p) == 8
            and platform.machine() in ("x86_64", "aarch64", "AMD64"))


def _install() -> bool:
    """Compile the handler and its state (once); False where it cannot be."""
    global FAULTS
    if "handler" in _state:
        return True
    if _state.get("failed") or not _supported():
        return False
    try:
        import llvmlite.binding as ll
        ll.initialize_native_target()
        ll.initialize_native_asmprinter()
        mod = ll.parse_assembly(_IR)
        mod.verify()
        tm = ll.Target.from_default_triple().create_target_machine()
        engine = ll.create_mcjit_compiler(mod, tm)
        engine.finalize_object()
        handler = engine.get_function_address("thinpool_sigbus")
        addr = {n: engine.get_global_value_address(n)
                for n in ("regions", "fills", "hits", "bumps", "faults", "prev", "cfg")}
        libc = ctypes.CDLL(None, use_errno=True)
        sigaction = libc.sigaction
        sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        sigaction.restype = ctypes.c_int
    except Exception:  # (no llvmlite, no native target: callers keep their length checks)
        _state["failed"] = True
        return False
    regions = (ctypes.c_int64 * (2 * SLOTS)).from_address(addr["regions"])
    for i in range(SLOTS):
        regions[2 * i] = _FREE
    cfg = (ctypes.c_int64 * 8).from_address(addr["cfg"])
    cfg[0] = ctypes.cast(libc.mmap, ctypes.c_void_p).value or 0
    cfg[1] = ctypes.cast(sigaction, ctypes.c_void_p).value or 0
    cfg[2] = mmap.PAGESIZE
    cfg[3] = mmap.PROT_READ | mmap.PROT_WRITE
    cfg[4] = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10  # MAP_FIXED (0x10 on every Linux architecture)
    cfg[5] = int(signal.SIGBUS)
    _state.update(engine=engine, handler=handler, addr=addr, sigaction=sigaction, regions=regions,
                  fills=(ctypes.c_int64 * SLOTS).from_address(addr["fills"]),
                  hits=(ctypes.c_int64 * SLOTS).from_address(addr["hits"]),
                  bumps=(ctypes.c_int64 * SLOTS).from_address(addr["bumps"]))
    FAULTS = memoryview((ctypes.c_int64 * 1).from_address(addr["faults"])).cast("B").cast("q")
    return True


def _ensure_handler() -> bool:
    """Our handler is SIGBUS's now (installed, or put back if another replaced it): the one it replaces
    is kept, for faults outside the guarded ranges."""
    sigaction, handler = _state["sigaction"], _state["handler"]
    cur = (ctypes.c_uint64 * _SIGACTION_WORDS)()
    if sigaction(int(signal.SIGBUS), None, ctypes.addressof(cur)) != 0:
        return False
    if cur[0] == handler:
        return True
    new = (ctypes.c_uint64 * _SIGACTION_WORDS)()
    new[0] = handler
    ctypes.c_int.from_address(ctypes.addressof(new) + 136).value = _SA_SIGINFO | _SA_RESTART
    return sigaction(int(signal.SIGBUS), ctypes.addressof(new), _state["addr"]["prev"]) == 0


def available() -> bool:
    """Whether this process can guard maps (the handler compiles on this host)."""
    with _lock:
        return _install()


def guard(owner: object, start: int, length: int, fill: int = 0) -> int:
    """Watch ``[start, start + length)`` (a file map of ``owner``'s) for SIGBUS until :func:`unguard`
    (or until ``owner`` is collected); a faulting page becomes an anonymous one whose 8-byte words are
    all ``fill``.  Returns the range's slot (for :func:`hits`), or -1 when it cannot be guarded (no
    handler on this host, every slot in use): the caller then keeps its own checks."""
    if length <= 0:
        return -1
    with _lock:
        if not _install() or not _ensure_handler():
            return -1
        free = [i for i in range(SLOTS) if i not in _used]
        if not free:
            return -1
        slot = free[0]
        _used.add(slot)
        regions = _state["regions"]
        _state["fills"][slot] = ctypes.c_int64(fill).value
        _state["hits"][slot] = 0
        _state["bumps"][slot] = 0
        regions[2 * slot + 1] = start + length
        regions[2 * slot] = start
    weakref.finalize(owner, unguard, slot, start)
    return slot


def unguard(slot: int, start: int | None = None) -> None:
    """Stop watching ``slot``'s range (before its map is unmapped; -1: nothing).  ``start``: only if
    the slot still watches a range that starts there (a finalizer of an owner already unguarded)."""
    if slot < 0:
        return
    with _lock:
        regions = _state.get("regions")
        if regions is None or slot not in _used or (start is not None and regions[2 * slot] != start):
            return
        regions[2 * slot] = _FREE
        regions[2 * slot + 1] = 0
        _state["bumps"][slot] = 0
        _used.discard(slot)


def set_bump(slot: int, address: int) -> None:
    """Also add 1 to the int64 at ``address`` at every fault in ``slot``'s range (0: nothing; -1 slot:
    nothing): a compiled loop that compares a generation counter before and after a read -- the NBD
    read loop (:mod:`thinpool.kernels_nbd`) -- then sees it move.  The int64 must outlive the guard
    (:func:`unguard` first)."""
    if slot >= 0 and "bumps" in _state:
        _state["bumps"][slot] = address


def hits(slot: int) -> int:
    """Faults answered in ``slot``'s range since it was guarded (0 for -1)."""
    if slot < 0 or "hits" not in _state:
        return 0
    return int(_state["hits"][slot])


def address_of(buf: Any) -> int:
    """The address of a buffer's first byte (a read-only one too: an mmap opened with PROT_READ)."""
    import numpy as np
    view = np.frombuffer(buf, np.uint8)
    try:
        return int(view.ctypes.data)
    finally:
        del view
