#include "optim.h"

#include <cmath>

#include "core/dtype_dispatch.h"
#include "tensor_ops.h"

namespace switchyard::tools {

// Loops over fewer elements than this run on one thread: starting a parallel region costs
// more than it saves on small tensors.
constexpr index_t kMinParallelElements = index_t{1} << 16;
namespace {

// The dtype the update is computed and stored in: f64 stays f64, everything else is f32.
DType master_dtype(DType d) { return d == DType::kF64 ? DType::kF64 : DType::kF32; }

struct Hyper {
  OptimizerKind kind;
  double lr, beta1, beta2, eps;
  double bias1, bias2;  // Adam's bias corrections 1 - beta^t
};

// master -= update(grad), elementwise; M is the master's element type, G the gradient's.
template <class M, class G>
void update(M* master, const G* grad, M* m, M* v, index_t n, const Hyper& h) {
  if (h.kind == OptimizerKind::kSgd) {
#pragma omp parallel for schedule(static) if (n >= kMinParallelElements)
    for (index_t i = 0; i < n; ++i) master[i] = static_cast<M>(master[i] - h.lr * load(grad[i]));
    return;
  }
#pragma omp parallel for schedule(static) if (n >= kMinParallelElements)
  for (index_t i = 0; i < n; ++i) {
    const double g = load(grad[i]);
    const double mi = h.beta1 * m[i] + (1.0 - h.beta1) * g;
    const double vi = h.beta2 * v[i] + (1.0 - h.beta2) * g * g;
    m[i] = static_cast<M>(mi);
    v[i] = static_cast<M>(vi);
    master[i] =
        static_cast<M>(master[i] - h.lr * (mi / h.bias1) / (std::sqrt(vi / h.bias2) + h.eps));
  }
}

template <class M>
void update_any_grad(M* master, const Tensor& grad, M* m, M* v, index_t n, const Hyper& h) {
  dispatch_float(grad.dtype(), "optimizer",
                 [&]<class T>() { update(master, grad.data<T>(), m, v, n, h); });
}

}  // namespace

OptimizerKind parse_optimizer(const std::string& name) {
  if (name == "sgd") return OptimizerKind::kSgd;
  if (name == "adam") return OptimizerKind::kAdam;
  detail::throw_error(detail::str_cat("unknown optimizer '", name, "', expected sgd or adam"));
}

struct Optimizer::State {
  Tensor master;  // host, contiguous, f32 or f64; aliases the parameter when updated in place
  Tensor m, v;    // Adam moments, same shape and dtype as master
  bool in_place = false;
};

Optimizer::Optimizer(std::vector<Parameter*> params, const OptimizerOptions& options)
    : options_(options), params_(std::move(params)) {
  SY_CHECK(options_.lr > 0 && std::isfinite(options_.lr), "lr must be > 0, got ", options_.lr);
  for (Parameter* p : params_) {
    auto s = std::make_unique<State>();
    const Tensor& value = p->value;
    const DType md = master_dtype(value.dtype());
    s->in_place = value.device().is_cpu() && value.is_contiguous() && value.dtype() == md;
    s->master = s->in_place ? value : to_host(value).to(md).contiguous();
    if (options_.kind == OptimizerKind::kAdam) {
      s->m = Tensor::zeros(value.sizes(), md);
      s->v = Tensor::zeros(value.sizes(), md);
    }
    states_.push_back(std::move(s));
  }
}

Optimizer::~Optimizer() = default;

void Optimizer::step() {
  ++num_steps_;
  Hyper h{options_.kind,
          options_.lr,
          options_.beta1,
          options_.beta2,
          options_.eps,
          1.0 - std::pow(options_.beta1, static_cast<double>(num_steps_)),
          1.0 - std::pow(options_.beta2, static_cast<double>(num_steps_))};
  for (std::size_t i = 0; i < params_.size(); ++i) {
    Parameter& p = *params_[i];
    State& s = *states_[i];
    if (!p.grad.defined()) continue;
    SY_CHECK(p.grad.sizes() == p.value.sizes(), "optimizer: gradient of ", p.name,
             " has a different shape from its value");
    const Tensor grad = to_host(p.grad);
    const index_t n = s.master.numel();
    const bool adam = options_.kind == OptimizerKind::kAdam;
    if (s.master.dtype() == DType::kF64) {
      update_any_grad(s.master.data<double>(), grad, adam ? s.m.data<double>() : nullptr,
                      adam ? s.v.data<double>() : nullptr, n, h);
    } else {
      update_any_grad(s.master.data<float>(), grad, adam ? s.m.data<float>() : nullptr,
                      adam ? s.v.data<float>() : nullptr, n, h);
    }
    // Rounds to the stored dtype (nearest even) and moves to the parameter's device.
    if (!s.in_place) p.value.copy_from(s.master);
  }
}

}  // namespace switchyard::tools
