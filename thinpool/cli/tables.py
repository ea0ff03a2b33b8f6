"""thinpool's volume table (``thinpool ls``) written by the compiled formatter, ``thinpool.cli._tablefmt``.

The extension is built when the package is installed (pyproject.toml, ``[tool.setuptools]``
``ext-modules``, optional: an install without a C compiler goes on without it); it loads in well under
a millisecond, where numpy, which could also format the columns, costs 40-60 ms of import, a tenth of
a second of ``thinpool ls``.  :func:`volume_table` gives the table's UTF-8 bytes, byte for byte what
:func:`thinpool.cli.ops.render_volume_columns` writes in Python, or None when the Python renderer
must write it: the extension is not built, a cell is a string UTF-8 cannot encode (a lone surrogate,
which an older thinpool allowed in a name), or an integer lies outside [-2**63, 2**64).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Mapping

_tablefmt: ModuleType | None
try:
    from thinpool.cli import _tablefmt as _built
    _tablefmt = _built
except ImportError:  # (not built: no C compiler at install, or a source tree on PYTHONPATH)
    _tablefmt = None

#: the volume table's columns after NAME (their header, their key in the columns)
VOLUME_HEADER = ["NAME", "DEV", "SIZE", "MAPPED"]
USAGE_HEADER = ["EXCLUSIVE", "SHARED"]
TIME_HEADER = ["CREATE_TIME", "SNAP_TIME"]


def compiled() -> bool:
    """Whether the compiled formatter was built and loads."""
    return _tablefmt is not None


def _sizes(values: Any, size_of: Callable[[int], str], scale: int = 1) -> tuple[str, Any, list[int], list[str]]:
    """A ``("map", ...)`` column: each value shown as ``size_of(value * scale)``, formatted once per
    distinct value (100,000 snapshots share a few sizes)."""
    assert _tablefmt is not None
    keys = _tablefmt.distinct(values)
    return ("map", values, keys, [size_of(k * scale) for k in keys])


def volume_table(columns: Mapping[str, Any], headers: bool = True, block_size: int | None = None) -> bytes | None:
    """The volume table of ``columns`` (the keys :func:`thinpool.cli.ops.render_volume_columns` reads)
    as UTF-8 bytes, or None when the Python renderer must write it (see the module docstring).

    The integer columns may be lists or buffers of 8-byte integers (a device table's fields as they
    are stored); ``read_only`` a list or a bytes-like object of 0/1; ``name`` a list of str or
    ``("nul", blob, n)`` (:meth:`thinpool.devtable.DeviceTable.volume_columns` with
    ``buffers``).  With ``block_size``, MAPPED is ``mapped_blocks`` x ``block_size`` (columns without
    ``mapped_bytes``)."""
    out = _volume_table(columns, headers, block_size, False)
    assert out is None or isinstance(out, bytes)
    return out


def volume_table_text(columns: Mapping[str, Any], headers: bool = True, block_size: int | None = None) -> str | None:
    """:func:`volume_table` as a str (made in place when the table is ASCII: no bytes decoded)."""
    out = _volume_table(columns, headers, block_size, True)
    assert out is None or isinstance(out, str)
    return out


def _volume_table(columns: Mapping[str, Any], headers: bool, block_size: int | None,
                  as_text: bool, fd: int = -1) -> bytes | str | None:
    """The table (bytes, str with ``as_text``; with ``fd`` >= 0 written there, and "" returned), or
    None when the Python renderer must write it (nothing written then)."""
    if _tablefmt is None:
        return None
    from thinpool.units import format_size
    names = columns["name"]
    read_only = columns["read_only"]
    ro = (1 in read_only) if isinstance(read_only, (bytes, bytearray, memoryview)) else any(read_only)
    header = list(VOLUME_HEADER)
    cols: list[Any] = [("suffix", names, read_only, " (ro)") if ro else names, columns["dev_id"],
                       _sizes(columns["size"], format_size)]
    if block_size is None:
        cols.append(_sizes(columns["mapped_bytes"], format_size))
    else:
        cols.append(_sizes(columns["mapped_blocks"], format_size, block_size))
    if "exclusive_bytes" in columns:
        header += USAGE_HEADER
        cols += [_sizes(columns["exclusive_bytes"], format_size), _sizes(columns["shared_bytes"], format_size)]
    header += TIME_HEADER
    cols += [columns["creation_time"], columns["snap_time"]]
    origins = columns.get("external_origin")
    if origins is not None and any(o is not None for o in origins):
        header.append("EXTERNAL_ORIGIN")
        cols.append(["-" if o is None else o for o in origins])
    try:
        out: bytes | str | None = _tablefmt.table(header, cols, 1, headers, as_text, fd)
    except (UnicodeEncodeError, OverflowError):  # (raised before anything is written)
        return None
    if out is NotImplemented:  # (to fd: a cell holds an escape character; nothing written)
        return None
    return "" if out is None else out


def pool_table(pool: Any, headers: bool = True, fd: int = -1) -> str | None:
    """The volume table of an open pool or device table (``thinpool ls``) as a str, its fields handed
    to the compiled formatter as the device table stores them (no list per field); None when the
    Python renderer must write it (see the module docstring).  With ``fd`` >= 0 the table and a final
    newline (what ``click.echo`` of the str writes) go to that file descriptor a quarter of a megabyte
    at a time, with no copy of the whole table in memory, and "" is returned (None: nothing written)."""
    if _tablefmt is None or not hasattr(pool, "volume_columns"):
        return None
    cols = pool.volume_columns(buffers=True)
    try:
        if "external_origin" in cols:
            cols["external_origin"] = [o["path"] if o is not None else None for o in cols["external_origin"]]
        out = _volume_table(cols, headers, pool.block_size, True, fd)
        assert out is None or isinstance(out, str)
        return out
    finally:  # (views of the device table: released before anything may change it)
        for col in cols.values():
            if isinstance(col, memoryview):
                col.release()


def write_text(fd: int, text: str) -> bool:
    """Write the UTF-8 of ``text`` to file descriptor ``fd``, all of it, straight from the str (no
    encoded copy; OSError -- BrokenPipeError for EPIPE -- if a write fails, UnicodeEncodeError for a
    lone surrogate); False, writing nothing, when the compiled formatter is not built."""
    if _tablefmt is None:
        return False
    _tablefmt.write_text(fd, text)
    return True


__all__ = ["compiled", "pool_table", "volume_table", "volume_table_text", "write_text"]
