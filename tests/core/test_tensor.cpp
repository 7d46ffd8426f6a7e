#include <gtest/gtest.h>

#include <vector>

#include "switchyard/error.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace {

std::vector<double> iota(int n) {
  std::vector<double> v(n);
  for (int i = 0; i < n; ++i) v[i] = i;
  return v;
}

TEST(Tensor, FromBlobWrapsCallerMemoryWithoutCopy) {
  std::vector<float> mem = {1, 2, 3, 4, 5, 6};
  Tensor t = Tensor::from_blob(mem.data(), {2, 3}, {}, DType::kF32);
  EXPECT_EQ(t.data_ptr(), mem.data());
  mem[4] = 50;
  EXPECT_EQ(t.to_vector()[4], 50);
  EXPECT_TRUE(t.is_contiguous());
}

TEST(Tensor, StridedViewsReadTheRightElements) {
  std::vector<float> mem = {0, 1, 2, 3, 4, 5};  // a [2, 3] matrix
  // Its transpose [3, 2] as a strided view.
  Tensor tt = Tensor::from_blob(mem.data(), {3, 2}, {1, 3}, DType::kF32);
  EXPECT_FALSE(tt.is_contiguous());
  EXPECT_EQ(tt.to_vector(), (std::vector<double>{0, 3, 1, 4, 2, 5}));
  Tensor c = tt.contiguous();
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_EQ(c.to_vector(), tt.to_vector());
  EXPECT_EQ(tt.reshape({6}).to_vector(), tt.to_vector());
}

TEST(Tensor, NarrowAndSelectShareStorage) {
  Tensor t = Tensor::from_vector(iota(12), {3, 4});
  Tensor row = t.select(0, 1);
  EXPECT_EQ(row.to_vector(), (std::vector<double>{4, 5, 6, 7}));
  Tensor col = t.narrow(1, 2, 1);
  EXPECT_EQ(col.to_vector(), (std::vector<double>{2, 6, 10}));
  row.fill(-1);
  EXPECT_EQ(t.to_vector()[5], -1);
  EXPECT_THROW(t.narrow(1, 3, 2), Error);
}

TEST(Tensor, ConvertsDtypesWithRounding) {
  Tensor t = Tensor::from_vector({1.0, 1.0 + 1.0 / 256, -3.0}, {3}, DType::kBF16);
  EXPECT_EQ(t.to_vector(), (std::vector<double>{1.0, 1.0, -3.0}));
  Tensor h = t.to(DType::kF16).to(DType::kF64);
  EXPECT_EQ(h.to_vector(), (std::vector<double>{1.0, 1.0, -3.0}));
  Tensor i = Tensor::from_vector({7, 1LL << 40}, {2}, DType::kI64);
  EXPECT_EQ(i.data<std::int64_t>()[1], 1LL << 40);
}

TEST(Tensor, ViewInfersOneSizeAndRejectsMismatches) {
  Tensor t = Tensor::zeros({4, 6}, DType::kF32);
  EXPECT_EQ(t.view({-1, 3}).sizes(), (Shape{8, 3}));
  EXPECT_THROW(t.view({5, 5}), Error);
  EXPECT_THROW(t.view({-1, -1}), Error);
  EXPECT_THROW(t.data<double>(), Error);  // wrong element type
}

TEST(Tensor, AllocatorTracksPeakMemory) {
  reset_peak_memory();
  const auto before = memory_stats();
  {
    Tensor big = Tensor::empty({1 << 20}, DType::kF32);
    EXPECT_GE(memory_stats().current_bytes, before.current_bytes + (4 << 20));
  }
  const auto after = memory_stats();
  EXPECT_EQ(after.current_bytes, before.current_bytes);
  EXPECT_GE(after.peak_bytes, before.current_bytes + (4 << 20));
}

TEST(Tensor, EmptyShapesAreValid) {
  Tensor t = Tensor::zeros({0, 5}, DType::kF32);
  EXPECT_TRUE(t.defined());
  EXPECT_EQ(t.numel(), 0);
  EXPECT_TRUE(t.to_vector().empty());
  EXPECT_EQ(t.clone().sizes(), (Shape{0, 5}));
}

TEST(Tensor, CudaTensorsAreRejectedByCpuOps) {
  if (cuda_available()) GTEST_SKIP() << "a GPU is present: CUDA tensors are valid here";
  float dummy = 0;
  Tensor t = Tensor::from_blob(&dummy, {1}, {}, DType::kF32, Device::cuda(0));
  EXPECT_THROW(t.to_vector(), Error);
  EXPECT_THROW(Tensor::empty({1}, DType::kF32, Device::cuda(0)), Error);
}

}  // namespace
}  // namespace switchyard
