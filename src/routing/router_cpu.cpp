#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "core/dtype_dispatch.h"
#include "routing/losses.h"
#include "routing/router.h"
#include "routing/router_rules.h"
#include "switchyard/error.h"
#include "switchyard/rng.h"

namespace switchyard {
namespace {

template <class A>
A weight_denominator(const MoEConfig& cfg, A sum) {
  return cfg.rules == RuleSet::kMegatron ? sum + A(1e-20) : std::max(sum, A(FLT_EPSILON));
}

// Megatron's sinkhorn on c = exp(z - max z): returns d1 * c * d0 [T, E].
template <class A>
std::vector<A> sinkhorn(const A* z, index_t T, index_t E, int max_iters, double tol) {
  A m = -INFINITY;
  for (index_t i = 0; i < T * E; ++i) m = std::max(m, z[i]);
  std::vector<A> c(static_cast<std::size_t>(T * E));
  for (index_t i = 0; i < T * E; ++i) c[i] = std::exp(z[i] - m);
  std::vector<A> d0(static_cast<std::size_t>(T), A(1)), d1(static_cast<std::size_t>(E), A(1));
  std::vector<A> d1_old = d1, col(static_cast<std::size_t>(E));
  for (int it = 0; it < max_iters; ++it) {
    for (index_t t = 0; t < T; ++t) {
      A s = 0;
      for (index_t e = 0; e < E; ++e) s += d1[e] * c[t * E + e];
      d0[t] = (A(1) / static_cast<A>(T)) / (s + A(1e-8));
    }
    std::fill(col.begin(), col.end(), A(0));
    for (index_t t = 0; t < T; ++t)
      for (index_t e = 0; e < E; ++e) col[e] += d0[t] * c[t * E + e];
    A err = 0;
    for (index_t e = 0; e < E; ++e) {
      d1[e] = (A(1) / static_cast<A>(E)) / (col[e] + A(1e-8));
      err += std::fabs(d1[e] - d1_old[e]);
    }
    d1_old = d1;
    if (err / static_cast<A>(E) <= static_cast<A>(tol)) break;
  }
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) c[t * E + e] *= d1[e] * d0[t];
  return c;
}

// Group-limited routing: keep the topk_groups best groups (group score = sum of the top
// k/topk_groups selection scores in the group), mask the other experts' scores to -inf.
template <class A>
void mask_groups(const MoEConfig& cfg, int k, A* sel, index_t E) {
  const index_t G = cfg.num_groups, per_group = E / G;
  const int top_in_group = k / cfg.topk_groups;
  std::vector<A> gscore(static_cast<std::size_t>(G));
  std::vector<std::int32_t> top(static_cast<std::size_t>(std::max<index_t>(per_group, G)));
  for (index_t g = 0; g < G; ++g) {
    top_k_row(sel + g * per_group, per_group, top_in_group, top.data());
    A s = 0;
    for (int j = 0; j < top_in_group; ++j) s += sel[g * per_group + top[j]];
    gscore[g] = s;
  }
  top_k_row(gscore.data(), G, cfg.topk_groups, top.data());
  std::vector<bool> keep(static_cast<std::size_t>(G), false);
  for (int j = 0; j < cfg.topk_groups; ++j) keep[top[j]] = true;
  for (index_t e = 0; e < E; ++e)
    if (!keep[e / per_group]) sel[e] = -INFINITY;
}

template <class A>
void apply_score(ScoreFn fn, const A* z, A* p, index_t E) {
  if (fn == ScoreFn::kSoftmax) {
    softmax_row(z, p, E);
  } else {
    for (index_t e = 0; e < E; ++e) p[e] = A(1) / (A(1) + std::exp(-z[e]));
  }
}

template <class A>
RoutingPlan route_impl(const MoEConfig& cfg, const RouteArgs& args, const Tensor& logits_in,
                       RouterState& st, Losses& losses) {
  const index_t T = logits_in.size(0), E = logits_in.size(1);
  const int k = args.top_k;
  const DType rd = logits_in.dtype();
  const Tensor logits = logits_in.contiguous();
  const A* z = logits.data<A>();
  for (index_t i = 0; i < T * E; ++i)
    SY_CHECK(std::isfinite(z[i]), "router: the logits hold ", z[i], " at token ", i / E,
             ", expert ", i % E, ": check the input and the gate weights");

  // 1. Noise (Tutel, training): logits + gate_noise * N(0,1) / E from the counter-based RNG.
  Tensor noisy = logits;
  if (args.training && cfg.gate_noise > 0) {
    noisy = Tensor::empty({T, E}, rd);
    A* zn = noisy.data<A>();
#pragma omp parallel for schedule(static)
    for (index_t t = 0; t < T; ++t)
      for (index_t e = 0; e < E; ++e)
        zn[t * E + e] =
            z[t * E + e] +
            static_cast<A>(cfg.gate_noise *
                           rng_normal(cfg.seed, RngStream::kGateNoise, args.step,
                                      static_cast<std::uint64_t>(args.token_base + t), e) /
                           static_cast<double>(E));
  }
  const A* zn = noisy.data<A>();

  // 2. Scores and selection scores.
  const WeightRule rule = weight_rule(cfg);
  Tensor probs = Tensor::empty({T, E}, rd);
  A* p = probs.data<A>();
  const ScoreFn pfn = probs_fn(cfg, rule, k);
#pragma omp parallel for schedule(static)
  for (index_t t = 0; t < T; ++t) apply_score(pfn, zn + t * E, p + t * E, E);

  std::vector<A> sel;
  if (rule == WeightRule::kSinkhorn && args.training) {
    sel = sinkhorn(zn, T, E, cfg.sinkhorn_max_iters, cfg.sinkhorn_tol);
  } else if (rule == WeightRule::kSinkhorn) {
    sel.assign(p, p + T * E);  // evaluation: plain top-k of act(logits), as Megatron
  } else {
    const A* base = rule == WeightRule::kLogitSoftmax ? zn : p;
    sel.assign(base, base + T * E);
    if (args.expert_bias) {
      const float* bias = args.expert_bias->data<float>();
      for (index_t t = 0; t < T; ++t)
        for (index_t e = 0; e < E; ++e) sel[t * E + e] += static_cast<A>(bias[e]);
    }
  }

  // 3. Top-k (group-limited when configured), then the weights.
  RoutingPlan plan;
  plan.num_tokens = T;
  plan.num_experts = E;
  plan.top_k = k;
  plan.layout = args.layout;
  plan.expert_idx = Tensor::empty({T, k}, DType::kI32);
  plan.weight = Tensor::empty({T, k}, rd);
  Tensor gates = Tensor::empty({T, k}, rd);
  std::int32_t* idx = plan.expert_idx.data<std::int32_t>();
  A* w = plan.weight.data<A>();
  A* g = gates.data<A>();
  const bool group_limited = cfg.num_groups > 1 && rule != WeightRule::kSinkhorn;
  const bool renorm = rule == WeightRule::kScores && renormalises(cfg, k);
  const A scale = static_cast<A>(weight_scale(cfg, rule));
#pragma omp parallel for schedule(static)
  for (index_t t = 0; t < T; ++t) {
    A* s = sel.data() + t * E;
    if (group_limited) mask_groups(cfg, k, s, E);
    top_k_row(s, E, k, idx + t * k);
    if (rule == WeightRule::kLogitSoftmax) {
      A m = -INFINITY, sum = 0;
      for (int j = 0; j < k; ++j) m = std::max(m, zn[t * E + idx[t * k + j]]);
      for (int j = 0; j < k; ++j) sum += (g[t * k + j] = std::exp(zn[t * E + idx[t * k + j]] - m));
      for (int j = 0; j < k; ++j) g[t * k + j] /= sum;
    } else {
      for (int j = 0; j < k; ++j) g[t * k + j] = p[t * E + idx[t * k + j]];
    }
    A denom = 1;
    if (renorm) {
      A sum = 0;
      for (int j = 0; j < k; ++j) sum += g[t * k + j];
      denom = weight_denominator(cfg, sum);
    }
    for (int j = 0; j < k; ++j) w[t * k + j] = scale * g[t * k + j] / denom;
  }

  // 4. Slots and capacity.
  std::vector<A> priority;
  if (cfg.batch_prioritized_routing) {
    priority.resize(static_cast<std::size_t>(T));
    for (index_t t = 0; t < T; ++t) priority[t] = *std::max_element(p + t * E, p + (t + 1) * E);
  }
  assign_slots_cpu<A>(slot_rules(cfg, args), priority.empty() ? nullptr : priority.data(), w, plan);

  // 5. Losses (unweighted). Sinkhorn balances by itself: no aux loss, as Megatron. Under expert
  // parallelism the Switch loss counts tokens(e) and T over all ranks (Megatron's global batch).
  losses = Losses{};
  std::vector<double> switch_tokens;
  double switch_num_tokens = 0;
  const AuxLoss aux_loss = aux_loss_of(cfg, rule);
  if (aux_loss == AuxLoss::kSwitch && args.sum_over_ranks) {
    switch_tokens = switch_token_counts<A>(T, E, k, z, cfg.score_fn);
    switch_tokens.push_back(static_cast<double>(T));
    args.sum_over_ranks(switch_tokens);
    switch_num_tokens = switch_tokens.back();
    switch_tokens.pop_back();
  }
  switch (aux_loss) {
    case AuxLoss::kNone:
      break;
    case AuxLoss::kGShard:
      losses.aux = gshard_loss<A>(T, E, k, p, idx, nullptr, 0);
      break;
    case AuxLoss::kLoadImportance:
      losses.aux = load_importance_loss<A>(T, E, k, z, zn, idx, cfg.gate_noise, nullptr, 0);
      break;
    case AuxLoss::kSwitch:
      losses.aux =
          switch_loss<A>(T, E, k, z, cfg.score_fn, 0, nullptr, 0,
                         switch_tokens.empty() ? nullptr : switch_tokens.data(), switch_num_tokens);
      break;
    case AuxLoss::kSwitchSequence:
      losses.aux = switch_loss<A>(T, E, k, z, cfg.score_fn, cfg.seq_len, nullptr, 0);
      break;
  }
  losses.z = z_loss<A>(T, E, z, nullptr, 0);

  st = RouterState{logits,           noisy, probs, gates, rule, {}, std::move(switch_tokens),
                   switch_num_tokens};
  return plan;
}

template <class A>
Tensor route_backward_impl(const MoEConfig& cfg, const RoutingPlan& plan, const RouterState& st,
                           const Tensor& dweight_in, const LossWeights& lw) {
  const index_t T = plan.num_tokens, E = plan.num_experts;
  const int k = plan.top_k;
  const DType rd = st.logits.dtype();
  const WeightRule rule = st.rule;
  const Tensor dweight = dweight_in.contiguous();
  const A* dw = dweight.data<A>();
  const A* z = st.logits.data<A>();
  const A* zn = st.noisy.data<A>();
  const A* p = st.probs.data<A>();
  const A* g = st.gates.data<A>();
  const std::int32_t* idx = plan.expert_idx.data<std::int32_t>();
  Tensor dlogits = Tensor::zeros({T, E}, rd);
  A* dz = dlogits.data<A>();
  std::vector<A> dp(static_cast<std::size_t>(T * E), A(0));
  const bool renorm = rule == WeightRule::kScores && renormalises(cfg, k);
  const A scale = static_cast<A>(weight_scale(cfg, rule));

#pragma omp parallel for schedule(static)
  for (index_t t = 0; t < T; ++t) {
    const A* dwt = dw + t * k;
    const A* gt = g + t * k;
    if (rule == WeightRule::kLogitSoftmax) {
      // w_j = scale * q_j with q = softmax over the chosen logits.
      A dot = 0;
      for (int j = 0; j < k; ++j) dot += gt[j] * scale * dwt[j];
      for (int j = 0; j < k; ++j) dz[t * E + idx[t * k + j]] += gt[j] * (scale * dwt[j] - dot);
      continue;
    }
    if (!renorm) {
      for (int j = 0; j < k; ++j) dp[t * E + idx[t * k + j]] += scale * dwt[j];
      continue;
    }
    // w_j = scale * g_j / D(S), S = sum_j g_j: every chosen score gets gradient through D,
    // dropped choices included.
    A sum = 0, dot = 0;
    for (int j = 0; j < k; ++j) {
      sum += gt[j];
      dot += dwt[j] * gt[j];
    }
    const A denom = weight_denominator(cfg, sum);
    const bool through_denominator = cfg.rules == RuleSet::kMegatron || sum > A(FLT_EPSILON);
    for (int j = 0; j < k; ++j)
      dp[t * E + idx[t * k + j]] +=
          scale * (dwt[j] / denom - (through_denominator ? dot / (denom * denom) : A(0)));
  }

  const AuxLoss aux_loss = aux_loss_of(cfg, rule);
  if (aux_loss == AuxLoss::kGShard && lw.aux != 0)
    gshard_loss<A>(T, E, k, p, idx, dp.data(), lw.aux);

  // probs = act(noisy logits); noisy = logits + constant, so d noisy = d logits.
  const ScoreFn pfn = probs_fn(cfg, rule, k);
#pragma omp parallel for schedule(static)
  for (index_t t = 0; t < T; ++t) {
    const A* pt = p + t * E;
    const A* dpt = dp.data() + t * E;
    if (pfn == ScoreFn::kSoftmax) {
      A dot = 0;
      for (index_t e = 0; e < E; ++e) dot += pt[e] * dpt[e];
      for (index_t e = 0; e < E; ++e) dz[t * E + e] += pt[e] * (dpt[e] - dot);
    } else {
      for (index_t e = 0; e < E; ++e) dz[t * E + e] += dpt[e] * pt[e] * (A(1) - pt[e]);
    }
  }

  if (lw.aux != 0) {
    if (aux_loss == AuxLoss::kLoadImportance)
      load_importance_loss<A>(T, E, k, z, zn, idx, cfg.gate_noise, dz, lw.aux);
    else if (aux_loss == AuxLoss::kSwitch)
      switch_loss<A>(T, E, k, z, cfg.score_fn, 0, dz, lw.aux,
                     st.switch_tokens.empty() ? nullptr : st.switch_tokens.data(),
                     st.switch_num_tokens);
    else if (aux_loss == AuxLoss::kSwitchSequence)
      switch_loss<A>(T, E, k, z, cfg.score_fn, cfg.seq_len, dz, lw.aux);
  }
  if (lw.z != 0) z_loss<A>(T, E, z, dz, lw.z);
  return dlogits;
}

}  // namespace

RoutingPlan route_cpu(const MoEConfig& cfg, const RouteArgs& args, const Tensor& logits,
                      RouterState& state, Losses& losses) {
  SY_ASSERT(logits.dim() == 2, "logits must be [T, E]");
  return dispatch_float(logits.dtype(), "route_cpu", [&]<class A>() -> RoutingPlan {
    if constexpr (std::is_same_v<A, float> || std::is_same_v<A, double>)
      return route_impl<A>(cfg, args, logits, state, losses);
    else
      SY_CHECK(false, "route_cpu: logits must be f32 or f64, got ", dtype_name(logits.dtype()));
    return {};
  });
}

Tensor route_backward_cpu(const MoEConfig& cfg, const RoutingPlan& plan, const RouterState& state,
                          const Tensor& dweight, const LossWeights& weights) {
  return dispatch_float(state.logits.dtype(), "route_backward_cpu", [&]<class A>() -> Tensor {
    if constexpr (std::is_same_v<A, float> || std::is_same_v<A, double>)
      return route_backward_impl<A>(cfg, plan, state, dweight, weights);
    else
      SY_CHECK(false, "route_backward_cpu: logits must be f32 or f64");
    return {};
  });
}

#ifndef SY_WITH_CUDA
// Builds without the CUDA backend: nothing routes on a GPU.
bool route_cuda_supports(const MoEConfig&, const RouteArgs&, index_t) { return false; }

RoutingPlan route_cuda(const MoEConfig&, const RouteArgs&, const Tensor&, RouterState&,
                       LossTensors&, Tensor&) {
  SY_CHECK(false, "route_cuda: this build has no CUDA backend");
  return {};
}

Tensor route_backward_cuda(const MoEConfig&, const RoutingPlan&, const RouterState&, const Tensor&,
                           const LossWeights&) {
  SY_CHECK(false, "route_backward_cuda: this build has no CUDA backend");
  return {};
}
#endif

}  // namespace switchyard
