// Expert-parallel MoELayer against one process holding all experts (DESIGN.md §8), run by ctest
// under `mpirun -np 2` and `-np 4` (every rank runs every case).
//
// The reference is a one-process layer with the same configuration and seed that routes each
// rank's token block separately (capacity and slots are per rank, ROUTING.md §3) and sums the
// expert gradients over the blocks. The expert-parallel y, dx, losses and gradients must match
// it to rounding: expert parameters against the reference's slice for this rank's experts,
// replicated parameters (gate, shared expert) after summing over ranks.
//
// Two builds of this file: test_moe_expert_parallel runs on CPU ranks over MPI (f64, or the
// dtype SY_EP_TEST_DTYPE names); test_moe_expert_parallel_nccl (SY_EP_TEST_NCCL) on one GPU per
// rank over NCCL, in f32 or bf16 (SY_EP_TEST_DTYPE), and skips every case where a rank has no
// GPU of its own. Tolerances follow the dtype (DESIGN.md §7); the reference layer runs on the
// same device in the same dtype. Cases about differences between ranks skip at one rank.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "reference/compare.h"
#include "reference/random.h"
#include "switchyard/switchyard.h"
#ifdef SY_EP_TEST_NCCL
#include "dist/gpu_ranks.h"
#endif

namespace sy = switchyard;
using sy::A2AAlgorithm;
using sy::DType;
using sy::ForwardOptions;
using sy::index_t;
using sy::Layout;
using sy::MoEConfig;
using sy::MoELayer;
using sy::Tensor;

namespace {

// The communicator, made once (making one is collective) and freed before MPI_Finalize.
std::shared_ptr<sy::Communicator>& world_slot() {
  static std::shared_ptr<sy::Communicator> c;
  return c;
}
class FreeCommunicator : public ::testing::Environment {
 public:
  void TearDown() override { world_slot().reset(); }
};
[[maybe_unused]] ::testing::Environment* const kFreeCommunicator =
    ::testing::AddGlobalTestEnvironment(new FreeCommunicator);

#ifdef SY_EP_TEST_NCCL
constexpr bool kOnGpus = true;
constexpr const char* kDefaultDtype = "f32";
bool backend_available() { return sy_dist::gpus_for_every_rank(); }
std::shared_ptr<sy::Communicator> make_world() { return sy::make_nccl_communicator(); }
#else
constexpr bool kOnGpus = false;
constexpr const char* kDefaultDtype = "f64";
bool backend_available() { return true; }
std::shared_ptr<sy::Communicator> make_world() { return sy::make_mpi_communicator(); }
#endif
// The layers' dtype: SY_EP_TEST_DTYPE (f64 on CPU only), else f64 on CPU and f32 on GPUs.
DType test_dtype() {
  const char* env = std::getenv("SY_EP_TEST_DTYPE");
  const std::string name = env ? env : kDefaultDtype;
  if (name == "bf16") return DType::kBF16;
  if (name == "f32") return DType::kF32;
  if (name != "f64" || kOnGpus) {
    std::fprintf(stderr, "SY_EP_TEST_DTYPE must be f32 or bf16 (or f64 on CPU), got '%s'\n",
                 name.c_str());
    std::abort();
  }
  return DType::kF64;
}

#define SKIP_WITHOUT_BACKEND()                                                            \
  do {                                                                                    \
    if (!backend_available()) GTEST_SKIP() << "NCCL test skipped: no GPU for every rank"; \
  } while (0)

const std::shared_ptr<sy::Communicator>& world() {
  if (!world_slot()) world_slot() = make_world();
  return world_slot();
}
int rank() { return world()->rank(); }
int ranks() { return world()->size(); }

// Cases about what differs between ranks (their configurations, an expert no rank routes to,
// counts over ranks) need two.
#define SKIP_BELOW_TWO_RANKS()                                   \
  do {                                                           \
    SKIP_WITHOUT_BACKEND();                                      \
    if (ranks() < 2) GTEST_SKIP() << "needs two ranks or more"; \
  } while (0)
sy::Device test_device() { return world()->device(); }

// Relative L2 tolerance (DESIGN.md §7): sums run in a different order across ranks, and in
// f32/bf16 the expert GEMMs see other row counts than the reference's.
double tol() {
  switch (test_dtype()) {
    case DType::kF64:
      return 1e-12;
    case DType::kF32:
      return 1e-5;
    default:
      return 3e-2;
  }
}
// Scalars (losses): relative to their size, absolute below 1.
void expect_near(double got, double want, const char* what) {
  EXPECT_NEAR(got, want, tol() * std::max(1.0, std::abs(want))) << what;
}

MoEConfig base_config() {
  MoEConfig cfg;
  cfg.model_dim = 8;
  cfg.hidden_size = 6;
  cfg.num_experts = 2 * ranks();
  cfg.top_k = 2;
  cfg.dtype = test_dtype();
  cfg.device = test_device();
  cfg.seed = 7;
  cfg.shared_expert_hidden = 5;
  return cfg;
}

// Tokens of rank q: equal, or uneven with the last rank holding none.
index_t tokens_of(int q, bool uneven) {
  if (!uneven) return 12;
  return q == ranks() - 1 ? 0 : 9 + 3 * q;
}

// x of rank q in the test's dtype on its device; `positive` makes every feature > 0 (see
// ExpertNoRankRoutesTo).
Tensor input_of(int q, index_t T, index_t d, std::uint64_t salt, bool positive = false) {
  std::vector<double> v = sy_ref::randn(static_cast<std::size_t>(T * d), salt * 100 + q);
  if (positive)
    for (double& a : v) a = std::abs(a) + 0.5;
  return Tensor::from_vector(v, {T, d}, test_dtype()).to(test_device());
}

struct Case {
  std::string name;
  int k = 2;
  double cf = 1.0;
  Layout layout = Layout::kAuto;
  int overlap = 1;
  A2AAlgorithm algorithm = A2AAlgorithm::kFlat;
  int adaptive_r = -1;  // -1: the layer's default
  bool uneven = false;
};

std::string describe(const Case& c) {
  return "k=" + std::to_string(c.k) + " cf=" + std::to_string(c.cf) +
         " layout=" + sy::to_string(c.layout) + " overlap=" + std::to_string(c.overlap) +
         " a2a=" + sy::to_string(c.algorithm) + " adaptive_r=" +
         (c.adaptive_r < 0 ? std::string("default") : std::to_string(c.adaptive_r)) +
         (c.uneven ? " uneven tokens" : "");
}

std::vector<double> summed_over_ranks(const Tensor& t) {
  return world()->all_reduce(t.to_vector(), sy::ReduceOp::kSum);
}

// Sets the gate rows of `expert` to -3 in both layers: with positive inputs no token picks it.
void starve_expert(MoELayer& layer, index_t expert) {
  Tensor w = layer.parameter("gates.0.wg.weight").value;  // [E, d]
  w.select(0, expert).fill(-3.0);
}

// Ranks sharing each expert (Tutel's sharded_count): W / E when E < W, else 1.
index_t sharded_count(const MoEConfig& cfg) {
  return cfg.num_experts < ranks() ? ranks() / cfg.num_experts : 1;
}

// This rank's stored part of the reference's full expert parameter `full` (DESIGN.md §5, sharded
// experts as Tutel stores them): experts [first, first + El), or with s > 1 ranks per expert the
// hidden slice rank % s of expert rank / s (fc1 and its bias: gate and up rows alike when gated;
// fc2 bias: columns [j*dc, (j+1)*dc), dc = ceil(d / s), zero past d).
std::vector<double> stored_part(const MoEConfig& cfg, const sy::Parameter& p, const Tensor& full) {
  const index_t s = sharded_count(cfg), E = cfg.num_experts, h = cfg.hidden_size;
  if (s == 1) {
    const index_t El = E / ranks();
    return full.narrow(0, rank() * El, El).contiguous().to_vector();
  }
  const index_t e = rank() / s, j = rank() % s, d = cfg.out_dim();
  const Tensor row = full.narrow(0, e, 1).contiguous();
  if (p.name == "experts.batched_fc2_bias") {
    const index_t dc = (d + s - 1) / s;
    std::vector<double> v(static_cast<std::size_t>(dc), 0.0);
    const std::vector<double> all = row.to_vector();
    for (index_t c = 0; c < dc && j * dc + c < d; ++c) v[c] = all[j * dc + c];
    return v;
  }
  const bool gated = sy::is_gated(cfg.activation) && p.name.find("fc1") != std::string::npos;
  const index_t P = gated ? 2 : 1, rest = full.dim() == 3 ? full.size(2) : 1;
  return row.view({P, h, rest}).narrow(1, j * (h / s), h / s).contiguous().to_vector();
}

// Runs one case: expert parallel on this rank's block vs the reference over every block.
void check_case(const Case& c, MoEConfig cfg, bool starve = false) {
  SCOPED_TRACE(describe(c));
  const index_t d = cfg.model_dim;
  const sy::LossWeights lw{0.01, 0.001};
  MoELayer ep(cfg, world());
  MoELayer ref(cfg);
  const index_t starved = cfg.num_experts - 1;
  if (starve) {
    starve_expert(ep, starved);
    starve_expert(ref, starved);
  }

  ForwardOptions fo;
  fo.top_k = c.k;
  fo.capacity_factor = c.cf;
  fo.layout = c.layout;
  fo.overlap_degree = c.overlap;
  ForwardOptions ep_fo = fo;
  ep_fo.a2a_algorithm = c.algorithm;
  if (c.adaptive_r >= 0) ep_fo.adaptive_r = c.adaptive_r;
  // The capacity is aligned to sharded_count * overlap_degree (ROUTING.md §3): the reference
  // aligns the same way (in one process overlap_degree is only the alignment).
  fo.overlap_degree = c.overlap * static_cast<int>(sharded_count(cfg));

  const int r = rank();
  const index_t T = tokens_of(r, c.uneven);
  const Tensor x = input_of(r, T, d, 1, starve), dy = input_of(r, T, cfg.out_dim(), 2);
  const sy::ForwardResult got = ep.forward(x, ep_fo);
  const Tensor dx = ep.backward(dy, lw);

  sy::ForwardResult want;
  Tensor want_dx;
  std::vector<double> ref_counts(static_cast<std::size_t>(cfg.num_experts), 0.0);
  for (int q = 0; q < ranks(); ++q) {
    const index_t Tq = tokens_of(q, c.uneven);
    sy::ForwardResult rq = ref.forward(input_of(q, Tq, d, 1, starve), fo);
    Tensor dxq = ref.backward(input_of(q, Tq, cfg.out_dim(), 2), lw);
    for (std::size_t e = 0; e < ref_counts.size(); ++e)
      ref_counts[e] += static_cast<double>(rq.stats.tokens_per_expert[e]);
    if (q == r) {
      want = std::move(rq);
      want_dx = dxq;
    }
  }

  EXPECT_TRUE(sy_ref::rel_l2_within(got.y.to_vector(), want.y.to_vector(), tol())) << "y";
  EXPECT_TRUE(sy_ref::rel_l2_within(dx.to_vector(), want_dx.to_vector(), tol())) << "dx";
  expect_near(got.losses.aux, want.losses.aux, "aux loss");
  expect_near(got.losses.z, want.losses.z, "z loss");
  EXPECT_EQ(got.stats.tokens_per_expert, want.stats.tokens_per_expert);
  EXPECT_EQ(got.stats.dropped_choices, want.stats.dropped_choices);
  if (starve) {
    std::vector<double> counts(got.stats.tokens_per_expert.begin(),
                               got.stats.tokens_per_expert.end());
    counts = world()->all_reduce(counts, sy::ReduceOp::kSum);
    EXPECT_EQ(counts[starved], 0.0) << "the starved expert got tokens";
    EXPECT_EQ(ref_counts[starved], 0.0);
  }

  const index_t s = sharded_count(cfg);
  const index_t El = s > 1 ? 1 : cfg.num_experts / ranks();
  EXPECT_EQ(ep.num_local_experts(), El);
  EXPECT_EQ(ep.first_local_expert(), s > 1 ? r / s : r * El);
  for (sy::Parameter* p : ep.parameters()) {
    SCOPED_TRACE(p->name);
    sy::Parameter& q = ref.parameter(p->name);
    if (p->replicated) {
      EXPECT_TRUE(sy_ref::bitwise_equal(p->value.to_vector(), q.value.to_vector()));
      EXPECT_TRUE(sy_ref::rel_l2_within(summed_over_ranks(p->grad), q.grad.to_vector(), tol()));
    } else {
      EXPECT_EQ(p->name.rfind("experts.", 0), 0u) << "only routed experts are per rank";
      EXPECT_TRUE(sy_ref::bitwise_equal(p->value.to_vector(), stored_part(cfg, *p, q.value)));
      EXPECT_TRUE(sy_ref::rel_l2_within(p->grad.to_vector(), stored_part(cfg, *p, q.grad), tol()));
    }
  }
}

struct CfLayout {
  double cf;
  Layout layout;
};
const std::vector<CfLayout> kCapacities = {{1.0, Layout::kAuto},
                                           {0.0, Layout::kAuto},
                                           {0.0, Layout::kPadded},
                                           {-1.0, Layout::kAuto},
                                           {-1.0, Layout::kPadded}};
const std::vector<A2AAlgorithm> kAlgorithms = {A2AAlgorithm::kFlat, A2AAlgorithm::k2DH,
                                               A2AAlgorithm::kPipelined, A2AAlgorithm::kAuto};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const sy::Error& e) {
    return e.what();
  }
  return "(no error)";
}

// check_case with `adaptive_r` for overlap 1/2/4, every capacity rule and k = 1 and 2; the
// all-to-all algorithm by overlap degree.
void check_overlaps_capacities_and_k(const MoEConfig& cfg, int adaptive_r,
                                     const std::function<A2AAlgorithm(int)>& algorithm) {
  for (int overlap : {1, 2, 4})
    for (const CfLayout& cl : kCapacities)
      for (int k : {1, 2}) {
        Case c;
        c.k = k;
        c.cf = cl.cf;
        c.layout = cl.layout;
        c.overlap = overlap;
        c.adaptive_r = adaptive_r;
        c.algorithm = algorithm(overlap);
        check_case(c, cfg);
      }
}

TEST(MoEExpertParallel, MatchesOneProcessForEveryAlgorithmOverlapCapacityAndK) {
  SKIP_WITHOUT_BACKEND();
  for (A2AAlgorithm a : kAlgorithms)
    check_overlaps_capacities_and_k(base_config(), -1, [a](int) { return a; });
}

TEST(MoEExpertParallel, DataParallelCallsMatchOneProcess) {
  SKIP_WITHOUT_BACKEND();
  for (int overlap : {1, 2})
    for (const CfLayout& cl : kCapacities)
      for (int k : {1, 2}) {
        Case c;
        c.k = k;
        c.cf = cl.cf;
        c.layout = cl.layout;
        c.overlap = overlap;
        c.adaptive_r = 0;
        check_case(c, base_config());
      }
}

TEST(MoEExpertParallel, RankWithZeroTokens) {
  SKIP_WITHOUT_BACKEND();
  for (Layout layout : {Layout::kPacked, Layout::kPadded})
    for (int overlap : {1, 4})
      for (A2AAlgorithm a : {A2AAlgorithm::kFlat, A2AAlgorithm::kPipelined})
        for (int r : {1, 0})
          for (int k : {1, 2}) {
            Case c;
            c.k = k;
            c.cf = 0.0;
            c.layout = layout;
            c.overlap = overlap;
            c.algorithm = a;
            c.adaptive_r = r;
            c.uneven = true;
            check_case(c, base_config());
          }
}

TEST(MoEExpertParallel, ExpertNoRankRoutesTo) {
  SKIP_BELOW_TWO_RANKS();
  for (const CfLayout& cl : kCapacities) {
    Case c;
    c.cf = cl.cf;
    c.layout = cl.layout;
    c.overlap = 2;
    check_case(c, base_config(), /*starve=*/true);
  }
}

TEST(MoEExpertParallel, GatedExpertsWithoutBiasesAndPrescore) {
  SKIP_WITHOUT_BACKEND();
  MoEConfig cfg = base_config();
  cfg.activation = sy::Activation::kSwiGLU;
  cfg.has_fc1_bias = false;
  cfg.is_postscore = false;
  cfg.shared_expert_hidden = 0;
  for (const CfLayout& cl : kCapacities) {
    Case c;
    c.cf = cl.cf;
    c.layout = cl.layout;
    c.overlap = 2;
    check_case(c, cfg);
  }
}

// Dropless routing of every rank's tokens at once equals routing each rank's block: compares the
// expert-parallel layer with one process given all ranks' tokens concatenated. With
// `sum_aux`, the ranks' aux losses must add up to the one-process loss.
void check_against_all_tokens_at_once(const MoEConfig& cfg, const sy::LossWeights& lw,
                                      bool sum_aux) {
  const index_t d = cfg.model_dim;
  for (bool uneven : {false, true}) {
    SCOPED_TRACE(uneven ? "uneven tokens" : "equal tokens");
    MoELayer ep(cfg, world());
    MoELayer ref(cfg);
    const int r = rank();
    const index_t T = tokens_of(r, uneven);
    const sy::ForwardResult got = ep.forward(input_of(r, T, d, 3), {});
    const Tensor dx = ep.backward(input_of(r, T, cfg.out_dim(), 4), lw);

    index_t total = 0, offset = 0;
    for (int q = 0; q < ranks(); ++q) {
      if (q == r) offset = total;
      total += tokens_of(q, uneven);
    }
    Tensor X = Tensor::empty({total, d}, cfg.dtype, cfg.device);
    Tensor DY = Tensor::empty({total, cfg.out_dim()}, cfg.dtype, cfg.device);
    for (int q = 0, at = 0; q < ranks(); at += static_cast<int>(tokens_of(q, uneven)), ++q) {
      X.narrow(0, at, tokens_of(q, uneven)).copy_from(input_of(q, tokens_of(q, uneven), d, 3));
      DY.narrow(0, at, tokens_of(q, uneven))
          .copy_from(input_of(q, tokens_of(q, uneven), cfg.out_dim(), 4));
    }
    const sy::ForwardResult want = ref.forward(X, {});
    const Tensor want_dx = ref.backward(DY, lw);
    EXPECT_TRUE(
        sy_ref::rel_l2_within(got.y.to_vector(), want.y.narrow(0, offset, T).to_vector(), tol()));
    EXPECT_TRUE(
        sy_ref::rel_l2_within(dx.to_vector(), want_dx.narrow(0, offset, T).to_vector(), tol()));
    if (sum_aux) {
      const double aux_sum =
          world()->all_reduce(std::vector<double>{got.losses.aux}, sy::ReduceOp::kSum)[0];
      expect_near(aux_sum, want.losses.aux, "summed aux loss");
      EXPECT_GT(want.losses.aux, 0.0);
    }
    for (sy::Parameter* p : ep.parameters()) {
      SCOPED_TRACE(p->name);
      sy::Parameter& q = ref.parameter(p->name);
      if (p->replicated)
        EXPECT_TRUE(sy_ref::rel_l2_within(summed_over_ranks(p->grad), q.grad.to_vector(), tol()));
      else
        EXPECT_TRUE(sy_ref::rel_l2_within(
            p->grad.to_vector(),
            q.grad.narrow(0, ep.first_local_expert(), ep.num_local_experts()).to_vector(), tol()));
    }
  }
}

}  // namespace

// Gradients unset by zero_grad(true) come out of an expert-parallel backward equal to zeroed
// ones, for the expert-parallel and the data-parallel call.
TEST(MoEExpertParallel, UnsetGradientsEqualZeroedOnes) {
  SKIP_WITHOUT_BACKEND();
  const MoEConfig cfg = base_config();
  for (int adaptive_r : {-1, 0}) {
    MoELayer zeroed(cfg, world()), unset(cfg, world());
    ForwardOptions fo;
    if (adaptive_r >= 0) fo.adaptive_r = adaptive_r;
    const Tensor x = input_of(rank(), 12, cfg.model_dim, 5);
    const Tensor dy = input_of(rank(), 12, cfg.out_dim(), 6);
    zeroed.zero_grad();
    unset.zero_grad(/*set_to_none=*/true);
    zeroed.forward(x, fo);
    unset.forward(x, fo);
    EXPECT_TRUE(sy_ref::bitwise_equal(unset.backward(dy).to_vector(),
                                      zeroed.backward(dy).to_vector()));
    const auto pz = zeroed.parameters(), pu = unset.parameters();
    for (std::size_t i = 0; i < pz.size(); ++i) {
      ASSERT_TRUE(pu[i]->grad.defined()) << pu[i]->name;
      EXPECT_TRUE(sy_ref::bitwise_equal(pu[i]->grad.to_vector(), pz[i]->grad.to_vector()))
          << pu[i]->name << " adaptive_r=" << adaptive_r;
    }
  }
}

// The Switch loss counts tokens(e) and T over all ranks: the ranks' losses sum to the loss of one
// process routing every token at once, and so do the gate gradients.
TEST(MoEExpertParallel, SwitchLossUsesGlobalCounts) {
  SKIP_BELOW_TWO_RANKS();
  MoEConfig cfg = base_config();
  cfg.aux_loss = sy::AuxLoss::kSwitch;
  cfg.capacity_factor = 0.0;
  check_against_all_tokens_at_once(cfg, {0.1, 0.0}, /*sum_aux=*/true);
}

// Gate noise and input jitter draw by global token index: the same numbers as one process.
TEST(MoEExpertParallel, GateNoiseAndJitterFollowGlobalTokenIndices) {
  SKIP_WITHOUT_BACKEND();
  MoEConfig cfg = base_config();
  cfg.capacity_factor = 0.0;
  cfg.gate_noise = 1.0;
  cfg.input_jitter = 0.2;
  check_against_all_tokens_at_once(cfg, {0.0, 0.0}, /*sum_aux=*/false);
}

TEST(MoEExpertParallel, ConfigDifferingAcrossRanksFailsOnEveryRank) {
  SKIP_BELOW_TWO_RANKS();
  MoEConfig cfg = base_config();
  if (rank() == ranks() - 1) cfg.num_experts = 4 * ranks();
  EXPECT_NE(
      error_of([&] { MoELayer layer(cfg, world()); }).find("num_experts differs across ranks"),
      std::string::npos);
  cfg = base_config();
  if (rank() == 0) cfg.model_dim = 10;
  EXPECT_NE(error_of([&] { MoELayer layer(cfg, world()); }).find("model_dim differs across ranks"),
            std::string::npos);
  cfg = base_config();
  if (rank() == 0) cfg.capacity_factor = 2.0;
  EXPECT_NE(error_of([&] { MoELayer layer(cfg, world()); }).find("differs across ranks"),
            std::string::npos);
  // Per-call options must agree too.
  MoELayer layer(base_config(), world());
  ForwardOptions fo;
  fo.top_k = rank() == 0 ? 1 : 2;
  const Tensor x = input_of(rank(), 12, 8, 5);
  EXPECT_NE(error_of([&] { layer.forward(x, fo); }).find("options differ across ranks (top_k)"),
            std::string::npos);
  // Still usable, in step.
  EXPECT_NO_THROW(layer.forward(x, {}));
}

TEST(MoEExpertParallel, UnsupportedSetupsFailClearlyOnEveryRank) {
  SKIP_BELOW_TWO_RANKS();
  MoEConfig cfg = base_config();
  cfg.num_experts = 2 * ranks() + 1;
  EXPECT_NE(error_of([&] { MoELayer layer(cfg, world()); }).find("must be a multiple of the"),
            std::string::npos);
  if (ranks() == 4) {
    cfg.num_experts = 3;  // below the ranks and not a divisor of them
    EXPECT_NE(error_of([&] {
                MoELayer layer(cfg, world());
              }).find("the ranks must be a multiple of num_experts"),
              std::string::npos);
  }
  cfg = base_config();
  cfg.num_experts = 1;
  cfg.hidden_size = 2 * ranks() + 1;  // does not split over the ranks sharing the expert
  EXPECT_NE(error_of([&] { MoELayer layer(cfg, world()); }).find("equal slices"),
            std::string::npos);
}

// adaptive_r must divide the world size (E >= W) or the ranks sharing an expert (E < W); every
// rank gets the same error and the layer stays usable, in step.
TEST(MoEExpertParallel, AdaptiveRThatDoesNotFitFailsOnEveryRank) {
  SKIP_BELOW_TWO_RANKS();
  const Tensor x = input_of(rank(), 12, 8, 5);
  MoELayer layer(base_config(), world());
  for (int r : {3, 2 * ranks()}) {
    ForwardOptions fo;
    fo.adaptive_r = r;
    EXPECT_NE(error_of([&] {
                layer.forward(x, fo);
              }).find("must divide the " + std::to_string(ranks()) + " ranks"),
              std::string::npos)
        << "adaptive_r=" << r;
  }
  ForwardOptions negative;
  negative.adaptive_r = -1;
  EXPECT_NE(error_of([&] { layer.forward(x, negative); }).find("adaptive_r must be >= 0"),
            std::string::npos);
  EXPECT_NO_THROW(layer.forward(x, {}));

  MoEConfig cfg = base_config();
  cfg.num_experts = 1;  // s = W ranks share the expert: r must divide W
  cfg.hidden_size = 8;
  MoELayer sharded(cfg, world());
  ForwardOptions fo;
  fo.adaptive_r = 2 * ranks();
  EXPECT_NE(error_of([&] {
              sharded.forward(x, fo);
            }).find("must divide the " + std::to_string(ranks()) + " ranks that share each expert"),
            std::string::npos);
  EXPECT_NO_THROW(sharded.forward(x, {}));
}

// Fewer experts than ranks (Tutel's sharded experts): every valid adaptive_r (the default s,
// data parallel, 1, and the divisors of s), overlap 1/2/4, every capacity rule, k = 1 and 2.
TEST(MoEExpertParallel, ShardedExpertsMatchOneProcess) {
  SKIP_WITHOUT_BACKEND();
  std::vector<index_t> expert_counts = {1};
  if (ranks() == 4) expert_counts.push_back(2);
  for (index_t E : expert_counts) {
    MoEConfig cfg = base_config();
    cfg.num_experts = E;
    cfg.hidden_size = 8;
    const int s = ranks() / static_cast<int>(E);
    std::vector<int> rs = {-1, 0, 1};
    for (int r = 2; r <= s; ++r)
      if (s % r == 0) rs.push_back(r);
    SCOPED_TRACE("num_experts=" + std::to_string(E));
    for (int r : rs)
      check_overlaps_capacities_and_k(cfg, r, [](int) { return A2AAlgorithm::kFlat; });
  }
}

// Sharded experts with gated FFNs (gate and up rows sliced alike), no fc1 bias, an fc2 bias
// whose columns do not split evenly (d = 10), uneven tokens and the hierarchical all-to-all.
TEST(MoEExpertParallel, ShardedGatedExpertsWithUnevenBiasColumns) {
  SKIP_WITHOUT_BACKEND();
  MoEConfig cfg = base_config();
  cfg.num_experts = 1;
  cfg.model_dim = 10;
  cfg.hidden_size = 8;
  cfg.activation = sy::Activation::kSwiGLU;
  cfg.has_fc1_bias = false;
  for (int r : {-1, 0, 1, 2}) {
    if (r > 0 && ranks() % r != 0) continue;  // r-way sharding needs r to divide the ranks
    for (Layout layout : {Layout::kPacked, Layout::kPadded}) {
      Case c;
      c.cf = 0.0;
      c.layout = layout;
      c.overlap = 2;
      c.adaptive_r = r;
      c.uneven = true;
      c.algorithm = A2AAlgorithm::kPipelined;
      check_case(c, cfg);
    }
  }
}

// r-way sharded experts per call on a layer that stores whole experts (E = W and E = 2W): groups
// of r ranks gather their experts' hidden slices for the call and reduce the gradients back.
TEST(MoEExpertParallel, AdaptiveRShardsWholeExpertsPerCall) {
  SKIP_WITHOUT_BACKEND();
  for (index_t per_rank : {1, 2}) {
    MoEConfig cfg = base_config();
    cfg.num_experts = per_rank * ranks();
    cfg.hidden_size = 8;
    for (int r = 2; r <= ranks(); ++r) {
      if (ranks() % r != 0) continue;
      SCOPED_TRACE("num_experts=" + std::to_string(cfg.num_experts));
      check_overlaps_capacities_and_k(cfg, r, [](int overlap) {
        return overlap == 2 ? A2AAlgorithm::k2DH : A2AAlgorithm::kFlat;
      });
    }
  }
}

// Experts whose output width differs from model_dim (Tutel's output_dim), with a shared expert:
// expert parallel, data parallel and per-call sharded calls; sharded experts (fewer experts than
// ranks) with an fc2 bias whose o = 7 columns do not split evenly.
TEST(MoEExpertParallel, OutputDimOtherThanModelDim) {
  SKIP_WITHOUT_BACKEND();
  MoEConfig cfg = base_config();
  cfg.output_dim = 7;
  cfg.hidden_size = 8;
  for (int r : {-1, 0, 2}) {
    if (r == 2 && ranks() % 2 != 0) continue;
    for (const CfLayout& cl : {kCapacities[0], kCapacities[1]}) {
      Case c;
      c.cf = cl.cf;
      c.layout = cl.layout;
      c.overlap = 2;
      c.adaptive_r = r;
      c.algorithm = A2AAlgorithm::kPipelined;
      check_case(c, cfg);
    }
  }
  cfg.num_experts = 1;
  cfg.shared_expert_hidden = 0;
  for (int r : {-1, 0}) {
    Case c;
    c.cf = 0.0;
    c.adaptive_r = r;
    c.uneven = true;
    check_case(c, cfg);
  }
}

// The packed layout's overlap chunks: groups of whole experts when a rank computes at least
// overlap_degree experts, so y, dx and the expert gradients are bitwise those of one chunk;
// otherwise pieces of each expert's rows, equal to rounding (the GEMMs see other row counts).
TEST(MoEExpertParallel, PackedOverlapGivesTheSameResults) {
  SKIP_WITHOUT_BACKEND();
  for (index_t E : {4 * static_cast<index_t>(ranks()), index_t{1}}) {
    MoEConfig cfg = base_config();
    cfg.num_experts = E;
    cfg.hidden_size = 8;
    cfg.capacity_factor = 0.0;
    const bool whole_experts = E >= 4 * ranks();
    std::vector<double> y1, dx1, grad1;
    for (int overlap : {1, 2, 4}) {
      SCOPED_TRACE("num_experts=" + std::to_string(E) + " overlap=" + std::to_string(overlap));
      MoELayer layer(cfg, world());
      ForwardOptions fo;
      fo.layout = Layout::kPacked;
      fo.overlap_degree = overlap;
      const Tensor x = input_of(rank(), 12, 8, 6);
      const std::vector<double> y = layer.forward(x, fo).y.to_vector();
      const std::vector<double> dx = layer.backward(input_of(rank(), 12, 8, 7), {}).to_vector();
      const std::vector<double> grad = layer.parameter("experts.batched_fc1_w").grad.to_vector();
      if (overlap == 1) {
        y1 = y;
        dx1 = dx;
        grad1 = grad;
      } else if (whole_experts && !kOnGpus) {  // the GPU may pick other GEMM kernels
        EXPECT_TRUE(sy_ref::bitwise_equal(y, y1)) << "y";
        EXPECT_TRUE(sy_ref::bitwise_equal(dx, dx1)) << "dx";
        EXPECT_TRUE(sy_ref::bitwise_equal(grad, grad1)) << "fc1 gradient";
      } else {
        EXPECT_TRUE(sy_ref::rel_l2_within(y, y1, tol())) << "y";
        EXPECT_TRUE(sy_ref::rel_l2_within(dx, dx1, tol())) << "dx";
        EXPECT_TRUE(sy_ref::rel_l2_within(grad, grad1, tol())) << "fc1 gradient";
      }
    }
  }
}
