// One serving step in one native call: stage the step's checked inputs into the static buffers of the
// smallest captured size that fits, pad the rest, launch that size's graph.
//
// Staging costs no extra launch and no extra GPU round trip: the first node of every captured graph is a
// staging kernel whose parameters are the step itself (batch size and source pointers). Before each launch
// the host sets them on the executable graph's node (Graph::replay_with); the driver copies parameters into
// the launch, so launches already queued keep their own and the host may run any number of steps ahead of
// the GPU. The kernel reads nothing but its parameters before it copies.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "graph.h"
#include "inputs.h"
#include "sizes.h"

namespace graphrunner {

// The staging kernel's one parameter. The captured node holds it with batch -1 (no step), so a bare
// Graph::replay() leaves the static buffers as they are.
struct StageParams {
  long long batch;  // rows per input to copy from src; -1: no step
  long long size;   // the graph's captured size: rows [batch, size) are padding
  unsigned char* dst[kMaxInputs];
  const unsigned char* src[kMaxInputs];
  long long row_bytes[kMaxInputs];
  uint4 pad[kMaxInputs];
  bool pad_each_step[kMaxInputs];
};

class Launcher {
 public:
  // `static_buffers[i]` holds max-batch rows of input i.
  Launcher(std::shared_ptr<InputChecker> checker, std::vector<at::Tensor> static_buffers, SizeTable sizes);
  Launcher(const Launcher&) = delete;
  Launcher& operator=(const Launcher&) = delete;

  // Inside the capture of `size`: records the staging kernel as the graph's first node.
  void stage(int64_t size);
  // After that capture: `graph` (kept, see Graph::set_argument_node) serves the batches of `size`.
  void add_graph(int64_t size, std::shared_ptr<Graph> graph);
  // Stages `batch` rows of checked inputs and launches the graph of sizes().size_for(batch).
  void launch(int64_t batch, BorrowedInputs inputs);
  const InputChecker& checker() const { return *checker_; }
  const SizeTable& sizes() const { return sizes_; }

 private:
  struct Captured {
    std::shared_ptr<Graph> graph;
    StageParams params;  // the size's table; each launch fills in batch and src
  };
  StageParams params_for(int64_t size) const;

  std::shared_ptr<InputChecker> checker_;
  std::vector<at::Tensor> static_buffers_;
  SizeTable sizes_;
  std::map<int64_t, cudaGraphNode_t> staging_nodes_;  // per size, between stage() and add_graph()
  std::vector<std::shared_ptr<Captured>> captured_for_batch_;
  unsigned max_blocks_ = 1;  // per input: two per SM
};

}  // namespace graphrunner
