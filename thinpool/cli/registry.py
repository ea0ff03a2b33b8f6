"""The op table: every pool-touching CLI command as a plain function, and how the CLI runs one.

An *op* is ``func(pool, **kwargs) -> JSON-able result`` registered in :data:`OPS` under a name (the CLI
verb, e.g. ``"create-thin"``) with :func:`register_op`, with a write flag and a text renderer.  Keyword
arguments must be JSON-able (paths absolute: a serving process has its own cwd).  The ops themselves
live in :mod:`thinpool.cli.ops` (pool, volume and interop ops), :mod:`thinpool.cli.stream_ops` (data
streaming) and :mod:`thinpool.cli.containers_cmds` (the snapshotter verbs).

Routing (:func:`run_op`)
------------------------
* If ``<pool>/control.sock`` accepts a connection, the pool is being served (``thinpool serve``): the
  request goes to the serving process (:mod:`thinpool.control.client`), which answers it with this
  table (:func:`op_table`, given to :class:`~thinpool.control.server.ControlServer`); an error comes
  back as the same :mod:`thinpool.errors` class.
* Otherwise the pool is opened locally (read-only for reporting ops), the op runs, write ops commit, and
  the pool is closed.  A write op runs in one :meth:`~thinpool.pool.Pool.batch` (its messages commit
  once, at its end); a failed op commits nothing.  Ops registered with ``light`` (``status``, plain
  ``ls``, ``snapshot``) open only the pool's device table (:class:`thinpool.devtable.DeviceTable`), so
  the command never imports numpy or reads the block map.

A command that writes a large report straight to its own stdout (``thinpool ls``'s table) may first
try :func:`run_local`: it runs a function on the light device table in this process when the pool is
not served, and otherwise leaves the caller to :func:`run_op`.

Streaming ops (``write``, ``read``, ``import``, ``export``) are registered with ``local_only=True``: they run
only on a pool that is not being served; on a served pool they fail with FailedPrecondition telling the
user to go through the volume's NBD export instead (e.g. ``nbdcopy``).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping, NamedTuple

from thinpool.control import client
from thinpool.errors import FailedPrecondition, InvalidArgument

#: modules that register ops and no commands (the command modules register theirs when loaded)
OP_MODULES = ("thinpool.cli.ops", "thinpool.cli.stream_ops")


class OpSpec(NamedTuple):
    """A registered op: its function, whether it modifies the pool, its text renderer, and whether it
    must run in-process (streams data through the client's files).  It has the attributes
    :class:`thinpool.control.server.ControlOp` asks for.  (A NamedTuple, not a dataclass: a
    dataclass costs every command about a millisecond to make at import.)"""

    name: str
    func: Callable[..., Any]
    write: bool
    render: Callable[[Any], str] | None = None
    local_only: bool = False
    #: true for arguments with which the op needs only the device table (it then runs on a
    #: :class:`thinpool.devtable.DeviceTable`: no numpy, no block map)
    light: Callable[[dict[str, Any]], bool] | None = None


#: All ops registered so far, by name (:func:`op_table` loads them all).
OPS: dict[str, OpSpec] = {}


def register_op(name: str, func: Callable[..., Any], *, write: bool,
                render: Callable[[Any], str] | None = None, local_only: bool = False,
                light: Callable[[dict[str, Any]], bool] | None = None) -> OpSpec:
    """Register ``func`` as op ``name`` (ValueError if the name is taken); see :class:`OpSpec`."""
    if name in OPS:
        raise ValueError(f"op {name!r} is registered twice")
    spec = OpSpec(name, func, write, render, local_only, light)
    OPS[name] = spec
    return spec


def op_table() -> Mapping[str, OpSpec]:
    """Every op (all op and command modules imported): the table a serving process answers with."""
    for module in OP_MODULES:
        importlib.import_module(module)
    from thinpool.cli import load_all_commands
    load_all_commands()
    return OPS


def get_op(name: str) -> OpSpec:
    """The op called ``name`` (InvalidArgument if none).  Modules register ops as they are imported,
    so an unknown name first loads them all (:func:`op_table`)."""
    if name not in OPS:
        op_table()
    try:
        return OPS[name]
    except KeyError:
        raise InvalidArgument(f"unknown op {name[:80]!r} (known: {', '.join(sorted(OPS))})") from None


def run_op(pool_path: str, name: str, kwargs: dict[str, Any] | None = None, write: bool | None = None) -> Any:
    """Run op ``name`` on the pool at ``pool_path``: through its serving process if it is served,
    else in-process (see the module docstring).  ``write`` overrides the op's registered mode."""
    spec = get_op(name)
    kwargs = dict(kwargs or {})
    write = spec.write if write is None else write
    sock = client.connect(pool_path)
    if sock is not None:
        if spec.local_only:
            sock.close()
            raise FailedPrecondition(
                f"pool {os.path.abspath(pool_path)} is being served; '{name}' streams data and runs only on "
                f"a pool that is not served -- use the volume's NBD export instead (e.g. nbdcopy)")
        return client.call(sock, name, kwargs, os.path.abspath(pool_path))
    if spec.light is not None and spec.light(kwargs):
        from thinpool.devtable import DeviceTable, FullOpenRequired
        try:
            table = DeviceTable.open(pool_path, read_only=not write)
        except FullOpenRequired:
            pass
        else:
            try:
                if write:
                    with table.batch():  # one commit for the op (its messages' commits wait for it)
                        result = spec.func(table, **kwargs)
                else:
                    result = spec.func(table, **kwargs)
            finally:
                table.close(commit=False)
            return result
    from thinpool.pool import Pool
    pool = Pool.open(pool_path, read_only=not write)
    try:
        if write:
            with pool.batch():  # one commit for the op; a failure drops what it did
                result = spec.func(pool, **kwargs)
            pool.commit_passdown()  # a discard's freed blocks: punched before the process ends
        else:
            result = spec.func(pool, **kwargs)
    except BaseException:
        _close(pool)
        raise
    _close(pool)
    return result


def run_local(pool_path: str, func: Callable[[Any], Any]) -> Any:
    """``func(table)`` on the pool's device table (:class:`thinpool.devtable.DeviceTable`), opened
    read-only in this process, when the pool is not being served and opens light; None, with
    ``func`` not called, otherwise (the caller then runs its op through :func:`run_op`).  For a
    reporting command that writes straight to this process's own files (``thinpool ls``'s table to
    stdout), which an op cannot do: its result crosses the control socket of a served pool as JSON."""
    sock = client.connect(pool_path)
    if sock is not None:
        sock.close()
        return None
    from thinpool.devtable import DeviceTable, FullOpenRequired
    try:
        table = DeviceTable.open(pool_path, read_only=True)
    except FullOpenRequired:
        return None
    try:
        return func(table)
    finally:
        table.close(commit=False)


def _close(pool: Any) -> None:
    # A first-time JIT compile can leave a reference cycle holding a view of the mmap'd data file:
    # closing the map then collects cycles and retries (DataDevice._unmap), only when it must -- a
    # full collection here on every op cost ~0.1-0.5 s in a process with numba's objects loaded.
    pool.close(commit=False)


__all__ = ["OPS", "OP_MODULES", "OpSpec", "register_op", "op_table", "get_op", "run_op", "run_local"]
