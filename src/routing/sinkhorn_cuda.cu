// Megatron's sinkhorn on the GPU (ROUTING.md §2), the CPU router's loop step for step:
// c = exp(z - max z); then, per iteration, d0 = (1/T) / (c d1 + 1e-8) (one warp per token) and
// d1 = (1/E) / (d0 c + 1e-8) (column sums in a fixed order), until mean |d1 - d1_old| <= tol.
#include <algorithm>
#include <cmath>

#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "routing/router_cuda.h"

namespace switchyard {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

unsigned blocks_for(index_t n) { return std::min(grid_size(n, kThreads), 1024u); }

template <class A>
__device__ A block_max(A v, A* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) shared[threadIdx.x] = max(shared[threadIdx.x], shared[threadIdx.x + w]);
    __syncthreads();
  }
  return shared[0];
}

// part[b] = the largest z over block b's elements.
template <class A>
__global__ void max_part(const A* __restrict__ z, index_t n, A* __restrict__ part) {
  __shared__ A shared[kThreads];
  A v = -INFINITY;
  for (index_t i = blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * kThreads)
    v = max(v, z[i]);
  const A m = block_max(v, shared);
  if (threadIdx.x == 0) part[blockIdx.x] = m;
}

// One block: *m = the largest part; d1 = 1; done = 0.
template <class A>
__global__ void start(const A* __restrict__ part, int parts, index_t E, A* __restrict__ m,
                      A* __restrict__ d1, int* __restrict__ done) {
  __shared__ A shared[kThreads];
  A v = -INFINITY;
  for (int b = threadIdx.x; b < parts; b += kThreads) v = max(v, part[b]);
  const A mx = block_max(v, shared);
  if (threadIdx.x == 0) {
    *m = mx;
    *done = 0;
  }
  for (index_t e = threadIdx.x; e < E; e += kThreads) d1[e] = A(1);
}

template <class A>
__global__ void exp_shifted(const A* __restrict__ z, index_t n, const A* __restrict__ m,
                            A* __restrict__ c) {
  const A mx = *m;
  for (index_t i = blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * kThreads)
    c[i] = exp(z[i] - mx);
}

// d0[t] = (1/T) / (sum_e d1[e] c[t, e] + 1e-8), one warp per token.
template <class A>
__global__ void row_pass(const A* __restrict__ c, const A* __restrict__ d1, index_t T, index_t E,
                         const int* __restrict__ done, A* __restrict__ d0) {
  if (*done) return;
  const int lane = threadIdx.x % kWarp;
  const index_t t = (blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x) / kWarp;
  if (t >= T) return;
  const A* ct = c + offset_of(t, E);
  A s = 0;
  for (index_t e = lane; e < E; e += kWarp) s += d1[e] * ct[e];
  s = warp_sum(s);
  if (lane == 0) d0[t] = (A(1) / static_cast<A>(T)) / (s + A(1e-8));
}

// One block: d1[e] = (1/E) / (col[e] + 1e-8); done once mean |d1 - d1_old| <= tol.
template <class A>
__global__ void column_pass(const double* __restrict__ col, index_t E, double tol,
                            double* __restrict__ diff, A* __restrict__ d1, int* __restrict__ done) {
  if (*done) return;
  for (index_t e = threadIdx.x; e < E; e += kThreads) {
    const A v = (A(1) / static_cast<A>(E)) / (static_cast<A>(col[e]) + A(1e-8));
    diff[e] = static_cast<double>(abs(v - d1[e]));
    d1[e] = v;
  }
  __syncthreads();
  const double err = block_sum(diff, E);
  if (threadIdx.x == 0 && err / static_cast<double>(E) <= tol) *done = 1;
}

template <class A>
__global__ void scale_rows_columns(A* __restrict__ c, const A* __restrict__ d0,
                                   const A* __restrict__ d1, index_t T, index_t E) {
  for (index_t i = blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x; i < T * E;
       i += static_cast<index_t>(gridDim.x) * kThreads)
    c[i] *= d1[i % E] * d0[i / E];
}

}  // namespace

Tensor sinkhorn_cuda(const Tensor& z_in, int max_iters, double tol, cudaStream_t stream) {
  const Tensor z = z_in.contiguous();
  const index_t T = z.size(0), E = z.size(1), n = T * E;
  const Device dev = z.device();
  Tensor c = Tensor::empty({T, E}, z.dtype(), dev);
  if (n == 0) return c;
  const Tensor d0 = Tensor::empty({T}, z.dtype(), dev), d1 = Tensor::empty({E}, z.dtype(), dev);
  const Tensor m = Tensor::empty({}, z.dtype(), dev);
  Tensor col = Tensor::empty({1, E}, DType::kF64, dev);
  const Tensor diff = Tensor::empty({E}, DType::kF64, dev);
  const Tensor done = Tensor::empty({1}, DType::kI32, dev);
  const unsigned parts = blocks_for(n);
  const Tensor part = Tensor::empty({parts}, z.dtype(), dev);
  const auto run = [&](auto tag) {
    using A = decltype(tag);
    max_part<A><<<parts, kThreads, 0, stream>>>(z.data<A>(), n, part.data<A>());
    SY_CUDA_CHECK_LAUNCH();
    start<A><<<1, kThreads, 0, stream>>>(part.data<A>(), static_cast<int>(parts), E, m.data<A>(),
                                         d1.data<A>(), done.data<std::int32_t>());
    SY_CUDA_CHECK_LAUNCH();
    exp_shifted<A>
        <<<blocks_for(n), kThreads, 0, stream>>>(z.data<A>(), n, m.data<A>(), c.data<A>());
    SY_CUDA_CHECK_LAUNCH();
    const unsigned row_blocks = static_cast<unsigned>((T * kWarp + kThreads - 1) / kThreads);
    for (int it = 0; it < max_iters; ++it) {
      row_pass<A><<<row_blocks, kThreads, 0, stream>>>(c.data<A>(), d1.data<A>(), T, E,
                                                       done.data<std::int32_t>(), d0.data<A>());
      SY_CUDA_CHECK_LAUNCH();
      launch_column_sums(c, T, col, stream, &d0);
      column_pass<A><<<1, kThreads, 0, stream>>>(col.data<double>(), E, tol, diff.data<double>(),
                                                 d1.data<A>(), done.data<std::int32_t>());
      SY_CUDA_CHECK_LAUNCH();
    }
    scale_rows_columns<A>
        <<<blocks_for(n), kThreads, 0, stream>>>(c.data<A>(), d0.data<A>(), d1.data<A>(), T, E);
    SY_CUDA_CHECK_LAUNCH();
  };
  if (z.dtype() == DType::kF64)
    run(double{});
  else {
    SY_CHECK(z.dtype() == DType::kF32, "sinkhorn_cuda: logits must be f32 or f64, got ",
             dtype_name(z.dtype()));
    run(float{});
  }
  return c;
}

}  // namespace switchyard
