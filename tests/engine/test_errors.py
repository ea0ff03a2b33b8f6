"""The one error hierarchy: every ThinpoolError subclass lives in thinpool/errors.py and is exported.

A class defined elsewhere would cross a served pool's control socket as a plain ThinpoolError (the
client rebuilds errors by class name from ``thinpool.errors.__all__``), so this walks every module of
the package and checks where each subclass is defined.
"""

from __future__ import annotations

import importlib
import pkgutil

import thinpool
from thinpool import errors
from thinpool.errors import ThinpoolError


def _all_subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    todo = [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.add(sub)
                todo.append(sub)
    return out


def _import_every_module() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(thinpool.__path__, "thinpool."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # importing it would run the CLI
        importlib.import_module(info.name)  # an import failure is a failure here, not a skip
        names.append(info.name)
    return names


def test_every_thinpool_error_is_defined_in_errors_and_exported() -> None:
    modules = _import_every_module()
    assert "thinpool.containers.snapshotter" in modules and "thinpool.nbd.protocol" in modules
    ours = {c for c in _all_subclasses(ThinpoolError) if c.__module__.startswith("thinpool")}
    outside = sorted(f"{c.__module__}.{c.__qualname__}" for c in ours if c.__module__ != "thinpool.errors")
    assert outside == [], f"ThinpoolError subclasses defined outside thinpool/errors.py: {outside}"
    missing = sorted(c.__name__ for c in ours if c.__name__ not in errors.__all__)
    assert missing == [], f"not in thinpool.errors.__all__: {missing}"
    for name in errors.__all__:
        assert getattr(errors, name).__module__ == "thinpool.errors"


def test_former_outside_classes_keep_their_bases() -> None:
    assert issubclass(errors.MetadataSpaceExhausted, errors.ReadOnly)
    assert issubclass(errors.DataDeviceError, OSError)
    assert issubclass(errors.DuplicateDevice, errors.InvalidArgument)
    assert issubclass(errors.DuplicateDevice, errors.AlreadyExists)
    assert issubclass(errors.FullOpenRequired, ThinpoolError)
    # the modules that raise them still name the same class
    from thinpool import devtable, mdstore, thin
    from thinpool.interop import xml
    from thinpool.nbd import protocol
    assert mdstore.MetadataSpaceExhausted is errors.MetadataSpaceExhausted
    assert thin.DataDeviceError is errors.DataDeviceError
    assert xml.DuplicateDevice is errors.DuplicateDevice
    assert protocol.ProtocolError is errors.ProtocolError
    assert devtable.FullOpenRequired is errors.FullOpenRequired
