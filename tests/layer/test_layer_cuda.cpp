// The whole layer on CUDA against the same layer on the CPU; skipped where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>

#include "reference/compare.h"
#include "reference/random.h"
#include "switchyard/switchyard.h"

namespace switchyard {
namespace {

using sy_ref::randn;
using sy_ref::rel_l2;

struct Case {
  const char* name;
  DType dtype;
  double capacity_factor;
  Activation act;
  bool postscore;
  index_t shared_hidden;
  double jitter;
  GateType gate = GateType::kLinear;
};

class MoELayerCuda : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(MoELayerCuda, MatchesTheCpuLayerForwardAndBackward) {
  const Case c = GetParam();
  MoEConfig cfg;
  cfg.model_dim = 64;
  cfg.hidden_size = 96;
  cfg.num_experts = 8;
  cfg.top_k = 2;
  cfg.dtype = c.dtype;
  cfg.capacity_factor = c.capacity_factor;
  cfg.activation = c.act;
  cfg.is_postscore = c.postscore;
  cfg.shared_expert_hidden = c.shared_hidden;
  cfg.input_jitter = c.jitter;
  cfg.gate = c.gate;
  cfg.fp32_gate = c.dtype != DType::kF32;  // the same routing on both devices
  MoELayer cpu(cfg);
  cfg.device = Device::cuda(0);
  MoELayer gpu(cfg);
  const index_t T = 333;
  const Tensor x = Tensor::from_vector(randn(T * 64, 1), {3, 111, 64}, c.dtype);
  const Tensor dy = Tensor::from_vector(randn(T * 64, 2), {3, 111, 64}, c.dtype);
  const double tol = c.dtype == DType::kF32 ? 1e-5 : 3e-2;

  const ForwardResult r = cpu.forward(x);
  const ForwardResult rg = gpu.forward(x.to(Device::cuda(0)));
  EXPECT_EQ(rg.y.device(), Device::cuda(0));
  EXPECT_EQ(rg.y.sizes(), x.sizes());
  EXPECT_LT(rel_l2(rg.y.to_vector(), r.y.to_vector()), tol);
  EXPECT_EQ(rg.stats.tokens_per_expert, r.stats.tokens_per_expert);
  EXPECT_EQ(rg.stats.dropped_choices, r.stats.dropped_choices);
  EXPECT_NEAR(rg.losses.aux, r.losses.aux, 1e-5 * std::fabs(r.losses.aux));
  const LossWeights w{.aux = 0.01, .z = 0.001};
  const auto dx = cpu.backward(dy, w).to_vector();
  const auto dxg = gpu.backward(dy.to(Device::cuda(0)), w).to_vector();
  EXPECT_LT(rel_l2(dxg, dx), tol);
  const auto pc = cpu.parameters(), pg = gpu.parameters();
  ASSERT_EQ(pc.size(), pg.size());
  for (std::size_t i = 0; i < pc.size(); ++i)
    EXPECT_LT(rel_l2(pg[i]->grad.to_vector(), pc[i]->grad.to_vector()), tol) << pc[i]->name;
}

TEST_P(MoELayerCuda, RunsAreBitwiseReproducible) {
  const Case c = GetParam();
  MoEConfig cfg;
  cfg.model_dim = 64;
  cfg.hidden_size = 96;
  cfg.num_experts = 8;
  cfg.dtype = c.dtype;
  cfg.capacity_factor = c.capacity_factor;
  cfg.activation = c.act;
  cfg.gate = c.gate;
  cfg.device = Device::cuda(0);
  const Tensor x = Tensor::from_vector(randn(200 * 64, 3), {200, 64}, c.dtype).to(cfg.device);
  auto run = [&] {
    MoELayer layer(cfg);
    std::vector<double> all = layer.forward(x).y.to_vector();
    for (double v : layer.backward(x, {.aux = 0.01}).to_vector()) all.push_back(v);
    for (Parameter* p : layer.parameters())
      for (double v : p->grad.to_vector()) all.push_back(v);
    return all;
  };
  EXPECT_EQ(run(), run());
}

// use_tensorcore: the f32 expert GEMMs run on TF32 tensor cores (results move off the FP32 run,
// within TF32's precision of the CPU's), while the gate stays FP32 (routing equals the CPU's).
TEST(MoELayerCudaTf32, ExpertGemmsUseTf32AndRoutingStaysFp32) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  MoEConfig cfg;  // large enough that cuBLAS picks tensor-core kernels
  cfg.model_dim = 256;
  cfg.hidden_size = 512;
  cfg.num_experts = 8;
  cfg.capacity_factor = 0.0;
  MoELayer cpu(cfg);
  cfg.device = Device::cuda(0);
  MoELayer fp32(cfg);
  cfg.use_tensorcore = true;
  MoELayer tf32(cfg);
  const Tensor x = Tensor::from_vector(randn(1024 * 256, 4), {1024, 256}, DType::kF32);
  const Tensor xg = x.to(cfg.device);
  const ForwardResult want = cpu.forward(x);
  const ForwardResult exact = fp32.forward(xg);
  const ForwardResult got = tf32.forward(xg);
  EXPECT_EQ(got.stats.tokens_per_expert, want.stats.tokens_per_expert);
  EXPECT_LT(rel_l2(exact.y.to_vector(), want.y.to_vector()), 1e-5);
  const double tf32_error = rel_l2(got.y.to_vector(), want.y.to_vector());
  EXPECT_LT(tf32_error, 1e-2);
  EXPECT_GT(tf32_error, 1e-5) << "the expert GEMMs did not run in TF32";
  // dx goes through three TF32 GEMMs and relu masks set by the TF32 forward: measured 1.03e-2
  // on an H100.
  const std::vector<double> dx = cpu.backward(x, {}).to_vector();
  EXPECT_LT(rel_l2(tf32.backward(xg, {}).to_vector(), dx), 2e-2);
}

// zero_grad(true): the backward creates the experts' weight gradients by GEMMs that write them
// (the grouped kernel for bf16, one cuBLAS GEMM per expert for f32), equal to what zeroed
// gradients receive; with experts that get no tokens (3 tokens, k = 1, 8 experts) those start
// at zero instead. A second backward adds to them.
TEST(MoELayerCudaGradients, SetToNoneEqualsZeroedOnBothGemmPaths) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (DType dt : {DType::kBF16, DType::kF32}) {
    for (index_t T : {333, 3}) {
      MoEConfig cfg;
      cfg.model_dim = 64;
      cfg.hidden_size = 96;
      cfg.num_experts = 8;
      cfg.top_k = T == 3 ? 1 : 2;
      cfg.capacity_factor = 0.0;
      cfg.dtype = dt;
      cfg.fp32_gate = true;
      cfg.shared_expert_hidden = 32;
      cfg.device = Device::cuda(0);
      MoELayer zeroed(cfg), unset(cfg);
      const Tensor x = Tensor::from_vector(randn(T * 64, 5), {T, 64}, dt).to(cfg.device);
      const Tensor dy = Tensor::from_vector(randn(T * 64, 6), {T, 64}, dt).to(cfg.device);
      zeroed.zero_grad();
      unset.zero_grad(/*set_to_none=*/true);
      const double tol = dt == DType::kF32 ? 1e-6 : 1e-2;
      for (int step = 0; step < 2; ++step) {
        zeroed.forward(x);
        unset.forward(x);
        EXPECT_LT(rel_l2(unset.backward(dy, {}).to_vector(), zeroed.backward(dy, {}).to_vector()),
                  tol);
        const auto pz = zeroed.parameters(), pu = unset.parameters();
        for (std::size_t i = 0; i < pz.size(); ++i) {
          ASSERT_TRUE(pu[i]->grad.defined()) << pu[i]->name;
          const std::vector<double> g = pu[i]->grad.to_vector(), want = pz[i]->grad.to_vector();
          for (double v : g) ASSERT_TRUE(std::isfinite(v)) << pu[i]->name;
          EXPECT_LT(rel_l2(g, want), tol)
              << pu[i]->name << " " << dtype_name(dt) << " T=" << T << " step " << step;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MoELayerCuda,
    ::testing::Values(
        Case{"PaddedF32", DType::kF32, 1.0, Activation::kRelu, true, 0, 0.0},
        Case{"DroplessF32", DType::kF32, 0.0, Activation::kGelu, true, 0, 0.0},
        Case{"PrescoreSharedSwiglu", DType::kF32, 0.0, Activation::kSwiGLU, false, 48, 0.0},
        Case{"JitterCapped", DType::kF32, -0.5, Activation::kSilu, true, 0, 0.1},
        Case{"PaddedBf16", DType::kBF16, 1.0, Activation::kRelu, true, 0, 0.0},
        Case{"DroplessBf16Swiglu", DType::kBF16, 0.0, Activation::kSwiGLU, true, 32, 0.0},
        Case{"CosineGateF32", DType::kF32, 1.0, Activation::kRelu, true, 0, 0.0, GateType::kCosine},
        Case{"CosineGateDroplessBf16", DType::kBF16, 0.0, Activation::kGelu, true, 0, 0.0,
             GateType::kCosine}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(MoELayerCudaErrors, MixedDevicesAreRejected) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  MoEConfig cfg;
  cfg.model_dim = 8;
  cfg.hidden_size = 8;
  cfg.num_experts = 4;
  cfg.device = Device::cuda(0);
  MoELayer layer(cfg);
  EXPECT_THROW(layer.forward(Tensor::zeros({4, 8}, DType::kF32)), Error);  // x on the CPU
  layer.forward(Tensor::zeros({4, 8}, DType::kF32, cfg.device));
  EXPECT_THROW(layer.backward(Tensor::zeros({4, 8}, DType::kF32)), Error);  // dy on the CPU
}

// Megatron/DeepSeek-style routing (sigmoid, expert bias, groups, scaling, Switch loss, z-loss),
// Megatron's probs drops and sinkhorn, Tutel's batch-prioritized routing and load/importance
// loss route on the GPU: the layer still matches the CPU.
TEST(MoELayerCudaRouting, MegatronAndTutelOptionsMatchTheCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (int variant = 0; variant < 5; ++variant) {
    MoEConfig cfg;
    cfg.model_dim = 32;
    cfg.hidden_size = 48;
    cfg.num_experts = 16;
    cfg.top_k = 4;
    if (variant == 0) {
      cfg.rules = RuleSet::kMegatron;
      cfg.score_fn = ScoreFn::kSigmoid;
      cfg.expert_bias = true;
      cfg.num_groups = 4;
      cfg.topk_groups = 2;
      cfg.scaling_factor = 2.5;
      cfg.aux_loss = AuxLoss::kSwitch;
      cfg.capacity_factor = 0.0;
    } else if (variant == 1) {
      cfg.batch_prioritized_routing = true;
      cfg.capacity_factor = 0.5;
      cfg.gate_noise = 1.0;
    } else if (variant == 2) {
      cfg.rules = RuleSet::kMegatron;
      cfg.aux_loss = AuxLoss::kSwitch;
      cfg.drop_policy = DropPolicy::kProbs;
      cfg.capacity_factor = 1.0;
    } else if (variant == 3) {
      cfg.rules = RuleSet::kMegatron;
      cfg.sinkhorn = true;
      cfg.aux_loss = AuxLoss::kNone;
      cfg.capacity_factor = 0.0;
    } else {
      cfg.aux_loss = AuxLoss::kLoadImportance;
      cfg.gate_noise = 1.0;
      cfg.top_k = 2;
    }
    SCOPED_TRACE(variant);
    MoELayer cpu(cfg);
    cfg.device = Device::cuda(0);
    MoELayer gpu(cfg);
    const Tensor x = Tensor::from_vector(randn(256 * 32, 4), {256, 32}, DType::kF32);
    const Tensor dy = Tensor::from_vector(randn(256 * 32, 5), {256, 32}, DType::kF32);
    for (int step = 0; step < 2; ++step) {  // the second step runs with an updated expert bias
      const ForwardResult r = cpu.forward(x);
      const ForwardResult rg = gpu.forward(x.to(cfg.device));
      EXPECT_LT(rel_l2(rg.y.to_vector(), r.y.to_vector()), 1e-5);
      EXPECT_EQ(rg.stats.tokens_per_expert, r.stats.tokens_per_expert);
      EXPECT_EQ(rg.stats.dropped_choices, r.stats.dropped_choices);
      EXPECT_EQ(rg.stats.capacity, r.stats.capacity);
      EXPECT_NEAR(rg.losses.aux, r.losses.aux, 1e-5 * std::fabs(r.losses.aux));
      EXPECT_NEAR(rg.losses.z, r.losses.z, 1e-5 * std::fabs(r.losses.z));
      EXPECT_NEAR(rg.aux_loss.to_vector()[0], r.losses.aux, 1e-5 * std::fabs(r.losses.aux));
      const LossWeights w{.aux = 0.01, .z = 0.001};
      EXPECT_LT(
          rel_l2(gpu.backward(dy.to(cfg.device), w).to_vector(), cpu.backward(dy, w).to_vector()),
          1e-5);
      if (cfg.expert_bias) {
        cpu.update_expert_bias(0.01);
        gpu.update_expert_bias(0.01);
        EXPECT_EQ(gpu.expert_bias().to_vector(), cpu.expert_bias().to_vector());
      }
    }
  }
}

// Loss weights held in device tensors (read by the router's backward kernel, no host sync) give
// what the same doubles give, for the GShard and Switch losses and the z-loss.
TEST(MoELayerCudaGradients, LossWeightsOnTheDeviceEqualTheDoubles) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (AuxLoss aux : {AuxLoss::kGShard, AuxLoss::kSwitch}) {
    MoEConfig cfg;
    cfg.model_dim = 64;
    cfg.hidden_size = 96;
    cfg.num_experts = 8;
    cfg.top_k = 2;
    cfg.capacity_factor = 0.0;
    cfg.aux_loss = aux;
    cfg.device = Device::cuda(0);
    MoELayer layer(cfg);
    const Tensor x = Tensor::from_vector(randn(200 * 64, 3), {200, 64}, DType::kF32).to(cfg.device);
    const Tensor dy =
        Tensor::from_vector(randn(200 * 64, 4), {200, 64}, DType::kF32).to(cfg.device);
    layer.forward(x);
    layer.zero_grad(true);
    const std::vector<double> want = layer.backward(dy, {.aux = 0.01, .z = 0.001}).to_vector();
    std::map<std::string, std::vector<double>> want_grads;
    for (Parameter* p : layer.parameters()) want_grads[p->name] = p->grad.to_vector();
    ForwardOptions no_sync;
    no_sync.host_stats = false;
    layer.forward(x, no_sync);
    layer.zero_grad(true);
    LossWeights w;
    w.aux_tensor = Tensor::from_vector({0.01}, {1}, DType::kF64).to(cfg.device);
    w.z_tensor = Tensor::from_vector({0.001}, {1}, DType::kF32).to(cfg.device);
    EXPECT_LT(rel_l2(layer.backward(dy, w).to_vector(), want), 1e-6) << to_string(aux);
    for (Parameter* p : layer.parameters())
      EXPECT_LT(rel_l2(p->grad.to_vector(), want_grads.at(p->name)), 1e-6) << p->name;
  }
}

TEST(MoELayerCudaRouting, NonFiniteLogitsAreReportedAtTheNextSync) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  MoEConfig cfg;
  cfg.model_dim = 8;
  cfg.hidden_size = 8;
  cfg.num_experts = 4;
  cfg.device = Device::cuda(0);
  MoELayer layer(cfg);
  std::vector<double> v = randn(16 * 8, 6);
  const Tensor good = Tensor::from_vector(v, {16, 8}, DType::kF32).to(cfg.device);
  v[9] = std::nan("");
  const Tensor bad = Tensor::from_vector(v, {16, 8}, DType::kF32).to(cfg.device);
  EXPECT_THROW(layer.forward(bad), Error);
  layer.forward(good);  // the flag was consumed: the layer stays usable
  ForwardOptions quiet;
  quiet.host_stats = false;
  const ForwardResult r = layer.forward(bad, quiet);  // no sync, no check yet
  EXPECT_TRUE(r.stats.tokens_per_expert.empty());
  EXPECT_THROW(layer.forward(good), Error);  // reported by the next forward that syncs
}

// A whole dropless forward+backward step (the fine_grained bench shape, bf16) needs no host
// sync: it is captured in a CUDA graph, replayed on new inputs that route differently, and
// matches an eager layer bitwise.
TEST(MoELayerCudaGraph, ADroplessBf16StepReplaysBitwiseLikeEagerExecution) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  MoEConfig cfg;
  cfg.model_dim = 2048;
  cfg.hidden_size = 768;
  cfg.num_experts = 128;
  cfg.top_k = 8;
  cfg.capacity_factor = 0.0;
  cfg.layout = Layout::kPacked;
  cfg.dtype = DType::kBF16;
  cfg.device = Device::cuda(0);
  const index_t T = 8192, d = cfg.model_dim;
  CudaStream stream(cfg.device);
  StreamGuard guard(stream.stream());
  MoELayer graphed(cfg), eager(cfg);
  Tensor x = Tensor::empty({T, d}, cfg.dtype, cfg.device);
  Tensor dy = Tensor::empty({T, d}, cfg.dtype, cfg.device);
  Tensor y_out = Tensor::empty({T, d}, cfg.dtype, cfg.device);
  Tensor dx_out = Tensor::empty({T, d}, cfg.dtype, cfg.device);
  ForwardOptions opt;
  opt.host_stats = false;
  Tensor counts = Tensor::empty({cfg.num_experts}, DType::kI64, cfg.device);
  const auto step = [&](MoELayer& layer) {
    const ForwardResult r = layer.forward(x, opt);
    y_out.copy_from(r.y);
    counts.copy_from(r.tokens_per_expert);
    dx_out.copy_from(layer.backward(dy, {.aux = 0.01, .z = 0.001}));
  };
  const auto outputs = [&](MoELayer& layer) {
    synchronize(stream.stream());
    std::vector<std::vector<double>> all{y_out.to_vector(), dx_out.to_vector()};
    for (Parameter* p : layer.parameters()) all.push_back(p->grad.to_vector());
    return all;
  };
  const auto load_inputs = [&](std::uint64_t seed) {
    x.copy_from(Tensor::from_vector(randn(T * d, seed), {T, d}, cfg.dtype));
    dy.copy_from(Tensor::from_vector(randn(T * d, seed + 1), {T, d}, cfg.dtype));
  };

  load_inputs(10);
  step(graphed);  // eager warm-up: libraries make their allocations outside the capture
  CudaGraph graph;
  graph.begin_capture(stream.stream());
  step(graphed);
  graph.end_capture();

  std::vector<double> previous_counts;
  for (std::uint64_t seed : {20, 30}) {
    load_inputs(seed);
    graphed.zero_grad();
    graph.replay();
    const auto replayed = outputs(graphed);
    eager.zero_grad();
    step(eager);
    const auto want = outputs(eager);
    ASSERT_EQ(replayed.size(), want.size());
    for (std::size_t i = 0; i < want.size(); ++i) EXPECT_EQ(replayed[i], want[i]) << "output " << i;
    const std::vector<double> c = counts.to_vector();
    EXPECT_NE(c, previous_counts) << "the new inputs should route differently";
    previous_counts = c;
  }
}

}  // namespace
}  // namespace switchyard
