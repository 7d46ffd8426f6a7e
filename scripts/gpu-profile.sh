#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and Nsight Compute: where one bf16 step of `switchyard bench`
# goes, for each given config (ncu, kernels serialised).
#   ./scripts/gpu-profile.sh [--layout padded|packed] [--sections] CONFIG...
#   ./scripts/gpu-profile.sh --gemm SHAPE...
# Default: the per-kernel times as CSV (ncu-CONFIG.csv). --sections: instead, ncu's throughput
# sections (speed of light: % of peak tensor and memory throughput; compute, memory, scheduler
# and warp-state statistics) for the first launches of the expert GEMM kernels (ours and
# cuBLAS's), as text (ncu-sections-CONFIG.txt). Layout default: packed.
# --gemm: the grouped GEMM alone (bench/grouped_gemm_bench.cu, built here with -lineinfo) on the
# varying-M shapes whose names contain SHAPE (e.g. "sonic-fine fc2"): the same sections for our
# kernel and cuBLAS strided-batched (gemm-sections-N.txt), and our kernel's warp stalls per SASS
# line (gemm-source-N.csv, from the report gemm-N.ncu-rep), N the shape's position in the list.
# Needs build-gpu/ (scripts/gpu-check.sh builds it) except with --gemm. Output in $SY_LOG_DIR
# (default build-gpu/profile), with ncu's messages in the matching .err files.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
layout=packed
sections=0
gemm=0
while [[ ${1:-} == --* ]]; do
  case $1 in
    --layout) layout=$2; shift 2 ;;
    --sections) sections=1; shift ;;
    --gemm) gemm=1; shift ;;
    *) echo "gpu-profile: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || {
  echo "usage: $0 [--layout padded|packed] [--sections] CONFIG... | --gemm SHAPE..." >&2
  exit 2
}
out=${SY_LOG_DIR:-build-gpu/profile}
mkdir -p "$out"
sections_args=(--section SpeedOfLight --section ComputeWorkloadAnalysis
               --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats)
if ((gemm)); then
  harness=$out/grouped_gemm_bench
  nvcc -O3 -std=c++17 -lineinfo -gencode arch=compute_90a,code=sm_90a -I src -I include \
    bench/grouped_gemm_bench.cu src/core/error.cpp -lcublas -o "$harness"
  status=0
  n=0
  for shape in "$@"; do
    n=$((n + 1))
    ncu "${sections_args[@]}" --section LaunchStats --section Occupancy \
      --kernel-name "regex:grouped_gemm|nvjet|gemm" "$harness" --profile "$shape" \
      >"$out/gemm-sections-$n.txt" 2>"$out/gemm-sections-$n.err" || status=1
    ncu --section SourceCounters --section WarpStateStats --import-source yes -f \
      --kernel-name "regex:grouped_gemm_sm90" -o "$out/gemm-$n" "$harness" --profile "$shape" \
      >"$out/gemm-$n.log" 2>&1 &&
      ncu -i "$out/gemm-$n.ncu-rep" --page source --csv --print-source sass \
        >"$out/gemm-source-$n.csv" 2>"$out/gemm-source-$n.err" || status=1
  done
  exit $status
fi
tool=./build-gpu/tools/switchyard
[[ -x $tool ]] || { echo "gpu-profile: $tool is missing: run scripts/gpu-check.sh first" >&2; exit 1; }
bench=(bench --device cuda --dtype bf16 --layout "$layout" --iters 1 --warmup 0)
status=0
for config in "$@"; do
  if ((sections)); then
    name=ncu-sections-$config
    args=(--kernel-name "regex:grouped_gemm|nvjet|gemm" --launch-count 8 "${sections_args[@]}")
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
