// The router's choices and weights on hand-checked cases, and its gradient by finite
// differences in f64 for every weight rule and loss.
#include <gtest/gtest.h>

#include <cmath>

#include "routing/router.h"
#include "switchyard/error.h"
#include "switchyard/rng.h"

namespace switchyard {
namespace {

MoEConfig base_config(index_t E, int k) {
  MoEConfig cfg;
  cfg.model_dim = 4;
  cfg.hidden_size = 4;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.dtype = DType::kF64;
  cfg.aux_loss = AuxLoss::kNone;
  return cfg;
}

struct Routed {
  RoutingPlan plan;
  RouterState state;
  Losses losses;
};

Routed route(const MoEConfig& cfg, const std::vector<double>& logits, index_t T, double cf = 0.0,
             bool training = true, const Tensor* bias = nullptr) {
  RouteArgs a;
  a.top_k = static_cast<int>(std::min<index_t>(cfg.top_k, cfg.num_experts));
  a.capacity_factor = cf;
  a.layout = Layout::kPacked;
  a.training = training;
  a.expert_bias = bias;
  Routed r;
  r.plan = route_cpu(cfg, a, Tensor::from_vector(logits, {T, cfg.num_experts}, DType::kF64),
                     r.state, r.losses);
  return r;
}

std::vector<double> idx(const Routed& r) { return r.plan.expert_idx.to_vector(); }
std::vector<double> weights(const Routed& r) { return r.plan.weight.to_vector(); }

TEST(Router, TopKBreaksTiesTowardsTheLowerExpert) {
  Routed r = route(base_config(4, 2), {0, 0, 0, 0, 1, 2, 2, 1}, 2);
  EXPECT_EQ(idx(r), (std::vector<double>{0, 1, 1, 2}));
  EXPECT_DOUBLE_EQ(weights(r)[0], 0.5);  // renormalised: 0.25 / 0.5
}

TEST(Router, NormalizeGateDividesByTheSumOfTheChosenScores) {
  MoEConfig cfg = base_config(3, 2);
  const std::vector<double> z = {1.0, 2.0, 3.0};
  const double s = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  const double p2 = std::exp(3.0) / s, p1 = std::exp(2.0) / s;
  Routed on = route(cfg, z, 1);
  EXPECT_EQ(idx(on), (std::vector<double>{2, 1}));
  EXPECT_NEAR(weights(on)[0], p2 / (p1 + p2), 1e-15);
  cfg.normalize_gate = false;
  cfg.scaling_factor = 2.5;
  Routed off = route(cfg, z, 1);
  EXPECT_NEAR(weights(off)[0], 2.5 * p2, 1e-15);
  EXPECT_NEAR(weights(off)[1], 2.5 * p1, 1e-15);
}

TEST(Router, SigmoidScoresAreAlwaysRenormalisedForKAboveOne) {
  MoEConfig cfg = base_config(3, 2);
  cfg.score_fn = ScoreFn::kSigmoid;
  cfg.normalize_gate = false;
  Routed r = route(cfg, {0.0, 1.0, -1.0}, 1);
  const double a = 1 / (1 + std::exp(-1.0)), b = 0.5;
  EXPECT_EQ(idx(r), (std::vector<double>{1, 0}));
  EXPECT_NEAR(weights(r)[0], a / (a + b), 1e-15);
}

TEST(Router, MegatronSoftmaxTakesTopKOfLogitsThenSoftmaxOverTheChosen) {
  MoEConfig cfg = base_config(3, 2);
  cfg.rules = RuleSet::kMegatron;
  Routed r = route(cfg, {1.0, 2.0, 3.0}, 1);
  EXPECT_EQ(idx(r), (std::vector<double>{2, 1}));
  EXPECT_NEAR(weights(r)[0], 1 / (1 + std::exp(-1.0)), 1e-15);
  cfg.pre_softmax = true;  // softmax over all E, no renormalisation
  Routed pre = route(cfg, {1.0, 2.0, 3.0}, 1);
  const double s = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  EXPECT_NEAR(weights(pre)[0], std::exp(3.0) / s, 1e-15);
}

TEST(Router, ExpertBiasChangesTheChoiceButNotTheWeight) {
  MoEConfig cfg = base_config(3, 1);
  cfg.score_fn = ScoreFn::kSigmoid;
  cfg.expert_bias = true;
  const Tensor bias = Tensor::from_vector({0.0, 0.0, 0.5}, {3}, DType::kF32);
  Routed r = route(cfg, {1.0, 0.0, 0.5}, 1, 0.0, true, &bias);
  EXPECT_EQ(idx(r), (std::vector<double>{2}));  // 0.62 + 0.5 beats 0.73
  EXPECT_NEAR(weights(r)[0], 1 / (1 + std::exp(-0.5)), 1e-15);
}

TEST(Router, GroupLimitedRoutingKeepsTheBestGroups) {
  MoEConfig cfg = base_config(4, 2);
  cfg.num_groups = 2;
  cfg.topk_groups = 1;
  cfg.score_fn = ScoreFn::kSigmoid;
  // Group 0 = experts {0, 1}, group 1 = {2, 3}; group score = sum of its top k/topk_groups = 2.
  // Expert 0 is the best single expert, but group 1 has the larger sum.
  const std::vector<double> z = {3.0, -3.0, 1.5, 1.5};
  Routed r = route(cfg, z, 1);
  EXPECT_EQ(idx(r), (std::vector<double>{2, 3}));
  cfg.num_groups = 0;
  EXPECT_EQ(idx(route(cfg, z, 1)), (std::vector<double>{0, 2}));
}

TEST(Router, SinkhornBalancesTokensThatAllPreferOneExpert) {
  MoEConfig cfg = base_config(2, 1);
  cfg.rules = RuleSet::kMegatron;
  cfg.sinkhorn = true;
  // Every token prefers expert 0; tokens 1 and 3 least.
  const std::vector<double> z = {2.0, 0.0, 1.0, 0.0, 3.0, 0.0, 0.5, 0.0};
  Routed r = route(cfg, z, 4);
  EXPECT_EQ(idx(r), (std::vector<double>{0, 1, 0, 1}));
  EXPECT_NEAR(weights(r)[1], 1 / (1 + std::exp(-0.0)), 1e-15);  // sigmoid of its logit (k = 1)
  EXPECT_EQ(r.losses.aux, 0.0);
  // Evaluation routes by plain top-k.
  Routed e = route(cfg, z, 4, 0.0, false);
  EXPECT_EQ(idx(e), (std::vector<double>{0, 0, 0, 0}));
}

TEST(Router, RejectsNonFiniteLogits) {
  EXPECT_THROW(route(base_config(2, 1), {0.0, NAN}, 1), Error);
  EXPECT_THROW(route(base_config(2, 1), {INFINITY, 0.0}, 1), Error);
}

TEST(Router, NoiseIsReproducibleAndChangesWithTheStep) {
  MoEConfig cfg = base_config(8, 2);
  cfg.gate_noise = 1.0;
  std::vector<double> z(16 * 8, 0.0);
  RouteArgs a;
  a.top_k = 2;
  a.capacity_factor = 0;
  a.layout = Layout::kPacked;
  RouterState s1, s2, s3;
  Losses l;
  const Tensor logits = Tensor::from_vector(z, {16, 8}, DType::kF64);
  route_cpu(cfg, a, logits, s1, l);
  route_cpu(cfg, a, logits, s2, l);
  a.step = 1;
  route_cpu(cfg, a, logits, s3, l);
  EXPECT_EQ(s1.noisy.to_vector(), s2.noisy.to_vector());
  EXPECT_NE(s1.noisy.to_vector(), s3.noisy.to_vector());
  // noise = gate_noise * N(0,1) / E from the counter-based stream.
  EXPECT_DOUBLE_EQ(s1.noisy.to_vector()[8 * 3 + 5],
                   rng_normal(cfg.seed, RngStream::kGateNoise, 0, 3, 5) / 8.0);
}

// ---- Gradients by central finite differences ----

// Objective: sum_tj c[t,j] * weight[t,j] + aux_w * l_aux + z_w * l_z, with fixed routing.
double objective(const MoEConfig& cfg, const std::vector<double>& z, index_t T, double cf,
                 const std::vector<double>& c, const LossWeights& lw, std::vector<double>* grad) {
  Routed r = route(cfg, z, T, cf);
  const std::vector<double> w = weights(r);
  const std::vector<double> row = r.plan.row.to_vector();
  double f = lw.aux * r.losses.aux + lw.z * r.losses.z;
  std::vector<double> dw(w.size(), 0.0);
  for (std::size_t i = 0; i < w.size(); ++i)
    if (row[i] >= 0) {  // dropped choices contribute nothing (but stay in the normaliser)
      f += c[i] * w[i];
      dw[i] = c[i];
    }
  if (grad) {
    const Tensor dwt = Tensor::from_vector(dw, {T, r.plan.top_k}, DType::kF64);
    *grad = route_backward_cpu(cfg, r.plan, r.state, dwt, lw).to_vector();
  }
  return f;
}

void check_router_gradient(const MoEConfig& cfg, double cf, const LossWeights& lw) {
  const index_t T = 7, E = cfg.num_experts;
  const int k = static_cast<int>(std::min<index_t>(cfg.top_k, E));
  std::vector<double> z(static_cast<std::size_t>(T * E)), c(static_cast<std::size_t>(T * k));
  // Well-separated logits (gaps >= 0.3) so no choice flips under the step.
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e)
      z[t * E + e] = 0.3 * static_cast<double>((e * 3 + t) % E) + 0.05 * t;
  for (std::size_t i = 0; i < c.size(); ++i) c[i] = rng_normal(3, RngStream::kData, 0, i, 0);
  std::vector<double> g;
  objective(cfg, z, T, cf, c, lw, &g);
  const double h = 1e-6;
  double max_err = 0, max_g = 0;
  for (std::size_t i = 0; i < z.size(); ++i) {
    std::vector<double> zp = z, zm = z;
    zp[i] += h;
    zm[i] -= h;
    const double fd =
        (objective(cfg, zp, T, cf, c, lw, nullptr) - objective(cfg, zm, T, cf, c, lw, nullptr)) /
        (2 * h);
    max_err = std::max(max_err, std::fabs(fd - g[i]));
    max_g = std::max(max_g, std::fabs(g[i]));
  }
  EXPECT_GT(max_g, 1e-3) << "the gradient should not vanish";
  EXPECT_LT(max_err, 1e-7 * std::max(1.0, max_g));
}

TEST(RouterGradient, TutelSoftmaxWithRenormalisationAndDrops) {
  MoEConfig cfg = base_config(5, 2);
  cfg.aux_loss = AuxLoss::kGShard;
  check_router_gradient(cfg, 0.5, {.aux = 0.7, .z = 0.3});
  cfg.normalize_gate = false;
  cfg.scaling_factor = 1.7;
  check_router_gradient(cfg, 0.0, {.aux = 0.7, .z = 0.0});
}

TEST(RouterGradient, SigmoidScores) {
  MoEConfig cfg = base_config(5, 3);
  cfg.score_fn = ScoreFn::kSigmoid;
  cfg.aux_loss = AuxLoss::kSwitch;
  check_router_gradient(cfg, 0.0, {.aux = 0.5, .z = 0.2});
}

TEST(RouterGradient, MegatronSoftmaxOverTheChosenLogits) {
  MoEConfig cfg = base_config(5, 2);
  cfg.rules = RuleSet::kMegatron;
  cfg.aux_loss = AuxLoss::kSwitch;
  cfg.drop_policy = DropPolicy::kPosition;  // the probs policy ranks tied weights: not smooth
  check_router_gradient(cfg, 1.0, {.aux = 0.5, .z = 0.1});
}

TEST(RouterGradient, SinkhornWeights) {
  MoEConfig cfg = base_config(5, 2);
  cfg.rules = RuleSet::kMegatron;
  cfg.sinkhorn = true;
  check_router_gradient(cfg, 0.0, {.aux = 0.0, .z = 0.3});
  cfg.top_k = 1;
  check_router_gradient(cfg, 0.0, {});
}

TEST(RouterGradient, SequenceLevelSwitchLoss) {
  MoEConfig cfg = base_config(4, 2);
  cfg.aux_loss = AuxLoss::kSwitchSequence;
  cfg.seq_len = 7;
  check_router_gradient(cfg, 0.0, {.aux = 1.0, .z = 0.0});
}

TEST(RouterGradient, LoadImportanceLoss) {
  // Noise on, but training draws are fixed per step, so the objective is deterministic.
  MoEConfig cfg = base_config(4, 2);
  cfg.aux_loss = AuxLoss::kLoadImportance;
  cfg.gate_noise = 0.05;
  check_router_gradient(cfg, 0.0, {.aux = 1.0, .z = 0.0});
}

}  // namespace
}  // namespace switchyard
