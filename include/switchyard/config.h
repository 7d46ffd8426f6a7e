// MoEConfig: everything that describes one MoE layer. The exact semantics of each routing
// option are in docs/routing.md; defaults follow Tutel's moe_layer.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "switchyard/comm.h"
#include "switchyard/device.h"
#include "switchyard/dtype.h"
#include "switchyard/index.h"
#include "switchyard/tensor.h"

namespace switchyard {

// Which framework's routing rules to follow where Tutel and Megatron-Core differ.
enum class RuleSet { kTutel, kMegatron };
enum class GateType { kLinear, kCosine };
enum class ScoreFn { kSoftmax, kSigmoid };
// Expert activations; kSwiGLU and kGeGLU are gated (fc1 has 2h rows: gate rows then up rows).
enum class Activation { kRelu, kGelu, kGeluTanh, kSilu, kSwiGLU, kGeGLU };
// Expert buffer layouts: padded [E, C, d] or packed rows with offsets[E+1]. kAuto: padded when
// capacity_factor > 0 under Tutel's rules, packed otherwise (Megatron: packed).
enum class Layout { kAuto, kPadded, kPacked };
// Megatron's drop policies: keep the C choices with the largest weights, or the earliest tokens.
enum class DropPolicy { kProbs, kPosition };
enum class AuxLoss { kNone, kGShard, kLoadImportance, kSwitch, kSwitchSequence };

const char* to_string(RuleSet v);
const char* to_string(GateType v);
const char* to_string(ScoreFn v);
const char* to_string(Activation v);
const char* to_string(Layout v);
const char* to_string(DropPolicy v);
const char* to_string(AuxLoss v);
// Parse the names printed by to_string (e.g. "megatron", "swiglu", "packed"); throw on others.
RuleSet parse_rule_set(const std::string& s);
GateType parse_gate_type(const std::string& s);
ScoreFn parse_score_fn(const std::string& s);
Activation parse_activation(const std::string& s);
Layout parse_layout(const std::string& s);
DropPolicy parse_drop_policy(const std::string& s);
AuxLoss parse_aux_loss(const std::string& s);
bool is_gated(Activation a);

struct MoEConfig {
  // Shapes and storage.
  index_t model_dim = 0;    // d
  index_t hidden_size = 0;  // h, per expert
  index_t num_experts = 0;  // E
  // The experts' output width, and so the layer's (Tutel's output_dim): fc2 maps h to it and y is
  // [..., output_dim]. 0: model_dim. Shared experts have the same output width.
  index_t output_dim = 0;
  int top_k = 2;  // k; clamped to E, 0 is an error
  DType dtype = DType::kF32;
  Device device;
  std::uint64_t seed = 1;  // parameter initialisation and the noise/jitter streams
  // false: the experts' parameters are allocated as zeros, not drawn from the seed, for a caller
  // that sets every one itself (the PyTorch binding, whose parameters are torch's). Drawing them
  // costs time in proportion to their number (minutes for billions on one core).
  bool init_parameters = true;
  // CUDA, f32: the expert matrix products may run on TF32 tensor cores (Tutel's use_tensorcore;
  // about 3 decimal digits per product instead of FP32's 7). The gate's product stays FP32 so
  // that routing does not change. No effect on the CPU or in other dtypes.
  bool use_tensorcore = false;

  // Gate.
  RuleSet rules = RuleSet::kTutel;
  GateType gate = GateType::kLinear;
  bool fp32_gate = false;  // gate weights in f32, x cast to f32 for the gate GEMM
  index_t cosine_proj_dim = 256;
  double cosine_init_t = 0.5;
  double gate_noise = 0.0;    // Tutel: logits + gate_noise * N(0,1) / E, training only
  double input_jitter = 0.0;  // Megatron: gate input * U(1-eps, 1+eps), training only
  ScoreFn score_fn = ScoreFn::kSoftmax;
  bool pre_softmax = false;  // Megatron: softmax before top-k (else top-k of logits, then softmax)
  bool normalize_gate = true;  // renormalise the k weights (k > 1)
  double scaling_factor = 1.0;
  bool expert_bias = false;  // aux-loss-free balancing: selection uses score + bias
  int num_groups = 0;        // group-limited routing when > 1
  int topk_groups = 0;       // groups kept per token
  bool sinkhorn = false;     // Megatron sinkhorn balancing (training only)
  int sinkhorn_max_iters = 100;
  double sinkhorn_tol = 1e-4;

  // Capacity and dispatch.
  double capacity_factor = 1.0;  // > 0 fixed, 0 dropless, < 0 dropless up to -capacity_factor
  bool batch_prioritized_routing = false;       // Tutel rules
  DropPolicy drop_policy = DropPolicy::kProbs;  // Megatron rules
  Layout layout = Layout::kAuto;                // kPadded under Megatron rules is pad_to_capacity
  int overlap_degree = 1;    // capacity alignment (sharded_count * overlap_degree)
  bool is_postscore = true;  // weight expert outputs at combine (else rows at encode)

  // Losses (returned unweighted; backward takes their weights).
  AuxLoss aux_loss = AuxLoss::kGShard;
  index_t seq_len = 0;  // for kSwitchSequence: tokens per sequence (batch-major)

  // Experts.
  Activation activation = Activation::kRelu;
  bool has_fc1_bias = true;
  bool has_fc2_bias = true;
  index_t shared_expert_hidden = 0;  // hidden size of one shared expert on every token; 0: none

  index_t out_dim() const { return output_dim > 0 ? output_dim : model_dim; }
};

// Per-call overrides; none of them moves or re-shards weights. Under expert parallelism every
// rank must pass the same options (forward checks that and throws on every rank otherwise).
struct ForwardOptions {
  std::optional<double> capacity_factor;
  std::optional<int> top_k;
  std::optional<Layout> layout;
  bool training = true;  // noise, jitter, sinkhorn and expert-bias counting only when training
  // On CUDA, copy the losses, the token counts and the NaN/Inf flag of the logits to the host
  // (ForwardResult::losses and ::stats; one sync per forward). false: they stay on the device
  // (ForwardResult::aux_loss, ...) and a dropless forward needs no host sync (it can be captured
  // in a CUDA graph); NaN/Inf logits are then reported by the next forward that syncs. The CPU
  // backend always fills both.
  bool host_stats = true;
  // Capacity alignment (times the ranks sharing an expert, for sharded experts) and, for a layer
  // with a communicator, the number of chunks each rank's rows of each expert are split into so
  // that chunk i's all-to-all overlaps chunk i-1's expert computation (both layouts; outputs and
  // input gradients do not depend on it). Default: cfg.overlap_degree.
  std::optional<int> overlap_degree;
  // Layers with a communicator only. The all-to-all algorithm (default: the communicator's).
  std::optional<A2AAlgorithm> a2a_algorithm;
  // Parallel mode (Tutel's adaptive_r), layers with a communicator only; it never re-shards the
  // stored weights (DESIGN.md §5, src/layer/expert_layout.h):
  //   0      data parallel: every rank computes all experts on its own tokens (expert weights
  //          gathered for the call, their gradients reduced back to the ranks storing them);
  //   1      expert parallel: each expert computed whole on its tokens (with fewer experts than
  //          ranks, by the s ranks sharing it, each on 1/s of its rows, weights gathered);
  //   r > 1  r-way sharded experts: each expert's hidden dimension split over r ranks that all
  //          see its tokens, their partial outputs summed. r must divide the world size, and
  //          with fewer experts E than ranks W it must divide s = W / E.
  // Default: s for sharded experts (each rank computes the slice it stores), else 1.
  std::optional<int> adaptive_r;
};

// Weights of the losses in the objective whose gradient backward computes:
// sum(y * dy) + aux * l_aux + z * l_z.
struct LossWeights {
  double aux = 0.0;
  double z = 0.0;
  // Or 1-element floating tensors on the layer's device holding aux and z (each replaces its
  // double when defined): a CUDA backward then reads them on the device, with no host sync (the
  // PyTorch binding passes autograd's gradients of l_aux and l_z this way). They are not checked
  // for NaN/Inf there, as the doubles are.
  Tensor aux_tensor{}, z_tensor{};  // (brace-initialised: no missing-initializer warnings)
};

}  // namespace switchyard
