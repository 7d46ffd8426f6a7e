"""One rank of the expert-parallel tests (test_expert_parallel.py), started with torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) on gloo. For each case it checks the
2-rank layer against one process holding all the experts (a group of size 1) that routes each
rank's tokens separately: outputs, l_aux, input gradients, the gate's gradients (this rank's
tokens) and this rank's expert gradients (everyone's tokens). Prints "PASS <case>" per case.
With SY_EP_DEVICE=cuda each rank runs on its own GPU (cuda:<rank>), exchanging through the
binding's NCCL communicator; the reference runs on the same GPU."""

import os
import sys

import torch
import torch.distributed as dist

from switchyard import moe

D, H, T = 8, 12, 10
ATOL, RTOL = 1e-5, 1e-4
DEVICE = os.environ.get("SY_EP_DEVICE", "cpu")


def close(name, got, want):
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def local_slice(ref_param, rank, num_local, sharded):
    """This rank's share of a one-process expert parameter [E, ...]: experts
    [rank*num_local, ...) or, for sharded experts, hidden slice rank % sharded of one expert."""
    if sharded == 1:
        return ref_param[rank * num_local:(rank + 1) * num_local]
    e, s = rank // sharded, rank % sharded
    p = ref_param[e:e + 1]
    if p.dim() == 3 or p.size(1) != D:  # fc1_w, fc2_w [1, h, d] and fc1_bias [1, h]: by hidden
        h = p.size(1) // sharded
        return p[:, s * h:(s + 1) * h]
    c = -(-D // sharded)  # fc2_bias [1, d]: ceil(d / s) columns per slice
    return p[:, s * c:(s + 1) * c]


def run_case(name, single, k, cf, per_device, adaptive_r=None):
    rank, world = dist.get_rank(), dist.get_world_size()
    gate = {"type": "top", "k": k, "capacity_factor": cf}
    experts = {"type": "ffn", "num_experts_per_device": per_device, "hidden_size_per_expert": H}
    layer = moe.moe_layer(gate_type=gate, model_dim=D, experts=experts, seeds=(1, rank + 1, 1))
    E = layer.num_global_experts
    ref = moe.moe_layer(gate_type=gate, model_dim=D, group=single, seeds=(1, 1, 1),
                        experts=dict(experts, num_experts_per_device=E))
    sharded = layer.sharded_count
    with torch.no_grad():
        for n, p in layer.experts.named_parameters():
            p.copy_(local_slice(dict(ref.experts.named_parameters())[n], rank,
                                layer.num_local_experts, sharded))
    close("gate weight", layer.gates[0].wg.weight, ref.gates[0].wg.weight)
    assert set(layer.state_dict()) == set(ref.state_dict())
    device = torch.device(f"cuda:{rank}" if DEVICE == "cuda" else "cpu")
    layer.to(device)
    ref.to(device)

    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(T, D, generator=g).to(device) for _ in range(world)]
    ws = [torch.randn(T, D, generator=g).to(device) for _ in range(world)]

    x = xs[rank].clone().requires_grad_(True)
    y = layer(x, adaptive_r=adaptive_r)
    ((y * ws[rank]).sum() + 0.01 * y.l_aux).backward()

    # The reference: every rank's tokens through one process, one backward each; the experts'
    # gradients add up over the ranks, the gate's are kept for this rank's tokens.
    for r in range(world):
        ref.gates[0].wg.weight.grad = None
        xr = xs[r].clone().requires_grad_(True)
        yr = ref(xr)
        ((yr * ws[r]).sum() + 0.01 * yr.l_aux).backward()
        if r == rank:
            y_ref, l_aux_ref, dx_ref = yr.detach(), yr.l_aux.detach(), xr.grad
            gate_grad_ref = ref.gates[0].wg.weight.grad.clone()

    close("y", y.detach(), y_ref)
    close("l_aux", y.l_aux.detach(), l_aux_ref)
    close("dx", x.grad, dx_ref)
    close("gate grad", layer.gates[0].wg.weight.grad, gate_grad_ref)
    for n, p in layer.experts.named_parameters():
        ref_grad = dict(ref.experts.named_parameters())[n].grad
        close(f"{n} grad", p.grad, local_slice(ref_grad, rank, layer.num_local_experts, sharded))
    print(f"PASS {name}", flush=True)


def bad_config():
    """Ranks that disagree on the layer's configuration get an error on every rank."""
    rank = dist.get_rank()
    try:
        moe.moe_layer(gate_type={"type": "top", "k": 1 + rank}, model_dim=D, seeds=(1, 1, 1),
                      experts={"type": "ffn", "num_experts_per_device": 2,
                               "hidden_size_per_expert": H})
    except moe.Error as e:
        print(f"ERROR {e}", flush=True)
        return
    raise AssertionError("a configuration that differs across ranks was accepted")


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    groups = [dist.new_group([r]) for r in range(world)]  # collective: every rank makes all
    single = groups[rank]
    cases = sys.argv[1:]
    for k in (1, 2):
        for cf in (1.0, 0.0):
            name = f"k{k}_cf{cf:g}"
            if name in cases or "all" in cases:
                run_case(name, single, k, cf, per_device=2)
    if "data_parallel" in cases or "all" in cases:
        run_case("data_parallel", single, 2, 1.0, per_device=2, adaptive_r=0)
    if "sharded" in cases or "all" in cases:
        run_case("sharded", single, 1, 0.0, per_device=-2)
    if "bad_config" in cases or "all" in cases:
        bad_config()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
