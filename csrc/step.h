// One serving step in one native call: check the inputs, stage them into the static buffers of the
// smallest captured size that fits, pad the rest, launch.
//
// Staging costs no extra launch: the first node of every captured graph is a staging kernel that reads
// the step's source pointers and batch size from a small descriptor in mapped pinned memory. The host
// writes the descriptor (a few stores) and launches the graph. Descriptors form a ring, so the host
// may run ahead of the GPU by up to kRingSlots steps; the kernel consumes them in launch order.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "graph.h"
#include "inputs.h"

namespace graphrunner {

constexpr int kRingSlots = 64;

struct StepDesc {
  unsigned long long seq;  // 1 + the index of the step this descriptor belongs to; 0 = empty
  long long batch;
  const void* src[kMaxInputs];
};

struct HostRing {
  StepDesc slots[kRingSlots];
  unsigned long long consumed;  // written by the GPU: descriptors consumed so far
};

class StepRunner {
 public:
  // `static_buffers[i]` holds max-batch rows of input i; `capture_sizes` are the sizes to be captured.
  StepRunner(std::shared_ptr<InputChecker> checker, std::vector<at::Tensor> static_buffers,
             std::vector<int64_t> capture_sizes);
  ~StepRunner();
  StepRunner(const StepRunner&) = delete;
  StepRunner& operator=(const StepRunner&) = delete;

  // Inside the capture of `size`: records the staging kernel as the graph's first node.
  void stage(int64_t size);
  void add_graph(int64_t size, std::shared_ptr<Graph> graph);
  // The captured size a batch runs at (0 when none fits: the step runs eagerly).
  int64_t size_for(int64_t batch) const;
  // Stages `batch` rows of checked inputs and launches the graph of size_for(batch).
  void launch(int64_t batch, StepTensors inputs);
  const InputChecker& checker() const { return *checker_; }

 private:
  std::shared_ptr<InputChecker> checker_;
  std::vector<at::Tensor> static_buffers_;
  std::vector<int64_t> size_for_batch_;
  std::vector<std::shared_ptr<Graph>> graph_for_batch_;
  HostRing* ring_ = nullptr;         // host view of the mapped pinned ring
  HostRing* ring_device_ = nullptr;  // the same memory as the GPU addresses it
  at::Tensor control_;               // on the GPU: [descriptors consumed, blocks done]
  unsigned long long issued_ = 0;    // descriptors written by the host
};

}  // namespace graphrunner
