"""The examples run end to end (small sizes): python -m switchyard.examples.NAME.
helloworld_ddp (two processes) is tested in test_examples_ddp.py."""

import re
import subprocess
import sys

import torch

from switchyard import moe
from switchyard.examples import classifier
from switchyard.examples import helloworld_custom_gate_expert as custom_example

STEP_LINE = (r"^STEP-(\d+): loss = ([0-9.]+), step_time = ([0-9.]+) sec, "
             r"perf = ([0-9.]+) tflops\.$")


def run(name, *args):
    out = subprocess.run([sys.executable, "-m", f"switchyard.examples.{name}", *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_helloworld_prints_tutels_step_lines():
    out = run("helloworld", "--num_steps", "4", "--batch_size", "2", "--num_tokens", "32",
              "--model_dim", "32", "--hidden_size", "32", "--num_local_experts", "4",
              "--capacity_factor", "0", "--l_aux_wt", "0.01")
    steps = re.findall(STEP_LINE, out, re.M)
    assert [int(s[0]) for s in steps] == [0, 1, 2, 3]
    assert float(steps[-1][1]) < float(steps[0][1])  # SGD on a fixed batch: the loss falls


def test_helloworld_eval_and_lambda_free_dtype():
    out = run("helloworld", "--num_steps", "2", "--batch_size", "1", "--num_tokens", "16",
              "--model_dim", "16", "--hidden_size", "16", "--eval", "--dtype", "float64")
    assert out.count("STEP-") == 2


CLASSIFIER = ["--epochs", "3", "--train_size", "2000", "--test_size", "500"]


def test_classifier_accuracy_rises_well_above_chance():
    out = run("classifier", *CLASSIFIER)
    chance = float(re.search(r"chance = ([0-9.]+)", out).group(1))
    before = float(re.search(r"before training = ([0-9.]+)", out).group(1))
    accs = [float(a) for a in re.findall(r"test accuracy = ([0-9.]+)", out)]
    assert chance == 0.2 and len(accs) == 3, out
    assert before < chance + 0.15, out
    assert accs[-1] > 0.85, out  # fixed seeds: 0.96 here


def test_classifier_data_defeats_a_linear_model():
    """Without its MoE layer the model is linear, and the clusters are not linearly separable:
    the MoE layer is what lifts the accuracy."""
    accs = classifier.main(["--no_moe", *CLASSIFIER])
    assert max(accs) < 0.75, accs  # 0.62 here


SMALL_CUSTOM = ["--batch_size", "2", "--num_tokens", "32", "--model_dim", "16",
                "--num_local_experts", "4"]


def test_helloworld_custom_gate_expert_prints_tutels_step_lines():
    out = run("helloworld_custom_gate_expert", "--num_steps", "3", *SMALL_CUSTOM)
    steps = re.findall(r"^STEP-(\d+): loss = ([0-9.]+), step_time = ([0-9.]+) sec\.$", out, re.M)
    assert [int(s[0]) for s in steps] == [0, 1, 2]
    assert "CustomGate(" in out and "CustomExpert(" in out, out


def test_helloworld_custom_gate_expert_trains_both_custom_modules():
    model, losses = custom_example.main(["--num_steps", "4", "--lr", "0.02", "--l_aux_wt", "0.01",
                                         *SMALL_CUSTOM])
    layer = model._moe_layer
    assert isinstance(layer.gates[0], custom_example.CustomGate)
    assert isinstance(layer.experts, custom_example.CustomExpert)
    assert layer.gates[0].top_k == 2 and layer.experts.activ_type == "relu"
    assert set(model.state_dict()) == {"_moe_layer._num_global_experts",
                                       "_moe_layer.gates.0.my_wg.weight", "_moe_layer.experts.W"}
    assert model.state_dict()["_moe_layer.experts.W"].shape == (4, 16, 16)
    assert getattr(layer.experts.W, "skip_allreduce", False)  # scan_expert_func ran
    assert getattr(layer.experts.W, "_tutel_expert", False)
    # Gradients reach both the Python gate and the Python experts through the C++ pipeline.
    assert layer.gates[0].my_wg.weight.grad.abs().sum() > 0
    assert layer.experts.W.grad.abs().sum() > 0
    assert losses[-1] < losses[0] - 0.1, losses


def test_helloworld_custom_gate_expert_matches_its_modules_in_torch():
    """The layer with the example's custom modules against the same modules composed in torch:
    dropless top-2 routing, normalised weights."""
    torch.manual_seed(3)
    d, E, T = 8, 4, 24
    layer = moe.moe_layer(
        gate_type={"type": "custom", "module": custom_example.CustomGate, "top_k": 2},
        experts={"type": "custom", "module": custom_example.CustomExpert,
                 "num_experts_per_device": E, "my_activ_type": "relu"},
        model_dim=d).double()
    with torch.no_grad():
        layer.experts.W.normal_(0, 0.5)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    y = layer(x, capacity_factor=0.0)  # per call: the example's gate takes no capacity_factor
    y.square().sum().backward()

    wg = layer.gates[0].my_wg.weight.detach().clone().requires_grad_(True)
    W = layer.experts.W.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    scores = torch.softmax(xr @ wg.t(), dim=1)
    top = torch.topk(scores, 2, dim=1)
    w = top.values / top.values.sum(1, keepdim=True)
    expert_out = torch.relu(torch.einsum("td,edf->tef", xr, W))  # [T, E, d]
    yr = (w.unsqueeze(2) * expert_out.gather(1, top.indices.unsqueeze(2).expand(T, 2, d))).sum(1)
    torch.testing.assert_close(y.detach(), yr.detach(), atol=1e-12, rtol=0)
    yr.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.experts.W.grad, W.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.gates[0].my_wg.weight.grad, wg.grad, atol=1e-12, rtol=0)
