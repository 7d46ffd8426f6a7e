// Encode/decode against a naive per-token loop, and their backward as exact adjoints.
#include <gtest/gtest.h>

#include <cmath>

#include "dispatch/dispatch.h"
#include "reference/compare.h"
#include "reference/plans.h"
#include "reference/random.h"
#include "routing/router.h"

namespace switchyard {
namespace {

using sy_ref::randn;
using sy_ref::rel_l2;

// A plan with drops by default (capacity_factor 0.5).
RoutingPlan make_plan(index_t T, index_t E, int k, Layout layout, DType dtype, double cf = 0.5) {
  return sy_ref::random_plan(T, E, k, layout, dtype, cf);
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

struct Case {
  Layout layout;
  bool postscore;
};

class DispatchCpu : public ::testing::TestWithParam<Case> {};

TEST_P(DispatchCpu, MatchesANaivePerTokenLoop) {
  const auto [layout, post] = GetParam();
  const index_t T = 19, E = 4, d = 11;
  const int k = 2;
  RoutingPlan plan = make_plan(T, E, k, layout, DType::kF64);
  ASSERT_GT(plan.dropped, 0);
  const std::vector<double> xv = randn(T * d, 2);
  const Tensor x = Tensor::from_vector(xv, {T, d}, DType::kF64);
  const std::vector<double> w = plan.weight.to_vector(), row = plan.row.to_vector();

  const std::vector<double> buf = encode(plan, x, !post).to_vector();
  std::vector<double> expect_buf(static_cast<std::size_t>(plan.num_rows * d), 0.0);
  for (index_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      if (row[t * k + j] < 0) continue;
      for (index_t l = 0; l < d; ++l)
        expect_buf[static_cast<index_t>(row[t * k + j]) * d + l] =
            (post ? 1.0 : w[t * k + j]) * xv[t * d + l];
    }
  EXPECT_EQ(buf, expect_buf);

  const std::vector<double> outv = randn(plan.num_rows * d, 3);
  const Tensor out = Tensor::from_vector(outv, {plan.num_rows, d}, DType::kF64);
  const std::vector<double> y = decode(plan, out, post).to_vector();
  for (index_t t = 0; t < T; ++t)
    for (index_t l = 0; l < d; ++l) {
      double s = 0;
      for (int j = 0; j < k; ++j)
        if (row[t * k + j] >= 0)
          s += (post ? w[t * k + j] : 1.0) * outv[static_cast<index_t>(row[t * k + j]) * d + l];
      EXPECT_NEAR(y[t * d + l], s, 1e-14);
    }
}

TEST_P(DispatchCpu, BackwardIsTheExactAdjoint) {
  const auto [layout, post] = GetParam();
  const index_t T = 19, E = 4, d = 11;
  RoutingPlan plan = make_plan(T, E, 3, layout, DType::kF64);
  const Tensor x = Tensor::from_vector(randn(T * d, 4), {T, d}, DType::kF64);
  const Tensor dbuf =
      Tensor::from_vector(randn(plan.num_rows * d, 5), {plan.num_rows, d}, DType::kF64);
  const Tensor dy = Tensor::from_vector(randn(T * d, 6), {T, d}, DType::kF64);
  const Tensor out =
      Tensor::from_vector(randn(plan.num_rows * d, 7), {plan.num_rows, d}, DType::kF64);
  Tensor dw = Tensor::zeros({T, 3}, DType::kF64);
  // <encode(x), dbuf> = <x, encode_backward(dbuf)> and <decode(out), dy> = <out,
  // decode_backward(dy)>.
  const Tensor dx = encode_backward(plan, dbuf, x, !post, dw);
  EXPECT_NEAR(dot(encode(plan, x, !post).to_vector(), dbuf.to_vector()),
              dot(x.to_vector(), dx.to_vector()), 1e-12);
  const Tensor dout = decode_backward(plan, dy, out, post, dw);
  EXPECT_NEAR(dot(decode(plan, out, post).to_vector(), dy.to_vector()),
              dot(out.to_vector(), dout.to_vector()), 1e-12);
  // Padding rows get zero gradient.
  const std::vector<double> rc = plan.row_choice.to_vector(), dov = dout.to_vector();
  for (index_t r = 0; r < plan.num_rows; ++r)
    if (rc[r] < 0) {
      for (index_t l = 0; l < d; ++l) EXPECT_EQ(dov[r * d + l], 0.0);
    }
}

TEST_P(DispatchCpu, WeightGradientMatchesFiniteDifferences) {
  const auto [layout, post] = GetParam();
  const index_t T = 9, E = 3, d = 5;
  const int k = 2;
  RoutingPlan plan = make_plan(T, E, k, layout, DType::kF64);
  const Tensor x = Tensor::from_vector(randn(T * d, 8), {T, d}, DType::kF64);
  const Tensor dy = Tensor::from_vector(randn(T * d, 9), {T, d}, DType::kF64);
  // f(w) = <decode(g(encode(x, w)), w), dy> with g = multiply each row by 1.5 + row index.
  auto f = [&](const RoutingPlan& p) {
    Tensor buf = encode(p, x, !post);
    std::vector<double> b = buf.to_vector();
    for (index_t r = 0; r < p.num_rows; ++r)
      for (index_t l = 0; l < d; ++l) b[r * d + l] *= 1.5 + r;
    return dot(decode(p, Tensor::from_vector(b, {p.num_rows, d}, DType::kF64), post).to_vector(),
               dy.to_vector());
  };
  Tensor buf = encode(plan, x, !post);
  std::vector<double> b = buf.to_vector();
  for (index_t r = 0; r < plan.num_rows; ++r)
    for (index_t l = 0; l < d; ++l) b[r * d + l] *= 1.5 + r;
  const Tensor out = Tensor::from_vector(b, {plan.num_rows, d}, DType::kF64);
  Tensor dw = Tensor::zeros({T, k}, DType::kF64);
  std::vector<double> dob = decode_backward(plan, dy, out, post, dw).to_vector();
  for (index_t r = 0; r < plan.num_rows; ++r)
    for (index_t l = 0; l < d; ++l) dob[r * d + l] *= 1.5 + r;
  encode_backward(plan, Tensor::from_vector(dob, {plan.num_rows, d}, DType::kF64), x, !post, dw);
  const std::vector<double> g = dw.to_vector(), w0 = plan.weight.to_vector(),
                            row = plan.row.to_vector();
  for (std::size_t i = 0; i < w0.size(); ++i) {
    RoutingPlan pp = plan, pm = plan;
    std::vector<double> wp = w0, wm = w0;
    wp[i] += 1e-6;
    wm[i] -= 1e-6;
    pp.weight = Tensor::from_vector(wp, {T, k}, DType::kF64);
    pm.weight = Tensor::from_vector(wm, {T, k}, DType::kF64);
    const double fd = (f(pp) - f(pm)) / 2e-6;
    EXPECT_NEAR(g[i], fd, 1e-7) << "choice " << i;
    if (row[i] < 0) {
      EXPECT_EQ(g[i], 0.0) << "a dropped choice gets no weight gradient";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, DispatchCpu,
                         ::testing::Values(Case{Layout::kPadded, true}, Case{Layout::kPacked, true},
                                           Case{Layout::kPadded, false},
                                           Case{Layout::kPacked, false}),
                         [](const auto& info) {
                           return std::string(to_string(info.param.layout)) +
                                  (info.param.postscore ? "Postscore" : "Prescore");
                         });

TEST(DispatchCpuDtypes, Bf16AndF32AgreeWithF64WithinStoragePrecision) {
  const index_t T = 33, E = 4, d = 16;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    RoutingPlan plan = make_plan(T, E, 2, Layout::kPacked, dt);
    RoutingPlan plan64 = plan;
    plan64.weight = plan.weight.to(DType::kF64);
    const std::vector<double> xv = randn(T * d, 10);
    const Tensor x = Tensor::from_vector(xv, {T, d}, dt);
    const Tensor x64 = x.to(DType::kF64);  // the same rounded values
    const std::vector<double> y = decode(plan, encode(plan, x, false), true).to_vector();
    const std::vector<double> y64 = decode(plan64, encode(plan64, x64, false), true).to_vector();
    double num = 0, den = 0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      num += (y[i] - y64[i]) * (y[i] - y64[i]);
      den += y64[i] * y64[i];
    }
    const double tol = dt == DType::kF32 ? 1e-6 : dt == DType::kF16 ? 1e-3 : 1e-2;
    EXPECT_LT(std::sqrt(num / den), tol) << dtype_name(dt);
  }
}

TEST(DispatchCpuDtypes, RunsAreBitwiseReproducible) {
  RoutingPlan plan = make_plan(64, 8, 2, Layout::kPacked, DType::kF32, 0.0);
  const Tensor x = Tensor::from_vector(randn(64 * 32, 11), {64, 32}, DType::kF32);
  EXPECT_EQ(decode(plan, encode(plan, x, false), true).to_vector(),
            decode(plan, encode(plan, x, false), true).to_vector());
}

}  // namespace
}  // namespace switchyard
