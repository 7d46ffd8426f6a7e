#include "bench_configs.h"

namespace switchyard::tools {

const std::vector<BenchConfig>& bench_configs() {
  static const std::vector<BenchConfig> configs = {
      // name             T      d     h      E    k  activation            cpu_default
      {"cpu_e2k2", 2048, 1024, 1024, 2, 2, Activation::kRelu, true},
      {"cpu_e8k2", 2048, 1024, 256, 8, 2, Activation::kRelu, true},
      {"cpu_e32k4", 2048, 1024, 256, 32, 4, Activation::kRelu, true},
      {"tutel_default", 8192, 2048, 2048, 2, 2, Activation::kRelu, false},
      {"mixtral", 8192, 4096, 14336, 8, 2, Activation::kRelu, false},
      {"fine_grained", 8192, 2048, 768, 128, 8, Activation::kRelu, false},
      {"deepseek_local", 4096, 7168, 2048, 32, 8, Activation::kRelu, false},
      {"sonic_coarse", 32768, 4096, 2048, 64, 4, Activation::kSwiGLU, false},
      {"sonic_fine", 24576, 1536, 256, 128, 8, Activation::kSwiGLU, false},
      // Expert parallel (T per rank, E over all ranks): proxies of Megatron-Core's per-layer MoE
      // performance test, Mixtral-like and DeepSeek-like (sigmoid scores, 8 groups with 4 kept,
      // one shared expert), and a small one for CPU ranks.
      {"mixtral_ep", 4096, 4096, 14336, 8, 2, Activation::kSwiGLU, false, true},
      {"deepseek_ep", 4096, 7168, 2048, 32, 8, Activation::kSwiGLU, false, true, RuleSet::kMegatron,
       ScoreFn::kSigmoid, 8, 4, 2048},
      {"cpu_ep", 512, 256, 512, 8, 2, Activation::kSwiGLU, true, true, RuleSet::kMegatron,
       ScoreFn::kSigmoid, 4, 2, 256},
  };
  return configs;
}

const BenchConfig* find_bench_config(const std::string& name) {
  for (const BenchConfig& c : bench_configs()) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

}  // namespace switchyard::tools
