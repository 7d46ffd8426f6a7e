#include "switchyard/tensor.h"

#include <algorithm>

#include "core/allocator.h"
#include "core/dtype_dispatch.h"
#include "switchyard/error.h"

#ifdef SY_WITH_CUDA
#include "core/device_cuda.h"
#endif

namespace switchyard {
namespace {

Shape contiguous_strides(const Shape& sizes) {
  Shape strides(sizes.size());
  index_t s = 1;
  for (int d = static_cast<int>(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = s;
    s = checked_mul(s, std::max<index_t>(sizes[d], 1));
  }
  return strides;
}

// Calls f(offset) with the element offset of every element of (sizes, strides), row-major order.
template <class F>
void for_each_offset(const Shape& sizes, const Shape& strides, F&& f) {
  const int nd = static_cast<int>(sizes.size());
  for (index_t s : sizes)
    if (s == 0) return;
  Shape idx(nd, 0);
  index_t off = 0;
  while (true) {
    f(off);
    int d = nd - 1;
    for (; d >= 0; --d) {
      if (++idx[d] < sizes[d]) {
        off += strides[d];
        break;
      }
      off -= (sizes[d] - 1) * strides[d];
      idx[d] = 0;
    }
    if (d < 0) return;
  }
}

void check_cpu(const Tensor& t, const char* op) {
  SY_CHECK(t.device().is_cpu(), op, ": expected a CPU tensor, got one on ", to_string(t.device()));
}

}  // namespace

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

Tensor Tensor::empty(const Shape& sizes, DType dtype, Device device) {
  Tensor t;
  const index_t n = checked_numel(sizes);
  t.storage_ = allocate(static_cast<std::size_t>(checked_mul(n, dtype_size(dtype))), device);
  t.sizes_ = sizes;
  t.strides_ = contiguous_strides(sizes);
  t.dtype_ = dtype;
  t.device_ = device;
  return t;
}

Tensor Tensor::zeros(const Shape& sizes, DType dtype, Device device) {
  Tensor t = empty(sizes, dtype, device);
  t.fill(0.0);
  return t;
}

Tensor Tensor::from_blob(void* data, const Shape& sizes, const Shape& strides, DType dtype,
                         Device device) {
  SY_CHECK(strides.empty() || strides.size() == sizes.size(), "from_blob: ", strides.size(),
           " strides given for ", sizes.size(), " dimensions");
  checked_numel(sizes);
  SY_CHECK(data != nullptr || checked_numel(sizes) == 0,
           "from_blob: null data for a non-empty shape");
  Tensor t;
  static char empty_storage;
  t.storage_ = std::shared_ptr<void>(data ? data : &empty_storage, [](void*) {});
  t.sizes_ = sizes;
  t.strides_ = strides.empty() ? contiguous_strides(sizes) : strides;
  t.dtype_ = dtype;
  t.device_ = device;
  return t;
}

Tensor Tensor::from_vector(const std::vector<double>& values, const Shape& sizes, DType dtype) {
  SY_CHECK(static_cast<index_t>(values.size()) == checked_numel(sizes),
           "from_vector: ", values.size(), " values for shape ", shape_str(sizes));
  Tensor src = from_blob(const_cast<double*>(values.data()), sizes, {}, DType::kF64);
  Tensor t = empty(sizes, dtype);
  t.copy_from(src);
  return t;
}

index_t Tensor::size(int d) const {
  const int nd = dim();
  SY_CHECK(d >= -nd && d < nd, "dimension ", d, " out of range for a ", nd, "-d tensor");
  return sizes_[d < 0 ? d + nd : d];
}

index_t Tensor::stride(int d) const {
  const int nd = dim();
  SY_CHECK(d >= -nd && d < nd, "dimension ", d, " out of range for a ", nd, "-d tensor");
  return strides_[d < 0 ? d + nd : d];
}

index_t Tensor::numel() const { return defined() ? checked_numel(sizes_) : 0; }

bool Tensor::is_contiguous() const {
  index_t expected = 1;
  for (int d = dim() - 1; d >= 0; --d) {
    if (sizes_[d] == 1) continue;
    if (strides_[d] != expected) return numel() == 0;
    expected *= sizes_[d];
  }
  return true;
}

void* Tensor::data_ptr() const {
  if (!storage_) return nullptr;
  return static_cast<char*>(storage_.get()) + offset_ * static_cast<index_t>(dtype_size(dtype_));
}

void Tensor::check_element_type(std::size_t size, int tag) const {
  SY_CHECK(defined(), "data(): the tensor is undefined");
  SY_CHECK(tag < 0 ? true : tag == static_cast<int>(dtype_), "data(): the tensor holds ",
           dtype_name(dtype_), ", read as another type");
  (void)size;
}

Tensor Tensor::narrow(int d, index_t start, index_t length) const {
  const index_t n = size(d);
  SY_CHECK(start >= 0 && length >= 0 && start + length <= n, "narrow: [", start, ", ",
           start + length, ") is out of range for a dimension of size ", n);
  Tensor t = *this;
  const int dd = d < 0 ? d + dim() : d;
  t.offset_ += start * strides_[dd];
  t.sizes_[dd] = length;
  return t;
}

Tensor Tensor::select(int d, index_t i) const {
  const int dd = d < 0 ? d + dim() : d;
  Tensor t = narrow(dd, i, 1);
  t.sizes_.erase(t.sizes_.begin() + dd);
  t.strides_.erase(t.strides_.begin() + dd);
  return t;
}

Tensor Tensor::view(const Shape& sizes) const {
  SY_CHECK(is_contiguous(), "view: the tensor is not contiguous; use reshape()");
  Shape s = sizes;
  index_t known = 1;
  int infer = -1;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == -1) {
      SY_CHECK(infer < 0, "view: only one size may be -1");
      infer = static_cast<int>(i);
    } else {
      SY_CHECK(s[i] >= 0, "view: sizes must be >= 0 or -1, got ", s[i]);
      known = checked_mul(known, s[i]);
    }
  }
  if (infer >= 0) {
    SY_CHECK(known > 0 && numel() % known == 0, "view: cannot infer a size to view ",
             shape_str(sizes_), " as ", shape_str(sizes));
    s[infer] = numel() / known;
  }
  SY_CHECK(checked_numel(s) == numel(), "view: shape ", shape_str(sizes), " does not match ",
           numel(), " elements of shape ", shape_str(sizes_));
  Tensor t = *this;
  t.sizes_ = s;
  t.strides_ = contiguous_strides(s);
  return t;
}

Tensor Tensor::reshape(const Shape& sizes) const { return contiguous().view(sizes); }

Tensor Tensor::contiguous() const { return is_contiguous() ? *this : clone(); }

Tensor Tensor::clone() const {
  Tensor t = empty(sizes_, dtype_, device_);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return *this;
  Tensor t = empty(sizes_, dtype, device_);
  t.copy_from(*this);
  return t;
}

#ifdef SY_WITH_CUDA
namespace {

// Copies involving a CUDA tensor, on the current stream. The CUDA side must be contiguous;
// dtype conversion runs on the host side, or in a kernel between two CUDA tensors.
void copy_with_cuda(Tensor& dst, const Tensor& src) {
  const Device dev = dst.device().is_cuda() ? dst.device() : src.device();
  void* stream = current_stream(dev).handle;
  const std::size_t bytes = static_cast<std::size_t>(dst.numel()) * dtype_size(dst.dtype());
  if (dst.device().is_cuda() && src.device().is_cuda()) {
    SY_CHECK(dst.device() == src.device(), "copy_from: ", to_string(src.device()), " to ",
             to_string(dst.device()), " is not supported; copy through the host");
    if (!dst.is_contiguous() || !src.is_contiguous()) {
      cuda::convert_strided(src.data_ptr(), src.dtype(), src.strides().data(), dst.data_ptr(),
                            dst.dtype(), dst.strides().data(), dst.sizes().data(), dst.dim(),
                            dev.index, stream);
    } else if (dst.dtype() == src.dtype()) {
      cuda::copy(dst.data_ptr(), src.data_ptr(), bytes, cuda::CopyKind::kDeviceToDevice, dev.index,
                 stream);
    } else {
      cuda::convert(src.data_ptr(), src.dtype(), dst.data_ptr(), dst.dtype(), dst.numel(),
                    dev.index, stream);
    }
  } else if (dst.device().is_cuda()) {
    if (!dst.is_contiguous()) {  // through a contiguous device copy
      dst.copy_from(src.to(dst.dtype()).to(dst.device()));
      return;
    }
    const Tensor host = src.to(dst.dtype()).contiguous();
    cuda::copy(dst.data_ptr(), host.data_ptr(), bytes, cuda::CopyKind::kHostToDevice, dev.index,
               stream);
  } else {
    if (!src.is_contiguous()) {  // through a contiguous device copy
      dst.copy_from(src.contiguous());
      return;
    }
    Tensor host = Tensor::empty(src.sizes(), src.dtype());
    cuda::copy(host.data_ptr(), src.data_ptr(),
               static_cast<std::size_t>(src.numel()) * dtype_size(src.dtype()),
               cuda::CopyKind::kDeviceToHost, dev.index, stream);
    dst.copy_from(host);
  }
}

}  // namespace
#endif

Tensor Tensor::to(Device device) const {
  if (device == device_) return *this;
  Tensor t = empty(sizes_, dtype_, device);
  t.copy_from(*this);
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  SY_CHECK(defined() && src.defined(), "copy_from: undefined tensor");
  SY_CHECK(sizes_ == src.sizes_, "copy_from: shape ", shape_str(src.sizes_), " into shape ",
           shape_str(sizes_));
#ifdef SY_WITH_CUDA
  if (device_.is_cuda() || src.device_.is_cuda()) {
    if (numel() > 0) copy_with_cuda(*this, src);
    return;
  }
#endif
  check_cpu(*this, "copy_from");
  check_cpu(src, "copy_from");
  dispatch_any(dtype_, "copy_from", [&]<class D>() {
    dispatch_any(src.dtype_, "copy_from", [&]<class S>() {
      D* dst = static_cast<D*>(data_ptr());
      const S* s = static_cast<const S*>(src.data_ptr());
      if (is_contiguous() && src.is_contiguous()) {
        const index_t n = numel();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
        for (index_t i = 0; i < n; ++i) dst[i] = store<D>(load(s[i]));
        return;
      }
      // Walk both in row-major order: gather the source offsets, then write.
      std::vector<index_t> src_offsets;
      src_offsets.reserve(static_cast<std::size_t>(numel()));
      for_each_offset(src.sizes_, src.strides_, [&](index_t o) { src_offsets.push_back(o); });
      std::size_t i = 0;
      for_each_offset(sizes_, strides_,
                      [&](index_t o) { dst[o] = store<D>(load(s[src_offsets[i++]])); });
    });
  });
}

void Tensor::fill(double value) {
#ifdef SY_WITH_CUDA
  if (device_.is_cuda()) {
    SY_CHECK(is_contiguous(), "fill: strided CUDA tensors are not supported yet");
    cuda::fill(data_ptr(), dtype_, value, numel(), device_.index, current_stream(device_).handle);
    return;
  }
#endif
  check_cpu(*this, "fill");
  dispatch_any(dtype_, "fill", [&]<class D>() {
    D* dst = static_cast<D*>(data_ptr());
    const D v = store<D>(value);
    if (is_contiguous()) {
      const index_t n = numel();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (index_t i = 0; i < n; ++i) dst[i] = v;
      return;
    }
    for_each_offset(sizes_, strides_, [&](index_t o) { dst[o] = v; });
  });
}

std::vector<double> Tensor::to_vector() const {
  if (!defined()) return {};
#ifdef SY_WITH_CUDA
  if (device_.is_cuda()) {
    Tensor host = Tensor::empty(sizes_, dtype_);
    host.copy_from(contiguous());
    return host.to_vector();
  }
#endif
  check_cpu(*this, "to_vector");
  std::vector<double> out;
  out.reserve(static_cast<std::size_t>(numel()));
  dispatch_any(dtype_, "to_vector", [&]<class S>() {
    const S* s = static_cast<const S*>(data_ptr());
    for_each_offset(sizes_, strides_,
                    [&](index_t o) { out.push_back(static_cast<double>(load(s[o]))); });
  });
  return out;
}

}  // namespace switchyard
