// Small elementwise tensor ops used to glue the stages together (CPU).
#pragma once

#include "switchyard/tensor.h"

namespace switchyard {

// dst += src (same shape and dtype; dst contiguous). With `scale`, dst += src * scale
// (elementwise).
void add_inplace(Tensor& dst, const Tensor& src, const Tensor* scale = nullptr);
// Throws switchyard::Error naming `what` and the first position when t holds NaN or Inf.
void check_finite(const Tensor& t, const char* what);

}  // namespace switchyard
