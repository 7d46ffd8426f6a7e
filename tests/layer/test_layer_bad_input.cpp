// Bad input gets a clear switchyard::Error, never a crash, and the layer stays usable
// (DESIGN.md §2, §8). Messages are checked for a key word, not their exact text.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <functional>
#include <limits>

#include "layer/layer_test_util.h"

namespace sy_test {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// Runs f, which must throw switchyard::Error whose message contains one of `words`
// (case-insensitive).
::testing::AssertionResult throws_error_with(const std::function<void()>& f,
                                             const std::vector<std::string>& words) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = lower(e.what());
    for (const auto& w : words)
      if (msg.find(lower(w)) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << "message \"" << e.what() << "\" names none of the key words";
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-switchyard exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

constexpr std::int64_t kT = 5;

struct BadCall {
  std::string name;
  std::function<void(MoELayer&)> call;  // on a fresh f32 layer that has run one good forward
  std::vector<std::string> words;
};

void PrintTo(const BadCall& c, std::ostream* os) { *os << c.name; }

Tensor good_x(const MoEConfig& cfg) {
  return make_tensor(randn(kT * cfg.model_dim, 1), {kT, cfg.model_dim}, DType::kF32);
}

std::vector<BadCall> bad_calls() {
  const MoEConfig cfg = small_config(DType::kF32);
  const std::int64_t d = cfg.model_dim;
  std::vector<BadCall> c;
  c.push_back({"WrongModelDim",
               [=](MoELayer& l) {
                 l.forward(make_tensor(randn(kT * (d + 1), 1), {kT, d + 1}, DType::kF32));
               },
               {"model_dim"}});
  c.push_back({"ScalarInput",
               [=](MoELayer& l) { l.forward(make_tensor({1.0}, {}, DType::kF32)); },
               {"model_dim", "dim", "shape"}});
  c.push_back(
      {"UndefinedInput", [=](MoELayer& l) { l.forward(Tensor()); }, {"undefined", "defined"}});
  c.push_back({"IntegerInput",
               [=](MoELayer& l) {
                 Tensor x = Tensor::zeros({kT, d}, DType::kI32);
                 l.forward(x);
               },
               {"i32", "floating", "dtype"}});
  c.push_back({"CudaInputOnCpuLayer",
               [=](MoELayer& l) {
                 // Never dereferenced: the device check must come first.
                 static float fake[1];
                 l.forward(Tensor::from_blob(fake, {kT, d}, {}, DType::kF32, Device::cuda(0)));
               },
               {"cuda", "device"}});
  c.push_back({"TopKZeroPerCall",
               [=](MoELayer& l) {
                 ForwardOptions o;
                 o.top_k = 0;
                 l.forward(good_x(cfg), o);
               },
               {"top_k"}});
  c.push_back({"TopKNegativePerCall",
               [=](MoELayer& l) {
                 ForwardOptions o;
                 o.top_k = -3;
                 l.forward(good_x(cfg), o);
               },
               {"top_k"}});
  c.push_back({"NaNCapacityFactorPerCall",
               [=](MoELayer& l) {
                 ForwardOptions o;
                 o.capacity_factor = kNaN;
                 l.forward(good_x(cfg), o);
               },
               {"capacity_factor"}});
  c.push_back({"NaNInInput",
               [=](MoELayer& l) {
                 std::vector<double> v = randn(kT * d, 1);
                 v[7] = kNaN;
                 l.forward(make_tensor(v, {kT, d}, DType::kF32));
               },
               {"nan", "finite"}});
  c.push_back({"InfInInput",
               [=](MoELayer& l) {
                 std::vector<double> v = randn(kT * d, 1);
                 v[3] = -kInf;
                 l.forward(make_tensor(v, {kT, d}, DType::kF32));
               },
               {"inf", "finite"}});
  c.push_back({"NaNInLogits",
               [=](MoELayer& l) {
                 // A NaN gate weight makes NaN logits from a finite x.
                 Parameter& wg = l.parameter("gates.0.wg.weight");
                 const Tensor saved = wg.value.clone();
                 std::vector<double> w = wg.value.to_vector();
                 w[0] = kNaN;
                 wg.value.copy_from(make_tensor(w, wg.value.sizes(), DType::kF64));
                 try {
                   l.forward(good_x(cfg));
                 } catch (...) {
                   wg.value.copy_from(saved);
                   throw;
                 }
                 wg.value.copy_from(saved);
               },
               {"nan", "logit", "finite"}});
  c.push_back({"DyOfWrongShape",
               [=](MoELayer& l) {
                 l.forward(good_x(cfg));
                 l.backward(make_tensor(randn(kT * d - d, 2), {kT - 1, d}, DType::kF32));
               },
               {"dy"}});
  c.push_back({"DyOnCuda",
               [=](MoELayer& l) {
                 l.forward(good_x(cfg));
                 static float fake[1];
                 l.backward(Tensor::from_blob(fake, {kT, d}, {}, DType::kF32, Device::cuda(0)));
               },
               {"cuda", "device"}});
  c.push_back({"NaNLossWeight",
               [=](MoELayer& l) {
                 l.forward(good_x(cfg));
                 l.backward(make_tensor(randn(kT * d, 2), {kT, d}, DType::kF32), {.aux = kNaN});
               },
               {"finite", "nan", "aux"}});
  c.push_back({"UnknownParameterName",
               [=](MoELayer& l) { l.parameter("gates.0.nope"); },
               {"gates.0.nope"}});
  c.push_back({"UpdateExpertBiasWithoutExpertBias",
               [=](MoELayer& l) { l.update_expert_bias(); },
               {"expert_bias"}});
  return c;
}

class MoELayerBadInput : public ::testing::TestWithParam<BadCall> {};

TEST_P(MoELayerBadInput, ThrowsAClearErrorAndTheLayerStillWorks) {
  const BadCall& c = GetParam();
  const MoEConfig cfg = small_config(DType::kF32);
  MoELayer layer(cfg);
  const Tensor x = good_x(cfg);
  const Tensor dy = make_tensor(randn(kT * cfg.model_dim, 2), {kT, cfg.model_dim}, DType::kF32);
  const std::vector<double> y0 = layer.forward(x).y.to_vector();
  EXPECT_TRUE(throws_error_with([&] { c.call(layer); }, c.words));
  // A good step afterwards gives the same output as before and a finite gradient.
  ForwardResult r;
  ASSERT_NO_THROW(r = layer.forward(x));
  EXPECT_TRUE(sy_ref::bitwise_equal(r.y.to_vector(), y0));
  Tensor dx;
  ASSERT_NO_THROW(dx = layer.backward(dy, {.aux = 0.1, .z = 0.01}));
  for (double v : dx.to_vector()) ASSERT_TRUE(std::isfinite(v));
}

INSTANTIATE_TEST_SUITE_P(MoELayerTable, MoELayerBadInput, ::testing::ValuesIn(bad_calls()),
                         [](const ::testing::TestParamInfo<BadCall>& info) {
                           return info.param.name;
                         });

TEST(MoELayerBadInput, BackwardBeforeForwardThrows) {
  MoELayer layer(small_config(DType::kF32));
  const Tensor dy = make_tensor(randn(kT * 6, 2), {kT, 6}, DType::kF32);
  EXPECT_TRUE(throws_error_with([&] { layer.backward(dy); }, {"forward"}));
  const Tensor x = good_x(layer.config());
  ASSERT_NO_THROW(layer.forward(x));
  ASSERT_NO_THROW(layer.backward(dy));
}

// Configurations the constructor must refuse, each with its key word.
struct BadConfig {
  std::string name;
  std::function<void(MoEConfig&)> setup;
  std::vector<std::string> words;
};

void PrintTo(const BadConfig& c, std::ostream* os) { *os << c.name; }

std::vector<BadConfig> bad_configs() {
  std::vector<BadConfig> c;
  c.push_back({"ZeroExperts", [](MoEConfig& cfg) { cfg.num_experts = 0; }, {"num_experts"}});
  c.push_back({"ZeroModelDim", [](MoEConfig& cfg) { cfg.model_dim = 0; }, {"model_dim"}});
  c.push_back({"ZeroHiddenSize", [](MoEConfig& cfg) { cfg.hidden_size = 0; }, {"hidden_size"}});
  c.push_back({"TopKZero", [](MoEConfig& cfg) { cfg.top_k = 0; }, {"top_k"}});
  c.push_back({"NaNCapacityFactor",
               [](MoEConfig& cfg) { cfg.capacity_factor = kNaN; },
               {"capacity_factor"}});
  c.push_back({"IntegerDType", [](MoEConfig& cfg) { cfg.dtype = DType::kI64; }, {"dtype", "i64"}});
  c.push_back({"GroupsDoNotDivideExperts",
               [](MoEConfig& cfg) {
                 cfg.num_groups = 3;
                 cfg.topk_groups = 1;
               },
               {"group"}});
  c.push_back({"MoreKeptGroupsThanGroups",
               [](MoEConfig& cfg) {
                 cfg.num_groups = 2;
                 cfg.topk_groups = 3;
               },
               {"group"}});
  c.push_back({"TopKNotAMultipleOfKeptGroups",
               [](MoEConfig& cfg) {
                 cfg.top_k = 3;
                 cfg.num_groups = 2;
                 cfg.topk_groups = 2;
               },
               {"group"}});
  c.push_back({"TopKBeyondTheKeptGroups",
               [](MoEConfig& cfg) {
                 cfg.num_experts = 8;
                 cfg.top_k = 4;
                 cfg.num_groups = 4;
                 cfg.topk_groups = 1;  // one group of 2 experts cannot hold 4 choices
               },
               {"group"}});
  c.push_back({"LoadImportanceWithoutNoise",
               [](MoEConfig& cfg) {
                 cfg.aux_loss = AuxLoss::kLoadImportance;
                 cfg.gate_noise = 0;
               },
               {"gate_noise"}});
  c.push_back({"MegatronTopOneWithoutPreSoftmax",
               [](MoEConfig& cfg) {
                 cfg.rules = RuleSet::kMegatron;
                 cfg.top_k = 1;
               },
               {"pre_softmax"}});
  c.push_back({"MegatronExpertBiasWithSoftmax",
               [](MoEConfig& cfg) {
                 cfg.rules = RuleSet::kMegatron;
                 cfg.expert_bias = true;
               },
               {"expert_bias"}});
  return c;
}

class MoELayerBadConfig : public ::testing::TestWithParam<BadConfig> {};

TEST_P(MoELayerBadConfig, IsRefusedAtConstruction) {
  MoEConfig cfg = small_config(DType::kF32);
  GetParam().setup(cfg);
  EXPECT_TRUE(throws_error_with([&] { MoELayer layer(cfg); }, GetParam().words));
}

INSTANTIATE_TEST_SUITE_P(MoELayerTable, MoELayerBadConfig, ::testing::ValuesIn(bad_configs()),
                         [](const ::testing::TestParamInfo<BadConfig>& info) {
                           return info.param.name;
                         });

TEST(MoELayerBadInput, SequenceLossNeedsWholeSequences) {
  MoEConfig cfg = small_config(DType::kF32);
  cfg.aux_loss = AuxLoss::kSwitchSequence;
  cfg.seq_len = 4;
  MoELayer layer(cfg);
  EXPECT_TRUE(throws_error_with([&] { layer.forward(good_x(cfg)); }, {"seq_len"}));  // T = 5
  const Tensor x = make_tensor(randn(8 * cfg.model_dim, 3), {8, cfg.model_dim}, DType::kF32);
  EXPECT_NO_THROW(layer.forward(x));
}

}  // namespace
}  // namespace sy_test
