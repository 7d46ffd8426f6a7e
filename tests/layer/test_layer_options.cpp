// Per-call options (capacity factor, top_k, layout), dtypes within one process, and
// determinism (DESIGN.md §3: bitwise reproducible on the same device, dtype and world size).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>

#include "layer/layer_test_util.h"

namespace sy_test {
namespace {

struct StepResult {
  std::vector<double> y, dx;
  std::map<std::string, std::vector<double>> grads;
  Losses losses;
  RoutingStats stats;
};

// One forward + backward with both loss weights on.
StepResult step(MoELayer& layer, const Tensor& x, const Tensor& dy, const ForwardOptions& fo = {}) {
  StepResult s;
  const ForwardResult r = layer.forward(x, fo);
  s.y = r.y.to_vector();
  s.losses = r.losses;
  s.stats = r.stats;
  layer.zero_grad();
  s.dx = layer.backward(dy, {.aux = 0.1, .z = 0.01}).to_vector();
  for (Parameter* p : layer.parameters()) s.grads[p->name] = p->grad.to_vector();
  return s;
}

void expect_bitwise_equal(const StepResult& a, const StepResult& b) {
  EXPECT_TRUE(sy_ref::bitwise_equal(a.y, b.y)) << "y";
  EXPECT_TRUE(sy_ref::bitwise_equal(a.dx, b.dx)) << "dx";
  EXPECT_EQ(a.losses.aux, b.losses.aux);
  EXPECT_EQ(a.losses.z, b.losses.z);
  for (const auto& [name, g] : a.grads)
    EXPECT_TRUE(sy_ref::bitwise_equal(g, b.grads.at(name))) << name;
}

void expect_close(const StepResult& a, const StepResult& b, double tol) {
  EXPECT_TRUE(sy_ref::rel_l2_within(a.y, b.y, tol)) << "y";
  EXPECT_TRUE(sy_ref::rel_l2_within(a.dx, b.dx, tol)) << "dx";
  EXPECT_NEAR(a.losses.aux, b.losses.aux, tol);
  for (const auto& [name, g] : a.grads)
    EXPECT_TRUE(sy_ref::rel_l2_within(g, b.grads.at(name), tol)) << name;
}

std::pair<Tensor, Tensor> inputs(const MoEConfig& cfg, std::int64_t T, std::uint64_t seed) {
  return {make_tensor(randn(T * cfg.model_dim, seed), {T, cfg.model_dim}, cfg.dtype),
          make_tensor(randn(T * cfg.model_dim, seed + 1), {T, cfg.model_dim}, cfg.dtype)};
}

TEST(MoELayerCpu, CapacityFactorPerCallMovesNoWeightsAndMatchesABuiltLayer) {
  MoEConfig cfg = small_config(DType::kF32);
  cfg.top_k = 2;
  cfg.capacity_factor = 1.0;
  MoELayer layer(cfg);
  std::map<std::string, const void*> where;
  for (Parameter* p : layer.parameters()) where[p->name] = p->value.data_ptr();
  const auto [x, dy] = inputs(cfg, 19, 30);
  for (double cf : {0.5, 0.0, -0.5, 2.0}) {
    SCOPED_TRACE("capacity_factor " + std::to_string(cf));
    ForwardOptions fo;
    fo.capacity_factor = cf;
    const StepResult got = step(layer, x, dy, fo);
    MoEConfig built_cfg = cfg;
    built_cfg.capacity_factor = cf;
    MoELayer built(built_cfg);
    expect_bitwise_equal(got, step(built, x, dy));
    // A per-call 0 is dropless, not "unset" (ROUTING.md §3, Tutel PR #303).
    if (cf == 0.0) {
      EXPECT_EQ(got.stats.dropped_choices, 0);
    }
  }
  for (Parameter* p : layer.parameters()) EXPECT_EQ(p->value.data_ptr(), where[p->name]) << p->name;
}

TEST(MoELayerCpu, CapacityFactorPerCallMatchesTheReference) {
  MoEConfig cfg = small_config();
  MoELayer layer(cfg);
  for (double cf : {0.5, 0.0, -0.5}) {
    ForwardOptions fo;
    fo.capacity_factor = cf;
    SCOPED_TRACE("capacity_factor " + std::to_string(cf));
    expect_matches_reference(layer, input_with_margin(layer, 19, 1e-7, 31, fo), 19, fo, 1e-9);
  }
}

TEST(MoELayerCpu, TopKPerCallMatchesABuiltLayerAndTheReference) {
  MoEConfig cfg = small_config(DType::kF32);
  MoELayer layer(cfg);
  const auto [x, dy] = inputs(cfg, 13, 32);
  for (int k : {1, 3, 4, 9}) {
    SCOPED_TRACE("top_k " + std::to_string(k));
    ForwardOptions fo;
    fo.top_k = k;
    const StepResult got = step(layer, x, dy, fo);
    EXPECT_EQ(got.stats.top_k, std::min(k, 4));
    MoEConfig built_cfg = cfg;
    built_cfg.top_k = k;
    MoELayer built(built_cfg);
    expect_bitwise_equal(got, step(built, x, dy));
  }
  MoELayer f64(small_config());
  ForwardOptions fo;
  fo.top_k = 3;
  expect_matches_reference(f64, input_with_margin(f64, 13, 1e-7, 33, fo), 13, fo, 1e-9);
}

TEST(MoELayerCpu, PaddedAndPackedLayoutsAgree) {
  for (double cf : {1.0, 0.5, 0.0}) {
    SCOPED_TRACE("capacity_factor " + std::to_string(cf));
    MoEConfig cfg = small_config(DType::kF32);
    cfg.capacity_factor = cf;
    cfg.top_k = 2;
    MoELayer layer(cfg);
    const auto [x, dy] = inputs(cfg, 19, 34);
    ForwardOptions padded, packed;
    padded.layout = Layout::kPadded;
    packed.layout = Layout::kPacked;
    const StepResult a = step(layer, x, dy, padded);
    const StepResult b = step(layer, x, dy, packed);
    EXPECT_EQ(a.stats.layout, Layout::kPadded);
    EXPECT_EQ(b.stats.layout, Layout::kPacked);
    EXPECT_EQ(a.stats.tokens_per_expert, b.stats.tokens_per_expert);
    EXPECT_EQ(a.stats.dropped_choices, b.stats.dropped_choices);
    EXPECT_EQ(a.stats.num_rows, cfg.num_experts * a.stats.capacity);
    // Same plan, different buffers: equal up to the order of f32 sums.
    expect_close(a, b, 1e-6);
  }
}

TEST(MoELayerCpu, TwoRunsAreBitwiseEqual) {
  MoEConfig cfg = small_config(DType::kF32);
  cfg.shared_expert_hidden = 4;
  cfg.capacity_factor = 0.5;
  const auto [x, dy] = inputs(cfg, 389, 35);
  MoELayer a(cfg), b(cfg);
  const StepResult first = step(a, x, dy);
  expect_bitwise_equal(first, step(a, x, dy));  // same layer again
  expect_bitwise_equal(first, step(b, x, dy));  // a twin
}

// use_tensorcore is a CUDA f32 option: the CPU computes in FP32 either way.
TEST(MoELayerCpu, UseTensorcoreChangesNothingOnTheCpu) {
  MoEConfig cfg = small_config(DType::kF32);
  const auto [x, dy] = inputs(cfg, 97, 36);
  MoELayer fp32(cfg);
  cfg.use_tensorcore = true;
  MoELayer tf32(cfg);
  expect_bitwise_equal(step(fp32, x, dy), step(tf32, x, dy));
}

// init_parameters false leaves the experts' parameters zero (a caller sets them); copying a
// drawn layer's values in gives the drawn layer's results. The gate is drawn either way.
TEST(MoELayerCpu, ExpertsLeftUndrawnTakeTheCallersValues) {
  MoEConfig cfg = small_config();
  cfg.shared_expert_hidden = 3;
  const auto [x, dy] = inputs(cfg, 41, 36);
  MoELayer drawn(cfg);
  cfg.init_parameters = false;
  MoELayer undrawn(cfg);
  const std::vector<Parameter*> from = drawn.parameters(), to = undrawn.parameters();
  ASSERT_EQ(from.size(), to.size());
  for (std::size_t i = 0; i < to.size(); ++i) {
    ASSERT_EQ(from[i]->name, to[i]->name);
    const std::vector<double> v = to[i]->value.to_vector();
    const bool zero = std::all_of(v.begin(), v.end(), [](double e) { return e == 0.0; });
    if (to[i]->name.rfind("gate.", 0) == 0 || to[i]->name.find("wg.") != std::string::npos)
      EXPECT_EQ(v, from[i]->value.to_vector()) << to[i]->name;
    else
      EXPECT_TRUE(zero) << to[i]->name << " was drawn";
    to[i]->value.copy_from(from[i]->value);
  }
  expect_bitwise_equal(step(drawn, x, dy), step(undrawn, x, dy));
}

// Loss weights held in tensors give what the same doubles give; a tensor that is not one
// floating value on the layer's device is refused.
TEST(MoELayerCpu, LossWeightsInTensorsEqualTheDoubles) {
  MoEConfig cfg = small_config();
  const auto [x, dy] = inputs(cfg, 53, 36);
  MoELayer layer(cfg);
  const StepResult want = step(layer, x, dy);  // weights 0.1 and 0.01
  layer.forward(x);
  layer.zero_grad();
  LossWeights w;
  w.aux_tensor = make_tensor({0.1}, {1}, DType::kF64);
  w.z_tensor = make_tensor({0.01}, {}, DType::kF64);
  EXPECT_TRUE(sy_ref::bitwise_equal(layer.backward(dy, w).to_vector(), want.dx));
  for (Parameter* p : layer.parameters())
    EXPECT_TRUE(sy_ref::bitwise_equal(p->grad.to_vector(), want.grads.at(p->name))) << p->name;
  layer.forward(x);
  LossWeights two;
  two.aux_tensor = make_tensor({0.1, 0.2}, {2}, DType::kF64);
  EXPECT_THROW(layer.backward(dy, two), Error);
  LossWeights integer;
  integer.z_tensor = Tensor::zeros({1}, DType::kI64);
  EXPECT_THROW(layer.backward(dy, integer), Error);
}

TEST(MoELayerCpu, ThreadCountDoesNotChangeResults) {
  MoEConfig cfg = small_config(DType::kF32);
  cfg.model_dim = 32;
  cfg.hidden_size = 24;
  cfg.num_experts = 8;
  cfg.capacity_factor = 0;
  const auto [x, dy] = inputs(cfg, 389, 36);
  const int saved = omp_get_max_threads();
  MoELayer layer(cfg);
  omp_set_num_threads(1);
  const StepResult one = step(layer, x, dy);
  omp_set_num_threads(2);
  const StepResult two = step(layer, x, dy);
  omp_set_num_threads(saved);
  expect_bitwise_equal(one, two);
}

// A layer of each dtype on the same (rounded) data against the f64 reference, with the
// tolerances of DESIGN.md §7; routing margins large enough that rounding flips no choice.
struct DTypeCase {
  DType dtype;
  double tol;
};

void PrintTo(const DTypeCase& c, std::ostream* os) { *os << dtype_name(c.dtype); }

class MoELayerDTypes : public ::testing::TestWithParam<DTypeCase> {};

TEST_P(MoELayerDTypes, MatchTheReferenceWithinTheirTolerance) {
  MoEConfig cfg = small_config(GetParam().dtype);
  cfg.model_dim = 16;
  cfg.hidden_size = 12;
  cfg.capacity_factor = 0;
  MoELayer layer(cfg);
  const std::int64_t T = 19;
  const std::vector<double> x = input_with_margin(layer, T, 2e-2, 37);
  const sy_ref::RefResult want = reference_of(layer, x, T);
  const ForwardResult got = layer.forward(make_tensor(x, {T, cfg.model_dim}, cfg.dtype));
  EXPECT_EQ(got.y.dtype(), cfg.dtype);
  EXPECT_EQ(got.stats.tokens_per_expert, want.routing.tokens_per_expert);
  EXPECT_TRUE(sy_ref::rel_l2_within(got.y.to_vector(), want.y, GetParam().tol));
}

TEST_P(MoELayerDTypes, BackwardMatchesAnF64LayerWithTheSameRoundedWeights) {
  // The f64 layer holds the low-precision layer's weights exactly, so the only differences are
  // the low-precision storage of activations and gradients.
  MoEConfig cfg = small_config(GetParam().dtype);
  cfg.model_dim = 16;
  cfg.hidden_size = 12;
  cfg.capacity_factor = 0;
  MoELayer low(cfg);
  MoEConfig cfg64 = cfg;
  cfg64.dtype = DType::kF64;
  MoELayer f64(cfg64);
  for (Parameter* p : low.parameters()) set_param(f64, p->name, p->value.to_vector());
  const std::int64_t T = 19, d = cfg.model_dim;
  const std::vector<double> x = input_with_margin(low, T, 2e-2, 39);
  const std::vector<double> dy = make_tensor(randn(T * d, 40), {T, d}, cfg.dtype).to_vector();
  const StepResult a =
      step(low, make_tensor(x, {T, d}, cfg.dtype), make_tensor(dy, {T, d}, cfg.dtype));
  const StepResult b =
      step(f64, make_tensor(x, {T, d}, DType::kF64), make_tensor(dy, {T, d}, DType::kF64));
  const double tol = GetParam().tol;
  EXPECT_TRUE(sy_ref::rel_l2_within(a.dx, b.dx, tol)) << "dx";
  for (const auto& [name, g] : b.grads)
    EXPECT_TRUE(sy_ref::rel_l2_within(a.grads.at(name), g, tol)) << "grad of " << name;
}

INSTANTIATE_TEST_SUITE_P(MoELayerAll, MoELayerDTypes,
                         ::testing::Values(DTypeCase{DType::kF32, 1e-5},
                                           DTypeCase{DType::kF16, 5e-3},
                                           DTypeCase{DType::kBF16, 3e-2}),
                         [](const ::testing::TestParamInfo<DTypeCase>& info) {
                           return std::string(dtype_name(info.param.dtype));
                         });

TEST(MoELayerCpu, SwitchingDtypesInOneProcessLeavesF32ResultsUnchanged) {
  MoEConfig cfg = small_config(DType::kF32);
  const auto [x, dy] = inputs(cfg, 19, 38);
  MoELayer first(cfg);
  const StepResult a = step(first, x, dy);
  for (DType dt : {DType::kBF16, DType::kF16}) {
    MoEConfig low = cfg;
    low.dtype = dt;
    MoELayer layer(low);
    const StepResult r = step(layer, x.to(dt), dy.to(dt));
    EXPECT_EQ(layer.parameter("experts.batched_fc1_w").value.dtype(), dt);
    for (double v : r.y) ASSERT_TRUE(std::isfinite(v));
  }
  MoELayer again(cfg);
  expect_bitwise_equal(a, step(again, x, dy));
}

}  // namespace
}  // namespace sy_test
