#include "core/init.h"

#include "core/dtype_dispatch.h"
#include "switchyard/error.h"
#include "switchyard/rng.h"

namespace switchyard {
namespace {

// t[i] = value(i) for every element (row-major), computed on the host in parallel (a value
// depends only on its index) and rounded to t's dtype as copy_from rounds doubles; a CUDA or
// strided tensor gets one copy from a host tensor of its own dtype.
template <class F>
void fill_by_index(Tensor& t, F&& value) {
  const bool direct = t.device().is_cpu() && t.is_contiguous();
  Tensor host = direct ? t : Tensor::empty(t.sizes(), t.dtype());
  dispatch_float(t.dtype(), "parameter initialisation", [&]<class D>() {
    D* dst = host.data<D>();
    const index_t n = host.numel();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (index_t i = 0; i < n; ++i) dst[i] = store<D>(value(i));
  });
  if (!direct) t.copy_from(host);
}

}  // namespace

void fill_uniform(Tensor& t, double bound, std::uint64_t seed, std::uint64_t id, index_t first) {
  fill_by_index(t, [&](index_t i) {
    return bound * (2.0 * rng_uniform(seed, RngStream::kInit, id,
                                      static_cast<std::uint64_t>(first + i), 0) -
                    1.0);
  });
}

void fill_normal(Tensor& t, double mean, double std, std::uint64_t seed, std::uint64_t id) {
  fill_by_index(t, [&](index_t i) {
    return mean + std * rng_normal(seed, RngStream::kInit, id, static_cast<std::uint64_t>(i), 0);
  });
}

}  // namespace switchyard
