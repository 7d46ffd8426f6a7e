// Random test inputs from the library's counter-based generator: the same values on every
// machine, thread count and backend.
#pragma once

#include <cstdint>
#include <vector>

#include "switchyard/rng.h"

namespace sy_ref {

// n standard-normal values, set `seed`.
inline std::vector<double> randn(std::size_t n, std::uint64_t seed) {
  std::vector<double> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = switchyard::rng_normal(seed, switchyard::RngStream::kData, 0, i, 0);
  return v;
}

}  // namespace sy_ref
