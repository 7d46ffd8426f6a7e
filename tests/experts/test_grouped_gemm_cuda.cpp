// The CUDA grouped GEMM against the CPU one (one BLAS GEMM per group) on the same inputs;
// skipped without a GPU.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "experts/grouped_gemm.h"
#include "reference/compare.h"
#include "reference/random.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

using sy_ref::randn;
using sy_ref::rel_l2;

class GroupedGemmCuda : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

Tensor offsets_of(const std::vector<index_t>& counts) {
  std::vector<double> off(counts.size() + 1, 0.0);
  for (std::size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  return Tensor::from_vector(off, {static_cast<index_t>(off.size())}, DType::kI64);
}

index_t total(const std::vector<index_t>& counts) {
  index_t r = 0;
  for (index_t c : counts) r += c;
  return r;
}

// bf16 keeps 8 bits of mantissa, f16 11: the one rounding of each output dominates.
double tolerance(DType dt) { return dt == DType::kBF16 ? 1e-2 : 2e-3; }

void expect_varying_m_matches_cpu(DType dt, const std::vector<index_t>& counts, index_t n,
                                  index_t k, bool trans_b) {
  const index_t E = static_cast<index_t>(counts.size()), R = total(counts);
  const Device gpu = Device::cuda(0);
  const Tensor a = Tensor::from_vector(randn(R * k, 1), {R, k}, dt);
  const Tensor b =
      Tensor::from_vector(randn(E * k * n, 2), trans_b ? Shape{E, n, k} : Shape{E, k, n}, dt);
  const Tensor off = offsets_of(counts);
  Tensor c = Tensor::zeros({R, n}, dt);
  grouped_gemm_varying_m(a, b, trans_b, off, c);
  Tensor cg = Tensor::empty({R, n}, dt, gpu);
  cg.fill(1e4);  // every row belongs to a group: nothing of the fill may survive
  grouped_gemm_varying_m(a.to(gpu), b.to(gpu), trans_b, off.to(gpu), cg);
  EXPECT_LT(rel_l2(cg.to_vector(), c.to_vector()), tolerance(dt))
      << E << " groups, R=" << R << " N=" << n << " K=" << k << (trans_b ? " transposed" : "");
}

void expect_varying_k_matches_cpu(DType dt, const std::vector<index_t>& counts, index_t m,
                                  index_t n, double beta) {
  const index_t E = static_cast<index_t>(counts.size()), R = total(counts);
  const Device gpu = Device::cuda(0);
  const Tensor a = Tensor::from_vector(randn(R * m, 3), {R, m}, dt);
  const Tensor b = Tensor::from_vector(randn(R * n, 4), {R, n}, dt);
  const Tensor off = offsets_of(counts);
  Tensor c = Tensor::from_vector(randn(E * m * n, 5), {E, m, n}, dt);
  Tensor cg = c.to(gpu);
  grouped_gemm_varying_k(a, b, off, c, beta);
  grouped_gemm_varying_k(a.to(gpu), b.to(gpu), off.to(gpu), cg, beta);
  const std::vector<double> got = cg.to_vector(), want = c.to_vector();
  EXPECT_LT(rel_l2(got, want), tolerance(dt))
      << E << " groups, R=" << R << " M=" << m << " N=" << n << " beta=" << beta;
  // Groups without rows: exactly zero (beta 0) or untouched (beta 1).
  for (index_t e = 0; e < E; ++e) {
    if (counts[e] != 0) continue;
    for (index_t i = e * m * n; i < (e + 1) * m * n; ++i)
      ASSERT_EQ(got[i], want[i]) << "group " << e << " has no rows";
  }
}

TEST_P(GroupedGemmCuda, VaryingMMatchesTheCpuWithEmptyAndRaggedGroups) {
  // Rows 0, 1, 127 and counts that are no multiple of the tile; K=264 and N=136 leave partial
  // tiles in both dimensions.
  const std::vector<index_t> counts{0, 1, 127, 200, 0, 300, 129, 64};
  expect_varying_m_matches_cpu(GetParam(), counts, 136, 264, false);
  expect_varying_m_matches_cpu(GetParam(), counts, 136, 264, true);
}

TEST_P(GroupedGemmCuda, VaryingMMatchesTheCpuWithAllRowsInOneGroup) {
  expect_varying_m_matches_cpu(GetParam(), {0, 0, 777, 0}, 256, 128, false);
  expect_varying_m_matches_cpu(GetParam(), {0, 0, 777, 0}, 256, 128, true);
}

TEST_P(GroupedGemmCuda, VaryingMMatchesTheCpuForNarrowMatrices) {
  expect_varying_m_matches_cpu(GetParam(), {5, 129, 0, 64}, 8, 40, true);    // N = 8
  expect_varying_m_matches_cpu(GetParam(), {5, 129, 0, 64}, 264, 8, false);  // K = 8
}

TEST_P(GroupedGemmCuda, VaryingKMatchesTheCpuAndHandlesEmptyGroups) {
  const std::vector<index_t> counts{0, 1, 127, 200, 0, 300};
  expect_varying_k_matches_cpu(GetParam(), counts, 136, 264, 0.0);
  expect_varying_k_matches_cpu(GetParam(), counts, 136, 264, 1.0);
  expect_varying_k_matches_cpu(GetParam(), {0, 555, 0}, 8, 136, 0.0);
  expect_varying_k_matches_cpu(GetParam(), {0, 0}, 64, 64, 0.0);  // no rows at all
  expect_varying_k_matches_cpu(GetParam(), {0, 0}, 64, 64, 1.0);
}

// Deep reductions (K >= 4096 for varying M, 2048 rows per group and more for varying K).
TEST_P(GroupedGemmCuda, DeepReductionsMatchTheCpu) {
  expect_varying_m_matches_cpu(GetParam(), {0, 130, 300, 1}, 136, 4104, true);
  expect_varying_m_matches_cpu(GetParam(), {0, 130, 300, 1}, 136, 4104, false);
  expect_varying_k_matches_cpu(GetParam(), {2100, 0, 2500, 3700}, 136, 72, 0.0);
  expect_varying_k_matches_cpu(GetParam(), {2100, 0, 2500, 3700}, 136, 72, 1.0);
}

// On sm_90a the kernel's k-tile depth follows the GEMM's arithmetic intensity (flops per byte
// of A, B and C): the other tests' shapes are memory-bound (32 deep), these compute-bound
// (about 530 flops per byte: 64 deep), with partial tiles in every dimension.
TEST_P(GroupedGemmCuda, ComputeBoundShapesMatchTheCpu) {
  expect_varying_m_matches_cpu(GetParam(), {2000, 2100}, 1416, 1416, true);
  expect_varying_m_matches_cpu(GetParam(), {2000, 2100}, 1416, 1416, false);
  expect_varying_k_matches_cpu(GetParam(), {2000, 2100}, 1416, 1416, 0.0);
  expect_varying_k_matches_cpu(GetParam(), {2000, 2100}, 1416, 1416, 1.0);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GroupedGemmCuda, ::testing::Values(DType::kBF16, DType::kF16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(GroupedGemmCudaErrors, RejectsSizesThatAreNoMultipleOfEight) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const Device gpu = Device::cuda(0);
  const Tensor a = Tensor::zeros({10, 16}, DType::kBF16, gpu);
  const Tensor b = Tensor::zeros({2, 16, 12}, DType::kBF16, gpu);
  const Tensor off = offsets_of({4, 6}).to(gpu);
  Tensor c = Tensor::zeros({10, 12}, DType::kBF16, gpu);
  EXPECT_THROW(grouped_gemm_varying_m(a, b, false, off, c), Error);
}

TEST(GroupedGemmCudaErrors, RejectsF32) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const Device gpu = Device::cuda(0);
  const Tensor a = Tensor::zeros({10, 16}, DType::kF32, gpu);
  const Tensor b = Tensor::zeros({2, 16, 16}, DType::kF32, gpu);
  const Tensor off = offsets_of({4, 6}).to(gpu);
  Tensor c = Tensor::zeros({10, 16}, DType::kF32, gpu);
  EXPECT_THROW(grouped_gemm_varying_m(a, b, false, off, c), Error);
}

TEST(GroupedGemmCpu, RejectsOffsetsThatDoNotCoverTheRows) {
  const Tensor a = Tensor::zeros({10, 16}, DType::kF32);
  const Tensor b = Tensor::zeros({2, 16, 16}, DType::kF32);
  Tensor c = Tensor::zeros({10, 16}, DType::kF32);
  EXPECT_THROW(grouped_gemm_varying_m(a, b, false, offsets_of({4, 5}), c), Error);
}

}  // namespace
}  // namespace switchyard
