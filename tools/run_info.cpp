#include "run_info.h"

#include <omp.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <string>

#include "commands.h"

namespace switchyard::tools {
namespace {

std::string trim(const std::string& s) {
  const auto begin = s.find_first_not_of(" \t\r\n");
  if (begin == std::string::npos) return "";
  const auto end = s.find_last_not_of(" \t\r\n");
  return s.substr(begin, end - begin + 1);
}

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return trim(line.substr(colon + 1));
    }
  }
  return "unknown CPU";
}

// stdout of a shell command, trimmed; empty when it fails.
std::string command_output(const std::string& command) {
  std::FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return "";
  std::string out;
  std::array<char, 256> buf;
  while (std::fgets(buf.data(), static_cast<int>(buf.size()), pipe) != nullptr) out += buf.data();
  const int status = pclose(pipe);
  return status == 0 ? trim(out) : "";
}

}  // namespace

int cpu_threads() { return omp_get_max_threads(); }

std::string device_description(Device device) {
  if (!device.is_cpu()) return to_string(device) + ": " + device_name(device);
  const int threads = cpu_threads();
  return "cpu: " + cpu_model_name() + ", " + std::to_string(threads) +
         (threads == 1 ? " thread" : " threads");
}

std::string iso_date_utc() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  std::array<char, 32> buf;
  std::strftime(buf.data(), buf.size(), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf.data();
}

std::string git_commit() {
  // A copy of the tree without its history (a build on another machine) names its commit here.
  if (const char* c = std::getenv("SWITCHYARD_COMMIT"); c && *c) return c;
#ifdef SY_SOURCE_DIR
  // Not the working directory's repository: the tool may run from inside another project.
  // The quotes keep a path with spaces whole; a source path never contains a quote.
  const std::string commit =
      command_output("git -C '" SY_SOURCE_DIR "' describe --always --dirty 2>/dev/null");
  if (!commit.empty()) return commit;
#endif
  return "unknown";
}

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(v)) return true;
  return false;
}

std::shared_ptr<Communicator> world_communicator(const Device& device, const CommOptions& options) {
  try {
    return device.is_cuda() ? make_nccl_communicator(options) : make_mpi_communicator(options);
  } catch (const Error& e) {
    throw UsageError(e.what());
  }
}

}  // namespace switchyard::tools
