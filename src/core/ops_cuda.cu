#include <algorithm>

#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "core/ops.h"
#include "core/philox.h"

namespace switchyard {
namespace {

// dst += src (* scale), V elements per access.
template <class T, int V>
__global__ void add_kernel(T* __restrict__ dst, const T* __restrict__ src,
                           const T* __restrict__ scale, index_t n) {
  for (index_t i = (blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x) * V; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x * V) {
    Pack<T, V> d = load_pack<V>(dst + i);
    const Pack<T, V> a = load_pack<V>(src + i);
    if (scale) {
      const Pack<T, V> f = load_pack<V>(scale + i);
#pragma unroll
      for (int j = 0; j < V; ++j) d.v[j] = store<T>(load(d.v[j]) + load(a.v[j]) * load(f.v[j]));
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) d.v[j] = store<T>(load(d.v[j]) + load(a.v[j]));
    }
    store_pack<V>(dst + i, d);
  }
}

template <class T>
__global__ void uniform_factors_kernel(T* __restrict__ out, index_t rows, index_t cols, double eps,
                                       std::uint64_t seed, std::uint32_t stream, std::uint64_t step,
                                       index_t row_base) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < rows * cols;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const double u =
        philox::uniform(seed, stream, step, static_cast<std::uint64_t>(row_base + i / cols),
                        static_cast<std::uint64_t>(i % cols));
    out[i] = store<T>(__dadd_rn(1.0, __dmul_rn(eps, __dadd_rn(__dmul_rn(2.0, u), -1.0))));
  }
}

}  // namespace

void uniform_factors_cuda(Tensor& out, double eps, std::uint64_t seed, std::uint32_t stream,
                          std::uint64_t step, index_t row_base) {
  const index_t rows = out.size(0), cols = out.size(1);
  DeviceScope device(out.device().index);
  const cudaStream_t s = as_cuda_stream(current_stream(out.device()).handle);
  dispatch_float_cuda(out.dtype(), "uniform_factors", [&](auto tag) {
    using T = decltype(tag);
    uniform_factors_kernel<T><<<stride_grid(rows * cols), kStrideThreads, 0, s>>>(
        static_cast<T*>(out.data_ptr()), rows, cols, eps, seed, stream, step, row_base);
    SY_CUDA_CHECK_LAUNCH();
  });
}

void add_inplace_cuda(Tensor& dst, const Tensor& src, const Tensor* scale) {
  const index_t n = dst.numel();
  if (n == 0) return;
  DeviceScope device(dst.device().index);
  const cudaStream_t stream = as_cuda_stream(current_stream(dst.device()).handle);
  dispatch_float_cuda(dst.dtype(), "add_inplace", [&](auto tag) {
    using T = decltype(tag);
    T* d = static_cast<T*>(dst.data_ptr());
    const T* a = static_cast<const T*>(src.data_ptr());
    const T* f = scale ? static_cast<const T*>(scale->data_ptr()) : nullptr;
    with_pack_width<T>(n, {d, a, f ? f : a}, [&](auto v) {
      add_kernel<T, v()><<<stride_grid(n / v()), kStrideThreads, 0, stream>>>(d, a, f, n);
    });
    SY_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace switchyard
