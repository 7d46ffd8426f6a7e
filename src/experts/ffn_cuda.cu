// FFN experts on CUDA: the expert GEMMs, bias/activation and bias-gradient kernels. Arithmetic
// in f32 (f64 for f64; f32 GEMMs are true FP32), tensors stored in the experts' dtype.
// GEMMs: one strided-batched cuBLAS GEMM when every expert has the same row count (the padded
// layout); otherwise, for bf16/f16, the grouped GEMM (experts/grouped_gemm_cuda.cuh), which reads
// the offsets on the device, unless the experts are coarse (see use_grouped_gemm); otherwise one
// cuBLAS GEMM per expert. The forward GEMMs add the biases (and apply relu) in their epilogues:
// the grouped kernel's, or cuBLASLt's on the other paths (all dtypes but f64).
// NOTE: host syncs. None on the grouped path with device offsets (the packed layout's GEMMs
// of experts that are not coarse): forward and backward then read the offsets on the device. The
// cuBLAS paths need the offsets on the host: FfnExperts::forward reads device offsets back (a
// sync; coarse experts, where it costs little next to their GEMMs), and host offsets (the padded
// layout) are uploaded once per forward.
#include <algorithm>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "core/allocator.h"
#include "core/cuda_check.cuh"
#include "core/cuda_math.cuh"
#include "experts/activation.h"
#include "experts/ffn.h"
#include "experts/gemm_cuda.cuh"
#include "experts/grouped_gemm_cuda.cuh"

namespace switchyard {
namespace {

// Above this many flops per expert GEMM (2 x rows x d x h), one cuBLAS GEMM per expert beats the
// grouped kernel on an H100 (bench/results/2026-11-24-h100-grouped-gemm.md). The portable
// mma.sync kernel: 30 GFLOP (deepseek fc2) runs at 649 vs 302 TFLOPS, 1.6 GFLOP (fine-grained
// fc1) at 166 vs 282. The sm_90a wgmma kernel: deepseek fc2 681 vs 546 and its weight gradient
// 622, but 240 GFLOP (mixtral fc1) 644 vs 705 and its weight gradient 542 vs about 730.
constexpr double kCoarseExpertFlops = 4e9;
constexpr double kCoarseExpertFlopsWgmma = 5e10;

// Whether every expert has the same number of rows (the padded layout): one batched GEMM.
bool equal_rows(const std::vector<index_t>& off) {
  for (std::size_t e = 1; e + 1 < off.size(); ++e)
    if (off[e + 1] - off[e] != off[1] - off[0]) return false;
  return true;
}

// The elementwise kernels are row kernels (core/cuda_math.cuh's row_blocks: threadIdx.y picks a
// row of a group, a grid-stride loop over the groups, threadIdx.x over the columns in packs of V
// elements): no index division per element, each row's expert read once.
template <class T, int V>
__global__ void bias_activation(T* __restrict__ hpre, T* __restrict__ act,
                                const T* __restrict__ bias, const index_t* __restrict__ row_expert,
                                index_t rows, index_t h, bool gated, Activation kind) {
  using A = cuda_acc_t<T>;
  const index_t h1 = gated ? 2 * h : h;
  for (index_t r = first_row(); r < rows; r += row_stride()) {
    T* hr = hpre + offset_of(r, h1);
    T* ar = act + offset_of(r, h);
    const T* br = bias ? bias + offset_of(row_expert[r], h1) : nullptr;
    for (index_t j = threadIdx.x * V; j < h; j += blockDim.x * V) {
      Pack<T, V> g = load_pack<V>(hr + j), up, out;
      if (gated) up = load_pack<V>(hr + h + j);
      if (br) {  // the biased pre-activation, rounded to T, is what backward differentiates
        const Pack<T, V> bg = load_pack<V>(br + j);
#pragma unroll
        for (int i = 0; i < V; ++i) g.v[i] = store<T>(load(g.v[i]) + load(bg.v[i]));
        store_pack<V>(hr + j, g);
        if (gated) {
          const Pack<T, V> bu = load_pack<V>(br + h + j);
#pragma unroll
          for (int i = 0; i < V; ++i) up.v[i] = store<T>(load(up.v[i]) + load(bu.v[i]));
          store_pack<V>(hr + h + j, up);
        }
      }
#pragma unroll
      for (int i = 0; i < V; ++i) {
        A a = activate(kind, load(g.v[i]));
        if (gated) a *= load(up.v[i]);
        out.v[i] = store<T>(a);
      }
      store_pack<V>(ar + j, out);
    }
  }
}

template <class T, int V>
__global__ void add_bias(T* __restrict__ y, const T* __restrict__ bias,
                         const index_t* __restrict__ row_expert, index_t rows, index_t d) {
  for (index_t r = first_row(); r < rows; r += row_stride()) {
    T* yr = y + offset_of(r, d);
    const T* br = bias + offset_of(row_expert[r], d);
    for (index_t j = threadIdx.x * V; j < d; j += blockDim.x * V) {
      Pack<T, V> v = load_pack<V>(yr + j);
      const Pack<T, V> b = load_pack<V>(br + j);
#pragma unroll
      for (int i = 0; i < V; ++i) v.v[i] = store<T>(load(v.v[i]) + load(b.v[i]));
      store_pack<V>(yr + j, v);
    }
  }
}

template <class T, int V>
// dh may alias da (not gated: same shape) or hpre (gated): each pack is read before it is written.
__global__ void activation_backward(const T* da, const T* hpre, T* dh, index_t rows, index_t h,
                                    bool gated, Activation kind) {
  using A = cuda_acc_t<T>;
  const index_t h1 = gated ? 2 * h : h;
  for (index_t r = first_row(); r < rows; r += row_stride()) {
    const T* hr = hpre + offset_of(r, h1);
    const T* dar = da + offset_of(r, h);
    T* dhr = dh + offset_of(r, h1);
    for (index_t j = threadIdx.x * V; j < h; j += blockDim.x * V) {
      const Pack<T, V> g = load_pack<V>(hr + j), d = load_pack<V>(dar + j);
      Pack<T, V> dg, du;
      if (gated) {
        const Pack<T, V> up = load_pack<V>(hr + h + j);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const A gi = load(g.v[i]), di = load(d.v[i]);
          dg.v[i] = store<T>(di * load(up.v[i]) * activate_grad(kind, gi));
          du.v[i] = store<T>(di * activate(kind, gi));
        }
        store_pack<V>(dhr + h + j, du);  // after every read of this pack's columns
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i)
          dg.v[i] = store<T>(load(d.v[i]) * activate_grad(kind, load(g.v[i])));
      }
      store_pack<V>(dhr + j, dg);
    }
  }
}

// grad[e, j] += sum over the rows of expert e of m[r, j]. Block (32, kBiasRows) per (32 V
// columns, expert, chunk of the expert's rows): thread (x, y) sums rows y, y + kBiasRows, ... of
// the chunk in its V columns, then row y = 0 adds the kBiasRows partial sums in order. One chunk
// (gridDim.z 1): the block adds its sums to grad. Several (few experts, where one block per
// expert and slab of columns would leave the memory system idle): each writes its sums to
// part[chunk, e, j], and bias_grad_chunks adds them to grad in chunk order. Fixed orders
// throughout: deterministic.
constexpr int kBiasRows = 16;
template <class T, int V>
__global__ void bias_grad(const T* __restrict__ m, const index_t* __restrict__ off,
                          T* __restrict__ grad, cuda_acc_t<T>* __restrict__ part, index_t E,
                          index_t n) {
  using A = cuda_acc_t<T>;
  __shared__ A sums[kBiasRows][32 * V + 1];
  const index_t e = blockIdx.y, j = (static_cast<index_t>(blockIdx.x) * 32 + threadIdx.x) * V;
  const index_t lo = off[e], rows = off[e + 1] - lo, chunk = (rows + gridDim.z - 1) / gridDim.z;
  const index_t r0 = lo + blockIdx.z * chunk, r1 = r0 + chunk < lo + rows ? r0 + chunk : lo + rows;
  A acc[V] = {};
  if (j < n)
    for (index_t r = r0 + threadIdx.y; r < r1; r += kBiasRows) {
      const Pack<T, V> v = load_pack<V>(m + offset_of(r, n) + j);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += load(v.v[i]);
    }
#pragma unroll
  for (int i = 0; i < V; ++i) sums[threadIdx.y][threadIdx.x * V + i] = acc[i];
  __syncthreads();
  if (threadIdx.y != 0 || j >= n) return;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    A sum = 0;
    for (int y = 0; y < kBiasRows; ++y) sum += sums[y][threadIdx.x * V + i];
    const index_t g = offset_of(e, n) + j + i;
    if (gridDim.z == 1)
      grad[g] = store<T>(load(grad[g]) + sum);
    else
      part[static_cast<index_t>(blockIdx.z) * E * n + g] = sum;
  }
}
template <class T>
__global__ void bias_grad_chunks(const cuda_acc_t<T>* __restrict__ part, int chunks,
                                 T* __restrict__ grad, index_t total) {
  for (index_t g = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; g < total;
       g += static_cast<index_t>(gridDim.x) * blockDim.x) {
    cuda_acc_t<T> sum = 0;
    for (int c = 0; c < chunks; ++c) sum += part[c * total + g];
    grad[g] = store<T>(load(grad[g]) + sum);
  }
}

void launch_bias_grad(const void* m, const index_t* off, void* grad, index_t E, index_t n,
                      DType dtype, cudaStream_t stream) {
  if (E == 0 || n == 0) return;
  SY_CHECK(E <= 65535, "experts: at most 65535 experts per layer on CUDA, got ", E);
  dispatch_float_cuda(dtype, "bias_grad", [&](auto tag) {
    using T = decltype(tag);
    with_pack_width<T>(n, {m, grad}, [&](auto v) {
      const index_t slabs = (n + 32 * v() - 1) / (32 * v());
      // Enough blocks for four per multiprocessor, in chunks of the experts' rows.
      const index_t want = 4 * static_cast<index_t>(multiprocessor_count());
      const int chunks = static_cast<int>(std::clamp<index_t>(want / (slabs * E), 1, 64));
      std::shared_ptr<void> part;
      if (chunks > 1) {
        int device = 0;
        SY_CUDA_CHECK(cudaGetDevice(&device));
        part = allocate(static_cast<std::size_t>(chunks) * E * n * sizeof(cuda_acc_t<T>),
                        Device::cuda(device));
      }
      const dim3 blocks(static_cast<unsigned>(slabs), static_cast<unsigned>(E), chunks);
      bias_grad<T, v()><<<blocks, dim3(32, kBiasRows), 0, stream>>>(
          static_cast<const T*>(m), off, static_cast<T*>(grad),
          static_cast<cuda_acc_t<T>*>(part.get()), E, n);
      SY_CUDA_CHECK_LAUNCH();
      if (chunks > 1) {
        bias_grad_chunks<T><<<stride_grid(E * n), kStrideThreads, 0, stream>>>(
            static_cast<const cuda_acc_t<T>*>(part.get()), chunks, static_cast<T*>(grad), E * n);
        SY_CUDA_CHECK_LAUNCH();
      }
    });
  });
}

// Whether the unequal-rows GEMMs of a bf16/f16 layer run on the grouped kernel: sizes that are
// multiples of 8, and experts that are not coarse for the grouped kernel the device runs.
// The rule reads only host-side sizes (the mean rows per expert), never the offsets.
template <class T>
bool use_grouped_gemm(index_t rows, index_t num_experts, index_t d, index_t h1) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    if (d % 8 != 0 || h1 % 8 != 0 || num_experts < 2) return false;
    const double flops_per_expert = 2.0 * static_cast<double>(rows) / num_experts * d * h1;
    return flops_per_expert <
           (grouped_gemm_uses_wgmma() ? kCoarseExpertFlopsWgmma : kCoarseExpertFlops);
  } else {
    return false;
  }
}

// The grouped GEMMs for the types they support (only called when use_grouped_gemm<T> holds).
template <class T>
void grouped_varying_m(const T* a, const T* b, bool trans_b, T* c, const index_t* off, index_t E,
                       index_t R, index_t n, index_t k, cudaStream_t stream,
                       const T* bias = nullptr, bool relu = false, const T* mask = nullptr) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>)
    grouped_gemm_varying_m_cuda(a, b, trans_b, c, off, E, R, n, k, stream, bias, relu, mask);
  else
    SY_ASSERT(false, "no grouped GEMM for this dtype");
}
template <class T>
void grouped_varying_k(const T* a, const T* b, T* c, const index_t* off, index_t E, index_t R,
                       index_t m, index_t n, double beta, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>)
    grouped_gemm_varying_k_cuda(a, b, c, off, E, R, m, n, beta, stream);
  else
    SY_ASSERT(false, "no grouped GEMM for this dtype");
}

// row_expert[r] = the expert e with off[e] <= r < off[e+1] (binary search; offsets on the device).
__global__ void rows_to_experts(const index_t* __restrict__ off, index_t E, index_t R,
                                index_t* __restrict__ row_expert) {
  for (index_t r = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; r < R;
       r += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t lo = 0, hi = E - 1;  // the last e with off[e] <= r
    while (lo < hi) {
      const index_t mid = (lo + hi + 1) / 2;
      if (off[mid] <= r)
        lo = mid;
      else
        hi = mid - 1;
    }
    row_expert[r] = lo;
  }
}

// Runs op(e, r0, n) per expert, or once as a batch when all experts have equal rows.
template <class F>
void per_expert(const std::vector<index_t>& off, F&& f) {
  const index_t E = static_cast<index_t>(off.size()) - 1;
  if (E > 1 && equal_rows(off)) {
    f(index_t{0}, off[0], off[1] - off[0], E);
    return;
  }
  for (index_t e = 0; e < E; ++e) f(e, off[e], off[e + 1] - off[e], index_t{1});
}

// The forward GEMMs off the grouped path, C [n, cols] = A [n, k] · op(B_e) + bias_e, then relu
// where asked: bias and relu in cuBLASLt's epilogue for f16, bf16 and f32; f64 has neither
// (its caller's kernels add them). b_e: expert e's [cols, k] (tb) or [k, cols] matrix, batch of
// them a matrix apart (the padded layout), as are a, c and the [cols] biases.
template <class T>
void forward_gemm(cublasHandle_t h, int device, cudaStream_t stream, bool tb, index_t n,
                  index_t cols, index_t k, const T* a, const T* b_e, T* c, index_t batch,
                  const T* bias_e, bool relu) {
  const index_t ldb = tb ? k : cols;
  if constexpr (std::is_same_v<T, double>) {
    SY_ASSERT(!bias_e && !relu, "f64 GEMMs have no epilogue");
    gemm<T>(h, false, tb, n, cols, k, a, k, n * k, b_e, ldb, cols * k, 0.0, c, cols, n * cols,
            batch);
  } else {
    gemm_epilogue<T>(device, stream, false, tb, n, cols, k, a, k, n * k, b_e, ldb, cols * k, c,
                     cols, n * cols, batch, GemmEpilogue{bias_e, cols, relu});
  }
}

bool every_expert_has_rows(const std::vector<index_t>& off) {
  for (std::size_t e = 0; e + 1 < off.size(); ++e)
    if (off[e + 1] <= off[e]) return false;
  return true;
}

// The beta of a weight-gradient GEMM into p.grad: 1 (accumulate) where the gradient exists; an
// unset one is created, empty for a GEMM that writes every element (beta 0), else zeros.
double weight_grad_beta(Parameter& p, bool written_whole) {
  if (p.grad.defined()) return 1.0;
  if (!written_whole) {
    grad_to_accumulate(p);
    return 1.0;
  }
  p.grad = Tensor::empty(p.value.sizes(), p.value.dtype(), p.value.device());
  return 0.0;
}

}  // namespace

bool ffn_cuda_grouped(const FfnShape& s, index_t rows) {
  const index_t h1 = is_gated(s.activation) ? 2 * s.hidden_size : s.hidden_size;
  return dispatch_float_cuda(s.dtype, "ffn_cuda_grouped", [&](auto tag) {
    return use_grouped_gemm<decltype(tag)>(rows, s.num_experts, s.model_dim, h1) &&
           s.out_dim() % 8 == 0;  // the grouped kernel's alignment, as use_grouped_gemm asks of d
  });
}

Tensor ffn_forward_cuda(const FfnShape& s, const Parameter& fc1_w, const Parameter& fc2_w,
                        const Parameter& fc1_b, const Parameter& fc2_b, const Tensor& rows,
                        const Tensor& offsets, std::vector<index_t> off, FfnExperts::Saved& saved) {
  const Device dev = rows.device();
  DeviceScope scope(dev.index);
  const cudaStream_t stream = as_cuda_stream(current_stream(dev).handle);
  cublasHandle_t h = cublas_handle(dev.index, stream);
  const index_t R = rows.size(0), d = s.model_dim, hid = s.hidden_size, E = s.num_experts;
  const index_t o = s.out_dim();
  const bool gated = is_gated(s.activation);
  const index_t h1 = gated ? 2 * hid : hid;
  const Tensor x = rows.contiguous();
  // Padded rows (all experts equal) run as one strided-batched GEMM, which beats the grouped
  // kernel; that needs the host offsets, as does one GEMM per expert.
  const bool grouped = ffn_cuda_grouped(s, R) && (off.empty() || !equal_rows(off));
  SY_ASSERT(grouped || !off.empty(), "ffn_forward_cuda: host offsets needed");
  // relu's derivative reads off its output (act > 0 exactly where the pre-activation is > 0,
  // both stored in T), so relu experts keep act alone. The GEMMs' epilogues add the biases and
  // apply relu (the grouped kernel's, or cuBLASLt's for all but f64), and for relu the
  // pre-activation never exists.
  const bool relu = !gated && s.activation == Activation::kRelu;
  const bool epilogues = grouped || s.dtype != DType::kF64;
  const bool fused_act = epilogues && relu;
  Tensor hpre = fused_act ? Tensor() : Tensor::empty({R, h1}, s.dtype, dev);
  Tensor act = Tensor::empty({R, hid}, s.dtype, dev), y = Tensor::empty({R, o}, s.dtype, dev);
  const Tensor off_dev = offsets.to(dev).contiguous();  // a copy only for host offsets
  const Tensor row_expert = Tensor::empty({R}, DType::kI64, dev);
  if (R > 0) {
    rows_to_experts<<<stride_grid(R), kStrideThreads, 0, stream>>>(off_dev.data<index_t>(), E, R,
                                                                   row_expert.data<index_t>());
    SY_CUDA_CHECK_LAUNCH();
  }
  dispatch_float_cuda(s.dtype, "ffn_forward_cuda", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* w1 = static_cast<const T*>(fc1_w.value.data_ptr());
    const T* w2 = static_cast<const T*>(fc2_w.value.data_ptr());
    const T* b1 = fc1_b.value.defined() ? static_cast<const T*>(fc1_b.value.data_ptr()) : nullptr;
    const T* b2 = fc2_b.value.defined() ? static_cast<const T*>(fc2_b.value.data_ptr()) : nullptr;
    T* hp = hpre.defined() ? static_cast<T*>(hpre.data_ptr()) : nullptr;
    T* ap = static_cast<T*>(act.data_ptr());
    T* yp = static_cast<T*>(y.data_ptr());
    if (grouped) {  // h = x · fc1_wᵀ + b1 (and relu), fc1_w [E, h1, d]
      grouped_varying_m<T>(xp, w1, true, fused_act ? ap : hp, off_dev.data<index_t>(), E, R, h1, d,
                           stream, b1, fused_act);
    } else {
      per_expert(off, [&](index_t e, index_t r0, index_t n, index_t batch) {  // h = x · fc1_wᵀ
        forward_gemm<T>(h, dev.index, stream, true, n, h1, d, xp + offset_of(r0, d),
                        w1 + offset_of(e, h1 * d), (fused_act ? ap : hp) + offset_of(r0, h1), batch,
                        epilogues && b1 ? b1 + offset_of(e, h1) : nullptr, fused_act);
      });
    }
    if (R > 0 && !fused_act) {
      const T* bias = epilogues ? nullptr : b1;  // else the GEMM's epilogue added it
      with_pack_width<T>(hid, {hp, ap, bias}, [&](auto v) {
        const RowBlocks rb = row_blocks(R, hid, v());
        bias_activation<T, v()><<<rb.grid, rb.block, 0, stream>>>(
            hp, ap, bias, row_expert.data<index_t>(), R, hid, gated, base_activation(s.activation));
      });
      SY_CUDA_CHECK_LAUNCH();
    }
    if (grouped) {  // y = act · fc2_w + b2, fc2_w [E, hid, o]
      grouped_varying_m<T>(ap, w2, false, yp, off_dev.data<index_t>(), E, R, o, hid, stream, b2);
    } else {
      per_expert(off, [&](index_t e, index_t r0, index_t n, index_t batch) {  // y = act · fc2_w
        forward_gemm<T>(h, dev.index, stream, false, n, o, hid, ap + offset_of(r0, hid),
                        w2 + offset_of(e, hid * o), yp + offset_of(r0, o), batch,
                        epilogues && b2 ? b2 + offset_of(e, o) : nullptr, false);
      });
    }
    if (b2 && !epilogues && R > 0) {
      with_pack_width<T>(o, {yp, b2}, [&](auto v) {
        const RowBlocks rb = row_blocks(R, o, v());
        add_bias<T, v()>
            <<<rb.grid, rb.block, 0, stream>>>(yp, b2, row_expert.data<index_t>(), R, o);
      });
      SY_CUDA_CHECK_LAUNCH();
    }
  });
  saved = FfnExperts::Saved{x, relu ? act : hpre, act, std::move(off), off_dev, grouped};
  return y;
}

Tensor ffn_backward_cuda(const FfnShape& s, Parameter& fc1_w, Parameter& fc2_w, Parameter& fc1_b,
                         Parameter& fc2_b, Tensor dy_in, FfnExperts::Saved sv) {
  const Device dev = dy_in.device();
  DeviceScope scope(dev.index);
  const cudaStream_t stream = as_cuda_stream(current_stream(dev).handle);
  cublasHandle_t h = cublas_handle(dev.index, stream);
  const index_t R = sv.x.size(0), d = s.model_dim, hid = s.hidden_size, E = s.num_experts;
  const index_t o = s.out_dim();
  const bool gated = is_gated(s.activation);
  const index_t h1 = gated ? 2 * hid : hid;
  const std::vector<index_t>& off = sv.offsets;
  const bool grouped = sv.grouped;
  Tensor dy = dy_in.to(s.dtype).contiguous();
  dy_in = Tensor();
  // Each buffer is freed once its last reader is queued (stream-ordered; dy after fc2's backward,
  // so it is gone before dx exists when the caller handed it over), and dh is computed in place
  // (over da, or over the gated pre-activation, the same shape), so that at most x, h, a, dy and
  // one gradient buffer are alive at once.
  Tensor da = Tensor::empty({R, hid}, s.dtype, dev), dh, dx;
  const Tensor off_dev = sv.device_offsets;
  // An unset weight gradient (MoELayer::zero_grad(true)) is created here and written (beta 0)
  // instead of added to zeros: by the grouped kernel (which writes empty experts' zeros too), or
  // by one GEMM per expert when every expert has rows (else it starts at zero). fc1's is created
  // only once fc2's backward has freed act and da, as torch's autograd does, which keeps the
  // peak down by the size of one hidden activation.
  const bool written_whole = grouped ? R > 0 : every_expert_has_rows(off);
  const double beta2 = weight_grad_beta(fc2_w, written_whole);
  dispatch_float_cuda(s.dtype, "ffn_backward_cuda", [&](auto tag) {
    using T = decltype(tag);
    const T* dyp = static_cast<const T*>(dy.data_ptr());
    const T* xp = static_cast<const T*>(sv.x.data_ptr());
    const T* hp = static_cast<const T*>(sv.h.data_ptr());
    const T* ap = static_cast<const T*>(sv.a.data_ptr());
    const T* w1 = static_cast<const T*>(fc1_w.value.data_ptr());
    const T* w2 = static_cast<const T*>(fc2_w.value.data_ptr());
    T* g2 = static_cast<T*>(fc2_w.grad.data_ptr());
    T* dap = static_cast<T*>(da.data_ptr());
    const index_t* offp = off_dev.data<index_t>();
    // relu's backward on the grouped path: the da GEMM's epilogue zeroes where act is not
    // positive (the forward fused relu too), so da is dh already.
    const bool fused_act = grouped && !gated && s.activation == Activation::kRelu;
    if (grouped) {  // da = dy · fc2_wᵀ ; d fc2_w += actᵀ · dy
      grouped_varying_m<T>(dyp, w2, true, dap, offp, E, R, hid, o, stream, nullptr, false,
                           fused_act ? ap : nullptr);
      grouped_varying_k<T>(ap, dyp, g2, offp, E, R, hid, o, beta2, stream);
    } else {
      per_expert(off, [&](index_t e, index_t r0, index_t n, index_t batch) {
        // da = dy · fc2_wᵀ ; d fc2_w += actᵀ · dy
        gemm<T>(h, false, true, n, hid, o, dyp + offset_of(r0, o), o, n * o,
                w2 + offset_of(e, hid * o), o, hid * o, 0.0, dap + offset_of(r0, hid), hid, n * hid,
                batch);
        gemm<T>(h, true, false, hid, o, n, ap + offset_of(r0, hid), hid, n * hid,
                dyp + offset_of(r0, o), o, n * o, beta2, g2 + offset_of(e, hid * o), o, hid * o,
                batch);
      });
    }
    if (fc2_b.value.defined())
      launch_bias_grad(dyp, offp, fc2_b.grad.data_ptr(), E, o, s.dtype, stream);
    dy = Tensor();
    sv.a = Tensor();
    dh = gated ? sv.h : da;  // in place: sv.h and da have no other reader
    T* dhp = static_cast<T*>(dh.data_ptr());
    if (R > 0 && !fused_act) {
      with_pack_width<T>(hid, {dap, hp, dhp}, [&](auto v) {
        const RowBlocks rb = row_blocks(R, hid, v());
        activation_backward<T, v()><<<rb.grid, rb.block, 0, stream>>>(
            dap, hp, dhp, R, hid, gated, base_activation(s.activation));
      });
      SY_CUDA_CHECK_LAUNCH();
    }
    da = Tensor();
    sv.h = Tensor();
    const double beta1 = weight_grad_beta(fc1_w, written_whole);
    T* g1 = static_cast<T*>(fc1_w.grad.data_ptr());
    dx = Tensor::empty({R, d}, s.dtype, dev);
    T* dxp = static_cast<T*>(dx.data_ptr());
    if (grouped) {  // d fc1_w += dhᵀ · x ; dx = dh · fc1_w
      grouped_varying_k<T>(dhp, xp, g1, offp, E, R, h1, d, beta1, stream);
      grouped_varying_m<T>(dhp, w1, false, dxp, offp, E, R, d, h1, stream);
    } else {
      per_expert(off, [&](index_t e, index_t r0, index_t n, index_t batch) {
        // d fc1_w += dhᵀ · x ; dx = dh · fc1_w
        gemm<T>(h, true, false, h1, d, n, dhp + offset_of(r0, h1), h1, n * h1,
                xp + offset_of(r0, d), d, n * d, beta1, g1 + offset_of(e, h1 * d), d, h1 * d,
                batch);
        gemm<T>(h, false, false, n, d, h1, dhp + offset_of(r0, h1), h1, n * h1,
                w1 + offset_of(e, h1 * d), d, h1 * d, 0.0, dxp + offset_of(r0, d), d, n * d, batch);
      });
    }
    if (fc1_b.value.defined())
      launch_bias_grad(dhp, offp, fc1_b.grad.data_ptr(), E, h1, s.dtype, stream);
  });
  return dx;
}

}  // namespace switchyard
