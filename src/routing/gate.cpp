#include "routing/gate.h"

#include <cmath>
#include <utility>

#include "core/backend.h"
#include "core/dtype_dispatch.h"
#include "core/init.h"
#include "core/ops.h"
#include "experts/gemm.h"
#include "routing/cosine_ops.h"
#include "routing/gate_split.h"

namespace switchyard {
namespace {

constexpr std::uint64_t kGateInitId = 1000;

DType gate_dtype(const MoEConfig& cfg) { return cfg.fp32_gate ? DType::kF32 : cfg.dtype; }

Parameter make_param(const std::string& name, const Shape& shape, DType dtype, Device device) {
  return Parameter{"gates.0." + name, Tensor::zeros(shape, dtype, device),
                   Tensor::zeros(shape, dtype, device), true};
}

// p.grad += g (g converted to the parameter's dtype), on the parameter's device.
void accumulate(Parameter& p, const Tensor& g) { add_inplace(p.grad, g.to(p.grad.dtype())); }

}  // namespace

void Gate::backward_add(const Tensor& dlogits, Tensor& dx) {
  add_inplace(dx, backward(dlogits).to(dx.dtype()));
}

LinearGate::LinearGate(const MoEConfig& cfg) {
  wg_ = make_param("wg.weight", {cfg.num_experts, cfg.model_dim}, gate_dtype(cfg), cfg.device);
  fill_uniform(wg_.value, 1.0 / std::sqrt(static_cast<double>(cfg.model_dim)), cfg.seed,
               kGateInitId);
}

Tensor LinearGate::forward(const Tensor& x, bool training) {
  require_backend("gate", x.device());
  SY_CHECK(x.device() == wg_.value.device(), "gate: x is on ", to_string(x.device()),
           ", the gate on ", to_string(wg_.value.device()));
  x_dtype_ = x.dtype();
  if (split_gate_applies(x, wg_.value)) {  // saves x as it is, with no f32 copy
    const Tensor xc = x.contiguous();
    if (training) x_ = xc;
    return split_gate_forward_cuda(xc, wg_.value);
  }
  const Tensor xg = x.to(wg_.value.dtype()).contiguous();
  Tensor logits = Tensor::empty({xg.size(0), wg_.value.size(0)}, wg_.value.dtype(), x.device());
  gemm(xg, false, wg_.value, true, logits);
  if (training) x_ = xg;
  return logits;
}

Tensor LinearGate::backward(const Tensor& dlogits) {
  Tensor dx;
  input_grad(dlogits, dx, false);
  return dx;
}

void LinearGate::backward_add(const Tensor& dlogits, Tensor& dx) { input_grad(dlogits, dx, true); }

void LinearGate::input_grad(const Tensor& dlogits, Tensor& dx, bool add) {
  SY_CHECK(x_.defined(), "gate: backward called without a training forward");
  SY_CHECK(!add || dx.defined(), "gate: backward_add needs a dx to add to");
  SY_CHECK(!add || (dx.sizes() == x_.sizes() && dx.dtype() == x_dtype_ && dx.is_contiguous() &&
                    dx.device() == x_.device()),
           "gate: backward_add needs a contiguous [", x_.size(0), ", ", x_.size(1), "] ",
           dtype_name(x_dtype_), " dx on ", to_string(x_.device()), ", got ", dx.dim(), "-d ",
           dtype_name(dx.dtype()), " of ", dx.numel(), " elements on ", to_string(dx.device()),
           dx.is_contiguous() ? "" : ", not contiguous");
  const Tensor x = std::exchange(x_, Tensor());  // one backward per forward: the saved input goes
  const Tensor dl = dlogits.to(wg_.value.dtype()).contiguous();
  if (split_gate_applies(x, wg_.value)) {
    split_gate_backward_cuda(dl, x, wg_.value, wg_.grad, dx, add);
    return;
  }
  gemm(dl, true, x, false, wg_.grad, 1.0, 1.0);  // dWg += dlᵀ · x
  if (add && dx.dtype() == wg_.value.dtype()) {
    gemm(dl, false, wg_.value, false, dx, 1.0, 1.0);  // dx += dl · Wg
    return;
  }
  Tensor g = Tensor::empty(x.sizes(), wg_.value.dtype(), x.device());
  gemm(dl, false, wg_.value, false, g);  // dl · Wg
  if (add) {
    add_inplace(dx, g.to(x_dtype_));
  } else {
    dx = g.to(x_dtype_);
  }
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

Tensor CosineGate::forward(const Tensor& x, bool training) {
  require_backend("gate", x.device());
  SY_CHECK(x.device() == proj_w_.value.device(), "gate: x is on ", to_string(x.device()),
           ", the gate on ", to_string(proj_w_.value.device()));
  const DType rd = routing_dtype(proj_w_.value.dtype());
  const Device dev = x.device();
  const index_t T = x.size(0), p = proj_w_.value.size(0), E = sim_.value.size(1);
  Saved sv;
  sv.x_dtype = x.dtype();
  sv.x = x.to(proj_w_.value.dtype()).to(rd).contiguous();
  sv.tau = temperature_.value.to(rd);
  Tensor u = Tensor::empty({T, p}, rd, dev);
  gemm(sv.x, false, proj_w_.value.to(rd), true, u);
  const Tensor bias = proj_b_.value.to(rd).contiguous();
  sv.un = Tensor::empty({T, p}, rd, dev);
  sv.unorm = Tensor::empty({T}, rd, dev);
  normalize_vectors(u, &bias, /*columns=*/false, sv.un, sv.unorm);
  sv.sn = Tensor::empty({p, E}, rd, dev);
  sv.snorm = Tensor::empty({E}, rd, dev);
  normalize_vectors(sim_.value.to(rd).contiguous(), nullptr, /*columns=*/true, sv.sn, sv.snorm);
  sv.cos = Tensor::empty({T, E}, rd, dev);
  gemm(sv.un, false, sv.sn, false, sv.cos);
  Tensor logits = Tensor::empty({T, E}, rd, dev);
  cosine_scale(sv.cos, sv.tau, logits);
  if (training) saved_ = std::move(sv);
  return logits;
}

Tensor CosineGate::backward(const Tensor& dlogits) {
  SY_CHECK(saved_.cos.defined(), "gate: backward called without a training forward");
  Saved sv = std::move(saved_);  // one backward per forward: the saved tensors go with it
  saved_ = Saved{};
  const DType rd = sv.cos.dtype();
  const Device dev = sv.cos.device();
  const index_t T = sv.x.size(0), d = sv.x.size(1), p = sv.un.size(1), E = sv.cos.size(1);
  Tensor dcos = Tensor::empty({T, E}, rd, dev), dtau = Tensor::empty({1}, rd, dev);
  cosine_scale_backward(dlogits.to(rd).contiguous(), sv.cos, sv.tau, dcos, dtau);
  Tensor dun = Tensor::empty({T, p}, rd, dev), dsn = Tensor::empty({p, E}, rd, dev);
  gemm(dcos, false, sv.sn, true, dun);  // [T, p]
  gemm(sv.un, true, dcos, false, dsn);  // [p, E]
  Tensor du = Tensor::empty({T, p}, rd, dev), dsim = Tensor::empty({p, E}, rd, dev);
  normalize_vectors_backward(sv.un, sv.unorm, dun, /*columns=*/false, du);
  normalize_vectors_backward(sv.sn, sv.snorm, dsn, /*columns=*/true, dsim);
  Tensor dpw = Tensor::empty({p, d}, rd, dev), dpb = Tensor::empty({1, p}, rd, dev);
  gemm(du, true, sv.x, false, dpw);
  Tensor ones = Tensor::empty({1, T}, rd, dev);
  ones.fill(1.0);
  gemm(ones, false, du, false, dpb);  // column sums of du, in cuBLAS's fixed order
  Tensor dx = Tensor::empty({T, d}, rd, dev);
  gemm(du, false, proj_w_.value.to(rd), false, dx);
  accumulate(temperature_, dtau);
  accumulate(proj_w_, dpw);
  accumulate(proj_b_, dpb.view({p}));
  accumulate(sim_, dsim);
  return dx.to(sv.x_dtype);
}

#ifndef SY_WITH_CUDA
// Builds without the CUDA backend: the split gate never applies.
bool split_gate_applies(const Tensor&, const Tensor&) { return false; }
Tensor split_gate_forward_cuda(const Tensor&, const Tensor&) {
  SY_CHECK(false, "split_gate_forward_cuda: this build has no CUDA backend");
  return {};
}
void split_gate_backward_cuda(const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, bool) {
  SY_CHECK(false, "split_gate_backward_cuda: this build has no CUDA backend");
}
#endif

}  // namespace switchyard
