// Hierarchical all-to-all: 2DH (Tutel's two-dimensional hierarchical all-to-all) and its
// pipelined form (PlanMoE's Pipe-A2A idea), over any backend's SubgroupExchanger. Ranks form N
// nodes of L consecutive ranks; rank r = g * L + l has node g and local index l.
//
//   1. pack:     my piece for rank (g', l') goes to block [l'][g'] (grouped by local peer)
//   2. intra:    all-to-all among the L ranks of my node; from local peer l_s I get the pieces
//                that (g, l_s) sends to (g', l) for every node g', as blocks [l_s][g']
//   3. relayout: [l_s][g'] -> [g'][l_s] (grouped by destination node)
//   4. inter:    all-to-all among the N ranks with local index l; from node g_s I get the
//                pieces that (g_s, l_s) sends to me for every l_s: [g_s][l_s] = source order
//
// Pipelined: every piece is split into K chunks (chunk k of a piece of c elements is
// [c*k/K, c*(k+1)/K)); the four steps run per chunk, and chunk k+1's intra-node exchange is in
// flight while chunk k's inter-node exchange is. K = 1 is 2DH. Only bytes move, so every
// algorithm gives the flat all-to-all's result bit for bit.
#include "comm/comm_a2a_hierarchical.h"

#include <algorithm>
#include <string>
#include <vector>

namespace switchyard::comm {
namespace {

using Group = SubgroupExchanger::Group;

std::int64_t chunk_begin(std::int64_t c, int k, int chunks) { return c * k / chunks; }
std::int64_t chunk_size(std::int64_t c, int k, int chunks) {
  return c * (k + 1) / chunks - c * k / chunks;
}

// One exchange (intra or inter) of one chunk: counts and displacements in elements, relative to
// the chunk's region of the stage buffers, which start at send_offset / recv_offset.
struct Exchange {
  std::vector<std::int64_t> send_counts, send_displs, recv_counts, recv_displs;
  std::int64_t send_offset = 0, recv_offset = 0;
  std::int64_t send_total = 0, recv_total = 0;
  int ticket = -1;
};

void set_counts(std::vector<std::int64_t>& counts, std::vector<std::int64_t>& displs,
                std::int64_t& total, const std::vector<std::int64_t>& values) {
  counts = values;
  displs.resize(values.size());
  total = 0;
  for (std::size_t i = 0; i < values.size(); ++i) {
    displs[i] = total;
    total += values[i];
  }
}

}  // namespace

void hierarchical_all_to_all(SubgroupExchanger& x, int rank, int size, int local_size, int chunks,
                             const char* send, const std::int64_t* node_send_counts, char* recv,
                             const std::int64_t* recv_counts, std::size_t elem_size,
                             const char* what) {
  const int n = size, L = local_size, N = n / L;
  const int l = rank % L;
  const int K = chunks;
  const std::int64_t es = static_cast<std::int64_t>(elem_size);
  // S(l_s, dst): elements the rank (g, l_s) of this node sends to dst.
  const auto S = [&](int l_s, int dst) { return node_send_counts[std::size_t(l_s) * n + dst]; };
  const std::int64_t* my_counts = node_send_counts + std::size_t(l) * n;

  std::vector<std::int64_t> send_displ(n + 1, 0), recv_displ(n + 1, 0);
  for (int p = 0; p < n; ++p) {
    send_displ[p + 1] = send_displ[p] + my_counts[p];
    recv_displ[p + 1] = recv_displ[p] + recv_counts[p];
  }

  // Counts of both exchanges for every chunk, and where each chunk's region starts.
  std::vector<Exchange> intra(K), inter(K);
  char *a_send_buf = nullptr, *a_recv_buf = nullptr, *b_send_buf = nullptr, *b_recv_buf = recv;
  {
    std::int64_t a_send = 0, a_recv = 0, b_recv = 0;
    std::vector<std::int64_t> to(std::max(L, N)), from(std::max(L, N));
    for (int k = 0; k < K; ++k) {
      to.assign(L, 0);
      from.assign(L, 0);
      for (int lp = 0; lp < L; ++lp) {
        for (int gp = 0; gp < N; ++gp) {
          to[lp] += chunk_size(S(l, gp * L + lp), k, K);
          from[lp] += chunk_size(S(lp, gp * L + l), k, K);
        }
      }
      Exchange& a = intra[k];
      set_counts(a.send_counts, a.send_displs, a.send_total, to);
      set_counts(a.recv_counts, a.recv_displs, a.recv_total, from);
      a.send_offset = a_send;
      a.recv_offset = a_recv;
      a_send += a.send_total;
      a_recv += a.recv_total;

      to.assign(N, 0);
      from.assign(N, 0);
      for (int gp = 0; gp < N; ++gp) {
        for (int ls = 0; ls < L; ++ls) {
          to[gp] += chunk_size(S(ls, gp * L + l), k, K);
          from[gp] += chunk_size(recv_counts[gp * L + ls], k, K);
        }
      }
      Exchange& b = inter[k];
      set_counts(b.send_counts, b.send_displs, b.send_total, to);
      set_counts(b.recv_counts, b.recv_displs, b.recv_total, from);
      b.send_offset = a.recv_offset;  // the relayout buffer mirrors the intra receive buffer
      b.recv_offset = b_recv;
      b_recv += b.recv_total;
    }
    a_send_buf = x.scratch(0, a_send * es);
    a_recv_buf = x.scratch(1, a_recv * es);
    b_send_buf = x.scratch(2, a_recv * es);
    // With one chunk the inter-node exchange delivers in source order straight into recv.
    if (K > 1) b_recv_buf = x.scratch(3, b_recv * es);
  }

  // 1. pack chunk k: blocks [l'][g'] of my pieces' chunk k.
  const auto pack = [&](int k) {
    char* out = a_send_buf + intra[k].send_offset * es;
    for (int lp = 0; lp < L; ++lp) {
      for (int gp = 0; gp < N; ++gp) {
        const int dst = gp * L + lp;
        const std::int64_t c = my_counts[dst], m = chunk_size(c, k, K);
        if (m > 0) x.copy(out, send + (send_displ[dst] + chunk_begin(c, k, K)) * es, m * es);
        out += m * es;
      }
    }
  };
  // 3. relayout chunk k: [l_s][g'] -> [g'][l_s].
  std::vector<std::int64_t> block_offset(std::size_t(L) * N);
  const auto relayout = [&](int k) {
    std::int64_t offset = 0;
    for (int ls = 0; ls < L; ++ls) {
      for (int gp = 0; gp < N; ++gp) {
        block_offset[std::size_t(ls) * N + gp] = offset;
        offset += chunk_size(S(ls, gp * L + l), k, K);
      }
    }
    const char* in = a_recv_buf + intra[k].recv_offset * es;
    char* out = b_send_buf + inter[k].send_offset * es;
    for (int gp = 0; gp < N; ++gp) {
      for (int ls = 0; ls < L; ++ls) {
        const std::int64_t m = chunk_size(S(ls, gp * L + l), k, K);
        if (m > 0) x.copy(out, in + block_offset[std::size_t(ls) * N + gp] * es, m * es);
        out += m * es;
      }
    }
  };
  // After 4: chunk k of each source's piece to its place in recv (pipelined only).
  const auto unpack = [&](int k) {
    const char* in = b_recv_buf + inter[k].recv_offset * es;
    for (int src = 0; src < n; ++src) {
      const std::int64_t c = recv_counts[src], m = chunk_size(c, k, K);
      if (m > 0) x.copy(recv + (recv_displ[src] + chunk_begin(c, k, K)) * es, in, m * es);
      in += m * es;
    }
  };
  const std::string intra_what = std::string(what) + ", intra-node exchange";
  const std::string inter_what = std::string(what) + ", inter-node exchange";
  const auto start_exchange = [&](Exchange& e, Group group, const char* in, char* out) {
    const std::string& step = group == Group::kNode ? intra_what : inter_what;
    e.ticket = x.start_exchange(group, in + e.send_offset * es, e.send_counts.data(),
                                e.send_displs.data(), out + e.recv_offset * es,
                                e.recv_counts.data(), e.recv_displs.data(), elem_size,
                                step.c_str());
  };

  pack(0);
  start_exchange(intra[0], Group::kNode, a_send_buf, a_recv_buf);
  for (int k = 0; k < K; ++k) {
    if (k + 1 < K) {  // the next chunk's intra-node exchange overlaps this chunk's inter-node one
      pack(k + 1);
      start_exchange(intra[k + 1], Group::kNode, a_send_buf, a_recv_buf);
    }
    x.wait(intra[k].ticket, intra_what.c_str());
    relayout(k);
    start_exchange(inter[k], Group::kAcrossNodes, b_send_buf, b_recv_buf);
    if (k > 0) {
      x.wait(inter[k - 1].ticket, inter_what.c_str());
      unpack(k - 1);
    }
  }
  x.wait(inter[K - 1].ticket, inter_what.c_str());
  if (K > 1) unpack(K - 1);
}

}  // namespace switchyard::comm
