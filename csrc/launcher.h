// One serving step in one native call: stage the step's checked inputs into the static buffers of the
// smallest captured size that fits, pad the rest, launch that size's graph.
//
// Staging costs no extra launch: the first node of every captured graph is a staging kernel that reads
// the step's source pointers and batch size from a small descriptor in mapped pinned memory. The host
// writes the descriptor (a few stores) and launches the graph. Descriptors form a ring, so the host
// may run ahead of the GPU by up to kRingSlots steps; the kernel consumes them in launch order.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "graph.h"
#include "inputs.h"
#include "sizes.h"

namespace graphrunner {

constexpr int kRingSlots = 64;

struct StepDescriptor {
  unsigned long long seq;  // 1 + the index of the step this descriptor belongs to; 0 = empty
  long long batch;
  const void* src[kMaxInputs];
};

struct HostRing {
  StepDescriptor slots[kRingSlots];
  unsigned long long consumed;  // written by the GPU: descriptors consumed so far
};

class Launcher {
 public:
  // `static_buffers[i]` holds max-batch rows of input i.
  Launcher(std::shared_ptr<InputChecker> checker, std::vector<at::Tensor> static_buffers, SizeTable sizes);
  ~Launcher();
  Launcher(const Launcher&) = delete;
  Launcher& operator=(const Launcher&) = delete;

  // Inside the capture of `size`: records the staging kernel as the graph's first node.
  void stage(int64_t size);
  void add_graph(int64_t size, std::shared_ptr<Graph> graph);
  // Stages `batch` rows of checked inputs and launches the graph of sizes().size_for(batch).
  void launch(int64_t batch, BorrowedInputs inputs);
  const InputChecker& checker() const { return *checker_; }
  const SizeTable& sizes() const { return sizes_; }
  // Device memory the staging kernel reads besides the static buffers: (address, bytes, what it is).
  std::vector<std::tuple<uint64_t, uint64_t, std::string>> owned_memory() const;

 private:
  std::shared_ptr<InputChecker> checker_;
  std::vector<at::Tensor> static_buffers_;
  SizeTable sizes_;
  std::vector<std::shared_ptr<Graph>> graph_for_batch_;
  HostRing* ring_ = nullptr;         // host view of the mapped pinned ring
  HostRing* ring_device_ = nullptr;  // the same memory as the GPU addresses it
  at::Tensor control_;               // on the GPU: [descriptors consumed, blocks done]
  unsigned long long issued_ = 0;    // descriptors written by the host
  unsigned max_blocks_ = 1;          // per input: two per SM
};

}  // namespace graphrunner
