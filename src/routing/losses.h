// Balancing losses (ROUTING.md §5). Each function returns the loss and, when `grad` is not null,
// adds `weight` times its gradient into `grad` — d/dprobs for the GShard loss, d/dlogits for the
// others. All inputs [T, E] row-major in the routing dtype A (float or double).
#pragma once

#include <cstdint>
#include <vector>

#include "switchyard/config.h"

namespace switchyard {

// GShard (Tutel's default): (E / T^2) * sum_e (sum_t probs[t,e]) * #{t : idx[t,0] = e}.
template <class A>
double gshard_loss(index_t T, index_t E, int k, const A* probs, const std::int32_t* idx, A* grad,
                   double weight);

// Tutel's load/importance loss over softmax(logits) with thresholds from the noisy logits.
template <class A>
double load_importance_loss(index_t T, index_t E, int k, const A* logits, const A* noisy,
                            const std::int32_t* idx, double gate_noise, A* grad, double weight);

// Switch / Megatron: E / (k T^2) * sum_e (sum_t prob[t,e]) * tokens(e), tokens from a plain
// top-k of prob; per sequence of seq_len tokens (averaged) when seq_len > 0. With
// `global_tokens` [E] (seq_len == 0 only), tokens(e) and T are those counts and
// `global_num_tokens` (summed over ranks under expert parallelism); prob stays local.
template <class A>
double switch_loss(index_t T, index_t E, int k, const A* logits, ScoreFn score_fn, index_t seq_len,
                   A* grad, double weight, const double* global_tokens = nullptr,
                   double global_num_tokens = 0);
// The Switch loss's tokens(e) [E] for all T tokens: choices of a plain top-k of prob.
template <class A>
std::vector<double> switch_token_counts(index_t T, index_t E, int k, const A* logits,
                                        ScoreFn score_fn);

// ST-MoE z-loss: mean_t (logsumexp_e logits[t,e])^2.
template <class A>
double z_loss(index_t T, index_t E, const A* logits, A* grad, double weight);

// Row helpers shared by the router.
template <class A>
void softmax_row(const A* z, A* out, index_t n);
// Indices of the k largest values of v[n] (ties: lower index first), written to out[k].
template <class A>
void top_k_row(const A* v, index_t n, int k, std::int32_t* out);

}  // namespace switchyard
