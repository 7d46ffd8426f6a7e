"""Tutel's helloworld on switchyard: python -m switchyard.examples.helloworld [--flags]

Same flags and the same per-step line as tutel/examples/helloworld.py. --device cpu (the
default) or cuda (GPU LOCAL_RANK; needs a CUDA build of the binding); --use_tensorcore lets f32
expert GEMMs use TF32, as Tutel's switches torch's allow_tf32. Started as torchrun starts ranks
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment), it runs expert parallel as
Tutel's does (gloo on CPU ranks, NCCL on GPU ranks): each rank holds --num_local_experts
experts, the gate's gradients are averaged over the ranks, and rank 0 prints.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from switchyard import _C
from switchyard import moe as tutel_moe


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_tokens", type=int, default=512)
    p.add_argument("--model_dim", type=int, default=2048)
    p.add_argument("--hidden_size", type=int, default=2048)
    p.add_argument("--num_local_experts", type=int, default=2)
    p.add_argument("--dtype", type=str, default="float32")
    p.add_argument("--fp32_gate", default=False, action="store_true")
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--l_aux_wt", type=float, default=0.0)
    p.add_argument("--a2a_ffn_overlap_degree", type=int, default=1)
    p.add_argument("--allreduce_degree", type=int, default=1)
    p.add_argument("--num_steps", type=int, default=100)
    p.add_argument("--parallel_type", type=str, default="adaptive:1")
    p.add_argument("--checkpoint_path", type=str, default="")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--use_2dh", default=False, action="store_true")
    p.add_argument("--eval", default=False, action="store_true")
    p.add_argument("--capacity_factor", type=float, default=1.0)
    p.add_argument("--megablocks_size", type=int, default=0)
    p.add_argument("--use_tensorcore", default=False, action="store_true")
    p.add_argument("--expert_type", type=str, default="ffn")
    args = p.parse_args(argv)

    dtypes = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
              "bfloat16": torch.bfloat16}
    if args.dtype not in dtypes:
        p.error(f"unrecognized --dtype {args.dtype}: expected one of {', '.join(dtypes)}")
    if args.device not in ("cpu", "cuda"):
        p.error(f"unrecognized --device {args.device}: expected cpu or cuda")
    on_gpu = args.device == "cuda"
    if on_gpu and not (_C.built_with_cuda and torch.cuda.is_available()):
        p.error("--device cuda needs a GPU and a CUDA build of the switchyard binding "
                "(docs/python.md)")
    if args.use_tensorcore:
        torch.set_float32_matmul_precision("high")  # Tutel: allow_tf32 = True, the same switch
    torch.set_default_dtype(dtypes[args.dtype])

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else \
        torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")  # env:// from torchrun's variables
    rank = dist.get_rank() if world > 1 else 0
    log = print if rank == 0 else (lambda *a, **k: None)

    class ExampleModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._moe_layer = tutel_moe.moe_layer(
                gate_type={"type": "top", "k": args.top, "fp32_gate": args.fp32_gate,
                           "capacity_factor": args.capacity_factor},
                experts={"type": args.expert_type, "count_per_node": args.num_local_experts,
                         "hidden_size_per_expert": args.hidden_size,
                         "activation_fn": lambda x: F.relu(x)},
                model_dim=args.model_dim,
                scan_expert_func=lambda name, param: setattr(param, "skip_allreduce", True),
                seeds=(1, rank + 1, 1),  # the gate alike on every rank, the experts not
                a2a_ffn_overlap_degree=args.a2a_ffn_overlap_degree,
                parallel_type=args.parallel_type,
                use_2dh=args.use_2dh)
            local = sum(p.numel() for _, p in
                        self._moe_layer.get_parameter_iterator(param_type="local_experts"))
            shared = sum(p.numel() for _, p in
                         self._moe_layer.get_parameter_iterator(param_type="gate"))
            log("[Statistics] param count for MoE local_experts = %s, param count for MoE "
                  "gate = %s.\n" % (local, shared))

        def forward(self, x):
            return F.log_softmax(torch.sum(self._moe_layer(x), dim=2), dim=1)

    model = ExampleModel().to(device)
    log(model)
    # Tutel's placeholders give each rank its own checkpoint (its experts differ).
    args.checkpoint_path = args.checkpoint_path.replace("{rank}", str(rank)).replace(
        "{size}", str(world))
    if args.checkpoint_path:
        try:
            model.load_state_dict(torch.load(args.checkpoint_path, map_location=device))
        except FileNotFoundError:
            log("Checkpoint not loaded: file `%s` is not found. Will train the model from "
                  "start." % args.checkpoint_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)

    torch.manual_seed(0)
    x = torch.randn([args.batch_size, args.num_tokens, args.model_dim],
                    dtype=torch.float32).to(device, torch.get_default_dtype())
    y = torch.LongTensor(args.batch_size).random_(1).to(device)
    log("[Benchmark] world_size = %s, dtype = %s, model_dim = %s, hidden_size = %s, samples = %s, "
          "num_local_experts = %s, topK = %s, a2a_ffn_overlap_degree = %s, parallel_type = `%s`, "
          "device = `%s`" % (world, args.dtype, args.model_dim, args.hidden_size,
                             args.batch_size * args.num_tokens, args.num_local_experts, args.top,
                             args.a2a_ffn_overlap_degree, args.parallel_type, device))

    def synchronize():
        if on_gpu:
            torch.cuda.synchronize(device)

    average_time = 0.0
    for i in range(args.num_steps):
        synchronize()
        t_start = time.perf_counter()
        if not args.eval:
            optimizer.zero_grad()
            output = model(x)
            loss = F.nll_loss(output, y)
            if args.l_aux_wt:
                loss = loss + args.l_aux_wt * model._moe_layer.l_aux
            loss.backward()
            if world > 1:
                # Replicated parameters (the gate; experts carry skip_allreduce) see only this
                # rank's tokens: average their gradients over the ranks, as Tutel's example does.
                for param in model.parameters():
                    if not hasattr(param, "skip_allreduce") and param.grad is not None:
                        dist.all_reduce(param.grad)
                        param.grad /= world
            optimizer.step()
        else:
            with torch.no_grad():
                loss = F.nll_loss(model(x), y)
        synchronize()
        t_stop = time.perf_counter()
        # Tutel's count: 2 expert GEMMs of 2*T*d*h flops per routed token, x3 for fwd+bwd.
        mm_coef = 1 if args.eval else 3
        cap_coef = min(args.top, model._moe_layer.num_global_experts)
        tflops = (args.batch_size * args.num_tokens * args.model_dim * args.hidden_size) * 4 * \
            mm_coef * cap_coef * 1e-12 / (t_stop - t_start)
        log("STEP-%s: loss = %.5f, step_time = %.6f sec, perf = %.2f tflops." %
              (i, float(loss.data), t_stop - t_start, tflops), flush=True)
        if i + 10 >= args.num_steps:
            average_time += t_stop - t_start
    average_time /= min(10, args.num_steps) if args.num_steps else 1
    log("\n[Summary] Average synchronized step_time = %s sec." % average_time)
    if args.checkpoint_path:
        torch.save(model.state_dict(), args.checkpoint_path)


if __name__ == "__main__":
    main()
