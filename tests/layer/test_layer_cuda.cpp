// The whole layer on CUDA against the same layer on the CPU; skipped where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>

#include "reference/compare.h"
#include "reference/random.h"
#include "switchyard/switchyard.h"

namespace switchyard {
namespace {

using sy_ref::randn;
using sy_ref::rel_l2;

struct Case {
  const char* name;
  DType dtype;
  double capacity_factor;
  Activation act;
  bool postscore;
  index_t shared_hidden;
  double jitter;
};

class MoELayerCuda : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(MoELayerCuda, MatchesTheCpuLayerForwardAndBackward) {
  const Case c = GetParam();
  MoEConfig cfg;
  cfg.model_dim = 64;
  cfg.hidden_size = 96;
  cfg.num_experts = 8;
  cfg.top_k = 2;
  cfg.dtype = c.dtype;
  cfg.capacity_factor = c.capacity_factor;
  cfg.activation = c.act;
  cfg.is_postscore = c.postscore;
  cfg.shared_expert_hidden = c.shared_hidden;
  cfg.input_jitter = c.jitter;
  cfg.fp32_gate = c.dtype != DType::kF32;  // the same routing on both devices
  MoELayer cpu(cfg);
  cfg.device = Device::cuda(0);
  MoELayer gpu(cfg);
  const index_t T = 333;
  const Tensor x = Tensor::from_vector(randn(T * 64, 1), {3, 111, 64}, c.dtype);
  const Tensor dy = Tensor::from_vector(randn(T * 64, 2), {3, 111, 64}, c.dtype);
  const double tol = c.dtype == DType::kF32 ? 1e-5 : 3e-2;

  const ForwardResult r = cpu.forward(x);
  const ForwardResult rg = gpu.forward(x.to(Device::cuda(0)));
  EXPECT_EQ(rg.y.device(), Device::cuda(0));
  EXPECT_EQ(rg.y.sizes(), x.sizes());
  EXPECT_LT(rel_l2(rg.y.to_vector(), r.y.to_vector()), tol);
  EXPECT_EQ(rg.stats.tokens_per_expert, r.stats.tokens_per_expert);
  EXPECT_EQ(rg.stats.dropped_choices, r.stats.dropped_choices);
  EXPECT_NEAR(rg.losses.aux, r.losses.aux, 1e-5 * std::fabs(r.losses.aux));
  const LossWeights w{.aux = 0.01, .z = 0.001};
  const auto dx = cpu.backward(dy, w).to_vector();
  const auto dxg = gpu.backward(dy.to(Device::cuda(0)), w).to_vector();
  EXPECT_LT(rel_l2(dxg, dx), tol);
  const auto pc = cpu.parameters(), pg = gpu.parameters();
  ASSERT_EQ(pc.size(), pg.size());
  for (std::size_t i = 0; i < pc.size(); ++i)
    EXPECT_LT(rel_l2(pg[i]->grad.to_vector(), pc[i]->grad.to_vector()), tol) << pc[i]->name;
}

TEST_P(MoELayerCuda, RunsAreBitwiseReproducible) {
  const Case c = GetParam();
  MoEConfig cfg;
  cfg.model_dim = 64;
  cfg.hidden_size = 96;
  cfg.num_experts = 8;
  cfg.dtype = c.dtype;
  cfg.capacity_factor = c.capacity_factor;
  cfg.activation = c.act;
  cfg.device = Device::cuda(0);
  const Tensor x = Tensor::from_vector(randn(200 * 64, 3), {200, 64}, c.dtype).to(cfg.device);
  auto run = [&] {
    MoELayer layer(cfg);
    std::vector<double> all = layer.forward(x).y.to_vector();
    for (double v : layer.backward(x, {.aux = 0.01}).to_vector()) all.push_back(v);
    for (Parameter* p : layer.parameters())
      for (double v : p->grad.to_vector()) all.push_back(v);
    return all;
  };
  EXPECT_EQ(run(), run());
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MoELayerCuda,
    ::testing::Values(
        Case{"PaddedF32", DType::kF32, 1.0, Activation::kRelu, true, 0, 0.0},
        Case{"DroplessF32", DType::kF32, 0.0, Activation::kGelu, true, 0, 0.0},
        Case{"PrescoreSharedSwiglu", DType::kF32, 0.0, Activation::kSwiGLU, false, 48, 0.0},
        Case{"JitterCapped", DType::kF32, -0.5, Activation::kSilu, true, 0, 0.1},
        Case{"PaddedBf16", DType::kBF16, 1.0, Activation::kRelu, true, 0, 0.0},
        Case{"DroplessBf16Swiglu", DType::kBF16, 0.0, Activation::kSwiGLU, true, 32, 0.0}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(MoELayerCudaErrors, CosineGateAndMixedDevicesAreRejected) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  MoEConfig cfg;
  cfg.model_dim = 8;
  cfg.hidden_size = 8;
  cfg.num_experts = 4;
  cfg.device = Device::cuda(0);
  cfg.gate = GateType::kCosine;
  EXPECT_THROW(MoELayer{cfg}, Error);
  cfg.gate = GateType::kLinear;
  MoELayer layer(cfg);
  EXPECT_THROW(layer.forward(Tensor::zeros({4, 8}, DType::kF32)), Error);  // x on the CPU
  layer.forward(Tensor::zeros({4, 8}, DType::kF32, cfg.device));
  EXPECT_THROW(layer.backward(Tensor::zeros({4, 8}, DType::kF32)), Error);  // dy on the CPU
}

}  // namespace
}  // namespace switchyard
