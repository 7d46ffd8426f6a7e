#include "switchyard/device.h"

#include "switchyard/error.h"

#ifdef SY_WITH_CUDA
#include "core/device_cuda.h"
#endif

namespace switchyard {

std::string to_string(const Device& device) {
  if (device.is_cpu()) return "cpu";
  return "cuda:" + std::to_string(device.index);
}

Device parse_device(const std::string& name) {
  if (name == "cpu") return Device::cpu();
  if (name == "cuda") return Device::cuda(0);
  if (name.rfind("cuda:", 0) == 0) {
    const std::string idx = name.substr(5);
    SY_CHECK(!idx.empty() && idx.find_first_not_of("0123456789") == std::string::npos,
             "bad device '", name, "': expected cpu, cuda or cuda:N");
    return Device::cuda(std::stoi(idx));
  }
  SY_CHECK(false, "unknown device '", name, "': expected cpu, cuda or cuda:N");
  return Device::cpu();
}

#ifdef SY_WITH_CUDA
bool cuda_available() { return cuda::device_count() > 0; }
#else
bool cuda_available() { return false; }
#endif

std::string device_name(Device device) {
  if (device.is_cpu()) return "cpu";
#ifdef SY_WITH_CUDA
  SY_CHECK(device.index >= 0 && device.index < cuda::device_count(), "no device ",
           to_string(device), ": ", cuda::device_count(), " CUDA device(s) visible");
  return cuda::device_name(device.index);
#else
  SY_CHECK(false, "device_name: this build has no CUDA backend");
  return "";
#endif
}

namespace {
thread_local Stream tls_cuda_stream{Device::cuda(0), nullptr};
}

Stream current_stream(Device device) {
  if (device.is_cuda() && tls_cuda_stream.device == device) return tls_cuda_stream;
  return Stream{device, nullptr};
}

StreamGuard::StreamGuard(Stream stream) : previous_(current_stream(stream.device)) {
  if (stream.device.is_cuda()) tls_cuda_stream = stream;
}

StreamGuard::~StreamGuard() {
  if (previous_.device.is_cuda()) tls_cuda_stream = previous_;
}

void synchronize(const Stream& stream) {
  if (stream.device.is_cpu()) return;
#ifdef SY_WITH_CUDA
  cuda::synchronize(stream.device.index, stream.handle);
#else
  SY_CHECK(false, "synchronize: this build has no CUDA backend");
#endif
}

#ifdef SY_WITH_CUDA
CudaStream::CudaStream(Device device) : stream_{device, nullptr} {
  SY_CHECK(device.is_cuda(), "CudaStream: ", to_string(device), " is not a CUDA device");
  stream_.handle = cuda::create_stream(device.index);
}

CudaStream::~CudaStream() { cuda::destroy_stream(stream_.device.index, stream_.handle); }

CudaGraph::~CudaGraph() {
  if (capturing_) {  // a capture interrupted by an exception: end it so the stream is usable
    try {
      cuda::destroy_graph(cuda::end_capture(stream_.device.index, stream_.handle));
    } catch (const Error&) {
    }
  }
  if (exec_) cuda::destroy_graph(exec_);
}

void CudaGraph::begin_capture(const Stream& stream) {
  SY_CHECK(stream.device.is_cuda() && !capturing_, "CudaGraph: begin_capture needs a CUDA stream "
           "and no capture in progress");
  cuda::begin_capture(stream.device.index, stream.handle);
  stream_ = stream;
  capturing_ = true;
}

void CudaGraph::end_capture() {
  SY_CHECK(capturing_, "CudaGraph: end_capture without begin_capture");
  capturing_ = false;
  void* exec = cuda::end_capture(stream_.device.index, stream_.handle);
  if (exec_) cuda::destroy_graph(exec_);
  exec_ = exec;
}

void CudaGraph::replay() {
  SY_CHECK(exec_ != nullptr, "CudaGraph: replay before a capture ended");
  cuda::launch_graph(stream_.device.index, exec_, stream_.handle);
}
#else
CudaStream::CudaStream(Device) { SY_CHECK(false, "CudaStream: this build has no CUDA backend"); }
CudaStream::~CudaStream() = default;
CudaGraph::~CudaGraph() = default;
void CudaGraph::begin_capture(const Stream&) {
  SY_CHECK(false, "CudaGraph: this build has no CUDA backend");
}
void CudaGraph::end_capture() { SY_CHECK(false, "CudaGraph: this build has no CUDA backend"); }
void CudaGraph::replay() { SY_CHECK(false, "CudaGraph: this build has no CUDA backend"); }
#endif

}  // namespace switchyard
