// RoutingPlan: what routing hands to dispatch — which expert row each (token, choice) goes to,
// with which weight. Layout-independent: padded and packed plans differ only in row numbering.
#pragma once

#include "switchyard/config.h"
#include "switchyard/tensor.h"

namespace switchyard {

struct RoutingPlan {
  index_t num_tokens = 0;   // T
  index_t num_experts = 0;  // E
  int top_k = 0;            // k (already clamped to E)
  index_t capacity = 0;     // C
  index_t num_rows = 0;     // R: E*C padded, sum of kept counts packed
  Layout layout = Layout::kPacked;
  Tensor expert_idx;    // [T, k] i32: chosen expert of each choice
  Tensor weight;        // [T, k] f32 (f64 for f64 layers): combine weight of each choice
  Tensor row;           // [T, k] i64: buffer row of each choice, -1 when dropped
  Tensor row_choice;    // [R] i64: t*k + j of the choice in each row, -1 for padding
  Tensor offsets;       // [E+1] i64: rows of expert e are [offsets[e], offsets[e+1])
  Tensor expert_count;  // [E] i64: choices kept per expert
  index_t dropped = 0;  // choices dropped by the capacity
};

}  // namespace switchyard

namespace switchyard {

// The plan with its tensors copied to `device` (for backends that route on one device and
// dispatch on another, and for tests).
RoutingPlan plan_to_device(const RoutingPlan& plan, Device device);

}  // namespace switchyard
