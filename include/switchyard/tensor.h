// Tensor: sizes, strides (in elements), dtype, device and shared ownership of storage.
// Copies are cheap and share storage; views (narrow, select, reshape of contiguous data) share
// storage too. from_blob wraps a caller's memory with no copy and no ownership.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "switchyard/device.h"
#include "switchyard/dtype.h"
#include "switchyard/index.h"

namespace switchyard {

using Shape = std::vector<index_t>;
// "[2, 3]": a shape as error messages print it.
std::string shape_str(const Shape& s);

class Tensor {
 public:
  Tensor() = default;  // undefined: defined() is false

  // New contiguous storage from the library's allocator (uninitialised / zero-filled).
  static Tensor empty(const Shape& sizes, DType dtype, Device device = Device::cpu());
  static Tensor zeros(const Shape& sizes, DType dtype, Device device = Device::cpu());
  // Wraps memory the caller owns, no copy. `strides` empty means contiguous. The caller keeps
  // the memory alive while the tensor (or any view of it) is used.
  static Tensor from_blob(void* data, const Shape& sizes, const Shape& strides, DType dtype,
                          Device device = Device::cpu());
  // A CPU tensor holding `values` converted to `dtype` (rounded to nearest even for f16/bf16).
  static Tensor from_vector(const std::vector<double>& values, const Shape& sizes,
                            DType dtype = DType::kF32);

  bool defined() const { return static_cast<bool>(storage_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int dim() const { return static_cast<int>(sizes_.size()); }
  const Shape& sizes() const { return sizes_; }
  const Shape& strides() const { return strides_; }
  index_t size(int d) const;  // negative d counts from the end
  index_t stride(int d) const;
  index_t numel() const;
  bool is_contiguous() const;

  void* data_ptr() const;
  template <class T>
  T* data() const {
    check_element_type(sizeof(T), type_tag<T>());
    return static_cast<T*>(data_ptr());
  }

  // Views (share storage).
  Tensor narrow(int d, index_t start, index_t length) const;
  Tensor select(int d, index_t i) const;  // removes dimension d
  Tensor view(const Shape& sizes) const;  // contiguous only; one size may be -1
  // A view when the data is contiguous, else a contiguous copy.
  Tensor reshape(const Shape& sizes) const;
  Tensor contiguous() const;  // *this when already contiguous

  // Copies (new storage).
  Tensor clone() const;
  Tensor to(DType dtype) const;  // *this when the dtype already matches
  Tensor to(Device device) const;  // a contiguous copy on `device`; *this when already there
  // Elementwise copy from `src` (same shape, any strides, any dtype: converted).
  void copy_from(const Tensor& src);
  void fill(double value);

  // Host values as double (any dtype, any strides), in row-major order. For tests and tools.
  std::vector<double> to_vector() const;

 private:
  template <class T>
  static constexpr int type_tag();
  void check_element_type(std::size_t size, int tag) const;

  std::shared_ptr<void> storage_;
  index_t offset_ = 0;  // elements from the start of storage
  Shape sizes_;
  Shape strides_;
  DType dtype_ = DType::kF32;
  Device device_;
};

template <class T>
constexpr int Tensor::type_tag() {
  if constexpr (std::is_same_v<T, double>)
    return static_cast<int>(DType::kF64);
  else if constexpr (std::is_same_v<T, float>)
    return static_cast<int>(DType::kF32);
  else if constexpr (std::is_same_v<T, Half>)
    return static_cast<int>(DType::kF16);
  else if constexpr (std::is_same_v<T, BFloat16>)
    return static_cast<int>(DType::kBF16);
  else if constexpr (std::is_same_v<T, std::int32_t>)
    return static_cast<int>(DType::kI32);
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return static_cast<int>(DType::kI64);
  else
    return -1;  // raw bytes (void, char): any dtype
}

// Bytes the library's allocator holds on a device now, and the most it has held since the last
// reset. Wrapped caller memory (from_blob) is not counted.
struct MemoryStats {
  std::int64_t current_bytes = 0;
  std::int64_t peak_bytes = 0;
};
MemoryStats memory_stats(Device device = Device::cpu());
void reset_peak_memory(Device device = Device::cpu());
// Freed blocks are cached for reuse; this returns the cache to the system.
void release_cached_memory(Device device = Device::cpu());

}  // namespace switchyard
