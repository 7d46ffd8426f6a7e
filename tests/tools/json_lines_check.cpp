// Checks the JSON lines a `switchyard` command printed, for the tool's ctest cases:
//
//   json_lines_check FILE [--min-lines N] [--max-lines N] [--keys a,b] [--positive a,b]
//                         [--loss-falls-by F]
//                         [--loss-matches OTHER_FILE --rel-tol R]
//
// Every non-empty line must be a JSON object; --keys must be present in each; --positive must be
// numbers > 0 in each; --loss-falls-by F: the last line's "loss" <= F * the first line's;
// --loss-matches: OTHER_FILE has as many lines, each "loss" within R relative of this file's.
// Prints what failed and exits 1; exits 0 when everything holds.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

int fail(const std::string& message) {
  std::fprintf(stderr, "json_lines_check: %s\n", message.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return fail("usage: json_lines_check FILE [options]");
  std::size_t min_lines = 1, max_lines = static_cast<std::size_t>(-1);
  std::vector<std::string> keys, positive;
  double loss_factor = -1, rel_tol = 0;
  std::string other_file;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--min-lines")
      min_lines = std::stoul(value);
    else if (flag == "--max-lines")
      max_lines = std::stoul(value);
    else if (flag == "--keys")
      keys = split_commas(value);
    else if (flag == "--positive")
      positive = split_commas(value);
    else if (flag == "--loss-falls-by")
      loss_factor = std::stod(value);
    else if (flag == "--loss-matches")
      other_file = value;
    else if (flag == "--rel-tol")
      rel_tol = std::stod(value);
    else
      return fail("unknown option " + flag);
  }

  std::ifstream in(argv[1]);
  if (!in) return fail(std::string("cannot read ") + argv[1]);
  std::vector<nlohmann::json> lines;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) return fail("not a JSON object: " + line);
    for (const std::string& k : keys) {
      if (!j.contains(k)) return fail("key '" + k + "' missing in: " + line);
    }
    for (const std::string& k : positive) {
      if (!j.contains(k) || !j[k].is_number() || !(j[k].get<double>() > 0) ||
          !std::isfinite(j[k].get<double>())) {
        return fail("key '" + k + "' is not a positive number in: " + line);
      }
    }
    lines.push_back(std::move(j));
  }
  if (lines.size() < min_lines) {
    return fail("expected at least " + std::to_string(min_lines) + " lines, got " +
                std::to_string(lines.size()));
  }
  if (lines.size() > max_lines) {
    return fail("expected at most " + std::to_string(max_lines) + " lines, got " +
                std::to_string(lines.size()));
  }
  if (loss_factor >= 0) {
    const double first = lines.front().value("loss", NAN);
    const double last = lines.back().value("loss", NAN);
    if (!(last <= loss_factor * first)) {
      return fail("loss went from " + std::to_string(first) + " to " + std::to_string(last) +
                  ", expected at most " + std::to_string(loss_factor) + "x the first");
    }
    std::printf("loss %g -> %g (%.3gx)\n", first, last, last / first);
  }
  if (!other_file.empty()) {
    std::ifstream other(other_file);
    if (!other) return fail("cannot read " + other_file);
    std::size_t i = 0;
    while (std::getline(other, line)) {
      if (line.empty()) continue;
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (i >= lines.size()) return fail(other_file + " has more lines than " + argv[1]);
      const double a = lines[i].value("loss", NAN), b = j.is_object() ? j.value("loss", NAN) : NAN;
      if (!(std::fabs(a - b) <= rel_tol * std::fabs(a))) {
        return fail("line " + std::to_string(i + 1) + ": loss " + std::to_string(a) + " vs " +
                    std::to_string(b) + " differs by more than " + std::to_string(rel_tol) +
                    " relative");
      }
      ++i;
    }
    if (i != lines.size()) return fail(other_file + " has fewer lines than " + argv[1]);
    std::printf("%zu losses agree within %g relative\n", i, rel_tol);
  }
  std::printf("%zu JSON lines ok\n", lines.size());
  return 0;
}
