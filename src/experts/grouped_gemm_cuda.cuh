// Raw-pointer grouped GEMM launchers for CUDA sources (see experts/grouped_gemm.h for the forms
// and experts/grouped_gemm_kernels.cuh for the kernel). bf16 and f16; offsets i64 [E+1] on the
// device, read there (no host sync); `rows` is R, the packed operands' row count. Throws
// switchyard::Error when N, K (varying_m) or M, N (varying_k) are not multiples of 8 or a base
// pointer is not 16-byte aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "switchyard/index.h"

namespace switchyard {

// c [R, N] rows of group e = a [R, K] rows of group e · op(b[e]), b [E, K, N] or [E, N, K].
// Fused epilogue: + bias[e] (bias [E, N], 16-byte aligned, or null), then relu when asked, then
// zero where mask [R, N] (16-byte aligned, or null) is not positive: relu's backward given relu's
// output; in f32 before the one rounding to the output type.
void grouped_gemm_varying_m_cuda(const __nv_bfloat16* a, const __nv_bfloat16* b, bool trans_b,
                                 __nv_bfloat16* c, const index_t* offsets, index_t num_groups,
                                 index_t rows, index_t n, index_t k, cudaStream_t stream,
                                 const __nv_bfloat16* bias = nullptr, bool relu = false,
                                 const __nv_bfloat16* mask = nullptr);
void grouped_gemm_varying_m_cuda(const __half* a, const __half* b, bool trans_b, __half* c,
                                 const index_t* offsets, index_t num_groups, index_t rows,
                                 index_t n, index_t k, cudaStream_t stream,
                                 const __half* bias = nullptr, bool relu = false,
                                 const __half* mask = nullptr);

// c[e] [M, N] = beta c[e] + (a [R, M] rows of group e)ᵀ · (b [R, N] rows of group e), beta 0 or 1.
void grouped_gemm_varying_k_cuda(const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* c,
                                 const index_t* offsets, index_t num_groups, index_t rows,
                                 index_t m, index_t n, double beta, cudaStream_t stream);
void grouped_gemm_varying_k_cuda(const __half* a, const __half* b, __half* c,
                                 const index_t* offsets, index_t num_groups, index_t rows,
                                 index_t m, index_t n, double beta, cudaStream_t stream);

// Whether the current device runs the sm_90a wgmma/TMA kernels (compute capability 9.0 and an
// sm_90a build) rather than the portable mma.sync ones. A cached host query, no sync.
bool grouped_gemm_uses_wgmma();

}  // namespace switchyard
