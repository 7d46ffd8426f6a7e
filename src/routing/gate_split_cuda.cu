#include <cuda_bf16.h>

#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "experts/gemm_cuda.cuh"
#include "routing/gate_split.h"

namespace switchyard {
namespace {

using bf16 = __nv_bfloat16;

// Piece q of the copy c (0 hi, 1 mid, 2 lo) of element (r, j) of src [rows, cols] goes to
// dst[r * row_stride + c * copy_stride + j], where `pattern` holds q in bits 2c, 2c + 1.
struct SplitLayout {
  index_t rows, cols, row_stride, copy_stride;
  int copies;
  unsigned pattern;
};

__global__ void split_kernel(const float* __restrict__ src, SplitLayout l, bf16* __restrict__ dst) {
  const index_t n = l.rows * l.cols;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / l.cols, j = i % l.cols;
    const float v = src[i];
    bf16 piece[3];
    piece[0] = __float2bfloat16_rn(v);
    const float rest = v - __bfloat162float(piece[0]);
    piece[1] = __float2bfloat16_rn(rest);
    piece[2] = __float2bfloat16_rn(rest - __bfloat162float(piece[1]));
    for (int c = 0; c < l.copies; ++c)
      dst[r * l.row_stride + c * l.copy_stride + j] = piece[(l.pattern >> (2 * c)) & 3];
  }
}

// dst[r, j] (+)= (p[2] + p[1]) + p[0], p[q] = src[r * row_stride + q * piece_stride + j]: the
// three pieces' products, smallest first.
__global__ void sum_pieces_kernel(const float* __restrict__ src, index_t rows, index_t cols,
                                  index_t row_stride, index_t piece_stride, float* __restrict__ dst,
                                  bool accumulate) {
  const index_t n = rows * cols;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const float* s = src + (i / cols) * row_stride + i % cols;
    const float v = (s[2 * piece_stride] + s[piece_stride]) + s[0];
    dst[i] = accumulate ? dst[i] + v : v;
  }
}

Tensor split(const Tensor& src, index_t rows_out, index_t cols_out, const SplitLayout& l,
             cudaStream_t stream) {
  Tensor dst = Tensor::empty({rows_out, cols_out}, DType::kBF16, src.device());
  if (l.rows * l.cols > 0) {
    split_kernel<<<stride_grid(l.rows * l.cols), kStrideThreads, 0, stream>>>(
        src.data<float>(), l, static_cast<bf16*>(dst.data_ptr()));
    SY_CUDA_CHECK_LAUNCH();
  }
  return dst;
}

void sum_pieces(const Tensor& src, index_t rows, index_t cols, index_t row_stride,
                index_t piece_stride, Tensor& dst, bool accumulate, cudaStream_t stream) {
  if (rows * cols == 0) return;
  sum_pieces_kernel<<<stride_grid(rows * cols), kStrideThreads, 0, stream>>>(
      src.data<float>(), rows, cols, row_stride, piece_stride, dst.data<float>(), accumulate);
  SY_CUDA_CHECK_LAUNCH();
}

// C [m, n] (row-major, of c_type) = op(A) · op(B), A and B bf16, f32 accumulation.
void gemm_bf16(cublasHandle_t h, bool ta, bool tb, index_t m, index_t n, index_t k, const void* a,
               index_t lda, const void* b, index_t ldb, void* c, cudaDataType_t c_type, index_t ldc,
               float beta = 0.0f) {
  if (m == 0 || n == 0) return;
  const float alpha = 1.0f;
  constexpr auto i32 = cublas_int;
  SY_CUBLAS_CHECK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                               i32(n), i32(m), i32(k), &alpha, b, CUDA_R_16BF, i32(ldb), a,
                               CUDA_R_16BF, i32(lda), &beta, c, c_type, i32(ldc),
                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

bool split_gate_applies(const Tensor& x, const Tensor& w) {
  return x.device().is_cuda() && x.dtype() == DType::kBF16 && w.dtype() == DType::kF32;
}

Tensor split_gate_forward_cuda(const Tensor& x, const Tensor& w) {
  const Device dev = x.device();
  DeviceScope scope(dev.index);
  const cudaStream_t stream = as_cuda_stream(current_stream(dev).handle);
  const index_t T = x.size(0), d = x.size(1), E = w.size(0);
  // [w_hi; w_mid; w_lo] [3E, d], then [T, 3E] products, summed per expert.
  const Tensor w3 = split(w, 3 * E, d, SplitLayout{E, d, d, E * d, 3, 0b100100}, stream);
  Tensor products = Tensor::empty({T, 3 * E}, DType::kF32, dev);
  gemm_bf16(cublas_handle(dev.index, stream), false, true, T, 3 * E, d, x.data_ptr(), d,
            w3.data_ptr(), d, products.data_ptr(), CUDA_R_32F, 3 * E);
  Tensor logits = Tensor::empty({T, E}, DType::kF32, dev);
  sum_pieces(products, T, E, 3 * E, E, logits, false, stream);
  return logits;
}

void split_gate_backward_cuda(const Tensor& dl, const Tensor& x, const Tensor& w, Tensor& w_grad,
                              Tensor& dx, bool add) {
  const Device dev = x.device();
  DeviceScope scope(dev.index);
  const cudaStream_t stream = as_cuda_stream(current_stream(dev).handle);
  cublasHandle_t h = cublas_handle(dev.index, stream);
  const index_t T = x.size(0), d = x.size(1), E = w.size(0);
  // [dl_hi | dl_mid | dl_lo | dl_hi] [T, 4E] against [w_hi; w_hi; w_hi; w_mid] [4E, d] for dx;
  // its first 3E columns against x for the weight gradient's three pieces.
  const Tensor dl4 = split(dl, T, 4 * E, SplitLayout{T, E, 4 * E, E, 4, 0b00100100}, stream);
  const Tensor w4 = split(w, 4 * E, d, SplitLayout{E, d, d, E * d, 4, 0b01000000}, stream);
  if (!add) dx = Tensor::empty({T, d}, DType::kBF16, dev);
  gemm_bf16(h, false, false, T, d, 4 * E, dl4.data_ptr(), 4 * E, w4.data_ptr(), d, dx.data_ptr(),
            CUDA_R_16BF, d, add ? 1.0f : 0.0f);
  Tensor pieces = Tensor::empty({3 * E, d}, DType::kF32, dev);
  if (T > 0) {
    gemm_bf16(h, true, false, 3 * E, d, T, dl4.data_ptr(), 4 * E, x.data_ptr(), d,
              pieces.data_ptr(), CUDA_R_32F, d);
    sum_pieces(pieces, E, d, d, E * d, w_grad, true, stream);
  }
}

}  // namespace switchyard
