// a2a-bench's plain NCCL grouped send/recv baseline (a2a_bench_nccl.h).
#include "a2a_bench_nccl.h"

#ifdef SY_TOOL_WITH_NCCL

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace switchyard::tools {
namespace {

void check_nccl(ncclResult_t r, const char* call) {
  if (r != ncclSuccess)
    throw std::runtime_error(std::string("nccl_sendrecv baseline: ") + call + " failed: " +
                             ncclGetErrorString(r));
}

void check_cuda(cudaError_t e, const char* call) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("nccl_sendrecv baseline: ") + call + " failed: " +
                             cudaGetErrorString(e));
}

class NcclSendRecvImpl final : public NcclSendRecv {
 public:
  explicit NcclSendRecvImpl(Communicator& comm) : rank_(comm.rank()), size_(comm.size()) {
    // Rank 0's id to every rank as a sum where the others add zeros (exact in integers).
    ncclUniqueId id{};
    std::vector<std::int64_t> words(sizeof id.internal / sizeof(std::int64_t), 0);
    if (rank_ == 0) {
      const std::string bytes = nccl_unique_id();
      std::memcpy(words.data(), bytes.data(), sizeof id.internal);
    }
    words = comm.all_reduce(words, ReduceOp::kSum);
    std::memcpy(id.internal, words.data(), sizeof id.internal);
    check_cuda(cudaSetDevice(comm.device().index), "cudaSetDevice");
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cuda(cudaEventCreateWithFlags(&written_, cudaEventDisableTiming), "cudaEventCreate");
    check_nccl(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
  }

  ~NcclSendRecvImpl() override {
    if (comm_ != nullptr) ncclCommDestroy(comm_);
    if (written_ != nullptr) cudaEventDestroy(written_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  void all_to_all(const Tensor& send, const Tensor& recv) override {
    const std::size_t piece = send.numel() * dtype_size(send.dtype()) / size_;
    const auto* s = static_cast<const char*>(send.data_ptr());
    auto* r = static_cast<char*>(recv.data_ptr());
    // The tensors were written on the library's current stream: start after its work.
    void* handle = current_stream(send.device()).handle;
    const cudaStream_t library =
        handle != nullptr ? static_cast<cudaStream_t>(handle) : cudaStreamPerThread;
    check_cuda(cudaEventRecord(written_, library), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(stream_, written_, 0), "cudaStreamWaitEvent");
    check_nccl(ncclGroupStart(), "ncclGroupStart");
    for (int p = 0; p < size_; ++p) {
      check_nccl(ncclSend(s + piece * p, piece, ncclInt8, p, comm_, stream_), "ncclSend");
      check_nccl(ncclRecv(r + piece * p, piece, ncclInt8, p, comm_, stream_), "ncclRecv");
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

 private:
  int rank_ = 0;
  int size_ = 1;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t written_ = nullptr;
};

}  // namespace

std::unique_ptr<NcclSendRecv> make_nccl_sendrecv(Communicator& comm) {
  return std::make_unique<NcclSendRecvImpl>(comm);
}

}  // namespace switchyard::tools

#else

namespace switchyard::tools {

std::unique_ptr<NcclSendRecv> make_nccl_sendrecv(Communicator&) { return nullptr; }

}  // namespace switchyard::tools

#endif
