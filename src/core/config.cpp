#include "switchyard/config.h"

#include <array>
#include <utility>

#include "switchyard/error.h"

namespace switchyard {
namespace {

template <class E, std::size_t N>
const char* name_of(const std::array<std::pair<E, const char*>, N>& table, E v) {
  for (const auto& [e, name] : table)
    if (e == v) return name;
  return "?";
}

template <class E, std::size_t N>
E parse(const std::array<std::pair<E, const char*>, N>& table, const std::string& s,
        const char* what) {
  std::string options;
  for (const auto& [e, name] : table) {
    if (s == name) return e;
    options += (options.empty() ? "" : ", ") + std::string(name);
  }
  SY_CHECK(false, "unknown ", what, " '", s, "': expected one of ", options);
  return table[0].first;
}

constexpr std::array<std::pair<RuleSet, const char*>, 2> kRuleSets{
    {{RuleSet::kTutel, "tutel"}, {RuleSet::kMegatron, "megatron"}}};
constexpr std::array<std::pair<GateType, const char*>, 2> kGateTypes{
    {{GateType::kLinear, "linear"}, {GateType::kCosine, "cosine"}}};
constexpr std::array<std::pair<ScoreFn, const char*>, 2> kScoreFns{
    {{ScoreFn::kSoftmax, "softmax"}, {ScoreFn::kSigmoid, "sigmoid"}}};
constexpr std::array<std::pair<Activation, const char*>, 6> kActivations{
    {{Activation::kRelu, "relu"},
     {Activation::kGelu, "gelu"},
     {Activation::kGeluTanh, "gelu_tanh"},
     {Activation::kSilu, "silu"},
     {Activation::kSwiGLU, "swiglu"},
     {Activation::kGeGLU, "geglu"}}};
constexpr std::array<std::pair<Layout, const char*>, 3> kLayouts{
    {{Layout::kAuto, "auto"}, {Layout::kPadded, "padded"}, {Layout::kPacked, "packed"}}};
constexpr std::array<std::pair<DropPolicy, const char*>, 2> kDropPolicies{
    {{DropPolicy::kProbs, "probs"}, {DropPolicy::kPosition, "position"}}};
constexpr std::array<std::pair<AuxLoss, const char*>, 5> kAuxLosses{
    {{AuxLoss::kNone, "none"},
     {AuxLoss::kGShard, "gshard"},
     {AuxLoss::kLoadImportance, "load_importance"},
     {AuxLoss::kSwitch, "switch"},
     {AuxLoss::kSwitchSequence, "switch_seq"}}};

}  // namespace

const char* to_string(RuleSet v) { return name_of(kRuleSets, v); }
const char* to_string(GateType v) { return name_of(kGateTypes, v); }
const char* to_string(ScoreFn v) { return name_of(kScoreFns, v); }
const char* to_string(Activation v) { return name_of(kActivations, v); }
const char* to_string(Layout v) { return name_of(kLayouts, v); }
const char* to_string(DropPolicy v) { return name_of(kDropPolicies, v); }
const char* to_string(AuxLoss v) { return name_of(kAuxLosses, v); }
RuleSet parse_rule_set(const std::string& s) { return parse(kRuleSets, s, "rule set"); }
GateType parse_gate_type(const std::string& s) { return parse(kGateTypes, s, "gate type"); }
ScoreFn parse_score_fn(const std::string& s) { return parse(kScoreFns, s, "score function"); }
Activation parse_activation(const std::string& s) { return parse(kActivations, s, "activation"); }
Layout parse_layout(const std::string& s) { return parse(kLayouts, s, "layout"); }
DropPolicy parse_drop_policy(const std::string& s) {
  return parse(kDropPolicies, s, "drop policy");
}
AuxLoss parse_aux_loss(const std::string& s) { return parse(kAuxLosses, s, "aux loss"); }
bool is_gated(Activation a) { return a == Activation::kSwiGLU || a == Activation::kGeGLU; }

}  // namespace switchyard
