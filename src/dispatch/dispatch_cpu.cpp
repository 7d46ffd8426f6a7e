#include <algorithm>
#include <vector>

#include "core/backend.h"
#include "core/dtype_dispatch.h"
#include "dispatch/dispatch.h"

namespace switchyard {
namespace {

// Calls f.template operator()<T, A>() with T the data type and A the routing (weight) type.
template <class F>
decltype(auto) dispatch_data(const Tensor& data, const RoutingPlan& plan, const char* op, F&& f) {
  SY_ASSERT(plan.weight.dtype() == routing_dtype(data.dtype()), "plan weights are ",
            dtype_name(plan.weight.dtype()), " for ", dtype_name(data.dtype()), " data");
  return dispatch_float(data.dtype(), op,
                        [&]<class T>() { return f.template operator()<T, acc_t<T>>(); });
}

}  // namespace

Tensor encode_cpu(const RoutingPlan& plan, const Tensor& x, bool prescore) {
  const index_t R = plan.num_rows, k = plan.top_k, d = x.size(1);
  Tensor buf = Tensor::empty({R, d}, x.dtype(), x.device());
  dispatch_data(x, plan, "encode", [&]<class T_, class A>() {
    const T_* xp = x.data<T_>();
    T_* bp = buf.data<T_>();
    const index_t* rc = plan.row_choice.data<index_t>();
    const A* w = plan.weight.data<A>();
#pragma omp parallel for schedule(static)
    for (index_t r = 0; r < R; ++r) {
      T_* dst = bp + offset_of(r, d);
      const index_t c = rc[r];
      if (c < 0) {
        for (index_t j = 0; j < d; ++j) dst[j] = store<T_>(A(0));
        continue;
      }
      const T_* src = xp + offset_of(c / k, d);
      if (prescore) {
        for (index_t j = 0; j < d; ++j) dst[j] = store<T_>(w[c] * load(src[j]));
      } else {
        for (index_t j = 0; j < d; ++j) dst[j] = src[j];
      }
    }
  });
  return buf;
}

Tensor decode_cpu(const RoutingPlan& plan, const Tensor& buf, bool postscore) {
  const index_t T = plan.num_tokens, k = plan.top_k, d = buf.size(1);
  Tensor y = Tensor::empty({T, d}, buf.dtype(), buf.device());
  dispatch_data(buf, plan, "decode", [&]<class T_, class A>() {
    const T_* bp = buf.data<T_>();
    T_* yp = y.data<T_>();
    const index_t* row = plan.row.data<index_t>();
    const A* w = plan.weight.data<A>();
#pragma omp parallel
    {
      std::vector<A> acc(static_cast<std::size_t>(d));
#pragma omp for schedule(static)
      for (index_t t = 0; t < T; ++t) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (index_t j = 0; j < k; ++j) {  // choices in order: a fixed summation order
          const index_t r = row[t * k + j];
          if (r < 0) continue;
          const A s = postscore ? w[t * k + j] : A(1);
          const T_* src = bp + offset_of(r, d);
          for (index_t l = 0; l < d; ++l) acc[l] += s * load(src[l]);
        }
        for (index_t l = 0; l < d; ++l) yp[offset_of(t, d) + l] = store<T_>(acc[l]);
      }
    }
  });
  return y;
}

Tensor decode_backward_cpu(const RoutingPlan& plan, const Tensor& dy, const Tensor& buf,
                           bool postscore, Tensor& dweight) {
  const index_t R = plan.num_rows, k = plan.top_k, d = dy.size(1);
  Tensor dbuf = Tensor::empty({R, d}, dy.dtype(), dy.device());
  dispatch_data(dy, plan, "decode_backward", [&]<class T_, class A>() {
    const T_* dyp = dy.data<T_>();
    const T_* bp = buf.data<T_>();
    T_* dbp = dbuf.data<T_>();
    const index_t* rc = plan.row_choice.data<index_t>();
    const A* w = plan.weight.data<A>();
    A* dw = dweight.data<A>();
#pragma omp parallel for schedule(static)
    for (index_t r = 0; r < R; ++r) {
      T_* dst = dbp + offset_of(r, d);
      const index_t c = rc[r];
      if (c < 0) {
        for (index_t j = 0; j < d; ++j) dst[j] = store<T_>(A(0));
        continue;
      }
      const T_* g = dyp + offset_of(c / k, d);
      const A s = postscore ? w[c] : A(1);
      for (index_t j = 0; j < d; ++j) dst[j] = store<T_>(s * load(g[j]));
      if (postscore) {  // each choice owns one row: no two threads write one dweight entry
        const T_* out = bp + offset_of(r, d);
        A dot = 0;
        for (index_t j = 0; j < d; ++j) dot += load(g[j]) * load(out[j]);
        dw[c] += dot;
      }
    }
  });
  return dbuf;
}

Tensor encode_backward_cpu(const RoutingPlan& plan, const Tensor& dbuf, const Tensor& x,
                           bool prescore, Tensor& dweight) {
  const index_t T = plan.num_tokens, k = plan.top_k, d = x.size(1);
  Tensor dx = Tensor::empty({T, d}, x.dtype(), x.device());
  dispatch_data(x, plan, "encode_backward", [&]<class T_, class A>() {
    const T_* dbp = dbuf.data<T_>();
    const T_* xp = x.data<T_>();
    T_* dxp = dx.data<T_>();
    const index_t* row = plan.row.data<index_t>();
    const A* w = plan.weight.data<A>();
    A* dw = dweight.data<A>();
#pragma omp parallel
    {
      std::vector<A> acc(static_cast<std::size_t>(d));
#pragma omp for schedule(static)
      for (index_t t = 0; t < T; ++t) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (index_t j = 0; j < k; ++j) {
          const index_t r = row[t * k + j];
          if (r < 0) continue;
          const T_* g = dbp + offset_of(r, d);
          const A s = prescore ? w[t * k + j] : A(1);
          for (index_t l = 0; l < d; ++l) acc[l] += s * load(g[l]);
          if (prescore) {
            A dot = 0;
            for (index_t l = 0; l < d; ++l) dot += load(g[l]) * load(xp[offset_of(t, d) + l]);
            dw[t * k + j] += dot;
          }
        }
        for (index_t l = 0; l < d; ++l) dxp[offset_of(t, d) + l] = store<T_>(acc[l]);
      }
    }
  });
  return dx;
}

}  // namespace switchyard
