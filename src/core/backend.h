// Backend selection: an op runs on the backend of its tensors' device. CPU is always built; the
// CUDA backend exists when the build defines SY_WITH_CUDA (only .cu files see CUDA types).
#pragma once

#include "switchyard/device.h"
#include "switchyard/error.h"

namespace switchyard {

// Throws unless this build has a backend for `device`.
inline void require_backend(const char* op, Device device) {
#ifdef SY_WITH_CUDA
  if (device.is_cuda()) return;
#endif
  SY_CHECK(device.is_cpu(), op, " has no ", to_string(device), " backend in this build");
}

// For ops whose CUDA backend is not written yet: a clear error instead of a wrong path.
inline void require_cpu(const char* op, Device device) {
  SY_CHECK(device.is_cpu(), op, " runs on the CPU only so far; got a tensor on ",
           to_string(device));
}

}  // namespace switchyard

// Calls op_cuda(args...) in builds with the CUDA backend; elsewhere throws.
#ifdef SY_WITH_CUDA
#define SY_CALL_CUDA(op, ...) return op##_cuda(__VA_ARGS__)
#else
#define SY_CALL_CUDA(op, ...) SY_CHECK(false, #op " has no CUDA backend in this build")
#endif
