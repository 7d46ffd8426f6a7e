#!/usr/bin/env bash
# On a machine with several NVIDIA GPUs, one rank per GPU under mpirun: what the multi-GPU runs
# record, in one go. Needs build-gpu/ (scripts/gpu-check.sh builds it; CMake must have found MPI
# and NCCL).
#   ./scripts/gpu-multi.sh [output directory]      (default build-gpu/multi)
# 1. the NCCL communicator's tests and the expert-parallel equivalence tests over NCCL, f32 and
#    bf16, at every GPU, flat (LOCAL_SIZE = the GPU count) and as nodes of half the GPUs (2DH and
#    pipelined run);
# 2. switchyard a2a-bench --backend nccl, flat / 2dh / pipelined and NCCL's own grouped
#    send/recv, 1 KiB to 256 MiB per rank, at both LOCAL_SIZEs;
# 3. switchyard bench, expert parallel (mixtral_ep, deepseek_ep), bf16, overlap degree 1, 2, 4.
# Logs and JSON lines go to the output directory; every step runs, the script fails if any did.
# NCCL_NVLS_ENABLE defaults to 0 (NVLink multicast off); other NCCL variables are left as set.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${1:-build-gpu/multi}
mkdir -p "$out"
gpus=$(nvidia-smi --list-gpus | wc -l)
if ((gpus < 2)); then
  echo "gpu-multi: $gpus GPU(s): nothing to run across GPUs" >&2
  exit 1
fi
half=$((gpus / 2))
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
run=(mpirun -np "$gpus")
[[ $(id -u) == 0 ]] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
dist=./build-gpu/tests/dist
tool=./build-gpu/tools/switchyard
status=0
step() {  # step NAME COMMAND...: runs it, logs to $out/NAME.log, prints its last lines
  local name=$1
  shift
  echo "== $name"
  if ! "$@" >"$out/$name.log" 2>&1; then
    status=1
    echo "   FAILED (see $out/$name.log)"
  fi
  tail -n 3 "$out/$name.log"
}

step comm_nccl "${run[@]}" "$dist/test_comm_nccl"
for local_size in "$gpus" "$half"; do
  for dtype in f32 bf16; do
    step "ep_nccl_${dtype}_local${local_size}" env LOCAL_SIZE="$local_size" \
      SY_EP_TEST_DTYPE="$dtype" "${run[@]}" -x LOCAL_SIZE -x SY_EP_TEST_DTYPE \
      "$dist/test_moe_expert_parallel_nccl"
  done
  step "a2a_bench_local${local_size}" env LOCAL_SIZE="$local_size" "${run[@]}" -x LOCAL_SIZE \
    "$tool" a2a-bench --backend nccl --algorithm flat 2dh pipelined --min_bytes 1024 \
    --max_bytes 268435456 --iters 10 --warmup 3 --out "$out/a2a-bench-local${local_size}.jsonl"
done
step bench_ep "${run[@]}" "$tool" bench --device cuda --dtype bf16 --iters 5 --warmup 2 \
  --overlap_degree 1 2 4 --out "$out/bench-ep.jsonl"
exit $status
