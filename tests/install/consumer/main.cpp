// Builds a small MoE layer from the installed package and runs one forward and backward.
#include <switchyard/switchyard.h>

#include <cmath>
#include <cstdio>
#include <vector>

namespace sy = switchyard;

int main() {
  try {
    sy::MoEConfig cfg;
    cfg.model_dim = 16;
    cfg.hidden_size = 32;
    cfg.num_experts = 4;
    cfg.top_k = 2;
    sy::MoELayer layer(cfg);

    const sy::index_t num_tokens = 10;
    std::vector<double> xs(static_cast<std::size_t>(num_tokens * cfg.model_dim));
    for (std::size_t i = 0; i < xs.size(); ++i) {
      xs[i] = sy::rng_normal(cfg.seed, sy::RngStream::kData, 0, i, 0);
    }
    const sy::Tensor x = sy::Tensor::from_vector(xs, {num_tokens, cfg.model_dim});
    const sy::ForwardResult r = layer.forward(x);

    sy::Tensor dy = sy::Tensor::zeros(r.y.sizes(), r.y.dtype());
    dy.fill(1.0);
    sy::LossWeights weights;
    weights.aux = 0.01;
    const sy::Tensor dx = layer.backward(dy, weights);

    int bad = 0;
    if (r.y.sizes() != x.sizes() || dx.sizes() != x.sizes()) ++bad;
    for (double v : r.y.to_vector()) bad += !std::isfinite(v);
    for (double v : dx.to_vector()) bad += !std::isfinite(v);
    double grad_norm = 0.0;
    for (sy::Parameter* p : layer.parameters()) {
      for (double g : p->grad.to_vector()) grad_norm += g * g;
    }
    if (!(grad_norm > 0.0)) ++bad;
    std::printf("switchyard consumer: y [%lld, %lld], aux loss %.4f, %zu parameters, |grad| %.4f\n",
                static_cast<long long>(r.y.size(0)), static_cast<long long>(r.y.size(1)),
                r.losses.aux, layer.parameters().size(), std::sqrt(grad_norm));
    if (bad) {
      std::printf("FAIL: %d bad shapes or values\n", bad);
      return 1;
    }
    std::printf("ok\n");
    return 0;
  } catch (const sy::Error& e) {
    std::fprintf(stderr, "switchyard error: %s\n", e.what());
    return 1;
  }
}
