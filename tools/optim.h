// Optimizers for `switchyard train`: plain SGD and Adam (Kingma & Ba, with bias correction) over
// a list of switchyard::Parameter. Kept in the tool, not the library: a real training framework
// (PyTorch through the binding) brings its own.
//
// Parameters stored in f16/bf16 are updated through an f32 master copy that the optimizer owns:
// an update of lr * grad is often below half an ulp of a bf16 weight, so updating the stored
// value directly would round most steps away. The stored value is rewritten from the master copy
// after each step. f32 and f64 parameters on the CPU are updated in place; the optimizer state
// (Adam's moments) has the master's dtype.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "switchyard/switchyard.h"

namespace switchyard::tools {

enum class OptimizerKind { kSgd, kAdam };
OptimizerKind parse_optimizer(const std::string& name);  // "sgd" or "adam"; throws otherwise

struct OptimizerOptions {
  OptimizerKind kind = OptimizerKind::kAdam;
  double lr = 1e-3;
  double beta1 = 0.9;  // Adam
  double beta2 = 0.999;
  double eps = 1e-8;
};

class Optimizer {
 public:
  // The parameters must outlive the optimizer (they belong to the layers).
  Optimizer(std::vector<Parameter*> params, const OptimizerOptions& options);
  ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // One update from the gradients now in the parameters; parameters without a defined
  // gradient are left alone. Does not zero the gradients.
  void step();

 private:
  struct State;
  OptimizerOptions options_;
  std::vector<Parameter*> params_;
  std::vector<std::unique_ptr<State>> states_;
  long num_steps_ = 0;
};

}  // namespace switchyard::tools
