#include "switchyard/rng.h"

#include <cmath>

namespace switchyard {

std::array<std::uint32_t, 4> philox4x32(std::array<std::uint32_t, 4> c,
                                        std::array<std::uint32_t, 2> k) {
  constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * c[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * c[2];
    c = {static_cast<std::uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<std::uint32_t>(p1),
         static_cast<std::uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<std::uint32_t>(p0)};
    k[0] += kWeyl0;
    k[1] += kWeyl1;
  }
  return c;
}

namespace {

// Counter = (feature, token low, token high, step); key = seed mixed with the stream id.
std::array<std::uint32_t, 4> draw(std::uint64_t seed, RngStream stream, std::uint64_t step,
                                  std::uint64_t token, std::uint64_t feature) {
  const std::array<std::uint32_t, 4> counter = {
      static_cast<std::uint32_t>(feature), static_cast<std::uint32_t>(token),
      static_cast<std::uint32_t>(token >> 32),
      static_cast<std::uint32_t>(step) ^ (static_cast<std::uint32_t>(feature >> 32) << 24)};
  const std::array<std::uint32_t, 2> key = {
      static_cast<std::uint32_t>(seed),
      static_cast<std::uint32_t>(seed >> 32) ^ (static_cast<std::uint32_t>(stream) * 0x85EBCA6Bu)};
  return philox4x32(counter, key);
}

// (0, 1]: never 0, so log() in Box-Muller is finite.
double to_unit_open(std::uint32_t x) { return (static_cast<double>(x) + 1.0) * 0x1p-32; }

}  // namespace

double rng_uniform(std::uint64_t seed, RngStream stream, std::uint64_t step, std::uint64_t token,
                   std::uint64_t feature) {
  // Midpoint of one of 2^32 equal cells: strictly inside (0, 1).
  return (static_cast<double>(draw(seed, stream, step, token, feature)[0]) + 0.5) * 0x1p-32;
}

double rng_normal(std::uint64_t seed, RngStream stream, std::uint64_t step, std::uint64_t token,
                  std::uint64_t feature) {
  const auto r = draw(seed, stream, step, token, feature);
  const double u1 = to_unit_open(r[0]);
  const double u2 = static_cast<double>(r[1]) * 0x1p-32;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

}  // namespace switchyard
