// The stored experts of a rank under Tutel's sharded experts (fewer experts than ranks; layout in
// layer/expert_layout.h): one expert's hidden slice as an FfnExperts with hidden h / s and no fc2
// bias, plus the rank's columns of that expert's fc2 bias. Only the expert-parallel exchange runs
// it (the slices of one expert are summed across ranks); forward and backward throw.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "experts/ffn.h"
#include "layer/expert_layout.h"

namespace switchyard {

class ShardedFfnExperts final : public ExpertNetwork {
 public:
  // `full`: the layer's experts as one network holding all of them (num_experts = E, the whole
  // hidden size); initialised to the values those parts have in such a network.
  ShardedFfnExperts(const FfnShape& full, const ExpertShard& shard, const std::string& prefix,
                    std::uint64_t seed, std::uint64_t init_id);

  Tensor forward(const Tensor& rows, const Tensor& offsets, bool training) override;
  Tensor backward(const Tensor& drows_out) override;
  // The slice's parameters, then the fc2 bias columns: names and order as FfnExperts.
  std::vector<Parameter*> parameters() override;

  FfnExperts& slice() { return *slice_; }
  Parameter* fc2_bias() { return fc2_bias_ ? &*fc2_bias_ : nullptr; }  // [1, ceil(d / s)]

 private:
  std::unique_ptr<FfnExperts> slice_;
  std::optional<Parameter> fc2_bias_;
};

}  // namespace switchyard
