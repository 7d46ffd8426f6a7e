// Dense matrix products on the CPU through BLAS (sgemm/dgemm). Call outside OpenMP regions:
// OpenBLAS runs its own threads, and nesting the two oversubscribes the cores.
#pragma once

#include "switchyard/tensor.h"

namespace switchyard {

// C[M,N] = alpha * op(A) * op(B) + beta * C, row-major, leading dimensions in elements.
void gemm_raw(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, double alpha,
              const float* a, index_t lda, const float* b, index_t ldb, double beta, float* c,
              index_t ldc);
void gemm_raw(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, double alpha,
              const double* a, index_t lda, const double* b, index_t ldb, double beta, double* c,
              index_t ldc);

// c = alpha * op(a) * op(b) + beta * c for 2-D tensors of one dtype on one device. On the CPU
// f16/bf16 are converted to f32, multiplied, and rounded back; on CUDA cuBLAS runs on the
// current stream. Rows must be unit-stride (else the tensor is copied).
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c,
          double alpha = 1.0, double beta = 0.0);
// The CUDA backend of gemm() (experts/gemm_cuda.cu), called after its checks.
void gemm_cuda(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c,
               double alpha, double beta);

}  // namespace switchyard
