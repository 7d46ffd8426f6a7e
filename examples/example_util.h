// Helpers shared by the examples: deterministic random tensors, plain SGD, and a gradient check
// of a whole MoELayer by central finite differences. Only the public API is used.
#pragma once

#include <switchyard/switchyard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace example {

namespace sy = switchyard;

// Standard normal values, scaled, drawn from the counter-based generator: the same numbers on
// every machine and thread count. `draw` selects an independent set of numbers.
inline sy::Tensor random_normal(const sy::Shape& sizes, sy::DType dtype, std::uint64_t seed,
                                std::uint64_t draw, double scale = 1.0) {
  const sy::index_t numel = sy::checked_numel(sizes);
  std::vector<double> v(static_cast<std::size_t>(numel));
  for (sy::index_t i = 0; i < numel; ++i) {
    v[static_cast<std::size_t>(i)] =
        scale * sy::rng_normal(seed, sy::RngStream::kData, draw, static_cast<std::uint64_t>(i), 0);
  }
  return sy::Tensor::from_vector(v, sizes, dtype);
}

// Uniform in (-bound, bound), as torch.nn.Linear initialises its weights.
inline std::vector<double> uniform_init(sy::index_t numel, double bound, std::uint64_t seed,
                                        std::uint64_t draw) {
  std::vector<double> v(static_cast<std::size_t>(numel));
  for (sy::index_t i = 0; i < numel; ++i) {
    const double u =
        sy::rng_uniform(seed, sy::RngStream::kInit, draw, static_cast<std::uint64_t>(i), 0);
    v[static_cast<std::size_t>(i)] = bound * (2.0 * u - 1.0);
  }
  return v;
}

// value -= lr * grad for every parameter (any floating dtype).
inline void sgd_step(const std::vector<sy::Parameter*>& params, double lr) {
  for (sy::Parameter* p : params) {
    std::vector<double> v = p->value.to_vector();
    const std::vector<double> g = p->grad.to_vector();
    for (std::size_t i = 0; i < v.size(); ++i) v[i] -= lr * g[i];
    p->value.copy_from(sy::Tensor::from_vector(v, p->value.sizes(), p->value.dtype()));
  }
}

// Fits the layer's output to a fixed random target with plain SGD on every parameter
// (0.5 * mean squared error plus the weighted losses), printing every fifth step. Returns
// whether the loss fell from the first step to the last.
inline bool train_regression(sy::MoELayer& layer, sy::index_t tokens, sy::index_t model_dim,
                             int steps, double lr, const sy::LossWeights& weights) {
  const sy::Tensor x = random_normal({tokens, model_dim}, layer.config().dtype, 3, 0);
  const std::vector<double> target =
      random_normal({tokens, model_dim}, sy::DType::kF64, 3, 1, 0.5).to_vector();
  double first_loss = 0.0, last_loss = 0.0;
  for (int step = 0; step < steps; ++step) {
    layer.zero_grad();
    const sy::ForwardResult r = layer.forward(x);
    const std::vector<double> y = r.y.to_vector();
    std::vector<double> dy(y.size());
    double mse = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      mse += 0.5 * (y[i] - target[i]) * (y[i] - target[i]) / static_cast<double>(tokens);
      dy[i] = (y[i] - target[i]) / static_cast<double>(tokens);
    }
    layer.backward(sy::Tensor::from_vector(dy, r.y.sizes(), r.y.dtype()), weights);
    sgd_step(layer.parameters(), lr);
    const double loss = mse + weights.aux * r.losses.aux + weights.z * r.losses.z;
    if (step == 0) first_loss = loss;
    last_loss = loss;
    if (step % 5 == 0 || step == steps - 1) {
      std::printf("step %2d  loss %.6f  (mse %.6f, aux %.4f, z %.4f, layout %s, C %lld, "
                  "dropped %lld)\n",
                  step, loss, mse, r.losses.aux, r.losses.z, sy::to_string(r.stats.layout),
                  static_cast<long long>(r.stats.capacity),
                  static_cast<long long>(r.stats.dropped_choices));
    }
  }
  if (last_loss < first_loss) return true;
  std::printf("FAIL: training did not reduce the loss (%.6f -> %.6f)\n", first_loss, last_loss);
  return false;
}


// The objective whose gradient MoELayer::backward(dy, weights) computes:
// L = sum(y * dy) + weights.aux * l_aux + weights.z * l_z.
inline double objective(sy::MoELayer& layer, const sy::Tensor& x, const sy::Tensor& dy,
                        const sy::LossWeights& weights) {
  const sy::ForwardResult r = layer.forward(x);
  const std::vector<double> y = r.y.to_vector();
  const std::vector<double> g = dy.to_vector();
  double sum = 0.0;
  for (std::size_t i = 0; i < y.size(); ++i) sum += y[i] * g[i];
  return sum + weights.aux * r.losses.aux + weights.z * r.losses.z;
}

// Per-element relative error |a - n| / max(|a|, |n|, floor), where the floor (1e-3 of the largest
// numerical gradient of the tensor) keeps elements whose gradient is nearly zero from dividing by
// nearly zero.
inline double max_relative_error(const std::vector<double>& analytic,
                                 const std::vector<double>& numeric) {
  double scale = 0.0;
  for (double n : numeric) scale = std::max(scale, std::fabs(n));
  const double floor = 1e-3 * scale + 1e-12;
  double worst = 0.0;
  for (std::size_t i = 0; i < numeric.size(); ++i) {
    const double a = analytic[i];
    const double n = numeric[i];
    const double denom = std::max({std::fabs(a), std::fabs(n), floor});
    worst = std::max(worst, std::fabs(a - n) / denom);
  }
  return worst;
}

// A tensor to check: an f64, contiguous tensor that the layer reads on every forward (the input,
// or the value of a parameter), and the analytical gradient of the objective with respect to it.
struct GradTarget {
  std::string name;
  sy::Tensor value;
  std::vector<double> analytic;
};

// Checks every element of every target by central differences with step h: each element is
// moved by +h and -h in place, the objective re-evaluated, and the element restored. Prints one
// line per target and returns the largest relative error.
inline double check_gradients(sy::MoELayer& layer, const sy::Tensor& x, const sy::Tensor& dy,
                              const sy::LossWeights& weights, std::vector<GradTarget>& targets,
                              double h = 1e-5) {
  double worst = 0.0;
  for (GradTarget& t : targets) {
    SY_CHECK(t.value.dtype() == sy::DType::kF64 && t.value.is_contiguous(),
             "check_gradients: ", t.name, " must be a contiguous f64 tensor, got ",
             sy::dtype_name(t.value.dtype()));
    SY_CHECK_EQ(static_cast<sy::index_t>(t.analytic.size()), t.value.numel(),
                "check_gradients: analytic gradient size of " + t.name);
    double* p = t.value.data<double>();
    std::vector<double> numeric(t.analytic.size());
    for (std::size_t i = 0; i < numeric.size(); ++i) {
      const double saved = p[i];
      p[i] = saved + h;
      const double plus = objective(layer, x, dy, weights);
      p[i] = saved - h;
      const double minus = objective(layer, x, dy, weights);
      p[i] = saved;
      numeric[i] = (plus - minus) / (2.0 * h);
    }
    const double err = max_relative_error(t.analytic, numeric);
    std::printf("  d/d%-28s %6zu elements  max relative error %.3e\n", t.name.c_str(),
                numeric.size(), err);
    worst = std::max(worst, err);
  }
  return worst;
}

// Margin between consecutive sorted logits among a token's k+1 largest: the smallest such gap
// over all tokens. A finite-difference step much smaller than this cannot change which experts a
// token chooses, nor their order (which decides drops under a fixed capacity).
inline double min_routing_margin(const std::vector<double>& logits, sy::index_t num_tokens,
                                 sy::index_t num_experts, int top_k, sy::index_t* worst_token) {
  double min_gap = INFINITY;
  const int last = std::min<int>(top_k, static_cast<int>(num_experts) - 1);
  for (sy::index_t t = 0; t < num_tokens; ++t) {
    std::vector<double> row(logits.begin() + t * num_experts,
                            logits.begin() + (t + 1) * num_experts);
    std::sort(row.begin(), row.end(), [](double a, double b) { return a > b; });
    for (int j = 0; j < last; ++j) {
      const double gap = row[static_cast<std::size_t>(j)] - row[static_cast<std::size_t>(j) + 1];
      if (gap < min_gap) {
        min_gap = gap;
        if (worst_token) *worst_token = t;
      }
    }
  }
  return min_gap;
}

}  // namespace example
