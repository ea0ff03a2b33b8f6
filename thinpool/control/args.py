"""Type checks for the arguments of a control-socket request, before an op sees them.

A request on ``<pool>/control.sock`` carries JSON: any argument can be any JSON value.  An op's
Python signature says what it takes (``name: str``, ``size: int``, ``names: list[str]``,
``dev_id: int | None``, ``labels: dict[str, str] | None`` ...); :func:`check_op_args` holds every
argument to that signature *before* the op, or any check made on its behalf (the serving process's
"is this volume open over NBD" check), runs.  Without it ``{"path": 4}`` reached ``open()`` as a file
descriptor and ``{"names": "vol"}`` was iterated character by character.

Rules (all failures are :class:`~thinpool.errors.InvalidArgument` naming the op and the argument):

* ``str``: a JSON string without NUL (no file name and no volume name holds one); lone surrogates
  are allowed here (a path the CLI sent with ``os.fsdecode`` round-trips as one) -- volume names are
  checked further by :func:`thinpool.rules.check_new_name`;
* ``int``: a JSON integer (not ``true``/``false``, not ``1.5``) in the signed 64-bit range;
* ``bool``: ``true`` or ``false`` only;
* ``list[X]`` / ``dict[str, X]``: a JSON array / object whose items are all ``X``;
* ``Any``: any JSON value; ``X | None``: ``null`` too;
* path arguments (:data:`PATH_ARGS`: ``path``, ``input``, ``output``, ``image``, ``external_origin``)
  must be absolute:
  the serving process has its own working directory, so a relative path would land there (the CLI
  sends absolute paths); ``-`` (standard input/output) is left to the op;
* unknown argument names and missing required arguments are refused.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from functools import lru_cache
from typing import Any, Callable

from thinpool.errors import InvalidArgument

INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1
#: argument names that are file paths
PATH_ARGS = frozenset({"path", "input", "output", "image", "external_origin"})


def _json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _describe(hint: Any) -> str:
    """A JSON-ish description of a type hint ("a string", "an array of strings", ...)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return "any value"
    if hint is type(None) or hint is None:
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"an array of ({_describe(item)})"
    if origin is dict:
        args = typing.get_args(hint)
        return f"an object of ({_describe(args[1]) if len(args) == 2 else 'any value'})"
    return {str: "a string", int: "an integer", bool: "a boolean", float: "a number",
            list: "an array", dict: "an object"}.get(hint, str(hint))


def _problem(value: Any, hint: Any) -> str | None:
    """None if ``value`` fits ``hint``, else why not (a short phrase)."""
    if hint is Any or hint is object:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [_problem(value, a) for a in typing.get_args(hint)]
        if any(p is None for p in problems):
            return None
        # the most specific reason: that of the alternative of the same JSON kind, if any
        same_kind = [p for a, p in zip(typing.get_args(hint), problems)
                     if _kind_matches(value, a) and p is not None]
        return same_kind[0] if same_kind else f"got {_json_type(value)}"
    if hint is type(None) or hint is None:
        return None if value is None else f"got {_json_type(value)}"
    if hint is bool:
        return None if isinstance(value, bool) else f"got {_json_type(value)}"
    if hint is int:
        if type(value) is not int:
            return f"got {_json_type(value)}"
        if not INT_MIN <= value <= INT_MAX:
            return "the integer is outside the signed 64-bit range"
        return None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"got {_json_type(value)}"
        return None
    if hint is str:
        if not isinstance(value, str):
            return f"got {_json_type(value)}"
        if "\x00" in value:
            return "the string contains a NUL character"
        return None
    if origin is list or hint is list:
        if not isinstance(value, list):
            return f"got {_json_type(value)}"
        (item,) = typing.get_args(hint) or (Any,)
        for i, v in enumerate(value):
            p = _problem(v, item)
            if p is not None:
                return f"item {i}: {p}"
        return None
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return f"got {_json_type(value)}"
        args = typing.get_args(hint)
        item = args[1] if len(args) == 2 else Any
        for k, v in value.items():
            if not isinstance(k, str):
                return "object keys must be strings"
            p = _problem(v, item)
            if p is not None:
                return f"key {k[:40]!r}: {p}"
        return None
    if isinstance(hint, type):
        return None if isinstance(value, hint) else f"got {_json_type(value)}"
    return None  # a hint this checker does not know: the op checks its argument itself


def _kind_matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    if origin is int:
        return type(value) is int
    if isinstance(origin, type):
        return isinstance(value, origin) and not (origin is not bool and isinstance(value, bool))
    return False


@lru_cache(maxsize=None)
def _signature(func: Callable[..., Any]) -> tuple[tuple[str, Any, bool], ...]:
    """(name, type hint, required) for every argument after the pool."""
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # a hint naming something only imported for type checking
        hints = {}
    out = []
    params = list(inspect.signature(func).parameters.values())[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out.append((p.name, hints.get(p.name, Any), p.default is inspect.Parameter.empty))
    return tuple(out)


def check_op_args(op_name: str, func: Callable[..., Any], args: dict[str, Any]) -> None:
    """Raise InvalidArgument unless ``args`` (decoded JSON) fit ``func``'s signature (see the module
    docstring); ``func``'s first parameter is the pool and is not part of ``args``."""
    if not isinstance(args, dict):
        raise InvalidArgument(f"bad arguments for op {op_name!r}: arguments must be a JSON object, "
                              f"got {_json_type(args)}")
    sig = _signature(func)
    known = {name for name, _, _ in sig}
    for key in args:
        if not isinstance(key, str) or key not in known:
            raise InvalidArgument(f"bad arguments for op {op_name!r}: unknown argument {str(key)[:60]!r} "
                                  f"(takes: {', '.join(sorted(known)) or 'none'})")
    for name, hint, required in sig:
        if name not in args:
            if required:
                raise InvalidArgument(f"bad arguments for op {op_name!r}: missing argument {name!r} "
                                      f"({_describe(hint)})")
            continue
        problem = _problem(args[name], hint)
        if problem is not None:
            raise InvalidArgument(f"bad arguments for op {op_name!r}: argument {name!r} must be "
                                  f"{_describe(hint)}: {problem}")
        value = args[name]
        if name in PATH_ARGS and isinstance(value, str) and value != "-" and not os.path.isabs(value):
            raise InvalidArgument(f"bad arguments for op {op_name!r}: argument {name!r} must be an absolute "
                                  f"path (the serving process has its own working directory), got "
                                  f"{value[:80]!r}")


__all__ = ["check_op_args", "INT_MIN", "INT_MAX", "PATH_ARGS"]
