// A caching CPU allocator: large blocks freed by tensors are kept and handed out again, so a
// training step does not pay for fresh pages (page faults, zeroing) on every call. Blocks are
// reused best-fit when at most twice the requested size. memory_stats() counts the bytes held
// by live tensors (not the cache), like torch's memory_allocated.
#include "core/allocator.h"

#ifdef SY_WITH_CUDA
#include "core/device_cuda.h"
#endif

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

void count(std::atomic<std::int64_t>& current, std::atomic<std::int64_t>& peak, std::int64_t n) {
  const std::int64_t now = current.fetch_add(n) + n;
  std::int64_t p = peak.load();
  while (now > p && !peak.compare_exchange_weak(p, now)) {
  }
}

CpuCache& cpu_cache() {
  static CpuCache* cache = new CpuCache();  // never destroyed: tensors may outlive statics
  return *cache;
}

std::size_t round_size(std::size_t bytes) {
  const std::size_t r = bytes >= kCacheFrom ? kLargeRound : kAlign;
  return (bytes + r - 1) / r * r;
}

#ifdef SY_WITH_CUDA
// Bytes held by live tensors on each CUDA device (the pool behind them caches the rest).
struct DeviceCounters {
  std::atomic<std::int64_t> current{0};
  std::atomic<std::int64_t> peak{0};
};
constexpr int kMaxDevices = 64;
DeviceCounters& cuda_counters(int device) {
  static DeviceCounters counters[kMaxDevices];
  SY_CHECK(device >= 0 && device < kMaxDevices, "cuda:", device, " is out of range");
  return counters[device];
}

// Stream-ordered: freed on the stream that was current at allocation, so a tensor must be used
// on that stream (or the caller orders other streams after it).
std::shared_ptr<void> allocate_cuda(std::size_t bytes, Device device) {
  const int index = device.index;
  SY_CHECK(index >= 0 && index < cuda::device_count(), "cannot allocate on ", to_string(device),
           ": ", cuda::device_count(), " CUDA device(s) visible");
  void* stream = current_stream(device).handle;
  const std::size_t size = round_size(bytes);
  void* p = cuda::malloc_async(size, index, stream);
  const auto counted = static_cast<std::int64_t>(size);
  DeviceCounters& c = cuda_counters(index);
  count(c.current, c.peak, counted);
  return std::shared_ptr<void>(p, [index, stream, counted](void* q) {
    cuda_counters(index).current.fetch_sub(counted);
    try {
      cuda::free_async(q, index, stream);
    } catch (const Error&) {
      // A deleter must not throw; a failed free leaves the block to the pool's teardown.
    }
  });
}
#endif

}  // namespace

std::shared_ptr<void> allocate(std::size_t bytes, Device device) {
  static char empty_storage;  // a zero-byte tensor still needs a non-null owner
  if (bytes == 0) return std::shared_ptr<void>(&empty_storage, [](void*) {});
#ifdef SY_WITH_CUDA
  if (device.is_cuda()) return allocate_cuda(bytes, device);
#endif
  SY_CHECK(device.is_cpu(), "cannot allocate on ", to_string(device),
           ": this build of switchyard has no CUDA backend");
  CpuCache& cache = cpu_cache();
  const std::size_t size = round_size(bytes);
  void* p = cache.take(size);
  const auto counted = static_cast<std::int64_t>(size);
  count(cache.current, cache.peak, counted);
  return std::shared_ptr<void>(p, [size, counted](void* q) {
    CpuCache& c = cpu_cache();
    c.current.fetch_sub(counted);
    c.give_back(q, size);
  });
}

MemoryStats memory_stats(Device device) {
#ifdef SY_WITH_CUDA
  if (device.is_cuda()) {
    const DeviceCounters& c = cuda_counters(device.index);
    return {c.current.load(), c.peak.load()};
  }
#endif
  SY_CHECK(device.is_cpu(), "memory_stats: no allocator for ", to_string(device), " in this build");
  return {cpu_cache().current.load(), cpu_cache().peak.load()};
}

void reset_peak_memory(Device device) {
#ifdef SY_WITH_CUDA
  if (device.is_cuda()) {
    DeviceCounters& c = cuda_counters(device.index);
    c.peak.store(c.current.load());
    return;
  }
#endif
  SY_CHECK(device.is_cpu(), "reset_peak_memory: no allocator for ", to_string(device),
           " in this build");
  cpu_cache().peak.store(cpu_cache().current.load());
}

void release_cached_memory(Device device) {
#ifdef SY_WITH_CUDA
  if (device.is_cuda()) return cuda::release_cached(device.index);
#endif
  SY_CHECK(device.is_cpu(), "release_cached_memory: no allocator for ", to_string(device),
           " in this build");
  cpu_cache().release_all();
}

}  // namespace switchyard
