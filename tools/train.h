// `switchyard train`: a Tutel-helloworld-style training loop with a target that can be learned.
//
// A fixed "teacher" stack of MoE layers (same configuration, different seed) maps random inputs
// to targets; a "student" stack starts from its own initialisation and learns to imitate it by
// MSE. Each step draws a fresh batch x [batch_size * num_tokens, model_dim] from (seed, step), so
// runs are reproducible and every batch is new. Both stacks are residual:
// h <- h + moe_l(h) for l = 1..num_layers.
//
// Under mpirun (a communicator in `comm`), both stacks are expert parallel: each rank draws its
// own batch, holds moe.num_experts / ranks experts of every layer, and sums the gradients of the
// replicated parameters (gate, shared experts) over ranks before the optimizer step, so the
// objective is the sum of the ranks' losses (as Tutel's helloworld). Rank 0 prints the loss
// averaged over ranks, the dropped choices and the TFLOPS summed over ranks.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "optim.h"
#include "switchyard/switchyard.h"

namespace switchyard::tools {

struct TrainOptions {
  MoEConfig moe;  // every layer's configuration; moe.seed is ignored (see seed below)
  index_t batch_size = 8;
  index_t num_tokens = 64;
  int num_layers = 1;
  int num_steps = 100;
  std::uint64_t seed = 1;  // the data, the student's and the teacher's initialisation
  OptimizerOptions optimizer{OptimizerKind::kAdam, /*lr=*/1e-2};
  LossWeights loss_weights{/*aux=*/0.01, /*z=*/0.0};  // in the student's objective
  double bias_update_rate = 1e-3;  // update_expert_bias each step when moe.expert_bias
  // Tutel's --eval: every step is forward only (training = false: no noise, jitter or
  // sinkhorn; no backward, no update); TFLOPS count the forward pass alone.
  bool eval = false;
  bool json = false;     // one JSON object per step on stdout instead of a text line
  int log_interval = 1;  // print every n-th step (and always the first and the last)
  // Expert parallelism: the communicator (null: one process), the parallel mode of every call
  // (Tutel's adaptive_r: unset the layer's default, 0 data parallel, 1 expert parallel, r > 1
  // r-way sharded experts) and the all-to-all algorithm.
  std::shared_ptr<Communicator> comm;
  std::optional<int> adaptive_r;
  std::optional<A2AAlgorithm> a2a_algorithm;
};

// Runs the loop, printing to stdout; returns the exit code. Throws UsageError when the layers
// cannot be built or the first step fails on the configuration (switchyard::Error).
int run_train(const TrainOptions& options);

}  // namespace switchyard::tools
