#!/usr/bin/env bash
# Installs missing Debian packages (scripts/bootstrap.sh), then configures and builds Switchyard
# (library, tool, tests and examples) into build/.
#
# Environment (all optional):
#   SY_BUILD_DIR   build directory, relative to the repository root or absolute (default: build)
#   SY_BUILD_TYPE  CMake build type (default: Release)
#   SY_CMAKE_ARGS  extra arguments for the CMake configure step, e.g. "-DSY_WITH_CUDA=OFF"
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
"$root/scripts/bootstrap.sh"

build_dir=${SY_BUILD_DIR:-build}
# shellcheck disable=SC2206  # word splitting is intended
extra_args=(${SY_CMAKE_ARGS:-})
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE="${SY_BUILD_TYPE:-Release}" \
  "${extra_args[@]}"
cmake --build "$build_dir"
