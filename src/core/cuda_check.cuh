// Error checks for CUDA library calls (.cu files only): the message names the call, the error,
// the device and file:line.
#pragma once

#include <cuda_runtime.h>

#include "switchyard/error.h"

namespace switchyard::detail {

[[noreturn]] inline void throw_cuda(const char* call, cudaError_t err, const char* file, int line) {
  int device = -1;
  cudaGetDevice(&device);
  throw_error(str_cat(call, " failed: ", cudaGetErrorString(err), " (", static_cast<int>(err),
                      ") on cuda:", device, " at ", file, ":", line));
}

}  // namespace switchyard::detail

#define SY_CUDA_CHECK(expr)                                                 \
  do {                                                                      \
    const cudaError_t sy_err_ = (expr);                                     \
    if (sy_err_ != cudaSuccess)                                             \
      ::switchyard::detail::throw_cuda(#expr, sy_err_, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: reports launch errors (bad configuration), not asynchronous faults.
#define SY_CUDA_CHECK_LAUNCH() SY_CUDA_CHECK(cudaGetLastError())

namespace switchyard {

// The stream handle of the public API as a cudaStream_t (null: the per-thread default stream).
inline cudaStream_t as_cuda_stream(void* handle) {
  return handle ? static_cast<cudaStream_t>(handle) : cudaStreamPerThread;
}

// Makes `device` current for a scope.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    SY_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) SY_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace switchyard
