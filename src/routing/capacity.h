// Capacity and slot assignment (ROUTING.md §3): from each token's chosen experts to buffer rows.
//
// Tutel rules: slots are filled choice-major (all first choices, then all second choices, ...),
// in token order or by descending priority (batch-prioritized routing); a choice whose slot
// reaches the capacity is dropped. Megatron rules: an expert's choices are ordered by token; the
// capacity keeps the earliest (position) or the largest weights (probs).
#pragma once

#include <functional>

#include "routing/plan.h"

namespace switchyard {

struct SlotRules {
  RuleSet rules = RuleSet::kTutel;
  double capacity_factor = 1.0;     // > 0 fixed, 0 dropless, < 0 dropless up to a cap
  Layout layout = Layout::kPadded;  // resolved: padded or packed
  index_t alignment = 1;            // capacity rounded up to a multiple of this
  DropPolicy drop_policy = DropPolicy::kProbs;
  index_t max_tokens = 0;  // T_max for the Tutel capacity (T, or the max over ranks)
  // Expert parallelism: maxes max_e needed(e) over ranks (collective), so every rank's padded
  // buffer has the same capacity. Empty in one process.
  std::function<index_t(index_t)> max_needed_over_ranks;
};

// The capacity C for T tokens given the per-expert need (choices routed to each expert).
index_t compute_capacity(const SlotRules& r, index_t num_tokens, index_t num_experts, int k,
                         index_t max_needed);

// Fills plan.{capacity, num_rows, row, row_choice, offsets, expert_count, dropped} from
// plan.expert_idx [T, k]. `priority` [T] (or null) orders tokens for batch-prioritized routing
// (descending, stable); `weight` [T, k] ranks choices for Megatron's probs drop policy.
template <class A>
void assign_slots_cpu(const SlotRules& r, const A* priority, const A* weight, RoutingPlan& plan);

}  // namespace switchyard
