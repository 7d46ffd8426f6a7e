// `switchyard bench`: one JSON line per (named config, layout) with the median forward and
// backward times of one MoE layer, its useful TFLOPS, and the TFLOPS of a dense GEMM of the
// same work timed in the same run (DESIGN.md §8). Every case is checked (finite output and
// gradients, nothing dropped when dropless) before it is timed.
// Under mpirun the layer is expert parallel over the world (NCCL on CUDA, MPI on the CPU): each
// rank times its own tokens, every step starts at a barrier, a step's time is the slowest rank's,
// and TFLOPS are per rank, all-to-all included; rank 0 prints.
#include <fmt/core.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_configs.h"
#include "commands.h"
#include "core/math_mode.h"
#include "experts/gemm.h"
#include "flag_checks.h"
#include "progress.h"
#include "run_info.h"
#include "tensor_ops.h"

namespace switchyard::tools {
namespace {

using Clock = std::chrono::steady_clock;

struct BenchFlags {
  std::string device = "cpu";
  std::vector<std::string> configs;
  std::string dtype = "f32";
  std::string layout = "both";
  int iters = 10;
  int warmup = 2;
  index_t tokens = 0;  // 0: the config's T
  std::string out;
  bool list = false;
  std::uint64_t seed = 1;
  bool use_tensorcore = false;          // f32 on CUDA: TF32 expert GEMMs, and a TF32 dense baseline
  std::vector<int> overlap_degrees{1};  // under mpirun: one line per degree
  std::string a2a;                      // under mpirun: the all-to-all algorithm (empty: auto)
};

// One timed case: a config in a layout, and under mpirun its communicator and overlap degree.
struct CaseSetup {
  std::shared_ptr<Communicator> comm;  // null: one process
  int overlap_degree = 1;
  std::optional<A2AAlgorithm> a2a;
};

// The two layouts a config is timed in: padded at capacity_factor 1 (fixed shapes, drops) and
// packed dropless (capacity_factor 0).
struct LayoutCase {
  Layout layout;
  double capacity_factor;
};
constexpr LayoutCase kPadded{Layout::kPadded, 1.0};
constexpr LayoutCase kPacked{Layout::kPacked, 0.0};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// Waits until the device has finished the work queued on the current stream (CPU ops return
// finished).
void wait_for(const Tensor& t) { synchronize(current_stream(t.device())); }

// Median ms of a dense GEMM with the experts' total work: [M=T*k, K=d] x [K, N=h].
// Uses the library's GEMM (src/experts/gemm.h: BLAS on the CPU, cuBLAS on CUDA), so the ratio
// compares the MoE layer with the best the same library does on one matrix.
std::optional<double> dense_gemm_ms(index_t m, index_t n, index_t k, DType dtype, Device device,
                                    const BenchFlags& f) {
  const Tf32Scope tf32(f.use_tensorcore);  // the same math as the layer's expert GEMMs
  const Tensor a = random_normal(m, k, f.seed, 100, dtype, device);
  const Tensor b = random_normal(n, k, f.seed, 101, dtype, device);
  Tensor c = Tensor::empty({m, n}, dtype, device);
  gemm(a, false, b, true, c);
  if (!all_finite(c)) throw std::runtime_error("dense GEMM baseline gave NaN/Inf");
  for (int i = 0; i < f.warmup; ++i) gemm(a, false, b, true, c);
  wait_for(c);
  std::vector<double> ms;
  for (int i = 0; i < f.iters; ++i) {
    const auto start = Clock::now();
    gemm(a, false, b, true, c);
    wait_for(c);
    ms.push_back(ms_since(start));
  }
  return median(ms);
}

// Keeps the GPU busy with GEMMs for about a second before the first case: its clocks rise under
// load over a longer time than one case's warm-up iterations take, and tutel_default timed
// first measured a 0.75-0.85 ms forward against 0.59 ms timed after two other configs.
void warm_up_gpu(DType dtype, Device device, const BenchFlags& f) {
  const index_t n = 4096;
  const Tensor a = random_normal(n, n, f.seed, 102, dtype, device);
  Tensor c = Tensor::empty({n, n}, dtype, device);
  const auto start = Clock::now();
  while (ms_since(start) < 1000.0) {
    for (int i = 0; i < 10; ++i) gemm(a, false, a, true, c);
    wait_for(c);
  }
}

// The slowest rank's value of each entry (the values themselves in one process).
std::vector<double> slowest(const CaseSetup& cs, std::vector<double> v) {
  return cs.comm ? cs.comm->all_reduce(std::move(v), ReduceOp::kMax) : v;
}

nlohmann::ordered_json run_case(const BenchConfig& bc, const LayoutCase& lc, DType dtype,
                                Device device, const BenchFlags& f, const CaseSetup& cs,
                                ProgressLine& progress) {
  const index_t T = f.tokens > 0 ? f.tokens : bc.num_tokens;  // per rank under mpirun
  const int rank = cs.comm ? cs.comm->rank() : 0;
  MoEConfig cfg;
  cfg.model_dim = bc.model_dim;
  cfg.hidden_size = bc.hidden_size;
  cfg.num_experts = bc.num_experts;
  cfg.top_k = bc.top_k;
  cfg.activation = bc.activation;
  cfg.dtype = dtype;
  cfg.device = device;
  cfg.seed = f.seed;
  cfg.use_tensorcore = f.use_tensorcore;
  cfg.capacity_factor = lc.capacity_factor;
  cfg.layout = lc.layout;
  cfg.rules = bc.rules;
  cfg.score_fn = bc.score_fn;
  cfg.num_groups = bc.num_groups;
  cfg.topk_groups = bc.topk_groups;
  cfg.shared_expert_hidden = bc.shared_hidden;
  cfg.overlap_degree = cs.overlap_degree;
  const std::string label =
      cs.comm ? fmt::format("{} {} overlap {}", bc.name, to_string(lc.layout), cs.overlap_degree)
              : fmt::format("{} {}", bc.name, to_string(lc.layout));

  // Each rank its own tokens (rank 0 draws what one process draws).
  const auto stream = static_cast<std::uint64_t>(2 * rank);
  const Tensor x = random_normal(T, bc.model_dim, f.seed, stream, dtype, device);
  const Tensor dy = random_normal(T, bc.model_dim, f.seed, stream + 1, dtype, device);

  // 1. Build and run once; what the library rejects here is a configuration it cannot run.
  std::unique_ptr<MoELayer> layer;
  ForwardResult r;
  Tensor dx;
  try {
    layer = cs.comm ? std::make_unique<MoELayer>(cfg, cs.comm) : std::make_unique<MoELayer>(cfg);
    ForwardOptions first;
    first.a2a_algorithm = cs.a2a;
    r = layer->forward(x, first);
    dx = layer->backward(dy);
  } catch (const Error& e) {
    throw UsageError(fmt::format("{}: {}", label, e.what()));
  }

  // 2. Check before timing: a fast wrong answer is not a result. Under mpirun every rank stops
  // when any rank's check fails (the others would wait for it in the next collective).
  std::string problem;
  if (r.y.sizes() != x.sizes())
    problem = "forward output has the wrong shape";
  else if (!all_finite(r.y))
    problem = "forward output has NaN/Inf";
  else if (!all_finite(dx))
    problem = "input gradient has NaN/Inf";
  for (Parameter* p : layer->parameters()) {
    if (problem.empty() && p->grad.defined() && !all_finite(p->grad))
      problem = "gradient of " + p->name + " has NaN/Inf";
  }
  if (problem.empty() && lc.capacity_factor == 0.0 && r.stats.dropped_choices != 0)
    problem = fmt::format("dropless routing dropped {} choices", r.stats.dropped_choices);
  const bool any_rank_failed =
      cs.comm ? cs.comm->all_reduce(std::vector<std::int64_t>{!problem.empty()}, ReduceOp::kMax)[0]
              : !problem.empty();
  if (any_rank_failed) {
    throw std::runtime_error(fmt::format(
        "{}: {}; not timed", label, problem.empty() ? "another rank's check failed" : problem));
  }
  const int k = r.stats.top_k;
  // Choices dropped on all ranks.
  const auto dropped = static_cast<index_t>(
      cs.comm ? cs.comm->all_reduce(std::vector<std::int64_t>{r.stats.dropped_choices},
                                    ReduceOp::kSum)[0]
              : r.stats.dropped_choices);

  // 3. Warm up, then time forward and backward apart.
  const int total = f.warmup + f.iters;
  ForwardOptions timed;
  timed.host_stats = false;  // the step itself needs no sync; its statistics were checked above
  timed.a2a_algorithm = cs.a2a;
  std::vector<double> fwd_ms, bwd_ms;
  for (int i = 0; i < total; ++i) {
    progress.update(fmt::format("{}: iteration {}/{}", label, i + 1, total));
    if (i == f.warmup) reset_peak_memory(device);
    // Gradients unset before each step, as the torch layers it is compared with (p.grad = None):
    // backward creates them. Freeing them runs on the stream: keep it out of forward.
    layer->zero_grad(/*set_to_none=*/true);
    synchronize(current_stream(device));
    if (cs.comm) cs.comm->barrier();  // every rank starts the step together
    auto start = Clock::now();
    r = layer->forward(x, timed);
    wait_for(r.y);
    const double fwd = ms_since(start);
    start = Clock::now();
    dx = layer->backward(dy);
    wait_for(dx);
    const double bwd = ms_since(start);
    if (i >= f.warmup) {
      fwd_ms.push_back(fwd);
      bwd_ms.push_back(bwd);
    }
  }
  fwd_ms = slowest(cs, fwd_ms);
  bwd_ms = slowest(cs, bwd_ms);
  const auto peak_bytes = static_cast<std::int64_t>(
      slowest(cs, {static_cast<double>(memory_stats(device).peak_bytes)})[0]);
  r = ForwardResult{};
  dx = Tensor();

  progress.update(fmt::format("{}: dense GEMM baseline", label), /*force=*/true);
  const double matrices = is_gated(bc.activation) ? 3.0 : 2.0;
  // Useful work: 2*T*k*d*h per expert weight matrix, x3 for forward + backward (DESIGN.md §8),
  // plus the shared expert's on every token; T is this rank's tokens.
  const double flops_per_matrix =
      2.0 * static_cast<double>(T) * k * static_cast<double>(bc.model_dim) * bc.hidden_size;
  const double shared_flops_per_matrix =
      2.0 * static_cast<double>(T) * static_cast<double>(bc.model_dim) * bc.shared_hidden;
  const double ms_fwd = median(fwd_ms);
  const double ms_bwd = median(bwd_ms);
  const double tflops = 3.0 * matrices * (flops_per_matrix + shared_flops_per_matrix) /
                        ((ms_fwd + ms_bwd) * 1e-3) / 1e12;
  const std::optional<double> dense_ms =
      dense_gemm_ms(T * k, bc.hidden_size, bc.model_dim, dtype, device, f);

  nlohmann::ordered_json j;
  j["impl"] = "switchyard";
  j["config"] = bc.name;
  j["device"] = device_description(device);
  if (device.is_cpu()) j["threads"] = cpu_threads();
  j["dtype"] = dtype_name(dtype);
  j["T"] = T;
  j["d"] = bc.model_dim;
  j["h"] = bc.hidden_size;
  j["E"] = bc.num_experts;
  j["k"] = k;
  j["layout"] = to_string(lc.layout);
  j["capacity_factor"] = lc.capacity_factor;
  j["activation"] = to_string(bc.activation);
  if (bc.expert_parallel || cs.comm) {
    j["ranks"] = cs.comm ? cs.comm->size() : 1;
    j["overlap_degree"] = cs.overlap_degree;
    j["a2a"] = cs.comm ? to_string(cs.comm->resolve(cs.a2a)) : "none";
    j["rules"] = to_string(bc.rules);
    j["score_fn"] = to_string(bc.score_fn);
    j["num_groups"] = bc.num_groups;
    j["topk_groups"] = bc.topk_groups;
    j["shared_hidden"] = bc.shared_hidden;
  }
  j["use_tensorcore"] = f.use_tensorcore;
  j["ms_fwd"] = ms_fwd;
  j["ms_bwd"] = ms_bwd;
  j["tflops"] = tflops;
  if (dense_ms) {
    const double dense_tflops = flops_per_matrix / (*dense_ms * 1e-3) / 1e12;
    j["dense_tflops"] = dense_tflops;
    j["ratio"] = tflops / dense_tflops;
  } else {
    j["dense_tflops"] = nullptr;  // no dense GEMM baseline on this device yet
    j["ratio"] = nullptr;
  }
  j["peak_mem_bytes"] = peak_bytes;
  j["dropped"] = dropped;
  j["iters"] = f.iters;
  j["warmup"] = f.warmup;
  j["date"] = iso_date_utc();
  j["commit"] = git_commit();
  return j;
}

void list_configs() {
  for (const BenchConfig& c : bench_configs()) {
    std::string note;
    if (c.expert_parallel)
      note = fmt::format(
          "  (expert parallel: T per rank, E in all; default for --device {} under "
          "mpirun)",
          c.cpu_default ? "cpu" : "cuda");
    else if (c.cpu_default)
      note = "  (default for --device cpu)";
    fmt::print("{:<15} T={:<6} d={:<5} h={:<6} E={:<4} k={} {}{}\n", c.name, c.num_tokens,
               c.model_dim, c.hidden_size, c.num_experts, c.top_k, to_string(c.activation), note);
  }
}

int run_bench(const BenchFlags& f) {
  if (f.list) {
    list_configs();
    return 0;
  }
  const DType dtype = parse_dtype_flag(f.dtype);
  Device device = parse_device_flag(f.device);
  std::vector<LayoutCase> layouts;
  if (f.layout == "both") {
    layouts = {kPadded, kPacked};
  } else {
    const Layout l = parse_flag("--layout", f.layout, "both|padded|packed", parse_layout);
    if (l == Layout::kPadded)
      layouts = {kPadded};
    else if (l == Layout::kPacked)
      layouts = {kPacked};
    else
      throw UsageError("--layout: expected one of both|padded|packed, got 'auto'");
  }
  // Under mpirun every case is expert parallel over the world.
  CaseSetup setup;
  if (!f.a2a.empty())
    setup.a2a = parse_flag("--a2a", f.a2a, "flat|2dh|pipelined|auto", parse_a2a_algorithm);
  if (launched_by_mpi()) {
    CommOptions co;
    if (setup.a2a) co.algorithm = *setup.a2a;
    setup.comm = world_communicator(device, co);
    device = setup.comm->device();  // one GPU per rank, chosen by the communicator
  }
  const bool prints = !setup.comm || setup.comm->rank() == 0;
  std::vector<const BenchConfig*> configs;
  for (const std::string& name : f.configs) {
    const BenchConfig* c = find_bench_config(name);
    if (c == nullptr) {
      throw UsageError(fmt::format(
          "--config: unknown config '{}' (`switchyard bench --list` names them)", name));
    }
    configs.push_back(c);
  }
  if (configs.empty()) {
    // CPU: the small configs; a GPU: the goals; the expert-parallel ones under mpirun.
    for (const BenchConfig& c : bench_configs()) {
      if (c.cpu_default == device.is_cpu() && c.expert_parallel == (setup.comm != nullptr))
        configs.push_back(&c);
    }
  }

  std::ofstream out;
  if (!f.out.empty() && prints) {
    const std::filesystem::path path(f.out);
    std::error_code ec;
    if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path(), ec);
    out.open(path, std::ios::app);
    if (!out) throw UsageError(fmt::format("--out: cannot open '{}' for appending", f.out));
  }

  ProgressLine progress;
  if (!device.is_cpu()) {
    progress.update("warming up the GPU", /*force=*/true);
    warm_up_gpu(dtype, device, f);
  }
  const std::vector<int> overlaps = setup.comm ? f.overlap_degrees : std::vector<int>{1};
  for (const BenchConfig* c : configs) {
    for (const LayoutCase& lc : layouts) {
      for (int overlap : overlaps) {
        setup.overlap_degree = overlap;
        const std::string line = run_case(*c, lc, dtype, device, f, setup, progress).dump();
        progress.clear();
        if (!prints) continue;
        fmt::print("{}\n", line);
        std::fflush(stdout);
        if (out.is_open()) out << line << '\n' << std::flush;
      }
    }
  }
  return 0;
}

}  // namespace

Command add_bench_command(CLI::App& app) {
  auto flags = std::make_shared<BenchFlags>();
  BenchFlags& f = *flags;
  CLI::App* sub = app.add_subcommand(
      "bench",
      "Time one MoE layer (forward, backward) for named configs; one JSON line per config and "
      "layout, with the TFLOPS of a dense GEMM of the same work from the same run.");
  sub->option_defaults()->always_capture_default();
  sub->footer(
      "Layouts: padded = capacity_factor 1.0 ([E, C, d], drops), packed = dropless.\n"
      "tflops = 2*T*k*d*h * (2, or 3 for swiglu/geglu) * 3 / (ms_fwd + ms_bwd): the expert GEMMs\n"
      "of routed tokens only. dense_tflops: a GEMM with M = T*k, N = h, K = d in the same dtype;\n"
      "ratio = tflops / dense_tflops. ms are medians over --iters after --warmup (on a GPU,\n"
      "after about a second of GEMMs before the first config, so that its clocks are up);\n"
      "peak_mem_bytes is the allocator's peak over the timed iterations. Record CPU results with\n"
      "  switchyard bench --device cpu --out bench/results/$(date +%F)-cpu.jsonl\n"
      "Under mpirun the layer is expert parallel over all ranks (NCCL on cuda, one GPU per rank;\n"
      "MPI on cpu): T is per rank, E in all; each step starts at a barrier, its time is the\n"
      "slowest rank's, tflops are per rank with the all-to-all included, and rank 0 prints one\n"
      "line per --overlap_degree. Default configs there: the *_ep ones, e.g.\n"
      "  mpirun -np 8 switchyard bench --device cuda --dtype bf16 --overlap_degree 1 2 4");
  sub->add_option("--device", f.device,
                  "cpu|cuda[:N] (under mpirun each rank runs on the GPU its NCCL communicator "
                  "picks)");
  sub->add_option("--config", f.configs,
                  "Config names (default: the cpu_* ones on cpu, the others on cuda); see --list")
      ->default_str("");
  sub->add_option("--dtype", f.dtype, "f32|f64|bf16|f16");
  sub->add_option("--layout", f.layout, "both|padded|packed");
  sub->add_option("--iters", f.iters, "Timed iterations")->check(at_least(1));
  sub->add_option("--warmup", f.warmup, "Untimed iterations first")->check(at_least(0));
  sub->add_option("--tokens,--T", f.tokens, "Override every config's T (0: the config's own)")
      ->check(at_least(0));
  sub->add_option("--seed", f.seed, "Seed of the inputs and the parameters");
  sub->add_option("--out", f.out, "Also append the JSON lines to this file");
  sub->add_flag("--list", f.list, "List the named configs and exit");
  sub->add_flag("--use_tensorcore", f.use_tensorcore,
                "f32 on CUDA: TF32 tensor cores for the expert GEMMs and the dense baseline");
  sub->add_option("--overlap_degree", f.overlap_degrees,
                  "Under mpirun: all-to-all/expert overlap degrees, one line each")
      ->check(at_least(1));
  sub->add_option("--a2a", f.a2a, "Under mpirun: flat|2dh|pipelined|auto (default: auto)")
      ->default_str("");
  return [flags] { return run_bench(*flags); };
}

}  // namespace switchyard::tools
