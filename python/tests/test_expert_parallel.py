"""Expert parallelism over torch.distributed: 2 CPU ranks (gloo), started with torchrun's
environment, against one process holding all the experts (ep_worker.py does the checking); and
2 GPU ranks exchanging through the binding's NCCL communicator where torch sees 2 GPUs (and that
path at one rank where it sees one)."""

import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from switchyard import _C, moe

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ep_worker.py")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*cases, world=2, device="cpu"):
    """Runs ep_worker.py on `world` ranks; returns each rank's stdout."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", SY_EP_DEVICE=device)
        procs.append(subprocess.Popen([sys.executable, WORKER, *cases], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, f"rank exited {p.returncode}:\n{stdout}\n{stderr}"
        outs.append(stdout)
    return outs


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("cf", [1.0, 0.0])
def test_two_ranks_equal_one_process_holding_all_experts(k, cf):
    name = f"k{k}_cf{cf:g}"
    for out in launch(name):
        assert f"PASS {name}" in out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("case", ["k1_cf1", "k2_cf0", "data_parallel", "sharded"])
def test_two_gpu_ranks_over_nccl_equal_one_process_holding_all_experts(case):
    for out in launch(case, device="cuda"):
        assert f"PASS {case}" in out


@pytest.mark.skipif(not torch.cuda.is_available() or not _C.built_with_nccl,
                    reason="needs a GPU and the binding's NCCL backend")
def test_one_gpu_rank_over_nccl_equals_the_layer_alone():
    """The CUDA ranks' path at one rank: the ncclUniqueId goes over a (gloo) group of one, and
    the layer exchanges through a one-rank NCCL communicator; it must equal the layer alone."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        kw = dict(gate_type={"type": "top", "k": 2, "capacity_factor": 0.0}, model_dim=16,
                  seeds=(1, 1, 1), experts={"type": "ffn", "num_experts_per_device": 4,
                                            "hidden_size_per_expert": 32})
        alone = moe.moe_layer(**kw).cuda()
        over_nccl = moe.moe_layer(**kw)
        over_nccl._dist = moe._TorchDistOps(None)  # a group of one (a world of one builds none)
        over_nccl.cuda()
        over_nccl.load_state_dict(alone.state_dict())
        x = torch.randn(2, 24, 16, device="cuda")
        results = []
        for layer in (alone, over_nccl):
            xa = x.clone().requires_grad_(True)
            y = layer(xa)
            (y.square().sum() + y.l_aux).backward()
            results.append([y.detach(), xa.grad] + [p.grad for p in layer.parameters()])
        assert over_nccl._dist._nccl, "the layer did not make its NCCL communicator"
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_nccl_entry_points_fail_clearly_without_the_nccl_backend():
    if _C.built_with_nccl:
        pytest.skip("this build has the NCCL backend")
    with pytest.raises(_C.Error, match="no NCCL backend"):
        _C.nccl_unique_id()
    with pytest.raises(_C.Error, match="no NCCL backend"):
        _C.nccl_communicator(bytes(128), 0, 2, 0)


def test_data_parallel_call_adaptive_r_0():
    for out in launch("data_parallel"):
        assert "PASS data_parallel" in out


def test_sharded_experts_fewer_experts_than_ranks():
    for out in launch("sharded"):
        assert "PASS sharded" in out


def test_configuration_that_differs_across_ranks_is_an_error_on_every_rank():
    for out in launch("bad_config"):
        m = re.search(r"^ERROR (.*)$", out, re.M)
        assert m and "differs across ranks" in m.group(1), out


def test_helloworld_runs_expert_parallel_on_two_ranks():
    """Tutel's helloworld started as torchrun starts it: 2 ranks of 2 experts each."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "switchyard.examples.helloworld", "--num_steps", "3",
             "--batch_size", "2", "--num_tokens", "16", "--model_dim", "16", "--hidden_size",
             "16", "--num_local_experts", "2", "--capacity_factor", "0"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr
    assert "world_size = 2" in outs[0][0]
    assert "Total-Experts = 4 [managed by 2 device(s)]" in outs[0][0]
    assert len(re.findall(r"^STEP-\d+: loss = ", outs[0][0], re.M)) == 3
    assert "STEP-" not in outs[1][0]  # rank 0 prints
