// A user-defined gate plugged into MoELayer.
//
// The gate is a two-layer network, logits = tanh(x W1^T) W2^T, in place of the built-in linear
// gate. A Gate maps x [T, d] to logits [T, E]; the layer does the rest (scores, top-k, capacity,
// dispatch, experts, combine, losses) and hands the gate dlogits in backward.
//
// The program trains a small layer for a few steps in f32, copies the trained parameters into an
// f64 layer, and checks the gradients of the input and of both gate weights against central
// finite differences. It exits non-zero when the largest relative error exceeds the tolerance.
#include <switchyard/switchyard.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <vector>

#include "example_util.h"

namespace sy = switchyard;
using sy::index_t;

class TwoLayerGate final : public sy::Gate {
 public:
  // W1 [proj_dim, d] and W2 [E, proj_dim] in `dtype` (f32 or f64), initialised like nn.Linear.
  TwoLayerGate(index_t model_dim, index_t proj_dim, index_t num_experts, sy::DType dtype,
               std::uint64_t seed)
      : d_(model_dim), p_(proj_dim), e_(num_experts) {
    SY_CHECK(dtype == sy::DType::kF32 || dtype == sy::DType::kF64,
             "TwoLayerGate: dtype must be f32 or f64, got ", sy::dtype_name(dtype));
    w1_ = make_parameter("gates.0.fc1.weight", {p_, d_}, dtype,
                         example::uniform_init(p_ * d_, 1.0 / std::sqrt(double(d_)), seed, 1));
    w2_ = make_parameter("gates.0.fc2.weight", {e_, p_}, dtype,
                         example::uniform_init(e_ * p_, 1.0 / std::sqrt(double(p_)), seed, 2));
  }

  // x [T, d] -> logits [T, E] in the gate's dtype. When training, saves x and h = tanh(x W1^T)
  // for backward; an evaluation forward leaves the saved state alone.
  sy::Tensor forward(const sy::Tensor& x, bool training) override {
    SY_CHECK(x.dim() == 2 && x.size(1) == d_, "TwoLayerGate: x must be [T, ", d_, "], got ",
             x.dim(), " dims with ", x.dim() > 0 ? x.size(-1) : 0, " columns");
    const sy::Tensor xc = x.to(w1_.value.dtype()).contiguous();
    sy::Tensor h = sy::Tensor::empty({xc.size(0), p_}, xc.dtype());
    sy::Tensor logits =
        xc.dtype() == sy::DType::kF64 ? forward_impl<double>(xc, h) : forward_impl<float>(xc, h);
    if (training) {
      x_dtype_ = x.dtype();
      x_ = xc;
      h_ = h;
    }
    return logits;
  }

  // dlogits [T, E] -> dx [T, d] in x's dtype; accumulates into W1.grad and W2.grad.
  sy::Tensor backward(const sy::Tensor& dlogits) override {
    SY_CHECK(x_.defined(), "TwoLayerGate: backward without forward");
    SY_CHECK(dlogits.dim() == 2 && dlogits.size(0) == x_.size(0) && dlogits.size(1) == e_,
             "TwoLayerGate: dlogits must be [", x_.size(0), ", ", e_, "]");
    const sy::Tensor g = dlogits.to(w1_.value.dtype()).contiguous();
    sy::Tensor dx =
        x_.dtype() == sy::DType::kF64 ? backward_impl<double>(g) : backward_impl<float>(g);
    return dx.to(x_dtype_);
  }

  std::vector<sy::Parameter*> parameters() override { return {&w1_, &w2_}; }

 private:
  static sy::Parameter make_parameter(const char* name, const sy::Shape& shape, sy::DType dtype,
                                      const std::vector<double>& init) {
    sy::Parameter p;
    p.name = name;
    p.value = sy::Tensor::from_vector(init, shape, dtype);
    p.grad = sy::Tensor::zeros(shape, dtype);
    p.replicated = true;  // every rank holds the whole gate
    return p;
  }

  // logits = tanh(x W1^T) W2^T; fills h [T, p] with tanh(x W1^T).
  template <class T>
  sy::Tensor forward_impl(const sy::Tensor& x_t, sy::Tensor& h_t) {
    const index_t num_tokens = x_t.size(0);
    const T* x = x_t.data<T>();  // [T, d]
    const sy::Tensor w1c = w1_.value.contiguous();
    const sy::Tensor w2c = w2_.value.contiguous();
    const T* w1 = w1c.data<T>();  // [p, d]
    const T* w2 = w2c.data<T>();  // [E, p]
    T* h = h_t.data<T>();         // [T, p]
    sy::Tensor logits = sy::Tensor::empty({num_tokens, e_}, x_t.dtype());
    T* out = logits.data<T>();  // [T, E]
    for (index_t t = 0; t < num_tokens; ++t) {
      for (index_t i = 0; i < p_; ++i) {
        T acc = 0;
        for (index_t j = 0; j < d_; ++j) acc += x[t * d_ + j] * w1[i * d_ + j];
        h[t * p_ + i] = std::tanh(acc);
      }
      for (index_t e = 0; e < e_; ++e) {
        T acc = 0;
        for (index_t i = 0; i < p_; ++i) acc += h[t * p_ + i] * w2[e * p_ + i];
        out[t * e_ + e] = acc;
      }
    }
    return logits;
  }

  template <class T>
  sy::Tensor backward_impl(const sy::Tensor& dlogits) {
    const index_t num_tokens = x_.size(0);
    const T* x = x_.data<T>();       // [T, d]
    const T* h = h_.data<T>();       // [T, p]
    const T* g = dlogits.data<T>();  // [T, E]
    const sy::Tensor w1c = w1_.value.contiguous();
    const sy::Tensor w2c = w2_.value.contiguous();
    const T* w1 = w1c.data<T>();  // [p, d]
    const T* w2 = w2c.data<T>();  // [E, p]
    // Gradients are computed into fresh buffers, then added to grad (which may be a view).
    std::vector<double> dw1(static_cast<std::size_t>(p_ * d_), 0.0);
    std::vector<double> dw2(static_cast<std::size_t>(e_ * p_), 0.0);
    sy::Tensor dx_t = sy::Tensor::zeros({num_tokens, d_}, x_.dtype());
    T* dx = dx_t.data<T>();                             // [T, d]
    std::vector<T> dpre(static_cast<std::size_t>(p_));  // [p] for one token
    for (index_t t = 0; t < num_tokens; ++t) {
      // 1. dW2 += dlogits^T h;  dh = dlogits W2.
      for (index_t i = 0; i < p_; ++i) {
        T dh = 0;
        for (index_t e = 0; e < e_; ++e) {
          dh += g[t * e_ + e] * w2[e * p_ + i];
          dw2[e * p_ + i] += g[t * e_ + e] * h[t * p_ + i];
        }
        // 2. Through tanh: d(pre) = dh * (1 - h^2).
        const T hv = h[t * p_ + i];
        dpre[i] = dh * (T(1) - hv * hv);
      }
      // 3. dW1 += dpre^T x;  dx = dpre W1.
      for (index_t i = 0; i < p_; ++i) {
        for (index_t j = 0; j < d_; ++j) {
          dw1[i * d_ + j] += dpre[i] * x[t * d_ + j];
          dx[t * d_ + j] += dpre[i] * w1[i * d_ + j];
        }
      }
    }
    accumulate(w1_, dw1);
    accumulate(w2_, dw2);
    return dx_t;
  }

  static void accumulate(sy::Parameter& p, const std::vector<double>& delta) {
    std::vector<double> g = p.grad.to_vector();
    for (std::size_t i = 0; i < g.size(); ++i) g[i] += delta[i];
    p.grad.copy_from(sy::Tensor::from_vector(g, p.grad.sizes(), p.grad.dtype()));
  }

  index_t d_, p_, e_;
  sy::Parameter w1_, w2_;
  sy::Tensor x_, h_;  // saved by a training forward: x [T, d] in the gate's dtype, h [T, p]
  sy::DType x_dtype_ = sy::DType::kF32;
};

namespace {

constexpr index_t kTokens = 16;
constexpr index_t kModelDim = 8;
constexpr index_t kProjDim = 8;
constexpr index_t kExperts = 4;
constexpr index_t kHidden = 16;
constexpr int kSteps = 20;
constexpr double kTolerance = 1e-6;
constexpr double kMinMargin = 1e-2;  // between sorted logits, see min_routing_margin

sy::MoEConfig make_config(sy::DType dtype) {
  sy::MoEConfig cfg;
  cfg.model_dim = kModelDim;
  cfg.hidden_size = kHidden;
  cfg.num_experts = kExperts;
  cfg.top_k = 2;
  cfg.dtype = dtype;
  cfg.seed = 7;
  cfg.capacity_factor = 0.0;  // dropless: every choice reaches its expert (packed layout)
  cfg.activation = sy::Activation::kGelu;
  return cfg;
}

int run() {
  const sy::LossWeights loss_weights{/*aux=*/1e-2, /*z=*/1e-3};

  // 1. Train in f32: regress y onto a fixed target with plain SGD on every parameter (the
  //    custom gate's and the built-in experts').
  sy::MoEConfig cfg32 = make_config(sy::DType::kF32);
  auto gate32 = std::make_shared<TwoLayerGate>(kModelDim, kProjDim, kExperts, cfg32.dtype, 11);
  sy::MoELayer layer32(cfg32, gate32, nullptr);
  if (!example::train_regression(layer32, kTokens, kModelDim, kSteps, 0.1, loss_weights))
    return 1;

  // 2. The same layer in f64, with the trained parameters.
  sy::MoEConfig cfg64 = make_config(sy::DType::kF64);
  auto gate64 = std::make_shared<TwoLayerGate>(kModelDim, kProjDim, kExperts, cfg64.dtype, 11);
  sy::MoELayer layer64(cfg64, gate64, nullptr);
  for (sy::Parameter* p : layer32.parameters())
    layer64.parameter(p->name).value.copy_from(p->value);

  // 3. Inputs whose routing has clear margins: redraw any token whose k+1 largest logits are
  //    closer than kMinMargin, so no finite-difference step changes a routing decision.
  std::vector<double> xs =
      example::random_normal({kTokens, kModelDim}, sy::DType::kF64, 5, 0).to_vector();
  for (std::uint64_t draw = 1;; ++draw) {
    const sy::Tensor x = sy::Tensor::from_vector(xs, {kTokens, kModelDim}, sy::DType::kF64);
    index_t worst = -1;
    const double margin = example::min_routing_margin(gate64->forward(x, false).to_vector(),
                                                      kTokens, kExperts, cfg64.top_k, &worst);
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
  layer64.forward(x);
  const sy::Tensor dx = layer64.backward(dy, loss_weights);
  std::vector<example::GradTarget> targets;
  targets.push_back({"x", x, dx.to_vector()});
  for (sy::Parameter* p : gate64->parameters()) {
    targets.push_back({p->name, p->value, p->grad.to_vector()});
  }

  // 5. Numerical gradients and the comparison.
  std::printf("finite differences (f64, central, h = 1e-5) of sum(y*dy) + %.0e*aux + %.0e*z:\n",
              loss_weights.aux, loss_weights.z);
  const double err = example::check_gradients(layer64, x, dy, loss_weights, targets);
  std::printf("max relative error %.3e (tolerance %.0e): %s\n", err, kTolerance,
              err <= kTolerance ? "PASS" : "FAIL");
  return err <= kTolerance ? 0 : 1;
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
