// The communication stage's backend interface. A backend moves contiguous buffers; the public
// Communicator (comm.cpp) validates tensors, makes them contiguous, resolves the algorithm and
// orders started work. Backends: comm_mpi.cpp (CPU, MPI) and comm_nccl.cpp (CUDA, NCCL), which
// both run the 2DH and pipelined all-to-alls of comm_a2a_hierarchical.cpp, and the PyTorch
// binding's torch.distributed backend (python/switchyard/csrc/binding.cpp, flat only).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "switchyard/comm.h"
#include "switchyard/device.h"
#include "switchyard/dtype.h"

namespace switchyard::comm {

// Environment knobs of the communication stage, read once (comm_env.cpp, docs/environment.md).
// SWITCHYARD_COMM_TIMEOUT_SEC: seconds a collective may take before the job is aborted (> 0;
// default 300). LOCAL_SIZE: ranks per node (0 when unset).
double timeout_seconds();
int env_local_size();

// One pause of a polling wait that began at `wait_start`: a yield for the first millisecond (ranks
// may share cores), then short sleeps, then 1 ms sleeps after 100 ms (comm_env.cpp).
void poll_backoff(std::chrono::steady_clock::time_point wait_start);

// Counts and displacements are in elements of `elem_size` bytes; pointers are host (MPI) or
// device (NCCL) memory of the backend's device. send and recv never overlap. Every call is
// collective and blocks until its data is in place (the Communicator runs it on its progress
// thread for start_* calls). `algorithm` is resolved: never kAuto.
class CommBackend {
 public:
  virtual ~CommBackend() = default;
  virtual const char* name() const = 0;
  virtual Device device() const = 0;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual int local_size() const = 0;
  // Whether size() is a multiple of local_size() with each node's ranks consecutive.
  virtual bool hierarchical_ok() const = 0;
  // Whether collectives may run on a thread other than the caller's.
  virtual bool threads_ok() const = 0;

  // count_per_peer elements to and from every rank, in rank order.
  virtual void all_to_all(const void* send, void* recv, std::int64_t count_per_peer,
                          std::size_t elem_size, A2AAlgorithm algorithm) = 0;
  // send_counts[p] elements to rank p, recv_counts[p] from rank p, packed in rank order.
  virtual void all_to_all_v(const void* send, const std::int64_t* send_counts, void* recv,
                            const std::int64_t* recv_counts, std::size_t elem_size,
                            A2AAlgorithm algorithm) = 0;
  virtual void all_gather_v(const void* send, std::int64_t send_count, void* recv,
                            const std::int64_t* recv_counts, std::size_t elem_size) = 0;
  virtual void all_reduce(void* data, std::int64_t count, DType dtype, ReduceOp op) = 0;
  virtual void barrier() = 0;
};

// Defined by comm_mpi.cpp, or by comm_no_mpi.cpp (throws) in a build without MPI.
// comm == nullptr: MPI_COMM_WORLD, initialising MPI when needed.
std::unique_ptr<CommBackend> make_mpi_backend(const MpiCommHandle* comm,
                                              const CommOptions& options);

// A Communicator over a backend made outside the library (the PyTorch binding's backend over
// torch.distributed), with the same option checks as the MPI and NCCL factories.
std::shared_ptr<Communicator> make_communicator(std::unique_ptr<CommBackend> backend,
                                                const CommOptions& options);

}  // namespace switchyard::comm
