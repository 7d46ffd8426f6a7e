// The reference itself against Tutel's numbers: an oracle is only useful if it is right.
#include <gtest/gtest.h>

#include "reference/compare.h"
#include "reference/golden.h"
#include "reference/reference_moe.h"

namespace sy_ref {
namespace {

class ReferenceMoEGolden : public ::testing::TestWithParam<int> {};

TEST_P(ReferenceMoEGolden, MatchesTutelOutputAndLoss) {
  const GoldenCase& g = golden_cases().at(GetParam());
  const RefResult r = reference_forward(g.config(), g.params, g.x, g.T);
  // Tutel ran in f32: the golden values carry f32 rounding.
  EXPECT_TRUE(all_close(r.y, g.y, 1e-5, 1e-5));
  EXPECT_NEAR(r.aux, g.l_aux, 1e-5 + 1e-5 * std::abs(g.l_aux));
}

INSTANTIATE_TEST_SUITE_P(ReferenceMoETutel, ReferenceMoEGolden,
                         ::testing::Range(0, static_cast<int>(golden_cases().size())),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return golden_cases().at(info.param).name();
                         });

// Hand-checkable routing cases: ties, choice-major slots, capacity rules.
MoEConfig routing_config(std::int64_t E, int k) {
  MoEConfig cfg;
  cfg.model_dim = 1;
  cfg.hidden_size = 1;
  cfg.num_experts = E;
  cfg.top_k = k;
  return cfg;
}

TEST(ReferenceMoERouting, TiesGoToTheLowerExpertIndex) {
  const MoEConfig cfg = routing_config(4, 2);
  const RefRouting r = reference_route(cfg, {0.0, 1.0, 1.0, 1.0}, 1);
  EXPECT_EQ(r.idx, (std::vector<int>{1, 2}));
}

TEST(ReferenceMoERouting, SlotsAreChoiceMajorAndDropBeyondCapacity) {
  // Three tokens all choose expert 0 first and expert 1 second; E = 2, k = 2, T = 3:
  // samples_per_expert = 2, C = 2 * floor(0.5 * 2) = 2.
  MoEConfig cfg = routing_config(2, 2);
  cfg.capacity_factor = 0.5;
  const RefRouting r = reference_route(cfg, {1, 0, 1, 0, 1, 0}, 3);
  EXPECT_EQ(r.capacity, 2);
  EXPECT_EQ(r.slot, (std::vector<std::int64_t>{0, 0, 1, 1, 2, 2}));
  EXPECT_EQ(r.kept, (std::vector<char>{1, 1, 1, 1, 0, 0}));
  EXPECT_EQ(r.dropped_choices, 2);
  EXPECT_EQ(r.tokens_per_expert, (std::vector<std::int64_t>{2, 2}));
}

TEST(ReferenceMoERouting, SecondChoicesQueueBehindAllFirstChoices) {
  // Token 0 picks (1, 0), tokens 1 and 2 pick (0, 1): token 0's second choice lands on expert 0
  // behind both first choices, slot 2.
  MoEConfig cfg = routing_config(2, 2);
  cfg.capacity_factor = 0;
  const RefRouting r = reference_route(cfg, {0, 1, 1, 0, 1, 0}, 3);
  EXPECT_EQ(r.slot, (std::vector<std::int64_t>{0, 2, 0, 1, 1, 2}));
  EXPECT_EQ(r.capacity, 3);  // dropless: the largest need
  EXPECT_EQ(r.dropped_choices, 0);
}

TEST(ReferenceMoERouting, NegativeCapacityFactorCapsTheDroplessCapacity) {
  // 5 tokens to expert 0 (k = 1, E = 2): need 5; cap = 1 * floor(0.5 * ceil(5/2)) = 1.
  MoEConfig cfg = routing_config(2, 1);
  cfg.capacity_factor = -0.5;
  const RefRouting r = reference_route(cfg, {1, 0, 1, 0, 1, 0, 1, 0, 1, 0}, 5);
  EXPECT_EQ(r.capacity, 1);
  EXPECT_EQ(r.dropped_choices, 4);
}

TEST(ReferenceMoERouting, CapacityIsRoundedUpToTheAlignment) {
  MoEConfig cfg = routing_config(2, 1);
  cfg.capacity_factor = 1.0;
  cfg.overlap_degree = 4;
  const RefRouting r = reference_route(cfg, {1, 0, 1, 0, 0, 1}, 3);
  EXPECT_EQ(r.capacity, 4);  // 1 * floor(1 * 2) = 2, rounded up to 4
}

TEST(ReferenceMoERouting, BatchPrioritizedRoutingServesConfidentTokensFirst) {
  // Both tokens choose expert 0; token 1 is more confident, so it gets the only slot.
  MoEConfig cfg = routing_config(2, 1);
  cfg.capacity_factor = 0.5;  // C = max(1, floor(0.5 * 1)) = 1
  cfg.batch_prioritized_routing = true;
  const RefRouting r = reference_route(cfg, {0.5, 0, 3, 0}, 2);
  EXPECT_EQ(r.capacity, 1);
  EXPECT_EQ(r.kept, (std::vector<char>{0, 1}));
}

TEST(ReferenceMoERouting, MegatronCapacityAndDropPolicies) {
  // T = 3, k = 1, E = 2, cf = 0.5: C = ceil(3 * 1 / 2 * 0.5) = 1. All tokens pick expert 0;
  // token 2 has the largest weight.
  MoEConfig cfg = routing_config(2, 1);
  cfg.rules = switchyard::RuleSet::kMegatron;
  cfg.pre_softmax = true;
  cfg.normalize_gate = false;
  cfg.capacity_factor = 0.5;
  const std::vector<double> logits = {1, 0, 2, 0, 3, 0};
  RefRouting r = reference_route(cfg, logits, 3);
  EXPECT_EQ(r.capacity, 1);
  EXPECT_EQ(r.kept, (std::vector<char>{0, 0, 1}));
  cfg.drop_policy = switchyard::DropPolicy::kPosition;
  r = reference_route(cfg, logits, 3);
  EXPECT_EQ(r.kept, (std::vector<char>{1, 0, 0}));
}

TEST(ReferenceMoELosses, ZLossIsTheMeanSquaredLogSumExp) {
  const double l = reference_z_loss({0, 0, std::log(3.0), 0}, 2, 2);
  const double a = std::log(2.0), b = std::log(4.0);
  EXPECT_NEAR(l, (a * a + b * b) / 2, 1e-15);
}

}  // namespace
}  // namespace sy_ref
