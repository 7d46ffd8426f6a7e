#include <cublasLt.h>

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "core/allocator.h"
#include "experts/gemm.h"
#include "experts/gemm_cuda.cuh"

namespace switchyard {

namespace {

// The process's handle for `device`, made by create() on first use; use(handle) runs under the
// same lock (one per call site: each instantiation has its own).
template <class H, class Create, class Use>
H device_handle(int device, Create create, Use use) {
  static std::mutex mu;
  static std::vector<H> handles(64, nullptr);
  SY_CHECK(device >= 0 && device < 64, "cuda:", device, " is out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (!handles[device]) {
    DeviceScope scope(device);
    SY_CUBLAS_CHECK(create(&handles[device]));
  }
  use(handles[device]);
  return handles[device];
}

cublasLtHandle_t cublaslt_handle(int device) {
  return device_handle<cublasLtHandle_t>(
      device, [](cublasLtHandle_t* h) { return cublasLtCreate(h); }, [](cublasLtHandle_t) {});
}

}  // namespace

cublasHandle_t cublas_handle(int device, cudaStream_t stream) {
  return device_handle<cublasHandle_t>(
      device, [](cublasHandle_t* h) { return cublasCreate(h); },
      [&](cublasHandle_t h) { SY_CUBLAS_CHECK(cublasSetStream(h, stream)); });
}

namespace {

// The alignment in bytes (up to 16) that every batch's matrix keeps: the base address's and the
// batch stride's.
std::uint32_t alignment(const void* p, index_t stride_bytes) {
  std::uint32_t a = 16;
  while (a > 1 && (reinterpret_cast<std::uintptr_t>(p) % a != 0 ||
                   static_cast<std::uint64_t>(stride_bytes) % a != 0))
    a /= 2;
  return a;
}

// Owners of cuBLASLt descriptors.
struct LtDesc {
  cublasLtMatmulDesc_t desc = nullptr;
  ~LtDesc() { cublasLtMatmulDescDestroy(desc); }
  template <class V>
  void set(cublasLtMatmulDescAttributes_t attr, const V& v) {
    SY_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &v, sizeof(v)));
  }
};
struct LtLayout {
  cublasLtMatrixLayout_t layout = nullptr;
  LtLayout(cudaDataType_t type, index_t rows, index_t cols, index_t ld, index_t batch,
           index_t stride) {
    SY_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, ld));
    const std::int32_t count = static_cast<std::int32_t>(batch);
    const std::int64_t offset = stride;
    SY_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                                     &count, sizeof(count)));
    SY_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
        layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &offset, sizeof(offset)));
  }
  ~LtLayout() { cublasLtMatrixLayoutDestroy(layout); }
};

}  // namespace

bool gemm_epilogue_lt(int device, cudaStream_t stream, bool ta, bool tb, index_t m, index_t n,
                      index_t k, const void* a, index_t lda, index_t stride_a, const void* b,
                      index_t ldb, index_t stride_b, void* c, index_t ldc, index_t stride_c,
                      index_t batch, cudaDataType_t type, cublasComputeType_t compute,
                      const GemmEpilogue& ep) {
  if (m == 0 || n == 0 || batch == 0) return true;
  SY_CHECK(batch <= 2147483647, "cuBLASLt batch count ", batch, " exceeds int");
  cublasLtHandle_t h = cublaslt_handle(device);
  // Column-major, as gemm(): Cᵀ [n, m] = op(B)ᵀ [n, k] · op(A)ᵀ [k, m], so the bias, one value
  // per column of C, is one per row of Cᵀ: cuBLASLt's bias vector.
  const cublasOperation_t op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  LtDesc desc;
  SY_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc.desc, compute, CUDA_R_32F));
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, op_b);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, op_a);
  const cublasLtEpilogue_t epilogue =
      ep.relu ? (ep.bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU)
              : (ep.bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT);
  desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  if (ep.bias) {
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, ep.bias);
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, static_cast<std::int64_t>(ep.bias_stride));
  }
  const LtLayout lb(type, tb ? k : n, tb ? n : k, ldb, batch, stride_b);
  const LtLayout la(type, ta ? m : k, ta ? k : m, lda, batch, stride_a);
  const LtLayout lc(type, n, m, ldc, batch, stride_c);

  // The heuristic's choice, once per problem: it depends on the sizes, the operations, the
  // epilogue and the operands' alignment (each batch's matrix), never on the values.
  const std::size_t elem = type == CUDA_R_32F ? 4 : 2;
  const std::uint32_t align_b = alignment(b, stride_b * elem),
                      align_a = alignment(a, stride_a * elem);
  const std::uint32_t align_c = alignment(c, stride_c * elem);
  const std::uint32_t align_bias = ep.bias ? alignment(ep.bias, ep.bias_stride * elem) : 16;
  using Key =
      std::tuple<int, int, int, int, int, std::array<index_t, 10>, std::array<std::uint32_t, 4>>;
  const Key key{device,
                int(ta) * 2 + int(tb),
                int(epilogue),
                int(type),
                int(compute),
                {m, n, k, lda, ldb, ldc, stride_a, stride_b, stride_c, batch},
                {align_a, align_b, align_c, align_bias}};
  static std::mutex mu;
  static std::map<Key, cublasLtMatmulHeuristicResult_t> chosen;
  cublasLtMatmulHeuristicResult_t result{};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = chosen.find(key);
    if (it == chosen.end()) {
      cublasLtMatmulPreference_t pref = nullptr;
      SY_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
      std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>,
                      decltype(&cublasLtMatmulPreferenceDestroy)>
          owner(pref, &cublasLtMatmulPreferenceDestroy);
      const std::uint64_t max_workspace = std::uint64_t{32} << 20;
      const std::pair<cublasLtMatmulPreferenceAttributes_t, std::uint32_t> aligns[] = {
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c}};
      SY_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace, sizeof(max_workspace)));
      for (const auto& [attr, v] : aligns)
        SY_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &v, sizeof(v)));
      int found = 0;
      const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
          h, desc.desc, lb.layout, la.layout, lc.layout, lc.layout, pref, 1, &result, &found);
      SY_CHECK(st == CUBLAS_STATUS_SUCCESS || st == CUBLAS_STATUS_NOT_SUPPORTED,
               "cublasLtMatmulAlgoGetHeuristic failed: ", cublasGetStatusString(st));
      if (st != CUBLAS_STATUS_SUCCESS || found == 0) result.state = CUBLAS_STATUS_NOT_SUPPORTED;
      it = chosen.emplace(key, result).first;
    }
    result = it->second;
  }
  if (result.state != CUBLAS_STATUS_SUCCESS) return false;
  const Device dev = Device::cuda(device);
  const std::shared_ptr<void> workspace =
      result.workspaceSize > 0 ? allocate(result.workspaceSize, dev) : nullptr;
  const float alpha = 1.0f, beta = 0.0f;
  SY_CUBLAS_CHECK(cublasLtMatmul(h, desc.desc, &alpha, b, lb.layout, a, la.layout, &beta, c,
                                 lc.layout, c, lc.layout, &result.algo, workspace.get(),
                                 result.workspaceSize, stream));
  return true;
}

void gemm_cuda(const Tensor& a, bool ta, const Tensor& b, bool tb, Tensor& c, double alpha,
               double beta) {
  const index_t m = c.size(0), n = c.size(1), k = ta ? a.size(0) : a.size(1);
  const int device = c.device().index;
  DeviceScope scope(device);
  cublasHandle_t h = cublas_handle(device, as_cuda_stream(current_stream(c.device()).handle));
  dispatch_float_cuda(c.dtype(), "gemm", [&](auto tag) {
    using T = decltype(tag);
    gemm<T>(h, ta, tb, m, n, k, static_cast<const T*>(a.data_ptr()), a.stride(0), 0,
            static_cast<const T*>(b.data_ptr()), b.stride(0), 0, beta,
            static_cast<T*>(c.data_ptr()), c.stride(0), 0, 1, alpha);
  });
}

}  // namespace switchyard
