// Dispatch: moving token rows into the expert buffer (encode) and expert outputs back to tokens
// (decode), for any RoutingPlan layout, and their backward. Every op is a gather: each output
// row is written by one thread from the rows it reads, so no floating-point atomics are needed
// and results are bitwise reproducible.
//
// Shapes: x, y, dy, dx [T, d]; buffers [R, d] (R = plan.num_rows); weight, dweight [T, k]
// (routing dtype). Data tensors share the layer's dtype; arithmetic in f32 (f64 for f64).
// On CUDA, every kernel runs on the current stream (switchyard::current_stream) and no op
// synchronises with the host.
#pragma once

#include "routing/plan.h"

namespace switchyard {

// buffer[r] = x[t] (times the choice's weight when prescore), zeros in padding rows.
Tensor encode(const RoutingPlan& plan, const Tensor& x, bool prescore);
// y[t] = sum over kept choices j of (postscore ? weight[t,j] : 1) * buffer[row[t,j]].
Tensor decode(const RoutingPlan& plan, const Tensor& buffer, bool postscore);

// Backward of decode: returns dbuffer [R, d]; when postscore adds dot(dy[t], buffer[row]) to
// dweight[t, j] for kept choices.
Tensor decode_backward(const RoutingPlan& plan, const Tensor& dy, const Tensor& buffer,
                       bool postscore, Tensor& dweight);
// Backward of encode: returns dx [T, d]; when prescore adds dot(dbuffer[row], x[t]) to dweight.
Tensor encode_backward(const RoutingPlan& plan, const Tensor& dbuffer, const Tensor& x,
                       bool prescore, Tensor& dweight);

// Backends (dispatch_cpu.cpp, dispatch_cuda.cu): called by the functions above after their
// checks, with contiguous data; the plan's tensors are on the data's device.
Tensor encode_cpu(const RoutingPlan& plan, const Tensor& x, bool prescore);
Tensor decode_cpu(const RoutingPlan& plan, const Tensor& buffer, bool postscore);
Tensor decode_backward_cpu(const RoutingPlan& plan, const Tensor& dy, const Tensor& buffer,
                           bool postscore, Tensor& dweight);
Tensor encode_backward_cpu(const RoutingPlan& plan, const Tensor& dbuffer, const Tensor& x,
                           bool prescore, Tensor& dweight);
Tensor encode_cuda(const RoutingPlan& plan, const Tensor& x, bool prescore);
Tensor decode_cuda(const RoutingPlan& plan, const Tensor& buffer, bool postscore);
Tensor decode_backward_cuda(const RoutingPlan& plan, const Tensor& dy, const Tensor& buffer,
                            bool postscore, Tensor& dweight);
Tensor encode_backward_cuda(const RoutingPlan& plan, const Tensor& dbuffer, const Tensor& x,
                            bool prescore, Tensor& dweight);

}  // namespace switchyard
