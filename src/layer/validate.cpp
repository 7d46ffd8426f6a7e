#include "layer/validate.h"

#include <algorithm>
#include <cmath>

#include "switchyard/error.h"

namespace switchyard {
namespace {

void check_k(const MoEConfig& cfg, int k) {
  SY_CHECK(k >= 1, "top_k must be >= 1, got ", k);
  const index_t E = cfg.num_experts;
  const int kk = static_cast<int>(std::min<index_t>(k, E));
  if (cfg.num_groups > 1) {
    const index_t G = cfg.num_groups;
    SY_CHECK(kk % cfg.topk_groups == 0, "group-limited routing: top_k=", kk,
             " must be a multiple of topk_groups=", cfg.topk_groups);
    SY_CHECK(kk <= cfg.topk_groups * (E / G), "group-limited routing: top_k=", kk, " exceeds the ",
             cfg.topk_groups * (E / G), " experts in ", cfg.topk_groups, " kept groups of ", E / G);
  }
  SY_CHECK(!(cfg.rules == RuleSet::kMegatron && cfg.score_fn == ScoreFn::kSoftmax &&
             !cfg.pre_softmax && !cfg.sinkhorn && kk == 1),
           "Megatron rules with softmax scores need pre_softmax when top_k is 1 (the weight of "
           "a single softmax over the chosen logit is always 1)");
}

}  // namespace

void validate_config(const MoEConfig& cfg) {
  SY_CHECK(cfg.model_dim >= 1, "model_dim must be >= 1, got ", cfg.model_dim);
  SY_CHECK(cfg.output_dim >= 0, "output_dim must be >= 0 (0: model_dim), got ", cfg.output_dim);
  SY_CHECK(cfg.hidden_size >= 1, "hidden_size must be >= 1, got ", cfg.hidden_size);
  SY_CHECK(cfg.num_experts >= 1, "num_experts must be >= 1, got ", cfg.num_experts);
  SY_CHECK(cfg.num_experts <= (index_t{1} << 30), "num_experts must be <= 2^30, got ",
           cfg.num_experts);
  SY_CHECK(is_floating(cfg.dtype), "dtype must be f64, f32, f16 or bf16, got ",
           dtype_name(cfg.dtype));
  SY_CHECK(std::isfinite(cfg.capacity_factor), "capacity_factor must be finite, got ",
           cfg.capacity_factor);
  SY_CHECK(std::isfinite(cfg.gate_noise) && cfg.gate_noise >= 0, "gate_noise must be >= 0, got ",
           cfg.gate_noise);
  SY_CHECK(cfg.input_jitter >= 0 && cfg.input_jitter < 1, "input_jitter must be in [0, 1), got ",
           cfg.input_jitter);
  SY_CHECK(std::isfinite(cfg.scaling_factor), "scaling_factor must be finite, got ",
           cfg.scaling_factor);
  SY_CHECK(cfg.overlap_degree >= 1, "overlap_degree must be >= 1, got ", cfg.overlap_degree);
  SY_CHECK(cfg.shared_expert_hidden >= 0, "shared_expert_hidden must be >= 0, got ",
           cfg.shared_expert_hidden);
  SY_CHECK(
      !(cfg.rules == RuleSet::kMegatron && cfg.expert_bias && cfg.score_fn != ScoreFn::kSigmoid),
      "Megatron rules allow expert_bias only with sigmoid scores");
  SY_CHECK(!(cfg.rules == RuleSet::kMegatron && cfg.batch_prioritized_routing),
           "batch_prioritized_routing is a Tutel rule: use rules=tutel");
  SY_CHECK(cfg.aux_loss != AuxLoss::kLoadImportance || cfg.gate_noise > 0,
           "the load/importance loss needs gate_noise > 0, got ", cfg.gate_noise);
  SY_CHECK(cfg.aux_loss != AuxLoss::kSwitchSequence || cfg.seq_len >= 1,
           "the sequence-level aux loss needs seq_len >= 1, got ", cfg.seq_len);
  SY_CHECK(cfg.sinkhorn_max_iters >= 1, "sinkhorn_max_iters must be >= 1, got ",
           cfg.sinkhorn_max_iters);
  if (cfg.num_groups > 1) {
    SY_CHECK(cfg.num_experts % cfg.num_groups == 0,
             "group-limited routing: num_experts=", cfg.num_experts,
             " is not a multiple of num_groups=", cfg.num_groups);
    SY_CHECK(cfg.topk_groups >= 1 && cfg.topk_groups <= cfg.num_groups,
             "group-limited routing: topk_groups must be in [1, num_groups=", cfg.num_groups,
             "], got ", cfg.topk_groups);
  } else {
    SY_CHECK(cfg.num_groups >= 0, "num_groups must be >= 0, got ", cfg.num_groups);
  }
  check_k(cfg, cfg.top_k);
}

int resolve_top_k(const MoEConfig& cfg, const ForwardOptions& opt) {
  const int k = opt.top_k.value_or(cfg.top_k);
  check_k(cfg, k);
  return static_cast<int>(std::min<index_t>(k, cfg.num_experts));
}

double resolve_capacity_factor(const MoEConfig& cfg, const ForwardOptions& opt) {
  const double cf = opt.capacity_factor.value_or(cfg.capacity_factor);
  SY_CHECK(std::isfinite(cf), "capacity_factor must be finite, got ", cf);
  return cf;
}

int resolve_overlap_degree(const MoEConfig& cfg, const ForwardOptions& opt) {
  const int n = opt.overlap_degree.value_or(cfg.overlap_degree);
  SY_CHECK(n >= 1, "overlap_degree must be >= 1, got ", n);
  return n;
}

Layout resolve_layout(const MoEConfig& cfg, const ForwardOptions& opt, double cf) {
  const Layout l = opt.layout.value_or(cfg.layout);
  if (l != Layout::kAuto) return l;
  if (cfg.rules == RuleSet::kMegatron) return Layout::kPacked;
  return cf > 0 ? Layout::kPadded : Layout::kPacked;
}

}  // namespace switchyard
