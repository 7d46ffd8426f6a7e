// Grouped GEMM device code for the packed (dropless) expert layout: one persistent kernel over
// the output tiles of all groups, each group's size read from device-side offsets, so no host
// sync is needed and the launch can be captured in a CUDA graph. bf16/f16 in, f32 accumulate,
// tensor cores through mma.sync m16n8k16 (sm_80+), operands staged through a cp.async pipeline.
// On compute capability 9.0 with an sm_90a build, both forms run the wgmma/TMA kernel of
// experts/grouped_gemm_sm90.cuh instead (chosen at run time in run_varying_m / run_varying_k).
// All matrices row-major. Raw pointers only; run_varying_m / run_varying_k at the end check the
// sizes and launch (experts/grouped_gemm_cuda.cu instantiates them for the library).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "switchyard/error.h"
#include "switchyard/index.h"

namespace switchyard::grouped_gemm_detail {

// Three problem forms; E groups, group e owning rows [off[e], off[e+1]) of the packed operands.
enum class Form {
  kRowsB,   // C[rows_e, N] = A[rows_e, K] · B[e]       with B [E, K, N]
  kRowsBt,  // C[rows_e, N] = A[rows_e, K] · B[e]ᵀ      with B [E, N, K]
  kOuter,  // C[e] (+)= A[rows_e, M]ᵀ · B[rows_e, N]   with C [E, M, N] (the K of group e varies)
};

// Tile shape: BM x BN outputs per CTA, BK deep per pipeline stage, WM x WN warps.
template <int BM_, int BN_, int BK_, int kStages_, int WM_, int WN_, int kMinBlocks_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, kStages = kStages_, WM = WM_, WN = WN_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int kWarpM = BM / WM, kWarpN = BN / WN;   // one warp's outputs
  static constexpr int kMi = kWarpM / 16, kNi = kWarpN / 8;  // its mma tiles
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0 && BK % 16 == 0, "tile shape");
};

template <class T, Form F>
struct Params {
  const T* a;
  const T* b;
  T* c;
  const index_t* offsets;   // [E+1], device, non-decreasing
  int num_groups;           // E
  index_t rows;             // rows of the packed operands (offsets are clamped to [0, rows])
  int m, n, k;              // kRows*: n, k fixed; kOuter: m, n fixed
  float beta;               // kOuter only: C = beta C + ...
  const T* bias = nullptr;  // kRows* only: [E, N], added to group e's rows before rounding
  int relu = 0;             // kRows* only: then max(0, .)
  const T* mask = nullptr;  // kRows* only: [R, N], then 0 where mask <= 0 (relu's backward)
};

// Shared-memory row strides: 8 elements (16 bytes) of padding per row put the eight 16-byte rows
// of every ldmatrix in distinct banks, for both the K-major and the M/N-major tiles.
template <class Cfg, bool kKMajor, int kOuterDim>
struct SmemTile {
  static constexpr int kRows = kKMajor ? kOuterDim : Cfg::BK;  // [outer][BK] or [BK][outer]
  static constexpr int kCols = kKMajor ? Cfg::BK : kOuterDim;
  static constexpr int kLd = kCols + 8;
  static constexpr int kElems = kRows * kLd;
};

template <class T, class Cfg, Form F>
struct Layout {
  static constexpr bool kAKMajor = F != Form::kOuter;   // A [.., K] vs Aᵀ stored [K, M]
  static constexpr bool kBKMajor = F == Form::kRowsBt;  // B [N, K] vs [K, N]
  using TileA = SmemTile<Cfg, kAKMajor, Cfg::BM>;
  using TileB = SmemTile<Cfg, kBKMajor, Cfg::BN>;
  static constexpr int kStageElems = TileA::kElems + TileB::kElems;
  static constexpr int kPipeBytes = Cfg::kStages * kStageElems * static_cast<int>(sizeof(T));
  // The per-group tile prefix follows the pipeline buffers.
  static int smem_bytes(int num_groups) { return kPipeBytes + (num_groups + 1) * 4; }
};

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; `bytes` 0 zero-fills the destination without reading `src`.
__device__ __forceinline__ void cp_async16(std::uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const std::uint32_t (&a)[4],
                                          std::uint32_t b0, std::uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <class T>
__device__ __forceinline__ std::uint32_t pack2(float x, float y) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<const std::uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<const std::uint32_t*>(&v);
  }
}
template <class T>
__device__ __forceinline__ float2 unpack2(std::uint32_t u) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&u));
  }
}

// The varying-M forms' fused epilogue on a pair of columns: + bias (a pair of T, or null), then
// relu when asked, then zero where the mask pair (or null) is not positive: relu's backward,
// given relu's output; once, in f32, before the one rounding to T.
template <class T>
__device__ __forceinline__ void epilogue_bias_relu(float& x, float& y, const T* bias, int relu,
                                                   const T* mask) {
  if (bias) {
    const float2 b = unpack2<T>(*reinterpret_cast<const std::uint32_t*>(bias));
    x += b.x;
    y += b.y;
  }
  if (relu) {
    x = fmaxf(x, 0.0f);
    y = fmaxf(y, 0.0f);
  }
  if (mask) {
    const float2 m = unpack2<T>(*reinterpret_cast<const std::uint32_t*>(mask));
    x = m.x > 0.0f ? x : 0.0f;
    y = m.y > 0.0f ? y : 0.0f;
  }
}

// Copies a kRows x kCols tile (row stride ld_g elements) into shared memory (row stride
// Tile::kLd), zero-filling rows >= rows_valid and columns >= cols_valid. cols_valid is a multiple
// of 8, so every 16-byte chunk is wholly in or wholly out. `safe` is any readable address.
template <class T, class Tile, int kThreads>
__device__ __forceinline__ void load_tile(T* s, const T* g, index_t ld_g, int rows_valid,
                                          int cols_valid, const T* safe) {
  constexpr int kChunksPerRow = Tile::kCols / 8;
  constexpr int kChunks = Tile::kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile chunks must divide among the threads");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int idx = i * kThreads + static_cast<int>(threadIdx.x);
    const int r = idx / kChunksPerRow, col = (idx % kChunksPerRow) * 8;
    const bool ok = r < rows_valid && col < cols_valid;
    cp_async16(smem_u32(s + r * Tile::kLd + col), ok ? g + offset_of(r, ld_g) + col : safe,
               ok ? 16 : 0);
  }
}

// Exclusive prefix of each group's tile count into tile_start[0..E] (tile_start[E] = total).
template <class Cfg, class T, Form F>
__device__ void tile_prefix(const Params<T, F>& p, int* tile_start) {
  constexpr int kWarps = Cfg::kThreads / 32;
  __shared__ int warp_sums[kWarps];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int E = p.num_groups;
  const int tiles_n = (p.n + Cfg::BN - 1) / Cfg::BN;
  const int tiles_mn = ((p.m + Cfg::BM - 1) / Cfg::BM) * tiles_n;
  auto count = [&](int e) -> int {
    index_t lo = p.offsets[e], hi = p.offsets[e + 1];
    lo = lo < 0 ? 0 : lo > p.rows ? p.rows : lo;
    hi = hi < lo ? lo : hi > p.rows ? p.rows : hi;
    if constexpr (F == Form::kOuter) {
      return (hi > lo || p.beta == 0.0f) ? tiles_mn : 0;  // an empty group still zeroes C[e]
    } else {
      return static_cast<int>((hi - lo + Cfg::BM - 1) / Cfg::BM) * tiles_n;
    }
  };
  const int per = (E + Cfg::kThreads - 1) / Cfg::kThreads;
  const int beg = tid * per, end = beg + per < E ? beg + per : E;
  int local = 0;
  for (int e = beg; e < end; ++e) local += count(e);
  int incl = local;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += v;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  int run = incl - local;
  for (int w = 0; w < warp; ++w) run += warp_sums[w];
  for (int e = beg; e < end; ++e) {
    tile_start[e] = run;
    run += count(e);
  }
  if (tid == Cfg::kThreads - 1) tile_start[E] = run;
  __syncthreads();
}

template <class T, class Cfg, Form F>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    grouped_gemm_kernel(const Params<T, F> p) {
  using L = Layout<T, Cfg, F>;
  using TileA = typename L::TileA;
  using TileB = typename L::TileB;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, kStages = Cfg::kStages;
  constexpr int kMi = Cfg::kMi, kNi = Cfg::kNi;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  int* tile_start = reinterpret_cast<int*>(smem_raw + L::kPipeBytes);

  tile_prefix<Cfg>(p, tile_start);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m0 = (warp / Cfg::WN) * Cfg::kWarpM, warp_n0 = (warp % Cfg::WN) * Cfg::kWarpN;
  const int total = tile_start[p.num_groups];
  int e = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    while (tile_start[e + 1] <= t) ++e;  // tiles are visited in increasing order
    index_t lo = p.offsets[e], hi = p.offsets[e + 1];
    lo = lo < 0 ? 0 : lo > p.rows ? p.rows : lo;
    hi = hi < lo ? lo : hi > p.rows ? p.rows : hi;
    const int rows_e = static_cast<int>(hi - lo);
    const int local = t - tile_start[e];
    const int tiles_m = F == Form::kOuter ? (p.m + BM - 1) / BM : (rows_e + BM - 1) / BM;
    const int m0 = (local % tiles_m) * BM, n0 = (local / tiles_m) * BN;

    // This tile's operands: origin, row stride, pointer step per k-tile, and the bound of the
    // dimension that does not move with k (rows of A / columns of B).
    const T *ga, *gb;
    index_t lda, ldb, step_a, step_b;
    int a_fixed, b_fixed, kdim;
    if constexpr (F == Form::kOuter) {
      kdim = rows_e;
      ga = p.a + offset_of(lo, p.m) + m0;  // Aᵀ tile stored [BK][BM]
      lda = p.m;
      step_a = offset_of(BK, p.m);
      a_fixed = p.m - m0;
      gb = p.b + offset_of(lo, p.n) + n0;  // [BK][BN]
      ldb = p.n;
      step_b = offset_of(BK, p.n);
      b_fixed = p.n - n0;
    } else {
      kdim = p.k;
      ga = p.a + offset_of(lo + m0, p.k);  // [BM][BK]
      lda = p.k;
      step_a = BK;
      a_fixed = rows_e - m0;
      if constexpr (F == Form::kRowsBt) {
        gb = p.b + offset_of(e, offset_of(p.n, p.k)) + offset_of(n0, p.k);  // [BN][BK]
        ldb = p.k;
        step_b = BK;
      } else {
        gb = p.b + offset_of(e, offset_of(p.k, p.n)) + n0;  // [BK][BN]
        ldb = p.n;
        step_b = offset_of(BK, p.n);
      }
      b_fixed = p.n - n0;
    }
    const int ktiles = (kdim + BK - 1) / BK;

    auto load_stage = [&](int kt) {
      T* sa = smem + (kt % kStages) * L::kStageElems;
      T* sb = sa + TileA::kElems;
      const int krem = kdim - kt * BK;
      if constexpr (L::kAKMajor)
        load_tile<T, TileA, Cfg::kThreads>(sa, ga + kt * step_a, lda, a_fixed, krem, p.a);
      else
        load_tile<T, TileA, Cfg::kThreads>(sa, ga + kt * step_a, lda, krem, a_fixed, p.a);
      if constexpr (L::kBKMajor)
        load_tile<T, TileB, Cfg::kThreads>(sb, gb + kt * step_b, ldb, b_fixed, krem, p.b);
      else
        load_tile<T, TileB, Cfg::kThreads>(sb, gb + kt * step_b, ldb, krem, b_fixed, p.b);
    };

    float acc[kMi][kNi][4];
#pragma unroll
    for (int i = 0; i < kMi; ++i)
#pragma unroll
      for (int j = 0; j < kNi; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

          // 1. Prologue: kStages - 1 k-tiles in flight (empty groups keep the count uniform).
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < ktiles) load_stage(s);
      cp_async_commit();
    }
    // 2. Main loop: wait for k-tile kt, refill the slot freed by kt - 1, multiply kt.
    for (int kt = 0; kt < ktiles; ++kt) {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      if (kt + kStages - 1 < ktiles) load_stage(kt + kStages - 1);
      cp_async_commit();
      const T* sa = smem + (kt % kStages) * L::kStageElems;
      const T* sb = sa + TileA::kElems;
      const std::uint32_t sa_u = smem_u32(sa), sb_u = smem_u32(sb);
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        std::uint32_t af[kMi][4], bf[kNi][2];
        const int mat = lane / 8, j = lane % 8;
#pragma unroll
        for (int i = 0; i < kMi; ++i) {
          const int mb = warp_m0 + i * 16;
          if constexpr (L::kAKMajor) {
            const int row = mb + lane % 16, col = kk + (lane / 16) * 8;
            ldmatrix_x4(af[i], sa_u + (row * TileA::kLd + col) * 2);
          } else {
            const int krow = kk + j + (mat / 2) * 8, col = mb + (mat % 2) * 8;
            ldmatrix_x4_trans(af[i], sa_u + (krow * TileA::kLd + col) * 2);
          }
        }
#pragma unroll
        for (int q = 0; q < kNi / 2; ++q) {
          const int nb = warp_n0 + q * 16;
          std::uint32_t r[4];
          if constexpr (L::kBKMajor) {
            const int row = nb + j + (mat / 2) * 8, col = kk + (mat % 2) * 8;
            ldmatrix_x4(r, sb_u + (row * TileB::kLd + col) * 2);
          } else {
            const int krow = kk + j + (mat % 2) * 8, col = nb + (mat / 2) * 8;
            ldmatrix_x4_trans(r, sb_u + (krow * TileB::kLd + col) * 2);
          }
          bf[2 * q][0] = r[0];
          bf[2 * q][1] = r[1];
          bf[2 * q + 1][0] = r[2];
          bf[2 * q + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < kMi; ++i)
#pragma unroll
          for (int jn = 0; jn < kNi; ++jn) mma_16816<T>(acc[i][jn], af[i], bf[jn][0], bf[jn][1]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the buffers before the next tile refills them

    // 3. Epilogue: round to T and store straight from the accumulators (pairs of columns).
    T* gc;
    int rows_valid;
    if constexpr (F == Form::kOuter) {
      gc = p.c + offset_of(e, offset_of(p.m, p.n)) + offset_of(m0, p.n) + n0;
      rows_valid = p.m - m0;
    } else {
      gc = p.c + offset_of(lo + m0, p.n) + n0;
      rows_valid = rows_e - m0;
    }
    const int cols_valid = p.n - n0;
#pragma unroll
    for (int i = 0; i < kMi; ++i)
#pragma unroll
      for (int jn = 0; jn < kNi; ++jn)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp_m0 + i * 16 + lane / 4 + h * 8;
          const int col = warp_n0 + jn * 8 + (lane % 4) * 2;
          if (row < rows_valid && col < cols_valid) {
            std::uint32_t* dst = reinterpret_cast<std::uint32_t*>(gc + offset_of(row, p.n) + col);
            float x = acc[i][jn][2 * h], y = acc[i][jn][2 * h + 1];
            if constexpr (F == Form::kOuter) {
              if (p.beta != 0.0f) {
                const float2 old = unpack2<T>(*dst);
                x += p.beta * old.x;
                y += p.beta * old.y;
              }
            } else {
              epilogue_bias_relu<T>(
                  x, y, p.bias ? p.bias + offset_of(e, p.n) + n0 + col : nullptr, p.relu,
                  p.mask ? p.mask + offset_of(lo + m0 + row, p.n) + n0 + col : nullptr);
            }
            *dst = pack2<T>(x, y);
          }
        }
  }
}

// Launches the persistent kernel: one CTA per resident slot (multiprocessors x CTAs that fit on
// one), each walking the tiles blockIdx.x, blockIdx.x + gridDim.x, ... of all groups.
template <class T, class Cfg, Form F>
void launch(const Params<T, F>& p, cudaStream_t stream) {
  using L = Layout<T, Cfg, F>;
  auto kernel = grouped_gemm_kernel<T, Cfg, F>;
  const int smem = L::smem_bytes(p.num_groups);
  int device = 0, max_smem = 0;
  SY_CUDA_CHECK(cudaGetDevice(&device));
  SY_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  SY_CHECK(smem <= max_smem, "grouped_gemm: ", p.num_groups, " groups need ", smem,
           " bytes of shared memory, the device allows ", max_smem);
  // Resident CTAs per multiprocessor, per device, for the largest dynamic shared memory asked so
  // far (one entry per device; races only recompute the same values).
  static std::atomic<int> cached_smem[64] = {}, cached_blocks[64] = {};
  SY_CHECK(device >= 0 && device < 64, "cuda:", device, " is out of range");
  int blocks = cached_blocks[device].load();
  if (cached_smem[device].load() < smem || blocks == 0) {
    SY_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    SY_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, Cfg::kThreads, smem));
    SY_CHECK(blocks > 0, "grouped_gemm: the kernel does not fit on a multiprocessor");
    cached_blocks[device].store(blocks);
    cached_smem[device].store(smem);
  }
  const int sms = multiprocessor_count();
  // More CTAs than tiles only adds idle ones: bound the tiles from the host-side sizes.
  const index_t tiles_n = (p.n + Cfg::BN - 1) / Cfg::BN;
  const index_t bound = F == Form::kOuter
                            ? index_t{p.num_groups} * ((p.m + Cfg::BM - 1) / Cfg::BM) * tiles_n
                            : (p.rows / Cfg::BM + p.num_groups) * tiles_n;
  const index_t grid = std::min<index_t>(index_t{sms} * blocks, std::max<index_t>(bound, 1));
  grouped_gemm_kernel<T, Cfg, F><<<static_cast<unsigned>(grid), Cfg::kThreads, smem, stream>>>(p);
  SY_CUDA_CHECK_LAUNCH();
}

// Host checks shared by both forms: sizes that fit the kernel's 32-bit tile arithmetic, 16-byte
// rows and aligned bases for the 16-byte copies.
inline void check_alignment(const void* a, const void* b, const void* c, const char* what) {
  const auto misaligned = [](const void* q) { return reinterpret_cast<std::uintptr_t>(q) % 16; };
  SY_CHECK(!misaligned(a) && !misaligned(b) && !misaligned(c), what,
           ": operands must start on 16-byte boundaries");
}

// The default tile shape.
using DefaultConfig = TileConfig<128, 128, 64, 3, 2, 4, 2>;

// Which kernel run_varying_m / run_varying_k use: kAuto takes the sm_90a wgmma kernel where it is
// available (compute capability 9.0, sm_90a build, the groups' tile prefix fits in shared memory),
// else mma.sync; the others force one (kSm90 falls back to mma.sync where unavailable).
enum class Kernel { kAuto, kMma, kSm90 };

}  // namespace switchyard::grouped_gemm_detail

#include "experts/grouped_gemm_sm90.cuh"

namespace switchyard::grouped_gemm_detail {

// Runs f(Sm90Cfg{}) and returns true when the sm_90a kernel can run here (compute capability
// 9.0, sm_90a build, the groups' tile prefix fits in shared memory); Sm90Cfg void chooses by the
// GEMM's arithmetic intensity (flops per byte of A, B and C, with every operand read once):
// below kMemoryBoundIntensity, k-tiles 32 deep (more of them in flight: fine-grained fc1 555 vs
// 515 TFLOPS, dW1 557 vs 531, sonic-fine fc1 530 vs 501), else 64 deep (sonic-coarse fc1 676 vs
// 411, deepseek fc2 653 vs 563), on an H100 (bench/grouped_gemm_bench.cu).
constexpr double kMemoryBoundIntensity = 450;
template <class Sm90Cfg, class F>
bool with_sm90_config(double flops, double bytes, index_t num_groups, F&& f) {
  if (!sm90_available()) return false;
  if constexpr (std::is_void_v<Sm90Cfg>) {
    if (flops < kMemoryBoundIntensity * bytes && sm90_fits<Sm90ShallowConfig>(num_groups)) {
      f(Sm90ShallowConfig{});
      return true;
    }
    return with_sm90_config<Sm90DefaultConfig>(flops, bytes, num_groups, f);
  } else {
    if (!sm90_fits<Sm90Cfg>(num_groups)) return false;
    f(Sm90Cfg{});
    return true;
  }
}

template <class T, class Cfg = DefaultConfig, class Sm90Cfg = void>
void run_varying_m(const T* a, const T* b, bool trans_b, T* c, const index_t* offsets,
                   index_t num_groups, index_t rows, index_t n, index_t k, cudaStream_t stream,
                   Kernel kernel = Kernel::kAuto, const T* bias = nullptr, bool relu = false,
                   const T* mask = nullptr) {
  SY_CHECK(num_groups >= 1 && num_groups < (1 << 20), "grouped_gemm: ", num_groups,
           " groups, expected 1 to 2^20");
  SY_CHECK(n % 8 == 0 && k % 8 == 0, "grouped_gemm: N=", n, " and K=", k,
           " must be multiples of 8 (16-byte rows)");
  SY_CHECK(
      n < (index_t{1} << 30) && k < (index_t{1} << 30) && rows >= 0 && rows < (index_t{1} << 31),
      "grouped_gemm: N=", n, ", K=", k, ", ", rows, " rows exceed the kernel's 32-bit sizes");
  SY_CHECK((rows / Cfg::BM + num_groups) * ((n + Cfg::BN - 1) / Cfg::BN) < (index_t{1} << 31),
           "grouped_gemm: ", rows, " rows x N=", n, " exceed 2^31 tiles");
  if (rows == 0 || n == 0) return;
  check_alignment(a, b, c, "grouped_gemm");
  check_alignment(bias ? bias : c, mask ? mask : c, c, "grouped_gemm (bias, mask)");
  if (kernel != Kernel::kMma && k > 0 &&
      with_sm90_config<Sm90Cfg>(
          2.0 * rows * n * k, 2.0 * (1.0 * rows * k + 1.0 * num_groups * n * k + 1.0 * rows * n),
          num_groups, [&](auto cfg) {
            launch_sm90<T, decltype(cfg)>(a, b, trans_b, c, offsets, num_groups, rows, n, k, stream,
                                          bias, relu, mask);
          }))
    return;
  auto run = [&](auto form) {
    constexpr Form F = decltype(form)::value;
    Params<T, F> p{a,
                   b,
                   c,
                   offsets,
                   static_cast<int>(num_groups),
                   rows,
                   0,
                   static_cast<int>(n),
                   static_cast<int>(k),
                   0.0f};
    p.bias = bias;
    p.relu = relu;
    p.mask = mask;
    launch<T, Cfg, F>(p, stream);
  };
  if (trans_b)
    run(std::integral_constant<Form, Form::kRowsBt>{});
  else
    run(std::integral_constant<Form, Form::kRowsB>{});
}

template <class T, class Cfg = DefaultConfig, class Sm90Cfg = void>
void run_varying_k(const T* a, const T* b, T* c, const index_t* offsets, index_t num_groups,
                   index_t rows, index_t m, index_t n, double beta, cudaStream_t stream,
                   Kernel kernel = Kernel::kAuto) {
  SY_CHECK(num_groups >= 1 && num_groups < (1 << 20), "grouped_gemm: ", num_groups,
           " groups, expected 1 to 2^20");
  SY_CHECK(m % 8 == 0 && n % 8 == 0, "grouped_gemm: M=", m, " and N=", n,
           " must be multiples of 8 (16-byte rows)");
  SY_CHECK(
      m < (index_t{1} << 30) && n < (index_t{1} << 30) && rows >= 0 && rows < (index_t{1} << 31),
      "grouped_gemm: M=", m, ", N=", n, ", ", rows, " rows exceed the kernel's 32-bit sizes");
  SY_CHECK(num_groups * ((m + Cfg::BM - 1) / Cfg::BM) * ((n + Cfg::BN - 1) / Cfg::BN) <
               (index_t{1} << 31),
           "grouped_gemm: ", num_groups, " groups of ", m, " x ", n, " exceed 2^31 tiles");
  SY_CHECK(beta == 0.0 || beta == 1.0, "grouped_gemm: beta must be 0 or 1, got ", beta);
  if (m == 0 || n == 0) return;
  check_alignment(a, b, c, "grouped_gemm");
  if (kernel != Kernel::kMma && rows > 0 &&
      with_sm90_config<Sm90Cfg>(2.0 * rows * m * n,
                                2.0 * (1.0 * rows * m + 1.0 * rows * n + 1.0 * num_groups * m * n),
                                num_groups, [&](auto cfg) {
                                  launch_sm90_outer<T, decltype(cfg)>(a, b, c, offsets, num_groups,
                                                                      rows, m, n, beta, stream);
                                }))
    return;
  Params<T, Form::kOuter> p{a,
                            b,
                            c,
                            offsets,
                            static_cast<int>(num_groups),
                            rows,
                            static_cast<int>(m),
                            static_cast<int>(n),
                            0,
                            static_cast<float>(beta)};
  launch<T, Cfg, Form::kOuter>(p, stream);
}

}  // namespace switchyard::grouped_gemm_detail
