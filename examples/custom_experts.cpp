// A user-defined expert network plugged into MoELayer.
//
// Each expert is one linear map with a learned scale, out = s[e] * (W[e] row), in place of the
// built-in FFN experts. An ExpertNetwork receives the dispatched rows of all local experts at
// once, [R, d], with offsets [E+1]: rows [offsets[e], offsets[e+1]) belong to expert e. With a
// fixed capacity the layer uses the padded layout (offsets e*C, unused slots are zero rows);
// dropless routing uses the packed layout (only kept rows). This network handles both.
//
// The program trains a small layer for a few steps in f32, copies the trained parameters into an
// f64 layer, and checks the gradients of the input and of the experts' weights and scales against
// central finite differences, for both layouts. It exits non-zero when the largest relative error
// exceeds the tolerance.
#include <switchyard/switchyard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <vector>

#include "example_util.h"

namespace sy = switchyard;
using sy::index_t;

class ScaledLinearExperts final : public sy::ExpertNetwork {
 public:
  // W [E, d, d] initialised like nn.Linear(d, d) per expert, scale [E] initialised to 1.
  ScaledLinearExperts(index_t model_dim, index_t num_experts, sy::DType dtype, std::uint64_t seed)
      : d_(model_dim), e_(num_experts) {
    SY_CHECK(dtype == sy::DType::kF32 || dtype == sy::DType::kF64,
             "ScaledLinearExperts: dtype must be f32 or f64, got ", sy::dtype_name(dtype));
    weight_.name = "experts.weight";
    weight_.value = sy::Tensor::from_vector(
        example::uniform_init(e_ * d_ * d_, 1.0 / std::sqrt(double(d_)), seed, 1), {e_, d_, d_},
        dtype);
    weight_.grad = sy::Tensor::zeros({e_, d_, d_}, dtype);
    weight_.replicated = false;  // under expert parallelism each rank holds its own experts
    scale_.name = "experts.scale";
    scale_.value = sy::Tensor::from_vector(std::vector<double>(std::size_t(e_), 1.0), {e_}, dtype);
    scale_.grad = sy::Tensor::zeros({e_}, dtype);
    scale_.replicated = false;
  }

  // rows [R, d], offsets i64 [E+1] -> [R, d]. Rows outside [offsets[0], offsets[E]) give zeros.
  // When training, saves the rows, offsets and W[e] rows for backward; an evaluation forward
  // leaves the saved state alone.
  sy::Tensor forward(const sy::Tensor& rows, const sy::Tensor& offsets, bool training) override {
    SY_CHECK(rows.dim() == 2 && rows.size(1) == d_, "ScaledLinearExperts: rows must be [R, ", d_,
             "]");
    SY_CHECK(offsets.dtype() == sy::DType::kI64 && offsets.dim() == 1 && offsets.numel() == e_ + 1,
             "ScaledLinearExperts: offsets must be i64 [", e_ + 1, "], got ",
             sy::dtype_name(offsets.dtype()), " with ", offsets.numel(), " entries");
    const sy::Tensor off = offsets.contiguous();
    std::vector<std::int64_t> offs(off.data<std::int64_t>(), off.data<std::int64_t>() + e_ + 1);
    for (index_t e = 0; e < e_; ++e) {
      SY_CHECK(offs[e] <= offs[e + 1], "ScaledLinearExperts: offsets must not decrease");
    }
    SY_CHECK(offs[0] >= 0 && offs[e_] <= rows.size(0), "ScaledLinearExperts: offsets exceed the ",
             rows.size(0), " rows");
    const sy::Tensor x = rows.to(weight_.value.dtype()).contiguous();
    sy::Tensor pre = sy::Tensor::zeros({x.size(0), d_}, x.dtype());
    sy::Tensor out = x.dtype() == sy::DType::kF64 ? forward_impl<double>(x, offs, pre)
                                                  : forward_impl<float>(x, offs, pre);
    if (training) {
      rows_dtype_ = rows.dtype();
      rows_ = x;
      offsets_ = std::move(offs);
      pre_ = pre;
    }
    return out.to(rows.dtype());
  }

  // drows_out [R, d] -> drows [R, d]; accumulates into weight.grad and scale.grad.
  sy::Tensor backward(const sy::Tensor& drows_out) override {
    SY_CHECK(rows_.defined(), "ScaledLinearExperts: backward without forward");
    SY_CHECK(drows_out.dim() == 2 && drows_out.size(0) == rows_.size(0) && drows_out.size(1) == d_,
             "ScaledLinearExperts: drows_out must be [", rows_.size(0), ", ", d_, "]");
    const sy::Tensor g = drows_out.to(weight_.value.dtype()).contiguous();
    sy::Tensor drows =
        rows_.dtype() == sy::DType::kF64 ? backward_impl<double>(g) : backward_impl<float>(g);
    return drows.to(rows_dtype_);
  }

  std::vector<sy::Parameter*> parameters() override { return {&weight_, &scale_}; }

 private:
  // out[r] = s[e] * (W[e] x[r]) for the rows of each expert e; fills pre [R, d] with W[e] x[r].
  template <class T>
  sy::Tensor forward_impl(const sy::Tensor& x_t, const std::vector<std::int64_t>& offsets,
                          sy::Tensor& pre_t) {
    const T* x = x_t.data<T>();  // [R, d]
    const sy::Tensor wc = weight_.value.contiguous();
    const sy::Tensor sc = scale_.value.contiguous();
    const T* w = wc.data<T>();  // [E, d, d]
    const T* s = sc.data<T>();  // [E]
    T* pre = pre_t.data<T>();   // [R, d]
    sy::Tensor out_t = sy::Tensor::zeros({x_t.size(0), d_}, x_t.dtype());
    T* out = out_t.data<T>();  // [R, d]
    for (index_t e = 0; e < e_; ++e) {
      const T* we = w + e * d_ * d_;
      for (index_t r = offsets[e]; r < offsets[e + 1]; ++r) {
        for (index_t i = 0; i < d_; ++i) {
          T acc = 0;
          for (index_t j = 0; j < d_; ++j) acc += we[i * d_ + j] * x[r * d_ + j];
          pre[r * d_ + i] = acc;
          out[r * d_ + i] = s[e] * acc;
        }
      }
    }
    return out_t;
  }

  template <class T>
  sy::Tensor backward_impl(const sy::Tensor& drows_out) {
    const index_t num_rows = rows_.size(0);
    const T* x = rows_.data<T>();      // [R, d]
    const T* pre = pre_.data<T>();     // [R, d]
    const T* g = drows_out.data<T>();  // [R, d]
    const sy::Tensor wc = weight_.value.contiguous();
    const sy::Tensor sc = scale_.value.contiguous();
    const T* w = wc.data<T>();  // [E, d, d]
    const T* s = sc.data<T>();  // [E]
    std::vector<double> dw(static_cast<std::size_t>(e_ * d_ * d_), 0.0);
    std::vector<double> ds(static_cast<std::size_t>(e_), 0.0);
    sy::Tensor drows_t = sy::Tensor::zeros({num_rows, d_}, rows_.dtype());
    T* dx = drows_t.data<T>();  // [R, d]
    for (index_t e = 0; e < e_; ++e) {
      const T* we = w + e * d_ * d_;
      for (index_t r = offsets_[e]; r < offsets_[e + 1]; ++r) {
        for (index_t i = 0; i < d_; ++i) {
          const T gi = g[r * d_ + i];
          ds[e] += gi * pre[r * d_ + i];  // d out / d s[e] = W[e] row
          for (index_t j = 0; j < d_; ++j) {
            dw[(e * d_ + i) * d_ + j] += s[e] * gi * x[r * d_ + j];
            dx[r * d_ + j] += s[e] * we[i * d_ + j] * gi;
          }
        }
      }
    }
    accumulate(weight_, dw);
    accumulate(scale_, ds);
    return drows_t;
  }

  static void accumulate(sy::Parameter& p, const std::vector<double>& delta) {
    std::vector<double> g = p.grad.to_vector();
    for (std::size_t i = 0; i < g.size(); ++i) g[i] += delta[i];
    p.grad.copy_from(sy::Tensor::from_vector(g, p.grad.sizes(), p.grad.dtype()));
  }

  index_t d_, e_;
  sy::Parameter weight_, scale_;
  sy::Tensor rows_, pre_;  // saved by a training forward, in the network's dtype: [R, d]
  std::vector<std::int64_t> offsets_;
  sy::DType rows_dtype_ = sy::DType::kF32;
};

namespace {

constexpr index_t kTokens = 16;
constexpr index_t kModelDim = 8;
constexpr index_t kExperts = 4;
constexpr int kSteps = 20;
constexpr double kTolerance = 1e-6;
constexpr double kMinMargin = 1e-2;  // between sorted logits, see min_routing_margin

sy::MoEConfig make_config(sy::DType dtype, double capacity_factor) {
  sy::MoEConfig cfg;
  cfg.model_dim = kModelDim;
  cfg.hidden_size = kModelDim;  // unused by custom experts, but must be a valid size
  cfg.num_experts = kExperts;
  cfg.top_k = 2;
  cfg.dtype = dtype;
  cfg.seed = 9;
  cfg.capacity_factor = capacity_factor;
  return cfg;
}

// Trains an f32 layer, then checks the f64 gradients. Returns the largest relative error, or a
// negative number when training failed to reduce the loss.
double train_and_check(double capacity_factor) {
  const sy::LossWeights loss_weights{/*aux=*/1e-2, /*z=*/0.0};

  // 1. Train in f32: regress y onto a fixed target with plain SGD on every parameter (the
  //    built-in gate's and the custom experts').
  sy::MoEConfig cfg32 = make_config(sy::DType::kF32, capacity_factor);
  auto experts32 = std::make_shared<ScaledLinearExperts>(kModelDim, kExperts, cfg32.dtype, 13);
  sy::MoELayer layer32(cfg32, nullptr, experts32);
  if (!example::train_regression(layer32, kTokens, kModelDim, kSteps, 0.1, loss_weights))
    return -1.0;

  // 2. The same layer in f64, with the trained parameters.
  sy::MoEConfig cfg64 = make_config(sy::DType::kF64, capacity_factor);
  auto experts64 = std::make_shared<ScaledLinearExperts>(kModelDim, kExperts, cfg64.dtype, 13);
  sy::MoELayer layer64(cfg64, nullptr, experts64);
  for (sy::Parameter* p : layer32.parameters())
    layer64.parameter(p->name).value.copy_from(p->value);

  // 3. Inputs whose routing has clear margins. The built-in gate is linear, logits = x Wg^T
  //    (Wg [E, d]); redraw any token whose k+1 largest logits are closer than kMinMargin, so no
  //    finite-difference step changes a routing decision or the choice order that decides drops.
  const std::vector<double> wg = layer64.parameter("gates.0.wg.weight").value.to_vector();
  std::vector<double> xs =
      example::random_normal({kTokens, kModelDim}, sy::DType::kF64, 5, 0).to_vector();
  for (std::uint64_t draw = 1;; ++draw) {
    std::vector<double> logits(static_cast<std::size_t>(kTokens * kExperts), 0.0);
    for (index_t t = 0; t < kTokens; ++t) {
      for (index_t e = 0; e < kExperts; ++e) {
        for (index_t j = 0; j < kModelDim; ++j) {
          logits[t * kExperts + e] += xs[t * kModelDim + j] * wg[e * kModelDim + j];
        }
      }
    }
    index_t worst = -1;
    const double margin =
        example::min_routing_margin(logits, kTokens, kExperts, cfg64.top_k, &worst);
    if (margin >= kMinMargin) {
      std::printf("routing margin %.4f (redraws: %llu)\n", margin,
                  static_cast<unsigned long long>(draw - 1));
      break;
    }
    SY_CHECK(draw < 1000, "could not draw inputs with routing margins >= ", kMinMargin);
    for (index_t j = 0; j < kModelDim; ++j) {
      xs[static_cast<std::size_t>(worst * kModelDim + j)] =
          sy::rng_normal(5, sy::RngStream::kData, draw, static_cast<std::uint64_t>(worst),
                         static_cast<std::uint64_t>(j));
    }
  }
  sy::Tensor x = sy::Tensor::from_vector(xs, {kTokens, kModelDim}, sy::DType::kF64);
  const sy::Tensor dy = example::random_normal({kTokens, kModelDim}, sy::DType::kF64, 5, 1000);

  // 4. Analytical gradients: one forward and one backward.
  layer64.zero_grad();
  const sy::ForwardResult r = layer64.forward(x);
  std::printf("f64 check: layout %s, capacity %lld, dropped choices %lld\n",
              sy::to_string(r.stats.layout), static_cast<long long>(r.stats.capacity),
              static_cast<long long>(r.stats.dropped_choices));
  const sy::Tensor dx = layer64.backward(dy, loss_weights);
  std::vector<example::GradTarget> targets;
  targets.push_back({"x", x, dx.to_vector()});
  for (sy::Parameter* p : experts64->parameters()) {
    targets.push_back({p->name, p->value, p->grad.to_vector()});
  }

  // 5. Numerical gradients and the comparison.
  std::printf("finite differences (f64, central, h = 1e-5) of sum(y*dy) + %.0e*aux:\n",
              loss_weights.aux);
  return example::check_gradients(layer64, x, dy, loss_weights, targets);
}

int run() {
  double worst = 0.0;
  // A fixed capacity (padded layout; with this routing some choices are dropped), then dropless
  // routing (packed layout).
  for (double capacity_factor : {1.0, 0.0}) {
    std::printf("== capacity_factor %.1f\n", capacity_factor);
    const double err = train_and_check(capacity_factor);
    if (err < 0) return 1;
    worst = std::max(worst, err);
  }
  std::printf("max relative error %.3e (tolerance %.0e): %s\n", worst, kTolerance,
              worst <= kTolerance ? "PASS" : "FAIL");
  return worst <= kTolerance ? 0 : 1;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const sy::Error& e) {
    std::fprintf(stderr, "switchyard error: %s\n", e.what());
    return 1;
  }
}
