// Helpers shared by the subcommands' flag definitions: numeric range checks whose messages say
// what was expected and what was found, and enum flags parsed by the library's parse_* functions.
#pragma once

#include <fmt/core.h>

#include <CLI/CLI.hpp>
#include <string>

#include "commands.h"
#include "switchyard/switchyard.h"

namespace switchyard::tools {

// A CLI11 check: the value is a number >= min ("--top: must be >= 1, got 0").
inline CLI::Validator at_least(double min) {
  return CLI::Validator(
      [min](std::string& s) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(s, v)) return fmt::format("expected a number, got '{}'", s);
        return v >= min ? std::string() : fmt::format("must be >= {}, got {}", min, s);
      },
      // No description: help shows "INT=8", not "INT:>= 1=8"; the message names the range.
      "");
}

// A CLI11 check: the value is a number > 0 ("--lr: must be > 0, got 0").
inline CLI::Validator positive() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(s, v)) return fmt::format("expected a number, got '{}'", s);
        return v > 0 ? std::string() : fmt::format("must be > 0, got {}", s);
      },
      "");
}

// Converts an enum flag's value with the library's parser; an unknown value is a usage error
// that names the flag and the accepted values (whatever the parser's own message says).
template <class Parse>
auto parse_flag(const char* flag, const std::string& value, const char* choices, Parse parse) {
  try {
    return parse(value);
  } catch (const std::exception&) {
    throw UsageError(
        fmt::format("{}: unknown value '{}', expected one of {}", flag, value, choices));
  }
}

// "--dtype": a floating dtype name (f32, f64, bf16, f16 and the aliases parse_dtype accepts).
inline DType parse_dtype_flag(const std::string& value) {
  const DType d = parse_flag("--dtype", value, "f32|f64|bf16|f16", parse_dtype);
  if (!is_floating(d)) {
    throw UsageError(
        fmt::format("--dtype: expected a floating dtype (f32|f64|bf16|f16), got '{}'", value));
  }
  return d;
}

// "--device": cpu or cuda[:N]; cuda only when this build has CUDA and a GPU is visible.
inline Device parse_device_flag(const std::string& value) {
  const Device d = parse_flag("--device", value, "cpu|cuda|cuda:N", parse_device);
  if (d.is_cuda() && !cuda_available()) {
    throw UsageError(fmt::format(
        "--device {}: CUDA is not available (this build has no CUDA backend or no GPU is "
        "visible); use --device cpu",
        value));
  }
  return d;
}

}  // namespace switchyard::tools
