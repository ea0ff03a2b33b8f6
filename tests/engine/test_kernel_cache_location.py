"""Where the compiled kernels are cached (:mod:`thinpool.jit_cache`): one directory per machine user
and per digest of the kernel sources, so a fresh checkout (a CI clone, a new virtual environment) of
sources some checkout already ran loads their compiled kernels instead of compiling them again, and
a change to any kernel source compiles afresh in a directory of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from thinpool import schema

_PROBE = """
import numpy as np
from thinpool import jit_cache, kernels_map
print(int(kernels_map.mapping_block(np.uint64(1 << 24))), jit_cache.machine_dir)
"""


def _checkout(root: Path) -> Path:
    """A copy of the package's sources without any cache (what a fresh clone has)."""
    src = os.path.dirname(schema.__file__)
    shutil.copytree(src, root / "thinpool", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _probe(checkout: Path, cache_home: Path) -> tuple[str, str, int, int]:
    """(answer, cache directory, cache entries saved, cache entries loaded) of one fresh process."""
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home), PYTHONPATH=str(checkout), NUMBA_DEBUG_CACHE="1")
    for name in ("NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT"):
        env.pop(name, None)
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=checkout, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    answer, where = lines[-1].split(" ", 1)
    return (answer, where, sum("data saved" in x for x in lines), sum("data loaded" in x for x in lines))


def test_fresh_checkout_of_the_same_sources_loads_the_kernels_another_compiled(tmp_path):
    cache = tmp_path / "cache"
    a, b = _checkout(tmp_path / "a"), _checkout(tmp_path / "b")
    answer, where_a, saved, _ = _probe(a, cache)
    assert answer == "1" and saved > 0
    assert Path(where_a).parent == cache / "thinpool" / "kernels"
    assert any(Path(where_a).glob("kernels_map.*.nbi"))
    assert not list(a.rglob("*.nbi"))  # nothing in the checkout itself
    # another checkout at another path: same sources, same directory, nothing compiled
    answer, where_b, saved, loaded = _probe(b, cache)
    assert (answer, where_b, saved) == ("1", where_a, 0) and loaded > 0


def test_changed_kernel_source_compiles_afresh_in_its_own_directory(tmp_path):
    """A constant of schema.py is frozen into the cached machine code: a checkout with another value
    must not load the code compiled with the first (its digest names another directory)."""
    cache = tmp_path / "cache"
    a, b = _checkout(tmp_path / "a"), _checkout(tmp_path / "b")
    schema_py = b / "thinpool" / "schema.py"
    text = schema_py.read_text()
    assert text.count("TIME_BITS = 24\n") == 1
    schema_py.write_text(text.replace("TIME_BITS = 24\n", "TIME_BITS = 20\n"))
    answer_a, where_a, _, _ = _probe(a, cache)
    answer_b, where_b, saved, _ = _probe(b, cache)
    assert (answer_a, answer_b) == ("1", "16") and where_a != where_b and saved > 0
    assert _probe(a, cache)[:3] == ("1", where_a, 0)  # each keeps its own


def test_directories_of_sources_unused_for_30_days_are_removed_when_a_new_one_is_made(tmp_path):
    cache = tmp_path / "cache"
    base = cache / "thinpool" / "kernels"
    old, recent = base / "00000000000000aa", base / "00000000000000bb"
    for d in (old, recent):
        d.mkdir(parents=True)
        (d / "x.nbi").write_bytes(b"")
    month = time.time() - 31 * 24 * 3600
    os.utime(old, (month, month))
    answer, where, _, _ = _probe(_checkout(tmp_path / "a"), cache)
    assert answer == "1" and Path(where).is_dir()
    assert not old.exists() and recent.exists()


def test_a_kernel_compiles_under_an_exclusive_lock_that_nested_compiles_of_it_reenter(tmp_path):
    """serialize_compiles' wrapper: numba's compile (which looks in the cache first) runs while this
    process holds the kernel's flock -- another process asking for it waits, then loads what was
    saved -- and a compile of the same kernel inside it does not wait for itself."""
    import fcntl
    import threading

    from thinpool import jit_cache
    path = str(tmp_path / "kernels.k.lock")
    seen = []

    def other_process_can_lock() -> bool:
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def compile_(sig):
        seen.append((sig, other_process_can_lock()))
        if sig == "outer":
            wrapped("inner")  # re-entered: must not block on its own lock
        if sig == "fails":
            raise ValueError("typing error")
        return sig

    wrapped = jit_cache._locked_compile(compile_, path, threading.RLock())
    assert wrapped("outer") == "outer"
    assert seen == [("outer", False), ("inner", False)]
    assert other_process_can_lock()  # released after
    try:
        wrapped("fails")
    except ValueError:
        pass
    assert seen[-1] == ("fails", False) and other_process_can_lock()


def test_damaged_cache_files_are_detected_and_the_kernel_compiled_again(tmp_path):
    """A data file (``.nbc``) that fails its checksum, and an index (``.nbi``) that cannot be read,
    count as missing: the kernel compiles again, gives the right answer and the save replaces the
    damaged file (the next process loads it).  numba alone raises on a truncated pickle or runs
    whatever machine code a damaged file unpickles to."""
    cache = tmp_path / "cache"
    checkout = _checkout(tmp_path / "a")
    answer, where, saved, _ = _probe(checkout, cache)
    assert answer == "1" and saved > 0
    data = sorted(Path(where).glob("kernels_map.mapping_block-*.nbc"))
    index = sorted(Path(where).glob("kernels_map.mapping_block-*.nbi"))
    assert len(data) == 1 and len(index) == 1
    raw = bytearray(data[0].read_bytes())
    raw[-40] ^= 0xFF  # one flipped byte deep in the pickled machine code
    data[0].write_bytes(bytes(raw))
    answer, _, saved, loaded = _probe(checkout, cache)
    assert answer == "1" and saved > 0
    assert data[0].read_bytes() != bytes(raw)  # replaced
    assert _probe(checkout, cache)[2] == 0     # and loaded by the next process, nothing compiled
    index[0].write_bytes(index[0].read_bytes()[:20])  # a truncated index
    answer, _, saved, _ = _probe(checkout, cache)
    assert answer == "1" and saved > 0
    assert _probe(checkout, cache)[2] == 0


def test_a_data_file_without_thinpools_checksum_is_not_trusted(tmp_path):
    """What numba itself saved (no checksum: an older thinpool, another tool) is compiled again."""
    import pickle

    from thinpool import jit_cache
    cache = tmp_path / "cache"
    checkout = _checkout(tmp_path / "a")
    _, where, _, _ = _probe(checkout, cache)
    (nbc,) = Path(where).glob("kernels_map.mapping_block-*.nbc")
    raw = nbc.read_bytes()
    assert raw.startswith(jit_cache.DATA_MAGIC)
    payload = raw[len(jit_cache.DATA_MAGIC) + 32:]
    pickle.loads(payload)  # the payload is numba's own pickle
    nbc.write_bytes(payload)
    answer, _, saved, _ = _probe(checkout, cache)
    assert answer == "1" and saved > 0 and nbc.read_bytes().startswith(jit_cache.DATA_MAGIC)


def _rewrite_index(index: Path, version=None, cpu=None) -> None:
    """Rewrite a numba cache index as another numba ``version`` or another processor ``cpu`` wrote it."""
    import pickle

    from numba.core.serialize import dumps
    with open(index, "rb") as f:
        old_version = pickle.load(f)
        stamp, overloads = pickle.loads(f.read())
    if cpu is not None:
        overloads = {(sig, (magic[0], cpu) + tuple(magic[2:]), hashes): data
                     for (sig, magic, hashes), data in overloads.items()}
    index.write_bytes(pickle.dumps(version or old_version, protocol=-1) + dumps((stamp, overloads)))


def test_cached_kernels_of_another_numba_version_or_processor_are_compiled_again(tmp_path):
    """What an install compiled ahead of time is only used by the numba and the processor it was
    compiled for: numba keys its index on its version and each entry on the CPU name and features
    (the sources' digest names the directory: test above)."""
    cache = tmp_path / "cache"
    checkout = _checkout(tmp_path / "a")
    _, where, saved, _ = _probe(checkout, cache)
    assert saved > 0
    (index,) = Path(where).glob("kernels_map.mapping_block-*.nbi")
    _rewrite_index(index)  # unchanged: still loaded
    assert _probe(checkout, cache)[2] == 0
    _rewrite_index(index, cpu="some-other-cpu")
    answer, _, saved, _ = _probe(checkout, cache)
    assert answer == "1" and saved > 0
    _rewrite_index(index, version="0.1.0")
    answer, _, saved, _ = _probe(checkout, cache)
    assert answer == "1" and saved > 0
    assert _probe(checkout, cache)[2] == 0
