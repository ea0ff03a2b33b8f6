"""The snapshotter's input rules: what a namespace, a snapshot key (or committed name) and a set of
labels may be, checked before anything is looked up or stored.

Keys and labels are stored in the pool's own metadata (the snapshotter's records), which has a fixed
size, so they are bounded in bytes as well as in form; every message quotes a value cut short (a key
may be megabytes long).  containerd's rules where it has them (the namespace pattern, 4,096 bytes per
label); thinpool's where it has none (key length, the labels' total).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import InvalidArgument, shown

#: containerd: len(key) + len(value) of one label, in UTF-8 bytes
MAX_LABEL_BYTES = 4096
#: the longest snapshot key (or committed name), in UTF-8 bytes: keys live in the pool's records,
#: inside its fixed-size metadata, so three 4 MiB keys ran a 16 MiB metadata out of space
MAX_KEY_BYTES = 4096
#: all labels of one snapshot together (keys + values, UTF-8 bytes), for the same reason
MAX_LABELS_TOTAL = 64 << 10
#: the longest namespace (containerd's)
MAX_NAMESPACE_CHARS = 76
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*\Z")  # containerd's namespace rule


def check_namespace(namespace: Any) -> None:
    """Raise :class:`InvalidArgument` unless ``namespace`` is containerd's form: letters and digits,
    single '.', '_' or '-' between them, at most 76 characters."""
    if not isinstance(namespace, str) or len(namespace) > MAX_NAMESPACE_CHARS or not _NAMESPACE_RE.match(namespace):
        raise InvalidArgument(f"invalid snapshotter namespace {shown(namespace)}: letters, digits and single "
                              f"'.', '_' or '-' between them, at most {MAX_NAMESPACE_CHARS} characters")


def check_key(key: Any, what: str) -> str:
    """``key`` (a snapshot's ``what``: key, name, parent) as the string it must be, or
    :class:`InvalidArgument`: a non-empty string of at most :data:`MAX_KEY_BYTES` UTF-8 bytes without
    control characters."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"snapshot {what} must be a non-empty string, got {shown(key)}")
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise InvalidArgument(f"snapshot {what} {shown(key)} is not valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise InvalidArgument(f"snapshot {what} {shown(key)} is {size} bytes long (at most {MAX_KEY_BYTES})")
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in key):
        raise InvalidArgument(f"snapshot {what} {shown(key)} contains control characters")
    return key


def check_labels(labels: Any, key: str) -> dict[str, str]:
    """Snapshot ``key``'s labels as a new dict (``{}`` for None), or :class:`InvalidArgument`: each
    label maps a non-empty string to a string, UTF-8, at most :data:`MAX_LABEL_BYTES` (key + value),
    all of them at most :data:`MAX_LABELS_TOTAL`."""
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise InvalidArgument(f"snapshot {shown(key)}: labels must be a mapping of strings, got "
                              f"{type(labels).__name__}")
    total = 0
    for k, v in labels.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise InvalidArgument(f"snapshot {shown(key)}: label {shown(k)}={shown(v)} must map a non-empty "
                                  f"string to a string")
        try:
            size = len(k.encode()) + len(v.encode())
        except UnicodeEncodeError:
            raise InvalidArgument(f"snapshot {shown(key)}: label {shown(k)} is not valid UTF-8") from None
        if size > MAX_LABEL_BYTES:
            raise InvalidArgument(f"snapshot {shown(key)}: label {shown(k)} is longer than {MAX_LABEL_BYTES} "
                                  f"bytes (key + value)")
        total += size
    if total > MAX_LABELS_TOTAL:
        raise InvalidArgument(f"snapshot {shown(key)}: its {len(labels)} labels take {total} bytes (at most "
                              f"{MAX_LABELS_TOTAL} in all)")
    return dict(labels)
