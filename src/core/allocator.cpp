#include "core/allocator.h"

#include <atomic>
#include <cstdlib>

#include "switchyard/error.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace {

struct Counters {
  std::atomic<std::int64_t> current{0};
  std::atomic<std::int64_t> peak{0};
};

Counters& cpu_counters() {
  static Counters c;
  return c;
}

void count_alloc(Counters& c, std::int64_t bytes) {
  const std::int64_t now = c.current.fetch_add(bytes) + bytes;
  std::int64_t peak = c.peak.load();
  while (now > peak && !c.peak.compare_exchange_weak(peak, now)) {
  }
}

}  // namespace

std::shared_ptr<void> allocate(std::size_t bytes, Device device) {
  SY_CHECK(device.is_cpu(), "cannot allocate on ", to_string(device),
           ": this build of switchyard has no CUDA backend");
  constexpr std::size_t kAlign = 64;
  const std::size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = rounded == 0 ? nullptr : std::aligned_alloc(kAlign, rounded);
  SY_CHECK(rounded == 0 || p != nullptr, "out of CPU memory allocating ", bytes, " bytes");
  const auto counted = static_cast<std::int64_t>(rounded);
  count_alloc(cpu_counters(), counted);
  // A zero-byte tensor still needs a non-null owner so that defined() is true.
  static char empty_storage;
  void* owner = p ? p : &empty_storage;
  return std::shared_ptr<void>(owner, [counted, p](void*) {
    cpu_counters().current.fetch_sub(counted);
    std::free(p);
  });
}

MemoryStats memory_stats(Device device) {
  SY_CHECK(device.is_cpu(), "memory_stats: no allocator for ", to_string(device), " in this build");
  return {cpu_counters().current.load(), cpu_counters().peak.load()};
}

void reset_peak_memory(Device device) {
  SY_CHECK(device.is_cpu(), "reset_peak_memory: no allocator for ", to_string(device),
           " in this build");
  cpu_counters().peak.store(cpu_counters().current.load());
}

}  // namespace switchyard
