"""Argument checks of byte I/O, shared by a volume's own calls (:mod:`thinpool.thin`) and the mixed
batches of several volumes (:mod:`thinpool.batch_io`): bad input raises InvalidArgument before
anything changes.  Also the kernels' origin-failure code, so that neither needs numba to read it.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidArgument

#: kernels.ORIGIN_ERROR (kept here: importing kernels loads numba)
ORIGIN_ERROR = -102


def io_integer(name: str, what: str, value: object) -> int:
    """An I/O offset or length as a Python int (InvalidArgument naming the volume otherwise)."""
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgument(f"volume {name!r}: {what} must be an integer, got {value!r}")
    return int(value)


def as_offsets(values: object, what: str) -> np.ndarray:
    """Offsets or lengths (an integer or a sequence / array of them) as a contiguous int64 array
    (InvalidArgument naming ``what`` for non-integers or values past int64)."""
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.dtype.kind not in "iu":
        raise InvalidArgument(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise InvalidArgument(f"{what} out of range")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_span(name: str, size: int, offset: int, length: int) -> None:
    """InvalidArgument naming volume ``name`` unless ``length`` bytes at ``offset`` lie within its ``size``."""
    if offset < 0:
        raise InvalidArgument(f"volume {name!r}: negative offset {offset}")
    if length < 0:
        raise InvalidArgument(f"volume {name!r}: negative length {length}")
    if offset + length > size:
        raise InvalidArgument(f"volume {name!r}: I/O at offset {offset} length {length} goes past the end of "
                              f"the volume ({size} bytes)")


def out_buffer(name: str, out: object, n: int, length: int) -> np.ndarray:
    """A caller's output buffer for ``n`` reads of ``length`` bytes of volume ``name`` (``read_many``'s
    ``out``) as a flat uint8 view, or InvalidArgument saying what is wrong with it: a writable,
    C-contiguous uint8 numpy array of shape (n, length) or (n * length,)."""
    if not isinstance(out, np.ndarray):
        raise InvalidArgument(f"volume {name!r}: out must be a numpy uint8 array, got "
                              f"{type(out).__name__}")
    if out.dtype != np.uint8:
        raise InvalidArgument(f"volume {name!r}: out must have dtype uint8, got {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidArgument(f"volume {name!r}: out must be a writable, C-contiguous array")
    if out.size != n * length or (out.ndim == 2 and out.shape != (n, length)) or out.ndim > 2:
        raise InvalidArgument(f"volume {name!r}: out has shape {out.shape}, but {n} reads of {length} "
                              f"bytes need ({n}, {length}) or ({n * length},)")
    return out.reshape(-1)
