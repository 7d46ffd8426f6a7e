// `switchyard`: the command-line tool. Dispatches to a subcommand and turns every failure into
// one line on stderr, `switchyard: error: ...`, with exit code 2 for usage errors (CLI11 parse
// errors, flag values or configurations the library rejects) and 1 for failures while running.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "commands.h"
#include "switchyard/error.h"

namespace {

// One line, whatever the message holds: scripts read the first line of stderr.
void print_error(const std::string& message) {
  std::string line = message;
  std::replace(line.begin(), line.end(), '\n', ' ');
  std::fprintf(stderr, "switchyard: error: %s\n", line.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  namespace tools = switchyard::tools;
  CLI::App app{
      "switchyard: Mixture-of-Experts layers on CPU (and CUDA when built with it).\n"
      "Run `switchyard <command> --help` for a command's flags.",
      "switchyard"};
  app.require_subcommand(1);
  const std::vector<std::pair<std::string, tools::Command>> commands = {
      {"train", tools::add_train_command(app)},
      {"bench", tools::add_bench_command(app)},
      {"a2a-bench", tools::add_a2a_bench_command(app)},
  };

  // CLI11 reports a missing or misspelled command as "A subcommand is required"; say which.
  const std::string first = argc > 1 ? argv[1] : "";
  const bool known = std::any_of(commands.begin(), commands.end(),
                                 [&](const auto& c) { return c.first == first; });
  if (first.empty() || (first[0] != '-' && !known)) {
    std::string names;
    for (const auto& c : commands) names += (names.empty() ? "" : ", ") + c.first;
    print_error(
        (first.empty() ? std::string("no command given") : "unknown command '" + first + "'") +
        ", expected one of: " + names + " (see switchyard --help)");
    return tools::kExitUsage;
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --help-all are "errors" with exit code 0: CLI11 prints the help.
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
    print_error(e.what());
    return tools::kExitUsage;
  }

  try {
    for (const auto& [name, run] : commands) {
      if (app.got_subcommand(name)) return run();
    }
    return tools::kExitUsage;  // unreachable: require_subcommand(1)
  } catch (const tools::UsageError& e) {
    print_error(e.what());
    return tools::kExitUsage;
  } catch (const std::exception& e) {
    print_error(e.what());
    return tools::kExitFailure;
  }
}
