// The 36 golden cases computed by Tutel v0.3.3 (tests/data/tutel_v0.3.3_cpu_f32.jsonl), parsed
// into plain structs. Each line: config, x, dy, params, y, l_aux, dx, grads.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "reference/reference_moe.h"

namespace sy_ref {

struct GoldenCase {
  std::int64_t T = 0, d = 0, h = 0, E = 0;
  int k = 0;
  double capacity_factor = 0;
  bool batch_prioritized_routing = false;
  bool normalize_gate = true;
  bool is_postscore = true;
  bool has_bias = true;
  double aux_weight = 0;
  std::vector<double> x, dy, y, dx;  // [T, d]
  double l_aux = 0;
  Params params;                                            // values by name
  std::map<std::string, std::vector<std::int64_t>> shapes;  // shape by name
  Params grads;                                             // gradient by name

  MoEConfig config() const;  // f32, linear softmax gate, relu, GShard loss
  std::string name() const;  // e.g. "E4_k2_cf0p5_bpr_norm_bias"
};

// All cases of the file, in file order; empty if it cannot be read (then golden_load_error()
// says why). Never throws: tests are registered from it before main, where a throw would take
// the whole test binary down.
const std::vector<GoldenCase>& golden_cases();
const std::string& golden_load_error();

}  // namespace sy_ref
