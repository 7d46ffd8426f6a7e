// The named configurations of `switchyard bench`: one MoE layer's shapes each. The cpu_* ones
// fit a 2-core CPU in seconds; the others are the GPU goals (DESIGN.md §4), runnable on any
// device by name.
#pragma once

#include <string>
#include <vector>

#include "switchyard/switchyard.h"

namespace switchyard::tools {

struct BenchConfig {
  std::string name;
  index_t num_tokens;   // T
  index_t model_dim;    // d
  index_t hidden_size;  // h
  index_t num_experts;  // E
  int top_k;            // k
  Activation activation;
  bool cpu_default;  // run by `bench --device cpu` when no --config is given
};

const std::vector<BenchConfig>& bench_configs();
// nullptr when no configuration has that name.
const BenchConfig* find_bench_config(const std::string& name);

}  // namespace switchyard::tools
