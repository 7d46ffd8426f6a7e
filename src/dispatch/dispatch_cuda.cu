// CUDA launchers for dispatch (kernels in dispatch_kernels.cuh), on the current stream.
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "core/cuda_check.cuh"
#include "dispatch/dispatch.h"
#include "dispatch/dispatch_kernels.cuh"

namespace switchyard {
namespace {

cudaStream_t stream_of(const Tensor& t) {
  return as_cuda_stream(current_stream(t.device()).handle);
}

// Blocks are one per token: the grid's x dimension holds up to 2^31 - 1 of them.
unsigned blocks(index_t n) {
  SY_CHECK(n < 2147483647, "dispatch: ", n, " tokens exceed one CUDA grid");
  return static_cast<unsigned>(n);
}

// Calls f(T{}, A{}, std::integral_constant<int, V>{}) with V from with_pack_width.
template <class F>
void for_types(const Tensor& data, index_t d, std::initializer_list<const void*> ptrs,
               const char* op, F&& f) {
  dispatch_float_cuda(data.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    with_pack_width<T>(d, ptrs, [&](auto v) { f(tag, cuda_acc_t<T>{}, v); });
  });
}

// Zeros in decode_backward's rows that hold no choice: only the padded layout has them (a packed
// plan's rows are exactly its kept choices).
void zero_padding_rows(const RoutingPlan& plan, Tensor& buf) {
  const index_t R = plan.num_rows, d = buf.size(1);
  if (plan.layout == Layout::kPacked || R == 0 || d == 0) return;
  for_types(buf, d, {buf.data_ptr()}, "zero_rows", [&](auto t_tag, auto, auto v) {
    using T = decltype(t_tag);
    const RowBlocks rb = row_blocks(R, d, v());
    kernels::zero_rows<T, v()><<<rb.grid, rb.block, 0, stream_of(buf)>>>(
        plan.row_choice.data<index_t>(), static_cast<T*>(buf.data_ptr()), R, d);
    SY_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

Tensor encode_cuda(const RoutingPlan& plan, const Tensor& x, bool prescore) {
  const index_t R = plan.num_rows, d = x.size(1);
  Tensor buf = Tensor::empty({R, d}, x.dtype(), x.device());
  if (R == 0 || d == 0) return buf;
  DeviceScope scope(x.device().index);
  for_types(x, d, {x.data_ptr(), buf.data_ptr()}, "encode", [&](auto t_tag, auto a_tag, auto v) {
    using T = decltype(t_tag);
    using A = decltype(a_tag);
    const RowBlocks rb = row_blocks(R, d, v());
    kernels::encode<T, A, v()><<<rb.grid, rb.block, 0, stream_of(x)>>>(
        static_cast<const T*>(x.data_ptr()), plan.row_choice.data<index_t>(),
        static_cast<const A*>(plan.weight.data_ptr()), static_cast<T*>(buf.data_ptr()), R, d,
        plan.top_k, prescore);
    SY_CUDA_CHECK_LAUNCH();
  });
  return buf;
}

Tensor decode_cuda(const RoutingPlan& plan, const Tensor& buf, bool postscore) {
  const index_t T = plan.num_tokens, d = buf.size(1);
  Tensor y = Tensor::empty({T, d}, buf.dtype(), buf.device());
  if (T == 0 || d == 0) return y;
  DeviceScope scope(buf.device().index);
  for_types(buf, d, {buf.data_ptr(), y.data_ptr()}, "decode", [&](auto t_tag, auto a_tag, auto v) {
    using T_ = decltype(t_tag);
    using A = decltype(a_tag);
    const RowBlocks rb = row_blocks(T, d, v());
    kernels::decode<T_, A, v()><<<rb.grid, rb.block, 0, stream_of(buf)>>>(
        static_cast<const T_*>(buf.data_ptr()), plan.row.data<index_t>(),
        static_cast<const A*>(plan.weight.data_ptr()), static_cast<T_*>(y.data_ptr()), T, d,
        plan.top_k, postscore);
    SY_CUDA_CHECK_LAUNCH();
  });
  return y;
}

Tensor decode_backward_cuda(const RoutingPlan& plan, const Tensor& dy, const Tensor& buf,
                            bool postscore, Tensor& dweight) {
  const index_t R = plan.num_rows, T = plan.num_tokens, d = dy.size(1);
  Tensor dbuf = Tensor::empty({R, d}, dy.dtype(), dy.device());
  if (R == 0 || d == 0) return dbuf;
  DeviceScope scope(dy.device().index);
  if (T > 0)
    for_types(dy, d, {dy.data_ptr(), buf.data_ptr(), dbuf.data_ptr()}, "decode_backward",
              [&](auto t_tag, auto a_tag, auto v) {
                using T_ = decltype(t_tag);
                using A = decltype(a_tag);
                kernels::decode_backward<T_, A, v()>
                    <<<blocks(T), kernels::kDispatchThreads, 0, stream_of(dy)>>>(
                        static_cast<const T_*>(dy.data_ptr()),
                        static_cast<const T_*>(buf.data_ptr()), plan.row.data<index_t>(),
                        static_cast<const A*>(plan.weight.data_ptr()),
                        static_cast<T_*>(dbuf.data_ptr()), static_cast<A*>(dweight.data_ptr()), d,
                        plan.top_k, postscore);
                SY_CUDA_CHECK_LAUNCH();
              });
  zero_padding_rows(plan, dbuf);
  return dbuf;
}

Tensor encode_backward_cuda(const RoutingPlan& plan, const Tensor& dbuf, const Tensor& x,
                            bool prescore, Tensor& dweight) {
  const index_t T = plan.num_tokens, d = x.size(1);
  Tensor dx = Tensor::empty({T, d}, x.dtype(), x.device());
  if (T == 0 || d == 0) return dx;
  DeviceScope scope(x.device().index);
  for_types(x, d, {dbuf.data_ptr(), x.data_ptr(), dx.data_ptr()}, "encode_backward",
            [&](auto t_tag, auto a_tag, auto v) {
              using T_ = decltype(t_tag);
              using A = decltype(a_tag);
              kernels::encode_backward<T_, A, v()>
                  <<<blocks(T), kernels::kDispatchThreads, 0, stream_of(x)>>>(
                      static_cast<const T_*>(dbuf.data_ptr()), static_cast<const T_*>(x.data_ptr()),
                      plan.row.data<index_t>(), static_cast<const A*>(plan.weight.data_ptr()),
                      static_cast<T_*>(dx.data_ptr()), static_cast<A*>(dweight.data_ptr()), d,
                      plan.top_k, prescore);
              SY_CUDA_CHECK_LAUNCH();
            });
  return dx;
}

}  // namespace switchyard
