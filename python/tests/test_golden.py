"""The 36 cases computed by Tutel v0.3.3 (tests/data), replayed through the binding: output,
GShard loss, dx and every parameter gradient, on every device (cpu, cuda where there is a GPU)."""

import pytest
import torch

from switchyard import moe

from conftest import DEVICES, golden_cases

CASES = golden_cases()
ATOL = 1e-4


def test_file_holds_36_cases():
    assert len(CASES) == 36


def case_id(c):
    g = c["config"]
    return "E%d_k%d_cf%s%s%s%s" % (g["E"], g["k"], g["capacity_factor"],
                                   "_bpr" if g["batch_prioritized_routing"] else "",
                                   "_norm" if g["normalize_gate"] else "",
                                   "_bias" if g["has_bias"] else "")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[f"{i}_{case_id(c)}" for i, c in enumerate(CASES)])
def test_golden_case(case, device):
    g = case["config"]
    T, d, E = g["T"], g["d"], g["E"]
    layer = moe.moe_layer(
        gate_type={"type": "top", "k": g["k"], "capacity_factor": g["capacity_factor"]},
        model_dim=d,
        experts={"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": g["h"],
                 "activation_fn": torch.nn.functional.relu, "has_fc1_bias": g["has_bias"],
                 "has_fc2_bias": g["has_bias"]},
        batch_prioritized_routing=g["batch_prioritized_routing"],
        normalize_gate=g["normalize_gate"], is_postscore=g["is_postscore"])
    sd = {"_num_global_experts": torch.tensor(E)}
    for name, p in case["params"].items():
        sd[name] = torch.tensor(p["value"], dtype=torch.float32).view(p["shape"])
    layer.load_state_dict(sd, strict=True)
    layer.to(device)

    x = torch.tensor(case["x"], dtype=torch.float32).view(T, d).to(device).requires_grad_(True)
    dy = torch.tensor(case["dy"], dtype=torch.float32).view(T, d).to(device)
    y = layer(x)
    assert y.device == x.device
    torch.testing.assert_close(y.detach().cpu().flatten(), torch.tensor(case["y"]), atol=ATOL,
                               rtol=0)
    assert abs(float(y.l_aux) - case["l_aux"]) < ATOL
    ((y * dy).sum() + g["aux_weight"] * y.l_aux).backward()
    torch.testing.assert_close(x.grad.cpu().flatten(), torch.tensor(case["dx"]), atol=ATOL, rtol=0)
    layer.cpu()
    named = dict(layer.named_parameters())
    assert set(named) == set(case["grads"])
    for name, grad in case["grads"].items():
        want = torch.tensor(grad["value"] if isinstance(grad, dict) else grad)
        torch.testing.assert_close(named[name].grad.flatten(), want.flatten(), atol=ATOL, rtol=0,
                                   msg=lambda m: f"grad of {name}: {m}")
