// Gate::backward_add on the CPU: the built-in gates' input gradient added to a given dx, through
// each of its paths, and a dx of the wrong shape or dtype refused.
#include <gtest/gtest.h>

#include "core/dtype_dispatch.h"
#include "reference/compare.h"
#include "reference/random.h"
#include "routing/gate.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

using sy_ref::randn;
using sy_ref::rel_l2;

MoEConfig gate_config(DType dtype, bool fp32_gate, GateType type) {
  MoEConfig cfg;
  cfg.model_dim = 24;
  cfg.hidden_size = 4;
  cfg.num_experts = 6;
  cfg.dtype = dtype;
  cfg.fp32_gate = fp32_gate;
  cfg.gate = type;
  cfg.cosine_proj_dim = 8;
  return cfg;
}

// backward_add(dl, dx) leaves dx + backward(dl), within the rounding of one add in the dtype.
void expect_adds_backward(Gate& gate, DType dtype) {
  const index_t T = 13;
  const Tensor x = Tensor::from_vector(randn(T * 24, 1), {T, 24}, dtype);
  const Tensor dl = Tensor::from_vector(randn(T * 6, 2), {T, 6}, routing_dtype(dtype));
  gate.forward(x, true);
  const std::vector<double> dx = gate.backward(dl).to_vector();
  gate.forward(x, true);
  Tensor sum = x.clone();
  gate.backward_add(dl, sum);
  std::vector<double> expected = x.to_vector();
  for (std::size_t i = 0; i < expected.size(); ++i) expected[i] += dx[i];
  EXPECT_LT(rel_l2(sum.to_vector(), expected), dtype == DType::kF64 ? 1e-14 : 1e-2);
}

TEST(Gate, BackwardAddAddsTheInputGradient) {
  for (auto [dtype, fp32_gate] : {std::pair{DType::kF64, false}, std::pair{DType::kBF16, true},
                                  std::pair{DType::kBF16, false}}) {
    SCOPED_TRACE(std::string(dtype_name(dtype)) + (fp32_gate ? " fp32 gate" : ""));
    LinearGate linear(gate_config(dtype, fp32_gate, GateType::kLinear));
    expect_adds_backward(linear, dtype);
    CosineGate cosine(gate_config(dtype, fp32_gate, GateType::kCosine));
    expect_adds_backward(cosine, dtype);
  }
}

TEST(Gate, BackwardAddRefusesADxOfAnotherShapeOrDtype) {
  LinearGate gate(gate_config(DType::kF32, false, GateType::kLinear));
  const Tensor x = Tensor::from_vector(randn(5 * 24, 3), {5, 24}, DType::kF32);
  const Tensor dl = Tensor::zeros({5, 6}, DType::kF32);
  for (Tensor dx :
       {Tensor::zeros({4, 24}, DType::kF32), Tensor::zeros({5, 24}, DType::kF64), Tensor()}) {
    gate.forward(x, true);
    EXPECT_THROW(gate.backward_add(dl, dx), Error);
  }
}

}  // namespace
}  // namespace switchyard
