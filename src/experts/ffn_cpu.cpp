// FFN experts on the CPU: one BLAS GEMM per expert and matrix (outside OpenMP regions), bias and
// activation loops in OpenMP. Arithmetic in f32 (f64 for f64); f16/bf16 intermediates are
// rounded to the storage precision where a GPU would store them.
#include <algorithm>
#include <vector>

#include "core/dtype_dispatch.h"
#include "experts/activation.h"
#include "experts/ffn.h"
#include "experts/gemm.h"

namespace switchyard {
namespace {

// The parameter in the arithmetic dtype: the tensor itself, or a converted copy.
Tensor as_arith(const Parameter& p, DType arith) {
  return p.value.defined() ? p.value.to(arith).contiguous() : Tensor();
}

// Rounds v to storage type T's precision (a no-op for f32/f64).
template <class T, class W>
inline W round_to(W v) {
  if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>)
    return load(store<T>(v));
  else
    return v;
}

// grad += g, both contiguous; g in the arithmetic dtype, grad in the parameter dtype.
template <class T, class W>
void accumulate(Tensor& grad, const W* g) {
  T* dst = grad.data<T>();
  const index_t n = grad.numel();
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < n; ++i) dst[i] = store<T>(load(dst[i]) + g[i]);
}

template <class T>
Tensor forward_impl(const FfnShape& s, const Parameter& fc1_w, const Parameter& fc2_w,
                    const Parameter& fc1_b, const Parameter& fc2_b, const Tensor& rows,
                    std::vector<index_t> off, FfnExperts::Saved& saved) {
  using W = acc_t<T>;
  const DType wd = routing_dtype(s.dtype);
  const index_t R = rows.size(0), d = s.model_dim, h = s.hidden_size, o = s.out_dim();
  const bool gated = is_gated(s.activation);
  const index_t h1 = gated ? 2 * h : h;
  const Tensor w1 = as_arith(fc1_w, wd), w2 = as_arith(fc2_w, wd);
  const Tensor b1 = as_arith(fc1_b, wd), b2 = as_arith(fc2_b, wd);
  Tensor x = rows.to(wd).contiguous();
  Tensor hpre = Tensor::empty({R, h1}, wd), act = Tensor::empty({R, h}, wd);
  Tensor y = Tensor::empty({R, o}, wd);
  W* hp = hpre.data<W>();
  W* ap = act.data<W>();
  W* yp = y.data<W>();
  const W* xp = x.data<W>();
  const index_t E = s.num_experts;

  for (index_t e = 0; e < E; ++e) {  // h = x · fc1_wᵀ
    const index_t r0 = off[e], n = off[e + 1] - off[e];
    gemm_raw(false, true, n, h1, d, 1.0, xp + offset_of(r0, d), d,
             w1.data<W>() + offset_of(e, h1 * d), d, 0.0, hp + offset_of(r0, h1), h1);
  }
  const W* b1p = b1.defined() ? b1.data<W>() : nullptr;
#pragma omp parallel for schedule(static)
  for (index_t e = 0; e < E; ++e) {
    for (index_t r = off[e]; r < off[e + 1]; ++r) {
      W* hr = hp + offset_of(r, h1);
      W* ar = ap + offset_of(r, h);
      for (index_t j = 0; j < h1; ++j)
        hr[j] = round_to<T>(hr[j] + (b1p ? b1p[offset_of(e, h1) + j] : W(0)));
      for (index_t j = 0; j < h; ++j) {
        const W a = activate(s.activation, hr[j]);
        ar[j] = round_to<T>(gated ? a * hr[h + j] : a);
      }
    }
  }
  for (index_t e = 0; e < E; ++e) {  // y = act · fc2_w
    const index_t r0 = off[e], n = off[e + 1] - off[e];
    gemm_raw(false, false, n, o, h, 1.0, ap + offset_of(r0, h), h,
             w2.data<W>() + offset_of(e, h * o), o, 0.0, yp + offset_of(r0, o), o);
  }
  Tensor out = Tensor::empty({R, o}, s.dtype);
  T* op = out.data<T>();
  const W* b2p = b2.defined() ? b2.data<W>() : nullptr;
#pragma omp parallel for schedule(static)
  for (index_t e = 0; e < E; ++e)
    for (index_t r = off[e]; r < off[e + 1]; ++r)
      for (index_t j = 0; j < o; ++j)
        op[offset_of(r, o) + j] =
            store<T>(yp[offset_of(r, o) + j] + (b2p ? b2p[offset_of(e, o) + j] : W(0)));
  saved = FfnExperts::Saved{x, hpre, act, std::move(off), Tensor(), false};
  return out;
}

// Column sums of rows [r0, r1) of m [*, n] into out[n], adding rows in order (deterministic).
// Threads split the columns into blocks and walk the rows, so reads stay contiguous.
template <class W>
void column_sums(const W* m, index_t n, index_t r0, index_t r1, W* out) {
  constexpr index_t kBlock = 256;
#pragma omp parallel for schedule(static)
  for (index_t j0 = 0; j0 < n; j0 += kBlock) {
    const index_t j1 = std::min(n, j0 + kBlock);
    for (index_t j = j0; j < j1; ++j) out[j] = 0;
    for (index_t r = r0; r < r1; ++r) {
      const W* row = m + offset_of(r, n);
      for (index_t j = j0; j < j1; ++j) out[j] += row[j];
    }
  }
}

template <class T>
Tensor backward_impl(const FfnShape& s, Parameter& fc1_w, Parameter& fc2_w, Parameter& fc1_b,
                     Parameter& fc2_b, Tensor dy_in, const FfnExperts::Saved& sv) {
  using W = acc_t<T>;
  const DType wd = routing_dtype(s.dtype);
  const index_t R = sv.x.size(0), d = s.model_dim, h = s.hidden_size, E = s.num_experts;
  const index_t o = s.out_dim();
  const bool gated = is_gated(s.activation);
  const index_t h1 = gated ? 2 * h : h;
  const std::vector<index_t>& off = sv.offsets;
  const Tensor w1 = as_arith(fc1_w, wd), w2 = as_arith(fc2_w, wd);
  Tensor dy = dy_in.to(wd).contiguous();
  dy_in = Tensor();
  const W* dyp = dy.data<W>();
  const W* xp = sv.x.data<W>();
  const W* hp = sv.h.data<W>();
  const W* ap = sv.a.data<W>();

  Tensor da = Tensor::empty({R, h}, wd), dh = Tensor::empty({R, h1}, wd);
  // Weight gradients accumulate straight into the parameters' grads (GEMM beta = 1) when they
  // are stored in the arithmetic dtype; f16/bf16 grads go through an f32 buffer.
  const bool direct = s.dtype == wd;
  // An unset gradient (MoELayer::zero_grad(true)) is created when its GEMMs come.
  Tensor gw2 = direct ? grad_to_accumulate(fc2_w) : Tensor::zeros({E, h, o}, wd);
  W* dap = da.data<W>();
  W* dhp = dh.data<W>();
  for (index_t e = 0; e < E; ++e) {
    const index_t r0 = off[e], n = off[e + 1] - off[e];
    if (n == 0) continue;
    // da = dy · fc2_wᵀ ; d fc2_w = actᵀ · dy
    gemm_raw(false, true, n, h, o, 1.0, dyp + offset_of(r0, o), o,
             w2.data<W>() + offset_of(e, h * o), o, 0.0, dap + offset_of(r0, h), h);
    gemm_raw(true, false, h, o, n, 1.0, ap + offset_of(r0, h), h, dyp + offset_of(r0, o), o, 1.0,
             gw2.data<W>() + offset_of(e, h * o), o);
  }
  if (fc2_b.value.defined()) {
    Tensor g = Tensor::empty({E, o}, wd);
    for (index_t e = 0; e < E; ++e)
      column_sums(dyp, o, off[e], off[e + 1], g.data<W>() + offset_of(e, o));
    accumulate<T>(fc2_b.grad, g.data<W>());
  }
  if (!direct) accumulate<T>(grad_to_accumulate(fc2_w), gw2.data<W>());
  dy = gw2 = Tensor();  // fc2's backward was their last reader: free them before dx exists
  dyp = nullptr;
#pragma omp parallel for schedule(static)
  for (index_t r = 0; r < R; ++r) {
    const W* hr = hp + offset_of(r, h1);
    const W* dar = dap + offset_of(r, h);
    W* dhr = dhp + offset_of(r, h1);
    for (index_t j = 0; j < h; ++j) {
      if (gated) {
        dhr[j] = dar[j] * hr[h + j] * activate_grad(s.activation, hr[j]);
        dhr[h + j] = dar[j] * activate(s.activation, hr[j]);
      } else {
        dhr[j] = dar[j] * activate_grad(s.activation, hr[j]);
      }
    }
  }
  da = Tensor();
  Tensor dx = Tensor::empty({R, d}, wd);
  Tensor gw1 = direct ? grad_to_accumulate(fc1_w) : Tensor::zeros({E, h1, d}, wd);
  for (index_t e = 0; e < E; ++e) {
    const index_t r0 = off[e], n = off[e + 1] - off[e];
    if (n == 0) continue;
    // d fc1_w = dhᵀ · x ; dx = dh · fc1_w
    gemm_raw(true, false, h1, d, n, 1.0, dhp + offset_of(r0, h1), h1, xp + offset_of(r0, d), d, 1.0,
             gw1.data<W>() + offset_of(e, h1 * d), d);
    gemm_raw(false, false, n, d, h1, 1.0, dhp + offset_of(r0, h1), h1,
             w1.data<W>() + offset_of(e, h1 * d), d, 0.0, dx.data<W>() + offset_of(r0, d), d);
  }
  if (!direct) accumulate<T>(grad_to_accumulate(fc1_w), gw1.data<W>());
  if (fc1_b.value.defined()) {
    Tensor g = Tensor::empty({E, h1}, wd);
    for (index_t e = 0; e < E; ++e)
      column_sums(dhp, h1, off[e], off[e + 1], g.data<W>() + offset_of(e, h1));
    accumulate<T>(fc1_b.grad, g.data<W>());
  }
  return dx.to(s.dtype);
}

}  // namespace

Tensor ffn_forward_cpu(const FfnShape& s, const Parameter& fc1_w, const Parameter& fc2_w,
                       const Parameter& fc1_b, const Parameter& fc2_b, const Tensor& rows,
                       std::vector<index_t> offsets, FfnExperts::Saved& saved) {
  return dispatch_float(s.dtype, "ffn_forward_cpu", [&]<class T>() {
    return forward_impl<T>(s, fc1_w, fc2_w, fc1_b, fc2_b, rows, std::move(offsets), saved);
  });
}

Tensor ffn_backward_cpu(const FfnShape& s, Parameter& fc1_w, Parameter& fc2_w, Parameter& fc1_b,
                        Parameter& fc2_b, Tensor dy, const FfnExperts::Saved& saved) {
  return dispatch_float(s.dtype, "ffn_backward_cpu", [&]<class T>() {
    return backward_impl<T>(s, fc1_w, fc2_w, fc1_b, fc2_b, std::move(dy), saved);
  });
}

}  // namespace switchyard
