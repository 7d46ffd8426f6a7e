#include <algorithm>

#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "core/ops.h"

namespace switchyard {
namespace {

template <class T>
__global__ void add_kernel(T* __restrict__ dst, const T* __restrict__ src,
                           const T* __restrict__ scale, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    dst[i] = store<T>(load(dst[i]) +
                      load(src[i]) * (scale ? load(scale[i]) : decltype(load(src[i]))(1)));
}

}  // namespace

void add_inplace_cuda(Tensor& dst, const Tensor& src, const Tensor* scale) {
  const index_t n = dst.numel();
  if (n == 0) return;
  DeviceScope device(dst.device().index);
  const cudaStream_t stream = as_cuda_stream(current_stream(dst.device()).handle);
  dispatch_float_cuda(dst.dtype(), "add_inplace", [&](auto tag) {
    using T = decltype(tag);
    add_kernel<T><<<std::min(grid_size(n, 256), 65535u * 16), 256, 0, stream>>>(
        static_cast<T*>(dst.data_ptr()), static_cast<const T*>(src.data_ptr()),
        scale ? static_cast<const T*>(scale->data_ptr()) : nullptr, n);
    SY_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace switchyard
