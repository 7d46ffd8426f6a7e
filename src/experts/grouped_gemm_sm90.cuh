// Hopper (sm_90a) grouped GEMM over the packed expert layout, both forms of
// experts/grouped_gemm.h: varying M, C[off[e]:off[e+1], :N] = A[rows of e, :K] · op(B[e]), and
// varying K (weight gradients), C[e] = beta C[e] + A[rows of e, :M]ᵀ · B[rows of e, :N]. Same
// contract as the mma.sync kernel in experts/grouped_gemm_kernels.cuh (which includes this file
// and chooses between the two at run time): persistent CTAs over the tiles of all groups,
// per-group tile counts from the device offsets, no host sync.
//
// One CTA computes a 128 x BN tile with three warpgroups: warpgroup 0 is the producer (one
// thread issues TMA tensor copies of the A and B k-tiles, BK = 64 or 32 deep, swizzled, into a
// ring of shared-memory stages guarded by full/empty mbarriers), warpgroups 1 and 2 are the
// consumers (each 64 rows of the tile: wgmma m64nBNk16 from shared memory, f32 accumulators in
// registers, one wgmma group in flight).
// Varying M: a tile's rows past its group's end (the next group's rows, or zeros past R) are
// loaded and computed but masked at the store; B's columns past N and the k-tail past K are
// zero-filled by the copy engine. B [E, N, K] (trans_b) is K-major in shared memory; B [E, K, N]
// is N-major (64-column boxes) and read through wgmma's transpose bit.
// Varying K: the k dimension is the group's rows, so Aᵀ and B are both M/N-major (64-column
// boxes of [R, M] and [R, N], through both transpose bits); the rows of a group's last k-tile
// that belong to the next group are zeroed in shared memory by the consumers before the MMAs.
// The epilogue stages the tile in shared memory and sends it out asynchronously, so the stores
// drain while the next tile's MMAs run: [64][64] tensor-store boxes (128-byte swizzle) where all
// of a warpgroup's rows are the group's, one bulk copy per valid row where the group ends.
//
// The device code exists only in sm_90a compiles (__CUDA_ARCH_FEAT_SM90_ALL); in other passes
// the kernels are empty, and sm90_available() tells the host whether the code loaded for the
// current device is the sm_90a build. Tensor maps are encoded on the host with
// cuTensorMapEncodeTiled, reached through cudaGetDriverEntryPointByVersion (no -lcuda).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
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

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SY_GG_SM90_DEVICE 1
#endif

namespace switchyard::grouped_gemm_detail {

// BK: the k-tile depth of one pipeline stage, 64 or 32. K-major operand rows are BK * 2 bytes
// and use the swizzle of that width (128 or 64 bytes); M/N-major operands always come in
// [BK][64] boxes with 128-byte rows. Halving BK doubles the stages that fit in the same shared
// memory, so more of them are in flight while the consumers hold two.
// The epilogue writes the tile to shared memory, from where it leaves by asynchronous copies
// (see the kernel's epilogue). (Stores from registers, with a fourth stage in the room of the
// staging tile, measured slower on every bench shape: mixtral fc1 448 vs 651 TFLOPS, deepseek
// fc1 540 vs 683.)
template <int BN_, int BK_, int kStages_>
struct Sm90Config {
  static constexpr int BM = 128, BN = BN_, BK = BK_, kStages = kStages_;
  static constexpr int kThreads = 384;       // producer warpgroup + 2 consumer warpgroups
  static constexpr int kKRowBytes = BK * 2;  // a K-major row, and the swizzle span it uses
  static constexpr int kABytes = BM * BK * 2;
  static constexpr int kBBytes = BN * BK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  // Output staging rows: 16 bytes of padding put a warp's 8 fragment rows in distinct banks.
  static constexpr int kCLd = BN + 8;
  static constexpr int kCOffset = kStages * kStageBytes;
  static constexpr int kCBytes = BM * kCLd * 2;
  // Stages (1024-byte aligned for the 128-byte swizzle), the output staging tile, the bias, then
  // 2 x kStages pipeline mbarriers and one per consumer warpgroup (the loads of C's old values),
  // then the per-group tile prefix; 1024 bytes of slack to align the dynamic shared memory base.
  // The bias slice of the tile's columns, per consumer warpgroup.
  static constexpr int kBiasOffset = kCOffset + kCBytes;
  static constexpr int kBiasBytes = 2 * BN * 2;
  static constexpr int kBarOffset = kBiasOffset + kBiasBytes;
  static constexpr int kPrefixOffset = kBarOffset + (2 * kStages + 2) * 8;
  static int smem_bytes(int num_groups) { return 1024 + kPrefixOffset + (num_groups + 1) * 4; }
  static_assert(BN == 128 || BN == 256, "BN is 128 or 256");
  static_assert(BK == 64 || BK == 32, "BK is 64 or 32");
};

struct Sm90Params {
  void* c;
  const index_t* offsets;
  int num_groups;
  index_t rows;
  int m, n, k;                 // varying M: n, k; varying K (Form::kOuter): m, n
  float beta;                  // varying K: C = beta C + ..., beta 0 or 1
  const void* bias = nullptr;  // varying M: [E, N] of T, added to group e's rows
  int relu = 0;                // varying M: then max(0, .)
  const void* mask = nullptr;  // varying M: [R, N] of T, then 0 where mask <= 0 (relu backward)
};

#if defined(SY_GG_SM90_DEVICE)
namespace sm90 {

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(std::uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(std::uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(std::uint32_t bar, std::uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_load_2d(std::uint32_t dst, const CUtensorMap* map,
                                            std::uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, "
      "%4}], [%2];\n" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(std::uint32_t dst, const CUtensorMap* map,
                                            std::uint32_t bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, "
      "%4, %5}], [%2];\n" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
// Tensor stores from shared memory (bulk-group completion): a [64][64] box of C.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, std::uint32_t src, int c0,
                                             int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(map),
      "r"(src), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, std::uint32_t src, int c0,
                                             int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
          map),
      "r"(src), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Keeps the compiler from moving accumulator reads/writes across wgmma fences and waits.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Shared-memory matrix descriptor with a 128- or 64-byte swizzle: start address, leading byte
// offset (the M/N-major layout's stride between 64-column blocks; unused for K-major), stride
// byte offset (8 rows of the swizzle span).
template <int kSwizzleBytes>
__device__ __forceinline__ std::uint64_t smem_desc(std::uint32_t addr, std::uint32_t lbo) {
  static_assert(kSwizzleBytes == 128 || kSwizzleBytes == 64, "swizzle");
  std::uint64_t d = 0;
  d |= static_cast<std::uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<std::uint64_t>((lbo >> 4) & 0x3FFF) << 16;
  d |= static_cast<std::uint64_t>(8 * kSwizzleBytes >> 4) << 32;
  d |= static_cast<std::uint64_t>(kSwizzleBytes == 128 ? 1 : 2) << 62;
  return d;
}

// The accumulator operands of one wgmma: "+f"(d[b]) .. "+f"(d[b + 63]).
#define SY_WGMMA_ACC8(b)                                                                      \
  "+f"(d[b]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), "+f"(d[b + 4]), "+f"(d[b + 5]), \
      "+f"(d[b + 6]), "+f"(d[b + 7])
#define SY_WGMMA_ACC64(b)                                                               \
  SY_WGMMA_ACC8(b), SY_WGMMA_ACC8(b + 8), SY_WGMMA_ACC8(b + 16), SY_WGMMA_ACC8(b + 24), \
      SY_WGMMA_ACC8(b + 32), SY_WGMMA_ACC8(b + 40), SY_WGMMA_ACC8(b + 48), SY_WGMMA_ACC8(b + 56)
#define SY_WGMMA_REGS_0_63                                           \
  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"           \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
#define SY_WGMMA_REGS_64_127                                                     \
  "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"             \
  "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"             \
  "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111," \
  "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"

// wgmma.mma_async m64nNk16, f32 += TYPE x TYPE (TYPE "bf16" or "f16"), A and B from shared
// memory descriptors; scale_d 0 overwrites the accumulators.
#define SY_WGMMA_M64N128K16(TYPE)                                                          \
  asm volatile(                                                                            \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %67, 0;\n"                                         \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" SY_WGMMA_REGS_0_63 \
      "}, %64, %65, p, 1, 1, %68, %66;\n}\n"                                               \
      : SY_WGMMA_ACC64(0)                                                                  \
      : "l"(da), "l"(db), "n"(kTransB), "r"(scale_d), "n"(kTransA))
#define SY_WGMMA_M64N256K16(TYPE)                                                          \
  asm volatile(                                                                            \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %131, 0;\n"                                        \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " {" SY_WGMMA_REGS_0_63 \
      "," SY_WGMMA_REGS_64_127 "}, %128, %129, p, 1, 1, %132, %130;\n}\n"                  \
      : SY_WGMMA_ACC64(0), SY_WGMMA_ACC64(64)                                              \
      : "l"(da), "l"(db), "n"(kTransB), "r"(scale_d), "n"(kTransA))

template <int BN, int kTransA, int kTransB, class T>
__device__ __forceinline__ void wgmma_tile(float (&d)[BN / 2], std::uint64_t da, std::uint64_t db,
                                           int scale_d) {
  static_assert(BN == 128 || BN == 256, "wgmma_tile: BN is 128 or 256");
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (BN == 128 && kHalf)
    SY_WGMMA_M64N128K16("f16");
  else if constexpr (BN == 128)
    SY_WGMMA_M64N128K16("bf16");
  else if constexpr (kHalf)
    SY_WGMMA_M64N256K16("f16");
  else
    SY_WGMMA_M64N256K16("bf16");
}

#undef SY_WGMMA_M64N256K16
#undef SY_WGMMA_M64N128K16
#undef SY_WGMMA_REGS_64_127
#undef SY_WGMMA_REGS_0_63
#undef SY_WGMMA_ACC64
#undef SY_WGMMA_ACC8

}  // namespace sm90
#endif  // SY_GG_SM90_DEVICE

// Tile counts use tile_prefix (grouped_gemm_kernels.cuh) through this shape description.
template <class Cfg>
struct Sm90PrefixCfg {
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, kThreads = Cfg::kThreads;
};

template <class T, class Cfg, Form F>
__global__ void __launch_bounds__(384, 1)
    grouped_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tma_a,
                             const __grid_constant__ CUtensorMap tma_b,
                             const __grid_constant__ CUtensorMap tma_c,
                             const __grid_constant__ CUtensorMap tma_mask, const Sm90Params p) {
#if defined(SY_GG_SM90_DEVICE)
  using namespace sm90;
  constexpr bool kOuter = F == Form::kOuter, kTransB = F == Form::kRowsBt;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, kStages = Cfg::kStages;
  constexpr int kBox = 64 * BK * 2;  // one [BK][64] box of an M/N-major operand, in bytes
  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw_u = smem_addr(smem_raw);
  const std::uint32_t pad = ((raw_u + 1023) & ~1023u) - raw_u;
  unsigned char* smem = smem_raw + pad;
  const std::uint32_t smem_u = raw_u + pad;
  const std::uint32_t full_bar = smem_u + Cfg::kBarOffset;  // kStages x 8 bytes
  const std::uint32_t empty_bar = full_bar + kStages * 8;   // kStages x 8 bytes
  const std::uint32_t old_bar = empty_bar + kStages * 8;    // 2 x 8 bytes
  int* tile_start = reinterpret_cast<int*>(smem + Cfg::kPrefixOffset);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_bar + 8 * s, 1);   // the producer's expect_tx arrival
      mbar_init(empty_bar + 8 * s, 8);  // one arrival per consumer warp
    }
    mbar_init(old_bar, 1);
    mbar_init(old_bar + 8, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  {
    Params<T, F> pp{nullptr, nullptr, nullptr, p.offsets, p.num_groups,
                    p.rows,  p.m,     p.n,     p.k,       p.beta};
    tile_prefix<Sm90PrefixCfg<Cfg>>(pp, tile_start);  // ends with __syncthreads
  }
  const int total = tile_start[p.num_groups];
  // Tile t (of group e, found by walking e forward: tiles are visited in increasing order):
  // its group's rows [lo, lo + rows_e), output origin (m0, n0) and k-tile count.
  struct TileAt {
    index_t lo;
    int rows_e, m0, n0, ktiles;
  };
  auto tile_at = [&](int t, int& e) {
    while (tile_start[e + 1] <= t) ++e;
    index_t lo = p.offsets[e], hi = p.offsets[e + 1];
    lo = lo < 0 ? 0 : lo > p.rows ? p.rows : lo;
    hi = hi < lo ? lo : hi > p.rows ? p.rows : hi;
    TileAt ta;
    ta.lo = lo;
    ta.rows_e = static_cast<int>(hi - lo);
    const int tiles_m = kOuter ? (p.m + BM - 1) / BM : (ta.rows_e + BM - 1) / BM;
    const int local = t - tile_start[e];
    ta.m0 = (local % tiles_m) * BM;
    ta.n0 = (local / tiles_m) * BN;
    ta.ktiles = ((kOuter ? ta.rows_e : p.k) + BK - 1) / BK;
    return ta;
  };

  if (warp < 4) {
    // Producer warpgroup: one thread issues every copy.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 0 && lane == 0) {
      int stage = 0;
      std::uint32_t phase = 0;
      int e = 0;
      for (int t = blockIdx.x; t < total; t += gridDim.x) {
        const TileAt ta = tile_at(t, e);
        for (int kt = 0; kt < ta.ktiles; ++kt) {
          mbar_wait(empty_bar + 8 * stage, phase ^ 1);
          const std::uint32_t sa = smem_u + stage * Cfg::kStageBytes, sb = sa + Cfg::kABytes;
          const std::uint32_t fb = full_bar + 8 * stage;
          mbar_expect_tx(fb, Cfg::kStageBytes);
          if constexpr (kOuter) {
            // Aᵀ and B k-tiles: rows [lo + kt BK, + BK) of [R, M] and [R, N], 64-column boxes.
            const int r = static_cast<int>(ta.lo) + kt * BK;
#pragma unroll
            for (int j = 0; j < BM / 64; ++j)
              tma_load_2d(sa + j * kBox, &tma_a, fb, ta.m0 + j * 64, r);
#pragma unroll
            for (int j = 0; j < BN / 64; ++j)
              tma_load_2d(sb + j * kBox, &tma_b, fb, ta.n0 + j * 64, r);
          } else {
            tma_load_2d(sa, &tma_a, fb, kt * BK, static_cast<int>(ta.lo) + ta.m0);
            if constexpr (kTransB) {
              tma_load_3d(sb, &tma_b, fb, kt * BK, ta.n0, e);
            } else {
#pragma unroll
              for (int j = 0; j < BN / 64; ++j)
                tma_load_3d(sb + j * kBox, &tma_b, fb, ta.n0 + j * 64, kt * BK, e);
            }
          }
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    // Consumer warpgroups: rows [64 wg, 64 wg + 64) of each tile.
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int wg = warp / 4 - 1, wtid = tid % 128;
    int stage = 0;
    std::uint32_t phase = 0, old_phase = 0;
    int e = 0;
    float acc[BN / 2];
    unsigned char* bias_s = smem + Cfg::kBiasOffset + wg * BN * 2;
    for (int t = blockIdx.x; t < total; t += gridDim.x) {
      const TileAt ta = tile_at(t, e);
      // The tile's bias columns go to shared memory by asynchronous copies, waited for in the
      // epilogue: a plain load and store would hold the warpgroup's first wgmma for the load's
      // latency, and a register to carry the value across the main loop would spill (the
      // kernel is compiled to 168 registers, the launch bound's count, whatever setmaxnreg
      // grants). The previous tile's readers passed its second barrier before this thread got
      // here.
      if (!kOuter && p.bias && wtid < BN / 8) {
        const bool in = ta.n0 + wtid * 8 < p.n;
        const T* src =
            static_cast<const T*>(p.bias) + (in ? offset_of(e, p.n) + ta.n0 + wtid * 8 : 0);
        asm volatile(
            "cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(bias_s + wtid * 16)),
            "l"(src), "r"(in ? 16 : 0)
            : "memory");
        asm volatile("cp.async.commit_group;\n" ::: "memory");
      }
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
      int prev = -1;
      for (int kt = 0; kt < ta.ktiles; ++kt) {
        mbar_wait(full_bar + 8 * stage, phase);
        const std::uint32_t stage_u = smem_u + stage * Cfg::kStageBytes;
        if constexpr (kOuter) {
          // The last k-tile of a group also holds the next group's rows (or the copy engine's
          // zeros past R): zero them, as they would add to this group's sums. Every box of the
          // stage is [BK][64] with 128-byte rows, so a k-row is 128 contiguous bytes whatever
          // the swizzle.
          const int valid = ta.rows_e - kt * BK;
          if (valid < BK) {
            constexpr int kBoxes = (BM + BN) / 64;
            const int chunks = (BK - valid) * 8;  // 16-byte chunks per box
            unsigned char* base = smem + stage * Cfg::kStageBytes + valid * 128;
            for (int i = tid - 128; i < chunks * kBoxes; i += 256)
              *reinterpret_cast<uint4*>(base + (i / chunks) * kBox + (i % chunks) * 16) =
                  make_uint4(0, 0, 0, 0);
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            named_barrier(3, 256);
          }
        }
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          const std::uint32_t sb = stage_u + Cfg::kABytes;
          if constexpr (kOuter) {
            // Aᵀ: this warpgroup's 64 columns of M are box wg, read through the transpose bit.
            const std::uint64_t da = smem_desc<128>(stage_u + wg * kBox + kk * 16 * 128, kBox);
            const std::uint64_t db = smem_desc<128>(sb + kk * 16 * 128, kBox);
            wgmma_tile<BN, 1, 1, T>(acc, da, db, 1);
          } else {
            constexpr int kRow = Cfg::kKRowBytes;
            const std::uint64_t da = smem_desc<kRow>(stage_u + wg * 64 * kRow + kk * 32, 16);
            const std::uint64_t db = kTransB ? smem_desc<kRow>(sb + kk * 32, 16)
                                             : smem_desc<128>(sb + kk * 16 * 128, kBox);
            wgmma_tile<BN, 0, kTransB ? 0 : 1, T>(acc, da, db, 1);
          }
        }
        wgmma_commit();
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
        wgmma_wait<1>();  // the k-tile before this one is done: release its stage
        if (prev >= 0 && lane == 0) mbar_arrive(empty_bar + 8 * prev);
        prev = stage;
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
      if (prev >= 0 && lane == 0) mbar_arrive(empty_bar + 8 * prev);

      // Epilogue (fragment of wgmma m64nN: warp w of the warpgroup holds rows 16w..16w+15,
      // pairs of columns per thread): round to T, mask the rows past the group (past M for
      // kOuter) and the columns past N; kOuter with beta 1 adds C's old values.
      const int cols_valid = p.n - ta.n0;
      int rows_valid;
      T* gc;
      if constexpr (kOuter) {
        rows_valid = p.m - ta.m0 - wg * 64;
        gc = static_cast<T*>(p.c) + offset_of(e, offset_of(p.m, p.n)) +
             offset_of(ta.m0 + wg * 64, p.n) + ta.n0;
      } else {
        rows_valid = ta.rows_e - ta.m0 - wg * 64;
        gc = static_cast<T*>(p.c) + offset_of(ta.lo + ta.m0 + wg * 64, p.n) + ta.n0;
      }
      // Varying M with a mask: the mask's elements at the tile's output positions.
      const T* gm =
          !kOuter && p.mask ? static_cast<const T*>(p.mask) + (gc - static_cast<T*>(p.c)) : nullptr;
      const int r0 = (wtid / 32) * 16 + lane / 4, c0 = (lane % 4) * 2;
      unsigned char* cbuf = smem + Cfg::kCOffset + wg * 64 * Cfg::kCLd * 2;
      if (wtid < 64) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
      if (!kOuter && p.bias && wtid < BN / 8) asm volatile("cp.async.wait_all;\n" ::: "memory");
      named_barrier(1 + wg, 128);  // the previous tile's copies have read the buffer
      // The staging tile leaves by tensor stores, BN / 64 boxes of [64][64] in the 128-byte
      // swizzle, when all of this warpgroup's rows are the group's (varying K: always, as the
      // [E, M, N] map clips at M): a few large copies, where one bulk copy per row (64 per
      // warpgroup and tile) kept the copy engine busy for microseconds per tile on short-K
      // shapes. A tile that ends its group goes row by row from the padded layout, so the next
      // group's rows are not written. C's old values (varying K, beta 1) or the mask's (varying
      // M) come into the staging tile the same way, rather than by each thread's scattered
      // 4-byte loads, which left the tensor cores idle.
      const bool boxes = kOuter || rows_valid >= 64;
      const int row0 = kOuter ? ta.m0 + wg * 64 : static_cast<int>(ta.lo) + ta.m0 + wg * 64;
      const int nboxes = (cols_valid < BN ? cols_valid + 63 : BN) / 64;
      const bool add_old = kOuter && p.beta != 0.0f;
      const bool masked = gm != nullptr;
      if (add_old || masked) {
        const std::uint32_t bar = old_bar + 8 * wg;
        if (wtid == 0) {
          if (boxes) {
            mbar_expect_tx(bar, nboxes * 64 * 128);
            for (int b = 0; b < nboxes; ++b) {
              const std::uint32_t dst = smem_addr(cbuf + b * 64 * 128);
              if constexpr (kOuter)
                tma_load_3d(dst, &tma_c, bar, ta.n0 + b * 64, row0, e);
              else
                tma_load_2d(dst, &tma_mask, bar, ta.n0 + b * 64, row0);
            }
          } else {
            const T* old_src = masked ? gm : gc;
            const int rows = rows_valid < 0 ? 0 : rows_valid;
            const int bytes = (cols_valid < BN ? cols_valid : BN) * 2;
            mbar_expect_tx(bar, rows * bytes);
            for (int r = 0; r < rows; ++r)
              asm volatile(
                  "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], "
                  "%2, [%3];\n" ::"r"(smem_addr(cbuf + r * Cfg::kCLd * 2)),
                  "l"(old_src + offset_of(r, p.n)), "r"(bytes), "r"(bar)
                  : "memory");
          }
        }
        mbar_wait(bar, old_phase);
        old_phase ^= 1;
      }
      // Element (r, c) of the staging tile: padded rows of kCLd, or in the boxes, 16-byte chunk
      // c % 64 / 8 of row r at chunk position (c % 64 / 8) ^ (r % 8), the 128-byte swizzle (the
      // boxes start 1024-byte aligned). A thread's rows r0 and r0 + 8 share r % 8 = lane / 4.
      // One loop per layout, so that the padded one's addresses are constants off one register.
      auto finish = [&](auto slot_at) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            auto* slot = reinterpret_cast<std::uint32_t*>(slot_at(j, h));
            float x = acc[j * 4 + 2 * h], y = acc[j * 4 + 2 * h + 1];
            if (add_old) {  // rows and columns past the valid ones hold stale values, never stored
              const float2 old = unpack2<T>(*slot);
              x += old.x;
              y += old.y;
            }
            if constexpr (!kOuter)
              epilogue_bias_relu<T>(
                  x, y, p.bias ? reinterpret_cast<const T*>(bias_s + (j * 8 + c0) * 2) : nullptr,
                  p.relu, masked ? reinterpret_cast<const T*>(slot) : nullptr);
            *slot = pack2<T>(x, y);
          }
      };
      if (boxes) {
        unsigned char* base = cbuf + r0 * 128 + c0 * 2;
        const int swz = (lane / 4) * 16;
        finish([&](int j, int h) {
          int z = swz;
          asm volatile("" : "+r"(z));  // computed at each store: held in 8 registers, it spilled
          return base + (j / 8) * 64 * 128 + h * 8 * 128 + ((j % 8) * 16 ^ z);
        });
      } else {
        unsigned char* base = cbuf + (r0 * Cfg::kCLd + c0) * 2;
        finish([&](int j, int h) { return base + (h * 8 * Cfg::kCLd + j * 8) * 2; });
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      named_barrier(1 + wg, 128);
      if (boxes) {
        if (wtid == 0) {
          for (int b = 0; b < nboxes; ++b) {
            const std::uint32_t src = smem_addr(cbuf + b * 64 * 128);
            if constexpr (kOuter)
              tma_store_3d(&tma_c, src, ta.n0 + b * 64, row0, e);
            else
              tma_store_2d(&tma_c, src, ta.n0 + b * 64, row0);
          }
          asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        }
      } else if (wtid < 64) {
        if (wtid < rows_valid) {
          const int bytes = (cols_valid < BN ? cols_valid : BN) * 2;
          asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(
                           gc + offset_of(wtid, p.n)),
                       "r"(smem_addr(cbuf + wtid * Cfg::kCLd * 2)), "r"(bytes)
                       : "memory");
        }
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      }
    }
    if (wtid < 64) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
#endif  // SY_GG_SM90_DEVICE
}

// Marks the sm_90a build: static shared memory only where the sm_90a code was compiled, which
// the host sees through cudaFuncGetAttributes.
__global__ void grouped_gemm_sm90_probe_kernel(int* out) {
#if defined(SY_GG_SM90_DEVICE)
  __shared__ int s[64];
  s[threadIdx.x % 64] = static_cast<int>(threadIdx.x);
  __syncthreads();
  if (out) out[threadIdx.x] = s[63 - threadIdx.x % 64];
#endif
}

// True when the current device has compute capability 9.0 and runs the sm_90a build of these
// kernels (cached per device; a host query, no sync, fine during graph capture).
inline bool sm90_available() {
  static std::atomic<int> cached[64] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  SY_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= 64) return false;
  int v = cached[device].load();
  if (v == 0) {
    int major = 0, minor = 0;
    SY_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    SY_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    bool ok = major == 9 && minor == 0;
    if (ok) {
      cudaFuncAttributes attr{};
      ok = cudaFuncGetAttributes(&attr, grouped_gemm_sm90_probe_kernel) == cudaSuccess &&
           attr.sharedSizeBytes > 0 && attr.binaryVersion == 90;
      (void)cudaGetLastError();
    }
    v = ok ? 2 : 1;
    cached[device].store(v);
  }
  return v == 2;
}

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    SY_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                   cudaEnableDefault, &q));
    SY_CHECK(q == cudaDriverEntryPointSuccess && f != nullptr,
             "grouped_gemm: cuTensorMapEncodeTiled is not available from the driver");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// Row-major tensor of `rank` dims (dims[0] innermost, elements), strides in bytes of dims 1...
template <class T>
CUtensorMap make_tensor_map(const void* base, int rank, const std::uint64_t* dims,
                            const std::uint64_t* strides, const std::uint32_t* box,
                            int swizzle_bytes = 128) {
  CUtensorMap map;
  const std::uint32_t elem_strides[3] = {1, 1, 1};
  const CUtensorMapDataType dt = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                           : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = tensor_map_encoder()(
      &map, dt, static_cast<cuuint32_t>(rank), const_cast<void*>(base),
      reinterpret_cast<const cuuint64_t*>(dims), reinterpret_cast<const cuuint64_t*>(strides),
      reinterpret_cast<const cuuint32_t*>(box), reinterpret_cast<const cuuint32_t*>(elem_strides),
      CU_TENSOR_MAP_INTERLEAVE_NONE,
      swizzle_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  SY_CHECK(r == CUDA_SUCCESS, "grouped_gemm: cuTensorMapEncodeTiled failed (", static_cast<int>(r),
           ")");
  return map;
}

// Whether the groups' tile prefix fits in shared memory next to the stages of Cfg.
template <class Cfg>
bool sm90_fits(index_t num_groups) {
  int device = 0, max_smem = 0;
  SY_CUDA_CHECK(cudaGetDevice(&device));
  SY_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return Cfg::smem_bytes(static_cast<int>(num_groups)) <= max_smem;
}

// Launches grouped_gemm_sm90_kernel<T, Cfg, F>: one CTA per multiprocessor, at most one per
// tile (`tiles_bound`, from the host-side sizes).
template <class T, class Cfg, Form F>
void launch_sm90_kernel(const CUtensorMap& map_a, const CUtensorMap& map_b,
                        const CUtensorMap& map_c, const CUtensorMap& map_mask, const Sm90Params& p,
                        index_t tiles_bound, cudaStream_t stream) {
  const int smem = Cfg::smem_bytes(p.num_groups);
  const int sms = multiprocessor_count();  // checks the device index too
  int device = 0;
  SY_CUDA_CHECK(cudaGetDevice(&device));
  auto kernel = grouped_gemm_sm90_kernel<T, Cfg, F>;
  static std::atomic<int> cached_smem[64] = {};  // per device: the largest size raised so far
  if (cached_smem[device].load() < smem) {
    SY_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    cached_smem[device].store(smem);
  }
  const index_t grid = std::min<index_t>(sms, std::max<index_t>(tiles_bound, 1));
  kernel<<<static_cast<unsigned>(grid), Cfg::kThreads, smem, stream>>>(map_a, map_b, map_c,
                                                                       map_mask, p);
  SY_CUDA_CHECK_LAUNCH();
}

// Varying M: c [R, N] rows of group e = a [R, K] rows of e · op(b[e]) (+ bias[e], relu, mask).
template <class T, class Cfg>
void launch_sm90(const T* a, const T* b, bool trans_b, T* c, const index_t* offsets,
                 index_t num_groups, index_t rows, index_t n, index_t k, cudaStream_t stream,
                 const T* bias, bool relu, const T* mask) {
  const std::uint64_t es = sizeof(T);
  const std::uint64_t dims_a[2] = {static_cast<std::uint64_t>(k), static_cast<std::uint64_t>(rows)};
  const std::uint64_t strides_a[1] = {static_cast<std::uint64_t>(k) * es};
  const std::uint32_t box_a[2] = {Cfg::BK, Cfg::BM};
  const CUtensorMap map_a = make_tensor_map<T>(a, 2, dims_a, strides_a, box_a, Cfg::kKRowBytes);
  CUtensorMap map_b;
  if (trans_b) {  // [E, N, K]
    const std::uint64_t dims[3] = {static_cast<std::uint64_t>(k), static_cast<std::uint64_t>(n),
                                   static_cast<std::uint64_t>(num_groups)};
    const std::uint64_t strides[2] = {static_cast<std::uint64_t>(k) * es,
                                      static_cast<std::uint64_t>(n) * k * es};
    const std::uint32_t box[3] = {Cfg::BK, Cfg::BN, 1};
    map_b = make_tensor_map<T>(b, 3, dims, strides, box, Cfg::kKRowBytes);
  } else {  // [E, K, N], 64-column boxes
    const std::uint64_t dims[3] = {static_cast<std::uint64_t>(n), static_cast<std::uint64_t>(k),
                                   static_cast<std::uint64_t>(num_groups)};
    const std::uint64_t strides[2] = {static_cast<std::uint64_t>(n) * es,
                                      static_cast<std::uint64_t>(n) * k * es};
    const std::uint32_t box[3] = {64, Cfg::BK, 1};
    map_b = make_tensor_map<T>(b, 3, dims, strides, box);
  }
  // C and the mask [R, N] in [64][64] boxes, 128-byte swizzle (the epilogue's tensor copies).
  const std::uint64_t dims_c[2] = {static_cast<std::uint64_t>(n), static_cast<std::uint64_t>(rows)};
  const std::uint64_t strides_c[1] = {static_cast<std::uint64_t>(n) * es};
  const std::uint32_t box_c[2] = {64, 64};
  const CUtensorMap map_c = make_tensor_map<T>(c, 2, dims_c, strides_c, box_c);
  const CUtensorMap map_mask = mask ? make_tensor_map<T>(mask, 2, dims_c, strides_c, box_c) : map_c;
  Sm90Params p{
      c,   offsets, static_cast<int>(num_groups), rows, 0, static_cast<int>(n), static_cast<int>(k),
      0.0f};
  p.bias = bias;
  p.relu = relu;
  p.mask = mask;
  const index_t bound = (rows / Cfg::BM + num_groups) * ((n + Cfg::BN - 1) / Cfg::BN);
  if (trans_b)
    launch_sm90_kernel<T, Cfg, Form::kRowsBt>(map_a, map_b, map_c, map_mask, p, bound, stream);
  else
    launch_sm90_kernel<T, Cfg, Form::kRowsB>(map_a, map_b, map_c, map_mask, p, bound, stream);
}

// Varying K: c[e] [M, N] = beta c[e] + (a [R, M] rows of e)ᵀ · (b [R, N] rows of e); rows > 0
// (the tensor maps need a non-empty extent).
template <class T, class Cfg>
void launch_sm90_outer(const T* a, const T* b, T* c, const index_t* offsets, index_t num_groups,
                       index_t rows, index_t m, index_t n, double beta, cudaStream_t stream) {
  const std::uint64_t es = sizeof(T);
  auto rows_map = [&](const T* base, index_t cols) {  // [R, cols], [BK][64] boxes
    const std::uint64_t dims[2] = {static_cast<std::uint64_t>(cols),
                                   static_cast<std::uint64_t>(rows)};
    const std::uint64_t strides[1] = {static_cast<std::uint64_t>(cols) * es};
    const std::uint32_t box[2] = {64, Cfg::BK};
    return make_tensor_map<T>(base, 2, dims, strides, box);
  };
  const Sm90Params p{c,
                     offsets,
                     static_cast<int>(num_groups),
                     rows,
                     static_cast<int>(m),
                     static_cast<int>(n),
                     0,
                     static_cast<float>(beta)};
  const index_t bound = num_groups * ((m + Cfg::BM - 1) / Cfg::BM) * ((n + Cfg::BN - 1) / Cfg::BN);
  // C [E, M, N] in [64][64] boxes, 128-byte swizzle (the epilogue's tensor copies).
  const std::uint64_t dims_c[3] = {static_cast<std::uint64_t>(n), static_cast<std::uint64_t>(m),
                                   static_cast<std::uint64_t>(num_groups)};
  const std::uint64_t strides_c[2] = {static_cast<std::uint64_t>(n) * es,
                                      static_cast<std::uint64_t>(m) * n * es};
  const std::uint32_t box_c[3] = {64, 64, 1};
  const CUtensorMap map_c = make_tensor_map<T>(c, 3, dims_c, strides_c, box_c);
  launch_sm90_kernel<T, Cfg, Form::kOuter>(rows_map(a, m), rows_map(b, n), map_c, map_c, p, bound,
                                           stream);
}

// Memory-bound GEMMs (fine-grained experts) keep more bytes in flight with k-tiles 32 deep;
// compute-bound ones lose to the per-stage overhead there (see with_sm90_config).
using Sm90DefaultConfig = Sm90Config<256, 64, 3>;
using Sm90ShallowConfig = Sm90Config<256, 32, 6>;

}  // namespace switchyard::grouped_gemm_detail
