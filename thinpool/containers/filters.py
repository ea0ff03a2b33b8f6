"""containerd snapshot filters (``kind==committed,labels."a.b"~=^x``) for
:meth:`thinpool.containers.snapshotter.Snapshotter.walk`: :func:`parse_filter` turns one filter string into
selectors that all must match an :class:`~thinpool.containers.snapshotter.Info`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidArgument

if TYPE_CHECKING:
    from .snapshotter import Info

__all__ = ["parse_filter", "KINDS"]

KINDS = ("view", "active", "committed")

_FIELDS = ("kind", "name", "parent", "labels")
_TOKEN_RE = re.compile(r'\s*(?:(?P<quoted>"(?:[^"\\]|\\.)*")|(?P<ident>[A-Za-z0-9_\-/:]+)|(?P<op>==|!=|~=)'
                       r'|(?P<dot>\.)|(?P<comma>,))')


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


@dataclass(frozen=True)
class _Selector:
    path: tuple[str, ...]
    op: str | None
    value: str | None

    def matches(self, info: Info) -> bool:
        if self.path[0] == "labels":
            key = ".".join(self.path[1:])
            present = key in info.labels
            actual = info.labels.get(key, "")
        else:
            actual = getattr(info, self.path[0])
            present = actual != ""
        if self.op is None:
            return present
        if self.op == "==":
            return present and actual == self.value
        if self.op == "!=":
            return not present or actual != self.value
        return present and re.search(self.value or "", actual) is not None


def parse_filter(text: str) -> list[_Selector]:
    """Parse one containerd filter string into its AND-ed selectors.

    Supported subset of containerd's filter syntax:

    * ``field==value``, ``field!=value``, ``field~=regex`` (Python ``re.search``), or a bare ``field``
      (present / non-empty);
    * fields ``kind`` (view|active|committed), ``name``, ``parent`` and ``labels.<key>``; a label key
      with dots or other characters is quoted: ``labels."containerd.io/gc.root"``;
    * values are bare words (up to the next comma) or double-quoted strings with backslash escapes;
    * a comma ANDs selectors.  The empty string matches everything.
    """
    if not isinstance(text, str):
        raise InvalidArgument(f"snapshot filter must be a string, got {type(text).__name__}")
    selectors: list[_Selector] = []
    pos = 0
    n = len(text)

    def fail(msg: str) -> InvalidArgument:
        return InvalidArgument(f"snapshot filter {text!r}: {msg} at position {pos}")

    while pos < n:
        if text[pos:].strip() == "":
            break
        # field path
        path: list[str] = []
        while True:
            m = _TOKEN_RE.match(text, pos)
            if not m or not (m.group("ident") or m.group("quoted")):
                raise fail("expected a field name")
            path.append(m.group("ident") or _unquote(m.group("quoted")))
            pos = m.end()
            m = _TOKEN_RE.match(text, pos)
            if m and m.group("dot"):
                pos = m.end()
                continue
            break
        if path[0] not in _FIELDS:
            raise InvalidArgument(f"snapshot filter {text!r}: unknown field {path[0]!r} "
                                  f"(supported: kind, name, parent, labels.<key>)")
        if path[0] == "labels" and len(path) < 2:
            raise InvalidArgument(f"snapshot filter {text!r}: 'labels' needs a key, e.g. labels.\"k\"==v")
        if path[0] != "labels" and len(path) > 1:
            raise InvalidArgument(f"snapshot filter {text!r}: field {path[0]!r} has no sub-fields")
        op = value = None
        m = _TOKEN_RE.match(text, pos)
        if m and m.group("op"):
            op = m.group("op")
            pos = m.end()
            rest = text[pos:]
            stripped = rest.lstrip()
            pos += len(rest) - len(stripped)
            if stripped.startswith('"'):
                qm = re.match(r'"(?:[^"\\]|\\.)*"', stripped)
                if not qm:
                    raise fail("unterminated quoted value")
                value = _unquote(qm.group(0))
                pos += qm.end()
            else:
                end = text.find(",", pos)
                end = n if end < 0 else end
                value = text[pos:end].strip()
                if not value:
                    raise fail("expected a value")
                pos = end
            if op == "~=":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise InvalidArgument(f"snapshot filter {text!r}: bad regular expression {value!r}: {exc}") \
                        from None
            if path[0] == "kind" and op == "==" and value not in KINDS:
                raise InvalidArgument(f"snapshot filter {text!r}: kind must be one of {', '.join(KINDS)}")
        selectors.append(_Selector(tuple(path), op, value))
        m = _TOKEN_RE.match(text, pos)
        if m and m.group("comma"):
            pos = m.end()
            continue
        if text[pos:].strip():
            raise fail("expected ',' or the end of the filter")
        break
    return selectors
