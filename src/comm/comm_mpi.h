// The MPI backend (CPU buffers). Internal to comm_mpi.cpp: the only file that includes mpi.h.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <vector>

#include "comm/comm.h"
#include "switchyard/error.h"

namespace switchyard::comm {

[[noreturn]] void throw_mpi_error(int code, const char* call, int rank, const char* file, int line);

}  // namespace switchyard::comm

// SY_MPI_CHECK(MPI_Comm_dup(...)): throws switchyard::Error naming the call, MPI's error string,
// the rank and file:line. Our communicators return errors (MPI_ERRORS_RETURN) instead of aborting.
#define SY_MPI_CHECK(expr)                                                                     \
  do {                                                                                         \
    const int sy_mpi_rc_ = (expr);                                                             \
    if (sy_mpi_rc_ != MPI_SUCCESS)                                                             \
      ::switchyard::comm::throw_mpi_error(sy_mpi_rc_, #expr, ::switchyard::comm::world_rank(), \
                                          __FILE__, __LINE__);                                 \
  } while (0)

namespace switchyard::comm {

int world_rank();  // this process's rank in MPI_COMM_WORLD (-1 before MPI_Init)

class MpiBackend final : public CommBackend {
 public:
  MpiBackend(MPI_Comm base, const CommOptions& options);
  ~MpiBackend() override;

  const char* name() const override { return "mpi"; }
  Device device() const override { return Device::cpu(); }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_size() const override { return local_size_; }
  bool hierarchical_ok() const override { return intra_ != MPI_COMM_NULL; }
  bool threads_ok() const override { return threads_ok_; }

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
  using Clock = std::chrono::steady_clock;

  void set_up(const CommOptions& options);  // ranks per node, node communicators
  void free_communicators();

  // Polls `requests` until all complete. Past the time limit (counted from `start`, the start of
  // the collective) prints the error and aborts the job; never returns then.
  void wait(MPI_Request* requests, int count, const char* what, Clock::time_point start);
  [[noreturn]] void abort_timed_out(const char* what, double seconds);

  // The steps of the shared 2DH and pipelined all-to-alls (comm_a2a_hierarchical.h): exchanges
  // over intra_ and inter_, memcpy and host scratch. Defined in comm_mpi.cpp.
  class Subgroups;

  MPI_Comm comm_ = MPI_COMM_NULL;   // a duplicate of the caller's communicator
  MPI_Comm intra_ = MPI_COMM_NULL;  // the ranks of this node (hierarchical algorithms only)
  MPI_Comm inter_ = MPI_COMM_NULL;  // the ranks with this rank's local index, one per node
  int rank_ = 0;
  int size_ = 1;
  int local_size_ = 1;
  int pipeline_chunks_ = 1;
  bool threads_ok_ = false;
  // Scratch of the hierarchical algorithms, grown as needed (one collective runs at a time).
  std::vector<char> stage_[4];
};

// The MPI datatype that moves elements of `elem_size` bytes (bits unchanged).
MPI_Datatype unit_type(std::size_t elem_size);
// `value` as an MPI count; throws when it exceeds int.
int mpi_count(std::int64_t value, const char* what);

// NOTE: Open MPI 4.1's non-blocking collectives (libnbc) take send == recv as MPI_IN_PLACE, and a
// rank with nothing to move then returns without reserving the collective's tag, so the ranks'
// later non-blocking collectives stop matching and hang. A rank with no rows passes null for
// both buffers; this gives the send side a distinct (never read) address instead.
inline const void* distinct_send(const void* send, const void* recv) {
  static const char placeholder = 0;
  return send == recv ? &placeholder : send;
}

}  // namespace switchyard::comm
