#include "routing/plan.h"

namespace switchyard {
namespace {

Tensor copy_to(const Tensor& t, Device device) {
  if (!t.defined() || t.device() == device) return t;
  Tensor out = Tensor::empty(t.sizes(), t.dtype(), device);
  out.copy_from(t);
  return out;
}

}  // namespace

RoutingPlan plan_to_device(const RoutingPlan& plan, Device device) {
  RoutingPlan p = plan;
  for (Tensor* t : {&p.expert_idx, &p.weight, &p.row, &p.row_choice, &p.offsets, &p.expert_count})
    *t = copy_to(*t, device);
  return p;
}

}  // namespace switchyard
