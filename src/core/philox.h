// Philox-4x32-10 and the draws built on it, callable from host code and CUDA kernels, so both
// backends draw the same random numbers (rng.cpp exposes them through switchyard/rng.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "switchyard/index.h"  // SY_HOST_DEVICE

namespace switchyard::philox {

struct Block {
  std::uint32_t v[4];
};

SY_HOST_DEVICE inline Block philox4x32(Block c, std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * c.v[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * c.v[2];
    c = Block{{static_cast<std::uint32_t>(p1 >> 32) ^ c.v[1] ^ k0, static_cast<std::uint32_t>(p1),
               static_cast<std::uint32_t>(p0 >> 32) ^ c.v[3] ^ k1, static_cast<std::uint32_t>(p0)}};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return c;
}

// Counter = (feature, token low, token high, step); key = seed mixed with the stream id.
SY_HOST_DEVICE inline Block draw(std::uint64_t seed, std::uint32_t stream, std::uint64_t step,
                                 std::uint64_t token, std::uint64_t feature) {
  const Block counter{{static_cast<std::uint32_t>(feature), static_cast<std::uint32_t>(token),
                       static_cast<std::uint32_t>(token >> 32),
                       static_cast<std::uint32_t>(step) ^
                           (static_cast<std::uint32_t>(feature >> 32) << 24)}};
  return philox4x32(counter, static_cast<std::uint32_t>(seed),
                    static_cast<std::uint32_t>(seed >> 32) ^ (stream * 0x85EBCA6Bu));
}

// Midpoint of one of 2^32 equal cells: strictly inside (0, 1).
SY_HOST_DEVICE inline double uniform(std::uint64_t seed, std::uint32_t stream, std::uint64_t step,
                                     std::uint64_t token, std::uint64_t feature) {
  return (static_cast<double>(draw(seed, stream, step, token, feature).v[0]) + 0.5) * 0x1p-32;
}

// Box-Muller on the first two outputs, in double; u1 in (0, 1], so log(u1) is finite.
SY_HOST_DEVICE inline double normal(std::uint64_t seed, std::uint32_t stream, std::uint64_t step,
                                    std::uint64_t token, std::uint64_t feature) {
  const Block r = draw(seed, stream, step, token, feature);
  const double u1 = (static_cast<double>(r.v[0]) + 1.0) * 0x1p-32;
  const double u2 = static_cast<double>(r.v[1]) * 0x1p-32;
  return sqrt(-2.0 * log(u1)) * cos(2.0 * 3.14159265358979323846 * u2);
}

}  // namespace switchyard::philox
