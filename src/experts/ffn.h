// FFN experts (Tutel's FusedExpertsNetwork): per local expert e,
//   y = act(x · fc1_w[e]ᵀ + fc1_bias[e]) · fc2_w[e] + fc2_bias[e]
// fc1_w [E, h, d] (gated: [E, 2h, d], rows [0,h) gate, [h,2h) up, act(gate) * up),
// fc2_w [E, h, o] (stored transposed, as Tutel), fc1_bias [E, h or 2h], fc2_bias [E, o]; rows in
// are [R, d], rows out [R, o], o = the output width (model_dim unless output_dim says otherwise).
// Each expert is initialised like a fresh nn.Linear: weights and biases U(±1/sqrt(fan_in)).
#pragma once

#include <string>
#include <vector>

#include "switchyard/config.h"
#include "switchyard/extension.h"

namespace switchyard {

struct FfnShape {
  index_t num_experts = 0;
  index_t model_dim = 0;
  index_t hidden_size = 0;
  Activation activation = Activation::kRelu;
  bool has_fc1_bias = true;
  bool has_fc2_bias = true;
  DType dtype = DType::kF32;
  Device device;
  // Global index of expert 0 (expert parallelism: a rank holds experts [first_expert,
  // first_expert + num_experts) of the layer); initialisation draws the values those experts
  // have in a layer holding all of them.
  index_t first_expert = 0;
  index_t output_dim = 0;  // o; 0: model_dim
  bool initialise = true;  // false: the parameters stay zero (MoEConfig::init_parameters)

  index_t out_dim() const { return output_dim > 0 ? output_dim : model_dim; }
};

class FfnExperts final : public ExpertNetwork {
 public:
  // `prefix` names the parameters ("experts." gives "experts.batched_fc1_w", ...);
  // `init_id` separates the random streams of different networks with one seed.
  FfnExperts(const FfnShape& shape, const std::string& prefix, bool replicated, std::uint64_t seed,
             std::uint64_t init_id);

  Tensor forward(const Tensor& rows, const Tensor& offsets, bool training) override;
  Tensor backward(const Tensor& drows_out) override;
  std::vector<Parameter*> parameters() override;
  const FfnShape& shape() const { return shape_; }

  // Tensors saved by forward for backward: in the arithmetic dtype (f32, f64 for f64) on the
  // CPU, in the experts' dtype on CUDA.
  struct Saved {
    Tensor x;                      // [R, d]
    Tensor h;                      // [R, h or 2h] pre-activation
    Tensor a;                      // [R, h] activation (gated: act(gate) * up)
    std::vector<index_t> offsets;  // [E+1] on the host; empty where CUDA reads them on the device
    Tensor device_offsets;         // CUDA: [E+1] i64 on the device
    bool grouped = false;          // CUDA: the GEMMs ran on the grouped kernel
  };

  // The same computation with the saved tensors kept by the caller, for callers that keep
  // several forwards alive at once (the expert-parallel overlap pipeline's chunks). forward_into
  // fills `saved` (when not null); backward_from accumulates the parameter gradients.
  // backward_from releases drows_out once fc2's backward has read it, before dx exists: a caller
  // that hands over its only handle (std::move) lowers the peak memory by [R, o].
  Tensor forward_into(const Tensor& rows, const Tensor& offsets, Saved* saved);
  Tensor backward_from(Tensor drows_out, Saved saved);  // frees what it no longer needs
  // backward() with the gradient handed over, as backward_from.
  Tensor backward_owned(Tensor drows_out);

 private:
  FfnShape shape_;
  Parameter fc1_w_, fc2_w_, fc1_b_, fc2_b_;
  Saved saved_;
  bool has_saved_ = false;
};

// CPU math (experts/ffn_cpu.cpp). Weights are the parameters; results in the arithmetic dtype.
Tensor ffn_forward_cpu(const FfnShape& s, const Parameter& fc1_w, const Parameter& fc2_w,
                       const Parameter& fc1_b, const Parameter& fc2_b, const Tensor& rows,
                       std::vector<index_t> offsets, FfnExperts::Saved& saved);
Tensor ffn_backward_cpu(const FfnShape& s, Parameter& fc1_w, Parameter& fc2_w, Parameter& fc1_b,
                        Parameter& fc2_b, Tensor dy, const FfnExperts::Saved& saved);
// CUDA (experts/ffn_cuda.cu): tensors in the experts' dtype, current stream. `offsets` is the
// [E+1] tensor (host or device); `host_offsets` its host copy, which may be left empty only when
// ffn_cuda_grouped(...) holds (the grouped GEMMs read the offsets on the device).
bool ffn_cuda_grouped(const FfnShape& s, index_t rows);
Tensor ffn_forward_cuda(const FfnShape& s, const Parameter& fc1_w, const Parameter& fc2_w,
                        const Parameter& fc1_b, const Parameter& fc2_b, const Tensor& rows,
                        const Tensor& offsets, std::vector<index_t> host_offsets,
                        FfnExperts::Saved& saved);
Tensor ffn_backward_cuda(const FfnShape& s, Parameter& fc1_w, Parameter& fc2_w, Parameter& fc1_b,
                         Parameter& fc2_b, Tensor dy, FfnExperts::Saved saved);

}  // namespace switchyard
