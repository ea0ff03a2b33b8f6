#!/usr/bin/env bash
# Install what the tests need (Debian tools, Python packages) when missing, then run the suite.
# Usage: bash tests/run.sh [pytest args...]     (THINPOOL_SOAK=1 for the long soak settings;
#        THINPOOL_REAL_IMAGES=1 also imports a real Debian minbase rootfs made with mmdebstrap)
set -euo pipefail
cd "$(dirname "$0")/.."

# executable:debian-package pairs the tests drive for real
tools="thin_check:thin-provisioning-tools thin_dump:thin-provisioning-tools qemu-img:qemu-utils
qemu-io:qemu-utils qemu-nbd:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdfuse:nbdfuse
fio:fio fusermount3:fuse3 mkfs.ext4:e2fsprogs nbdkit:nbdkit strace:strace unshare:util-linux
blkparse:blktrace losetup:mount blkdiscard:util-linux umoci:umoci skopeo:skopeo podman:podman gcc:gcc"
# a real Debian rootfs image (tests/containers/test_real_image.py) only with THINPOOL_REAL_IMAGES=1
if [ "${THINPOOL_REAL_IMAGES:-}" = 1 ]; then tools="$tools mmdebstrap:mmdebstrap"; fi
missing=()
for pair in $tools; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
# the C extensions (setup.py) are optional at install, but the tests need them under CI=true: a C
# compiler (gcc above) and the interpreter's headers
if ! python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  missing+=(python3-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tests/run.sh: installing Debian packages: $pkgs" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  else
    echo "tests/run.sh: missing $pkgs (not root or no apt-get): tests needing them will skip (fail under CI=true)" >&2
  fi
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "Running pip as the 'root' user" || true
# The kernel reference tests once more with the JIT off: the kernel bodies run as Python (coverage,
# bounds checks).  Short (~20 s); skipped when pytest arguments select something else.
if [ $# -eq 0 ]; then
  NUMBA_DISABLE_JIT=1 python3 -m pytest -q -p no:cacheprovider tests/engine/test_kernel_reference.py
fi
# The suite on two worker processes (pytest-xdist; CI has 2 cores): a module's tests stay together in
# one worker, in file order (tests/conftest.py groups them), modules handed out in collection order (not
# largest first: a few long modules then ran last); `-n 0` as an argument runs it in one process.
exec python3 -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --no-loadscope-reorder "$@"
