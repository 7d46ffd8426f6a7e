#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds the CUDA backend for the given architectures (default
# 90a) into build-gpu/ and runs the CUDA tests, then the GPU cases of the ctest suite (training on
# CUDA against the CPU; where MPI was found, the NCCL communicator, expert parallel over NCCL and
# training through the communicator, at one rank and, with two GPUs, two), then, when asked,
# compute-sanitizer on a reduced set.
#   ./scripts/gpu-check.sh [gtest filter] [architectures]
# Logs go to $SY_LOG_DIR (default build-gpu/logs). SY_CMAKE_ARGS adds configure arguments (e.g.
# -DCMAKE_PREFIX_PATH=...); SY_MEMCHECK_FILTER and SY_RACECHECK_FILTER run compute-sanitizer's
# memcheck and racecheck on the tests they select (a gtest filter each).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
filter=${1:-*Cuda*}
arch=${2:-90a}
log_dir=${SY_LOG_DIR:-build-gpu/logs}
mkdir -p "$log_dir"
# shellcheck disable=SC2086  # SY_CMAKE_ARGS is a list of arguments
if ! { cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
         -DCMAKE_CUDA_ARCHITECTURES="$arch" -DSY_BUILD_PYTHON=OFF ${SY_CMAKE_ARGS:-} &&
       cmake --build build-gpu -j "$(nproc)"; } >"$log_dir/build.log" 2>&1; then
  grep -E -m 20 "error|Error" "$log_dir/build.log" || true
  tail -n 20 "$log_dir/build.log"
  exit 1
fi
# Every step runs; the script fails if any did.
status=0
./build-gpu/tests/switchyard_tests --gtest_filter="$filter" --gtest_brief=1 2>&1 |
  tee "$log_dir/gtest.log" | tail -n 30 || status=1
# The GPU cases of the ctest suite (the mpirun ones exist where CMake found MPI).
ctest --test-dir build-gpu -R "nccl|through_communicator|train_cuda_matches_cpu" \
  --output-on-failure 2>&1 | tee "$log_dir/ctest.log" | tail -n 15 || status=1
for tool in memcheck racecheck; do
  var=SY_${tool^^}_FILTER
  [[ -n ${!var:-} ]] || continue
  compute-sanitizer --tool "$tool" --error-exitcode 1 ./build-gpu/tests/switchyard_tests \
    --gtest_filter="${!var}" --gtest_brief=1 2>&1 | tee "$log_dir/$tool.log" | tail -n 5 ||
    status=1
done
exit $status
