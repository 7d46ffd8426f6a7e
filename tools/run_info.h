// What a benchmark record says about where and when it was taken (DESIGN.md §8: results carry
// the device, the date and the commit), and the mpirun world a run takes part in.
#pragma once

#include <memory>
#include <string>

#include "switchyard/switchyard.h"

namespace switchyard::tools {

// "cpu: <model name from /proc/cpuinfo>, <n> threads"; "cuda:0" for a GPU.
std::string device_description(Device device);
// Threads the CPU stages run on (OpenMP's maximum).
int cpu_threads();
// Now, UTC, ISO 8601: "2025-01-31T12:34:56Z".
std::string iso_date_utc();
// `git describe --always --dirty` of the source tree the tool was built from, run now (so
// uncommitted changes show as -dirty); the SWITCHYARD_COMMIT environment variable where set (a
// copy of the tree without its history); else "unknown".
std::string git_commit();
// Whether mpirun started this process (Open MPI, MPICH/PMI or PMIx set these in every rank's
// environment).
bool launched_by_mpi();
// The communicator over all of mpirun's ranks for layers on `device`: NCCL for cuda (one GPU per
// rank, `comm->device()` says which), MPI for cpu. Throws UsageError where it cannot be made.
std::shared_ptr<Communicator> world_communicator(const Device& device, const CommOptions& options);

}  // namespace switchyard::tools
