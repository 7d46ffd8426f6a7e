// 64-bit element offsets. All offset arithmetic on tensors goes through these helpers, so that
// buffers with more than 2^31 elements index correctly on every backend.
#pragma once

#include <cstdint>
#include <vector>

// Callable from CUDA kernels too; the header stays plain C++ for other compilers.
#if defined(__CUDACC__)
#define SY_HOST_DEVICE __host__ __device__
#else
#define SY_HOST_DEVICE
#endif

namespace switchyard {

using index_t = std::int64_t;

// Element offset of row `row` in a buffer whose rows are `row_stride` elements apart.
SY_HOST_DEVICE constexpr index_t offset_of(index_t row, index_t row_stride) { return row * row_stride; }

// Element offset of (i, j) with strides (si, sj), and of (i, j, l) with strides (si, sj, sl).
SY_HOST_DEVICE constexpr index_t offset_of(index_t i, index_t si, index_t j, index_t sj) {
  return i * si + j * sj;
}
SY_HOST_DEVICE constexpr index_t offset_of(index_t i, index_t si, index_t j, index_t sj, index_t l, index_t sl) {
  return i * si + j * sj + l * sl;
}

// a * b, throwing switchyard::Error when the product does not fit in int64.
index_t checked_mul(index_t a, index_t b);

// Product of sizes (the element count of a shape), checked for negative sizes and overflow.
index_t checked_numel(const std::vector<index_t>& sizes);

}  // namespace switchyard
