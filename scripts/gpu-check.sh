#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds the CUDA backend for the given architectures (default
# 90a) into build-gpu/ and runs the CUDA tests, then the GPU cases of the ctest suite (training on
# CUDA against the CPU; where MPI was found, the NCCL communicator, expert parallel over NCCL and
# training through the communicator, at one rank and, with two GPUs, two), then
# compute-sanitizer memcheck on a reduced set.
#   ./scripts/gpu-check.sh [gtest filter] [architectures]
# Logs go to $SY_LOG_DIR (default build-gpu/logs).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
filter=${1:-*Cuda*}
arch=${2:-90a}
log_dir=${SY_LOG_DIR:-build-gpu/logs}
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch" \
  -DSY_BUILD_PYTHON=OFF >/dev/null
cmake --build build-gpu -j "$(nproc)" >/dev/null
mkdir -p "$log_dir"
./build-gpu/tests/switchyard_tests --gtest_filter="$filter" --gtest_brief=1 2>&1 |
  tee "$log_dir/gtest.log" | tail -n 30
# The GPU cases of the ctest suite (the mpirun ones exist where CMake found MPI).
ctest --test-dir build-gpu -R "nccl|through_communicator|train_cuda_matches_cpu" \
  --output-on-failure 2>&1 | tee "$log_dir/ctest.log" | tail -n 15
if [[ -n ${SY_SANITIZE_FILTER:-} ]]; then
  compute-sanitizer --tool memcheck --error-exitcode 1 ./build-gpu/tests/switchyard_tests \
    --gtest_filter="$SY_SANITIZE_FILTER" --gtest_brief=1 2>&1 | tee "$log_dir/memcheck.log" |
    tail -n 5
fi
