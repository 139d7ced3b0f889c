// One serving step in one native call: stage the step's checked inputs into the static buffers of the
// smallest captured size that fits, pad the rest, launch that size's graph; and keep the host at most
// max_lead steps ahead of the GPU.
//
// Staging costs no extra launch and no extra GPU round trip: the first node of every captured graph is a
// staging kernel whose parameters are the step itself (batch size and source pointers). Before each launch
// the host sets them on the executable graph's node (Graph::replay_with); the driver copies parameters into
// the launch, so launches already queued keep their own and the host may run steps ahead of the GPU (up to
// max_lead, below). The kernel reads nothing but its parameters before it copies.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstddef>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "graph.h"
#include "inputs.h"
#include "sizes.h"

namespace graphrunner {

// The staging kernel's one parameter, for up to N inputs: the step (counts, sources) and the size's table. The
// driver copies it into every launch, so it is kept as small as the runner's inputs allow (N = 4, 8 or 16).
// The captured node holds batch -1 (no step), so a bare Graph::replay() leaves the static buffers as they are.
template <int N>
struct StageParams {
  long long batch;   // the step's requests: units to copy from src for a per-request input; -1: no step
  long long tokens;  // the step's tokens: units to copy for a per-token input of a ragged runner
  long long seq;     // the step's number (1, 2, ...), which the kernel stamps into *started as it begins
  long long size;    // the graph's captured requests: units [batch, size) of a per-request input are padding
  long long size_tokens;  // the graph's captured tokens (ragged): units [tokens, size_tokens) are padding
  const unsigned char* src[N];
  unsigned char* dst[N];
  volatile long long* started;  // host-mapped: the number of the last step that began on the GPU
  long long unit_bytes[N];
  uint4 pad[N];
  unsigned pad_each_step;  // bit i: input i writes its padding units each step
  unsigned per_token;      // bit i: input i counts tokens (a ragged runner's per-token input)
};

// The host's lead. A loop that never waits fills CUDA's launch queue, and with a deep queue every graph takes
// longer on the GPU (benchmarks/lead_probe.py measures steps/s against the bound). Each step's staging kernel stamps the
// step's number into host-mapped memory as it begins, so the host learns how far the GPU has got from one
// memory read, with no CUDA call; a step waits only when `max_lead` steps are already queued behind the one
// the GPU is running.
class Launcher {
 public:
  // `static_buffers[i]` holds max-batch rows of input i; `max_lead` 0: no bound.
  Launcher(std::shared_ptr<InputChecker> checker, std::vector<at::Tensor> static_buffers, SizeTable sizes,
           int max_lead);
  Launcher(const Launcher&) = delete;
  Launcher& operator=(const Launcher&) = delete;
  ~Launcher();

  // Inside the capture of `size`: records the staging kernel as the graph's first node.
  void stage(int64_t size);
  // After that capture: `graph` (kept, see Graph::set_argument_node) serves the steps of `size`.
  void add_graph(int64_t size, std::shared_ptr<Graph> graph);
  // A piecewise size: `graph` is its next segment, launched by launch_segment() after the break before it.
  void add_segment(int64_t size, std::shared_ptr<Graph> graph);
  // Segments of `size` after its first graph (0 for a size captured whole).
  size_t segments(int64_t size) const { return captured(size).segments.size(); }
  // Launches segment `k` (1-based: the segment after break k) of `size` on the current stream.
  void launch_segment(int64_t size, size_t k) { captured(size).segments.at(k - 1)->replay(); }
  // Stages a step of checked inputs and launches the graph of `size` (sizes().size_for(shape), nonzero). It
  // does not wait: the caller keeps the lead, waiting first while must_wait() (py_step.cpp does, without the
  // GIL).
  void launch(int64_t size, StepShape shape, BorrowedInputs inputs);
  // Whether the next launch must first wait for the GPU (max_lead steps queued behind the one running).
  bool must_wait() const { return max_lead_ > 0 && launched_ + 1 - *started_ > max_lead_; }
  // Waits until it need not (the caller may release the GIL around it).
  void wait_for_lead() const;
  // Host-mapped memory the staging kernels use, as they address it: the stamp, and a ragged runner's split
  // slots. [(address, bytes)], for the audit.
  std::vector<std::pair<uint64_t, size_t>> owned_memory() const;
  const InputChecker& checker() const { return *checker_; }
  const SizeTable& sizes() const { return sizes_; }

 private:
  struct Captured {
    std::shared_ptr<Graph> graph;
    std::vector<std::shared_ptr<Graph>> segments;  // a piecewise size's graphs after the first
    // The size's StageParams<inputs_bound_>, with its table filled in; each launch fills in batch, seq and src.
    alignas(16) unsigned char params[sizeof(StageParams<kMaxInputs>)];
  };
  // A size between stage() and add_graph(): its staging node and argument (StageParams<inputs_bound_>).
  struct Staged {
    cudaGraphNode_t node = nullptr;
    std::vector<unsigned char> params;
  };

  std::shared_ptr<InputChecker> checker_;
  std::vector<at::Tensor> static_buffers_;
  SizeTable sizes_;
  Captured& captured(int64_t size) const;

  std::map<int64_t, Staged> staged_;
  std::vector<std::shared_ptr<Captured>> captured_for_size_;  // item s: the graph of size s, if captured
  unsigned max_blocks_ = 1;  // per input: two per SM
  int inputs_bound_ = 4;     // N of the staging kernel: 4, 8 or 16, the least that holds every input
  long long max_lead_ = 0;
  long long launched_ = 0;                 // steps launched so far
  volatile long long* started_ = nullptr;            // host-mapped: the last step's number the GPU began
  volatile long long* started_on_device_ = nullptr;  // the same memory, as the kernel addresses it
  // A ragged runner's split comes from the host: each step copies it into the next of these host-mapped slots,
  // which its staging kernel reads. A slot is reused max_lead + 2 steps later, when the lead bound has made sure
  // the step that read it has ended (Note [split slots] in launcher.cu).
  unsigned char* split_slots_ = nullptr;
  unsigned char* split_slots_on_device_ = nullptr;
  size_t split_slot_bytes_ = 0;
  long long split_slot_count_ = 0;
};

}  // namespace graphrunner
