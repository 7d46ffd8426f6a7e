// Expert-parallel MoELayer against one process holding all experts (DESIGN.md §8), run by ctest
// under `mpirun -np 2` and `-np 4` (every rank runs every case).
//
// The reference is a one-process layer with the same configuration and seed that routes each
// rank's token block separately (capacity and slots are per rank, ROUTING.md §3) and sums the
// expert gradients over the blocks. In f64 the expert-parallel y, dx, losses and gradients must
// match it to rounding: expert parameters against the reference's slice for this rank's experts,
// replicated parameters (gate, shared expert) after summing over ranks.
#include <gtest/gtest.h>
#include <mpi.h>

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

constexpr double kTol = 1e-12;  // f64; sums run in a different order across ranks

std::shared_ptr<sy::Communicator> world() {
  static std::shared_ptr<sy::Communicator> c = sy::make_mpi_communicator();
  return c;
}
int rank() { return world()->rank(); }
int ranks() { return world()->size(); }

MoEConfig base_config() {
  MoEConfig cfg;
  cfg.model_dim = 8;
  cfg.hidden_size = 6;
  cfg.num_experts = 2 * ranks();
  cfg.top_k = 2;
  cfg.dtype = DType::kF64;
  cfg.seed = 7;
  cfg.shared_expert_hidden = 5;
  return cfg;
}

// Tokens of rank q: equal, or uneven with the last rank holding none.
index_t tokens_of(int q, bool uneven) {
  if (!uneven) return 12;
  return q == ranks() - 1 ? 0 : 9 + 3 * q;
}

// x of rank q; `positive` makes every feature > 0 (see ExpertNoRankRoutesTo).
Tensor input_of(int q, index_t T, index_t d, std::uint64_t salt, bool positive = false) {
  std::vector<double> v = sy_ref::randn(static_cast<std::size_t>(T * d), salt * 100 + q);
  if (positive)
    for (double& a : v) a = std::abs(a) + 0.5;
  return Tensor::from_vector(v, {T, d}, DType::kF64);
}

struct Case {
  std::string name;
  int k = 2;
  double cf = 1.0;
  Layout layout = Layout::kAuto;
  int overlap = 1;
  A2AAlgorithm algorithm = A2AAlgorithm::kFlat;
  int adaptive_r = 1;
  bool uneven = false;
};

std::string describe(const Case& c) {
  return "k=" + std::to_string(c.k) + " cf=" + std::to_string(c.cf) +
         " layout=" + sy::to_string(c.layout) + " overlap=" + std::to_string(c.overlap) +
         " a2a=" + sy::to_string(c.algorithm) + " adaptive_r=" + std::to_string(c.adaptive_r) +
         (c.uneven ? " uneven tokens" : "");
}

std::vector<double> summed_over_ranks(const Tensor& t) {
  Tensor c = t.clone();
  world()->all_reduce(c);
  return c.to_vector();
}

// Sets the gate rows of `expert` to -3 in both layers: with positive inputs no token picks it.
void starve_expert(MoELayer& layer, index_t expert) {
  Tensor w = layer.parameter("gates.0.wg.weight").value;  // [E, d]
  w.select(0, expert).fill(-3.0);
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
  ep_fo.adaptive_r = c.adaptive_r;

  const int r = rank();
  const index_t T = tokens_of(r, c.uneven);
  const Tensor x = input_of(r, T, d, 1, starve), dy = input_of(r, T, d, 2);
  const sy::ForwardResult got = ep.forward(x, ep_fo);
  const Tensor dx = ep.backward(dy, lw);

  sy::ForwardResult want;
  Tensor want_dx;
  std::vector<double> ref_counts(static_cast<std::size_t>(cfg.num_experts), 0.0);
  for (int q = 0; q < ranks(); ++q) {
    const index_t Tq = tokens_of(q, c.uneven);
    sy::ForwardResult rq = ref.forward(input_of(q, Tq, d, 1, starve), fo);
    Tensor dxq = ref.backward(input_of(q, Tq, d, 2), lw);
    for (std::size_t e = 0; e < ref_counts.size(); ++e)
      ref_counts[e] += static_cast<double>(rq.stats.tokens_per_expert[e]);
    if (q == r) {
      want = std::move(rq);
      want_dx = dxq;
    }
  }

  EXPECT_TRUE(sy_ref::rel_l2_within(got.y.to_vector(), want.y.to_vector(), kTol)) << "y";
  EXPECT_TRUE(sy_ref::rel_l2_within(dx.to_vector(), want_dx.to_vector(), kTol)) << "dx";
  EXPECT_NEAR(got.losses.aux, want.losses.aux, kTol) << "aux loss";
  EXPECT_NEAR(got.losses.z, want.losses.z, kTol) << "z loss";
  EXPECT_EQ(got.stats.tokens_per_expert, want.stats.tokens_per_expert);
  EXPECT_EQ(got.stats.dropped_choices, want.stats.dropped_choices);
  if (starve) {
    std::vector<double> counts(got.stats.tokens_per_expert.begin(),
                               got.stats.tokens_per_expert.end());
    counts = world()->all_reduce(counts, sy::ReduceOp::kSum);
    EXPECT_EQ(counts[starved], 0.0) << "the starved expert got tokens";
    EXPECT_EQ(ref_counts[starved], 0.0);
  }

  const index_t El = ep.num_local_experts(), first = ep.first_local_expert();
  EXPECT_EQ(El, 2);
  EXPECT_EQ(first, 2 * r);
  for (sy::Parameter* p : ep.parameters()) {
    SCOPED_TRACE(p->name);
    sy::Parameter& q = ref.parameter(p->name);
    if (p->replicated) {
      EXPECT_TRUE(sy_ref::bitwise_equal(p->value.to_vector(), q.value.to_vector()));
      EXPECT_TRUE(sy_ref::rel_l2_within(summed_over_ranks(p->grad), q.grad.to_vector(), kTol));
    } else {
      EXPECT_EQ(p->name.rfind("experts.", 0), 0u) << "only routed experts are per rank";
      EXPECT_TRUE(
          sy_ref::bitwise_equal(p->value.to_vector(), q.value.narrow(0, first, El).to_vector()));
      EXPECT_TRUE(sy_ref::rel_l2_within(p->grad.to_vector(),
                                        q.grad.narrow(0, first, El).to_vector(), kTol));
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

TEST(MoEExpertParallel, MatchesOneProcessForEveryAlgorithmOverlapCapacityAndK) {
  for (A2AAlgorithm a : kAlgorithms)
    for (int overlap : {1, 2, 4})
      for (const CfLayout& cl : kCapacities)
        for (int k : {1, 2}) {
          Case c;
          c.k = k;
          c.cf = cl.cf;
          c.layout = cl.layout;
          c.overlap = overlap;
          c.algorithm = a;
          check_case(c, base_config());
        }
}

TEST(MoEExpertParallel, DataParallelCallsMatchOneProcess) {
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
  for (const CfLayout& cl : kCapacities) {
    Case c;
    c.cf = cl.cf;
    c.layout = cl.layout;
    c.overlap = 2;
    check_case(c, base_config(), /*starve=*/true);
  }
}

TEST(MoEExpertParallel, GatedExpertsWithoutBiasesAndPrescore) {
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
    const Tensor dx = ep.backward(input_of(r, T, d, 4), lw);

    index_t total = 0, offset = 0;
    for (int q = 0; q < ranks(); ++q) {
      if (q == r) offset = total;
      total += tokens_of(q, uneven);
    }
    Tensor X = Tensor::empty({total, d}, DType::kF64), DY = Tensor::empty({total, d}, DType::kF64);
    for (int q = 0, at = 0; q < ranks(); at += static_cast<int>(tokens_of(q, uneven)), ++q) {
      X.narrow(0, at, tokens_of(q, uneven)).copy_from(input_of(q, tokens_of(q, uneven), d, 3));
      DY.narrow(0, at, tokens_of(q, uneven)).copy_from(input_of(q, tokens_of(q, uneven), d, 4));
    }
    const sy::ForwardResult want = ref.forward(X, {});
    const Tensor want_dx = ref.backward(DY, lw);
    EXPECT_TRUE(
        sy_ref::rel_l2_within(got.y.to_vector(), want.y.narrow(0, offset, T).to_vector(), kTol));
    EXPECT_TRUE(
        sy_ref::rel_l2_within(dx.to_vector(), want_dx.narrow(0, offset, T).to_vector(), kTol));
    if (sum_aux) {
      const double aux_sum =
          world()->all_reduce(std::vector<double>{got.losses.aux}, sy::ReduceOp::kSum)[0];
      EXPECT_NEAR(aux_sum, want.losses.aux, kTol);
      EXPECT_GT(want.losses.aux, 0.0);
    }
    for (sy::Parameter* p : ep.parameters()) {
      SCOPED_TRACE(p->name);
      sy::Parameter& q = ref.parameter(p->name);
      if (p->replicated)
        EXPECT_TRUE(sy_ref::rel_l2_within(summed_over_ranks(p->grad), q.grad.to_vector(), kTol));
      else
        EXPECT_TRUE(sy_ref::rel_l2_within(
            p->grad.to_vector(),
            q.grad.narrow(0, ep.first_local_expert(), ep.num_local_experts()).to_vector(), kTol));
    }
  }
}

}  // namespace

// The Switch loss counts tokens(e) and T over all ranks: the ranks' losses sum to the loss of one
// process routing every token at once, and so do the gate gradients.
TEST(MoEExpertParallel, SwitchLossUsesGlobalCounts) {
  MoEConfig cfg = base_config();
  cfg.aux_loss = sy::AuxLoss::kSwitch;
  cfg.capacity_factor = 0.0;
  check_against_all_tokens_at_once(cfg, {0.1, 0.0}, /*sum_aux=*/true);
}

// Gate noise and input jitter draw by global token index: the same numbers as one process.
TEST(MoEExpertParallel, GateNoiseAndJitterFollowGlobalTokenIndices) {
  MoEConfig cfg = base_config();
  cfg.capacity_factor = 0.0;
  cfg.gate_noise = 1.0;
  cfg.input_jitter = 0.2;
  check_against_all_tokens_at_once(cfg, {0.0, 0.0}, /*sum_aux=*/false);
}

TEST(MoEExpertParallel, ConfigDifferingAcrossRanksFailsOnEveryRank) {
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
  MoEConfig cfg = base_config();
  cfg.num_experts = 2 * ranks() + 1;
  EXPECT_NE(error_of([&] { MoELayer layer(cfg, world()); }).find("must be a multiple of the"),
            std::string::npos);
  cfg.num_experts = 1;
  EXPECT_NE(error_of([&] {
              MoELayer layer(cfg, world());
            }).find("sharded experts (fewer experts than ranks) are not supported yet"),
            std::string::npos);
  MoELayer layer(base_config(), world());
  ForwardOptions fo;
  fo.adaptive_r = 2;
  EXPECT_NE(error_of([&] {
              layer.forward(input_of(rank(), 12, 8, 5), fo);
            }).find("(sharded experts) is not supported yet"),
            std::string::npos);
  EXPECT_NO_THROW(layer.forward(input_of(rank(), 12, 8, 5), {}));
}
