// The gates and the Tensor GEMM on CUDA against the CPU; skipped without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "experts/gemm.h"
#include "reference/compare.h"
#include "reference/random.h"
#include "core/dtype_dispatch.h"
#include "routing/gate.h"

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
  }
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
