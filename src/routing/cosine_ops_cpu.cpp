#include <algorithm>
#include <cmath>

#include "core/backend.h"
#include "core/dtype_dispatch.h"
#include "routing/cosine_ops.h"

namespace switchyard {
namespace {

const double kMaxLogScale = std::log(100.0);

VectorLayout vectors_of(const Tensor& m, bool columns) {
  SY_CHECK(m.dim() == 2 && m.is_contiguous(), "cosine gate: expected a contiguous matrix");
  const index_t r = m.size(0), k = m.size(1);
  return columns ? VectorLayout{k, r, 1, k} : VectorLayout{r, k, k, 1};
}

void check_routing_dtype(const Tensor& t) {
  SY_CHECK(t.dtype() == DType::kF32 || t.dtype() == DType::kF64,
           "cosine gate: the routing dtype is f32 or f64, got ", dtype_name(t.dtype()));
}

template <class F>
void dispatch_routing(DType dt, F&& f) {
  if (dt == DType::kF64)
    f.template operator()<double>();
  else
    f.template operator()<float>();
}

}  // namespace

void normalize_vectors(const Tensor& m, const Tensor* bias, bool columns, Tensor& out,
                       Tensor& norms) {
  require_backend("cosine gate", m.device());
  check_routing_dtype(m);
  const VectorLayout v = vectors_of(m, columns);
  if (m.device().is_cuda()) SY_CALL_CUDA(normalize_vectors, m, bias, v, out, norms);
  dispatch_routing(m.dtype(), [&]<class A>() {
    const A* x = m.data<A>();
    const A* b = bias ? bias->data<A>() : nullptr;
    A* o = out.data<A>();
    A* nr = norms.data<A>();
#pragma omp parallel for schedule(static)
    for (index_t i = 0; i < v.n; ++i) {
      double s = 0;
      for (index_t j = 0; j < v.c; ++j) {
        const A e = static_cast<A>(x[i * v.sn + j * v.sc] + (b ? b[j] : A(0)));
        o[i * v.sn + j * v.sc] = e;
        s += static_cast<double>(e) * e;
      }
      nr[i] = static_cast<A>(std::max(std::sqrt(s), kCosineNormEps));
      for (index_t j = 0; j < v.c; ++j) o[i * v.sn + j * v.sc] /= nr[i];
    }
  });
}

void normalize_vectors_backward(const Tensor& vn, const Tensor& norms, const Tensor& dvn,
                                bool columns, Tensor& dv) {
  require_backend("cosine gate", vn.device());
  check_routing_dtype(vn);
  const VectorLayout v = vectors_of(vn, columns);
  if (vn.device().is_cuda()) SY_CALL_CUDA(normalize_vectors_backward, vn, norms, dvn, v, dv);
  dispatch_routing(vn.dtype(), [&]<class A>() {
    const A *u = vn.data<A>(), *nr = norms.data<A>(), *du = dvn.data<A>();
    A* d = dv.data<A>();
#pragma omp parallel for schedule(static)
    for (index_t i = 0; i < v.n; ++i) {
      const bool clamped = nr[i] <= kCosineNormEps;
      double dot = 0;
      for (index_t j = 0; j < v.c; ++j)
        dot += static_cast<double>(u[i * v.sn + j * v.sc]) * du[i * v.sn + j * v.sc];
      for (index_t j = 0; j < v.c; ++j) {
        const index_t o = i * v.sn + j * v.sc;
        d[o] = clamped ? du[o] / nr[i] : static_cast<A>((du[o] - u[o] * dot) / nr[i]);
      }
    }
  });
}

void cosine_scale(const Tensor& cos, const Tensor& tau, Tensor& logits) {
  require_backend("cosine gate", cos.device());
  check_routing_dtype(cos);
  if (cos.device().is_cuda()) SY_CALL_CUDA(cosine_scale, cos, tau, logits);
  dispatch_routing(cos.dtype(), [&]<class A>() {
    const double scale = std::exp(std::min(static_cast<double>(tau.data<A>()[0]), kMaxLogScale));
    const A* c = cos.data<A>();
    A* l = logits.data<A>();
    for (index_t i = 0; i < cos.numel(); ++i) l[i] = static_cast<A>(c[i] * scale);
  });
}

void cosine_scale_backward(const Tensor& dlogits, const Tensor& cos, const Tensor& tau,
                           Tensor& dcos, Tensor& dtau) {
  require_backend("cosine gate", cos.device());
  check_routing_dtype(cos);
  if (cos.device().is_cuda()) SY_CALL_CUDA(cosine_scale_backward, dlogits, cos, tau, dcos, dtau);
  dispatch_routing(cos.dtype(), [&]<class A>() {
    const double t = tau.data<A>()[0];
    const double scale = std::exp(std::min(t, kMaxLogScale));
    const A *dl = dlogits.data<A>(), *c = cos.data<A>();
    A* dc = dcos.data<A>();
    double dscale = 0;
    for (index_t i = 0; i < cos.numel(); ++i) {
      dscale += static_cast<double>(dl[i]) * c[i];
      dc[i] = static_cast<A>(dl[i] * scale);
    }
    // clamp(tau, max) passes the gradient where tau <= max.
    dtau.data<A>()[0] = static_cast<A>(t <= kMaxLogScale ? dscale * scale : 0.0);
  });
}

}  // namespace switchyard
