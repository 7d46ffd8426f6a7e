#include "switchyard/dtype.h"

#include <cmath>

#include "switchyard/error.h"

namespace switchyard {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF64:
      return 8;
    case DType::kF32:
      return 4;
    case DType::kF16:
      return 2;
    case DType::kBF16:
      return 2;
    case DType::kI32:
      return 4;
    case DType::kI64:
      return 8;
  }
  SY_ASSERT(false, "unknown dtype");
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF64:
      return "f64";
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
    case DType::kI32:
      return "i32";
    case DType::kI64:
      return "i64";
  }
  return "?";
}

DType parse_dtype(const std::string& name) {
  if (name == "f64" || name == "float64" || name == "double") return DType::kF64;
  if (name == "f32" || name == "float32" || name == "float") return DType::kF32;
  if (name == "f16" || name == "float16" || name == "half") return DType::kF16;
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "i32" || name == "int32") return DType::kI32;
  if (name == "i64" || name == "int64") return DType::kI64;
  SY_CHECK(false, "unknown dtype '", name, "': expected f64, f32, f16 or bf16");
  return DType::kF32;
}

float half_to_float(Half v) {
  const std::uint32_t sign = (v.bits & 0x8000u) << 16;
  const std::uint32_t exp = (v.bits >> 10) & 0x1f;
  const std::uint32_t mant = v.bits & 0x3ff;
  std::uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // inf or NaN
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal: value = mant * 2^-24, exact in f32
    float f = std::ldexp(static_cast<float>(mant), -24);
    std::memcpy(&u, &f, sizeof u);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

Half float_to_half(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Half{static_cast<std::uint16_t>(sign | 0x7e00u)};   // NaN
  if (abs >= 0x477ff000u) return Half{static_cast<std::uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {
    // Subnormal or zero in f16: scale to units of 2^-24 and round to nearest even.
    float a;
    std::memcpy(&a, &abs, sizeof a);
    const float scaled = a * 16777216.0f;  // exact: multiplication by a power of two
    const auto m = static_cast<std::uint16_t>(std::nearbyint(scaled));
    return Half{static_cast<std::uint16_t>(sign | m)};
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  std::uint32_t h = abs - 0x38000000u;  // exponent bias 127 -> 15, still aligned at bit 23
  h += 0xfffu + ((h >> 13) & 1u);
  return Half{static_cast<std::uint16_t>(sign | (h >> 13))};
}

}  // namespace switchyard
