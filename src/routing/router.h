// The router (ROUTING.md §1-5): logits -> scores -> top-k experts and weights -> slots, plus the
// balancing losses; and the backward from weight gradients and loss weights to dlogits.
#pragma once

#include <functional>
#include <vector>

#include "routing/capacity.h"
#include "routing/plan.h"
#include "switchyard/config.h"
#include "switchyard/moe_layer.h"

namespace switchyard {

struct RouteArgs {
  int top_k = 1;  // already clamped to E
  double capacity_factor = 1.0;
  Layout layout = Layout::kPadded;  // resolved
  bool training = true;
  std::uint64_t step = 0;               // random-stream counter (advanced per training forward)
  index_t token_base = 0;               // global index of token 0, for the random draws
  index_t max_tokens = 0;               // T_max for Tutel's capacity (0: this call's T)
  const Tensor* expert_bias = nullptr;  // [E] f32, or null
  int alignment = 0;                    // capacity alignment (0: cfg.overlap_degree)
  // Expert parallelism (ROUTING.md §3, §5); empty in one process. Collective: every rank's
  // router calls them in the same order.
  //  max_needed_over_ranks: the padded capacity's max_e needed(e), maxed over ranks.
  //  sum_over_ranks: sums the Switch loss's tokens(e) (and T, the last entry) over ranks.
  std::function<index_t(index_t)> max_needed_over_ranks;
  std::function<void(std::vector<double>&)> sum_over_ranks;
};

// How choices and weights are derived from the logits (ROUTING.md §2).
enum class WeightRule {
  kScores,        // weights = scores of the chosen experts (Tutel; Megatron pre-softmax, sigmoid)
  kLogitSoftmax,  // Megatron softmax: top-k of the logits, softmax over the k chosen
  kSinkhorn,      // Megatron sinkhorn: sinkhorn selection (training; top-k of act(logits) in
                  // evaluation), weights act(logits) at the chosen experts
};

// What the router keeps for its backward. All [T, E] tensors in the routing dtype.
struct RouterState {
  Tensor logits;  // clean logits
  Tensor noisy;   // logits + gate noise (same tensor as logits without noise)
  Tensor probs;   // softmax or sigmoid of the noisy logits
  Tensor gates;   // [T, k] score of each choice before normalisation/scaling
  WeightRule rule = WeightRule::kScores;
  Tensor loss_count;  // CUDA router: i32 choice-0 counts [1, E] (GShard) or top-k counts per
                      // sequence [S, E] (Switch), for the losses' gradients
  // The Switch loss's tokens(e) [E] and T summed over ranks (expert parallelism), else empty.
  std::vector<double> switch_tokens;
  double switch_num_tokens = 0;
  // CUDA router, load/importance loss: d cv2 / d importance and d cv2 / d load, f64 [2E].
  Tensor loss_grad;
};

// The unweighted losses as 0-dim f64 tensors on the router's device (no host sync).
struct LossTensors {
  Tensor aux, z;
};

// Routes logits [T, E] (routing dtype: f32, or f64 for f64 layers). Throws on NaN/Inf logits.
RoutingPlan route_cpu(const MoEConfig& cfg, const RouteArgs& args, const Tensor& logits,
                      RouterState& state, Losses& losses);

// dweight [T, k] (gradient of the objective w.r.t. plan.weight) and the loss weights ->
// dlogits [T, E] in the routing dtype.
Tensor route_backward_cpu(const MoEConfig& cfg, const RoutingPlan& plan, const RouterState& state,
                          const Tensor& dweight, const LossWeights& weights);

// The CUDA router (router_cuda.cu): logits, plan, state and losses on the GPU. It supports every
// option of one process except sinkhorn on noisy logits (Tutel's gate noise in training), which
// routes on the host, as do the expert-parallel hooks; see route_cuda_supports. Sinkhorn runs
// its max_iters iterations as launches that return at once after convergence (no host sync).
// `nonfinite` (i32, one element, on
// the device) is set to 1 when the logits hold NaN or Inf: read it at a sync. The plan's
// `dropped` is -1 (count it from expert_count); with packed dropless routing its `capacity` is
// -1 (no capacity).
bool route_cuda_supports(const MoEConfig& cfg, const RouteArgs& args, index_t num_tokens);
RoutingPlan route_cuda(const MoEConfig& cfg, const RouteArgs& args, const Tensor& logits,
                       RouterState& state, LossTensors& losses, Tensor& nonfinite);
Tensor route_backward_cuda(const MoEConfig& cfg, const RoutingPlan& plan, const RouterState& state,
                           const Tensor& dweight, const LossWeights& weights);

}  // namespace switchyard
