#!/usr/bin/env bash
# Builds Switchyard (scripts/setup.sh: installs missing Debian packages, builds into build/) and
# runs the whole test suite with ctest. Arguments are passed to ctest, e.g.
#   ./scripts/test.sh -LE large        # skip the tests labelled "large"
#   ./scripts/test.sh -R example       # only the examples
# The environment variables of scripts/setup.sh apply (SY_BUILD_DIR, SY_BUILD_TYPE, SY_CMAKE_ARGS).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
"$root/scripts/setup.sh"
ctest --test-dir "${SY_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)" "$@"
