// The library's allocator: every Tensor::empty goes through it, so memory_stats() sees all
// memory the library holds. CPU memory is 64-byte aligned.
#pragma once

#include <cstddef>
#include <memory>

#include "switchyard/device.h"

namespace switchyard {

std::shared_ptr<void> allocate(std::size_t bytes, Device device);

}  // namespace switchyard
