// Row-major GEMMs through cuBLAS for CUDA sources: C[m, n] = alpha op(A) op(B) + beta C, with
// batches of matrices a fixed stride apart. f32 is true FP32 unless the calling thread allows
// TF32 (core/math_mode.h), f16/bf16 accumulate in f32, f64 in f64.
#pragma once

#include <cublas_v2.h>

#include <type_traits>

#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "core/math_mode.h"

#define SY_CUBLAS_CHECK(expr)                                                                   \
  do {                                                                                          \
    const cublasStatus_t sy_st_ = (expr);                                                       \
    SY_CHECK(sy_st_ == CUBLAS_STATUS_SUCCESS, #expr " failed: ", cublasGetStatusString(sy_st_), \
             " at ", __FILE__, ":", __LINE__);                                                  \
  } while (0)

namespace switchyard {

// The process's cuBLAS handle for `device`, bound to `stream`.
cublasHandle_t cublas_handle(int device, cudaStream_t stream);

template <class T>
cudaDataType_t cuda_data_type() {
  if constexpr (std::is_same_v<T, double>)
    return CUDA_R_64F;
  else if constexpr (std::is_same_v<T, float>)
    return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, __half>)
    return CUDA_R_16F;
  else
    return CUDA_R_16BF;
}

template <class T>
cublasComputeType_t cuda_compute_type() {
  if constexpr (std::is_same_v<T, double>)
    return CUBLAS_COMPUTE_64F;
  else if constexpr (std::is_same_v<T, float>)
    return tf32_allowed() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  else
    return CUBLAS_COMPUTE_32F;
}

// A size as cuBLAS's int.
inline int cublas_int(index_t v) {
  SY_CHECK(v <= 2147483647, "cuBLAS dimension ", v, " exceeds int");
  return static_cast<int>(v);
}

// cuBLAS is column-major, so this computes Cᵀ = op(B)ᵀ op(A)ᵀ.
template <class T>
void gemm(cublasHandle_t h, bool ta, bool tb, index_t m, index_t n, index_t k, const T* a,
          index_t lda, index_t stride_a, const T* b, index_t ldb, index_t stride_b, double beta,
          T* c, index_t ldc, index_t stride_c, index_t batch, double alpha = 1.0) {
  if (m == 0 || n == 0 || batch == 0) return;
  using A = cuda_acc_t<T>;
  const A alpha_v = static_cast<A>(alpha), beta_v = static_cast<A>(beta);
  const cublasComputeType_t compute = cuda_compute_type<T>();
  constexpr auto i32 = cublas_int;
  SY_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, i32(n), i32(m), i32(k),
      &alpha_v, b, cuda_data_type<T>(), i32(ldb), stride_b, a, cuda_data_type<T>(), i32(lda),
      stride_a, &beta_v, c, cuda_data_type<T>(), i32(ldc), stride_c, i32(batch), compute,
      CUBLAS_GEMM_DEFAULT));
}

// The batched GEMM of gemm() with beta 0 and an epilogue fused by cuBLASLt: C = op(A) op(B) +
// bias, then max(0, .) where relu is set, with one pass over C instead of a kernel after the
// GEMM. bias: [batch, n] rows bias_stride elements apart (nullptr: none), added to every row of
// the batch's C; the sum is rounded to T once. T: f16, bf16 or f32 (FP32 unless TF32 is allowed).
struct GemmEpilogue {
  const void* bias = nullptr;
  index_t bias_stride = 0;
  bool relu = false;
};
// Returns false, having done nothing, where cuBLASLt has no kernel for the problem.
bool gemm_epilogue_lt(int device, cudaStream_t stream, bool ta, bool tb, index_t m, index_t n,
                      index_t k, const void* a, index_t lda, index_t stride_a, const void* b,
                      index_t ldb, index_t stride_b, void* c, index_t ldc, index_t stride_c,
                      index_t batch, cudaDataType_t type, cublasComputeType_t compute,
                      const GemmEpilogue& epilogue);

// The epilogue on its own, over C after a plain GEMM (rounded to T twice): the fallback.
template <class T>
__global__ void gemm_epilogue_kernel(T* c, index_t m, index_t n, index_t ldc, index_t stride_c,
                                     index_t batch, GemmEpilogue ep) {
  const T* bias = static_cast<const T*>(ep.bias);
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < batch * m * n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t b = i / (m * n), r = i % (m * n) / n, j = i % n;
    T* p = c + b * stride_c + r * ldc + j;
    auto v = load(*p) + (bias ? load(bias[b * ep.bias_stride + j]) : 0);
    *p = store<T>(ep.relu && !(v > 0) ? 0 : v);
  }
}

template <class T>
void gemm_epilogue(int device, cudaStream_t stream, bool ta, bool tb, index_t m, index_t n,
                   index_t k, const T* a, index_t lda, index_t stride_a, const T* b, index_t ldb,
                   index_t stride_b, T* c, index_t ldc, index_t stride_c, index_t batch,
                   const GemmEpilogue& epilogue) {
  static_assert(!std::is_same_v<T, double>, "cuBLASLt's epilogues: f16, bf16 and f32");
  if (gemm_epilogue_lt(device, stream, ta, tb, m, n, k, a, lda, stride_a, b, ldb, stride_b, c, ldc,
                       stride_c, batch, cuda_data_type<T>(), cuda_compute_type<T>(), epilogue))
    return;
  gemm<T>(cublas_handle(device, stream), ta, tb, m, n, k, a, lda, stride_a, b, ldb, stride_b, 0.0,
          c, ldc, stride_c, batch);
  const index_t total = batch * m * n;
  gemm_epilogue_kernel<T>
      <<<stride_grid(total), kStrideThreads, 0, stream>>>(c, m, n, ldc, stride_c, batch, epilogue);
  SY_CUDA_CHECK_LAUNCH();
}

}  // namespace switchyard
