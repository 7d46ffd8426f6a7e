#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and Nsight Compute: the per-kernel times of one bf16 step of
# `switchyard bench` for each given config (ncu, kernels serialised), as CSV, one file each.
# Needs build-gpu/ (scripts/gpu-check.sh builds it).
#   ./scripts/gpu-profile.sh [--layout padded|packed] CONFIG... (default layout: packed)
# Output in $SY_LOG_DIR (default build-gpu/profile): ncu-CONFIG.csv, and ncu-CONFIG.err.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
layout=packed
if [[ ${1:-} == --layout ]]; then
  layout=$2
  shift 2
fi
[[ $# -gt 0 ]] || { echo "usage: $0 [--layout padded|packed] CONFIG..." >&2; exit 2; }
tool=./build-gpu/tools/switchyard
[[ -x $tool ]] || { echo "gpu-profile: $tool is missing: run scripts/gpu-check.sh first" >&2; exit 1; }
out=${SY_LOG_DIR:-build-gpu/profile}
mkdir -p "$out"
status=0
for config in "$@"; do
  ncu --metrics gpu__time_duration.sum --print-summary per-kernel --csv \
    "$tool" bench --device cuda --dtype bf16 --config "$config" --layout "$layout" \
    --iters 1 --warmup 0 >"$out/ncu-$config.csv" 2>"$out/ncu-$config.err" || {
    echo "gpu-profile: ncu failed on $config (see $out/ncu-$config.err)" >&2
    status=1
  }
done
exit $status
