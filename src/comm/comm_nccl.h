// The NCCL backend's entry points (comm_nccl.cpp, built only with SY_WITH_NCCL). No NCCL or CUDA
// types here: comm_nccl_api.cpp, which holds the public factories in every build, includes it.
#pragma once

#include <memory>
#include <string>

#include "comm/comm.h"

namespace switchyard::comm {

// A new ncclUniqueId's bytes.
std::string nccl_make_unique_id();

// A communicator of `size` ranks made from the same id's bytes on every rank, on
// options.cuda_device (-1: the calling thread's current device).
std::unique_ptr<CommBackend> make_nccl_backend(const std::string& unique_id, int rank, int size,
                                               const CommOptions& options);

// From MPI_COMM_WORLD: rank 0's id broadcast over MPI; the GPU from options.cuda_device or, when
// -1, the rank's index among the ranks on its machine modulo the GPU count.
std::unique_ptr<CommBackend> make_nccl_backend_from_mpi(const CommOptions& options);

// Over a caller's ncclComm_t (not owned).
std::unique_ptr<CommBackend> make_nccl_backend_from_comm(void* nccl_comm,
                                                         const CommOptions& options);

}  // namespace switchyard::comm
