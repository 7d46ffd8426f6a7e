// Where a tensor lives and on which queue work runs. Public headers never include CUDA headers:
// a Stream carries a cudaStream_t as an opaque handle.
#pragma once

#include <string>

namespace switchyard {

enum class DeviceType { kCpu, kCuda };

struct Device {
  DeviceType type = DeviceType::kCpu;
  int index = 0;

  static Device cpu() { return Device{}; }
  static Device cuda(int index = 0) { return Device{DeviceType::kCuda, index}; }
  bool is_cpu() const { return type == DeviceType::kCpu; }
  bool is_cuda() const { return type == DeviceType::kCuda; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

std::string to_string(const Device& device);   // "cpu", "cuda:0"
Device parse_device(const std::string& name);  // "cpu", "cuda", "cuda:1"

// Whether this build has the CUDA backend and a usable GPU.
bool cuda_available();

// The device's product name ("NVIDIA H100 80GB HBM3"); "cpu" for the CPU.
std::string device_name(Device device);

// A work queue on a device. On CPU work runs synchronously on the calling thread (with OpenMP
// and BLAS threads); on CUDA `handle` is the cudaStream_t every kernel of a call is launched on.
struct Stream {
  Device device;
  void* handle = nullptr;  // null: CUDA's per-thread default stream
};

// The stream the calling thread's work on `device` runs on: the one a StreamGuard set, else
// the per-thread default stream (handle null). Tensor allocations, copies and every kernel of a
// call use it; memory is freed in the order of that stream.
Stream current_stream(Device device);

// Makes `stream` the calling thread's current stream for its device until destruction.
class StreamGuard {
 public:
  explicit StreamGuard(Stream stream);
  ~StreamGuard();
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  Stream previous_;
};

// Waits until the work queued on the stream has finished (CPU: returns at once).
void synchronize(const Stream& stream);

// A CUDA stream of its own (non-blocking with respect to the legacy default stream), destroyed
// with the object. Throws in builds without the CUDA backend.
class CudaStream {
 public:
  explicit CudaStream(Device device);
  ~CudaStream();
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  Stream stream() const { return stream_; }

 private:
  Stream stream_;
};

// Records the work issued on `stream` between begin_capture and end_capture (which must be
// called on the same thread; the stream must be a CudaStream, not the per-thread default), so
// that replay() launches the same kernels on the same memory again, reading whatever that memory
// holds then. Memory allocated during the capture and not freed in it must be freed before the
// next replay (CUDA's rule for graph allocations): keep results in tensors allocated before the
// capture. Capture after one eager run, so that libraries have made their own allocations.
class CudaGraph {
 public:
  CudaGraph() = default;
  ~CudaGraph();
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;
  void begin_capture(const Stream& stream);
  void end_capture();
  void replay();

 private:
  Stream stream_;
  void* exec_ = nullptr;  // cudaGraphExec_t
  bool capturing_ = false;
};

}  // namespace switchyard
