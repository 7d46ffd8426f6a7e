// Parameter initialisation from the counter-based RNG: the values depend only on (seed, id,
// element index), never on the backend or thread count.
#pragma once

#include <cstdint>

#include "switchyard/tensor.h"

namespace switchyard {

// t[i] ~ U(-bound, bound), and t[i] ~ N(mean, std), for draw stream `id` under `seed`.
// `first`: t[i] takes draw first + i, so a slice of a larger tensor (an expert-parallel rank's
// local experts) gets the values that slice has in the whole.
void fill_uniform(Tensor& t, double bound, std::uint64_t seed, std::uint64_t id, index_t first = 0);
void fill_normal(Tensor& t, double mean, double std, std::uint64_t seed, std::uint64_t id);

}  // namespace switchyard
