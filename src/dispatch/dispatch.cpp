// Dispatch entry points: shape, dtype and device checks, then the backend of the data's device.
#include "core/backend.h"
#include "core/dtype_dispatch.h"
#include "dispatch/dispatch.h"

namespace switchyard {
namespace {

void check_rows(const Tensor& t, index_t rows, index_t d, const char* what) {
  SY_CHECK(t.dim() == 2 && t.size(0) == rows && (d < 0 || t.size(1) == d), what, " must be [",
           rows, ", ", d < 0 ? std::string("d") : std::to_string(d), "]");
}

// The plan's tensors must live where the data does, with weights in the routing dtype.
void check_plan(const RoutingPlan& plan, const Tensor& data, const char* op) {
  require_backend(op, data.device());
  SY_CHECK(is_floating(data.dtype()), op, ": data must be floating, got ", dtype_name(data.dtype()));
  SY_CHECK(plan.row.device() == data.device() && plan.row_choice.device() == data.device() &&
               plan.weight.device() == data.device(),
           op, ": the routing plan is not on ", to_string(data.device()));
  SY_CHECK(plan.weight.dtype() == routing_dtype(data.dtype()), op, ": plan weights are ",
           dtype_name(plan.weight.dtype()), ", expected ", dtype_name(routing_dtype(data.dtype())),
           " for ", dtype_name(data.dtype()), " data");
}

void check_dweight(const RoutingPlan& plan, const Tensor& dweight, const char* op) {
  SY_CHECK(dweight.sizes() == plan.weight.sizes() && dweight.dtype() == plan.weight.dtype() &&
               dweight.device() == plan.weight.device() && dweight.is_contiguous(),
           op, ": dweight must be a contiguous [", plan.num_tokens, ", ", plan.top_k, "] ",
           dtype_name(plan.weight.dtype()), " tensor beside the plan");
}

}  // namespace

Tensor encode(const RoutingPlan& plan, const Tensor& x_in, bool prescore) {
  check_rows(x_in, plan.num_tokens, -1, "encode: x");
  check_plan(plan, x_in, "encode");
  const Tensor x = x_in.contiguous();
  if (x.device().is_cuda()) SY_CALL_CUDA(encode, plan, x, prescore);
  return encode_cpu(plan, x, prescore);
}

Tensor decode(const RoutingPlan& plan, const Tensor& buf_in, bool postscore) {
  check_rows(buf_in, plan.num_rows, -1, "decode: expert output");
  check_plan(plan, buf_in, "decode");
  const Tensor buf = buf_in.contiguous();
  if (buf.device().is_cuda()) SY_CALL_CUDA(decode, plan, buf, postscore);
  return decode_cpu(plan, buf, postscore);
}

Tensor decode_backward(const RoutingPlan& plan, const Tensor& dy_in, const Tensor& buf_in,
                       bool postscore, Tensor& dweight) {
  check_rows(dy_in, plan.num_tokens, -1, "decode backward: dy");
  check_rows(buf_in, plan.num_rows, dy_in.size(1), "decode backward: expert output");
  check_plan(plan, dy_in, "decode_backward");
  check_dweight(plan, dweight, "decode_backward");
  SY_CHECK(buf_in.dtype() == dy_in.dtype(), "decode backward: dy is ", dtype_name(dy_in.dtype()),
           ", the expert output ", dtype_name(buf_in.dtype()));
  const Tensor dy = dy_in.contiguous(), buf = buf_in.contiguous();
  if (dy.device().is_cuda()) SY_CALL_CUDA(decode_backward, plan, dy, buf, postscore, dweight);
  return decode_backward_cpu(plan, dy, buf, postscore, dweight);
}

Tensor encode_backward(const RoutingPlan& plan, const Tensor& dbuf_in, const Tensor& x_in,
                       bool prescore, Tensor& dweight) {
  check_rows(x_in, plan.num_tokens, -1, "encode backward: x");
  check_rows(dbuf_in, plan.num_rows, x_in.size(1), "encode backward: dbuffer");
  check_plan(plan, x_in, "encode_backward");
  check_dweight(plan, dweight, "encode_backward");
  SY_CHECK(dbuf_in.dtype() == x_in.dtype(), "encode backward: dbuffer is ",
           dtype_name(dbuf_in.dtype()), ", x ", dtype_name(x_in.dtype()));
  const Tensor dbuf = dbuf_in.contiguous(), x = x_in.contiguous();
  if (x.device().is_cuda()) SY_CALL_CUDA(encode_backward, plan, dbuf, x, prescore, dweight);
  return encode_backward_cpu(plan, dbuf, x, prescore, dweight);
}

}  // namespace switchyard
