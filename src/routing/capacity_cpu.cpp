#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "routing/capacity.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

index_t round_up(index_t v, index_t a) { return a <= 1 ? v : (v + a - 1) / a * a; }

}  // namespace

index_t compute_capacity(const SlotRules& r, index_t T, index_t E, int k, index_t max_needed) {
  // A rank with no tokens still takes the capacity of the others (T_max) under expert parallelism.
  if (std::max(T, r.max_tokens) == 0) return 0;
  const double cf = r.capacity_factor;
  index_t cap;  // the capacity_factor's capacity, before dropless rules
  if (r.rules == RuleSet::kTutel) {
    const index_t t_max = std::max(r.max_tokens, T);
    const index_t samples_per_expert = (t_max + E - 1) / E;
    cap = std::max<index_t>(1, k * static_cast<index_t>(std::floor(
                                       std::fabs(cf) * static_cast<double>(samples_per_expert))));
  } else {
    // Megatron: ceil((num_tokens * topk / num_experts) * capacity_factor).
    const double per_expert = static_cast<double>(T * k) / static_cast<double>(E);
    cap = std::max<index_t>(1, static_cast<index_t>(std::ceil(per_expert * std::fabs(cf))));
  }
  index_t c = cf > 0 ? cap : cf == 0 ? max_needed : std::min(max_needed, cap);
  index_t a = std::max<index_t>(r.alignment, 1);
  if (a > 256) a = round_up(a, 128);
  return round_up(c, a);
}

namespace {
// max_e needed(e), over ranks under expert parallelism.
index_t max_needed(const SlotRules& r, const std::vector<index_t>& needed) {
  const index_t m = needed.empty() ? 0 : *std::max_element(needed.begin(), needed.end());
  return r.max_needed_over_ranks ? r.max_needed_over_ranks(m) : m;
}
}  // namespace

template <class A>
void assign_slots_cpu(const SlotRules& r, const A* priority, const A* weight, RoutingPlan& plan) {
  const index_t T = plan.num_tokens, E = plan.num_experts;
  const int k = plan.top_k;
  const std::int32_t* idx = plan.expert_idx.data<std::int32_t>();
  std::vector<index_t> slot(static_cast<std::size_t>(T * k), -1);
  std::vector<index_t> needed(static_cast<std::size_t>(E), 0);
  std::vector<index_t> kept(static_cast<std::size_t>(E), 0);
  index_t capacity = 0;

  if (r.rules == RuleSet::kTutel) {
    std::vector<index_t> order(static_cast<std::size_t>(T));
    std::iota(order.begin(), order.end(), 0);
    if (priority)
      std::stable_sort(order.begin(), order.end(),
                       [&](index_t a, index_t b) { return priority[a] > priority[b]; });
    for (int j = 0; j < k; ++j)  // choice-major: every first choice before any second
      for (index_t t : order) slot[t * k + j] = needed[idx[t * k + j]]++;
    capacity = compute_capacity(r, T, E, k, max_needed(r, needed));
    for (index_t c = 0; c < T * k; ++c)
      if (slot[c] >= capacity) slot[c] = -1;
  } else {
    std::vector<std::vector<index_t>> choices(static_cast<std::size_t>(E));
    for (index_t c = 0; c < T * k; ++c) choices[idx[c]].push_back(c);  // token order
    for (index_t e = 0; e < E; ++e) needed[e] = static_cast<index_t>(choices[e].size());
    capacity = compute_capacity(r, T, E, k, max_needed(r, needed));
    for (index_t e = 0; e < E; ++e) {
      std::vector<index_t>& list = choices[e];
      if (static_cast<index_t>(list.size()) > capacity) {
        if (r.drop_policy == DropPolicy::kProbs) {
          // Keep the largest weights (ties: earlier token), then restore token order.
          std::stable_sort(list.begin(), list.end(),
                           [&](index_t a, index_t b) { return weight[a] > weight[b]; });
          list.resize(static_cast<std::size_t>(capacity));
          std::sort(list.begin(), list.end());
        } else {
          list.resize(static_cast<std::size_t>(capacity));
        }
      }
      for (std::size_t s = 0; s < list.size(); ++s) slot[list[s]] = static_cast<index_t>(s);
    }
  }
  for (index_t e = 0; e < E; ++e) kept[e] = std::min(needed[e], capacity);

  plan.capacity = capacity;
  plan.offsets = Tensor::empty({E + 1}, DType::kI64);
  index_t* off = plan.offsets.data<index_t>();
  off[0] = 0;
  for (index_t e = 0; e < E; ++e)
    off[e + 1] = off[e] + (plan.layout == Layout::kPadded ? capacity : kept[e]);
  plan.num_rows = off[E];
  plan.expert_count =
      Tensor::from_vector(std::vector<double>(kept.begin(), kept.end()), {E}, DType::kI64);
  plan.row = Tensor::empty({T, k}, DType::kI64);
  plan.row_choice = Tensor::empty({plan.num_rows}, DType::kI64);
  index_t* row = plan.row.data<index_t>();
  index_t* row_choice = plan.row_choice.data<index_t>();
  std::fill(row_choice, row_choice + plan.num_rows, index_t{-1});
  plan.dropped = 0;
  for (index_t c = 0; c < T * k; ++c) {
    if (slot[c] < 0) {
      row[c] = -1;
      ++plan.dropped;
    } else {
      row[c] = off[idx[c]] + slot[c];
      row_choice[row[c]] = c;
    }
  }
}

template void assign_slots_cpu<float>(const SlotRules&, const float*, const float*, RoutingPlan&);
template void assign_slots_cpu<double>(const SlotRules&, const double*, const double*,
                                       RoutingPlan&);

}  // namespace switchyard
