// The router on CUDA (ROUTING.md §1-5): one warp per token computes noise, scores, group-limited
// top-k and weights; a stable radix sort by expert gives every choice its slot; losses are
// reduced in a fixed order (deterministic: no floating-point atomics).
//
// Host syncs: none when the capacity is fixed (capacity_factor > 0, padded) or the layout is
// packed and dropless (capacity_factor 0): the row count is known on the host. The capacity of
// capacity_factor < 0, or 0 with the padded layout, is the largest per-expert count, and a packed
// layout with drops has as many rows as choices kept: each is read back (one sync).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <limits>

#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "core/philox.h"
#include "routing/router.h"
#include "routing/router_cuda.h"
#include "routing/router_rules.h"
#include "switchyard/rng.h"

namespace switchyard {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;

cudaStream_t stream_of(Device dev) { return as_cuda_stream(current_stream(dev).handle); }

unsigned blocks_for(index_t n) { return std::min(grid_size(n, 256), 4096u); }

// out[s, e] = sum of x[t, e] over the rows t of segment s (seg_len rows each), in double, in a
// fixed order, in two passes: block (x, s, p) sums chunk p of the segment's rows for 32 columns
// (thread (x, y) takes rows y, y + 8, ... of the chunk, then the 8 partials add up in order)
// into part[p, s, e]; then the chunks' partials add up in order.
constexpr int kSumRows = 8;
template <class A>
__global__ void column_sums_part(const A* __restrict__ x, const A* __restrict__ row_scale,
                                 index_t E, index_t seg_len, index_t chunk,
                                 double* __restrict__ part) {
  __shared__ double acc_y[kSumRows][kWarp + 1];
  const index_t e = static_cast<index_t>(blockIdx.x) * kWarp + threadIdx.x;
  const index_t s = blockIdx.y, p = blockIdx.z;
  const index_t begin = s * seg_len + p * chunk;
  const index_t end = min(begin + chunk, (s + 1) * seg_len);
  double acc = 0;
  if (e < E)
    for (index_t t = begin + threadIdx.y; t < end; t += kSumRows)
      acc += static_cast<double>(row_scale ? load(x[offset_of(t, E) + e]) * load(row_scale[t])
                                           : load(x[offset_of(t, E) + e]));
  acc_y[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && e < E) {
    double sum = 0;
    for (int y = 0; y < kSumRows; ++y) sum += acc_y[y][threadIdx.x];
    part[offset_of(p, gridDim.y * E) + offset_of(s, E) + e] = sum;
  }
}

__global__ void sum_parts(const double* __restrict__ part, index_t chunks, index_t n,
                          double* __restrict__ out) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    double sum = 0;
    for (index_t p = 0; p < chunks; ++p) sum += part[offset_of(p, n) + i];
    out[i] = sum;
  }
}

}  // namespace

void launch_column_sums(const Tensor& x, index_t seg_len, Tensor& out, cudaStream_t stream,
                        const Tensor* row_scale) {
  const index_t E = x.size(1), S = x.size(0) / seg_len;
  const index_t chunk = 256, chunks = (seg_len + chunk - 1) / chunk;
  SY_CHECK(S <= 65535 && chunks <= 65535, "column_sums: ", S, " segments of ", seg_len,
           " rows exceed one CUDA grid");
  const Tensor part = Tensor::empty({chunks, S, E}, DType::kF64, x.device());
  dispatch_float_cuda(x.dtype(), "column_sums", [&](auto tag) {
    using A = decltype(tag);
    const dim3 grid(static_cast<unsigned>((E + kWarp - 1) / kWarp), static_cast<unsigned>(S),
                    static_cast<unsigned>(chunks));
    column_sums_part<A><<<grid, dim3(kWarp, kSumRows), 0, stream>>>(
        static_cast<const A*>(x.data_ptr()),
        row_scale ? static_cast<const A*>(row_scale->data_ptr()) : nullptr, E, seg_len, chunk,
        part.data<double>());
    SY_CUDA_CHECK_LAUNCH();
  });
  sum_parts<<<blocks_for(S * E), 256, 0, stream>>>(part.data<double>(), chunks, S * E,
                                                   out.data<double>());
  SY_CUDA_CHECK_LAUNCH();
}

namespace {

template <class A>
__device__ A warp_max(A v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = max(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// The largest v[e] over e in [begin, end) with taken[e] == 0; ties go to the lower index, and
// -inf competes like any value (as top_k_row on the host). Returns the index (every lane).
template <class A>
__device__ int warp_argmax(const A* v, const unsigned char* taken, int begin, int end, int lane) {
  A best = 0;
  int best_i = -1;
  for (int e = begin + lane; e < end; e += kWarp) {
    if (taken[e]) continue;
    if (best_i < 0 || v[e] > best) {
      best = v[e];
      best_i = e;
    }
  }
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const A ov = __shfl_xor_sync(kFull, best, o);
    const int oi = __shfl_xor_sync(kFull, best_i, o);
    if (oi >= 0 && (best_i < 0 || ov > best || (ov == best && oi < best_i))) {
      best = ov;
      best_i = oi;
    }
  }
  return best_i;
}

struct RouteParams {
  index_t T, E;
  int k;
  bool noise;
  double gate_noise;
  std::uint64_t seed, step;
  index_t token_base;
  bool softmax;             // score function of probs
  bool logit_softmax;       // WeightRule::kLogitSoftmax
  bool renorm, megatron;    // renormalise the k weights; Megatron's denominator
  double scale;             // scaling factor
  const float* bias;        // [E] or null
  int groups, topk_groups;  // group-limited routing when groups > 1
  bool priority;            // write max_e probs (batch-prioritized routing)
  bool z_loss;              // write (logsumexp of the clean logits)^2 per token
  bool switch_loss;         // plain top-k of normalised clean probs, counted per sequence
  bool switch_softmax;
  index_t seq_len;
  bool load_importance;  // Tutel's load/importance terms per token
  double li_sigma;       // gate_noise / E
};

// Per token: noisy logits, probs, selection, top-k, gates and weights, and what the losses need.
// `scaled` (or null) holds sinkhorn's selection scores.
template <class A>
__global__ void route_rows(RouteParams p, const A* __restrict__ z, const A* __restrict__ scaled,
                           A* __restrict__ noisy, A* __restrict__ probs,
                           std::int32_t* __restrict__ idx, A* __restrict__ gates,
                           A* __restrict__ weight, A* __restrict__ priority,
                           double* __restrict__ zsq, A* __restrict__ sw_prob,
                           std::int32_t* __restrict__ sw_count, double* __restrict__ li_part,
                           int* __restrict__ nonfinite) {
  extern __shared__ unsigned char smem[];
  const int warps = blockDim.x / kWarp, w = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int E = static_cast<int>(p.E);
  A* sel = reinterpret_cast<A*>(smem) + offset_of(w, 2 * E);
  A* aux = sel + E;
  unsigned char* taken = smem + sizeof(A) * 2 * E * warps + offset_of(w, E);
  const index_t t = static_cast<index_t>(blockIdx.x) * warps + w;
  if (t >= p.T) return;
  const A* zt = z + offset_of(t, p.E);
  A* nt = noisy + offset_of(t, p.E);
  A* pt = probs + offset_of(t, p.E);

  // 1. Noisy logits (Tutel's gate noise) and their maximum.
  A m = -INFINITY;
  bool bad = false;
  for (int e = lane; e < E; e += kWarp) {
    A v = zt[e];
    bad |= !isfinite(v);
    if (p.noise) {
      v += static_cast<A>(p.gate_noise *
                          philox::normal(p.seed, static_cast<std::uint32_t>(RngStream::kGateNoise),
                                         p.step, static_cast<std::uint64_t>(p.token_base + t), e) /
                          static_cast<double>(p.E));
      nt[e] = v;
    }
    sel[e] = v;
    taken[e] = 0;
    m = max(m, v);
  }
  if (__any_sync(kFull, bad) && lane == 0) *nonfinite = 1;
  m = warp_max(m);

  // 2. Probs, and the selection scores (logits or probs, plus the expert bias).
  A s = 0;
  if (p.softmax) {
    for (int e = lane; e < E; e += kWarp) s += exp(sel[e] - m);
    s = warp_sum(s);
  }
  A pmax = -INFINITY;
  for (int e = lane; e < E; e += kWarp) {
    const A v = sel[e];
    const A pe = p.softmax ? exp(v - m) / s : A(1) / (A(1) + exp(-v));
    pt[e] = pe;
    pmax = max(pmax, pe);
    sel[e] = scaled ? scaled[offset_of(t, p.E) + e]
                    : (p.logit_softmax ? v : pe) + (p.bias ? static_cast<A>(p.bias[e]) : A(0));
  }
  if (p.priority) {
    pmax = warp_max(pmax);
    if (lane == 0) priority[t] = pmax;
  }
  __syncwarp();

  // 3. Group-limited routing: keep the topk_groups groups with the best sums of their top
  // k/topk_groups selection scores; the other experts' scores become -inf.
  if (p.groups > 1) {
    const int per_group = E / p.groups, top_in_group = p.k / p.topk_groups;
    for (int g = 0; g < p.groups; ++g) {
      A sum = 0;
      for (int j = 0; j < top_in_group; ++j) {
        const int i = warp_argmax(sel, taken, g * per_group, (g + 1) * per_group, lane);
        sum += sel[i];
        if (lane == 0) taken[i] = 1;
        __syncwarp();
      }
      if (lane == 0) aux[g] = sum;
      for (int e = g * per_group + lane; e < (g + 1) * per_group; e += kWarp) taken[e] = 0;
      __syncwarp();
    }
    for (int j = 0; j < p.topk_groups; ++j) {
      const int g = warp_argmax(aux, taken, 0, p.groups, lane);
      if (lane == 0) taken[g] = 1;
      __syncwarp();
    }
    for (int e = lane; e < E; e += kWarp)
      if (!taken[e / per_group]) sel[e] = -INFINITY;
    __syncwarp();
    for (int g = lane; g < p.groups; g += kWarp) taken[g] = 0;
    __syncwarp();
  }

  // 4. Top-k of the selection scores.
  std::int32_t* it = idx + offset_of(t, p.k);
  for (int j = 0; j < p.k; ++j) {
    const int i = warp_argmax(sel, taken, 0, E, lane);
    if (lane == 0) {
      it[j] = i;
      taken[i] = 1;
    }
    __syncwarp();
  }

  // 5. Gates and weights (lane 0: k is small).
  if (lane == 0) {
    const A* zn = p.noise ? nt : zt;
    A* gt = gates + offset_of(t, p.k);
    A* wt = weight + offset_of(t, p.k);
    if (p.logit_softmax) {
      A mk = -INFINITY, sk = 0;
      for (int j = 0; j < p.k; ++j) mk = max(mk, zn[it[j]]);
      for (int j = 0; j < p.k; ++j) sk += (gt[j] = exp(zn[it[j]] - mk));
      for (int j = 0; j < p.k; ++j) gt[j] /= sk;
    } else {
      for (int j = 0; j < p.k; ++j) gt[j] = pt[it[j]];
    }
    A denom = 1;
    if (p.renorm) {
      A sum = 0;
      for (int j = 0; j < p.k; ++j) sum += gt[j];
      denom = p.megatron ? sum + A(1e-20) : max(sum, A(FLT_EPSILON));
    }
    for (int j = 0; j < p.k; ++j) wt[j] = static_cast<A>(p.scale) * gt[j] / denom;
  }

  // 6. What the losses need, from the clean logits.
  if (!p.z_loss && !p.switch_loss && !p.load_importance) return;
  A mc = -INFINITY;
  for (int e = lane; e < E; e += kWarp) mc = max(mc, zt[e]);
  mc = warp_max(mc);
  A sc = 0;
  for (int e = lane; e < E; e += kWarp) sc += exp(zt[e] - mc);
  sc = warp_sum(sc);
  if (p.z_loss && lane == 0) {
    const double lse = static_cast<double>(mc) + log(static_cast<double>(sc));
    zsq[t] = lse * lse;
  }
  if (p.load_importance) {
    // Importance: softmax of the clean logits; load: the chance that each beats the k-th
    // largest noisy logit (Tutel compares a probability with a logit).
    __syncwarp();  // lane 0 wrote the choices
    const A* zn = p.noise ? nt : zt;
    const double thr = static_cast<double>(zn[it[p.k - 1]]);
    double* lt = li_part + offset_of(t, 2 * p.E);
    for (int e = lane; e < E; e += kWarp) {
      const double pe = static_cast<double>(exp(zt[e] - mc) / sc);
      lt[e] = pe;
      lt[E + e] = 0.5 * erfc(-(pe - thr) / p.li_sigma * M_SQRT1_2);
    }
  }
  if (!p.switch_loss) return;
  A ssig = 0;
  if (!p.switch_softmax) {
    for (int e = lane; e < E; e += kWarp) ssig += A(1) / (A(1) + exp(-zt[e]));
    ssig = warp_sum(ssig);
  }
  A* sp = sw_prob + offset_of(t, p.E);
  __syncwarp();
  for (int e = lane; e < E; e += kWarp) {
    const A v = p.switch_softmax ? exp(zt[e] - mc) / sc : A(1) / (A(1) + exp(-zt[e])) / ssig;
    sp[e] = v;
    sel[e] = v;
    taken[e] = 0;
  }
  __syncwarp();
  std::int32_t* count = sw_count + offset_of(t / p.seq_len, p.E);
  for (int j = 0; j < p.k; ++j) {
    const int i = warp_argmax(sel, taken, 0, E, lane);
    if (lane == 0) {
      taken[i] = 1;
      atomicAdd(count + i, 1);  // integer counts: exact in any order
    }
    __syncwarp();
  }
}

// Per-expert counts of choice 0 (GShard loss) or of all choices (slots): integer atomics.
__global__ void count_choices(const std::int32_t* __restrict__ idx, index_t n, int stride,
                              std::int32_t* __restrict__ count) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    atomicAdd(count + idx[i * stride], 1);
}

// aux = scale * sum_{s,e} mass[s,e] * count[s,e]; z = sum_t zsq[t] / T.
__global__ void finish_losses(const double* __restrict__ mass,
                              const std::int32_t* __restrict__ count, index_t n, double scale,
                              const double* __restrict__ zsq, index_t T, double* __restrict__ aux,
                              double* __restrict__ z) {
  __shared__ double prod[kBlockSumThreads];
  double acc = 0;
  if (mass)
    for (index_t i = threadIdx.x; i < n; i += kBlockSumThreads) acc += mass[i] * count[i];
  prod[threadIdx.x] = acc;
  __syncthreads();
  const double a = block_sum(prod, kBlockSumThreads);
  const double zs = zsq ? block_sum(zsq, T) : 0.0;
  if (threadIdx.x == 0) {
    if (aux) *aux = mass ? a * scale : 0.0;
    *z = zsq ? zs / static_cast<double>(T) : 0.0;
  }
}

// Tutel's load/importance loss from the column sums s = [imp (E), load (E)]:
// aux = (cv2(imp) + cv2(load)) / 2 with cv2(v) = var(v) / (mean(v)^2 + 1e-10) (unbiased var), and
// grad [2E] = d cv2(imp) / d imp, d cv2(load) / d load for the backward. One block.
__global__ void finish_load_importance(const double* __restrict__ s, index_t E,
                                       double* __restrict__ scratch, double* __restrict__ aux,
                                       double* __restrict__ grad) {
  double l = 0;
  const double n = static_cast<double>(E);
  for (int h = 0; h < 2; ++h) {
    const double* v = s + h * E;
    double* g = grad + h * E;
    if (E < 2) {
      for (index_t e = threadIdx.x; e < E; e += blockDim.x) g[e] = 0;
      continue;
    }
    const double mean = block_sum(v, E) / n;
    for (index_t e = threadIdx.x; e < E; e += blockDim.x)
      scratch[e] = (v[e] - mean) * (v[e] - mean);
    __syncthreads();
    const double var = block_sum(scratch, E) / (n - 1), den = mean * mean + 1e-10;
    for (index_t e = threadIdx.x; e < E; e += blockDim.x)
      g[e] = 2 * (v[e] - mean) / (n - 1) / den - var * 2 * mean / (n * den * den);
    l += var / den;
    __syncthreads();  // scratch is reused
  }
  if (threadIdx.x == 0) *aux = l / 2;
}

// Choice-major (Tutel: position j*T + r holds choice j of the r-th token in `order`) or
// token-major (Megatron: position t*k + j) sequence of choices, keyed by expert.
__global__ void order_choices(const std::int32_t* __restrict__ idx,
                              const std::int32_t* __restrict__ order, index_t T, int k,
                              bool choice_major, std::int32_t* __restrict__ key,
                              std::int32_t* __restrict__ choice) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < T * k;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t c = i;
    if (choice_major) {
      const index_t j = i / T, r = i % T;
      c = (order ? order[r] : r) * k + j;
    }
    key[i] = idx[c];
    choice[i] = static_cast<std::int32_t>(c);
  }
}

// Exclusive scan of the needed counts (start), kept counts, row offsets, the largest count.
__global__ void scan_counts(const std::int32_t* __restrict__ needed, index_t E, index_t capacity,
                            bool padded, index_t* __restrict__ start, index_t* __restrict__ kept,
                            index_t* __restrict__ offsets, index_t* __restrict__ max_needed) {
  if (threadIdx.x != 0) return;
  index_t s = 0, off = 0, mx = 0;
  for (index_t e = 0; e < E; ++e) {
    const index_t n = needed[e];
    start[e] = s;
    s += n;
    mx = n > mx ? n : mx;
    const index_t keep = capacity < 0 ? n : (n < capacity ? n : capacity);
    if (kept) kept[e] = keep;
    if (offsets) {
      offsets[e] = off;
      off += padded ? capacity : keep;
    }
  }
  if (offsets) offsets[E] = off;
  *max_needed = mx;
}

// Sorted position i of expert e is slot i - start[e]; slots below the capacity get a row. With
// `keep` (Megatron's probs drops; in sorted order) the kept choices take the slots in order:
// kept_before is keep's exclusive prefix sum.
__global__ void assign_rows(const std::int32_t* __restrict__ key,
                            const std::int32_t* __restrict__ choice, index_t n,
                            const index_t* __restrict__ start, const index_t* __restrict__ offsets,
                            index_t capacity, const std::int32_t* __restrict__ keep,
                            const std::int32_t* __restrict__ kept_before, index_t* __restrict__ row,
                            index_t* __restrict__ row_choice) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const int e = key[i];
    const index_t c = choice[i];
    index_t slot = i - start[e];
    bool kept = capacity < 0 || slot < capacity;
    if (keep) {
      kept = keep[i] != 0;
      slot = kept_before[i] - kept_before[start[e]];
    }
    if (!kept) {
      row[c] = -1;
    } else {
      row[c] = offsets[e] + slot;
      row_choice[offsets[e] + slot] = c;
    }
  }
}

// Megatron's probs drops: over the choices sorted by expert and, within an expert, by weight
// (descending; ties in token order), position i keeps its choice when it ranks below the capacity.
__global__ void mark_kept(const std::int32_t* __restrict__ key,
                          const std::int32_t* __restrict__ choice, index_t n,
                          const index_t* __restrict__ start, index_t capacity,
                          std::int32_t* __restrict__ keep) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    keep[choice[i]] = i - start[key[i]] < capacity;
}

__global__ void gather_i32(const std::int32_t* __restrict__ src,
                           const std::int32_t* __restrict__ index, index_t n,
                           std::int32_t* __restrict__ dst) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    dst[i] = src[index[i]];
}

// CUB's stable radix sort of (key, value) pairs; temporary storage from the caching allocator.
// Descending sorts all key bits (end_bit is ignored).
template <class K, class V>
void stable_sort_pairs(const K* key_in, K* key_out, const V* val_in, V* val_out, index_t n,
                       int end_bit, bool descending, Device dev, cudaStream_t stream) {
  const auto sort = [&](void* temp, std::size_t& bytes) {
    return descending
               ? cub::DeviceRadixSort::SortPairsDescending(temp, bytes, key_in, key_out, val_in,
                                                           val_out, static_cast<int>(n), 0,
                                                           static_cast<int>(sizeof(K) * 8), stream)
               : cub::DeviceRadixSort::SortPairs(temp, bytes, key_in, key_out, val_in, val_out,
                                                 static_cast<int>(n), 0, end_bit, stream);
  };
  std::size_t bytes = 0;
  SY_CUDA_CHECK(sort(nullptr, bytes));
  const Tensor temp = Tensor::empty({static_cast<index_t>(bytes / 4) + 1}, DType::kI32, dev);
  SY_CUDA_CHECK(sort(temp.data_ptr(), bytes));
}

// Exclusive prefix sum of n i32 values (CUB; temporary storage from the caching allocator).
void exclusive_sum(const std::int32_t* in, std::int32_t* out, index_t n, Device dev,
                   cudaStream_t stream) {
  std::size_t bytes = 0;
  SY_CUDA_CHECK(
      cub::DeviceScan::ExclusiveSum(nullptr, bytes, in, out, static_cast<int>(n), stream));
  const Tensor temp = Tensor::empty({static_cast<index_t>(bytes / 4) + 1}, DType::kI32, dev);
  SY_CUDA_CHECK(
      cub::DeviceScan::ExclusiveSum(temp.data_ptr(), bytes, in, out, static_cast<int>(n), stream));
}

int bits_for(index_t v) {
  int b = 1;
  while ((index_t{1} << b) <= v) ++b;
  return b;
}

__global__ void iota(std::int32_t* __restrict__ v, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    v[i] = static_cast<std::int32_t>(i);
}

struct BackwardParams {
  index_t T, E;
  int k;
  bool logit_softmax, renorm, megatron, softmax;
  double scale;
  double gshard_weight;  // aux weight * E / T^2 (0: no GShard term)
  double switch_weight;  // aux weight * the Switch loss's scale (0: no Switch term)
  bool switch_softmax;
  index_t seq_len;
  double z_weight;   // z weight * 2 / T (0: no z-loss term)
  double li_weight;  // aux weight of the load/importance loss (0: no such term)
  double li_sigma;   // gate_noise / E
  // Device-held loss weights (LossWeights' tensors, as f64): the weights above then hold their
  // scales for a weight of 1, and these multiply them.
  const double* aux_weight = nullptr;
  const double* z_weight_on_device = nullptr;
};

// dlogits of one token per warp: the weights' gradient through the gates and the score
// function, plus the losses' gradients.
template <class A>
__global__ void route_backward_rows(BackwardParams p, const A* __restrict__ dweight,
                                    const A* __restrict__ gates,
                                    const std::int32_t* __restrict__ idx,
                                    const A* __restrict__ probs, const A* __restrict__ z,
                                    const A* __restrict__ noisy,
                                    const std::int32_t* __restrict__ loss_count,
                                    const double* __restrict__ li_grad, A* __restrict__ dz) {
  extern __shared__ unsigned char smem[];
  const int warps = blockDim.x / kWarp, w = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int E = static_cast<int>(p.E);
  A* dp = reinterpret_cast<A*>(smem) + offset_of(w, 2 * E);
  A* dsparse = dp + E;
  const index_t t = static_cast<index_t>(blockIdx.x) * warps + w;
  if (t >= p.T) return;
  const A* pt = probs + offset_of(t, p.E);
  const A* zt = z + offset_of(t, p.E);
  A* dzt = dz + offset_of(t, p.E);
  const double aux_w = p.aux_weight ? *p.aux_weight : 1.0;
  const double gshard_w = p.gshard_weight * aux_w, switch_w = p.switch_weight * aux_w;
  const double z_w = p.z_weight * (p.z_weight_on_device ? *p.z_weight_on_device : 1.0);
  for (int e = lane; e < E; e += kWarp) {
    dp[e] = p.gshard_weight != 0 ? static_cast<A>(gshard_w * loss_count[e]) : A(0);
    dsparse[e] = 0;
  }
  __syncwarp();
  if (lane == 0) {
    const A* dw = dweight + offset_of(t, p.k);
    const A* g = gates + offset_of(t, p.k);
    const std::int32_t* it = idx + offset_of(t, p.k);
    const A scale = static_cast<A>(p.scale);
    if (p.logit_softmax) {
      A dot = 0;
      for (int j = 0; j < p.k; ++j) dot += g[j] * scale * dw[j];
      for (int j = 0; j < p.k; ++j) dsparse[it[j]] += g[j] * (scale * dw[j] - dot);
    } else if (!p.renorm) {
      for (int j = 0; j < p.k; ++j) dp[it[j]] += scale * dw[j];
    } else {
      A sum = 0, dot = 0;
      for (int j = 0; j < p.k; ++j) {
        sum += g[j];
        dot += dw[j] * g[j];
      }
      const A denom = p.megatron ? sum + A(1e-20) : max(sum, A(FLT_EPSILON));
      const bool through_denominator = p.megatron || sum > A(FLT_EPSILON);
      for (int j = 0; j < p.k; ++j)
        dp[it[j]] += scale * (dw[j] / denom - (through_denominator ? dot / (denom * denom) : A(0)));
    }
  }
  __syncwarp();

  A dot = 0;
  if (p.softmax) {
    for (int e = lane; e < E; e += kWarp) dot += pt[e] * dp[e];
    dot = warp_sum(dot);
  }
  // Clean-logit softmax statistics for the Switch and z-loss terms.
  A mc = 0, sc = 1, ssig = 1, sw_dot = 0;
  const bool need_clean = p.switch_weight != 0 || p.z_weight != 0 || p.li_weight != 0;
  if (need_clean) {
    mc = -INFINITY;
    for (int e = lane; e < E; e += kWarp) mc = max(mc, zt[e]);
    mc = warp_max(mc);
    sc = 0;
    for (int e = lane; e < E; e += kWarp) sc += exp(zt[e] - mc);
    sc = warp_sum(sc);
  }
  const std::int32_t* count = loss_count + offset_of(t / p.seq_len, p.E);
  if (p.switch_weight != 0) {
    if (!p.switch_softmax) {
      ssig = 0;
      for (int e = lane; e < E; e += kWarp) ssig += A(1) / (A(1) + exp(-zt[e]));
      ssig = warp_sum(ssig);
    }
    for (int e = lane; e < E; e += kWarp) {
      const A prob = p.switch_softmax ? exp(zt[e] - mc) / sc : A(1) / (A(1) + exp(-zt[e])) / ssig;
      sw_dot += prob * static_cast<A>(switch_w * count[e]);
    }
    sw_dot = warp_sum(sw_dot);
  }
  // Load/importance: gp[e] = w/2 (g_imp[e] + g_load[e] dload[e]) through softmax(clean logits),
  // and -w/2 sum_e g_load[e] dload[e] into the threshold's (noisy = clean + constant) logit.
  const double li_w = p.li_weight * aux_w;
  const int thr_e = p.li_weight != 0 ? idx[offset_of(t, p.k) + p.k - 1] : -1;
  const double thr = thr_e >= 0 ? static_cast<double>(noisy[offset_of(t, p.E) + thr_e]) : 0.0;
  const auto li_terms = [&](int e, double& pe, double& gp, double& g_thr) {
    pe = static_cast<double>(exp(zt[e] - mc) / sc);
    const double u = (pe - thr) / p.li_sigma;
    const double dload = exp(-0.5 * u * u) / (p.li_sigma * sqrt(2 * M_PI));
    gp = li_w * 0.5 * (li_grad[e] + li_grad[E + e] * dload);
    g_thr = -li_w * 0.5 * li_grad[E + e] * dload;
  };
  double li_dot = 0, li_thr = 0;
  if (thr_e >= 0) {
    for (int e = lane; e < E; e += kWarp) {
      double pe, gp, g_thr;
      li_terms(e, pe, gp, g_thr);
      li_dot += pe * gp;
      li_thr += g_thr;
    }
    li_dot = warp_sum(li_dot);
    li_thr = warp_sum(li_thr);
  }
  const A lse = mc + log(sc);
  for (int e = lane; e < E; e += kWarp) {
    A g = p.softmax ? pt[e] * (dp[e] - dot) : dp[e] * pt[e] * (A(1) - pt[e]);
    g += dsparse[e];
    if (p.switch_weight != 0) {
      const A gp = static_cast<A>(switch_w * count[e]);
      if (p.switch_softmax) {
        g += exp(zt[e] - mc) / sc * (gp - sw_dot);
      } else {
        const A sig = A(1) / (A(1) + exp(-zt[e]));
        g += (gp - sw_dot) / ssig * sig * (A(1) - sig);
      }
    }
    if (thr_e >= 0) {
      double pe, gp, g_thr;
      li_terms(e, pe, gp, g_thr);
      g += static_cast<A>(pe * (gp - li_dot));
      if (e == thr_e) g += static_cast<A>(li_thr);
    }
    if (p.z_weight != 0) g += static_cast<A>(z_w) * lse * exp(zt[e] - mc) / sc;
    dzt[e] = g;
  }
}

// Warps per block for per-token kernels whose warps each hold `per_warp` bytes of shared memory.
int warps_per_block(std::size_t per_warp) {
  return static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(8, 48 * 1024 / per_warp)));
}

template <class F>
void dispatch_route_dtype(DType dtype, const char* op, F&& f) {
  if (dtype == DType::kF64) return f(double{});
  SY_CHECK(dtype == DType::kF32, op, ": routing runs in f32 or f64, got ", dtype_name(dtype));
  f(float{});
}

// keep[c] (i32, [T * k]): whether choice c ranks below the capacity among its expert's choices
// by weight (descending, ties in token order): a stable sort by weight, then a stable sort by
// expert.
Tensor keep_largest_weights(const RoutingPlan& plan, const Tensor& start, index_t capacity,
                            Device dev, cudaStream_t stream) {
  const index_t n = plan.num_tokens * plan.top_k;
  const Tensor choices = Tensor::empty({n}, DType::kI32, dev);
  iota<<<blocks_for(n), 256, 0, stream>>>(choices.data<std::int32_t>(), n);
  SY_CUDA_CHECK_LAUNCH();
  const Tensor by_weight = Tensor::empty({n}, DType::kI32, dev);
  dispatch_route_dtype(plan.weight.dtype(), "route_cuda", [&](auto tag) {
    using A = decltype(tag);
    const Tensor sorted_weight = Tensor::empty({n}, plan.weight.dtype(), dev);
    stable_sort_pairs(plan.weight.data<A>(), sorted_weight.data<A>(), choices.data<std::int32_t>(),
                      by_weight.data<std::int32_t>(), n, 0, true, dev, stream);
  });
  const Tensor expert = Tensor::empty({n}, DType::kI32, dev);
  gather_i32<<<blocks_for(n), 256, 0, stream>>>(plan.expert_idx.data<std::int32_t>(),
                                                by_weight.data<std::int32_t>(), n,
                                                expert.data<std::int32_t>());
  SY_CUDA_CHECK_LAUNCH();
  const Tensor sorted_expert = Tensor::empty({n}, DType::kI32, dev);
  const Tensor ranked = Tensor::empty({n}, DType::kI32, dev);
  stable_sort_pairs(expert.data<std::int32_t>(), sorted_expert.data<std::int32_t>(),
                    by_weight.data<std::int32_t>(), ranked.data<std::int32_t>(), n,
                    bits_for(plan.num_experts - 1), false, dev, stream);
  Tensor keep = Tensor::empty({n}, DType::kI32, dev);
  mark_kept<<<blocks_for(n), 256, 0, stream>>>(
      sorted_expert.data<std::int32_t>(), ranked.data<std::int32_t>(), n, start.data<index_t>(),
      capacity, keep.data<std::int32_t>());
  SY_CUDA_CHECK_LAUNCH();
  return keep;
}

}  // namespace

bool route_cuda_supports(const MoEConfig& cfg, const RouteArgs& args, index_t num_tokens) {
  const std::size_t per_warp = cfg.num_experts * (2 * sizeof(double) + 1);
  return !(cfg.sinkhorn && args.training && cfg.gate_noise > 0) && !args.max_needed_over_ranks &&
         !args.sum_over_ranks && per_warp <= 48 * 1024 && num_tokens > 0 &&
         num_tokens * args.top_k < std::numeric_limits<std::int32_t>::max();
}

RoutingPlan route_cuda(const MoEConfig& cfg, const RouteArgs& args, const Tensor& logits_in,
                       RouterState& st, LossTensors& losses, Tensor& nonfinite) {
  const index_t T = logits_in.size(0), E = logits_in.size(1);
  const int k = args.top_k;
  SY_CHECK(route_cuda_supports(cfg, args, T), "route_cuda: this configuration routes on the host");
  const Device dev = logits_in.device();
  const DType rd = logits_in.dtype();
  DeviceScope scope(dev.index);
  const cudaStream_t stream = stream_of(dev);
  const Tensor logits = logits_in.contiguous();
  const WeightRule rule = weight_rule(cfg);
  const bool sinkhorn = rule == WeightRule::kSinkhorn;
  const bool noise = args.training && cfg.gate_noise > 0;
  const AuxLoss aux_loss = aux_loss_of(cfg, rule);
  const bool switch_loss = aux_loss == AuxLoss::kSwitch || aux_loss == AuxLoss::kSwitchSequence;
  const bool load_importance = aux_loss == AuxLoss::kLoadImportance;
  const bool prioritized = cfg.rules == RuleSet::kTutel && cfg.batch_prioritized_routing;
  const index_t L = switch_loss ? switch_seq_len(cfg, T) : T;

  RoutingPlan plan;
  plan.num_tokens = T;
  plan.num_experts = E;
  plan.top_k = k;
  plan.layout = args.layout;
  plan.expert_idx = Tensor::empty({T, k}, DType::kI32, dev);
  plan.weight = Tensor::empty({T, k}, rd, dev);
  const Tensor noisy = noise ? Tensor::empty({T, E}, rd, dev) : logits;
  const Tensor probs = Tensor::empty({T, E}, rd, dev);
  const Tensor gates = Tensor::empty({T, k}, rd, dev);
  const Tensor priority = prioritized ? Tensor::empty({T}, rd, dev) : Tensor();
  const Tensor zsq = Tensor::empty({T}, DType::kF64, dev);
  const Tensor sw_prob = switch_loss ? Tensor::empty({T, E}, rd, dev) : Tensor();
  Tensor loss_count = Tensor::zeros({switch_loss ? T / L : 1, E}, DType::kI32, dev);
  const Tensor li_part = load_importance ? Tensor::empty({T, 2 * E}, DType::kF64, dev) : Tensor();
  const Tensor scaled = sinkhorn && args.training ? sinkhorn_cuda(logits, cfg.sinkhorn_max_iters,
                                                                  cfg.sinkhorn_tol, stream)
                                                  : Tensor();

  RouteParams p{};
  p.T = T;
  p.E = E;
  p.k = k;
  p.noise = noise;
  p.gate_noise = cfg.gate_noise;
  p.seed = cfg.seed;
  p.step = args.step;
  p.token_base = args.token_base;
  p.softmax = probs_fn(cfg, rule, k) == ScoreFn::kSoftmax;
  p.logit_softmax = rule == WeightRule::kLogitSoftmax;
  p.renorm = rule == WeightRule::kScores && renormalises(cfg, k);
  p.megatron = cfg.rules == RuleSet::kMegatron;
  p.scale = weight_scale(cfg, rule);
  p.bias = args.expert_bias && !sinkhorn ? args.expert_bias->data<float>() : nullptr;
  p.groups = cfg.num_groups > 1 && !sinkhorn ? cfg.num_groups : 0;
  p.topk_groups = cfg.topk_groups;
  p.priority = prioritized;
  p.z_loss = true;
  p.switch_loss = switch_loss;
  p.switch_softmax = cfg.score_fn == ScoreFn::kSoftmax;
  p.seq_len = L;
  p.load_importance = load_importance;
  p.li_sigma = cfg.gate_noise / static_cast<double>(E);
  if (p.bias)
    SY_CHECK(args.expert_bias->device() == dev, "route_cuda: expert_bias must be on ",
             to_string(dev));

  dispatch_route_dtype(rd, "route_cuda", [&](auto tag) {
    using A = decltype(tag);
    const std::size_t per_warp = static_cast<std::size_t>(E) * (2 * sizeof(A) + 1);
    const int warps = warps_per_block(per_warp);
    const unsigned grid = static_cast<unsigned>((T + warps - 1) / warps);
    route_rows<A><<<grid, warps * kWarp, per_warp * warps, stream>>>(
        p, logits.data<A>(), scaled.defined() ? scaled.data<A>() : nullptr,
        noise ? noisy.data<A>() : nullptr, probs.data<A>(), plan.expert_idx.data<std::int32_t>(),
        gates.data<A>(), plan.weight.data<A>(), prioritized ? priority.data<A>() : nullptr,
        zsq.data<double>(), switch_loss ? sw_prob.data<A>() : nullptr,
        loss_count.data<std::int32_t>(), load_importance ? li_part.data<double>() : nullptr,
        nonfinite.data<std::int32_t>());
    SY_CUDA_CHECK_LAUNCH();
  });

  // Losses (unweighted).
  losses.aux = Tensor::empty({}, DType::kF64, dev);
  losses.z = Tensor::empty({}, DType::kF64, dev);
  Tensor mass, li_grad;
  double aux_scale = 0;
  if (load_importance) {
    Tensor sums = Tensor::empty({1, 2 * E}, DType::kF64, dev);
    launch_column_sums(li_part, T, sums, stream);
    li_grad = Tensor::empty({2 * E}, DType::kF64, dev);
    const Tensor scratch = Tensor::empty({E}, DType::kF64, dev);
    finish_load_importance<<<1, kBlockSumThreads, 0, stream>>>(
        sums.data<double>(), E, scratch.data<double>(), losses.aux.data<double>(),
        li_grad.data<double>());
    SY_CUDA_CHECK_LAUNCH();
  } else if (aux_loss == AuxLoss::kGShard) {
    count_choices<<<blocks_for(T), 256, 0, stream>>>(plan.expert_idx.data<std::int32_t>(), T, k,
                                                     loss_count.data<std::int32_t>());
    SY_CUDA_CHECK_LAUNCH();
    mass = Tensor::empty({1, E}, DType::kF64, dev);
    launch_column_sums(probs, T, mass, stream);
    aux_scale = static_cast<double>(E) / (static_cast<double>(T) * static_cast<double>(T));
  } else if (switch_loss) {
    mass = Tensor::empty({T / L, E}, DType::kF64, dev);
    launch_column_sums(sw_prob, L, mass, stream);
    aux_scale = static_cast<double>(E) / (static_cast<double>(k) * L * L) / (T / L);
  }
  finish_losses<<<1, kBlockSumThreads, 0, stream>>>(
      mass.defined() ? mass.data<double>() : nullptr, loss_count.data<std::int32_t>(),
      mass.defined() ? mass.numel() : 0, aux_scale, zsq.data<double>(), T,
      load_importance ? nullptr : losses.aux.data<double>(), losses.z.data<double>());
  SY_CUDA_CHECK_LAUNCH();

  // Slots: choices in routing order, stably sorted by expert.
  const index_t n = T * k;
  Tensor order;
  if (prioritized) {
    const Tensor tokens = Tensor::empty({T}, DType::kI32, dev);
    iota<<<blocks_for(T), 256, 0, stream>>>(tokens.data<std::int32_t>(), T);
    SY_CUDA_CHECK_LAUNCH();
    order = Tensor::empty({T}, DType::kI32, dev);
    const Tensor sorted_priority = Tensor::empty({T}, rd, dev);
    dispatch_route_dtype(rd, "route_cuda", [&](auto tag) {
      using A = decltype(tag);
      stable_sort_pairs(priority.data<A>(), sorted_priority.data<A>(), tokens.data<std::int32_t>(),
                        order.data<std::int32_t>(), T, 0, true, dev, stream);
    });
  }
  const Tensor key = Tensor::empty({n}, DType::kI32, dev),
               choice = Tensor::empty({n}, DType::kI32, dev);
  order_choices<<<blocks_for(n), 256, 0, stream>>>(
      plan.expert_idx.data<std::int32_t>(), order.defined() ? order.data<std::int32_t>() : nullptr,
      T, k, cfg.rules == RuleSet::kTutel, key.data<std::int32_t>(), choice.data<std::int32_t>());
  SY_CUDA_CHECK_LAUNCH();
  const Tensor sorted_key = Tensor::empty({n}, DType::kI32, dev);
  const Tensor sorted_choice = Tensor::empty({n}, DType::kI32, dev);
  stable_sort_pairs(key.data<std::int32_t>(), sorted_key.data<std::int32_t>(),
                    choice.data<std::int32_t>(), sorted_choice.data<std::int32_t>(), n,
                    bits_for(E - 1), false, dev, stream);
  const Tensor needed = Tensor::zeros({E}, DType::kI32, dev);
  count_choices<<<blocks_for(n), 256, 0, stream>>>(plan.expert_idx.data<std::int32_t>(), n, 1,
                                                   needed.data<std::int32_t>());
  SY_CUDA_CHECK_LAUNCH();

  // Capacity: from the token count, or (one sync) from the largest per-expert count.
  const SlotRules rules = slot_rules(cfg, args);
  const bool padded = args.layout == Layout::kPadded;
  const Tensor start = Tensor::empty({E}, DType::kI64, dev);
  const Tensor max_needed = Tensor::empty({}, DType::kI64, dev);
  index_t capacity = -1;  // no cap: packed and dropless
  if (args.capacity_factor > 0) {
    capacity = compute_capacity(rules, T, E, k, 0);
  } else if (args.capacity_factor < 0 || padded) {
    scan_counts<<<1, 32, 0, stream>>>(needed.data<std::int32_t>(), E, -1, false,
                                      start.data<index_t>(), nullptr, nullptr,
                                      max_needed.data<index_t>());
    SY_CUDA_CHECK_LAUNCH();
    capacity = compute_capacity(rules, T, E, k, max_needed.to(Device::cpu()).data<index_t>()[0]);
  }
  plan.capacity = capacity;
  plan.offsets = Tensor::empty({E + 1}, DType::kI64, dev);
  plan.expert_count = Tensor::empty({E}, DType::kI64, dev);
  scan_counts<<<1, 32, 0, stream>>>(needed.data<std::int32_t>(), E, capacity, padded,
                                    start.data<index_t>(), plan.expert_count.data<index_t>(),
                                    plan.offsets.data<index_t>(), max_needed.data<index_t>());
  SY_CUDA_CHECK_LAUNCH();
  plan.num_rows = padded ? E * capacity
                  : capacity < 0
                      ? n
                      : plan.offsets.narrow(0, E, 1).to(Device::cpu()).data<index_t>()[0];
  plan.dropped = -1;  // known once the counts are read: T * k - sum(expert_count)
  plan.row = Tensor::empty({T, k}, DType::kI64, dev);
  plan.row_choice = Tensor::empty({plan.num_rows}, DType::kI64, dev);
  if (plan.num_rows > 0)
    SY_CUDA_CHECK(cudaMemsetAsync(plan.row_choice.data_ptr(), 0xff,
                                  static_cast<std::size_t>(plan.num_rows) * sizeof(index_t),
                                  stream));
  // Megatron's probs drops: each expert keeps its `capacity` largest weights, in token order.
  Tensor keep_sorted, kept_before;
  if (cfg.rules == RuleSet::kMegatron && cfg.drop_policy == DropPolicy::kProbs && capacity >= 0) {
    const Tensor keep = keep_largest_weights(plan, start, capacity, dev, stream);
    keep_sorted = Tensor::empty({n}, DType::kI32, dev);
    gather_i32<<<blocks_for(n), 256, 0, stream>>>(keep.data<std::int32_t>(),
                                                  sorted_choice.data<std::int32_t>(), n,
                                                  keep_sorted.data<std::int32_t>());
    SY_CUDA_CHECK_LAUNCH();
    kept_before = Tensor::empty({n}, DType::kI32, dev);
    exclusive_sum(keep_sorted.data<std::int32_t>(), kept_before.data<std::int32_t>(), n, dev,
                  stream);
  }
  assign_rows<<<blocks_for(n), 256, 0, stream>>>(
      sorted_key.data<std::int32_t>(), sorted_choice.data<std::int32_t>(), n, start.data<index_t>(),
      plan.offsets.data<index_t>(), capacity,
      keep_sorted.defined() ? keep_sorted.data<std::int32_t>() : nullptr,
      kept_before.defined() ? kept_before.data<std::int32_t>() : nullptr, plan.row.data<index_t>(),
      plan.row_choice.data<index_t>());
  SY_CUDA_CHECK_LAUNCH();

  st = RouterState{logits, noisy, probs, gates, rule, loss_count};
  st.loss_grad = li_grad;
  return plan;
}

Tensor route_backward_cuda(const MoEConfig& cfg, const RoutingPlan& plan, const RouterState& st,
                           const Tensor& dweight_in, const LossWeights& lw) {
  const index_t T = plan.num_tokens, E = plan.num_experts;
  const int k = plan.top_k;
  const Device dev = st.logits.device();
  const DType rd = st.logits.dtype();
  DeviceScope scope(dev.index);
  const cudaStream_t stream = stream_of(dev);
  const Tensor dweight = dweight_in.contiguous();
  Tensor dlogits = Tensor::empty({T, E}, rd, dev);
  if (T == 0) return dlogits;
  const AuxLoss aux_loss = aux_loss_of(cfg, st.rule);
  const bool switch_loss = aux_loss == AuxLoss::kSwitch || aux_loss == AuxLoss::kSwitchSequence;
  const index_t L = switch_loss ? switch_seq_len(cfg, T) : T;

  BackwardParams p{};
  p.T = T;
  p.E = E;
  p.k = k;
  p.logit_softmax = st.rule == WeightRule::kLogitSoftmax;
  p.renorm = st.rule == WeightRule::kScores && renormalises(cfg, k);
  p.megatron = cfg.rules == RuleSet::kMegatron;
  p.softmax = probs_fn(cfg, st.rule, k) == ScoreFn::kSoftmax;
  p.scale = weight_scale(cfg, st.rule);
  // Device-held weights: the kernel multiplies the scales below (computed for a weight of 1) by
  // their values, converted to f64 on the device.
  Tensor aux_w, z_w;
  const double aux = lw.aux_tensor.defined() ? 1.0 : lw.aux;
  const double zw = lw.z_tensor.defined() ? 1.0 : lw.z;
  if (lw.aux_tensor.defined()) {
    aux_w = lw.aux_tensor.to(DType::kF64).contiguous();
    p.aux_weight = aux_w.data<double>();
  }
  if (lw.z_tensor.defined()) {
    z_w = lw.z_tensor.to(DType::kF64).contiguous();
    p.z_weight_on_device = z_w.data<double>();
  }
  if (aux_loss == AuxLoss::kGShard)
    p.gshard_weight = aux * static_cast<double>(E) / (static_cast<double>(T) * T);
  if (aux_loss == AuxLoss::kLoadImportance) p.li_weight = aux;
  p.li_sigma = cfg.gate_noise / static_cast<double>(E);
  if (switch_loss)
    p.switch_weight = aux * static_cast<double>(E) / (static_cast<double>(k) * L * L) / (T / L);
  p.switch_softmax = cfg.score_fn == ScoreFn::kSoftmax;
  p.seq_len = L;
  p.z_weight = zw * 2 / static_cast<double>(T);

  dispatch_route_dtype(rd, "route_backward_cuda", [&](auto tag) {
    using A = decltype(tag);
    const std::size_t per_warp = static_cast<std::size_t>(E) * 2 * sizeof(A);
    const int warps = warps_per_block(per_warp);
    const unsigned grid = static_cast<unsigned>((T + warps - 1) / warps);
    route_backward_rows<A><<<grid, warps * kWarp, per_warp * warps, stream>>>(
        p, dweight.data<A>(), st.gates.data<A>(), plan.expert_idx.data<std::int32_t>(),
        st.probs.data<A>(), st.logits.data<A>(), st.noisy.data<A>(),
        st.loss_count.data<std::int32_t>(),
        st.loss_grad.defined() ? st.loss_grad.data<double>() : nullptr, dlogits.data<A>());
    SY_CUDA_CHECK_LAUNCH();
  });
  return dlogits;
}

}  // namespace switchyard
