// The NCCL communicator, run by ctest under mpirun with the shared multi-rank main. Every
// collective runs on the same data through the MPI communicator (CPU tensors) and the NCCL one
// (CUDA tensors on the rank's GPU) and must give the same bytes; all_reduce is compared with
// exact expected values. Needs one GPU per rank on each machine (NCCL refuses two ranks on one
// GPU): otherwise every case is skipped, on every rank alike.
//
// NcclTimeout.* runs only with SY_NCCL_STALL_TEST=1 (ctest's
// mpi.comm_nccl_stalled_stream_times_out, through comm_timeout_check.cmake): the caller's stream is
// held up past the time limit, so the all_to_all must end the job with the timeout error.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dist/gpu_ranks.h"
#include "switchyard/switchyard.h"

namespace sy = switchyard;
using sy::A2AAlgorithm;
using sy::Device;
using sy::DType;
using sy::index_t;
using sy::Tensor;

namespace {

constexpr const char* kSkipped = "NCCL test skipped: no GPU for every rank on this machine";

using sy_dist::gpu_count;
using sy_dist::gpus_for_every_rank;
using sy_dist::local_rank_and_size;
using sy_dist::mpi_rank;
using sy_dist::mpi_size;

#define SKIP_WITHOUT_GPUS()                               \
  do {                                                    \
    if (!gpus_for_every_rank()) GTEST_SKIP() << kSkipped; \
  } while (0)

// Communicators made once (making one is collective) and freed before MPI_Finalize.
std::shared_ptr<sy::Communicator>& nccl_slot() {
  static std::shared_ptr<sy::Communicator> c;
  return c;
}
std::shared_ptr<sy::Communicator>& mpi_slot() {
  static std::shared_ptr<sy::Communicator> c;
  return c;
}
sy::Communicator& nccl() {
  if (!nccl_slot()) nccl_slot() = sy::make_nccl_communicator();
  return *nccl_slot();
}
sy::Communicator& mpi() {
  if (!mpi_slot()) mpi_slot() = sy::make_mpi_communicator();
  return *mpi_slot();
}

class FreeCommunicators : public ::testing::Environment {
 public:
  void TearDown() override {
    nccl_slot().reset();
    mpi_slot().reset();
  }
};
[[maybe_unused]] ::testing::Environment* const kFreeCommunicators =
    ::testing::AddGlobalTestEnvironment(new FreeCommunicators);

Device gpu() { return nccl().device(); }

const std::vector<DType> kDtypes = {DType::kF32, DType::kF64, DType::kBF16, DType::kI64};

// Element i of the piece rank src sends to rank dst; exact in i64 and distinct in f32/f64.
double value(int src, int dst, index_t i, DType dtype) {
  if (dtype == DType::kI64)
    return static_cast<double>((index_t{src} << 40) + (index_t{dst} << 20) + i);
  return src * 1000.0 + dst * 37.0 + 0.25 * static_cast<double>(i) + 0.5;
}

// This rank's pieces for every peer, packed in rank order: rows[p] rows of `row` elements.
Tensor packed(DType dtype, const std::vector<index_t>& rows, index_t row) {
  std::vector<double> v;
  index_t total = 0;
  for (std::size_t p = 0; p < rows.size(); ++p) {
    for (index_t i = 0; i < rows[p] * row; ++i)
      v.push_back(value(mpi_rank(), static_cast<int>(p), i, dtype));
    total += rows[p];
  }
  return Tensor::from_vector(v, {total, row}, dtype);
}

bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes() || a.dtype() != b.dtype()) return false;
  const Tensor x = a.to(Device::cpu()).contiguous(), y = b.to(Device::cpu()).contiguous();
  const std::size_t bytes = x.numel() * sy::dtype_size(x.dtype());
  return bytes == 0 || std::memcmp(x.data_ptr(), y.data_ptr(), bytes) == 0;
}

// Rows that rank src sends to rank dst: varied, with zero-size pieces, and the last rank sends
// nothing at all (with one rank: nothing to itself).
index_t v_rows(int src, int dst, int n) {
  if (src == n - 1) return 0;
  return (src + 2 * dst) % 3 + (dst == 0 ? 5 : 0);
}

}  // namespace

TEST(NcclSetup, RanksDeviceAndAlgorithms) {
  SKIP_WITHOUT_GPUS();
  sy::Communicator& c = nccl();
  EXPECT_STREQ(c.backend_name(), "nccl");
  EXPECT_EQ(c.rank(), mpi_rank());
  EXPECT_EQ(c.size(), mpi_size());
  const auto [local_rank, local_ranks] = local_rank_and_size();
  EXPECT_EQ(c.device(), Device::cuda(local_rank % gpu_count()));
  const char* env = std::getenv("LOCAL_SIZE");
  EXPECT_EQ(c.local_size(), env ? std::atoi(env) : local_ranks);
  // Every algorithm runs over NCCL where the nodes are whole (size a multiple of local_size);
  // auto picks 2DH only when the ranks span nodes.
  EXPECT_EQ(c.resolve(A2AAlgorithm::kFlat), A2AAlgorithm::kFlat);
  if (c.size() % c.local_size() == 0) {
    EXPECT_EQ(c.resolve(A2AAlgorithm::kAuto),
              c.size() > c.local_size() ? A2AAlgorithm::k2DH : A2AAlgorithm::kFlat);
    EXPECT_EQ(c.resolve(A2AAlgorithm::k2DH), A2AAlgorithm::k2DH);
    EXPECT_EQ(c.resolve(A2AAlgorithm::kPipelined), A2AAlgorithm::kPipelined);
  }
  // CPU tensors are refused with a message that names the device.
  const Tensor cpu = Tensor::zeros({c.size(), 2}, DType::kF32);
  EXPECT_THROW(c.all_to_all(cpu, cpu.clone()), sy::Error);
}

TEST(NcclAllToAll, MatchesMpiBitForBit) {
  SKIP_WITHOUT_GPUS();
  const int n = nccl().size();
  for (DType dtype : kDtypes) {
    for (index_t per_peer : {index_t{0}, index_t{1}, index_t{3}}) {
      SCOPED_TRACE(std::string(sy::dtype_name(dtype)) + ", rows per peer " +
                   std::to_string(per_peer));
      const index_t row = 5;
      const Tensor send = packed(dtype, std::vector<index_t>(n, per_peer), row);
      const Tensor expected = Tensor::zeros(send.sizes(), dtype);
      mpi().all_to_all(send, expected);

      const Tensor send_gpu = send.to(gpu());
      const Tensor recv = Tensor::zeros(send.sizes(), dtype, gpu());
      nccl().all_to_all(send_gpu, recv);
      EXPECT_TRUE(same_bits(recv, expected));

      // Started (runs before it returns over NCCL), and the default algorithm named.
      const Tensor started = Tensor::zeros(send.sizes(), dtype, gpu());
      nccl().start_all_to_all(send_gpu, started, A2AAlgorithm::kAuto).wait();
      EXPECT_TRUE(same_bits(started, expected));

      // A strided receive buffer (the columns of a wider tensor) is staged and copied back.
      const Tensor wide = Tensor::zeros({send.size(0), row + 3}, dtype, gpu());
      nccl().all_to_all(send_gpu, wide.narrow(1, 1, row));
      EXPECT_TRUE(same_bits(wide.narrow(1, 1, row), expected));
    }
  }
}

// 2DH and pipelined over NCCL (the shared hierarchical code on grouped ncclSend/ncclRecv and
// device copies) against MPI's flat all-to-all. At one rank only the local copies and host
// staging run; with more GPUs (and LOCAL_SIZE below the rank count) the exchanges do too.
TEST(NcclAllToAll, HierarchicalAlgorithmsMatchMpi) {
  SKIP_WITHOUT_GPUS();
  const int n = nccl().size(), me = nccl().rank();
  if (n % nccl().local_size() != 0) GTEST_SKIP() << "ranks per node do not divide the ranks";
  for (A2AAlgorithm algorithm : {A2AAlgorithm::k2DH, A2AAlgorithm::kPipelined}) {
    for (DType dtype : kDtypes) {
      SCOPED_TRACE(std::string(sy::to_string(algorithm)) + ", " + sy::dtype_name(dtype));
      // Equal pieces: 3 rows split into 4 chunks leaves some chunks empty.
      for (index_t per_peer : {index_t{0}, index_t{3}, index_t{10}}) {
        const Tensor send = packed(dtype, std::vector<index_t>(n, per_peer), 5);
        const Tensor expected = Tensor::zeros(send.sizes(), dtype);
        mpi().all_to_all(send, expected, A2AAlgorithm::kFlat);
        const Tensor recv = Tensor::zeros(send.sizes(), dtype, gpu());
        nccl().all_to_all(send.to(gpu()), recv, algorithm);
        EXPECT_TRUE(same_bits(recv, expected)) << "rows per peer " << per_peer;
        // A strided receive buffer is staged and copied back, as for the flat one.
        const Tensor wide = Tensor::zeros({send.size(0), 8}, dtype, gpu());
        nccl().all_to_all(send.to(gpu()), wide.narrow(1, 2, 5), algorithm);
        EXPECT_TRUE(same_bits(wide.narrow(1, 2, 5), expected));
      }
      // Variable pieces, zero-size ones included.
      std::vector<index_t> send_counts(n);
      for (int p = 0; p < n; ++p) send_counts[p] = v_rows(me, p, n);
      const Tensor send = packed(dtype, send_counts, 3);
      const Tensor expected = mpi().all_to_all_v(send, send_counts, nullptr, A2AAlgorithm::kFlat);
      std::vector<index_t> counts;
      const Tensor recv = nccl().all_to_all_v(send.to(gpu()), send_counts, &counts, algorithm);
      EXPECT_TRUE(same_bits(recv, expected));
    }
  }
}

TEST(NcclAllToAll, OnTheCallersStream) {
  SKIP_WITHOUT_GPUS();
  const int n = nccl().size();
  sy::CudaStream stream(gpu());
  sy::StreamGuard guard(stream.stream());
  // Written on the caller's stream just before the call: the collective must see it.
  Tensor send = Tensor::empty({n * 64, 1024}, DType::kF32, gpu());
  send.fill(nccl().rank() + 1.0);
  const Tensor recv = Tensor::empty(send.sizes(), DType::kF32, gpu());
  nccl().all_to_all(send, recv);
  const std::vector<double> got = recv.to_vector();
  for (int p = 0; p < n; ++p) {
    EXPECT_EQ(got[static_cast<std::size_t>(p) * 64 * 1024], p + 1.0);
    EXPECT_EQ(got[(static_cast<std::size_t>(p) + 1) * 64 * 1024 - 1], p + 1.0);
  }
}

TEST(NcclAllToAllV, ZeroSizePiecesMatchMpi) {
  SKIP_WITHOUT_GPUS();
  const int n = nccl().size(), me = nccl().rank();
  for (DType dtype : kDtypes) {
    SCOPED_TRACE(sy::dtype_name(dtype));
    const index_t row = 3;
    std::vector<index_t> send_counts(n);
    for (int p = 0; p < n; ++p) send_counts[p] = v_rows(me, p, n);
    const Tensor send = packed(dtype, send_counts, row);

    // Counts: exchanged through the GPU (host arrays staged) as MPI exchanges them.
    const std::vector<index_t> recv_counts = nccl().exchange_counts(send_counts);
    EXPECT_EQ(recv_counts, mpi().exchange_counts(send_counts));
    for (int p = 0; p < n; ++p) EXPECT_EQ(recv_counts[p], v_rows(p, me, n));

    std::vector<index_t> mpi_counts;
    const Tensor expected = mpi().all_to_all_v(send, send_counts, &mpi_counts);

    const Tensor send_gpu = send.to(gpu());
    std::vector<index_t> got_counts;
    const Tensor recv = nccl().all_to_all_v(send_gpu, send_counts, &got_counts);
    EXPECT_EQ(got_counts, mpi_counts);
    EXPECT_EQ(recv.device(), gpu());
    EXPECT_TRUE(same_bits(recv, expected));

    const Tensor into = Tensor::zeros(expected.sizes(), dtype, gpu());
    nccl().start_all_to_all_v(send_gpu, send_counts, into, recv_counts).wait();
    EXPECT_TRUE(same_bits(into, expected));
  }
}

TEST(NcclAllGatherV, VariableAndEqualCountsMatchMpi) {
  SKIP_WITHOUT_GPUS();
  const int me = nccl().rank();
  for (DType dtype : kDtypes) {
    // Variable (rank r has r % 3 rows: zero on rank 0) and equal (NCCL's all-gather) counts.
    for (bool equal : {false, true}) {
      SCOPED_TRACE(std::string(sy::dtype_name(dtype)) + (equal ? ", equal" : ", variable"));
      const index_t rows = equal ? 4 : me % 3;
      std::vector<double> v;
      for (index_t i = 0; i < rows * 6; ++i) v.push_back(value(me, 0, i, dtype));
      const Tensor send = Tensor::from_vector(v, {rows, 6}, dtype);
      std::vector<index_t> mpi_counts, counts;
      const Tensor expected = mpi().all_gather_v(send, &mpi_counts);
      const Tensor got = nccl().all_gather_v(send.to(gpu()), &counts);
      EXPECT_EQ(counts, mpi_counts);
      EXPECT_TRUE(same_bits(got, expected));

      const Tensor into = Tensor::zeros(expected.sizes(), dtype, gpu());
      nccl().start_all_gather_v(send.to(gpu()), into, counts).wait();
      EXPECT_TRUE(same_bits(into, expected));
    }
  }
}

TEST(NcclAllReduce, SumAndMaxAreExact) {
  SKIP_WITHOUT_GPUS();
  const int n = nccl().size(), me = nccl().rank();
  for (DType dtype : {DType::kF32, DType::kF64, DType::kI32, DType::kI64}) {
    for (sy::ReduceOp op : {sy::ReduceOp::kSum, sy::ReduceOp::kMax}) {
      SCOPED_TRACE(std::string(sy::dtype_name(dtype)) +
                   (op == sy::ReduceOp::kSum ? ", sum" : ", max"));
      // Small integers: exact in every dtype and every summation order.
      const index_t count = 1000;
      std::vector<double> v(count), want(count);
      for (index_t i = 0; i < count; ++i) {
        v[i] = static_cast<double>((i * 7 + me * 13) % 101) - 50;
        double acc = op == sy::ReduceOp::kSum ? 0 : -1e9;
        for (int r = 0; r < n; ++r) {
          const double x = static_cast<double>((i * 7 + r * 13) % 101) - 50;
          acc = op == sy::ReduceOp::kSum ? acc + x : std::max(acc, x);
        }
        want[i] = acc;
      }
      const Tensor data = Tensor::from_vector(v, {count}, dtype).to(gpu());
      nccl().all_reduce(data, op);
      EXPECT_EQ(data.to_vector(), want);
      const Tensor started = Tensor::from_vector(v, {count}, dtype).to(gpu());
      nccl().start_all_reduce(started, op).wait();
      EXPECT_EQ(started.to_vector(), want);
    }
  }
  // The host-array overloads (staged through the GPU).
  const std::vector<std::int64_t> sums =
      nccl().all_reduce(std::vector<std::int64_t>{me, 1, -me}, sy::ReduceOp::kSum);
  EXPECT_EQ(sums, (std::vector<std::int64_t>{std::int64_t{n} * (n - 1) / 2, n,
                                             -std::int64_t{n} * (n - 1) / 2}));
  const std::vector<double> maxes =
      nccl().all_reduce(std::vector<double>{me + 0.5, -me - 0.5}, sy::ReduceOp::kMax);
  EXPECT_EQ(maxes, (std::vector<double>{n - 0.5, -0.5}));
  nccl().barrier();
}

TEST(NcclBootstrap, FromUniqueIdBytes) {
  SKIP_WITHOUT_GPUS();
  std::string id = mpi_rank() == 0 ? sy::nccl_unique_id() : std::string(128, '\0');
  ASSERT_EQ(id.size(), 128u);
  MPI_Bcast(id.data(), 128, MPI_CHAR, 0, MPI_COMM_WORLD);
  sy::CommOptions options;
  options.cuda_device = nccl().device().index;
  const auto c = sy::make_nccl_communicator(id, mpi_rank(), mpi_size(), options);
  EXPECT_EQ(c->rank(), mpi_rank());
  EXPECT_EQ(c->size(), mpi_size());
  EXPECT_EQ(c->device(), nccl().device());
  const int n = c->size();
  const std::vector<std::int64_t> sum =
      c->all_reduce(std::vector<std::int64_t>{mpi_rank()}, sy::ReduceOp::kSum);
  EXPECT_EQ(sum[0], std::int64_t{n} * (n - 1) / 2);
  EXPECT_THROW(sy::make_nccl_communicator(std::string(5, 'x'), 0, 1), sy::Error);
}

TEST(NcclBootstrap, OverTheCallersNcclComm) {
  SKIP_WITHOUT_GPUS();
  ncclUniqueId id{};
  if (mpi_rank() == 0) {
    ASSERT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  }
  MPI_Bcast(id.internal, sizeof id.internal, MPI_CHAR, 0, MPI_COMM_WORLD);
  ASSERT_EQ(cudaSetDevice(nccl().device().index), cudaSuccess);
  ncclComm_t raw = nullptr;
  ASSERT_EQ(ncclCommInitRank(&raw, mpi_size(), id, mpi_rank()), ncclSuccess);
  {
    const auto c = sy::make_nccl_communicator(sy::NcclCommHandle{raw});
    EXPECT_EQ(c->rank(), mpi_rank());
    EXPECT_EQ(c->device(), nccl().device());
    const int n = c->size();
    const std::vector<index_t> rows(n, 2);
    const Tensor send = packed(DType::kF32, rows, 3);
    const Tensor expected = Tensor::zeros(send.sizes(), DType::kF32);
    mpi().all_to_all(send, expected);
    const Tensor recv = Tensor::zeros(send.sizes(), DType::kF32, c->device());
    c->all_to_all(send.to(c->device()), recv);
    EXPECT_TRUE(same_bits(recv, expected));
    sy::CommOptions other;
    other.cuda_device = c->device().index + 1;
    EXPECT_THROW(sy::make_nccl_communicator(sy::NcclCommHandle{raw}, other), sy::Error);
  }
  EXPECT_EQ(ncclCommDestroy(raw), ncclSuccess);  // still the caller's
}

namespace {

void CUDART_CB sleep_for_two_minutes(void*) {
  std::this_thread::sleep_for(std::chrono::minutes(2));
}

}  // namespace

TEST(NcclTimeout, StalledStreamEndsTheJob) {
  const char* enabled = std::getenv("SY_NCCL_STALL_TEST");
  if (enabled == nullptr || std::string(enabled) != "1")
    GTEST_SKIP() << "run by ctest's mpi.comm_nccl_stalled_stream_times_out";
  SKIP_WITHOUT_GPUS();
  const int n = nccl().size();
  const Tensor send = Tensor::zeros({n, 4}, DType::kF32, gpu());
  const Tensor recv = Tensor::zeros({n, 4}, DType::kF32, gpu());
  nccl().all_to_all(send, recv);  // every rank in step once
  // The caller's stream cannot reach the next collective for two minutes: like a rank that
  // stalls, the all_to_all must not complete and the time limit must end the job.
  ASSERT_EQ(cudaLaunchHostFunc(cudaStreamPerThread, sleep_for_two_minutes, nullptr), cudaSuccess);
  nccl().all_to_all(send, recv);
  ADD_FAILURE() << "the all_to_all behind a stalled stream completed, which it must not";
}
