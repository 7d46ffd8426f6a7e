#include <algorithm>
#include <cmath>

#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "routing/cosine_ops.h"

namespace switchyard {
namespace {

constexpr int kThreads = kBlockSumThreads;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kPartials = 256;  // blocks of the temperature-gradient sum: fixed, so is its order

cudaStream_t stream_of(const Tensor& t) {
  return as_cuda_stream(current_stream(t.device()).handle);
}

__device__ double log_scale_cap() { return 4.605170185988092; }  // ln 100

// One warp per vector; the squares sum in f64 (as on the CPU), in a fixed order.
template <class A>
__global__ void normalize_kernel(const A* __restrict__ m, const A* __restrict__ bias, VectorLayout v,
                                 A* __restrict__ out, A* __restrict__ norms) {
  const index_t i = blockIdx.x * static_cast<index_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= v.n) return;
  double s = 0;
  for (index_t j = lane; j < v.c; j += 32) {
    const index_t o = i * v.sn + j * v.sc;
    const A e = m[o] + (bias ? bias[j] : A(0));
    out[o] = e;
    s += static_cast<double>(e) * e;
  }
  const A norm = static_cast<A>(fmax(sqrt(warp_sum(s)), kCosineNormEps));
  for (index_t j = lane; j < v.c; j += 32) out[i * v.sn + j * v.sc] /= norm;
  if (lane == 0) norms[i] = norm;
}

template <class A>
__global__ void normalize_backward_kernel(const A* __restrict__ vn, const A* __restrict__ norms,
                                          const A* __restrict__ dvn, VectorLayout v,
                                          A* __restrict__ dv) {
  const index_t i = blockIdx.x * static_cast<index_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= v.n) return;
  double dot = 0;
  for (index_t j = lane; j < v.c; j += 32)
    dot += static_cast<double>(vn[i * v.sn + j * v.sc]) * dvn[i * v.sn + j * v.sc];
  dot = warp_sum(dot);
  const A norm = norms[i];
  const bool clamped = norm <= kCosineNormEps;
  for (index_t j = lane; j < v.c; j += 32) {
    const index_t o = i * v.sn + j * v.sc;
    dv[o] = clamped ? dvn[o] / norm : static_cast<A>((dvn[o] - vn[o] * dot) / norm);
  }
}

template <class A>
__global__ void scale_kernel(const A* __restrict__ cos, const A* __restrict__ tau, index_t n,
                             A* __restrict__ logits) {
  const double scale = exp(fmin(static_cast<double>(tau[0]), log_scale_cap()));
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    logits[i] = static_cast<A>(cos[i] * scale);
}

// dcos = dl * scale, and each block's part of sum(dl * cos) (a grid of kPartials blocks).
template <class A>
__global__ void scale_backward_kernel(const A* __restrict__ dl, const A* __restrict__ cos,
                                      const A* __restrict__ tau, index_t n, A* __restrict__ dcos,
                                      double* __restrict__ partials) {
  const double scale = exp(fmin(static_cast<double>(tau[0]), log_scale_cap()));
  __shared__ double mine[kThreads];
  double s = 0;
  for (index_t i = blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<index_t>(kPartials) * kThreads) {
    s += static_cast<double>(dl[i]) * cos[i];
    dcos[i] = static_cast<A>(dl[i] * scale);
  }
  mine[threadIdx.x] = s;
  __syncthreads();
  s = block_sum(mine, kThreads);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// dtau = sum(partials) * scale where tau <= ln 100 (clamp's gradient), one block.
template <class A>
__global__ void temperature_grad_kernel(const double* __restrict__ partials,
                                        const A* __restrict__ tau, A* __restrict__ dtau) {
  const double s = block_sum(partials, kPartials);
  if (threadIdx.x != 0) return;
  const double t = tau[0];
  dtau[0] = static_cast<A>(t <= log_scale_cap() ? s * exp(fmin(t, log_scale_cap())) : 0.0);
}

template <class F>
void dispatch_routing(DType dt, F&& f) {
  if (dt == DType::kF64)
    f(double{});
  else
    f(float{});
}

}  // namespace

void normalize_vectors_cuda(const Tensor& m, const Tensor* bias, const VectorLayout& v,
                            Tensor& out, Tensor& norms) {
  if (v.n == 0) return;
  DeviceScope device(m.device().index);
  dispatch_routing(m.dtype(), [&](auto tag) {
    using A = decltype(tag);
    normalize_kernel<A><<<grid_size(v.n, kWarpsPerBlock), kThreads, 0, stream_of(m)>>>(
        m.data<A>(), bias ? bias->data<A>() : nullptr, v, out.data<A>(), norms.data<A>());
    SY_CUDA_CHECK_LAUNCH();
  });
}

void normalize_vectors_backward_cuda(const Tensor& vn, const Tensor& norms, const Tensor& dvn,
                                     const VectorLayout& v, Tensor& dv) {
  if (v.n == 0) return;
  DeviceScope device(vn.device().index);
  dispatch_routing(vn.dtype(), [&](auto tag) {
    using A = decltype(tag);
    normalize_backward_kernel<A><<<grid_size(v.n, kWarpsPerBlock), kThreads, 0, stream_of(vn)>>>(
        vn.data<A>(), norms.data<A>(), dvn.data<A>(), v, dv.data<A>());
    SY_CUDA_CHECK_LAUNCH();
  });
}

void cosine_scale_cuda(const Tensor& cos, const Tensor& tau, Tensor& logits) {
  const index_t n = cos.numel();
  if (n == 0) return;
  DeviceScope device(cos.device().index);
  dispatch_routing(cos.dtype(), [&](auto tag) {
    using A = decltype(tag);
    scale_kernel<A><<<std::min(grid_size(n, kThreads), 4096u), kThreads, 0, stream_of(cos)>>>(
        cos.data<A>(), tau.data<A>(), n, logits.data<A>());
    SY_CUDA_CHECK_LAUNCH();
  });
}

void cosine_scale_backward_cuda(const Tensor& dlogits, const Tensor& cos, const Tensor& tau,
                                Tensor& dcos, Tensor& dtau) {
  DeviceScope device(cos.device().index);
  const Tensor partials = Tensor::empty({kPartials}, DType::kF64, cos.device());
  const cudaStream_t s = stream_of(cos);
  dispatch_routing(cos.dtype(), [&](auto tag) {
    using A = decltype(tag);
    scale_backward_kernel<A><<<kPartials, kThreads, 0, s>>>(
        dlogits.data<A>(), cos.data<A>(), tau.data<A>(), cos.numel(), dcos.data<A>(),
        partials.data<double>());
    SY_CUDA_CHECK_LAUNCH();
    temperature_grad_kernel<A><<<1, kThreads, 0, s>>>(partials.data<double>(), tau.data<A>(),
                                                      dtau.data<A>());
    SY_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace switchyard
