// CUDA dispatch against the CPU backend on the same plan; skipped where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "dispatch/dispatch.h"
#include "reference/compare.h"
#include "reference/plans.h"
#include "reference/random.h"
#include "routing/router.h"

namespace switchyard {
namespace {

using sy_ref::randn;
using sy_ref::rel_l2;

using sy_ref::random_plan;

struct Case {
  Layout layout;
  bool post;
  DType dtype;
};

class DispatchCuda : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

// With drops (capacity factor 0.75) and, padded, with padding rows (2.0); k = 11 spans more than
// one of the backward kernels' chunks of choices.
TEST_P(DispatchCuda, MatchesTheCpuBackendForwardAndBackward) {
  const auto [layout, post, dt] = GetParam();
  const index_t T = 989, E = 12, d = 111;
  for (const auto& [k, cf] : {std::pair{2, 0.75}, std::pair{2, 2.0}, std::pair{11, 0.75}}) {
    if (cf > 1 && layout == Layout::kPacked) continue;
    SCOPED_TRACE("k " + std::to_string(k) + ", capacity factor " + std::to_string(cf));
    const RoutingPlan plan = random_plan(T, E, k, layout, dt, cf);
    if (cf < 1) {
      ASSERT_GT(plan.dropped, 0);
    } else {
      ASSERT_GT(plan.num_rows, T * k - plan.dropped) << "no padding rows";
    }
    const RoutingPlan gplan = plan_to_device(plan, Device::cuda(0));
    const Tensor x = Tensor::from_vector(randn(T * d, 2), {T, d}, dt);
    const Tensor out = Tensor::from_vector(randn(plan.num_rows * d, 3), {plan.num_rows, d}, dt);
    const Tensor dy = Tensor::from_vector(randn(T * d, 4), {T, d}, dt);
    const double tol = dt == DType::kF64   ? 1e-14
                       : dt == DType::kF32 ? 1e-6
                       : dt == DType::kF16 ? 1e-3
                                           : 1e-2;

    EXPECT_LT(rel_l2(encode(gplan, x.to(Device::cuda(0)), !post).to_vector(),
                     encode(plan, x, !post).to_vector()),
              tol);
    EXPECT_LT(rel_l2(decode(gplan, out.to(Device::cuda(0)), post).to_vector(),
                     decode(plan, out, post).to_vector()),
              tol);

    const DType rd = plan.weight.dtype();
    Tensor dw = Tensor::zeros({T, k}, rd), gdw = dw.to(Device::cuda(0));
    const Tensor dbuf = decode_backward(plan, dy, out, post, dw);
    const Tensor gdbuf =
        decode_backward(gplan, dy.to(Device::cuda(0)), out.to(Device::cuda(0)), post, gdw);
    EXPECT_LT(rel_l2(gdbuf.to_vector(), dbuf.to_vector()), tol);
    const Tensor dx = encode_backward(plan, dbuf, x, !post, dw);
    const Tensor gdx = encode_backward(gplan, gdbuf, x.to(Device::cuda(0)), !post, gdw);
    EXPECT_LT(rel_l2(gdx.to_vector(), dx.to_vector()), tol);
    EXPECT_LT(rel_l2(gdw.to_vector(), dw.to_vector()), dt == DType::kF64 ? 1e-12 : 1e-5);
  }
}

TEST_P(DispatchCuda, RunsAreBitwiseReproducible) {
  const auto [layout, post, dt] = GetParam();
  const index_t T = 300, E = 4, d = 64;
  const RoutingPlan gplan = plan_to_device(random_plan(T, E, 2, layout, dt, 0.0), Device::cuda(0));
  const Tensor x = Tensor::from_vector(randn(T * d, 5), {T, d}, dt).to(Device::cuda(0));
  auto run = [&] {
    Tensor dw = Tensor::zeros({T, 2}, gplan.weight.dtype(), Device::cuda(0));
    const Tensor buf = encode(gplan, x, !post);
    const Tensor dbuf = decode_backward(gplan, x, buf, post, dw);
    const Tensor dx = encode_backward(gplan, dbuf, x, !post, dw);
    std::vector<double> all = decode(gplan, buf, post).to_vector();
    for (double v : dx.to_vector()) all.push_back(v);
    for (double v : dw.to_vector()) all.push_back(v);
    return all;
  };
  EXPECT_EQ(run(), run());
}

INSTANTIATE_TEST_SUITE_P(Cases, DispatchCuda,
                         ::testing::Values(Case{Layout::kPadded, true, DType::kF32},
                                           Case{Layout::kPacked, true, DType::kF32},
                                           Case{Layout::kPacked, false, DType::kF32},
                                           Case{Layout::kPadded, true, DType::kBF16},
                                           Case{Layout::kPacked, false, DType::kF16},
                                           Case{Layout::kPacked, true, DType::kF64}),
                         [](const auto& info) {
                           return std::string(to_string(info.param.layout)) +
                                  (info.param.post ? "Postscore" : "Prescore") +
                                  dtype_name(info.param.dtype);
                         });

TEST(DispatchCudaLarge, ExpertBufferPast2To31Elements) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  // One expert, one choice per token, capacity = T: a [140000, 16384] bf16 buffer holds
  // 2.29e9 > 2^31 elements; the last row must be the last token.
  const index_t T = 140000, d = 16384;
  const RoutingPlan gplan =
      plan_to_device(random_plan(T, 1, 1, Layout::kPadded, DType::kBF16, 1.0), Device::cuda(0));
  ASSERT_GT(gplan.num_rows * d, index_t{1} << 31);
  Tensor x = Tensor::empty({T, d}, DType::kBF16, Device::cuda(0));
  x.fill(0.5);
  x.narrow(0, T - 1, 1)
      .copy_from(Tensor::from_vector(std::vector<double>(d, 3.0), {1, d}, DType::kBF16));
  const Tensor buf = encode(gplan, x, false);
  const std::vector<double> last = buf.narrow(0, gplan.num_rows - 1, 1).to_vector();
  EXPECT_EQ(last.front(), 3.0);
  EXPECT_EQ(last.back(), 3.0);
  const std::vector<double> before = buf.narrow(0, gplan.num_rows - 2, 1).to_vector();
  EXPECT_EQ(before.back(), 0.5);
}

}  // namespace
}  // namespace switchyard
