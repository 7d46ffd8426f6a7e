// CUDA FFN experts against the CPU experts with the same parameters; skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "experts/ffn.h"
#include "reference/compare.h"
#include "reference/random.h"

namespace switchyard {
namespace {

using sy_ref::randn;
using sy_ref::rel_l2;

struct Case {
  Activation act;
  DType dtype;
  bool equal_rows;  // padded layout: one batched GEMM
  index_t out = 0;  // output_dim (0: d)
};

class FfnCuda : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

// Forward and backward of the same experts on the CPU and on CUDA, offsets [E+1].
void expect_matches_cpu(Activation act, DType dt, index_t d, index_t h, index_t out,
                        const std::vector<double>& offv) {
  const index_t E = static_cast<index_t>(offv.size()) - 1, o = out > 0 ? out : d;
  const index_t R = static_cast<index_t>(offv.back());
  FfnShape s{E, d, h, act, true, true, dt, Device::cpu(), 0, out};
  FfnShape sg = s;
  sg.device = Device::cuda(0);
  FfnExperts cpu(s, "experts.", false, 5, 0), gpu(sg, "experts.", false, 5, 0);
  for (std::size_t i = 0; i < cpu.parameters().size(); ++i)
    EXPECT_EQ(cpu.parameters()[i]->value.to_vector(), gpu.parameters()[i]->value.to_vector())
        << "initialisation must not depend on the device";
  const Tensor x = Tensor::from_vector(randn(R * d, 1), {R, d}, dt);
  const Tensor dy = Tensor::from_vector(randn(R * o, 2), {R, o}, dt);
  const Tensor off = Tensor::from_vector(offv, {E + 1}, DType::kI64);
  const double tol = dt == DType::kF64 ? 1e-12 : dt == DType::kF32 ? 1e-5 : 3e-2;

  const auto y = cpu.forward(x, off, true).to_vector();
  const auto yg = gpu.forward(x.to(sg.device), off.to(sg.device), true).to_vector();
  EXPECT_LT(rel_l2(yg, y), tol);
  const auto dx = cpu.backward(dy).to_vector();
  const auto dxg = gpu.backward(dy.to(sg.device)).to_vector();
  EXPECT_LT(rel_l2(dxg, dx), tol);
  for (std::size_t i = 0; i < cpu.parameters().size(); ++i)
    EXPECT_LT(rel_l2(gpu.parameters()[i]->grad.to_vector(), cpu.parameters()[i]->grad.to_vector()),
              tol)
        << cpu.parameters()[i]->name;
}

TEST_P(FfnCuda, MatchesTheCpuExpertsForwardAndBackward) {
  const auto [act, dt, equal, out] = GetParam();
  expect_matches_cpu(act, dt, 96, 80, out,
                     equal ? std::vector<double>{0, 50, 100, 150, 200}
                           : std::vector<double>{0, 70, 70, 133, 200});  // one empty
}

// bf16 relu experts on the grouped kernels with several tiles per expert, and deep reductions
// (K >= 4096 for the da GEMM, 2048 rows per expert for the weight gradients). Covers the fused
// epilogues (bias, relu, relu's backward).
TEST(FfnCudaGrouped, ManyTilesAndDeepReductionsMatchTheCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  expect_matches_cpu(Activation::kRelu, DType::kBF16, 264, 520, 0, {0, 300, 300, 901, 1500});
  expect_matches_cpu(Activation::kRelu, DType::kBF16, 4104, 136, 0, {0, 2100, 4200});
}

// Bias gradients in both forms of their kernel: fc2's (1152 columns x 64 experts: one block per
// expert and slab of columns fills an H100) adds straight into the gradient, fc1's (64 columns)
// sums chunks of each expert's rows first; some experts have no rows.
TEST(FfnCudaBiasGrad, ManyExpertsAndFewMatchTheCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  std::vector<double> off{0};
  for (int e = 0; e < 64; ++e) off.push_back(off.back() + e % 4);
  expect_matches_cpu(Activation::kRelu, DType::kF32, 1152, 64, 0, off);
}

INSTANTIATE_TEST_SUITE_P(Cases, FfnCuda,
                         ::testing::Values(Case{Activation::kRelu, DType::kF32, true},
                                           Case{Activation::kGelu, DType::kF32, false},
                                           Case{Activation::kSilu, DType::kF64, false},
                                           Case{Activation::kSwiGLU, DType::kF32, true},
                                           Case{Activation::kGeGLU, DType::kBF16, false},
                                           Case{Activation::kGeluTanh, DType::kF16, true},
                                           Case{Activation::kRelu, DType::kBF16, true},
                                           Case{Activation::kRelu, DType::kBF16, false},
                                           Case{Activation::kRelu, DType::kF32, false},
                                           Case{Activation::kSwiGLU, DType::kBF16, false},
                                           // output_dim: grouped kernel (a multiple of 8) and
                                           // not, batched and per expert
                                           Case{Activation::kRelu, DType::kBF16, false, 40},
                                           Case{Activation::kRelu, DType::kBF16, false, 36},
                                           Case{Activation::kGelu, DType::kF32, true, 56}),
                         [](const auto& info) {
                           return std::string(to_string(info.param.act)) +
                                  dtype_name(info.param.dtype) +
                                  (info.param.equal_rows ? "Batched" : "PerExpert") +
                                  (info.param.out ? "Out" + std::to_string(info.param.out) : "");
                         });

}  // namespace
}  // namespace switchyard
