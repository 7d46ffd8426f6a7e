// Dispatch kernels on raw pointers, threads over the columns of a row. encode and decode are row
// kernels (core/cuda_math.cuh's row_blocks) over buffer rows and tokens; the backward kernels,
// which reduce dot products for the weight gradients, run one block per token (a token's k
// buffer rows one after another, so its row of dy is read from DRAM once) and reduce in a fixed
// tree (CUB BlockReduce), so results are bitwise reproducible; no atomics. (As row kernels
// striding over rows, with a barrier per row, they measured slower: sonic_fine decode_backward
// 775 vs 640 us under ncu.)
#pragma once

#include <cub/block/block_reduce.cuh>

#include "core/cuda_math.cuh"
#include "switchyard/index.h"

namespace switchyard::kernels {

constexpr int kDispatchThreads = 256;

// buf[r] = x[t] * (prescore ? w[c] : 1) with c = row_choice[r], t = c / k; zeros for padding.
// (Token by token, reading each row of x once for its k rows, measured slower on an H100: 147 us
// for tutel_default's 64 MB under ncu, and the forward of a packed sonic_fine step 1 ms longer.)
template <class T, class A, int V>
__global__ void encode(const T* __restrict__ x, const index_t* __restrict__ row_choice,
                       const A* __restrict__ w, T* __restrict__ buf, index_t rows, index_t d, int k,
                       bool prescore) {
  for (index_t r = first_row(); r < rows; r += row_stride()) {
    const index_t c = row_choice[r];
    T* dst = buf + offset_of(r, d);
    const A s = c >= 0 && prescore ? w[c] : A(1);
    const T* src = c >= 0 ? x + offset_of(c / k, d) : nullptr;
    for (index_t j = threadIdx.x * V; j < d; j += blockDim.x * V) {
      Pack<T, V> out;
      if (src && !prescore) {
        out = load_pack<V>(src + j);
      } else {
        const Pack<T, V> in = src ? load_pack<V>(src + j) : zero_pack<V, T>();
#pragma unroll
        for (int i = 0; i < V; ++i) out.v[i] = store<T>(src ? s * load(in.v[i]) : A(0));
      }
      store_pack<V>(dst + j, out);
    }
  }
}

// Zeros in the rows r of buf that hold no choice (row_choice[r] < 0: the padded layout's).
template <class T, int V>
__global__ void zero_rows(const index_t* __restrict__ row_choice, T* __restrict__ buf, index_t rows,
                          index_t d) {
  for (index_t r = first_row(); r < rows; r += row_stride()) {
    if (row_choice[r] >= 0) continue;
    for (index_t j = threadIdx.x * V; j < d; j += blockDim.x * V)
      store_pack<V>(buf + offset_of(r, d) + j, zero_pack<V, T>());
  }
}

// y[t] = sum over kept choices j (in order) of (postscore ? w[t,j] : 1) * buf[row[t,j]].
template <class T, class A, int V>
__global__ void decode(const T* __restrict__ buf, const index_t* __restrict__ row,
                       const A* __restrict__ w, T* __restrict__ y, index_t tokens, index_t d, int k,
                       bool postscore) {
  for (index_t t = first_row(); t < tokens; t += row_stride()) {
    for (index_t j = threadIdx.x * V; j < d; j += blockDim.x * V) {
      A acc[V] = {};
      for (int c = 0; c < k; ++c) {
        const index_t r = row[t * k + c];
        if (r < 0) continue;
        const A s = postscore ? w[t * k + c] : A(1);
        const Pack<T, V> in = load_pack<V>(buf + offset_of(r, d) + j);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += s * load(in.v[i]);
      }
      Pack<T, V> out;
#pragma unroll
      for (int i = 0; i < V; ++i) out.v[i] = store<T>(acc[i]);
      store_pack<V>(y + offset_of(t, d) + j, out);
    }
  }
}

// dbuf[row[t,j]] = (postscore ? w[t,j] : 1) * dy[t] for every kept choice, one block per token
// (dy[t] comes from DRAM once and from L1 for its other choices); with postscore dw[t,j] +=
// dot(dy[t], out[row[t,j]]). Padding rows: zero_rows.
template <class T, class A, int V>
__global__ void decode_backward(const T* __restrict__ dy, const T* __restrict__ out,
                                const index_t* __restrict__ row, const A* __restrict__ w,
                                T* __restrict__ dbuf, A* __restrict__ dw, index_t d, int k,
                                bool postscore) {
  using Reduce = cub::BlockReduce<A, kDispatchThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const index_t t = blockIdx.x;
  const T* g = dy + offset_of(t, d);
  for (int c = 0; c < k; ++c) {
    const index_t r = row[t * k + c];
    if (r < 0) continue;  // uniform across the block: every thread reads the same r
    const A s = postscore ? w[t * k + c] : A(1);
    T* dst = dbuf + offset_of(r, d);
    const T* o = out + offset_of(r, d);
    A dot = 0;
    for (index_t j = threadIdx.x * V; j < d; j += blockDim.x * V) {
      const Pack<T, V> gj = load_pack<V>(g + j);
      Pack<T, V> res;
#pragma unroll
      for (int i = 0; i < V; ++i) res.v[i] = store<T>(s * load(gj.v[i]));
      store_pack<V>(dst + j, res);
      if (postscore) {
        const Pack<T, V> oj = load_pack<V>(o + j);
#pragma unroll
        for (int i = 0; i < V; ++i) dot += load(gj.v[i]) * load(oj.v[i]);
      }
    }
    if (!postscore) continue;
    const A total = Reduce(tmp).Sum(dot);
    if (threadIdx.x == 0) dw[t * k + c] += total;  // one writer per choice
    __syncthreads();                               // tmp is reused by the next reduction
  }
}

// dx[t] = sum over kept choices j of (prescore ? w[t,j] : 1) * dbuf[row[t,j]]; with prescore
// dw[t,j] += dot(dbuf[row[t,j]], x[t]).
template <class T, class A, int V>
__global__ void encode_backward(const T* __restrict__ dbuf, const T* __restrict__ x,
                                const index_t* __restrict__ row, const A* __restrict__ w,
                                T* __restrict__ dx, A* __restrict__ dw, index_t d, int k,
                                bool prescore) {
  using Reduce = cub::BlockReduce<A, kDispatchThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const index_t t = blockIdx.x;
  for (index_t j = threadIdx.x * V; j < d; j += blockDim.x * V) {
    A acc[V] = {};
    for (int c = 0; c < k; ++c) {
      const index_t r = row[t * k + c];
      if (r < 0) continue;
      const A s = prescore ? w[t * k + c] : A(1);
      const Pack<T, V> in = load_pack<V>(dbuf + offset_of(r, d) + j);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += s * load(in.v[i]);
    }
    Pack<T, V> out;
#pragma unroll
    for (int i = 0; i < V; ++i) out.v[i] = store<T>(acc[i]);
    store_pack<V>(dx + offset_of(t, d) + j, out);
  }
  if (!prescore) return;
  for (int c = 0; c < k; ++c) {
    const index_t r = row[t * k + c];
    if (r < 0) continue;  // uniform across the block: every thread reads the same r
    A dot = 0;
    for (index_t j = threadIdx.x * V; j < d; j += blockDim.x * V) {
      const Pack<T, V> b = load_pack<V>(dbuf + offset_of(r, d) + j);
      const Pack<T, V> xv = load_pack<V>(x + offset_of(t, d) + j);
#pragma unroll
      for (int i = 0; i < V; ++i) dot += load(b.v[i]) * load(xv.v[i]);
    }
    const A total = Reduce(tmp).Sum(dot);
    if (threadIdx.x == 0) dw[t * k + c] += total;
    __syncthreads();  // tmp is reused by the next reduction
  }
}

}  // namespace switchyard::kernels
