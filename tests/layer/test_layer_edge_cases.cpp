// Awkward inputs and state: empty batches, views, casts, one expert taking every token,
// experts with no tokens, expert-bias updates, gate noise, parameter layout and initialisation.
#include <gtest/gtest.h>

#include <cmath>

#include "layer/layer_test_util.h"

namespace sy_test {
namespace {

TEST(MoELayerCpu, EmptyInputGivesEmptyOutputAndBackwardWorks) {
  for (DType dt : {DType::kF64, DType::kF32}) {
    MoEConfig cfg = small_config(dt);
    cfg.shared_expert_hidden = 3;
    MoELayer layer(cfg);
    const Tensor x = Tensor::zeros({0, cfg.model_dim}, dt);
    ForwardResult r;
    ASSERT_NO_THROW(r = layer.forward(x)) << dtype_name(dt);
    EXPECT_EQ(r.y.sizes(), (Shape{0, cfg.model_dim}));
    EXPECT_TRUE(std::isfinite(r.losses.aux));
    EXPECT_TRUE(std::isfinite(r.losses.z));
    EXPECT_EQ(r.stats.dropped_choices, 0);
    layer.zero_grad();
    Tensor dx;
    ASSERT_NO_THROW(
        dx = layer.backward(Tensor::zeros({0, cfg.model_dim}, dt), {.aux = 0.1, .z = 0.1}));
    EXPECT_EQ(dx.sizes(), (Shape{0, cfg.model_dim}));
    for (Parameter* p : layer.parameters())
      for (double g : p->grad.to_vector()) ASSERT_EQ(g, 0.0) << p->name;
  }
}

// zero_grad(true) frees the gradients; the next backward creates them equal to what zeroed
// gradients receive, and the one after adds to them.
TEST(MoELayerCpu, GradientsSetToNoneEqualZeroedGradients) {
  for (bool gated : {false, true}) {
    MoEConfig cfg = small_config(DType::kF32);
    cfg.shared_expert_hidden = 4;
    cfg.gate = gated ? GateType::kCosine : GateType::kLinear;
    if (gated) cfg.activation = Activation::kSwiGLU;
    MoELayer zeroed(cfg), unset(cfg);
    const std::int64_t T = 9, d = cfg.model_dim;
    const Tensor x = make_tensor(randn(T * d, 3), {T, d}, DType::kF32);
    const Tensor dy = make_tensor(randn(T * d, 4), {T, d}, DType::kF32);
    zeroed.zero_grad();
    unset.zero_grad(/*set_to_none=*/true);
    for (Parameter* p : unset.parameters()) EXPECT_FALSE(p->grad.defined()) << p->name;
    for (int step = 0; step < 2; ++step) {  // the second step accumulates
      zeroed.forward(x);
      unset.forward(x);
      EXPECT_TRUE(sy_ref::bitwise_equal(unset.backward(dy, {.aux = 0.1}).to_vector(),
                                        zeroed.backward(dy, {.aux = 0.1}).to_vector()));
      const auto pz = zeroed.parameters(), pu = unset.parameters();
      for (std::size_t i = 0; i < pz.size(); ++i) {
        ASSERT_TRUE(pu[i]->grad.defined()) << pu[i]->name;
        EXPECT_TRUE(sy_ref::bitwise_equal(pu[i]->grad.to_vector(), pz[i]->grad.to_vector()))
            << pu[i]->name << " gated=" << gated << " step " << step;
      }
    }
  }
}

TEST(MoELayerCpu, LeadingDimensionsAreFlattenedBatchMajor) {
  MoEConfig cfg = small_config();
  MoELayer layer(cfg);
  const std::int64_t d = cfg.model_dim;
  const std::vector<double> x = input_with_margin(layer, 6, 1e-6, 4);
  const std::vector<double> dy = randn(6 * d, 8);
  const ForwardResult flat = layer.forward(make_tensor(x, {6, d}, DType::kF64));
  layer.zero_grad();
  const std::vector<double> dx_flat =
      layer.backward(make_tensor(dy, {6, d}, DType::kF64)).to_vector();
  const ForwardResult r = layer.forward(make_tensor(x, {2, 3, d}, DType::kF64));
  EXPECT_EQ(r.y.sizes(), (Shape{2, 3, d}));
  EXPECT_TRUE(sy_ref::bitwise_equal(r.y.to_vector(), flat.y.to_vector()));
  const Tensor dx = layer.backward(make_tensor(dy, {2, 3, d}, DType::kF64));
  EXPECT_EQ(dx.sizes(), (Shape{2, 3, d}));
  EXPECT_TRUE(sy_ref::bitwise_equal(dx.to_vector(), dx_flat));
}

TEST(MoELayerCpu, NonContiguousInputIsAccepted) {
  MoEConfig cfg = small_config(DType::kF32);
  MoELayer layer(cfg);
  const std::int64_t T = 7, d = cfg.model_dim;
  const Tensor wide = make_tensor(randn(T * 2 * d, 6), {T, 2 * d}, DType::kF32);
  const Tensor view = wide.narrow(1, d, d);  // every row strided by 2d
  ASSERT_FALSE(view.is_contiguous());
  const std::vector<double> y_view = layer.forward(view).y.to_vector();
  const std::vector<double> y_copy = layer.forward(view.contiguous()).y.to_vector();
  EXPECT_TRUE(sy_ref::bitwise_equal(y_view, y_copy));
}

TEST(MoELayerCpu, InputIsCastToTheLayerDtypeAndDxKeepsTheInputDtype) {
  MoEConfig cfg = small_config(DType::kF32);
  MoELayer layer(cfg);
  const std::int64_t T = 7, d = cfg.model_dim;
  // Values exact in f32, so the f64 input and the f32 input are the same numbers.
  const std::vector<double> x = make_tensor(randn(T * d, 6), {T, d}, DType::kF32).to_vector();
  const std::vector<double> dy = make_tensor(randn(T * d, 7), {T, d}, DType::kF32).to_vector();
  const ForwardResult r32 = layer.forward(make_tensor(x, {T, d}, DType::kF32));
  const Tensor dx32 = layer.backward(make_tensor(dy, {T, d}, DType::kF32));
  const ForwardResult r64 = layer.forward(make_tensor(x, {T, d}, DType::kF64));
  EXPECT_EQ(r64.y.dtype(), DType::kF32);
  EXPECT_TRUE(sy_ref::bitwise_equal(r64.y.to_vector(), r32.y.to_vector()));
  const Tensor dx64 = layer.backward(make_tensor(dy, {T, d}, DType::kF32));
  EXPECT_EQ(dx64.dtype(), DType::kF64);
  EXPECT_TRUE(sy_ref::bitwise_equal(dx64.to_vector(), dx32.to_vector()));
}

// Wg and x such that every token prefers expert 0 by a wide margin: x[:, 0] = 1 and
// Wg[0, 0] = +4, Wg[e, 0] = -4 for the other experts.
void send_every_token_to_expert_0(MoELayer& layer, std::vector<double>& x, std::int64_t T) {
  const MoEConfig& cfg = layer.config();
  const std::int64_t d = cfg.model_dim, E = cfg.num_experts;
  std::vector<double> wg = randn(E * d, 12, 0.05);
  for (std::int64_t e = 0; e < E; ++e) wg[e * d] = e == 0 ? 4.0 : -4.0;
  set_param(layer, "gates.0.wg.weight", wg);
  for (std::int64_t t = 0; t < T; ++t) x[t * d] = 1.0;
}

TEST(MoELayerCpu, AllTokensToOneExpertDropsBeyondCapacity) {
  for (double cf : {1.0, 0.0, -0.5}) {
    MoEConfig cfg = small_config();
    cfg.top_k = 1;
    cfg.capacity_factor = cf;
    MoELayer layer(cfg);
    const std::int64_t T = 11;
    std::vector<double> x = randn(T * cfg.model_dim, 13);
    send_every_token_to_expert_0(layer, x, T);
    SCOPED_TRACE("capacity_factor " + std::to_string(cf));
    expect_matches_reference(layer, x, T, {}, 1e-9);
    const ForwardResult r = layer.forward(make_tensor(x, {T, cfg.model_dim}, DType::kF64));
    const std::int64_t C = cf == 0 ? T : cf > 0 ? 3 : 1;  // ceil(11/4) = 3: C = 3, or min(11, 1)
    EXPECT_EQ(r.stats.tokens_per_expert, (std::vector<index_t>{C, 0, 0, 0}));
    EXPECT_EQ(r.stats.dropped_choices, T - C);
  }
}

TEST(MoELayerCpu, ExpertsWithoutTokensGetZeroGradients) {
  MoEConfig cfg = small_config();
  cfg.num_experts = 8;
  cfg.top_k = 1;
  MoELayer layer(cfg);
  const std::int64_t T = 3, d = cfg.model_dim, h = cfg.hidden_size;
  const std::vector<double> x = input_with_margin(layer, T, 1e-6, 14);
  expect_matches_reference(layer, x, T, {}, 1e-9);
  const ForwardResult r = layer.forward(make_tensor(x, {T, d}, DType::kF64));
  layer.zero_grad();
  layer.backward(make_tensor(randn(T * d, 15), {T, d}, DType::kF64));
  const std::vector<double> g1 = layer.parameter("experts.batched_fc1_w").grad.to_vector();
  int empty = 0;
  for (std::int64_t e = 0; e < 8; ++e) {
    if (r.stats.tokens_per_expert[e] != 0) continue;
    ++empty;
    for (std::int64_t i = 0; i < h * d; ++i) ASSERT_EQ(g1[e * h * d + i], 0.0) << "expert " << e;
  }
  EXPECT_GE(empty, 5);  // 3 tokens, 8 experts
}

TEST(MoELayerCpu, ExpertBiasIsZeroWithoutAuxLossFreeBalancing) {
  MoELayer layer(small_config());
  EXPECT_EQ(layer.expert_bias().to_vector(), std::vector<double>(4, 0.0));
}

TEST(MoELayerCpu, ExpertBiasUpdatesBySignOfCountDeficitAndSteersSelection) {
  MoEConfig cfg = small_config();
  cfg.expert_bias = true;
  cfg.score_fn = ScoreFn::kSigmoid;
  cfg.aux_loss = AuxLoss::kNone;
  cfg.capacity_factor = 0;
  MoELayer layer(cfg);
  const std::int64_t T = 13, d = cfg.model_dim, E = cfg.num_experts;
  const std::vector<double> x1 = randn(T * d, 16), x2 = randn(T * d, 17);
  // Counts from training forwards accumulate; evaluation forwards are not counted.
  std::vector<double> count(E, 0.0);
  for (const auto* x : {&x1, &x2}) {
    const ForwardResult r = layer.forward(make_tensor(*x, {T, d}, DType::kF64));
    for (std::int64_t e = 0; e < E; ++e) count[e] += r.stats.tokens_per_expert[e];
  }
  ForwardOptions eval;
  eval.training = false;
  layer.forward(make_tensor(x1, {T, d}, DType::kF64), eval);
  const double rate = 0.25;  // large, so the selection visibly moves; exact in binary
  layer.update_expert_bias(rate);
  const double mean = (2.0 * T * cfg.top_k) / E;
  std::vector<double> want(E);
  for (std::int64_t e = 0; e < E; ++e) want[e] = rate * ((mean > count[e]) - (mean < count[e]));
  EXPECT_EQ(layer.expert_bias().to_vector(), want);
  // Selection uses score + bias, weights the score alone.
  const std::vector<double> x3 = input_with_margin(layer, T, 1e-6, 18);
  expect_matches_reference(layer, x3, T, {}, 1e-9);
  // An update resets the counts: after one (rate 0, to drop the count of the forward just
  // made) a second update with no forward in between has nothing to act on.
  layer.update_expert_bias(0.0);
  const std::vector<double> before = layer.expert_bias().to_vector();
  layer.update_expert_bias(rate);
  EXPECT_EQ(layer.expert_bias().to_vector(), before)
      << "an update with no new counts moved the bias";
}

TEST(MoELayerCpu, ExpertBiasSteersSoftmaxAndGroupLimitedSelection) {
  // Softmax scores under Tutel's rules, and Megatron's sigmoid group-limited routing, where the
  // bias also enters the group scores (ROUTING.md §2).
  for (bool groups : {false, true}) {
    SCOPED_TRACE(groups ? "group-limited sigmoid" : "softmax");
    MoEConfig cfg = small_config();
    cfg.expert_bias = true;
    cfg.capacity_factor = groups ? 0.0 : 0.5;
    if (groups) {
      cfg.rules = RuleSet::kMegatron;
      cfg.score_fn = ScoreFn::kSigmoid;
      cfg.aux_loss = AuxLoss::kSwitch;
      cfg.num_experts = 8;
      cfg.num_groups = 4;
      cfg.topk_groups = 2;
    }
    MoELayer layer(cfg);
    const std::int64_t T = 13, d = cfg.model_dim;
    layer.forward(make_tensor(randn(T * d, 19), {T, d}, DType::kF64));
    layer.update_expert_bias(0.125);
    const std::vector<double> x = input_with_margin(layer, T, 1e-6, 20);
    expect_matches_reference(layer, x, T, {}, 1e-9);
  }
}

TEST(MoELayerCpu, GateNoiseSpreadsTiedTokensEvenly) {
  // All logits 0: without noise every token ties and goes to expert 0; with noise
  // (training only) the argmax is uniform over the experts.
  MoEConfig cfg = small_config();
  cfg.top_k = 1;
  cfg.capacity_factor = 0;
  cfg.gate_noise = 1.0;
  MoELayer layer(cfg);
  set_param(layer, "gates.0.wg.weight", std::vector<double>(cfg.num_experts * cfg.model_dim, 0.0));
  const std::int64_t T = 2000, E = cfg.num_experts;
  const Tensor x = make_tensor(randn(T * cfg.model_dim, 21), {T, cfg.model_dim}, DType::kF64);
  ForwardOptions eval;
  eval.training = false;
  EXPECT_EQ(layer.forward(x, eval).stats.tokens_per_expert, (std::vector<index_t>{T, 0, 0, 0}));
  const ForwardResult r = layer.forward(x);
  const double p = 1.0 / E, sd = std::sqrt(T * p * (1 - p));
  for (std::int64_t e = 0; e < E; ++e)
    EXPECT_NEAR(static_cast<double>(r.stats.tokens_per_expert[e]), T * p, 5 * sd) << "expert " << e;
}

TEST(MoELayerCpu, GateNoiseIsTheCounterBasedDrawOfTheLayerSeed) {
  // ROUTING.md §1: logits + gate_noise * N(0,1) / E with N keyed by (seed, step, token, expert).
  // The first training forward is step 0 or 1 (the header does not say which): accept either.
  MoEConfig cfg = small_config();
  cfg.top_k = 1;
  cfg.capacity_factor = 0;
  cfg.gate_noise = 1.0;
  cfg.seed = 1234;
  MoELayer layer(cfg);
  set_param(layer, "gates.0.wg.weight", std::vector<double>(cfg.num_experts * cfg.model_dim, 0.0));
  const std::int64_t T = 64, E = cfg.num_experts;
  const ForwardResult r =
      layer.forward(make_tensor(randn(T * cfg.model_dim, 22), {T, cfg.model_dim}, DType::kF64));
  bool matched = false;
  for (std::uint64_t step : {0u, 1u}) {
    std::vector<index_t> count(E, 0);
    for (std::int64_t t = 0; t < T; ++t) {
      int best = 0;
      double best_v = -1e300;
      for (std::int64_t e = 0; e < E; ++e) {
        const double v =
            cfg.gate_noise * rng_normal(cfg.seed, RngStream::kGateNoise, step, t, e) / E;
        if (v > best_v) best_v = v, best = static_cast<int>(e);
      }
      count[best] += 1;
    }
    matched = matched || count == r.stats.tokens_per_expert;
  }
  EXPECT_TRUE(matched)
      << "tokens per expert do not follow rng_normal(seed, kGateNoise, step, token, expert)";
}

TEST(MoELayerCpu, NoisyLossesMatchTheReferenceWithTheSameDraws) {
  // With the noise the layer draws (the first training forward is step 0, as the test above
  // checks), the GShard loss takes noisy scores and the load/importance loss compares the
  // noise-free probabilities with the k-th noisy logit.
  for (AuxLoss loss : {AuxLoss::kGShard, AuxLoss::kLoadImportance}) {
    SCOPED_TRACE(to_string(loss));
    MoEConfig cfg = small_config();
    cfg.gate_noise = 0.5;
    cfg.aux_loss = loss;
    cfg.capacity_factor = 0.5;
    MoELayer layer(cfg);
    const std::int64_t T = 13;
    const std::vector<double> x = randn(T * cfg.model_dim, 28);
    sy_ref::RefOptions o = ref_options(layer);
    o.logit_noise = gate_noise_of(cfg, 0, T);
    const sy_ref::RefResult want = sy_ref::reference_forward(cfg, params_of(layer), x, T, o);
    const ForwardResult got = layer.forward(make_tensor(x, {T, cfg.model_dim}, DType::kF64));
    EXPECT_TRUE(sy_ref::rel_l2_within(got.y.to_vector(), want.y, 1e-9));
    EXPECT_NEAR(got.losses.aux, want.aux, 1e-9 * (1 + want.aux));
    EXPECT_EQ(got.stats.tokens_per_expert, want.routing.tokens_per_expert);
  }
}

TEST(MoELayerCpu, NoisyTrainingIsReproducibleFromTheSeed) {
  MoEConfig cfg = small_config(DType::kF32);
  cfg.gate_noise = 1.0;
  cfg.input_jitter = 0.1;
  const Tensor x = make_tensor(randn(29 * cfg.model_dim, 23), {29, cfg.model_dim}, DType::kF32);
  MoELayer a(cfg), b(cfg);
  for (int step = 0; step < 3; ++step)
    EXPECT_TRUE(sy_ref::bitwise_equal(a.forward(x).y.to_vector(), b.forward(x).y.to_vector()))
        << "step " << step;
}

TEST(MoELayerCpu, InputJitterTouchesOnlyTheGateInput) {
  // Megatron's jitter scales the gate's input, never the experts': with a zero gate every token
  // ties whatever the jitter, so training and evaluation give the same y; with a real gate the
  // jittered routing weights move y in training only.
  MoEConfig cfg = small_config();
  cfg.input_jitter = 0.3;
  cfg.capacity_factor = 0;
  const std::int64_t T = 11, d = cfg.model_dim;
  const Tensor x = make_tensor(randn(T * d, 29), {T, d}, DType::kF64);
  ForwardOptions eval;
  eval.training = false;
  MoELayer tied(cfg);
  set_param(tied, "gates.0.wg.weight", std::vector<double>(cfg.num_experts * d, 0.0));
  EXPECT_TRUE(
      sy_ref::bitwise_equal(tied.forward(x).y.to_vector(), tied.forward(x, eval).y.to_vector()));
  MoELayer layer(cfg);
  const std::vector<double> y_eval = layer.forward(x, eval).y.to_vector();
  expect_matches_reference(layer, x.to_vector(), T, eval, 1e-9);  // no jitter in evaluation
  EXPECT_GT(sy_ref::max_abs_diff(layer.forward(x).y.to_vector(), y_eval), 1e-6);
}

TEST(MoELayerCpu, BackwardRefersToTheLastTrainingForward) {
  MoEConfig cfg = small_config();
  const std::int64_t T = 7, d = cfg.model_dim;
  const Tensor x1 = make_tensor(randn(T * d, 24), {T, d}, DType::kF64);
  const Tensor x2 = make_tensor(randn(T * d, 25), {T, d}, DType::kF64);
  const Tensor dy = make_tensor(randn(T * d, 26), {T, d}, DType::kF64);
  MoELayer a(cfg), b(cfg);
  a.forward(x1);
  const std::vector<double> dx_a = a.backward(dy).to_vector();
  b.forward(x1);
  ForwardOptions eval;
  eval.training = false;
  b.forward(x2, eval);
  EXPECT_TRUE(sy_ref::bitwise_equal(b.backward(dy).to_vector(), dx_a));
}

TEST(MoELayerCpu, ParametersFollowTutelsLayout) {
  MoEConfig cfg = small_config();
  cfg.activation = Activation::kSwiGLU;
  cfg.shared_expert_hidden = 3;
  MoELayer layer(cfg);
  const std::int64_t E = 4, d = 6, h = 5;
  std::vector<std::string> names;
  for (Parameter* p : layer.parameters()) names.push_back(p->name);
  ASSERT_FALSE(names.empty());
  EXPECT_EQ(names.front(), "gates.0.wg.weight");  // gate first, shared experts last
  EXPECT_EQ(names.back().rfind("shared_experts.", 0), 0u) << names.back();
  EXPECT_EQ(layer.parameter("gates.0.wg.weight").value.sizes(), (Shape{E, d}));
  EXPECT_EQ(layer.parameter("experts.batched_fc1_w").value.sizes(), (Shape{E, 2 * h, d}));
  EXPECT_EQ(layer.parameter("experts.batched_fc2_w").value.sizes(), (Shape{E, h, d}));
  EXPECT_EQ(layer.parameter("experts.batched_fc1_bias").value.sizes(), (Shape{E, 2 * h}));
  EXPECT_EQ(layer.parameter("experts.batched_fc2_bias").value.sizes(), (Shape{E, d}));
  EXPECT_EQ(layer.parameter("shared_experts.batched_fc1_w").value.sizes(), (Shape{1, 6, d}));
  EXPECT_EQ(layer.parameter("shared_experts.batched_fc2_w").value.sizes(), (Shape{1, 3, d}));
  EXPECT_FALSE(layer.parameter("experts.batched_fc1_w").replicated);  // split under EP
  EXPECT_TRUE(layer.parameter("gates.0.wg.weight").replicated);
  EXPECT_TRUE(layer.parameter("shared_experts.batched_fc1_w").replicated);
}

TEST(MoELayerCpu, ParametersAreInitialisedLikeFreshLinearLayers) {
  // nn.Linear: kaiming-uniform(a = sqrt(5)) weights and biases, both U(+-1/sqrt(fan_in)).
  // fc1 is Linear(d, h); fc2 is Linear(h, d) stored transposed; the gate is Linear(d, E).
  MoEConfig cfg = small_config();
  cfg.model_dim = 16;
  cfg.hidden_size = 9;
  MoELayer layer(cfg);
  const std::vector<std::pair<std::string, double>> bounds = {
      {"gates.0.wg.weight", 1 / std::sqrt(16.0)},
      {"experts.batched_fc1_w", 1 / std::sqrt(16.0)},
      {"experts.batched_fc1_bias", 1 / std::sqrt(16.0)},
      {"experts.batched_fc2_w", 1 / std::sqrt(9.0)},
      {"experts.batched_fc2_bias", 1 / std::sqrt(9.0)}};
  for (const auto& [name, bound] : bounds) {
    const std::vector<double> v = layer.parameter(name).value.to_vector();
    double max_abs = 0;
    for (double x : v) max_abs = std::max(max_abs, std::abs(x));
    EXPECT_LE(max_abs, bound) << name;
    EXPECT_GT(max_abs, 0.5 * bound) << name << " looks not initialised";
  }
  // Same seed, same parameters; another seed, others.
  MoELayer same(cfg);
  cfg.seed += 1;
  MoELayer other(cfg);
  const auto v0 = layer.parameter("experts.batched_fc1_w").value.to_vector();
  EXPECT_EQ(same.parameter("experts.batched_fc1_w").value.to_vector(), v0);
  EXPECT_NE(other.parameter("experts.batched_fc1_w").value.to_vector(), v0);
}

TEST(MoELayerCpu, MovedLayerKeepsWorking) {
  MoEConfig cfg = small_config(DType::kF32);
  const Tensor x = make_tensor(randn(5 * cfg.model_dim, 27), {5, cfg.model_dim}, DType::kF32);
  MoELayer a(cfg);
  const std::vector<double> y = a.forward(x).y.to_vector();
  MoELayer b(std::move(a));
  EXPECT_TRUE(sy_ref::bitwise_equal(b.forward(x).y.to_vector(), y));
  EXPECT_NO_THROW(b.backward(x));
}

}  // namespace
}  // namespace sy_test
