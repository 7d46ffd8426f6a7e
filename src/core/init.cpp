#include "core/init.h"

#include <vector>

#include "switchyard/error.h"
#include "switchyard/rng.h"

namespace switchyard {

void fill_uniform(Tensor& t, double bound, std::uint64_t seed, std::uint64_t id, index_t first) {
  std::vector<double> v(static_cast<std::size_t>(t.numel()));
  for (std::size_t i = 0; i < v.size(); ++i)
    v[i] = bound * (2.0 * rng_uniform(seed, RngStream::kInit, id,
                                      static_cast<std::uint64_t>(first) + i, 0) -
                    1.0);
  t.copy_from(Tensor::from_vector(v, t.sizes(), DType::kF64));
}

void fill_normal(Tensor& t, double mean, double std, std::uint64_t seed, std::uint64_t id) {
  std::vector<double> v(static_cast<std::size_t>(t.numel()));
  for (std::size_t i = 0; i < v.size(); ++i)
    v[i] = mean + std * rng_normal(seed, RngStream::kInit, id, i, 0);
  t.copy_from(Tensor::from_vector(v, t.sizes(), DType::kF64));
}

}  // namespace switchyard
