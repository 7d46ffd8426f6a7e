// Grouped GEMMs over the packed (dropless) expert layout: E groups, group e owning the rows
// [offsets[e], offsets[e+1]) of the packed operands. All matrices row-major and contiguous.
//
//   grouped_gemm_varying_m: C[rows_e, N] = A[rows_e, K] · op(B[e])
//     a [R, K], b [E, K, N] (trans_b false) or [E, N, K] (trans_b true: op(B[e]) = B[e]ᵀ), c [R,
//     N]. Rows of c outside every group are left as they are.
//   grouped_gemm_varying_k: C[e] = beta C[e] + A[rows_e, M]ᵀ · B[rows_e, N]   (weight gradients)
//     a [R, M], b [R, N], c [E, M, N], beta 0 or 1. A group without rows gives C[e] = beta C[e].
//
// offsets: i64 [E+1] on the operands' device, non-decreasing from 0 to R.
// CUDA (bf16, f16; f32 accumulation): one persistent kernel over the tiles of all groups that
// reads the offsets on the device: no host sync, capturable in a CUDA graph, on the current
// stream; on compute capability 9.0 with an sm_90a build both forms run a wgmma/TMA
// kernel (experts/grouped_gemm_sm90.cuh), elsewhere mma.sync. There the offsets are not validated
// (that would need a sync); out-of-range values are clamped to [0, R], so bad offsets give wrong
// results but no out-of-bounds access. N and K (varying_m) or M and N (varying_k) must be multiples
// of 8. f32/f64 on CUDA are not supported (use cuBLAS per group). CPU (every float dtype): one BLAS
// GEMM per group, offsets checked. Throws switchyard::Error on bad shapes, dtypes, devices or
// offsets (CPU).
#pragma once

#include "switchyard/tensor.h"

namespace switchyard {

void grouped_gemm_varying_m(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& offsets,
                            Tensor& c);
void grouped_gemm_varying_k(const Tensor& a, const Tensor& b, const Tensor& offsets, Tensor& c,
                            double beta = 0.0);

// The CUDA backends (experts/grouped_gemm_cuda.cu), called after the shape checks.
void grouped_gemm_varying_m_cuda(const Tensor& a, const Tensor& b, bool trans_b,
                                 const Tensor& offsets, Tensor& c);
void grouped_gemm_varying_k_cuda(const Tensor& a, const Tensor& b, const Tensor& offsets, Tensor& c,
                                 double beta);

}  // namespace switchyard
