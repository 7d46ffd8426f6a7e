// The NCCL backend (CUDA buffers of one GPU): set-up from an ncclUniqueId (made here, or by rank 0
// and broadcast over MPI) or over a caller's ncclComm_t; the flat all_to_all(_v) and variable
// all_gather_v as grouped ncclSend/ncclRecv, equal all_gather_v as ncclAllGather, all_reduce and
// barrier as ncclAllReduce. The 2DH and pipelined all-to-alls are the shared ones
// (comm_a2a_hierarchical.cpp) over NcclBackend::Subgroups: grouped ncclSend/ncclRecv among the
// node's or the cross-node ranks, cudaMemcpyAsync for the re-layouts, all on the backend's stream.
// The only file that includes nccl.h.
//
// Streams: the collectives run on the backend's own stream, joined to the caller's current stream
// by events both ways (so they are ordered as if they ran on it). NCCL is not handed
// cudaStreamPerThread, the library's default stream, on purpose: a non-blocking communicator may
// launch from an internal thread, whose per-thread stream is another stream (NVIDIA/nccl#1976).
//
// Time limit: owned communicators are non-blocking (blocking = 0). Every NCCL call that returns
// ncclInProgress and every collective's completion event are polled against
// SWITCHYARD_COMM_TIMEOUT_SEC, counted from the start of the collective, as the MPI backend does.
#include "comm/comm_nccl.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "comm/comm_a2a_hierarchical.h"
#include "core/cuda_check.cuh"
#include "core/device_cuda.h"
#include "switchyard/device.h"
#include "switchyard/error.h"

namespace switchyard::comm {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string nccl_message(ncclResult_t result, ncclComm_t comm) {
  std::string text = ncclGetErrorString(result);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') text += detail::str_cat(" (", last, ")");
  return text;
}

// Prints the time-limit error, aborts the communicator and ends the process. ncclCommAbort may
// itself wait for the stuck kernels: it gets 3 seconds on another thread, then the process
// exits regardless (mpirun ends the other ranks when one exits non-zero).
[[noreturn]] void abort_timed_out(ncclComm_t comm, int rank, const char* what, double seconds) {
  std::fprintf(stderr,
               "switchyard: error: rank %d: %s timed out after %.1f s "
               "(SWITCHYARD_COMM_TIMEOUT_SEC=%g): a rank stalled, died or called a different "
               "collective; aborting the job\n",
               rank, what, seconds, timeout_seconds());
  std::fflush(stderr);
  if (comm != nullptr) {
    static std::atomic<bool> aborted{false};
    std::thread([comm] {
      ncclCommAbort(comm);
      aborted = true;
    }).detach();
    const auto start = Clock::now();
    while (!aborted && seconds_since(start) < 3) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  std::_Exit(1);
}

// Whether `p` is device (or managed) memory that NCCL can use; host memory is staged.
bool is_device_pointer(const void* p) {
  if (p == nullptr) return true;  // nothing to move
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
}

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kF64:
      return ncclFloat64;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
    default:
      break;
  }
  detail::throw_error(detail::str_cat("all_reduce: no NCCL reduction for ", dtype_name(dtype)));
}

std::uint64_t host_hash() {
  char name[256] = {};
  gethostname(name, sizeof name - 1);
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (const char* c = name; *c != '\0'; ++c)
    h = (h ^ static_cast<unsigned char>(*c)) * 1099511628211ull;
  return h;
}

class NcclBackend final : public CommBackend {
 public:
  // comm: a caller's communicator (not owned); else one is made from `id`.
  NcclBackend(ncclComm_t comm, const ncclUniqueId* id, int rank, int size, int device,
              const CommOptions& options);
  ~NcclBackend() override;

  const char* name() const override { return "nccl"; }
  Device device() const override { return Device::cuda(device_); }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_size() const override { return local_size_; }
  bool hierarchical_ok() const override { return hierarchical_ok_; }
  bool threads_ok() const override { return false; }

  void all_to_all(const void* send, void* recv, std::int64_t count_per_peer, std::size_t elem_size,
                  A2AAlgorithm algorithm) override;
  void all_to_all_v(const void* send, const std::int64_t* send_counts, void* recv,
                    const std::int64_t* recv_counts, std::size_t elem_size,
                    A2AAlgorithm algorithm) override;
  void all_gather_v(const void* send, std::int64_t send_count, void* recv,
                    const std::int64_t* recv_counts, std::size_t elem_size) override;
  void all_reduce(void* data, std::int64_t count, DType dtype, ReduceOp op) override;
  void barrier() override;

 private:
  // A buffer NCCL can use for `bytes` at `p`: p itself when on the GPU, else scratch slot
  // `slot`, filled from p when `fill` (through pinned memory). copy_back(s) returns the scratch
  // to the host once the collective completed: neither copy waits outside the time limit.
  struct Staged {
    void* host = nullptr;  // the caller's host pointer; null when p is device memory
    void* device = nullptr;
    int slot = 0;
    std::size_t bytes = 0;
  };
  Staged stage(const void* p, std::size_t bytes, int slot, bool fill);
  void copy_back(const Staged& s);

  // Runs `enqueue` (NCCL calls on stream_) after the caller's current stream's work and waits
  // for it, polling against the time limit. Throws Error on NCCL or CUDA errors.
  void run(const char* what, const std::function<void(Clock::time_point)>& enqueue);
  // Checks an NCCL call's result; ncclInProgress (non-blocking) is polled until done.
  void check(ncclResult_t result, const char* call, const char* what, Clock::time_point start);
  void wait_ready(const char* what, Clock::time_point start);
  [[noreturn]] void fail(ncclResult_t result, const char* call, const char* what);
  // Grouped sends and receives of bytes: piece p of `send` to rank p, piece p of `recv` from p.
  void exchange(const char* send, const std::int64_t* send_bytes, const std::int64_t* send_displ,
                char* recv, const std::int64_t* recv_bytes, const std::int64_t* recv_displ,
                const char* what, Clock::time_point start);

  void set_local_size(const CommOptions& options);

  // The steps of the shared 2DH and pipelined all-to-alls (defined below the collectives).
  class Subgroups;
  // Runs them inside run(): host buffers staged as the flat all-to-all stages them.
  void run_hierarchical(const void* send, std::size_t send_bytes, void* recv,
                        std::size_t recv_bytes, const std::int64_t* node_send_counts,
                        const std::int64_t* recv_counts, std::size_t elem_size,
                        A2AAlgorithm algorithm, const char* what);

  ncclComm_t comm_ = nullptr;
  bool owned_ = false;
  int device_ = 0;
  int rank_ = 0;
  int size_ = 1;
  int local_size_ = 1;
  bool hierarchical_ok_ = false;  // size_ a multiple of local_size_, each node's ranks consecutive
  int pipeline_chunks_ = 1;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;            // the caller's stream reached the collective
  cudaEvent_t done_ = nullptr;             // the collective completed on stream_
  bool broken_ = false;                    // an NCCL error: the communicator is not used again
  void* scratch_[2] = {nullptr, nullptr};  // device staging of host arrays
  void* pinned_[2] = {nullptr, nullptr};   // their pinned host copies
  std::size_t scratch_bytes_[2] = {0, 0};
  std::vector<Staged> to_host_;  // copied from pinned_ to the caller when run() completes
  void* stage_[4] = {};          // device scratch of the hierarchical all-to-alls (stream-ordered)
  std::size_t stage_bytes_[4] = {};
};

NcclBackend::NcclBackend(ncclComm_t comm, const ncclUniqueId* id, int rank, int size, int device,
                         const CommOptions& options)
    : comm_(comm),
      owned_(comm == nullptr),
      device_(device),
      rank_(rank),
      size_(size),
      pipeline_chunks_(options.pipeline_chunks) {
  const int gpus = cuda::device_count();
  SY_CHECK(gpus > 0, "make_nccl_communicator: no usable GPU on rank ", rank,
           " (the NCCL backend needs CUDA tensors; use make_mpi_communicator on CPU)");
  SY_CHECK(device >= 0 && device < gpus, "make_nccl_communicator: rank ", rank, " asks for GPU ",
           device, " but this process sees ", gpus);
  DeviceScope scope(device_);
  if (owned_) {
    const auto start = Clock::now();
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t r = ncclCommInitRankConfig(&comm_, size, *id, rank, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      const std::string text = nccl_message(r, comm_);
      if (comm_ != nullptr) ncclCommAbort(comm_);
      detail::throw_error(
          detail::str_cat("make_nccl_communicator: ncclCommInitRankConfig failed on ", "rank ",
                          rank, " (GPU ", device, "): ", text));
    }
    wait_ready("ncclCommInitRank", start);
  }
  SY_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  SY_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  SY_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  set_local_size(options);
}

NcclBackend::~NcclBackend() {
  cudaSetDevice(device_);
  if (owned_ && !broken_ && comm_ != nullptr) {
    // Flush, then free; a peer that never arrives makes this abort rather than hang.
    bool finalized = false;
    const ncclResult_t r = ncclCommFinalize(comm_);
    if (r == ncclSuccess || r == ncclInProgress) {
      const auto start = Clock::now();
      for (;;) {
        ncclResult_t state = ncclSuccess;
        if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess) break;
        if (state == ncclSuccess) {
          finalized = true;
          break;
        }
        if (state != ncclInProgress || seconds_since(start) > timeout_seconds()) break;
        poll_backoff(start);
      }
    }
    if (finalized) {
      ncclCommDestroy(comm_);
    } else {
      ncclCommAbort(comm_);
    }
  }
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  for (void* stage : stage_) {
    if (stage != nullptr) cudaFree(stage);
  }
  for (int slot = 0; slot < 2; ++slot) {
    if (scratch_[slot] != nullptr) cudaFree(scratch_[slot]);
    if (pinned_[slot] != nullptr) cudaFreeHost(pinned_[slot]);
  }
  if (done_ != nullptr) cudaEventDestroy(done_);
  if (ready_ != nullptr) cudaEventDestroy(ready_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

// Ranks per node: the option, else LOCAL_SIZE, else the ranks on this machine (host names
// gathered over the communicator). Checked equal on every rank, as the MPI backend does. Nodes
// are consecutive blocks of local_size ranks for the hierarchical algorithms: assumed when given,
// checked against the host names when found from them (the same answer on every rank).
void NcclBackend::set_local_size(const CommOptions& options) {
  int local = options.local_size > 0 ? options.local_size : env_local_size();
  bool consecutive = true;
  if (local == 0) {
    const std::uint64_t mine = host_hash();
    std::vector<std::uint64_t> all(size_);
    const std::vector<std::int64_t> ones(size_, 1);
    all_gather_v(&mine, 1, all.data(), ones.data(), sizeof mine);
    local = 0;
    for (std::uint64_t h : all) local += h == mine ? 1 : 0;
    for (int p = 0; p < size_; ++p) consecutive = consecutive && all[p] == all[p - p % local];
  }
  std::vector<std::int64_t> range = {-local, local};
  all_reduce(range.data(), 2, DType::kI64, ReduceOp::kMax);
  SY_CHECK(-range[0] == range[1], "ranks per node differ across ranks (from ", -range[0], " to ",
           range[1], "); set LOCAL_SIZE or CommOptions::local_size the same on every rank");
  SY_CHECK(local <= size_, "ranks per node (", local, ", from ",
           options.local_size > 0 ? "CommOptions::local_size" : "LOCAL_SIZE",
           ") exceed the number of ranks (", size_, ")");
  local_size_ = local;
  hierarchical_ok_ = consecutive && size_ % local == 0;
}

// ---- errors and waiting ---------------------------------------------------------------------

void NcclBackend::fail(ncclResult_t result, const char* call, const char* what) {
  const std::string text = nccl_message(result, comm_);
  // The communicator cannot be trusted after an error: abort it when it is ours (a caller's is
  // left to the caller) and refuse later calls.
  if (owned_ && !broken_) ncclCommAbort(comm_);
  broken_ = true;
  detail::throw_error(
      detail::str_cat("NCCL ", call, " failed on rank ", rank_, " in ", what, ": ", text));
}

void NcclBackend::wait_ready(const char* what, Clock::time_point start) {
  const auto wait_start = Clock::now();
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess) fail(r, "ncclCommGetAsyncError", what);
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) fail(state, "(asynchronous)", what);
    const double seconds = seconds_since(start);
    if (seconds > timeout_seconds()) abort_timed_out(comm_, rank_, what, seconds);
    poll_backoff(wait_start);
  }
}

void NcclBackend::check(ncclResult_t result, const char* call, const char* what,
                        Clock::time_point start) {
  if (result == ncclSuccess) return;
  if (result == ncclInProgress) {
    wait_ready(what, start);
    return;
  }
  fail(result, call, what);
}

#define SY_NCCL(expr) check((expr), #expr, what, start)

void NcclBackend::run(const char* what, const std::function<void(Clock::time_point)>& enqueue) {
  SY_CHECK(!broken_, what, ": the NCCL communicator of rank ", rank_,
           " failed earlier and was aborted");
  DeviceScope scope(device_);
  const auto start = Clock::now();
  const cudaStream_t caller = as_cuda_stream(current_stream(Device::cuda(device_)).handle);
  SY_CUDA_CHECK(cudaEventRecord(ready_, caller));
  SY_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
  to_host_.clear();
  enqueue(start);
  SY_CUDA_CHECK(cudaEventRecord(done_, stream_));
  SY_CUDA_CHECK(cudaStreamWaitEvent(caller, done_, 0));
  const auto wait_start = Clock::now();
  for (;;) {
    const cudaError_t e = cudaEventQuery(done_);
    if (e == cudaSuccess) {
      for (const Staged& h : to_host_) std::memcpy(h.host, pinned_[h.slot], h.bytes);
      return;
    }
    if (e != cudaErrorNotReady) SY_CUDA_CHECK(e);
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess) fail(r, "ncclCommGetAsyncError", what);
    if (state != ncclSuccess && state != ncclInProgress) fail(state, "(asynchronous)", what);
    const double seconds = seconds_since(start);
    if (seconds > timeout_seconds()) abort_timed_out(comm_, rank_, what, seconds);
    poll_backoff(wait_start);
  }
}

// ---- host staging ---------------------------------------------------------------------------

NcclBackend::Staged NcclBackend::stage(const void* p, std::size_t bytes, int slot, bool fill) {
  Staged s;
  s.bytes = bytes;
  s.slot = slot;
  if (bytes == 0 || is_device_pointer(p)) {
    s.device = const_cast<void*>(p);
    return s;
  }
  if (scratch_bytes_[slot] < bytes) {
    SY_CUDA_CHECK(cudaStreamSynchronize(stream_));  // earlier copies may still read them
    if (scratch_[slot] != nullptr) SY_CUDA_CHECK(cudaFree(scratch_[slot]));
    if (pinned_[slot] != nullptr) SY_CUDA_CHECK(cudaFreeHost(pinned_[slot]));
    scratch_[slot] = pinned_[slot] = nullptr;
    scratch_bytes_[slot] = 0;
    SY_CUDA_CHECK(cudaMalloc(&scratch_[slot], bytes));
    SY_CUDA_CHECK(cudaMallocHost(&pinned_[slot], bytes));
    scratch_bytes_[slot] = bytes;
  }
  s.host = const_cast<void*>(p);
  s.device = scratch_[slot];
  if (fill) {
    std::memcpy(pinned_[slot], p, bytes);
    SY_CUDA_CHECK(cudaMemcpyAsync(s.device, pinned_[slot], bytes, cudaMemcpyHostToDevice, stream_));
  }
  return s;
}

void NcclBackend::copy_back(const Staged& s) {
  if (s.host == nullptr) return;
  SY_CUDA_CHECK(
      cudaMemcpyAsync(pinned_[s.slot], s.device, s.bytes, cudaMemcpyDeviceToHost, stream_));
  to_host_.push_back(s);
}

// ---- collectives ----------------------------------------------------------------------------

void NcclBackend::exchange(const char* send, const std::int64_t* send_bytes,
                           const std::int64_t* send_displ, char* recv,
                           const std::int64_t* recv_bytes, const std::int64_t* recv_displ,
                           const char* what, Clock::time_point start) {
  // This rank's own piece is a device copy; zero-size pieces are neither sent nor received (the
  // peer knows the same counts).
  SY_CHECK(send_bytes[rank_] == recv_bytes[rank_], what, ": rank ", rank_, " sends itself ",
           send_bytes[rank_], " bytes but expects ", recv_bytes[rank_]);
  if (send_bytes[rank_] > 0) {
    SY_CUDA_CHECK(cudaMemcpyAsync(recv + recv_displ[rank_], send + send_displ[rank_],
                                  send_bytes[rank_], cudaMemcpyDeviceToDevice, stream_));
  }
  SY_NCCL(ncclGroupStart());
  for (int i = 1; i < size_; ++i) {
    // Peers in a ring order from this rank, as NCCL's own all-to-all examples do.
    const int to = (rank_ + i) % size_, from = (rank_ - i + size_) % size_;
    if (send_bytes[to] > 0) {
      SY_NCCL(ncclSend(send + send_displ[to], static_cast<std::size_t>(send_bytes[to]), ncclInt8,
                       to, comm_, stream_));
    }
    if (recv_bytes[from] > 0) {
      SY_NCCL(ncclRecv(recv + recv_displ[from], static_cast<std::size_t>(recv_bytes[from]),
                       ncclInt8, from, comm_, stream_));
    }
  }
  SY_NCCL(ncclGroupEnd());
}

void NcclBackend::all_to_all(const void* send, void* recv, std::int64_t count_per_peer,
                             std::size_t elem_size, A2AAlgorithm algorithm) {
  const std::int64_t piece = count_per_peer * static_cast<std::int64_t>(elem_size);
  const std::size_t total = static_cast<std::size_t>(piece) * size_;
  if (algorithm != A2AAlgorithm::kFlat) {
    const std::vector<std::int64_t> node_counts(static_cast<std::size_t>(local_size_) * size_,
                                                count_per_peer);
    const std::vector<std::int64_t> recv_counts(size_, count_per_peer);
    run_hierarchical(send, total, recv, total, node_counts.data(), recv_counts.data(), elem_size,
                     algorithm,
                     algorithm == A2AAlgorithm::kPipelined ? "all_to_all (pipelined)"
                                                           : "all_to_all (2dh)");
    return;
  }
  const char* what = "all_to_all (flat)";
  std::vector<std::int64_t> bytes(size_, piece), displ(size_);
  for (int p = 0; p < size_; ++p) displ[p] = piece * p;
  run(what, [&](Clock::time_point start) {
    const Staged s = stage(send, total, 0, true);
    const Staged r = stage(recv, total, 1, false);
    exchange(static_cast<const char*>(s.device), bytes.data(), displ.data(),
             static_cast<char*>(r.device), bytes.data(), displ.data(), what, start);
    copy_back(r);
  });
}

void NcclBackend::all_to_all_v(const void* send, const std::int64_t* send_counts, void* recv,
                               const std::int64_t* recv_counts, std::size_t elem_size,
                               A2AAlgorithm algorithm) {
  const auto es = static_cast<std::int64_t>(elem_size);
  std::vector<std::int64_t> sb(size_), sd(size_), rb(size_), rd(size_);
  std::int64_t s_total = 0, r_total = 0;
  for (int p = 0; p < size_; ++p) {
    sb[p] = send_counts[p] * es;
    rb[p] = recv_counts[p] * es;
    sd[p] = s_total;
    rd[p] = r_total;
    s_total += sb[p];
    r_total += rb[p];
  }
  if (algorithm != A2AAlgorithm::kFlat) {
    // Every rank of the node needs the node's send counts to lay out the two stages: gathered
    // from every rank (one ncclAllGather of n counts each), this node's rows kept.
    std::vector<std::int64_t> all_counts(static_cast<std::size_t>(size_) * size_);
    const std::vector<std::int64_t> per_rank(size_, size_);
    all_gather_v(send_counts, size_, all_counts.data(), per_rank.data(), sizeof(std::int64_t));
    const std::int64_t* node_counts =
        all_counts.data() + static_cast<std::size_t>(rank_ / local_size_) * local_size_ * size_;
    run_hierarchical(send, static_cast<std::size_t>(s_total), recv,
                     static_cast<std::size_t>(r_total), node_counts, recv_counts, elem_size,
                     algorithm,
                     algorithm == A2AAlgorithm::kPipelined ? "all_to_all_v (pipelined)"
                                                           : "all_to_all_v (2dh)");
    return;
  }
  const char* what = "all_to_all_v (flat)";
  run(what, [&](Clock::time_point start) {
    const Staged s = stage(send, static_cast<std::size_t>(s_total), 0, true);
    const Staged r = stage(recv, static_cast<std::size_t>(r_total), 1, false);
    exchange(static_cast<const char*>(s.device), sb.data(), sd.data(), static_cast<char*>(r.device),
             rb.data(), rd.data(), what, start);
    copy_back(r);
  });
}

void NcclBackend::all_gather_v(const void* send, std::int64_t send_count, void* recv,
                               const std::int64_t* recv_counts, std::size_t elem_size) {
  const char* what = "all_gather_v";
  const auto es = static_cast<std::int64_t>(elem_size);
  std::vector<std::int64_t> sb(size_, send_count * es), sd(size_, 0), rb(size_), rd(size_);
  std::int64_t r_total = 0;
  bool equal = true;
  for (int p = 0; p < size_; ++p) {
    rb[p] = recv_counts[p] * es;
    rd[p] = r_total;
    r_total += rb[p];
    equal = equal && recv_counts[p] == recv_counts[0];
  }
  run(what, [&](Clock::time_point start) {
    const Staged s = stage(send, static_cast<std::size_t>(sb[rank_]), 0, true);
    const Staged r = stage(recv, static_cast<std::size_t>(r_total), 1, false);
    if (equal && rb[0] > 0) {
      // Equal counts everywhere (every rank sees the same recv_counts): NCCL's own all-gather.
      SY_NCCL(ncclAllGather(s.device, r.device, static_cast<std::size_t>(rb[0]), ncclInt8, comm_,
                            stream_));
    } else if (!equal) {
      exchange(static_cast<const char*>(s.device), sb.data(), sd.data(),
               static_cast<char*>(r.device), rb.data(), rd.data(), what, start);
    }
    copy_back(r);
  });
}

void NcclBackend::all_reduce(void* data, std::int64_t count, DType dtype, ReduceOp op) {
  const char* what = op == ReduceOp::kSum ? "all_reduce (sum)" : "all_reduce (max)";
  const ncclDataType_t type = nccl_type(dtype);
  if (count == 0) return;
  const std::size_t bytes = static_cast<std::size_t>(count) * dtype_size(dtype);
  run(what, [&](Clock::time_point start) {
    const Staged d = stage(data, bytes, 0, true);
    SY_NCCL(ncclAllReduce(d.device, d.device, static_cast<std::size_t>(count), type,
                          op == ReduceOp::kSum ? ncclSum : ncclMax, comm_, stream_));
    copy_back(d);
  });
}

void NcclBackend::barrier() {
  const char* what = "barrier";
  run(what, [&](Clock::time_point start) {
    const std::int32_t one = 1;
    const Staged d = stage(&one, sizeof one, 0, true);
    SY_NCCL(ncclAllReduce(d.device, d.device, 1, ncclInt32, ncclSum, comm_, stream_));
  });
}

// ---- the hierarchical all-to-alls' steps ---------------------------------------------------

// Exchanges are queued when started and enqueued, all queued ones in one NCCL group, at the first
// wait() for one of them: the shared algorithm starts chunk k+1's intra-node exchange before it
// waits for chunk k's, so the pipelined form puts chunk k's inter-node exchange and the next
// chunks' intra-node ones in the same group, where NCCL runs them at the same time. Copies are
// enqueued on the stream at once; SubgroupExchanger's contract makes that reordering safe.
class NcclBackend::Subgroups final : public SubgroupExchanger {
 public:
  Subgroups(NcclBackend& backend, Clock::time_point start) : b_(backend), start_(start) {}

  int start_exchange(Group group, const char* send, const std::int64_t* send_counts,
                     const std::int64_t* send_displs, char* recv, const std::int64_t* recv_counts,
                     const std::int64_t* recv_displs, std::size_t elem_size,
                     const char* what) override {
    const int L = b_.local_size_, node = b_.rank_ / L, local = b_.rank_ % L;
    const bool intra = group == Group::kNode;
    Queued q;
    q.what = what;
    q.me = intra ? local : node;
    const int members = intra ? L : b_.size_ / L;
    const auto es = static_cast<std::int64_t>(elem_size);
    for (int i = 0; i < members; ++i) {
      q.peers.push_back(intra ? node * L + i : i * L + local);
      q.send.push_back(send + send_displs[i] * es);
      q.send_bytes.push_back(send_counts[i] * es);
      q.recv.push_back(recv + recv_displs[i] * es);
      q.recv_bytes.push_back(recv_counts[i] * es);
    }
    SY_CHECK(q.send_bytes[q.me] == q.recv_bytes[q.me], what, ": rank ", b_.rank_,
             " sends itself ", q.send_bytes[q.me], " bytes but expects ", q.recv_bytes[q.me]);
    queued_.push_back(std::move(q));
    return static_cast<int>(queued_.size()) - 1;
  }

  void wait(int ticket, const char*) override {
    if (ticket >= enqueued_) enqueue_queued();
  }

  void copy(char* dst, const char* src, std::int64_t bytes) override {
    SY_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(bytes),
                                  cudaMemcpyDeviceToDevice, b_.stream_));
  }

  char* scratch(int slot, std::int64_t bytes) override {
    const auto size = static_cast<std::size_t>(bytes);
    if (b_.stage_bytes_[slot] < size) {
      // Stream-ordered: the old buffer is freed after the work already on the stream, with no
      // host wait (which the time limit would not cover).
      if (b_.stage_[slot] != nullptr) SY_CUDA_CHECK(cudaFreeAsync(b_.stage_[slot], b_.stream_));
      b_.stage_[slot] = nullptr;
      b_.stage_bytes_[slot] = 0;
      SY_CUDA_CHECK(cudaMallocAsync(&b_.stage_[slot], size, b_.stream_));
      b_.stage_bytes_[slot] = size;
    }
    return static_cast<char*>(b_.stage_[slot]);
  }

 private:
  struct Queued {
    std::string what;
    int me = 0;              // this rank's index in the group
    std::vector<int> peers;  // the members' ranks in the communicator
    std::vector<const char*> send;
    std::vector<char*> recv;
    std::vector<std::int64_t> send_bytes, recv_bytes;
  };

  // Own pieces as device copies, then every other piece of every queued exchange in one group.
  // Each pair of ranks queues its exchanges in the same order, which is how NCCL matches several
  // sends to one peer within a group.
  void enqueue_queued() {
    const char* what = queued_[enqueued_].what.c_str();
    for (std::size_t e = enqueued_; e < queued_.size(); ++e) {
      const Queued& q = queued_[e];
      if (q.send_bytes[q.me] > 0) copy(q.recv[q.me], q.send[q.me], q.send_bytes[q.me]);
    }
    b_.check(ncclGroupStart(), "ncclGroupStart()", what, start_);
    for (std::size_t e = enqueued_; e < queued_.size(); ++e) {
      const Queued& q = queued_[e];
      const int m = static_cast<int>(q.peers.size());
      for (int i = 1; i < m; ++i) {  // a ring order from this rank, as exchange() uses
        const int to = (q.me + i) % m, from = (q.me - i + m) % m;
        if (q.send_bytes[to] > 0) {
          b_.check(ncclSend(q.send[to], static_cast<std::size_t>(q.send_bytes[to]), ncclInt8,
                            q.peers[to], b_.comm_, b_.stream_),
                   "ncclSend", q.what.c_str(), start_);
        }
        if (q.recv_bytes[from] > 0) {
          b_.check(ncclRecv(q.recv[from], static_cast<std::size_t>(q.recv_bytes[from]), ncclInt8,
                            q.peers[from], b_.comm_, b_.stream_),
                   "ncclRecv", q.what.c_str(), start_);
        }
      }
    }
    b_.check(ncclGroupEnd(), "ncclGroupEnd()", what, start_);
    enqueued_ = static_cast<int>(queued_.size());
  }

  NcclBackend& b_;
  Clock::time_point start_;
  std::vector<Queued> queued_;
  int enqueued_ = 0;  // queued_[0, enqueued_) are on the stream
};

void NcclBackend::run_hierarchical(const void* send, std::size_t send_bytes, void* recv,
                                   std::size_t recv_bytes, const std::int64_t* node_send_counts,
                                   const std::int64_t* recv_counts, std::size_t elem_size,
                                   A2AAlgorithm algorithm, const char* what) {
  const int chunks = algorithm == A2AAlgorithm::kPipelined ? pipeline_chunks_ : 1;
  run(what, [&](Clock::time_point start) {
    const Staged s = stage(send, send_bytes, 0, true);
    const Staged r = stage(recv, recv_bytes, 1, false);
    Subgroups subgroups(*this, start);
    hierarchical_all_to_all(subgroups, rank_, size_, local_size_, chunks,
                            static_cast<const char*>(s.device), node_send_counts,
                            static_cast<char*>(r.device), recv_counts, elem_size, what);
    copy_back(r);
  });
}

#undef SY_NCCL

ncclUniqueId unique_id_from(const std::string& bytes) {
  ncclUniqueId id;
  SY_CHECK(bytes.size() == sizeof id.internal, "make_nccl_communicator: the unique id has ",
           bytes.size(), " bytes, an ncclUniqueId has ", sizeof id.internal,
           " (make it with nccl_unique_id())");
  std::memcpy(id.internal, bytes.data(), sizeof id.internal);
  return id;
}

int current_device() {
  int device = 0;
  SY_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

}  // namespace

std::string nccl_make_unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  SY_CHECK(r == ncclSuccess, "nccl_unique_id: ncclGetUniqueId failed: ", ncclGetErrorString(r));
  return std::string(id.internal, sizeof id.internal);
}

std::unique_ptr<CommBackend> make_nccl_backend(const std::string& unique_id, int rank, int size,
                                               const CommOptions& options) {
  const ncclUniqueId id = unique_id_from(unique_id);
  SY_CHECK(cuda::device_count() > 0, "make_nccl_communicator: no usable GPU on rank ", rank);
  const int device = options.cuda_device >= 0 ? options.cuda_device : current_device();
  return std::make_unique<NcclBackend>(nullptr, &id, rank, size, device, options);
}

std::unique_ptr<CommBackend> make_nccl_backend_from_mpi(const CommOptions& options) {
  // MPI only carries the id (and the host names that pick the GPU); it is not kept.
  CommOptions mpi_options = options;
  mpi_options.local_size = 1;  // no node communicators needed here
  const std::unique_ptr<CommBackend> mpi = make_mpi_backend(nullptr, mpi_options);
  const int rank = mpi->rank(), size = mpi->size();
  // 1. Host names: this rank's index among the ranks on its machine picks its GPU.
  const std::uint64_t mine = host_hash();
  std::vector<std::uint64_t> hosts(size);
  const std::vector<std::int64_t> ones(size, 1);
  mpi->all_gather_v(&mine, 1, hosts.data(), ones.data(), sizeof mine);
  int local_rank = 0;
  for (int p = 0; p < rank; ++p) local_rank += hosts[p] == mine ? 1 : 0;
  // 2. Rank 0's id to every rank (an all-gather where only rank 0 contributes).
  ncclUniqueId id{};
  std::int64_t ok = 1;
  if (rank == 0) ok = ncclGetUniqueId(&id) == ncclSuccess ? 1 : 0;
  mpi->all_reduce(&ok, 1, DType::kI64, ReduceOp::kSum);  // a failure on rank 0 fails every rank
  SY_CHECK(ok == size, "make_nccl_communicator: ncclGetUniqueId failed on rank 0");
  std::vector<std::int64_t> counts(size, 0);
  counts[0] = sizeof id.internal;
  ncclUniqueId received{};
  mpi->all_gather_v(id.internal, rank == 0 ? counts[0] : 0, received.internal, counts.data(), 1);
  const int gpus = cuda::device_count();
  SY_CHECK(gpus > 0, "make_nccl_communicator: no usable GPU on rank ", rank,
           " (the NCCL backend needs CUDA tensors; use make_mpi_communicator on CPU)");
  const int device = options.cuda_device >= 0 ? options.cuda_device : local_rank % gpus;
  return std::make_unique<NcclBackend>(nullptr, &received, rank, size, device, options);
}

std::unique_ptr<CommBackend> make_nccl_backend_from_comm(void* nccl_comm,
                                                         const CommOptions& options) {
  auto comm = static_cast<ncclComm_t>(nccl_comm);
  int rank = 0, size = 0, device = 0;
  SY_CHECK(ncclCommUserRank(comm, &rank) == ncclSuccess &&
               ncclCommCount(comm, &size) == ncclSuccess &&
               ncclCommCuDevice(comm, &device) == ncclSuccess,
           "make_nccl_communicator: the ncclComm_t cannot be queried (not initialised, or "
           "aborted?)");
  SY_CHECK(options.cuda_device < 0 || options.cuda_device == device,
           "make_nccl_communicator: CommOptions::cuda_device is ", options.cuda_device,
           " but the ncclComm_t is on GPU ", device);
  return std::make_unique<NcclBackend>(comm, nullptr, rank, size, device, options);
}

}  // namespace switchyard::comm
