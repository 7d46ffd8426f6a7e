// Counter-based random numbers (Philox-4x32-10). A draw is a pure function of
// (seed, stream, step, token, feature), so every backend, thread count and world size draws the
// same numbers for the same global token: gate noise and input jitter are reproducible.
#pragma once

#include <array>
#include <cstdint>

namespace switchyard {

// Which random stream a draw belongs to, so noise and jitter never share numbers.
enum class RngStream : std::uint32_t { kGateNoise = 1, kInputJitter = 2, kInit = 3, kData = 4 };

// Philox-4x32 with 10 rounds: four 32-bit outputs for a 128-bit counter and a 64-bit key.
std::array<std::uint32_t, 4> philox4x32(std::array<std::uint32_t, 4> counter,
                                        std::array<std::uint32_t, 2> key);

// Uniform in (0, 1) and standard normal (Box-Muller on the first two Philox outputs, computed in
// double then rounded), for draw (step, token, feature) of stream `stream` under `seed`.
double rng_uniform(std::uint64_t seed, RngStream stream, std::uint64_t step, std::uint64_t token,
                   std::uint64_t feature);
double rng_normal(std::uint64_t seed, RngStream stream, std::uint64_t step, std::uint64_t token,
                  std::uint64_t feature);

}  // namespace switchyard
