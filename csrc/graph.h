// One CUDA graph's whole life: capture into a shared PyTorch pool, instantiate, upload, replay, reset.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/core/Device.h>
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "footprint.h"
#include "node_scan.h"
#include "rng.h"

namespace graphrunner {

using PoolId = c10::MempoolId_t;

class Graph {
 public:
  explicit Graph(bool keep_graph = false) : keep_graph_(keep_graph) {}
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  // Starts capturing the current torch stream; allocations of this capture (and only this capture)
  // go to `pool`. A pool of {0, 0} means a new private pool.
  void capture_begin(PoolId pool, cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal);
  // Ends the capture; with `instantiate`, instantiates and uploads the graph. Without, it keeps the cudaGraph_t
  // and has no executable yet: instantiate() or share() gives it one (nothing else may be called in between but
  // structure(), scan(), debug_dump() and reset()).
  void capture_end(bool instantiate = true);
  // After capture_end(false): instantiates and uploads this graph's own executable.
  void instantiate();
  // After capture_end(false): serves this graph through `owner`'s executable instead of one of its own, where
  // the driver allows it (Note [shared executables] in graph.cpp): the owner must have an executable and its
  // cudaGraph_t, neither graph an argument node or RNG state, and cudaGraphExecUpdate must accept this graph.
  // Returns whether it shares; on false this graph is as before (call instantiate()).
  bool share(Graph& owner);
  // What an executable of this graph is made of, as bytes two graphs share exactly when they have the same
  // nodes in the same order (type; a kernel's function, grid, block and dynamic shared memory; a memset's or
  // memcpy's shape; a child graph's own structure) and the same edges: graphs of one structure can share one
  // executable (cudaGraphExecUpdate has the final word). Needs the cudaGraph_t.
  std::string structure() const;
  // Ends a capture that failed part-way: the partial graph is dropped, the pool hold given back and
  // the stream left usable. Safe to call when nothing is being captured.
  void abort_capture() noexcept;
  // Launches the graph on the current torch stream of its device. A graph with an argument node runs it
  // with the arguments it was captured with (the staging node's: no step). A graph that shares its executable
  // first loads its own parameters into it where another graph's are loaded (cudaGraphExecUpdate).
  void replay();
  // Marks `node`, a kernel node of this graph with one parameter, as the node whose argument each
  // replay_with() sets. Needs keep_graph=true: the executable graph finds its node through the graph's; and an
  // executable of its own (a shared one would carry the argument to other graphs).
  void set_argument_node(cudaGraphNode_t node);
  // Sets the argument node's parameter to the one at `arg` (the driver copies it now) for this launch and
  // later ones, then launches as replay() does. Launches already queued keep the argument they were launched
  // with.
  void replay_with(const void* arg);
  // Destroys the executable graph (a shared one once no other graph uses it) and gives back this graph's hold
  // on the pool.
  void reset();

  // Captured: capture_end() has run and reset() has not (with or without an executable yet).
  bool captured() const { return exec_ != nullptr || graph_ != nullptr; }
  // Has an executable to launch: its own, or one it shares.
  bool executable() const { return exec_ != nullptr; }
  // Its executable is shared with other graphs (share() made it so, on either side).
  bool shares_exec() const { return exec_ != nullptr && exec_.use_count() > 1; }
  bool capturing() const { return capturing_; }
  PoolId pool() const { return pool_; }
  c10::DeviceIndex device() const { return device_; }
  size_t num_nodes() const { return num_nodes_; }
  // Device memory the driver took for this graph's executable (instantiation and upload), outside torch's
  // allocator: the drop in the driver's free memory across the two (0 where the graph fits in memory the driver
  // kept from earlier, destroyed executables; see instantiate()). 0 before capture and after reset().
  // A graph that shares another's executable took none of its own: it reads the driver's fall across its
  // cudaGraphExecUpdate in share(), which is 0 unless the update took memory.
  size_t exec_bytes() const { return exec_bytes_; }
  cudaGraphExec_t exec() const { return exec_ != nullptr ? exec_->exec : nullptr; }
  // What this graph's capture allocated in the pool (address, bytes), in allocation order.
  const std::vector<AddressRange>& footprint() const { return footprint_; }
  // Memory the graph's own machinery reads besides the pool (the RNG's seed and offset): (address, bytes).
  std::vector<AddressRange> owned_memory() const { return rng_.owned_memory(); }
  // What every node hands the GPU (see node_scan.h); needs keep_graph=true.
  std::vector<NodeWords> scan() const;
  void debug_dump(const std::string& path) const;

 private:
  // An executable, owned by every graph it serves (Note [shared executables] in graph.cpp).
  struct Executable {
    cudaGraphExec_t exec = nullptr;
    uint64_t loaded = 0;  // the id_ of the graph whose parameters it holds now; 0: none known
    Executable() = default;
    Executable(const Executable&) = delete;
    Executable& operator=(const Executable&) = delete;
    ~Executable();
  };

  void instantiate(cudaStream_t stream);
  // Loads this graph's parameters into its executable where another graph's are loaded.
  void load();
  // What capture_end() and abort_capture() both do once the stream's capture has ended: stop the
  // footprint, pool routing and RNG capture state.
  void finish_capture() noexcept;
  // Launches on the device's current stream; with `arg`, sets the argument node's parameter to it first
  // (null: gives the node its captured parameter back, if a step's is set).
  void launch_current(const void* arg);
  void launch(cudaStream_t stream);
  void set_argument(void* const* args);
  void release_pool() noexcept;
  void require_graph(const char* what) const;

  const bool keep_graph_;
  cudaGraph_t graph_ = nullptr;
  std::shared_ptr<Executable> exec_;
  uint64_t id_ = 0;  // this capture's number, unique in the process (Executable::loaded)
  cudaStream_t capture_stream_ = nullptr;
  c10::CaptureId_t capture_id_ = 0;
  PoolId pool_{0, 0};
  c10::DeviceIndex device_ = -1;
  CUcontext context_ = nullptr;  // the device's context, which replay() finds current on a serving thread
  size_t num_nodes_ = 0;
  size_t exec_bytes_ = 0;
  bool capturing_ = false;
  bool holds_pool_ = false;
  cudaGraphNode_t argument_node_ = nullptr;
  CUDA_KERNEL_NODE_PARAMS argument_params_{};  // as captured; kernelParams point into graph_'s node
  bool argument_set_ = false;  // the node holds a replay_with() argument, not the captured one
  GraphRng rng_;
  std::vector<AddressRange> footprint_;
};

}  // namespace graphrunner
