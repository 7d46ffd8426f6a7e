"""Switchyard's PyTorch binding (`switchyard.moe.moe_layer`), timed on the configs of `switchyard bench`.

The layer a Tutel user gets by changing one import, set up like bench/grouped_mm_layer.py's plain
torch._grouped_mm layer so that the two compare line by line in one device run: an f32 gate
(fp32_gate) with softmax top-k and renormalised weights, dropless routing (capacity_factor 0:
layout "packed"), FFN experts without biases, relu or swiglu. Timing as in grouped_mm_layer.py:
CUDA events around forward and backward, gradients set to None before each step, medians of
--iters steps after --warmup, useful TFLOPS over ms_fwd + ms_bwd (DESIGN.md §8), a dense 8192^3
torch.matmul in the same dtype and run. Memory over the timed steps: torch_peak_bytes
(torch.cuda.max_memory_allocated: parameters, inputs, gradients, outputs), pool_peak_bytes
(switchyard.memory_stats: the layer's internal buffers, in switchyard's own allocator), and
peak_mem_bytes, their sum: an upper bound on the combined peak, as the two may peak apart.

On a GPU machine, with the binding built for CUDA (scripts/gpu-python-check.sh builds it into
build-python/site):
    PYTHONPATH=build-python/site SWITCHYARD_COMMIT=<commit> python3 bench/binding_layer.py
Anywhere with torch and the binding, checking on the CPU in f32 that this layer computes what
grouped_mm_layer.py's per-token reference computes with the same weights:
    PYTHONPATH=<binding> python3 bench/binding_layer.py --check-cpu
"""
import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grouped_mm_layer as gm  # noqa: E402  (the configs, the reference and the timing helpers)

torch = gm.torch


def make_layer(d, h, E, k, activation):
    from switchyard import moe
    return moe.moe_layer(
        gate_type={"type": "top", "k": k, "capacity_factor": 0.0, "fp32_gate": True},
        model_dim=d,
        experts={"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": h,
                 "activation_fn": activation, "has_fc1_bias": False, "has_fc2_bias": False})


def load_reference_weights(layer, wg, w1, w2):
    """grouped_mm_layer's weights (wg [E, d], w1 [E, d, n1], w2 [E, h, d]) into the layer."""
    with torch.no_grad():
        layer.state_dict()["gates.0.wg.weight"].copy_(wg)
        layer.state_dict()["experts.batched_fc1_w"].copy_(w1.transpose(1, 2))
        layer.state_dict()["experts.batched_fc2_w"].copy_(w2)


def check_cpu():
    torch.manual_seed(0)
    ok = True
    for activation in ("relu", "swiglu"):
        T, d, h, E, k = 24, 16, 8, 4, 2
        wg, w1, w2 = [p.detach() for p in gm.make_params(d, h, E, activation, torch.float32, "cpu")]
        layer = make_layer(d, h, E, k, activation)
        load_reference_weights(layer, wg, w1, w2)
        x = torch.randn(T, d, requires_grad=True)
        y = layer(x)
        dy = torch.randn(T, d)
        y.backward(dy)
        xr = x.detach().clone().requires_grad_()
        yr = gm.reference_layer(xr, wg, w1, w2, k, activation)
        yr.backward(dy)
        err_y = float((y - yr).abs().max() / yr.abs().max())
        err_dx = float((x.grad - xr.grad).abs().max() / xr.grad.abs().max())
        good = err_y < 1e-5 and err_dx < 1e-5
        ok = ok and good
        print(f"{activation}: output rel err {err_y:.1e}, input grad rel err {err_dx:.1e}: "
              f"{'OK' if good else 'FAIL'}")
    return 0 if ok else 1


def on_gpu():
    """Parameters made on the GPU where torch can (2.0 and later: torch.device as a context),
    rather than made and initialised on the host and copied: sonic_coarse's 1.6 G expert
    parameters took longer than a minute to set up that way."""
    dev = torch.device("cuda")
    return dev if hasattr(dev, "__enter__") else contextlib.nullcontext()


def run_config(name, dtype, args):
    import switchyard
    T, d, h, E, k, activation = gm.CONFIGS[name]
    torch.manual_seed(1)
    with on_gpu():
        layer = make_layer(d, h, E, k, activation)
    layer = layer.to("cuda", dtype)
    params = list(layer.parameters())
    x = torch.randn(T, d, device="cuda", dtype=dtype).requires_grad_()
    dy = torch.randn(T, d, device="cuda", dtype=dtype)
    y = layer(x)
    y.backward(dy)
    if not all(torch.isfinite(t).all() for t in [y, x.grad] + [p.grad for p in params]):
        sys.exit(f"{name}: NaN/Inf in the output or a gradient; not timed")
    fwd_ms, bwd_ms = [], []
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            switchyard.reset_peak_memory("cuda")
        for p in [x] + params:
            p.grad = None
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record()
        y = layer(x)
        ev[1].record()
        y.backward(dy)
        ev[2].record()
        torch.cuda.synchronize()
        del y
        if i >= args.warmup:
            fwd_ms.append(ev[0].elapsed_time(ev[1]))
            bwd_ms.append(ev[1].elapsed_time(ev[2]))
    torch_peak = torch.cuda.max_memory_allocated()
    pool_peak = switchyard.memory_stats("cuda")["peak_bytes"]
    del x, dy, layer, params
    torch.cuda.empty_cache()
    a = torch.randn(gm.DENSE_N, gm.DENSE_N, device="cuda", dtype=dtype)
    b = torch.randn(gm.DENSE_N, gm.DENSE_N, device="cuda", dtype=dtype)
    dense_ms = gm.median_ms(lambda: torch.matmul(a, b), args.iters, args.warmup)
    del a, b
    ms_fwd, ms_bwd = statistics.median(fwd_ms), statistics.median(bwd_ms)
    matrices = 3 if activation == "swiglu" else 2
    tflops = 3 * matrices * 2.0 * T * k * d * h / ((ms_fwd + ms_bwd) * 1e-3) / 1e12
    dense_tflops = 2.0 * gm.DENSE_N ** 3 / (dense_ms * 1e-3) / 1e12
    dev = torch.cuda.current_device()
    return {
        "impl": "switchyard_binding", "config": name,
        "device": f"cuda:{dev}: {torch.cuda.get_device_name(dev)}",
        "dtype": args.dtype, "T": T, "d": d, "h": h, "E": E, "k": k,
        "layout": "packed", "capacity_factor": 0.0, "activation": activation,
        "ms_fwd": ms_fwd, "ms_bwd": ms_bwd, "tflops": tflops,
        "dense_tflops": dense_tflops, "ratio": tflops / dense_tflops,
        "peak_mem_bytes": torch_peak + pool_peak, "torch_peak_bytes": torch_peak,
        "pool_peak_bytes": pool_peak, "iters": args.iters, "warmup": args.warmup,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": args.commit, "torch": torch.__version__,
        "dense_gemm": f"torch.matmul {gm.DENSE_N}^3",
        "note": "peak_mem_bytes = torch_peak_bytes + pool_peak_bytes, an upper bound",
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", choices=list(gm.CONFIGS),
                    help="repeatable; default: all")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--commit", default=os.environ.get("SWITCHYARD_COMMIT"))
    ap.add_argument("--check-cpu", action="store_true",
                    help="check the layer on the CPU in f32 against the per-token reference, then exit")
    args = ap.parse_args()
    if torch is None:
        sys.exit("binding_layer.py needs PyTorch and the switchyard binding")
    if args.check_cpu:
        return check_cpu()
    if not torch.cuda.is_available():
        sys.exit(f"binding_layer.py: no CUDA device visible to torch {torch.__version__}; "
                 "timing needs one (--check-cpu runs the CPU check)")
    from switchyard import _C
    if not _C.built_with_cuda:
        sys.exit("binding_layer.py: this switchyard binding was built without CUDA "
                 "(scripts/gpu-python-check.sh builds one with it)")
    args.commit = args.commit or gm.git_commit()
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 means true FP32, as in switchyard bench
    for name in args.config or list(gm.CONFIGS):
        print(f"{name} ...", file=sys.stderr, flush=True)
        print(json.dumps(run_config(name, dtype, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
