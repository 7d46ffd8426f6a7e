// The flags of `switchyard train`: Tutel helloworld's names for the model and the loop, one flag
// per routing option of MoEConfig. Defaults (smaller than Tutel's GPU defaults) make a run take
// a few seconds on a 2-core CPU while the loss falls well below half of its first value.
#include <CLI/CLI.hpp>
#include <cstdlib>
#include <memory>
#include <string>

#include "commands.h"
#include "flag_checks.h"
#include "run_info.h"
#include "train.h"

namespace switchyard::tools {
namespace {

// Values as typed; enums are parsed (by the library's parse_* functions) after CLI11's parse.
struct TrainFlags {
  TrainOptions options;
  std::string dtype = "f32";
  std::string device = "cpu";
  std::string optimizer = "adam";
  std::string rules = "tutel";
  std::string gate = "linear";
  std::string score_fn = "softmax";
  std::string drop_policy = "probs";
  std::string layout = "auto";
  std::string aux_loss = "gshard";
  std::string activation = "relu";
  bool no_fc1_bias = false;
  bool no_fc2_bias = false;
  index_t num_global_experts = 0;
  std::string parallel = "ep";
  std::string a2a = "";  // empty: the communicator's default (auto)
};

// The model's defaults; the loop's are TrainOptions' own.
TrainFlags default_flags() {
  TrainFlags f;
  MoEConfig& c = f.options.moe;
  c.model_dim = 64;
  c.hidden_size = 128;
  c.num_experts = 4;
  return f;
}

TrainOptions to_options(const TrainFlags& f) {
  TrainOptions o = f.options;
  MoEConfig& c = o.moe;
  c.dtype = parse_dtype_flag(f.dtype);
  c.device = parse_device_flag(f.device);
  o.optimizer.kind = parse_flag("--optimizer", f.optimizer, "sgd|adam", parse_optimizer);
  c.rules = parse_flag("--rules", f.rules, "tutel|megatron", parse_rule_set);
  c.gate = parse_flag("--gate", f.gate, "linear|cosine", parse_gate_type);
  c.score_fn = parse_flag("--score_fn", f.score_fn, "softmax|sigmoid", parse_score_fn);
  c.drop_policy = parse_flag("--drop_policy", f.drop_policy, "probs|position", parse_drop_policy);
  c.layout = parse_flag("--layout", f.layout, "auto|padded|packed", parse_layout);
  c.aux_loss = parse_flag("--aux_loss", f.aux_loss, "none|gshard|load_importance|switch|switch_seq",
                          parse_aux_loss);
  c.activation = parse_flag("--activation", f.activation, "relu|gelu|gelu_tanh|silu|swiglu|geglu",
                            parse_activation);
  c.has_fc1_bias = !f.no_fc1_bias;
  c.has_fc2_bias = !f.no_fc2_bias;
  // Tokens are batch-major [batch_size, num_tokens]: a sequence is one batch row by default.
  if (c.seq_len == 0) c.seq_len = o.num_tokens;

  // Expert parallelism: under mpirun (or with --num_global_experts) every layer gets the world
  // communicator; E = --num_global_experts, else --num_local_experts per rank (Tutel's rule).
  if (f.parallel == "ep") {
    o.adaptive_r.reset();  // the layer's default: 1, or s for sharded experts (Tutel's "model")
  } else if (f.parallel == "dp") {
    o.adaptive_r = 0;
  } else if (f.parallel.rfind("adaptive:", 0) == 0) {
    const std::string r = f.parallel.substr(9);
    if (r.empty() || r.find_first_not_of("0123456789") != std::string::npos || r.size() > 4)
      throw UsageError("--parallel adaptive:r needs a whole number r >= 0, got '" + f.parallel +
                       "'");
    o.adaptive_r = std::stoi(r);
  } else {
    throw UsageError(
        "--parallel must be ep|dp|adaptive:r (r = 0 data parallel, 1 expert "
        "parallel, r > 1 r-way sharded experts), got '" +
        f.parallel + "'");
  }
  if (!f.a2a.empty())
    o.a2a_algorithm = parse_flag("--a2a", f.a2a, "flat|2dh|pipelined|auto", parse_a2a_algorithm);
  if (launched_by_mpi() || f.num_global_experts > 0) {
    CommOptions co;
    if (o.a2a_algorithm) co.algorithm = *o.a2a_algorithm;
    o.comm = world_communicator(c.device, co);
    c.device = o.comm->device();  // one GPU per rank, chosen by the communicator (MPI: cpu)
    c.num_experts =
        f.num_global_experts > 0 ? f.num_global_experts : c.num_experts * o.comm->size();
  }
  return o;
}

}  // namespace

Command add_train_command(CLI::App& app) {
  auto flags = std::make_shared<TrainFlags>(default_flags());
  TrainFlags& f = *flags;
  TrainOptions& o = f.options;
  MoEConfig& c = o.moe;

  CLI::App* sub = app.add_subcommand(
      "train",
      "Train a student MoE to imitate a fixed random teacher MoE (same configuration, other "
      "seed) by MSE on fresh random batches; prints step, loss, aux loss, time and TFLOPS.");
  sub->option_defaults()->always_capture_default();
  sub->footer(
      "Each step: x [batch_size*num_tokens, model_dim] ~ N(0,1) drawn from (--seed, step);\n"
      "target = teacher(x); loss = mean((student(x) - target)^2); backward with\n"
      "aux = --aux_weight, z = --z_weight; optimizer step. With --num_layers N both stacks are\n"
      "residual: h = h + moe(h). aux_loss and z_loss are unweighted means over layers; dropped\n"
      "counts (token, choice) pairs over capacity, summed over layers. TFLOPS count only the\n"
      "expert GEMMs of routed tokens: 2*T*k*d*h per weight matrix (2, or 3 for swiglu/geglu),\n"
      "x3 for forward + backward (x1 with --eval); ms is the student's step, not the teacher's.\n"
      "--json keys: step, loss, aux_loss, z_loss, ms, tflops, dropped.\n"
      "Exit codes: 0 ok, 1 failure while running (e.g. a NaN loss), 2 bad flags or a\n"
      "configuration the library rejects.");

  const char* kModel = "Model (Tutel helloworld names)";
  sub->add_option("--batch_size", o.batch_size, "Sequences per batch")
      ->check(at_least(1))
      ->group(kModel);
  sub->add_option("--num_tokens", o.num_tokens, "Tokens per sequence")
      ->check(at_least(1))
      ->group(kModel);
  sub->add_option("--model_dim", c.model_dim, "Model width d")->check(at_least(1))->group(kModel);
  sub->add_option("--hidden_size", c.hidden_size, "Hidden width h of each expert")
      ->check(at_least(1))
      ->group(kModel);
  sub->add_option("--num_local_experts", c.num_experts,
                  "Experts per rank (E in one process; E = this x ranks under mpirun)")
      ->check(at_least(1))
      ->group(kModel);
  sub->add_option("--top", c.top_k, "Experts per token k (clamped to E)")
      ->check(at_least(1))
      ->group(kModel);
  sub->add_option("--capacity_factor", c.capacity_factor,
                  "> 0 fixed capacity, 0 dropless, < 0 dropless up to -capacity_factor")
      ->group(kModel);
  sub->add_option("--num_layers", o.num_layers, "MoE layers, residual: h = h + moe(h)")
      ->check(at_least(1))
      ->group(kModel);
  sub->add_option("--dtype", f.dtype, "f32|f64|bf16|f16")->group(kModel);
  sub->add_option("--device", f.device,
                  "cpu|cuda[:N] (cuda needs a CUDA build and a GPU; under mpirun each rank runs "
                  "on the GPU its NCCL communicator picks)")
      ->group(kModel);
  sub->add_option("--seed", o.seed, "Seed of the data and of both initialisations")->group(kModel);

  const char* kLoop = "Training loop";
  sub->add_option("--num_steps", o.num_steps, "Steps")->check(at_least(1))->group(kLoop);
  sub->add_option("--optimizer", f.optimizer, "sgd|adam (f32 master copies for bf16/f16)")
      ->group(kLoop);
  sub->add_option("--lr", o.optimizer.lr, "Learning rate")->check(positive())->group(kLoop);
  sub->add_option("--aux_weight,--l_aux_wt", o.loss_weights.aux,
                  "Weight of the balancing loss in the objective")
      ->group(kLoop);
  sub->add_option("--z_weight", o.loss_weights.z, "Weight of the router z-loss")->group(kLoop);
  sub->add_flag("--eval", o.eval,
                "Forward-only steps, as Tutel's --eval: routing in evaluation mode (no noise, "
                "jitter or sinkhorn), no backward, no update; TFLOPS count the forward pass")
      ->group(kLoop);

  const char* kRouting = "Routing (MoEConfig; see ROUTING.md)";
  sub->add_option("--rules", f.rules, "tutel|megatron")->group(kRouting);
  sub->add_option("--gate", f.gate, "linear|cosine")->group(kRouting);
  sub->add_flag("--fp32_gate", c.fp32_gate, "Gate weights and GEMM in f32")->group(kRouting);
  sub->add_flag("--use_tensorcore", c.use_tensorcore,
                "f32 on CUDA: TF32 tensor cores for the expert GEMMs (the gate stays FP32)")
      ->group(kModel);
  sub->add_option("--cosine_proj_dim", c.cosine_proj_dim, "Cosine gate projection width")
      ->check(at_least(1))
      ->group(kRouting);
  sub->add_option("--cosine_init_t", c.cosine_init_t, "Cosine gate initial temperature")
      ->group(kRouting);
  sub->add_option("--gate_noise", c.gate_noise, "Tutel: logits + gate_noise * N(0,1) / E")
      ->check(at_least(0))
      ->group(kRouting);
  sub->add_option("--input_jitter", c.input_jitter, "Megatron: gate input * U(1-eps, 1+eps)")
      ->check(at_least(0))
      ->group(kRouting);
  sub->add_option("--score_fn", f.score_fn, "softmax|sigmoid")->group(kRouting);
  sub->add_flag("--pre_softmax", c.pre_softmax, "Megatron: softmax before top-k")->group(kRouting);
  sub->add_option("--normalize_gate", c.normalize_gate, "Renormalise the k weights (bool)")
      ->group(kRouting);
  sub->add_option("--scaling_factor", c.scaling_factor, "Multiplies the final weights")
      ->group(kRouting);
  sub->add_flag("--expert_bias", c.expert_bias,
                "Aux-loss-free balancing: select by score + bias, bias updated every step")
      ->group(kRouting);
  sub->add_option("--bias_update_rate", o.bias_update_rate, "Rate of update_expert_bias")
      ->check(at_least(0))
      ->group(kRouting);
  sub->add_option("--num_groups", c.num_groups, "Expert groups (group-limited routing when > 1)")
      ->check(at_least(0))
      ->group(kRouting);
  sub->add_option("--topk_groups", c.topk_groups, "Groups kept per token")
      ->check(at_least(0))
      ->group(kRouting);
  sub->add_flag("--sinkhorn", c.sinkhorn, "Megatron sinkhorn balancing (training only)")
      ->group(kRouting);
  sub->add_option("--sinkhorn_max_iters", c.sinkhorn_max_iters, "Sinkhorn iterations at most")
      ->check(at_least(1))
      ->group(kRouting);
  sub->add_option("--sinkhorn_tol", c.sinkhorn_tol, "Sinkhorn tolerance")
      ->check(at_least(0))
      ->group(kRouting);
  sub->add_flag("--batch_prioritized_routing", c.batch_prioritized_routing,
                "Tutel: fill slots by descending top score")
      ->group(kRouting);
  sub->add_option("--drop_policy", f.drop_policy, "probs|position (Megatron rules)")
      ->group(kRouting);
  sub->add_option("--layout", f.layout, "auto|padded|packed")->group(kRouting);
  sub->add_option("--overlap_degree,--a2a_ffn_overlap_degree", c.overlap_degree,
                  "Capacity alignment; under mpirun also the chunks of the padded buffer whose "
                  "all-to-all overlaps the expert computation")
      ->check(at_least(1))
      ->group(kRouting);
  sub->add_option("--is_postscore", c.is_postscore,
                  "Weight expert outputs at combine (else rows at encode) (bool)")
      ->group(kRouting);
  sub->add_option("--aux_loss", f.aux_loss, "none|gshard|load_importance|switch|switch_seq")
      ->group(kRouting);
  sub->add_option("--seq_len", c.seq_len, "Tokens per sequence for switch_seq (0: --num_tokens)")
      ->check(at_least(0))
      ->group(kRouting);

  const char* kExperts = "Experts";
  sub->add_option("--activation", f.activation, "relu|gelu|gelu_tanh|silu|swiglu|geglu")
      ->group(kExperts);
  sub->add_flag("--no_fc1_bias", f.no_fc1_bias, "Experts without the fc1 bias")->group(kExperts);
  sub->add_flag("--no_fc2_bias", f.no_fc2_bias, "Experts without the fc2 bias")->group(kExperts);
  sub->add_option("--shared_expert_hidden", c.shared_expert_hidden,
                  "Hidden width of a shared expert on every token (0: none)")
      ->check(at_least(0))
      ->group(kExperts);

  const char* kParallel = "Parallelism (under mpirun -np N; see docs/parallelism.md)";
  sub->add_option("--num_global_experts", f.num_global_experts,
                  "Experts E over all ranks (0: --num_local_experts x ranks); a multiple of the "
                  "ranks, or a divisor of them (each expert then sharded over ranks / E)")
      ->check(at_least(0))
      ->group(kParallel);
  sub->add_option("--parallel", f.parallel,
                  "ep (expert parallel; with fewer experts than ranks each rank computes its "
                  "stored slice) | dp (data parallel: weights gathered per call, adaptive_r 0) | "
                  "adaptive:r (Tutel's adaptive_r: 0, 1, or r-way sharded experts)")
      ->group(kParallel);
  sub->add_option("--a2a", f.a2a, "All-to-all algorithm: flat|2dh|pipelined|auto (default auto)")
      ->group(kParallel);

  const char* kOutput = "Output";
  sub->add_flag("--json", o.json, "One JSON object per step instead of a text line")
      ->group(kOutput);
  sub->add_option("--log_interval", o.log_interval,
                  "Print every n-th step (and the first and the last); a progress line on a "
                  "terminal's stderr shows the others")
      ->check(at_least(1))
      ->group(kOutput);

  return [flags] { return run_train(to_options(*flags)); };
}

}  // namespace switchyard::tools
