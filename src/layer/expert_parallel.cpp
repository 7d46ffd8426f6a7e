#include "layer/expert_parallel.h"

#include <bit>
#include <string>
#include <utility>

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

std::string join(const std::vector<std::string>& v) {
  std::string r;
  for (const std::string& s : v) r += (r.empty() ? "" : ", ") + s;
  return r;
}

}  // namespace

ExpertShard expert_shard(index_t num_experts, const Communicator& comm) {
  const index_t W = comm.size();
  SY_CHECK(num_experts >= W, "expert parallelism: num_experts=", num_experts, " is below the ", W,
           " ranks; sharded experts (fewer experts than ranks) are not supported yet");
  SY_CHECK(num_experts % W == 0, "expert parallelism: num_experts=", num_experts,
           " must be a multiple of the ", W, " ranks (each rank holds num_experts / ranks)");
  const index_t El = num_experts / W;
  return ExpertShard{num_experts, El, comm.rank() * El};
}

void check_config_on_all_ranks(const MoEConfig& cfg, Communicator& comm) {
  // Shapes first (the usual mistake), then everything that changes the exchange or the math.
  comm.check_same_on_all_ranks("num_experts", {cfg.num_experts});
  comm.check_same_on_all_ranks("model_dim", {cfg.model_dim});
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
    : cfg_(cfg), comm_(std::move(comm)), shard_(shard), experts_(experts), ffn_(ffn) {}

ParallelCall ExpertParallel::begin(const ForwardOptions& opt, index_t T, int k, double cf,
                                   Layout layout, int overlap_degree) {
  const std::uint64_t cf_bits = std::bit_cast<std::uint64_t>(cf);
  const std::int64_t alg = opt.a2a_algorithm ? static_cast<std::int64_t>(*opt.a2a_algorithm) : -1;
  // Each value v goes in as (v, -v): one max-reduction gives the max and the min over ranks.
  const std::vector<std::pair<const char*, std::int64_t>> values = {
      {"tokens", T},
      {"top_k", k},
      {"capacity_factor", static_cast<std::int64_t>(cf_bits >> 32)},
      {"capacity_factor", static_cast<std::int64_t>(cf_bits & 0xffffffffu)},
      {"layout", static_cast<std::int64_t>(layout)},
      {"overlap_degree", overlap_degree},
      {"adaptive_r", opt.adaptive_r},
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
  call.adaptive_r = opt.adaptive_r;
  call.overlap_degree = overlap_degree;
  call.algorithm = opt.a2a_algorithm;
  call.max_tokens = max_tokens;
  for (int q = 0; q < comm_->rank(); ++q)
    call.token_base += v[tokens_at + static_cast<std::size_t>(q)];
  call.layout = layout;
  SY_CHECK(opt.adaptive_r >= 0, "forward: adaptive_r must be >= 0, got ", opt.adaptive_r);
  SY_CHECK(opt.adaptive_r <= 1, "forward: adaptive_r=", opt.adaptive_r,
           " (sharded experts) is not supported yet; use 1 (expert parallel) or 0 (data "
           "parallel)");
  SY_CHECK(opt.adaptive_r == 1 || ffn_,
           "forward: adaptive_r=0 (data parallel) needs the built-in FFN experts, not a custom "
           "expert network");
  SY_CHECK(opt.adaptive_r == 0 || overlap_degree == 1 || layout != Layout::kPadded || ffn_,
           "forward: overlap_degree=", overlap_degree,
           " needs the built-in FFN experts (a custom expert network runs with "
           "overlap_degree=1)");
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
  args.max_needed_over_ranks = [c](index_t needed) {
    return c->all_reduce(std::vector<std::int64_t>{needed}, ReduceOp::kMax)[0];
  };
  args.sum_over_ranks = [c](std::vector<double>& v) { v = c->all_reduce(v, ReduceOp::kSum); };
}

void ExpertParallel::sum_over_ranks(std::vector<double>& v) {
  v = comm_->all_reduce(v, ReduceOp::kSum);
}

Tensor ExpertParallel::run_experts(const Tensor& rows, const Tensor& offsets, bool training,
                                   FfnExperts::Saved* chunk_saved) {
  Tensor y = chunk_saved ? ffn_->forward_into(rows, offsets, training ? chunk_saved : nullptr)
                         : experts_.forward(rows, offsets, training);
  SY_CHECK(y.dim() == 2 && y.size(0) == rows.size(0) && y.size(1) == cfg_.model_dim,
           "experts: output must be [", rows.size(0), ", ", cfg_.model_dim, "]");
  return y.to(cfg_.dtype).contiguous();
}

Tensor ExpertParallel::run_experts_backward(const Tensor& drows,
                                            const FfnExperts::Saved* chunk_saved) {
  Tensor dx = chunk_saved ? ffn_->backward_from(drows, *chunk_saved) : experts_.backward(drows);
  return dx.to(cfg_.dtype).contiguous();
}

Tensor ExpertParallel::forward(const ParallelCall& call, const RoutingPlan& plan,
                               const Tensor& buffer, bool training) {
  SY_ASSERT(plan.num_experts == shard_.num_experts, "plan for another expert count");
  SY_ASSERT(buffer.size(0) == plan.num_rows, "buffer rows differ from the plan");
  if (training) saved_ = Saved{};
  Saved s;
  s.call = call;
  Tensor out;
  if (call.adaptive_r == 0)
    out = forward_data_parallel(plan, buffer, training);
  else if (plan.layout == Layout::kPadded)
    out = forward_padded(plan, buffer.contiguous(), training, s);
  else
    out = forward_packed(plan, buffer.contiguous(), training, s);
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
  if (s.call.adaptive_r == 0) return backward_data_parallel(dy);
  if (s.call.layout == Layout::kPadded) return backward_padded(dy, s);
  return backward_packed(dy, s);
}

// ---- padded layout: equal splits, optionally in chunks along the capacity -------------------

Tensor ExpertParallel::forward_padded(const RoutingPlan& plan, const Tensor& buffer, bool training,
                                      Saved& s) {
  const index_t E = shard_.num_experts, El = shard_.count, W = comm_->size();
  const index_t C = plan.capacity, d = cfg_.model_dim;
  // Every rank has the same C (the router maxed it over ranks); C = 0 only when no rank has a
  // token, and then no rank exchanges anything.
  SY_ASSERT(buffer.size(0) == E * C, "padded buffer must be [E*C, d]");
  s.capacity = C;
  if (C == 0) return Tensor::empty({0, d}, cfg_.dtype, cfg_.device);
  // Chunks along C (C is a multiple of overlap_degree unless the alignment was rounded up to a
  // multiple of 128; uneven chunks are fine).
  const index_t n = std::min<index_t>(s.call.overlap_degree, C);
  s.chunk_begin.resize(static_cast<std::size_t>(n + 1));
  for (index_t c = 0; c <= n; ++c) s.chunk_begin[c] = C * c / n;
  const bool chunked = ffn_ != nullptr && n > 1;
  if (chunked) s.chunk_saved.resize(static_cast<std::size_t>(n));

  const Tensor buf3 = buffer.view({E, C, d});  // [E, C, d]
  const auto num = static_cast<std::size_t>(n);
  std::vector<Tensor> send(num), recv(num), back_send(num), back_recv(num);
  std::vector<CommWork> there(num), back(num);
  // 1. Start every chunk's dispatch: [E, cc, d] -> [W, El, cc, d] (rank q's rows, per expert).
  for (index_t c = 0; c < n; ++c) {
    const index_t b = s.chunk_begin[c], cc = s.chunk_begin[c + 1] - b;
    send[c] = buf3.narrow(1, b, cc).contiguous().view({E * cc, d});
    recv[c] = Tensor::empty({E * cc, d}, cfg_.dtype, cfg_.device);
    there[c] = comm_->start_all_to_all(send[c], recv[c], s.call.algorithm);
  }
  // 2. As each chunk arrives: local experts on [El, W*cc, d], then start its return.
  for (index_t c = 0; c < n; ++c) {
    const index_t cc = s.chunk_begin[c + 1] - s.chunk_begin[c];
    there[c].wait();
    const Tensor rows = transpose_blocks(recv[c], W, El, equal_counts(W * El, cc));
    const Tensor y = run_experts(rows, offsets_tensor(equal_counts(El, W * cc)), training,
                                 chunked ? &s.chunk_saved[c] : nullptr);
    back_send[c] = transpose_blocks(y, El, W, equal_counts(El * W, cc));
    back_recv[c] = Tensor::empty({E * cc, d}, cfg_.dtype, cfg_.device);
    back[c] = comm_->start_all_to_all(back_send[c], back_recv[c], s.call.algorithm);
  }
  // 3. Reassemble [E, C, d] from the returned chunks.
  Tensor out = Tensor::empty({E, C, d}, cfg_.dtype, cfg_.device);
  for (index_t c = 0; c < n; ++c) {
    const index_t b = s.chunk_begin[c], cc = s.chunk_begin[c + 1] - b;
    back[c].wait();
    out.narrow(1, b, cc).copy_from(back_recv[c].view({E, cc, d}));
  }
  return out.view({E * C, d});
}

Tensor ExpertParallel::backward_padded(const Tensor& dout, Saved& s) {
  const index_t E = shard_.num_experts, El = shard_.count, W = comm_->size();
  const index_t C = s.capacity, d = cfg_.model_dim;
  if (C == 0) return Tensor::empty({0, d}, cfg_.dtype, cfg_.device);
  const index_t n = static_cast<index_t>(s.chunk_begin.size()) - 1;
  const bool chunked = !s.chunk_saved.empty();
  const Tensor dout3 = dout.view({E, C, d});
  const auto num = static_cast<std::size_t>(n);
  std::vector<Tensor> send(num), recv(num), back_send(num), back_recv(num);
  std::vector<CommWork> there(num), back(num);
  for (index_t c = 0; c < n; ++c) {
    const index_t b = s.chunk_begin[c], cc = s.chunk_begin[c + 1] - b;
    send[c] = dout3.narrow(1, b, cc).contiguous().view({E * cc, d});
    recv[c] = Tensor::empty({E * cc, d}, cfg_.dtype, cfg_.device);
    there[c] = comm_->start_all_to_all(send[c], recv[c], s.call.algorithm);
  }
  for (index_t c = 0; c < n; ++c) {
    const index_t cc = s.chunk_begin[c + 1] - s.chunk_begin[c];
    there[c].wait();
    const Tensor drows = transpose_blocks(recv[c], W, El, equal_counts(W * El, cc));
    const Tensor dx = run_experts_backward(drows, chunked ? &s.chunk_saved[c] : nullptr);
    back_send[c] = transpose_blocks(dx, El, W, equal_counts(El * W, cc));
    back_recv[c] = Tensor::empty({E * cc, d}, cfg_.dtype, cfg_.device);
    back[c] = comm_->start_all_to_all(back_send[c], back_recv[c], s.call.algorithm);
  }
  Tensor dbuffer = Tensor::empty({E, C, d}, cfg_.dtype, cfg_.device);
  for (index_t c = 0; c < n; ++c) {
    const index_t b = s.chunk_begin[c], cc = s.chunk_begin[c + 1] - b;
    back[c].wait();
    dbuffer.narrow(1, b, cc).copy_from(back_recv[c].view({E, cc, d}));
  }
  return dbuffer.view({E * C, d});
}

// ---- packed layout: per-expert counts exchanged, then variable all-to-all -------------------

namespace {

// Rows per rank from rows per (rank, local expert) block.
std::vector<index_t> per_rank(const std::vector<index_t>& block_count, index_t W, index_t El) {
  std::vector<index_t> r(static_cast<std::size_t>(W), 0);
  for (index_t p = 0; p < W; ++p)
    for (index_t le = 0; le < El; ++le) r[p] += block_count[p * El + le];
  return r;
}

// count[a*B + b] -> count[b*A + a].
std::vector<index_t> transpose_counts(const std::vector<index_t>& count, index_t A, index_t B) {
  std::vector<index_t> t(count.size());
  for (index_t a = 0; a < A; ++a)
    for (index_t b = 0; b < B; ++b) t[b * A + a] = count[a * B + b];
  return t;
}

}  // namespace

Tensor ExpertParallel::forward_packed(const RoutingPlan& plan, const Tensor& buffer, bool training,
                                      Saved& s) {
  const index_t E = shard_.num_experts, El = shard_.count, W = comm_->size();
  const index_t d = cfg_.model_dim;
  // 1. Rows per expert: this rank's [E] to every expert's rank; [W, El] back from every rank.
  const Tensor offsets = plan.offsets.to(Device::cpu()).contiguous();
  const index_t* off = offsets.data<index_t>();
  s.send_count.resize(static_cast<std::size_t>(E));
  for (index_t e = 0; e < E; ++e) s.send_count[e] = off[e + 1] - off[e];
  std::vector<double> sc(s.send_count.begin(), s.send_count.end());
  const Tensor send_count = Tensor::from_vector(sc, {E}, DType::kI64).to(comm_->device());
  Tensor recv_count = Tensor::empty({E}, DType::kI64, comm_->device());
  comm_->all_to_all(send_count, recv_count, s.call.algorithm);
  recv_count = recv_count.to(Device::cpu());
  const index_t* rc = recv_count.data<index_t>();
  s.recv_count.assign(rc, rc + E);  // [W, El]

  // 2. Rows to the experts' ranks; re-laid out by local expert: [El][W] blocks.
  const std::vector<index_t> send_rank = per_rank(s.send_count, W, El);
  const std::vector<index_t> recv_rank = per_rank(s.recv_count, W, El);
  index_t num_recv = 0;
  for (index_t r : recv_rank) num_recv += r;
  Tensor recv = Tensor::empty({num_recv, d}, cfg_.dtype, cfg_.device);
  comm_->all_to_all_v(buffer, send_rank, recv, recv_rank, s.call.algorithm);
  const Tensor rows = transpose_blocks(recv, W, El, s.recv_count);
  std::vector<index_t> expert_rows(static_cast<std::size_t>(El), 0);
  for (index_t q = 0; q < W; ++q)
    for (index_t le = 0; le < El; ++le) expert_rows[le] += s.recv_count[q * El + le];

  // 3. Local experts, then the rows back to their ranks in the order they came.
  const Tensor y = run_experts(rows, offsets_tensor(expert_rows), training, nullptr);
  const Tensor back_send = transpose_blocks(y, El, W, transpose_counts(s.recv_count, W, El));
  Tensor out = Tensor::empty({plan.num_rows, d}, cfg_.dtype, cfg_.device);
  comm_->all_to_all_v(back_send, recv_rank, out, send_rank, s.call.algorithm);
  return out;
}

Tensor ExpertParallel::backward_packed(const Tensor& dout, Saved& s) {
  const index_t El = shard_.count, W = comm_->size();
  const index_t d = cfg_.model_dim;
  const std::vector<index_t> send_rank = per_rank(s.send_count, W, El);
  const std::vector<index_t> recv_rank = per_rank(s.recv_count, W, El);
  index_t num_recv = 0;
  for (index_t r : recv_rank) num_recv += r;
  Tensor recv = Tensor::empty({num_recv, d}, cfg_.dtype, cfg_.device);
  comm_->all_to_all_v(dout, send_rank, recv, recv_rank, s.call.algorithm);
  const Tensor drows = transpose_blocks(recv, W, El, s.recv_count);
  const Tensor dx = run_experts_backward(drows, nullptr);
  const Tensor back_send = transpose_blocks(dx, El, W, transpose_counts(s.recv_count, W, El));
  Tensor dbuffer = Tensor::empty({dout.size(0), d}, cfg_.dtype, cfg_.device);
  comm_->all_to_all_v(back_send, recv_rank, dbuffer, send_rank, s.call.algorithm);
  return dbuffer;
}

// ---- data parallel: all experts on every rank, weights gathered for the call ----------------

Tensor ExpertParallel::forward_data_parallel(const RoutingPlan& plan, const Tensor& buffer,
                                             bool training) {
  const index_t E = shard_.num_experts, W = comm_->size();
  if (!full_) {
    FfnShape shape = ffn_->shape();
    shape.num_experts = E;
    shape.first_expert = 0;
    full_ = std::make_unique<FfnExperts>(shape, "experts.", false, cfg_.seed, kExpertInitId);
  }
  const std::vector<Parameter*> local = ffn_->parameters(), full = full_->parameters();
  SY_ASSERT(local.size() == full.size(), "local and full experts differ in parameters");
  std::vector<Tensor> send;
  std::vector<CommWork> work;
  for (std::size_t i = 0; i < local.size(); ++i) {
    send.push_back(local[i]->value.contiguous());
    work.push_back(
        comm_->start_all_gather_v(send.back(), full[i]->value, equal_counts(W, shard_.count)));
  }
  for (CommWork& w : work) w.wait();
  Tensor y = full_->forward(buffer, plan.offsets, training);
  return y.to(cfg_.dtype).contiguous();
}

Tensor ExpertParallel::backward_data_parallel(const Tensor& dout) {
  const std::vector<Parameter*> local = ffn_->parameters(), full = full_->parameters();
  for (Parameter* p : full) p->grad.fill(0.0);
  Tensor dx = full_->backward(dout).to(cfg_.dtype).contiguous();
  // The full gradients summed over ranks; this rank keeps its experts' slice.
  std::vector<CommWork> work;
  for (Parameter* p : full) work.push_back(comm_->start_all_reduce(p->grad));
  for (std::size_t i = 0; i < local.size(); ++i) {
    work[i].wait();
    add_inplace(local[i]->grad, full[i]->grad.narrow(0, shard_.first, shard_.count));
  }
  return dx;
}

}  // namespace switchyard
