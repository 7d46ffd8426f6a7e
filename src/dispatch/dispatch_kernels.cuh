// Dispatch kernels on raw pointers, threads over the columns of a row. encode and decode are row
// kernels (core/cuda_math.cuh's row_blocks) over buffer rows and tokens; the backward kernels,
// which reduce dot products for the weight gradients, run one block per token (a token's k
// buffer rows kChoiceChunk at a time, so its row of dy is read from DRAM once) and reduce in a
// fixed order (block_sums_into), so results are bitwise reproducible; no atomics. (As row kernels
// striding over rows, with a barrier per row, they measured slower: sonic_fine decode_backward
// 775 vs 640 us under ncu.)
#pragma once

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

// The backward kernels take a token's choices kChoiceChunk at a time: the chunk's buffer rows are
// read together (their loads in flight at once) and their dot products reduced in one pass, one
// barrier per chunk rather than one per choice. (One choice at a time, with a CUB block
// reduction each, ran sonic_fine's decode_backward at 641 us under ncu on an H100: each
// block waited on one row's DRAM latency and one barrier per choice.)
constexpr int kChoiceChunk = 8;

// dst[c] += the block's sum of part[c] for c < count, in a fixed order (a butterfly within each
// warp, then the warps in order), so results are bitwise reproducible. partial holds kChoiceChunk
// values per warp. All threads of the block call it.
template <class A>
__device__ void block_sums_into(const A (&part)[kChoiceChunk], A* partial, A* dst, int count) {
  constexpr int kWarps = kDispatchThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int c = 0; c < kChoiceChunk; ++c) {
    A v = part[c];
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[c * kWarps + warp] = v;
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < count) {
    A total = 0;
    for (int w = 0; w < kWarps; ++w) total += partial[threadIdx.x * kWarps + w];
    dst[threadIdx.x] += total;  // one writer per choice
  }
  __syncthreads();  // partial is reused by the next chunk
}

// The buffer rows of choices c0 .. c0 + kChoiceChunk - 1 of token t (-1: dropped, or past k).
struct ChoiceRows {
  index_t r[kChoiceChunk];
  __device__ ChoiceRows(const index_t* row, index_t t, int k, int c0) {
#pragma unroll
    for (int i = 0; i < kChoiceChunk; ++i) r[i] = c0 + i < k ? row[t * k + c0 + i] : -1;
  }
};

// dbuf[row[t,j]] = (postscore ? w[t,j] : 1) * dy[t] for every kept choice, one block per token
// (dy[t] comes from DRAM once and from L1 for its other choices); with postscore dw[t,j] +=
// dot(dy[t], out[row[t,j]]). Padding rows: zero_rows.
template <class T, class A, int V>
__global__ void decode_backward(const T* __restrict__ dy, const T* __restrict__ out,
                                const index_t* __restrict__ row, const A* __restrict__ w,
                                T* __restrict__ dbuf, A* __restrict__ dw, index_t d, int k,
                                bool postscore) {
  __shared__ A partial[kChoiceChunk * kDispatchThreads / 32];
  const index_t t = blockIdx.x;
  const T* g = dy + offset_of(t, d);
  for (int c0 = 0; c0 < k; c0 += kChoiceChunk) {
    const ChoiceRows cr(row, t, k, c0);
    A s[kChoiceChunk], dot[kChoiceChunk] = {};
#pragma unroll
    for (int i = 0; i < kChoiceChunk; ++i)
      s[i] = postscore && cr.r[i] >= 0 ? w[t * k + c0 + i] : A(1);
    for (index_t j = threadIdx.x * V; j < d; j += blockDim.x * V) {
      const Pack<T, V> gj = load_pack<V>(g + j);
      Pack<T, V> oj[kChoiceChunk];
      if (postscore) {
#pragma unroll
        for (int i = 0; i < kChoiceChunk; ++i)
          if (cr.r[i] >= 0) oj[i] = load_pack<V>(out + offset_of(cr.r[i], d) + j);
      }
#pragma unroll
      for (int i = 0; i < kChoiceChunk; ++i) {
        if (cr.r[i] < 0) continue;
        Pack<T, V> res;
#pragma unroll
        for (int e = 0; e < V; ++e) res.v[e] = store<T>(s[i] * load(gj.v[e]));
        store_pack<V>(dbuf + offset_of(cr.r[i], d) + j, res);
        if (postscore) {
#pragma unroll
          for (int e = 0; e < V; ++e) dot[i] += load(gj.v[e]) * load(oj[i].v[e]);
        }
      }
    }
    // Uniform across the block: every thread reads the same k and postscore.
    if (postscore) block_sums_into(dot, partial, dw + t * k + c0, min(kChoiceChunk, k - c0));
  }
}

// dx[t] = sum over kept choices j of (prescore ? w[t,j] : 1) * dbuf[row[t,j]]; with prescore
// dw[t,j] += dot(dbuf[row[t,j]], x[t]).
template <class T, class A, int V>
__global__ void encode_backward(const T* __restrict__ dbuf, const T* __restrict__ x,
                                const index_t* __restrict__ row, const A* __restrict__ w,
                                T* __restrict__ dx, A* __restrict__ dw, index_t d, int k,
                                bool prescore) {
  __shared__ A partial[kChoiceChunk * kDispatchThreads / 32];
  const index_t t = blockIdx.x;
  const T* xt = x + offset_of(t, d);
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
  for (int c0 = 0; c0 < k; c0 += kChoiceChunk) {
    const ChoiceRows cr(row, t, k, c0);
    A dot[kChoiceChunk] = {};
    for (index_t j = threadIdx.x * V; j < d; j += blockDim.x * V) {
      const Pack<T, V> xv = load_pack<V>(xt + j);
#pragma unroll
      for (int i = 0; i < kChoiceChunk; ++i) {
        if (cr.r[i] < 0) continue;
        const Pack<T, V> b = load_pack<V>(dbuf + offset_of(cr.r[i], d) + j);
#pragma unroll
        for (int e = 0; e < V; ++e) dot[i] += load(b.v[e]) * load(xv.v[e]);
      }
    }
    block_sums_into(dot, partial, dw + t * k + c0, min(kChoiceChunk, k - c0));
  }
}

}  // namespace switchyard::kernels
