#include "switchyard/rng.h"

#include "core/philox.h"

namespace switchyard {

std::array<std::uint32_t, 4> philox4x32(std::array<std::uint32_t, 4> c,
                                        std::array<std::uint32_t, 2> k) {
  const philox::Block r = philox::philox4x32(philox::Block{{c[0], c[1], c[2], c[3]}}, k[0], k[1]);
  return {r.v[0], r.v[1], r.v[2], r.v[3]};
}

double rng_uniform(std::uint64_t seed, RngStream stream, std::uint64_t step, std::uint64_t token,
                   std::uint64_t feature) {
  return philox::uniform(seed, static_cast<std::uint32_t>(stream), step, token, feature);
}

double rng_normal(std::uint64_t seed, RngStream stream, std::uint64_t step, std::uint64_t token,
                  std::uint64_t feature) {
  return philox::normal(seed, static_cast<std::uint32_t>(stream), step, token, feature);
}

}  // namespace switchyard
