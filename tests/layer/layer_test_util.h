// Helpers shared by the layer tests: small configs, random inputs with clear routing margins,
// reading a layer's parameters into the reference, and comparing a forward with the reference.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "reference/compare.h"
#include "reference/reference_moe.h"
#include "switchyard/switchyard.h"

namespace sy_test {

using namespace switchyard;  // NOLINT: tests read better with the library's names

inline std::vector<double> randn(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = nd(gen);
  return v;
}

// A small f64 layer: E = 4, k = 2, d = 6, h = 5, Tutel rules, biases on.
inline MoEConfig small_config(DType dtype = DType::kF64) {
  MoEConfig cfg;
  cfg.model_dim = 6;
  cfg.hidden_size = 5;
  cfg.num_experts = 4;
  cfg.top_k = 2;
  cfg.dtype = dtype;
  cfg.seed = 7;
  cfg.cosine_proj_dim = 8;
  return cfg;
}

inline Tensor make_tensor(const std::vector<double>& v, const Shape& shape, DType dtype) {
  return Tensor::from_vector(v, shape, dtype);
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// The layer's parameters by name, as the reference reads them.
inline sy_ref::Params params_of(MoELayer& layer) {
  sy_ref::Params p;
  for (Parameter* q : layer.parameters()) p[q->name] = q->value.to_vector();
  return p;
}

inline void set_param(MoELayer& layer, const std::string& name, const std::vector<double>& v) {
  Parameter& p = layer.parameter(name);
  p.value.copy_from(Tensor::from_vector(v, p.value.sizes(), DType::kF64));
}

// Reference options equivalent to a forward call's options on this layer.
inline sy_ref::RefOptions ref_options(MoELayer& layer, const ForwardOptions& fo = {}) {
  sy_ref::RefOptions o;
  o.capacity_factor = fo.capacity_factor;
  o.top_k = fo.top_k;
  o.training = fo.training;
  if (layer.config().expert_bias) o.expert_bias = layer.expert_bias().to_vector();
  return o;
}

inline sy_ref::RefResult reference_of(MoELayer& layer, const std::vector<double>& x, std::int64_t T,
                                      const ForwardOptions& fo = {}) {
  return sy_ref::reference_forward(layer.config(), params_of(layer), x, T, ref_options(layer, fo));
}

// A random x [T, d] (rounded to the layer's dtype) whose routing has every discrete decision at
// least `margin` away from a tie, so finite differences and low precision flip no choice.
inline std::vector<double> input_with_margin(MoELayer& layer, std::int64_t T, double margin,
                                             std::uint64_t seed, const ForwardOptions& fo = {}) {
  const MoEConfig& cfg = layer.config();
  for (int attempt = 0; attempt < 500; ++attempt) {
    std::vector<double> x = randn(T * cfg.model_dim, seed + 7919 * attempt);
    x = make_tensor(x, {T, cfg.model_dim}, cfg.dtype).to_vector();
    if (reference_of(layer, x, T, fo).routing.min_margin >= margin) return x;
  }
  ADD_FAILURE() << "no input with routing margin " << margin << " found";
  return randn(T * cfg.model_dim, seed);
}

// Tutel's gate noise for one training step: gate_noise * N(0,1) / E, drawn from the layer's
// counter-based stream keyed by (seed, step, token, expert) (ROUTING.md §1).
inline std::vector<double> gate_noise_of(const MoEConfig& cfg, std::uint64_t step, std::int64_t T) {
  const std::int64_t E = cfg.num_experts;
  std::vector<double> n(T * E);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t e = 0; e < E; ++e)
      n[t * E + e] = cfg.gate_noise * rng_normal(cfg.seed, RngStream::kGateNoise, step, t, e) / E;
  return n;
}

// The layout a forward should report (ROUTING.md §3; config.h).
inline Layout expected_layout(const MoEConfig& cfg, const ForwardOptions& fo) {
  const Layout l = fo.layout.value_or(cfg.layout);
  if (l != Layout::kAuto) return l;
  if (cfg.rules == RuleSet::kMegatron) return Layout::kPacked;
  return fo.capacity_factor.value_or(cfg.capacity_factor) > 0 ? Layout::kPadded : Layout::kPacked;
}

// The layer's forward against the reference: y (relative L2 <= tol), losses and routing stats.
inline void expect_matches_reference(MoELayer& layer, const std::vector<double>& x, std::int64_t T,
                                     const ForwardOptions& fo, double tol) {
  const MoEConfig& cfg = layer.config();
  const sy_ref::RefResult want = reference_of(layer, x, T, fo);
  const ForwardResult got = layer.forward(make_tensor(x, {T, cfg.model_dim}, cfg.dtype), fo);
  ASSERT_EQ(got.y.sizes(), (Shape{T, cfg.out_dim()}));
  EXPECT_EQ(got.y.dtype(), cfg.dtype);
  EXPECT_TRUE(sy_ref::rel_l2_within(got.y.to_vector(), want.y, tol)) << "output y";
  const double ltol = std::max(tol, 1e-12);
  EXPECT_NEAR(got.losses.aux, want.aux, ltol * (1 + std::abs(want.aux))) << "aux loss";
  EXPECT_NEAR(got.losses.z, want.z, ltol * (1 + std::abs(want.z))) << "z-loss";
  const sy_ref::RefRouting& r = want.routing;
  EXPECT_EQ(got.stats.top_k, r.k);
  EXPECT_EQ(got.stats.tokens_per_expert, r.tokens_per_expert) << "tokens kept per expert";
  EXPECT_EQ(got.stats.dropped_choices, r.dropped_choices);
  const Layout layout = expected_layout(cfg, fo);
  EXPECT_EQ(got.stats.layout, layout) << to_string(got.stats.layout) << " vs " << to_string(layout);
  // Capacity is defined where a limit applies (and by Tutel's rules always).
  if (cfg.rules == RuleSet::kTutel || !r.dropless) {
    EXPECT_EQ(got.stats.capacity, r.capacity) << "capacity";
    if (layout == Layout::kPadded) {
      EXPECT_EQ(got.stats.num_rows, cfg.num_experts * got.stats.capacity) << "padded rows";
    }
  }
  if (layout == Layout::kPacked) {
    std::int64_t kept = 0;
    for (auto n : r.tokens_per_expert) kept += n;
    EXPECT_EQ(got.stats.num_rows, kept) << "packed rows";
  }
}

}  // namespace sy_test
