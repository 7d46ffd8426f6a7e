// The few elementwise tensor operations the tool needs around MoE layers (random batches,
// residual adds, the MSE loss and its gradient, finiteness checks). The library's public API
// has no elementwise ops, and these are not worth adding to it: they run on the host, on
// contiguous data, in any floating dtype (f16/bf16 computed in f32, as the library does).
#pragma once

#include <cstdint>

#include "switchyard/switchyard.h"

namespace switchyard::tools {

// A [rows, cols] tensor of N(0, 1) draws: element (r, c) is rng_normal(seed, kData, step, r, c),
// so a batch depends only on (seed, step), never on thread count or dtype.
Tensor random_normal(index_t rows, index_t cols, std::uint64_t seed, std::uint64_t step,
                     DType dtype, Device device);

// a + b elementwise (same shape and dtype) in new storage: a layer may keep its input for
// backward, so the tool never writes into a tensor it has handed to a layer.
Tensor add(const Tensor& a, const Tensor& b);

// MSE mean((y - target)^2), accumulated in f64; when dy is non-null it receives
// dloss/dy = 2 (y - target) / numel in y's dtype and device.
double mse_loss(const Tensor& y, const Tensor& target, Tensor* dy);

// Whether every element is finite (no NaN, no Inf).
bool all_finite(const Tensor& t);

// A contiguous copy on the host (the tensor itself when it already is one), and back.
Tensor to_host(const Tensor& t);
Tensor to_device(const Tensor& host, Device device);

}  // namespace switchyard::tools
