"""qcow2 peers driven through qemu-img / qemu-io (qemu-utils)."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Iterable

from .common import find_tool

QCOW_OPTS = "cluster_size=65536"


def available() -> bool:
    return bool(find_tool("qemu-img") and find_tool("qemu-io"))


def _tool(name: str) -> str:
    """The path of ``name`` (callers check :func:`available` first)."""
    path = find_tool(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found (install qemu-utils)")
    return path


def create(path: str, size: int, *, backing: str | None = None, prealloc: str | None = None) -> None:
    cmd = [_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-o", QCOW_OPTS]
    if prealloc:
        cmd[-1] += f",preallocation={prealloc}"
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    cmd += [path, str(size)]
    subprocess.run(cmd, check=True)


def snapshot_create(path: str, name: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([_tool("qemu-img"), "snapshot", "-c", name, path], check=True)
    return time.perf_counter() - t0


def run_script(path: str, lines: Iterable[str], cache: str = "writeback") -> float:
    """Feed qemu-io a script (one command per line) on stdin; returns wall seconds of the process."""
    script = "".join(line + "\n" for line in lines).encode()
    t0 = time.perf_counter()
    r = subprocess.run([_tool("qemu-io"), "-f", "qcow2", "-t", cache, path], input=script,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"qemu-io failed: {r.stderr.decode()[-500:]}")
    return dt


def timed_script(path: str, lines: list[str], cache: str = "writeback") -> float:
    """Seconds for ``lines`` net of qemu-io's start-up (an empty script on the same image, subtracted)."""
    base = run_script(path, [], cache)
    return max(run_script(path, lines, cache) - base, 1e-9)


def writes(offsets: Iterable[int], length: int = 4096, pattern: int = 0x5a) -> list[str]:
    return [f"write -q -P {pattern} {o} {length}" for o in offsets]


def reads(offsets: Iterable[int], length: int = 4096) -> list[str]:
    return [f"read -q {o} {length}" for o in offsets]


def fill(path: str, size: int, chunk: int = 64 << 20) -> None:
    """Write every byte of the image (pattern data), so every cluster is allocated."""
    run_script(path, [f"write -q -P {(i // chunk) % 250 + 1} {i} {min(chunk, size - i)}"
                      for i in range(0, size, chunk)])


def remove(*paths: str) -> None:
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)
