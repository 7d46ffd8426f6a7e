#include "switchyard/device.h"

#include "switchyard/error.h"

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

// The CUDA backend is not part of this build yet (see core/backend.h).
bool cuda_available() { return false; }

}  // namespace switchyard
