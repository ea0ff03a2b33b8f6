"""A command started with standard input, output or error closed (``thinpool ls POOL >&-``).

Python leaves ``sys.stdin``/``sys.stdout``/``sys.stderr`` None for such a descriptor, and the first
files the process opens take the free numbers 0-2: a pool's lock and metadata files became
descriptors 1 and 2, where anything written to standard output or error (a fatal signal's report, a C
library's message) would have landed in them.  The CLI now gives a closed standard descriptor to
/dev/null before any command runs, and reading or printing through a closed standard stream is the
command's error ("standard output is closed"), not a traceback and not output lost in silence.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support import require_tool

from thinpool import Pool

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def _thinpool(redirects: str, *args: str, strace_log: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m thinpool ARGS`` exec'd by bash with ``redirects`` (``>&-`` ...); stderr captured
    unless the redirects close it."""
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
    cmd = ["bash", "-c", f"exec {sys.executable} -m thinpool {quoted} {redirects}"]
    if strace_log:
        cmd = ["strace", "-f", "-qq", "-e", "trace=openat", "-o", strace_log] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)


def _pool(scratch: str, payload: bytes) -> str:
    path = f"{scratch}/pool"
    with Pool.create(path, data_size="16MiB", block_size="64KiB") as p:
        p.create_thin("v", "1MiB").write(0, payload)
    return path


def test_pool_files_never_take_a_closed_standard_descriptor(scratch: str) -> None:
    """With 0, 1 and 2 closed, every pool file the command opens gets a descriptor above 2 (before:
    the lock file 1, the metadata file 2), and the write lands as it should."""
    require_tool("strace")
    pool = _pool(scratch, b"a" * 4096)
    src = f"{scratch}/in"
    with open(src, "wb") as f:
        f.write(b"b" * 100_000)
    log = f"{scratch}/strace.log"
    r = _thinpool(">&- 2>&- <&-", "write", pool, "v", src, strace_log=log)
    assert r.returncode == 0
    opened = re.findall(r'openat\(AT_FDCWD, "' + re.escape(pool) + r'/([^"]+)".*\) = (\d+)$',
                        open(log).read(), re.M)
    assert {name for name, _ in opened} >= {"lock", "metadata", "data"}
    assert all(int(fd) > 2 for _, fd in opened), opened
    with Pool.open(pool, read_only=True) as p:
        assert p.check().ok
        assert p.thin("v").read(0, 100_000) == b"b" * 100_000


def test_closed_stdout_is_the_commands_error(scratch: str) -> None:
    """``ls`` (the compiled table and the Python one alike go to standard output) and ``status`` with
    stdout closed: exit 1 and one line naming it -- before, a traceback (``sys.stdout`` None)."""
    pool = _pool(scratch, b"a" * 4096)
    for args in (("ls", pool), ("status", pool), ("ls", pool, "--json")):
        r = _thinpool(">&-", *args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr == "thinpool: error: standard output is closed\n", (args, r.stderr)


def test_closed_stdin_is_refused_and_the_volume_unchanged(scratch: str) -> None:
    """``write POOL v -`` with stdin closed: exit 1 naming it, nothing written (the input is read, to
    learn its size, before the volume is touched)."""
    pool = _pool(scratch, b"a" * 4096)
    r = _thinpool("<&-", "write", pool, "v", "-")
    assert r.returncode == 1
    assert r.stderr == "thinpool: error: standard input is closed\n"
    with Pool.open(pool, read_only=True) as p:
        assert p.thin("v").read(0, 8192) == b"a" * 4096 + bytes(4096)


def test_library_pool_files_skip_closed_standard_descriptors(scratch: str) -> None:
    """A library caller that closed stdout and stderr (no CLI guard): Pool.create and Pool.open still
    put no pool file on descriptor 1 or 2, nor the duplicate of the data file that Python's mmap keeps
    (pooldir.open_pool_file gives closed standard descriptors to /dev/null first)."""
    pool, report = f"{scratch}/lib", f"{scratch}/fds.txt"
    code = ("import os\n"
            "from thinpool import Pool\n"
            f"out = os.open({report!r}, os.O_WRONLY | os.O_CREAT, 0o600)\n"
            "os.close(1); os.close(2)\n"
            "def low():\n"
            "    return [os.readlink(f'/proc/self/fd/{fd}') for fd in (1, 2) if os.path.exists(f'/proc/self/fd/{fd}')]\n"
            f"with Pool.create({pool!r}, data_size='16MiB', block_size='64KiB') as p:\n"
            "    p.create_thin('v', '1MiB').write(0, b'x' * 4096)\n"
            "    seen = low()\n"
            f"with Pool.open({pool!r}) as p:\n"
            "    seen += low()\n"
            "os.write(out, repr(seen).encode())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=ENV, timeout=120)
    assert r.returncode == 0
    seen = open(report).read()
    assert seen.startswith("[") and pool not in seen, seen
    with Pool.open(pool, read_only=True) as p:
        assert p.check().ok and p.thin("v").read(0, 4096) == b"x" * 4096
