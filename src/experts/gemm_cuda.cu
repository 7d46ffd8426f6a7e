#include <mutex>
#include <vector>

#include "experts/gemm.h"
#include "experts/gemm_cuda.cuh"

namespace switchyard {

cublasHandle_t cublas_handle(int device, cudaStream_t stream) {
  static std::mutex mu;
  static std::vector<cublasHandle_t> handles(64, nullptr);
  SY_CHECK(device >= 0 && device < 64, "cuda:", device, " is out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (!handles[device]) {
    DeviceScope scope(device);
    SY_CUBLAS_CHECK(cublasCreate(&handles[device]));
  }
  SY_CUBLAS_CHECK(cublasSetStream(handles[device], stream));
  return handles[device];
}

void gemm_cuda(const Tensor& a, bool ta, const Tensor& b, bool tb, Tensor& c, double alpha,
               double beta) {
  const index_t m = c.size(0), n = c.size(1), k = ta ? a.size(0) : a.size(1);
  const int device = c.device().index;
  DeviceScope scope(device);
  cublasHandle_t h = cublas_handle(device, as_cuda_stream(current_stream(c.device()).handle));
  dispatch_float_cuda(c.dtype(), "gemm", [&](auto tag) {
    using T = decltype(tag);
    gemm<T>(h, ta, tb, m, n, k, static_cast<const T*>(a.data_ptr()), a.stride(0), 0,
            static_cast<const T*>(b.data_ptr()), b.stride(0), 0, beta,
            static_cast<T*>(c.data_ptr()), c.stride(0), 0, 1, alpha);
  });
}

}  // namespace switchyard
