// The CUDA router against the CPU router: choices, weights, slots, rows, counts, losses and the
// backward, over both rule sets and every option it supports; skipped without a GPU.
#include <gtest/gtest.h>

#include <string>

#include "reference/compare.h"
#include "reference/random.h"
#include "routing/router.h"

namespace switchyard {
namespace {

using sy_ref::randn;
using sy_ref::rel_l2;

struct Case {
  std::string name;
  MoEConfig cfg;
  double cf = 1.0;
  Layout layout = Layout::kPadded;
  bool training = true;
};

MoEConfig config(index_t E, int k, DType rd) {
  MoEConfig cfg;
  cfg.model_dim = 8;
  cfg.hidden_size = 8;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.dtype = rd;
  return cfg;
}

std::vector<Case> cases(DType rd) {
  std::vector<Case> all;
  const auto add = [&](std::string name, MoEConfig cfg, double cf, Layout layout) {
    all.push_back({std::move(name), cfg, cf, layout, true});
  };
  for (int k : {1, 2, 3}) {
    for (double cf : {1.0, 0.5, 0.0, -1.0}) {
      for (Layout layout : {Layout::kPadded, Layout::kPacked}) {
        MoEConfig c = config(16, k, rd);
        add("tutel k=" + std::to_string(k) + " cf=" + std::to_string(cf) + " " + to_string(layout),
            c, cf, layout);
      }
    }
  }
  MoEConfig c = config(16, 2, rd);
  c.batch_prioritized_routing = true;
  add("batch-prioritized", c, 0.5, Layout::kPadded);
  c = config(16, 2, rd);
  c.normalize_gate = false;
  c.gate_noise = 1.0;
  add("noise, not normalised", c, 1.0, Layout::kPadded);
  c = config(12, 1, rd);
  c.aux_loss = AuxLoss::kNone;
  add("k=1 no aux loss", c, 0.0, Layout::kPacked);
  for (int k : {1, 2}) {
    c = config(16, k, rd);
    c.aux_loss = AuxLoss::kLoadImportance;
    c.gate_noise = 1.0;
    add("load/importance k=" + std::to_string(k), c, 1.0, Layout::kPadded);
  }

  MoEConfig m = config(16, 2, rd);
  m.rules = RuleSet::kMegatron;
  m.aux_loss = AuxLoss::kSwitch;
  add("megatron logit-softmax switch", m, 0.0, Layout::kPacked);
  m.pre_softmax = true;
  m.aux_loss = AuxLoss::kSwitchSequence;
  m.seq_len = 16;
  add("megatron pre-softmax sequence loss", m, 0.0, Layout::kPacked);
  m = config(32, 4, rd);
  m.rules = RuleSet::kMegatron;
  m.score_fn = ScoreFn::kSigmoid;
  m.expert_bias = true;
  m.num_groups = 8;
  m.topk_groups = 2;
  m.scaling_factor = 2.5;
  m.aux_loss = AuxLoss::kSwitch;
  add("deepseek: sigmoid, bias, groups, scaling", m, 0.0, Layout::kPacked);
  add("megatron probs drops", m, 1.0, Layout::kPacked);
  add("megatron probs drops, padded", m, 0.5, Layout::kPadded);
  add("megatron probs drops, capped", m, -0.5, Layout::kPacked);
  m.drop_policy = DropPolicy::kPosition;
  add("megatron position drops", m, 1.0, Layout::kPacked);
  add("megatron position drops, padded", m, 1.0, Layout::kPadded);
  for (int k : {1, 2}) {
    m = config(16, k, rd);
    m.rules = RuleSet::kMegatron;
    m.sinkhorn = true;
    add("sinkhorn k=" + std::to_string(k), m, 0.0, Layout::kPacked);
    all.push_back({"sinkhorn evaluation k=" + std::to_string(k), m, 1.0, Layout::kPadded, false});
  }
  m.sinkhorn_max_iters = 3;
  add("sinkhorn, 3 iterations", m, 1.0, Layout::kPadded);
  Case eval{"evaluation", config(16, 2, rd), 1.0, Layout::kPadded, false};
  eval.cfg.gate_noise = 1.0;
  all.push_back(eval);
  return all;
}

void expect_same_plan(const RoutingPlan& cpu, const RoutingPlan& gpu, double tol) {
  EXPECT_EQ(gpu.expert_idx.to_vector(), cpu.expert_idx.to_vector());
  EXPECT_LT(rel_l2(gpu.weight.to_vector(), cpu.weight.to_vector()), tol);
  EXPECT_EQ(gpu.row.to_vector(), cpu.row.to_vector());
  EXPECT_EQ(gpu.row_choice.to_vector(), cpu.row_choice.to_vector());
  EXPECT_EQ(gpu.offsets.to_vector(), cpu.offsets.to_vector());
  EXPECT_EQ(gpu.expert_count.to_vector(), cpu.expert_count.to_vector());
  EXPECT_EQ(gpu.num_rows, cpu.num_rows);
  if (gpu.capacity >= 0) {
    EXPECT_EQ(gpu.capacity, cpu.capacity);
  }
}

TEST(RouterCuda, MatchesTheCpuRouterForwardAndBackward) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const Device gpu = Device::cuda(0);
  for (DType rd : {DType::kF64, DType::kF32}) {
    const double tol = rd == DType::kF64 ? 1e-12 : 1e-5;
    for (const Case& c : cases(rd)) {
      SCOPED_TRACE(c.name + " " + dtype_name(rd));
      const index_t T = 64, E = c.cfg.num_experts;
      const int k = c.cfg.top_k;
      RouteArgs args;
      args.top_k = k;
      args.capacity_factor = c.cf;
      args.layout = c.layout;
      args.training = c.training;
      args.step = 3;
      std::vector<double> b = randn(E, 7);
      for (double& v : b) v *= 0.05;
      const Tensor bias = Tensor::from_vector(b, {E}, DType::kF32);
      const Tensor bias_gpu = bias.to(gpu);
      const Tensor logits = Tensor::from_vector(randn(T * E, 11), {T, E}, rd);
      ASSERT_TRUE(route_cuda_supports(c.cfg, args, T));

      RouterState cs, gs;
      Losses cl;
      LossTensors gl;
      Tensor nonfinite = Tensor::zeros({1}, DType::kI32, gpu);
      args.expert_bias = c.cfg.expert_bias ? &bias : nullptr;
      const RoutingPlan cp = route_cpu(c.cfg, args, logits, cs, cl);
      args.expert_bias = c.cfg.expert_bias ? &bias_gpu : nullptr;
      const RoutingPlan gp = route_cuda(c.cfg, args, logits.to(gpu), gs, gl, nonfinite);
      expect_same_plan(cp, gp, tol);
      EXPECT_NEAR(gl.aux.to_vector()[0], cl.aux, tol * (1 + std::fabs(cl.aux)));
      EXPECT_NEAR(gl.z.to_vector()[0], cl.z, tol * (1 + std::fabs(cl.z)));
      EXPECT_EQ(nonfinite.to_vector()[0], 0);

      const Tensor dweight = Tensor::from_vector(randn(T * k, 13), {T, k}, rd);
      const LossWeights lw{0.3, 0.02};
      const Tensor dc = route_backward_cpu(c.cfg, cp, cs, dweight, lw);
      const Tensor dg = route_backward_cuda(c.cfg, gp, gs, dweight.to(gpu), lw);
      EXPECT_LT(rel_l2(dg.to_vector(), dc.to_vector()), tol);
    }
  }
}

TEST(RouterCuda, RepeatsBitwiseAndFlagsNonFiniteLogits) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const Device gpu = Device::cuda(0);
  MoEConfig cfg = config(64, 4, DType::kF32);
  cfg.gate_noise = 1.0;
  RouteArgs args;
  args.top_k = 4;
  args.capacity_factor = 0.0;
  args.layout = Layout::kPacked;
  const index_t T = 4096;
  std::vector<double> z = randn(T * 64, 5);
  const Tensor logits = Tensor::from_vector(z, {T, 64}, DType::kF32).to(gpu);
  std::vector<std::vector<double>> runs;
  for (int r = 0; r < 2; ++r) {
    RouterState st;
    LossTensors l;
    Tensor flag = Tensor::zeros({1}, DType::kI32, gpu);
    const RoutingPlan p = route_cuda(cfg, args, logits, st, l, flag);
    const Tensor d = route_backward_cuda(cfg, p, st, p.weight, LossWeights{0.1, 0.1});
    std::vector<double> all = d.to_vector();
    for (double v : p.weight.to_vector()) all.push_back(v);
    for (double v : p.row.to_vector()) all.push_back(v);
    all.push_back(l.aux.to_vector()[0]);
    runs.push_back(all);
  }
  EXPECT_EQ(runs[0], runs[1]);

  z[100] = std::nan("");
  RouterState st;
  LossTensors l;
  Tensor flag = Tensor::zeros({1}, DType::kI32, gpu);
  route_cuda(cfg, args, Tensor::from_vector(z, {T, 64}, DType::kF32).to(gpu), st, l, flag);
  EXPECT_EQ(flag.to_vector()[0], 1);
}

TEST(RouterCuda, AllTokensToOneExpertAndEmptyExperts) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const Device gpu = Device::cuda(0);
  MoEConfig cfg = config(8, 1, DType::kF32);
  const index_t T = 100;
  std::vector<double> z(T * 8, 0.0);
  for (index_t t = 0; t < T; ++t) z[t * 8 + 5] = 3.0;  // every token prefers expert 5
  const Tensor logits = Tensor::from_vector(z, {T, 8}, DType::kF32);
  for (double cf : {1.0, 0.0}) {
    for (Layout layout : {Layout::kPadded, Layout::kPacked}) {
      RouteArgs args;
      args.top_k = 1;
      args.capacity_factor = cf;
      args.layout = layout;
      RouterState cs, gs;
      Losses cl;
      LossTensors gl;
      Tensor flag = Tensor::zeros({1}, DType::kI32, gpu);
      const RoutingPlan cp = route_cpu(cfg, args, logits, cs, cl);
      const RoutingPlan gp = route_cuda(cfg, args, logits.to(gpu), gs, gl, flag);
      expect_same_plan(cp, gp, 1e-6);
    }
  }
}

}  // namespace
}  // namespace switchyard
