"""The workloads ``thinpool compare`` runs in a container, and the image they are written for.

A :class:`Workload` is a real program run on a container's mounted root: ``ROOT`` is set to the mount
point, which is also its working directory (paths are relative), as ``thinpool container exec`` does.
The built-in ones (:func:`builtin_workloads`) are the seven changes below, on the files of the image that
:func:`build_workload_image` makes:

==================  ==========================================================================
``sqlite-0.1pct``   ``UPDATE`` of 0.1 % of the rows (a random sample, seed 14) of the SQLite database
                    ``var/lib/app/app.db`` (Python's ``sqlite3`` module; the default rollback journal)
``sqlite-1pct``     the same for 1 % of the rows
``log-append``      1 MiB appended to the log ``var/log/app.log``
``touch-chmod``     ``touch`` and ``chmod 600`` of the big file ``srv/data.bin`` (its bytes unchanged)
``config-rewrite``  ``sed -i`` on the 4 KiB ``etc/app.conf`` (a new file renamed over the old one)
``unpack-small``    ``tar -xf opt/bundle.tar`` into ``srv/unpacked``: a few thousand new small files
``delete-big``      ``rm opt/big.bin``, a big file of the image
==================  ==========================================================================

``NAME=COMMAND`` (:func:`parse_workload`) adds the user's own, run with ``sh -c COMMAND``.

The image (:func:`build_workload_image`) is built by ``umoci`` from a tree this module creates
(:func:`populate_tree`): a copy of part of the Python standard library, the SQLite database, the log,
the big file, a config file, a tarball of small files and a big file to delete (layer 1, ``umoci
repack``), then a second layer deleting a directory of the stdlib copy and a file, so the image carries
whiteouts.  Every size is a parameter (:class:`ImageSizes`): the tests use :data:`SMALL_SIZES`, the demo
the issue's (:data:`ISSUE_SIZES`: a ~50 MB database, a 100 MiB log and file).
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass

from thinpool.errors import FailedPrecondition, InvalidArgument

MiB = 1 << 20
DB_PATH = "var/lib/app/app.db"
LOG_PATH = "var/log/app.log"
DATA_PATH = "srv/data.bin"
CONFIG_PATH = "etc/app.conf"
BUNDLE_PATH = "opt/bundle.tar"
UNPACK_DIR = "srv/unpacked"
BIG_PATH = "opt/big.bin"
STDLIB_DIR = "usr/lib/python3"
#: the file the image's second layer deletes (beside one directory of the stdlib copy)
DELETED_FILE = "etc/motd"
#: bytes of one database row's payload (about 8 rows per 4 KiB page)
ROW_PAYLOAD = 450
#: a user workload's name: what a container name may hold
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MAX_COMMAND = 64 << 10


@dataclass(frozen=True)
class ImageSizes:
    """Sizes of the files of the workload image (bytes, counts)."""

    db_bytes: int = 50_000_000
    log_bytes: int = 100 * MiB
    file_bytes: int = 100 * MiB
    big_bytes: int = 64 * MiB
    small_files: int = 3000
    stdlib_bytes: int = 16_000_000

    def __post_init__(self) -> None:
        for k, v in self.__dict__.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= (64 << 30):
                raise InvalidArgument(f"image size {k} must be a positive number of bytes (at most 64 GiB), "
                                      f"not {v!r}")
        if self.db_bytes < 64 << 10:
            raise InvalidArgument(f"db_bytes {self.db_bytes}: at least 64 KiB (the database needs rows)")


#: the issue's sizes (the demo, docs/containers.md's table)
ISSUE_SIZES = ImageSizes()
#: small sizes for the tests: seconds to build and run
SMALL_SIZES = ImageSizes(db_bytes=1_500_000, log_bytes=3 * MiB, file_bytes=3 * MiB, big_bytes=2 * MiB,
                         small_files=200, stdlib_bytes=1_000_000)


@dataclass(frozen=True)
class Workload:
    """A program to run on a container's mounted root (``ROOT`` = the mount point = its cwd)."""

    name: str
    argv: tuple[str, ...]
    description: str

    def as_dict(self) -> dict:
        return {"name": self.name, "argv": list(self.argv), "description": self.description}


_SQLITE_UPDATE = """\
import random, sqlite3, sys
db, percent = sys.argv[1], float(sys.argv[2])
con = sqlite3.connect(db)
n = con.execute("SELECT count(*) FROM rows").fetchone()[0]
k = max(1, round(n * percent / 100))
ids = random.Random(14).sample(range(1, n + 1), k)
with con:
    con.executemany("UPDATE rows SET v = randomblob(length(v)), updated = updated + 1 WHERE id = ?",
                    [(i,) for i in ids])
con.close()
print(k)
"""


def builtin_workloads(python: str | None = None) -> list[Workload]:
    """The built-in workloads, in the order the report lists them (see the module docstring).
    ``python``: the interpreter the SQLite updates run with (default: this one)."""
    py = python or sys.executable
    return [
        Workload("sqlite-0.1pct", (py, "-c", _SQLITE_UPDATE, DB_PATH, "0.1"),
                 f"SQLite UPDATE of 0.1% of the rows of {DB_PATH}"),
        Workload("sqlite-1pct", (py, "-c", _SQLITE_UPDATE, DB_PATH, "1"),
                 f"SQLite UPDATE of 1% of the rows of {DB_PATH}"),
        Workload("log-append", ("sh", "-c", f"head -c {MiB} /dev/urandom >> {LOG_PATH}"),
                 f"append 1 MiB to {LOG_PATH}"),
        Workload("touch-chmod", ("sh", "-c", f"touch {DATA_PATH} && chmod 600 {DATA_PATH}"),
                 f"touch and chmod 600 {DATA_PATH}"),
        Workload("config-rewrite", ("sed", "-i", "s/^workers = 4$/workers = 8/", CONFIG_PATH),
                 f"sed -i on the 4 KiB {CONFIG_PATH}"),
        Workload("unpack-small", ("sh", "-c", f"mkdir -p {UNPACK_DIR} && tar -xf {BUNDLE_PATH} -C {UNPACK_DIR}"),
                 f"unpack {BUNDLE_PATH} (new small files) into {UNPACK_DIR}"),
        Workload("delete-big", ("rm", BIG_PATH), f"delete {BIG_PATH}"),
    ]


def parse_workload(spec: str) -> Workload:
    """``NAME=COMMAND`` as a :class:`Workload` run with ``sh -c COMMAND``."""
    if not isinstance(spec, str) or "=" not in spec:
        raise InvalidArgument(f"workload {str(spec)[:100]!r}: expected NAME=COMMAND")
    name, _, command = spec.partition("=")
    if not _NAME.match(name):
        raise InvalidArgument(f"workload name {name[:100]!r}: use 1-64 of [A-Za-z0-9_.-], starting with a "
                              "letter or digit")
    if not command.strip():
        raise InvalidArgument(f"workload {name}: empty command")
    if len(command) > MAX_COMMAND or "\0" in command:
        raise InvalidArgument(f"workload {name}: the command must be at most {MAX_COMMAND} bytes, without NUL")
    return Workload(name, ("sh", "-c", command), command)


# ============================================================================================ the image
def _write(root: str, rel: str, data: bytes, mode: int = 0o644) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _write_stream(root: str, rel: str, size: int, rng: random.Random, text: bool) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        n = 0
        i = 0
        while n < size:
            if text:
                chunk = b"".join(b"2026-12-06T10:%02d:%02d app[%d]: request %d served in %d ms\n"
                                 % (i // 60 % 60, i % 60, 1000 + i % 7, i + j, rng.randrange(1, 900))
                                 for j in range(2000))
                i += 2000
            else:
                chunk = rng.randbytes(min(MiB, size - n))
            chunk = chunk[:size - n]
            f.write(chunk)
            n += len(chunk)


def _make_db(path: str, size: int) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = max(16, size // (ROW_PAYLOAD + 50))
    con = sqlite3.connect(path)
    try:
        with con:
            con.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, k TEXT, v BLOB, updated INTEGER DEFAULT 0)")
            con.execute("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
                        "INSERT INTO rows (id, k, v) SELECT i, printf('key-%08d', i), randomblob(?) FROM c",
                        (rows, ROW_PAYLOAD))
    finally:
        con.close()
    return rows


def _copy_stdlib(root: str, budget: int) -> list[str]:
    """Copy ``.py`` files of this Python's standard library, package by package in name order, until
    ``budget`` bytes; returns the top-level directories copied."""
    src = sysconfig.get_paths()["stdlib"]
    dest = os.path.join(root, STDLIB_DIR)
    os.makedirs(dest, exist_ok=True)
    used = 0
    dirs = []
    for top in sorted(os.listdir(src)):
        full = os.path.join(src, top)
        if top in ("site-packages", "dist-packages", "test", "idlelib", "__pycache__") or not os.path.isdir(full) \
                or os.path.islink(full) or not os.path.exists(os.path.join(full, "__init__.py")):
            continue
        for dirpath, dirnames, filenames in os.walk(full):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "test", "tests"))
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                s = os.path.join(dirpath, fn)
                d = os.path.join(dest, os.path.relpath(s, src))
                os.makedirs(os.path.dirname(d), exist_ok=True)
                shutil.copyfile(s, d)
                used += os.path.getsize(d)
        dirs.append(top)
        if used >= budget:
            break
    return dirs


def _make_bundle(path: str, files: int, rng: random.Random) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for i in range(files):
            data = rng.randbytes(rng.randrange(100, 2000))
            ti = tarfile.TarInfo(f"pkg{i // 100:03d}/file{i:05d}.dat")
            ti.size, ti.mtime, ti.mode = len(data), 1_765_000_000, 0o644
            t.addfile(ti, io.BytesIO(data))


def _copy_shell(root: str) -> None:
    """This host's ``/bin/sh`` and the shared libraries ``ldd`` names for it, at the same paths under
    ``root`` (so ``chroot ROOT sh -c ...`` works in the image)."""
    sh = os.path.realpath("/bin/sh")
    if shutil.which("ldd") is None:
        raise FailedPrecondition("copying a shell into the image needs ldd (Debian: libc-bin)")
    out = subprocess.run(["ldd", sh], capture_output=True, text=True, timeout=60).stdout
    libs = [w for line in out.splitlines() for w in line.split() if w.startswith("/")]
    for src, dest in [(sh, "bin/sh")] + [(lib, lib.lstrip("/")) for lib in libs]:
        d = os.path.join(root, dest)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        shutil.copyfile(os.path.realpath(src), d)
        os.chmod(d, 0o755)


def populate_tree(root: str, sizes: ImageSizes = ISSUE_SIZES, seed: int = 14, *, shell: bool = False) -> dict:
    """Create the workload image's files under ``root`` (layer 1's tree); returns what was made.
    ``shell``: also this host's ``/bin/sh`` and its libraries, for workloads run chrooted."""
    rng = random.Random(seed)
    if shell:
        _copy_shell(root)
    stdlib_dirs = _copy_stdlib(root, sizes.stdlib_bytes)
    rows = _make_db(os.path.join(root, DB_PATH), sizes.db_bytes)
    _write_stream(root, LOG_PATH, sizes.log_bytes, rng, text=True)
    _write_stream(root, DATA_PATH, sizes.file_bytes, rng, text=False)
    _write_stream(root, BIG_PATH, sizes.big_bytes, rng, text=False)
    conf = b"# app configuration\nworkers = 4\n" + b"".join(
        b"option_%03d = %s\n" % (i, b"x" * 40) for i in range(80))
    _write(root, CONFIG_PATH, conf.ljust(4096, b"#")[:4096])
    _write(root, DELETED_FILE, b"Welcome to the thinpool workload image.\n")
    _make_bundle(os.path.join(root, BUNDLE_PATH), sizes.small_files, rng)
    return {"db_rows": rows, "stdlib_dirs": stdlib_dirs}


def _umoci(*args: str) -> None:
    if shutil.which("umoci") is None:
        raise FailedPrecondition("building the workload image needs umoci (Debian: umoci)")
    rootless = ["--rootless"] if os.geteuid() != 0 and args[0] == "unpack" else []
    try:
        r = subprocess.run(["umoci", *args, *rootless], capture_output=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"umoci {args[0]} timed out") from None
    if r.returncode != 0:
        raise FailedPrecondition(f"umoci {' '.join(args)} failed: {r.stderr.decode(errors='replace').strip()[-400:]}")


def build_workload_image(dest: str, sizes: ImageSizes = ISSUE_SIZES, *, tag: str = "workload",
                         seed: int = 14, shell: bool = False) -> dict:
    """Build the workload image as an OCI layout in directory ``dest`` (must not exist) with ``umoci``:
    layer 1 is :func:`populate_tree`'s tree (``umoci new`` / ``unpack`` / ``repack``), layer 2 deletes the
    last stdlib package copied and :data:`DELETED_FILE` (``umoci repack`` of the same bundle: two
    whiteouts).  ``shell``: the image also holds this host's ``/bin/sh`` (for ``--chroot`` workloads).
    Returns ``{"archive": dest, "tag": tag, "db_rows": ..., "deleted": [...]}``.  The bundle
    used to build it is removed."""
    if os.path.exists(dest):
        raise InvalidArgument(f"{dest}: exists (the image is built into a new directory)")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", tag):
        raise InvalidArgument(f"tag {tag[:140]!r}: not a valid OCI tag")
    bundle = dest + ".bundle"
    try:
        _umoci("init", "--layout", dest)
        _umoci("new", "--image", f"{dest}:{tag}")
        _umoci("unpack", "--image", f"{dest}:{tag}", bundle)
        rootfs = os.path.join(bundle, "rootfs")
        made = populate_tree(rootfs, sizes, seed, shell=shell)
        _umoci("repack", "--refresh-bundle", "--history.created_by", "thinpool workload image: files",
               "--image", f"{dest}:{tag}", bundle)
        deleted = [DELETED_FILE]
        os.unlink(os.path.join(rootfs, DELETED_FILE))
        if len(made["stdlib_dirs"]) > 1:
            gone = f"{STDLIB_DIR}/{made['stdlib_dirs'][-1]}"
            shutil.rmtree(os.path.join(rootfs, gone))
            deleted.append(gone)
        _umoci("repack", "--history.created_by", "thinpool workload image: deletions",
               "--image", f"{dest}:{tag}", bundle)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
    return {"archive": dest, "tag": tag, "db_rows": made["db_rows"], "deleted": deleted, "sizes": sizes.__dict__}
