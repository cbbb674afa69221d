#!/usr/bin/env bash
# Install everything blsfab needs on a fresh Debian bookworm machine, then the
# package itself (editable). Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libfabric-dev libfabric-bin openmpi-bin libopenmpi-dev pkg-config make)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
# torch is pinned to the CPU build; a looser pin would pull a CUDA build of several GB.
$PY -m pip install -q --disable-pip-version-check -r requirements.txt
# Editable install of the Cython extension, built against the system libfabric.
$PY -m pip install -q --disable-pip-version-check --no-build-isolation -e .
$PY -c "import blsfab; print('setup: blsfab', blsfab.__version__, 'providers', blsfab.providers())"
