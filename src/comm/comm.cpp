// The public Communicator: validates tensors, makes buffers contiguous, resolves the all-to-all
// algorithm, and runs started collectives in order on a progress thread. Backend-neutral.
#include "comm/comm.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <numeric>
#include <thread>
#include <utility>

#include "switchyard/error.h"

namespace switchyard {

// ---- names ----------------------------------------------------------------------------------

const char* to_string(A2AAlgorithm algorithm) {
  switch (algorithm) {
    case A2AAlgorithm::kAuto:
      return "auto";
    case A2AAlgorithm::kFlat:
      return "flat";
    case A2AAlgorithm::k2DH:
      return "2dh";
    case A2AAlgorithm::kPipelined:
      return "pipelined";
  }
  return "?";
}

A2AAlgorithm parse_a2a_algorithm(const std::string& name) {
  for (A2AAlgorithm a :
       {A2AAlgorithm::kAuto, A2AAlgorithm::kFlat, A2AAlgorithm::k2DH, A2AAlgorithm::kPipelined}) {
    if (name == to_string(a)) return a;
  }
  detail::throw_error("unknown all-to-all algorithm '" + name +
                      "', expected auto, flat, 2dh or pipelined");
}

// ---- started work and the progress thread ---------------------------------------------------

namespace comm {

struct WorkState {
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  std::exception_ptr error;

  void finish(std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      error = std::move(e);
      done = true;
    }
    cv.notify_all();
  }
};

// One thread that runs queued collectives in order. Created on the first start_* call.
class ProgressThread {
 public:
  ~ProgressThread() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  void push(std::shared_ptr<WorkState> state, std::function<void()> run) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.emplace_back(std::move(state), std::move(run));
      last_ = queue_.back().first;
      if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
    }
    cv_.notify_all();
  }

  // Waits until everything pushed so far has run (its errors stay with its CommWork).
  void drain() {
    std::shared_ptr<WorkState> last;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      last = last_;
    }
    if (!last) return;
    std::unique_lock<std::mutex> lock(last->mutex);
    last->cv.wait(lock, [&] { return last->done; });
  }

 private:
  void loop() {
    for (;;) {
      std::pair<std::shared_ptr<WorkState>, std::function<void()>> item;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stop_ and nothing left
        item = std::move(queue_.front());
        queue_.pop_front();
      }
      std::exception_ptr error;
      try {
        item.second();
      } catch (...) {
        error = std::current_exception();
      }
      item.first->finish(error);
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::pair<std::shared_ptr<WorkState>, std::function<void()>>> queue_;
  std::shared_ptr<WorkState> last_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace comm

void CommWork::wait() const {
  if (!state_) return;
  std::unique_lock<std::mutex> lock(state_->mutex);
  state_->cv.wait(lock, [&] { return state_->done; });
  if (state_->error) std::rethrow_exception(state_->error);
}

bool CommWork::done() const {
  if (!state_) return true;
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->done;
}

// ---- validation helpers ---------------------------------------------------------------------

namespace {

index_t row_numel(const Tensor& t) {
  Shape trailing(t.sizes().begin() + 1, t.sizes().end());
  return checked_numel(trailing);
}

// A contiguous buffer to receive into: recv itself, or a scratch tensor copied back afterwards.
struct RecvBuffer {
  Tensor target;   // the caller's tensor
  Tensor staging;  // contiguous; == target when target is contiguous
  void finish() {
    if (!target.is_contiguous()) target.copy_from(staging);
  }
};

RecvBuffer recv_buffer(const Tensor& recv) {
  RecvBuffer b{recv, recv};
  if (!recv.is_contiguous()) b.staging = Tensor::empty(recv.sizes(), recv.dtype(), recv.device());
  return b;
}

void check_no_overlap(const char* op, const Tensor& send, const Tensor& recv) {
  if (!send.is_contiguous() || !recv.is_contiguous() || send.numel() == 0 || recv.numel() == 0)
    return;
  const auto* s = static_cast<const char*>(send.data_ptr());
  const auto* r = static_cast<const char*>(recv.data_ptr());
  const std::size_t es = dtype_size(send.dtype());
  const bool overlap = s < r + recv.numel() * es && r < s + send.numel() * es;
  SY_CHECK(!overlap, op, ": send and recv overlap; pass separate buffers");
}

void check_counts(const char* op, const char* what, const std::vector<index_t>& counts, int n) {
  SY_CHECK(static_cast<int>(counts.size()) == n, op, ": ", what, " has ", counts.size(),
           " entries, expected one per rank (", n, ")");
  for (std::size_t p = 0; p < counts.size(); ++p) {
    SY_CHECK(counts[p] >= 0, op, ": ", what, "[", p, "] must be >= 0, got ", counts[p]);
  }
}

index_t sum(const std::vector<index_t>& v) {
  return std::accumulate(v.begin(), v.end(), index_t{0});
}

std::string values_str(const std::vector<std::int64_t>& v) {
  std::string out = "[";
  for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}

}  // namespace

// ---- Communicator ---------------------------------------------------------------------------

Communicator::Communicator(std::unique_ptr<comm::CommBackend> backend, const CommOptions& options)
    : backend_(std::move(backend)), options_(options) {
  SY_ASSERT(backend_ != nullptr, "Communicator needs a backend");
}

Communicator::~Communicator() {
  if (progress_) progress_->drain();
}

int Communicator::rank() const { return backend_->rank(); }
int Communicator::size() const { return backend_->size(); }
int Communicator::local_size() const { return backend_->local_size(); }
const char* Communicator::backend_name() const { return backend_->name(); }

A2AAlgorithm Communicator::resolve(std::optional<A2AAlgorithm> algorithm) const {
  const A2AAlgorithm a = algorithm.value_or(options_.algorithm);
  if (a == A2AAlgorithm::kAuto) {
    return size() > local_size() && backend_->hierarchical_ok() ? A2AAlgorithm::k2DH
                                                                : A2AAlgorithm::kFlat;
  }
  if (a != A2AAlgorithm::kFlat) {
    SY_CHECK(backend_->hierarchical_ok(), "all-to-all algorithm ", to_string(a),
             " needs the world size (", size(), ") to be a multiple of the ranks per node (",
             local_size(), ") with each node's ranks consecutive; use flat or auto");
  }
  return a;
}

CommWork Communicator::submit(std::function<void()> job, bool start) {
  CommWork work;
  if (!start || !backend_->threads_ok()) {
    // Blocking calls (and every call under MPI below THREAD_MULTIPLE) run on this thread, after
    // the started work, so that all ranks issue collectives in the same order.
    wait_all();
    job();
    return work;
  }
  work.state_ = std::make_shared<comm::WorkState>();
  if (!progress_) progress_ = std::make_unique<comm::ProgressThread>();
  progress_->push(work.state_, std::move(job));
  return work;
}

void Communicator::wait_all() {
  if (progress_) progress_->drain();
}

namespace {

void check_tensor(const char* op, const char* name, const Tensor& t, Device device) {
  SY_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  if (t.device().is_cuda() && device.is_cpu()) {
    detail::throw_error(detail::str_cat(op, ": ", name, " is on ", to_string(t.device()),
                                        ": MPI is not CUDA-aware here; GPU buffers go through "
                                        "NCCL"));
  }
  SY_CHECK(t.device() == device, op, ": ", name, " is on ", to_string(t.device()),
           ", this communicator's backend works on ", to_string(device));
  SY_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dimension, got a scalar");
}

void check_pair(const char* op, const Tensor& send, const Tensor& recv, Device device) {
  check_tensor(op, "send", send, device);
  check_tensor(op, "recv", recv, device);
  SY_CHECK(send.dtype() == recv.dtype(), op, ": send is ", dtype_name(send.dtype()), ", recv is ",
           dtype_name(recv.dtype()), "; they must match");
  const Shape st(send.sizes().begin() + 1, send.sizes().end());
  const Shape rt(recv.sizes().begin() + 1, recv.sizes().end());
  SY_CHECK(st == rt, op, ": send has shape ", shape_str(send.sizes()), ", recv has shape ",
           shape_str(recv.sizes()), "; all dimensions but the first must match");
  check_no_overlap(op, send, recv);
}

}  // namespace

// ---- all_to_all -----------------------------------------------------------------------------

namespace {

std::function<void()> all_to_all_job(comm::CommBackend* backend, int n, const Tensor& send,
                                     const Tensor& recv, A2AAlgorithm algorithm) {
  const char* op = "all_to_all";
  check_pair(op, send, recv, backend->device());
  SY_CHECK(send.sizes() == recv.sizes(), op, ": send has shape ", shape_str(send.sizes()),
           ", recv has shape ", shape_str(recv.sizes()), "; they must match");
  SY_CHECK(send.size(0) % n == 0, op, ": the first dimension (", send.size(0),
           ") must be a multiple of the number of ranks (", n, ")");
  const index_t per_peer = send.numel() / n;
  return [backend, s = send.contiguous(), r = recv_buffer(recv), per_peer, algorithm]() mutable {
    backend->all_to_all(s.data_ptr(), r.staging.data_ptr(), per_peer, dtype_size(s.dtype()),
                        algorithm);
    r.finish();
  };
}

}  // namespace

CommWork Communicator::start_all_to_all(const Tensor& send, const Tensor& recv,
                                        std::optional<A2AAlgorithm> algorithm) {
  return submit(all_to_all_job(backend_.get(), size(), send, recv, resolve(algorithm)), true);
}

void Communicator::all_to_all(const Tensor& send, const Tensor& recv,
                              std::optional<A2AAlgorithm> algorithm) {
  submit(all_to_all_job(backend_.get(), size(), send, recv, resolve(algorithm)), false);
}

// ---- all_to_all_v ---------------------------------------------------------------------------

namespace {

std::function<void()> all_to_all_v_job(comm::CommBackend* backend, int n, const Tensor& send,
                                       const std::vector<index_t>& send_counts, const Tensor& recv,
                                       const std::vector<index_t>& recv_counts,
                                       A2AAlgorithm algorithm) {
  const char* op = "all_to_all_v";
  check_pair(op, send, recv, backend->device());
  check_counts(op, "send_counts", send_counts, n);
  check_counts(op, "recv_counts", recv_counts, n);
  SY_CHECK(sum(send_counts) == send.size(0), op, ": send_counts add up to ", sum(send_counts),
           " rows, send has ", send.size(0));
  SY_CHECK(sum(recv_counts) == recv.size(0), op, ": recv_counts add up to ", sum(recv_counts),
           " rows, recv has ", recv.size(0));
  const index_t row = row_numel(send);
  std::vector<std::int64_t> sc(n), rc(n);
  for (int p = 0; p < n; ++p) {
    sc[p] = checked_mul(send_counts[p], row);
    rc[p] = checked_mul(recv_counts[p], row);
  }
  return [backend, s = send.contiguous(), r = recv_buffer(recv), sc = std::move(sc),
          rc = std::move(rc), algorithm]() mutable {
    backend->all_to_all_v(s.data_ptr(), sc.data(), r.staging.data_ptr(), rc.data(),
                          dtype_size(s.dtype()), algorithm);
    r.finish();
  };
}

}  // namespace

CommWork Communicator::start_all_to_all_v(const Tensor& send,
                                          const std::vector<index_t>& send_counts,
                                          const Tensor& recv,
                                          const std::vector<index_t>& recv_counts,
                                          std::optional<A2AAlgorithm> algorithm) {
  return submit(all_to_all_v_job(backend_.get(), size(), send, send_counts, recv, recv_counts,
                                 resolve(algorithm)),
                true);
}

void Communicator::all_to_all_v(const Tensor& send, const std::vector<index_t>& send_counts,
                                const Tensor& recv, const std::vector<index_t>& recv_counts,
                                std::optional<A2AAlgorithm> algorithm) {
  submit(all_to_all_v_job(backend_.get(), size(), send, send_counts, recv, recv_counts,
                          resolve(algorithm)),
         false);
}

std::vector<index_t> Communicator::exchange_counts(const std::vector<index_t>& send_counts) {
  check_counts("exchange_counts", "send_counts", send_counts, size());
  std::vector<index_t> recv_counts(send_counts.size());
  submit(
      [&] {
        backend_->all_to_all(send_counts.data(), recv_counts.data(), 1, sizeof(index_t),
                             A2AAlgorithm::kFlat);
      },
      false);
  return recv_counts;
}

Tensor Communicator::all_to_all_v(const Tensor& send, const std::vector<index_t>& send_counts,
                                  std::vector<index_t>* recv_counts,
                                  std::optional<A2AAlgorithm> algorithm) {
  check_tensor("all_to_all_v", "send", send, backend_->device());
  std::vector<index_t> counts = exchange_counts(send_counts);
  Shape shape = send.sizes();
  shape[0] = sum(counts);
  Tensor recv = Tensor::empty(shape, send.dtype(), send.device());
  all_to_all_v(send, send_counts, recv, counts, algorithm);
  if (recv_counts != nullptr) *recv_counts = std::move(counts);
  return recv;
}

// ---- all_gather_v ---------------------------------------------------------------------------

namespace {

std::function<void()> all_gather_v_job(comm::CommBackend* backend, int n, const Tensor& send,
                                       const Tensor& recv,
                                       const std::vector<index_t>& recv_counts) {
  const char* op = "all_gather_v";
  check_pair(op, send, recv, backend->device());
  check_counts(op, "recv_counts", recv_counts, n);
  const int me = backend->rank();
  SY_CHECK(recv_counts[me] == send.size(0), op, ": recv_counts[", me, "] is ", recv_counts[me],
           " but this rank sends ", send.size(0), " rows");
  SY_CHECK(sum(recv_counts) == recv.size(0), op, ": recv_counts add up to ", sum(recv_counts),
           " rows, recv has ", recv.size(0));
  const index_t row = row_numel(send);
  std::vector<std::int64_t> rc(n);
  for (int p = 0; p < n; ++p) rc[p] = checked_mul(recv_counts[p], row);
  return [backend, s = send.contiguous(), r = recv_buffer(recv), rc = std::move(rc)]() mutable {
    backend->all_gather_v(s.data_ptr(), s.numel(), r.staging.data_ptr(), rc.data(),
                          dtype_size(s.dtype()));
    r.finish();
  };
}

}  // namespace

CommWork Communicator::start_all_gather_v(const Tensor& send, const Tensor& recv,
                                          const std::vector<index_t>& recv_counts) {
  return submit(all_gather_v_job(backend_.get(), size(), send, recv, recv_counts), true);
}

void Communicator::all_gather_v(const Tensor& send, const Tensor& recv,
                                const std::vector<index_t>& recv_counts) {
  submit(all_gather_v_job(backend_.get(), size(), send, recv, recv_counts), false);
}

Tensor Communicator::all_gather_v(const Tensor& send, std::vector<index_t>* counts) {
  check_tensor("all_gather_v", "send", send, backend_->device());
  std::vector<index_t> rows(size());
  const index_t mine = send.size(0);
  const std::vector<std::int64_t> ones(size(), 1);
  submit([&] { backend_->all_gather_v(&mine, 1, rows.data(), ones.data(), sizeof(index_t)); },
         false);
  Shape shape = send.sizes();
  shape[0] = sum(rows);
  Tensor recv = Tensor::empty(shape, send.dtype(), send.device());
  all_gather_v(send, recv, rows);
  if (counts != nullptr) *counts = std::move(rows);
  return recv;
}

// ---- all_reduce, barrier --------------------------------------------------------------------

namespace {

std::function<void()> all_reduce_job(comm::CommBackend* backend, const Tensor& data, ReduceOp op) {
  check_tensor("all_reduce", "data", data, backend->device());
  const DType d = data.dtype();
  SY_CHECK(d == DType::kF32 || d == DType::kF64 || d == DType::kI32 || d == DType::kI64,
           "all_reduce: ", dtype_name(d),
           " is not supported: expected f32, f64, i32 or i64 (reduce f16/bf16 in f32)");
  return [backend, r = recv_buffer(data), op]() mutable {
    if (r.staging.data_ptr() != r.target.data_ptr()) r.staging.copy_from(r.target);
    backend->all_reduce(r.staging.data_ptr(), r.staging.numel(), r.staging.dtype(), op);
    r.finish();
  };
}

}  // namespace

CommWork Communicator::start_all_reduce(const Tensor& data, ReduceOp op) {
  return submit(all_reduce_job(backend_.get(), data, op), true);
}

void Communicator::all_reduce(const Tensor& data, ReduceOp op) {
  submit(all_reduce_job(backend_.get(), data, op), false);
}

std::vector<std::int64_t> Communicator::all_reduce(std::vector<std::int64_t> values, ReduceOp op) {
  submit(
      [&] {
        backend_->all_reduce(values.data(), static_cast<std::int64_t>(values.size()), DType::kI64,
                             op);
      },
      false);
  return values;
}

std::vector<double> Communicator::all_reduce(std::vector<double> values, ReduceOp op) {
  submit(
      [&] {
        backend_->all_reduce(values.data(), static_cast<std::int64_t>(values.size()), DType::kF64,
                             op);
      },
      false);
  return values;
}

void Communicator::barrier() {
  submit([&] { backend_->barrier(); }, false);
}

// ---- configuration agreement ----------------------------------------------------------------

void Communicator::check_same_on_all_ranks(const std::string& name,
                                           const std::vector<std::int64_t>& values) {
  const int n = size();
  // 1. Every rank's vector (their lengths may differ too).
  const Tensor mine = Tensor::from_blob(const_cast<std::int64_t*>(values.data()),
                                        {static_cast<index_t>(values.size())}, {}, DType::kI64);
  std::vector<index_t> counts;
  // Gathered on the backend's device (NCCL: the GPU), compared on the host.
  const Tensor all =
      all_gather_v(values.empty() ? Tensor::empty({0}, DType::kI64, device()) : mine.to(device()),
                   &counts)
          .to(Device::cpu());
  const std::int64_t* v = all.numel() > 0 ? all.data<std::int64_t>() : nullptr;
  std::vector<std::vector<std::int64_t>> per_rank(n);
  index_t offset = 0;
  for (int p = 0; p < n; ++p) {
    per_rank[p].assign(v + offset, v + offset + counts[p]);
    offset += counts[p];
  }
  // 2. Compare with rank 0 and name the ranks that differ, grouped by value.
  std::string differ;
  std::vector<bool> reported(n, false);
  for (int p = 1; p < n; ++p) {
    if (reported[p] || per_rank[p] == per_rank[0]) continue;
    std::string ranks;
    int num_ranks = 0;
    for (int q = p; q < n; ++q) {
      if (!reported[q] && per_rank[q] == per_rank[p]) {
        reported[q] = true;
        ranks += (num_ranks++ ? ", " : "") + std::to_string(q);
      }
    }
    differ += detail::str_cat("; rank", num_ranks > 1 ? "s " : " ", ranks, " ",
                              num_ranks > 1 ? "have " : "has ", values_str(per_rank[p]));
  }
  SY_CHECK(differ.empty(), name, " differs across ranks: rank 0 has ", values_str(per_rank[0]),
           differ, " (seen on rank ", rank(), ")");
}

// ---- factories ------------------------------------------------------------------------------

namespace {

void check_options(const CommOptions& options) {
  SY_CHECK(options.local_size >= 0, "CommOptions::local_size must be >= 0 (0: from LOCAL_SIZE ",
           "or the machine), got ", options.local_size);
  SY_CHECK(options.pipeline_chunks >= 1, "CommOptions::pipeline_chunks must be >= 1, got ",
           options.pipeline_chunks);
}

}  // namespace

std::shared_ptr<Communicator> make_mpi_communicator(const CommOptions& options) {
  check_options(options);
  return std::make_shared<Communicator>(comm::make_mpi_backend(nullptr, options), options);
}

std::shared_ptr<Communicator> make_mpi_communicator(MpiCommHandle comm,
                                                    const CommOptions& options) {
  check_options(options);
  SY_CHECK(comm.address != nullptr, "make_mpi_communicator: the MPI_Comm handle is null");
  return std::make_shared<Communicator>(comm::make_mpi_backend(&comm, options), options);
}

std::shared_ptr<Communicator> comm::make_communicator(std::unique_ptr<CommBackend> backend,
                                                      const CommOptions& options) {
  check_options(options);
  SY_CHECK(backend != nullptr, "make_communicator: the backend is null");
  return std::make_shared<Communicator>(std::move(backend), options);
}

}  // namespace switchyard
