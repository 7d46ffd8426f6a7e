// Expert parallelism for MoELayer (DESIGN.md §5): moving a rank's expert buffer to the ranks that
// hold its experts and the outputs back, forward and backward, in the layer's parallel modes.
//
// Expert buffers (the rank's own routing, ROUTING.md §3), E = W * El global experts over W ranks:
//   padded [E, C, d]  (C equal on every rank: the router maxes it over ranks)
//     all_to_all -> [W, El, C, d] (rank q's rows for each local expert)
//     re-layout  -> [El, W*C, d]  the local experts' rows, computed, and back the same way.
//   packed [sum kept, d] with offsets[E+1]
//     per-expert counts exchanged (all_to_all of [E] i64), then all_to_all_v; the same re-layout
//     with variable blocks.
// Overlap (padded layout): the buffer is split along C into `overlap_degree` chunks; every
// chunk's all_to_all is started at once (they run in order on the communicator's progress
// thread) and chunk i's experts run while chunk i+1's exchange is in flight; chunk i's results
// start back as soon as they are computed.
// Data parallel (adaptive_r = 0): no token exchange; the expert weights are all-gathered for the
// call, every rank computes all E experts on its own buffer, and backward all-reduces the full
// gradients and keeps this rank's slice.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "experts/ffn.h"
#include "routing/router.h"
#include "switchyard/comm.h"
#include "switchyard/config.h"
#include "switchyard/extension.h"

namespace switchyard {

// This rank's share of the experts: [first, first + count) of num_experts.
struct ExpertShard {
  index_t num_experts = 0;  // E, global
  index_t count = 0;        // El
  index_t first = 0;
};
// Throws when E is not a multiple of the world size (and, for now, when E < world size: sharded
// experts are not supported yet).
ExpertShard expert_shard(index_t num_experts, const Communicator& comm);

// Collective: throws on every rank when a field that must agree differs across ranks.
void check_config_on_all_ranks(const MoEConfig& cfg, Communicator& comm);

// One call's settings, agreed on by every rank.
struct ParallelCall {
  int adaptive_r = 1;
  int overlap_degree = 1;
  std::optional<A2AAlgorithm> algorithm;
  index_t max_tokens = 0;  // T_max over ranks
  index_t token_base = 0;  // tokens of the lower ranks: this rank's first global token index
  Layout layout = Layout::kPadded;
};

class ExpertParallel {
 public:
  // `experts`: this rank's El local experts; `ffn`: the same object when it is the built-in FFN
  // (needed for overlap_degree > 1 and for data-parallel calls), else null.
  ExpertParallel(const MoEConfig& cfg, std::shared_ptr<Communicator> comm, ExpertShard shard,
                 ExpertNetwork& experts, FfnExperts* ffn);

  Communicator& comm() const { return *comm_; }
  const ExpertShard& shard() const { return shard_; }

  // Collective (one small all-reduce): checks that every rank passes the same options and
  // finds T_max. Throws on every rank when they differ.
  ParallelCall begin(const ForwardOptions& opt, index_t num_tokens, int top_k,
                     double capacity_factor, Layout layout, int overlap_degree);
  // Installs the router's collectives (padded capacity max; the Switch loss's global counts).
  void set_route_hooks(RouteArgs& args);

  // The expert outputs of this rank's buffer: buffer [R, d] in the plan's layout -> [R, d].
  // Collective. When training, keeps what backward needs.
  Tensor forward(const ParallelCall& call, const RoutingPlan& plan, const Tensor& buffer,
                 bool training);
  // dout [R, d] -> dbuffer [R, d]; accumulates the local experts' gradients. Collective.
  Tensor backward(const Tensor& dout);

  // Sums v over ranks (the expert-bias counts).
  void sum_over_ranks(std::vector<double>& v);

 private:
  // What one call exchanged, for its backward.
  struct Saved {
    bool valid = false;
    ParallelCall call;
    index_t capacity = 0;                        // C (padded)
    std::vector<index_t> chunk_begin;            // padded: chunk c covers [begin[c], begin[c+1])
    std::vector<FfnExperts::Saved> chunk_saved;  // padded, built-in FFN: per chunk
    std::vector<index_t> send_count;             // packed: [E] rows this rank sends per expert
    std::vector<index_t> recv_count;             // packed: [W*El] rows from rank q, expert le
  };

  Tensor forward_padded(const RoutingPlan& plan, const Tensor& buffer, bool training, Saved& s);
  Tensor backward_padded(const Tensor& dout, Saved& s);
  Tensor forward_packed(const RoutingPlan& plan, const Tensor& buffer, bool training, Saved& s);
  Tensor backward_packed(const Tensor& dout, Saved& s);
  Tensor forward_data_parallel(const RoutingPlan& plan, const Tensor& buffer, bool training);
  Tensor backward_data_parallel(const Tensor& dout);
  // The local experts on rows [El groups] (offsets [El+1]); chunk_saved when not null.
  Tensor run_experts(const Tensor& rows, const Tensor& offsets, bool training,
                     FfnExperts::Saved* chunk_saved);
  Tensor run_experts_backward(const Tensor& drows, const FfnExperts::Saved* chunk_saved);

  MoEConfig cfg_;
  std::shared_ptr<Communicator> comm_;
  ExpertShard shard_;
  ExpertNetwork& experts_;
  FfnExperts* ffn_;
  std::unique_ptr<FfnExperts> full_;  // all E experts, for data-parallel calls (made on first use)
  Saved saved_;                       // the last training forward
};

}  // namespace switchyard
