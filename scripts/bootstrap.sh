#!/usr/bin/env bash
# Installs the Debian 12 packages that building and testing Switchyard needs, if any is missing.
# Does nothing (and needs no network) when all are installed. Runs apt-get as root, or through
# sudo when not root. Extra packages can be named in SY_EXTRA_PACKAGES (space separated).
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config       # toolchain
  libgtest-dev libgmock-dev              # tests
  libopenblas-dev libopenblas0-openmp    # CPU GEMMs (cblas.h; the build on OpenMP threads)
  libcli11-dev nlohmann-json3-dev libfmt-dev  # the switchyard command-line tool
  libopenmpi-dev openmpi-bin             # the MPI communicator and its mpirun tests
  python3-torch libtorch-dev python3-pytest python3-numpy pybind11-dev python3-dev  # the PyTorch binding
)
# shellcheck disable=SC2206  # word splitting is intended
packages+=(${SY_EXTRA_PACKAGES:-})

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [[ "$status" == installed ]] || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

echo "bootstrap: installing ${missing[*]}" >&2
if [[ $(id -u) -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "bootstrap: missing packages (${missing[*]}) and not root, and sudo is not available" >&2
  exit 1
fi
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
