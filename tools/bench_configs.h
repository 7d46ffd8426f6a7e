// The named configurations of `switchyard bench`: one MoE layer's shapes each. The cpu_* ones
// fit a 2-core CPU in seconds; the others are the GPU goals (DESIGN.md §4), runnable on any
// device by name. The *_ep ones are expert-parallel proxies: T tokens on every rank and E experts
// over all ranks (run under mpirun; at one process they are one layer holding every expert).
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
  // Expert-parallel proxies: the default set under mpirun (with cpu_default for the device).
  bool expert_parallel = false;
  RuleSet rules = RuleSet::kTutel;
  ScoreFn score_fn = ScoreFn::kSoftmax;
  int num_groups = 0;         // group-limited routing when > 1
  int topk_groups = 0;        // groups kept per token
  index_t shared_hidden = 0;  // one shared expert of this hidden size on every token; 0: none
};

const std::vector<BenchConfig>& bench_configs();
// nullptr when no configuration has that name.
const BenchConfig* find_bench_config(const std::string& name);

}  // namespace switchyard::tools
