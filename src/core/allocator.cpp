// A caching CPU allocator: large blocks freed by tensors are kept and handed out again, so a
// training step does not pay for fresh pages (page faults, zeroing) on every call. Blocks are
// reused best-fit when at most twice the requested size. memory_stats() counts the bytes held
// by live tensors (not the cache), like torch's memory_allocated.
#include "core/allocator.h"

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>

#include "switchyard/error.h"
#include "switchyard/tensor.h"

namespace switchyard {
namespace {

constexpr std::size_t kAlign = 64;
constexpr std::size_t kCacheFrom = std::size_t{1} << 16;  // smaller blocks go straight to malloc
constexpr std::size_t kLargeRound = std::size_t{1} << 16;

class CpuCache {
 public:
  ~CpuCache() {
    for (auto& [size, p] : free_) std::free(p);
  }

  void* take(std::size_t bytes) {
    if (bytes >= kCacheFrom) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= 2 * bytes) {
        void* p = it->second;
        free_.erase(it);
        return p;
      }
    }
    void* p = std::aligned_alloc(kAlign, bytes);
    if (p == nullptr && bytes >= kCacheFrom) {  // out of memory: drop the cache and retry
      release_all();
      p = std::aligned_alloc(kAlign, bytes);
    }
    SY_CHECK(p != nullptr, "out of CPU memory allocating ", bytes, " bytes");
    return p;
  }

  void give_back(void* p, std::size_t bytes) {
    if (bytes < kCacheFrom) {
      std::free(p);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace(bytes, p);
  }

  void release_all() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [size, p] : free_) std::free(p);
    free_.clear();
  }

  std::atomic<std::int64_t> current{0};
  std::atomic<std::int64_t> peak{0};

 private:
  std::mutex mu_;
  std::multimap<std::size_t, void*> free_;
};

CpuCache& cpu_cache() {
  static CpuCache* cache = new CpuCache();  // never destroyed: tensors may outlive statics
  return *cache;
}

std::size_t round_size(std::size_t bytes) {
  const std::size_t r = bytes >= kCacheFrom ? kLargeRound : kAlign;
  return (bytes + r - 1) / r * r;
}

}  // namespace

std::shared_ptr<void> allocate(std::size_t bytes, Device device) {
  SY_CHECK(device.is_cpu(), "cannot allocate on ", to_string(device),
           ": this build of switchyard has no CUDA backend");
  static char empty_storage;  // a zero-byte tensor still needs a non-null owner
  if (bytes == 0) return std::shared_ptr<void>(&empty_storage, [](void*) {});
  CpuCache& cache = cpu_cache();
  const std::size_t size = round_size(bytes);
  void* p = cache.take(size);
  const auto counted = static_cast<std::int64_t>(size);
  const std::int64_t now = cache.current.fetch_add(counted) + counted;
  std::int64_t peak = cache.peak.load();
  while (now > peak && !cache.peak.compare_exchange_weak(peak, now)) {
  }
  return std::shared_ptr<void>(p, [size, counted](void* q) {
    CpuCache& c = cpu_cache();
    c.current.fetch_sub(counted);
    c.give_back(q, size);
  });
}

MemoryStats memory_stats(Device device) {
  SY_CHECK(device.is_cpu(), "memory_stats: no allocator for ", to_string(device), " in this build");
  return {cpu_cache().current.load(), cpu_cache().peak.load()};
}

void reset_peak_memory(Device device) {
  SY_CHECK(device.is_cpu(), "reset_peak_memory: no allocator for ", to_string(device),
           " in this build");
  cpu_cache().peak.store(cpu_cache().current.load());
}

void release_cached_memory(Device device) {
  SY_CHECK(device.is_cpu(), "release_cached_memory: no allocator for ", to_string(device),
           " in this build");
  cpu_cache().release_all();
}

}  // namespace switchyard
