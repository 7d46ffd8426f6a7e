// The gates and the Tensor GEMM on CUDA against the CPU; skipped without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/dtype_dispatch.h"
#include "experts/gemm.h"
#include "reference/compare.h"
#include "reference/random.h"
#include "routing/gate.h"
#include "routing/gate_split.h"

namespace switchyard {
namespace {

using sy_ref::randn;
using sy_ref::rel_l2;

TEST(GemmCuda, MatchesCpuForEveryTransposeAndDtype) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (DType dt : {DType::kF64, DType::kF32, DType::kBF16}) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        const index_t m = 37, n = 29, k = 53;
        const Tensor a = Tensor::from_vector(randn(m * k, 1), ta ? Shape{k, m} : Shape{m, k}, dt);
        const Tensor b = Tensor::from_vector(randn(k * n, 2), tb ? Shape{n, k} : Shape{k, n}, dt);
        Tensor c = Tensor::from_vector(randn(m * n, 3), {m, n}, dt), cg = c.to(Device::cuda(0));
        gemm(a, ta, b, tb, c, 0.5, 1.0);
        gemm(a.to(Device::cuda(0)), ta, b.to(Device::cuda(0)), tb, cg, 0.5, 1.0);
        EXPECT_LT(rel_l2(cg.to_vector(), c.to_vector()), dt == DType::kF64   ? 1e-14
                                                         : dt == DType::kF32 ? 1e-6
                                                                             : 1e-2)
            << dtype_name(dt) << " ta=" << ta << " tb=" << tb;
      }
    }
  }
}

TEST(LinearGateCuda, MatchesTheCpuGateForwardAndBackward) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (bool fp32_gate : {false, true}) {
    MoEConfig cfg;
    cfg.model_dim = 64;
    cfg.hidden_size = 8;
    cfg.num_experts = 16;
    cfg.dtype = DType::kBF16;
    cfg.fp32_gate = fp32_gate;
    LinearGate cpu(cfg);
    cfg.device = Device::cuda(0);
    LinearGate cuda(cfg);
    EXPECT_EQ(cpu.parameters()[0]->value.to_vector(), cuda.parameters()[0]->value.to_vector());
    const index_t T = 77;
    const Tensor x = Tensor::from_vector(randn(T * 64, 4), {T, 64}, DType::kBF16);
    const Tensor dl = Tensor::from_vector(randn(T * 16, 5), {T, 16}, DType::kF32);
    const auto logits = cpu.forward(x, true).to_vector();
    const auto logits_g = cuda.forward(x.to(Device::cuda(0)), true).to_vector();
    EXPECT_LT(rel_l2(logits_g, logits), fp32_gate ? 1e-5 : 1e-2);
    const auto dx = cpu.backward(dl).to_vector();
    const auto dx_g = cuda.backward(dl.to(Device::cuda(0))).to_vector();
    EXPECT_LT(rel_l2(dx_g, dx), 1e-2);
    EXPECT_LT(rel_l2(cuda.parameters()[0]->grad.to_vector(), cpu.parameters()[0]->grad.to_vector()),
              fp32_gate ? 1e-5 : 1e-2);
    // backward_add: the input gradient added to a dx that holds x.
    cpu.forward(x, true);
    cuda.forward(x.to(Device::cuda(0)), true);
    Tensor sum = x.clone(), sum_g = x.to(Device::cuda(0));
    cpu.backward_add(dl, sum);
    cuda.backward_add(dl.to(Device::cuda(0)), sum_g);
    EXPECT_LT(rel_l2(sum_g.to_vector(), sum.to_vector()), 1e-2);
  }
}

// The split gate (bf16 x, f32 weights) against sums in f64: each logit and weight-gradient
// element within FP32 rounding of its dot product (error over the sum of |products|), dx within
// bf16 rounding; the same inputs give the same bits twice.
TEST(LinearGateCuda, SplitGateHasFp32Accuracy) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const index_t T = 300, d = 2048, E = 64;
  const Device gpu = Device::cuda(0);
  const Tensor x = Tensor::from_vector(randn(T * d, 6), {T, d}, DType::kBF16);
  const Tensor w = Tensor::from_vector(randn(E * d, 7), {E, d}, DType::kF32);
  const Tensor dl = Tensor::from_vector(randn(T * E, 8), {T, E}, DType::kF32);
  ASSERT_TRUE(split_gate_applies(x.to(gpu), w.to(gpu)));
  EXPECT_FALSE(split_gate_applies(x.to(DType::kF32).to(gpu), w.to(gpu)));
  EXPECT_FALSE(split_gate_applies(x, w));  // the CPU
  const auto xv = x.to_vector(), wv = w.to_vector(), dlv = dl.to_vector();
  const auto logits = split_gate_forward_cuda(x.to(gpu), w.to(gpu)).to_vector();
  EXPECT_EQ(split_gate_forward_cuda(x.to(gpu), w.to(gpu)).to_vector(), logits);
  Tensor grad = Tensor::zeros({E, d}, DType::kF32, gpu);
  Tensor dx_out;
  split_gate_backward_cuda(dl.to(gpu), x.to(gpu), w.to(gpu), grad, dx_out, false);
  const auto dx = dx_out.to_vector();
  const auto gv = grad.to_vector();
  double worst_logit = 0, worst_grad = 0;
  std::vector<double> dx_ref(T * d, 0.0);
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) {
      double sum = 0, mag = 0;
      for (index_t j = 0; j < d; ++j) {
        sum += xv[t * d + j] * wv[e * d + j];
        mag += std::abs(xv[t * d + j] * wv[e * d + j]);
        dx_ref[t * d + j] += dlv[t * E + e] * wv[e * d + j];
      }
      worst_logit = std::max(worst_logit, std::abs(logits[t * E + e] - sum) / mag);
    }
  for (index_t e = 0; e < E; ++e)
    for (index_t j = 0; j < d; ++j) {
      double sum = 0, mag = 0;
      for (index_t t = 0; t < T; ++t) {
        sum += dlv[t * E + e] * xv[t * d + j];
        mag += std::abs(dlv[t * E + e] * xv[t * d + j]);
      }
      worst_grad = std::max(worst_grad, std::abs(gv[e * d + j] - sum) / mag);
    }
  EXPECT_LT(worst_logit, 1e-5);  // TF32 would be about 5e-4, bf16 4e-3
  EXPECT_LT(worst_grad, 1e-5);
  EXPECT_LT(rel_l2(dx, dx_ref), 4e-3);
  // Added to a dx that holds x: one rounding of x + dl · w.
  Tensor sum = x.to(gpu);
  split_gate_backward_cuda(dl.to(gpu), x.to(gpu), w.to(gpu), grad, sum, true);
  for (index_t i = 0; i < T * d; ++i) dx_ref[i] += xv[i];
  EXPECT_LT(rel_l2(sum.to_vector(), dx_ref), 4e-3);
}

// The cosine gate with the same parameters on both devices: logits, dx and every parameter's
// gradient. One token's projection is zero (its norm clamps at eps), and a second round puts the
// temperature above ln 100, where its gradient is zero.
TEST(CosineGateCuda, MatchesTheCpuGateForwardAndBackward) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF64}) {
    for (double temperature : {std::log(1 / 0.5), 5.0}) {
      MoEConfig cfg;
      cfg.model_dim = 48;
      cfg.hidden_size = 8;
      cfg.num_experts = 12;
      cfg.dtype = dt;
      cfg.gate = GateType::kCosine;
      cfg.cosine_proj_dim = 40;
      CosineGate cpu(cfg);
      cfg.device = Device::cuda(0);
      CosineGate cuda(cfg);
      const auto pc = cpu.parameters(), pg = cuda.parameters();
      ASSERT_EQ(pc[0]->name, "gates.0.temperature");
      pc[0]->value.fill(temperature);
      pc[2]->value.fill(0.0);  // cosine_projector.bias: token 0's projection is zero
      for (std::size_t i = 0; i < pc.size(); ++i) pg[i]->value.copy_from(pc[i]->value);
      const index_t T = 70;
      std::vector<double> xv = randn(T * 48, 6);
      std::fill(xv.begin(), xv.begin() + 48, 0.0);
      const Tensor x = Tensor::from_vector(xv, {T, 48}, dt);
      const Tensor dl = Tensor::from_vector(randn(T * 12, 7), {T, 12}, routing_dtype(dt));
      const double tol = dt == DType::kF64 ? 1e-12 : dt == DType::kF32 ? 1e-5 : 1e-2;
      const std::string what = std::string(dtype_name(dt)) + " tau=" + std::to_string(temperature);
      EXPECT_LT(rel_l2(cuda.forward(x.to(cfg.device), true).to_vector(),
                       cpu.forward(x, true).to_vector()),
                tol)
          << what;
      const Tensor dx = cpu.backward(dl), dxg = cuda.backward(dl.to(cfg.device));
      EXPECT_EQ(dxg.dtype(), dt);
      EXPECT_LT(rel_l2(dxg.to_vector(), dx.to_vector()), tol) << what;
      for (std::size_t i = 0; i < pc.size(); ++i) {
        const std::vector<double> g = pc[i]->grad.to_vector(), gg = pg[i]->grad.to_vector();
        if (i == 0 && temperature > std::log(100.0)) {
          EXPECT_EQ(g[0], 0.0) << what;
          EXPECT_EQ(gg[0], 0.0) << what;
        } else {
          EXPECT_LT(rel_l2(gg, g), tol) << what << " " << pc[i]->name;
        }
      }
    }
  }
}

}  // namespace
}  // namespace switchyard
