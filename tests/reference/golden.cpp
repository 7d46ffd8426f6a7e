#include "reference/golden.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

namespace sy_ref {

namespace {

std::vector<GoldenCase> load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open golden file " + path);
  std::vector<GoldenCase> cases;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line);
    const auto& c = j.at("config");
    GoldenCase g;
    g.T = c.at("T");
    g.d = c.at("d");
    g.h = c.at("h");
    g.E = c.at("E");
    g.k = c.at("k");
    g.capacity_factor = c.at("capacity_factor");
    g.batch_prioritized_routing = c.at("batch_prioritized_routing");
    g.normalize_gate = c.at("normalize_gate");
    g.is_postscore = c.at("is_postscore");
    g.has_bias = c.at("has_bias");
    g.aux_weight = c.at("aux_weight");
    g.x = j.at("x").get<std::vector<double>>();
    g.dy = j.at("dy").get<std::vector<double>>();
    g.y = j.at("y").get<std::vector<double>>();
    g.dx = j.at("dx").get<std::vector<double>>();
    g.l_aux = j.at("l_aux");
    for (const auto& [name, p] : j.at("params").items()) {
      g.params[name] = p.at("value").get<std::vector<double>>();
      g.shapes[name] = p.at("shape").get<std::vector<std::int64_t>>();
    }
    for (const auto& [name, v] : j.at("grads").items())
      g.grads[name] = v.get<std::vector<double>>();
    cases.push_back(std::move(g));
  }
  return cases;
}

// 0.5 -> "0p5", -0.5 -> "m0p5", 1 -> "1".
std::string number_name(double v) {
  std::ostringstream os;
  os << std::abs(v);
  std::string s = os.str();
  for (auto& ch : s)
    if (ch == '.') ch = 'p';
  return (v < 0 ? "m" : "") + s;
}

}  // namespace

MoEConfig GoldenCase::config() const {
  MoEConfig cfg;
  cfg.model_dim = d;
  cfg.hidden_size = h;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.dtype = switchyard::DType::kF32;
  cfg.capacity_factor = capacity_factor;
  cfg.batch_prioritized_routing = batch_prioritized_routing;
  cfg.normalize_gate = normalize_gate;
  cfg.is_postscore = is_postscore;
  cfg.activation = switchyard::Activation::kRelu;
  cfg.has_fc1_bias = has_bias;
  cfg.has_fc2_bias = has_bias;
  cfg.aux_loss = switchyard::AuxLoss::kGShard;
  return cfg;
}

std::string GoldenCase::name() const {
  // A stream, not operator+ chains: g++ 12 warns falsely (-Wrestrict) on those.
  std::ostringstream os;
  os << "E" << E << "_k" << k << "_cf" << number_name(capacity_factor)
     << (batch_prioritized_routing ? "_bpr" : "_tokenorder")
     << (normalize_gate ? "_norm" : "_nonorm") << (has_bias ? "_bias" : "_nobias");
  return os.str();
}

namespace {
struct Loaded {
  std::vector<GoldenCase> cases;
  std::string error;
};
const Loaded& loaded() {
  static const Loaded l = [] {
    Loaded r;
    try {
      r.cases = load(SY_TEST_DATA_DIR "/tutel_v0.3.3_cpu_f32.jsonl");
    } catch (const std::exception& e) {
      r.error = e.what();
    }
    return r;
  }();
  return l;
}
}  // namespace

const std::vector<GoldenCase>& golden_cases() { return loaded().cases; }
const std::string& golden_load_error() { return loaded().error; }

}  // namespace sy_ref
