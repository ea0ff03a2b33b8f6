"""The small workload image the overlay, workload and compare tests share (built by umoci, seconds)."""

from __future__ import annotations

import os
import subprocess

from tests.support import require_tool
from thinpool.containers.workloads import SMALL_SIZES, build_workload_image


def small_image(top: str) -> dict:
    """Build the workload image with :data:`SMALL_SIZES` (and this host's /bin/sh, for --chroot) in
    ``top/img`` and unpack it independently with ``umoci unpack`` into ``top/unpacked`` (the reference
    tree: ``unpacked/rootfs``)."""
    require_tool("umoci")
    built = build_workload_image(os.path.join(top, "img"), SMALL_SIZES, tag="small", shell=True)
    ref = os.path.join(top, "unpacked")
    subprocess.run(["umoci", "unpack", "--image", f"{built['archive']}:small", ref,
                    *(["--rootless"] if os.geteuid() != 0 else [])], check=True, capture_output=True)
    built["reference"] = os.path.join(ref, "rootfs")
    return built
