// `switchyard a2a-bench`: all-to-all bandwidth by message size, for each algorithm (the idea of
// Tutel's bandwidth_test, reported as nccl-tests do). Launch with `mpirun -np N switchyard
// a2a-bench`; rank 0 prints one JSON line per (algorithm, size):
//   bytes       what each rank sends in total (to all ranks, itself included)
//   ms          median over --iters timed calls after --warmup; each call's time is the slowest
//               rank's, each call starts after a barrier
//   algbw_GBps  bytes / time;  busbw_GBps = algbw * (n - 1) / n
// --backend nccl moves CUDA tensors through the NCCL communicator (one rank per GPU) and also
// times, per size, the baseline "nccl_sendrecv": one ncclGroupStart, an ncclSend and an ncclRecv
// per rank, ncclGroupEnd, on an ncclComm_t of its own (impl "nccl"; a2a_bench_nccl.cpp).
// Every (algorithm, size) is checked element by element before it is timed.
#include <fmt/core.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "a2a_bench_nccl.h"
#include "commands.h"
#include "flag_checks.h"
#include "run_info.h"

namespace switchyard::tools {
namespace {

using Clock = std::chrono::steady_clock;

struct A2ABenchFlags {
  std::vector<std::string> algorithms = {"flat", "2dh", "pipelined"};
  std::int64_t min_bytes = 1024;
  std::int64_t max_bytes = std::int64_t{256} << 20;
  int iters = 10;
  int warmup = 2;
  int pipeline_chunks = 4;
  std::string backend = "mpi";
  std::string out;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Element i of the piece rank src sends to rank dst: exact in f32 for up to 64 ranks.
float code(int src, int dst, int n, index_t i) {
  return static_cast<float>((src * n + dst) * 4096 + i % 4096);
}

// send: on the communicator's device, filled through a host copy.
void fill_send(Tensor send, int me, int n, index_t per_peer) {
  const Tensor host = Tensor::empty(send.sizes(), DType::kF32);
  float* s = host.data<float>();
  for (int p = 0; p < n; ++p) {
    for (index_t i = 0; i < per_peer; ++i) s[p * per_peer + i] = code(me, p, n, i);
  }
  send.copy_from(host);
}

// Whether every rank received what its peers sent (collective: all ranks agree).
bool received_right(Communicator& comm, const Tensor& recv, index_t per_peer) {
  const int n = comm.size(), me = comm.rank();
  const Tensor host = recv.to(Device::cpu());
  const float* r = host.data<float>();
  std::int64_t bad = 0;
  for (int p = 0; p < n; ++p) {
    for (index_t i = 0; i < per_peer; ++i) bad += r[p * per_peer + i] != code(p, me, n, i);
  }
  return comm.all_reduce(std::vector<std::int64_t>{bad}, ReduceOp::kSum)[0] == 0;
}

// The median over f.iters calls after f.warmup, each the slowest rank's time, each after a
// barrier (collective: every rank gets the same value).
template <typename Call>
double time_calls(Communicator& comm, const A2ABenchFlags& f, const Call& call) {
  std::vector<double> ms;
  for (int i = 0; i < f.warmup + f.iters; ++i) {
    comm.barrier();
    const auto start = Clock::now();
    call();
    const double t = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (i >= f.warmup) ms.push_back(t);
  }
  return median(comm.all_reduce(ms, ReduceOp::kMax));  // a call takes its slowest rank's time
}

int run_a2a_bench(const A2ABenchFlags& f) {
  if (f.min_bytes > f.max_bytes) {
    throw UsageError(
        fmt::format("--min_bytes ({}) must not exceed --max_bytes ({})", f.min_bytes, f.max_bytes));
  }
  std::vector<A2AAlgorithm> algorithms;
  for (const std::string& name : f.algorithms) {
    algorithms.push_back(
        parse_flag("--algorithm", name, "flat|2dh|pipelined|auto", parse_a2a_algorithm));
  }
  CommOptions options;
  options.pipeline_chunks = f.pipeline_chunks;
  std::shared_ptr<Communicator> comm;
  try {
    if (f.backend == "nccl") {
      comm = make_nccl_communicator(options);
    } else if (f.backend == "mpi") {
      comm = make_mpi_communicator(options);
    } else {
      throw UsageError(fmt::format("--backend: expected mpi or nccl, got '{}'", f.backend));
    }
    for (A2AAlgorithm a : algorithms) comm->resolve(a);  // throws for an impossible one
  } catch (const Error& e) {
    throw UsageError(e.what());
  }
  const int n = comm->size(), me = comm->rank();
  const bool root = me == 0;

  std::ofstream out;
  if (root && !f.out.empty()) {
    const std::filesystem::path path(f.out);
    std::error_code ec;
    if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path(), ec);
    out.open(path, std::ios::app);
    if (!out) throw UsageError(fmt::format("--out: cannot open '{}' for appending", f.out));
  }
  const std::string device = device_description(comm->device());
  const std::string date = iso_date_utc();
  const std::string commit = root ? git_commit() : "";
  // The plain NCCL baseline, only where the communicator under test is NCCL's.
  const std::unique_ptr<NcclSendRecv> baseline =
      std::string(comm->backend_name()) == "nccl" ? make_nccl_sendrecv(*comm) : nullptr;

  // One JSON line (rank 0) for `algorithm` (as named and as run) moving sent_bytes in t ms.
  const auto report = [&](const char* impl, const std::string& algorithm,
                          const std::string& resolved, std::int64_t sent_bytes, double t) {
    if (!root) return;
    const double algbw = static_cast<double>(sent_bytes) / (t * 1e-3) / 1e9;
    nlohmann::ordered_json j;
    j["impl"] = impl;
    j["backend"] = comm->backend_name();
    j["algorithm"] = algorithm;
    j["resolved"] = resolved;
    j["bytes"] = sent_bytes;
    j["ms"] = t;
    j["algbw_GBps"] = algbw;
    j["busbw_GBps"] = algbw * (n - 1) / n;
    j["world_size"] = n;
    j["local_size"] = comm->local_size();
    j["pipeline_chunks"] = f.pipeline_chunks;
    j["iters"] = f.iters;
    j["warmup"] = f.warmup;
    j["device"] = device;
    j["date"] = date;
    j["commit"] = commit;
    const std::string line = j.dump();
    fmt::print("{}\n", line);
    std::fflush(stdout);
    if (out.is_open()) out << line << '\n' << std::flush;
  };

  // Sizes: powers of two from min to max bytes; each rank sends bytes / n to every rank, in
  // 4-byte elements (sizes below 4n bytes are skipped).
  for (std::int64_t bytes = f.min_bytes; bytes <= f.max_bytes; bytes *= 2) {
    const index_t per_peer = bytes / (4 * n);
    if (per_peer == 0) continue;
    const Tensor send = Tensor::empty({per_peer * n}, DType::kF32, comm->device());
    Tensor recv = Tensor::empty({per_peer * n}, DType::kF32, comm->device());
    fill_send(send, me, n, per_peer);
    const std::int64_t sent_bytes = per_peer * n * 4;
    for (A2AAlgorithm a : algorithms) {
      recv.fill(-1);
      comm->all_to_all(send, recv, a);
      if (!received_right(*comm, recv, per_peer)) {
        throw std::runtime_error(
            fmt::format("all_to_all ({}) of {} bytes delivered wrong data; "
                        "not timed",
                        to_string(a), sent_bytes));
      }
      const double t = time_calls(*comm, f, [&] { comm->all_to_all(send, recv, a); });
      report("switchyard", to_string(a), to_string(comm->resolve(a)), sent_bytes, t);
    }
    if (baseline) {
      recv.fill(-1);
      baseline->all_to_all(send, recv);
      if (!received_right(*comm, recv, per_peer)) {
        throw std::runtime_error(fmt::format(
            "the nccl_sendrecv baseline of {} bytes delivered wrong data; not timed", sent_bytes));
      }
      const double t = time_calls(*comm, f, [&] { baseline->all_to_all(send, recv); });
      report("nccl", "nccl_sendrecv", "nccl_sendrecv", sent_bytes, t);
    }
  }
  return 0;
}

}  // namespace

Command add_a2a_bench_command(CLI::App& app) {
  auto flags = std::make_shared<A2ABenchFlags>();
  A2ABenchFlags& f = *flags;
  CLI::App* sub = app.add_subcommand(
      "a2a-bench",
      "All-to-all bandwidth by message size for each algorithm (launch with mpirun -np N); "
      "rank 0 prints one JSON line per algorithm and size.");
  sub->option_defaults()->always_capture_default();
  sub->footer(
      "bytes: what each rank sends in total; ms: median of --iters calls (the slowest rank's\n"
      "time of each); algbw_GBps = bytes / time, busbw_GBps = algbw * (n-1)/n (nccl-tests).\n"
      "With --backend nccl each size also gets the baseline algorithm \"nccl_sendrecv\" (impl\n"
      "\"nccl\"): one NCCL group of an ncclSend and an ncclRecv per rank.\n"
      "Ranks per node come from LOCAL_SIZE, else from the machine; e.g.\n"
      "  LOCAL_SIZE=2 mpirun -np 4 switchyard a2a-bench --max_bytes 16777216");
  sub->add_option("--algorithm", f.algorithms, "flat|2dh|pipelined|auto (one or more)");
  sub->add_option("--min_bytes", f.min_bytes, "Smallest message (bytes per rank)")
      ->check(at_least(1));
  sub->add_option("--max_bytes", f.max_bytes, "Largest message (bytes per rank)")
      ->check(at_least(1));
  sub->add_option("--iters", f.iters, "Timed calls per size")->check(at_least(1));
  sub->add_option("--warmup", f.warmup, "Untimed calls first")->check(at_least(0));
  sub->add_option("--pipeline_chunks", f.pipeline_chunks, "Chunks per peer of 'pipelined'")
      ->check(at_least(1));
  sub->add_option("--backend", f.backend,
                  "mpi (CPU tensors) or nccl (CUDA tensors, one GPU a rank)");
  sub->add_option("--out", f.out, "Also append the JSON lines to this file (rank 0)");
  return [flags] { return run_a2a_bench(*flags); };
}

}  // namespace switchyard::tools
