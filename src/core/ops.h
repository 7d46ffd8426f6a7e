// Small elementwise tensor ops used to glue the stages together.
#pragma once

#include <cstdint>

#include "switchyard/tensor.h"

namespace switchyard {

// dst += src (same shape, dtype and device; dst contiguous). With `scale`, dst += src * scale
// (elementwise). On CUDA it runs on the current stream (ops_cuda.cu).
void add_inplace(Tensor& dst, const Tensor& src, const Tensor* scale = nullptr);
void add_inplace_cuda(Tensor& dst, const Tensor& src, const Tensor* scale);

// A [rows, cols] tensor of 1 + eps * (2 u - 1), u = rng_uniform(seed, stream, step,
// row_base + row, col): the same values on every backend (computed in double, then rounded to
// `dtype`).
Tensor uniform_factors(index_t rows, index_t cols, double eps, std::uint64_t seed,
                       std::uint32_t stream, std::uint64_t step, index_t row_base, DType dtype,
                       Device device);
void uniform_factors_cuda(Tensor& out, double eps, std::uint64_t seed, std::uint32_t stream,
                          std::uint64_t step, index_t row_base);

// Throws switchyard::Error naming `what` and the first position when t holds NaN or Inf (CPU).
void check_finite(const Tensor& t, const char* what);

}  // namespace switchyard
