#include <algorithm>
#include <cmath>

#include "core/backend.h"
#include "core/dtype_dispatch.h"
#include "core/init.h"
#include "experts/gemm.h"
#include "routing/gate.h"

namespace switchyard {
namespace {

constexpr std::uint64_t kGateInitId = 1000;

DType gate_dtype(const MoEConfig& cfg) { return cfg.fp32_gate ? DType::kF32 : cfg.dtype; }

Parameter make_param(const std::string& name, const Shape& shape, DType dtype, Device device) {
  return Parameter{"gates.0." + name, Tensor::zeros(shape, dtype, device),
                   Tensor::zeros(shape, dtype, device), true};
}

// p.grad += g (g converted to the parameter's dtype).
void accumulate(Parameter& p, const Tensor& g) {
  const std::vector<double> a = p.grad.to_vector(), b = g.to_vector();
  std::vector<double> s(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) s[i] = a[i] + b[i];
  p.grad.copy_from(Tensor::from_vector(s, p.grad.sizes(), DType::kF64));
}

}  // namespace

LinearGate::LinearGate(const MoEConfig& cfg) {
  wg_ = make_param("wg.weight", {cfg.num_experts, cfg.model_dim}, gate_dtype(cfg), cfg.device);
  fill_uniform(wg_.value, 1.0 / std::sqrt(static_cast<double>(cfg.model_dim)), cfg.seed,
               kGateInitId);
}

Tensor LinearGate::forward(const Tensor& x, bool training) {
  require_backend("gate", x.device());
  SY_CHECK(x.device() == wg_.value.device(), "gate: x is on ", to_string(x.device()),
           ", the gate on ", to_string(wg_.value.device()));
  const Tensor xg = x.to(wg_.value.dtype()).contiguous();
  Tensor logits = Tensor::empty({xg.size(0), wg_.value.size(0)}, wg_.value.dtype(), x.device());
  gemm(xg, false, wg_.value, true, logits);
  if (training) {
    x_dtype_ = x.dtype();
    x_ = xg;
  }
  return logits;
}

Tensor LinearGate::backward(const Tensor& dlogits) {
  SY_CHECK(x_.defined(), "gate: backward called without a training forward");
  const Tensor dl = dlogits.to(wg_.value.dtype()).contiguous();
  gemm(dl, true, x_, false, wg_.grad, 1.0, 1.0);  // dWg += dlᵀ · x
  Tensor dx = Tensor::empty(x_.sizes(), wg_.value.dtype(), x_.device());
  gemm(dl, false, wg_.value, false, dx);  // dx = dl · Wg
  x_ = Tensor();  // one backward per forward: free the saved input now
  return dx.to(x_dtype_);
}

CosineGate::CosineGate(const MoEConfig& cfg) {
  SY_CHECK(cfg.cosine_proj_dim >= 1, "cosine gate: proj_dim must be >= 1, got ",
           cfg.cosine_proj_dim);
  SY_CHECK(cfg.cosine_init_t > 0, "cosine gate: init_t must be > 0, got ", cfg.cosine_init_t);
  const DType dt = gate_dtype(cfg);
  const index_t p = cfg.cosine_proj_dim, d = cfg.model_dim, E = cfg.num_experts;
  temperature_ = make_param("temperature", {1}, dt, cfg.device);
  proj_w_ = make_param("cosine_projector.weight", {p, d}, dt, cfg.device);
  proj_b_ = make_param("cosine_projector.bias", {p}, dt, cfg.device);
  sim_ = make_param("sim_matrix", {p, E}, dt, cfg.device);
  temperature_.value.fill(std::log(1.0 / cfg.cosine_init_t));
  const double bound = 1.0 / std::sqrt(static_cast<double>(d));
  fill_uniform(proj_w_.value, bound, cfg.seed, kGateInitId + 1);
  fill_uniform(proj_b_.value, bound, cfg.seed, kGateInitId + 2);
  fill_normal(sim_.value, 0.0, 0.01, cfg.seed, kGateInitId + 3);
}

namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps
const double kMaxLogScale = std::log(100.0);

// Row norms of m [n, c] (clamped at kNormEps) and the normalised rows; strides give columns too.
template <class A>
void normalize(const A* m, index_t n, index_t c, index_t sn, index_t sc, A* norms, A* out) {
  for (index_t i = 0; i < n; ++i) {
    double s = 0;
    for (index_t j = 0; j < c; ++j)
      s += static_cast<double>(m[i * sn + j * sc]) * m[i * sn + j * sc];
    norms[i] = static_cast<A>(std::max(std::sqrt(s), kNormEps));
    for (index_t j = 0; j < c; ++j) out[i * sn + j * sc] = m[i * sn + j * sc] / norms[i];
  }
}

// Backward of v / max(|v|, eps): dv = (dvn - vn <vn, dvn>) / |v|, or dvn / eps when clamped.
template <class A>
void normalize_backward(const A* vn, const A* norms, const A* dvn, index_t n, index_t c, index_t sn,
                        index_t sc, A* dv) {
  for (index_t i = 0; i < n; ++i) {
    const bool clamped = norms[i] <= kNormEps;
    double dot = 0;
    for (index_t j = 0; j < c; ++j)
      dot += static_cast<double>(vn[i * sn + j * sc]) * dvn[i * sn + j * sc];
    for (index_t j = 0; j < c; ++j) {
      const index_t o = i * sn + j * sc;
      dv[o] = clamped ? dvn[o] / norms[i] : static_cast<A>((dvn[o] - vn[o] * dot) / norms[i]);
    }
  }
}

}  // namespace

Tensor CosineGate::forward(const Tensor& x, bool training) {
  require_cpu("gate", x.device());
  const DType rd = routing_dtype(proj_w_.value.dtype());
  const index_t T = x.size(0), p = proj_w_.value.size(0), E = sim_.value.size(1);
  Saved sv;
  sv.x_dtype = x.dtype();
  sv.x = x.to(proj_w_.value.dtype()).to(rd).contiguous();
  const Tensor pw = proj_w_.value.to(rd), pb = proj_b_.value.to(rd).contiguous();
  const Tensor sim = sim_.value.to(rd).contiguous();
  Tensor u = Tensor::empty({T, p}, rd);
  gemm(sv.x, false, pw, true, u);
  Tensor logits = Tensor::empty({T, E}, rd);
  dispatch_float(rd, "cosine gate", [&]<class A>() {
    if constexpr (std::is_same_v<A, float> || std::is_same_v<A, double>) {
      A* up = u.data<A>();
      const A* b = pb.data<A>();
      for (index_t t = 0; t < T; ++t)
        for (index_t j = 0; j < p; ++j) up[t * p + j] += b[j];
      sv.un = Tensor::empty({T, p}, rd);
      sv.unorm = Tensor::empty({T}, rd);
      normalize(up, T, p, p, 1, sv.unorm.data<A>(), sv.un.data<A>());
      sv.sn = Tensor::empty({p, E}, rd);
      sv.snorm = Tensor::empty({E}, rd);
      normalize(sim.data<A>(), E, p, 1, E, sv.snorm.data<A>(), sv.sn.data<A>());  // columns
      sv.cos = Tensor::empty({T, E}, rd);
      gemm(sv.un, false, sv.sn, false, sv.cos);
      sv.scale = std::exp(std::min(temperature_.value.to_vector()[0], kMaxLogScale));
      const A* c = sv.cos.data<A>();
      A* l = logits.data<A>();
      for (index_t i = 0; i < T * E; ++i) l[i] = static_cast<A>(c[i] * sv.scale);
    }
  });
  if (training) saved_ = std::move(sv);
  return logits;
}

Tensor CosineGate::backward(const Tensor& dlogits_in) {
  SY_CHECK(saved_.cos.defined(), "gate: backward called without a training forward");
  const Saved& sv = saved_;
  const DType rd = sv.cos.dtype();
  const index_t T = sv.x.size(0), p = sv.un.size(1), E = sv.cos.size(1);
  const Tensor dl = dlogits_in.to(rd).contiguous();
  return dispatch_float(rd, "cosine gate backward", [&]<class A>() -> Tensor {
    if constexpr (std::is_same_v<A, float> || std::is_same_v<A, double>) {
      const A* dlp = dl.data<A>();
      const A* c = sv.cos.data<A>();
      double dscale = 0;
      Tensor dcos = Tensor::empty({T, E}, rd);
      A* dc = dcos.data<A>();
      for (index_t i = 0; i < T * E; ++i) {
        dscale += static_cast<double>(dlp[i]) * c[i];
        dc[i] = static_cast<A>(dlp[i] * sv.scale);
      }
      // clamp(tau, max) passes gradient where tau <= max.
      const double tau = temperature_.value.to_vector()[0];
      const double dtau = tau <= kMaxLogScale ? dscale * sv.scale : 0.0;
      Tensor dun = Tensor::empty({T, p}, rd), dsn = Tensor::empty({p, E}, rd);
      gemm(dcos, false, sv.sn, true, dun);  // [T, p]
      gemm(sv.un, true, dcos, false, dsn);  // [p, E]
      Tensor du = Tensor::empty({T, p}, rd), dsim = Tensor::empty({p, E}, rd);
      normalize_backward(sv.un.data<A>(), sv.unorm.data<A>(), dun.data<A>(), T, p, p, 1,
                         du.data<A>());
      normalize_backward(sv.sn.data<A>(), sv.snorm.data<A>(), dsn.data<A>(), E, p, 1, E,
                         dsim.data<A>());
      Tensor dpw = Tensor::empty({p, sv.x.size(1)}, rd), dpb = Tensor::zeros({p}, rd);
      gemm(du, true, sv.x, false, dpw);
      A* db = dpb.data<A>();
      const A* dup = du.data<A>();
      for (index_t t = 0; t < T; ++t)
        for (index_t j = 0; j < p; ++j) db[j] += dup[t * p + j];
      Tensor dx = Tensor::empty({T, sv.x.size(1)}, rd);
      gemm(du, false, proj_w_.value.to(rd), false, dx);
      accumulate(temperature_, Tensor::from_vector({dtau}, {1}, rd));
      accumulate(proj_w_, dpw);
      accumulate(proj_b_, dpb);
      accumulate(sim_, dsim);
      return dx.to(sv.x_dtype);
    }
    return {};
  });
}

}  // namespace switchyard
