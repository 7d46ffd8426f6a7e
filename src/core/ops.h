// Small elementwise tensor ops used to glue the stages together.
#pragma once

#include "switchyard/tensor.h"

namespace switchyard {

// dst += src (same shape, dtype and device; dst contiguous). With `scale`, dst += src * scale
// (elementwise). On CUDA it runs on the current stream (ops_cuda.cu).
void add_inplace(Tensor& dst, const Tensor& src, const Tensor* scale = nullptr);
void add_inplace_cuda(Tensor& dst, const Tensor& src, const Tensor* scale);

// Throws switchyard::Error naming `what` and the first position when t holds NaN or Inf (CPU).
void check_finite(const Tensor& t, const char* what);

}  // namespace switchyard
