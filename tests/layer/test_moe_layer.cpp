// The layer (f64) against the naive reference over a grid of configurations: every routing rule
// of ROUTING.md, every activation, both rule sets, awkward sizes. y, losses and routing stats.
#include <gtest/gtest.h>

#include <functional>
#include <sstream>

#include "layer/layer_test_util.h"

namespace sy_test {
namespace {

// f64 all the way: only summation order separates the layer from the reference.
constexpr double kTolF64 = 1e-9;

struct GridCase {
  std::string name;
  std::function<void(MoEConfig&)> setup;
  std::int64_t T = 13;
  ForwardOptions options;
};

void PrintTo(const GridCase& c, std::ostream* os) { *os << c.name; }

std::string cf_name(double cf) {
  std::ostringstream os;
  os << (cf < 0 ? "m" : "") << std::abs(cf);
  std::string s = os.str();
  for (auto& ch : s)
    if (ch == '.') ch = 'p';
  return s;
}

// Tutel's rules: k x capacity factor x batch-prioritized, with the remaining flags varied
// across the grid so each appears both on and off.
std::vector<GridCase> tutel_grid() {
  std::vector<GridCase> cases;
  int n = 0;
  for (int k : {1, 2, 3, 4})
    for (double cf : {1.0, 0.5, 0.0, -0.5})
      for (bool bpr : {false, true}) {
        const bool norm = (n % 2) == 0, bias = (n % 3) != 0, post = (n % 4) != 1;
        ++n;
        GridCase c;
        c.name = "Tutel_k" + std::to_string(k) + "_cf" + cf_name(cf) + (bpr ? "_bpr" : "") +
                 (norm ? "_norm" : "_nonorm") + (bias ? "_bias" : "_nobias") +
                 (post ? "_postscore" : "_prescore");
        c.setup = [=](MoEConfig& cfg) {
          cfg.top_k = k;
          cfg.capacity_factor = cf;
          cfg.batch_prioritized_routing = bpr;
          cfg.normalize_gate = norm;
          cfg.has_fc1_bias = bias;
          cfg.has_fc2_bias = !bias || k % 2 == 0;  // the two biases independently
          cfg.is_postscore = post;
        };
        cases.push_back(c);
      }
  return cases;
}

std::vector<GridCase> feature_cases() {
  std::vector<GridCase> c;
  auto add = [&](std::string name, std::function<void(MoEConfig&)> f, std::int64_t T = 13,
                 ForwardOptions fo = {}) {
    c.push_back({std::move(name), std::move(f), T, fo});
  };
  // Activations, plain and gated (fc1 has 2h rows).
  for (Activation a : {Activation::kRelu, Activation::kGelu, Activation::kGeluTanh,
                       Activation::kSilu, Activation::kSwiGLU, Activation::kGeGLU})
    add(std::string("Activation_") + to_string(a), [=](MoEConfig& cfg) { cfg.activation = a; });
  add("GatedWithoutBiases", [](MoEConfig& cfg) {
    cfg.activation = Activation::kSwiGLU;
    cfg.has_fc1_bias = cfg.has_fc2_bias = false;
  });
  // Scores, scaling, balancing.
  add("SigmoidScores_k2", [](MoEConfig& cfg) {
    cfg.score_fn = ScoreFn::kSigmoid;
    cfg.aux_loss = AuxLoss::kSwitch;
  });
  add("SigmoidScores_k1", [](MoEConfig& cfg) {
    cfg.score_fn = ScoreFn::kSigmoid;
    cfg.top_k = 1;
    cfg.aux_loss = AuxLoss::kNone;
  });
  add("ScalingFactor", [](MoEConfig& cfg) { cfg.scaling_factor = 2.5; });
  add("ScalingFactorSigmoid", [](MoEConfig& cfg) {
    cfg.score_fn = ScoreFn::kSigmoid;
    cfg.aux_loss = AuxLoss::kNone;
    cfg.scaling_factor = 1.5;
  });
  add("GroupLimited_E8_G4_keep2_k4", [](MoEConfig& cfg) {
    cfg.num_experts = 8;
    cfg.top_k = 4;
    cfg.num_groups = 4;
    cfg.topk_groups = 2;
    cfg.capacity_factor = 0;
  });
  add("GroupLimitedSigmoid_E8_G2_keep1_k2", [](MoEConfig& cfg) {
    cfg.num_experts = 8;
    cfg.num_groups = 2;
    cfg.topk_groups = 1;
    cfg.score_fn = ScoreFn::kSigmoid;
    cfg.aux_loss = AuxLoss::kSwitch;
  });
  add("CosineGate", [](MoEConfig& cfg) { cfg.gate = GateType::kCosine; });
  add("CosineGate_k1_bpr", [](MoEConfig& cfg) {
    cfg.gate = GateType::kCosine;
    cfg.top_k = 1;
    cfg.batch_prioritized_routing = true;
    cfg.capacity_factor = 0.5;
  });
  add("SharedExpert", [](MoEConfig& cfg) { cfg.shared_expert_hidden = 7; });
  add("SharedExpertGatedNoBias", [](MoEConfig& cfg) {
    cfg.shared_expert_hidden = 3;
    cfg.activation = Activation::kGeGLU;
    cfg.has_fc1_bias = cfg.has_fc2_bias = false;
  });
  // Tutel's output_dim: experts (and the shared one) map d = 6 to 4 or 9 columns.
  add("OutputDimNarrowerWithSharedExpert", [](MoEConfig& cfg) {
    cfg.output_dim = 4;
    cfg.shared_expert_hidden = 3;
  });
  add("OutputDimWiderPaddedPrescore", [](MoEConfig& cfg) {
    cfg.output_dim = 9;
    cfg.is_postscore = false;
    cfg.activation = Activation::kSwiGLU;
  });
  add("OverlapDegreeAlignsCapacity", [](MoEConfig& cfg) { cfg.overlap_degree = 3; });
  // An alignment above 256 is itself rounded up to a multiple of 128: 300 -> 384.
  add("LargeAlignmentRoundsTo128", [](MoEConfig& cfg) { cfg.overlap_degree = 300; });
  // capacity_factor > 0 gives at least one slot: T = 2, E = 4: k * floor(0.5 * 1) = 0 -> 1.
  add(
      "PositiveCapacityIsAtLeastOne",
      [](MoEConfig& cfg) {
        cfg.top_k = 1;
        cfg.capacity_factor = 0.5;
      },
      2);
  // Losses.
  add("Loss_Switch", [](MoEConfig& cfg) { cfg.aux_loss = AuxLoss::kSwitch; });
  add(
      "Loss_SwitchSequence",
      [](MoEConfig& cfg) {
        cfg.aux_loss = AuxLoss::kSwitchSequence;
        cfg.seq_len = 4;
      },
      12);
  add("Loss_None", [](MoEConfig& cfg) { cfg.aux_loss = AuxLoss::kNone; });
  {
    // Load/importance needs gate_noise > 0; evaluation adds no noise, so it is exact.
    ForwardOptions eval;
    eval.training = false;
    add(
        "Loss_LoadImportance_Eval",
        [](MoEConfig& cfg) {
          cfg.aux_loss = AuxLoss::kLoadImportance;
          cfg.gate_noise = 1.0;
        },
        13, eval);
    add(
        "Sinkhorn_Eval_k1",
        [](MoEConfig& cfg) {
          cfg.rules = RuleSet::kMegatron;
          cfg.sinkhorn = true;
          cfg.top_k = 1;
          cfg.aux_loss = AuxLoss::kNone;
          cfg.capacity_factor = 0;
        },
        13, eval);
    add(
        "Sinkhorn_Eval_k2",
        [](MoEConfig& cfg) {
          cfg.rules = RuleSet::kMegatron;
          cfg.sinkhorn = true;
          cfg.aux_loss = AuxLoss::kNone;
          cfg.capacity_factor = 0;
        },
        13, eval);
  }
  add("Sinkhorn_k1", [](MoEConfig& cfg) {
    cfg.rules = RuleSet::kMegatron;
    cfg.sinkhorn = true;
    cfg.top_k = 1;
    cfg.aux_loss = AuxLoss::kNone;
    cfg.capacity_factor = 0;
  });
  add(
      "Sinkhorn_k2",
      [](MoEConfig& cfg) {
        cfg.rules = RuleSet::kMegatron;
        cfg.sinkhorn = true;
        cfg.aux_loss = AuxLoss::kNone;
        cfg.capacity_factor = 0;
      },
      19);
  // Megatron's rules: top-k of the logits then softmax, or pre-softmax, or sigmoid; capacity
  // ceil(T k / E cf) with both drop policies; dropless.
  for (DropPolicy p : {DropPolicy::kProbs, DropPolicy::kPosition})
    for (double cf : {0.5, 1.0}) {
      const std::string pn = to_string(p);
      add(
          "Megatron_" + pn + "_cf" + cf_name(cf),
          [=](MoEConfig& cfg) {
            cfg.rules = RuleSet::kMegatron;
            cfg.drop_policy = p;
            cfg.capacity_factor = cf;
            cfg.aux_loss = AuxLoss::kSwitch;
          },
          19);
      add(
          "Megatron_PreSoftmax_" + pn + "_cf" + cf_name(cf),
          [=](MoEConfig& cfg) {
            cfg.rules = RuleSet::kMegatron;
            cfg.pre_softmax = true;
            cfg.normalize_gate = false;  // Megatron's pre-softmax weights are not renormalised
            cfg.top_k = 1;
            cfg.drop_policy = p;
            cfg.capacity_factor = cf;
            cfg.aux_loss = AuxLoss::kSwitch;
          },
          19);
    }
  add("Megatron_Dropless", [](MoEConfig& cfg) {
    cfg.rules = RuleSet::kMegatron;
    cfg.capacity_factor = 0;
  });
  add(
      "Megatron_PadToCapacity",
      [](MoEConfig& cfg) {
        cfg.rules = RuleSet::kMegatron;
        cfg.capacity_factor = 0.5;
        cfg.layout = Layout::kPadded;
      },
      19);
  add("Megatron_Sigmoid_GroupLimited", [](MoEConfig& cfg) {
    cfg.rules = RuleSet::kMegatron;
    cfg.score_fn = ScoreFn::kSigmoid;
    cfg.num_experts = 8;
    cfg.top_k = 4;
    cfg.num_groups = 4;
    cfg.topk_groups = 2;
    cfg.scaling_factor = 2.0;
    cfg.capacity_factor = 0;
    cfg.aux_loss = AuxLoss::kSwitch;
  });
  add("Megatron_GroupLimitedOnLogits", [](MoEConfig& cfg) {
    cfg.rules = RuleSet::kMegatron;
    cfg.num_experts = 8;
    cfg.top_k = 2;
    cfg.num_groups = 4;
    cfg.topk_groups = 2;
    cfg.capacity_factor = 0;
  });
  // Awkward sizes.
  add(
      "OneToken", [](MoEConfig&) {}, 1);
  add(
      "NineteenTokens_d11", [](MoEConfig& cfg) { cfg.model_dim = 11; }, 19);
  add(
      "FewerTokensThanExperts",
      [](MoEConfig& cfg) {
        cfg.num_experts = 8;
        cfg.top_k = 1;
        cfg.capacity_factor = 1.0;
      },
      3);
  add("TopKEqualsE", [](MoEConfig& cfg) {
    cfg.top_k = 4;
    cfg.capacity_factor = 0;
  });
  add("TopKAboveEIsClamped", [](MoEConfig& cfg) {
    cfg.top_k = 6;
    cfg.capacity_factor = 0.5;
  });
  add("SingleExpert", [](MoEConfig& cfg) {
    cfg.num_experts = 1;
    cfg.top_k = 1;
  });
  return c;
}

std::vector<GridCase> all_cases() {
  std::vector<GridCase> c = tutel_grid();
  for (auto& f : feature_cases()) c.push_back(f);
  return c;
}

class MoELayerMatchesReference : public ::testing::TestWithParam<GridCase> {};

TEST_P(MoELayerMatchesReference, InOutputLossesAndStats) {
  const GridCase& c = GetParam();
  MoEConfig cfg = small_config();
  c.setup(cfg);
  MoELayer layer(cfg);
  // A tiny margin suffices in f64; it only rules out exact ties the two could break apart.
  const std::vector<double> x = input_with_margin(layer, c.T, 1e-7, 11, c.options);
  expect_matches_reference(layer, x, c.T, c.options, kTolF64);
}

INSTANTIATE_TEST_SUITE_P(MoELayerGrid, MoELayerMatchesReference, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<GridCase>& info) {
                           return info.param.name;
                         });

// The same grid in f32 within the f32 tolerance of DESIGN.md §7 (relative L2 1e-5).
class MoELayerF32MatchesReference : public ::testing::TestWithParam<GridCase> {};

TEST_P(MoELayerF32MatchesReference, WithinF32Tolerance) {
  const GridCase& c = GetParam();
  MoEConfig cfg = small_config(DType::kF32);
  c.setup(cfg);
  MoELayer layer(cfg);
  // f32 logits round at about 1e-7: keep decisions well clear of ties.
  const std::vector<double> x = input_with_margin(layer, c.T, 1e-4, 11, c.options);
  const sy_ref::RefResult want = reference_of(layer, x, c.T, c.options);
  const ForwardResult got =
      layer.forward(make_tensor(x, {c.T, cfg.model_dim}, cfg.dtype), c.options);
  EXPECT_TRUE(sy_ref::rel_l2_within(got.y.to_vector(), want.y, 1e-5));
  EXPECT_NEAR(got.losses.aux, want.aux, 1e-5 * (1 + std::abs(want.aux)));
  EXPECT_NEAR(got.losses.z, want.z, 1e-5 * (1 + std::abs(want.z)));
  EXPECT_EQ(got.stats.tokens_per_expert, want.routing.tokens_per_expert);
}

INSTANTIATE_TEST_SUITE_P(MoELayerGrid, MoELayerF32MatchesReference,
                         ::testing::ValuesIn(tutel_grid()),
                         [](const ::testing::TestParamInfo<GridCase>& info) {
                           return info.param.name;
                         });

TEST(MoELayerCpu, Fp32GateMatchesReferenceInF32) {
  MoEConfig cfg = small_config(DType::kF32);
  cfg.fp32_gate = true;
  MoELayer layer(cfg);
  const std::vector<double> x = input_with_margin(layer, 13, 1e-4, 5);
  const sy_ref::RefResult want = reference_of(layer, x, 13);
  const ForwardResult got = layer.forward(make_tensor(x, {13, cfg.model_dim}, cfg.dtype));
  EXPECT_TRUE(sy_ref::rel_l2_within(got.y.to_vector(), want.y, 1e-5));
  EXPECT_EQ(layer.parameter("gates.0.wg.weight").value.dtype(), DType::kF32);
}

}  // namespace
}  // namespace sy_test
