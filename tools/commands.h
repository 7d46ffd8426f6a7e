// The subcommands of `switchyard` and how they report failure. main.cpp parses the command line
// and runs the chosen subcommand; each subcommand registers its own flags.
#pragma once

#include <functional>
#include <stdexcept>

namespace CLI {
class App;
}

namespace switchyard::tools {

// Exit codes: 0 success; 1 a failure while running (e.g. a loss that became NaN at step 500);
// 2 bad flags or an impossible configuration (a usage error: fix the command line).
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

// A usage error found after CLI11's parse: a flag value the library rejects, a layer the library
// cannot build, a device that is not there. main prints it as one line and exits with 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Each adds its subcommand and flags to `app` and returns what main runs when it was chosen.
using Command = std::function<int()>;
Command add_train_command(CLI::App& app);
Command add_bench_command(CLI::App& app);
Command add_a2a_bench_command(CLI::App& app);

}  // namespace switchyard::tools
