"""``thinpool create-thin POOL NAME SIZE --external-origin FILE`` end to end (dm-thin's external origin):
a relative FILE is made absolute, ``ls`` shows the origin (also for a snapshot taken by the light
device-table path), ``export`` writes the origin's bytes, and a pool file is refused with the pool
unchanged.  The same command through a serving process's control socket works too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

MiB = 1024 * 1024
BS = 64 * 1024


def cli(*args: str, cwd: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    r = subprocess.run([sys.executable, "-m", "thinpool", *args], capture_output=True, text=True, timeout=120,
                       cwd=cwd, env=env)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_kernel_rule_create_thin_external_origin_from_the_cli(tmp_path: Any) -> None:
    d = str(tmp_path)
    data = bytes(range(256)) * (3 * BS // 256) + b"tail"
    with open(os.path.join(d, "golden.img"), "wb") as f:
        f.write(data)
    pool = os.path.join(d, "p")
    cli("create", pool, "--data-size", "16M")
    info = json.loads(cli("create-thin", "p", "vm", "1M", "--external-origin", "golden.img", "--json", cwd=d).stdout)
    assert info["external_origin"] == os.path.join(os.path.realpath(d), "golden.img")
    assert info["external_origin_size"] == len(data)
    cli("snapshot", pool, "vm", "snap")  # the light path: device table only
    rows = {r["name"]: r for r in json.loads(cli("ls", pool, "--json").stdout)}
    assert rows["snap"]["external_origin"] == rows["vm"]["external_origin"] == info["external_origin"]
    assert "EXTERNAL_ORIGIN" in cli("ls", pool).stdout
    status = json.loads(cli("status", pool, "--json").stdout)  # the light path: device table only
    assert status["external_origins"] == {info["external_origin"]: ["snap", "vm"]}
    assert f"External Origin: {info['external_origin']} (2 volumes: " in cli("status", pool).stdout
    out = os.path.join(d, "out.img")
    cli("export", pool, "snap", out)
    with open(out, "rb") as f:
        assert f.read() == data + bytes(MiB - len(data))
    before = cli("ls", pool, "--json").stdout
    r = cli("create-thin", pool, "bad", "1M", "--external-origin", os.path.join(pool, "metadata"), check=False)
    assert r.returncode == 1 and "pool" in r.stderr and "metadata" in r.stderr
    assert cli("ls", pool, "--json").stdout == before


def test_create_thin_external_origin_through_a_serving_process(tmp_path: Any) -> None:
    d = str(tmp_path)
    with open(os.path.join(d, "golden.img"), "wb") as f:
        f.write(b"g" * BS)
    pool = os.path.join(d, "p")
    cli("create", pool, "--data-size", "16M")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    server = subprocess.Popen([sys.executable, "-m", "thinpool", "serve", pool], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(pool, "control.sock")):
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        info = json.loads(cli("create-thin", "p", "vm", "1M", "--external-origin", "golden.img", "--json",
                              cwd=d).stdout)
        assert info["external_origin"] == os.path.join(os.path.realpath(d), "golden.img")
    finally:
        server.terminate()
        server.wait(timeout=60)
    rows = {r["name"]: r for r in json.loads(cli("ls", pool, "--json").stdout)}
    assert rows["vm"]["external_origin"] == info["external_origin"]


def test_a_changed_origin_is_one_warning_line_on_stderr(tmp_path: Any) -> None:
    # the pool's ThinpoolWarning (an origin modified after the volume was made) reaches the CLI user as one
    # line "thinpool: warning: ...", as errors are one line, not as Python's file:line and source line
    d = str(tmp_path)
    origin = os.path.join(d, "golden.img")
    with open(origin, "wb") as f:
        f.write(b"g" * BS)
    pool = os.path.join(d, "p")
    cli("create", pool, "--data-size", "16M")
    cli("create-thin", pool, "vm", "1M", "--external-origin", origin)
    cli("create-thin", pool, "other", "1M")
    os.utime(origin, (0, 0))
    r = cli("usage", pool, "other")
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("thinpool: warning: pool "), r.stderr
    assert "was modified" in lines[0] and origin in lines[0] and ".py" not in lines[0]
    assert "other" in r.stdout
