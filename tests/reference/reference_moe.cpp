// The reference MoE of reference_moe.h. It follows docs/routing.md.
#include "reference/reference_moe.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

namespace sy_ref {

using switchyard::Activation;
using switchyard::AuxLoss;
using switchyard::DropPolicy;
using switchyard::GateType;
using switchyard::RuleSet;
using switchyard::ScoreFn;

namespace {

const std::vector<double>& param(const Params& params, const std::string& name) {
  auto it = params.find(name);
  if (it == params.end()) throw std::runtime_error("reference: missing parameter " + name);
  return it->second;
}

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

std::vector<double> softmax_row(const double* v, std::int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (std::int64_t i = 0; i < n; ++i) m = std::max(m, v[i]);
  std::vector<double> out(n);
  double s = 0;
  for (std::int64_t i = 0; i < n; ++i) s += out[i] = std::exp(v[i] - m);
  for (auto& o : out) o /= s;
  return out;
}

// Indices of the k largest values, best first; ties go to the lower index (§2).
std::vector<int> top_k_indices(const std::vector<double>& v, int k) {
  std::vector<int> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return v[a] > v[b]; });
  order.resize(k);
  return order;
}

// Gap between the k-th and (k+1)-th largest values (infinite when there is no (k+1)-th or it
// is masked to -inf).
double top_k_gap(const std::vector<double>& v, int k) {
  if (k >= static_cast<int>(v.size())) return 1e300;
  std::vector<double> s = v;
  std::sort(s.begin(), s.end(), std::greater<double>());
  if (std::isinf(s[k])) return 1e300;
  return s[k - 1] - s[k];
}

// Megatron's sinkhorn on c = exp(logits - max) (§2); returns d1 * c * d0, [T, E].
std::vector<double> sinkhorn(const MoEConfig& cfg, const std::vector<double>& logits,
                             std::int64_t T, std::int64_t E) {
  double m = -std::numeric_limits<double>::infinity();
  for (double v : logits) m = std::max(m, v);
  std::vector<double> c(logits.size());
  for (std::size_t i = 0; i < c.size(); ++i) c[i] = std::exp(logits[i] - m);
  std::vector<double> d0(T, 1.0), d1(E, 1.0);
  for (int it = 0; it < cfg.sinkhorn_max_iters; ++it) {
    std::vector<double> d1_old = d1;
    for (std::int64_t t = 0; t < T; ++t) {
      double s = 0;
      for (std::int64_t e = 0; e < E; ++e) s += c[t * E + e] * d1[e];
      d0[t] = (1.0 / T) / (s + 1e-8);
    }
    for (std::int64_t e = 0; e < E; ++e) {
      double s = 0;
      for (std::int64_t t = 0; t < T; ++t) s += d0[t] * c[t * E + e];
      d1[e] = (1.0 / E) / (s + 1e-8);
    }
    double err = 0;
    for (std::int64_t e = 0; e < E; ++e) err += std::abs(d1[e] - d1_old[e]);
    if (err / E <= cfg.sinkhorn_tol) break;
  }
  std::vector<double> out(c.size());
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t e = 0; e < E; ++e) out[t * E + e] = d1[e] * c[t * E + e] * d0[t];
  return out;
}

// Sinkhorn's weights: sigmoid for k = 1, softmax over E for k > 1 (§2).
std::vector<double> sinkhorn_activation(const double* logits, std::int64_t E, int k) {
  if (k > 1) return softmax_row(logits, E);
  std::vector<double> out(E);
  for (std::int64_t e = 0; e < E; ++e) out[e] = sigmoid(logits[e]);
  return out;
}

// Group-limited routing (§2): keep the topk_groups best groups, mask the rest to -inf.
void limit_groups(const MoEConfig& cfg, int k, std::vector<double>& sel, double& margin) {
  const int G = cfg.num_groups;
  const std::int64_t per = static_cast<std::int64_t>(sel.size()) / G;
  const int take = k / cfg.topk_groups;
  std::vector<double> group_score(G);
  for (int g = 0; g < G; ++g) {
    std::vector<double> in(sel.begin() + g * per, sel.begin() + (g + 1) * per);
    for (int i : top_k_indices(in, take)) group_score[g] += in[i];
    // Which experts make up a group's score is a decision too.
    margin = std::min(margin, top_k_gap(in, take) / std::max(1.0, std::abs(in[0])));
  }
  margin = std::min(margin, top_k_gap(group_score, cfg.topk_groups));
  std::vector<int> keep = top_k_indices(group_score, cfg.topk_groups);
  for (int g = 0; g < G; ++g) {
    if (std::find(keep.begin(), keep.end(), g) != keep.end()) continue;
    for (std::int64_t i = 0; i < per; ++i)
      sel[g * per + i] = -std::numeric_limits<double>::infinity();
  }
}

double norm_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

// cv2(v) = var(v) / (mean(v)^2 + 1e-10), unbiased variance as torch.var.
double cv2(const std::vector<double>& v) {
  const double n = static_cast<double>(v.size());
  double mean = std::accumulate(v.begin(), v.end(), 0.0) / n;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= (n - 1);
  return var / (mean * mean + 1e-10);
}

// Switch loss over tokens [t0, t0 + n): E / (k n^2) * sum_e (sum_t prob) * tokens(e), with
// tokens(e) from a plain top-k (no bias, no group limit, before drops) (§5).
double switch_loss(const RefRouting& r, const MoEConfig& cfg, std::int64_t t0, std::int64_t n) {
  const std::int64_t E = cfg.num_experts;
  std::vector<double> prob_sum(E, 0.0), tokens(E, 0.0);
  for (std::int64_t t = t0; t < t0 + n; ++t) {
    const double* lg = &r.logits[t * E];
    std::vector<double> prob;
    if (cfg.score_fn == ScoreFn::kSigmoid) {
      prob.resize(E);
      double s = 0;
      for (std::int64_t e = 0; e < E; ++e) s += prob[e] = sigmoid(lg[e]);
      for (auto& p : prob) p /= s;
    } else {
      prob = softmax_row(lg, E);
    }
    for (std::int64_t e = 0; e < E; ++e) prob_sum[e] += prob[e];
    for (int e : top_k_indices(prob, r.k)) tokens[e] += 1;
  }
  double l = 0;
  for (std::int64_t e = 0; e < E; ++e) l += prob_sum[e] * tokens[e];
  return l * E / (static_cast<double>(r.k) * n * n);
}

}  // namespace

double reference_activation(Activation a, double v) {
  switch (a) {
    case Activation::kRelu:
      return v > 0 ? v : 0.0;
    case Activation::kGelu:
    case Activation::kGeGLU:
      return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    case Activation::kGeluTanh: {
      const double c = std::sqrt(2.0 / M_PI);
      return 0.5 * v * (1.0 + std::tanh(c * (v + 0.044715 * v * v * v)));
    }
    case Activation::kSilu:
    case Activation::kSwiGLU:
      return v * sigmoid(v);
  }
  return 0;
}

std::vector<double> reference_expert(const MoEConfig& cfg, const Params& params,
                                     const std::string& prefix, std::int64_t e, std::int64_t h,
                                     const double* row) {
  const std::int64_t d = cfg.model_dim, o = cfg.out_dim();
  const bool gated = switchyard::is_gated(cfg.activation);
  const std::int64_t h1 = gated ? 2 * h : h;                  // fc1 rows
  const auto& fc1 = param(params, prefix + "batched_fc1_w");  // [E, h1, d]
  const auto& fc2 = param(params, prefix + "batched_fc2_w");  // [E, h, o]
  std::vector<double> pre(h1, 0.0);
  for (std::int64_t j = 0; j < h1; ++j) {
    double s = 0;
    for (std::int64_t i = 0; i < d; ++i) s += fc1[(e * h1 + j) * d + i] * row[i];
    if (cfg.has_fc1_bias) s += param(params, prefix + "batched_fc1_bias")[e * h1 + j];
    pre[j] = s;
  }
  // Gated: act(gate rows [0,h)) * up rows [h,2h).
  std::vector<double> act(h);
  for (std::int64_t j = 0; j < h; ++j)
    act[j] = gated ? reference_activation(cfg.activation, pre[j]) * pre[h + j]
                   : reference_activation(cfg.activation, pre[j]);
  std::vector<double> out(o, 0.0);
  for (std::int64_t i = 0; i < o; ++i) {
    double s = 0;
    for (std::int64_t j = 0; j < h; ++j) s += act[j] * fc2[(e * h + j) * o + i];
    if (cfg.has_fc2_bias) s += param(params, prefix + "batched_fc2_bias")[e * o + i];
    out[i] = s;
  }
  return out;
}

std::vector<double> reference_logits(const MoEConfig& cfg, const Params& params,
                                     const std::vector<double>& x, std::int64_t T) {
  const std::int64_t d = cfg.model_dim, E = cfg.num_experts;
  std::vector<double> logits(T * E, 0.0);
  if (cfg.gate == GateType::kLinear) {
    // §1: logits = x · Wgᵀ, Wg [E, d].
    const auto& wg = param(params, "gates.0.wg.weight");
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t e = 0; e < E; ++e) {
        double s = 0;
        for (std::int64_t i = 0; i < d; ++i) s += x[t * d + i] * wg[e * d + i];
        logits[t * E + e] = s;
      }
    return logits;
  }
  // §1 cosine: normalize(P x + b, rows) · normalize(S, cols) * exp(min(tau, ln 100)).
  const std::int64_t p = cfg.cosine_proj_dim;
  const auto& P = param(params, "gates.0.cosine_projector.weight");  // [p, d]
  const auto& b = param(params, "gates.0.cosine_projector.bias");    // [p]
  const auto& S = param(params, "gates.0.sim_matrix");               // [p, E]
  const double tau = param(params, "gates.0.temperature")[0];
  const double scale = std::exp(std::min(tau, std::log(100.0)));
  std::vector<double> col_norm(E, 0.0);
  for (std::int64_t e = 0; e < E; ++e) {
    for (std::int64_t i = 0; i < p; ++i) col_norm[e] += S[i * E + e] * S[i * E + e];
    col_norm[e] = std::max(std::sqrt(col_norm[e]), 1e-12);  // F.normalize's eps
  }
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<double> proj(p);
    double n2 = 0;
    for (std::int64_t i = 0; i < p; ++i) {
      double s = b[i];
      for (std::int64_t c = 0; c < d; ++c) s += P[i * d + c] * x[t * d + c];
      proj[i] = s;
      n2 += s * s;
    }
    const double n = std::max(std::sqrt(n2), 1e-12);
    for (std::int64_t e = 0; e < E; ++e) {
      double s = 0;
      for (std::int64_t i = 0; i < p; ++i) s += proj[i] / n * S[i * E + e] / col_norm[e];
      logits[t * E + e] = s * scale;
    }
  }
  return logits;
}

RefRouting reference_route(const MoEConfig& cfg, const std::vector<double>& logits, std::int64_t T,
                           const RefOptions& options) {
  const std::int64_t E = cfg.num_experts;
  const bool megatron = cfg.rules == RuleSet::kMegatron;
  const bool sigmoid_scores = cfg.score_fn == ScoreFn::kSigmoid;
  RefRouting r;
  r.k = static_cast<int>(std::min<std::int64_t>(options.top_k.value_or(cfg.top_k), E));
  const int k = r.k;
  r.logits = logits;
  r.clean_logits = logits;
  r.scores.resize(T * E);
  r.idx.resize(T * k);
  r.w.resize(T * k);
  std::vector<double> bias(E, 0.0);
  if (cfg.expert_bias && !options.expert_bias.empty()) bias = options.expert_bias;

  // §1: scores.
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<double> s =
        sigmoid_scores ? std::vector<double>(E) : softmax_row(&logits[t * E], E);
    if (sigmoid_scores)
      for (std::int64_t e = 0; e < E; ++e) s[e] = sigmoid(logits[t * E + e]);
    std::copy(s.begin(), s.end(), r.scores.begin() + t * E);
  }
  std::vector<double> sink;
  if (cfg.sinkhorn && options.training) sink = sinkhorn(cfg, logits, T, E);

  // §2: selection and weights, token by token.
  const double eps_f32 = std::numeric_limits<float>::epsilon();
  for (std::int64_t t = 0; t < T; ++t) {
    const double* lg = &logits[t * E];
    const double* sc = &r.scores[t * E];
    std::vector<double> sel(E);
    double unit = 1.0;  // scale of the selection values, for the margin
    if (cfg.sinkhorn && options.training) {
      for (std::int64_t e = 0; e < E; ++e) sel[e] = sink[t * E + e];
      unit = 1.0 / static_cast<double>(std::max<std::int64_t>(T, 1));  // rows sum to about 1/T
    } else if (cfg.sinkhorn) {
      sel = sinkhorn_activation(lg, E, k);  // evaluation: plain top-k of the activation
    } else if (megatron && !sigmoid_scores && !cfg.pre_softmax) {
      for (std::int64_t e = 0; e < E; ++e) sel[e] = lg[e];  // Megatron: top-k of the logits
      unit = std::max(1.0, *std::max_element(sel.begin(), sel.end()));
    } else {
      for (std::int64_t e = 0; e < E; ++e) sel[e] = sc[e] + bias[e];
    }
    if (cfg.num_groups > 1 && !cfg.sinkhorn) limit_groups(cfg, k, sel, r.min_margin);
    std::vector<int> top = top_k_indices(sel, k);
    r.min_margin = std::min(r.min_margin, top_k_gap(sel, k) / unit);

    std::vector<double> w(k);
    if (cfg.sinkhorn) {
      // No renormalisation, no scaling (§2).
      std::vector<double> act = sinkhorn_activation(lg, E, k);
      for (int j = 0; j < k; ++j) w[j] = act[top[j]];
    } else if (megatron && !sigmoid_scores && !cfg.pre_softmax) {
      // Softmax over the k chosen logits.
      std::vector<double> chosen(k);
      for (int j = 0; j < k; ++j) chosen[j] = lg[top[j]];
      w = softmax_row(chosen.data(), k);
      for (auto& v : w) v *= cfg.scaling_factor;
    } else {
      for (int j = 0; j < k; ++j) w[j] = sc[top[j]];  // weights never include the bias
      if (k > 1 && (cfg.normalize_gate || sigmoid_scores)) {
        double s = 0;
        for (double v : w) s += v;
        for (auto& v : w) v /= std::max(s, eps_f32);
      }
      for (auto& v : w) v *= cfg.scaling_factor;
    }
    for (int j = 0; j < k; ++j) {
      r.idx[t * k + j] = top[j];
      r.w[t * k + j] = w[j];
    }
  }

  // §3: capacity and drops.
  r.kept.assign(T * k, 1);
  r.slot.assign(T * k, -1);
  std::vector<std::int64_t> needed(E, 0);
  for (int v : r.idx) needed[v] += 1;
  const std::int64_t max_needed = E > 0 ? *std::max_element(needed.begin(), needed.end()) : 0;
  const double cf = options.capacity_factor.value_or(cfg.capacity_factor);

  double order_margin = 1e300;  // the batch-prioritized order matters only when something drops
  if (!megatron) {
    // Token order, or descending max score with batch-prioritized routing (stable).
    std::vector<std::int64_t> order(T);
    std::iota(order.begin(), order.end(), 0);
    if (cfg.batch_prioritized_routing) {
      std::vector<double> best(T);
      for (std::int64_t t = 0; t < T; ++t)
        best[t] = *std::max_element(r.scores.begin() + t * E, r.scores.begin() + (t + 1) * E);
      std::stable_sort(order.begin(), order.end(),
                       [&](std::int64_t a, std::int64_t b) { return best[a] > best[b]; });
      for (std::int64_t i = 1; i < T; ++i)
        order_margin = std::min(order_margin, best[order[i - 1]] - best[order[i]]);
    }
    const std::int64_t spe = (T + E - 1) / E;  // samples_per_expert = ceil(T / E)
    std::int64_t C;
    if (cf > 0) {
      C = std::max<std::int64_t>(1, k * static_cast<std::int64_t>(std::floor(cf * spe)));
    } else if (cf == 0) {
      C = max_needed;
      r.dropless = true;
    } else {
      C = std::min<std::int64_t>(max_needed, k * static_cast<std::int64_t>(std::floor(-cf * spe)));
    }
    std::int64_t a = std::max(cfg.overlap_degree, 1);  // sharded_count = 1 in one process
    if (a > 256) a = (a + 127) / 128 * 128;
    C = (C + a - 1) / a * a;
    r.capacity = C;
    // Choice-major slots: all first choices, then all second choices, ...
    std::vector<std::int64_t> fill(E, 0);
    for (int j = 0; j < k; ++j)
      for (std::int64_t t : order) {
        const int e = r.idx[t * k + j];
        r.slot[t * k + j] = fill[e]++;
        r.kept[t * k + j] = r.slot[t * k + j] < C;
      }
  } else if (cf > 0) {
    const std::int64_t C = static_cast<std::int64_t>(
        std::ceil(static_cast<double>(T) * k / static_cast<double>(E) * cf));
    r.capacity = C;
    for (std::int64_t e = 0; e < E; ++e) {
      std::vector<std::int64_t> choices;  // t * k + j, in token order
      for (std::int64_t t = 0; t < T; ++t)
        for (int j = 0; j < k; ++j)
          if (r.idx[t * k + j] == e) choices.push_back(t * k + j);
      if (cfg.drop_policy == DropPolicy::kProbs) {
        std::stable_sort(choices.begin(), choices.end(),
                         [&](std::int64_t a, std::int64_t b) { return r.w[a] > r.w[b]; });
        if (static_cast<std::int64_t>(choices.size()) > C && C > 0)
          r.min_margin = std::min(r.min_margin, r.w[choices[C - 1]] - r.w[choices[C]]);
      }
      for (std::size_t i = 0; i < choices.size(); ++i)
        r.kept[choices[i]] = static_cast<std::int64_t>(i) < C;
    }
  } else {
    r.capacity = max_needed;
    r.dropless = true;
  }

  r.tokens_per_expert.assign(E, 0);
  for (std::int64_t i = 0; i < T * k; ++i) {
    if (r.kept[i])
      r.tokens_per_expert[r.idx[i]] += 1;
    else
      r.dropped_choices += 1;
  }
  if (r.dropped_choices > 0) r.min_margin = std::min(r.min_margin, order_margin);
  return r;
}

double reference_z_loss(const std::vector<double>& logits, std::int64_t T, std::int64_t E) {
  if (T == 0) return 0.0;
  double s = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    double m = *std::max_element(logits.begin() + t * E, logits.begin() + (t + 1) * E);
    double se = 0;
    for (std::int64_t e = 0; e < E; ++e) se += std::exp(logits[t * E + e] - m);
    const double lse = m + std::log(se);
    s += lse * lse;
  }
  return s / T;
}

double reference_aux_loss(const MoEConfig& cfg, const RefRouting& r, std::int64_t T) {
  const std::int64_t E = cfg.num_experts;
  if (T == 0) return 0.0;
  switch (cfg.aux_loss) {
    case AuxLoss::kNone:
      return 0.0;
    case AuxLoss::kGShard: {
      // (E / T^2) * sum_e (sum_t score[t,e]) * #{t : idx[t,0] = e}: first choices only.
      std::vector<double> score_sum(E, 0.0), first(E, 0.0);
      for (std::int64_t t = 0; t < T; ++t) {
        for (std::int64_t e = 0; e < E; ++e) score_sum[e] += r.scores[t * E + e];
        first[r.idx[t * r.k]] += 1;
      }
      double l = 0;
      for (std::int64_t e = 0; e < E; ++e) l += score_sum[e] * first[e];
      return l * E / (static_cast<double>(T) * T);
    }
    case AuxLoss::kLoadImportance: {
      // p from the noise-free logits; thr_t is the k-th largest noisy logit (Tutel compares a
      // probability with a logit).
      std::vector<double> imp(E, 0.0), load(E, 0.0);
      const double sd = cfg.gate_noise / E;
      for (std::int64_t t = 0; t < T; ++t) {
        std::vector<double> noisy(r.logits.begin() + t * E, r.logits.begin() + (t + 1) * E);
        std::vector<double> p = softmax_row(&r.clean_logits[t * E], E);
        const double thr = noisy[top_k_indices(noisy, r.k).back()];
        for (std::int64_t e = 0; e < E; ++e) {
          imp[e] += p[e];
          load[e] += norm_cdf((p[e] - thr) / sd);
        }
      }
      return (cv2(imp) + cv2(load)) / 2.0;
    }
    case AuxLoss::kSwitch:
      return switch_loss(r, cfg, 0, T);
    case AuxLoss::kSwitchSequence: {
      const std::int64_t S = cfg.seq_len;
      double l = 0;
      for (std::int64_t t0 = 0; t0 < T; t0 += S) l += switch_loss(r, cfg, t0, S);
      return l / static_cast<double>(T / S);
    }
  }
  return 0.0;
}

RefResult reference_forward(const MoEConfig& cfg, const Params& params,
                            const std::vector<double>& x, std::int64_t T,
                            const RefOptions& options) {
  const std::int64_t d = cfg.model_dim, od = cfg.out_dim();
  RefResult out;
  const std::vector<double> logits = reference_logits(cfg, params, x, T);
  std::vector<double> noisy = logits;
  for (std::size_t i = 0; i < options.logit_noise.size(); ++i) noisy[i] += options.logit_noise[i];
  out.routing = reference_route(cfg, noisy, T, options);
  out.routing.clean_logits = logits;
  const RefRouting& r = out.routing;
  out.aux = reference_aux_loss(cfg, r, T);
  out.z = reference_z_loss(logits, T, cfg.num_experts);

  // §4: combine the kept choices; is_postscore weights outputs, else the rows going in.
  out.y.assign(T * od, 0.0);  // [T, o]
  for (std::int64_t t = 0; t < T; ++t) {
    const double* row = &x[t * d];
    for (int j = 0; j < r.k; ++j) {
      if (!r.kept[t * r.k + j]) continue;
      const int e = r.idx[t * r.k + j];
      const double w = r.w[t * r.k + j];
      std::vector<double> o;
      if (cfg.is_postscore) {
        o = reference_expert(cfg, params, "experts.", e, cfg.hidden_size, row);
        for (auto& v : o) v *= w;
      } else {
        std::vector<double> scaled(row, row + d);
        for (auto& v : scaled) v *= w;
        o = reference_expert(cfg, params, "experts.", e, cfg.hidden_size, scaled.data());
      }
      for (std::int64_t i = 0; i < od; ++i) out.y[t * od + i] += o[i];
    }
    if (cfg.shared_expert_hidden > 0) {
      std::vector<double> o =
          reference_expert(cfg, params, "shared_experts.", 0, cfg.shared_expert_hidden, row);
      for (std::int64_t i = 0; i < od; ++i) out.y[t * od + i] += o[i];
    }
  }
  return out;
}

}  // namespace sy_ref
