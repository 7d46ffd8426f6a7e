// The hierarchical all-to-alls (2DH and pipelined), written once over the few steps every backend
// lends them (SubgroupExchanger): all-to-all-v exchanges among the ranks of one node or among the
// ranks with one local index, local copies and scratch on the backend's device. The MPI backend
// lends sub-communicators and memcpy; the NCCL backend grouped ncclSend/ncclRecv and
// cudaMemcpyAsync on its stream. The algorithm itself: comm_a2a_hierarchical.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

namespace switchyard::comm {

class SubgroupExchanger {
 public:
  // kNode: the L ranks of this node, by local index. kAcrossNodes: the N ranks with this rank's
  // local index, one per node, by node.
  enum class Group { kNode, kAcrossNodes };

  virtual ~SubgroupExchanger() = default;

  // Starts an all-to-all-v among `group`'s ranks: send_counts[i] elements of `elem_size` bytes
  // at send + send_displs[i] * elem_size to member i, recv_counts[i] from member i into recv +
  // recv_displs[i] * elem_size. Returns a ticket for wait(). The arrays and both buffers stay
  // untouched by the caller until wait(ticket) returns. `what` names the step in errors.
  virtual int start_exchange(Group group, const char* send, const std::int64_t* send_counts,
                             const std::int64_t* send_displs, char* recv,
                             const std::int64_t* recv_counts, const std::int64_t* recv_displs,
                             std::size_t elem_size, const char* what) = 0;
  // After it, copies (and exchanges) started later see the exchange's received data. A backend
  // that orders its work on a stream may only enqueue here, and may run every exchange started
  // so far in one group: the caller never copies into a buffer that a started exchange reads or
  // writes, nor reads a started exchange's output before waiting for it.
  virtual void wait(int ticket, const char* what) = 0;
  // Copies `bytes` between buffers of the backend's device, after the waits before it.
  virtual void copy(char* dst, const char* src, std::int64_t bytes) = 0;
  // Scratch `slot` (0 to 3) of at least `bytes` on the backend's device, kept between calls.
  virtual char* scratch(int slot, std::int64_t bytes) = 0;
};

// One all-to-all-v over `exchanger` as 2DH (chunks = 1) or pipelined (chunks > 1). size() is a
// multiple of local_size with each node's ranks consecutive. node_send_counts[l_s * size + dst]:
// elements the rank with local index l_s on this node sends to rank dst (this rank's own row
// included); recv_counts[src]: elements from rank src. send and recv are packed in rank order.
// `what` names the collective in errors ("all_to_all_v (2dh)").
void hierarchical_all_to_all(SubgroupExchanger& exchanger, int rank, int size, int local_size,
                             int chunks, const char* send, const std::int64_t* node_send_counts,
                             char* recv, const std::int64_t* recv_counts, std::size_t elem_size,
                             const char* what);

}  // namespace switchyard::comm
