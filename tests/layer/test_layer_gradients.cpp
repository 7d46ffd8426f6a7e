// backward() against central finite differences of the layer's own forward, in f64, for dx,
// every parameter and every loss. Inputs have clear routing margins (no choice flips under the
// step), and the forward itself is pinned to the reference by test_moe_layer.cpp.
#include <gtest/gtest.h>

#include <functional>

#include "layer/layer_test_util.h"

namespace sy_test {
namespace {

constexpr double kStep = 1e-6;

struct GradCase {
  std::string name;
  std::function<void(MoEConfig&)> setup;
  LossWeights weights;
  std::int64_t T = 9;
};

void PrintTo(const GradCase& c, std::ostream* os) { *os << c.name; }

std::vector<GradCase> grad_cases() {
  std::vector<GradCase> c;
  auto add = [&](std::string n, std::function<void(MoEConfig&)> f, LossWeights w = {},
                 std::int64_t T = 9) {
    c.push_back({std::move(n), std::move(f), w, T});
  };
  const LossWeights aux{.aux = 0.3, .z = 0.0};
  const LossWeights z{.aux = 0.0, .z = 0.2};
  add("Output_k2_cf1", [](MoEConfig&) {});
  add("Output_k1_Dropless", [](MoEConfig& cfg) {
    cfg.top_k = 1;
    cfg.capacity_factor = 0;
  });
  add("Output_k2_DropsAtCapacity", [](MoEConfig& cfg) { cfg.capacity_factor = 0.5; });
  add("Output_k3_BatchPrioritized", [](MoEConfig& cfg) {
    cfg.top_k = 3;
    cfg.batch_prioritized_routing = true;
    cfg.capacity_factor = 0.5;
  });
  add("Output_kE_NoNormalize", [](MoEConfig& cfg) {
    cfg.top_k = 4;
    cfg.normalize_gate = false;
  });
  add("Output_NegativeCapacity", [](MoEConfig& cfg) { cfg.capacity_factor = -0.5; });
  add("Output_PreScore", [](MoEConfig& cfg) { cfg.is_postscore = false; });
  add("Output_NoBiases", [](MoEConfig& cfg) { cfg.has_fc1_bias = cfg.has_fc2_bias = false; });
  add("OutputDim", [](MoEConfig& cfg) {  // Tutel's output_dim: y and fc2 narrower than x
    cfg.output_dim = cfg.model_dim - 2;
    cfg.shared_expert_hidden = 3;
  });
  add("OutputDimWiderPrescore", [](MoEConfig& cfg) {
    cfg.output_dim = cfg.model_dim + 3;
    cfg.is_postscore = false;
    cfg.capacity_factor = 0;
  });
  for (Activation a : {Activation::kGelu, Activation::kGeluTanh, Activation::kSilu,
                       Activation::kSwiGLU, Activation::kGeGLU})
    add(std::string("Activation_") + to_string(a), [=](MoEConfig& cfg) { cfg.activation = a; });
  add("SigmoidScoresScaled", [](MoEConfig& cfg) {
    cfg.score_fn = ScoreFn::kSigmoid;
    cfg.scaling_factor = 2.0;
    cfg.aux_loss = AuxLoss::kNone;
  });
  add("CosineGate", [](MoEConfig& cfg) { cfg.gate = GateType::kCosine; });
  add("SharedExpert", [](MoEConfig& cfg) { cfg.shared_expert_hidden = 4; });
  add("GroupLimited", [](MoEConfig& cfg) {
    cfg.num_experts = 8;
    cfg.top_k = 4;
    cfg.num_groups = 4;
    cfg.topk_groups = 2;
    cfg.capacity_factor = 0;
  });
  add("Sinkhorn", [](MoEConfig& cfg) {
    cfg.rules = RuleSet::kMegatron;
    cfg.sinkhorn = true;
    cfg.aux_loss = AuxLoss::kNone;
    cfg.capacity_factor = 0;
  });
  add(
      "Megatron_Probs",
      [](MoEConfig& cfg) {
        cfg.rules = RuleSet::kMegatron;
        cfg.capacity_factor = 0.5;
        cfg.aux_loss = AuxLoss::kSwitch;
      },
      aux);
  add("Megatron_Position", [](MoEConfig& cfg) {
    cfg.rules = RuleSet::kMegatron;
    cfg.capacity_factor = 0.5;
    cfg.drop_policy = DropPolicy::kPosition;
  });
  // Losses, each weighted on its own.
  add(
      "Loss_GShard", [](MoEConfig& cfg) { cfg.capacity_factor = 0.5; }, aux);
  add(
      "Loss_GShard_k1", [](MoEConfig& cfg) { cfg.top_k = 1; }, aux);
  add(
      "Loss_Switch", [](MoEConfig& cfg) { cfg.aux_loss = AuxLoss::kSwitch; }, aux);
  add(
      "Loss_SwitchSigmoid",
      [](MoEConfig& cfg) {
        cfg.aux_loss = AuxLoss::kSwitch;
        cfg.score_fn = ScoreFn::kSigmoid;
      },
      aux);
  add(
      "Loss_SwitchSequence",
      [](MoEConfig& cfg) {
        cfg.aux_loss = AuxLoss::kSwitchSequence;
        cfg.seq_len = 3;
      },
      aux);
  add(
      "Loss_Z", [](MoEConfig&) {}, z);
  add(
      "Loss_ZCosine", [](MoEConfig& cfg) { cfg.gate = GateType::kCosine; }, z);
  return c;
}

class MoELayerGradients : public ::testing::TestWithParam<GradCase> {};

TEST_P(MoELayerGradients, MatchFiniteDifferences) {
  const GradCase& c = GetParam();
  MoEConfig cfg = small_config();
  c.setup(cfg);
  MoELayer layer(cfg);
  const std::int64_t T = c.T, d = cfg.model_dim, o = cfg.out_dim();
  std::vector<double> x = input_with_margin(layer, T, 1e-4, 3);
  const std::vector<double> dy = randn(T * o, 99);
  const LossWeights lw = c.weights;

  // The objective whose gradient backward computes: sum(y * dy) + aux * l_aux + z * l_z.
  auto objective = [&](const std::vector<double>& xv) {
    const ForwardResult r = layer.forward(make_tensor(xv, {T, d}, DType::kF64));
    return dot(r.y.to_vector(), dy) + lw.aux * r.losses.aux + lw.z * r.losses.z;
  };
  auto close = [](double fd, double an) { return std::abs(fd - an) <= 2e-7 + 1e-6 * std::abs(an); };

  layer.forward(make_tensor(x, {T, d}, DType::kF64));
  layer.zero_grad();
  const std::vector<double> dx =
      layer.backward(make_tensor(dy, {T, o}, DType::kF64), lw).to_vector();
  std::map<std::string, std::vector<double>> grads;
  for (Parameter* p : layer.parameters()) grads[p->name] = p->grad.to_vector();

  int bad = 0;
  for (std::int64_t i = 0; i < T * d; ++i) {
    const double x0 = x[i];
    x[i] = x0 + kStep;
    const double fp = objective(x);
    x[i] = x0 - kStep;
    const double fm = objective(x);
    x[i] = x0;
    const double fd = (fp - fm) / (2 * kStep);
    if (!close(fd, dx[i]) && bad++ < 5)
      ADD_FAILURE() << "dx[" << i << "]: backward " << dx[i] << ", finite difference " << fd;
  }
  for (Parameter* p : layer.parameters()) {
    ASSERT_EQ(p->value.dtype(), DType::kF64) << p->name;
    ASSERT_TRUE(p->value.is_contiguous()) << p->name;
    double* v = p->value.data<double>();
    const std::vector<double>& g = grads[p->name];
    for (std::int64_t i = 0; i < p->value.numel(); ++i) {
      const double v0 = v[i];
      v[i] = v0 + kStep;
      const double fp = objective(x);
      v[i] = v0 - kStep;
      const double fm = objective(x);
      v[i] = v0;
      const double fd = (fp - fm) / (2 * kStep);
      if (!close(fd, g[i]) && bad++ < 10)
        ADD_FAILURE() << "grad of " << p->name << "[" << i << "]: backward " << g[i]
                      << ", finite difference " << fd;
    }
  }
  EXPECT_EQ(bad, 0) << "gradient entries disagreeing with finite differences";
}

INSTANTIATE_TEST_SUITE_P(MoELayerF64, MoELayerGradients, ::testing::ValuesIn(grad_cases()),
                         [](const ::testing::TestParamInfo<GradCase>& info) {
                           return info.param.name;
                         });

// Gate noise changes with every training forward (its step counter), so finite differences use
// a fresh layer per evaluation: each one's first forward draws the same noise.
TEST(MoELayerGradients, NoisyLossesMatchFiniteDifferences) {
  for (AuxLoss loss : {AuxLoss::kGShard, AuxLoss::kLoadImportance}) {
    SCOPED_TRACE(to_string(loss));
    MoEConfig cfg = small_config();
    cfg.gate_noise = 0.5;
    cfg.aux_loss = loss;
    cfg.capacity_factor = 0;
    cfg.top_k = loss == AuxLoss::kGShard ? 2 : 1;
    const std::int64_t T = 9, d = cfg.model_dim;
    const std::vector<double> dy = randn(T * d, 41);
    MoELayer probe(cfg);
    sy_ref::RefOptions o = ref_options(probe);
    o.logit_noise = gate_noise_of(cfg, 0, T);
    // An input with clear margins under this noise.
    std::vector<double> x;
    for (int attempt = 0; attempt < 200; ++attempt) {
      x = randn(T * d, 40 + 7919 * attempt);
      if (sy_ref::reference_forward(cfg, params_of(probe), x, T, o).routing.min_margin > 1e-4)
        break;
    }
    const LossWeights lw{.aux = 0.7, .z = 0.0};
    const sy_ref::Params p0 = params_of(probe);
    auto objective = [&](const sy_ref::Params& p, const std::vector<double>& xv) {
      MoELayer l(cfg);
      for (const auto& [name, v] : p) set_param(l, name, v);
      const ForwardResult r = l.forward(make_tensor(xv, {T, d}, DType::kF64));
      return dot(r.y.to_vector(), dy) + lw.aux * r.losses.aux;
    };
    MoELayer layer(cfg);
    layer.forward(make_tensor(x, {T, d}, DType::kF64));
    layer.zero_grad();
    const std::vector<double> dx =
        layer.backward(make_tensor(dy, {T, d}, DType::kF64), lw).to_vector();
    int bad = 0;
    for (std::int64_t i = 0; i < T * d; ++i) {
      std::vector<double> xp = x, xm = x;
      xp[i] += kStep;
      xm[i] -= kStep;
      const double fd = (objective(p0, xp) - objective(p0, xm)) / (2 * kStep);
      if (std::abs(fd - dx[i]) > 2e-7 + 1e-6 * std::abs(dx[i]) && bad++ < 5)
        ADD_FAILURE() << "dx[" << i << "]: backward " << dx[i] << ", finite difference " << fd;
    }
    const std::string wg = "gates.0.wg.weight";
    const std::vector<double> g = layer.parameter(wg).grad.to_vector();
    for (std::size_t i = 0; i < g.size(); ++i) {
      sy_ref::Params pp = p0, pm = p0;
      pp[wg][i] += kStep;
      pm[wg][i] -= kStep;
      const double fd = (objective(pp, x) - objective(pm, x)) / (2 * kStep);
      if (std::abs(fd - g[i]) > 2e-7 + 1e-6 * std::abs(g[i]) && bad++ < 10)
        ADD_FAILURE() << "grad of " << wg << "[" << i << "]: backward " << g[i]
                      << ", finite difference " << fd;
    }
    EXPECT_EQ(bad, 0);
  }
}

TEST(MoELayerGradients, DroppedChoiceStillGetsGradientThroughTheNormalizer) {
  // ROUTING.md §2: weights are normalised over all k choices before drops, so a token whose
  // second choice is dropped has a kept weight w0 / (s0 + s1) that depends on s1.
  MoEConfig cfg = small_config();
  // E = 3 so the two chosen scores do not sum to 1 (with E = 2 the normaliser is constant).
  cfg.num_experts = 3;
  cfg.top_k = 2;
  cfg.capacity_factor = 0.5;  // T = 6: C = 2 * floor(0.5 * 2) = 2, 12 choices for 6 slots
  cfg.has_fc1_bias = cfg.has_fc2_bias = false;
  MoELayer layer(cfg);
  const std::int64_t T = 6, d = cfg.model_dim;
  const std::vector<double> x = input_with_margin(layer, T, 1e-4, 21);
  const sy_ref::RefResult ref = reference_of(layer, x, T);
  ASSERT_GT(ref.routing.dropped_choices, 0);
  // Compare the gate-weight gradient with finite differences (as above, gate only).
  const std::vector<double> dy = randn(T * d, 5);
  layer.forward(make_tensor(x, {T, d}, DType::kF64));
  layer.zero_grad();
  layer.backward(make_tensor(dy, {T, d}, DType::kF64));
  Parameter& wg = layer.parameter("gates.0.wg.weight");
  const std::vector<double> g = wg.grad.to_vector();
  double* v = wg.value.data<double>();
  for (std::int64_t i = 0; i < wg.value.numel(); ++i) {
    const double v0 = v[i];
    v[i] = v0 + kStep;
    const double fp = dot(layer.forward(make_tensor(x, {T, d}, DType::kF64)).y.to_vector(), dy);
    v[i] = v0 - kStep;
    const double fm = dot(layer.forward(make_tensor(x, {T, d}, DType::kF64)).y.to_vector(), dy);
    v[i] = v0;
    EXPECT_NEAR(g[i], (fp - fm) / (2 * kStep), 2e-7 + 1e-6 * std::abs(g[i])) << "Wg[" << i << "]";
  }
}

}  // namespace
}  // namespace sy_test
