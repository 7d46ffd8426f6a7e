"""The nn.Module around the C++ layer: Tutel's arguments and state_dict, autograd (gradcheck),
custom gates and experts, switchyard's own options, dtypes, zero-copy crossing, bad arguments;
the ones that compute on every device (cpu, cuda where there is a GPU), and CUDA's own: tensors
crossing without copies, torch's current stream, layers moving between devices."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import switchyard
from switchyard import _C, moe

from conftest import DEVICES, needs_cuda, rel_l2
from reference import reference_moe

D, H, E = 6, 5, 4


def ffn(E=E, H=H, **kw):
    return {"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H, **kw}


def small(k=2, cf=1.0, **kw):
    return moe.moe_layer(gate_type={"type": "top", "k": k, "capacity_factor": cf}, model_dim=D,
                         experts=ffn(), **kw)


def test_both_import_paths():
    assert switchyard.moe_layer is moe.moe_layer is moe.MOELayer
    assert switchyard.moe.moe_layer is moe.MOELayer


def test_tutel_defaults():
    layer = moe.moe_layer(gate_type={"type": "top"}, model_dim=D, experts=ffn())
    g = layer.gates[0]
    assert (g.top_k, g.capacity_factor, g.gate_noise, g.fp32_gate) == (1, 1.0, 0.0, False)
    assert layer.is_postscore and layer.normalize_gate and layer.is_gshard_loss
    assert not layer.batch_prioritized_routing
    assert layer.a2a_ffn_overlap_degree == 1 and layer.num_global_experts == E
    assert moe.moe_layer.global_expert_count(3) == 3


def test_state_dict_keys_shapes_and_buffer():
    layer = small()
    sd = layer.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes == {"_num_global_experts": (), "gates.0.wg.weight": (E, D),
                      "experts.batched_fc1_w": (E, H, D), "experts.batched_fc2_w": (E, H, D),
                      "experts.batched_fc1_bias": (E, H), "experts.batched_fc2_bias": (E, D)}
    assert int(sd["_num_global_experts"]) == E
    nob = moe.moe_layer(gate_type={"type": "top", "k": 2}, model_dim=D,
                        experts=ffn(has_fc1_bias=False, has_fc2_bias=False))
    assert "experts.batched_fc1_bias" not in nob.state_dict()
    assert "experts.batched_fc2_bias" not in nob.state_dict()


def test_cosine_state_dict_keys():
    layer = moe.moe_layer(gate_type={"type": "cosine", "k": 2, "proj_dim": 3, "init_t": 0.25},
                          model_dim=D, experts=ffn())
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items() if k.startswith("gates")}
    assert shapes == {"gates.0.temperature": (1,), "gates.0.cosine_projector.weight": (3, D),
                      "gates.0.cosine_projector.bias": (3,), "gates.0.sim_matrix": (3, E)}
    torch.testing.assert_close(layer.gates[0].temperature.detach(), torch.log(torch.tensor([4.0])))


def tutel_shaped_state_dict(seed=5):
    g = torch.Generator().manual_seed(seed)
    return {"_num_global_experts": torch.tensor(E),
            "gates.0.wg.weight": torch.randn(E, D, generator=g),
            "experts.batched_fc1_w": torch.randn(E, H, D, generator=g),
            "experts.batched_fc2_w": torch.randn(E, H, D, generator=g),
            "experts.batched_fc1_bias": torch.randn(E, H, generator=g),
            "experts.batched_fc2_bias": torch.randn(E, D, generator=g)}


@pytest.mark.parametrize("device", DEVICES)
def test_strict_load_of_a_tutel_state_dict_and_round_trip(device):
    layer = small().to(device)
    sd = tutel_shaped_state_dict()
    layer.load_state_dict(sd, strict=True)
    for k, v in layer.state_dict().items():
        assert v.device == torch.device(device) or device == "cuda" and v.is_cuda
        torch.testing.assert_close(v.cpu(), sd[k])
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = small().to(device)
    other.load_state_dict(torch.load(buf), strict=True)
    x = torch.randn(9, D, device=device)
    torch.testing.assert_close(layer(x), other(x))
    bad = dict(sd, _num_global_experts=torch.tensor(E + 1))
    with pytest.raises(RuntimeError, match="global experts"):
        small().load_state_dict(bad)


def test_expert_marks_and_scan_expert_func():
    seen = []
    layer = small(scan_expert_func=lambda n, p: seen.append(n) or setattr(p, "skip_allreduce",
                                                                         True))
    assert seen == ["batched_fc1_w", "batched_fc2_w", "batched_fc1_bias", "batched_fc2_bias"]
    for n, p in layer.named_parameters():
        assert getattr(p, "_tutel_expert", False) == n.startswith("experts.")
        assert hasattr(p, "skip_allreduce") == n.startswith("experts.")
    assert [n for n, _ in layer.get_parameter_iterator("gate")] == ["0.wg.weight"]


def test_seeds_make_initialisation_reproducible():
    a = small(seeds=(1, 2, 3))
    b = small(seeds=(1, 2, 3))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_gradcheck_of_x_and_every_parameter():
    torch.manual_seed(3)
    layer = small(k=2, cf=0.0).double()
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    # Clear routing margins: the gap between the k-th and (k+1)-th score dwarfs the step.
    scores = torch.softmax(x.detach() @ layer.gates[0].wg.weight.detach().t(), 1)
    top = scores.sort(dim=1, descending=True).values
    assert float((top[:, 1] - top[:, 2]).min()) > 1e-3
    eng = layer._engine(0, torch.float64, 1)
    params = [p.detach().clone().requires_grad_(True) for p in layer._cpp_params(0, eng)]

    def fn(x, *ps):
        call = moe._Call(eng, None, None, True, True)
        y, l_aux, l_z = moe._MoEFunction.apply(call, len(ps), x, *ps)
        return y, l_aux, l_z

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7)
    # And through the module, for x.
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,), eps=1e-6, atol=1e-7)


def test_gradcheck_cosine_gate():
    torch.manual_seed(4)
    layer = moe.moe_layer(gate_type={"type": "cosine", "k": 2, "proj_dim": 3,
                                     "capacity_factor": 0}, model_dim=D, experts=ffn()).double()
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    eng = layer._engine(0, torch.float64, 1)
    params = [p.detach().clone().requires_grad_(True) for p in layer._cpp_params(0, eng)]

    def fn(x, *ps):
        return moe._MoEFunction.apply(moe._Call(eng, None, None, True, True), len(ps), x, *ps)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_cosine_gate_matches_its_torch_forward(device):
    # The core's cosine gate (CPU and CUDA) against the gate module's torch forward.
    layer = moe.moe_layer(gate_type={"type": "cosine", "k": 2, "proj_dim": 4}, model_dim=D,
                          experts=ffn()).double()
    x = torch.randn(11, D, dtype=torch.float64)
    ex = layer.experts
    with torch.no_grad():
        logits = layer.gates[0](x)
        yr, l_aux, _ = reference_moe(x, None, ex.batched_fc1_w, ex.batched_fc2_w,
                                     ex.batched_fc1_bias, ex.batched_fc2_bias, k=2, cf=1.0,
                                     logits=logits)
    xa = x.to(device, copy=True).requires_grad_(True)
    y = layer.to(device)(xa)
    torch.testing.assert_close(y.detach().cpu(), yr, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y.l_aux.detach().cpu(), l_aux, atol=1e-10, rtol=1e-10)
    (y.sum() + y.l_aux).backward()
    assert xa.grad is not None and layer.gates[0].sim_matrix.grad is not None


class CustomGate(torch.nn.Module):
    def __init__(self, model_dim, num_global_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.my_wg = torch.nn.Linear(model_dim, num_global_experts, bias=False)

    def forward(self, x):
        return self.my_wg(x)


class CustomExpert(torch.nn.Module):
    def __init__(self, model_dim, num_experts_per_device, sharded_count, scale=1.0):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(num_experts_per_device, model_dim, model_dim) * 0.3)
        self.scale = scale

    def forward(self, x, ctx):
        assert ctx.sharded_count == 1
        return torch.tanh(torch.matmul(x, self.W)) * self.scale


@pytest.mark.parametrize("device", DEVICES)
def test_custom_gate_equals_builtin_gate(device):
    builtin = small(k=2, cf=1.0).double()
    custom = moe.moe_layer(gate_type={"type": "custom", "module": CustomGate, "top_k": 2},
                           model_dim=D, experts=ffn()).double()
    with torch.no_grad():
        custom.gates[0].my_wg.weight.copy_(builtin.gates[0].wg.weight)
        for n in ("batched_fc1_w", "batched_fc2_w", "batched_fc1_bias", "batched_fc2_bias"):
            getattr(custom.experts, n).copy_(getattr(builtin.experts, n))
    builtin.to(device)
    custom.to(device)
    x = torch.randn(13, D, dtype=torch.float64, device=device)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = builtin(xa), custom(xb)
    torch.testing.assert_close(ya, yb, atol=1e-12, rtol=0)
    (ya.sum() + ya.l_aux).backward()
    (yb.sum() + yb.l_aux).backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(builtin.gates[0].wg.weight.grad, custom.gates[0].my_wg.weight.grad,
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_experts_against_reference(device):
    layer = moe.moe_layer(gate_type={"type": "top", "k": 2, "capacity_factor": 0.5}, model_dim=D,
                          experts={"type": "custom", "module": CustomExpert,
                                   "num_experts_per_device": E, "scale": 2.0}).double()
    x = torch.randn(17, D, dtype=torch.float64)
    xa = x.to(device, copy=True).requires_grad_(True)
    y = layer.to(device)(xa)
    (y.square().sum() + y.l_aux).backward()
    layer.cpu()  # parameters and their gradients, for the comparison on the CPU
    wg = layer.gates[0].wg.weight.detach().clone().requires_grad_(True)
    W = layer.experts.W.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    # The custom expert as an FFN-shaped reference: act(x W[e]) with identity second matrix.
    T = xr.shape[0]
    logits = xr @ wg.t()
    scores = torch.softmax(logits, 1)
    idx = torch.topk(scores, 2, 1).indices
    w = scores.gather(1, idx)
    w = w / w.sum(1, keepdim=True)
    C = 2 * int(0.5 * ((T + E - 1) // E))
    count = torch.zeros(E, dtype=torch.long)
    slot = torch.zeros(T, 2, dtype=torch.long)
    for j in range(2):
        for t in range(T):
            e = int(idx[t, j])
            slot[t, j] = count[e]
            count[e] += 1
    out = []
    for t in range(T):
        acc = torch.zeros(D, dtype=torch.float64)
        for j in range(2):
            if slot[t, j] < C:
                acc = acc + w[t, j] * torch.tanh(xr[t] @ W[int(idx[t, j])]) * 2.0
        out.append(acc)
    yr = torch.stack(out)
    first = torch.zeros(E, dtype=torch.float64)
    first.index_add_(0, idx[:, 0], torch.ones(T, dtype=torch.float64))
    l_aux = E / T ** 2 * (scores.sum(0) * first).sum()
    torch.testing.assert_close(y.detach().cpu(), yr.detach(), atol=1e-10, rtol=0)
    (yr.square().sum() + l_aux).backward()
    torch.testing.assert_close(xa.grad.cpu(), xr.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.experts.W.grad, W.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.gates[0].wg.weight.grad, wg.grad, atol=1e-10, rtol=0)


def test_multiple_gates_share_the_experts():
    layer = moe.moe_layer(gate_type=[{"type": "top", "k": 1}, {"type": "top", "k": 2}],
                          model_dim=D, experts=ffn())
    assert "gates.1.wg.weight" in layer.state_dict()
    x = torch.randn(8, D)
    y0, y1 = layer(x, gate_index=0), layer(x, gate_index=1)
    assert layer.routing_stats["top_k"] == 2 and not torch.allclose(y0, y1)
    y1.sum().backward()
    assert layer.gates[0].wg.weight.grad is None
    assert layer.gates[1].wg.weight.grad is not None


def test_per_call_overrides_and_reserve_dims():
    layer = small(k=1, cf=1.0)
    x = torch.randn(2, 3, 2, 3)  # reserve_dims=2: model_dim = 2 * 3
    y = layer(x, reserve_dims=2, top_k=2, capacity_factor=0.0)
    assert y.shape == x.shape and layer.routing_stats["top_k"] == 2
    assert layer.routing_stats["dropped_choices"] == 0
    layer(x.view(6, D), capacity_factor=0.5, a2a_ffn_overlap_degree=4)
    assert layer.routing_stats["capacity"] % 4 == 0 and layer.a2a_ffn_overlap_degree == 4
    layer(x.view(6, D), adaptive_r=0)


def test_result_func_and_l_aux_attributes():
    layer = small(result_func=lambda y: (y, y.l_aux))
    y, l_aux = layer(torch.randn(5, D))
    assert l_aux is layer.l_aux and y.l_z is layer.l_z


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_step_trains_and_dtype_conversion(device):
    torch.manual_seed(0)
    layer = small(k=2, cf=0.0).to(device)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x, target = torch.randn(32, D).to(device), torch.randn(32, D).to(device)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        y = layer(x)
        loss = F.mse_loss(y, target) + 0.01 * y.l_aux
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    for dtype in (torch.float64, torch.bfloat16, torch.float16, torch.float32):
        layer.to(dtype)
        xin = x.to(dtype).requires_grad_(True)
        y = layer(xin)
        assert y.dtype == dtype and y.device == xin.device
        y.float().sum().backward()
        assert xin.grad.dtype == dtype
        assert layer.experts.batched_fc1_w.grad.dtype == dtype
        assert layer.experts.batched_fc1_w.grad.device == xin.device


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_gate_keeps_the_gate_in_f32(device):
    layer = moe.moe_layer(gate_type={"type": "top", "k": 2, "fp32_gate": True}, model_dim=D,
                          experts=ffn()).to(device)
    assert layer.gates[0].wg.weight.dtype == torch.float32
    layer.experts.to(torch.bfloat16)
    x = torch.randn(9, D, dtype=torch.bfloat16, device=device, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert layer.gates[0].wg.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_second_backward_and_interleaved_forwards_recompute(device):
    layer = small(k=2, cf=1.0).double().to(device)
    x1 = torch.randn(9, D, dtype=torch.float64, device=device, requires_grad=True)
    x2 = torch.randn(9, D, dtype=torch.float64, device=device, requires_grad=True)
    y1 = layer(x1)
    y2 = layer(x2)
    g1 = torch.autograd.grad(y1.sum(), x1, retain_graph=True)[0]
    g1b = torch.autograd.grad(y1.sum(), x1)[0]
    g2 = torch.autograd.grad(y2.sum(), x2)[0]
    torch.testing.assert_close(g1, g1b)
    assert not torch.equal(g1, g2)
    noisy = moe.moe_layer(gate_type={"type": "top", "k": 2, "gate_noise": 1.0}, model_dim=D,
                          experts=ffn())
    a = noisy(torch.randn(5, D, requires_grad=True))
    noisy(torch.randn(5, D))
    with pytest.raises(RuntimeError, match="recompute"):
        a.sum().backward()


def test_eval_mode_with_gradients():
    layer = small().eval()
    x = torch.randn(6, D, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    noisy = moe.moe_layer(gate_type={"type": "top", "k": 2, "gate_noise": 1.0}, model_dim=D,
                          experts=ffn()).eval()
    y = noisy(torch.randn(6, D, requires_grad=True))
    with pytest.raises(RuntimeError, match="evaluation mode"):
        y.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_megatron_options(device):
    x = torch.randn(16, D, device=device)
    m = moe.moe_layer(gate_type={"type": "top", "k": 2, "capacity_factor": 0}, model_dim=D,
                      experts=ffn(), rules="megatron", score_fn="sigmoid", expert_bias=True,
                      scaling_factor=2.5, aux_loss="switch").to(device)
    m(x).sum().backward()
    assert m.expert_bias().device == x.device
    before = m.expert_bias().clone()
    m.update_expert_bias(0.1)
    assert not torch.equal(before, m.expert_bias())
    s = moe.moe_layer(gate_type={"type": "top", "k": 2, "capacity_factor": 1.0}, model_dim=D,
                      experts=ffn(E=8), rules="megatron", sinkhorn=True, aux_loss="none",
                      num_groups=4, topk_groups=2, drop_policy="position").to(device)
    y = s(x)
    assert float(y.l_aux) == 0.0
    # z-loss: mean over tokens of logsumexp(logits)^2, returned beside l_aux.
    z = small().to(device)
    y = z(x)
    logits = x @ z.gates[0].wg.weight.detach().t()
    torch.testing.assert_close(y.l_z, torch.logsumexp(logits, 1).square().mean())


@pytest.mark.parametrize("device", DEVICES)
def test_shared_expert_adds_an_ffn_on_every_token(device):
    layer = small(k=2, cf=1.0, shared_expert_hidden=3).double().to(device)
    x = torch.randn(7, D, dtype=torch.float64, device=device)
    sh = layer.shared_experts
    assert tuple(sh.batched_fc1_w.shape) == (1, 3, D)
    plain = small(k=2, cf=1.0).double().to(device)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items()
                           if not k.startswith("shared")})
    want = plain(x) + sh(x.unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=0)


def test_deepcopy_and_pickle():
    layer = small()
    x = torch.randn(4, D)
    other = copy.deepcopy(layer)
    torch.testing.assert_close(layer(x), other(x))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    # A whole module, not only tensors: torch >= 2.6 loads weights only unless told otherwise.
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), layer(x))


@pytest.mark.parametrize("device", DEVICES)
def test_memory_stats_of_switchyards_allocator(device):
    layer = small().to(device)
    x = torch.randn(32, D, device=device, requires_grad=True)
    switchyard.reset_peak_memory(device)
    before = switchyard.memory_stats(device)
    assert before["peak_bytes"] == before["current_bytes"] >= 0
    y = layer(x)
    during = switchyard.memory_stats(device)
    assert during["current_bytes"] > before["current_bytes"]  # what forward keeps for backward
    y.sum().backward()
    after = switchyard.memory_stats(device)
    assert after["peak_bytes"] >= during["current_bytes"] and after["peak_bytes"] > 0
    switchyard.reset_peak_memory(device)
    now = switchyard.memory_stats(device)
    assert now["peak_bytes"] == now["current_bytes"]
    with pytest.raises(Exception, match="memory_stats"):
        switchyard.memory_stats("meta")


def test_zero_copy_crossing():
    t = torch.randn(5, 7, dtype=torch.float64)
    ptr, sizes, strides, dtype = _C._view_info(t)
    assert ptr == t.data_ptr() and sizes == [5, 7] and strides == [7, 1] and dtype == "f64"
    tt = t.t()
    ptr, sizes, strides, _ = _C._view_info(tt)
    assert ptr == t.data_ptr() and sizes == [7, 5] and strides == [1, 7]
    sl = t[1:, 2:]
    assert _C._view_info(sl)[0] == sl.data_ptr()
    back = _C._roundtrip(tt)
    assert back.data_ptr() == t.data_ptr() and torch.equal(back, tt)
    owned, sy_ptr = _C._owned_roundtrip(t)
    assert owned.data_ptr() == sy_ptr and torch.equal(owned, t)
    for dt, name in [(torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16")]:
        assert _C._view_info(t.to(dt))[3] == name


def test_bad_arguments():
    with pytest.raises(TypeError, match="bogus"):
        moe.moe_layer(gate_type={"type": "top"}, model_dim=D, experts=ffn(), bogus=1)
    with pytest.raises(TypeError, match="unknown_key"):
        moe.moe_layer(gate_type={"type": "top"}, model_dim=D, experts=ffn(unknown_key=1))
    with pytest.raises(TypeError, match="kk"):
        moe.moe_layer(gate_type={"type": "top", "kk": 2}, model_dim=D, experts=ffn())
    with pytest.raises(ValueError, match="gate type"):
        moe.moe_layer(gate_type={"type": "nope"}, model_dim=D, experts=ffn())
    with pytest.raises(ValueError, match="experts type"):
        moe.moe_layer(gate_type={"type": "top"}, model_dim=D, experts={"type": "moe"})
    with pytest.raises(ValueError, match="activation_fn"):
        moe.moe_layer(gate_type={"type": "top"}, model_dim=D, experts=ffn(activation_fn="tanhh"))
    with pytest.raises(ValueError, match="output_dim"):
        moe.moe_layer(gate_type={"type": "top"}, model_dim=D, experts=ffn(output_dim=-1))
    with pytest.raises(ValueError, match="parallel_type"):
        moe.moe_layer(gate_type={"type": "top"}, model_dim=D, experts=ffn(), parallel_type="x")
    with pytest.raises(switchyard.Error, match="num_groups"):
        moe.moe_layer(gate_type={"type": "top", "k": 2}, model_dim=D, experts=ffn(),
                      num_groups=3, topk_groups=1)
    with pytest.raises(switchyard.Error, match="rule set"):
        moe.moe_layer(gate_type={"type": "top"}, model_dim=D, experts=ffn(), rules="deepspeed")
    layer = small()
    with pytest.raises(ValueError, match="model_dim"):
        layer(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="top_k"):
        layer(torch.randn(3, D), top_k=0)
    with pytest.raises(ValueError, match="adaptive_r"):
        layer(torch.randn(3, D), adaptive_r=2)
    with pytest.raises(ValueError, match="gate_index"):
        layer(torch.randn(3, D), gate_index=1)
    with pytest.raises(switchyard.Error, match="NaN|finite|Inf"):
        layer(torch.full((3, D), float("nan")))
    assert layer(torch.randn(3, D)).shape == (3, D)  # still usable


def test_sharded_experts_need_several_ranks():
    # num_experts_per_device < 0 (ranks sharing an expert) needs a world size it divides.
    with pytest.raises(ValueError, match="multiple of it"):
        moe.moe_layer(gate_type={"type": "top"}, model_dim=D,
                      experts=dict(ffn(), num_experts_per_device=-2))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input(device):
    layer = small().to(device)
    x = torch.randn(0, D, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, D)
    y.sum().backward()
    assert x.grad.shape == (0, D)


# ---- CUDA -------------------------------------------------------------------------------------

@pytest.mark.skipif(_C.built_with_cuda, reason="this build has the CUDA backend")
def test_a_cuda_layer_needs_a_cuda_build():
    with pytest.raises(NotImplementedError, match="no CUDA backend"):
        small()._config(0, torch.float32, 1, torch.device("cuda", 0))


@needs_cuda
def test_host_stats_on_cuda():
    # Without host_stats (the default) a CUDA forward leaves the statistics and losses on the
    # device and reports NaN/Inf logits at the next forward that reads them back.
    layer = small().cuda()
    assert not layer.host_stats
    y = layer(torch.randn(16, D, device="cuda"))
    assert y.l_aux.device.type == "cuda" and torch.isfinite(y.l_aux)
    s = layer.routing_stats
    assert sum(s["tokens_per_expert"]) + s["dropped_choices"] == 16 * 2
    layer(torch.full((3, D), float("nan"), device="cuda"))  # not read back: no error yet
    layer.host_stats = True
    with pytest.raises(switchyard.Error, match="NaN|finite|Inf"):
        layer(torch.randn(3, D, device="cuda"))
    assert layer(torch.randn(3, D, device="cuda")).shape == (3, D)  # still usable
    assert isinstance(layer.routing_stats["capacity"], int)


@needs_cuda
def test_zero_copy_crossing_on_cuda():
    t = torch.randn(5, 7, dtype=torch.float64, device="cuda")
    ptr, sizes, strides, dtype = _C._view_info(t)
    assert ptr == t.data_ptr() and sizes == [5, 7] and strides == [7, 1] and dtype == "f64"
    tt = t.t()
    back = _C._roundtrip(tt)
    assert back.device == t.device and back.data_ptr() == t.data_ptr() and torch.equal(back, tt)
    owned, sy_ptr = _C._owned_roundtrip(t)
    assert owned.device == t.device and owned.data_ptr() == sy_ptr and torch.equal(owned, t)
    del owned  # handed back to switchyard's pool on torch's stream
    torch.cuda.synchronize()
    for dt, name in [(torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16")]:
        assert _C._view_info(t.to(dt))[3] == name


@needs_cuda
def test_calls_run_on_torchs_current_stream():
    t = torch.zeros(1, device="cuda")
    # torch's default stream is CUDA's legacy default stream (handle 1 to switchyard).
    assert torch.cuda.current_stream().cuda_stream == 0 and _C._stream_seen(t) == 1
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert _C._stream_seen(t) == side.cuda_stream
    # A forward and backward queued on a side stream, right behind the torch op that makes x.
    layer = small(k=2, cf=0.0).to("cuda")
    base = torch.randn(4096, D, device="cuda")
    want_y = layer(base * 3.0)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x = (base * 3.0).requires_grad_(True)
        y = layer(x)
        y.square().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, want_y)
    xd = (base * 3.0).requires_grad_(True)
    layer(xd).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)


@needs_cuda
def test_layer_moves_between_devices():
    torch.manual_seed(2)
    layer = small(k=2, cf=1.0)
    x = torch.randn(33, D)
    want = layer(x)
    layer.to("cuda")
    assert all(p.is_cuda for p in layer.parameters())
    y = layer(x.cuda())
    torch.testing.assert_close(y.cpu(), want, atol=1e-5, rtol=1e-5)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    (y.square().sum() + y.l_aux).backward()
    opt.step()
    trained = layer.state_dict()
    assert trained["experts.batched_fc1_w"].is_cuda
    cpu_copy = small(k=2, cf=1.0)
    cpu_copy.load_state_dict(trained, strict=True)
    layer.cpu()
    torch.testing.assert_close(layer(x), cpu_copy(x))
    torch.testing.assert_close(layer.to("cuda")(x.cuda()).cpu(), cpu_copy(x), atol=1e-5,
                               rtol=1e-5)


@needs_cuda
def test_input_and_layer_on_different_devices_is_an_error():
    layer = small()
    with pytest.raises(ValueError, match="input on cuda"):
        layer(torch.randn(3, D, device="cuda"))
    with pytest.raises(ValueError, match="input on cpu"):
        layer.cuda()(torch.randn(3, D))


def test_torchs_tf32_switch_reaches_only_cuda_layers():
    """Tutel's use_tensorcore is torch.backends.cuda.matmul.allow_tf32: a CUDA layer's f32
    experts follow it; a CPU layer computes in FP32 whatever it says."""
    layer = small()
    old = torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # what Tutel's helloworld sets
        cfg = layer._config(0, torch.float32, 1, torch.device("cpu"))[0]
        assert cfg["use_tensorcore"] is False
        if _C.built_with_cuda:
            cfg = layer._config(0, torch.float32, 1, torch.device("cuda", 0))[0]
            assert cfg["use_tensorcore"] is True
    finally:
        torch.set_float32_matmul_precision(old)


@needs_cuda
def test_tf32_experts_on_cuda_stay_within_tf32_precision():
    torch.manual_seed(3)
    layer = moe.moe_layer(gate_type={"type": "top", "k": 2, "capacity_factor": 0.0},
                          model_dim=256, experts={"type": "ffn", "num_experts_per_device": 8,
                                                  "hidden_size_per_expert": 512})
    x = torch.randn(1024, 256)
    want = layer(x)
    layer.cuda()
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        exact = layer(x.cuda()).cpu()
        torch.set_float32_matmul_precision("high")
        tf32 = layer(x.cuda()).cpu()
    finally:
        torch.set_float32_matmul_precision(old)
    assert rel_l2(exact, want) < 1e-5
    assert 1e-5 < rel_l2(tf32, want) < 1e-2


def test_a_cpu_layer_refuses_an_nccl_group():
    """An NCCL process group moves CUDA tensors only: a CPU layer over one gets a clear error."""
    ops = moe._TorchDistOps.__new__(moe._TorchDistOps)  # as made over an NCCL group
    ops.tensor_device = "cuda"
    cfg = small()._config(0, torch.float32, 1, torch.device("cpu"))[0]
    with pytest.raises(ValueError, match="NCCL process group"):
        moe._Engine(cfg, None, None, ops)
