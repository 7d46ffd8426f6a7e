// The communication stage's environment knobs, each read once here (docs/environment.md).
#include <sched.h>

#include <cerrno>
#include <cstdlib>
#include <string>
#include <thread>

#include "comm/comm.h"
#include "switchyard/error.h"

namespace switchyard::comm {
namespace {

constexpr double kDefaultTimeoutSeconds = 300;

double read_timeout() {
  const char* value = std::getenv("SWITCHYARD_COMM_TIMEOUT_SEC");
  if (value == nullptr || *value == '\0') return kDefaultTimeoutSeconds;
  char* end = nullptr;
  errno = 0;
  const double seconds = std::strtod(value, &end);
  SY_CHECK(errno == 0 && end != value && *end == '\0' && seconds > 0,
           "SWITCHYARD_COMM_TIMEOUT_SEC must be a number of seconds > 0, got '", value, "'");
  return seconds;
}

int read_local_size() {
  const char* value = std::getenv("LOCAL_SIZE");
  if (value == nullptr || *value == '\0') return 0;
  char* end = nullptr;
  errno = 0;
  const long n = std::strtol(value, &end, 10);
  SY_CHECK(errno == 0 && end != value && *end == '\0' && n >= 1 && n <= (1 << 20),
           "LOCAL_SIZE (ranks per node) must be an integer >= 1, got '", value, "'");
  return static_cast<int>(n);
}

}  // namespace

double timeout_seconds() {
  static const double seconds = read_timeout();
  return seconds;
}

int env_local_size() {
  static const int n = read_local_size();
  return n;
}

void poll_backoff(std::chrono::steady_clock::time_point wait_start) {
  const auto waited = std::chrono::steady_clock::now() - wait_start;
  if (waited < std::chrono::milliseconds(1)) {
    sched_yield();
  } else if (waited < std::chrono::milliseconds(100)) {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  } else {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace switchyard::comm
