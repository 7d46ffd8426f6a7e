#include "routing/plan.h"

namespace switchyard {

RoutingPlan plan_to_device(const RoutingPlan& plan, Device device) {
  RoutingPlan p = plan;
  for (Tensor* t : {&p.expert_idx, &p.weight, &p.row, &p.row_choice, &p.offsets, &p.expert_count})
    if (t->defined()) *t = t->to(device);
  return p;
}

}  // namespace switchyard
