#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "switchyard/dtype.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

TEST(DTypeBf16, RoundsToNearestEven) {
  // 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f).bits, 0x3f80);
  // 1 + 3*2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up to even.
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1p-8f).bits, 0x3f82);
  // Just above the halfway point rounds up.
  EXPECT_EQ(float_to_bf16(from_bits(0x3f808001u)).bits, 0x3f81);
  EXPECT_EQ(bf16_to_float(float_to_bf16(-2.5f)), -2.5f);
}

TEST(DTypeBf16, KeepsNaNAndInfinity) {
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(bf16_to_float(float_to_bf16(INFINITY)), INFINITY);
  // The largest float rounds past the largest bf16 to infinity.
  EXPECT_EQ(bf16_to_float(float_to_bf16(std::numeric_limits<float>::max())), INFINITY);
}

TEST(DTypeHalf, RoundTripsEveryHalfValue) {
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const Half h{static_cast<std::uint16_t>(b)};
    const float f = half_to_float(h);
    if (std::isnan(f)) continue;
    EXPECT_EQ(float_to_half(f).bits, h.bits) << "bits " << b;
  }
}

TEST(DTypeHalf, RoundsToNearestEvenIncludingSubnormals) {
  EXPECT_EQ(float_to_half(1.0f + 0x1p-11f).bits, 0x3c00);      // tie -> even (1.0)
  EXPECT_EQ(float_to_half(1.0f + 3 * 0x1p-11f).bits, 0x3c02);  // tie -> even (up)
  EXPECT_EQ(float_to_half(0x1p-24f).bits, 0x0001);             // smallest subnormal
  EXPECT_EQ(float_to_half(0x1p-25f).bits, 0x0000);             // tie between 0 and 2^-24 -> 0
  EXPECT_EQ(float_to_half(3 * 0x1p-25f).bits, 0x0002);         // tie -> even (2 * 2^-24)
  EXPECT_EQ(float_to_half(65504.0f).bits, 0x7bff);             // largest finite
  EXPECT_EQ(float_to_half(65520.0f).bits, 0x7c00);             // rounds to infinity
  EXPECT_EQ(half_to_float(Half{0x8000}), -0.0f);
}

TEST(DType, ParsesNamesAndRejectsOthers) {
  EXPECT_EQ(parse_dtype("bf16"), DType::kBF16);
  EXPECT_EQ(parse_dtype("float32"), DType::kF32);
  EXPECT_EQ(parse_dtype("f64"), DType::kF64);
  EXPECT_EQ(dtype_size(DType::kF16), 2u);
  try {
    parse_dtype("f99");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("f99"), std::string::npos);
  }
}

}  // namespace
}  // namespace switchyard
