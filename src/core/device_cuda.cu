#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "core/device_cuda.h"

namespace switchyard::cuda {
namespace {

template <class S, class D>
__global__ void convert_kernel(const S* src, D* dst, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    dst[i] = store<D>(load(src[i]));
}

template <class D>
__global__ void fill_kernel(D* dst, D value, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    dst[i] = value;
}

// Row-major walk over `sizes` with element strides for both sides.
struct StridedLayout {
  int ndim;
  index_t sizes[kMaxStridedDims], src_strides[kMaxStridedDims], dst_strides[kMaxStridedDims];
};

template <class S, class D>
__global__ void strided_convert_kernel(const S* src, D* dst, StridedLayout l, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t rest = i, so = 0, dof = 0;
    for (int k = l.ndim - 1; k >= 0; --k) {
      const index_t c = rest % l.sizes[k];
      rest /= l.sizes[k];
      so += c * l.src_strides[k];
      dof += c * l.dst_strides[k];
    }
    dst[dof] = store<D>(load(src[so]));
  }
}

unsigned grid_for(index_t n) { return std::min(grid_size(n, 256), 65535u); }

// Keep freed memory in the pool instead of returning it to the driver at each sync.
void configure_pool(int device) {
  static std::once_flag flags[64];
  std::call_once(flags[device % 64], [device] {
    cudaMemPool_t pool;
    SY_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
    std::uint64_t threshold = UINT64_MAX;
    SY_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  });
}

}  // namespace

int device_count() {
  int n = 0;
  // No driver (error 35) or no device (100): no GPU, not an error.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void* malloc_async(std::size_t bytes, int device, void* stream) {
  DeviceScope scope(device);
  configure_pool(device);
  void* p = nullptr;
  SY_CUDA_CHECK(cudaMallocAsync(&p, bytes, as_cuda_stream(stream)));
  return p;
}

void free_async(void* ptr, int device, void* stream) {
  DeviceScope scope(device);
  SY_CUDA_CHECK(cudaFreeAsync(ptr, as_cuda_stream(stream)));
}

void copy(void* dst, const void* src, std::size_t bytes, CopyKind kind, int device, void* stream) {
  if (bytes == 0) return;
  DeviceScope scope(device);
  const cudaStream_t s = as_cuda_stream(stream);
  const cudaMemcpyKind k = kind == CopyKind::kHostToDevice   ? cudaMemcpyHostToDevice
                           : kind == CopyKind::kDeviceToHost ? cudaMemcpyDeviceToHost
                                                             : cudaMemcpyDeviceToDevice;
  SY_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, k, s));
  // NOTE: host memory here is pageable: the host must not reuse it before the copy finishes.
  if (kind != CopyKind::kDeviceToDevice) SY_CUDA_CHECK(cudaStreamSynchronize(s));
}

void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, index_t n, int device,
             void* stream) {
  if (n == 0) return;
  DeviceScope scope(device);
  dispatch_any_cuda(src_dtype, "convert", [&](auto s) {
    dispatch_any_cuda(dst_dtype, "convert", [&](auto d) {
      using S = decltype(s);
      using D = decltype(d);
      convert_kernel<S, D><<<grid_for(n), 256, 0, as_cuda_stream(stream)>>>(
          static_cast<const S*>(src), static_cast<D*>(dst), n);
      SY_CUDA_CHECK_LAUNCH();
    });
  });
}

void convert_strided(const void* src, DType src_dtype, const index_t* src_strides, void* dst,
                     DType dst_dtype, const index_t* dst_strides, const index_t* sizes, int ndim,
                     int device, void* stream) {
  SY_CHECK(ndim <= kMaxStridedDims, "copy_from: strided CUDA copies support up to ",
           kMaxStridedDims, " dimensions, got ", ndim);
  StridedLayout l{};
  l.ndim = ndim;
  index_t n = 1;
  for (int k = 0; k < ndim; ++k) {
    l.sizes[k] = sizes[k];
    l.src_strides[k] = src_strides[k];
    l.dst_strides[k] = dst_strides[k];
    n *= sizes[k];
  }
  if (n == 0) return;
  DeviceScope scope(device);
  dispatch_any_cuda(src_dtype, "convert_strided", [&](auto s) {
    dispatch_any_cuda(dst_dtype, "convert_strided", [&](auto d) {
      using S = decltype(s);
      using D = decltype(d);
      strided_convert_kernel<S, D><<<grid_for(n), 256, 0, as_cuda_stream(stream)>>>(
          static_cast<const S*>(src), static_cast<D*>(dst), l, n);
      SY_CUDA_CHECK_LAUNCH();
    });
  });
}

void fill(void* dst, DType dtype, double value, index_t n, int device, void* stream) {
  if (n == 0) return;
  DeviceScope scope(device);
  if (value == 0.0) {
    SY_CUDA_CHECK(cudaMemsetAsync(dst, 0, static_cast<std::size_t>(n) * dtype_size(dtype),
                                  as_cuda_stream(stream)));
    return;
  }
  dispatch_any_cuda(dtype, "fill", [&](auto d) {
    using D = decltype(d);
    fill_kernel<D>
        <<<grid_for(n), 256, 0, as_cuda_stream(stream)>>>(static_cast<D*>(dst), store<D>(value), n);
    SY_CUDA_CHECK_LAUNCH();
  });
}

void synchronize(int device, void* stream) {
  DeviceScope scope(device);
  SY_CUDA_CHECK(cudaStreamSynchronize(as_cuda_stream(stream)));
}

std::string device_name(int device) {
  cudaDeviceProp prop;
  SY_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

void release_cached(int device) {
  DeviceScope scope(device);
  cudaMemPool_t pool;
  SY_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  SY_CUDA_CHECK(cudaDeviceSynchronize());  // blocks freed on streams must have been reached
  SY_CUDA_CHECK(cudaMemPoolTrimTo(pool, 0));
}

void* create_stream(int device) {
  DeviceScope scope(device);
  cudaStream_t s = nullptr;
  SY_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return s;
}

void destroy_stream(int device, void* stream) {
  DeviceScope scope(device);
  cudaStreamDestroy(static_cast<cudaStream_t>(stream));
}

void begin_capture(int device, void* stream) {
  SY_CHECK(stream != nullptr, "CudaGraph: capture needs a stream of its own (a CudaStream)");
  DeviceScope scope(device);
  SY_CUDA_CHECK(
      cudaStreamBeginCapture(static_cast<cudaStream_t>(stream), cudaStreamCaptureModeThreadLocal));
}

void* end_capture(int device, void* stream) {
  DeviceScope scope(device);
  cudaGraph_t graph = nullptr;
  SY_CUDA_CHECK(cudaStreamEndCapture(static_cast<cudaStream_t>(stream), &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  SY_CUDA_CHECK(err);
  return exec;
}

void launch_graph(int device, void* exec, void* stream) {
  DeviceScope scope(device);
  SY_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec), static_cast<cudaStream_t>(stream)));
}

void destroy_graph(void* exec) { cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec)); }

}  // namespace switchyard::cuda
