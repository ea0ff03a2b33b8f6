"""Busy volumes over NBD: a volume a real NBD client has open cannot be deleted (dm-thin's EBUSY for an
open thin device, dm-thin-metadata.c ``__delete_device``), also through the serving process's control
socket; the library side is tests/engine/test_kernel_busy.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from tests.support import pool_with_volumes, require_tool
from thinpool import Pool

def test_kernel_rule_delete_of_a_volume_open_over_nbd_fails_with_ebusy_over_the_cli(tmp_path: Any) -> None:
    """A real NBD client (qemu-io, interactive on a pipe) holds the export open; `thinpool delete` through the serving
    process's control socket is refused with the Busy error and the volume stays; after the client
    disconnects the delete succeeds."""
    require_tool("qemu-io")
    path = str(tmp_path / "pool")
    pool_with_volumes(tmp_path).close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    sock = os.path.join(path, "nbd.sock")
    server = subprocess.Popen([sys.executable, "-m", "thinpool", "serve", path], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(path, "control.sock")) or not os.path.exists(sock):
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        client = subprocess.Popen(["qemu-io", "-f", "raw", f"nbd+unix:///a?socket={sock}"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            client.stdin.write("read -P 0x78 0 64k\n")  # connected and reading: 64 KiB of "x"
            client.stdin.flush()
            line = client.stdout.readline()
            assert "read 65536/65536 bytes" in line, line
            r = subprocess.run([sys.executable, "-m", "thinpool", "delete", path, "a"], env=env,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 1 and "EBUSY" in r.stderr and "open over NBD" in r.stderr, r.stderr
        finally:
            client.stdin.write("quit\n")
            client.stdin.close()
            client.wait(timeout=30)
        deadline = time.monotonic() + 10
        while True:  # the server notices the disconnect asynchronously
            r = subprocess.run([sys.executable, "-m", "thinpool", "delete", path, "a"], env=env,
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.returncode == 0, r.stderr
    finally:
        server.terminate()
        server.wait(timeout=60)
    with Pool.open(path) as p:
        assert [t.name for t in p.thins()] == ["b"]
