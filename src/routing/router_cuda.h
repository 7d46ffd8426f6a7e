// Pieces of the CUDA router shared by its files: column sums in a fixed order (deterministic: no
// floating-point atomics) and Megatron's sinkhorn.
#pragma once

#include <cuda_runtime.h>

#include "switchyard/tensor.h"

namespace switchyard {

// out[s, e] (f64, [S, E]) = the sum over the seg_len rows t of segment s of x[t, e], each times
// row_scale[t] when row_scale is given (x's dtype, [T]), accumulated in f64 in a fixed order.
void launch_column_sums(const Tensor& x, index_t seg_len, Tensor& out, cudaStream_t stream,
                        const Tensor* row_scale = nullptr);

// Megatron's sinkhorn (ROUTING.md §2) on logits z [T, E] (f32 or f64): returns d1 * c * d0 with
// c = exp(z - max z), in z's dtype. Every one of max_iters iterations is launched (so the step
// needs no host sync and a CUDA graph can capture it); once mean |d1 - d1_old| <= tol a flag on
// the device makes the later ones return at once, as the host loop's break.
Tensor sinkhorn_cuda(const Tensor& z, int max_iters, double tol, cudaStream_t stream);

}  // namespace switchyard
