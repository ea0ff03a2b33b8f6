"""The pool, volume and interop ops and their text renderers (the op table is :mod:`thinpool.cli.registry`).

Each op is ``func(pool, **kwargs) -> JSON-able result``; it runs in-process or, on a served pool, in
the serving process (:func:`thinpool.cli.registry.run_op`).  The data-streaming ops are in
:mod:`thinpool.cli.stream_ops`, the snapshotter's in :mod:`thinpool.cli.containers_cmds`.
"""

from __future__ import annotations

import operator
import os
from itertools import chain, repeat
from operator import itemgetter
from typing import Any, Callable, Iterable

from thinpool.errors import InvalidArgument, NotFound
from thinpool.rules import LightPool

from .registry import register_op


# ============================================================================================== the ops
# Pool-level reporting and messages.

def _thin_info(thin: Any) -> dict[str, Any]:
    info = {"name": thin.name, "dev_id": thin.dev_id, "size": thin.size, "read_only": bool(thin.read_only),
            "mapped_blocks": thin.mapped_blocks, "transaction": thin.transaction,
            "creation_time": thin.creation_time, "snap_time": thin.snap_time}
    origin = thin.external_origin
    if origin is not None:
        info["external_origin"] = origin["path"]
        info["external_origin_size"] = origin["size"]
    return info


def _go_human_size(nbytes: int, precision: int = 4) -> str:
    """go-units ``HumanSize`` (what ``docker info`` prints): SI units, 4 significant digits, no space."""
    units = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"]
    n = float(nbytes)
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n /= 1000
        i += 1
    return f"{n:.{precision}g}{units[i]}"


def _host_free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def op_status(pool: LightPool) -> dict[str, Any]:
    """Pool status: the dmsetup status fields, the status line, and docker-info-style space figures."""
    st = pool.status()
    data_file = pool.data_path
    metadata_file = os.path.join(pool.path, pool.METADATA)
    bs = st.data_block_size
    data_total = st.total_data_blocks * bs
    data_used = st.used_data_blocks * bs
    meta_total = st.total_metadata_blocks * 4096
    meta_used = st.reported_used_metadata_blocks * 4096  # the status line's, reserve included (docker reads it)
    host_free = _host_free_bytes(data_file)
    data_avail = data_total - data_used
    meta_avail = meta_total - meta_used
    if host_free is not None:  # docker's loopback rule: capped by the host filesystem's free space
        data_avail = min(data_avail, host_free)
        meta_avail = min(meta_avail, host_free)
    origins: dict[str, list[str]] = {}  # external origin file -> its volumes (thin table arguments in dm-thin)
    for name, entry in (pool.catalog["volumes"].items() if pool.may_have_external_origins() else ()):
        rec = entry.get("origin")
        if rec is not None:
            origins.setdefault(rec["path"], []).append(name)
    out = {"pool": pool.path, "dmsetup_line": st.dmsetup_line(), **st.as_dict(),
           "data_file": data_file, "metadata_file": metadata_file,
           "data_space": {"used": data_used, "total": data_total, "available": data_avail},
           "metadata_space": {"used": meta_used, "total": meta_total, "available": meta_avail},
           "external_origins": {path: sorted(names) for path, names in sorted(origins.items())}}
    return out


def render_status_human(r: dict[str, Any]) -> str:
    """The ``docker info``-like block for a status result."""
    rows = [
        ("Pool Name", r["pool"]),
        ("Pool Blocksize", _go_human_size(r["data_block_size"])),
        ("Data file", r["data_file"]),
        ("Metadata file", r["metadata_file"]),
        ("Data Space Used", _go_human_size(r["data_space"]["used"])),
        ("Data Space Total", _go_human_size(r["data_space"]["total"])),
        ("Data Space Available", _go_human_size(r["data_space"]["available"])),
        ("Metadata Space Used", _go_human_size(r["metadata_space"]["used"])),
        ("Metadata Space Total", _go_human_size(r["metadata_space"]["total"])),
        ("Metadata Space Available", _go_human_size(r["metadata_space"]["available"])),
        ("Data Blocks Used/Total", f"{r['used_data_blocks']}/{r['total_data_blocks']}"),
        ("Metadata Blocks Used/Total", f"{r['used_metadata_blocks']}/{r['total_metadata_blocks']}"),
        ("Mode", r["mode"]),
        ("Thin Volumes", str(r["nr_thins"])),
        ("Transaction Id", str(r["transaction_id"])),
        ("Time", str(r["time"])),
        ("Held Metadata Root", "-" if r["held_root"] is None else str(r["held_root"])),
        ("Low Water Mark", f"{r['low_water_mark']} blocks"),
        ("Needs Check", "yes" if r["needs_check"] else "no"),
    ]
    for path, names in r.get("external_origins", {}).items():
        rows.append(("External Origin", f"{path} ({len(names)} volume{'s' if len(names) != 1 else ''}: "
                                        f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"))
    return "\n".join(f"{k}: {v}" for k, v in rows)


def render_status(r: dict[str, Any]) -> str:
    """Status line, blank line, human block."""
    return r["dmsetup_line"] + "\n\n" + render_status_human(r)


register_op("status", op_status, write=False, render=render_status, light=lambda kw: True)


def op_commit(pool: Any) -> dict[str, Any]:
    """Commit (the commit itself is done by run_op / the control server, as for every write op)."""
    return {"transaction_id": pool.transaction_id, "time": pool.time}


register_op("commit", op_commit, write=True)


def op_resize(pool: Any, data_size: int | None = None, metadata_size: int | None = None) -> dict[str, Any]:
    """Grow the data device to ``data_size`` bytes and/or the metadata file to ``metadata_size`` bytes
    (never shrinks; the metadata grows by itself when the new data size needs it)."""
    pool.resize(data_size, metadata_size)
    return {"total_data_blocks": pool.nr_data_blocks, "data_size": pool.nr_data_blocks * pool.block_size,
            "total_metadata_blocks": pool.store.nr_blocks, "metadata_size": pool.store.nr_blocks * 4096}


register_op("resize", op_resize, write=True)


def op_set_autoextend(pool: Any, threshold: int, percent: int | None = None) -> dict[str, Any]:
    """Set LVM's autoextend policy (threshold and percent) for the pool's metadata and data."""
    pool.set_autoextend(threshold, percent)
    return {"autoextend_threshold": int(pool.header["autoextend_threshold"]),
            "autoextend_percent": int(pool.header.get("autoextend_percent", 20))}


register_op("set-autoextend", op_set_autoextend, write=True)


def op_set(pool: Any, discard: str | None = None, error_if_no_space: bool | None = None,
           no_space_timeout: float | None = None) -> dict[str, Any]:
    """Change pool features on the active pool (a served pool): dm-thin's rules for reloading an active
    pool's table (:meth:`thinpool.pool.Pool.set_features`); returns the features in force."""
    features = pool.set_features(discard=discard, error_if_no_space=error_if_no_space,
                                 no_space_timeout=no_space_timeout)
    return {"pool": pool.path, **features, "dmsetup_line": pool.status().dmsetup_line()}


def render_features(r: dict[str, Any]) -> str:
    """``discard=... error_if_no_space=... no_space_timeout=...`` and the status line."""
    return (f"discard={r['discard']} {'error_if_no_space' if r['error_if_no_space'] else 'queue_if_no_space'} "
            f"no_space_timeout={r['no_space_timeout']:g}\n{r['dmsetup_line']}")


register_op("set", op_set, write=True, render=render_features)


def op_set_transaction_id(pool: Any, old: int, new: int) -> dict[str, Any]:
    """dm-thin's ``set_transaction_id OLD NEW`` (compare-and-swap)."""
    pool.set_transaction_id(old, new)
    return {"transaction_id": new}


register_op("set-transaction-id", op_set_transaction_id, write=True)


def op_reserve_metadata_snap(pool: Any) -> dict[str, Any]:
    """Hold a metadata snapshot; returns its root block."""
    pool.reserve_metadata_snap()
    return {"held_root": pool.status().held_root}


register_op("reserve-metadata-snap", op_reserve_metadata_snap, write=True,
            render=lambda r: f"held metadata root: {r['held_root']}")


def op_release_metadata_snap(pool: Any) -> dict[str, Any]:
    """Release the held metadata snapshot."""
    pool.release_metadata_snap()
    return {"held_root": None}


register_op("release-metadata-snap", op_release_metadata_snap, write=True)


def op_check(pool: Any, clear_needs_check: bool = False) -> dict[str, Any]:
    """Structural check of the pool's metadata (CheckReport as a dict); with ``clear_needs_check``,
    a sound pool's needs_check flag is cleared (thin_check --clear-needs-check-flag)."""
    return (pool.clear_needs_check() if clear_needs_check else pool.check()).as_dict()


def render_check(r: dict[str, Any]) -> str:
    """Check report text: the problems, one per line, or a one-line summary when clean."""
    notes = [f"warning: {w}" for w in r.get("warnings", [])]
    if r["ok"]:
        return "\n".join(notes + [f"ok: {r['devices']} devices, {r['mappings']} mappings, "
                                  f"{r['data_blocks_used']} data blocks in use"])
    return "\n".join(notes + r["errors"])


register_op("check", op_check, write=False, render=render_check)


# ---------------------------------------------------------------------------------------------- volumes
def op_create_thin(pool: Any, name: str, size: int, dev_id: int | None = None,
                   read_only: bool = False, external_origin: str | None = None) -> dict[str, Any]:
    """Create an empty thin volume (on a read-only ``external_origin`` file, if given)."""
    return _thin_info(pool.create_thin(name, size, dev_id=dev_id, read_only=read_only,
                                       external_origin=external_origin))


register_op("create-thin", op_create_thin, write=True)


def op_snapshot(pool: LightPool, origin: str, name: str, dev_id: int | None = None,
                read_only: bool = False) -> dict[str, Any]:
    """Snapshot ``origin`` as ``name`` (O(1))."""
    return _thin_info(pool.snapshot(origin, name, dev_id=dev_id, read_only=read_only))


register_op("snapshot", op_snapshot, write=True, light=lambda kw: True)


def op_delete(pool: Any, names: list[str]) -> dict[str, Any]:
    """Delete volumes; all names are checked first, so either all go or none does."""
    if len(set(names)) != len(names):
        raise InvalidArgument(f"volume named twice in {names!r}")
    for name in names:
        pool.check_deletable(name)  # NotFound, or Busy for an active volume, before anything changes
    from thinpool.containers.snapshotter import refuse_snapshot_volumes
    refuse_snapshot_volumes(pool, names)  # a snapshotter's volume goes with its record: remove-snapshot
    for name in names:
        pool.delete(name)
    return {"deleted": list(names)}


register_op("delete", op_delete, write=True)


def op_rename(pool: Any, old: str, new: str) -> dict[str, Any]:
    """Rename a volume (not a snapshotter's: its record is bound to it)."""
    from thinpool.containers.snapshotter import refuse_snapshot_volumes
    refuse_snapshot_volumes(pool, [old], "rename")
    pool.rename(old, new)
    return _thin_info(pool.thin(new))


register_op("rename", op_rename, write=True)


def _volume_rows(pool: Any, usage: bool) -> list[dict[str, Any]]:
    counts = {u.name: u for u in pool.usage()} if usage else {}
    bs = pool.block_size
    rows = []
    volumes = pool.thins() if getattr(pool, "devs", None) is None else _records(pool)
    for t in volumes:  # one dict literal per volume: `ls` of 10,000 volumes stays fast
        row = {"name": t.name, "dev_id": t.dev_id, "size": t.size, "read_only": bool(t.read_only),
               "mapped_blocks": t.mapped_blocks, "transaction": t.transaction, "creation_time": t.creation_time,
               "snap_time": t.snap_time, "block_size": bs, "mapped_bytes": t.mapped_blocks * bs}
        origin = t.external_origin
        if origin is not None:  # only then: the rows of pools without origins are unchanged
            row["external_origin"] = origin["path"]
        if usage:
            u = counts[t.name]
            row.update(exclusive_blocks=u.exclusive_blocks, shared_blocks=u.shared_blocks,
                       highest_mapped_block=u.highest_mapped_block, exclusive_bytes=u.exclusive_bytes,
                       shared_bytes=u.shared_blocks * u.block_size)
        rows.append(row)
    return rows


def _records(pool: Any) -> list[Any]:
    """A full pool's volumes in device-id order, as :class:`~thinpool.devtable.VolumeRecord` rows read
    from its device table in one pass (a :class:`~thinpool.thin.Thin` handle reads each field on its
    own: 100,000 volumes took seconds)."""
    from thinpool.devtable import VolumeRecord
    from thinpool.schema import DevFlag
    devs = pool.devs
    live = devs[(devs["flags"] & int(DevFlag.IN_USE)) != 0]
    live = live[live["dev_id"].argsort(kind="stable")]
    cols = [live[f].tolist() for f in ("dev_id", "size", "mapped", "transaction", "creation_time", "snap_time",
                                       "flags")]
    origins = pool.may_have_external_origins()
    ro = int(DevFlag.READ_ONLY)
    out = []
    for dev_id, size, mapped, txn, ctime, stime, flags in zip(*cols):
        name = pool.name_of(dev_id)
        out.append(VolumeRecord(name, dev_id, size, mapped, txn, ctime, stime, flags & ro != 0,
                                pool.thin(name).external_origin if origins else None))
    return out


def _volume_columns(pool: Any) -> dict[str, list[Any]]:
    """The volumes in device-id order as columns (see :meth:`thinpool.devtable.DeviceTable.volume_columns`)
    with ``block_size`` and ``mapped_bytes``: a row of :func:`_volume_rows` is one index of every column."""
    if hasattr(pool, "volume_columns"):
        cols = pool.volume_columns()
    else:
        recs = _records(pool)
        cols = {"name": [t.name for t in recs], "dev_id": [t.dev_id for t in recs], "size": [t.size for t in recs],
                "read_only": [bool(t.read_only) for t in recs], "mapped_blocks": [t.mapped_blocks for t in recs],
                "transaction": [t.transaction for t in recs], "creation_time": [t.creation_time for t in recs],
                "snap_time": [t.snap_time for t in recs]}
        if any(t.external_origin is not None for t in recs):
            cols["external_origin"] = [t.external_origin for t in recs]
    bs = pool.block_size
    out = {k: cols[k] for k in _ROW_KEYS[:8]}
    out["block_size"] = [bs] * len(out["name"])
    out["mapped_bytes"] = list(map(operator.mul, repeat(bs), out["mapped_blocks"]))  # (no slot wrapper call)
    if any(o is not None for o in cols.get("external_origin", ())):
        out["external_origin"] = [o["path"] if o is not None else None for o in cols["external_origin"]]
    return out


#: the keys of a volume row (:func:`_volume_rows`), in order (then ``external_origin`` when it has one)
_ROW_KEYS = ("name", "dev_id", "size", "read_only", "mapped_blocks", "transaction", "creation_time", "snap_time",
             "block_size", "mapped_bytes")


def volume_rows(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The rows of :func:`_volume_columns`' columns (a volume without an external origin has no
    ``external_origin`` key)."""
    rows = [dict(zip(_ROW_KEYS, vals)) for vals in zip(*(columns[k] for k in _ROW_KEYS))]
    for row, origin in zip(rows, columns.get("external_origin", ())):
        if origin is not None:
            row["external_origin"] = origin
    return rows


def volume_columns_json(columns: dict[str, list[Any]]) -> str:
    """``json.dumps(volume_rows(columns), indent=2)``, byte for byte, written a column at a time (a
    template per row instead of a dict per row)."""
    import json
    if "external_origin" in columns or not columns["name"]:
        return json.dumps(volume_rows(columns), indent=2)
    from json.encoder import encode_basestring_ascii
    cells = [list(map(encode_basestring_ascii, columns["name"]))]
    for k in _ROW_KEYS[1:]:  # ints as %d (int.__repr__, as json writes them), read_only as true/false
        cells.append(list(map(("false", "true").__getitem__, columns[k])) if k == "read_only" else columns[k])
    row = "  {\n" + ",\n".join(f'    "{k}": %{"s" if k in ("name", "read_only") else "d"}'
                                  for k in _ROW_KEYS) + "\n  }"
    return "[\n" + ",\n".join(map(row.__mod__, zip(*cells))) + "\n]"


def op_ls(pool: Any, fields: list[str] | None = None, headers: bool = True,
          metadata_snap: bool = False, as_json: bool = False, usage: bool = False,
          columns: bool = False, table: bool = False) -> dict[str, Any]:
    """List volumes.

    Without ``fields``: thinpool's view (``volumes``: name, dev id, size, mapped blocks and bytes,
    times -- all from the device table; with ``usage`` also exclusive/shared blocks and bytes and the
    highest mapped block, which walk every volume's mappings).  ``columns`` (without ``usage``): the
    same as ``columns``, one list per key (:func:`volume_rows` turns them into the rows), built
    without an object per volume; ``table`` (without ``usage``): the table :func:`render_volume_columns`
    writes of them (``headers`` or not) as ``text``.  With ``fields`` (thin_ls field names) or ``metadata_snap``:
    exactly thin_ls's output for the pool's (or its held snapshot's) metadata as ``text``, plus
    ``rows`` when ``as_json``.
    """
    if fields is None and not metadata_snap:
        if table and not usage:
            from .tables import pool_table
            text = pool_table(pool, headers)  # (compiled; None: written in Python)
            return {"text": render_volume_columns(_volume_columns(pool), headers, False) if text is None else text}
        if columns and not usage:
            return {"columns": _volume_columns(pool)}
        return {"volumes": _volume_rows(pool, usage)}
    from thinpool.interop import thin_ls
    md = pool.to_metadata(held=metadata_snap)
    result: dict[str, Any] = {}
    if as_json:
        result["rows"] = thin_ls.ls_rows(md, fields)
    else:
        result["text"] = thin_ls.format_ls(md, fields, headers=headers)
    return result


def _table(header: list[str], rows: list[list[str]], left: int = 1, headers: bool = True) -> str:
    """Columns right-justified (the first ``left`` left-justified), separated by two spaces."""
    return _columns_table(header, [list(col) for col in zip(*rows)] if rows else [[] for _ in header], left, headers)


def _columns_table(header: list[str], cols: list[list[Any]], left: int = 1, headers: bool = True,
                   cells: list[Iterable[str] | None] | None = None) -> str:
    """:func:`_table` from columns (each a list of cells: strings, or ints printed as ``str`` prints
    them): one ``%`` template per row, its widths the columns' (C loops over the columns; no per-cell
    padding or conversion step).  ``cells``: for a string column, its distinct cells if the caller
    knows them (its width is theirs: a column of 100,000 cells with a few distinct ones is not
    measured cell by cell)."""
    if not cols or not (cols[0] or headers):
        return ""
    ints = [bool(col) and type(col[0]) is int for col in cols]
    distinct = cells or [None] * len(cols)
    widths = [max((max(len(str(max(col))), len(str(min(col)))) if is_int else
                   max(map(len, col if few is None else few), default=0)), len(h) if headers else 0)
              for h, col, is_int, few in zip(header, cols, ints, distinct)]
    fmt = "  ".join(f"%{'-' if i < left else ''}{w}{'d' if is_int else 's'}"
                    for i, (w, is_int) in enumerate(zip(widths, ints)))
    lines: Iterable[str] = map(fmt.__mod__, zip(*cols))
    if not ints[-1]:  # a string cell may end in blanks (a left-justified one always does)
        lines = map(str.rstrip, lines)
    if headers:
        head = "  ".join(f"%{'-' if i < left else ''}{w}s" for i, w in enumerate(widths))
        lines = chain([(head % tuple(header)).rstrip()], lines)
    return "\n".join(lines)


def render_volumes(rows: list[dict[str, Any]], headers: bool = True) -> str:
    """thinpool's volume table: NAME DEV SIZE MAPPED [EXCLUSIVE SHARED] CREATE_TIME SNAP_TIME
    [EXTERNAL_ORIGIN] (the usage columns when the rows carry them, the origin column when a volume has
    an external origin)."""
    keys = list(_ROW_KEYS) + (["exclusive_bytes", "shared_bytes"] if rows and "exclusive_bytes" in rows[0] else [])
    columns = {k: list(map(itemgetter(k), rows)) for k in keys}
    if any("external_origin" in r for r in rows):
        columns["external_origin"] = [r.get("external_origin") for r in rows]
    return render_volume_columns(columns, headers)


def render_volume_columns(columns: dict[str, list[Any]], headers: bool = True, compiled: bool = True) -> str:
    """:func:`render_volumes` of the rows these columns hold (see :func:`volume_rows`): written by the
    compiled formatter (:func:`thinpool.cli.tables.volume_table`) when it can, else (or with
    ``compiled=False``) in Python, the same text."""
    if compiled:
        from .tables import volume_table_text
        text = volume_table_text(columns, headers)
        if text is not None:
            return text
    from thinpool.units import format_size
    usage = "exclusive_bytes" in columns
    header = ["NAME", "DEV", "SIZE", "MAPPED"] + (["EXCLUSIVE", "SHARED"] if usage else []) + \
        ["CREATE_TIME", "SNAP_TIME"]

    distinct: list[Iterable[str] | None] = [None, None]  # (NAME, DEV)

    def col(key: str, fmt: Callable[[Any], str]) -> list[str]:
        # each distinct value formatted once (100,000 snapshots share a few sizes)
        cells = {v: fmt(v) for v in set(columns[key])}
        distinct.append(cells.values())
        return list(map(cells.__getitem__, columns[key]))

    names = columns["name"]
    if any(columns["read_only"]):
        names = [n + " (ro)" if r else n for n, r in zip(names, columns["read_only"])]
    cols = [names, columns["dev_id"], col("size", format_size), col("mapped_bytes", format_size)]
    if usage:
        cols += [col("exclusive_bytes", format_size), col("shared_bytes", format_size)]
    cols += [columns["creation_time"], columns["snap_time"]]
    distinct += [None, None]
    if any(o is not None for o in columns.get("external_origin", ())):
        header.append("EXTERNAL_ORIGIN")
        cols.append(["-" if o is None else o for o in columns["external_origin"]])
        distinct.append(None)
    return _columns_table(header, cols, headers=headers, cells=distinct)


def render_ls(r: dict[str, Any]) -> str:
    """Text of an ls result: thin_ls's text when it was asked for, else thinpool's table."""
    if "text" in r:
        return r["text"]
    if "columns" in r:
        return render_volume_columns(r["columns"])
    return render_volumes(r["volumes"])


register_op("ls", op_ls, write=False, render=render_ls,
            light=lambda kw: kw.get("fields") is None and not kw.get("metadata_snap") and not kw.get("usage"))


def op_usage(pool: Any, name: str | None = None) -> Any:
    """Block usage of one volume (a dict) or of all (a list), from Pool.usage."""
    if name is not None:
        return pool.usage(name).as_dict()
    return [u.as_dict() for u in pool.usage()]


def render_usage(r: Any) -> str:
    """Usage as a table in blocks (NAME DEV MAPPED EXCLUSIVE SHARED HIGHEST, in blocks)."""
    rows = r if isinstance(r, list) else [r]
    header = ["NAME", "DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS", "HIGHEST_BLOCK", "MAPPED_BYTES"]
    body = [[u["name"], str(u["dev_id"]), str(u["mapped_blocks"]), str(u["exclusive_blocks"]),
             str(u["shared_blocks"]), "-" if u["highest_mapped_block"] is None else str(u["highest_mapped_block"]),
             str(u["mapped_bytes"])] for u in rows]
    return _table(header, body)


register_op("usage", op_usage, write=False, render=render_usage)


def op_discard(pool: Any, name: str, offset: int = 0, length: int | None = None) -> dict[str, Any]:
    """Unmap the whole blocks inside [offset, offset+length) (default: the whole volume)."""
    thin = pool.thin(name)
    from thinpool.volume_bytes import byte_range
    offset, length = byte_range(thin, offset, length, "discard")
    n = thin.discard(offset, length) if length else 0
    return {"name": name, "offset": offset, "length": length, "blocks_unmapped": n}


register_op("discard", op_discard, write=True,
            render=lambda r: f"{r['name']}: {r['blocks_unmapped']} blocks unmapped")


# ---------------------------------------------------------------------------------------------- interop
def _metadata(pool: Any, metadata_snap: bool) -> Any:
    """The pool's metadata as IR (its held metadata snapshot's with ``metadata_snap``)."""
    return pool.to_metadata(held=metadata_snap)


def op_dump(pool: Any, metadata_snap: bool = False) -> str:
    """thin_dump's XML for the pool (or its held metadata snapshot), as text."""
    from thinpool.interop.xml import dump_xml
    text = dump_xml(_metadata(pool, metadata_snap))
    assert text is not None, "dump_xml returns the text when given no file"
    return text


register_op("dump", op_dump, write=False, render=lambda text: text)


def op_export_metadata(pool: Any, path: str, nr_metadata_blocks: int | None = None) -> dict[str, Any]:
    """Write real dm-thin binary metadata for the pool to ``path`` (absolute: a serving process has
    its own cwd; with the held metadata snapshot, if one is held).  Returns the blocks used and the
    file's size in blocks."""
    from thinpool.interop.binary import write_binary_metadata
    from thinpool.safe_output import check_path, guard_output
    if not os.path.isabs(check_path(path, "metadata output")):
        raise InvalidArgument(f"metadata output {path!r} must be an absolute path")
    path = guard_output(path, pools=[pool], what="metadata output")  # a str, never a file of a pool
    if not pool.read_only:
        pool.commit()  # dm-thin's metadata device holds the committed state
    md = pool.to_metadata()
    held = pool.to_metadata(held=True) if pool.status().held_root is not None else None
    used = write_binary_metadata(md, path, nr_metadata_blocks=nr_metadata_blocks, held=held, pools=[pool])
    return {"path": path, "used_blocks": used, "nr_blocks": os.path.getsize(path) // 4096,
            "held": held is not None, "data_file": pool.data.path,
            "data_block_size": pool.block_size, "nr_data_blocks": pool.nr_data_blocks}


register_op("export-metadata", op_export_metadata, write=False,
            render=lambda r: f"wrote {r['path']}: {r['used_blocks']} of {r['nr_blocks']} metadata blocks used"
                             f"{' (with the held metadata snapshot)' if r['held'] else ''}")


def _dev_id(pool: Any, md: Any, ref: str | int) -> int:
    """A device id from a volume name or a decimal dev id (names win)."""
    if isinstance(ref, str) and ref in pool:
        return pool.thin(ref).dev_id
    try:
        dev_id = int(ref)
    except (TypeError, ValueError):
        raise NotFound(f"pool {pool.path}: no thin volume named {ref!r}") from None
    if not any(d.dev_id == dev_id for d in md.devices):
        raise NotFound(f"pool {pool.path}: no thin device with id {dev_id}")
    return dev_id



def op_delta(pool: Any, left: str | int, right: str | int, verbose: bool = False, metadata_snap: bool = False,
             as_json: bool = False) -> Any:
    """thin_delta between two volumes (names or dev ids): its XML as text, or its records with ``as_json``."""
    from thinpool.interop import thin_delta
    md = _metadata(pool, metadata_snap)
    a, b = _dev_id(pool, md, left), _dev_id(pool, md, right)
    if as_json:
        return {"left": a, "right": b, "ranges": thin_delta.delta(md, a, b)}
    return thin_delta.format_delta(md, a, b, verbose=verbose)


register_op("delta", op_delta, write=False, render=lambda text: text)


def op_rmap(pool: Any, regions: list[str], metadata_snap: bool = False, as_json: bool = False) -> Any:
    """thin_rmap for data-block regions ``"B..E"``: its text, or its records with ``as_json``
    (each record also names the volume)."""
    from thinpool.interop import thin_rmap
    md = _metadata(pool, metadata_snap)
    if as_json:
        records = thin_rmap.rmap(md, regions)
        names = {t.dev_id: t.name for t in pool.thins()}
        return [{**r, "name": names.get(r["dev_id"])} for r in records]
    return thin_rmap.format_rmap(md, regions)


register_op("rmap", op_rmap, write=False, render=lambda text: text)
