#include "tensor_ops.h"

#include <cmath>
#include <vector>

#include "core/dtype_dispatch.h"

namespace switchyard::tools {

// Loops over fewer elements than this run on one thread: starting a parallel region costs
// more than it saves on small tensors.
constexpr index_t kMinParallelElements = index_t{1} << 16;
namespace {

void check_same_shape(const Tensor& a, const Tensor& b, const char* op) {
  SY_CHECK(a.sizes() == b.sizes() && a.dtype() == b.dtype(), op,
           ": tensors differ in shape or dtype (", dtype_name(a.dtype()), " vs ",
           dtype_name(b.dtype()), ")");
}

}  // namespace

Tensor to_host(const Tensor& t) {
  if (t.device().is_cpu()) return t.contiguous();
  Tensor host = Tensor::empty(t.sizes(), t.dtype(), Device::cpu());
  host.copy_from(t);
  return host;
}

Tensor to_device(const Tensor& host, Device device) {
  if (device.is_cpu()) return host;
  Tensor t = Tensor::empty(host.sizes(), host.dtype(), device);
  t.copy_from(host);
  return t;
}

Tensor random_normal(index_t rows, index_t cols, std::uint64_t seed, std::uint64_t step,
                     DType dtype, Device device) {
  Tensor host = Tensor::empty({rows, cols}, dtype, Device::cpu());
  dispatch_float(dtype, "random_normal", [&]<class T>() {
    T* p = host.data<T>();
#pragma omp parallel for schedule(static) if (rows * cols >= kMinParallelElements)
    for (index_t r = 0; r < rows; ++r) {
      for (index_t c = 0; c < cols; ++c) {
        p[offset_of(r, cols) + c] =
            store<T>(rng_normal(seed, RngStream::kData, step, static_cast<std::uint64_t>(r),
                                static_cast<std::uint64_t>(c)));
      }
    }
  });
  return to_device(host, device);
}

Tensor add(const Tensor& a, const Tensor& b) {
  check_same_shape(a, b, "add");
  const Tensor ha = to_host(a);
  const Tensor hb = to_host(b);
  Tensor out = Tensor::empty(ha.sizes(), ha.dtype(), Device::cpu());
  dispatch_float(a.dtype(), "add", [&]<class T>() {
    const T* pa = ha.data<T>();
    const T* pb = hb.data<T>();
    T* po = out.data<T>();
    const index_t n = ha.numel();
#pragma omp parallel for schedule(static) if (n >= kMinParallelElements)
    for (index_t i = 0; i < n; ++i) po[i] = store<T>(load(pa[i]) + load(pb[i]));
  });
  return to_device(out, a.device());
}

double mse_loss(const Tensor& y, const Tensor& target, Tensor* dy) {
  check_same_shape(y, target, "mse_loss");
  const Tensor hy = to_host(y);
  const Tensor ht = to_host(target);
  const index_t n = hy.numel();
  if (n == 0) return 0.0;
  Tensor hdy;
  if (dy != nullptr) hdy = Tensor::empty(hy.sizes(), hy.dtype(), Device::cpu());
  // Fixed-size chunks summed in order: the loss is bitwise the same for any thread count.
  constexpr index_t kChunk = 4096;
  const index_t num_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<std::size_t>(num_chunks), 0.0);
  dispatch_float(hy.dtype(), "mse_loss", [&]<class T>() {
    const T* py = hy.data<T>();
    const T* pt = ht.data<T>();
    T* pdy = dy != nullptr ? hdy.data<T>() : nullptr;
    const double scale = 2.0 / static_cast<double>(n);
#pragma omp parallel for schedule(static) if (n >= kMinParallelElements)
    for (index_t c = 0; c < num_chunks; ++c) {
      double sum = 0.0;
      const index_t end = std::min(n, (c + 1) * kChunk);
      for (index_t i = c * kChunk; i < end; ++i) {
        const double diff = load(py[i]) - load(pt[i]);
        sum += diff * diff;
        if (pdy != nullptr) pdy[i] = store<T>(scale * diff);
      }
      partial[static_cast<std::size_t>(c)] = sum;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  if (dy != nullptr) *dy = to_device(hdy, y.device());
  return total / static_cast<double>(n);
}

bool all_finite(const Tensor& t) {
  const Tensor h = to_host(t);
  const index_t n = h.numel();
  bool finite = true;
  dispatch_float(h.dtype(), "all_finite", [&]<class T>() {
    const T* p = h.data<T>();
#pragma omp parallel for schedule(static) reduction(&& : finite) if (n >= kMinParallelElements)
    for (index_t i = 0; i < n; ++i) finite = finite && std::isfinite(load(p[i]));
  });
  return finite;
}

}  // namespace switchyard::tools
