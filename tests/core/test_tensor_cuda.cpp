// Copies between views (strided tensors) on CUDA, and across host and device, against the same
// copies on the CPU; skipped without a GPU.
#include <gtest/gtest.h>

#include "reference/random.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace {

TEST(TensorCuda, StridedCopiesMatchTheCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const Device gpu = Device::cuda(0);
  const Tensor host = Tensor::from_vector(sy_ref::randn(4 * 6 * 5, 1), {4, 6, 5}, DType::kF32);
  const Tensor dev = host.to(gpu);
  // A view with a gap in every dimension: rows 1..3, columns 2..5, last index 1..4.
  const auto view = [](const Tensor& t) { return t.narrow(0, 1, 3).narrow(1, 2, 4).narrow(2, 1, 3); };
  // Device view -> contiguous device tensor, with and without a dtype change.
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF64}) {
    Tensor want = Tensor::empty({3, 4, 3}, dt);
    want.copy_from(view(host));
    Tensor got = Tensor::empty({3, 4, 3}, dt, gpu);
    got.copy_from(view(dev));
    EXPECT_EQ(got.to_vector(), want.to_vector()) << dtype_name(dt);
  }
  // Contiguous -> device view, from the device and from the host; the rest stays untouched.
  const Tensor src = Tensor::from_vector(sy_ref::randn(3 * 4 * 3, 2), {3, 4, 3}, DType::kF32);
  Tensor want = host.clone();
  Tensor target = want.narrow(0, 1, 3).narrow(1, 2, 4).narrow(2, 1, 3);
  target.copy_from(src);
  for (bool from_host : {false, true}) {
    Tensor d = dev.clone();
    Tensor dv = view(d);
    dv.copy_from(from_host ? src : src.to(gpu));
    EXPECT_EQ(d.to_vector(), want.to_vector()) << "from the host: " << from_host;
  }
  // Device view -> host; and a transposed 2-d view.
  EXPECT_EQ(view(dev).to(Device::cpu()).to_vector(), view(host).to_vector());
  Tensor cols = Tensor::empty({5, 6}, DType::kF32, gpu);
  const Tensor t_host = host.select(0, 2);  // [6, 5]
  Tensor t_want = Tensor::empty({5, 6}, DType::kF32);
  // Fill row by row on both sides: cols[j, i] = t[i, j].
  for (index_t j = 0; j < 5; ++j) {
    t_want.select(0, j).copy_from(t_host.narrow(1, j, 1).reshape({6}));
    cols.select(0, j).copy_from(dev.select(0, 2).narrow(1, j, 1).reshape({6}));
  }
  EXPECT_EQ(cols.to_vector(), t_want.to_vector());
}

}  // namespace
}  // namespace switchyard
