// A stalled rank: the last rank sleeps far past SWITCHYARD_COMM_TIMEOUT_SEC before joining an
// all-to-all. The others must time out, print "rank R: all_to_all ... timed out" and abort the
// job, which must then exit non-zero soon after the time limit (run by comm_timeout_check.cmake).
#include <chrono>
#include <cstdio>
#include <thread>

#include "switchyard/switchyard.h"

namespace sy = switchyard;

int main() {
  const auto comm = sy::make_mpi_communicator();
  const sy::index_t n = comm->size();
  const sy::Tensor send = sy::Tensor::zeros({n, 4}, sy::DType::kF32);
  const sy::Tensor recv = sy::Tensor::zeros({n, 4}, sy::DType::kF32);
  comm->all_to_all(send, recv);  // all ranks in step once
  if (comm->rank() == comm->size() - 1) std::this_thread::sleep_for(std::chrono::seconds(120));
  comm->all_to_all(send, recv);
  std::printf("rank %d: the second all_to_all completed, which it must not\n", comm->rank());
  return 0;
}
