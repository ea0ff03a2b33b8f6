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


def test_rule_every_error_pickles_as_itself_across_processes() -> None:
    """Errors cross process boundaries by pickling (a sweep's worker processes, a dask cluster): every
    exported error comes back as its own class with its message, errno and attributes.  The OSError
    subclasses (NoSpace, Busy, ReadOnlyIO, PermissionDenied, HostIOError, ...) used to fail to load
    (OSError pickles ``(errno, message)`` for a one-argument constructor), and a NoSpace raised in a
    sweep's worker surfaced as BrokenProcessPool."""
    import errno
    import pickle
    made = []
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            made.append(cls(f"pool /p: {name} happened"))
    made += [errors.HostIOError("pool /p: punching the data file failed", errno.ENOSPC, "/p/data", blocks=[3, 4]),
             errors.TraceError("bad record", path="t.iolog", line=7),
             errors.MetadataCorrupt("bad node", structure="btree", block=12)]
    made.append(errors.DataDeviceError("pool /p: writing volume 'v' at offset 0 to the data file failed",
                                       errno.ENOSPC, "/p/data"))
    assert any(isinstance(e, OSError) for e in made)
    for e in made:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e)
        assert (str(back), back.args, vars(back)) == (str(e), e.args, vars(e))
        if isinstance(e, OSError):
            assert (back.errno, back.strerror, back.filename) == (e.errno, e.strerror, e.filename)
            assert "[Errno" not in str(e)  # printed as the message
    assert pickle.loads(pickle.dumps(made[-4])).blocks == [3, 4]


def _raise_no_space(_: int) -> None:
    raise errors.NoSpace("pool /p: out of data space")


def test_rule_no_space_in_a_worker_process_reaches_the_caller_as_no_space() -> None:
    """What the sweeps do: a NoSpace raised in a ProcessPoolExecutor worker is NoSpace in the caller."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as ex:
        fut = ex.submit(_raise_no_space, 0)
        try:
            fut.result(timeout=60)
        except errors.NoSpace as exc:
            assert str(exc) == "pool /p: out of data space" and exc.errno == 28
        else:
            raise AssertionError("the worker's NoSpace was lost")


_FAILING_DATA_WRITE = r"""
import json, os, resource, signal, sys
import numpy as np
from thinpool import Pool
from thinpool.errors import DataDeviceError
pool = Pool.create(sys.argv[1], data_size="4MiB", block_size="64KiB")
vol = pool.create_thin("v", "4MiB")
vol.write(0, b"a" * 65536)                      # block 0, below the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # past the limit a write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
out = []
for how in ("write", "write_many"):
    try:
        for i in range(1, 40):
            if how == "write":
                vol.write(i * 65536, b"x" * 65536)
            else:
                vol.write_many(np.arange(i, 40, dtype=np.int64) * 65536, [b"y" * 65536] * (40 - i))
                break
    except DataDeviceError as exc:
        out.append({"how": how, "str": str(exc), "errno": exc.errno, "filename": exc.filename})
print(json.dumps(out))
"""


def test_rule_a_failed_data_write_names_the_pool_volume_and_offset(tmp_path) -> None:
    """A data-file write the host refuses (here EFBIG past RLIMIT_FSIZE, as a full filesystem's ENOSPC)
    is DataDeviceError whose message names the pool, volume, offset and file, with errno and filename
    set.  It used to print as ``[Errno 27] None: '<pool>/data'``: errno and filename were set after
    construction, and OSError then formats them instead of the message."""
    import json
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = subprocess.run([sys.executable, "-c", _FAILING_DATA_WRITE, str(tmp_path / "p")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert [g["how"] for g in got] == ["write", "write_many"], got
    data = str(tmp_path / "p" / "data")
    for g in got:
        assert g["errno"] == 27 and g["filename"] == data, g
        assert g["str"].startswith(f"pool {tmp_path / 'p'}: ") and "'v'" in g["str"] and data in g["str"], g
        assert "File too large" in g["str"] and "[Errno" not in g["str"], g
