#include "layer/sharded_ffn.h"

#include "switchyard/error.h"

namespace switchyard {

ShardedFfnExperts::ShardedFfnExperts(const FfnShape& full, const ExpertShard& shard,
                                     const std::string& prefix, std::uint64_t seed,
                                     std::uint64_t init_id) {
  const index_t s = shard.num_slices, o = full.out_dim();
  // Draw the whole expert as a layer holding all experts would, then keep this rank's parts.
  FfnShape whole = full;
  whole.num_experts = 1;
  whole.first_expert = shard.first;
  FfnExperts expert(whole, prefix, false, seed, init_id);
  FfnShape part = whole;
  part.hidden_size = full.hidden_size / s;
  part.has_fc2_bias = false;
  slice_ = std::make_unique<FfnExperts>(part, prefix, false, seed, init_id);

  const bool gated = is_gated(full.activation);
  const ExpertRegion region{0, 1, shard.slice, s};
  const std::vector<Parameter*> from = expert.parameters(), to = slice_->parameters();
  const std::vector<FfnParam> params = ffn_params(part);
  for (std::size_t i = 0; i < to.size(); ++i)
    part_view(to[i]->value, params[i], gated, 1)
        .copy_from(region_view(from[i]->value, params[i], gated, full.hidden_size, region));
  if (full.has_fc2_bias) {
    const ColumnRange cols = fc2_bias_columns(o, shard.slice, s);
    const Shape shape{1, (o + s - 1) / s};
    fc2_bias_.emplace(Parameter{prefix + "batched_fc2_bias",
                                Tensor::zeros(shape, full.dtype, full.device),
                                Tensor::zeros(shape, full.dtype, full.device), false});
    if (cols.length > 0)
      fc2_bias_->value.narrow(1, 0, cols.length)
          .copy_from(expert.parameters().back()->value.narrow(1, cols.begin, cols.length));
  }
}

Tensor ShardedFfnExperts::forward(const Tensor&, const Tensor&, bool) {
  SY_CHECK(false, "sharded experts run only inside an expert-parallel layer's exchange");
  return Tensor();
}

Tensor ShardedFfnExperts::backward(const Tensor&) {
  SY_CHECK(false, "sharded experts run only inside an expert-parallel layer's exchange");
  return Tensor();
}

std::vector<Parameter*> ShardedFfnExperts::parameters() {
  std::vector<Parameter*> p = slice_->parameters();
  if (fc2_bias_) p.push_back(&*fc2_bias_);
  return p;
}

}  // namespace switchyard
