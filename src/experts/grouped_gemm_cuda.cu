// Grouped GEMM launchers (bf16, f16) and the CUDA backend of experts/grouped_gemm.h.
#include <type_traits>

#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "experts/grouped_gemm.h"
#include "experts/grouped_gemm_cuda.cuh"
#include "experts/grouped_gemm_kernels.cuh"

namespace switchyard {

void grouped_gemm_varying_m_cuda(const __nv_bfloat16* a, const __nv_bfloat16* b, bool trans_b,
                                 __nv_bfloat16* c, const index_t* offsets, index_t num_groups,
                                 index_t rows, index_t n, index_t k, cudaStream_t stream,
                                 const __nv_bfloat16* bias, bool relu,
                                 const __nv_bfloat16* mask) {
  grouped_gemm_detail::run_varying_m(a, b, trans_b, c, offsets, num_groups, rows, n, k, stream,
                                     grouped_gemm_detail::Kernel::kAuto, bias, relu, mask);
}
void grouped_gemm_varying_m_cuda(const __half* a, const __half* b, bool trans_b, __half* c,
                                 const index_t* offsets, index_t num_groups, index_t rows,
                                 index_t n, index_t k, cudaStream_t stream, const __half* bias,
                                 bool relu, const __half* mask) {
  grouped_gemm_detail::run_varying_m(a, b, trans_b, c, offsets, num_groups, rows, n, k, stream,
                                     grouped_gemm_detail::Kernel::kAuto, bias, relu, mask);
}
void grouped_gemm_varying_k_cuda(const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* c,
                                 const index_t* offsets, index_t num_groups, index_t rows,
                                 index_t m, index_t n, double beta, cudaStream_t stream) {
  grouped_gemm_detail::run_varying_k(a, b, c, offsets, num_groups, rows, m, n, beta, stream);
}
void grouped_gemm_varying_k_cuda(const __half* a, const __half* b, __half* c,
                                 const index_t* offsets, index_t num_groups, index_t rows,
                                 index_t m, index_t n, double beta, cudaStream_t stream) {
  grouped_gemm_detail::run_varying_k(a, b, c, offsets, num_groups, rows, m, n, beta, stream);
}

bool grouped_gemm_uses_wgmma() { return grouped_gemm_detail::sm90_available(); }

namespace {

// Calls f(T{}) for the 16-bit dtypes the kernel supports.
template <class F>
void dispatch_half_cuda(DType dtype, const char* op, F&& f) {
  if (dtype == DType::kBF16) return f(__nv_bfloat16{});
  if (dtype == DType::kF16) return f(__half{});
  SY_CHECK(false, op, " is not implemented for ", dtype_name(dtype),
           " on cuda (bf16 and f16 only; use a cuBLAS GEMM per group)");
}

}  // namespace

void grouped_gemm_varying_m_cuda(const Tensor& a, const Tensor& b, bool trans_b,
                                 const Tensor& offsets, Tensor& c) {
  const Device dev = c.device();
  DeviceScope scope(dev.index);
  const cudaStream_t stream = as_cuda_stream(current_stream(dev).handle);
  const index_t n = c.size(1), k = a.size(1);
  dispatch_half_cuda(c.dtype(), "grouped_gemm_varying_m", [&](auto tag) {
    using T = decltype(tag);
    grouped_gemm_varying_m_cuda(static_cast<const T*>(a.data_ptr()),
                                static_cast<const T*>(b.data_ptr()), trans_b,
                                static_cast<T*>(c.data_ptr()), offsets.data<index_t>(),
                                offsets.size(0) - 1, a.size(0), n, k, stream);
  });
}

void grouped_gemm_varying_k_cuda(const Tensor& a, const Tensor& b, const Tensor& offsets, Tensor& c,
                                 double beta) {
  const Device dev = c.device();
  DeviceScope scope(dev.index);
  const cudaStream_t stream = as_cuda_stream(current_stream(dev).handle);
  dispatch_half_cuda(c.dtype(), "grouped_gemm_varying_k", [&](auto tag) {
    using T = decltype(tag);
    grouped_gemm_varying_k_cuda(static_cast<const T*>(a.data_ptr()),
                                static_cast<const T*>(b.data_ptr()), static_cast<T*>(c.data_ptr()),
                                offsets.data<index_t>(), offsets.size(0) - 1, a.size(0), a.size(1),
                                b.size(1), beta, stream);
  });
}

}  // namespace switchyard
