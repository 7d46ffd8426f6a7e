#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and Nsight Compute: where one bf16 step of `switchyard bench`
# goes, for each given config (ncu, kernels serialised).
#   ./scripts/gpu-profile.sh [--layout padded|packed] [--sections] CONFIG...
# Default: the per-kernel times as CSV (ncu-CONFIG.csv). --sections: instead, ncu's throughput
# sections (speed of light: % of peak tensor and memory throughput; compute, memory, scheduler
# and warp-state statistics) for the first launches of the expert GEMM kernels (ours and
# cuBLAS's), as text (ncu-sections-CONFIG.txt). Layout default: packed.
# Needs build-gpu/ (scripts/gpu-check.sh builds it). Output in $SY_LOG_DIR (default
# build-gpu/profile), with ncu's messages in the matching .err files.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
layout=packed
sections=0
while [[ ${1:-} == --* ]]; do
  case $1 in
    --layout) layout=$2; shift 2 ;;
    --sections) sections=1; shift ;;
    *) echo "gpu-profile: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [--layout padded|packed] [--sections] CONFIG..." >&2; exit 2; }
tool=./build-gpu/tools/switchyard
[[ -x $tool ]] || { echo "gpu-profile: $tool is missing: run scripts/gpu-check.sh first" >&2; exit 1; }
out=${SY_LOG_DIR:-build-gpu/profile}
mkdir -p "$out"
bench=(bench --device cuda --dtype bf16 --layout "$layout" --iters 1 --warmup 0)
status=0
for config in "$@"; do
  if ((sections)); then
    name=ncu-sections-$config
    args=(--kernel-name "regex:grouped_gemm|nvjet|gemm" --launch-count 8
          --section SpeedOfLight --section ComputeWorkloadAnalysis
          --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats)
    file=$out/$name.txt
  else
    name=ncu-$config
    args=(--metrics gpu__time_duration.sum --print-summary per-kernel --csv)
    file=$out/$name.csv
  fi
  ncu "${args[@]}" "$tool" "${bench[@]}" --config "$config" >"$file" 2>"$out/$name.err" || {
    echo "gpu-profile: ncu failed on $config (see $out/$name.err)" >&2
    status=1
  }
done
exit $status
