#include "layer/expert_layout.h"

#include "switchyard/error.h"

namespace switchyard {

ExpertShard expert_shard(index_t E, index_t hidden, int rank, int W) {
  SY_CHECK(E >= 1, "expert parallelism: num_experts must be >= 1, got ", E);
  if (E >= W) {
    SY_CHECK(E % W == 0, "expert parallelism: num_experts=", E, " must be a multiple of the ", W,
             " ranks (each rank holds num_experts / ranks), or divide them (sharded experts)");
    const index_t El = E / W;
    return ExpertShard{E, El, rank * El, 1, 0};
  }
  SY_CHECK(W % E == 0, "expert parallelism: num_experts=", E, " is below the ", W,
           " ranks, so each expert is sharded over ranks / num_experts ranks: the ranks must "
           "be a multiple of num_experts");
  const index_t s = W / E;
  SY_CHECK(hidden % s == 0, "sharded experts: hidden_size=", hidden, " must split into ", s,
           " equal slices (one per rank sharing an expert: ", W, " ranks / ", E, " experts)");
  return ExpertShard{E, 1, rank / s, s, rank % s};
}

ComputeLayout compute_layout(const ExpertShard& shard, index_t hidden, int W, int r) {
  SY_ASSERT(r >= 1, "compute_layout needs adaptive_r >= 1");
  ComputeLayout c;
  c.num_experts = shard.num_experts;
  c.world_size = W;
  c.num_slices = r;
  if (shard.num_slices == 1) {
    SY_CHECK(W % r == 0, "forward: adaptive_r=", r, " must divide the ", W,
             " ranks (r-way sharded experts: groups of r ranks share their experts); valid: 0 "
             "and the divisors of ",
             W);
    c.experts_per_rank = r * shard.count;
  } else {
    const index_t s = shard.num_slices;
    SY_CHECK(s % r == 0, "forward: adaptive_r=", r, " must divide the ", s,
             " ranks that share each expert (", W, " ranks / ", shard.num_experts,
             " experts); valid: 0 and the divisors of ", s);
    c.sharded_store = true;
    c.experts_per_rank = 1;
    c.num_row_chunks = s / r;
  }
  SY_CHECK(hidden % r == 0, "forward: adaptive_r=", r, " must divide hidden_size=", hidden);
  return c;
}

index_t ComputeLayout::first_expert(int q) const {
  if (sharded_store) return q / (world_size / num_experts);
  return q / num_slices * experts_per_rank;
}

index_t ComputeLayout::slice(int q) const {
  if (sharded_store) return q % (world_size / num_experts) / num_row_chunks;
  return q % num_slices;
}

index_t ComputeLayout::row_chunk(int q) const {
  if (sharded_store) return q % (world_size / num_experts) % num_row_chunks;
  return 0;
}

std::vector<FfnParam> ffn_params(const FfnShape& s) {
  std::vector<FfnParam> p{FfnParam::kFc1W, FfnParam::kFc2W};
  if (s.has_fc1_bias) p.push_back(FfnParam::kFc1Bias);
  if (s.has_fc2_bias) p.push_back(FfnParam::kFc2Bias);
  return p;
}

namespace {

// [P, rest] of a parameter's rows per hidden unit.
index_t parts_of(FfnParam param, bool gated) {
  return gated && (param == FfnParam::kFc1W || param == FfnParam::kFc1Bias) ? 2 : 1;
}

}  // namespace

Tensor region_view(const Tensor& full, FfnParam param, bool gated, index_t hidden,
                   const ExpertRegion& r) {
  const index_t E = full.size(0);
  if (param == FfnParam::kFc2Bias)  // [E, d]: whole rows
    return full.view({E, 1, full.size(1), 1}).narrow(0, r.first, r.count);
  const index_t P = parts_of(param, gated);
  const index_t rest = full.dim() == 3 ? full.size(2) : 1;
  const index_t part = hidden / r.num_slices;
  return full.view({E, P, hidden, rest})
      .narrow(0, r.first, r.count)
      .narrow(2, r.slice * part, part);
}

Tensor part_view(const Tensor& part, FfnParam param, bool gated, index_t num_experts) {
  if (param == FfnParam::kFc2Bias) return part.view({num_experts, 1, part.size(1), 1});
  const index_t P = parts_of(param, gated);
  const index_t rest = part.dim() == 3 ? part.size(2) : 1;
  return part.view({num_experts, P, part.size(1) / P, rest});
}

ColumnRange fc2_bias_columns(index_t d, index_t slice, index_t s) {
  const index_t dc = (d + s - 1) / s;
  const index_t begin = std::min(d, slice * dc);
  return ColumnRange{begin, std::min(d, begin + dc) - begin};
}

}  // namespace switchyard
