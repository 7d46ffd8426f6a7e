#include "layer/expert_parallel.h"

#include <bit>
#include <string>
#include <utility>

#include "core/dtype_dispatch.h"
#include "core/ops.h"
#include "switchyard/error.h"

namespace switchyard {
namespace {

constexpr std::uint64_t kExpertInitId = 2000;  // as MoELayer's (the values are replaced anyway)

// src [rows, d] holds A*B blocks ordered (a, b) a-major, block (a, b) having count[a*B + b] rows;
// returns the same blocks ordered (b, a) b-major, on src's device.
Tensor transpose_blocks(const Tensor& src_in, index_t A, index_t B,
                        const std::vector<index_t>& count) {
  const Tensor src = src_in.contiguous();
  const index_t rows = src.size(0), d = src.size(1);
  Tensor dst = Tensor::empty({rows, d}, src.dtype(), src.device());
  std::vector<index_t> src_offset(static_cast<std::size_t>(A * B + 1), 0);
  for (index_t i = 0; i < A * B; ++i) src_offset[i + 1] = src_offset[i] + count[i];
  SY_ASSERT(src_offset[A * B] == rows, "transpose_blocks: counts do not cover the rows");
  index_t pos = 0;
  for (index_t b = 0; b < B; ++b) {
    for (index_t a = 0; a < A; ++a) {
      const index_t n = count[a * B + b];
      if (n > 0) dst.narrow(0, pos, n).copy_from(src.narrow(0, src_offset[a * B + b], n));
      pos += n;
    }
  }
  return dst;
}

std::vector<index_t> equal_counts(index_t num_blocks, index_t rows) {
  return std::vector<index_t>(static_cast<std::size_t>(num_blocks), rows);
}

// i64 offsets [n+1] of consecutive groups of rows.
Tensor offsets_tensor(const std::vector<index_t>& group_rows) {
  std::vector<double> off(group_rows.size() + 1, 0.0);
  for (std::size_t i = 0; i < group_rows.size(); ++i)
    off[i + 1] = off[i] + static_cast<double>(group_rows[i]);
  return Tensor::from_vector(off, {static_cast<index_t>(off.size())}, DType::kI64);
}

// Rows per rank from rows per (rank, expert) block, m blocks per rank.
std::vector<index_t> per_rank(const std::vector<index_t>& block_count, index_t W, index_t m) {
  std::vector<index_t> r(static_cast<std::size_t>(W), 0);
  for (index_t p = 0; p < W; ++p)
    for (index_t le = 0; le < m; ++le) r[p] += block_count[p * m + le];
  return r;
}

// count[a*B + b] -> count[b*A + a].
std::vector<index_t> transpose_counts(const std::vector<index_t>& count, index_t A, index_t B) {
  std::vector<index_t> t(count.size());
  for (index_t a = 0; a < A; ++a)
    for (index_t b = 0; b < B; ++b) t[b * A + a] = count[a * B + b];
  return t;
}

index_t sum_of(const std::vector<index_t>& v) {
  index_t n = 0;
  for (index_t x : v) n += x;
  return n;
}

// Piece i of n near-equal pieces of `length` rows: [begin, begin + length).
index_t piece_begin(index_t length, index_t i, index_t n) { return length * i / n; }
index_t piece_length(index_t length, index_t i, index_t n) {
  return piece_begin(length, i + 1, n) - piece_begin(length, i, n);
}

FfnShape full_ffn_shape(const MoEConfig& cfg) {
  FfnShape s{cfg.num_experts, cfg.model_dim,    cfg.hidden_size,
             cfg.activation,  cfg.has_fc1_bias, cfg.has_fc2_bias,
             cfg.dtype,       cfg.device,       0,
             cfg.output_dim};
  s.initialise = cfg.init_parameters;
  return s;
}

bool same_region(const ExpertRegion& a, const ExpertRegion& b) {
  return a.first == b.first && a.count == b.count && a.slice == b.slice &&
         a.num_slices == b.num_slices;
}

// The stored part of rank p (`shard`) as views: into a full parameter, and into p's own tensor.
struct StoredViews {
  Tensor in_full;
  Tensor in_stored;
};
StoredViews stored_views(const Tensor& full, const Tensor& stored, FfnParam param, bool gated,
                         index_t hidden, const ExpertShard& shard) {
  if (param == FfnParam::kFc2Bias && shard.num_slices > 1) {
    const ColumnRange c = fc2_bias_columns(full.size(1), shard.slice, shard.num_slices);
    return {full.narrow(0, shard.first, 1).narrow(1, c.begin, c.length),
            stored.narrow(1, 0, c.length)};
  }
  const ExpertRegion r{shard.first, shard.count, shard.slice, shard.num_slices};
  return {region_view(full, param, gated, hidden, r), part_view(stored, param, gated, shard.count)};
}

std::string join(const std::vector<std::string>& v) {
  std::string r;
  for (const std::string& s : v) r += (r.empty() ? "" : ", ") + s;
  return r;
}

}  // namespace

void check_config_on_all_ranks(const MoEConfig& cfg, Communicator& comm) {
  // Shapes first (the usual mistake), then everything that changes the exchange or the math.
  comm.check_same_on_all_ranks("num_experts", {cfg.num_experts});
  comm.check_same_on_all_ranks("model_dim", {cfg.model_dim});
  comm.check_same_on_all_ranks("output_dim", {cfg.out_dim()});
  comm.check_same_on_all_ranks("hidden_size", {cfg.hidden_size});
  const auto bits = [](double v) {
    const auto b = std::bit_cast<std::uint64_t>(v);
    return std::vector<std::int64_t>{static_cast<std::int64_t>(b >> 32),
                                     static_cast<std::int64_t>(b & 0xffffffffu)};
  };
  std::vector<std::int64_t> rest = {cfg.top_k,
                                    static_cast<std::int64_t>(cfg.dtype),
                                    static_cast<std::int64_t>(cfg.rules),
                                    static_cast<std::int64_t>(cfg.gate),
                                    static_cast<std::int64_t>(cfg.score_fn),
                                    static_cast<std::int64_t>(cfg.layout),
                                    static_cast<std::int64_t>(cfg.aux_loss),
                                    static_cast<std::int64_t>(cfg.activation),
                                    cfg.has_fc1_bias,
                                    cfg.has_fc2_bias,
                                    cfg.shared_expert_hidden,
                                    cfg.overlap_degree,
                                    cfg.is_postscore,
                                    cfg.batch_prioritized_routing,
                                    static_cast<std::int64_t>(cfg.seed >> 32),
                                    static_cast<std::int64_t>(cfg.seed & 0xffffffffu)};
  for (double v : {cfg.capacity_factor, cfg.gate_noise}) {
    const auto b = bits(v);
    rest.insert(rest.end(), b.begin(), b.end());
  }
  comm.check_same_on_all_ranks(
      "the layer configuration (top_k, dtype, rules, gate, score_fn, layout, aux_loss, "
      "activation, biases, shared_expert_hidden, overlap_degree, is_postscore, "
      "batch_prioritized_routing, seed, capacity_factor, gate_noise)",
      rest);
}

ExpertParallel::ExpertParallel(const MoEConfig& cfg, std::shared_ptr<Communicator> comm,
                               ExpertShard shard, ExpertNetwork& experts, FfnExperts* ffn)
    : cfg_(cfg),
      comm_(std::move(comm)),
      shard_(shard),
      experts_(experts),
      ffn_(ffn),
      full_shape_(full_ffn_shape(cfg)) {
  SY_ASSERT(ffn_ || shard_.num_slices == 1, "sharded experts without the built-in FFN");
  if (ffn_) {
    stored_ = experts_.parameters();
    stored_roles_ = ffn_params(full_shape_);
    SY_ASSERT(stored_.size() == stored_roles_.size(),
              "stored experts differ from the FFN's parameters");
  }
}

ParallelCall ExpertParallel::begin(const ForwardOptions& opt, index_t T, int k, double cf,
                                   Layout layout, int overlap_degree) {
  const std::uint64_t cf_bits = std::bit_cast<std::uint64_t>(cf);
  const std::int64_t alg = opt.a2a_algorithm ? static_cast<std::int64_t>(*opt.a2a_algorithm) : -1;
  const int adaptive_r = opt.adaptive_r.value_or(static_cast<int>(shard_.num_slices));
  // Each value v goes in as (v, -v): one max-reduction gives the max and the min over ranks.
  const std::vector<std::pair<const char*, std::int64_t>> values = {
      {"tokens", T},
      {"top_k", k},
      {"capacity_factor", static_cast<std::int64_t>(cf_bits >> 32)},
      {"capacity_factor", static_cast<std::int64_t>(cf_bits & 0xffffffffu)},
      {"layout", static_cast<std::int64_t>(layout)},
      {"overlap_degree", overlap_degree},
      {"adaptive_r", adaptive_r},
      {"a2a_algorithm", alg},
      {"training", opt.training}};
  std::vector<std::int64_t> v;
  for (const auto& [name, value] : values) {
    v.push_back(value);
    v.push_back(-value);
  }
  // Then every rank's token count (0 in the other ranks' entries, so the max is the count).
  const std::size_t tokens_at = v.size();
  v.resize(tokens_at + static_cast<std::size_t>(comm_->size()), 0);
  v[tokens_at + static_cast<std::size_t>(comm_->rank())] = T;
  v = comm_->all_reduce(std::move(v), ReduceOp::kMax);
  std::vector<std::string> differ;
  for (std::size_t i = 0; i < values.size(); ++i) {
    const std::string name = values[i].first;
    if (name == "tokens") continue;  // ranks may hold different token counts
    if (v[2 * i] != -v[2 * i + 1] && (differ.empty() || differ.back() != name))
      differ.push_back(name);
  }
  SY_CHECK(differ.empty(), "forward: options differ across ranks (", join(differ),
           "): every rank must pass the same ForwardOptions to an expert-parallel layer");
  const index_t max_tokens = v[0], min_tokens = -v[1];

  ParallelCall call;
  call.adaptive_r = adaptive_r;
  call.overlap_degree = overlap_degree;
  call.algorithm = opt.a2a_algorithm;
  call.max_tokens = max_tokens;
  for (int q = 0; q < comm_->rank(); ++q)
    call.token_base += v[tokens_at + static_cast<std::size_t>(q)];
  call.layout = layout;
  SY_CHECK(adaptive_r >= 0, "forward: adaptive_r must be >= 0, got ", adaptive_r);
  SY_CHECK(adaptive_r == 1 || ffn_, "forward: adaptive_r=", adaptive_r,
           " (data parallel or sharded experts) needs the built-in FFN experts, not a custom "
           "expert network");
  // The same checks (and messages) on every rank: the options agree and the layout is pure.
  if (adaptive_r > 0) (void)compute_layout(shard_, cfg_.hidden_size, comm_->size(), adaptive_r);
  SY_CHECK(
      !(cfg_.rules == RuleSet::kMegatron && layout == Layout::kPadded && max_tokens != min_tokens),
      "forward: Megatron's padded layout under expert parallelism needs the same token "
      "count on every rank (its capacity follows each rank's T); got ",
      min_tokens, " to ", max_tokens);
  if (opt.a2a_algorithm) comm_->resolve(opt.a2a_algorithm);  // throws (on every rank) if invalid
  return call;
}

void ExpertParallel::set_route_hooks(RouteArgs& args) {
  Communicator* c = comm_.get();
  // Only where the routing needs the other ranks (a padded capacity taken from the largest need,
  // the batch-level Switch loss's counts): without hooks the CUDA router stays on the device.
  if (args.layout == Layout::kPadded && args.capacity_factor <= 0)
    args.max_needed_over_ranks = [c](index_t needed) {
      return c->all_reduce(std::vector<std::int64_t>{needed}, ReduceOp::kMax)[0];
    };
  if (cfg_.aux_loss == AuxLoss::kSwitch && !cfg_.sinkhorn)
    args.sum_over_ranks = [c](std::vector<double>& v) { v = c->all_reduce(v, ReduceOp::kSum); };
}

void ExpertParallel::sum_over_ranks(std::vector<double>& v) {
  v = comm_->all_reduce(v, ReduceOp::kSum);
}

Tensor ExpertParallel::forward(const ParallelCall& call, const RoutingPlan& plan,
                               const Tensor& buffer, bool training) {
  SY_ASSERT(plan.num_experts == shard_.num_experts, "plan for another expert count");
  SY_ASSERT(buffer.size(0) == plan.num_rows, "buffer rows differ from the plan");
  if (training) saved_ = Saved{};
  Saved s;
  s.call = call;
  s.num_rows = plan.num_rows;
  Tensor out;
  if (call.adaptive_r == 0) {
    out = forward_data_parallel(plan, buffer, training);
    s.net = full_.get();
    s.region = ExpertRegion{0, shard_.num_experts, 0, 1};
  } else {
    const int W = comm_->size(), me = comm_->rank();
    s.layout = compute_layout(shard_, cfg_.hidden_size, W, call.adaptive_r);
    s.region = ExpertRegion{s.layout.first_expert(me), s.layout.experts_per_rank,
                            s.layout.slice(me), s.layout.num_slices};
    const bool stored_as_is =
        !s.layout.sharded_store && s.layout.num_slices == 1;  // plain expert parallelism
    s.net = stored_as_is ? ffn_ : network_for(s.region);
    s.chunks = plan_chunks(call, s.layout, plan);
    const index_t o = cfg_.out_dim();
    out = exchange(buffer.contiguous(), o, s, [&](Chunk& c, const Tensor& rows, const Tensor& off) {
      Tensor y = s.net ? s.net->forward_into(rows, off, training ? &c.saved : nullptr)
                       : experts_.forward(rows, off, training);
      SY_CHECK(y.dim() == 2 && y.size(0) == rows.size(0) && y.size(1) == o,
               "experts: output must be [", rows.size(0), ", ", o, "]");
      return y;
    });
  }
  if (training) {
    s.valid = true;
    saved_ = std::move(s);
  }
  return out;
}

Tensor ExpertParallel::backward(const Tensor& dout) {
  SY_CHECK(saved_.valid, "expert parallel: backward without a training forward");
  Saved s = std::move(saved_);
  saved_ = Saved{};
  const Tensor dy = dout.to(cfg_.dtype).contiguous();
  Tensor dx;
  if (s.call.adaptive_r == 0) {
    dx = full_->backward(dy).to(cfg_.dtype).contiguous();
  } else {
    dx = exchange(dy, cfg_.model_dim, s, [&](Chunk& c, const Tensor& drows, const Tensor&) {
      return s.net ? s.net->backward_from(drows, std::move(c.saved)) : experts_.backward(drows);
    });
  }
  if (s.net && s.net != ffn_) reduce_gradients(*s.net, s.region);
  return dx;
}

// ---- the exchange ----------------------------------------------------------------------------

std::vector<ExpertParallel::Chunk> ExpertParallel::plan_chunks(const ParallelCall& call,
                                                               const ComputeLayout& layout,
                                                               const RoutingPlan& plan) {
  const index_t E = shard_.num_experts, m = layout.experts_per_rank;
  const int W = comm_->size(), me = comm_->rank();
  // Rows of expert e in rank p's buffer: [begin[p][e], begin[p][e] + count[p][e]).
  std::vector<index_t> begin(static_cast<std::size_t>(E)), count(static_cast<std::size_t>(W * E));
  if (plan.layout == Layout::kPadded) {
    SY_ASSERT(plan.num_rows == E * plan.capacity, "padded buffer must be [E*C, d]");
    for (index_t e = 0; e < E; ++e) begin[e] = e * plan.capacity;
    std::fill(count.begin(), count.end(), plan.capacity);  // C is the same on every rank
  } else {
    const Tensor offsets = plan.offsets.to(Device::cpu()).contiguous();
    const index_t* off = offsets.data<index_t>();
    std::vector<std::int64_t> all(static_cast<std::size_t>(W * E), 0);
    for (index_t e = 0; e < E; ++e) {
      begin[e] = off[e];
      all[me * E + e] = off[e + 1] - off[e];
    }
    all = comm_->all_reduce(std::move(all), ReduceOp::kSum);  // every rank's [E] counts
    count.assign(all.begin(), all.end());
  }
  // A custom network keeps its own forward state: one chunk.
  const index_t n = ffn_ ? call.overlap_degree : 1;
  const index_t G = layout.num_row_chunks;
  // Packed layout with at least n experts per rank: chunk c is a group of whole experts, so each
  // expert's GEMMs see the same rows as with one chunk and every result is bitwise the same.
  // Otherwise (and always for padded, as Tutel splits the capacity) chunk c is piece c of every
  // (rank, expert) block; row-wise the math is the same, but the GEMMs see other row counts
  // (BLAS may round differently) and the weight gradients sum the rows in another grouping.
  const bool by_expert = plan.layout != Layout::kPadded && m >= n;
  // Rows of block (rank q's expert le) in chunk c, as [offset in the block, length].
  const auto chunk_of = [&](index_t rows, index_t le, index_t c) -> RowRange {
    if (by_expert) {
      const bool in = le >= piece_begin(m, c, n) && le < piece_begin(m, c + 1, n);
      return {0, in ? rows : 0};
    }
    return {piece_begin(rows, c, n), piece_length(rows, c, n)};
  };
  std::vector<Chunk> chunks(static_cast<std::size_t>(n));
  for (index_t c = 0; c < n; ++c) {
    Chunk& ch = chunks[c];
    for (int q = 0; q < W; ++q) {
      const index_t rho = layout.row_chunk(q);
      for (index_t le = 0; le < m; ++le) {
        const index_t e = layout.first_expert(q) + le, rows = count[me * E + e];
        const RowRange piece = chunk_of(piece_length(rows, rho, G), le, c);
        ch.send.push_back({begin[e] + piece_begin(rows, rho, G) + piece.begin, piece.length});
      }
    }
    const index_t rho = layout.row_chunk(me);
    for (int p = 0; p < W; ++p)
      for (index_t le = 0; le < m; ++le) {
        const index_t rows = count[p * E + layout.first_expert(me) + le];
        ch.recv_count.push_back(chunk_of(piece_length(rows, rho, G), le, c).length);
      }
  }
  return chunks;
}

Tensor ExpertParallel::exchange(
    const Tensor& rows, index_t out_width, Saved& s,
    const std::function<Tensor(Chunk&, const Tensor&, const Tensor&)>& compute) {
  const index_t W = comm_->size(), m = s.layout.experts_per_rank, d = rows.size(1);
  const std::size_t n = s.chunks.size();
  std::vector<Tensor> send(n), recv(n), back_send(n), back_recv(n);
  std::vector<std::vector<index_t>> send_rank(n), recv_rank(n);
  std::vector<CommWork> there(n), back(n);
  // 1. Start every chunk's dispatch: to rank q, its experts' rows (in q's expert order).
  for (std::size_t c = 0; c < n; ++c) {
    const Chunk& ch = s.chunks[c];
    std::vector<index_t> send_count;
    for (const RowRange& r : ch.send) send_count.push_back(r.length);
    send_rank[c] = per_rank(send_count, W, m);
    recv_rank[c] = per_rank(ch.recv_count, W, m);
    send[c] = Tensor::empty({sum_of(send_rank[c]), d}, cfg_.dtype, cfg_.device);
    index_t pos = 0;
    for (const RowRange& r : ch.send) {
      if (r.length > 0)
        send[c].narrow(0, pos, r.length).copy_from(rows.narrow(0, r.begin, r.length));
      pos += r.length;
    }
    recv[c] = Tensor::empty({sum_of(recv_rank[c]), d}, cfg_.dtype, cfg_.device);
    there[c] =
        comm_->start_all_to_all_v(send[c], send_rank[c], recv[c], recv_rank[c], s.call.algorithm);
  }
  // 2. As each chunk arrives: its rows by expert ([m][W] blocks), computed, then start back.
  for (std::size_t c = 0; c < n; ++c) {
    Chunk& ch = s.chunks[c];
    there[c].wait();
    send[c] = Tensor();
    const Tensor arrived = transpose_blocks(recv[c], W, m, ch.recv_count);
    recv[c] = Tensor();
    std::vector<index_t> expert_rows(static_cast<std::size_t>(m), 0);
    for (index_t p = 0; p < W; ++p)
      for (index_t le = 0; le < m; ++le) expert_rows[le] += ch.recv_count[p * m + le];
    const Tensor y = compute(ch, arrived, offsets_tensor(expert_rows)).to(cfg_.dtype);
    back_send[c] = transpose_blocks(y, m, W, transpose_counts(ch.recv_count, W, m));
    back_recv[c] = Tensor::empty({sum_of(send_rank[c]), out_width}, cfg_.dtype, cfg_.device);
    back[c] = comm_->start_all_to_all_v(back_send[c], recv_rank[c], back_recv[c], send_rank[c],
                                        s.call.algorithm);
  }
  // 3. Every row back in place: one block per row with whole experts (a copy); with r hidden
  // slices, r partial blocks summed in rank (= slice) order.
  const bool partial = s.layout.num_slices > 1;
  Tensor out = partial ? Tensor::zeros({s.num_rows, out_width}, cfg_.dtype, cfg_.device)
                       : Tensor::empty({s.num_rows, out_width}, cfg_.dtype, cfg_.device);
  for (std::size_t c = 0; c < n; ++c) {
    back[c].wait();
    index_t pos = 0;
    for (const RowRange& r : s.chunks[c].send) {
      if (r.length > 0) {
        Tensor dst = out.narrow(0, r.begin, r.length);
        const Tensor src = back_recv[c].narrow(0, pos, r.length);
        if (partial)
          add_inplace(dst, src);
        else
          dst.copy_from(src);
      }
      pos += r.length;
    }
    back_recv[c] = back_send[c] = Tensor();
  }
  return out;
}

// ---- weights for modes that compute what this rank does not store ----------------------------

FfnExperts* ExpertParallel::network_for(const ExpertRegion& region) {
  const index_t hidden = cfg_.hidden_size / region.num_slices;
  // The fc2 bias is added by hidden slice 0 only, so the summed slices hold it once.
  const bool fc2_bias = cfg_.has_fc2_bias && region.slice == 0;
  std::unique_ptr<FfnExperts>& net = networks_[{region.count, hidden, fc2_bias}];
  if (!net) {
    FfnShape shape = full_shape_;
    shape.num_experts = region.count;
    shape.hidden_size = hidden;
    shape.has_fc2_bias = fc2_bias;
    net = std::make_unique<FfnExperts>(shape, "experts.", false, cfg_.seed, kExpertInitId);
  }
  gather_weights(*net, region);
  return net.get();
}

void ExpertParallel::gather_weights(FfnExperts& net, const ExpertRegion& region) {
  const index_t W = comm_->size(), h = cfg_.hidden_size;
  const bool gated = is_gated(cfg_.activation);
  if (!full_)
    full_ = std::make_unique<FfnExperts>(full_shape_, "experts.", false, cfg_.seed, kExpertInitId);
  const std::vector<Parameter*> full = full_->parameters(), part = net.parameters();
  const std::vector<FfnParam> part_roles = ffn_params(net.shape());
  const ExpertRegion stored{shard_.first, shard_.count, shard_.slice, shard_.num_slices};
  // Which stored parameters the region needs from other ranks: the same on every rank (the
  // layouts are uniform), so every rank makes the same collectives.
  std::vector<bool> from_others(stored_.size());
  std::vector<Tensor> staging(stored_.size());
  std::vector<CommWork> work(stored_.size());
  for (std::size_t i = 0; i < stored_.size(); ++i) {
    const bool sliced_bias = stored_roles_[i] == FfnParam::kFc2Bias && shard_.num_slices > 1;
    from_others[i] = sliced_bias || !same_region(region, stored) || &net == full_.get();
    if (!from_others[i]) continue;
    const Tensor& mine = stored_[i]->value;
    if (shard_.num_slices == 1) {  // the ranks' parts concatenated are the full parameter
      work[i] = comm_->start_all_gather_v(mine.contiguous(), full[i]->value,
                                          equal_counts(W, shard_.count));
    } else {
      Shape shape = mine.sizes();
      shape[0] *= W;
      staging[i] = Tensor::empty(shape, mine.dtype(), mine.device());
      work[i] = comm_->start_all_gather_v(mine.contiguous(), staging[i], equal_counts(W, 1));
    }
  }
  for (std::size_t i = 0; i < stored_.size(); ++i) {
    if (!from_others[i]) continue;
    work[i].wait();
    if (!staging[i].defined()) continue;
    for (int p = 0; p < W; ++p) {  // rank p's part into its place
      StoredViews v =
          stored_views(full[i]->value, staging[i].narrow(0, p, 1), stored_roles_[i], gated, h,
                       expert_shard(shard_.num_experts, h, p, static_cast<int>(W)));
      v.in_full.copy_from(v.in_stored);
    }
  }
  // The region into the network (the full network is the gather target itself).
  for (std::size_t j = 0; j < part.size(); ++j) {
    part[j]->grad.fill(0.0);
    if (&net == full_.get()) continue;
    std::size_t i = 0;
    while (stored_roles_[i] != part_roles[j]) ++i;
    Tensor dst = part_view(part[j]->value, part_roles[j], gated, region.count);
    if (from_others[i])
      dst.copy_from(region_view(full[i]->value, part_roles[j], gated, h, region));
    else
      dst.copy_from(part_view(stored_[i]->value, part_roles[j], gated, region.count));
  }
}

void ExpertParallel::reduce_gradients(FfnExperts& net, const ExpertRegion& region) {
  const index_t h = cfg_.hidden_size;
  const bool gated = is_gated(cfg_.activation);
  const std::vector<Parameter*> full = full_->parameters(), part = net.parameters();
  const std::vector<FfnParam> part_roles = ffn_params(net.shape());
  const ExpertRegion stored{shard_.first, shard_.count, shard_.slice, shard_.num_slices};
  std::vector<CommWork> work(stored_.size());
  std::vector<Tensor> summed(stored_.size());  // the full-size gradients, summed in f32 or f64
  std::vector<bool> from_others(stored_.size());
  // 1. The network's gradients into full-size gradients (zero elsewhere), summed over ranks (in
  // f32 for f16/bf16 layers: the communicators reduce f32 and f64).
  for (std::size_t i = 0; i < stored_.size(); ++i) {
    const bool sliced_bias = stored_roles_[i] == FfnParam::kFc2Bias && shard_.num_slices > 1;
    from_others[i] = sliced_bias || !same_region(region, stored) || &net == full_.get();
    std::size_t j = 0;
    while (j < part.size() && part_roles[j] != stored_roles_[i]) ++j;
    if (!from_others[i]) {
      add_inplace(stored_[i]->grad, part[j]->grad);
      continue;
    }
    if (&net != full_.get()) {
      full[i]->grad.fill(0.0);
      if (j < part.size())
        region_view(full[i]->grad, stored_roles_[i], gated, h, region)
            .copy_from(part_view(part[j]->grad, stored_roles_[i], gated, region.count));
    }
    summed[i] = full[i]->grad.to(routing_dtype(full[i]->grad.dtype()));
    work[i] = comm_->start_all_reduce(summed[i]);
  }
  // 2. This rank keeps the sum over its stored part.
  for (std::size_t i = 0; i < stored_.size(); ++i) {
    if (!from_others[i]) continue;
    work[i].wait();
    Tensor mine = Tensor::zeros(stored_[i]->grad.sizes(), cfg_.dtype, cfg_.device);
    StoredViews v = stored_views(summed[i], mine, stored_roles_[i], gated, h, shard_);
    v.in_stored.copy_from(v.in_full);
    add_inplace(stored_[i]->grad, mine);
  }
}

// ---- data parallel: all experts on every rank, weights gathered for the call ----------------

Tensor ExpertParallel::forward_data_parallel(const RoutingPlan& plan, const Tensor& buffer,
                                             bool training) {
  if (!full_)
    full_ = std::make_unique<FfnExperts>(full_shape_, "experts.", false, cfg_.seed, kExpertInitId);
  gather_weights(*full_, ExpertRegion{0, shard_.num_experts, 0, 1});
  Tensor y = full_->forward(buffer, plan.offsets, training);
  return y.to(cfg_.dtype).contiguous();
}

}  // namespace switchyard
