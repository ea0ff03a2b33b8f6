"""A pool's files: symlinks never followed, another user's pool refused, private modes, the lock.

Root is the case that matters (the suite runs as root): a user who owns a pool directory must not be
able to steer root into truncating, extending or punching a file through a symlink, and no other
local user may open (and so flock) the lock of a new pool.  Tests that need another uid fork a
child that drops to uid/gid 65534 (nobody); they skip when not run as root.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest
from click.testing import CliRunner

from tests.support import IN_CI
from thinpool import pooldir
from thinpool.cli import hoist_global_options, load_all_commands, main
from thinpool.devtable import DeviceTable
from thinpool.errors import InvalidArgument, PermissionDenied, PoolLocked
from thinpool.pool import Pool
from thinpool.repair import repair

NOBODY = 65534
ROOT = os.geteuid() == 0
# under CI=true these run (and fail) even without root: a missing precondition is never a silent skip there
needs_root = pytest.mark.skipif(not ROOT and not IN_CI, reason="needs root (chown to another uid, setuid to nobody)")


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, env=env)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def digest(path: str) -> tuple[int, str]:
    with open(path, "rb") as f:
        data = f.read()
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.fixture
def base():
    """A directory every user can traverse (pytest's tmp_path is under a 0700 directory)."""
    d = tempfile.mkdtemp(prefix="thinpool-files-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pool_path(base):
    p = os.path.join(base, "pool")
    with Pool.create(p, "4MiB") as pool:
        t = pool.create_thin("v", "1MiB")
        t.write(0, b"committed" * 1000)
    return p


@pytest.fixture
def secret(base):
    """A root-only file outside the pool, with content, that nothing may touch."""
    path = os.path.join(base, "secret")
    with open(path, "wb") as f:
        f.write(b"root only\n" * 500)
    os.chmod(path, 0o600)
    return path


def as_user(fn, uid: int = NOBODY, timeout: float = 60.0):
    """Run ``fn()`` in a forked child with uid/gid ``uid`` and no supplementary groups; returns
    ("ok", value) or ("error", class name, message)."""
    load_all_commands()  # the child may not be able to read the modules' files
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                out = ("ok", fn())
            except BaseException as exc:  # noqa: BLE001 -- reported to the parent
                out = ("error", type(exc).__name__, str(exc))
            os.write(w, pickle.dumps(out))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        assert time.monotonic() < deadline
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pickle.loads(b"".join(chunks))


def chown_tree(path: str, uid: int) -> None:
    os.chown(path, uid, uid)
    for name in os.listdir(path):
        os.chown(os.path.join(path, name), uid, uid, follow_symlinks=False)


# ---------------------------------------------------------------------------------------------- modes
def test_new_pool_is_private(base):
    p = os.path.join(base, "p")
    Pool.create(p, "4MiB").close()
    assert mode_of(p) == 0o700
    for name in ("data", "metadata", "lock"):
        assert mode_of(os.path.join(p, name)) == 0o600, name


def test_new_pool_ignores_a_loose_umask(base):
    old = os.umask(0)
    try:
        p = os.path.join(base, "p")
        Pool.create(p, "4MiB").close()
    finally:
        os.umask(old)
    assert mode_of(p) == 0o700
    assert {mode_of(os.path.join(p, n)) for n in ("data", "metadata", "lock")} == {0o600}


def test_create_mode_option(base):
    p = os.path.join(base, "p")
    r = invoke("create", p, "--data-size", "4M", "--mode", "0750")
    assert r.exit_code == 0, r.output
    assert mode_of(p) == 0o750
    for name in ("data", "metadata", "lock"):
        assert mode_of(os.path.join(p, name)) == 0o640, name
    q = os.path.join(base, "q")
    Pool.create(q, "4MiB", mode=0o755).close()
    assert mode_of(q) == 0o755 and mode_of(os.path.join(q, "metadata")) == 0o644


@pytest.mark.parametrize("bad", ["0650", "abc", "1777", "-1"])
def test_create_bad_mode_is_refused_and_creates_nothing(base, bad):
    p = os.path.join(base, "p")
    r = invoke("create", p, "--data-size", "4M", "--mode", bad)
    assert r.exit_code == 2 and "--mode" in r.output
    assert not os.path.exists(p)
    with pytest.raises(InvalidArgument, match="mode"):
        Pool.create(p, "4MiB", mode=bad)
    assert not os.path.exists(p)


def test_existing_empty_dir_keeps_its_mode_unless_mode_is_given(base):
    p = os.path.join(base, "p")
    os.mkdir(p)
    os.chmod(p, 0o711)
    Pool.create(p, "4MiB").close()
    assert mode_of(p) == 0o711 and mode_of(os.path.join(p, "metadata")) == 0o600
    q = os.path.join(base, "q")
    os.mkdir(q)
    os.chmod(q, 0o755)
    Pool.create(q, "4MiB", mode=0o700).close()
    assert mode_of(q) == 0o700


def test_old_pool_with_open_modes_keeps_working(pool_path):
    """Pools made before private modes (0755/0644) open and commit, and are not chmod-ed."""
    os.chmod(pool_path, 0o755)
    for name in ("data", "metadata", "lock"):
        os.chmod(os.path.join(pool_path, name), 0o644)
    with Pool.open(pool_path) as pool:
        pool.create_thin("w", "1MiB")
    assert mode_of(pool_path) == 0o755
    assert {mode_of(os.path.join(pool_path, n)) for n in ("data", "metadata", "lock")} == {0o644}


# ---------------------------------------------------------------------------------------------- symlinks
def _open_all_ways(p: str) -> list[BaseException]:
    """Every way a command opens a pool (read-write, read-only, device table, CLI, repair): errors."""
    errors: list[BaseException] = []
    for fn in (lambda: Pool.open(p), lambda: Pool.open(p, read_only=True),
               lambda: DeviceTable.open(p, read_only=False), lambda: DeviceTable.open(p),
               lambda: repair(p)):
        with pytest.raises((InvalidArgument, PermissionDenied)) as info:
            obj = fn()
            obj.close()
        errors.append(info.value)
    return errors


def test_lock_symlink_to_a_root_only_file_is_refused_and_not_truncated(pool_path, secret):
    lock = os.path.join(pool_path, "lock")
    os.unlink(lock)
    os.symlink(secret, lock)
    before = digest(secret), os.stat(secret).st_mtime_ns
    for exc in _open_all_ways(pool_path):
        assert isinstance(exc, InvalidArgument)
        assert lock in str(exc) and "symbolic link" in str(exc)
    for args in (["create-thin", pool_path, "x", "1M"], ["ls", pool_path], ["status", pool_path]):
        r = invoke(*args)
        assert r.exit_code == 1 and f"lock file {lock} is a symbolic link" in r.output, r.output
    assert (digest(secret), os.stat(secret).st_mtime_ns) == before


def test_data_symlink_is_refused_and_target_not_extended_or_punched(pool_path, secret):
    data = os.path.join(pool_path, "data")
    os.unlink(data)
    os.symlink(secret, data)
    before = digest(secret), os.stat(secret).st_blocks
    for fn in (lambda: Pool.open(pool_path), lambda: Pool.open(pool_path, read_only=True)):
        with pytest.raises(InvalidArgument, match="data file .* is a symbolic link"):
            fn().close()
    r = CliRunner().invoke(main, ["write", pool_path, "v"], input=b"x" * 100, catch_exceptions=False)
    assert r.exit_code == 1 and f"data file {data} is a symbolic link" in r.output, r.output
    assert (digest(secret), os.stat(secret).st_blocks) == before


def test_metadata_symlink_is_refused(pool_path, base):
    md = os.path.join(pool_path, "metadata")
    copy = os.path.join(base, "md-copy")
    shutil.copyfile(md, copy)
    os.unlink(md)
    os.symlink(copy, md)
    before = digest(copy)
    os.unlink(os.path.join(pool_path, "lock"))  # re-created by the opens: private, not the link's 0777
    for exc in _open_all_ways(pool_path):
        assert isinstance(exc, InvalidArgument) and "symbolic link" in str(exc)
    assert digest(copy) == before
    assert mode_of(os.path.join(pool_path, "lock")) == 0o600


@pytest.mark.parametrize("name", ["lock", "metadata", "data"])
def test_fifo_or_directory_as_a_pool_file_is_refused_without_hanging(pool_path, name):
    path = os.path.join(pool_path, name)
    os.unlink(path)
    os.mkfifo(path, 0o600)
    t0 = time.monotonic()
    with pytest.raises(InvalidArgument, match=f"{path} is a FIFO, not a regular file"):
        Pool.open(pool_path, read_only=True).close()
    assert time.monotonic() - t0 < 10
    os.unlink(path)
    os.mkdir(path)
    with pytest.raises(InvalidArgument, match="directory|not a thin pool"):
        Pool.open(pool_path).close()


# ---------------------------------------------------------------------------------------------- owners
@needs_root
def test_foreign_pool_directory_is_refused_unless_allowed(pool_path):
    chown_tree(pool_path, NOBODY)
    for fn in (lambda: Pool.open(pool_path), lambda: Pool.open(pool_path, read_only=True),
               lambda: DeviceTable.open(pool_path), lambda: repair(pool_path)):
        with pytest.raises(PermissionDenied, match=f"pool directory {pool_path} is owned by uid {NOBODY}"):
            fn().close()
    r = invoke("ls", pool_path)
    assert r.exit_code == 1 and f"owned by uid {NOBODY}" in r.output and "--allow-foreign" in r.output
    with Pool.open(pool_path, allow_foreign=True) as pool:
        assert pool.thin("v").read(0, 9) == b"committed"
    for args in (["--allow-foreign", "ls", pool_path], ["ls", "--allow-foreign", pool_path]):
        r = invoke(*args)
        assert r.exit_code == 0 and "v" in r.output, r.output
    r = invoke("ls", pool_path, env={"THINPOOL_ALLOW_FOREIGN": "1"})
    assert r.exit_code == 0, r.output
    # the option does not outlive the command (in-process callers)
    assert pooldir.defaults().allow_foreign is False
    with pytest.raises(PermissionDenied):
        Pool.open(pool_path).close()


@needs_root
@pytest.mark.parametrize("name", ["metadata", "data", "lock"])
def test_one_foreign_file_is_refused_naming_it(pool_path, name):
    path = os.path.join(pool_path, name)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(PermissionDenied, match=f"{path} is owned by uid {NOBODY}"):
        Pool.open(pool_path).close()
    with Pool.open(pool_path, allow_foreign=True) as pool:
        assert pool.thin("v").read(0, 9) == b"committed"


@needs_root
def test_root_in_a_users_pool_with_planted_symlinks(pool_path, secret):
    """The attack: a user owns the pool directory and plants `lock` and `data` symlinks to root-only
    files.  Root refuses the pool, and even with --allow-foreign touches neither file."""
    secret2 = secret + "2"
    shutil.copyfile(secret, secret2)
    for name, target in (("lock", secret), ("data", secret2)):
        os.unlink(os.path.join(pool_path, name))
        os.symlink(target, os.path.join(pool_path, name))
    chown_tree(pool_path, NOBODY)
    before = [(digest(s), os.stat(s).st_size, os.stat(s).st_blocks) for s in (secret, secret2)]
    for args in (["create-thin", pool_path, "x", "1M"], ["--allow-foreign", "create-thin", pool_path, "x", "1M"],
                 ["--allow-foreign", "ls", pool_path], ["--allow-foreign", "repair", pool_path]):
        r = invoke(*args)
        assert r.exit_code == 1, r.output
        assert "owned by uid" in r.output or "is a symbolic link" in r.output
    os.unlink(os.path.join(pool_path, "lock"))  # only the data symlink left: the lock is fine now
    with pytest.raises(InvalidArgument, match="data file .* is a symbolic link"):
        Pool.open(pool_path, allow_foreign=True).close()
    assert [(digest(s), os.stat(s).st_size, os.stat(s).st_blocks) for s in (secret, secret2)] == before


@needs_root
def test_hard_link_to_a_root_file_in_a_users_pool_is_refused_even_when_allowed(pool_path, secret):
    """With fs.protected_hardlinks=0 a user can hard-link a root file into their pool as `lock`: the
    file is then root's own, so only the link count in a foreign directory gives it away."""
    chown_tree(pool_path, NOBODY)
    lock = os.path.join(pool_path, "lock")
    os.unlink(lock)
    os.link(secret, lock)
    before = digest(secret), os.stat(secret).st_mtime_ns
    with pytest.raises(PermissionDenied, match=f"lock file {lock} has 2 hard links"):
        Pool.open(pool_path, allow_foreign=True).close()
    r = invoke("--allow-foreign", "create-thin", pool_path, "x", "1M")
    assert r.exit_code == 1 and "hard links" in r.output, r.output
    assert (digest(secret), os.stat(secret).st_mtime_ns) == before


@needs_root
def test_create_in_a_users_empty_directory_is_refused(base):
    p = os.path.join(base, "p")
    os.mkdir(p)
    os.chown(p, NOBODY, NOBODY)
    with pytest.raises(PermissionDenied, match=f"pool directory {p} is owned by uid {NOBODY}"):
        Pool.create(p, "4MiB")
    assert os.listdir(p) == []
    Pool.create(p, "4MiB", allow_foreign=True).close()


# ---------------------------------------------------------------------------------------------- other users
def _try_lock(path: str):
    import fcntl
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return "locked"


@needs_root
def test_another_user_cannot_take_the_lock_of_a_new_pool(pool_path):
    lock = os.path.join(pool_path, "lock")
    assert as_user(lambda: _try_lock(lock))[:2] == ("error", "PermissionError")
    # even with the directory opened up, the lock file itself is 0600
    os.chmod(pool_path, 0o755)
    assert as_user(lambda: _try_lock(lock))[:2] == ("error", "PermissionError")
    with Pool.open(pool_path) as pool:  # and root still opens its pool
        pool.create_thin("w", "1MiB")


@needs_root
def test_non_owner_write_command_says_permission_denied_naming_the_file(base):
    p = os.path.join(base, "p")
    Pool.create(p, "4MiB", mode=0o755).close()  # readable by all: files 0644
    lock = os.path.join(p, "lock")

    def cli(*args):
        r = CliRunner().invoke(main, list(args), catch_exceptions=False)
        return r.exit_code, r.output

    code, out = as_user(lambda: cli("--allow-foreign", "create-thin", p, "x", "1M"))[1]
    assert code == 1
    assert f"permission denied: cannot open {lock} for writing" in out and "owner uid 0" in out, out
    code, out = as_user(lambda: cli("create-thin", p, "x", "1M"))[1]
    assert code == 1 and f"pool directory {p} is owned by uid 0" in out, out
    # reading someone's readable pool works when allowed (a shared lock on a read-only fd)
    code, out = as_user(lambda: cli("--allow-foreign", "ls", p))[1]
    assert code == 0 and "NAME" in out, out
    res = as_user(lambda: Pool.open(p, allow_foreign=True))
    assert res[:2] == ("error", "PermissionDenied") and lock in res[2]
    with DeviceTable.open(p) as table:  # nothing was created by the refused command
        assert table.thins() == []


# ---------------------------------------------------------------------------------------------- the holder
HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "sh" else fcntl.LOCK_EX)
print("ready", flush=True)
time.sleep(float(sys.argv[3]))
"""


def hold(pool: str, kind: str, seconds: float) -> subprocess.Popen:
    """A process that holds the pool's lock (shared or exclusive) for ``seconds``, recording nothing."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, os.path.join(pool, "lock"), kind, str(seconds)],
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    return proc


def test_pool_locked_names_a_reader_not_a_stale_recorded_pid(pool_path):
    with open(os.path.join(pool_path, "lock"), "w") as f:
        f.write("1\n")  # a recorded writer pid that is alive (init) but holds nothing
    proc = hold(pool_path, "sh", 60)
    try:
        with pytest.raises(PoolLocked) as info:
            Pool.open(pool_path).close()
        msg = str(info.value)
        assert f"held by pid {proc.pid} (" in msg and "fcntl" in msg, msg
        assert "pid 1 " not in msg and "pid 1)" not in msg
        Pool.open(pool_path, read_only=True).close()  # readers share
    finally:
        proc.kill()
        proc.wait()


def test_pool_locked_names_the_writer(pool_path):
    proc = hold(pool_path, "ex", 60)
    try:
        r = invoke("ls", pool_path)
        assert r.exit_code == 1
        assert f"is locked by another process: held by pid {proc.pid}" in r.output
        assert "--wait" in r.output
    finally:
        proc.kill()
        proc.wait()


def test_pool_locked_by_this_process_and_unknown_holder(pool_path, monkeypatch):
    with Pool.open(pool_path):
        with pytest.raises(PoolLocked, match=f"held by pid {os.getpid()} \\(this process\\)"):
            Pool.open(pool_path, read_only=True)
        monkeypatch.setattr(pooldir, "_proc_locks", lambda: [])
        with pytest.raises(PoolLocked, match="held by an unknown process"):
            Pool.open(pool_path, read_only=True)


# ---------------------------------------------------------------------------------------------- --wait
def test_wait_succeeds_when_the_holder_exits_in_time(pool_path):
    proc = hold(pool_path, "ex", 1.0)
    try:
        t0 = time.monotonic()
        r = invoke("--wait=30", "create-thin", pool_path, "w", "1M")
        assert r.exit_code == 0, r.output
        assert 0.3 < time.monotonic() - t0 < 20
    finally:
        proc.wait()
    proc = hold(pool_path, "sh", 1.0)  # bare --wait after the command name: waits for ever
    try:
        r = invoke("create-thin", "--wait", pool_path, "x", "1M")
        assert r.exit_code == 0, r.output
    finally:
        proc.wait()
    proc = hold(pool_path, "ex", 1.0)
    try:
        with Pool.open(pool_path, wait=30) as pool:
            assert [t.name for t in pool.thins()] == ["v", "w", "x"]
    finally:
        proc.wait()


def test_wait_times_out_with_pool_locked_naming_the_holder(pool_path):
    proc = hold(pool_path, "ex", 60)
    try:
        t0 = time.monotonic()
        r = invoke("create-thin", "--wait=0.5", pool_path, "w", "1M")
        took = time.monotonic() - t0
        assert r.exit_code == 1
        assert f"after waiting 0.5 s: held by pid {proc.pid}" in r.output, r.output
        assert 0.5 <= took < 10
        t0 = time.monotonic()
        with pytest.raises(PoolLocked, match=f"after waiting 0.3 s: held by pid {proc.pid}"):
            DeviceTable.open(pool_path, wait=0.3)
        assert time.monotonic() - t0 >= 0.3
        r = invoke("--wait", "0.2", "ls", pool_path)
        assert r.exit_code == 1 and "after waiting 0.2 s" in r.output
    finally:
        proc.kill()
        proc.wait()
    with DeviceTable.open(pool_path) as table:  # nothing was created while it was locked
        assert [t.name for t in table.thins()] == ["v"]


def test_wait_argument_is_checked():
    for bad in (-1, "5", math.nan, True):
        with pytest.raises(InvalidArgument, match="lock wait"):
            pooldir.check_wait(bad)
    r = invoke("--wait=soon", "ls", "/nonexistent")
    assert r.exit_code == 2 and "seconds" in r.output


def test_hoisting_global_options():
    h = hoist_global_options
    assert h(["create-thin", "--wait", "P", "v", "1G"]) == ["--wait=forever", "create-thin", "P", "v", "1G"]
    assert h(["--wait", "30", "ls", "P"]) == ["--wait=30", "ls", "P"]
    assert h(["--wait", "ls", "P"]) == ["--wait=forever", "ls", "P"]
    assert h(["ls", "P", "--wait=2", "--allow-foreign"]) == ["--wait=2", "--allow-foreign", "ls", "P"]
    # after "--" nothing is an option
    assert h(["write", "P", "--", "--wait"]) == ["write", "P", "--", "--wait"]
