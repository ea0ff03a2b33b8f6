"""A data file truncated by another program under an open pool: every read of the library -- per call,
batched, into a buffer, an export -- and a copy-on-write break that must read the old block raise an
error naming the data file; none returns wrong bytes, none kills the process with SIGBUS.

Each case runs in a child process, so a SIGBUS fails the test (the child's exit status) instead of
killing pytest.  The pool's lock keeps only thinpool's own programs off a pool's files; a program that
truncates the data file anyway takes the blocks past the new end (dm-thin's equivalent: a data device
that shrinks under the pool, whose I/O beyond the end then fails with EIO).
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from typing import Any

from thinpool import Pool

BS = 64 * 1024

_CHILD = r"""
import json, os, sys
import numpy as np
from thinpool import Pool, images
from thinpool.errors import ThinpoolError

BS = 65536
path, cut, image = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {}
p = Pool.open(path)
v, s = p.thin("v"), p.thin("s")
assert v.read(5 * BS + 7, 9) == bytes([5]) * 9  # the file is whole: every path works
data = p.data.path
os.truncate(data, cut)  # another program, under the open pool


def outcome(name, call):
    try:
        got = call()
    except ThinpoolError as exc:
        out[name] = {"error": type(exc).__name__, "errno": exc.errno, "names_file": data in str(exc),
                     "filename": exc.filename == data, "says_truncated": "truncated under" in str(exc)}
    else:
        got = got.tobytes() if isinstance(got, np.ndarray) else got
        out[name] = {"bytes": got[:8].hex() if isinstance(got, bytes) else "done"}


buf = np.empty(3 * BS, np.uint8)
outcome("read one block", lambda: v.read(5 * BS + 7, 9))
outcome("read a whole block", lambda: v.read(6 * BS, BS))
outcome("read across blocks", lambda: v.read(5 * BS + 100, 2 * BS))
outcome("pread", lambda: v.pread(5 * BS + 7, 9))
outcome("read_many", lambda: v.read_many([5 * BS, 6 * BS], 4096))
outcome("read_into", lambda: v.read_into(5 * BS, buf))
outcome("snapshot read", lambda: s.read(5 * BS + 7, 9))
outcome("export", lambda: images.export_image(p, "v", image))
outcome("copy-on-write break", lambda: s.write(6 * BS + 10, b"new"))
outcome("unmapped read", lambda: v.read(40 * BS, 16))
outcome("first write", lambda: v.write(41 * BS, b"x"))  # a new block, pwrite past the new end: re-extends
outcome("commit", p.commit)
out["mode"] = p.mode.value
outcome("read after the commit", lambda: v.read(5 * BS + 7, 9))
print(json.dumps(out), flush=True)
p.close(commit=False)
"""


def _run_child(tmp_path: Any, cut: int) -> dict[str, Any]:
    path = tmp_path / "pool"
    with Pool.create(path, data_size="8MiB", block_size="64KiB") as p:
        v = p.create_thin("v", "4MiB")
        for b in range(0, 20):
            v.write(b * BS, bytes([b]) * BS)  # data blocks 0..19 in order
        p.snapshot("v", "s")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(cut), str(tmp_path / "out.img")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != -signal.SIGBUS, f"killed by SIGBUS: {r.stderr[-2000:]}"
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    return json.loads(r.stdout.splitlines()[-1])


def _failed_naming_the_data_file(res: dict[str, Any], name: str, error: str = "HostIOError") -> None:
    got = res[name]
    assert got.get("error") == error and got["errno"] == errno.EIO and got["names_file"] and got["filename"], \
        (name, got)
    assert got["says_truncated"], (name, got)


def test_kernel_rule_data_device_shrunk_under_the_pool_fails_reads_with_eio_never_sigbus(tmp_path: Any) -> None:
    """The data file cut to nothing: every mapped read fails with HostIOError (EIO) naming the file --
    never SIGBUS, never zeroes in place of the lost bytes -- while an unmapped range still reads as
    zeroes (it never touches the file); a copy-on-write break, which must read the old block, fails
    without mapping a block (DataDeviceError)."""
    res = _run_child(tmp_path, 0)
    for name in ("read one block", "read a whole block", "read across blocks", "pread", "read_many",
                 "read_into", "snapshot read", "export"):
        _failed_naming_the_data_file(res, name)
    _failed_naming_the_data_file(res, "copy-on-write break", "DataDeviceError")
    assert res["unmapped read"] == {"bytes": "00" * 8}, res
    _committing_fails_the_pool(res)


def _committing_fails_the_pool(res: dict[str, Any]) -> None:
    """A first write (a new block, past the cut) re-extends the file up to it -- no error, pwrite past
    the end -- but the next commit finds the file shorter than the pool and refuses, naming the
    truncation; the pool is in fail mode, where every I/O fails (dm-thin's PM_FAIL), reads included."""
    assert res["first write"] == {"bytes": "done"}, res
    _failed_naming_the_data_file(res, "commit")
    assert res["mode"] == "fail", res
    assert res["read after the commit"].get("errno") == errno.EIO, res  # block 5 too: the pool has failed


def test_data_file_cut_inside_the_pool_fails_only_reads_past_its_new_end(tmp_path: Any) -> None:
    """The data file cut in the middle of data block 6 (volume block 6): block 5 still reads its bytes
    on every path; reads that reach block 6 fail with EIO naming the file, whole or partly past the
    end, per call or batched."""
    res = _run_child(tmp_path, 6 * BS + 100)
    assert res["read one block"] == {"bytes": "05" * 8} and res["pread"] == {"bytes": "05" * 8}, res
    assert res["snapshot read"] == {"bytes": "05" * 8}, res
    for name in ("read a whole block", "read across blocks", "read_many", "read_into", "export"):
        _failed_naming_the_data_file(res, name)
    _failed_naming_the_data_file(res, "copy-on-write break", "DataDeviceError")
    _committing_fails_the_pool(res)
