"""Tutel's helloworld_ddp on switchyard: the MoE model trained under torch
DistributedDataParallel, expert parallel, CPU processes talking through gloo.

    python -m switchyard.examples.helloworld_ddp [--num_processes 2] [--flags]
    torchrun --nproc_per_node 2 -m switchyard.examples.helloworld_ddp [--flags]

Run directly, the example starts --num_processes ranks itself (torch.multiprocessing, rendezvous
on 127.0.0.1 at a free port, gloo over the loopback interface unless GLOO_SOCKET_IFNAME is set);
under torchrun it joins the process group that torchrun describes in the environment.

As in Tutel's example, the MoE layer is expert parallel over the world: each rank holds
--num_local_experts experts of its own (seeded rank + 1) and a replica of the gate (seeded 1).
The experts are marked `skip_allreduce` by scan_expert_func and listed in the model's
`_ddp_params_and_buffers_to_ignore`, so DDP averages only the gate's gradients; each expert's
gradient already holds every rank's tokens (the all-to-all's backward brings them). Rank 0
prints Tutel's per-step line `STEP-N: loss = L, step_time = S sec, perf = P tflops.` (its own
batch's loss; the flops of one rank).
"""

import argparse
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from switchyard import moe as tutel_moe

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_tokens", type=int, default=1024)
    p.add_argument("--model_dim", type=int, default=2048)
    p.add_argument("--hidden_size", type=int, default=2048)
    p.add_argument("--num_local_experts", type=int, default=2)
    p.add_argument("--dtype", type=str, default="float32")
    p.add_argument("--fp32_gate", default=False, action="store_true")
    p.add_argument("--top", type=int, default=2)
    # Beyond Tutel's flags (its example hard-codes 100 steps, lr 1e-5, no l_aux):
    p.add_argument("--num_steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-5, help="SGD learning rate")
    p.add_argument("--l_aux_wt", type=float, default=0.0)
    p.add_argument("--capacity_factor", type=float, default=1.0)
    p.add_argument("--num_processes", type=int, default=2,
                   help="ranks to start when not launched by torchrun")
    p.add_argument("--save_params", type=str, default="",
                   help="after training, rank r saves its model's state_dict to "
                        "SAVE_PARAMS.rank<r>.pt")
    args = p.parse_args(argv)
    if args.dtype not in _DTYPES:
        p.error(f"unrecognized --dtype {args.dtype}: expected one of {', '.join(_DTYPES)}")
    if args.num_processes < 1:
        p.error("--num_processes must be >= 1")
    return args


class ExampleModel(torch.nn.Module):
    """Tutel's model: one MoE layer, its output summed over features, log-softmax over tokens.
    `rank` seeds the experts; `group` (default: the world, once torch.distributed is
    initialised) is the layer's expert-parallel group."""

    def __init__(self, args, rank=0, group=None, log=print):
        super().__init__()
        self._ddp_params_and_buffers_to_ignore = []
        self._moe_layer = tutel_moe.moe_layer(
            gate_type={"type": "top", "k": args.top, "fp32_gate": args.fp32_gate,
                       "capacity_factor": args.capacity_factor},
            experts={"type": "ffn", "count_per_node": args.num_local_experts,
                     "hidden_size_per_expert": args.hidden_size,
                     "activation_fn": lambda x: F.relu(x)},
            model_dim=args.model_dim,
            scan_expert_func=lambda name, param: setattr(param, "skip_allreduce", True),
            seeds=(1, rank + 1, 1),  # the gate alike on every rank, the experts not
            group=group)
        local = sum(p.numel() for _, p in
                    self._moe_layer.get_parameter_iterator(param_type="local_experts"))
        shared = sum(p.numel() for _, p in
                     self._moe_layer.get_parameter_iterator(param_type="gate"))
        log("[Statistics] param count for MoE local_experts = %s, param count for MoE gate = %s.\n"
            % (local, shared))

    def forward(self, x):
        return F.log_softmax(torch.sum(self._moe_layer(x), dim=2), dim=1)

    def add_param_to_skip_allreduce(self, param_name):
        self._ddp_params_and_buffers_to_ignore.append(param_name)


def make_batch(args, rank):
    """Rank `rank`'s batch (x [B, T, d] in the default dtype, y [B]), as Tutel's example."""
    torch.manual_seed(rank)
    x = torch.randn([args.batch_size, args.num_tokens, args.model_dim],
                    dtype=torch.float32).to(torch.get_default_dtype())
    y = torch.LongTensor(args.batch_size).random_(1)
    return x, y


def train(args):
    """One rank's work, inside an initialised default process group."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def log(*what):
        if rank == 0:
            print(*what, flush=True)

    torch.set_default_dtype(_DTYPES[args.dtype])
    model = ExampleModel(args, rank=rank, log=log)
    for name, param in model.named_parameters():
        if hasattr(param, "skip_allreduce"):
            model.add_param_to_skip_allreduce(name)
    model = torch.nn.parallel.DistributedDataParallel(model)  # CPU: no device_ids
    log(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    x, y = make_batch(args, rank)
    log("[Benchmark] world_size = %s, dtype = %s, model_dim = %s, hidden_size = %s, samples = %s, "
        "num_local_experts = %s, topK = %s, device = `cpu`" %
        (world, args.dtype, args.model_dim, args.hidden_size, args.batch_size * args.num_tokens,
         args.num_local_experts, args.top))

    moe_layer = model.module._moe_layer
    average_time = 0.0
    for i in range(args.num_steps):
        t_start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.nll_loss(model(x), y)
        if args.l_aux_wt:
            loss = loss + args.l_aux_wt * moe_layer.l_aux
        loss.backward()  # DDP averages the gate's gradients over the ranks here
        optimizer.step()
        t_stop = time.perf_counter()
        # Tutel's count: 2 expert GEMMs of 2*T*d*h flops per routed token, x3 for fwd+bwd.
        cap_coef = min(args.top, moe_layer.num_global_experts)
        tflops = (args.batch_size * args.num_tokens * args.model_dim * args.hidden_size) * 4 * \
            3 * cap_coef * 1e-12 / (t_stop - t_start)
        log("STEP-%s: loss = %.5f, step_time = %.6f sec, perf = %.2f tflops." %
            (i, float(loss.data), t_stop - t_start, tflops))
        if i + 10 >= args.num_steps:
            average_time += t_stop - t_start
    average_time /= min(10, args.num_steps) if args.num_steps else 1
    log("\n[Summary] Average synchronized step_time = %s sec." % average_time)
    if args.save_params:
        torch.save(model.module.state_dict(), "%s.rank%d.pt" % (args.save_params, rank))


def _spawned_rank(rank, args, world):
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    try:
        train(args)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
        try:
            train(args)
        finally:
            dist.destroy_process_group()
        return
    world = args.num_processes
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this host
    # Share the cores between the ranks (the C++ core's OpenMP threads and torch's own).
    threads = max(1, (os.cpu_count() or 1) // world)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    mp.spawn(_spawned_rank, args=(args, world), nprocs=world, join=True)


if __name__ == "__main__":
    main()
