#include <gtest/gtest.h>

#include <cmath>

#include "switchyard/rng.h"

namespace switchyard {
namespace {

TEST(Rng, PhiloxMatchesTheRandom123KnownAnswer) {
  // Known-answer vector of Philox4x32-10 (Random123 kat_vectors): counter and key all ones.
  const auto r =
      philox4x32({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu});
  EXPECT_EQ(r[0], 0x408f276du);
  EXPECT_EQ(r[1], 0x41c83b0eu);
  EXPECT_EQ(r[2], 0xa20bc7c6u);
  EXPECT_EQ(r[3], 0x6d5451fdu);
  const auto z = philox4x32({0, 0, 0, 0}, {0, 0});
  EXPECT_EQ(z[0], 0x6627e8d5u);
  EXPECT_EQ(z[1], 0xe169c58du);
  EXPECT_EQ(z[2], 0xbc57ac4cu);
  EXPECT_EQ(z[3], 0x9b00dbd8u);
}

TEST(Rng, DrawsArePureFunctionsOfTheirKeys) {
  EXPECT_EQ(rng_normal(5, RngStream::kGateNoise, 3, 17, 2),
            rng_normal(5, RngStream::kGateNoise, 3, 17, 2));
  EXPECT_NE(rng_normal(5, RngStream::kGateNoise, 3, 17, 2),
            rng_normal(5, RngStream::kGateNoise, 3, 17, 3));
  EXPECT_NE(rng_normal(5, RngStream::kGateNoise, 3, 17, 2),
            rng_normal(5, RngStream::kInputJitter, 3, 17, 2));
  EXPECT_NE(rng_normal(5, RngStream::kGateNoise, 3, 17, 2),
            rng_normal(6, RngStream::kGateNoise, 3, 17, 2));
  EXPECT_NE(rng_uniform(5, RngStream::kData, 0, 1ULL << 33, 0),
            rng_uniform(5, RngStream::kData, 0, 0, 0));
}

TEST(Rng, NormalAndUniformHaveTheRightMoments) {
  const int n = 200000;
  double s = 0, s2 = 0, u = 0, umin = 1, umax = 0;
  for (int i = 0; i < n; ++i) {
    const double z = rng_normal(11, RngStream::kData, 0, i, 0);
    s += z;
    s2 += z * z;
    const double v = rng_uniform(11, RngStream::kData, 0, i, 1);
    u += v;
    umin = std::min(umin, v);
    umax = std::max(umax, v);
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.01);
  EXPECT_NEAR(u / n, 0.5, 0.005);
  EXPECT_GT(umin, 0.0);
  EXPECT_LT(umax, 1.0);
}

}  // namespace
}  // namespace switchyard
