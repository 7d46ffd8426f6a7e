#include "train.h"

#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "commands.h"
#include "progress.h"
#include "tensor_ops.h"

namespace switchyard::tools {
namespace {

using Clock = std::chrono::steady_clock;

// Layer seeds: a splitmix64 hash of (seed, role, layer), so the teacher is not the student and
// no two layers start alike. (The data draws from its own Philox stream, RngStream::kData.)
std::uint64_t layer_seed(std::uint64_t seed, std::uint64_t role, std::uint64_t layer) {
  std::uint64_t z = seed * 0x9E3779B97F4A7C15ull + role * 0xBF58476D1CE4E5B9ull + layer + 1;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
constexpr std::uint64_t kStudent = 1;
constexpr std::uint64_t kTeacher = 2;
constexpr std::uint64_t kData = 3;

std::vector<MoELayer> make_stack(const TrainOptions& o, std::uint64_t role) {
  std::vector<MoELayer> layers;
  layers.reserve(static_cast<std::size_t>(o.num_layers));
  for (int l = 0; l < o.num_layers; ++l) {
    MoEConfig cfg = o.moe;
    cfg.seed = layer_seed(o.seed, role, static_cast<std::uint64_t>(l));
    if (o.comm)
      layers.emplace_back(cfg, o.comm);
    else
      layers.emplace_back(cfg);
  }
  return layers;
}

// What one forward pass through a stack reports.
struct StackForward {
  Tensor y;
  double aux = 0.0;  // mean over layers of the unweighted losses
  double z = 0.0;
  index_t dropped = 0;        // summed over layers
  double useful_flops = 0.0;  // one pass: 2 T k d h per expert weight matrix, over layers
};

// h <- h + moe_l(h) for every layer.
StackForward forward_stack(const TrainOptions& o, std::vector<MoELayer>& layers, const Tensor& x,
                           bool training) {
  StackForward out;
  ForwardOptions fo;
  fo.training = training;
  if (o.comm) {
    fo.adaptive_r = o.adaptive_r;
    fo.a2a_algorithm = o.a2a_algorithm;
  }
  Tensor h = x;
  for (MoELayer& layer : layers) {
    ForwardResult r = layer.forward(h, fo);
    h = add(h, r.y);
    out.aux += r.losses.aux;
    out.z += r.losses.z;
    out.dropped += r.stats.dropped_choices;
    const MoEConfig& c = layer.config();
    const double matrices = is_gated(c.activation) ? 3.0 : 2.0;
    out.useful_flops += 2.0 * static_cast<double>(x.size(0)) * r.stats.top_k *
                        static_cast<double>(c.model_dim) * static_cast<double>(c.hidden_size) *
                        matrices;
  }
  out.aux /= static_cast<double>(layers.size());
  out.z /= static_cast<double>(layers.size());
  out.y = h;
  return out;
}

// Backward through the residual stack: dh_l = dh_{l+1} + dmoe_l/dh_l(dh_{l+1}).
void backward_stack(std::vector<MoELayer>& layers, const Tensor& dy, const LossWeights& w) {
  Tensor dh = dy;
  for (auto it = layers.rbegin(); it != layers.rend(); ++it) {
    const Tensor dx = it->backward(dh, w);
    if (std::next(it) != layers.rend()) dh = add(dh, dx);  // the input's gradient is not needed
  }
}

struct StepResult {
  double loss = 0.0;
  StackForward fwd;
  double ms = 0.0;
};

class Trainer {
 public:
  explicit Trainer(const TrainOptions& o)
      : o_(o), student_(make_stack(o, kStudent)), teacher_(make_stack(o, kTeacher)) {
    std::vector<Parameter*> params;
    for (MoELayer& layer : student_) {
      for (Parameter* p : layer.parameters()) params.push_back(p);
    }
    optimizer_ = std::make_unique<Optimizer>(std::move(params), o.optimizer);
  }

  StepResult step(int step_idx) {
    const index_t num_rows = o_.batch_size * o_.num_tokens;
    // Each rank its own batch (rank 0 draws what one process draws).
    const std::uint64_t data_seed =
        o_.comm && o_.comm->rank() > 0
            ? layer_seed(o_.seed, kData, static_cast<std::uint64_t>(o_.comm->rank()))
            : o_.seed;
    const Tensor x =
        random_normal(num_rows, o_.moe.model_dim, data_seed, static_cast<std::uint64_t>(step_idx),
                      o_.moe.dtype, o_.moe.device);
    const Tensor target = forward_stack(o_, teacher_, x, /*training=*/false).y;

    // Timed: what a training step of the student costs (the teacher and the data are not).
    StepResult r;
    const auto start = Clock::now();
    r.fwd = forward_stack(o_, student_, x, /*training=*/!o_.eval);
    if (o_.eval) {
      r.loss = mse_loss(r.fwd.y, target, nullptr);
    } else {
      Tensor dy;
      r.loss = mse_loss(r.fwd.y, target, &dy);
      for (MoELayer& layer : student_) layer.zero_grad(/*set_to_none=*/true);
      backward_stack(student_, dy, o_.loss_weights);
      if (o_.comm) sum_replicated_grads();
      optimizer_->step();
      if (o_.moe.expert_bias) {
        for (MoELayer& layer : student_) layer.update_expert_bias(o_.bias_update_rate);
      }
    }
    r.ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (o_.comm) {
      // What rank 0 prints: the loss and losses averaged over ranks; dropped choices and useful
      // FLOPs summed; the slowest rank's time.
      const double n = static_cast<double>(o_.comm->size());
      std::vector<double> sums = o_.comm->all_reduce(
          std::vector<double>{r.loss / n, r.fwd.aux / n, r.fwd.z / n,
                              static_cast<double>(r.fwd.dropped), r.fwd.useful_flops},
          ReduceOp::kSum);
      r.loss = sums[0];
      r.fwd.aux = sums[1];
      r.fwd.z = sums[2];
      r.fwd.dropped = static_cast<index_t>(sums[3]);
      r.fwd.useful_flops = sums[4];
      r.ms = o_.comm->all_reduce(std::vector<double>{r.ms}, ReduceOp::kMax)[0];
    }
    return r;
  }

 private:
  // Gate and shared-expert gradients hold this rank's tokens' share: sum them over ranks.
  void sum_replicated_grads() {
    std::vector<CommWork> work;
    for (MoELayer& layer : student_)
      for (Parameter* p : layer.parameters())
        if (p->replicated) work.push_back(o_.comm->start_all_reduce(p->grad));
    for (CommWork& w : work) w.wait();
  }

  TrainOptions o_;
  std::vector<MoELayer> student_;
  std::vector<MoELayer> teacher_;
  std::unique_ptr<Optimizer> optimizer_;
};

std::string parallel_mode(const TrainOptions& o, const MoEConfig& c) {
  const int W = o.comm->size();
  const int sharded = c.num_experts < W ? W / static_cast<int>(c.num_experts) : 1;
  const int r = o.adaptive_r.value_or(sharded);
  std::string mode = r == 0   ? std::string("data parallel")
                     : r == 1 ? std::string("expert parallel")
                              : fmt::format("{}-way sharded experts", r);
  if (sharded > 1) mode += fmt::format(" (each expert stored over {} ranks)", sharded);
  return mode;
}

std::string describe(const TrainOptions& o) {
  const MoEConfig& c = o.moe;
  return fmt::format(
             "switchyard train: {} layer{}, T={} ({}x{}), d={}, h={}, E={}, k={}, {}, {} on {}, "
             "capacity_factor {}, {}",
             o.num_layers, o.num_layers == 1 ? "" : "s", o.batch_size * o.num_tokens, o.batch_size,
             o.num_tokens, c.model_dim, c.hidden_size, c.num_experts, c.top_k,
             to_string(c.activation), dtype_name(c.dtype), to_string(c.device), c.capacity_factor,
             o.eval ? std::string("eval (forward only)")
                    : fmt::format("{} lr {}, {} steps",
                                  o.optimizer.kind == OptimizerKind::kAdam ? "adam" : "sgd",
                                  o.optimizer.lr, o.num_steps)) +
         (o.comm ? fmt::format("; {} ranks, {} experts, {}, overlap_degree {}, a2a {}",
                               o.comm->size(), c.num_experts, parallel_mode(o, c), c.overlap_degree,
                               to_string(o.comm->resolve(o.a2a_algorithm)))
                 : std::string());
}

void print_step(const TrainOptions& o, int step, const StepResult& r, double tflops) {
  if (o.json) {
    nlohmann::ordered_json j;
    j["step"] = step;
    j["loss"] = r.loss;
    j["aux_loss"] = r.fwd.aux;
    j["z_loss"] = r.fwd.z;
    j["ms"] = r.ms;
    j["tflops"] = tflops;
    j["dropped"] = r.fwd.dropped;
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print(
        "step {:>{}}  loss {:.6g}  aux_loss {:.5g}  z_loss {:.5g}  {:.3f} ms  {:.4f} TFLOPS"
        "  dropped {}\n",
        step, std::to_string(o.num_steps).size(), r.loss, r.fwd.aux, r.fwd.z, r.ms, tflops,
        r.fwd.dropped);
  }
  std::fflush(stdout);
}

}  // namespace

int run_train(const TrainOptions& o) {
  // Whatever the library rejects while building the layers or running the first step is a
  // configuration it cannot run: a usage error, reported as such.
  const auto run_start = Clock::now();
  const bool prints = !o.comm || o.comm->rank() == 0;  // under mpirun, rank 0 prints
  std::unique_ptr<Trainer> trainer;
  StepResult first;
  try {
    trainer = std::make_unique<Trainer>(o);
    if (!o.json && prints) {
      fmt::print("{}\n", describe(o));
      std::fflush(stdout);
    }
    first = trainer->step(1);
  } catch (const Error& e) {
    throw UsageError(e.what());
  }

  // Forward + backward (dgrad and wgrad) is three passes over the expert weights.
  const double passes = o.eval ? 1.0 : 3.0;
  ProgressLine progress;
  std::vector<double> step_ms;
  step_ms.reserve(static_cast<std::size_t>(o.num_steps));
  double last_loss = first.loss;
  double loss_sum = 0.0;
  for (int step = 1; step <= o.num_steps; ++step) {
    const StepResult r = step == 1 ? first : trainer->step(step);
    if (!std::isfinite(r.loss)) {
      throw std::runtime_error(
          fmt::format("the loss is {} at step {} (try a smaller --lr)", r.loss, step));
    }
    step_ms.push_back(r.ms);
    last_loss = r.loss;
    loss_sum += r.loss;
    const double tflops = r.ms > 0 ? passes * r.fwd.useful_flops / (r.ms * 1e-3) / 1e12 : 0.0;
    if (!prints) continue;
    if (step == 1 || step == o.num_steps || step % o.log_interval == 0) {
      progress.clear();
      print_step(o, step, r, tflops);
    }
    const double elapsed = std::chrono::duration<double>(Clock::now() - run_start).count();
    progress.update(fmt::format("step {}/{}  loss {:.5g}  {:.2f} ms/step  ETA {:.0f} s", step,
                                o.num_steps, r.loss, r.ms, elapsed / step * (o.num_steps - step)));
  }
  progress.clear();

  if (!o.json && prints) {
    std::vector<double> sorted = step_ms;
    std::sort(sorted.begin(), sorted.end());
    const double median_ms = sorted[sorted.size() / 2];
    const double seconds = std::chrono::duration<double>(Clock::now() - run_start).count();
    if (o.eval) {
      fmt::print("eval: mean loss {:.6g} over {} steps, {:.2f} s; median {:.3f} ms/step\n",
                 loss_sum / o.num_steps, o.num_steps, seconds, median_ms);
    } else {
      fmt::print("loss {:.6g} -> {:.6g} ({:.3g}x) in {} steps, {:.2f} s; median {:.3f} ms/step\n",
                 first.loss, last_loss, first.loss > 0 ? last_loss / first.loss : 0.0, o.num_steps,
                 seconds, median_ms);
    }
  }
  return 0;
}

}  // namespace switchyard::tools
