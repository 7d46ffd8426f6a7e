// The elementwise and reduction steps of the cosine gate (routing/gate.h), on the CPU
// (cosine_ops_cpu.cpp) and CUDA (cosine_ops_cuda.cu). The GEMMs between them are gemm()'s.
// Tensors are f32 or f64 (the routing dtype), contiguous, on one device. On CUDA each op runs on
// the current stream and reads the temperature on the device: no host synchronisation.
#pragma once

#include "switchyard/tensor.h"

namespace switchyard {

inline constexpr double kCosineNormEps = 1e-12;  // F.normalize's eps

// n vectors of c elements at m[i * sn + j * sc]: the rows of a matrix, or its columns.
struct VectorLayout {
  index_t n, c, sn, sc;
};

// Normalises the rows of m [n, c] (columns: the columns of m [c, n]), after adding `bias` [c]
// to every row when given: norms [n] = max(|v|, eps), out = v / norms.
void normalize_vectors(const Tensor& m, const Tensor* bias, bool columns, Tensor& out,
                       Tensor& norms);
// Backward of v / max(|v|, eps) from the normalised vn and norms: dv = (dvn - vn <vn, dvn>) / |v|,
// or dvn / eps where the norm was clamped.
void normalize_vectors_backward(const Tensor& vn, const Tensor& norms, const Tensor& dvn,
                                bool columns, Tensor& dv);
// logits = cos * exp(min(tau, ln 100)), tau [1].
void cosine_scale(const Tensor& cos, const Tensor& tau, Tensor& logits);
// dcos = dlogits * scale; dtau [1] = sum(dlogits * cos) * scale where tau <= ln 100, else 0. The
// sum runs in f64 in a fixed order (bitwise reproducible).
void cosine_scale_backward(const Tensor& dlogits, const Tensor& cos, const Tensor& tau,
                           Tensor& dcos, Tensor& dtau);

void normalize_vectors_cuda(const Tensor& m, const Tensor* bias, const VectorLayout& v,
                            Tensor& out, Tensor& norms);
void normalize_vectors_backward_cuda(const Tensor& vn, const Tensor& norms, const Tensor& dvn,
                                     const VectorLayout& v, Tensor& dv);
void cosine_scale_cuda(const Tensor& cos, const Tensor& tau, Tensor& logits);
void cosine_scale_backward_cuda(const Tensor& dlogits, const Tensor& cos, const Tensor& tau,
                                Tensor& dcos, Tensor& dtau);

}  // namespace switchyard
