"""The binding against the pure-PyTorch reference (reference.py) in f64: outputs, the GShard
loss and the gradients of x and every parameter, over k, capacity factors, batch-prioritized
routing, normalize_gate and biases."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from switchyard import moe

from reference import reference_moe

T, D, H, E = 19, 6, 5, 4
GRID = list(itertools.product([1, 2, 3], [1.0, 0.5, 0.0, -0.5], [False, True], [False, True],
                              [False, True]))


def make_layer(k, cf, bpr, norm, bias, postscore=True, activation=F.relu, **kw):
    layer = moe.moe_layer(
        gate_type={"type": "top", "k": k, "capacity_factor": cf}, model_dim=D,
        experts={"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H,
                 "activation_fn": activation, "has_fc1_bias": bias, "has_fc2_bias": bias},
        batch_prioritized_routing=bpr, normalize_gate=norm, is_postscore=postscore, **kw)
    return layer.double()


def params_of(layer):
    ex = layer.experts
    return (layer.gates[0].wg.weight, ex.batched_fc1_w, ex.batched_fc2_w, ex.batched_fc1_bias,
            ex.batched_fc2_bias)


def check_against_reference(layer, k, cf, bpr, norm, postscore=True, act=F.relu, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, dtype=torch.float64, generator=g)
    dy = torch.randn(T, D, dtype=torch.float64, generator=g)
    aux_w = 0.37

    xa = x.clone().requires_grad_(True)
    y = layer(xa)
    ((y * dy).sum() + aux_w * y.l_aux).backward()

    ref_params = [p.detach().clone().requires_grad_(True) if p is not None else None
                  for p in params_of(layer)]
    xr = x.clone().requires_grad_(True)
    yr, l_aux_r, info = reference_moe(xr, *ref_params, k=k, cf=cf, bpr=bpr, normalize=norm,
                                      postscore=postscore, act=act)
    ((yr * dy).sum() + aux_w * l_aux_r).backward()

    tol = dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y.detach(), yr.detach(), **tol)
    torch.testing.assert_close(y.l_aux.detach(), l_aux_r.detach(), **tol)
    assert layer.routing_stats["capacity"] >= info["capacity"] or cf <= 0
    torch.testing.assert_close(xa.grad, xr.grad, **tol)
    for p, r in zip(params_of(layer), ref_params):
        if p is None:
            continue
        torch.testing.assert_close(p.grad, r.grad, **tol)
    return info


@pytest.mark.parametrize("k,cf,bpr,norm,bias", GRID,
                         ids=[f"k{k}_cf{cf}_bpr{int(b)}_norm{int(n)}_bias{int(bi)}"
                              for k, cf, b, n, bi in GRID])
def test_matches_reference(k, cf, bpr, norm, bias):
    layer = make_layer(k, cf, bpr, norm, bias)
    check_against_reference(layer, k, cf, bpr, norm)


def test_drops_happen_in_the_grid():
    # capacity_factor 0.5 must actually drop choices, or the grid tests less than it claims.
    layer = make_layer(2, 0.5, False, True, True)
    info = check_against_reference(layer, 2, 0.5, False, True)
    assert info["kept"] < T * 2
    assert layer.routing_stats["dropped_choices"] == T * 2 - info["kept"]


@pytest.mark.parametrize("k", [1, 2])
def test_prescore_matches_reference(k):
    layer = make_layer(k, 1.0, False, True, True, postscore=False)
    check_against_reference(layer, k, 1.0, False, True, postscore=False)


@pytest.mark.parametrize("act", ["gelu", "silu", torch.nn.GELU(), torch.nn.SiLU(), torch.relu,
                                 lambda h: torch.tanh(h) * 2.0],
                         ids=["gelu", "silu", "nn.GELU", "nn.SiLU", "torch.relu", "lambda"])
def test_activations_native_and_python(act):
    fn = {"gelu": F.gelu, "silu": F.silu}.get(act, act) if isinstance(act, str) else act
    layer = make_layer(2, 0.0, False, True, True, activation=act)
    check_against_reference(layer, 2, 0.0, False, True, act=fn)


def test_lambda_path_equals_native_path():
    native = make_layer(2, 1.0, True, True, True)
    python = make_layer(2, 1.0, True, True, True, activation=lambda h: F.relu(h))
    python.load_state_dict(native.state_dict())
    x = torch.randn(3, 7, D, dtype=torch.float64)
    torch.testing.assert_close(native(x), python(x), atol=1e-12, rtol=0)


def test_gshard_loss_formula():
    layer = make_layer(2, 1.0, False, True, True)
    x = torch.randn(T, D, dtype=torch.float64)
    y = layer(x)
    scores = F.softmax(x @ layer.gates[0].wg.weight.detach().t(), dim=1)
    first = F.one_hot(scores.argmax(dim=1), E).to(scores.dtype)
    want = E / T ** 2 * (scores.sum(0) * first.sum(0)).sum()
    torch.testing.assert_close(y.l_aux, want, atol=1e-12, rtol=0)
