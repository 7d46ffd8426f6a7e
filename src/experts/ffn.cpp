#include "experts/ffn.h"

#include <cmath>

#include "core/backend.h"
#include "core/init.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

Parameter make_param(const std::string& name, const Shape& shape, const FfnShape& s,
                     bool replicated) {
  return Parameter{name, Tensor::zeros(shape, s.dtype, s.device),
                   Tensor::zeros(shape, s.dtype, s.device), replicated};
}

// Host copy of the offsets with its invariants checked (first 0, non-decreasing, last = rows).
// NOTE: for CUDA offsets this is a device-to-host copy, a sync point of the forward.
std::vector<index_t> read_offsets(const Tensor& offsets, index_t num_experts, index_t num_rows) {
  const std::vector<double> v = offsets.to_vector();
  std::vector<index_t> off(v.begin(), v.end());
  SY_CHECK(off[0] == 0 && off[num_experts] == num_rows, "experts: offsets must run from 0 to ",
           num_rows, ", got ", off[0], " to ", off[num_experts]);
  for (index_t e = 0; e < num_experts; ++e)
    SY_CHECK(off[e] <= off[e + 1], "experts: offsets must not decrease (expert ", e, ")");
  return off;
}

}  // namespace

FfnExperts::FfnExperts(const FfnShape& s, const std::string& prefix, bool replicated,
                       std::uint64_t seed, std::uint64_t init_id)
    : shape_(s) {
  SY_CHECK(s.num_experts >= 1, "experts: num_experts must be >= 1, got ", s.num_experts);
  SY_CHECK(s.model_dim >= 1, "experts: model_dim must be >= 1, got ", s.model_dim);
  SY_CHECK(s.hidden_size >= 1, "experts: hidden_size must be >= 1, got ", s.hidden_size);
  SY_CHECK(s.output_dim >= 0, "experts: output_dim must be >= 0 (0: model_dim), got ",
           s.output_dim);
  SY_CHECK(is_floating(s.dtype), "experts: dtype must be floating, got ", dtype_name(s.dtype));
  const index_t E = s.num_experts, d = s.model_dim, h = s.hidden_size, o = s.out_dim();
  const index_t h1 = is_gated(s.activation) ? 2 * h : h;
  fc1_w_ = make_param(prefix + "batched_fc1_w", {E, h1, d}, s, replicated);
  fc2_w_ = make_param(prefix + "batched_fc2_w", {E, h, o}, s, replicated);
  if (s.has_fc1_bias) fc1_b_ = make_param(prefix + "batched_fc1_bias", {E, h1}, s, replicated);
  if (s.has_fc2_bias) fc2_b_ = make_param(prefix + "batched_fc2_bias", {E, o}, s, replicated);
  SY_CHECK(s.first_expert >= 0, "experts: first_expert must be >= 0, got ", s.first_expert);
  // Like nn.Linear(d, h1) and nn.Linear(h, o) per expert: U(±1/sqrt(fan_in)) for both. Draws are
  // numbered over all experts, so local expert e gets global expert first_expert + e's values.
  const index_t f = s.first_expert;
  if (!s.initialise) return;
  fill_uniform(fc1_w_.value, 1.0 / std::sqrt(static_cast<double>(d)), seed, init_id + 0,
               f * h1 * d);
  fill_uniform(fc2_w_.value, 1.0 / std::sqrt(static_cast<double>(h)), seed, init_id + 1, f * h * o);
  if (s.has_fc1_bias)
    fill_uniform(fc1_b_.value, 1.0 / std::sqrt(static_cast<double>(d)), seed, init_id + 2, f * h1);
  if (s.has_fc2_bias)
    fill_uniform(fc2_b_.value, 1.0 / std::sqrt(static_cast<double>(h)), seed, init_id + 3, f * o);
}

std::vector<Parameter*> FfnExperts::parameters() {
  std::vector<Parameter*> p{&fc1_w_, &fc2_w_};
  if (shape_.has_fc1_bias) p.push_back(&fc1_b_);
  if (shape_.has_fc2_bias) p.push_back(&fc2_b_);
  return p;
}

Tensor FfnExperts::forward(const Tensor& rows, const Tensor& offsets, bool training) {
  Saved saved;
  Tensor y = forward_into(rows, offsets, training ? &saved : nullptr);
  if (training) {
    saved_ = std::move(saved);
    has_saved_ = true;
  }
  return y;
}

Tensor FfnExperts::forward_into(const Tensor& rows, const Tensor& offsets, Saved* saved_out) {
  SY_CHECK(rows.dim() == 2 && rows.size(1) == shape_.model_dim, "experts: rows must be [R, ",
           shape_.model_dim, "], got a ", rows.dim(), "-d tensor",
           rows.dim() == 2 ? detail::str_cat(" with ", rows.size(1), " columns") : "");
  SY_CHECK(rows.device() == shape_.device, "experts: rows are on ", to_string(rows.device()),
           ", the experts on ", to_string(shape_.device));
  require_backend("experts", rows.device());
  SY_CHECK(offsets.dtype() == DType::kI64 && offsets.dim() == 1 &&
               offsets.size(0) == shape_.num_experts + 1,
           "experts: offsets must be an i64 tensor of ", shape_.num_experts + 1, " entries");
  Saved saved;
  Tensor y;
  if (rows.device().is_cuda()) {
#ifdef SY_WITH_CUDA
    // Device offsets stay there when the grouped GEMMs read them (no sync; the router's plan is
    // trusted, and the kernels clamp offsets to [0, R]); otherwise they come to the host.
    const bool on_device = offsets.device().is_cuda() && ffn_cuda_grouped(shape_, rows.size(0));
    std::vector<index_t> off;
    if (shape_.num_experts == 1)
      off = {0, rows.size(0)};  // one expert (a shared expert): nothing to read
    else if (!on_device)
      off = read_offsets(offsets, shape_.num_experts, rows.size(0));
    y = ffn_forward_cuda(shape_, fc1_w_, fc2_w_, fc1_b_, fc2_b_, rows.to(shape_.dtype), offsets,
                         std::move(off), saved);
#endif
  } else {
    y = ffn_forward_cpu(shape_, fc1_w_, fc2_w_, fc1_b_, fc2_b_, rows.to(shape_.dtype),
                        read_offsets(offsets, shape_.num_experts, rows.size(0)), saved);
  }
  if (saved_out) *saved_out = std::move(saved);
  return y;
}

Tensor FfnExperts::backward(const Tensor& dy) { return backward_owned(dy); }

Tensor FfnExperts::backward_owned(Tensor dy) {
  SY_CHECK(has_saved_, "experts: backward called without a forward");
  // One backward per forward: the saved activations are freed when it returns.
  Saved saved = std::move(saved_);
  saved_ = Saved{};
  has_saved_ = false;
  return backward_from(std::move(dy), std::move(saved));
}

Tensor FfnExperts::backward_from(Tensor dy, Saved saved) {
  SY_CHECK(saved.x.defined(), "experts: backward called without a training forward");
  const index_t R = saved.x.size(0);
  SY_CHECK(dy.dim() == 2 && dy.size(0) == R && dy.size(1) == shape_.out_dim(),
           "experts: gradient must be [", R, ", ", shape_.out_dim(), "]");
  SY_CHECK(dy.device() == shape_.device, "experts: gradient is on ", to_string(dy.device()),
           ", the experts on ", to_string(shape_.device));
  // Unset gradients (MoELayer::zero_grad(true)) start at zero; the weights' are created by the
  // backends' backward when their GEMMs come (on CUDA written, not added to zeros).
  for (Parameter* p : {&fc1_b_, &fc2_b_})
    if (p->value.defined()) grad_to_accumulate(*p);
#ifdef SY_WITH_CUDA
  if (dy.device().is_cuda())
    return ffn_backward_cuda(shape_, fc1_w_, fc2_w_, fc1_b_, fc2_b_, std::move(dy),
                             std::move(saved));
#endif
  return ffn_backward_cpu(shape_, fc1_w_, fc2_w_, fc1_b_, fc2_b_, std::move(dy), saved);
}

}  // namespace switchyard
