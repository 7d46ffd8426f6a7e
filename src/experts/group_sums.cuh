// Per-group column sums over the packed expert layout: out[e, j] += sum over the rows r of group
// e (off[e] <= r < off[e+1]) of m[r, j]. The bias gradients of the FFN experts; the sm_90a
// weight-gradient GEMM computes them from its own operand loads instead (grouped_gemm_sm90.cuh),
// this kernel serves every other path. Sums in f32 (f64 for f64) in a fixed order: deterministic.
#pragma once

#include <cuda_runtime.h>

#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "switchyard/error.h"
#include "switchyard/index.h"

namespace switchyard {

// Block (32, kGroupSumRows) per (32 columns, group): thread (x, y) sums rows y, y + kGroupSumRows,
// ... of its column, then row y = 0 adds the partial sums in order.
constexpr int kGroupSumRows = 16;

template <class T>
__global__ void group_column_sums(const T* __restrict__ m, const index_t* __restrict__ off,
                                  T* __restrict__ out, index_t n) {
  using A = cuda_acc_t<T>;
  __shared__ A part[kGroupSumRows][33];
  const index_t e = blockIdx.y, j = static_cast<index_t>(blockIdx.x) * 32 + threadIdx.x;
  A acc = 0;
  if (j < n)
    for (index_t r = off[e] + threadIdx.y; r < off[e + 1]; r += kGroupSumRows)
      acc += load(m[offset_of(r, n) + j]);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
    A sum = 0;
    for (int y = 0; y < kGroupSumRows; ++y) sum += part[y][threadIdx.x];
    out[offset_of(e, n) + j] = store<T>(load(out[offset_of(e, n) + j]) + sum);
  }
}

// m [R, n], off [E+1] and out [E, n] on the device of `stream`.
template <class T>
void launch_group_column_sums(const T* m, const index_t* off, T* out, index_t num_groups,
                              index_t n, cudaStream_t stream) {
  if (num_groups == 0 || n == 0) return;
  SY_CHECK(num_groups <= 65535, "group_column_sums: at most 65535 groups on CUDA, got ",
           num_groups);
  SY_CHECK((n + 31) / 32 < 2147483647, "group_column_sums: ", n, " columns exceed one grid");
  const dim3 blocks(static_cast<unsigned>((n + 31) / 32), static_cast<unsigned>(num_groups));
  group_column_sums<T><<<blocks, dim3(32, kGroupSumRows), 0, stream>>>(m, off, out, n);
  SY_CUDA_CHECK_LAUNCH();
}

}  // namespace switchyard
