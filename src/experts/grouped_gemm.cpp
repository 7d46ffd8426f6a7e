// Grouped GEMM front end: shape checks, the CPU backend (one BLAS GEMM per group), and the call
// into the CUDA backend.
#include "experts/grouped_gemm.h"

#include <vector>

#include "core/backend.h"
#include "experts/gemm.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

void check_common(const char* op, const Tensor& a, const Tensor& b, const Tensor& offsets,
                  const Tensor& c) {
  SY_CHECK(a.dtype() == b.dtype() && a.dtype() == c.dtype(), op,
           ": dtypes differ: ", dtype_name(a.dtype()), ", ", dtype_name(b.dtype()), ", ",
           dtype_name(c.dtype()));
  SY_CHECK(a.device() == c.device() && b.device() == c.device() && offsets.device() == c.device(),
           op, ": tensors on different devices: ", to_string(a.device()), ", ",
           to_string(b.device()), ", ", to_string(offsets.device()), ", ", to_string(c.device()));
  SY_CHECK(offsets.dtype() == DType::kI64 && offsets.dim() == 1 && offsets.size(0) >= 2, op,
           ": offsets must be an i64 tensor of E+1 >= 2 entries, got ", dtype_name(offsets.dtype()),
           " with ", offsets.dim(), " dimension(s)");
  SY_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous() && offsets.is_contiguous(),
           op, ": operands must be contiguous");
}

// Host copy of the offsets, checked: 0 = off[0] <= off[1] <= ... <= off[E] = rows.
std::vector<index_t> host_offsets(const char* op, const Tensor& offsets, index_t rows) {
  const std::vector<double> v = offsets.to_vector();
  std::vector<index_t> off(v.begin(), v.end());
  SY_CHECK(off.front() == 0 && off.back() == rows, op, ": offsets must run from 0 to ", rows,
           ", got ", off.front(), " to ", off.back());
  for (std::size_t e = 0; e + 1 < off.size(); ++e)
    SY_CHECK(off[e] <= off[e + 1], op, ": offsets must not decrease (group ", e, ")");
  return off;
}

}  // namespace

void grouped_gemm_varying_m(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& offsets,
                            Tensor& c) {
  const char* op = "grouped_gemm_varying_m";
  check_common(op, a, b, offsets, c);
  SY_CHECK(a.dim() == 2 && b.dim() == 3 && c.dim() == 2, op, ": expected a [R, K], b [E, ",
           trans_b ? "N, K" : "K, N", "], c [R, N]; got ", a.dim(), "-d, ", b.dim(), "-d, ",
           c.dim(), "-d");
  const index_t E = offsets.size(0) - 1, R = a.size(0), K = a.size(1);
  const index_t n = trans_b ? b.size(1) : b.size(2), kb = trans_b ? b.size(2) : b.size(1);
  SY_CHECK(b.size(0) == E && kb == K && c.size(0) == R && c.size(1) == n, op,
           ": shapes do not chain: a [", R, ", ", K, "], b [", b.size(0), ", ", b.size(1), ", ",
           b.size(2), "]", trans_b ? " (transposed)" : "", ", c [", c.size(0), ", ", c.size(1),
           "], ", E, " groups");
  if (c.device().is_cuda()) SY_CALL_CUDA(grouped_gemm_varying_m, a, b, trans_b, offsets, c);
  const std::vector<index_t> off = host_offsets(op, offsets, R);
  for (index_t e = 0; e < E; ++e) {
    const index_t rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    Tensor ce = c.narrow(0, off[e], rows);
    gemm(a.narrow(0, off[e], rows), false, b.select(0, e), trans_b, ce);
  }
}

void grouped_gemm_varying_k(const Tensor& a, const Tensor& b, const Tensor& offsets, Tensor& c,
                            double beta) {
  const char* op = "grouped_gemm_varying_k";
  check_common(op, a, b, offsets, c);
  SY_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 3, op,
           ": expected a [R, M], b [R, N], c [E, M, N]; got ", a.dim(), "-d, ", b.dim(), "-d, ",
           c.dim(), "-d");
  const index_t E = offsets.size(0) - 1, R = a.size(0), M = a.size(1), N = b.size(1);
  SY_CHECK(b.size(0) == R && c.size(0) == E && c.size(1) == M && c.size(2) == N, op,
           ": shapes do not chain: a [", R, ", ", M, "], b [", b.size(0), ", ", N, "], c [",
           c.size(0), ", ", c.size(1), ", ", c.size(2), "], ", E, " groups");
  SY_CHECK(beta == 0.0 || beta == 1.0, op, ": beta must be 0 or 1, got ", beta);
  if (c.device().is_cuda()) SY_CALL_CUDA(grouped_gemm_varying_k, a, b, offsets, c, beta);
  const std::vector<index_t> off = host_offsets(op, offsets, R);
  for (index_t e = 0; e < E; ++e) {
    const index_t rows = off[e + 1] - off[e];
    Tensor ce = c.select(0, e);
    if (rows == 0) {
      if (beta == 0.0) ce.fill(0.0);
      continue;
    }
    gemm(a.narrow(0, off[e], rows), true, b.narrow(0, off[e], rows), false, ce, 1.0, beta);
  }
}

}  // namespace switchyard
