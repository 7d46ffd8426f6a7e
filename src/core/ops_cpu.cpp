#include <cmath>

#include "core/backend.h"
#include "core/dtype_dispatch.h"
#include "core/ops.h"
#include "core/philox.h"

namespace switchyard {

void add_inplace(Tensor& dst, const Tensor& src_in, const Tensor* scale_in) {
  require_backend("add_inplace", dst.device());
  SY_ASSERT(dst.is_contiguous() && dst.sizes() == src_in.sizes() && dst.dtype() == src_in.dtype() &&
            dst.device() == src_in.device());
  const Tensor src = src_in.contiguous();
  const Tensor scale = scale_in ? scale_in->to(dst.dtype()).contiguous() : Tensor();
  if (dst.device().is_cuda())
    SY_CALL_CUDA(add_inplace, dst, src, scale.defined() ? &scale : nullptr);
  dispatch_float(dst.dtype(), "add_inplace", [&]<class T>() {
    T* d = dst.data<T>();
    const T* s = src.data<T>();
    const T* m = scale.defined() ? scale.data<T>() : nullptr;
    const index_t n = dst.numel();
#pragma omp parallel for schedule(static)
    for (index_t i = 0; i < n; ++i) d[i] = store<T>(load(d[i]) + load(s[i]) * (m ? load(m[i]) : 1));
  });
}

Tensor uniform_factors(index_t rows, index_t cols, double eps, std::uint64_t seed,
                       std::uint32_t stream, std::uint64_t step, index_t row_base, DType dtype,
                       Device device) {
  require_backend("uniform_factors", device);
  Tensor out = Tensor::empty({rows, cols}, dtype, device);
  if (out.numel() == 0) return out;
  if (device.is_cuda()) {
#ifdef SY_WITH_CUDA
    uniform_factors_cuda(out, eps, seed, stream, step, row_base);
#endif
    return out;
  }
  dispatch_float(dtype, "uniform_factors", [&]<class T>() {
    T* o = out.data<T>();
#pragma omp parallel for schedule(static)
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < cols; ++c)
        o[offset_of(r, cols) + c] = store<T>(
            1.0 + eps * (2.0 * philox::uniform(seed, stream, step, static_cast<std::uint64_t>(row_base + r),
                                               static_cast<std::uint64_t>(c)) -
                         1.0));
  });
  return out;
}

void check_finite(const Tensor& t_in, const char* what) {
  require_cpu("check_finite", t_in.device());
  const Tensor t = t_in.contiguous();
  dispatch_float(t.dtype(), "check_finite", [&]<class T>() {
    const T* p = t.data<T>();
    const index_t n = t.numel();
    index_t bad = n;
#pragma omp parallel for reduction(min : bad) schedule(static)
    for (index_t i = 0; i < n; ++i)
      if (!std::isfinite(static_cast<double>(load(p[i])))) bad = std::min(bad, i);
    SY_CHECK(bad == n, what, " holds ", load(p[bad < n ? bad : 0]), " (NaN or Inf) at element ",
             bad, ": expected finite values");
  });
}

}  // namespace switchyard
