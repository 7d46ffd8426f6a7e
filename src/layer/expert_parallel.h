// Expert parallelism for MoELayer (DESIGN.md §5): moving a rank's expert buffer to the ranks that
// compute its experts and the outputs back, forward and backward, in the layer's parallel modes.
// Where experts are stored and computed: layer/expert_layout.h.
//
// Expert buffers (the rank's own routing, ROUTING.md §3): padded [E, C, d] (C equal on every rank:
// the router maxes it over ranks) or packed [sum kept, d] with offsets[E+1] (every rank's [E]
// counts are all-reduced first). One exchange serves every mode with adaptive_r = r > 0: rank q
// is sent, for each expert it computes, that expert's rows (its row chunk of them when sharded
// experts split the rows); it re-lays them out by expert ([m][W] blocks), runs its experts (its
// hidden slice of them), and sends each block back, where the r hidden slices' partial outputs
// of a row are summed in slice order (a plain copy when r = 1).
// Overlap (both layouts): every (rank, expert) block is split into `overlap_degree` near-equal
// row pieces; chunk i is piece i of every block. Every chunk's all_to_all_v is started at once
// (they run in order on the communicator's progress thread); chunk i's experts run while chunk
// i+1's exchange is in flight, and its results start back as soon as they are computed. Each
// row's output is computed from that row alone, so y and dx are the same as with one chunk; the
// expert weight gradients sum the same rows in a different grouping (equal to rounding).
// Weights: a mode that computes parts of experts this rank does not store (r > 1, r < s for
// sharded experts, and data parallel, adaptive_r = 0) all-gathers those parameters for the call
// and all-reduces their gradients, keeping this rank's stored part; parts it stores are copied.
// Data parallel (adaptive_r = 0): no token exchange; every rank computes all E experts on its
// own buffer.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "experts/ffn.h"
#include "layer/expert_layout.h"
#include "routing/router.h"
#include "switchyard/comm.h"
#include "switchyard/config.h"
#include "switchyard/extension.h"

namespace switchyard {

// Collective: throws on every rank when a field that must agree differs across ranks.
void check_config_on_all_ranks(const MoEConfig& cfg, Communicator& comm);

// One call's settings, agreed on by every rank.
struct ParallelCall {
  int adaptive_r = 1;  // resolved: the option, else the layer's default (s; 1 when E >= W)
  int overlap_degree = 1;
  std::optional<A2AAlgorithm> algorithm;
  index_t max_tokens = 0;  // T_max over ranks
  index_t token_base = 0;  // tokens of the lower ranks: this rank's first global token index
  Layout layout = Layout::kPadded;
};

class ExpertParallel {
 public:
  // `experts`: this rank's stored experts (layer/expert_layout.h); `ffn`: the FFN that computes
  // them when they are the built-in FFN (the slice network of a ShardedFfnExperts), else null (a
  // custom network: plain expert parallelism only, in one chunk).
  ExpertParallel(const MoEConfig& cfg, std::shared_ptr<Communicator> comm, ExpertShard shard,
                 ExpertNetwork& experts, FfnExperts* ffn);

  Communicator& comm() const { return *comm_; }
  const ExpertShard& shard() const { return shard_; }

  // Collective (one small all-reduce): checks that every rank passes the same options and
  // finds T_max. Throws on every rank when they differ or adaptive_r does not fit.
  ParallelCall begin(const ForwardOptions& opt, index_t num_tokens, int top_k,
                     double capacity_factor, Layout layout, int overlap_degree);
  // Installs the router's collectives where this call needs them (padded capacity_factor <= 0:
  // the largest need; the batch-level Switch loss: its global counts).
  void set_route_hooks(RouteArgs& args);

  // The expert outputs of this rank's buffer: buffer [R, d] in the plan's layout -> [R, d].
  // Collective. When training, keeps what backward needs.
  Tensor forward(const ParallelCall& call, const RoutingPlan& plan, const Tensor& buffer,
                 bool training);
  // dout [R, d] -> dbuffer [R, d]; accumulates the stored experts' gradients. Collective.
  Tensor backward(const Tensor& dout);

  // Sums v over ranks (the expert-bias counts).
  void sum_over_ranks(std::vector<double>& v);

 private:
  struct RowRange {
    index_t begin = 0;
    index_t length = 0;
  };
  // One overlap chunk of the exchange.
  struct Chunk {
    std::vector<RowRange> send;       // [W*m]: this rank's rows for (rank q, q's expert le)
    std::vector<index_t> recv_count;  // [W*m]: rows from rank p for this rank's expert le
    FfnExperts::Saved saved;          // the built-in FFN's forward, for backward
  };
  // What one call exchanged, for its backward.
  struct Saved {
    bool valid = false;
    ParallelCall call;
    ComputeLayout layout;
    index_t num_rows = 0;       // R
    FfnExperts* net = nullptr;  // what computed (null: the custom network experts_)
    ExpertRegion region;        // the part of the experts net holds
    std::vector<Chunk> chunks;
  };

  std::vector<Chunk> plan_chunks(const ParallelCall& call, const ComputeLayout& layout,
                                 const RoutingPlan& plan);
  // Sends `rows` [R, d] out as the chunks say, runs `compute` on each chunk's arrived rows
  // ([m][W] blocks; offsets [m+1]; it returns [rows, out_width]) and sums the returned rows back
  // into [R, out_width] (forward: the experts' output width; backward: d).
  Tensor exchange(const Tensor& rows, index_t out_width, Saved& s,
                  const std::function<Tensor(Chunk&, const Tensor&, const Tensor&)>& compute);
  // The network that computes `region` (cached per shape), its weights filled for the call.
  FfnExperts* network_for(const ExpertRegion& region);
  void gather_weights(FfnExperts& net, const ExpertRegion& region);
  void reduce_gradients(FfnExperts& net, const ExpertRegion& region);
  Tensor forward_data_parallel(const RoutingPlan& plan, const Tensor& buffer, bool training);

  MoEConfig cfg_;
  std::shared_ptr<Communicator> comm_;
  ExpertShard shard_;
  ExpertNetwork& experts_;
  FfnExperts* ffn_;
  FfnShape full_shape_;                 // all E experts, whole hidden size
  std::vector<Parameter*> stored_;      // the stored parameters (built-in FFN only)
  std::vector<FfnParam> stored_roles_;  // which FFN parameter each is (as full_shape_'s)
  std::unique_ptr<FfnExperts> full_;    // all E experts: gather target, data-parallel network
  std::map<std::tuple<index_t, index_t, bool>, std::unique_ptr<FfnExperts>> networks_;
  Saved saved_;  // the last training forward
};

}  // namespace switchyard
