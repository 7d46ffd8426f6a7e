// MoELayer: composes the stages. Forward: gate -> router -> encode -> experts -> decode
// (+ shared expert); backward runs them in reverse and hands the combine-weight gradients back
// to the router.
#include "switchyard/moe_layer.h"

#include <cmath>

#include "core/backend.h"
#include "core/dtype_dispatch.h"
#include "core/ops.h"
#include "dispatch/dispatch.h"
#include "experts/ffn.h"
#include "layer/expert_parallel.h"
#include "layer/validate.h"
#include "routing/gate.h"
#include "routing/router.h"
#include "switchyard/error.h"
#include "switchyard/rng.h"

namespace switchyard {
namespace {

constexpr std::uint64_t kExpertInitId = 2000;
constexpr std::uint64_t kSharedInitId = 3000;

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

FfnShape ffn_shape(const MoEConfig& cfg, index_t num_experts, index_t hidden,
                   index_t first_expert = 0) {
  return FfnShape{num_experts,      cfg.model_dim, hidden,     cfg.activation, cfg.has_fc1_bias,
                  cfg.has_fc2_bias, cfg.dtype,     cfg.device, first_expert};
}

// Megatron's input jitter: x * U(1 - eps, 1 + eps) per element, for the gate input only.
// token_base: the global index of token 0 (expert parallelism), so draws follow global tokens.
Tensor jitter_factors(const MoEConfig& cfg, std::uint64_t step, index_t T, index_t token_base) {
  const index_t d = cfg.model_dim;
  std::vector<double> f(static_cast<std::size_t>(T * d));
  for (index_t t = 0; t < T; ++t)
    for (index_t j = 0; j < d; ++j)
      f[t * d + j] = 1.0 + cfg.input_jitter *
                               (2.0 * rng_uniform(cfg.seed, RngStream::kInputJitter, step,
                                                  static_cast<std::uint64_t>(token_base + t), j) -
                                1.0);
  return Tensor::from_vector(f, {T, d}, cfg.dtype);
}

}  // namespace

struct MoELayer::Impl {
  MoEConfig cfg;
  std::shared_ptr<Gate> gate;
  std::shared_ptr<ExpertNetwork> experts;
  std::unique_ptr<FfnExperts> shared;
  Tensor expert_bias;               // [E] f32
  std::vector<double> bias_counts;  // [E] tokens kept per expert since the last bias update
  std::uint64_t step = 0;           // training forwards so far: the random streams' counter
  std::shared_ptr<Communicator> comm;
  ExpertShard shard;                   // this rank's experts (all of them in one process)
  std::unique_ptr<ExpertParallel> ep;  // with a communicator: the token exchange

  // The last forward, for backward.
  bool saved = false;
  Shape x_shape;
  DType x_dtype = DType::kF32;
  Tensor x;                 // [T, d] in the layer's dtype
  Tensor jitter;            // [T, d] or undefined
  RoutingPlan plan;         // on the host: the router and its backward run there for now
  RoutingPlan device_plan;  // plan on the layer's device, for dispatch
  RouterState router;
  Tensor expert_out;  // [R, d]
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
  SY_CHECK(!(cfg.device.is_cuda() && cfg.gate == GateType::kCosine),
           "the cosine gate has no CUDA backend yet: use gate=linear on CUDA");
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
    SY_CHECK(cfg.device.is_cpu(), "expert parallelism runs on CPU (MPI) for now; the layer is on ",
             to_string(cfg.device));
    m.shard = expert_shard(cfg.num_experts, *comm);
  }
  if (experts) {
    m.experts = std::move(experts);
  } else {
    m.experts =
        std::make_shared<FfnExperts>(ffn_shape(cfg, m.shard.count, cfg.hidden_size, m.shard.first),
                                     "experts.", false, cfg.seed, kExpertInitId);
  }
  if (comm) {
    m.ep = std::make_unique<ExpertParallel>(cfg, comm, m.shard, *m.experts,
                                            dynamic_cast<FfnExperts*>(m.experts.get()));
    m.comm = std::move(comm);
  }
  if (cfg.shared_expert_hidden > 0)
    m.shared = std::make_unique<FfnExperts>(ffn_shape(cfg, 1, cfg.shared_expert_hidden),
                                            "shared_experts.", true, cfg.seed, kSharedInitId);
  m.expert_bias = Tensor::zeros({cfg.num_experts}, DType::kF32);  // host: the router reads it
  m.bias_counts.assign(static_cast<std::size_t>(cfg.num_experts), 0.0);
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
  const int k = resolve_top_k(cfg, opt);
  const double cf = resolve_capacity_factor(cfg, opt);
  const Layout layout = resolve_layout(cfg, opt, cf);
  const int overlap_degree = resolve_overlap_degree(cfg, opt);
  const index_t d = cfg.model_dim, T = x_in.numel() / d, E = cfg.num_experts;
  // Expert parallel: every rank agrees on the call's options (collective); T_max over ranks.
  ParallelCall call;
  if (m.ep) call = m.ep->begin(opt, T, k, cf, layout, overlap_degree);
  SY_CHECK(m.ep || (opt.adaptive_r >= 0 && opt.adaptive_r <= 1),
           "forward: adaptive_r=", opt.adaptive_r,
           " needs a layer built with a communicator (0 and 1 are the same in "
           "one process)");
  const DType rd = routing_dtype(cfg.dtype);

  const Device dev = cfg.device;
  Tensor x = x_in.reshape({T, d}).to(cfg.dtype).contiguous();
  // On CUDA a check of x would cost a host sync; the logits are checked on the host below.
  if (dev.is_cpu()) check_finite(x, "forward: x");
  Tensor jitter, xg = x;
  if (opt.training && cfg.input_jitter > 0) {
    jitter = jitter_factors(cfg, m.step, T, call.token_base).to(dev);
    xg = Tensor::zeros({T, d}, cfg.dtype, dev);
    add_inplace(xg, x, &jitter);  // xg = x * jitter
  }
  Tensor logits = m.gate->forward(xg, opt.training);
  SY_CHECK(logits.dim() == 2 && logits.size(0) == T && logits.size(1) == E,
           "gate: logits must be [", T, ", ", E, "], got ", shape_str(logits.sizes()));
  // NOTE: on CUDA the router runs on the host for now: the logits come back to the host (a sync
  // per forward) and the plan goes to the device. A fused router kernel will replace this.
  logits = logits.to(rd).to(Device::cpu());

  RouteArgs args;
  args.top_k = k;
  args.capacity_factor = cf;
  args.layout = layout;
  args.training = opt.training;
  args.step = m.step;
  args.expert_bias = cfg.expert_bias ? &m.expert_bias : nullptr;
  args.alignment = overlap_degree;
  if (m.ep) {
    args.max_tokens = call.max_tokens;
    args.token_base = call.token_base;
    m.ep->set_route_hooks(args);
  }
  ForwardResult result;
  RouterState router;
  RoutingPlan plan = route_cpu(cfg, args, logits, router, result.losses);
  RoutingPlan device_plan = dev.is_cpu() ? plan : plan_to_device(plan, dev);

  const Tensor buffer = encode(device_plan, x, !cfg.is_postscore);
  Tensor expert_out = m.ep ? m.ep->forward(call, device_plan, buffer, opt.training)
                           : m.experts->forward(buffer, device_plan.offsets, opt.training);
  SY_CHECK(expert_out.dim() == 2 && expert_out.size(0) == plan.num_rows && expert_out.size(1) == d,
           "experts: output must be [", plan.num_rows, ", ", d, "], got ",
           shape_str(expert_out.sizes()));
  expert_out = expert_out.to(cfg.dtype);
  Tensor y = decode(device_plan, expert_out, cfg.is_postscore);
  if (m.shared) {
    const Tensor all_rows =
        Tensor::from_vector({0.0, static_cast<double>(T)}, {2}, DType::kI64).to(dev);
    add_inplace(y, m.shared->forward(x, all_rows, opt.training));
  }

  RoutingStats& s = result.stats;
  const std::vector<double> counts = plan.expert_count.to_vector();
  s.tokens_per_expert.assign(counts.begin(), counts.end());
  s.dropped_choices = plan.dropped;
  s.capacity = plan.capacity;
  s.num_rows = plan.num_rows;
  s.top_k = k;
  s.layout = layout;
  if (opt.training) {
    if (cfg.expert_bias)
      for (index_t e = 0; e < E; ++e) m.bias_counts[e] += counts[e];
    ++m.step;
  }
  result.y = y.view(x_in.sizes());
  if (!opt.training) return result;

  m.x_shape = x_in.sizes();
  m.x_dtype = x_in.dtype();
  m.x = x;
  m.jitter = jitter;
  m.plan = std::move(plan);
  m.device_plan = std::move(device_plan);
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
  SY_CHECK(dy_in.defined() && dy_in.sizes() == m.x_shape, "backward: dy must have the shape of y ",
           shape_str(m.x_shape), ", got ",
           dy_in.defined() ? shape_str(dy_in.sizes()) : "undefined");
  SY_CHECK(dy_in.device() == cfg.device, "backward: dy is on ", to_string(dy_in.device()),
           ", the layer on ", to_string(cfg.device));
  SY_CHECK(is_floating(dy_in.dtype()), "backward: dy must be floating, got ",
           dtype_name(dy_in.dtype()));
  SY_CHECK(std::isfinite(weights.aux) && std::isfinite(weights.z),
           "backward: loss weights must be finite, got aux=", weights.aux, ", z=", weights.z);
  const index_t d = cfg.model_dim, T = m.x.size(0);
  const Tensor dy = dy_in.reshape({T, d}).to(cfg.dtype).contiguous();
  m.saved = false;

  const Device dev = cfg.device;
  Tensor dweight = Tensor::zeros({T, m.plan.top_k}, routing_dtype(cfg.dtype), dev);
  const Tensor dout = decode_backward(m.device_plan, dy, m.expert_out, cfg.is_postscore, dweight);
  const Tensor dbuffer = (m.ep ? m.ep->backward(dout) : m.experts->backward(dout)).to(cfg.dtype);
  Tensor dx = encode_backward(m.device_plan, dbuffer, m.x, !cfg.is_postscore, dweight);
  const Tensor dlogits =
      route_backward_cpu(cfg, m.plan, m.router, dweight.to(Device::cpu()), weights).to(dev);
  const Tensor dx_gate = m.gate->backward(dlogits).to(cfg.dtype);
  add_inplace(dx, dx_gate, m.jitter.defined() ? &m.jitter : nullptr);
  if (m.shared) add_inplace(dx, m.shared->backward(dy));
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

void MoELayer::zero_grad() {
  for (Parameter* p : parameters()) p->grad.fill(0.0);
}

void MoELayer::update_expert_bias(double rate) {
  Impl& m = *impl_;
  SY_CHECK(m.cfg.expert_bias, "update_expert_bias: the layer was built without expert_bias");
  SY_CHECK(std::isfinite(rate) && rate >= 0, "update_expert_bias: rate must be >= 0, got ", rate);
  const index_t E = m.cfg.num_experts;
  if (m.ep) m.ep->sum_over_ranks(m.bias_counts);  // the counts of every rank's tokens
  double mean = 0;
  for (double c : m.bias_counts) mean += c;
  mean /= static_cast<double>(E);
  float* bias = m.expert_bias.data<float>();
  for (index_t e = 0; e < E; ++e) {
    const double diff = mean - m.bias_counts[e];
    bias[e] += static_cast<float>(rate * ((diff > 0) - (diff < 0)));
  }
  std::fill(m.bias_counts.begin(), m.bias_counts.end(), 0.0);
}

Tensor MoELayer::expert_bias() const { return impl_->expert_bias.clone(); }

}  // namespace switchyard
