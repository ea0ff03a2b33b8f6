"""A volume on an external origin, served over NBD to real clients (nbdcopy, nbdinfo, qemu-io).

dm-thin's rule: reads of unprovisioned blocks of an external-origin thin come from the origin (zeroes
past its end), a partial first write copies the block from the origin.  Over NBD that also means the
allocation map must not call an unprovisioned block below the origin's end a hole (nbdcopy would skip
it), and WRITE_ZEROES must write zeroes there instead of unmapping (which would expose the origin).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any, Iterator

import numpy as np
import pytest

from tests.support import require_tool
from thinpool import Pool
from thinpool.cli.registry import op_table
from thinpool.nbd.served import Served

pytestmark = pytest.mark.realtools

KiB, MiB = 1024, 1024 * 1024
BS = 64 * KiB
ORIGIN_BYTES = 5 * BS + 1000
VOL = 2 * MiB


def ok(*args: str) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{args[0]} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture()
def served() -> Iterator[dict[str, Any]]:
    root = tempfile.mkdtemp(prefix="nbdo", dir="/tmp")  # short: unix socket paths are limited to 108 bytes
    origin = os.path.join(root, "golden.img")
    data = np.random.default_rng(11).integers(1, 256, ORIGIN_BYTES, dtype=np.uint8).tobytes()
    with open(origin, "wb") as f:
        f.write(data)
    pool = os.path.join(root, "p")
    with Pool.create(pool, data_size=32 * MiB, block_size=BS) as p:
        p.create_thin("vm", VOL, external_origin=origin)
    s = Served(pool, op_table())
    s.start()
    try:
        yield {"root": root, "pool": pool, "origin": origin, "data": data, "served": s,
               "uri": s.export_uri("vm")}
    finally:
        s.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_kernel_rule_unprovisioned_reads_over_nbd_come_from_the_origin(served: dict[str, Any]) -> None:
    require_tool("nbdcopy", "nbdinfo")
    data, uri = served["data"], served["uri"]
    out = os.path.join(served["root"], "out.img")
    ok("nbdcopy", uri, out)
    with open(out, "rb") as f:
        assert f.read() == data + bytes(VOL - ORIGIN_BYTES)
    # the allocation map: data below the origin's end (an unprovisioned block there is the origin's data)
    extents = json.loads(ok("nbdinfo", "--map", "--json", uri))
    assert sum(e["length"] for e in extents) == VOL
    for e in extents:
        if e["offset"] < ORIGIN_BYTES:
            assert e["type"] == 0 and e["offset"] + e["length"] <= ORIGIN_BYTES, extents
        else:
            assert e["type"] == 3, extents  # hole|zero past the origin's end (nothing written there)


def test_kernel_rule_a_partial_write_over_nbd_copies_the_block_from_the_origin(served: dict[str, Any]) -> None:
    require_tool("qemu-io", "nbdcopy")
    data, uri, s = served["data"], served["uri"], served["served"]
    ok("qemu-io", "-f", "raw", "-c", "write -P 0x41 4096 512", "-c", f"write -P 0x42 {5 * BS + 100} 10",
       "-c", "write -z 65536 4096", "-c", "flush", uri)
    exp = bytearray(data + bytes(VOL - ORIGIN_BYTES))
    exp[4096:4608] = b"\x41" * 512
    exp[5 * BS + 100:5 * BS + 110] = b"\x42" * 10
    exp[BS:BS + 4096] = bytes(4096)  # write-zeroes inside the origin: real zeroes, not the origin again
    out = os.path.join(served["root"], "out.img")
    ok("nbdcopy", uri, out)
    with open(out, "rb") as f:
        assert f.read() == bytes(exp)
    with s.pool.locked():
        assert s.pool.thin("vm").mapped_blocks == 3
    with open(served["origin"], "rb") as f:
        assert f.read() == data  # never written


def test_a_changed_origin_refuses_the_export_and_the_server_keeps_serving(served: dict[str, Any]) -> None:
    """Opening an export activates its volume, which checks the origin (dm-thin: thin_ctr fails when
    the origin cannot be opened); a changed origin refuses that export only."""
    require_tool("nbdinfo")
    s = served["served"]
    with s.pool.locked():
        s.pool.create_thin("plain", MiB)
    with open(served["origin"], "ab") as f:
        f.write(b"changed")
    r = subprocess.run(["nbdinfo", served["uri"]], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert int(ok("nbdinfo", "--size", s.export_uri("plain")).strip()) == MiB
    with s.pool.locked():
        assert s.pool.holders("vm") == {}  # the refused connection holds nothing
