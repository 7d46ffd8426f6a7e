#include <cblas.h>

#include <climits>

#include "core/backend.h"
#include "core/dtype_dispatch.h"
#include "experts/gemm.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

// BLAS takes int sizes: a larger matrix is refused rather than silently truncated.
int blas_int(index_t v, const char* what) {
  SY_CHECK(v >= 0 && v <= INT_MAX, "gemm: ", what, "=", v, " exceeds the BLAS int range");
  return static_cast<int>(v);
}

CBLAS_TRANSPOSE op(bool t) { return t ? CblasTrans : CblasNoTrans; }

}  // namespace

void gemm_raw(bool ta, bool tb, index_t m, index_t n, index_t k, double alpha, const float* a,
              index_t lda, const float* b, index_t ldb, double beta, float* c, index_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, op(ta), op(tb), blas_int(m, "M"), blas_int(n, "N"), blas_int(k, "K"),
              static_cast<float>(alpha), a, blas_int(std::max<index_t>(lda, 1), "lda"), b,
              blas_int(std::max<index_t>(ldb, 1), "ldb"), static_cast<float>(beta), c,
              blas_int(std::max<index_t>(ldc, 1), "ldc"));
}

void gemm_raw(bool ta, bool tb, index_t m, index_t n, index_t k, double alpha, const double* a,
              index_t lda, const double* b, index_t ldb, double beta, double* c, index_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_dgemm(CblasRowMajor, op(ta), op(tb), blas_int(m, "M"), blas_int(n, "N"), blas_int(k, "K"),
              alpha, a, blas_int(std::max<index_t>(lda, 1), "lda"), b,
              blas_int(std::max<index_t>(ldb, 1), "ldb"), beta, c,
              blas_int(std::max<index_t>(ldc, 1), "ldc"));
}

void gemm(const Tensor& a_in, bool ta, const Tensor& b_in, bool tb, Tensor& c, double alpha,
          double beta) {
  SY_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && c.dim() == 2, "gemm: expected 2-D tensors, got ",
           a_in.dim(), "-d, ", b_in.dim(), "-d and ", c.dim(), "-d");
  SY_CHECK(a_in.dtype() == b_in.dtype() && a_in.dtype() == c.dtype(),
           "gemm: dtypes differ: ", dtype_name(a_in.dtype()), ", ", dtype_name(b_in.dtype()), ", ",
           dtype_name(c.dtype()));
  SY_CHECK(a_in.device() == c.device() && b_in.device() == c.device(),
           "gemm: tensors on different devices: ", to_string(a_in.device()), ", ",
           to_string(b_in.device()), ", ", to_string(c.device()));
  const index_t m = ta ? a_in.size(1) : a_in.size(0);
  const index_t k = ta ? a_in.size(0) : a_in.size(1);
  const index_t kb = tb ? b_in.size(1) : b_in.size(0);
  const index_t n = tb ? b_in.size(0) : b_in.size(1);
  SY_CHECK(k == kb && c.size(0) == m && c.size(1) == n, "gemm: shapes do not chain: op(a) is [", m,
           ", ", k, "], op(b) is [", kb, ", ", n, "], c is [", c.size(0), ", ", c.size(1), "]");
  auto unit_rows = [](const Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); };
  if (c.device().is_cuda()) {
    SY_CHECK(c.is_contiguous(), "gemm: the CUDA output must be contiguous");
    Tensor a = a_in.contiguous(), b = b_in.contiguous();
    SY_CALL_CUDA(gemm, a, ta, b, tb, c, alpha, beta);
  }
  const DType dt = c.dtype();
  if (dt == DType::kF32 || dt == DType::kF64) {
    const Tensor a = unit_rows(a_in), b = unit_rows(b_in);
    Tensor cc = c.stride(1) == 1 ? c : c.contiguous();
    if (dt == DType::kF32) {
      gemm_raw(ta, tb, m, n, k, alpha, a.data<float>(), a.stride(0), b.data<float>(), b.stride(0),
               beta, cc.data<float>(), cc.stride(0));
    } else {
      gemm_raw(ta, tb, m, n, k, alpha, a.data<double>(), a.stride(0), b.data<double>(), b.stride(0),
               beta, cc.data<double>(), cc.stride(0));
    }
    if (cc.data_ptr() != c.data_ptr()) c.copy_from(cc);
    return;
  }
  // f16/bf16 storage: the product runs in f32, rounded once into c.
  const Tensor a = a_in.to(DType::kF32).contiguous(), b = b_in.to(DType::kF32).contiguous();
  Tensor cf = c.to(DType::kF32).contiguous();
  gemm_raw(ta, tb, m, n, k, alpha, a.data<float>(), a.stride(0), b.data<float>(), b.stride(0), beta,
           cf.data<float>(), cf.stride(0));
  c.copy_from(cf);
}

}  // namespace switchyard
