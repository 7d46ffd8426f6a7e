// The layer against Tutel v0.3.3 itself: 36 cases of output, GShard loss and every gradient
// (tests/data/tutel_v0.3.3_cpu_f32.jsonl, computed by Tutel v0.3.3 on CPU in f32).
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "layer/layer_test_util.h"
#include "reference/golden.h"

namespace sy_test {
namespace {

using sy_ref::all_close;
using sy_ref::golden_cases;
using sy_ref::GoldenCase;

// The golden values are f32 results: 1e-4 absolute plus 1e-5 relative.
constexpr double kAtol = 1e-4;
constexpr double kRtol = 1e-5;

class MoELayerGolden : public ::testing::TestWithParam<int> {
 protected:
  const GoldenCase& golden() const { return golden_cases().at(GetParam()); }

  // A layer with the case's config and parameters.
  MoELayer make_layer() const {
    const GoldenCase& g = golden();
    MoELayer layer(g.config());
    for (const auto& [name, value] : g.params)
      layer.parameter(name).value.copy_from(
          Tensor::from_vector(value, g.shapes.at(name), DType::kF32));
    return layer;
  }
};

TEST_P(MoELayerGolden, HasTutelsParameterNames) {
  const GoldenCase& g = golden();
  MoELayer layer(g.config());
  std::set<std::string> names;
  for (Parameter* p : layer.parameters()) {
    names.insert(p->name);
    if (g.shapes.count(p->name)) {
      EXPECT_EQ(p->value.sizes(), g.shapes.at(p->name)) << p->name;
    }
  }
  std::set<std::string> want;
  for (const auto& kv : g.params) want.insert(kv.first);
  EXPECT_EQ(names, want);
}

TEST_P(MoELayerGolden, ForwardMatchesTutel) {
  const GoldenCase& g = golden();
  MoELayer layer = make_layer();
  const ForwardResult r = layer.forward(make_tensor(g.x, {g.T, g.d}, DType::kF32));
  EXPECT_TRUE(all_close(r.y.to_vector(), g.y, kAtol, kRtol)) << "y";
  EXPECT_NEAR(r.losses.aux, g.l_aux, kAtol + kRtol * std::abs(g.l_aux)) << "l_aux";
  EXPECT_EQ(r.stats.top_k, g.k);
}

TEST_P(MoELayerGolden, BackwardMatchesTutel) {
  const GoldenCase& g = golden();
  MoELayer layer = make_layer();
  layer.forward(make_tensor(g.x, {g.T, g.d}, DType::kF32));
  layer.zero_grad();
  const Tensor dx =
      layer.backward(make_tensor(g.dy, {g.T, g.d}, DType::kF32), {.aux = g.aux_weight});
  EXPECT_TRUE(all_close(dx.to_vector(), g.dx, kAtol, kRtol)) << "dx";
  for (const auto& [name, grad] : g.grads) {
    const Parameter& p = layer.parameter(name);
    ASSERT_TRUE(p.grad.defined()) << name;
    EXPECT_TRUE(all_close(p.grad.to_vector(), grad, kAtol, kRtol)) << "grad of " << name;
  }
}

TEST_P(MoELayerGolden, AgreesWithTheReferenceOnRouting) {
  // Tokens kept per expert and drops, which Tutel does not report, from the reference (which
  // reproduces Tutel's y and loss: tests/reference/test_reference_golden.cpp).
  const GoldenCase& g = golden();
  MoELayer layer = make_layer();
  const ForwardResult r = layer.forward(make_tensor(g.x, {g.T, g.d}, DType::kF32));
  const sy_ref::RefResult want = sy_ref::reference_forward(g.config(), g.params, g.x, g.T);
  EXPECT_EQ(r.stats.tokens_per_expert, want.routing.tokens_per_expert);
  EXPECT_EQ(r.stats.dropped_choices, want.routing.dropped_choices);
  EXPECT_EQ(r.stats.capacity, want.routing.capacity);
}

INSTANTIATE_TEST_SUITE_P(MoELayerTutel, MoELayerGolden,
                         ::testing::Range(0, static_cast<int>(golden_cases().size())),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return golden_cases().at(info.param).name();
                         });

TEST(MoELayerGoldenFile, HoldsAll36Cases) {
  EXPECT_EQ(sy_ref::golden_load_error(), "");
  EXPECT_EQ(golden_cases().size(), 36u);
}

}  // namespace
}  // namespace sy_test
