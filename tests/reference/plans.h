// Routing plans for dispatch tests: random logits routed on the CPU.
#pragma once

#include "reference/random.h"
#include "routing/router.h"

namespace sy_ref {

// A plan for T tokens over E experts, top-k, from N(0,1) logits (seed 1), in the routing dtype of
// `dtype` data.
inline switchyard::RoutingPlan random_plan(switchyard::index_t T, switchyard::index_t E, int k,
                                           switchyard::Layout layout, switchyard::DType dtype,
                                           double capacity_factor) {
  using namespace switchyard;
  MoEConfig cfg;
  cfg.model_dim = 1;
  cfg.hidden_size = 1;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.aux_loss = AuxLoss::kNone;
  RouteArgs a;
  a.top_k = k;
  a.capacity_factor = capacity_factor;
  a.layout = layout;
  RouterState st;
  Losses l;
  const DType rd = dtype == DType::kF64 ? DType::kF64 : DType::kF32;
  return route_cpu(cfg, a, Tensor::from_vector(randn(T * E, 1), {T, E}, rd), st, l);
}

}  // namespace sy_ref
