#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "routing/losses.h"
#include "switchyard/error.h"

namespace switchyard {

template <class A>
void softmax_row(const A* z, A* out, index_t n) {
  A m = -INFINITY;
  for (index_t e = 0; e < n; ++e) m = std::max(m, z[e]);
  A s = 0;
  for (index_t e = 0; e < n; ++e) s += (out[e] = std::exp(z[e] - m));
  for (index_t e = 0; e < n; ++e) out[e] /= s;
}

template <class A>
void top_k_row(const A* v, index_t n, int k, std::int32_t* out) {
  std::vector<std::int32_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(
      order.begin(), order.begin() + k, order.end(),
      [&](std::int32_t a, std::int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  std::copy(order.begin(), order.begin() + k, out);
}

template <class A>
double gshard_loss(index_t T, index_t E, int k, const A* probs, const std::int32_t* idx, A* grad,
                   double weight) {
  if (T == 0) return 0.0;
  std::vector<double> first(static_cast<std::size_t>(E), 0.0),
      mass(static_cast<std::size_t>(E), 0.0);
  for (index_t t = 0; t < T; ++t) {
    first[idx[t * k]] += 1;
    for (index_t e = 0; e < E; ++e) mass[e] += probs[t * E + e];
  }
  const double scale = static_cast<double>(E) / (static_cast<double>(T) * static_cast<double>(T));
  double l = 0;
  for (index_t e = 0; e < E; ++e) l += mass[e] * first[e];
  if (grad)
    for (index_t t = 0; t < T; ++t)
      for (index_t e = 0; e < E; ++e) grad[t * E + e] += static_cast<A>(weight * scale * first[e]);
  return l * scale;
}

namespace {

// Squared coefficient of variation var(v) / (mean(v)^2 + 1e-10) with the unbiased variance,
// and its gradient (written to g when not null). One element: 0.
double cv2(const std::vector<double>& v, std::vector<double>* g) {
  const double n = static_cast<double>(v.size());
  if (g) g->assign(v.size(), 0.0);
  if (v.size() < 2) return 0.0;
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / n;
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  const double var = ss / (n - 1), den = mean * mean + 1e-10;
  if (g)
    for (std::size_t i = 0; i < v.size(); ++i)
      (*g)[i] = 2 * (v[i] - mean) / (n - 1) / den - var * 2 * mean / (n * den * den);
  return var / den;
}

// grad_z += softmax(z) ⊙ (gp - <softmax(z), gp>) for one row.
template <class A>
void softmax_backward_row(const A* p, const double* gp, A* grad, index_t E) {
  double dot = 0;
  for (index_t e = 0; e < E; ++e) dot += p[e] * gp[e];
  for (index_t e = 0; e < E; ++e) grad[e] += static_cast<A>(p[e] * (gp[e] - dot));
}

}  // namespace

template <class A>
double load_importance_loss(index_t T, index_t E, int k, const A* logits, const A* noisy,
                            const std::int32_t* idx, double gate_noise, A* grad, double weight) {
  SY_CHECK(gate_noise > 0, "the load/importance loss needs gate_noise > 0, got ", gate_noise);
  if (T == 0) return 0.0;
  const double sigma = gate_noise / static_cast<double>(E);
  std::vector<A> p(static_cast<std::size_t>(T * E));
  for (index_t t = 0; t < T; ++t) softmax_row(logits + t * E, p.data() + t * E, E);
  std::vector<double> imp(static_cast<std::size_t>(E), 0.0), load(static_cast<std::size_t>(E), 0.0);
  for (index_t t = 0; t < T; ++t) {
    // Tutel compares a probability with the k-th largest noisy *logit*: matched on purpose.
    const double thr = noisy[t * E + idx[t * k + k - 1]];
    for (index_t e = 0; e < E; ++e) {
      imp[e] += p[t * E + e];
      load[e] += 0.5 * std::erfc(-(p[t * E + e] - thr) / sigma * M_SQRT1_2);
    }
  }
  std::vector<double> g_imp, g_load;
  const double l = (cv2(imp, grad ? &g_imp : nullptr) + cv2(load, grad ? &g_load : nullptr)) / 2;
  if (grad) {
    std::vector<double> gp(static_cast<std::size_t>(E));
    for (index_t t = 0; t < T; ++t) {
      const index_t thr_e = idx[t * k + k - 1];
      const double thr = noisy[t * E + thr_e];
      double g_thr = 0;
      for (index_t e = 0; e < E; ++e) {
        const double u = (p[t * E + e] - thr) / sigma;
        const double dload = std::exp(-0.5 * u * u) / (sigma * std::sqrt(2 * M_PI));
        gp[e] = weight * 0.5 * (g_imp[e] + g_load[e] * dload);
        g_thr -= weight * 0.5 * g_load[e] * dload;
      }
      softmax_backward_row(p.data() + t * E, gp.data(), grad + t * E, E);
      grad[t * E + thr_e] += static_cast<A>(g_thr);  // noisy = logits + constant noise
    }
  }
  return l;
}

namespace {
// prob: softmax(logits), or sigmoid(logits) normalised over E.
template <class A>
std::vector<A> switch_probs(index_t T, index_t E, const A* logits, ScoreFn score_fn) {
  std::vector<A> prob(static_cast<std::size_t>(T * E));
  for (index_t t = 0; t < T; ++t) {
    if (score_fn == ScoreFn::kSoftmax) {
      softmax_row(logits + t * E, prob.data() + t * E, E);
    } else {
      A s = 0;
      for (index_t e = 0; e < E; ++e)
        s += (prob[t * E + e] = A(1) / (A(1) + std::exp(-logits[t * E + e])));
      for (index_t e = 0; e < E; ++e) prob[t * E + e] /= s;
    }
  }
  return prob;
}
}  // namespace

template <class A>
std::vector<double> switch_token_counts(index_t T, index_t E, int k, const A* logits,
                                        ScoreFn score_fn) {
  const std::vector<A> prob = switch_probs(T, E, logits, score_fn);
  std::vector<double> tokens(static_cast<std::size_t>(E), 0.0);
  std::vector<std::int32_t> top(static_cast<std::size_t>(k));
  for (index_t t = 0; t < T; ++t) {
    top_k_row(prob.data() + t * E, E, k, top.data());
    for (int j = 0; j < k; ++j) tokens[top[j]] += 1;
  }
  return tokens;
}

template <class A>
double switch_loss(index_t T, index_t E, int k, const A* logits, ScoreFn score_fn, index_t seq_len,
                   A* grad, double weight, const double* global_tokens, double global_num_tokens) {
  if (T == 0) return 0.0;
  const index_t L = seq_len > 0 ? seq_len : T;
  SY_CHECK(T % L == 0, "the sequence-level aux loss needs whole sequences: ", T,
           " tokens are not a multiple of seq_len=", L);
  SY_ASSERT(!global_tokens || seq_len == 0, "global Switch counts need seq_len == 0");
  const index_t num_seq = T / L;
  const std::vector<A> prob = switch_probs(T, E, logits, score_fn);
  const double len = global_tokens ? global_num_tokens : static_cast<double>(L);
  const double scale = static_cast<double>(E) / (static_cast<double>(k) * len * len) / num_seq;
  double l = 0;
  std::vector<std::int32_t> top(static_cast<std::size_t>(k));
  std::vector<double> tokens(static_cast<std::size_t>(E)), mass(static_cast<std::size_t>(E));
  std::vector<double> gp(static_cast<std::size_t>(E));
  for (index_t s = 0; s < num_seq; ++s) {
    std::fill(tokens.begin(), tokens.end(), 0.0);
    std::fill(mass.begin(), mass.end(), 0.0);
    for (index_t t = s * L; t < (s + 1) * L; ++t) {
      if (!global_tokens) {
        top_k_row(prob.data() + t * E, E, k, top.data());
        for (int j = 0; j < k; ++j) tokens[top[j]] += 1;
      }
      for (index_t e = 0; e < E; ++e) mass[e] += prob[t * E + e];
    }
    if (global_tokens) tokens.assign(global_tokens, global_tokens + E);
    for (index_t e = 0; e < E; ++e) l += scale * mass[e] * tokens[e];
    if (!grad) continue;
    for (index_t t = s * L; t < (s + 1) * L; ++t) {
      const A* p = prob.data() + t * E;
      for (index_t e = 0; e < E; ++e) gp[e] = weight * scale * tokens[e];
      if (score_fn == ScoreFn::kSoftmax) {
        softmax_backward_row(p, gp.data(), grad + t * E, E);
      } else {
        // prob = sig / sum(sig): d sig_e = (gp_e - <prob, gp>) / sum(sig); d z = d sig * sig' .
        double sum_sig = 0, dot = 0;
        for (index_t e = 0; e < E; ++e) {
          sum_sig += 1 / (1 + std::exp(-static_cast<double>(logits[t * E + e])));
          dot += p[e] * gp[e];
        }
        for (index_t e = 0; e < E; ++e) {
          const double sig = 1 / (1 + std::exp(-static_cast<double>(logits[t * E + e])));
          grad[t * E + e] += static_cast<A>((gp[e] - dot) / sum_sig * sig * (1 - sig));
        }
      }
    }
  }
  return l;
}

template <class A>
double z_loss(index_t T, index_t E, const A* logits, A* grad, double weight) {
  if (T == 0) return 0.0;
  double l = 0;
  std::vector<A> p(static_cast<std::size_t>(E));
  for (index_t t = 0; t < T; ++t) {
    const A* z = logits + t * E;
    double m = -INFINITY;
    for (index_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(z[e]));
    double s = 0;
    for (index_t e = 0; e < E; ++e) s += std::exp(z[e] - m);
    const double lse = m + std::log(s);
    l += lse * lse;
    if (grad) {
      softmax_row(z, p.data(), E);
      for (index_t e = 0; e < E; ++e)
        grad[t * E + e] += static_cast<A>(weight * 2 * lse * p[e] / T);
    }
  }
  return l / static_cast<double>(T);
}

#define SY_INSTANTIATE_LOSSES(A)                                                                 \
  template void softmax_row<A>(const A*, A*, index_t);                                           \
  template void top_k_row<A>(const A*, index_t, int, std::int32_t*);                             \
  template double gshard_loss<A>(index_t, index_t, int, const A*, const std::int32_t*, A*,       \
                                 double);                                                        \
  template double load_importance_loss<A>(index_t, index_t, int, const A*, const A*,             \
                                          const std::int32_t*, double, A*, double);              \
  template double switch_loss<A>(index_t, index_t, int, const A*, ScoreFn, index_t, A*, double,  \
                                 const double*, double);                                         \
  template std::vector<double> switch_token_counts<A>(index_t, index_t, int, const A*, ScoreFn); \
  template double z_loss<A>(index_t, index_t, const A*, A*, double);
SY_INSTANTIATE_LOSSES(float)
SY_INSTANTIATE_LOSSES(double)

}  // namespace switchyard
