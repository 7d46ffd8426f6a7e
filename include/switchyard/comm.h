// Communicator: the collectives expert parallelism needs (all-to-all with equal or variable
// splits, all-gather with variable counts, all-reduce, barrier) over a group of ranks, with a
// choice of all-to-all algorithm and a time limit on every collective.
//
// Backends: MPI (CPU tensors; this header needs no mpi.h) and NCCL (CUDA tensors of one GPU; this
// header needs no CUDA or NCCL header either). See make_nccl_communicator below.
//
// Threading: a Communicator is used from one thread. Blocking calls return when the data is in
// place. The start_* calls return a CommWork at once and run the collective on the
// communicator's progress thread, so CPU work can overlap it; collectives run in the order they
// were called (blocking calls first wait for the started ones), which keeps the ranks in step as
// long as every rank makes the same calls in the same order (MPI's rule).
//
// Time limit: a collective that has not completed SWITCHYARD_COMM_TIMEOUT_SEC seconds (default
// 300) after it started prints "switchyard: error: rank R: <collective> timed out ..." on stderr
// and aborts the whole job (MPI_Abort), so a stalled or dead rank makes the job exit non-zero
// instead of hanging.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/index.h"
#include "switchyard/tensor.h"

namespace switchyard {

// How all_to_all(_v) moves the data. Every algorithm gives bitwise identical results.
//  kFlat:      one all-to-all over all ranks (MPI_Alltoall(v); grouped ncclSend/ncclRecv).
//  k2DH:       hierarchical, as in Tutel: an exchange among the ranks of a node, a local
//              re-layout, then an exchange among the ranks with the same local index on the
//              other nodes; far fewer, larger inter-node messages.
//  kPipelined: 2DH with each peer's data split into chunks (CommOptions::pipeline_chunks) so
//              that chunk c's inter-node exchange runs while chunk c+1's intra-node exchange
//              does (PlanMoE's Pipe-A2A idea).
//  kAuto:      k2DH when the ranks span nodes (size() > local_size()), else kFlat.
// The hierarchical algorithms need size() to be a multiple of local_size() with each node's
// ranks consecutive; where that does not hold, kAuto picks kFlat and k2DH/kPipelined throw.
enum class A2AAlgorithm { kAuto, kFlat, k2DH, kPipelined };
const char* to_string(A2AAlgorithm algorithm);              // "auto", "flat", "2dh", "pipelined"
A2AAlgorithm parse_a2a_algorithm(const std::string& name);  // the names above; throws Error

enum class ReduceOp { kSum, kMax };

struct CommOptions {
  // The algorithm of all_to_all(_v) calls that name none (Tutel's `use_2dh`).
  A2AAlgorithm algorithm = A2AAlgorithm::kAuto;
  // Ranks per node. 0: the LOCAL_SIZE environment variable, or where it is unset, the ranks that
  // share this rank's memory (MPI_Comm_split_type SHARED). Set it (or LOCAL_SIZE) below the
  // world size to exercise the hierarchical algorithms on one machine. Must divide size().
  int local_size = 0;
  // Chunks per peer of kPipelined (>= 1).
  int pipeline_chunks = 4;
  // NCCL backend: the GPU this rank's communicator (and its tensors) use. -1: from MPI
  // (make_nccl_communicator(options)) the rank's index among the ranks on its machine modulo the
  // GPU count; otherwise the calling thread's current CUDA device (an ncclComm_t: its own).
  int cuda_device = -1;
};

// A caller's MPI communicator, passed without mpi.h: the address and size of an MPI_Comm
// object. Make one with mpi_comm_handle(comm); from mpi4py, MPI._addressof(comm) and
// MPI._sizeof(MPI.Comm). The MPI_Comm only needs to live during make_mpi_communicator (which
// duplicates it).
struct MpiCommHandle {
  const void* address = nullptr;
  std::size_t size = 0;
};
template <class MpiComm>
MpiCommHandle mpi_comm_handle(const MpiComm& comm) {
  return MpiCommHandle{&comm, sizeof comm};
}

namespace comm {
class CommBackend;
class ProgressThread;
struct WorkState;
}  // namespace comm

// The completion of a started collective. wait() blocks until the data is in place and rethrows
// what the collective threw; done() tests without blocking. Copies refer to the same work. The
// tensors passed to the start_* call must stay alive and untouched until wait() returns.
class CommWork {
 public:
  CommWork() = default;  // already done
  void wait() const;
  bool done() const;

 private:
  friend class Communicator;
  std::shared_ptr<comm::WorkState> state_;
};

class Communicator {
 public:
  explicit Communicator(std::unique_ptr<comm::CommBackend> backend, const CommOptions& options);
  ~Communicator();  // waits for started collectives
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const;
  int size() const;
  int local_size() const;            // ranks per node (see CommOptions::local_size)
  const char* backend_name() const;  // "mpi" or "nccl"
  Device device() const;             // where its tensors live: cpu (MPI) or cuda:i (NCCL)
  A2AAlgorithm default_algorithm() const { return options_.algorithm; }
  // The algorithm a call with `algorithm` (or, with none, the default) runs: never kAuto.
  A2AAlgorithm resolve(std::optional<A2AAlgorithm> algorithm = std::nullopt) const;

  // Equal-split all-to-all over the first dimension (the padded [E, C, d] expert buffer):
  // send.size(0) must be a multiple of size(); rows [p*m, (p+1)*m), m = send.size(0) / size(),
  // go to rank p, and recv's rows [p*m, (p+1)*m) come from rank p. send and recv: same shape
  // and dtype, on this backend's device (CPU for MPI), any strides (copied where needed); recv
  // is written in place and must not overlap send.
  void all_to_all(const Tensor& send, const Tensor& recv,
                  std::optional<A2AAlgorithm> algorithm = std::nullopt);
  CommWork start_all_to_all(const Tensor& send, const Tensor& recv,
                            std::optional<A2AAlgorithm> algorithm = std::nullopt);

  // Variable all-to-all of rows (packed layout): send holds send_counts[p] rows for rank p, in
  // rank order; recv receives recv_counts[p] rows from rank p, in rank order. Both counts have
  // size() entries; their sums must equal send.size(0) and recv.size(0); all other dimensions
  // of send and recv agree. recv_counts must be what the peers send (see exchange_counts).
  void all_to_all_v(const Tensor& send, const std::vector<index_t>& send_counts, const Tensor& recv,
                    const std::vector<index_t>& recv_counts,
                    std::optional<A2AAlgorithm> algorithm = std::nullopt);
  CommWork start_all_to_all_v(const Tensor& send, const std::vector<index_t>& send_counts,
                              const Tensor& recv, const std::vector<index_t>& recv_counts,
                              std::optional<A2AAlgorithm> algorithm = std::nullopt);
  // Exchanges counts first (exchange_counts), then allocates recv and runs all_to_all_v.
  // recv_counts (optional) receives the counts from each rank.
  Tensor all_to_all_v(const Tensor& send, const std::vector<index_t>& send_counts,
                      std::vector<index_t>* recv_counts = nullptr,
                      std::optional<A2AAlgorithm> algorithm = std::nullopt);
  // out[p] = what rank p has in its send_counts[rank()] (one small all-to-all). Blocking.
  std::vector<index_t> exchange_counts(const std::vector<index_t>& send_counts);

  // All-gather with a variable number of rows per rank: recv = the ranks' send tensors
  // concatenated along dimension 0 in rank order; recv_counts[p] = rows of rank p.
  void all_gather_v(const Tensor& send, const Tensor& recv,
                    const std::vector<index_t>& recv_counts);
  CommWork start_all_gather_v(const Tensor& send, const Tensor& recv,
                              const std::vector<index_t>& recv_counts);
  // Gathers the row counts first, then allocates recv. counts (optional) receives them.
  Tensor all_gather_v(const Tensor& send, std::vector<index_t>* counts = nullptr);

  // In-place element-wise reduction over ranks of f64, f32, i32 or i64 tensors (bf16/f16:
  // reduce in f32). Sums of floating values follow MPI's order, which is fixed for a given world
  // size and count, so the result is reproducible run to run but may differ from a serial sum.
  void all_reduce(const Tensor& data, ReduceOp op = ReduceOp::kSum);
  CommWork start_all_reduce(const Tensor& data, ReduceOp op = ReduceOp::kSum);
  // Small host arrays (counts, capacities, loss terms).
  std::vector<std::int64_t> all_reduce(std::vector<std::int64_t> values, ReduceOp op);
  std::vector<double> all_reduce(std::vector<double> values, ReduceOp op);

  void barrier();
  void wait_all();  // waits for every started collective

  // Configuration agreement across ranks: gathers `values` from every rank and, when any rank's
  // differ from rank 0's, throws Error on every rank naming the value and the ranks that differ:
  // "num_experts differs across ranks: rank 0 has [8]; rank 2 has [6]". Collective.
  void check_same_on_all_ranks(const std::string& name, const std::vector<std::int64_t>& values);

 private:
  // start: queue `job` on the progress thread; else wait for started work and run it here.
  CommWork submit(std::function<void()> job, bool start);

  std::unique_ptr<comm::CommBackend> backend_;
  CommOptions options_;
  std::unique_ptr<comm::ProgressThread> progress_;
};

// The MPI backend over MPI_COMM_WORLD (duplicated). Initialises MPI with MPI_THREAD_MULTIPLE
// when the caller has not initialised it (and finalises it at exit). Throws Error in a build
// without MPI.
std::shared_ptr<Communicator> make_mpi_communicator(const CommOptions& options = {});
// The MPI backend over a duplicate of the caller's communicator; MPI must be initialised. With
// less than MPI_THREAD_MULTIPLE, start_* calls run to completion before they return.
std::shared_ptr<Communicator> make_mpi_communicator(MpiCommHandle comm,
                                                    const CommOptions& options = {});

// ---- NCCL ----------------------------------------------------------------------------------
//
// The NCCL backend: tensors on the communicator's GPU (device()), collectives through NCCL
// (grouped ncclSend/ncclRecv for all_to_all(_v) and variable all_gather_v, ncclAllGather for
// equal counts, ncclAllReduce for all_reduce and barrier). Each collective is ordered after the
// work already queued on the calling thread's current stream (current_stream(device())) and the
// stream's later work after it; the call returns when the data is in place. Small host arrays
// (exchange_counts, the vector all_reduce overloads) are staged through the GPU. start_* calls
// run to completion on the calling thread before they return (GPU overlap comes from queueing
// compute on another stream first). Every A2AAlgorithm runs over NCCL, under the same rules as
// over MPI: 2DH and pipelined are one implementation over both backends (grouped
// ncclSend/ncclRecv within and across nodes, device copies for the re-layouts). Tested at one
// GPU and, through the shared code, on CPU ranks over MPI; not yet on several GPUs.
//
// Time limit: the communicator is non-blocking (ncclCommInitRankConfig, blocking = 0) and every
// collective is polled (its completion event and ncclCommGetAsyncError); one not complete after
// SWITCHYARD_COMM_TIMEOUT_SEC prints the same "switchyard: error: rank R: <collective> timed out
// ..." line as the MPI backend, aborts the communicator (ncclCommAbort) and exits the process
// with status 1 (mpirun then ends the job). An error NCCL reports (a peer failed) aborts the
// communicator and throws Error. Not available in builds without CUDA and NCCL (throws Error).

// From MPI (initialised when the caller has not, as make_mpi_communicator()): rank 0 makes an
// ncclUniqueId and broadcasts it over MPI_COMM_WORLD; ranks and size are MPI's.
std::shared_ptr<Communicator> make_nccl_communicator(const CommOptions& options = {});
// From an id made by nccl_unique_id() on one rank and sent to the others by the caller (e.g.
// over torch.distributed): every rank passes the same bytes, its rank and the world size.
std::shared_ptr<Communicator> make_nccl_communicator(const std::string& unique_id, int rank,
                                                     int size, const CommOptions& options = {});
// A new ncclUniqueId as its NCCL_UNIQUE_ID_BYTES (128) bytes.
std::string nccl_unique_id();
// An existing ncclComm_t (passed as void*), which the caller keeps owning: it must outlive the
// Communicator. Its own GPU is used; CommOptions::cuda_device must be -1 or that GPU. A blocking
// communicator is polled all the same, but a stalled peer may then block inside NCCL calls.
struct NcclCommHandle {
  void* comm = nullptr;  // ncclComm_t
};
std::shared_ptr<Communicator> make_nccl_communicator(NcclCommHandle comm,
                                                     const CommOptions& options = {});

}  // namespace switchyard
