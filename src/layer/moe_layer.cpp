// MoELayer: composes the stages. Forward: gate -> router -> encode -> experts -> decode
// (+ shared expert); backward runs them in reverse and hands the combine-weight gradients back
// to the router.
#include "switchyard/moe_layer.h"

#include <cmath>
#include <utility>

#include "core/backend.h"
#include "core/dtype_dispatch.h"
#include "core/math_mode.h"
#include "core/ops.h"
#include "dispatch/dispatch.h"
#include "experts/ffn.h"
#include "layer/expert_parallel.h"
#include "layer/sharded_ffn.h"
#include "layer/validate.h"
#include "routing/gate.h"
#include "routing/router.h"
#include "switchyard/error.h"
#include "switchyard/rng.h"

namespace switchyard {
namespace {

constexpr std::uint64_t kExpertInitId = 2000;
constexpr std::uint64_t kSharedInitId = 3000;

FfnShape ffn_shape(const MoEConfig& cfg, index_t num_experts, index_t hidden,
                   index_t first_expert = 0) {
  FfnShape s{num_experts,      cfg.model_dim, hidden,     cfg.activation, cfg.has_fc1_bias,
             cfg.has_fc2_bias, cfg.dtype,     cfg.device, first_expert,   cfg.output_dim};
  s.initialise = cfg.init_parameters;
  return s;
}

// The capacity a packed dropless plan reports: the largest count, aligned as the CPU router does
// (the call's alignment, RouteArgs::alignment).
index_t packed_dropless_capacity(const MoEConfig& cfg, int alignment, index_t most) {
  SlotRules rules;
  rules.rules = cfg.rules;
  rules.capacity_factor = 0;
  rules.alignment = alignment;
  return compute_capacity(rules, 1, cfg.num_experts, 1, most);
}

// The offsets the experts get: on the host where the host knows them without a sync (a plan
// routed on the host; the padded layout's e * C), else the plan's own on its device.
Tensor expert_offsets(const RoutingPlan& plan, const RoutingPlan* host_plan) {
  if (plan.offsets.device().is_cpu()) return plan.offsets;
  if (host_plan) return host_plan->offsets;
  if (plan.layout != Layout::kPadded) return plan.offsets;
  std::vector<double> off(static_cast<std::size_t>(plan.num_experts + 1));
  for (std::size_t e = 0; e < off.size(); ++e)
    off[e] = static_cast<double>(static_cast<index_t>(e) * plan.capacity);
  return Tensor::from_vector(off, {plan.num_experts + 1}, DType::kI64);
}

}  // namespace

struct MoELayer::Impl {
  MoEConfig cfg;
  std::shared_ptr<Gate> gate;
  std::shared_ptr<ExpertNetwork> experts;
  FfnExperts* ffn = nullptr;  // `experts` when it is the built-in FFN (it takes dout over)
  std::unique_ptr<FfnExperts> shared;
  Tensor expert_bias;            // [E] f32 on the layer's device
  Tensor bias_counts;            // [E] f64: tokens kept per expert since the last bias update
  Tensor nonfinite;              // CUDA: [1] i32, set by the router when the logits hold NaN/Inf
  Tensor all_rows;               // [2] i64 {0, T}: the shared expert's offsets ...
  index_t all_rows_tokens = -1;  // ... for this T
  std::uint64_t step = 0;        // training forwards so far: the random streams' counter
  std::shared_ptr<Communicator> comm;
  ExpertShard shard;                   // this rank's experts (all of them in one process)
  std::unique_ptr<ExpertParallel> ep;  // with a communicator: the token exchange

  // The last forward, for backward.
  bool saved = false;
  Shape x_shape, y_shape;
  DType x_dtype = DType::kF32;
  Tensor x;       // [T, d] in the layer's dtype
  Tensor jitter;  // [T, d] or undefined
  bool routed_on_host = false;
  RoutingPlan host_plan;  // the plan where the router ran on the host for a CUDA layer
  RoutingPlan plan;       // on the layer's device
  RouterState router;
  Tensor expert_out;  // [R, o]: the experts' output width

  const Tensor& shared_rows(index_t T) {
    if (all_rows_tokens != T) {
      all_rows =
          Tensor::from_vector({0.0, static_cast<double>(T)}, {2}, DType::kI64).to(cfg.device);
      all_rows_tokens = T;
    }
    return all_rows;
  }
};

MoELayer::MoELayer(const MoEConfig& cfg) : MoELayer(cfg, nullptr, nullptr, nullptr) {}

MoELayer::MoELayer(const MoEConfig& cfg, std::shared_ptr<Communicator> comm)
    : MoELayer(cfg, nullptr, nullptr, std::move(comm)) {}

MoELayer::MoELayer(const MoEConfig& cfg, std::shared_ptr<Gate> gate,
                   std::shared_ptr<ExpertNetwork> experts)
    : MoELayer(cfg, std::move(gate), std::move(experts), nullptr) {}

MoELayer::MoELayer(const MoEConfig& cfg, std::shared_ptr<Gate> gate,
                   std::shared_ptr<ExpertNetwork> experts, std::shared_ptr<Communicator> comm)
    : impl_(std::make_unique<Impl>()) {
  // Collective first, so that a configuration differing across ranks fails on every rank.
  if (comm) check_config_on_all_ranks(cfg, *comm);
  validate_config(cfg);
  require_backend("MoELayer", cfg.device);
  Impl& m = *impl_;
  m.cfg = cfg;
  if (gate) {
    m.gate = std::move(gate);
  } else if (cfg.gate == GateType::kCosine) {
    m.gate = std::make_shared<CosineGate>(cfg);
  } else {
    m.gate = std::make_shared<LinearGate>(cfg);
  }
  m.shard = ExpertShard{cfg.num_experts, cfg.num_experts, 0};
  if (comm) {
    SY_CHECK(comm->device() == cfg.device, "the communicator works on ", to_string(comm->device()),
             " (MPI: cpu, NCCL: its GPU), the layer on ", to_string(cfg.device));
    m.shard = expert_shard(cfg.num_experts, cfg.hidden_size, comm->rank(), comm->size());
  }
  FfnExperts* ffn = nullptr;  // the built-in FFN that computes this rank's stored experts
  if (experts) {
    m.experts = std::move(experts);
    ffn = dynamic_cast<FfnExperts*>(m.experts.get());
  } else if (m.shard.num_slices > 1) {
    auto sharded =
        std::make_shared<ShardedFfnExperts>(ffn_shape(cfg, cfg.num_experts, cfg.hidden_size),
                                            m.shard, "experts.", cfg.seed, kExpertInitId);
    ffn = &sharded->slice();
    m.experts = std::move(sharded);
  } else {
    m.experts =
        std::make_shared<FfnExperts>(ffn_shape(cfg, m.shard.count, cfg.hidden_size, m.shard.first),
                                     "experts.", false, cfg.seed, kExpertInitId);
    ffn = dynamic_cast<FfnExperts*>(m.experts.get());
  }
  m.ffn = m.shard.num_slices > 1 ? nullptr : ffn;  // a sharded slice runs only inside m.ep
  if (comm) {
    SY_CHECK(m.shard.num_slices == 1 || !experts, "sharded experts (num_experts=", cfg.num_experts,
             " below the ", comm->size(),
             " ranks) need the built-in FFN experts, not a custom expert network");
    m.ep = std::make_unique<ExpertParallel>(cfg, comm, m.shard, *m.experts, ffn);
    m.comm = std::move(comm);
  }
  if (cfg.shared_expert_hidden > 0)
    m.shared = std::make_unique<FfnExperts>(ffn_shape(cfg, 1, cfg.shared_expert_hidden),
                                            "shared_experts.", true, cfg.seed, kSharedInitId);
  m.expert_bias = Tensor::zeros({cfg.num_experts}, DType::kF32, cfg.device);
  m.bias_counts = Tensor::zeros({cfg.num_experts}, DType::kF64, cfg.device);
  if (cfg.device.is_cuda()) m.nonfinite = Tensor::zeros({1}, DType::kI32, cfg.device);
}

MoELayer::~MoELayer() = default;
MoELayer::MoELayer(MoELayer&&) noexcept = default;
MoELayer& MoELayer::operator=(MoELayer&&) noexcept = default;

const MoEConfig& MoELayer::config() const { return impl_->cfg; }
const std::shared_ptr<Communicator>& MoELayer::communicator() const { return impl_->comm; }
index_t MoELayer::num_local_experts() const { return impl_->shard.count; }
index_t MoELayer::first_local_expert() const { return impl_->shard.first; }

ForwardResult MoELayer::forward(const Tensor& x_in, const ForwardOptions& opt) {
  Impl& m = *impl_;
  const MoEConfig& cfg = m.cfg;
  if (opt.training) m.saved = false;  // a failed training forward leaves nothing to differentiate
  SY_CHECK(x_in.defined(), "forward: x is undefined");
  SY_CHECK(x_in.device() == cfg.device, "forward: x is on ", to_string(x_in.device()),
           ", the layer on ", to_string(cfg.device));
  SY_CHECK(is_floating(x_in.dtype()), "forward: x must be floating (f64, f32, f16, bf16), got ",
           dtype_name(x_in.dtype()));
  SY_CHECK(x_in.dim() >= 1 && x_in.size(-1) == cfg.model_dim, "forward: x ",
           shape_str(x_in.sizes()), " has ", x_in.dim() >= 1 ? x_in.size(-1) : 0,
           " columns, the layer was built for model_dim=", cfg.model_dim);
  const Tf32Scope tf32(cfg.use_tensorcore);  // the gate opts out below
  const int k = resolve_top_k(cfg, opt);
  const double cf = resolve_capacity_factor(cfg, opt);
  const Layout layout = resolve_layout(cfg, opt, cf);
  const int overlap_degree = resolve_overlap_degree(cfg, opt);
  const index_t d = cfg.model_dim, T = x_in.numel() / d, E = cfg.num_experts, o = cfg.out_dim();
  // Expert parallel: every rank agrees on the call's options (collective); T_max over ranks.
  ParallelCall call;
  if (m.ep) call = m.ep->begin(opt, T, k, cf, layout, overlap_degree);
  SY_CHECK(m.ep || !opt.adaptive_r || *opt.adaptive_r == 0 || *opt.adaptive_r == 1,
           "forward: adaptive_r=", opt.adaptive_r.value_or(1),
           " needs a layer built with a communicator (0 and 1 are the same in "
           "one process)");
  const DType rd = routing_dtype(cfg.dtype);

  const Device dev = cfg.device;
  Tensor x = x_in.reshape({T, d}).to(cfg.dtype).contiguous();
  // On CUDA a check of x would cost a host sync; the router flags NaN/Inf logits instead.
  if (dev.is_cpu()) check_finite(x, "forward: x");
  Tensor jitter, xg = x;
  if (opt.training && cfg.input_jitter > 0) {
    // Megatron's input jitter: the gate sees x * U(1 - eps, 1 + eps), per element, drawn by
    // global token index.
    jitter = uniform_factors(T, d, cfg.input_jitter, cfg.seed,
                             static_cast<std::uint32_t>(RngStream::kInputJitter), m.step,
                             call.token_base, cfg.dtype, dev);
    xg = Tensor::zeros({T, d}, cfg.dtype, dev);
    add_inplace(xg, x, &jitter);  // xg = x * jitter
  }
  Tensor logits = [&] {
    const Tf32Scope exact(false);  // routing decisions in FP32 whatever use_tensorcore says
    return m.gate->forward(xg, opt.training);
  }();
  SY_CHECK(logits.dim() == 2 && logits.size(0) == T && logits.size(1) == E,
           "gate: logits must be [", T, ", ", E, "], got ", shape_str(logits.sizes()));

  RouteArgs args;
  args.top_k = k;
  args.capacity_factor = cf;
  args.layout = layout;
  args.training = opt.training;
  args.step = m.step;
  args.expert_bias = cfg.expert_bias ? &m.expert_bias : nullptr;
  // Tutel's alignment: sharded_count * overlap_degree, so that the padded capacity splits evenly
  // over the ranks sharing an expert and over the overlap chunks.
  args.alignment = overlap_degree * static_cast<int>(m.shard.num_slices);
  if (m.ep) {
    args.max_tokens = call.max_tokens;
    args.token_base = call.token_base;
    m.ep->set_route_hooks(args);
  }
  ForwardResult result;
  RouterState router;
  RoutingPlan host_plan, plan;  // plan: on the layer's device
  LossTensors losses;
#ifdef SY_WITH_CUDA
  const bool on_host = dev.is_cpu() || !route_cuda_supports(cfg, args, T);
#else
  const bool on_host = true;
#endif
  if (on_host) {
    // The CPU router; for a CUDA layer with an option the CUDA router lacks (see
    // route_cuda_supports) the logits come to the host (a sync) and the plan goes back.
    const Tensor host_bias = cfg.expert_bias ? m.expert_bias.to(Device::cpu()) : Tensor();
    if (cfg.expert_bias) args.expert_bias = &host_bias;
    host_plan = route_cpu(cfg, args, logits.to(rd).to(Device::cpu()), router, result.losses);
    plan = dev.is_cpu() ? host_plan : plan_to_device(host_plan, dev);
    losses.aux = Tensor::from_vector({result.losses.aux}, {}, DType::kF64).to(dev);
    losses.z = Tensor::from_vector({result.losses.z}, {}, DType::kF64).to(dev);
  } else {
#ifdef SY_WITH_CUDA
    plan = route_cuda(cfg, args, logits.to(rd), router, losses, m.nonfinite);
#endif
  }

  const Tensor buffer = encode(plan, x, !cfg.is_postscore);
  Tensor expert_out =
      m.ep ? m.ep->forward(call, plan, buffer, opt.training)
           : m.experts->forward(buffer, expert_offsets(plan, on_host ? &host_plan : nullptr),
                                opt.training);
  SY_CHECK(expert_out.dim() == 2 && expert_out.size(0) == plan.num_rows && expert_out.size(1) == o,
           "experts: output must be [", plan.num_rows, ", ", o, "], got ",
           shape_str(expert_out.sizes()));
  expert_out = expert_out.to(cfg.dtype);
  Tensor y = decode(plan, expert_out, cfg.is_postscore);
  if (m.shared) add_inplace(y, m.shared->forward(x, m.shared_rows(T), opt.training));

  result.aux_loss = losses.aux;
  result.z_loss = losses.z;
  result.tokens_per_expert = plan.expert_count;
  RoutingStats& s = result.stats;
  s.capacity = plan.capacity;
  s.num_rows = plan.num_rows;
  s.top_k = k;
  s.layout = layout;
  s.dropped_choices = plan.dropped;
  if (on_host || opt.host_stats) {
    const std::vector<double> counts = plan.expert_count.to_vector();  // a sync on CUDA
    s.tokens_per_expert.assign(counts.begin(), counts.end());
    if (!on_host) {
      if (m.nonfinite.to_vector()[0] != 0) {
        m.nonfinite.fill(0);  // reported once; the layer stays usable
        SY_CHECK(false,
                 "router: the logits hold NaN or Inf (in this or an earlier forward without "
                 "host_stats): check the input and the gate weights");
      }
      result.losses.aux = losses.aux.to_vector()[0];
      result.losses.z = losses.z.to_vector()[0];
      index_t kept = 0, most = 0;
      for (index_t c : s.tokens_per_expert) {
        kept += c;
        most = std::max(most, c);
      }
      s.dropped_choices = T * k - kept;
      if (s.capacity < 0) s.capacity = packed_dropless_capacity(cfg, args.alignment, most);
    }
  }
  if (opt.training) {
    if (cfg.expert_bias) add_inplace(m.bias_counts, plan.expert_count.to(DType::kF64));
    ++m.step;
  }
  Shape y_shape = x_in.sizes();
  y_shape.back() = o;
  result.y = y.view(y_shape);
  if (!opt.training) return result;

  m.x_shape = x_in.sizes();
  m.y_shape = y_shape;
  m.x_dtype = x_in.dtype();
  m.x = x;
  m.jitter = jitter;
  m.routed_on_host = on_host;
  m.host_plan = std::move(host_plan);
  m.plan = std::move(plan);
  m.router = std::move(router);
  m.expert_out = expert_out;
  m.saved = true;
  return result;
}

Tensor MoELayer::backward(const Tensor& dy_in, const LossWeights& weights) {
  Impl& m = *impl_;
  const MoEConfig& cfg = m.cfg;
  SY_CHECK(m.saved,
           "backward: no forward to differentiate (call forward first; each forward "
           "allows one backward)");
  SY_CHECK(dy_in.defined() && dy_in.sizes() == m.y_shape, "backward: dy must have the shape of y ",
           shape_str(m.y_shape), ", got ",
           dy_in.defined() ? shape_str(dy_in.sizes()) : "undefined");
  SY_CHECK(dy_in.device() == cfg.device, "backward: dy is on ", to_string(dy_in.device()),
           ", the layer on ", to_string(cfg.device));
  SY_CHECK(is_floating(dy_in.dtype()), "backward: dy must be floating, got ",
           dtype_name(dy_in.dtype()));
  // Weights held in tensors: read where this backward routes on the host anyway (the CPU, or a
  // plan routed on the host), else handed to the CUDA router as they are (no host sync).
  LossWeights lw = weights;
  for (Tensor* t : {&lw.aux_tensor, &lw.z_tensor}) {
    if (!t->defined()) continue;
    SY_CHECK(t->numel() == 1 && is_floating(t->dtype()) && t->device() == cfg.device,
             "backward: a loss weight tensor must hold one floating value on ",
             to_string(cfg.device), ", got ", shape_str(t->sizes()), " ", dtype_name(t->dtype()),
             " on ", to_string(t->device()));
    if (m.routed_on_host || cfg.device.is_cpu()) {
      (t == &lw.aux_tensor ? lw.aux : lw.z) = t->to_vector()[0];
      *t = Tensor();
    }
  }
  SY_CHECK(std::isfinite(lw.aux) && std::isfinite(lw.z),
           "backward: loss weights must be finite, got aux=", lw.aux, ", z=", lw.z);
  const Tf32Scope tf32(cfg.use_tensorcore);  // the gate opts out below
  const index_t T = m.x.size(0);
  const Tensor dy = dy_in.reshape({T, cfg.out_dim()}).to(cfg.dtype).contiguous();
  m.saved = false;

  const Device dev = cfg.device;
  // Gradients left unset by zero_grad(true) start at zero, except the built-in FFNs' own, which
  // their backward creates (written, not accumulated, where it can).
  std::vector<Parameter*> start_at_zero = m.gate->parameters();
  if (m.ep || !m.ffn)
    for (Parameter* p : m.experts->parameters()) start_at_zero.push_back(p);
  for (Parameter* p : start_at_zero) grad_to_accumulate(*p);
  Tensor dweight = Tensor::zeros({T, m.plan.top_k}, routing_dtype(cfg.dtype), dev);
  Tensor dout = decode_backward(m.plan, dy, m.expert_out, cfg.is_postscore, dweight);
  m.expert_out = Tensor();  // each buffer is freed once its last reader is queued
  // The built-in FFN is handed dout, so that it frees it after fc2's backward (before its dx).
  const Tensor dbuffer = (m.ep    ? m.ep->backward(dout)
                          : m.ffn ? m.ffn->backward_owned(std::exchange(dout, Tensor()))
                                  : m.experts->backward(dout))
                             .to(cfg.dtype);
  dout = Tensor();
  Tensor dx = encode_backward(m.plan, dbuffer, m.x, !cfg.is_postscore, dweight);
  Tensor dlogits;
  if (m.routed_on_host) {
    dlogits = route_backward_cpu(cfg, dev.is_cpu() ? m.plan : m.host_plan, m.router,
                                 dweight.to(Device::cpu()), lw)
                  .to(dev);
  } else {
#ifdef SY_WITH_CUDA
    dlogits = route_backward_cuda(cfg, m.plan, m.router, dweight, lw);
#endif
  }
  {
    const Tf32Scope exact(false);
    if (m.jitter.defined()) {  // the gate saw x * jitter
      add_inplace(dx, m.gate->backward(dlogits).to(cfg.dtype), &m.jitter);
    } else {
      m.gate->backward_add(dlogits, dx);
    }
  }
  if (m.shared) add_inplace(dx, m.shared->backward(dy));
  // Free what the forward saved (one backward per forward).
  m.x = m.jitter = m.expert_out = Tensor();
  m.plan = m.host_plan = RoutingPlan{};
  m.router = RouterState{};
  return dx.view(m.x_shape).to(m.x_dtype);
}

std::vector<Parameter*> MoELayer::parameters() {
  std::vector<Parameter*> all = impl_->gate->parameters();
  for (Parameter* p : impl_->experts->parameters()) all.push_back(p);
  if (impl_->shared)
    for (Parameter* p : impl_->shared->parameters()) all.push_back(p);
  return all;
}

Parameter& MoELayer::parameter(const std::string& name) {
  std::string names;
  for (Parameter* p : parameters()) {
    if (p->name == name) return *p;
    names += (names.empty() ? "" : ", ") + p->name;
  }
  SY_CHECK(false, "no parameter named '", name, "'; the layer has: ", names);
  throw Error("unreachable");
}

void MoELayer::zero_grad(bool set_to_none) {
  for (Parameter* p : parameters()) {
    if (set_to_none)
      p->grad = Tensor();
    else if (p->grad.defined())
      p->grad.fill(0.0);
    else
      grad_to_accumulate(*p);
  }
}

void MoELayer::update_expert_bias(double rate) {
  Impl& m = *impl_;
  SY_CHECK(m.cfg.expert_bias, "update_expert_bias: the layer was built without expert_bias");
  SY_CHECK(std::isfinite(rate) && rate >= 0, "update_expert_bias: rate must be >= 0, got ", rate);
  const index_t E = m.cfg.num_experts;
  // On CUDA the counts come to the host (a sync): this runs once per optimizer step at most.
  std::vector<double> counts = m.bias_counts.to_vector();
  if (m.ep) m.ep->sum_over_ranks(counts);  // the counts of every rank's tokens
  double mean = 0;
  for (double c : counts) mean += c;
  mean /= static_cast<double>(E);
  Tensor bias = m.expert_bias.to(Device::cpu()).clone();
  float* b = bias.data<float>();
  for (index_t e = 0; e < E; ++e) {
    const double diff = mean - counts[e];
    b[e] += static_cast<float>(rate * ((diff > 0) - (diff < 0)));
  }
  m.expert_bias.copy_from(bias);
  m.bias_counts.fill(0.0);
}

Tensor MoELayer::expert_bias() const { return impl_->expert_bias.clone(); }

}  // namespace switchyard
