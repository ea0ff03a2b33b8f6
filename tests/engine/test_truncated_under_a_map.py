"""A pool file truncated by another program at the moment a memory map of it is read: the data file
between ``Thin.read``'s lookup and its copy from the data file's map, and the metadata file under a big
pool's node rows mapped from it, before the next commit.  Both used to kill the process with SIGBUS
(exit -7); now the fault is counted (:mod:`thinpool.faultguard`) and the call fails with HostIOError
(EIO) naming the file -- never wrong bytes, never SIGBUS.

Each case runs in a child process, so a SIGBUS fails the test (its exit status) instead of killing
pytest.  dm-thin's equivalent is a device that shrinks under the pool: its I/O past the end fails with EIO.
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from thinpool import Pool, faultguard

BS = 64 * 1024

pytestmark = pytest.mark.skipif(not faultguard.available(),
                                reason="no SIGBUS guard on this host (not Linux x86-64/aarch64, or no llvmlite)")

_DATA_CHILD = r"""
import json, os, sys
from thinpool import Pool
from thinpool.errors import ThinpoolError

BS = 65536
path, cut = sys.argv[1], int(sys.argv[2])
out = {}
p = Pool.open(path)
v = p.thin("v")
assert v.read(6 * BS + 7, 9) == bytes([6]) * 9  # binds the one-block read's lookup
data = p.data.path
ctx = p._engine
real = ctx.locate_read_fn
cuts = []


def lookup_then_truncate(*args):
    pos = real(*args)  # the lookup (and, where the map is not guarded, the file's length check) passed
    if not cuts:
        os.truncate(data, cut)  # another program, in the instant before the copy from the map
        cuts.append(cut)
    return pos


ctx.locate_read_fn = lookup_then_truncate


def outcome(name, call):
    try:
        got = call()
    except ThinpoolError as exc:
        out[name] = {"error": type(exc).__name__, "errno": exc.errno, "names_file": data in str(exc),
                     "says_truncated": "truncated under" in str(exc)}
    else:
        out[name] = {"bytes": got[:8].hex()}


outcome("read cut between lookup and copy", lambda: v.read(6 * BS + 8192, 9))
outcome("read again", lambda: v.read(6 * BS + 8192, 9))
outcome("read below the cut", lambda: v.read(5 * BS + 7, 9))
print(json.dumps(out), flush=True)
p.close(commit=False)
"""


def _pool_with_blocks(tmp_path: Any) -> Any:
    path = tmp_path / "pool"
    with Pool.create(path, data_size="8MiB", block_size="64KiB") as p:
        v = p.create_thin("v", "4MiB")
        for b in range(0, 10):
            v.write(b * BS, bytes([b]) * BS)  # data blocks 0..9 in order
    return path


def _child(code: str, *args: Any) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode != -signal.SIGBUS, f"killed by SIGBUS: {r.stderr[-2000:]}"
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("cut", [0, 6 * BS + 100])
def test_kernel_rule_data_device_shrunk_between_lookup_and_copy_is_eio_not_sigbus(tmp_path: Any, cut: int) -> None:
    """The data file cut after the one-block read found its block (and the file long enough) but
    before the bytes were copied from the map: HostIOError (EIO) naming the data file and saying it
    was truncated, again on the next read of that block, and a block below the cut still reads its
    bytes."""
    res = _child(_DATA_CHILD, _pool_with_blocks(tmp_path), cut)
    for name in ("read cut between lookup and copy", "read again"):
        got = res[name]
        assert got.get("error") == "HostIOError" and got["errno"] == errno.EIO and got["names_file"] \
            and got["says_truncated"], (name, res)
    if cut:
        assert res["read below the cut"] == {"bytes": "05" * 8}, res
    else:
        assert res["read below the cut"].get("errno") == errno.EIO, res


_METADATA_CHILD = r"""
import json, os, sys
import numpy as np
from thinpool import nodestore
nodestore.POPULATE_MIN = 1  # the dense leaves' pages mapped from the file, as a big pool's open maps them
from thinpool import Pool
from thinpool.errors import ThinpoolError

path, op = sys.argv[1], sys.argv[2]
out = {}
p = Pool.open(path)
v = p.thin("v")
out["mapped rows"] = int(p._leaf_disk.mapped.sum()) if p._leaf_disk.mapped is not None else 0
md = os.path.join(path, "metadata")
os.truncate(md, 16 * 4096)  # another program, under the open pool, before its next commit
calls = {"read": lambda: v.read(7 * 65536 + 3, 5), "pread": lambda: v.pread(7 * 65536, 4096),
         "read_many": lambda: v.read_many([65536 * 3, 65536 * 9], 512).tobytes(),
         "write": lambda: v.write(8 * 65536, b"new"), "discard": lambda: v.discard(0, 4 * 65536),
         "mappings": lambda: bytes(v.mappings()[1].astype(np.uint8))}


def outcome(name, call):
    try:
        got = call()
    except ThinpoolError as exc:
        out[name] = {"error": type(exc).__name__, "errno": exc.errno, "names_file": md in str(exc)}
    else:
        out[name] = {"done": got[:8].hex() if isinstance(got, bytes) else got}


outcome(op, calls[op])
out["mode"] = p.mode.value
outcome("commit", p.commit)
outcome("read after", lambda: v.read(0, 5))
print(json.dumps(out), flush=True)
p.close(commit=False)
"""


@pytest.mark.parametrize("op", ["read", "pread", "read_many", "write", "discard", "mappings"])
def test_kernel_rule_metadata_rows_lost_under_a_mapped_pool_fail_the_pool_not_sigbus(tmp_path: Any, op: str) -> None:
    """A big pool's dense leaves are mapped from the metadata file; another program truncates the file
    and the next call touches such a row before any commit: the call raises HostIOError (EIO) naming
    the metadata file instead of serving holes (zeroes) or killing the process, the pool is in fail
    mode, and the commit and later reads are refused."""
    path = tmp_path / "p"
    with Pool.create(path, data_size="64MiB", block_size="64KiB") as p:
        vol = p.create_thin("v", "32MiB")
        vol.write_many(np.arange(300, dtype=np.int64) * 65536, np.full((300, 512), 7, np.uint8))  # a dense leaf
    res = _child(_METADATA_CHILD, path, op)
    assert res["mapped rows"] > 0, res
    got = res[op]
    assert got.get("error") == "HostIOError" and got["errno"] == errno.EIO and got["names_file"], res
    assert res["mode"] == "fail", res
    assert "error" in res["commit"] and "error" in res["read after"], res
