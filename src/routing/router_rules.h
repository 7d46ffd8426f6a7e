// How the configuration selects the router's formulas (ROUTING.md §2), shared by the backends.
#pragma once

#include "routing/router.h"

namespace switchyard {

inline WeightRule weight_rule(const MoEConfig& cfg) {
  if (cfg.sinkhorn) return WeightRule::kSinkhorn;
  if (cfg.rules == RuleSet::kMegatron && cfg.score_fn == ScoreFn::kSoftmax && !cfg.pre_softmax)
    return WeightRule::kLogitSoftmax;
  return WeightRule::kScores;
}

// The activation that turns noisy logits into `probs`: sinkhorn uses sigmoid for k = 1.
inline ScoreFn probs_fn(const MoEConfig& cfg, WeightRule rule, int k) {
  if (rule == WeightRule::kSinkhorn) return k == 1 ? ScoreFn::kSigmoid : ScoreFn::kSoftmax;
  return cfg.score_fn;
}

// Sinkhorn balances by itself: it has no aux loss (as Megatron) and its weights are not scaled.
inline AuxLoss aux_loss_of(const MoEConfig& cfg, WeightRule rule) {
  return rule == WeightRule::kSinkhorn ? AuxLoss::kNone : cfg.aux_loss;
}
inline double weight_scale(const MoEConfig& cfg, WeightRule rule) {
  return rule == WeightRule::kSinkhorn ? 1.0 : cfg.scaling_factor;
}

// Megatron normalises sigmoid weights with + 1e-20; Tutel clamps the sum at f32 epsilon.
inline bool renormalises(const MoEConfig& cfg, int k) {
  if (k <= 1) return false;
  if (cfg.score_fn == ScoreFn::kSigmoid) return true;
  return cfg.rules == RuleSet::kTutel && cfg.normalize_gate;
}

// The slot rules of one routing call (ROUTING.md §3).
inline SlotRules slot_rules(const MoEConfig& cfg, const RouteArgs& args) {
  SlotRules r;
  r.rules = cfg.rules;
  r.capacity_factor = args.capacity_factor;
  r.layout = args.layout;
  r.alignment = args.alignment > 0 ? args.alignment : cfg.overlap_degree;
  r.drop_policy = cfg.drop_policy;
  r.max_tokens = args.max_tokens;
  if (args.layout == Layout::kPadded) r.max_needed_over_ranks = args.max_needed_over_ranks;
  return r;
}

// Tokens per sequence of the sequence-level Switch loss (all tokens for the batch-level one);
// throws unless the tokens are whole sequences.
inline index_t switch_seq_len(const MoEConfig& cfg, index_t T) {
  const index_t L = cfg.aux_loss == AuxLoss::kSwitchSequence && cfg.seq_len > 0 ? cfg.seq_len : T;
  SY_CHECK(L > 0 && T % L == 0, "the sequence-level aux loss needs whole sequences: ", T,
           " tokens are not a multiple of seq_len=", L);
  return L;
}

}  // namespace switchyard
