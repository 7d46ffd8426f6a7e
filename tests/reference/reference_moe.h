// A naive reference MoE layer, written for clarity and nothing else: loops over tokens, double
// precision, std::vector<double> storage, no BLAS and no switchyard internals. It follows
// the routing rules (docs/routing.md) rule by rule (section numbers in the comments of reference_moe.cpp) and
// is the oracle the layer tests compare against. Forward only: gradients are checked by finite
// differences. Noise and input jitter are not modelled (tests turn them off or run evaluation).
//
// Parameters use Tutel's state_dict names and the layout of DESIGN.md §7:
//   gates.0.wg.weight            [E, d]         (linear gate)
//   gates.0.cosine_projector.weight [p, d], gates.0.cosine_projector.bias [p],
//   gates.0.sim_matrix [p, E], gates.0.temperature [1]                      (cosine gate)
//   experts.batched_fc1_w        [E, h, d]      ([E, 2h, d] gated: rows [0,h) gate, [h,2h) up)
//   experts.batched_fc2_w        [E, h, d]      (fc2 stored transposed)
//   experts.batched_fc1_bias     [E, h]         ([E, 2h] gated)
//   experts.batched_fc2_bias     [E, d]
//   shared_experts.*             the same with one expert and h = shared_expert_hidden
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/config.h"

namespace sy_ref {

using switchyard::MoEConfig;

// Row-major values by Tutel parameter name.
using Params = std::map<std::string, std::vector<double>>;

struct RefOptions {
  std::optional<double> capacity_factor;  // per-call override (ForwardOptions)
  std::optional<int> top_k;               // per-call override
  bool training = true;                   // sinkhorn selection only when training
  std::vector<double> expert_bias;        // [E] selection bias; empty means zeros
  // [T, E] gate noise added to the logits (ROUTING.md §1), e.g. gate_noise * N(0,1) / E drawn
  // with switchyard::rng_normal; empty means none. The load/importance loss still takes its
  // probabilities from the noise-free logits, and the z-loss uses those too.
  std::vector<double> logit_noise;
};

// Everything routing decides, for tests that want to look inside.
struct RefRouting {
  int k = 0;                         // top_k clamped to E
  std::vector<double> logits;        // [T, E] (noisy when noise was given)
  std::vector<double> clean_logits;  // [T, E] without the noise
  std::vector<double> scores;        // [T, E] softmax or sigmoid of the logits
  std::vector<int> idx;              // [T, k] chosen experts, best first
  std::vector<double> w;             // [T, k] combine weights (after normalise, scaling)
  std::vector<char> kept;            // [T, k] 1 when the choice fits in capacity
  std::vector<std::int64_t> slot;    // [T, k] Tutel slot (choice-major); -1 under Megatron
  std::int64_t capacity = 0;         // C (Tutel's rules; Megatron's when cf > 0)
  bool dropless = false;             // no capacity limit applies
  std::vector<std::int64_t> tokens_per_expert;  // [E] kept choices per expert
  std::int64_t dropped_choices = 0;
  // Smallest gap of any discrete decision (k-th vs (k+1)-th selection score, group choice,
  // batch-prioritized order, probs drop policy), relative to a unit scale. Finite-difference and
  // low-precision tests need it well above their perturbation so no choice flips.
  double min_margin = 1e300;
};

struct RefResult {
  std::vector<double> y;  // [T, d]
  double aux = 0.0;       // the configured balancing loss, unweighted
  double z = 0.0;         // z-loss
  RefRouting routing;
};

// x [T, d] row-major.
RefResult reference_forward(const MoEConfig& cfg, const Params& params,
                            const std::vector<double>& x, std::int64_t num_tokens,
                            const RefOptions& options = {});

// The routing alone, from given logits [T, E] (exposed for hand-made logits).
RefRouting reference_route(const MoEConfig& cfg, const std::vector<double>& logits,
                           std::int64_t num_tokens, const RefOptions& options = {});

// Gate logits [T, E] from x [T, d] (linear or cosine).
std::vector<double> reference_logits(const MoEConfig& cfg, const Params& params,
                                     const std::vector<double>& x, std::int64_t num_tokens);

// The balancing loss cfg.aux_loss (ROUTING.md §5) for the given routing.
double reference_aux_loss(const MoEConfig& cfg, const RefRouting& r, std::int64_t num_tokens);
double reference_z_loss(const std::vector<double>& logits, std::int64_t num_tokens,
                        std::int64_t num_experts);

// One FFN expert on one row: prefix is "experts." or "shared_experts.", e the expert index,
// h the hidden size. Returns [d].
std::vector<double> reference_expert(const MoEConfig& cfg, const Params& params,
                                     const std::string& prefix, std::int64_t e, std::int64_t h,
                                     const double* row);

double reference_activation(switchyard::Activation a, double v);

}  // namespace sy_ref
