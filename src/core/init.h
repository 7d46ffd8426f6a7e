// Parameter initialisation from the counter-based RNG: the values depend only on (seed, id,
// element index), never on the backend or thread count.
#pragma once

#include <cstdint>

#include "switchyard/tensor.h"

namespace switchyard {

// t[i] ~ U(-bound, bound), and t[i] ~ N(mean, std), for draw stream `id` under `seed`.
void fill_uniform(Tensor& t, double bound, std::uint64_t seed, std::uint64_t id);
void fill_normal(Tensor& t, double mean, double std, std::uint64_t seed, std::uint64_t id);

}  // namespace switchyard
