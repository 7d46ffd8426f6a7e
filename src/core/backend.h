// Backend selection: an op runs on the backend of its tensors' device. This build's backends
// are listed here; an op asked for a device it has no backend for throws a clear error.
#pragma once

#include "switchyard/device.h"
#include "switchyard/error.h"

namespace switchyard {

inline void require_backend(const char* op, Device device) {
  SY_CHECK(device.is_cpu(), op, " has no ", to_string(device), " backend in this build (CPU only)");
}

}  // namespace switchyard
