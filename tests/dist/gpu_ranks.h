// Whether every rank of an mpirun job has a GPU of its own, for the multi-rank tests that need
// one per rank (NCCL refuses two ranks on one GPU). Every rank gets the same answer, so every
// rank skips alike. Call after MPI_Init.
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>

#include <utility>

namespace sy_dist {

inline int mpi_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int mpi_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

// This rank's index among the ranks of its machine, and how many share it.
inline std::pair<int, int> local_rank_and_size() {
  MPI_Comm shared = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, mpi_rank(), MPI_INFO_NULL, &shared);
  int r = 0, n = 1;
  MPI_Comm_rank(shared, &r);
  MPI_Comm_size(shared, &n);
  MPI_Comm_free(&shared);
  return {r, n};
}

inline int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {  // 35: no driver, 100: no device
    cudaGetLastError();
    return 0;
  }
  return n;
}

// The same answer on every rank: each machine has a GPU for each of its ranks.
inline bool gpus_for_every_rank() {
  static const bool ok = [] {
    int mine = gpu_count() >= local_rank_and_size().second ? 1 : 0;
    MPI_Allreduce(MPI_IN_PLACE, &mine, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return mine == 1;
  }();
  return ok;
}

}  // namespace sy_dist
