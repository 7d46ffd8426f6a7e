// Standalone correctness and speed harness for the grouped GEMM kernels (not part of the CMake
// build): checks both forms against a host reference in double and the bench shapes against
// cuBLAS per expert, checks that a captured CUDA graph follows new device offsets, then times
// the mma.sync kernel and (varying M, on an H100 with this sm_90a build) the wgmma/TMA kernel
// next to cuBLAS strided-batched, one cuBLAS GEMM per expert and a dense GEMM of the same size.
// Build and run on a GPU machine from the repository root:
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -I src -I include \
//     bench/grouped_gemm_bench.cu src/core/error.cpp -lcublas -o grouped_gemm_bench
// Options: --only TEXT times the shapes whose name contains TEXT (no correctness sweep);
// --profile TEXT launches the library's choice and cuBLAS strided-batched once on each varying-M
// shape whose name contains TEXT, for ncu (add -lineinfo to the build for its source view).
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "experts/grouped_gemm_kernels.cuh"

using namespace switchyard;
using namespace switchyard::grouped_gemm_detail;

#define CK(x) SY_CUDA_CHECK(x)
#define CB(x)                                         \
  do {                                                \
    cublasStatus_t s_ = (x);                          \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                \
      printf("cublas %d at %d\n", (int)s_, __LINE__); \
      exit(1);                                        \
    }                                                 \
  } while (0)

template <class T>
__global__ void fill_random(T* p, index_t n, unsigned seed, float scale) {
  for (index_t i = blockIdx.x * (index_t)blockDim.x + threadIdx.x; i < n;
       i += (index_t)gridDim.x * blockDim.x) {
    unsigned x = (unsigned)(i * 2654435761u) ^ (seed * 0x9E3779B9u) ^ (unsigned)(i >> 32);
    x ^= x >> 16;
    x *= 0x7feb352d;
    x ^= x >> 15;
    x *= 0x846ca68b;
    x ^= x >> 16;
    float v = ((x & 0xffffff) / float(0x1000000) * 2.f - 1.f) * scale;
    if constexpr (std::is_same_v<T, float>)
      p[i] = v;
    else if constexpr (std::is_same_v<T, __half>)
      p[i] = __float2half(v);
    else
      p[i] = __float2bfloat16(v);
  }
}

template <class T>
float tof(T v) {
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(v);
  else
    return __bfloat162float(v);
}
template <class T>
cudaDataType_t cdt() {
  return std::is_same_v<T, __half> ? CUDA_R_16F : CUDA_R_16BF;
}

template <class T>
T* dalloc(index_t n) {
  T* p;
  CK(cudaMalloc(&p, std::max<index_t>(n, 1) * sizeof(T)));
  return p;
}
template <class T>
void rnd(T* p, index_t n, unsigned seed, float scale = 1.f) {
  fill_random<<<1024, 256>>>(p, n, seed, scale);
  CK(cudaGetLastError());
}
template <class T>
std::vector<float> download(const T* p, index_t n) {
  std::vector<T> h(n);
  CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (index_t i = 0; i < n; ++i) f[i] = tof(h[i]);
  return f;
}
index_t* upload_off(const std::vector<index_t>& off) {
  index_t* d = dalloc<index_t>(off.size());
  CK(cudaMemcpy(d, off.data(), off.size() * 8, cudaMemcpyHostToDevice));
  return d;
}
// Offsets of E groups of `rows` rows each, on the device.
index_t* upload_equal_off(index_t E, index_t rows) {
  std::vector<index_t> off(E + 1);
  for (index_t e = 0; e <= E; ++e) off[e] = e * rows;
  return upload_off(off);
}

struct Err {
  double max_rel = 0, worst_ref = 0;
  long bad = 0;
};
// max |got-ref| / max(|ref|, 1e-2 * max|ref|) over elements, and error normalized by max |ref|
Err compare(const std::vector<float>& got, const std::vector<double>& ref) {
  double mx = 0;
  for (double r : ref) mx = std::max(mx, std::abs(r));
  Err e;
  double mabs = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double d = std::abs(got[i] - ref[i]);
    if (std::isnan(got[i])) d = INFINITY;
    mabs = std::max(mabs, d);
    double rel = d / std::max(std::abs(ref[i]), 0.05 * mx + 1e-30);
    e.max_rel = std::max(e.max_rel, rel);
    if (rel > 2e-2) ++e.bad;
  }
  e.worst_ref = mx > 0 ? mabs / mx : mabs;
  return e;
}

static int g_fail = 0;
static Kernel g_kernel = Kernel::kMma;  // the varying-M kernel the checks run
template <class T, class Cfg, class Sm90Cfg = Sm90DefaultConfig>
void check_rows(const char* name, const std::vector<index_t>& counts, index_t n, index_t k, bool tb,
                bool bias_relu = false) {
  std::vector<index_t> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  const index_t E = counts.size(), R = off[E];
  T *a = dalloc<T>(R * k), *b = dalloc<T>(E * k * n), *c = dalloc<T>(R * n);
  rnd(a, R * k, 1);
  rnd(b, E * k * n, 2);
  CK(cudaMemset(c, 0xff, std::max<index_t>(R * n, 1) * sizeof(T)));  // NaN poison
  T* bias = bias_relu ? dalloc<T>(E * n) : nullptr;
  if (bias) rnd(bias, E * n, 7, 8.f);
  index_t* doff = upload_off(off);
  run_varying_m<T, Cfg, Sm90Cfg>(a, b, tb, c, doff, E, R, n, k, 0, g_kernel, bias, bias_relu);
  CK(cudaDeviceSynchronize());
  auto ha = download(a, R * k), hb = download(b, E * k * n), hc = download(c, R * n);
  const auto hbias = bias ? download(bias, E * n) : decltype(download(bias, 0))();
  std::vector<double> ref(R * n, 0.0);
  for (index_t e = 0; e < E; ++e)
    for (index_t r = off[e]; r < off[e + 1]; ++r)
      for (index_t j = 0; j < n; ++j) {
        double s = 0;
        for (index_t q = 0; q < k; ++q)
          s += (double)ha[r * k + q] * (tb ? hb[e * n * k + j * k + q] : hb[e * k * n + q * n + j]);
        if (bias_relu) s = std::max(0.0, s + (double)hbias[e * n + j]);
        ref[r * n + j] = s;
      }
  Err er = compare(hc, ref);
  bool ok = er.max_rel < 2e-2;
  if (!ok) ++g_fail;
  printf(
      "%-4s %-4s rows %-34s E=%-3ld R=%-6ld N=%-4ld K=%-4ld %s%s max_rel=%.2e "
      "max_err/max_ref=%.2e %s\n",
      std::is_same_v<T, __half> ? "f16" : "bf16", g_kernel == Kernel::kSm90 ? "sm90" : "mma", name,
      (long)E, (long)R, (long)n, (long)k, tb ? "B^T" : "B  ", bias_relu ? " +bias,relu" : "",
      er.max_rel, er.worst_ref, ok ? "OK" : "FAIL");
  cudaFree(bias);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  cudaFree(doff);
}

template <class T, class Cfg, class Sm90Cfg = Sm90DefaultConfig>
void check_outer(const char* name, const std::vector<index_t>& counts, index_t m, index_t n,
                 double beta) {
  std::vector<index_t> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  const index_t E = counts.size(), R = off[E];
  T *a = dalloc<T>(R * m), *b = dalloc<T>(R * n), *c = dalloc<T>(E * m * n);
  rnd(a, R * m, 3);
  rnd(b, R * n, 4);
  if (beta != 0)
    rnd(c, E * m * n, 5, 4.f);
  else
    CK(cudaMemset(c, 0xff, E * m * n * sizeof(T)));
  auto c0 = download(c, E * m * n);
  index_t* doff = upload_off(off);
  run_varying_k<T, Cfg, Sm90Cfg>(a, b, c, doff, E, R, m, n, beta, 0, g_kernel);
  CK(cudaDeviceSynchronize());
  auto ha = download(a, R * m), hb = download(b, R * n), hc = download(c, E * m * n);
  std::vector<double> ref(E * m * n, 0.0);
  for (index_t e = 0; e < E; ++e)
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) {
        double s = beta != 0 ? c0[e * m * n + i * n + j] : 0.0;
        for (index_t r = off[e]; r < off[e + 1]; ++r) s += (double)ha[r * m + i] * hb[r * n + j];
        ref[e * m * n + i * n + j] = s;
      }
  Err er = compare(hc, ref);
  bool ok = er.max_rel < 2e-2;
  if (!ok) ++g_fail;
  printf(
      "%-4s %-4s outer %-33s E=%-3ld R=%-6ld M=%-4ld N=%-4ld beta=%g max_rel=%.2e "
      "max_err/max_ref=%.2e %s\n",
      std::is_same_v<T, __half> ? "f16" : "bf16", g_kernel == Kernel::kSm90 ? "sm90" : "mma", name,
      (long)E, (long)R, (long)m, (long)n, beta, er.max_rel, er.worst_ref, ok ? "OK" : "FAIL");
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  cudaFree(doff);
}

template <class T, class Cfg, class Sm90Cfg>
void correctness_rows() {
  check_rows<T, Cfg, Sm90Cfg>("mixed 0,1,127,200,0,300", {0, 1, 127, 200, 0, 300}, 136, 264, false);
  check_rows<T, Cfg, Sm90Cfg>("mixed 0,1,127,200,0,300", {0, 1, 127, 200, 0, 300}, 136, 264, true);
  check_rows<T, Cfg, Sm90Cfg>("K=40 N=8", {5, 129, 0, 64}, 8, 40, true);
  check_rows<T, Cfg, Sm90Cfg>("K=40 N=8", {5, 129, 0, 64}, 8, 40, false);
  check_rows<T, Cfg, Sm90Cfg>("K=8 N=264", {5, 129, 0, 64}, 264, 8, false);
  check_rows<T, Cfg, Sm90Cfg>("K=8 N=264", {5, 129, 0, 64}, 264, 8, true);
  check_rows<T, Cfg, Sm90Cfg>("all rows in one expert", {0, 0, 777, 0}, 256, 128, false);
  check_rows<T, Cfg, Sm90Cfg>("all rows in one expert", {0, 0, 777, 0}, 256, 128, true);
  check_rows<T, Cfg, Sm90Cfg>("all rows in the last expert", {0, 0, 0, 300}, 392, 200, true);
  check_rows<T, Cfg, Sm90Cfg>("K=0", {3, 4}, 16, 0, false);
  check_rows<T, Cfg, Sm90Cfg>("one row", {1}, 520, 72, false);
  check_rows<T, Cfg, Sm90Cfg>("many experts",
                              std::vector<index_t>{7, 0, 1, 33, 128, 129, 255, 256, 3, 0, 64, 17},
                              392, 520, true);
  check_rows<T, Cfg, Sm90Cfg>("many experts",
                              std::vector<index_t>{7, 0, 1, 33, 128, 129, 255, 256, 3, 0, 64, 17},
                              392, 520, false);
  check_rows<T, Cfg, Sm90Cfg>("N=520 K=1000", {100, 0, 383, 129}, 520, 1000, false);
  check_rows<T, Cfg, Sm90Cfg>("N=520 K=1000", {100, 0, 383, 129}, 520, 1000, true);
  check_rows<T, Cfg, Sm90Cfg>("mixed", {0, 1, 127, 200, 0, 300}, 136, 264, false, true);
  check_rows<T, Cfg, Sm90Cfg>("mixed", {0, 1, 127, 200, 0, 300}, 392, 520, true, true);
  check_rows<T, Cfg, Sm90Cfg>("long K", {100, 0, 383, 129}, 264, 4104, true, true);
}

template <class T, class Cfg, class Sm90Cfg>
void correctness_outer() {
  check_outer<T, Cfg, Sm90Cfg>("mixed 0,1,127,200,0,300", {0, 1, 127, 200, 0, 300}, 136, 264, 0.0);
  check_outer<T, Cfg, Sm90Cfg>("mixed 0,1,127,200,0,300", {0, 1, 127, 200, 0, 300}, 136, 264, 1.0);
  check_outer<T, Cfg, Sm90Cfg>("all rows in one", {0, 555, 0}, 8, 136, 0.0);
  check_outer<T, Cfg, Sm90Cfg>("all rows in one", {0, 555, 0}, 264, 40, 1.0);
  check_outer<T, Cfg, Sm90Cfg>("all rows in the last", {0, 0, 300}, 392, 520, 0.0);
  check_outer<T, Cfg, Sm90Cfg>("no rows", {0, 0}, 64, 64, 0.0);
  check_outer<T, Cfg, Sm90Cfg>("one row", {1}, 128, 256, 1.0);
  check_outer<T, Cfg, Sm90Cfg>("many experts",
                               std::vector<index_t>{7, 0, 1, 33, 128, 129, 255, 256, 3, 0, 64, 17},
                               392, 520, 0.0);
  check_outer<T, Cfg, Sm90Cfg>("many experts",
                               std::vector<index_t>{7, 0, 1, 33, 128, 129, 255, 256, 3, 0, 64, 17},
                               256, 768, 1.0);
  check_outer<T, Cfg, Sm90Cfg>("long groups", {1000, 63, 2049}, 200, 136, 1.0);
}

template <class T, class Cfg>
void correctness() {
  check_rows<T, Cfg>("mixed 0,1,127,200,0,300", {0, 1, 127, 200, 0, 300}, 136, 264, false);
  check_rows<T, Cfg>("mixed 0,1,127,200,0,300", {0, 1, 127, 200, 0, 300}, 136, 264, true);
  check_rows<T, Cfg>("K=40 N=8", {5, 129, 0, 64}, 8, 40, true);
  check_rows<T, Cfg>("K=8 N=264", {5, 129, 0, 64}, 264, 8, false);
  check_rows<T, Cfg>("all rows in one expert", {0, 0, 777, 0}, 256, 128, false);
  check_rows<T, Cfg>("all rows in one expert", {0, 0, 777, 0}, 256, 128, true);
  check_rows<T, Cfg>("K=0", {3, 4}, 16, 0, false);
  check_rows<T, Cfg>("mixed", {0, 1, 127, 200, 0, 300}, 136, 264, true, true);
  check_rows<T, Cfg>("many experts",
                     std::vector<index_t>{7, 0, 1, 33, 128, 129, 255, 256, 3, 0, 64, 17}, 392, 520,
                     true);
  check_rows<T, Cfg>("many experts",
                     std::vector<index_t>{7, 0, 1, 33, 128, 129, 255, 256, 3, 0, 64, 17}, 392, 520,
                     false);
  check_outer<T, Cfg>("mixed 0,1,127,200,0,300", {0, 1, 127, 200, 0, 300}, 136, 264, 0.0);
  check_outer<T, Cfg>("mixed 0,1,127,200,0,300", {0, 1, 127, 200, 0, 300}, 136, 264, 1.0);
  check_outer<T, Cfg>("all rows in one", {0, 555, 0}, 8, 136, 0.0);
  check_outer<T, Cfg>("all rows in one", {0, 555, 0}, 264, 40, 1.0);
  check_outer<T, Cfg>("no rows", {0, 0}, 64, 64, 0.0);
  check_outer<T, Cfg>("no rows", {0, 0}, 64, 64, 1.0);
}

// ---------------------------------------------------------------- timing
template <class F>
float time_ms(F&& f, int iters = 20) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> t;
  for (int i = 0; i < iters; ++i) {
    CK(cudaEventRecord(e0));
    f();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

cublasHandle_t g_h;
// row-major C[m,n] (f32 or T) = op(A) op(B)
template <class T>
void cublas_rm(bool ta, bool tb, int m, int n, int k, const T* a, int lda, const T* b, int ldb,
               void* c, cudaDataType_t ct, int ldc, float beta = 0.f) {
  float alpha = 1.f;
  CB(cublasGemmEx(g_h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k,
                  &alpha, b, cdt<T>(), ldb, a, cdt<T>(), lda, &beta, c, ct, ldc, CUBLAS_COMPUTE_32F,
                  CUBLAS_GEMM_DEFAULT));
}
template <class T>
void cublas_sb(bool ta, bool tb, int m, int n, int k, const T* a, int lda, long long sa, const T* b,
               int ldb, long long sb, T* c, int ldc, long long sc, int batch) {
  float alpha = 1.f, beta = 0.f;
  CB(cublasGemmStridedBatchedEx(g_h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                n, m, k, &alpha, b, cdt<T>(), ldb, sb, a, cdt<T>(), lda, sa, &beta,
                                c, cdt<T>(), ldc, sc, batch, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
}

using C128x128x32 = TileConfig<128, 128, 32, 4, 2, 4, 2>;
using C128x128x64 = TileConfig<128, 128, 64, 3, 2, 4, 2>;
using C128x256x64 = TileConfig<128, 256, 64, 3, 2, 8, 1>;  // 16 warps
using C256x128x64 = TileConfig<256, 128, 64, 3, 4, 4, 1>;  // 16 warps

struct Shape {
  const char* name;
  int E, rows;
  int K, N;
  bool tb;
  bool outer;
  int M;
};

template <class Cfg, class Sm90Cfg = Sm90DefaultConfig>
float run_ours(const Shape& s, const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* c,
               const index_t* off, index_t R, Kernel kern) {
  return time_ms([&] {
    if (s.outer)
      run_varying_k<__nv_bfloat16, Cfg, Sm90Cfg>(a, b, c, off, s.E, R, s.M, s.N, 0.0, 0, kern);
    else
      run_varying_m<__nv_bfloat16, Cfg, Sm90Cfg>(a, b, s.tb, c, off, s.E, R, s.N, s.K, 0, kern);
  });
}
using Sm90N256 = Sm90Config<256, 64, 3>;     // 64 deep, 3 stages (compute-bound GEMMs)
using Sm90N256K32 = Sm90Config<256, 32, 6>;  // 32 deep, 6 stages (memory-bound GEMMs)
using Sm90N128 = Sm90Config<128, 64, 5>;

void bench(const Shape& s) {
  using T = __nv_bfloat16;
  const index_t E = s.E, R = (index_t)s.E * s.rows;
  index_t* doff = upload_equal_off(E, s.rows);
  double flops;
  T *a, *b, *c;
  float* cref;
  index_t na, nb, nc;
  if (!s.outer) {
    na = R * s.K;
    nb = E * (index_t)s.K * s.N;
    nc = R * s.N;
    flops = 2.0 * R * s.K * s.N;
  } else {
    na = R * s.M;
    nb = R * s.N;
    nc = E * (index_t)s.M * s.N;
    flops = 2.0 * R * s.M * s.N;
  }
  a = dalloc<T>(na);
  b = dalloc<T>(nb);
  c = dalloc<T>(nc);
  cref = dalloc<float>(nc);
  rnd(a, na, 11);
  rnd(b, nb, 12);
  // 1. check against cuBLAS per expert (f32 output) before timing: the default mma.sync
  // configuration and, for varying M, both sm_90a configurations
  for (index_t e = 0; e < E; ++e) {
    if (!s.outer)
      cublas_rm<T>(false, s.tb, s.rows, s.N, s.K, a + e * s.rows * (index_t)s.K, s.K,
                   b + e * (index_t)s.K * s.N, s.tb ? s.K : s.N, cref + e * s.rows * (index_t)s.N,
                   CUDA_R_32F, s.N);
    else
      cublas_rm<T>(true, false, s.M, s.N, s.rows, a + e * s.rows * (index_t)s.M, s.M,
                   b + e * s.rows * (index_t)s.N, s.N, cref + e * (index_t)s.M * s.N, CUDA_R_32F,
                   s.N);
  }
  CK(cudaDeviceSynchronize());
  std::vector<float> hr(nc);
  CK(cudaMemcpy(hr.data(), cref, nc * 4, cudaMemcpyDeviceToHost));
  std::vector<double> hrd(hr.begin(), hr.end());
  Err er;
  for (int v = 0; v < (s.outer ? 2 : 4); ++v) {
    CK(cudaMemset(c, 0xff, nc * sizeof(T)));
    if (s.outer)
      run_varying_k<T>(a, b, c, doff, E, R, s.M, s.N, 0.0, 0,
                       v == 0 ? Kernel::kMma : Kernel::kSm90);
    else if (v == 0)
      run_varying_m<T>(a, b, s.tb, c, doff, E, R, s.N, s.K, 0, Kernel::kMma);
    else if (v == 1)
      run_varying_m<T, DefaultConfig, Sm90N256>(a, b, s.tb, c, doff, E, R, s.N, s.K, 0,
                                                Kernel::kSm90);
    else if (v == 2)
      run_varying_m<T, DefaultConfig, Sm90N256K32>(a, b, s.tb, c, doff, E, R, s.N, s.K, 0,
                                                   Kernel::kSm90);
    else
      run_varying_m<T, DefaultConfig, Sm90N128>(a, b, s.tb, c, doff, E, R, s.N, s.K, 0,
                                                Kernel::kSm90);
    CK(cudaDeviceSynchronize());
    Err ev = compare(download(c, nc), hrd);
    if (ev.max_rel > 2e-2) ++g_fail;
    er.max_rel = std::max(er.max_rel, ev.max_rel);
  }
  // 2. timings
  float t2 = run_ours<C128x128x64>(s, a, b, c, doff, R, Kernel::kMma);
  auto sm90 = [&](auto cfg) {
    using Cfg = decltype(cfg);
    return run_ours<C128x128x64, Cfg>(s, a, b, c, doff, R, Kernel::kSm90);
  };
  float t4 = sm90(Sm90N256{});
  float t5 = sm90(Sm90N256K32{});
  float t6 = sm90(Sm90N128{});
  float t7 = run_ours<DefaultConfig, void>(s, a, b, c, doff, R, Kernel::kAuto);  // as the layer
  float tsb, tdense, tper = NAN;
  // The dense comparison's own output: for varying K it is [R, N], larger than c [E, M, N].
  T* cd = dalloc<T>(s.outer ? R * s.N : nc);
  if (!s.outer) {
    tsb = time_ms([&] {
      cublas_sb<T>(false, s.tb, s.rows, s.N, s.K, a, s.K, (long long)s.rows * s.K, b,
                   s.tb ? s.K : s.N, (long long)s.K * s.N, c, s.N, (long long)s.rows * s.N, E);
    });
    tdense = time_ms([&] {
      cublas_rm<T>(false, s.tb, R, s.N, s.K, a, s.K, b, s.tb ? s.K : s.N, c, cdt<T>(), s.N);
    });
    tper = time_ms([&] {
      for (index_t e = 0; e < E; ++e)
        cublas_rm<T>(false, s.tb, s.rows, s.N, s.K, a + e * s.rows * (index_t)s.K, s.K,
                     b + e * (index_t)s.K * s.N, s.tb ? s.K : s.N, c + e * s.rows * (index_t)s.N,
                     cdt<T>(), s.N);
    });
  } else {
    tsb = time_ms([&] {
      cublas_sb<T>(true, false, s.M, s.N, s.rows, a, s.M, (long long)s.rows * s.M, b, s.N,
                   (long long)s.rows * s.N, c, s.N, (long long)s.M * s.N, E);
    });
    // dense, same flops: [R, M]^T x [R, N] would be split-K; use [E*M... ] as plain R x N x M
    tdense = time_ms(
        [&] { cublas_rm<T>(false, false, R, s.N, s.M, a, s.M, b, s.N, cd, cdt<T>(), s.N); });
  }
  auto tf = [&](float ms) { return flops / (ms * 1e-3) / 1e12; };
  printf("| %-40s | %6.0f | %6.0f | %6.0f | %6.0f | %6.0f | %6.0f | %6.0f | %6.0f | %.1e |\n",
         s.name, tf(t2), tf(t4), tf(t5), tf(t6), tf(t7), tf(tsb), tf(tper), tf(tdense), er.max_rel);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  cudaFree(cref);
  cudaFree(cd);
  cudaFree(doff);
}

// Captures one launch in a CUDA graph, then changes the offsets on the device and replays: the
// result must follow the new offsets (no host-side sizes baked into the graph).
void graph_follows_device_offsets() {
  using T = __nv_bfloat16;
  const index_t E = 4, R = 600, n = 136, k = 264;
  std::vector<index_t> off1{0, 100, 100, 350, 600}, off2{0, 0, 599, 600, 600};
  T *a = dalloc<T>(R * k), *b = dalloc<T>(E * k * n), *c = dalloc<T>(R * n);
  float* cref = dalloc<float>(R * n);
  rnd(a, R * k, 7);
  rnd(b, E * k * n, 8);
  index_t* doff = upload_off(off1);
  cudaStream_t s;
  CK(cudaStreamCreate(&s));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  run_varying_m<T>(a, b, true, c, doff, E, R, n, k, s);  // first call outside capture (attributes)
  CK(cudaStreamSynchronize(s));
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  run_varying_m<T>(a, b, true, c, doff, E, R, n, k, s);
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  double worst = 0;
  for (auto* off : {&off1, &off2}) {
    CK(cudaMemcpy(doff, off->data(), (E + 1) * 8, cudaMemcpyHostToDevice));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaStreamSynchronize(s));
    CB(cublasSetStream(g_h, 0));
    for (index_t e = 0; e < E; ++e) {
      const index_t r0 = (*off)[e], rows = (*off)[e + 1] - r0;
      if (rows)
        cublas_rm<T>(false, true, rows, n, k, a + r0 * k, k, b + e * n * k, k, cref + r0 * n,
                     CUDA_R_32F, n);
    }
    CK(cudaDeviceSynchronize());
    auto hc = download(c, R * n);
    std::vector<float> hr(R * n);
    CK(cudaMemcpy(hr.data(), cref, R * n * 4, cudaMemcpyDeviceToHost));
    worst = std::max(worst, compare(hc, std::vector<double>(hr.begin(), hr.end())).max_rel);
  }
  const bool ok = worst < 2e-2;
  if (!ok) ++g_fail;
  printf("graph capture, replayed on two offset sets: max_rel=%.2e %s\n", worst,
         ok ? "OK" : "FAIL");
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  cudaFree(cref);
  cudaFree(doff);
}

// The bench shapes: varying M (E experts of `rows` rows, K -> N) and varying K (weight gradients).
const std::vector<Shape>& shapes() {
  static const std::vector<Shape> all = {
      {"mixtral fc1 (8 x 2048, 4096 -> 14336) B^T", 8, 2048, 4096, 14336, true, false, 0},
      {"deepseek fc2 (32 x 1024, 2048 -> 7168)", 32, 1024, 2048, 7168, false, false, 0},
      {"deepseek fc1 (32 x 1024, 7168 -> 2048) B^T", 32, 1024, 7168, 2048, true, false, 0},
      {"tutel fc1 (2 x 8192, 2048 -> 2048) B^T", 2, 8192, 2048, 2048, true, false, 0},
      {"sonic-coarse fc1 (64 x 2048, 4096 -> 4096) B^T", 64, 2048, 4096, 4096, true, false, 0},
      {"fine-grained fc1 (128 x 512, 2048 -> 768) B^T", 128, 512, 2048, 768, true, false, 0},
      {"fine-grained dX (128 x 512, 768 -> 2048)", 128, 512, 768, 2048, false, false, 0},
      {"sonic-fine fc2 (128 x 1536, 256 -> 1536)", 128, 1536, 256, 1536, false, false, 0},
      {"sonic-fine fc1 (128 x 1536, 1536 -> 512) B^T", 128, 1536, 1536, 512, true, false, 0},
      {"sonic-fine dX (128 x 1536, 512 -> 1536)", 128, 1536, 512, 1536, false, false, 0},
      {"fine-grained dW1 (128 x 512 rows, M=768, N=2048)", 128, 512, 0, 2048, false, true, 768},
      {"mixtral dW1 (8 x 2048 rows, M=14336, N=4096)", 8, 2048, 0, 4096, false, true, 14336},
      {"deepseek dW2 (32 x 1024 rows, M=2048, N=7168)", 32, 1024, 0, 7168, false, true, 2048},
      {"sonic-fine dW1 (128 x 1536 rows, M=512, N=1536)", 128, 1536, 0, 1536, false, true, 512},
      {"tutel dW1 (2 x 8192 rows, M=2048, N=2048)", 2, 8192, 0, 2048, false, true, 2048},
  };
  return all;
}

// --profile TEXT: for ncu, one launch of the library's choice on each varying-M shape whose name
// contains TEXT, then one cuBLAS strided-batched launch of the same shape.
int profile(const std::string& only) {
  using T = __nv_bfloat16;
  for (const Shape& s : shapes()) {
    if (s.outer || std::string(s.name).find(only) == std::string::npos) continue;
    const index_t E = s.E, R = E * s.rows;
    index_t* doff = upload_equal_off(E, s.rows);
    T *a = dalloc<T>(R * s.K), *b = dalloc<T>(E * (index_t)s.K * s.N), *c = dalloc<T>(R * s.N);
    rnd(a, R * s.K, 1);
    rnd(b, E * (index_t)s.K * s.N, 2);
    run_varying_m<T>(a, b, s.tb, c, doff, E, R, s.N, s.K, 0, Kernel::kAuto);
    cublas_sb<T>(false, s.tb, s.rows, s.N, s.K, a, s.K, (long long)s.rows * s.K, b,
                 s.tb ? s.K : s.N, (long long)s.K * s.N, c, s.N, (long long)s.rows * s.N, E);
    CK(cudaDeviceSynchronize());
    printf("profiled %s\n", s.name);
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
    cudaFree(doff);
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 2 && std::string(argv[1]) == "--profile") {
    CB(cublasCreate(&g_h));
    return profile(argv[2]);
  }
  const std::string only = argc > 2 && std::string(argv[1]) == "--only" ? argv[2] : "";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  CB(cublasCreate(&g_h));
  printf("sm_90a wgmma kernel available here: %s\n", sm90_available() ? "yes" : "no");
  g_kernel = Kernel::kSm90;
  if (only.empty()) {
    correctness_outer<__nv_bfloat16, DefaultConfig, Sm90N256>();
    correctness_outer<__half, DefaultConfig, Sm90N256>();
    correctness_outer<__nv_bfloat16, DefaultConfig, Sm90N256K32>();
    correctness_outer<__half, DefaultConfig, Sm90N256K32>();
    correctness_outer<__nv_bfloat16, DefaultConfig, Sm90N128>();
    correctness_rows<__nv_bfloat16, DefaultConfig, Sm90N256>();
    correctness_rows<__half, DefaultConfig, Sm90N256>();
    correctness_rows<__nv_bfloat16, DefaultConfig, Sm90N256K32>();
    correctness_rows<__half, DefaultConfig, Sm90N256K32>();
    correctness_rows<__nv_bfloat16, DefaultConfig, Sm90N128>();
    g_kernel = Kernel::kMma;
    correctness<__nv_bfloat16, DefaultConfig>();
    correctness<__half, DefaultConfig>();
    correctness<__nv_bfloat16, C256x128x64>();
    graph_follows_device_offsets();
  }
  printf("correctness failures: %d\n", g_fail);
  // error check of a bad shape
  try {
    run_varying_m<__nv_bfloat16>(nullptr, nullptr, false, nullptr, nullptr, 2, 10, 12, 16, 0);
    printf("expected an error for N=12\n");
    ++g_fail;
  } catch (const std::exception& ex) {
    printf("bad shape: %s\n", ex.what());
  }

  {
    using T = __nv_bfloat16;
    index_t n = 8192;
    T *a = dalloc<T>(n * n), *b = dalloc<T>(n * n), *c = dalloc<T>(n * n);
    rnd(a, n * n, 1);
    rnd(b, n * n, 2);
    float ms = time_ms([&] { cublas_rm<T>(false, false, n, n, n, a, n, b, n, c, cdt<T>(), n); });
    printf("dense 8192^3 bf16 cuBLAS: %.0f TFLOPS\n", 2.0 * n * n * n / (ms * 1e-3) / 1e12);
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
  }
  printf(
      "| shape (E x rows, K -> N) | mma 128x128x64 s3 | wgmma 128x256x64 s3 | wgmma 128x256x32 s6 "
      "| wgmma 128x128x64 s5 | library's choice | cuBLAS strided-batched | cuBLAS per expert | "
      "dense same total | max rel err (vs cuBLAS) |\n");
  for (const Shape& s : shapes())
    if (only.empty() || std::string(s.name).find(only) != std::string::npos) bench(s);
  printf("correctness failures: %d\n", g_fail);
  return g_fail ? 1 : 0;
}
