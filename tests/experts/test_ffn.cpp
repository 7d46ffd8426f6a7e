// FFN experts against a naive per-row loop, and their gradients by finite differences (f64).
#include <gtest/gtest.h>

#include <cmath>

#include "experts/activation.h"
#include "experts/ffn.h"
#include "reference/compare.h"
#include "reference/random.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

using sy_ref::randn;
using sy_ref::rel_l2;

// d = 5, h = 4; the output width o = 5 (output_dim 0) or `out`.
FfnShape shape(Activation act, bool bias, DType dt = DType::kF64, index_t out = 0) {
  return FfnShape{3, 5, 4, act, bias, bias, dt, Device::cpu(), 0, out};
}

// Rows of 3 experts: 4, 0 (an expert with no rows) and 3 rows.
const std::vector<double> kOffsets = {0, 4, 4, 7};

double naive_activation(Activation a, double x) {
  switch (a) {
    case Activation::kRelu:
      return x > 0 ? x : 0;
    case Activation::kGelu:
      return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case Activation::kGeluTanh:
      return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    case Activation::kSilu:
      return x / (1 + std::exp(-x));
    case Activation::kSwiGLU:
      return naive_activation(Activation::kSilu, x);
    case Activation::kGeGLU:
      return naive_activation(Activation::kGelu, x);
  }
  return 0;
}

class FfnCpu : public ::testing::TestWithParam<Activation> {};

TEST_P(FfnCpu, MatchesANaiveLoop) {
  const Activation act = GetParam();
  for (index_t out : {0, 3}) {  // output_dim: d, and another width (Tutel's output_dim)
    SCOPED_TRACE("output_dim " + std::to_string(out));
    const FfnShape s = shape(act, true, DType::kF64, out);
    FfnExperts ffn(s, "experts.", false, 7, 0);
    const index_t R = 7, d = 5, h = 4, h1 = is_gated(act) ? 8 : 4, o = s.out_dim();
    ASSERT_EQ(ffn.parameters()[1]->value.sizes(), (Shape{3, h, o}));
    const std::vector<double> xv = randn(R * d, 1);
    const std::vector<double> y = ffn.forward(Tensor::from_vector(xv, {R, d}, DType::kF64),
                                              Tensor::from_vector(kOffsets, {4}, DType::kI64), true)
                                      .to_vector();
    const auto w1 = ffn.parameters()[0]->value.to_vector(),
               w2 = ffn.parameters()[1]->value.to_vector();
    const auto b1 = ffn.parameters()[2]->value.to_vector(),
               b2 = ffn.parameters()[3]->value.to_vector();
    for (index_t r = 0; r < R; ++r) {
      const index_t e = r < 4 ? 0 : 2;
      std::vector<double> hid(h1), a(h);
      for (index_t j = 0; j < h1; ++j) {
        hid[j] = b1[e * h1 + j];
        for (index_t l = 0; l < d; ++l) hid[j] += xv[r * d + l] * w1[(e * h1 + j) * d + l];
      }
      for (index_t j = 0; j < h; ++j)
        a[j] = naive_activation(act, hid[j]) * (is_gated(act) ? hid[h + j] : 1.0);
      for (index_t l = 0; l < o; ++l) {
        double want = b2[e * o + l];
        for (index_t j = 0; j < h; ++j) want += a[j] * w2[(e * h + j) * o + l];
        EXPECT_NEAR(y[r * o + l], want, 1e-13) << "row " << r << " col " << l;
      }
    }
  }
}

TEST_P(FfnCpu, GradientsMatchFiniteDifferences) {
  const Activation act = GetParam();
  for (bool bias : {true, false})
    for (index_t out : {0, 7}) {
      SCOPED_TRACE("output_dim " + std::to_string(out));
      FfnExperts ffn(shape(act, bias, DType::kF64, out), "experts.", false, 11, 0);
      const index_t R = 7, d = 5, o = out > 0 ? out : d;
      std::vector<double> xv = randn(R * d, 2);
      for (double& v : xv) v += v > 0 ? 0.05 : -0.05;  // keep relu inputs away from the kink
      const std::vector<double> dyv = randn(R * o, 3);
      const Tensor off = Tensor::from_vector(kOffsets, {4}, DType::kI64);
      auto f = [&](const std::vector<double>& x) {
        const std::vector<double> y =
            ffn.forward(Tensor::from_vector(x, {R, d}, DType::kF64), off, true).to_vector();
        double s = 0;
        for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * dyv[i];
        return s;
      };
      f(xv);
      const std::vector<double> dx =
          ffn.backward(Tensor::from_vector(dyv, {R, o}, DType::kF64)).to_vector();
      const double eps = 1e-6;
      for (std::size_t i = 0; i < xv.size(); ++i) {
        std::vector<double> xp = xv, xm = xv;
        xp[i] += eps;
        xm[i] -= eps;
        EXPECT_NEAR(dx[i], (f(xp) - f(xm)) / (2 * eps), 1e-7) << "dx " << i;
      }
      for (Parameter* p : ffn.parameters()) {
        const std::vector<double> g = p->grad.to_vector();
        std::vector<double> v = p->value.to_vector();
        for (std::size_t i = 0; i < v.size(); ++i) {
          const double v0 = v[i];
          v[i] = v0 + eps;
          p->value.copy_from(Tensor::from_vector(v, p->value.sizes(), DType::kF64));
          const double fp = f(xv);
          v[i] = v0 - eps;
          p->value.copy_from(Tensor::from_vector(v, p->value.sizes(), DType::kF64));
          const double fm = f(xv);
          v[i] = v0;
          p->value.copy_from(Tensor::from_vector(v, p->value.sizes(), DType::kF64));
          EXPECT_NEAR(g[i], (fp - fm) / (2 * eps), 1e-7) << p->name << " " << i;
        }
      }
    }
}

INSTANTIATE_TEST_SUITE_P(Activations, FfnCpu,
                         ::testing::Values(Activation::kRelu, Activation::kGelu,
                                           Activation::kGeluTanh, Activation::kSilu,
                                           Activation::kSwiGLU, Activation::kGeGLU),
                         [](const auto& info) { return std::string(to_string(info.param)); });

TEST(FfnCpuShapes, ParametersHaveTutelNamesShapesAndInitBounds) {
  FfnShape s{4, 16, 32, Activation::kSwiGLU, true, true, DType::kF32, Device::cpu()};
  FfnExperts ffn(s, "experts.", false, 1, 0);
  const auto params = ffn.parameters();
  ASSERT_EQ(params.size(), 4u);
  EXPECT_EQ(params[0]->name, "experts.batched_fc1_w");
  EXPECT_EQ(params[0]->value.sizes(), (Shape{4, 64, 16}));  // gated: 2h rows
  EXPECT_EQ(params[1]->name, "experts.batched_fc2_w");
  EXPECT_EQ(params[1]->value.sizes(), (Shape{4, 32, 16}));
  EXPECT_EQ(params[2]->value.sizes(), (Shape{4, 64}));
  EXPECT_EQ(params[3]->value.sizes(), (Shape{4, 16}));
  for (double v : params[0]->value.to_vector()) EXPECT_LE(std::fabs(v), 1 / std::sqrt(16.0));
  for (double v : params[1]->value.to_vector()) EXPECT_LE(std::fabs(v), 1 / std::sqrt(32.0));
}

TEST(FfnCpuShapes, LowPrecisionAgreesWithF64OnTheSameRoundedWeights) {
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    FfnShape s{2, 32, 48, Activation::kGelu, true, true, dt, Device::cpu()};
    FfnShape s64 = s;
    s64.dtype = DType::kF64;
    FfnExperts lo(s, "experts.", false, 3, 0), hi(s64, "experts.", false, 3, 0);
    for (std::size_t i = 0; i < lo.parameters().size(); ++i)
      hi.parameters()[i]->value.copy_from(lo.parameters()[i]->value);
    const Tensor off = Tensor::from_vector({0, 10, 30}, {3}, DType::kI64);
    const Tensor x = Tensor::from_vector(randn(30 * 32, 5), {30, 32}, dt);
    const auto y = lo.forward(x, off, true).to_vector();
    const auto y64 = hi.forward(x.to(DType::kF64), off, true).to_vector();
    double num = 0, den = 0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      num += (y[i] - y64[i]) * (y[i] - y64[i]);
      den += y64[i] * y64[i];
    }
    const double tol = dt == DType::kF32 ? 1e-5 : dt == DType::kF16 ? 5e-3 : 3e-2;
    EXPECT_LT(std::sqrt(num / den), tol) << dtype_name(dt);
  }
}

TEST(FfnCpuShapes, RejectsBadRowsAndOffsets) {
  FfnExperts ffn(shape(Activation::kRelu, true), "experts.", false, 1, 0);
  const Tensor off = Tensor::from_vector(kOffsets, {4}, DType::kI64);
  EXPECT_THROW(ffn.forward(Tensor::zeros({7, 6}, DType::kF64), off, true), Error);  // wrong d
  EXPECT_THROW(ffn.forward(Tensor::zeros({8, 5}, DType::kF64), off, true),
               Error);  // offsets end at 7
  EXPECT_THROW(ffn.forward(Tensor::zeros({7, 5}, DType::kF64),
                           Tensor::from_vector({0, 5, 4, 7}, {4}, DType::kI64), true),
               Error);                                                    // decreasing
  EXPECT_THROW(ffn.backward(Tensor::zeros({7, 5}, DType::kF64)), Error);  // no forward yet
}

}  // namespace
}  // namespace switchyard
