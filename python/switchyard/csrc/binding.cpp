// switchyard._C: the C++ MoE layer for PyTorch (CPU, and CUDA in builds with SY_WITH_CUDA). Only
// this file sees Torch.
//
// Tensors cross without copies: a torch tensor becomes a switchyard::Tensor view of the same
// memory (Tensor::from_blob with its sizes, strides, dtype and device), and a switchyard result
// becomes a torch tensor over the same storage (a from_blob whose deleter holds the switchyard
// Tensor). Parameters stay owned by torch: before each forward and backward the caller passes
// them, and the layer's Parameter.value is pointed at their memory; backward starts with the
// gradients unset, creates them, and hands them back.
//
// CUDA: every call into the layer runs on torch's current stream of the layer's device (a
// switchyard::StreamGuard for the call's duration), so it is ordered with the caller's torch work
// like any torch op. Memory switchyard allocates (results, saved activations) comes from its own
// stream-ordered pool on that stream and goes back to the pool on that stream when the last
// owner, torch tensor or layer, lets it go: a result used on another stream needs the same care
// as a torch tensor (Tensor.record_stream has no effect on it; synchronise instead).
//
// Custom gates and experts (any Python callable) plug in through PyGate and PyExperts, which call
// back into Python; the autograd bookkeeping of those callbacks lives in switchyard/moe.py.
#include <torch/extension.h>

#ifdef SY_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/comm.h"  // comm::CommBackend, for the torch.distributed backend
#include "switchyard/switchyard.h"

namespace py = pybind11;
namespace sy = switchyard;

namespace {

sy::DType to_sy_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return sy::DType::kF64;
    case at::kFloat:
      return sy::DType::kF32;
    case at::kHalf:
      return sy::DType::kF16;
    case at::kBFloat16:
      return sy::DType::kBF16;
    case at::kInt:
      return sy::DType::kI32;
    case at::kLong:
      return sy::DType::kI64;
    default:
      throw sy::Error(std::string("switchyard: unsupported torch dtype ") + c10::toString(t) +
                      " (expected float64, float32, float16, bfloat16, int32 or int64)");
  }
}

at::ScalarType to_torch_dtype(sy::DType t) {
  switch (t) {
    case sy::DType::kF64:
      return at::kDouble;
    case sy::DType::kF32:
      return at::kFloat;
    case sy::DType::kF16:
      return at::kHalf;
    case sy::DType::kBF16:
      return at::kBFloat16;
    case sy::DType::kI32:
      return at::kInt;
    case sy::DType::kI64:
      return at::kLong;
  }
  throw sy::Error("switchyard: unknown dtype");
}

#ifdef SY_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif
#ifdef SY_WITH_NCCL
constexpr bool kBuiltWithNccl = true;
#else
constexpr bool kBuiltWithNccl = false;
#endif

sy::Device to_sy_device(const c10::Device& d, const char* what) {
  if (d.is_cpu()) return sy::Device::cpu();
  if (d.is_cuda() && kBuiltWithCuda) return sy::Device::cuda(d.index());
  throw sy::Error(std::string(what) + ": tensor is on " + d.str() + "; this build of the " +
                  "switchyard binding runs on " +
                  (kBuiltWithCuda ? "cpu and cuda" : "the CPU only"));
}

c10::Device to_torch_device(const sy::Device& d) {
  if (d.is_cpu()) return c10::Device(c10::kCPU);
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(d.index));
}

// A view of a torch tensor's memory: no copy, no ownership (the caller keeps `t` alive).
sy::Tensor view_of(const at::Tensor& t, const char* what) {
  if (!t.defined()) throw sy::Error(std::string(what) + ": tensor is undefined");
  const sy::Device device = to_sy_device(t.device(), what);
  const sy::Shape sizes(t.sizes().begin(), t.sizes().end());
  const sy::Shape strides(t.strides().begin(), t.strides().end());
  return sy::Tensor::from_blob(t.data_ptr(), sizes, strides, to_sy_dtype(t.scalar_type()), device);
}

// A torch tensor over a switchyard tensor's storage; the deleter keeps that storage alive.
at::Tensor torch_of(const sy::Tensor& t) {
  if (!t.defined()) return at::Tensor();
  const auto options =
      torch::TensorOptions().dtype(to_torch_dtype(t.dtype())).device(to_torch_device(t.device()));
  const std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  // NOTE: an empty switchyard tensor's data pointer is a host placeholder whatever its device;
  // with nothing to share, a fresh torch tensor stands in.
  if (t.numel() == 0) return torch::empty(sizes, options);
  auto* keep = new sy::Tensor(t);
  const std::vector<int64_t> strides(t.strides().begin(), t.strides().end());
  // target_device: torch need not ask the driver where the pointer lives.
  return at::from_blob(
      t.data_ptr(), sizes, strides, [keep](void*) { delete keep; }, options, options.device());
}

// A switchyard tensor owning a copy of a torch tensor (for results of Python callbacks, whose
// lifetime the layer does not control), on the tensor's device.
sy::Tensor owned_copy_of(const at::Tensor& t, const char* what) {
  const sy::Tensor v = view_of(t, what);
  sy::Tensor out = sy::Tensor::empty(v.sizes(), v.dtype(), v.device());
  out.copy_from(v);
  return out;
}

// For the duration of a call on `device`: on CUDA, torch's current device and stream become
// switchyard's (the device made current, the stream set with a StreamGuard). Nothing on CPU.
class TorchStreamScope {
 public:
  explicit TorchStreamScope(const sy::Device& device) {
#ifdef SY_WITH_CUDA
    if (!device.is_cuda()) return;
    const auto index = static_cast<c10::DeviceIndex>(device.index);
    device_guard_.emplace(index);
    void* handle = c10::cuda::getCurrentCUDAStream(index).stream();
    // NOTE: torch's default stream is the legacy default stream (handle 0), while a null handle
    // means the per-thread default stream to switchyard: name the legacy stream explicitly.
    if (handle == nullptr) handle = static_cast<void*>(cudaStreamLegacy);
    stream_guard_.emplace(sy::Stream{device, handle});
#else
    (void)device;
#endif
  }

  // The stream switchyard sees on `device` now (tests).
  static std::uintptr_t current_handle(const sy::Device& device) {
    return reinterpret_cast<std::uintptr_t>(sy::current_stream(device).handle);
  }

 private:
#ifdef SY_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> device_guard_;
  std::optional<sy::StreamGuard> stream_guard_;
#endif
};

// A gate implemented in Python: forward(x, training) -> logits, backward(dlogits) -> dx.
class PyGate final : public sy::Gate {
 public:
  PyGate(py::object fwd, py::object bwd) : fwd_(std::move(fwd)), bwd_(std::move(bwd)) {}
  ~PyGate() override {
    py::gil_scoped_acquire gil;
    fwd_ = py::object();
    bwd_ = py::object();
  }
  sy::Tensor forward(const sy::Tensor& x, bool training) override {
    py::gil_scoped_acquire gil;
    return owned_copy_of(fwd_(torch_of(x), training).cast<at::Tensor>(), "custom gate output");
  }
  sy::Tensor backward(const sy::Tensor& dlogits) override {
    py::gil_scoped_acquire gil;
    return owned_copy_of(bwd_(torch_of(dlogits)).cast<at::Tensor>(), "custom gate gradient");
  }

 private:
  py::object fwd_, bwd_;
};

// An expert network implemented in Python: forward(rows, offsets, training) -> rows_out,
// backward(drows_out) -> drows. Its parameters are torch's business (parameters() is empty).
class PyExperts final : public sy::ExpertNetwork {
 public:
  PyExperts(py::object fwd, py::object bwd) : fwd_(std::move(fwd)), bwd_(std::move(bwd)) {}
  ~PyExperts() override {
    py::gil_scoped_acquire gil;
    fwd_ = py::object();
    bwd_ = py::object();
  }
  sy::Tensor forward(const sy::Tensor& rows, const sy::Tensor& offsets, bool training) override {
    py::gil_scoped_acquire gil;
    return owned_copy_of(
        fwd_(torch_of(rows), torch_of(offsets.contiguous()), training).cast<at::Tensor>(),
        "custom experts output");
  }
  sy::Tensor backward(const sy::Tensor& drows_out) override {
    py::gil_scoped_acquire gil;
    return owned_copy_of(bwd_(torch_of(drows_out)).cast<at::Tensor>(), "custom experts gradient");
  }
  std::vector<sy::Parameter*> parameters() override { return {}; }

 private:
  py::object fwd_, bwd_;
};

// Expert parallelism on CPU ranks through torch.distributed (gloo): a CommBackend whose
// collectives call a Python object (switchyard.moe._TorchDistOps) that runs them on the caller's
// process group. Buffers cross as torch tensors over the same memory (no copy); byte tensors
// where the backend only knows the element size. Collectives run on the caller's thread
// (threads_ok false: the GIL and torch.distributed's ordering both want that), with the GIL taken
// inside each call, since the layer releases it around forward and backward. No hierarchical
// all-to-all: the algorithms 2dh and pipelined are MPI's own, so every exchange is flat.
class TorchDistBackend final : public sy::comm::CommBackend {
 public:
  TorchDistBackend(py::object ops, int rank, int size)
      : ops_(std::move(ops)), rank_(rank), size_(size) {}
  ~TorchDistBackend() override {
    py::gil_scoped_acquire gil;
    ops_ = py::object();
  }
  const char* name() const override { return "torch.distributed"; }
  sy::Device device() const override { return sy::Device::cpu(); }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_size() const override { return size_; }
  bool hierarchical_ok() const override { return false; }
  bool threads_ok() const override { return false; }

  void all_to_all(const void* send, void* recv, std::int64_t count_per_peer, std::size_t elem_size,
                  sy::A2AAlgorithm) override {
    const std::vector<std::int64_t> counts(size_, count_per_peer);
    all_to_all_v(send, counts.data(), recv, counts.data(), elem_size, sy::A2AAlgorithm::kFlat);
  }
  void all_to_all_v(const void* send, const std::int64_t* send_counts, void* recv,
                    const std::int64_t* recv_counts, std::size_t elem_size,
                    sy::A2AAlgorithm) override {
    const auto es = static_cast<std::int64_t>(elem_size);
    std::vector<std::int64_t> ss(send_counts, send_counts + size_);
    std::vector<std::int64_t> rs(recv_counts, recv_counts + size_);
    for (auto& c : ss) c *= es;
    for (auto& c : rs) c *= es;
    call("all_to_all_v", [&] {
      ops_.attr("all_to_all_v")(bytes(send, total(ss)), ss, bytes(recv, total(rs)), rs);
    });
  }
  void all_gather_v(const void* send, std::int64_t send_count, void* recv,
                    const std::int64_t* recv_counts, std::size_t elem_size) override {
    const auto es = static_cast<std::int64_t>(elem_size);
    std::vector<std::int64_t> rs(recv_counts, recv_counts + size_);
    for (auto& c : rs) c *= es;
    call("all_gather_v", [&] {
      ops_.attr("all_gather_v")(bytes(send, send_count * es), bytes(recv, total(rs)), rs);
    });
  }
  void all_reduce(void* data, std::int64_t count, sy::DType dtype, sy::ReduceOp op) override {
    call("all_reduce", [&] {
      const auto options = torch::TensorOptions().dtype(to_torch_dtype(dtype));
      at::Tensor t =
          count == 0 ? torch::empty({0}, options) : at::from_blob(data, {count}, options);
      ops_.attr("all_reduce")(t, op == sy::ReduceOp::kSum ? "sum" : "max");
    });
  }
  void barrier() override {
    call("barrier", [&] { ops_.attr("barrier")(); });
  }

 private:
  static std::int64_t total(const std::vector<std::int64_t>& v) {
    std::int64_t n = 0;
    for (std::int64_t c : v) n += c;
    return n;
  }
  // A uint8 torch tensor over n bytes at p (gloo's all_to_all_single takes uint8).
  static at::Tensor bytes(const void* p, std::int64_t n) {
    const auto options = torch::TensorOptions().dtype(at::kByte);
    if (n == 0 || p == nullptr) return torch::empty({0}, options);
    return at::from_blob(const_cast<void*>(p), {n}, options);
  }
  // Runs a Python collective with the GIL; a Python exception becomes a switchyard::Error (so it
  // crosses the C++ layer without holding Python state) naming the collective.
  template <class F>
  void call(const char* what, F&& f) {
    py::gil_scoped_acquire gil;
    try {
      f();
    } catch (py::error_already_set& e) {
      throw sy::Error(std::string("switchyard: torch.distributed ") + what + " failed on rank " +
                      std::to_string(rank_) + ": " + e.what());
    }
  }

  py::object ops_;
  int rank_, size_;
};

template <class T>
T take(py::dict& d, const char* key, T fallback) {
  if (!d.contains(key)) return fallback;
  T v = d[key].cast<T>();
  d.attr("pop")(key);
  return v;
}

// MoEConfig from a dict whose keys are MoEConfig's field names; enums as their names.
sy::MoEConfig config_from_dict(py::dict in) {
  py::dict d(in.attr("copy")());
  sy::MoEConfig c;
  c.model_dim = take<int64_t>(d, "model_dim", c.model_dim);
  c.hidden_size = take<int64_t>(d, "hidden_size", c.hidden_size);
  c.num_experts = take<int64_t>(d, "num_experts", c.num_experts);
  c.output_dim = take<int64_t>(d, "output_dim", c.output_dim);
  c.top_k = take<int>(d, "top_k", c.top_k);
  c.dtype = sy::parse_dtype(take<std::string>(d, "dtype", sy::dtype_name(c.dtype)));
  c.seed = take<uint64_t>(d, "seed", c.seed);
  c.init_parameters = take<bool>(d, "init_parameters", c.init_parameters);
  c.use_tensorcore = take<bool>(d, "use_tensorcore", c.use_tensorcore);
  c.rules = sy::parse_rule_set(take<std::string>(d, "rules", sy::to_string(c.rules)));
  c.gate = sy::parse_gate_type(take<std::string>(d, "gate", sy::to_string(c.gate)));
  c.fp32_gate = take<bool>(d, "fp32_gate", c.fp32_gate);
  c.cosine_proj_dim = take<int64_t>(d, "cosine_proj_dim", c.cosine_proj_dim);
  c.cosine_init_t = take<double>(d, "cosine_init_t", c.cosine_init_t);
  c.gate_noise = take<double>(d, "gate_noise", c.gate_noise);
  c.input_jitter = take<double>(d, "input_jitter", c.input_jitter);
  c.score_fn = sy::parse_score_fn(take<std::string>(d, "score_fn", sy::to_string(c.score_fn)));
  c.pre_softmax = take<bool>(d, "pre_softmax", c.pre_softmax);
  c.normalize_gate = take<bool>(d, "normalize_gate", c.normalize_gate);
  c.scaling_factor = take<double>(d, "scaling_factor", c.scaling_factor);
  c.expert_bias = take<bool>(d, "expert_bias", c.expert_bias);
  c.num_groups = take<int>(d, "num_groups", c.num_groups);
  c.topk_groups = take<int>(d, "topk_groups", c.topk_groups);
  c.sinkhorn = take<bool>(d, "sinkhorn", c.sinkhorn);
  c.sinkhorn_max_iters = take<int>(d, "sinkhorn_max_iters", c.sinkhorn_max_iters);
  c.sinkhorn_tol = take<double>(d, "sinkhorn_tol", c.sinkhorn_tol);
  c.capacity_factor = take<double>(d, "capacity_factor", c.capacity_factor);
  c.batch_prioritized_routing =
      take<bool>(d, "batch_prioritized_routing", c.batch_prioritized_routing);
  c.drop_policy =
      sy::parse_drop_policy(take<std::string>(d, "drop_policy", sy::to_string(c.drop_policy)));
  c.layout = sy::parse_layout(take<std::string>(d, "layout", sy::to_string(c.layout)));
  c.overlap_degree = take<int>(d, "overlap_degree", c.overlap_degree);
  c.is_postscore = take<bool>(d, "is_postscore", c.is_postscore);
  c.aux_loss = sy::parse_aux_loss(take<std::string>(d, "aux_loss", sy::to_string(c.aux_loss)));
  c.seq_len = take<int64_t>(d, "seq_len", c.seq_len);
  c.activation =
      sy::parse_activation(take<std::string>(d, "activation", sy::to_string(c.activation)));
  c.has_fc1_bias = take<bool>(d, "has_fc1_bias", c.has_fc1_bias);
  c.has_fc2_bias = take<bool>(d, "has_fc2_bias", c.has_fc2_bias);
  c.shared_expert_hidden = take<int64_t>(d, "shared_expert_hidden", c.shared_expert_hidden);
  c.device = sy::parse_device(take<std::string>(d, "device", sy::to_string(c.device)));
  if (py::len(d) > 0) {
    std::string names;
    for (auto kv : d) names += (names.empty() ? "" : ", ") + kv.first.cast<std::string>();
    throw sy::Error("switchyard config: unknown keys: " + names);
  }
  return c;
}

class Layer {
 public:
  // Expert parallelism, at most one of: dist_ops, the Python collectives of the caller's process
  // group (an object with rank and size attributes and the methods TorchDistBackend calls; CPU
  // layers), or comm, a Communicator (nccl_communicator(); CUDA layers). Neither: one process.
  Layer(py::dict cfg, py::object gate_fwd, py::object gate_bwd, py::object experts_fwd,
        py::object experts_bwd, py::object dist_ops, py::object comm_obj) {
    std::shared_ptr<sy::Gate> gate;
    std::shared_ptr<sy::ExpertNetwork> experts;
    if (!gate_fwd.is_none()) gate = std::make_shared<PyGate>(gate_fwd, gate_bwd);
    if (!experts_fwd.is_none()) experts = std::make_shared<PyExperts>(experts_fwd, experts_bwd);
    const sy::MoEConfig config = config_from_dict(cfg);
    device_ = config.device;
    TorchStreamScope scope(device_);  // the layer's buffers are allocated on torch's stream
    std::shared_ptr<sy::Communicator> comm;
    if (!comm_obj.is_none()) {
      SY_CHECK(dist_ops.is_none(),
               "switchyard: a layer takes dist_ops or a communicator, not both");
      comm = comm_obj.cast<std::shared_ptr<sy::Communicator>>();
    } else if (!dist_ops.is_none()) {
      if (!device_.is_cpu())
        throw sy::Error(
            "switchyard: the torch.distributed collectives serve CPU ranks (gloo); "
            "CUDA ranks exchange through an NCCL communicator");
      const int rank = dist_ops.attr("rank").cast<int>();
      const int size = dist_ops.attr("size").cast<int>();
      comm = sy::comm::make_communicator(std::make_unique<TorchDistBackend>(dist_ops, rank, size),
                                         sy::CommOptions{});
    }
    layer_ = std::make_unique<sy::MoELayer>(config, gate, experts, comm);
    params_ = layer_->parameters();
    // The layer's own initial values are never used (torch owns the parameters): free them.
    for (sy::Parameter* p : params_) {
      shapes_.push_back(p->value.sizes());
      dtypes_.push_back(p->value.dtype());
      p->value = sy::Tensor();
      p->grad = sy::Tensor();
    }
  }

  std::vector<std::string> param_names() const {
    std::vector<std::string> n;
    for (const sy::Parameter* p : params_) n.push_back(p->name);
    return n;
  }
  std::vector<std::vector<int64_t>> param_shapes() const {
    return {shapes_.begin(), shapes_.end()};
  }
  std::vector<std::string> param_dtypes() const {
    std::vector<std::string> n;
    for (sy::DType d : dtypes_) n.push_back(sy::dtype_name(d));
    return n;
  }

  // Returns (y, l_aux, l_z, stats). `params` in the order of param_names(), each contiguous with
  // the shape and dtype of param_shapes()/param_dtypes(). l_aux and l_z are 0-dim f64 tensors and
  // stats["tokens_per_expert"] an [E] i64 tensor, all on the layer's device; with host_stats
  // false a CUDA forward makes no host sync, and the statistics the host does not know without
  // one are -1 (ForwardOptions::host_stats).
  py::tuple forward(const at::Tensor& x, const std::vector<at::Tensor>& params,
                    std::optional<double> capacity_factor, std::optional<int> top_k, bool training,
                    std::optional<int> adaptive_r, bool host_stats) {
    TorchStreamScope scope(device_);
    point_values(params);
    sy::ForwardOptions opt;
    opt.capacity_factor = capacity_factor;
    opt.top_k = top_k;
    opt.training = training;
    opt.adaptive_r = adaptive_r;  // layers with a communicator only (the C++ layer checks)
    opt.host_stats = host_stats;
    const sy::Tensor xv = view_of(x, "forward: x");
    sy::ForwardResult r;
    {
      py::gil_scoped_release nogil;
      r = layer_->forward(xv, opt);
    }
    py::dict stats;
    stats["tokens_per_expert"] = torch_of(r.tokens_per_expert);
    stats["dropped_choices"] = r.stats.dropped_choices;
    stats["capacity"] = r.stats.capacity;
    stats["num_rows"] = r.stats.num_rows;
    stats["top_k"] = r.stats.top_k;
    stats["layout"] = std::string(sy::to_string(r.stats.layout));
    return py::make_tuple(torch_of(r.y), torch_of(r.aux_loss), torch_of(r.z_loss), stats);
  }

  // Returns (dx, [grad of each parameter]): the gradient of sum(y * dy) + aux * l_aux + z * l_z
  // for the most recent training forward. aux and z: one-element tensors on the layer's device
  // (autograd's gradients of l_aux and l_z, read there: no host sync), or None for 0.
  py::tuple backward(const at::Tensor& dy, const std::vector<at::Tensor>& params,
                     const std::optional<at::Tensor>& aux, const std::optional<at::Tensor>& z) {
    TorchStreamScope scope(device_);
    point_values(params);
    // The gradients start unset: backward creates them (the experts' weight gradients written
    // by their GEMMs, not added to zeros) and torch receives them without a copy.
    release_grads();
    const sy::Tensor dyv = view_of(dy, "backward: dy");
    // One-element views, alive for the call (view_of does not own the memory).
    const at::Tensor aux1 = aux ? aux->reshape({1}).contiguous() : at::Tensor();
    const at::Tensor z1 = z ? z->reshape({1}).contiguous() : at::Tensor();
    sy::LossWeights weights;
    if (aux1.defined()) weights.aux_tensor = view_of(aux1, "backward: aux");
    if (z1.defined()) weights.z_tensor = view_of(z1, "backward: z");
    sy::Tensor dx;
    try {
      py::gil_scoped_release nogil;
      dx = layer_->backward(dyv, weights);
    } catch (...) {
      release_grads();
      throw;
    }
    std::vector<at::Tensor> grads;
    for (sy::Parameter* p : params_) grads.push_back(torch_of(p->grad));
    release_grads();
    return py::make_tuple(torch_of(dx), grads);
  }

  void update_expert_bias(double rate) {
    TorchStreamScope scope(device_);
    layer_->update_expert_bias(rate);
  }
  at::Tensor expert_bias() const {
    TorchStreamScope scope(device_);
    return torch_of(layer_->expert_bias());
  }
  std::string device() const { return sy::to_string(device_); }
  int64_t num_local_experts() const { return layer_->num_local_experts(); }
  int64_t first_local_expert() const { return layer_->first_local_expert(); }

 private:
  void point_values(const std::vector<at::Tensor>& params) {
    if (params.size() != params_.size())
      throw sy::Error("switchyard: " + std::to_string(params.size()) + " parameters given, the " +
                      "layer has " + std::to_string(params_.size()));
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& t = params[i];
      const std::string& name = params_[i]->name;
      const sy::Shape sizes(t.sizes().begin(), t.sizes().end());
      if (sizes != shapes_[i] || to_sy_dtype(t.scalar_type()) != dtypes_[i] || !t.is_contiguous())
        throw sy::Error("switchyard: parameter " + name + " must be a contiguous " +
                        sy::dtype_name(dtypes_[i]) + " tensor of the layer's shape");
      params_[i]->value = view_of(t, name.c_str());
      if (params_[i]->value.device() != device_)
        throw sy::Error("switchyard: parameter " + name + " is on " + t.device().str() +
                        ", the layer on " + sy::to_string(device_));
    }
  }
  void release_grads() {
    for (sy::Parameter* p : params_) p->grad = sy::Tensor();
  }

  sy::Device device_;
  std::unique_ptr<sy::MoELayer> layer_;
  std::vector<sy::Parameter*> params_;
  std::vector<sy::Shape> shapes_;
  std::vector<sy::DType> dtypes_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "switchyard C++ core for PyTorch";
  // Whether this build runs CUDA tensors (compiled with the CUDA backend).
  m.attr("built_with_cuda") = kBuiltWithCuda;
  static py::exception<sy::Error> error(m, "Error", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const sy::Error& e) {
      error(e.what());
    }
  });

  // The library's own allocator on a device ("cpu", "cuda:0"): the bytes it holds now and the
  // most it has held since the last reset. The layer's internal buffers live there, outside
  // torch's memory statistics.
  auto pool_device = [](const std::string& name) {
    return to_sy_device(c10::Device(name), "memory_stats");
  };
  m.def("memory_stats", [pool_device](const std::string& device) {
    const sy::MemoryStats stats = sy::memory_stats(pool_device(device));
    py::dict d;
    d["current_bytes"] = stats.current_bytes;
    d["peak_bytes"] = stats.peak_bytes;
    return d;
  });
  m.def("reset_peak_memory",
        [pool_device](const std::string& device) { sy::reset_peak_memory(pool_device(device)); });

  // Whether this build has the NCCL backend (CUDA builds that found nccl.h and libnccl).
  m.attr("built_with_nccl") = kBuiltWithNccl;
  py::class_<sy::Communicator, std::shared_ptr<sy::Communicator>>(m, "Communicator")
      .def_property_readonly("rank", &sy::Communicator::rank)
      .def_property_readonly("size", &sy::Communicator::size)
      .def_property_readonly("backend", &sy::Communicator::backend_name);
  // A new ncclUniqueId (128 bytes), made on one rank and sent to the others by the caller.
  m.def("nccl_unique_id", [] { return py::bytes(sy::nccl_unique_id()); });
  // The NCCL communicator of `size` ranks on GPU `device`, from the id every rank received
  // (collective: every rank calls it). Algorithm: 2DH with use_2dh, else flat (Tutel's default).
  m.def(
      "nccl_communicator",
      [](const py::bytes& unique_id, int rank, int size, int device, bool use_2dh) {
        sy::CommOptions options;
        options.cuda_device = device;
        options.algorithm = use_2dh ? sy::A2AAlgorithm::k2DH : sy::A2AAlgorithm::kFlat;
        const std::string id = unique_id;
        py::gil_scoped_release no_gil;  // the ranks meet inside NCCL's initialisation
        return sy::make_nccl_communicator(id, rank, size, options);
      },
      py::arg("unique_id"), py::arg("rank"), py::arg("size"), py::arg("device"),
      py::arg("use_2dh") = false);

  py::class_<Layer>(m, "Layer")
      .def(py::init<py::dict, py::object, py::object, py::object, py::object, py::object,
                    py::object>(),
           py::arg("config"), py::arg("gate_forward") = py::none(),
           py::arg("gate_backward") = py::none(), py::arg("experts_forward") = py::none(),
           py::arg("experts_backward") = py::none(), py::arg("dist_ops") = py::none(),
           py::arg("comm") = py::none())
      .def("param_names", &Layer::param_names)
      .def("param_shapes", &Layer::param_shapes)
      .def("param_dtypes", &Layer::param_dtypes)
      .def("forward", &Layer::forward, py::arg("x"), py::arg("params"),
           py::arg("capacity_factor") = py::none(), py::arg("top_k") = py::none(),
           py::arg("training") = true, py::arg("adaptive_r") = py::none(),
           py::arg("host_stats") = true)
      .def("backward", &Layer::backward, py::arg("dy"), py::arg("params"),
           py::arg("aux") = py::none(), py::arg("z") = py::none())
      .def("update_expert_bias", &Layer::update_expert_bias, py::arg("rate") = 1e-3)
      .def("expert_bias", &Layer::expert_bias)
      .def("device", &Layer::device)
      .def("num_local_experts", &Layer::num_local_experts)
      .def("first_local_expert", &Layer::first_local_expert);

  // For tests of the zero-copy crossing: the data pointer, sizes and strides switchyard sees for
  // a torch tensor, and a torch tensor made back from that view (sharing the memory).
  m.def("_view_info", [](const at::Tensor& t) {
    const sy::Tensor v = view_of(t, "view");
    return py::make_tuple(reinterpret_cast<std::uintptr_t>(v.data_ptr()), v.sizes(), v.strides(),
                          std::string(sy::dtype_name(v.dtype())));
  });
  m.def("_roundtrip", [](const at::Tensor& t) { return torch_of(view_of(t, "roundtrip")); });
  m.def("_owned_roundtrip", [](const at::Tensor& t) {
    // A tensor allocated by switchyard, handed to torch: returns it and its switchyard pointer.
    TorchStreamScope scope(to_sy_device(t.device(), "owned"));
    sy::Tensor c = owned_copy_of(t, "owned");
    const auto ptr = reinterpret_cast<std::uintptr_t>(c.data_ptr());
    return py::make_tuple(torch_of(c), ptr);
  });
  // The stream switchyard runs on inside a call on t's device (0: CPU or the per-thread default
  // stream; 1: CUDA's legacy default stream, torch's default).
  m.def("_stream_seen", [](const at::Tensor& t) {
    const sy::Device device = to_sy_device(t.device(), "stream");
    TorchStreamScope scope(device);
    return TorchStreamScope::current_handle(device);
  });
}
