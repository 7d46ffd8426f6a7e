// The NCCL backend's public factories, present in every build: without NCCL (no CUDA, or
// SY_WITH_NCCL=OFF, or NCCL not found) they throw a clear error. Also Communicator::device(),
// which needs no backend of its own.
#include <string>

#include "comm/comm.h"
#include "comm/comm_nccl.h"
#include "switchyard/error.h"

namespace switchyard {

Device Communicator::device() const { return backend_->device(); }

namespace {

void check_nccl_options(const CommOptions& options) {
  SY_CHECK(options.local_size >= 0, "CommOptions::local_size must be >= 0 (0: from LOCAL_SIZE ",
           "or the machine), got ", options.local_size);
  SY_CHECK(options.pipeline_chunks >= 1, "CommOptions::pipeline_chunks must be >= 1, got ",
           options.pipeline_chunks);
  SY_CHECK(options.cuda_device >= -1, "CommOptions::cuda_device must be >= 0, or -1 to choose ",
           "it from the rank, got ", options.cuda_device);
}

#ifndef SY_WITH_NCCL
[[noreturn]] void no_nccl(const char* what) {
  detail::throw_error(detail::str_cat(
      what,
      ": this build of switchyard has no NCCL backend (it needs the CUDA backend and NCCL: "
      "configure with nvcc and nccl.h/libnccl found, under the CUDA toolkit or NCCL_HOME, "
      "and -DSY_WITH_NCCL=ON)"));
}
#endif

}  // namespace

std::shared_ptr<Communicator> make_nccl_communicator(const CommOptions& options) {
  check_nccl_options(options);
#ifdef SY_WITH_NCCL
  return std::make_shared<Communicator>(comm::make_nccl_backend_from_mpi(options), options);
#else
  no_nccl("make_nccl_communicator");
#endif
}

std::shared_ptr<Communicator> make_nccl_communicator(const std::string& unique_id, int rank,
                                                     int size, const CommOptions& options) {
  check_nccl_options(options);
  SY_CHECK(size >= 1 && rank >= 0 && rank < size, "make_nccl_communicator: rank ", rank,
           " is not in [0, ", size, ")");
#ifdef SY_WITH_NCCL
  return std::make_shared<Communicator>(comm::make_nccl_backend(unique_id, rank, size, options),
                                        options);
#else
  no_nccl("make_nccl_communicator");
#endif
}

std::string nccl_unique_id() {
#ifdef SY_WITH_NCCL
  return comm::nccl_make_unique_id();
#else
  no_nccl("nccl_unique_id");
#endif
}

std::shared_ptr<Communicator> make_nccl_communicator(NcclCommHandle comm,
                                                     const CommOptions& options) {
  check_nccl_options(options);
  SY_CHECK(comm.comm != nullptr, "make_nccl_communicator: the ncclComm_t handle is null");
#ifdef SY_WITH_NCCL
  return std::make_shared<Communicator>(comm::make_nccl_backend_from_comm(comm.comm, options),
                                        options);
#else
  no_nccl("make_nccl_communicator");
#endif
}

}  // namespace switchyard
