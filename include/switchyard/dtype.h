// Element types. f64 is CPU only; f16 and bf16 are storage types (arithmetic runs in f32);
// i32 and i64 hold indices (routing plans, offsets).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace switchyard {

enum class DType : std::uint8_t { kF64, kF32, kF16, kBF16, kI32, kI64 };

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);         // "f64", "f32", "f16", "bf16", "i32", "i64"
DType parse_dtype(const std::string& name);  // accepts the names above and float32, bfloat16, ...
inline bool is_floating(DType d) { return d != DType::kI32 && d != DType::kI64; }

// IEEE binary16 and bfloat16 values as stored; conversions round to nearest even.
struct Half {
  std::uint16_t bits = 0;
};
struct BFloat16 {
  std::uint16_t bits = 0;
};

inline float bf16_to_float(BFloat16 v) {
  std::uint32_t u = static_cast<std::uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline BFloat16 float_to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return BFloat16{static_cast<std::uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return BFloat16{static_cast<std::uint16_t>(u >> 16)};
}

float half_to_float(Half v);
Half float_to_half(float f);

}  // namespace switchyard
