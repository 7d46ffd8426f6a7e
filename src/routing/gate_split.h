// The f32 linear gate of a bf16 layer on CUDA, on bf16 tensor cores at FP32 accuracy. An f32
// value splits exactly into three bf16 pieces, v = hi + mid + lo (hi = bf16(v), mid = bf16(v -
// hi), lo = v - hi - mid, each rounding to nearest keeps at least 9 of the 24 significant bits),
// bf16 x bf16 products are exact in f32, and the tensor cores sum them in f32: x · wᵀ as one bf16
// GEMM against [w_hi; w_mid; w_lo] gives the f32 product with a different summation order,
// where the f32 GEMM (SIMT, no tensor cores) took tens of microseconds per call for the fine-
// grained configs, and x needs no f32 copy. The data gradient, rounded to bf16 in the end, keeps
// the pieces down to 2^-16 of its magnitude: dl_hi w_hi + dl_mid w_hi + dl_lo w_hi + dl_hi w_mid.
// Tensors contiguous on one CUDA device; the current stream; no host synchronisation.
#pragma once

#include "switchyard/tensor.h"

namespace switchyard {

// Whether the split gate computes x · wᵀ: x bf16 and w f32 on a CUDA device.
bool split_gate_applies(const Tensor& x, const Tensor& w);
// logits [T, E] f32 = x [T, d] bf16 · w [E, d] f32 ᵀ.
Tensor split_gate_forward_cuda(const Tensor& x, const Tensor& w);
// dx [T, d] bf16 = dl [T, E] f32 · w, or with add dx += it (rounded once); w_grad [E, d] f32 +=
// dlᵀ · x.
void split_gate_backward_cuda(const Tensor& dl, const Tensor& x, const Tensor& w, Tensor& w_grad,
                              Tensor& dx, bool add);

}  // namespace switchyard
