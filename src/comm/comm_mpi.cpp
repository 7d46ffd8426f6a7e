// The MPI backend: set-up (MPI_Init_thread when needed, communicators per node and across nodes),
// flat all-to-all(v), all-gather-v, all-reduce and barrier. Every collective is non-blocking
// (MPI_I*) and polled against the time limit. The hierarchical all-to-alls are the shared ones
// (comm_a2a_hierarchical.cpp) over MpiBackend::Subgroups: MPI_Ialltoallv on the node and
// cross-node communicators, memcpy for the re-layouts.
#include "comm/comm_mpi.h"

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <vector>

#include "comm/comm_a2a_hierarchical.h"

namespace switchyard::comm {

int world_rank() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return -1;
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

void throw_mpi_error(int code, const char* call, int rank, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) std::snprintf(text, sizeof text, "?");
  detail::throw_error(detail::str_cat("MPI call ", call, " failed on rank ", rank, ": ", text, " (",
                                      file, ":", line, ")"));
}

MPI_Datatype unit_type(std::size_t elem_size) {
  switch (elem_size) {
    case 1:
      return MPI_BYTE;
    case 2:
      return MPI_UINT16_T;
    case 4:
      return MPI_UINT32_T;
    case 8:
      return MPI_UINT64_T;
    default:
      break;
  }
  detail::throw_error(detail::str_cat("MPI backend: no datatype for ", elem_size,
                                      "-byte elements (expected 1, 2, 4 or 8)"));
}

int mpi_count(std::int64_t value, const char* what) {
  SY_CHECK(value >= 0 && value <= INT_MAX, what, ": ", value,
           " elements exceed what one MPI call can move (2^31 - 1); split the call");
  return static_cast<int>(value);
}

namespace {

bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

void finalize_at_exit() {
  if (!mpi_finalized()) MPI_Finalize();
}

// Element displacements of packed pieces, as MPI counts.
void counts_and_displs(const std::int64_t* counts, int n, std::vector<int>& c, std::vector<int>& d,
                       const char* what) {
  c.resize(n);
  d.resize(n);
  std::int64_t offset = 0;
  for (int p = 0; p < n; ++p) {
    c[p] = mpi_count(counts[p], what);
    d[p] = mpi_count(offset, what);
    offset += counts[p];
  }
  mpi_count(offset, what);
}

}  // namespace

// ---- set-up ---------------------------------------------------------------------------------

MpiBackend::MpiBackend(MPI_Comm base, const CommOptions& options)
    : pipeline_chunks_(options.pipeline_chunks) {
  SY_MPI_CHECK(MPI_Comm_dup(base, &comm_));
  try {
    set_up(options);
  } catch (...) {
    free_communicators();
    throw;
  }
}

void MpiBackend::free_communicators() {
  if (mpi_finalized()) return;  // the caller finalised MPI first: nothing left to free
  for (MPI_Comm* c : {&inter_, &intra_, &comm_}) {
    if (*c != MPI_COMM_NULL) MPI_Comm_free(c);
  }
}

void MpiBackend::set_up(const CommOptions& options) {
  SY_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  SY_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  SY_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  int level = MPI_THREAD_SINGLE;
  SY_MPI_CHECK(MPI_Query_thread(&level));
  threads_ok_ = level == MPI_THREAD_MULTIPLE;

  // Ranks per node: the option, else LOCAL_SIZE, else the ranks sharing this rank's memory.
  // Nodes are consecutive blocks of local_size ranks for the hierarchical algorithms.
  int local = options.local_size > 0 ? options.local_size : env_local_size();
  bool consecutive = true;
  if (local == 0) {
    MPI_Comm shared = MPI_COMM_NULL;
    SY_MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &shared));
    int lowest = 0;
    SY_MPI_CHECK(MPI_Comm_size(shared, &local));
    SY_MPI_CHECK(MPI_Allreduce(&rank_, &lowest, 1, MPI_INT, MPI_MIN, shared));
    SY_MPI_CHECK(MPI_Comm_free(&shared));
    consecutive = lowest % local == 0 && lowest + local <= size_ && rank_ - lowest < local;
  }
  int range[2] = {-local, local};  // min and max over ranks
  SY_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, range, 2, MPI_INT, MPI_MAX, comm_));
  SY_CHECK(-range[0] == range[1], "ranks per node differ across ranks (from ", -range[0], " to ",
           range[1], "); set LOCAL_SIZE or CommOptions::local_size the same on every rank");
  SY_CHECK(local <= size_, "ranks per node (", local, ", from ",
           options.local_size > 0 ? "CommOptions::local_size" : "LOCAL_SIZE",
           ") exceed the number of ranks (", size_, ")");
  local_size_ = local;
  int ok = consecutive && size_ % local == 0 ? 1 : 0;
  SY_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, comm_));
  if (ok) {
    SY_MPI_CHECK(MPI_Comm_split(comm_, rank_ / local, rank_, &intra_));
    SY_MPI_CHECK(MPI_Comm_split(comm_, rank_ % local, rank_, &inter_));
    SY_MPI_CHECK(MPI_Comm_set_errhandler(intra_, MPI_ERRORS_RETURN));
    SY_MPI_CHECK(MPI_Comm_set_errhandler(inter_, MPI_ERRORS_RETURN));
  }
}

MpiBackend::~MpiBackend() { free_communicators(); }

std::unique_ptr<CommBackend> make_mpi_backend(const MpiCommHandle* handle,
                                              const CommOptions& options) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  SY_CHECK(!mpi_finalized(), "make_mpi_communicator: MPI has already been finalised");
  MPI_Comm base = MPI_COMM_WORLD;
  if (handle == nullptr) {
    if (!initialized) {
      int provided = 0;
      SY_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided));
      std::atexit(finalize_at_exit);
    }
  } else {
    SY_CHECK(initialized, "make_mpi_communicator(comm): MPI is not initialised; call MPI_Init ",
             "first or use make_mpi_communicator() without a communicator");
    SY_CHECK(handle->size == sizeof(MPI_Comm), "make_mpi_communicator: the handle holds ",
             handle->size, " bytes, an MPI_Comm of this MPI has ", sizeof(MPI_Comm),
             " (was it made with mpi_comm_handle(comm) from the same MPI?)");
    std::memcpy(&base, handle->address, sizeof base);
    SY_CHECK(base != MPI_COMM_NULL, "make_mpi_communicator: the communicator is MPI_COMM_NULL");
  }
  return std::make_unique<MpiBackend>(base, options);
}

// ---- waiting with a time limit --------------------------------------------------------------

void MpiBackend::wait(MPI_Request* requests, int count, const char* what, Clock::time_point start) {
  const auto wait_start = Clock::now();
  for (;;) {
    int done = 0;
    SY_MPI_CHECK(MPI_Testall(count, requests, &done, MPI_STATUSES_IGNORE));
    if (done) return;
    const auto now = Clock::now();
    const double seconds = std::chrono::duration<double>(now - start).count();
    if (seconds > timeout_seconds()) abort_timed_out(what, seconds);
    poll_backoff(wait_start);
  }
}

void MpiBackend::abort_timed_out(const char* what, double seconds) {
  std::fprintf(stderr,
               "switchyard: error: rank %d: %s timed out after %.1f s "
               "(SWITCHYARD_COMM_TIMEOUT_SEC=%g): a rank stalled, died or called a different "
               "collective; aborting the job\n",
               rank_, what, seconds, timeout_seconds());
  std::fflush(stderr);
  MPI_Abort(comm_, 1);
  std::_Exit(1);  // MPI_Abort does not return; in case it does
}

// ---- the hierarchical all-to-alls' steps ---------------------------------------------------

class MpiBackend::Subgroups final : public SubgroupExchanger {
 public:
  // `start`: the start of the collective, which the time limit counts from.
  Subgroups(MpiBackend& backend, Clock::time_point start) : backend_(backend), start_(start) {}

  int start_exchange(Group group, const char* send, const std::int64_t* send_counts,
                     const std::int64_t* send_displs, char* recv, const std::int64_t* recv_counts,
                     const std::int64_t* recv_displs, std::size_t elem_size,
                     const char* what) override {
    const bool node = group == Group::kNode;
    const int members = node ? backend_.local_size_ : backend_.size_ / backend_.local_size_;
    Pending& p = pending_.emplace_back();  // a deque: MPI keeps the arrays' addresses
    to_mpi(send_counts, send_displs, members, p.send_counts, p.send_displs, what);
    to_mpi(recv_counts, recv_displs, members, p.recv_counts, p.recv_displs, what);
    const MPI_Datatype unit = unit_type(elem_size);
    SY_MPI_CHECK(MPI_Ialltoallv(distinct_send(send, recv), p.send_counts.data(),
                                p.send_displs.data(), unit, recv, p.recv_counts.data(),
                                p.recv_displs.data(), unit, node ? backend_.intra_ : backend_.inter_,
                                &p.request));
    return static_cast<int>(pending_.size()) - 1;
  }

  void wait(int ticket, const char* what) override {
    backend_.wait(&pending_[ticket].request, 1, what, start_);
  }

  void copy(char* dst, const char* src, std::int64_t bytes) override {
    std::memcpy(dst, src, static_cast<std::size_t>(bytes));
  }

  char* scratch(int slot, std::int64_t bytes) override {
    std::vector<char>& buffer = backend_.stage_[slot];
    if (static_cast<std::int64_t>(buffer.size()) < bytes) {
      buffer.clear();
      buffer.shrink_to_fit();  // free the old one first: the stages can be large
      buffer.resize(static_cast<std::size_t>(bytes));
    }
    return buffer.data();
  }

 private:
  struct Pending {
    std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
    MPI_Request request = MPI_REQUEST_NULL;
  };

  // Element counts and displacements as MPI counts; throws where one exceeds int.
  static void to_mpi(const std::int64_t* counts, const std::int64_t* displs, int members,
                     std::vector<int>& c, std::vector<int>& d, const char* what) {
    c.resize(members);
    d.resize(members);
    for (int i = 0; i < members; ++i) {
      c[i] = mpi_count(counts[i], what);
      d[i] = mpi_count(displs[i], what);
    }
    if (members > 0) mpi_count(displs[members - 1] + counts[members - 1], what);
  }

  MpiBackend& backend_;
  Clock::time_point start_;
  std::deque<Pending> pending_;
};

// ---- collectives ----------------------------------------------------------------------------

void MpiBackend::all_to_all(const void* send, void* recv, std::int64_t count_per_peer,
                            std::size_t elem_size, A2AAlgorithm algorithm) {
  const auto start = Clock::now();
  if (algorithm != A2AAlgorithm::kFlat) {
    const std::vector<std::int64_t> node_counts(static_cast<std::size_t>(local_size_) * size_,
                                                count_per_peer);
    const std::vector<std::int64_t> recv_counts(size_, count_per_peer);
    const bool pipelined = algorithm == A2AAlgorithm::kPipelined;
    Subgroups subgroups(*this, start);
    hierarchical_all_to_all(subgroups, rank_, size_, local_size_, pipelined ? pipeline_chunks_ : 1,
                            static_cast<const char*>(send), node_counts.data(),
                            static_cast<char*>(recv), recv_counts.data(), elem_size,
                            pipelined ? "all_to_all (pipelined)" : "all_to_all (2dh)");
    return;
  }
  const char* what = "all_to_all (flat)";
  mpi_count(count_per_peer * size_, what);
  const int count = mpi_count(count_per_peer, what);
  const MPI_Datatype unit = unit_type(elem_size);
  MPI_Request request;
  SY_MPI_CHECK(MPI_Ialltoall(distinct_send(send, recv), count, unit, recv, count, unit, comm_, &request));
  wait(&request, 1, what, start);
}

void MpiBackend::all_to_all_v(const void* send, const std::int64_t* send_counts, void* recv,
                              const std::int64_t* recv_counts, std::size_t elem_size,
                              A2AAlgorithm algorithm) {
  const auto start = Clock::now();
  if (algorithm != A2AAlgorithm::kFlat) {
    // Every rank of the node needs the node's send counts to lay out the two stages.
    const bool pipelined = algorithm == A2AAlgorithm::kPipelined;
    const char* what = pipelined ? "all_to_all_v (pipelined)" : "all_to_all_v (2dh)";
    std::vector<std::int64_t> node_counts(static_cast<std::size_t>(local_size_) * size_);
    MPI_Request request;
    SY_MPI_CHECK(MPI_Iallgather(send_counts, size_, MPI_INT64_T, node_counts.data(), size_,
                                MPI_INT64_T, intra_, &request));
    wait(&request, 1, what, start);
    Subgroups subgroups(*this, start);
    hierarchical_all_to_all(subgroups, rank_, size_, local_size_, pipelined ? pipeline_chunks_ : 1,
                            static_cast<const char*>(send), node_counts.data(),
                            static_cast<char*>(recv), recv_counts, elem_size, what);
    return;
  }
  const char* what = "all_to_all_v (flat)";
  std::vector<int> sc, sd, rc, rd;
  counts_and_displs(send_counts, size_, sc, sd, what);
  counts_and_displs(recv_counts, size_, rc, rd, what);
  const MPI_Datatype unit = unit_type(elem_size);
  MPI_Request request;
  SY_MPI_CHECK(MPI_Ialltoallv(distinct_send(send, recv), sc.data(), sd.data(), unit, recv, rc.data(), rd.data(), unit,
                              comm_, &request));
  wait(&request, 1, what, start);
}

void MpiBackend::all_gather_v(const void* send, std::int64_t send_count, void* recv,
                              const std::int64_t* recv_counts, std::size_t elem_size) {
  const auto start = Clock::now();
  const char* what = "all_gather_v";
  std::vector<int> rc, rd;
  counts_and_displs(recv_counts, size_, rc, rd, what);
  const MPI_Datatype unit = unit_type(elem_size);
  MPI_Request request;
  SY_MPI_CHECK(MPI_Iallgatherv(distinct_send(send, recv), mpi_count(send_count, what), unit, recv, rc.data(), rd.data(),
                               unit, comm_, &request));
  wait(&request, 1, what, start);
}

void MpiBackend::all_reduce(void* data, std::int64_t count, DType dtype, ReduceOp op) {
  const auto start = Clock::now();
  const char* what = op == ReduceOp::kSum ? "all_reduce (sum)" : "all_reduce (max)";
  MPI_Datatype type = MPI_DATATYPE_NULL;
  switch (dtype) {
    case DType::kF32:
      type = MPI_FLOAT;
      break;
    case DType::kF64:
      type = MPI_DOUBLE;
      break;
    case DType::kI32:
      type = MPI_INT32_T;
      break;
    case DType::kI64:
      type = MPI_INT64_T;
      break;
    default:
      detail::throw_error(detail::str_cat("all_reduce: no MPI reduction for ", dtype_name(dtype)));
  }
  MPI_Request request;
  SY_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data, mpi_count(count, what), type,
                              op == ReduceOp::kSum ? MPI_SUM : MPI_MAX, comm_, &request));
  wait(&request, 1, what, start);
}

void MpiBackend::barrier() {
  const auto start = Clock::now();
  MPI_Request request;
  SY_MPI_CHECK(MPI_Ibarrier(comm_, &request));
  wait(&request, 1, "barrier", start);
}

}  // namespace switchyard::comm
