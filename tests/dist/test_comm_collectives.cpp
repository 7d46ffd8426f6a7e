// The MPI communicator's collectives, run by ctest under `mpirun -np 2` and `-np 4` (every rank
// runs every case; only rank 0 prints the GoogleTest report, other ranks print their failures).
// Each rank computes what it must receive: element i of the piece that rank s sends to rank t
// is value(s, t, i). Every algorithm must give the flat all-to-all's bytes exactly.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "switchyard/switchyard.h"

namespace sy = switchyard;
using sy::A2AAlgorithm;
using sy::DType;
using sy::index_t;
using sy::Shape;
using sy::Tensor;

namespace {

// One communicator per ranks-per-node setting, made once (making one is collective).
std::shared_ptr<sy::Communicator> comm_with_local_size(int local_size) {
  static std::map<int, std::shared_ptr<sy::Communicator>> comms;
  auto& c = comms[local_size];
  if (!c) {
    sy::CommOptions options;
    options.local_size = local_size;
    c = sy::make_mpi_communicator(options);
  }
  return c;
}
sy::Communicator& world() { return *comm_with_local_size(0); }

// Ranks-per-node settings that divide the world size (the hierarchical algorithms need that).
std::vector<int> dividing_local_sizes() {
  std::vector<int> out;
  for (int l = 1; l <= world().size(); ++l) {
    if (world().size() % l == 0) out.push_back(l);
  }
  return out;
}

const std::vector<A2AAlgorithm> kAlgorithms = {A2AAlgorithm::kFlat, A2AAlgorithm::k2DH,
                                               A2AAlgorithm::kPipelined, A2AAlgorithm::kAuto};
const std::vector<DType> kDtypes = {DType::kF32, DType::kF64, DType::kBF16, DType::kI64};

// Element i of the piece rank src sends to rank dst; exact in i64 and distinct in f32/f64.
double value(int src, int dst, index_t i, DType dtype) {
  if (dtype == DType::kI64)
    return static_cast<double>((index_t{src} << 40) + (index_t{dst} << 20) + i);
  return src * 1000.0 + dst * 37.0 + 0.25 * static_cast<double>(i) + 0.5;
}

// Pieces packed in peer order: piece p has rows[p] rows of `row` elements; element i of piece p
// is value(src_of(p), dst_of(p), i).
Tensor packed(DType dtype, const std::vector<index_t>& rows, index_t row,
              const std::function<std::pair<int, int>(int)>& src_dst) {
  std::vector<double> v;
  index_t total = 0;
  for (std::size_t p = 0; p < rows.size(); ++p) {
    const auto [src, dst] = src_dst(static_cast<int>(p));
    for (index_t i = 0; i < rows[p] * row; ++i) v.push_back(value(src, dst, i, dtype));
    total += rows[p];
  }
  return Tensor::from_vector(v, {total, row}, dtype);
}

bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes() || a.dtype() != b.dtype()) return false;
  const Tensor x = a.contiguous(), y = b.contiguous();
  const std::size_t bytes = x.numel() * sy::dtype_size(x.dtype());
  return bytes == 0 || std::memcmp(x.data_ptr(), y.data_ptr(), bytes) == 0;
}

std::string label(A2AAlgorithm a, int local_size, DType dtype) {
  return std::string(sy::to_string(a)) + ", local_size " + std::to_string(local_size) + ", " +
         sy::dtype_name(dtype);
}

// Rows that rank src sends to rank dst: varied, with zero-size pieces, and the last rank sends
// nothing at all.
index_t v_rows(int src, int dst, int n) {
  if (src == n - 1) return 0;
  return (src + 2 * dst) % 3 + (dst == 0 ? 5 : 0);
}

}  // namespace

TEST(CommSetup, RanksAndLocalSize) {
  sy::Communicator& c = world();
  int rank = -1, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(c.rank(), rank);
  EXPECT_EQ(c.size(), size);
  EXPECT_STREQ(c.backend_name(), "mpi");
  // LOCAL_SIZE when set, else the ranks on this machine (all of them).
  const char* env = std::getenv("LOCAL_SIZE");
  EXPECT_EQ(c.local_size(), env ? std::atoi(env) : size);
  EXPECT_EQ(c.resolve(A2AAlgorithm::kAuto),
            c.size() > c.local_size() ? A2AAlgorithm::k2DH : A2AAlgorithm::kFlat);
  EXPECT_EQ(c.resolve(A2AAlgorithm::kPipelined), A2AAlgorithm::kPipelined);
  EXPECT_EQ(comm_with_local_size(1)->resolve(),
            size > 1 ? A2AAlgorithm::k2DH : A2AAlgorithm::kFlat);
}

TEST(CommSetup, ParsesAlgorithmNames) {
  EXPECT_EQ(sy::parse_a2a_algorithm("2dh"), A2AAlgorithm::k2DH);
  EXPECT_EQ(sy::parse_a2a_algorithm("pipelined"), A2AAlgorithm::kPipelined);
  EXPECT_THROW(sy::parse_a2a_algorithm("ring"), sy::Error);
}

TEST(CommAllToAll, EveryAlgorithmDeliversEachPeersPieceBitForBit) {
  const int n = world().size(), me = world().rank();
  const index_t m = 3, d = 5;  // rows per peer, row width
  for (int local_size : dividing_local_sizes()) {
    sy::Communicator& c = *comm_with_local_size(local_size);
    for (DType dtype : kDtypes) {
      const std::vector<index_t> rows(n, m);
      const Tensor send = packed(dtype, rows, d, [&](int p) { return std::make_pair(me, p); });
      const Tensor expect = packed(dtype, rows, d, [&](int p) { return std::make_pair(p, me); });
      for (A2AAlgorithm a : kAlgorithms) {
        Tensor recv = Tensor::zeros(send.sizes(), dtype);
        c.all_to_all(send, recv, a);
        EXPECT_TRUE(same_bits(recv, expect)) << label(a, local_size, dtype) << " on rank " << me;
      }
    }
  }
}

TEST(CommAllToAll, PaddedExpertBufferInCapacityChunks) {
  // The layer's padded [E, C, d] buffer, sent whole and in two chunks along C (views with
  // strides), with the pipelined algorithm: the same bytes arrive.
  sy::Communicator& c = *comm_with_local_size(1);
  const int n = c.size(), me = c.rank();
  const index_t E = 2 * n, C = 6, d = 3;
  std::vector<double> v(E * C * d);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = me * 10000.0 + static_cast<double>(i);
  const Tensor send = Tensor::from_vector(v, {E, C, d}, DType::kF32);
  Tensor whole = Tensor::zeros({E, C, d}, DType::kF32);
  c.all_to_all(send, whole, A2AAlgorithm::kFlat);
  Tensor chunked = Tensor::zeros({E, C, d}, DType::kF32);
  for (index_t start : {index_t{0}, C / 2}) {
    c.all_to_all(send.narrow(1, start, C / 2), chunked.narrow(1, start, C / 2),
                 A2AAlgorithm::kPipelined);
  }
  EXPECT_TRUE(same_bits(whole, chunked));
  // Rows [p*2, p*2+2) of the result are rank p's experts for this rank.
  const std::vector<double> got = whole.to_vector();
  for (int p = 0; p < n; ++p) {
    EXPECT_EQ(got[(2 * p) * C * d], p * 10000.0 + (2 * me) * C * d) << "from rank " << p;
  }
}

TEST(CommAllToAll, ZeroSizeBuffers) {
  const int n = world().size();
  for (int local_size : dividing_local_sizes()) {
    for (A2AAlgorithm a : kAlgorithms) {
      for (const Shape& shape : {Shape{0, 4}, Shape{index_t{2} * n, 0}}) {
        const Tensor send = Tensor::zeros(shape, DType::kF32);
        Tensor recv = Tensor::zeros(shape, DType::kF32);
        EXPECT_NO_THROW(comm_with_local_size(local_size)->all_to_all(send, recv, a));
      }
    }
  }
}

TEST(CommAllToAll, StartedCallsOverlapAndCompleteInOrder) {
  sy::Communicator& c = *comm_with_local_size(1);
  const int n = c.size(), me = c.rank();
  const std::vector<index_t> rows(n, 4);
  const Tensor send = packed(DType::kF32, rows, 8, [&](int p) { return std::make_pair(me, p); });
  const Tensor expect = packed(DType::kF32, rows, 8, [&](int p) { return std::make_pair(p, me); });
  std::vector<Tensor> recvs;
  std::vector<sy::CommWork> works;
  for (A2AAlgorithm a : kAlgorithms) {
    recvs.push_back(Tensor::zeros(send.sizes(), DType::kF32));
    works.push_back(c.start_all_to_all(send, recvs.back(), a));
  }
  // CPU work while the exchanges run.
  double acc = 0;
  for (int i = 0; i < 100000; ++i) acc += i * 1e-9;
  EXPECT_GT(acc, 0);
  for (std::size_t i = 0; i < works.size(); ++i) {
    works[i].wait();
    EXPECT_TRUE(works[i].done());
    EXPECT_TRUE(same_bits(recvs[i], expect)) << sy::to_string(kAlgorithms[i]);
  }
  // A blocking call after started ones runs after them.
  Tensor sum = Tensor::from_vector({1.0}, {1}, DType::kF64);
  sy::CommWork w = c.start_all_reduce(sum);
  c.barrier();
  EXPECT_TRUE(w.done());
  EXPECT_EQ(sum.to_vector()[0], n);
}

TEST(CommAllToAllV, VariableCountsWithEmptyPiecesAndASilentRank) {
  const int n = world().size(), me = world().rank();
  const index_t d = 3;
  std::vector<index_t> send_rows(n), recv_rows(n);
  for (int p = 0; p < n; ++p) {
    send_rows[p] = v_rows(me, p, n);
    recv_rows[p] = v_rows(p, me, n);
  }
  for (int local_size : dividing_local_sizes()) {
    sy::Communicator& c = *comm_with_local_size(local_size);
    EXPECT_EQ(c.exchange_counts(send_rows), recv_rows);
    for (DType dtype : kDtypes) {
      const Tensor send = packed(dtype, send_rows, d, [&](int p) { return std::make_pair(me, p); });
      const Tensor expect =
          packed(dtype, recv_rows, d, [&](int p) { return std::make_pair(p, me); });
      for (A2AAlgorithm a : kAlgorithms) {
        Tensor recv = Tensor::zeros(expect.sizes(), dtype);
        c.all_to_all_v(send, send_rows, recv, recv_rows, a);
        EXPECT_TRUE(same_bits(recv, expect)) << label(a, local_size, dtype) << " on rank " << me;
        std::vector<index_t> counts;
        const Tensor got = c.all_to_all_v(send, send_rows, &counts, a);
        EXPECT_EQ(counts, recv_rows);
        EXPECT_TRUE(same_bits(got, expect)) << label(a, local_size, dtype) << " (allocating)";
      }
    }
  }
}

TEST(CommAllToAllV, PipelinedWithMoreChunksThanRows) {
  // 16 chunks per peer, pieces of 0..5 rows: most chunks are empty.
  sy::CommOptions options;
  options.local_size = 1;
  options.pipeline_chunks = 16;
  options.algorithm = A2AAlgorithm::kPipelined;
  const auto c = sy::make_mpi_communicator(options);
  const int n = c->size(), me = c->rank();
  std::vector<index_t> send_rows(n), recv_rows(n);
  for (int p = 0; p < n; ++p) {
    send_rows[p] = v_rows(me, p, n);
    recv_rows[p] = v_rows(p, me, n);
  }
  const Tensor send =
      packed(DType::kF64, send_rows, 1, [&](int p) { return std::make_pair(me, p); });
  const Tensor expect =
      packed(DType::kF64, recv_rows, 1, [&](int p) { return std::make_pair(p, me); });
  EXPECT_EQ(c->resolve(), A2AAlgorithm::kPipelined);
  EXPECT_TRUE(same_bits(c->all_to_all_v(send, send_rows), expect));
}

TEST(CommAllGatherV, DifferentRowsPerRank) {
  sy::Communicator& c = world();
  const int n = c.size(), me = c.rank();
  for (DType dtype : kDtypes) {
    // Rank r contributes r rows (rank 0 none) of width 2.
    std::vector<index_t> rows(n);
    for (int p = 0; p < n; ++p) rows[p] = p;
    const Tensor send = packed(dtype, {rows[me]}, 2, [&](int) { return std::make_pair(me, 0); });
    const Tensor expect = packed(dtype, rows, 2, [&](int p) { return std::make_pair(p, 0); });
    Tensor recv = Tensor::zeros(expect.sizes(), dtype);
    c.all_gather_v(send, recv, rows);
    EXPECT_TRUE(same_bits(recv, expect)) << sy::dtype_name(dtype);
    std::vector<index_t> counts;
    EXPECT_TRUE(same_bits(c.all_gather_v(send, &counts), expect)) << sy::dtype_name(dtype);
    EXPECT_EQ(counts, rows);
  }
}

TEST(CommAllReduce, SumAndMax) {
  sy::Communicator& c = world();
  const int n = c.size(), me = c.rank();
  for (DType dtype : {DType::kF32, DType::kF64, DType::kI32, DType::kI64}) {
    Tensor t = Tensor::from_vector({1.0 * me, 2.0, -1.0 * me}, {3}, dtype);
    c.all_reduce(t, sy::ReduceOp::kSum);
    const double ranks_sum = n * (n - 1) / 2.0;
    EXPECT_EQ(t.to_vector(), (std::vector<double>{ranks_sum, 2.0 * n, -ranks_sum}))
        << sy::dtype_name(dtype);
    Tensor u = Tensor::from_vector({1.0 * me, -1.0 * me}, {2}, dtype);
    c.all_reduce(u, sy::ReduceOp::kMax);
    EXPECT_EQ(u.to_vector(), (std::vector<double>{n - 1.0, 0.0})) << sy::dtype_name(dtype);
  }
  EXPECT_EQ(c.all_reduce(std::vector<std::int64_t>{me, 7}, sy::ReduceOp::kMax),
            (std::vector<std::int64_t>{n - 1, 7}));
  EXPECT_EQ(c.all_reduce(std::vector<double>{0.5, 1.0 * me}, sy::ReduceOp::kSum),
            (std::vector<double>{0.5 * n, n * (n - 1) / 2.0}));
  // A strided view is reduced in place.
  Tensor m = Tensor::from_vector({1, 2, 3, 4}, {2, 2}, DType::kF32);
  c.all_reduce(m.narrow(1, 1, 1));
  EXPECT_EQ(m.to_vector(), (std::vector<double>{1, 2.0 * n, 3, 4.0 * n}));
  EXPECT_THROW(c.all_reduce(Tensor::zeros({2}, DType::kBF16)), sy::Error);
}

TEST(CommConfigCheck, SameValuesPass) {
  EXPECT_NO_THROW(world().check_same_on_all_ranks("num_experts", {8, 16}));
}

TEST(CommConfigCheck, DifferentValuesThrowOnEveryRankNamingTheRanks) {
  sy::Communicator& c = world();
  const int n = c.size(), me = c.rank();
  const std::int64_t E = me == n - 1 ? 6 : 8;
  try {
    c.check_same_on_all_ranks("num_experts", {E});
    ADD_FAILURE() << "rank " << me << ": no error for different num_experts";
  } catch (const sy::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("num_experts differs across ranks: rank 0 has [8]; rank " +
                       std::to_string(n - 1) + " has [6]"),
              std::string::npos)
        << msg;
  }
  // Different lengths (rank 1 gives an extra value).
  std::vector<std::int64_t> dims = {128};
  if (me == 1) dims.push_back(256);
  EXPECT_THROW(c.check_same_on_all_ranks("model_dim", dims), sy::Error);
}

TEST(CommBadInput, ClearErrors) {
  sy::Communicator& c = world();
  const int n = c.size();
  const auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const sy::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const Tensor a = Tensor::zeros({index_t{2} * n, 3}, DType::kF32);
  EXPECT_NE(message([&] {
              c.all_to_all(a, Tensor::zeros({index_t{2} * n, 3}, DType::kF64));
            }).find("send is f32, recv is f64"),
            std::string::npos);
  EXPECT_NE(message([&] {
              c.all_to_all(Tensor::zeros({index_t{2} * n + 1, 3}, DType::kF32),
                           Tensor::zeros({index_t{2} * n + 1, 3}, DType::kF32));
            }).find("must be a multiple of the number of ranks"),
            std::string::npos);
  EXPECT_NE(message([&] { c.all_to_all(a, a); }).find("overlap"), std::string::npos);
  EXPECT_NE(message([&] {
              c.all_to_all_v(a, std::vector<index_t>(n, 1), a.clone(), std::vector<index_t>(n, 2));
            }).find("send_counts add up to"),
            std::string::npos);
  EXPECT_NE(message([&] {
              c.all_to_all_v(a, std::vector<index_t>(n + 1, 0), a.clone(), {});
            }).find("entries, expected one per rank"),
            std::string::npos);
  // A GPU buffer (never touched: the check comes first).
  float dummy[4] = {};
  const Tensor gpu = Tensor::from_blob(dummy, {4}, {}, DType::kF32, sy::Device::cuda(0));
  EXPECT_NE(message([&] {
              c.all_reduce(gpu);
            }).find("MPI is not CUDA-aware here; GPU buffers go through NCCL"),
            std::string::npos);
  // Hierarchical algorithms need whole nodes: 3 ranks per node does not divide 2 or 4 ranks.
  if (n % 3 != 0 && n > 3) {
    const auto odd = comm_with_local_size(3);
    EXPECT_EQ(odd->resolve(A2AAlgorithm::kAuto), A2AAlgorithm::kFlat);
    EXPECT_NE(
        message([&] { odd->resolve(A2AAlgorithm::k2DH); }).find("multiple of the ranks per node"),
        std::string::npos);
  }
  sy::CommOptions bad;
  bad.local_size = n + 1;
  EXPECT_NE(message([&] { sy::make_mpi_communicator(bad); }).find("exceed the number of ranks"),
            std::string::npos);
  // Still usable after errors: the ranks are in step.
  EXPECT_NO_THROW(c.barrier());
}
