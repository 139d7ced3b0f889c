// Library workspaces that captured kernels were given, kept alive for as long as the graphs that use them.
//
// torch caches one cuBLAS workspace (and, apart, one cuBLASLt workspace) per (handle, stream) in
// process-global maps that hold the only owning pointer. Captured cuBLAS kernels bake that workspace's
// address into the graph, but the graph does not own it: whatever clears those maps (cudagraph trees
// around their warm-ups, torch graph resets, a change of workspace size) frees memory our graphs still
// use. graphrunner captures on a stream of its own (private_stream), so the entries for that stream were
// made by its own warm-up and are used by nobody else. After capture the hold moves those entries out of
// torch's maps: nothing is freed, other streams' entries are untouched, and the next cuBLAS call on our
// stream simply makes a new workspace.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

namespace graphrunner {

struct HeldWorkspace {
  std::string library;  // "cublas" or "cublaslt"
  uint64_t address;
  uint64_t bytes;
};

class WorkspaceHold {
 public:
  WorkspaceHold() = default;
  WorkspaceHold(const WorkspaceHold&) = delete;
  WorkspaceHold& operator=(const WorkspaceHold&) = delete;

  // Moves torch's cached workspaces for `stream` (every handle) into this hold; returns how many.
  size_t take(cudaStream_t stream);
  // What is held; freed with the hold, once no capture record shares it.
  std::vector<HeldWorkspace> held() const;

 private:
  std::vector<HeldWorkspace> held_;
  std::vector<c10::DataPtr> owners_;
};

// A stream only graphrunner captures on, one per device, for the life of the process. torch hands its
// pooled streams out round-robin, so a torch.cuda.Stream() of ours could be any other code's stream too.
cudaStream_t private_stream(c10::DeviceIndex device);

}  // namespace graphrunner
