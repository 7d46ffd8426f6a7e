// Extension points: a custom gate (x -> logits) and a custom expert network (rows -> rows).
// The built-in linear/cosine gates and FFN experts implement these same interfaces.
#pragma once

#include <string>
#include <vector>

#include "switchyard/tensor.h"

namespace switchyard {

// A learnable tensor and its gradient. `replicated` marks parameters every rank holds a full
// copy of (gate, shared experts): under expert parallelism the caller all-reduces their grads.
struct Parameter {
  std::string name;  // Tutel state_dict key, e.g. "experts.batched_fc1_w"
  Tensor value;
  // Same shape and dtype as value; backward accumulates into it. Undefined after
  // MoELayer::zero_grad(true): the next backward creates it (as torch's set_to_none).
  Tensor grad;
  bool replicated = true;
};

// The gradient to accumulate into: p.grad, created as zeros where it is unset.
inline Tensor& grad_to_accumulate(Parameter& p) {
  if (!p.grad.defined()) p.grad = Tensor::zeros(p.value.sizes(), p.value.dtype(), p.value.device());
  return p.grad;
}

class Gate {
 public:
  virtual ~Gate() = default;
  // x [T, d] -> logits [T, E] (any floating dtype; routing converts to f32, f64 for f64).
  // When training, saves what backward needs; an evaluation forward must leave that untouched.
  virtual Tensor forward(const Tensor& x, bool training) = 0;
  // dlogits [T, E] (f32, or f64 for an f64 layer) -> dx [T, d] in x's dtype; accumulates the
  // gradients of parameters(). Called at most once after each forward.
  virtual Tensor backward(const Tensor& dlogits) = 0;
  // backward that adds the input gradient to dx [T, d] (contiguous, x's dtype) instead of
  // returning it. The default adds backward's result; a gate may fold the add into its kernels.
  virtual void backward_add(const Tensor& dlogits, Tensor& dx);
  virtual std::vector<Parameter*> parameters() { return {}; }
};

class ExpertNetwork {
 public:
  virtual ~ExpertNetwork() = default;
  // rows [R, d]: rows [offsets[e], offsets[e+1]) go to local expert e; offsets is an i64 tensor
  // of E+1 entries, on the host where the host knows them without a sync (the padded layout),
  // else on rows' device (read them there to keep the step free of host syncs). Returns [R, d_out]
  // in rows' dtype, d_out = MoEConfig::out_dim() (model_dim unless output_dim is set). When
  // training, saves what backward needs; an evaluation forward (training = false) must leave that
  // state untouched.
  virtual Tensor forward(const Tensor& rows, const Tensor& offsets, bool training) = 0;
  // drows_out [R, d_out] -> drows [R, d]; accumulates the gradients of parameters().
  virtual Tensor backward(const Tensor& drows_out) = 0;
  virtual std::vector<Parameter*> parameters() = 0;
};

}  // namespace switchyard
