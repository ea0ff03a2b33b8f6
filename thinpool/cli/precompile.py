"""Compile the kernels of ``thinpool demo``, of the common CLI commands and of a served pool's start
into the machine kernel cache before their first run.

    python -m thinpool.cli.precompile

What the install runs: the package's build backend (``build_backend/thinpool_build.py``, used by
``pip install .`` and ``pip install -e .``) calls this module after building, with numba in the
build environment, so the first ``thinpool demo`` after an install loads its kernels instead of
compiling them (docs/performance.md, "Cold start").  The compiled code lands where every later run
looks for it: numba's cache in ``$XDG_CACHE_HOME/thinpool/kernels/<digest of the kernel sources>``
(``~/.cache/...``; or ``$NUMBA_CACHE_DIR`` when set) of the user who installs -- nothing is written
anywhere else, and nothing at all when no such directory is writable.  Each cached kernel stays keyed
the way every run checks it: the digest of the kernel sources (the directory), numba's version (the
index), the processor and the kernel's bytecode (each entry) -- a change of any of them compiles
afresh at first use, as without this step; a damaged file is recompiled
(:func:`thinpool.jit_cache.harden`).

The work is the demo's own library calls on a small temporary pool, split over two processes the
way a cold demo splits it (:func:`thinpool.containers.demo.compile_helper`): this one reaches
``write_one``, the helper the rest (:data:`thinpool.containers.demo.HELPER_KERNELS`), so the kernels
compile for exactly the argument types the demo passes.  Then this process runs the CLI commands of
:data:`CLI_COMMANDS` on a small pool (as ``thinpool ...`` would, output discarded), which compiles
the kernels they add (``read``, ``discard``, ``check``, ``delete``: about 4 CPU seconds, while the
helper is still busy with the demo's), and last what ``thinpool serve`` runs before it accepts its
first client (:func:`thinpool.nbd.served.warm_up`: the NBD session's compiled request loop and the
reads of the warm-up, :data:`SERVE_KERNELS`; about 5 CPU seconds), so a served pool starts without
compiling either.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import contextlib
import io

from ..containers import demo

#: every kernel ``thinpool demo`` compiles on an empty cache (``module.kernel``)
DEMO_KERNELS = ("kernels.write_one",) + demo.HELPER_KERNELS
#: every kernel a served pool (``thinpool serve``) compiles before its first client on an empty cache:
#: :func:`thinpool.nbd.served.warm_up`'s (``module.kernel``)
SERVE_KERNELS = ("kernels_nbd.serve_reads", "kernels.read_one_pread", "walks.mapped_flags")
#: the CLI commands run on a small pool after the demo's path (``{pool}``, ``{file}``, ``{out}``: temporary)
CLI_COMMANDS = (
    ("create", "{pool}", "--data-size", "64MiB"),
    ("create-thin", "{pool}", "v", "4MiB"),
    ("write", "{pool}", "v", "{file}"),
    ("snapshot", "{pool}", "v", "s"),
    ("write", "{pool}", "v", "{file}", "--offset", "64KiB"),
    ("read", "{pool}", "s", "-o", "{out}"),
    ("read", "{pool}", "v", "--offset", "4096", "--length", "4096", "-o", "{out}"),
    ("ls", "{pool}", "--usage"),
    ("discard", "{pool}", "v", "--offset", "0", "--length", "64KiB"),
    ("check", "{pool}"),
    ("delete", "{pool}", "s"),
)


def _first_write_work() -> None:
    """The demo's path to ``write_one``: a one-block write of a file's read-only contents."""
    from ..containers.layers import file_content
    from ..pool import Pool

    with tempfile.TemporaryDirectory(prefix="thinpool-precompile-") as tmp:
        with Pool.create(os.path.join(tmp, "pool"), data_size="64MiB") as pool:
            vol = pool.create_thin("v", "1MiB")
            vol.write(4096, file_content(1, 4096))


def _cli_work() -> None:
    """:data:`CLI_COMMANDS` in this process, through the CLI's own entry point (output discarded)."""
    from . import main as thinpool_cli

    with tempfile.TemporaryDirectory(prefix="thinpool-precompile-") as tmp:
        names = {"pool": os.path.join(tmp, "pool"), "file": os.path.join(tmp, "in.bin"),
                 "out": os.path.join(tmp, "out.bin")}
        with open(names["file"], "wb") as f:
            f.write(os.urandom(3 * 65536 + 512))
        for command in CLI_COMMANDS:
            with contextlib.redirect_stdout(io.StringIO()):
                thinpool_cli.main([a.format(**names) for a in command], prog_name="thinpool", standalone_mode=False)


def _serve_work() -> None:
    """What ``thinpool serve`` runs before its first client, on a small pool opened the way it opens
    one: :func:`thinpool.nbd.served.warm_up` (so ``serve_reads`` compiles for the argument types a
    session of any pool's volumes gives it)."""
    from ..nbd.served import warm_up
    from ..pool import Pool

    with tempfile.TemporaryDirectory(prefix="thinpool-precompile-") as tmp:
        path = os.path.join(tmp, "pool")
        with Pool.create(path, data_size="64MiB") as pool:
            pool.create_thin("v", "1MiB").write(0, bytes(range(256)) * 16)
        with Pool.open(path) as pool:
            warm_up(pool)


def precompile() -> tuple[str | None, list[str]]:
    """Compile (or load) the demo's kernels into the machine kernel cache; returns (the cache
    directory or None when the JIT is off or no kernel cache directory is writable, the kernels of
    :data:`DEMO_KERNELS` and :data:`SERVE_KERNELS` still missing from it afterwards)."""
    kernels = DEMO_KERNELS + SERVE_KERNELS
    if os.environ.get("NUMBA_DISABLE_JIT") == "1":
        return None, list(kernels)
    from .. import jit_cache, kernels_cache  # noqa: F401 -- registers the machine cache (imports numba)
    where = jit_cache.machine_dir or os.environ.get("NUMBA_CACHE_DIR")
    if not where:
        return None, list(kernels)
    with demo.compile_helper(wait=True):
        _first_write_work()
        _cli_work()
        _serve_work()
    return where, demo.uncached(kernels)


def main() -> int:
    """``python -m thinpool.cli.precompile``: one line on stderr saying what was done; exit
    status 0 also when nothing could be compiled (an install must not fail for want of a cache)."""
    t0 = time.perf_counter()
    try:
        where, missing = precompile()
    except Exception as e:  # noqa: BLE001 -- report, never fail the install
        sys.stderr.write(f"thinpool: kernels not compiled ahead of the first run: {type(e).__name__}: {e}\n")
        return 0
    took = time.perf_counter() - t0
    if where is None:
        sys.stderr.write("thinpool: kernels not compiled ahead of the first run (JIT off or no writable cache)\n")
    elif missing:
        sys.stderr.write(f"thinpool: compiled kernels into {where} in {took:.1f} s; still missing: "
                         f"{', '.join(missing)}\n")
    else:
        sys.stderr.write(f"thinpool: compiled the kernels of the demo, the common commands and serve's start "
                         f"into {where} in {took:.1f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
