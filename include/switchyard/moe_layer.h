// MoELayer: routing -> dispatch -> experts -> combine, forward and backward.
//
//   MoEConfig cfg;  cfg.model_dim = 1024; cfg.hidden_size = 4096; cfg.num_experts = 8;
//   MoELayer layer(cfg);
//   ForwardResult r = layer.forward(x);              // x [..., d]
//   Tensor dx = layer.backward(dy, {.aux = 0.01});   // fills parameter gradients
//
// Threading: one layer is used by one thread at a time. backward() refers to the most recent
// forward() with training = true.
//
// Expert parallelism (CPU, MPI): build the layer with a Communicator on every rank,
//   MoELayer layer(cfg, make_mpi_communicator());
// cfg.num_experts is the GLOBAL expert count E; rank r holds the El = E / world_size experts
// [r*El, (r+1)*El), initialised to the values those experts have in a one-process layer with the
// same seed. With fewer experts than ranks (Tutel's sharded experts; E must divide the world
// size) the s = world_size / E ranks r with r / s == e share expert e, each holding hidden slice
// r % s of it (num_local_experts() = 1, first_local_expert() = e); ForwardOptions::adaptive_r
// picks how a call splits the work (src/layer/expert_layout.h). Each rank routes its own tokens
// (capacity and slots per rank, ROUTING.md §3); the padded buffer [E, C, d] travels by all_to_all
// to the experts' ranks and back; the packed (dropless) buffer by all_to_all_v. forward, backward,
// update_expert_bias and the constructor are collective: every rank calls them in the same order
// with the same options. Gradients: expert parameters (Parameter::replicated == false) are complete
// on their rank; the gate's and the shared experts' (replicated == true) hold this rank's tokens'
// share only: the caller sums them over ranks (e.g. Communicator::all_reduce), as Tutel's users do.
// CUDA layers take an NCCL communicator (see docs/parallelism.md for what is checked there).
#pragma once

#include <memory>
#include <vector>

#include "switchyard/comm.h"
#include "switchyard/config.h"
#include "switchyard/extension.h"
#include "switchyard/tensor.h"

namespace switchyard {

// Under expert parallelism: this rank's tokens (its own routing), over the E global experts.
struct RoutingStats {
  std::vector<index_t> tokens_per_expert;  // [E] rows kept per expert (after drops)
  index_t dropped_choices = 0;             // (token, choice) pairs beyond capacity
  index_t capacity = 0;                    // C: rows per expert in the padded layout
  index_t num_rows = 0;                    // rows in the expert buffer (E*C padded, kept packed)
  int top_k = 0;                           // k used (after clamping to E)
  Layout layout = Layout::kAuto;           // layout used (never kAuto)
};

struct Losses {
  double aux = 0.0;  // the configured balancing loss, unweighted (0 when kNone)
  double z = 0.0;    // router z-loss, unweighted
};

struct ForwardResult {
  Tensor y;  // same shape as x, in the layer's dtype
  // On the host: always on CPU; on CUDA when ForwardOptions::host_stats (else only top_k, layout
  // and, where the host knows them, capacity and num_rows are filled; the rest is -1 or empty).
  Losses losses;
  RoutingStats stats;
  // The same on the layer's device, filled by every forward: 0-dim f64 losses (unweighted) and
  // the [E] i64 tokens kept per expert.
  Tensor aux_loss, z_loss, tokens_per_expert;
};

class MoELayer {
 public:
  // Built-in gate and FFN experts, initialised from cfg.seed as Tutel initialises them.
  explicit MoELayer(const MoEConfig& cfg);
  // A custom gate and/or expert network; a null pointer keeps the built-in one.
  MoELayer(const MoEConfig& cfg, std::shared_ptr<Gate> gate,
           std::shared_ptr<ExpertNetwork> experts);
  // Expert parallel over `comm`'s ranks (see above); a null communicator is one process.
  // Collective: checks first that every rank passes the same configuration and throws
  // switchyard::Error on every rank otherwise ("num_experts differs across ranks: ...").
  // A custom expert network given with a communicator holds this rank's El local experts.
  MoELayer(const MoEConfig& cfg, std::shared_ptr<Communicator> comm);
  MoELayer(const MoEConfig& cfg, std::shared_ptr<Gate> gate, std::shared_ptr<ExpertNetwork> experts,
           std::shared_ptr<Communicator> comm);
  ~MoELayer();
  MoELayer(MoELayer&&) noexcept;
  MoELayer& operator=(MoELayer&&) noexcept;

  const MoEConfig& config() const;
  // The communicator (null in one process), and this rank's experts: [first_local_expert(),
  // first_local_expert() + num_local_experts()) of cfg.num_experts (with sharded experts, one
  // hidden slice of expert first_local_expert()).
  const std::shared_ptr<Communicator>& communicator() const;
  index_t num_local_experts() const;
  index_t first_local_expert() const;

  // x [..., d] on the layer's device, any floating dtype (cast to the layer's dtype); y is
  // [..., cfg.out_dim()]. T = 0 gives an empty output. Throws switchyard::Error on bad input,
  // NaN/Inf in x or the logits, or bad options; the layer stays usable.
  ForwardResult forward(const Tensor& x, const ForwardOptions& options = {});

  // dy: same shape as the last forward's y. Returns dx (shape and dtype of that x) and
  // accumulates parameter gradients.
  Tensor backward(const Tensor& dy, const LossWeights& weights = {});

  // Gate parameters first ("gates.0.wg.weight"), then experts ("experts.batched_fc1_w", ...),
  // then shared experts ("shared_experts.batched_fc1_w", ...): Tutel's state_dict keys.
  std::vector<Parameter*> parameters();
  Parameter& parameter(const std::string& name);  // throws when no parameter has that name
  // Zeroes every gradient, or with set_to_none frees them (Parameter::grad undefined): the next
  // backward then creates them, the built-in experts' weight gradients on the GPU by GEMMs that
  // write without reading old values, so that they take no memory before backward and half the
  // traffic in it. Gradients are defined again once backward returns.
  void zero_grad(bool set_to_none = false);

  // Aux-loss-free balancing: bias[e] += rate * sign(mean(count) - count[e]) over the token
  // counts accumulated by training forwards since the last update (summed over ranks under
  // expert parallelism: then collective); then resets the counts.
  void update_expert_bias(double rate = 1e-3);
  Tensor expert_bias() const;  // [E] f32 on the layer's device; zeros unless cfg.expert_bias

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace switchyard
