"""The ``thinpool`` command line, end to end.

Subprocess tests run the real entry points (``python -m thinpool.cli``, ``python -m thinpool`` and the
``thinpool`` script) for the main session (create -> create-thin -> write from a file and stdin ->
snapshot -> ls -> export -> compare bytes), sparse import, exit statuses and stderr.  Each process pays
for numpy/numba imports, so the many small cases (every --json, every error kind, served routing, the
interop verbs) run in-process with click's CliRunner.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tests.support import require_tool

from thinpool import Pool
from thinpool.cli import main
from thinpool.cli.registry import op_table, run_op
from thinpool.control.server import handle_request
from thinpool.errors import FailedPrecondition, NotFound

KB = 1024
BS = 64 * KB
STATUS_RE = re.compile(r"^\d+ \d+/\d+ \d+/\d+ (-|\d+) (rw|ro|out_of_data_space) (discard_passdown|no_discard_passdown|ignore_discard) "
                       r"(error_if_no_space|queue_if_no_space) (needs_check|-) \d+ $")


def cli(*args: str, stdin: bytes | None = None, module: str = "thinpool.cli",
        check: int | None = 0) -> subprocess.CompletedProcess:
    """Run ``python -m <module> ARGS`` and (by default) require exit status 0."""
    proc = subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, timeout=120)
    if check is not None:
        assert proc.returncode == check, (args, proc.returncode, proc.stderr.decode())
    return proc


def invoke(*args: str, input: bytes | str | None = None, code: int = 0):
    """Run the CLI in-process; require exit status ``code``."""
    result = CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)
    assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
    return result


def error_of(result) -> str:
    """The single stderr line of a failed command (asserting it is one line in the right form)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("thinpool: error: "), lines[0]
    return lines[0]


# ============================================================================================ subprocess
def _spawn(argv: list[str], stdin: bytes | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc


@pytest.mark.slow
def test_session_end_to_end(tmp_path: Path) -> None:
    """create -> create-thin -> write (file, stdin) -> snapshot -> import -> then, concurrently (reporting
    commands share the pool's lock): ls, ls --json, status, export to a file and to stdout, errors, help."""
    pool = str(tmp_path / "pool")
    rng = np.random.default_rng(1)
    blob = rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    (tmp_path / "blob").write_bytes(blob)
    image = tmp_path / "disk.raw"
    isize = 8 << 20
    with open(image, "wb") as f:
        f.truncate(isize)                     # a hole everywhere...
        f.seek(3 * BS + 100)
        f.write(b"x" * 10)                    # ...data in block 3,
        f.seek(5 * BS)
        f.write(b"\0" * (2 * BS))             # explicit zeros in blocks 5-6 (not a hole),
        f.seek(isize - 7)
        f.write(b"the end")                   # and the last block.

    cli("create", pool, "--data-size", "64M", "--block-size", "64KiB")
    cli("create-thin", pool, "base", "4M")
    cli("write", pool, "base", str(tmp_path / "blob"), "--offset", "64K")
    cli("write", pool, "base", "--offset", "1M", stdin=b"hello from stdin")
    cli("snapshot", pool, "base", "snap")
    imported = json.loads(cli("import", pool, "disk", str(image), "--json").stdout)
    assert imported["created"] and imported["size"] == isize
    assert imported["blocks_written"] == 2 and imported["mapped_blocks"] == 2  # zeros and holes: nothing

    expected = bytearray(4 << 20)
    expected[64 * KB:64 * KB + len(blob)] = blob
    expected[1 << 20:(1 << 20) + 16] = b"hello from stdin"

    py = [sys.executable, "-m", "thinpool.cli"]
    script = shutil.which("thinpool")
    out = tmp_path / "snap.raw"
    jobs = {
        "ls": py + ["ls", pool],
        "ls-json": py + ["ls", pool, "--usage", "--json"],
        "ls-usage": py + ["ls", pool, "-u"],
        "status": [sys.executable, "-m", "thinpool", "status", pool],
        "export-file": py + ["export", pool, "snap", str(out)],
        "export-stdout": ([script] if script else py) + ["export", pool, "base"],
        "missing volume": py + ["usage", pool, "nope"],
        "no pool": py + ["status", str(tmp_path / "nowhere")],
        "usage error": py + ["create-thin", pool],
        "bad size": py + ["create-thin", pool, "v", "10X"],
        "help": py + ["--help"],
    }
    procs = {k: _spawn(v) for k, v in jobs.items()}
    pipe = _spawn(py + ["read", pool, "disk"])  # closed after 10 bytes: must exit quietly
    assert pipe.stdout.read(10) == b"\0" * 10
    pipe.stdout.close()
    assert pipe.wait(120) == 1 and pipe.stderr.read() == b""
    res = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        res[k] = (p.returncode, stdout, stderr.decode())
    for k in ("ls", "ls-json", "ls-usage", "status", "export-file", "export-stdout", "help"):
        assert res[k][0] == 0 and res[k][2] == "", (k, res[k])  # no progress bar: stderr is not a terminal

    ls = res["ls"][1].decode().splitlines()
    assert ls[0].split() == ["NAME", "DEV", "SIZE", "MAPPED", "CREATE_TIME", "SNAP_TIME"]
    assert [line.split()[0] for line in ls[1:]] == ["base", "snap", "disk"]
    ls_usage = res["ls-usage"][1].decode().splitlines()
    assert ls_usage[0].split() == ["NAME", "DEV", "SIZE", "MAPPED", "EXCLUSIVE", "SHARED", "CREATE_TIME",
                                   "SNAP_TIME"]
    assert [line.split()[:6] for line in ls_usage[1:]] == \
        [["base", "1", "4.0MiB", "192.0KiB", "0B", "192.0KiB"], ["snap", "2", "4.0MiB", "192.0KiB", "0B", "192.0KiB"],
         ["disk", "3", "8.0MiB", "128.0KiB", "128.0KiB", "0B"]]
    rows = {r["name"]: r for r in json.loads(res["ls-json"][1])}
    # blob covers blocks 1 and 2, stdin wrote block 16: 3 mapped blocks each, all shared
    assert [(rows[n]["mapped_blocks"], rows[n]["shared_blocks"]) for n in ("base", "snap")] == [(3, 3), (3, 3)]
    assert rows["snap"]["dev_id"] == 2 and rows["snap"]["size"] == 4 << 20
    assert rows["disk"]["exclusive_blocks"] == 2

    assert out.read_bytes() == bytes(expected)
    assert out.stat().st_blocks * 512 <= 3 * BS  # sparse: only the mapped blocks hold data
    assert res["export-stdout"][1] == bytes(expected)

    status = res["status"][1].decode().splitlines()
    assert STATUS_RE.match(status[0]), status[0]
    assert status[0].split()[2] == "5/1024"
    human = dict(line.split(": ", 1) for line in status[2:])
    assert human["Data Space Used"] == "327.7kB" and human["Data Space Total"] == "67.11MB"
    assert human["Pool Blocksize"] == "65.54kB" and human["Thin Volumes"] == "3"

    rc, stdout, stderr = res["missing volume"]
    assert (rc, stdout, stderr) == (1, b"", f"thinpool: error: pool {pool}: no thin volume named 'nope'\n")
    rc, _, stderr = res["no pool"]
    assert rc == 1 and stderr.count("\n") == 1 and "does not exist" in stderr
    assert res["usage error"][0] == 2 and "Missing argument" in res["usage error"][2]
    assert res["bad size"][0] == 2 and "unknown unit" in res["bad size"][2]
    text = res["help"][1].decode()
    assert text.index("Pool commands:") < text.index("Volume commands:") < text.index("dm-thin interoperability:")
    for name in ("create", "status", "create-thin", "snapshot", "ls", "import", "export", "dump", "restore"):
        assert re.search(rf"^  {re.escape(name)} ", text, re.M), name

    with Pool.open(pool, read_only=True) as p:
        assert p.thin("disk").read(0, isize) == image.read_bytes()


# ============================================================================================ in-process
@pytest.fixture()
def pool(tmp_path: Path) -> str:
    """A pool with base (2 blocks written) and its snapshot snap (1 block rewritten)."""
    path = str(tmp_path / "pool")
    with Pool.create(path, data_size="16M") as p:
        base = p.create_thin("base", "1M")
        base.write(0, b"a" * (2 * BS))
        p.snapshot("base", "snap")
        p.thin("snap").write(BS, b"b" * 10)
    return path


def test_every_reporting_command_has_json(pool: str, tmp_path: Path) -> None:
    status = json.loads(invoke("status", pool, "--json").stdout)
    assert STATUS_RE.match(status["dmsetup_line"]) and status["mode"] == "write"
    assert status["used_data_blocks"] == 3 and status["data_space"]["used"] == 3 * BS
    assert status["metadata_space"]["total"] == status["total_metadata_blocks"] * 4096
    ls = json.loads(invoke("ls", pool, "--json").stdout)
    assert [(r["name"], r["mapped_blocks"], r["mapped_bytes"]) for r in ls] == [("base", 2, 2 * BS), ("snap", 2, 2 * BS)]
    assert all("exclusive_blocks" not in r for r in ls)  # the usage columns walk the mappings: --usage
    ls = json.loads(invoke("ls", pool, "--usage", "--json").stdout)
    assert [(r["name"], r["mapped_blocks"], r["exclusive_blocks"], r["shared_blocks"]) for r in ls] == \
        [("base", 2, 1, 1), ("snap", 2, 1, 1)]
    usage = json.loads(invoke("usage", pool, "snap", "--json").stdout)
    assert usage["name"] == "snap" and usage["highest_mapped_block"] == 1
    assert isinstance(json.loads(invoke("usage", pool, "--json").stdout), list)
    check = json.loads(invoke("check", pool, "--json").stdout)
    assert check["ok"] and check["devices"] == 2
    dump = json.loads(invoke("dump", pool, "--json").stdout)
    assert dump["xml"].startswith("<superblock ")
    created = json.loads(invoke("create-thin", pool, "v", "64K", "--json").stdout)
    assert created["name"] == "v" and created["size"] == BS
    snap = json.loads(invoke("snapshot", pool, "v", "v2", "--read-only", "--json").stdout)
    assert snap["read_only"] and snap["dev_id"] == 4
    assert json.loads(invoke("rename", pool, "v2", "v3", "--json").stdout)["name"] == "v3"
    assert json.loads(invoke("delete", pool, "v", "v3", "--json").stdout) == {"deleted": ["v", "v3"]}
    disc = json.loads(invoke("discard", pool, "snap", "--json").stdout)
    assert disc["blocks_unmapped"] == 2
    assert json.loads(invoke("resize", pool, "32M", "--json").stdout)["total_data_blocks"] == 512
    assert "transaction_id" in json.loads(invoke("commit", pool, "--json").stdout)
    assert json.loads(invoke("set-transaction-id", pool, "0", "7", "--json").stdout) == {"transaction_id": 7}
    held = json.loads(invoke("reserve-metadata-snap", pool, "--json").stdout)["held_root"]
    assert isinstance(held, int)
    assert json.loads(invoke("release-metadata-snap", pool, "--json").stdout) == {"held_root": None}
    exp = json.loads(invoke("export", pool, "base", str(tmp_path / "b.raw"), "--json").stdout)
    assert exp["sparse"] and exp["blocks_written"] == 2
    w = json.loads(invoke("write", pool, "base", "--offset", "4K", "--json", input=b"zz").stdout)
    assert w["bytes_written"] == 2
    em = json.loads(invoke("export-metadata", pool, str(tmp_path / "m.bin"), "--json").stdout)
    assert em["used_blocks"] > 0
    status = json.loads(invoke("status", pool, "--json").stdout)
    assert status["transaction_id"] == 7 and status["total_data_blocks"] == 512


def test_status_text(pool: str) -> None:
    line = invoke("status", pool, "--line").stdout
    assert STATUS_RE.match(line.rstrip("\n")) and line.count("\n") == 1
    human = invoke("status", pool, "--human").stdout
    assert "Data Space Used: 196.6kB\n" in human and "Mode: write\n" in human
    assert "Metadata Space Available: " in human
    invoke("status", pool, "--line", "--human", code=2)


def test_read_write_discard_with_units(pool: str, tmp_path: Path) -> None:
    invoke("write", pool, "base", "--offset", "1KiB", "--length", "3", input=b"xyz123")
    assert invoke("read", pool, "base", "--offset", "1K", "--length", "4").stdout_bytes == b"xyza"
    out = tmp_path / "r.bin"
    invoke("read", pool, "snap", "--offset", "64K", "--length", "16", "-o", str(out))
    assert out.read_bytes() == b"b" * 10 + b"a" * 6
    assert invoke("discard", pool, "base", "--offset", "1", "--length", "128K").stdout == \
        "base: 1 blocks unmapped\n"  # the partial first block stays
    with Pool.open(pool, read_only=True) as p:
        assert p.thin("base").mapped_blocks == 1


def test_import_into_existing_volume_unmaps_zero_blocks(pool: str, tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"\0" * BS + b"c" * BS)      # block 0 zero, block 1 data; base maps both
    res = json.loads(invoke("import", pool, "base", str(image), "--json").stdout)
    assert res == {**res, "created": False, "blocks_written": 1, "blocks_unmapped": 1, "mapped_blocks": 1}
    with Pool.open(pool, read_only=True) as p:
        assert p.thin("base").read(0, 2 * BS) == image.read_bytes()
    invoke("import", pool, "small", str(tmp_path / "img"), "--size", "1M")
    big = tmp_path / "big"
    big.write_bytes(b"d" * (2 * 1024 * KB))
    assert "larger than volume" in error_of(invoke("import", pool, "small", str(big), code=1))
    assert "is empty (0 bytes)" in error_of(invoke("import", pool, "new", "-", input=b"", code=1))
    invoke("import", pool, "new", "-", input=b"abc")  # stdin without --size: spooled to learn the size
    with Pool.open(pool, read_only=True) as p:
        assert p.thin("new").size == 512 and p.thin("new").read(0, 4) == b"abc\0"
    res = json.loads(invoke("import", pool, "piped", "-", "--size", "256K", "--json",
                            input=b"\0" * (BS + 5) + b"e").stdout)        # stdin: zero block skipped
    assert (res["blocks_written"], res["bytes"], res["mapped_blocks"]) == (1, BS + 6, 1)


def test_errors_are_one_line_exit_1(pool: str, tmp_path: Path) -> None:
    cases = [
        (("create-thin", pool, "base", "1M"), "already"),                  # AlreadyExists
        (("snapshot", pool, "nope", "s"), "no thin volume named 'nope'"),  # NotFound
        (("create-thin", pool, "odd", "1000"), "multiple of 512"),          # InvalidArgument
        (("write", pool, "base", "--offset", "1M"), "past the end"),
        (("read", pool, "base", "--offset", "1020K", "--length", "8K"), "past the end"),
        (("set-transaction-id", pool, "5", "6"), "mismatched transaction id"),
        (("resize", pool, "1M"), "cannot shrink"),
        (("release-metadata-snap", pool), "no metadata snapshot is held"),
        (("delete", pool, "base", "nope"), "no thin volume named 'nope'"),
        (("create", pool), "not an empty directory"),
        (("dump", pool, "-m"), "no metadata snapshot is held"),
        (("status", str(tmp_path / "missing")), "does not exist"),
    ]
    for args, needle in cases:
        line = error_of(invoke(*args, input=b"x", code=1))
        assert needle in line, (args, line)
    with Pool.open(pool, read_only=True) as p:  # the failed all-or-none delete removed nothing
        assert [t.name for t in p.thins()] == ["base", "snap"]
    for args in (("create-thin", pool, "v"), ("ls", pool, "--bogus"), ("create-thin", pool, "v", "1Q"),
                 ("export", pool, "base", "--json"), ("nosuchcommand",)):
        invoke(*args, code=2)


def test_locked_pool(pool: str) -> None:
    with Pool.open(pool):
        assert "locked by another process" in error_of(invoke("create-thin", pool, "x", "1M", code=1))


def test_write_failure_commits_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "pool")
    Pool.create(path, data_size="128K", error_if_no_space=True).close()    # two blocks
    invoke("create-thin", path, "v", "1M")
    assert "no free data space" in error_of(invoke("write", path, "v", input=b"x" * (3 * BS), code=1))
    with Pool.open(path, read_only=True) as p:
        assert p.thin("v").mapped_blocks == 0 and p.status().used_data_blocks == 0


def test_kernel_rule_pool_features_from_the_cli_create_set_and_status(tmp_path: Path) -> None:
    # dm-thin's pool features: ignore_discard / no_discard_passdown and the no-space policy, in the status
    # line's discard and no-space fields; a pool that is not served is activated anew by `set`
    path = str(tmp_path / "pool")
    invoke("create", path, "--data-size", "1M", "--ignore-discard", "--error-if-no-space")
    invoke("create-thin", path, "v", "1M")
    line = invoke("status", "--line", path).stdout
    assert STATUS_RE.match(line.rstrip("\n")) and " rw ignore_discard error_if_no_space - " in line
    assert "discards are turned off" in error_of(invoke("discard", path, "v", code=1))
    out = json.loads(invoke("set", path, "--discard-passdown", "--queue-if-no-space", "--no-space-timeout", "0",
                            "--json").stdout)
    assert out["discard"] == "passdown" and out["error_if_no_space"] is False and out["no_space_timeout"] == 0
    assert " rw discard_passdown queue_if_no_space - " in invoke("status", "--line", path).stdout
    invoke("set", path, "--no-space-timeout", "-1", code=2)
    invoke("set", path, code=2)
    with Pool.open(path, read_only=True) as p:
        assert p.features == {"discard": "passdown", "error_if_no_space": False, "no_space_timeout": 0.0}


# ---------------------------------------------------------------------------------------------- served pools
class FakeServer:
    """What ``thinpool serve`` does for the control socket: one request line per connection, answered
    by the control server's handle_request with the CLI's op table on the served (open, writable) pool."""

    def __init__(self, pool_path: str) -> None:
        self.pool = Pool.open(pool_path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(os.path.join(pool_path, "control.sock"))
        self.sock.listen()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("rb").readline()
                if line:  # a client may connect only to see whether the pool is served
                    conn.sendall(handle_request(self.pool, op_table(), line))

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        self.pool.close()


def test_served_pool_routes_ops_over_control_socket(pool: str) -> None:
    server = FakeServer(pool)
    try:
        invoke("create-thin", pool, "live", "1M")               # the pool is locked: only the server can
        invoke("snapshot", pool, "base", "snap2")
        assert "live" in server.pool and "snap2" in server.pool
        ls = json.loads(invoke("ls", pool, "--json").stdout)
        assert [r["name"] for r in ls] == ["base", "snap", "live", "snap2"]
        status = json.loads(invoke("status", pool, "--json").stdout)
        assert status["nr_thins"] == 4 and status["mode"] == "write"
        assert invoke("dump", pool).stdout.count("<device ") == 4
        # errors come back as the same class and message
        assert error_of(invoke("delete", pool, "nope", code=1)) == \
            f"thinpool: error: pool {pool}: no thin volume named 'nope'"
        with pytest.raises(NotFound):
            run_op(pool, "delete", {"names": ["nope"]})
        # streaming commands refuse, pointing at NBD
        line = error_of(invoke("write", pool, "base", input=b"x", code=1))
        assert "is being served" in line and "NBD" in line
        with pytest.raises(FailedPrecondition):
            run_op(pool, "export", {"name": "base", "output": "/dev/null"})
    finally:
        server.close()
    with Pool.open(pool, read_only=True) as p:  # write ops were committed by the server
        assert [t.name for t in p.thins()] == ["base", "snap", "live", "snap2"]
    # a stale socket (server gone) falls back to opening the pool
    assert os.path.exists(os.path.join(pool, "control.sock"))
    invoke("delete", pool, "snap2")


def test_handle_request_never_raises(pool: str) -> None:
    with Pool.open(pool) as p:
        def ask(raw: bytes) -> dict:
            reply = handle_request(p, op_table(), raw)
            assert reply.endswith(b"\n") and reply.count(b"\n") == 1
            return json.loads(reply)
        assert ask(b"not json") == {"ok": False, "error": "InvalidArgument",
                                    "message": "control request is not valid JSON"}
        assert ask(b"[1]")["error"] == "InvalidArgument"
        assert ask(b'{"op": "frobnicate"}')["error"] == "InvalidArgument"
        assert "bad arguments" in ask(b'{"op": "create-thin", "args": {"nme": "x"}}')["message"]
        assert ask(b'{"op": "read", "args": {"name": "base"}}')["error"] == "FailedPrecondition"
        assert ask(b'{"op": "snapshot", "args": {"origin": "zz", "name": "s"}}')["error"] == "NotFound"
        ok = ask(b'{"op": "create-thin", "args": {"name": "x", "size": 65536}}')
        assert ok["ok"] and ok["result"]["name"] == "x"
        assert ask(b'{"op": "usage", "args": {"name": "x"}}')["result"]["mapped_blocks"] == 0
    assert {"status", "ls", "create-thin", "snapshot", "delete", "commit", "dump", "export-metadata"} <= set(op_table())


# ---------------------------------------------------------------------------------------------- interop
def test_dump_equals_library_and_restore_round_trips(pool: str, tmp_path: Path) -> None:
    from thinpool.interop.xml import dump_xml
    with Pool.open(pool, read_only=True) as p:
        expected = dump_xml(p.to_metadata())
    assert invoke("dump", pool).stdout == expected
    xml_file = tmp_path / "pool.xml"
    invoke("dump", pool, "-o", str(xml_file))
    assert xml_file.read_text() == expected
    restored = str(tmp_path / "restored")
    invoke("restore", restored, "-i", str(xml_file), "--data-size", "32M")
    assert invoke("dump", restored).stdout == expected.replace('nr_data_blocks="256"', 'nr_data_blocks="512"')
    assert [r["name"] for r in json.loads(invoke("ls", restored, "--json").stdout)] == ["dev1", "dev2"]
    # stdin input, and the held metadata snapshot
    again = str(tmp_path / "again")
    invoke("restore", again, "-i", "-", input=expected)
    assert invoke("dump", again).stdout == expected
    invoke("reserve-metadata-snap", pool)
    invoke("write", pool, "base", "--offset", "128K", input=b"later")
    assert invoke("dump", pool, "--metadata-snap").stdout.count("mapping") == \
        expected.count("mapping")


def test_restore_refuses_bad_xml_and_creates_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text('<superblock uuid="" time="0" transaction="0" flags="0" version="2" data_block_size="128" '
                   'nr_data_blocks="10">\n  <device dev_id="1" mapped_blocks="1" transaction="0" '
                   'creation_time="0" snap_time="0">\n    <single_mapping origin_block="0" data_block="10" '
                   'time="0"/>\n  </device>\n</superblock>\n')
    target = tmp_path / "p"
    line = error_of(invoke("restore", str(target), "-i", str(bad), code=1))
    assert "line 3" in line and "beyond end of data device" in line
    assert not target.exists()


def test_export_metadata_passes_thin_check(pool: str, tmp_path: Path) -> None:
    require_tool("thin_check", "thin_dump")
    meta = tmp_path / "meta.bin"
    invoke("reserve-metadata-snap", pool)
    invoke("export-metadata", pool, str(meta))
    check = subprocess.run(["thin_check", str(meta)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    dumped = subprocess.run(["thin_dump", str(meta)], capture_output=True, text=True, check=True).stdout
    assert dumped == invoke("dump", pool).stdout
    # and back: a new pool on the same data (a copy), with the same mappings and contents
    shutil.copy(os.path.join(pool, "data"), tmp_path / "data.copy")
    new = str(tmp_path / "imported")
    invoke("import-metadata", str(meta), "--data", str(tmp_path / "data.copy"), new)
    assert invoke("dump", new).stdout == dumped
    assert invoke("read", new, "dev2", "--offset", "64K", "--length", "11").stdout_bytes == b"b" * 10 + b"a"
    corrupt = tmp_path / "corrupt.bin"
    raw = bytearray(meta.read_bytes())
    raw[100] ^= 0xFF
    corrupt.write_bytes(raw)
    assert "superblock" in error_of(invoke("import-metadata", str(corrupt), str(tmp_path / "x"), code=1))
    assert not (tmp_path / "x").exists()


ALL_LS_FIELDS = ("DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,MAPPED_SECTORS,EXCLUSIVE_SECTORS,SHARED_SECTORS,"
                 "MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES,MAPPED,EXCLUSIVE,SHARED,TRANSACTION,CREATE_TIME,SNAP_TIME")


def test_ls_delta_rmap_metadata_size_match_real_tools(tmp_path: Path) -> None:
    require_tool("thin_ls", "thin_delta", "thin_rmap", "thin_metadata_size", "thin_restore")
    path = str(tmp_path / "pool")
    rng = np.random.default_rng(7)
    with Pool.create(path, data_size="64M") as p:
        base = p.create_thin("base", "16M")
        base.write_many(rng.choice(256, 60, replace=False) * BS, [bytes([i + 1]) * BS for i in range(60)])
        p.snapshot("base", "s1")
        p.thin("s1").write_many(rng.choice(256, 10, replace=False) * BS, [b"s" * BS] * 10)
        p.snapshot("s1", "s2")
        p.thin("base").discard(0, 4 << 20)
        p.create_thin("empty", "1M")
    meta = tmp_path / "meta.bin"
    invoke("export-metadata", path, str(meta))

    def tool(*args: str) -> str:
        proc = subprocess.run(list(args), capture_output=True, text=True)
        assert proc.returncode == 0, (args, proc.stderr)
        return proc.stdout

    assert invoke("ls", path, "-o", ALL_LS_FIELDS).stdout == tool("thin_ls", "-o", ALL_LS_FIELDS, str(meta))
    assert invoke("ls", path, "-o", "DEV,MAPPED,SHARED", "--no-headers").stdout == \
        tool("thin_ls", "--no-headers", "-o", "DEV,MAPPED,SHARED", str(meta))
    rows = json.loads(invoke("ls", path, "-o", "DEV,EXCLUSIVE_BLOCKS", "--json").stdout)
    assert [r["DEV"] for r in rows] == [1, 2, 3, 4]
    for a, b in (("base", "s1"), ("s1", "s2"), ("1", "3")):
        ids = {"base": "1", "s1": "2", "s2": "3"}
        left, right = ids.get(a, a), ids.get(b, b)
        assert invoke("delta", path, a, b).stdout == \
            tool("thin_delta", "--thin1", left, "--thin2", right, str(meta))
        assert invoke("delta", path, a, b, "--verbose").stdout == \
            tool("thin_delta", "--verbose", "--thin1", left, "--thin2", right, str(meta))
    kinds = {r["kind"] for r in json.loads(invoke("delta", path, "base", "s1", "--json").stdout)["ranges"]}
    assert kinds <= {"same", "different", "left_only", "right_only"} and "same" in kinds
    # thin_rmap 0.9.0 skips subtrees it has visited, so on metadata with shared subtrees (ours, the
    # kernel's) it lists a shared leaf under one device; ours lists every device, as thin_rmap does on
    # the same mappings without sharing (thin_restore writes none)
    regions = ["0..40", "50..51", "60..200"]
    flat = tmp_path / "flat.bin"
    (tmp_path / "pool.xml").write_text(invoke("dump", path).stdout)
    with open(flat, "wb") as f:
        f.truncate(16 << 20)
    tool("thin_restore", "-i", str(tmp_path / "pool.xml"), "-o", str(flat))
    assert invoke("rmap", path, *[x for r in regions for x in ("--region", r)]).stdout == \
        tool("thin_rmap", *[f"--region={r}" for r in regions], str(flat))
    records = json.loads(invoke("rmap", path, "-r", "0..300", "--json").stdout)
    assert records and all(r["name"] in ("base", "s1", "s2") for r in records)
    assert "end <= begin" in error_of(invoke("rmap", path, "-r", "5..5", code=1))
    assert "unknown field" in error_of(invoke("ls", path, "-o", "DEV,BOGUS", code=1))
    assert "no thin volume named 'zz'" in error_of(invoke("delta", path, "base", "zz", code=1))
    for args in (["-b64k", "-s1t", "-m1000"], ["-b", "128", "-s", "2097152", "-m", "10", "-u", "k"],
                 ["-b64k", "-s1t", "-m1000", "-um", "-nshort"], ["-b64k", "-s1t", "-m1000", "-n"]):
        assert invoke("metadata-size", *args).stdout == tool("thin_metadata_size", *args)
    size = json.loads(invoke("metadata-size", "-b64k", "-s1t", "-m1000", "--json").stdout)
    assert size["blocks"] == 1 + 133152 + 1000 and size["bytes"] == size["blocks"] * 4096
    assert "2^^N" in error_of(invoke("metadata-size", "-b64K", "-s1t", "-m1000", code=1))


def test_progress_bar_only_on_a_terminal(pool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from thinpool.cli import common
    image = tmp_path / "img"
    image.write_bytes(b"q" * (3 * BS))
    assert invoke("import", pool, "quiet", str(image)).stderr == ""
    monkeypatch.setattr(common, "stderr_is_tty", lambda: True)
    seen = []
    real = common.progress

    def spy(description: str, total: int):
        seen.append((description, total))
        return real(description, total)
    monkeypatch.setattr(common, "progress", spy)
    invoke("import", pool, "loud", str(image))
    invoke("export", pool, "loud", str(tmp_path / "out"))
    assert seen == [("import loud", 3 * BS), ("export loud", 3 * BS)]
    assert (tmp_path / "out").read_bytes() == image.read_bytes()
