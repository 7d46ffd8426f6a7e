// Where the experts live under expert parallelism (DESIGN.md §5): which part of the layer's
// experts each rank stores, which part a call computes on each rank, and the views that move
// FFN weights between the two.
//
// Stored (fixed for the layer's life), E experts over W ranks:
//   E >= W: rank p stores experts [p*El, (p+1)*El), El = E / W, whole.
//   E <  W (Tutel's sharded experts): s = W / E ranks share each expert; rank p stores expert
//     p / s, hidden slice p % s of s (fc1_w, fc2_w and fc1_bias rows; gated experts slice the
//     gate and the up projection alike), and columns [j*dc, (j+1)*dc) of its fc2 bias
//     (dc = ceil(d / s), j = p % s, zero-padded past d) — as Tutel stores them.
//
// Computed by one call with adaptive_r = r (r > 0; r = 0, data parallel, is not a layout):
//   E >= W: r must divide W. Groups of r consecutive ranks; group g computes its r*El experts
//     [g*r*El, (g+1)*r*El), rank j of the group hidden slice j of r of each, on all their rows.
//     r = 1 is plain expert parallelism.
//   E <  W: r must divide s (Tutel's valid_rs). The s ranks of expert e split into r slices of
//     the hidden dimension times G = s / r chunks of e's rows: rank j of the group computes
//     hidden slice j / G of r on row chunk j % G of G. r = s (the default) computes exactly
//     what each rank stores; r = 1 computes whole experts on 1/s of the rows each.
// The r partial outputs of a row (one per hidden slice) are summed in slice order at the rank
// that owns the row; the fc2 bias is added by hidden slice 0 only, so the sum holds it once.
#pragma once

#include <vector>

#include "experts/ffn.h"
#include "switchyard/index.h"
#include "switchyard/tensor.h"

namespace switchyard {

class Communicator;

// What rank `rank` stores.
struct ExpertShard {
  index_t num_experts = 0;  // E, global
  index_t count = 0;        // experts stored (El, or 1 when sharded)
  index_t first = 0;        // the first of them
  index_t num_slices = 1;   // s: ranks sharing each expert's hidden dimension (W / E when E < W)
  index_t slice = 0;        // this rank's hidden slice of its expert
};
// Throws when neither E is a multiple of W nor W a multiple of E, or when the hidden size does
// not split into s slices.
ExpertShard expert_shard(index_t num_experts, index_t hidden_size, int rank, int world_size);

// What one call with adaptive_r = r > 0 computes on each rank.
struct ComputeLayout {
  index_t num_experts = 0;       // E
  index_t experts_per_rank = 0;  // m
  index_t num_slices = 1;        // r: hidden slices per expert
  index_t num_row_chunks = 1;    // G: chunks of each expert's rows
  int world_size = 1;
  bool sharded_store = false;  // E < W

  index_t first_expert(int rank) const;
  index_t slice(int rank) const;
  index_t row_chunk(int rank) const;
};
// Throws (the same message on every rank) when r does not fit the world size or the experts.
ComputeLayout compute_layout(const ExpertShard& shard, index_t hidden_size, int world_size,
                             int adaptive_r);

// The FFN parameters a network holds, in FfnExperts::parameters() order.
enum class FfnParam { kFc1W, kFc2W, kFc1Bias, kFc2Bias };
std::vector<FfnParam> ffn_params(const FfnShape& shape);

// A part of the layer's experts: experts [first, first + count), hidden slice `slice` of
// `num_slices` (the fc2 bias is never hidden-sliced: all d columns of those experts).
struct ExpertRegion {
  index_t first = 0;
  index_t count = 0;
  index_t slice = 0;
  index_t num_slices = 1;
};
// The region's part of a full parameter of the layer (`full` shaped like the parameter of a
// network holding all E experts with the whole hidden size `hidden`), as a view shaped
// [count, P, hidden / num_slices, rest] (P = 2 for the gated fc1, else 1; rest = d, or 1 for
// biases); `part` views a region-sized network's parameter the same way.
Tensor region_view(const Tensor& full, FfnParam param, bool gated, index_t hidden,
                   const ExpertRegion& region);
Tensor part_view(const Tensor& part, FfnParam param, bool gated, index_t num_experts);

// Columns [begin, begin + length) of the fc2 bias held by hidden slice `slice` of `num_slices`
// in the stored layout (ceil(d / s) columns each, the last ones possibly fewer or none).
struct ColumnRange {
  index_t begin = 0;
  index_t length = 0;
};
ColumnRange fc2_bias_columns(index_t out_dim, index_t slice, index_t num_slices);

}  // namespace switchyard
