"""A plain PyTorch MoE layer on torch._grouped_mm, timed on the configs of `switchyard bench`.

The baseline of issue 4 item 6: f32 router (logits = x.float() @ Wg.float().T), softmax top-k,
weights renormalised to sum to 1; argsort of the flattened expert indices as the permutation;
index_select of token rows; fc1 and fc2 as torch._grouped_mm(rows, W, offs=int32 cumulative rows
per expert) with W as [E, d, h] (2h for SwiGLU: gate columns, then up) and [E, h, d]; relu, or
silu(gate) * up; outputs scaled by their weights and index_add-ed back into token rows. Dropless
(layout "packed"), no host sync in the bf16 step. One JSON line per config, with the fields of
`switchyard bench`: ms_fwd/ms_bwd are medians of --iters steps after --warmup (CUDA events);
tflops = 2*T*k*d*h per expert matrix (2 relu, 3 SwiGLU) x 3 over ms_fwd + ms_bwd (DESIGN.md §8);
dense_tflops: 8192^3 torch.matmul in the same dtype and run; peak_mem_bytes:
torch.cuda.max_memory_allocated over the timed steps (weights, inputs, gradients included).

On a GPU machine (torch >= 2.8 with CUDA; bf16 gets the fast kernel on sm90/sm100):
    SWITCHYARD_COMMIT=<commit> python3 bench/grouped_mm_layer.py --iters 5 --warmup 2
Anywhere with torch (1.13 is enough), checking the layer's logic in f32 on the CPU, a per-expert
loop in place of _grouped_mm, against a per-token reference (forward and all gradients):
    python3 bench/grouped_mm_layer.py --check-cpu
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

# name: (T, d, h, E, k, activation), as in tools/bench_configs.cpp
CONFIGS = {
    "tutel_default": (8192, 2048, 2048, 2, 2, "relu"),
    "mixtral": (8192, 4096, 14336, 8, 2, "relu"),
    "fine_grained": (8192, 2048, 768, 128, 8, "relu"),
    "deepseek_local": (4096, 7168, 2048, 32, 8, "relu"),
    "sonic_coarse": (32768, 4096, 2048, 64, 4, "swiglu"),
    "sonic_fine": (24576, 1536, 256, 128, 8, "swiglu"),
}
DENSE_N = 8192


def grouped_mm(a, w, offs):
    return torch._grouped_mm(a, w, offs=offs)


def loop_mm(a, w, offs):
    """The same product as grouped_mm, one torch.mm per expert (reads offs on the host: a sync)."""
    outs, start = [], 0
    for e, end in enumerate(offs.tolist()):
        outs.append(a[start:end] @ w[e])
        start = end
    return torch.cat(outs)


def make_params(d, h, E, activation, dtype, device):
    n1 = 2 * h if activation == "swiglu" else h
    wg = torch.randn(E, d, device=device) / d ** 0.5
    w1 = torch.randn(E, d, n1, device=device) / d ** 0.5
    w2 = torch.randn(E, h, d, device=device) / h ** 0.5
    return [p.to(dtype).requires_grad_() for p in (wg, w1, w2)]


def moe_layer(x, wg, w1, w2, k, activation, expert_mm=grouped_mm):
    T, E = x.shape[0], w1.shape[0]
    probs = torch.softmax(x.float() @ wg.float().t(), dim=-1)
    topw, topi = probs.topk(k, dim=-1)
    topw = topw / topw.sum(dim=-1, keepdim=True)
    sorted_experts, order = torch.sort(topi.reshape(-1))  # the argsort permutation
    token = order // k  # row of x for each sorted (token, choice)
    offs = torch.searchsorted(sorted_experts, torch.arange(E, device=x.device),
                              right=True, out_int32=True)  # cumulative rows per expert
    rows = x.index_select(0, token)
    a = expert_mm(rows, w1, offs)
    if activation == "swiglu":
        gate, up = a.chunk(2, dim=-1)
        a = F.silu(gate) * up
    else:
        a = F.relu(a)
    out = expert_mm(a, w2, offs)
    out = out * topw.reshape(-1)[order].unsqueeze(1).to(out.dtype)
    return torch.zeros_like(x).index_add(0, token, out)


def reference_layer(x, wg, w1, w2, k, activation):
    """Per token, written for clarity: the k chosen experts' FFN outputs, weighted."""
    ys = []
    for t in range(x.shape[0]):
        p = torch.softmax(wg @ x[t], dim=0)
        w, idx = p.topk(k)
        w = w / w.sum()
        y = 0
        for j in range(k):
            a = x[t] @ w1[idx[j]]
            if activation == "swiglu":
                h = a.shape[0] // 2
                a = F.silu(a[:h]) * a[h:]
            else:
                a = F.relu(a)
            y = y + w[j] * (a @ w2[idx[j]])
        ys.append(y)
    return torch.stack(ys)


def check_cpu():
    torch.manual_seed(0)
    ok = True
    for activation in ("relu", "swiglu"):
        T, d, h, E = 96, 32, 48, 8
        k = 2 if activation == "relu" else 3
        params = make_params(d, h, E, activation, torch.float32, "cpu")
        x = torch.randn(T, d, requires_grad=True)
        dy = torch.randn(T, d)
        y = moe_layer(x, *params, k, activation, expert_mm=loop_mm)
        grads = torch.autograd.grad(y, [x] + params, dy)
        x64 = x.detach().double().requires_grad_()
        p64 = [p.detach().double().requires_grad_() for p in params]
        y_ref = reference_layer(x64, *p64, k, activation)
        grads_ref = torch.autograd.grad(y_ref, [x64] + p64, dy.double())
        for name, got, want in zip(["y", "dx", "dWg", "dW1", "dW2"], (y,) + grads, (y_ref,) + grads_ref):
            err = (got.double() - want).abs().max().item()
            tol = 1e-4 * max(1.0, want.abs().max().item())
            ok &= err <= tol
            print(f"{activation:6s} {name:3s} max abs error {err:.3e} (tolerance {tol:.1e})"
                  f"{'' if err <= tol else '  MISMATCH'}")
    print("check-cpu: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


def median_ms(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, check=True,
                              capture_output=True, text=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_config(name, dtype, expert_mm, args):
    T, d, h, E, k, activation = CONFIGS[name]
    torch.manual_seed(1)
    params = make_params(d, h, E, activation, dtype, "cuda")
    x = torch.randn(T, d, device="cuda", dtype=dtype).requires_grad_()
    dy = torch.randn(T, d, device="cuda", dtype=dtype)
    y = moe_layer(x, *params, k, activation, expert_mm)
    y.backward(dy)
    if not all(torch.isfinite(t).all() for t in [y, x.grad] + [p.grad for p in params]):
        sys.exit(f"{name}: NaN/Inf in the output or a gradient; not timed")
    fwd_ms, bwd_ms = [], []
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for p in [x] + params:
            p.grad = None
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record()
        y = moe_layer(x, *params, k, activation, expert_mm)
        ev[1].record()
        y.backward(dy)
        ev[2].record()
        torch.cuda.synchronize()
        del y
        if i >= args.warmup:
            fwd_ms.append(ev[0].elapsed_time(ev[1]))
            bwd_ms.append(ev[1].elapsed_time(ev[2]))
    peak = torch.cuda.max_memory_allocated()
    del x, dy, params
    torch.cuda.empty_cache()
    a = torch.randn(DENSE_N, DENSE_N, device="cuda", dtype=dtype)
    b = torch.randn(DENSE_N, DENSE_N, device="cuda", dtype=dtype)
    dense_ms = median_ms(lambda: torch.matmul(a, b), args.iters, args.warmup)
    del a, b
    ms_fwd, ms_bwd = statistics.median(fwd_ms), statistics.median(bwd_ms)
    matrices = 3 if activation == "swiglu" else 2
    tflops = 3 * matrices * 2.0 * T * k * d * h / ((ms_fwd + ms_bwd) * 1e-3) / 1e12
    dense_tflops = 2.0 * DENSE_N ** 3 / (dense_ms * 1e-3) / 1e12
    dev = torch.cuda.current_device()
    return {
        "impl": "torch_grouped_mm", "config": name,
        "device": f"cuda:{dev}: {torch.cuda.get_device_name(dev)}",
        "dtype": args.dtype, "T": T, "d": d, "h": h, "E": E, "k": k,
        "layout": "packed", "capacity_factor": 0.0, "activation": activation,
        "ms_fwd": ms_fwd, "ms_bwd": ms_bwd, "tflops": tflops,
        "dense_tflops": dense_tflops, "ratio": tflops / dense_tflops,
        "peak_mem_bytes": peak, "dropped": 0, "iters": args.iters, "warmup": args.warmup,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": args.commit,
        "expert_gemm": ("per-expert torch.mm loop (torch._grouped_mm rejected this dtype)"
                        if expert_mm is loop_mm else "torch._grouped_mm" if args.dtype == "bf16" else
                        "torch._grouped_mm (not bf16: torch's own per-group mm fallback)"),
        "dense_gemm": f"torch.matmul {DENSE_N}^3", "torch": torch.__version__,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", choices=list(CONFIGS), help="repeatable; default: all")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--commit", default=os.environ.get("SWITCHYARD_COMMIT"))
    ap.add_argument("--check-cpu", action="store_true",
                    help="check the layer on the CPU in f32 against a per-token reference, then exit")
    args = ap.parse_args()
    if torch is None:
        sys.exit("grouped_mm_layer.py needs PyTorch (torch >= 2.8 with CUDA for timing)")
    if args.check_cpu:
        return check_cpu()
    if not torch.cuda.is_available():
        sys.exit(f"grouped_mm_layer.py: no CUDA device visible to torch {torch.__version__}; "
                 "timing needs one (--check-cpu runs the CPU check)")
    if not hasattr(torch, "_grouped_mm"):
        sys.exit(f"grouped_mm_layer.py: torch {torch.__version__} has no torch._grouped_mm (torch >= 2.8 needed)")
    args.commit = args.commit or git_commit()
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 means true FP32, as in switchyard bench
    expert_mm = grouped_mm
    try:  # f32 may be rejected by some torch versions: fall back to a loop, and say so
        w = torch.randn(2, 16, 16, device="cuda", dtype=dtype)
        grouped_mm(torch.randn(32, 16, device="cuda", dtype=dtype), w,
                   torch.tensor([16, 32], device="cuda", dtype=torch.int32))
    except RuntimeError as e:
        print(f"torch._grouped_mm rejects {args.dtype} ({e}); using a per-expert loop", file=sys.stderr)
        expert_mm = loop_mm
    for name in args.config or list(CONFIGS):
        print(f"{name} ...", file=sys.stderr, flush=True)
        print(json.dumps(run_config(name, dtype, expert_mm, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
