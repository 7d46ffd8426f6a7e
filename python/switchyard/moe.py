"""Tutel-compatible MoE layer over the switchyard C++ core.

    from switchyard import moe as tutel_moe        # instead of: from tutel import moe as tutel_moe
    layer = tutel_moe.moe_layer(gate_type={'type': 'top', 'k': 2}, model_dim=512,
                                experts={'type': 'ffn', 'num_experts_per_device': 8,
                                         'hidden_size_per_expert': 1024})
    y = layer(x)            # y.l_aux is the balancing loss

How it works: the layer's parameters are ordinary torch nn.Parameters with Tutel's names and
shapes. A forward hands them (no copy) with the input to the C++ layer, whose backward is wired
into autograd by _MoEFunction. The C++ layer runs where the parameters are (CPU, or a GPU in a
build with CUDA, on torch's current stream); module.to(device) moves them, and the next forward
builds a C++ layer for the new device. Gates and experts that the C++ core does not implement (a
custom gate or expert module, an activation given as an arbitrary callable) run in Python with
torch autograd, called back from the C++ pipeline, which still does routing, dispatch and combine.
"""

import copy
import logging
import math
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import _C

__all__ = ["MOELayer", "moe_layer", "Error"]

Error = _C.Error

_TORCH_TO_SY = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}
_SY_TO_TORCH = {v: k for k, v in _TORCH_TO_SY.items()}
_STRING_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu")


def _native_activation(fn):
    """The C++ name of an activation the core runs natively, or None (run in Python)."""
    if fn is None:
        return "relu"
    if isinstance(fn, str):
        name = fn.lower()
        if name not in _STRING_ACTIVATIONS:
            raise ValueError(f"moe_layer: unknown activation_fn '{fn}': expected a callable or "
                             f"one of {', '.join(_STRING_ACTIVATIONS)}")
        return name
    if fn is F.relu or fn is torch.relu:
        return "relu"
    if fn is F.gelu:
        return "gelu"
    if fn is F.silu:
        return "silu"
    if type(fn) is nn.ReLU:
        return "relu"
    if type(fn) is nn.SiLU:
        return "silu"
    if type(fn) is nn.GELU:
        approximate = getattr(fn, "approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    return None


def _apply_activation(name, h):
    """The activations by name, in torch (for the Python path and for experts(x) calls)."""
    if name == "relu":
        return F.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "silu":
        return F.silu(h)
    gate, up = h.chunk(2, dim=-1)
    return (F.silu(gate) if name == "swiglu" else F.gelu(gate)) * up


def _world_size(group):
    if group is not None:
        return dist.get_world_size(group)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _TorchDistOps:
    """Expert parallelism over the caller's process group. On CPU ranks its methods are the
    collectives, run by torch.distributed (gloo): the C++ layer's torch.distributed backend
    (binding.cpp) calls them from inside forward and backward, on the caller's thread, with uint8
    tensors that view the switchyard buffers (no copy) and split sizes in bytes; all_reduce gets
    typed tensors. CUDA ranks exchange through an NCCL communicator instead, made once per GPU
    from an ncclUniqueId that the group's first rank broadcasts over the group."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # An NCCL process group moves CUDA tensors only: the small collectives this class runs
        # itself then take tensors on the current GPU, and CPU layers cannot use the group.
        self.tensor_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        self._nccl = {}  # (GPU index, use_2dh) -> _C.Communicator

    def nccl_communicator(self, device_index, use_2dh):
        """The group's NCCL communicator on GPU `device_index` (collective the first time)."""
        key = (device_index, bool(use_2dh))
        if key not in self._nccl:
            if not _C.built_with_nccl:  # the same answer on every rank: no rank waits
                raise NotImplementedError(
                    "moe_layer: expert parallelism on CUDA ranks needs the NCCL backend, which "
                    "this build of the switchyard binding lacks (setup.py builds it where it "
                    "finds nccl.h and libnccl: torch's nvidia-nccl package, SY_NCCL_HOME or the "
                    "CUDA toolkit; docs/python.md)")
            uid = [_C.nccl_unique_id() if self.rank == 0 else None]
            with torch.cuda.device(device_index):  # an NCCL group broadcasts from this GPU
                dist.broadcast_object_list(uid, src=self._global_rank(0), group=self.group)
            self._nccl[key] = _C.nccl_communicator(uid[0], self.rank, self.size, device_index,
                                                   bool(use_2dh))
        return self._nccl[key]

    def _global_rank(self, group_rank):
        if self.group is None:
            return group_rank
        if hasattr(dist, "get_global_rank"):  # torch >= 2.0
            return dist.get_global_rank(self.group, group_rank)
        return dist.distributed_c10d._get_global_rank(self.group, group_rank)

    def all_to_all_v(self, send, send_splits, recv, recv_splits):
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)

    def all_gather_v(self, send, recv, recv_counts):
        # gloo's all_gather wants equal sizes: every peer gets a copy of `send` through the
        # variable all-to-all instead (all_gather_v only moves small arrays and expert weights).
        dist.all_to_all_single(recv, send.repeat(self.size), recv_counts,
                               [send.numel()] * self.size, group=self.group)

    def all_reduce(self, tensor, op):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                        group=self.group)

    def barrier(self):
        dist.barrier(group=self.group)


def _device_name(device):
    """The C++ name of a torch device: "cpu" or "cuda:N"."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    raise NotImplementedError(f"moe_layer: device {device} is not supported (expected cpu or "
                              "cuda)")


def _reject_unknown(what, options):
    if options:
        raise TypeError(f"{what}: unknown argument(s): {', '.join(sorted(options))}")


class LinearTopKGate(nn.Module):
    """Tutel's 'top' gate: logits = x Wgᵀ, Wg [E, d] (`wg.weight`)."""

    def __init__(self, model_dim, num_global_experts, k=1, fp32_gate=False, capacity_factor=1.0,
                 gate_noise=0.0, **options):
        super().__init__()
        _reject_unknown("gate_type 'top'", options)
        self.wg = nn.Linear(model_dim, num_global_experts, bias=False,
                            dtype=torch.float32 if fp32_gate else None)
        self.top_k = min(num_global_experts, int(k))
        self.fp32_gate = bool(fp32_gate)
        self.capacity_factor = float(capacity_factor)
        self.gate_noise = float(gate_noise)
        self.native = "linear"

    def forward(self, x):
        if self.fp32_gate:
            return F.linear(x.float(), self.wg.weight.float())
        return self.wg(x.to(self.wg.weight.dtype))


class CosineTopKGate(nn.Module):
    """Tutel's 'cosine_top' gate: normalised projection against normalised sim_matrix columns,
    scaled by exp(min(temperature, ln 100))."""

    def __init__(self, model_dim, num_global_experts, k=1, fp32_gate=False, proj_dim=256,
                 init_t=0.5, capacity_factor=1.0, gate_noise=0.0, **options):
        super().__init__()
        _reject_unknown("gate_type 'cosine'", options)
        if init_t <= 0:
            raise ValueError(f"gate_type 'cosine': init_t must be > 0, got {init_t}")
        self.top_k = min(num_global_experts, int(k))
        self.fp32_gate = bool(fp32_gate)
        self.proj_dim = int(proj_dim)
        self.init_t = float(init_t)
        self.temperature = nn.Parameter(torch.log(torch.full([1], 1.0 / init_t)))
        self.cosine_projector = nn.Linear(model_dim, proj_dim)
        self.sim_matrix = nn.Parameter(torch.randn(proj_dim, num_global_experts))
        nn.init.normal_(self.sim_matrix, 0, 0.01)
        self.clamp_max = math.log(100.0)
        self.capacity_factor = float(capacity_factor)
        self.gate_noise = float(gate_noise)
        self.native = "cosine"

    def forward(self, x):
        proj_w, proj_b, sim = (self.cosine_projector.weight, self.cosine_projector.bias,
                               self.sim_matrix)
        if self.fp32_gate:
            x, proj_w, proj_b, sim = x.float(), proj_w.float(), proj_b.float(), sim.float()
        u = F.normalize(F.linear(x, proj_w, proj_b), dim=1)
        logits = torch.matmul(u, F.normalize(sim, dim=0))
        return logits * torch.clamp(self.temperature, max=self.clamp_max).exp()


class FusedExpertsNetwork(nn.Module):
    """Tutel's 'ffn' experts: y = act(x fc1_w[e]ᵀ + fc1_bias[e]) fc2_w[e] + fc2_bias[e].

    batched_fc1_w [E, h, d] ([E, 2h, d] for swiglu/geglu), batched_fc2_w [E, h, o] (stored
    transposed, as Tutel), batched_fc1_bias [E, h], batched_fc2_bias [E, o], with o the
    output_dim (default model_dim); each expert initialised like a fresh nn.Linear."""

    def __init__(self, model_dim, num_experts, hidden_size, activation_fn=None,
                 activation_fn_with_self=None, has_fc1_bias=True, has_fc2_bias=True,
                 prefix_doc="experts", sharded_count=1, output_dim=None):
        super().__init__()
        if activation_fn is not None and activation_fn_with_self is not None:
            raise ValueError(f"{prefix_doc}: give activation_fn or activation_fn_with_self, "
                             "not both")
        self.model_dim, self.hidden_size, self.num_experts = model_dim, hidden_size, num_experts
        self.output_dim = int(output_dim) if output_dim else model_dim
        if activation_fn_with_self is not None:
            self.native_activation = None
            self.activation_fn = lambda h: activation_fn_with_self(h, self)
        else:
            self.native_activation = _native_activation(activation_fn)
            self.activation_fn = activation_fn
        gated = self.native_activation in ("swiglu", "geglu")
        h1 = 2 * hidden_size if gated else hidden_size
        self.batched_fc1_w = nn.Parameter(torch.empty(num_experts, h1, model_dim))
        self.batched_fc2_w = nn.Parameter(torch.empty(num_experts, hidden_size, self.output_dim))
        self.batched_fc1_bias = (nn.Parameter(torch.empty(num_experts, h1))
                                 if has_fc1_bias else None)
        # Sharded experts (hidden_size is then this rank's slice): each of the sharded_count
        # ranks holds ceil(o / sharded_count) columns of the expert's fc2 bias, as in Tutel.
        self.sharded_count = sharded_count
        bias_cols = -(-self.output_dim // sharded_count)
        self.batched_fc2_bias = (nn.Parameter(torch.empty(num_experts, bias_cols))
                                 if has_fc2_bias else None)
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's initialisation per expert: kaiming_uniform(a=sqrt(5)) gives
        # U(±1/sqrt(fan_in)) for the weights; the biases use the same bound.
        with torch.no_grad():
            b1 = 1.0 / math.sqrt(self.model_dim)
            b2 = 1.0 / math.sqrt(self.hidden_size)
            self.batched_fc1_w.uniform_(-b1, b1)
            self.batched_fc2_w.uniform_(-b2, b2)
            if self.batched_fc1_bias is not None:
                self.batched_fc1_bias.uniform_(-b1, b1)
            if self.batched_fc2_bias is not None:
                self.batched_fc2_bias.uniform_(-b2, b2)

    def extra_repr(self):
        return "model_dim=%d, hidden_size=%d, output_dim=%d, local_experts=%d, activation=%s" % (
            self.model_dim, self.hidden_size, self.output_dim, self.num_experts,
            self.native_activation or "python callable")

    def forward(self, x, ctx=None):
        """x [E, C, d] -> [E, C, o] in torch (the Python path; the native path is in C++)."""
        h = torch.matmul(x, self.batched_fc1_w.transpose(1, 2))
        if self.batched_fc1_bias is not None:
            h = h + self.batched_fc1_bias.unsqueeze(1)
        if self.native_activation is not None:
            h = _apply_activation(self.native_activation, h)
        else:
            h = self.activation_fn(h)
        y = torch.matmul(h, self.batched_fc2_w)
        if self.batched_fc2_bias is not None:
            y = y + self.batched_fc2_bias.unsqueeze(1)
        return y


class _PyModule:
    """A Python gate or expert network called back from the C++ pipeline. Each call builds a
    torch autograd graph on a detached input; backward differentiates that graph and keeps the
    parameter gradients for _MoEFunction.backward to return."""

    def __init__(self, fn, params):
        self.fn = fn          # (input) -> output, both torch tensors
        self.params = params  # torch parameters the graph may touch
        self.saved = None
        self.grads = None

    def forward(self, inp, *rest):
        # Gates are called with (x, training), experts with (rows, offsets, training).
        training = rest[-1]
        x = inp.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.fn(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"custom module returned {type(out).__name__}, expected a Tensor")
        if training:
            self.saved = (x, out)
        return out.detach()

    def backward(self, dout):
        if self.saved is None:
            raise RuntimeError("switchyard: backward of a Python gate/expert without a forward")
        x, out = self.saved
        self.saved = None
        wanted = [x] + [p for p in self.params if p.requires_grad]
        if out.requires_grad:
            got = torch.autograd.grad(out, wanted, dout.to(out.dtype).view_as(out),
                                      allow_unused=True)
        else:
            got = [None] * len(wanted)
        grads = {}
        for p, g in zip(wanted[1:], got[1:]):
            if g is not None:
                grads[id(p)] = g
        self.grads = grads
        return got[0] if got[0] is not None else torch.zeros_like(x)


def _weak_callbacks(obj):
    """(forward, backward) callables that do not keep `obj` alive (the C++ layer holds them)."""
    ref = weakref.ref(obj)

    def fwd(*args):
        return ref().forward(*args)

    def bwd(*args):
        return ref().backward(*args)

    return fwd, bwd


class _Engine:
    """One C++ layer for one gate index and one configuration, and its Python callbacks."""

    def __init__(self, cfg, py_gate, py_experts, dist_ops=None, use_2dh=False):
        self.cfg = cfg
        self.py_gate, self.py_experts = py_gate, py_experts
        gf, gb = _weak_callbacks(py_gate) if py_gate else (None, None)
        ef, eb = _weak_callbacks(py_experts) if py_experts else (None, None)
        comm = None
        if dist_ops is not None and cfg["device"] != "cpu":  # CUDA ranks: NCCL
            comm = dist_ops.nccl_communicator(int(cfg["device"].split(":")[1]), use_2dh)
            dist_ops = None
        elif dist_ops is not None and dist_ops.tensor_device != "cpu":
            raise ValueError("moe_layer: a layer on the CPU cannot run expert parallel over an "
                             "NCCL process group (it moves CUDA tensors only): move the layer to "
                             "its GPU (layer.cuda()) or give it a gloo group")
        self.layer = _C.Layer(dict(cfg), gf, gb, ef, eb, dist_ops, comm)
        self.names = self.layer.param_names()
        self.shapes = [tuple(s) for s in self.layer.param_shapes()]
        self.dtypes = [_SY_TO_TORCH[d] for d in self.layer.param_dtypes()]
        self.owner = None  # the forward whose state the C++ layer holds for backward
        self.routing_dtype = torch.float64 if cfg["dtype"] == "f64" else torch.float32

    def python_params(self):
        ps = []
        for m in (self.py_gate, self.py_experts):
            if m is not None:
                ps += m.params
        return ps

    def cpp_values(self, params):
        """The C++ layer's view of `params`: same memory when dtype and layout already match."""
        vals = []
        for p, shape, dtype, name in zip(params, self.shapes, self.dtypes, self.names):
            if tuple(p.shape) != shape:
                raise RuntimeError(f"switchyard: parameter {name} has shape {tuple(p.shape)}, "
                                   f"the layer expects {shape}")
            vals.append(p.detach().to(dtype).contiguous())
        return vals

    def forward(self, x, params, cf, k, training, owner, adaptive_r=None, host_stats=True):
        y, aux, z, stats = self.layer.forward(x, self.cpp_values(params), cf, k, training,
                                              adaptive_r, host_stats)
        if training:
            self.owner = owner
        self.last_stats = dict(stats, tokens=int(x.shape[0]))
        return y, aux, z, stats


class _Call:
    """What one forward needs again in backward."""

    def __init__(self, engine, cf, k, training, can_recompute, adaptive_r=None, host_stats=True):
        self.engine, self.cf, self.k, self.training = engine, cf, k, training
        self.adaptive_r, self.host_stats = adaptive_r, host_stats
        self.can_recompute = can_recompute
        self.token = object()


class _MoEFunction(torch.autograd.Function):
    """(x, *cpp_params, *python_params) -> (y, l_aux, l_z) through the C++ forward/backward."""

    @staticmethod
    def forward(ctx, call, num_cpp, x, *params):
        eng = call.engine
        y, aux, z, stats = eng.forward(x, params[:num_cpp], call.cf, call.k, call.training,
                                       call.token, call.adaptive_r, call.host_stats)
        ctx.call, ctx.num_cpp, ctx.stats = call, num_cpp, stats
        ctx.save_for_backward(x, *params)
        rd = eng.routing_dtype
        return y, aux.to(rd), z.to(rd)

    @staticmethod
    def backward(ctx, dy, daux, dz):
        call, num_cpp = ctx.call, ctx.num_cpp
        eng = call.engine
        x, *params = ctx.saved_tensors
        cpp_params, py_params = params[:num_cpp], params[num_cpp:]
        if not call.training:
            raise RuntimeError(
                "switchyard: this forward ran in evaluation mode with gate noise, input jitter, "
                "sinkhorn or expert bias, whose C++ forward keeps nothing for backward; call "
                "train() on the layer to differentiate it")
        if eng.owner is not call.token:
            # The C++ layer holds another forward's state (a later forward, or this graph was
            # already differentiated once): recompute this one. Exact when the forward draws no
            # random numbers and counts nothing.
            if not call.can_recompute:
                raise RuntimeError(
                    "switchyard: a second backward through this MoE forward, or a backward after "
                    "a later forward of the same layer, needs to recompute the forward, which is "
                    "not reproducible with gate_noise, input_jitter or expert_bias; run backward "
                    "before the next forward")
            eng.forward(x, cpp_params, call.cf, call.k, True, call.token, call.adaptive_r,
                        call.host_stats)
        vals = eng.cpp_values(cpp_params)
        # The losses' weights stay on the device (no host sync); None: that loss is unused.
        dx, grads = eng.layer.backward(dy.contiguous(), vals,
                                       None if daux is None else daux.detach(),
                                       None if dz is None else dz.detach())
        eng.owner = None
        out = [dx.to(x.dtype)]
        for p, g in zip(cpp_params, grads):
            out.append(g.to(p.dtype))
        py_grads = {}
        for m in (eng.py_gate, eng.py_experts):
            if m is not None and m.grads:
                py_grads.update(m.grads)
                m.grads = None
        for p in py_params:
            g = py_grads.get(id(p))
            out.append(g.to(p.dtype) if g is not None else None)
        return (None, None, *out)


class MOELayer(nn.Module):
    """A Tutel-compatible MoE layer (tutel.moe.moe_layer's arguments, defaults and state_dict)
    computed by the switchyard C++ core.

    Tutel's arguments: gate_type, model_dim, experts, scan_expert_func, result_func, group, seeds,
    a2a_ffn_overlap_degree, is_postscore, batch_prioritized_routing, normalize_gate,
    is_gshard_loss, parallel_type, use_2dh.

    switchyard's own (keyword-only): rules ('tutel' | 'megatron'), score_fn ('softmax' |
    'sigmoid'), pre_softmax, scaling_factor, expert_bias (aux-loss-free balancing; see
    update_expert_bias), num_groups and topk_groups (group-limited routing), sinkhorn,
    sinkhorn_max_iters, sinkhorn_tol, input_jitter, drop_policy ('probs' | 'position'), layout
    ('auto' | 'padded' | 'packed'), aux_loss ('gshard' | 'load_importance' | 'switch' |
    'switch_seq' | 'none'; default from is_gshard_loss), seq_len, shared_expert_hidden (a shared
    expert on every token). The z-loss is returned as y.l_z beside y.l_aux.
    """

    @staticmethod
    def global_expert_count(num_local_experts, group=None):
        world_size = _world_size(group)
        if not isinstance(num_local_experts, int):
            num_local_experts = -int(1 / (num_local_experts + 1e-5))
        if num_local_experts == 0:
            raise ValueError("moe_layer: num_experts_per_device must not be 0")
        if num_local_experts > 0:
            return num_local_experts * world_size
        if world_size % -num_local_experts != 0:
            raise ValueError(f"moe_layer: {-num_local_experts} devices sharing an expert need a "
                             f"world size that is a multiple of it, got {world_size}")
        return world_size // -num_local_experts

    def __init__(self, gate_type, model_dim: int, experts=None, scan_expert_func=None,
                 result_func=None, group=None, seeds=None, a2a_ffn_overlap_degree=1,
                 is_postscore=True, batch_prioritized_routing=False, normalize_gate=True,
                 is_gshard_loss=True, parallel_type="adaptive:1", use_2dh=False, *,
                 rules="tutel", score_fn="softmax", pre_softmax=False, scaling_factor=1.0,
                 expert_bias=False, num_groups=0, topk_groups=0, sinkhorn=False,
                 sinkhorn_max_iters=100, sinkhorn_tol=1e-4, input_jitter=0.0,
                 drop_policy="probs", layout="auto", aux_loss=None, seq_len=0,
                 shared_expert_hidden=0, host_stats=False, **kwargs):
        super().__init__()
        if "pad_samples" in kwargs:
            logging.warning("moe_layer: `pad_samples` is deprecated in Tutel and has no effect")
            kwargs.pop("pad_samples")
        _reject_unknown("moe_layer", kwargs)
        if experts is None or not isinstance(experts, dict):
            raise TypeError("moe_layer: experts must be a dict, e.g. {'type': 'ffn', "
                            "'num_experts_per_device': 2, 'hidden_size_per_expert': 1024}")
        if not isinstance(model_dim, int) or model_dim < 1:
            raise ValueError(f"moe_layer: model_dim must be a positive int, got {model_dim!r}")

        # Expert parallel over `group` (default: the world, when torch.distributed is
        # initialised), as in Tutel; the collectives run through the group's own backend.
        self.group = group
        self.world_size = _world_size(group)
        self._dist = _TorchDistOps(group) if self.world_size > 1 else None
        self.result_func = result_func
        self.model_dim = model_dim

        experts = dict(experts)
        num_local = experts.pop("count_per_node", None)
        alt = experts.pop("num_experts_per_device", None)
        if num_local is None or num_local == 1:
            num_local = alt if alt is not None else (num_local or 1)
        if num_local == -1:
            num_local = 1
        self.register_buffer("_num_global_experts",
                             torch.tensor(MOELayer.global_expert_count(num_local, group)))
        self.num_local_experts = num_local
        # Fewer experts than ranks (num_experts_per_device < 0): each expert's hidden dimension
        # is sliced over sharded_count ranks, one slice per rank, as in Tutel.
        if self.num_global_experts < self.world_size:
            self.sharded_count = self.world_size // self.num_global_experts
            self.num_local_experts = 1
        else:
            self.sharded_count = 1
        self.valid_rs = [0] + [r for r in range(1, self.sharded_count + 1)
                               if self.sharded_count % r == 0]
        self.adaptive_degree = self._parse_parallel_type(parallel_type)

        self.is_postscore = bool(is_postscore)
        self.batch_prioritized_routing = bool(batch_prioritized_routing)
        self.normalize_gate = bool(normalize_gate)
        self.is_gshard_loss = bool(is_gshard_loss)
        self.a2a_ffn_overlap_degree = int(a2a_ffn_overlap_degree)
        if self.a2a_ffn_overlap_degree < 1:
            raise ValueError("moe_layer: a2a_ffn_overlap_degree must be >= 1, got "
                             f"{a2a_ffn_overlap_degree}")
        # Tutel's hierarchical all-to-all. Its result equals the flat one; over torch.distributed
        # there is only the flat exchange (2DH is the MPI backend's), so the flag is accepted and
        # every exchange is flat.
        self.use_2dh = bool(use_2dh)
        self.options = dict(
            rules=rules, score_fn=score_fn, pre_softmax=bool(pre_softmax),
            scaling_factor=float(scaling_factor), expert_bias=bool(expert_bias),
            num_groups=int(num_groups), topk_groups=int(topk_groups), sinkhorn=bool(sinkhorn),
            sinkhorn_max_iters=int(sinkhorn_max_iters), sinkhorn_tol=float(sinkhorn_tol),
            input_jitter=float(input_jitter), drop_policy=drop_policy, layout=layout,
            aux_loss=aux_loss, seq_len=int(seq_len))

        if seeds is not None and seeds[1] is not None:
            torch.manual_seed(seeds[1])
        self._build_experts(experts)
        if scan_expert_func is not None:
            for n, p in self.experts.named_parameters():
                scan_expert_func(n, p)
        for n, p in self.experts.named_parameters():
            setattr(p, "_tutel_expert", True)

        if shared_expert_hidden:
            act = getattr(self.experts, "native_activation", None)
            if act is None:
                raise NotImplementedError(
                    "moe_layer: shared_expert_hidden runs the shared expert natively and needs "
                    "built-in 'ffn' experts with a native activation (a string, or torch's "
                    "relu/gelu/silu), not custom experts or a Python callable")
            self.shared_experts = FusedExpertsNetwork(
                model_dim, 1, int(shared_expert_hidden), act,
                has_fc1_bias=self.experts.batched_fc1_bias is not None,
                has_fc2_bias=self.experts.batched_fc2_bias is not None,
                prefix_doc="shared_experts", output_dim=self.experts.output_dim)
        else:
            self.shared_experts = None

        if isinstance(gate_type, str):
            import re
            m = re.match(r"^Top([0-9]+)Gate$", gate_type)
            if not m:
                raise ValueError(f"moe_layer: unrecognized gate_type: {gate_type}")
            gate_type = {"type": "top", "k": int(m.group(1))}
        if not isinstance(gate_type, (list, tuple)):
            gate_type = [gate_type]
        if not gate_type:
            raise ValueError("moe_layer: gate_type must name at least one gate")
        gates = []
        for gi, g in enumerate(gate_type):
            if seeds is not None and seeds[0] is not None:
                torch.manual_seed(seeds[0] + gi)
            gates.append(self._build_gate(dict(g)))
        self.gates = nn.ModuleList(gates)
        seed_src = seeds[0] if seeds is not None and seeds[0] is not None else None
        self._seed = (int(seed_src) if seed_src is not None
                      else int(torch.randint(0, 2**62, (1,)).item()))
        if self._dist is not None and seed_src is None:
            # The C++ layers' seeds (gate noise, jitter) must agree across ranks: take the largest.
            seed = torch.tensor([self._seed], dtype=torch.int64, device=self._dist.tensor_device)
            dist.all_reduce(seed, op=dist.ReduceOp.MAX, group=group)
            self._seed = int(seed.item())
        if seeds is not None and len(seeds) > 2 and seeds[2] is not None:
            torch.manual_seed(seeds[2])

        self._engines = {}
        self.l_aux = None
        self.l_z = None
        self._routing_stats = None
        # CUDA: read the routing statistics and losses back, and check the logits for NaN/Inf,
        # in every forward (a host sync); else they stay on the device (the CPU always reads).
        self.host_stats = bool(host_stats)
        # Build the C++ layer of every gate now, so a bad option fails here, not at forward;
        # except over an NCCL group, which cannot run the CPU layer's collectives (the
        # parameters are still on the CPU): there the first CUDA forward builds it.
        if self._dist is None or self._dist.tensor_device == "cpu":
            for gi in range(len(self.gates)):
                self._engine(gi, self._expert_dtype(), self.a2a_ffn_overlap_degree)

    # ---- construction helpers -------------------------------------------------------------

    def _parse_parallel_type(self, parallel_type):
        if not isinstance(parallel_type, str):
            raise ValueError(f"moe_layer: parallel_type must be a string, got {parallel_type!r}")
        if parallel_type.startswith("adaptive:"):
            r = min(max(int(parallel_type[len("adaptive:"):]), 0), self.sharded_count)
            if r not in self.valid_rs:
                raise ValueError(f"moe_layer: parallel_type '{parallel_type}' is not valid with "
                                 f"sharded_count={self.sharded_count}: adaptive:R with R in "
                                 f"{self.valid_rs}")
            return r
        if parallel_type in ("data", "model", "auto"):
            # Tutel: 'model' shards each expert over all the ranks holding it; 'data' and 'auto'
            # compute each expert whole.
            return self.sharded_count if parallel_type == "model" else 1
        raise ValueError(f"moe_layer: unrecognized parallel_type '{parallel_type}': expected "
                         "'adaptive:R', 'data', 'model' or 'auto'")

    def _build_experts(self, experts):
        etype = experts.pop("type", None)
        E = self.num_global_experts
        if etype == "custom":
            module = experts.pop("module", None)
            if module is None:
                raise TypeError("moe_layer: experts of type 'custom' need 'module' (a class)")
            experts["model_dim"] = self.model_dim
            experts["num_experts_per_device"] = self.num_local_experts
            experts["sharded_count"] = self.sharded_count
            self.experts = module(**experts)
            self._custom_experts = True
            return
        if etype != "ffn":
            raise ValueError(f"moe_layer: unrecognized experts type {etype!r}: expected 'ffn' "
                             "or 'custom'")
        if "hidden_size_per_expert" not in experts:
            raise TypeError("moe_layer: experts of type 'ffn' need 'hidden_size_per_expert'")
        hidden = experts.pop("hidden_size_per_expert")
        output_dim = experts.pop("output_dim", None)
        if output_dim is not None and (not isinstance(output_dim, int) or output_dim < 0):
            raise ValueError("moe_layer: output_dim must be an int >= 0 (0 or None: model_dim), "
                             f"got {output_dim!r}")
        activation_fn = experts.pop("activation_fn", None)
        activation_fn_with_self = experts.pop("activation_fn_with_self", None)
        has_fc1_bias = experts.pop("has_fc1_bias", True)
        has_fc2_bias = experts.pop("has_fc2_bias", True)
        _reject_unknown("moe_layer experts 'ffn'", experts)
        hidden = int(hidden)
        if hidden % self.sharded_count != 0:
            raise ValueError(f"moe_layer: hidden_size_per_expert={hidden} must be a multiple of "
                             f"the {self.sharded_count} ranks sharing each expert")
        # This rank's experts only (all E in one process); with sharded experts, its slice of
        # the hidden dimension. _hidden_size is the whole expert's, for the C++ layer.
        self._hidden_size = hidden
        self.experts = FusedExpertsNetwork(self.model_dim, self.num_local_experts,
                                           hidden // self.sharded_count, activation_fn,
                                           activation_fn_with_self, bool(has_fc1_bias),
                                           bool(has_fc2_bias), sharded_count=self.sharded_count,
                                           output_dim=output_dim)
        self._custom_experts = False

    def _build_gate(self, g):
        gtype = g.pop("type", None)
        E = self.num_global_experts
        if gtype == "top":
            gate = LinearTopKGate(self.model_dim, E, **g)
        elif gtype in ("cosine", "cosine_top"):
            gate = CosineTopKGate(self.model_dim, E, **g)
        elif gtype == "custom":
            module = g.pop("module", None)
            if module is None:
                raise TypeError("moe_layer: gate of type 'custom' needs 'module' (a class)")
            cf = g.get("capacity_factor", 1.0)
            noise = g.get("gate_noise", 0.0)
            gate = module(model_dim=self.model_dim, num_global_experts=E, **g)
            if not hasattr(gate, "top_k"):
                raise TypeError("moe_layer: a custom gate module must set `top_k`")
            if not hasattr(gate, "capacity_factor"):
                gate.capacity_factor = float(cf)
            if not hasattr(gate, "gate_noise"):
                gate.gate_noise = float(noise)
        else:
            raise ValueError(f"moe_layer: unrecognized gate type {gtype!r}: expected 'top', "
                             "'cosine' or 'custom'")
        return gate

    # ---- Tutel's helpers --------------------------------------------------------------------

    @property
    def num_global_experts(self):
        return int(self._num_global_experts)

    def extra_repr(self):
        return "Top-K(s) = %s, Total-Experts = %d [managed by %d device(s)]," % (
            [f"k={g.top_k}, noise={g.gate_noise}" for g in self.gates],
            self.num_global_experts, self.world_size)

    def get_parameter_iterator(self, param_type):
        if param_type == "gate":
            return self.gates.named_parameters()
        if param_type == "local_experts":
            return self.experts.named_parameters()
        raise ValueError(f"unrecognized param_type '{param_type}': expected 'gate' or "
                         "'local_experts'")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "_num_global_experts"
        if key not in state_dict:
            logging.warning("moe_layer: a legacy checkpoint without _num_global_experts")
            state_dict[key] = self._num_global_experts
        elif int(state_dict[key]) != self.num_global_experts:
            raise RuntimeError("moe_layer: the checkpoint holds %d global experts, this layer %d"
                               % (int(state_dict[key]), self.num_global_experts))
        for name, param in self.experts.named_parameters():
            k = prefix + "experts." + name
            if k in state_dict and state_dict[k].numel() == param.numel():
                state_dict[k] = state_dict[k].view(param.shape)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_engines"] = {}  # C++ layers are rebuilt on demand
        return state

    # ---- the C++ layers ---------------------------------------------------------------------

    def _expert_dtype(self):
        for p in self.experts.parameters():
            return p.dtype
        return torch.get_default_dtype()

    def _device(self):
        """Where the C++ layer runs: where the parameters are (CPU for a layer without any)."""
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _config(self, gi, dtype, overlap, device):
        gate = self.gates[gi]
        o = self.options
        device = _device_name(device)
        if device != "cpu" and not _C.built_with_cuda:
            raise NotImplementedError(
                f"moe_layer: the layer is on {device}, but this build of the switchyard binding "
                "has no CUDA backend: build it where torch sees a GPU, or with SY_PY_CUDA=1 "
                "(docs/python.md)")
        native_gate = getattr(gate, "native", None) if isinstance(
            gate, (LinearTopKGate, CosineTopKGate)) else None
        native_act = None if self._custom_experts else self.experts.native_activation
        python_experts = native_act is None
        if python_experts and self.sharded_count > 1:
            raise NotImplementedError(
                "moe_layer: sharded experts (fewer experts than ranks) run the built-in 'ffn' "
                "experts with a native activation only, not custom experts or a Python callable")
        if dtype not in _TORCH_TO_SY:
            raise TypeError(f"moe_layer: experts in {dtype} are not supported (expected float64, "
                            "float32, float16 or bfloat16)")
        aux = o["aux_loss"] or ("gshard" if self.is_gshard_loss else "load_importance")
        cfg = dict(
            model_dim=self.model_dim,
            output_dim=0 if self._custom_experts else self.experts.output_dim,
            hidden_size=1 if python_experts else self._hidden_size,
            num_experts=self.num_global_experts, top_k=int(gate.top_k),
            dtype=_TORCH_TO_SY[dtype], device=device, seed=self._seed + gi, rules=o["rules"],
            init_parameters=False,  # the parameters are torch's, pointed at before each call
            # Tutel's use_tensorcore is torch's TF32 switch (allow_tf32, the same as float32
            # matmul precision "high"): f32 expert GEMMs on CUDA follow it.
            use_tensorcore=device != "cpu" and torch.get_float32_matmul_precision() != "highest",
            gate=native_gate or "linear", fp32_gate=bool(getattr(gate, "fp32_gate", False)),
            gate_noise=float(gate.gate_noise), input_jitter=o["input_jitter"],
            score_fn=o["score_fn"], pre_softmax=o["pre_softmax"],
            normalize_gate=self.normalize_gate, scaling_factor=o["scaling_factor"],
            expert_bias=o["expert_bias"], num_groups=o["num_groups"],
            topk_groups=o["topk_groups"], sinkhorn=o["sinkhorn"],
            sinkhorn_max_iters=o["sinkhorn_max_iters"], sinkhorn_tol=o["sinkhorn_tol"],
            capacity_factor=float(gate.capacity_factor),
            batch_prioritized_routing=self.batch_prioritized_routing,
            drop_policy=o["drop_policy"],
            layout="padded" if python_experts else o["layout"],
            overlap_degree=int(overlap), is_postscore=self.is_postscore, aux_loss=aux,
            seq_len=o["seq_len"], activation=native_act or "relu",
            has_fc1_bias=(not python_experts) and self.experts.batched_fc1_bias is not None,
            has_fc2_bias=(not python_experts) and self.experts.batched_fc2_bias is not None,
            shared_expert_hidden=(self.shared_experts.hidden_size
                                  if self.shared_experts is not None else 0))
        if native_gate == "cosine":
            cfg["cosine_proj_dim"] = gate.proj_dim
            cfg["cosine_init_t"] = gate.init_t
        return cfg, native_gate is None, python_experts

    def _engine(self, gi, dtype, overlap, device=None):
        device = self._device() if device is None else device
        cfg, python_gate, python_experts = self._config(gi, dtype, overlap, device)
        key = (gi, tuple(sorted(cfg.items())))
        eng = self._engines.get(key)
        if eng is None:
            gate = self.gates[gi]
            py_gate = _PyModule(gate, list(gate.parameters())) if python_gate else None
            py_experts = None
            if python_experts:
                me = weakref.ref(self)
                E = self.num_local_experts  # this rank's experts' rows (all E in one process)

                def run_experts(rows, me=me, E=E):
                    layer = me()
                    shape = getattr(layer, "_reserve_shape", (layer.model_dim,))
                    x = rows.view(E, rows.size(0) // E, *shape)
                    y = layer.experts(x, layer)
                    return y.reshape(rows.size(0), -1)

                py_experts = _PyModule(run_experts, list(self.experts.parameters()))
            eng = _Engine(cfg, py_gate, py_experts, self._dist, self.use_2dh)
            self._engines[key] = eng
        return eng

    def _cpp_params(self, gi, eng):
        named = dict(self.named_parameters())
        out = []
        for name in eng.names:
            key = f"gates.{gi}." + name[len("gates.0."):] if name.startswith("gates.0.") else name
            if key not in named:
                raise RuntimeError(f"switchyard: the layer has no parameter {key} (C++ {name})")
            out.append(named[key])
        return out

    def update_expert_bias(self, rate=1e-3, gate_index=0):
        """Aux-loss-free balancing (expert_bias=True): bias[e] += rate * sign(mean count - count[e])
        over the tokens counted by training forwards since the last update."""
        eng = self._engine(gate_index, self._expert_dtype(), self.a2a_ffn_overlap_degree)
        eng.layer.update_expert_bias(rate)

    def expert_bias(self, gate_index=0):
        """The selection bias [E] (f32) of the aux-loss-free balancing."""
        eng = self._engine(gate_index, self._expert_dtype(), self.a2a_ffn_overlap_degree)
        return eng.layer.expert_bias()

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, input, gate_index=0, capacity_factor=None, top_k=None,
                a2a_ffn_overlap_degree=None, reserve_dims=1, inequivalent_tokens=False,
                adaptive_r=None):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"moe_layer: input must be a torch.Tensor, got {type(input).__name__}")
        device = self._device()
        if input.device != device:
            raise ValueError(f"moe_layer: input on {input.device}, the layer's parameters on "
                             f"{device}: move one of them (module.to(device) moves the layer)")
        if input.dim() < 2:
            raise ValueError("moe_layer: input must be at least 2-d: (samples, ..., model_dim)")
        if not 0 <= gate_index < len(self.gates):
            raise ValueError(f"moe_layer: gate_index {gate_index} out of range for "
                             f"{len(self.gates)} gate(s)")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"moe_layer: top_k must be >= 1, got {top_k}")
        if adaptive_r is not None:
            if adaptive_r not in self.valid_rs:
                raise ValueError(f"moe_layer: adaptive_r={adaptive_r} is not valid with "
                                 f"sharded_count={self.sharded_count}: expected one of "
                                 f"{self.valid_rs}")
            self.adaptive_degree = adaptive_r
        if a2a_ffn_overlap_degree is not None:
            if int(a2a_ffn_overlap_degree) < 1:
                raise ValueError("moe_layer: a2a_ffn_overlap_degree must be >= 1, got "
                                 f"{a2a_ffn_overlap_degree}")
            self.a2a_ffn_overlap_degree = int(a2a_ffn_overlap_degree)
        # inequivalent_tokens: T_max over ranks is this rank's T in one process.

        original_shape, original_dtype = input.shape, input.dtype
        reserve_dims = int(reserve_dims)
        if not 1 <= reserve_dims < input.dim():
            raise ValueError(f"moe_layer: reserve_dims={reserve_dims} must be in [1, "
                             f"{input.dim() - 1}] for a {input.dim()}-d input")
        reserve_shape = tuple(original_shape[-reserve_dims:])
        width = math.prod(reserve_shape)
        if width != self.model_dim:
            raise ValueError(f"moe_layer: input {tuple(original_shape)} has {width} features in "
                             f"its last {reserve_dims} dim(s), the layer was built for "
                             f"model_dim={self.model_dim}")
        dtype = self._expert_dtype()
        x = input.reshape(-1, width).to(dtype)
        self._reserve_shape = reserve_shape

        eng = self._engine(gate_index, dtype, self.a2a_ffn_overlap_degree, device)
        cpp_params = self._cpp_params(gate_index, eng)
        py_params = eng.python_params()
        cf = None if capacity_factor is None else float(capacity_factor)
        k = None if top_k is None else int(top_k)
        cfg = eng.cfg
        stochastic = cfg["gate_noise"] > 0 or cfg["input_jitter"] > 0 or cfg["expert_bias"]
        training_only = stochastic or cfg["sinkhorn"]

        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in cpp_params + py_params))
        if needs_grad:
            # An evaluation forward keeps no state for backward in the C++ layer; without
            # training-only behaviour a training forward computes the same numbers.
            training = self.training or not training_only
            call = _Call(eng, cf, k, training, can_recompute=not stochastic,
                         host_stats=self.host_stats)
            y, l_aux, l_z = _MoEFunction.apply(call, len(cpp_params), x, *cpp_params,
                                               *py_params)
        else:
            with torch.no_grad():
                y, aux, z, _ = eng.forward(x, cpp_params, cf, k, self.training, object(),
                                           host_stats=self.host_stats)
            l_aux, l_z = aux.to(eng.routing_dtype), z.to(eng.routing_dtype)

        out_dim = cfg["output_dim"] or self.model_dim
        y = y.view(list(original_shape[:-reserve_dims]) +
                   (list(reserve_shape) if out_dim == self.model_dim else [out_dim]))
        y = y.to(original_dtype)
        self.l_aux = y.l_aux = l_aux
        self.l_z = y.l_z = l_z
        self._routing_stats = eng.last_stats  # read to the host when asked for
        return self.result_func(y) if self.result_func is not None else y

    @property
    def routing_stats(self):
        """The last call's routing: tokens_per_expert (kept rows per expert), dropped_choices,
        capacity, num_rows, top_k, layout. The counts are read from the layer's device on first
        access (a sync on CUDA); capacity is None where the call did not need it on the host (a
        dropless packed call on CUDA without host_stats)."""
        s = self._routing_stats
        if s is not None and isinstance(s["tokens_per_expert"], torch.Tensor):
            counts = [int(c) for c in s["tokens_per_expert"].tolist()]
            kept = sum(counts)
            s = dict(s, tokens_per_expert=counts)
            if s["dropped_choices"] < 0:
                s["dropped_choices"] = s["tokens"] * s["top_k"] - kept
            if s["num_rows"] < 0:
                s["num_rows"] = kept  # packed: the kept rows
            if s["capacity"] < 0:
                s["capacity"] = None
            del s["tokens"]
            self._routing_stats = s
        return s


moe_layer = MOELayer
