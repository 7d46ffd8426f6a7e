"""helloworld_ddp: two CPU processes (gloo) train the expert-parallel MoE model under
DistributedDataParallel. The gate must stay identical on the ranks, and every parameter equal to
one process holding all the experts: the gate stepped on the mean of the ranks' gradients (DDP),
each expert on the sum (its gradient holds every rank's tokens; DDP ignores it)."""

import os
import re
import socket
import subprocess
import sys

import torch
import torch.nn.functional as F

from switchyard.examples import helloworld_ddp

STEPS = 3
LR = 0.05
SMALL = ["--batch_size", "2", "--num_tokens", "16", "--model_dim", "16", "--hidden_size", "16",
         "--num_local_experts", "4", "--capacity_factor", "0", "--l_aux_wt", "0.01",
         "--num_steps", str(STEPS), "--lr", str(LR)]
STEP_LINE = (r"^STEP-(\d+): loss = ([0-9.]+), step_time = ([0-9.]+) sec, "
             r"perf = ([0-9.]+) tflops\.$")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet(*_):
    pass


def is_expert(name):
    return "._moe_layer.experts." in "." + name


def reference_model(world):
    """One process holding every rank's experts, as the ranks start: the gate seeded 1 like
    theirs, the experts of rank r (seeded r + 1) at rows [r * n, (r + 1) * n)."""
    args = helloworld_ddp.parse_args(SMALL)
    n = args.num_local_experts
    model = helloworld_ddp.ExampleModel(
        helloworld_ddp.parse_args(SMALL + ["--num_local_experts", str(n * world)]), log=quiet)
    ranks = [dict(helloworld_ddp.ExampleModel(args, rank=r, log=quiet).named_parameters())
             for r in range(world)]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_expert(name):
                p.copy_(torch.cat([r[name] for r in ranks]))
    return model


def reference_params(world):
    """The parameters after STEPS SGD steps of the one-process model on the ranks' batches."""
    args = helloworld_ddp.parse_args(SMALL)
    model = reference_model(world)
    batches = [helloworld_ddp.make_batch(args, r) for r in range(world)]
    names, params = zip(*model.named_parameters())
    for _ in range(STEPS):
        total = [torch.zeros_like(p) for p in params]
        for x, y in batches:  # each rank's tokens routed on their own, as on the ranks
            loss = F.nll_loss(model(x), y) + args.l_aux_wt * model._moe_layer.l_aux
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t += g
        with torch.no_grad():
            for name, p, t in zip(names, params, total):
                p -= LR * (t if is_expert(name) else t / world)
    return model.state_dict()


def check_ranks(prefix, world):
    saved = [torch.load(f"{prefix}.rank{r}.pt") for r in range(world)]
    reference = reference_params(world)
    initial = reference_model(world).state_dict()
    assert set(saved[0]) == set(reference)
    for r, state in enumerate(saved):
        for name, value in state.items():
            want = reference[name]
            if is_expert(name):
                n = value.size(0)
                want = want[r * n:(r + 1) * n]
            else:
                assert torch.equal(value, saved[0][name]), f"{name} differs between the ranks"
            torch.testing.assert_close(value, want, atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"rank {r} {name}: {m}")
    moved = [n for n in initial if not torch.equal(initial[n], reference[n])]
    assert "_moe_layer.gates.0.wg.weight" in moved and "_moe_layer.experts.batched_fc1_w" in moved
    # The ranks' experts are their own: rank 1's are not rank 0's.
    assert not torch.equal(saved[0]["_moe_layer.experts.batched_fc1_w"],
                           saved[1]["_moe_layer.experts.batched_fc1_w"])


def test_helloworld_ddp_two_spawned_processes_keep_identical_replicas(tmp_path):
    prefix = str(tmp_path / "params")
    out = subprocess.run([sys.executable, "-m", "switchyard.examples.helloworld_ddp",
                          "--num_processes", "2", "--save_params", prefix, *SMALL],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    steps = re.findall(STEP_LINE, out.stdout, re.M)
    assert [int(s[0]) for s in steps] == list(range(STEPS)), out.stdout  # rank 0 only
    assert "world_size = 2" in out.stdout
    assert float(steps[-1][1]) < float(steps[0][1])
    check_ranks(prefix, 2)


def test_helloworld_ddp_under_a_torchrun_style_environment(tmp_path):
    """The ranks started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment). torch 1.13's torchrun itself does not start under Python 3.11."""
    prefix = str(tmp_path / "params")
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "switchyard.examples.helloworld_ddp", "--save_params", prefix,
             *SMALL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr
    assert len(re.findall(STEP_LINE, outs[0][0], re.M)) == STEPS
    assert "STEP-" not in outs[1][0]
    check_ranks(prefix, 2)
