// Element types and conversions for CUDA kernels: storage types map to CUDA's own (__half,
// __nv_bfloat16), arithmetic runs in float (double for f64), stores round to nearest even.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "switchyard/dtype.h"
#include "switchyard/error.h"
#include "switchyard/index.h"

namespace switchyard {

template <class T>
using cuda_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

__host__ __device__ inline double load(double v) { return v; }
__host__ __device__ inline float load(float v) { return v; }
__host__ __device__ inline float load(__half v) { return __half2float(v); }
__host__ __device__ inline float load(__nv_bfloat16 v) { return __bfloat162float(v); }
__host__ __device__ inline double load(std::int32_t v) { return v; }
__host__ __device__ inline double load(std::int64_t v) { return static_cast<double>(v); }

template <class T, class A>
__host__ __device__ inline T store(A v) {
  if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(static_cast<float>(v));
  else
    return static_cast<T>(v);
}

// Calls f(T{}) with T the CUDA element type of a floating dtype (a type tag: CUDA sources are
// C++17, without explicit lambda template parameters).
template <class F>
decltype(auto) dispatch_float_cuda(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::kF64:
      return f(double{});
    case DType::kF32:
      return f(float{});
    case DType::kF16:
      return f(__half{});
    case DType::kBF16:
      return f(__nv_bfloat16{});
    default:
      break;
  }
  detail::throw_error(
      detail::str_cat(op, " is not implemented for ", dtype_name(dtype), " on cuda"));
}

// As dispatch_float_cuda, plus the index dtypes.
template <class F>
decltype(auto) dispatch_any_cuda(DType dtype, const char* op, F&& f) {
  if (dtype == DType::kI32) return f(std::int32_t{});
  if (dtype == DType::kI64) return f(std::int64_t{});
  return dispatch_float_cuda(dtype, op, std::forward<F>(f));
}

// V consecutive elements moved as one access (16 bytes when the launcher finds the row length
// and the pointers aligned, see pack_width; V = 1 otherwise). Column loops step over packs:
// thread i handles elements [i*V, i*V + V) of each stride.
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <int V, class T>
__device__ inline Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <int V, class T>
__device__ inline void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}
template <int V, class T>
__device__ inline Pack<T, V> zero_pack() {
  Pack<T, V> z;
#pragma unroll
  for (int i = 0; i < V; ++i) z.v[i] = store<T>(0.0f);
  return z;
}

// 16 / sizeof(T) when n and every pointer allow 16-byte packs, else 1.
template <class T>
inline int pack_width(index_t n, std::initializer_list<const void*> ptrs) {
  constexpr int kV = 16 / sizeof(T);
  bool ok = n % kV == 0;
  for (const void* p : ptrs) ok = ok && reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
  return ok ? kV : 1;
}

// Calls f(std::integral_constant<int, V>{}) with V = pack_width<T>(n, ptrs).
template <class T, class F>
void with_pack_width(index_t n, std::initializer_list<const void*> ptrs, F&& f) {
  constexpr int kV = 16 / sizeof(T);
  if (pack_width<T>(n, ptrs) == kV)
    f(std::integral_constant<int, kV>{});
  else
    f(std::integral_constant<int, 1>{});
}

// Butterfly sum over a full warp: every lane ends with the same value, summed in the same order
// on every run.
template <class A>
__device__ A warp_sum(A v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The sum of n doubles in a fixed order, for one block of kBlockSumThreads threads (all call it;
// all get the sum).
constexpr int kBlockSumThreads = 256;
__device__ inline double block_sum(const double* v, index_t n) {
  __shared__ double part[kBlockSumThreads];
  double acc = 0;
  for (index_t i = threadIdx.x; i < n; i += kBlockSumThreads) acc += v[i];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kBlockSumThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  const double r = part[0];
  __syncthreads();
  return r;
}

// Row kernels run blocks of block.x threads over one row's packs (a multiple of 32, at most 256)
// times block.y rows side by side, so that short rows keep every thread busy; the grid fills the
// device once and each block strides over groups of block.y rows.
struct RowBlocks {
  dim3 block;
  unsigned grid;
};
// The current device's multiprocessors (a host query, cached per device; fine during capture).
inline int multiprocessor_count() {
  static std::atomic<int> cached[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64)
    detail::throw_error("cuda: cannot query the current device");
  int sms = cached[device].load();
  if (sms == 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      detail::throw_error("cuda: cannot query the current device");
    cached[device].store(sms);
  }
  return sms;
}
inline RowBlocks row_blocks(index_t rows, index_t cols, int v) {
  const index_t packs = (cols + v - 1) / v;
  const unsigned x = static_cast<unsigned>(std::clamp<index_t>((packs + 31) / 32 * 32, 32, 256));
  const unsigned y = 256 / x;
  const index_t groups = (rows + y - 1) / y;
  const index_t fill = static_cast<index_t>(multiprocessor_count()) * (2048 / (x * y));
  return {dim3(x, y), static_cast<unsigned>(std::clamp<index_t>(groups, 1, fill))};
}

// A row kernel's first row and its stride over rows.
__device__ inline index_t first_row() {
  return static_cast<index_t>(blockIdx.x) * blockDim.y + threadIdx.y;
}
__device__ inline index_t row_stride() { return static_cast<index_t>(gridDim.x) * blockDim.y; }

// Blocks for a grid-stride loop over n items of `threads` each, capped at the grid limit.
inline unsigned grid_size(index_t n, unsigned threads) {
  const index_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks > 2147483647 ? 2147483647 : blocks);
}

// Blocks of 256 threads for a grid-stride loop over n items: one per 256 items, at most
// 65535 x 16 (more would only queue behind the resident ones).
constexpr unsigned kStrideThreads = 256;
inline unsigned stride_grid(index_t n) {
  const unsigned blocks = grid_size(n, kStrideThreads);
  return blocks < 65535u * 16 ? blocks : 65535u * 16;
}

}  // namespace switchyard
