"""The binding against the pure-PyTorch reference (reference.py) in f64: outputs, the GShard
loss and the gradients of x and every parameter, over k, capacity factors, batch-prioritized
routing, normalize_gate and biases; on every device (cpu, cuda where there is a GPU). Then f32,
f16 and bf16 within DESIGN.md §7's tolerances."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from switchyard import moe

from conftest import DEVICES, rel_l2
from reference import reference_moe

T, D, H, E = 19, 6, 5, 4
GRID = list(itertools.product([1, 2, 3], [1.0, 0.5, 0.0, -0.5], [False, True], [False, True],
                              [False, True]))


def make_layer(k, cf, bpr, norm, bias, postscore=True, activation=F.relu, output_dim=None,
               **kw):
    layer = moe.moe_layer(
        gate_type={"type": "top", "k": k, "capacity_factor": cf}, model_dim=D,
        experts={"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H,
                 "activation_fn": activation, "has_fc1_bias": bias, "has_fc2_bias": bias,
                 "output_dim": output_dim},
        batch_prioritized_routing=bpr, normalize_gate=norm, is_postscore=postscore, **kw)
    return layer.double()


def params_of(layer):
    ex = layer.experts
    return (layer.gates[0].wg.weight, ex.batched_fc1_w, ex.batched_fc2_w, ex.batched_fc1_bias,
            ex.batched_fc2_bias)


def check_against_reference(layer, k, cf, bpr, norm, postscore=True, act=F.relu, seed=0,
                            device="cpu"):
    """The layer (f64) on `device` against the reference on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, dtype=torch.float64, generator=g)
    dy = torch.randn(T, layer.experts.output_dim, dtype=torch.float64, generator=g)
    aux_w = 0.37

    layer.to(device)
    xa = x.to(device, copy=True).requires_grad_(True)
    y = layer(xa)
    assert y.device == xa.device and y.l_aux.device == xa.device
    ((y * dy.to(device)).sum() + aux_w * y.l_aux).backward()
    layer.cpu()  # parameters and their gradients, for the comparison

    ref_params = [p.detach().clone().requires_grad_(True) if p is not None else None
                  for p in params_of(layer)]
    xr = x.clone().requires_grad_(True)
    yr, l_aux_r, info = reference_moe(xr, *ref_params, k=k, cf=cf, bpr=bpr, normalize=norm,
                                      postscore=postscore, act=act)
    ((yr * dy).sum() + aux_w * l_aux_r).backward()

    tol = dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y.detach().cpu(), yr.detach(), **tol)
    torch.testing.assert_close(y.l_aux.detach().cpu(), l_aux_r.detach(), **tol)
    assert cf <= 0 or layer.routing_stats["capacity"] >= info["capacity"]
    torch.testing.assert_close(xa.grad.cpu(), xr.grad, **tol)
    for p, r in zip(params_of(layer), ref_params):
        if p is None:
            continue
        torch.testing.assert_close(p.grad, r.grad, **tol)
    return info


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,cf,bpr,norm,bias", GRID,
                         ids=[f"k{k}_cf{cf}_bpr{int(b)}_norm{int(n)}_bias{int(bi)}"
                              for k, cf, b, n, bi in GRID])
def test_matches_reference(k, cf, bpr, norm, bias, device):
    layer = make_layer(k, cf, bpr, norm, bias)
    check_against_reference(layer, k, cf, bpr, norm, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_drops_happen_in_the_grid(device):
    # capacity_factor 0.5 must actually drop choices, or the grid tests less than it claims.
    layer = make_layer(2, 0.5, False, True, True)
    info = check_against_reference(layer, 2, 0.5, False, True, device=device)
    assert info["kept"] < T * 2
    assert layer.routing_stats["dropped_choices"] == T * 2 - info["kept"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 2])
def test_prescore_matches_reference(k, device):
    layer = make_layer(k, 1.0, False, True, True, postscore=False)
    check_against_reference(layer, k, 1.0, False, True, postscore=False, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["gelu", "silu", torch.nn.GELU(), torch.nn.SiLU(), torch.relu,
                                 lambda h: torch.tanh(h) * 2.0],
                         ids=["gelu", "silu", "nn.GELU", "nn.SiLU", "torch.relu", "lambda"])
def test_activations_native_and_python(act, device):
    fn = {"gelu": F.gelu, "silu": F.silu}.get(act, act) if isinstance(act, str) else act
    layer = make_layer(2, 0.0, False, True, True, activation=act)
    check_against_reference(layer, 2, 0.0, False, True, act=fn, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("output_dim,postscore,act,cf",
                         [(3, True, "relu", 1.0), (9, False, "relu", 0.0),
                          (4, True, lambda h: torch.tanh(h), 0.5)],
                         ids=["narrower", "wider_prescore", "narrower_lambda"])
def test_output_dim_matches_reference(output_dim, postscore, act, cf, device):
    """Tutel's output_dim: fc2_w [E, h, o], fc2_bias [E, o], y [..., o] (native and Python)."""
    fn = F.relu if act == "relu" else act
    layer = make_layer(2, cf, False, True, True, postscore=postscore, activation=act,
                       output_dim=output_dim)
    assert layer.experts.batched_fc2_w.shape == (E, H, output_dim)
    assert layer.experts.batched_fc2_bias.shape == (E, output_dim)
    check_against_reference(layer, 2, cf, False, True, postscore=postscore, act=fn, device=device)
    x = torch.randn(2, 5, D, dtype=torch.float64).to(device)
    assert layer.to(device)(x).shape == (2, 5, output_dim)


@pytest.mark.parametrize("device", DEVICES)
def test_lambda_path_equals_native_path(device):
    native = make_layer(2, 1.0, True, True, True).to(device)
    python = make_layer(2, 1.0, True, True, True, activation=lambda h: F.relu(h)).to(device)
    python.load_state_dict(native.state_dict())
    x = torch.randn(3, 7, D, dtype=torch.float64).to(device)
    torch.testing.assert_close(native(x), python(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gshard_loss_formula(device):
    layer = make_layer(2, 1.0, False, True, True)
    x = torch.randn(T, D, dtype=torch.float64)
    scores = F.softmax(x @ layer.gates[0].wg.weight.detach().t(), dim=1)
    first = F.one_hot(scores.argmax(dim=1), E).to(scores.dtype)
    want = E / T ** 2 * (scores.sum(0) * first.sum(0)).sum()
    y = layer.to(device)(x.to(device))
    torch.testing.assert_close(y.l_aux.cpu(), want, atol=1e-12, rtol=0)


# ---- f32, f16, bf16 ---------------------------------------------------------------------------

LOW_T = 64
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # DESIGN.md §7


def well_routed_input(wg, k, n, generator, margin=0.05):
    """n rows x [n, D] (f64) whose k+1 largest softmax scores are more than `margin` apart, so that
    rounding x, the weights and the logits to f16/bf16 cannot change which experts a token picks
    or in which order (a changed choice is a different function, not a rounding error)."""
    rows = []
    while len(rows) < n:
        x = torch.randn(4 * n, D, dtype=torch.float64, generator=generator)
        s = F.softmax(x @ wg.t(), dim=1).sort(dim=1, descending=True).values
        gaps = (s[:, :k] - s[:, 1:k + 1]).min(dim=1).values
        rows += [x[i] for i in range(x.shape[0]) if gaps[i] > margin]
    return torch.stack(rows[:n])


def run_low_precision(layer, x, dy, aux_w, device, dtype):
    """y, l_aux and the gradients of x and every parameter of a copy of `layer` in `dtype` on
    `device`, all as f64 on the CPU."""
    lp = copy.deepcopy(layer).to(device=device, dtype=dtype)
    xa = x.to(device=device, dtype=dtype, copy=True).requires_grad_(True)
    y = lp(xa)
    assert y.dtype == dtype and y.device == xa.device
    ((y.double() * dy.to(device)).sum() + aux_w * y.l_aux.double()).backward()
    grads = [p.grad.double().cpu() for p in params_of(lp)]
    return y.double().cpu(), y.l_aux.double().cpu(), xa.grad.double().cpu(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
def test_low_precision_within_tolerance(dtype, device):
    """f32 and f16 against the f64 reference on the same rounded inputs and weights; bf16 against
    f32 on the same device with the same rounded weights (DESIGN.md §7). Dropless top-2: every
    token's choices are kept, so that only rounding separates the two sides."""
    layer = make_layer(2, 0.0, False, True, True)
    with torch.no_grad():  # weights representable in `dtype`: both sides start equal
        for p in layer.parameters():
            p.copy_(p.to(dtype).double())
    g = torch.Generator().manual_seed(7)
    x = well_routed_input(layer.gates[0].wg.weight.detach(), 2, LOW_T, g).to(dtype).double()
    dy = torch.randn(LOW_T, D, dtype=torch.float64, generator=g).to(dtype).double()
    aux_w = 0.37
    got = run_low_precision(layer, x, dy, aux_w, device, dtype)
    if dtype == torch.bfloat16:
        want = run_low_precision(layer, x, dy, aux_w, device, torch.float32)
    else:
        ref_params = [p.detach().clone().requires_grad_(True) for p in params_of(layer)]
        xr = x.clone().requires_grad_(True)
        yr, l_aux_r, _ = reference_moe(xr, *ref_params, k=2, cf=0.0)
        ((yr * dy).sum() + aux_w * l_aux_r).backward()
        want = (yr, l_aux_r, xr.grad, [p.grad for p in ref_params])
    tol = TOLERANCE[dtype]
    names = ["y", "l_aux", "dx"] + [f"grad {n}" for n in
                                     ("wg", "fc1_w", "fc2_w", "fc1_bias", "fc2_bias")]
    for name, a, b in zip(names, got[:3] + tuple(got[3]), want[:3] + tuple(want[3])):
        err = rel_l2(a, b)
        assert err <= tol, f"{name}: relative L2 error {err:.3g} > {tol:g} ({dtype}, {device})"
