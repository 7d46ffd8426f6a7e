#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA bench set in one run, as bench/results/ records it.
# Needs build-gpu/ (scripts/gpu-check.sh builds it); the binding's line also needs the CUDA
# binding in build-python/site (scripts/gpu-python-check.sh builds it), and is left out without it.
#   ./scripts/gpu-bench.sh [output directory]      (default build-gpu/bench)
# Writes JSON lines, one file per program, and prints a table of useful TFLOPS at the end:
#   switchyard.jsonl        switchyard bench --device cuda, bf16, every CUDA config, both layouts
#   switchyard-f32.jsonl    tutel_default in f32: true FP32, then --use_tensorcore (TF32)
#   torch-grouped-mm.jsonl  bench/grouped_mm_layer.py: the plain torch._grouped_mm layer
#   binding.jsonl           bench/binding_layer.py: the PyTorch binding's layer
# SWITCHYARD_COMMIT names the commit where the tree has no git history; ITERS and WARMUP (5, 2)
# set the timing.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${1:-build-gpu/bench}
iters=${ITERS:-5}
warmup=${WARMUP:-2}
tool=./build-gpu/tools/switchyard
python=${PYTHON:-python3}
[[ -x $tool ]] || { echo "gpu-bench: $tool is missing: run scripts/gpu-check.sh first" >&2; exit 1; }
mkdir -p "$out"
rm -f "$out"/*.jsonl
timing=(--iters "$iters" --warmup "$warmup")

"$tool" bench --device cuda --dtype bf16 "${timing[@]}" --out "$out/switchyard.jsonl" >/dev/null
"$tool" bench --device cuda --dtype f32 --config tutel_default "${timing[@]}" \
  --out "$out/switchyard-f32.jsonl" >/dev/null
"$tool" bench --device cuda --dtype f32 --config tutel_default --use_tensorcore "${timing[@]}" \
  --out "$out/switchyard-f32.jsonl" >/dev/null
"$python" bench/grouped_mm_layer.py "${timing[@]}" >"$out/torch-grouped-mm.jsonl"
if [[ -d build-python/site ]]; then
  PYTHONPATH=build-python/site "$python" bench/binding_layer.py "${timing[@]}" >"$out/binding.jsonl"
fi

# One row per line: impl, config, dtype, layout, TF32, useful TFLOPS, ratio to the dense GEMM.
"$python" - "$out"/*.jsonl <<'PY'
import json, sys
print(f"{'impl':<28} {'config':<15} {'dtype':<5} {'layout':<7} {'tf32':<5} {'tflops':>7} {'ratio':>6}")
for path in sys.argv[1:]:
    for line in open(path):
        if not line.strip().startswith("{"):
            continue
        r = json.loads(line)
        ratio = r.get("ratio")
        print(f"{r.get('impl', '?'):<28} {r.get('config', '?'):<15} {r.get('dtype', '?'):<5} "
              f"{r.get('layout', '?'):<7} {str(r.get('use_tensorcore', '')):<5} "
              f"{r.get('tflops', 0):>7.1f} {ratio if ratio is None else round(ratio, 2)!s:>6}")
PY
