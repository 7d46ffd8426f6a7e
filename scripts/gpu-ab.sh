#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: a change measured against the tree it applies to, in one go.
#   ./scripts/gpu-ab.sh PATCH [CONFIG...]        (configs default: fine_grained sonic_fine)
# "base" is this tree, "new" a copy of it with PATCH applied (patch -p1). Both are built for 90a
# (base: the CLI only); then, in order:
#   1. new's CUDA tests selected by SY_AB_TESTS (default '*Cuda*'), as a gtest filter;
#   2. per-kernel times of one packed bf16 step of each config under ncu, base then new, for the
#      kernels whose demangled name matches SY_AB_KERNELS (default: all), as CSV;
#   3. `switchyard bench` on the configs, base, new, base, new (so drift between the runs shows),
#      with SWITCHYARD_COMMIT set to "base" and "new" in the records.
# Everything goes to $SY_LOG_DIR (default build-ab/logs); a summary of steps 2 and 3 is printed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
[[ $# -ge 1 && -f $1 ]] || { echo "usage: $0 PATCH [CONFIG...]" >&2; exit 2; }
patch_file=$(realpath "$1")
shift
configs=("$@")
((${#configs[@]})) || configs=(fine_grained sonic_fine)
log=${SY_LOG_DIR:-build-ab/logs}
mkdir -p "$log"
log=$(realpath "$log")
new_root=$(mktemp -d)
trap 'rm -rf "$new_root"' EXIT
tar --exclude='./build*' --exclude=./.git -cf - . | tar -xf - -C "$new_root"
(cd "$new_root" && patch -p1 -s <"$patch_file")

jobs=$(nproc)
conf=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a -DSY_BUILD_PYTHON=OFF)
(cmake -S . -B build-ab "${conf[@]}" -DSY_BUILD_TESTS=OFF &&
  cmake --build build-ab -j $((jobs / 3 + 1)) --target switchyard_cli) >"$log/base-build.log" 2>&1 &
base_build=$!
(cd "$new_root" && cmake -S . -B build-ab "${conf[@]}" &&
  cmake --build build-ab -j $((jobs - jobs / 3))) >"$log/new-build.log" 2>&1 || {
  tail -n 30 "$log/new-build.log"
  exit 1
}
wait $base_build || { tail -n 30 "$log/base-build.log"; exit 1; }
declare -A tool=([base]=$root/build-ab/tools/switchyard [new]=$new_root/build-ab/tools/switchyard)

status=0
"$new_root/build-ab/tests/switchyard_tests" --gtest_filter="${SY_AB_TESTS:-*Cuda*}" \
  --gtest_brief=1 >"$log/new-tests.log" 2>&1 || status=1
tail -n 3 "$log/new-tests.log"

kernels=(--kernel-name-base demangled)
[[ -n ${SY_AB_KERNELS:-} ]] && kernels+=(-k "regex:$SY_AB_KERNELS")
for tree in base new; do
  for config in "${configs[@]}"; do
    ncu "${kernels[@]}" --metrics gpu__time_duration.sum --csv \
      "${tool[$tree]}" bench --device cuda --dtype bf16 --layout packed --iters 1 --warmup 0 \
      --config "$config" >"$log/ncu-$tree-$config.csv" 2>"$log/ncu-$tree-$config.err" || status=1
  done
done
rm -f "$log"/bench-*.jsonl
for _ in 1 2; do
  for tree in base new; do
    SWITCHYARD_COMMIT=$tree "${tool[$tree]}" bench --device cuda --dtype bf16 --iters 5 --warmup 2 \
      "${configs[@]/#/--config=}" --out "$log/bench-$tree.jsonl" >/dev/null || status=1
  done
done

python3 - "$log" "${configs[@]}" <<'PY'
import csv, glob, json, os, sys
log, configs = sys.argv[1], sys.argv[2:]
def kernel_times(path):
    # ncu's CSV: one row per launch (Kernel Name, Metric Unit, Metric Value), summed by name.
    times = {}
    if not os.path.exists(path):
        return times
    rows = [r for r in csv.reader(open(path)) if len(r) > 5]
    if not rows or "Kernel Name" not in rows[0]:
        return times
    head = rows[0]
    name, unit, value = (head.index(c) for c in ("Kernel Name", "Metric Unit", "Metric Value"))
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}
    for r in rows[1:]:
        try:
            us = float(r[value].replace(",", "")) * scale.get(r[unit], float("nan"))
        except ValueError:
            continue
        key = r[name].split("(")[0][:70]
        times[key] = times.get(key, 0.0) + us
    return times
for config in configs:
    base = kernel_times(f"{log}/ncu-base-{config}.csv")
    new = kernel_times(f"{log}/ncu-new-{config}.csv")
    print(f"== {config}: kernel time per step under ncu, us (base -> new)")
    for k in sorted(set(base) | set(new), key=lambda k: -max(base.get(k, 0), new.get(k, 0)))[:15]:
        print(f"  {k:<70} {base.get(k, 0):9.1f} {new.get(k, 0):9.1f}")
    print(f"  {'total':<70} {sum(base.values()):9.1f} {sum(new.values()):9.1f}")
print("== switchyard bench, useful TFLOPS (commit, config, layout: one figure per round)")
rows = {}
for tree in ("base", "new"):
    path = f"{log}/bench-{tree}.jsonl"
    if not os.path.exists(path):
        continue
    for line in open(path):
        if line.strip().startswith("{"):
            r = json.loads(line)
            rows.setdefault((tree, r.get("config"), r.get("layout")), []).append(r.get("tflops", 0))
for (tree, config, layout), v in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
    print(f"  {tree:<5} {config:<15} {layout:<7} " + " ".join(f"{x:7.1f}" for x in v))
PY
exit $status
