// Capacity and slot rules (ROUTING.md §3), on cases small enough to check by hand.
#include <gtest/gtest.h>

#include "routing/capacity.h"

namespace switchyard {
namespace {

RoutingPlan plan_for(const std::vector<std::vector<int>>& choices, index_t E, Layout layout) {
  RoutingPlan p;
  p.num_tokens = static_cast<index_t>(choices.size());
  p.num_experts = E;
  p.top_k = static_cast<int>(choices.at(0).size());
  p.layout = layout;
  std::vector<double> flat;
  for (const auto& c : choices) flat.insert(flat.end(), c.begin(), c.end());
  p.expert_idx = Tensor::from_vector(flat, {p.num_tokens, p.top_k}, DType::kI32);
  return p;
}

std::vector<double> rows(const RoutingPlan& p) { return p.row.to_vector(); }

TEST(Capacity, TutelFixedDroplessAndCappedRules) {
  SlotRules r;  // Tutel: C = k * floor(cf * ceil(T / E))
  r.capacity_factor = 1.0;
  EXPECT_EQ(compute_capacity(r, 13, 4, 2, 99), 8);  // ceil(13/4) = 4
  r.capacity_factor = 0.5;
  EXPECT_EQ(compute_capacity(r, 13, 4, 2, 99), 4);
  r.capacity_factor = 0.1;
  EXPECT_EQ(compute_capacity(r, 13, 4, 2, 99), 1);  // at least 1
  r.capacity_factor = 0.0;
  EXPECT_EQ(compute_capacity(r, 13, 4, 2, 10), 10);  // dropless: the largest need
  r.capacity_factor = -0.5;
  EXPECT_EQ(compute_capacity(r, 13, 4, 2, 10), 4);  // capped
  EXPECT_EQ(compute_capacity(r, 13, 4, 2, 3), 3);
  r.capacity_factor = 1.0;
  r.max_tokens = 40;  // inequivalent tokens: T_max over ranks
  EXPECT_EQ(compute_capacity(r, 13, 4, 2, 99), 20);
  // A rank with no tokens takes the others' capacity: the padded all-to-all needs equal buffers.
  EXPECT_EQ(compute_capacity(r, 0, 4, 2, 0), 20);
  r.max_tokens = 0;
  EXPECT_EQ(compute_capacity(r, 0, 4, 2, 0), 0);  // no tokens anywhere, no rows
}

TEST(Capacity, AlignmentRoundsUpAndLargeAlignmentsGoTo128) {
  SlotRules r;
  r.capacity_factor = 1.0;
  r.alignment = 3;
  EXPECT_EQ(compute_capacity(r, 13, 4, 2, 0), 9);
  r.alignment = 300;  // > 256: the alignment itself becomes a multiple of 128 (384)
  EXPECT_EQ(compute_capacity(r, 13, 4, 2, 0), 384);
}

TEST(Capacity, MegatronRule) {
  SlotRules r;
  r.rules = RuleSet::kMegatron;
  r.capacity_factor = 1.0;
  EXPECT_EQ(compute_capacity(r, 10, 4, 2, 99), 5);  // ceil(10 * 2 / 4 * 1.0)
  r.capacity_factor = 1.1;
  EXPECT_EQ(compute_capacity(r, 10, 4, 2, 99), 6);  // ceil(5.5)
  r.capacity_factor = 0.0;
  EXPECT_EQ(compute_capacity(r, 10, 4, 2, 7), 7);
}

TEST(Slots, TutelFillsChoiceMajorAndDropsPastCapacity) {
  // Token choices (expert of choice 0, choice 1).
  RoutingPlan p = plan_for({{0, 1}, {0, 1}, {1, 0}}, 2, Layout::kPadded);
  SlotRules r;
  r.capacity_factor = 1.0;  // C = 2 * floor(1 * ceil(3/2)) = 4: nothing dropped
  assign_slots_cpu<float>(r, nullptr, nullptr, p);
  EXPECT_EQ(p.capacity, 4);
  // First choices: t0->e0 slot 0, t1->e0 slot 1, t2->e1 slot 0; then second choices:
  // t0->e1 slot 1, t1->e1 slot 2, t2->e0 slot 2. Padded rows are e * C + slot.
  EXPECT_EQ(rows(p), (std::vector<double>{0, 5, 1, 6, 4, 2}));
  EXPECT_EQ(p.dropped, 0);
  EXPECT_EQ(p.num_rows, 8);

  RoutingPlan q = plan_for({{0, 1}, {0, 1}, {1, 0}}, 2, Layout::kPacked);
  r.capacity_factor = 0.5;  // C = 2 * floor(0.5 * 2) = 2: slots 2 are dropped
  assign_slots_cpu<float>(r, nullptr, nullptr, q);
  EXPECT_EQ(q.capacity, 2);
  EXPECT_EQ(q.dropped, 2);
  EXPECT_EQ(q.offsets.to_vector(), (std::vector<double>{0, 2, 4}));
  EXPECT_EQ(rows(q), (std::vector<double>{0, 3, 1, -1, 2, -1}));
  EXPECT_EQ(q.row_choice.to_vector(), (std::vector<double>{0, 2, 4, 1}));
  EXPECT_EQ(q.expert_count.to_vector(), (std::vector<double>{2, 2}));
}

TEST(Slots, BatchPrioritizedOrdersTokensByDescendingPriority) {
  RoutingPlan p = plan_for({{0, 1}, {0, 1}, {1, 0}}, 2, Layout::kPacked);
  SlotRules r;
  r.capacity_factor = 0.0;
  const float priority[] = {0.1f, 0.9f, 0.5f};  // order t1, t2, t0
  assign_slots_cpu<float>(r, priority, nullptr, p);
  // First choices: t1->e0 0, t2->e1 0, t0->e0 1; second: t1->e1 1, t2->e0 2, t0->e1 2.
  // Packed offsets {0, 3, 6}.
  EXPECT_EQ(rows(p), (std::vector<double>{1, 5, 0, 4, 3, 2}));
}

TEST(Slots, BatchPrioritizedTiesKeepTokenOrder) {
  RoutingPlan p = plan_for({{0}, {0}, {0}}, 1, Layout::kPacked);
  SlotRules r;
  r.capacity_factor = 0.0;
  const float priority[] = {0.5f, 0.7f, 0.5f};
  assign_slots_cpu<float>(r, priority, nullptr, p);
  EXPECT_EQ(rows(p), (std::vector<double>{1, 0, 2}));
}

TEST(Slots, MegatronPositionPolicyKeepsTheEarliestTokens) {
  RoutingPlan p = plan_for({{0, 1}, {1, 0}, {0, 1}, {0, 1}}, 2, Layout::kPacked);
  SlotRules r;
  r.rules = RuleSet::kMegatron;
  r.drop_policy = DropPolicy::kPosition;
  r.capacity_factor = 0.75;  // C = ceil(4 * 2 / 2 * 0.75) = 3
  assign_slots_cpu<float>(r, nullptr, nullptr, p);
  EXPECT_EQ(p.capacity, 3);
  // Expert 0 receives t0, t1 (its second choice), t2, t3 in token order: t3 is dropped.
  // Expert 1 receives t0, t1, t2, t3 likewise.
  EXPECT_EQ(rows(p), (std::vector<double>{0, 3, 4, 1, 2, 5, -1, -1}));
}

TEST(Slots, MegatronProbsPolicyKeepsTheLargestWeightsInTokenOrder) {
  RoutingPlan p = plan_for({{0}, {0}, {0}, {0}}, 1, Layout::kPacked);
  SlotRules r;
  r.rules = RuleSet::kMegatron;
  r.drop_policy = DropPolicy::kProbs;
  r.capacity_factor = 0.5;  // C = 2
  const float weight[] = {0.1f, 0.9f, 0.5f, 0.9f};
  assign_slots_cpu<float>(r, nullptr, weight, p);
  EXPECT_EQ(rows(p), (std::vector<double>{-1, 0, -1, 1}));
  EXPECT_EQ(p.dropped, 2);
}

TEST(Slots, PaddedLayoutLeavesPaddingRowsUnowned) {
  RoutingPlan p = plan_for({{1}, {1}}, 3, Layout::kPadded);
  SlotRules r;
  r.capacity_factor = 1.0;  // C = 1 * floor(ceil(2/3)) = 1
  assign_slots_cpu<float>(r, nullptr, nullptr, p);
  EXPECT_EQ(p.num_rows, 3);
  EXPECT_EQ(p.row_choice.to_vector(), (std::vector<double>{-1, 0, -1}));
  EXPECT_EQ(p.expert_count.to_vector(), (std::vector<double>{0, 1, 0}));
  EXPECT_EQ(p.dropped, 1);
}

}  // namespace
}  // namespace switchyard
