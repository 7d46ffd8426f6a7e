// Dispatch kernels on raw pointers: row kernels (core/cuda_math.cuh's row_blocks), one row of
// threads per output row (a buffer row or a token), threads over the columns. Dot products for
// the weight gradients reduce in a fixed order (row_sum), so results are bitwise reproducible;
// no atomics.
#pragma once

#include "core/cuda_math.cuh"
#include "switchyard/index.h"

namespace switchyard::kernels {

// buf[r] = x[t] * (prescore ? w[c] : 1) with c = row_choice[r], t = c / k; zeros for padding.
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

// dbuf[r] = (postscore ? w[c] : 1) * dy[t]; with postscore dw[c] += dot(dy[t], out[r]).
// The loop over row groups is uniform across the block (row_sum's barriers).
template <class T, class A, int V>
__global__ void decode_backward(const T* __restrict__ dy, const T* __restrict__ out,
                                const index_t* __restrict__ row_choice, const A* __restrict__ w,
                                T* __restrict__ dbuf, A* __restrict__ dw, index_t rows, index_t d,
                                int k, bool postscore) {
  for (index_t group = blockIdx.x; group * blockDim.y < rows; group += gridDim.x) {
    const index_t r = group * blockDim.y + threadIdx.y;
    const index_t c = r < rows ? row_choice[r] : -1;
    A dot = 0;
    if (r < rows) {
      T* dst = dbuf + offset_of(r, d);
      const T* g = c >= 0 ? dy + offset_of(c / k, d) : nullptr;
      const T* o = out + offset_of(r, d);
      const A s = c >= 0 && postscore ? w[c] : A(1);
      for (index_t j = threadIdx.x * V; j < d; j += blockDim.x * V) {
        if (!g) {
          store_pack<V>(dst + j, zero_pack<V, T>());
          continue;
        }
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
    }
    if (!postscore) continue;
    const A total = row_sum(dot);
    if (threadIdx.x == 0 && c >= 0) dw[c] += total;  // each choice owns one row: one writer
  }
}

// dx[t] = sum over kept choices j of (prescore ? w[t,j] : 1) * dbuf[row[t,j]]; with prescore
// dw[t,j] += dot(dbuf[row[t,j]], x[t]). The loop over token groups is uniform across the block.
template <class T, class A, int V>
__global__ void encode_backward(const T* __restrict__ dbuf, const T* __restrict__ x,
                                const index_t* __restrict__ row, const A* __restrict__ w,
                                T* __restrict__ dx, A* __restrict__ dw, index_t tokens, index_t d,
                                int k, bool prescore) {
  for (index_t group = blockIdx.x; group * blockDim.y < tokens; group += gridDim.x) {
    const index_t t = group * blockDim.y + threadIdx.y;
    const bool valid = t < tokens;
    if (valid)
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
    if (!prescore) continue;
    for (int c = 0; c < k; ++c) {
      const index_t r = valid ? row[t * k + c] : -1;
      A dot = 0;
      if (r >= 0)
        for (index_t j = threadIdx.x * V; j < d; j += blockDim.x * V) {
          const Pack<T, V> b = load_pack<V>(dbuf + offset_of(r, d) + j);
          const Pack<T, V> xv = load_pack<V>(x + offset_of(t, d) + j);
#pragma unroll
          for (int i = 0; i < V; ++i) dot += load(b.v[i]) * load(xv.v[i]);
        }
      const A total = row_sum(dot);
      if (threadIdx.x == 0 && r >= 0) dw[t * k + c] += total;
    }
  }
}

}  // namespace switchyard::kernels
