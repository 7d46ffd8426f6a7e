#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and a CUDA build of torch: builds the PyTorch binding with the
# CUDA backend into a scratch directory and runs the binding's tests (their cuda cases run there).
#   ./scripts/gpu-python-check.sh [pytest arguments]
# Architectures from TORCH_CUDA_ARCH_LIST (default 9.0a). Logs go to $SY_LOG_DIR (default
# build-python/logs): build.log and pytest.log.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log_dir=${SY_LOG_DIR:-build-python/logs}
target=${SY_PY_TARGET:-build-python/site}
python=${PYTHON:-python3}
mkdir -p "$log_dir"
export SY_PY_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
if ! "$python" -m pip install -v --no-build-isolation --no-deps --upgrade --target "$target" . \
    >"$log_dir/build.log" 2>&1; then
  grep -E -m 20 "error|Error" "$log_dir/build.log" || true
  tail -n 30 "$log_dir/build.log"
  exit 1
fi
echo "built into $target"
PYTHONPATH="$target:python/tests" "$python" -m pytest -q -p no:cacheprovider -rs \
  "${@:-python/tests}" 2>&1 | tee "$log_dir/pytest.log" | tail -n 60
