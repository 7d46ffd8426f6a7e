// Built-in gates (x -> logits), with Tutel's parameter names under the prefix "gates.0.".
//   LinearGate: logits = x · Wgᵀ, Wg [E, d] ("wg.weight"), initialised like nn.Linear(d, E).
//   CosineGate: logits = normalize(P x + b) · normalize(S, columns) * exp(min(tau, ln 100)),
//     P [p, d] ("cosine_projector.weight"), b [p] ("cosine_projector.bias"), S [p, E]
//     ("sim_matrix", N(0, 0.01)), tau [1] ("temperature", ln(1/init_t)).
// With fp32_gate the parameters are f32 and x is cast to f32 for the gate (the linear gate of a
// bf16 x on CUDA computes the same f32 products on bf16 tensor cores: routing/gate_split.h).
// Both run on the CPU and CUDA (the cosine gate's own steps in routing/cosine_ops.h), with no
// host synchronisation.
#pragma once

#include "switchyard/config.h"
#include "switchyard/extension.h"

namespace switchyard {

class LinearGate final : public Gate {
 public:
  explicit LinearGate(const MoEConfig& cfg);
  Tensor forward(const Tensor& x, bool training) override;
  Tensor backward(const Tensor& dlogits) override;
  // The input gradient's GEMM accumulates into dx (no separate pass) where dx has its dtype.
  void backward_add(const Tensor& dlogits, Tensor& dx) override;
  std::vector<Parameter*> parameters() override { return {&wg_}; }

 private:
  // backward (add false: dx is assigned) or backward_add.
  void input_grad(const Tensor& dlogits, Tensor& dx, bool add);
  Parameter wg_;
  Tensor x_;  // gate input in the gate's dtype (bf16 for the split gate), saved for backward
  DType x_dtype_ = DType::kF32;
};

class CosineGate final : public Gate {
 public:
  explicit CosineGate(const MoEConfig& cfg);
  Tensor forward(const Tensor& x, bool training) override;
  Tensor backward(const Tensor& dlogits) override;
  std::vector<Parameter*> parameters() override {
    return {&temperature_, &proj_w_, &proj_b_, &sim_};
  }

 private:
  Parameter temperature_, proj_w_, proj_b_, sim_;
  // Saved by a training forward for backward, in the routing dtype.
  struct Saved {
    DType x_dtype = DType::kF32;
    Tensor x;          // [T, d]
    Tensor un, unorm;  // normalised projection [T, p] and its row norms [T]
    Tensor sn, snorm;  // normalised sim_matrix [p, E] and its column norms [E]
    Tensor cos;        // [T, E]
    Tensor tau;        // the temperature [1]
  } saved_;
};

}  // namespace switchyard
