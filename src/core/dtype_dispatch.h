// Dtype dispatch for CPU code: one place that maps a runtime DType to a C++ element type.
// Kernels are templates on the storage type T and accumulate in acc_t<T> (f32, f64 for f64).
#pragma once

#include <type_traits>

#include "switchyard/dtype.h"
#include "switchyard/error.h"

namespace switchyard {

template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline double load(double v) { return v; }
inline float load(float v) { return v; }
inline float load(Half v) { return half_to_float(v); }
inline float load(BFloat16 v) { return bf16_to_float(v); }
inline double load(std::int32_t v) { return v; }
inline double load(std::int64_t v) { return static_cast<double>(v); }

// Rounds (to nearest even) into the storage type T.
template <class T, class A>
inline T store(A v) {
  if constexpr (std::is_same_v<T, Half>)
    return float_to_half(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, BFloat16>)
    return float_to_bf16(static_cast<float>(v));
  else
    return static_cast<T>(v);
}

// Calls f.template operator()<T>() with T the element type of a floating dtype.
template <class F>
decltype(auto) dispatch_float(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::kF64:
      return f.template operator()<double>();
    case DType::kF32:
      return f.template operator()<float>();
    case DType::kF16:
      return f.template operator()<Half>();
    case DType::kBF16:
      return f.template operator()<BFloat16>();
    default:
      break;
  }
  detail::throw_error(detail::str_cat(op, " is not implemented for ", dtype_name(dtype),
                                      ": expected f64, f32, f16 or bf16"));
}

// As dispatch_float, plus the index dtypes.
template <class F>
decltype(auto) dispatch_any(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::kI32:
      return f.template operator()<std::int32_t>();
    case DType::kI64:
      return f.template operator()<std::int64_t>();
    default:
      return dispatch_float(dtype, op, std::forward<F>(f));
  }
}

// Routing math runs in f32, or f64 for an f64 layer.
inline DType routing_dtype(DType layer_dtype) {
  return layer_dtype == DType::kF64 ? DType::kF64 : DType::kF32;
}

}  // namespace switchyard
