// a2a-bench's baseline on GPUs: a plain NCCL all-to-all (one ncclGroupStart, an ncclSend and an
// ncclRecv per rank, ncclGroupEnd) on an ncclComm_t of its own, made next to the NCCL
// communicator under test. Only in builds with NCCL (a2a_bench_nccl.cpp).
#pragma once

#include <memory>

#include "switchyard/switchyard.h"

namespace switchyard::tools {

class NcclSendRecv {
 public:
  virtual ~NcclSendRecv() = default;
  // send and recv: n equal pieces, CUDA tensors on the communicator's GPU, contiguous. Returns
  // once the data is in recv.
  virtual void all_to_all(const Tensor& send, const Tensor& recv) = 0;
};

// Collective over `comm` (an NCCL communicator: rank 0's unique id reaches the others through
// it). nullptr in builds without NCCL.
std::unique_ptr<NcclSendRecv> make_nccl_sendrecv(Communicator& comm);

}  // namespace switchyard::tools
