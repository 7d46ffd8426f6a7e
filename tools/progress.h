// A one-line progress display on stderr, rewritten in place with '\r'. It is off when stderr is
// not a terminal (a log file or a pipe would fill with carriage returns) or when the environment
// variable CI is set (CI consoles show every rewrite as a new line).
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace switchyard::tools {

class ProgressLine {
 public:
  ProgressLine() : enabled_(isatty(fileno(stderr)) != 0 && std::getenv("CI") == nullptr) {}
  ~ProgressLine() { clear(); }
  ProgressLine(const ProgressLine&) = delete;
  ProgressLine& operator=(const ProgressLine&) = delete;

  bool enabled() const { return enabled_; }

  // Shows `text`, at most ten times a second (a terminal is slower than a fast loop) unless
  // `force`.
  void update(const std::string& text, bool force = false) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    if (!force && shown_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    shown_ = true;
    // "\033[K" erases what a longer earlier text left on the line.
    std::fprintf(stderr, "\r%s\033[K", text.c_str());
    std::fflush(stderr);
  }

  // Erases the line, e.g. before printing a normal line to the same terminal.
  void clear() {
    if (!enabled_ || !shown_) return;
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
    shown_ = false;
  }

 private:
  bool enabled_;
  bool shown_ = false;
  std::chrono::steady_clock::time_point last_;
};

}  // namespace switchyard::tools
