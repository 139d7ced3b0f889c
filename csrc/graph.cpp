#include "graph.h"

#include <ATen/cuda/MemPool.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <optional>
#include <type_traits>
#include <utility>

#include "driver.h"
#include "errors.h"

namespace graphrunner {
namespace {

namespace allocator = c10::cuda::CUDACachingAllocator;

// Newer allocators want to hear when a stream capture really starts and ends (apart from pool routing).
template <typename A, typename = void>
struct HasCaptureMarks : std::false_type {};
template <typename A>
struct HasCaptureMarks<A, std::void_t<decltype(std::declval<A&>().markCaptureBegin(c10::DeviceIndex{}))>>
    : std::true_type {};

template <typename A>
void mark_capture(A* alloc, c10::DeviceIndex device, bool begin) {
  if constexpr (HasCaptureMarks<A>::value) {
    begin ? alloc->markCaptureBegin(device) : alloc->markCaptureEnd(device);
  }
}

// Each capture's number (Graph::id_), never reused: an executable's `loaded` never names a graph it has not seen.
uint64_t next_graph_id() {
  static std::atomic<uint64_t> last{0};
  return ++last;
}

}  // namespace

// Note [shared executables]: segments of one structure (the layers of a model between its attention breaks) can
// run on one executable instead of one each (GraphRunner(share_segments=True)). The first graph of a structure
// instantiates it; each later one is captured without instantiating (capture_end(false): the driver keeps a
// destroyed executable's memory for later graphs, so instantiate-then-destroy would save nothing) and shares it
// once cudaGraphExecUpdate has loaded its parameters into it (share()); where the update is refused, it
// instantiates its own. The Executable is owned by every graph it serves (a shared_ptr), so graphs are reset
// or destroyed in any order and the last one destroys it. It records whose parameters it holds (`loaded`, a
// graph's id_, unique in the process); replay() of a graph whose parameters are not loaded loads them first
// (cudaGraphExecUpdate from its own kept cudaGraph_t), then launches: one update per switch, the host cost of
// sharing. A graph reset leaves its id behind, which no later graph has, so the next graph to replay reloads.
//
// Why switching under queued launches is safe: CUDA applies an update, like a node parameter set, to later
// launches of the executable only; launches already queued or running keep the parameters they were launched
// with (the programming guide's "Graph update" section), and launches of one executable run one at a time in
// launch order. So a step may launch segment 1, queue its break's kernels, update the executable to segment 2's
// parameters and launch it while segment 1 still waits in the stream; and with max_lead, steps queued behind the
// one the GPU runs each carry their own segments' parameters, as the staging node's argument does
// (Launcher::launch). The host never waits for the GPU to switch. Graphs that share an executable are replayed
// from one thread (one runner is driven from one thread): the switch and launch are not atomic.
//
// What never shares: a graph with an argument node (segment 0's staging node, whose parameter the launcher sets
// per step on the executable, would be set for every tenant) and a graph that draws random numbers (its RNG
// increment and seed tensors are per graph, which an update of node parameters does not carry into
// GraphRng::before_replay).
Graph::Executable::~Executable() {
  if (exec != nullptr) {
    cudaGraphExecDestroy(exec);  // reset() destroys it checked; here (a destructor) an error has nowhere to go
  }
}

Graph::~Graph() {
  abort_capture();
  try {
    reset();
  } catch (...) {
    // A destructor must not throw; a failing cudaGraphExecDestroy here leaves nothing to recover.
  }
}

void Graph::capture_begin(PoolId pool, cudaStreamCaptureMode mode) {
  if (capturing_) {
    throw StateError("capture inside a capture: this graph is already capturing; end it with capture_end() first");
  }
  if (captured()) {
    throw StateError("this graph is already captured; call reset() before capturing it again");
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (stream.stream() == nullptr) {
    throw StateError("cannot capture on the legacy default stream; capture on a side stream (torch.cuda.Stream())");
  }
  cudaStreamCaptureStatus status;
  GR_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
  if (status != cudaStreamCaptureStatusNone) {
    throw StateError("capture inside a capture: the current stream is already being captured");
  }
  device_ = stream.device_index();
  c10::cuda::CUDAGuard guard(device_);
  pool_ = (pool.first == 0 && pool.second == 0) ? at::cuda::MemPool::graph_pool_handle(false) : pool;
  rng_.prepare(device_);

  // Route to the pool only the allocations made by this capture: another stream's work, or another
  // graph being captured at the same time, keeps its own pool.
  allocator::beginAllocateToPool(device_, pool_, [this](cudaStream_t s) {
    cudaStreamCaptureStatus st;
    c10::CaptureId_t id = 0;
    return cudaStreamGetCaptureInfo(s, &st, &id) == cudaSuccess && st == cudaStreamCaptureStatusActive &&
           id == capture_id_;
  });
  holds_pool_ = true;
  cudaError_t err = cudaStreamBeginCapture(stream.stream(), mode);
  if (err != cudaSuccess) {
    allocator::endAllocateToPool(device_, pool_);
    release_pool();
    GR_CUDA_CHECK(err);
  }
  GR_CUDA_CHECK(cudaStreamGetCaptureInfo(stream.stream(), &status, &capture_id_));
  capture_stream_ = stream.stream();
  capturing_ = true;
  begin_footprint(capture_stream_);
  rng_.begin(capture_id_);
  mark_capture(allocator::get(), device_, true);
}

void Graph::capture_end(bool instantiate_now) {
  if (!capturing_) {
    throw StateError("capture_end() without capture_begin()");
  }
  c10::cuda::CUDAGuard guard(device_);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (stream.stream() != capture_stream_) {
    abort_capture();
    throw StateError("capture_end() was called on another stream than capture_begin(); the capture was aborted");
  }
  cudaGraph_t graph = nullptr;
  cudaError_t err = cudaStreamEndCapture(capture_stream_, &graph);
  footprint_ = end_footprint(capture_stream_);
  finish_capture();
  if (err != cudaSuccess || graph == nullptr) {
    if (graph != nullptr) {
      cudaGraphDestroy(graph);
    }
    release_pool();
    GR_CUDA_CHECK(err == cudaSuccess ? cudaErrorStreamCaptureInvalidated : err);
  }
  graph_ = graph;
  id_ = next_graph_id();
  try {
    context_ = current_context();  // under the capture's device guard: the device's primary context
    GR_CUDA_CHECK(cudaGraphGetNodes(graph_, nullptr, &num_nodes_));
    if (instantiate_now) {
      instantiate(capture_stream_);
    }
  } catch (...) {
    reset();
    throw;
  }
}

void Graph::instantiate() {
  if (capturing_ || graph_ == nullptr || exec_ != nullptr) {
    throw StateError("instantiate() needs a graph captured with capture_end(instantiate=False) that has no "
                     "executable yet");
  }
  c10::cuda::CUDAGuard guard(device_);
  instantiate(capture_stream_);
}

void Graph::instantiate(cudaStream_t stream) {
  // The executable's device memory, by the driver's free figure around instantiation and upload (the capture
  // has ended, so the query is legal; CUDA has no per-executable accounting: cudaGraphMemAttr* counts only
  // memory that graphs' own allocation nodes take). The driver maps this memory in chunks (2 MiB on Hopper): a
  // graph that fits in a chunk mapped earlier reads 0 and the one that maps the next reads the whole chunk, so
  // single readings are coarse and only sums over many graphs are exact. Memory another thread or process
  // allocates or frees on the device meanwhile skews the reading. The driver keeps the memory of destroyed
  // executables for the process's later graphs (seen on the H200, driver 580: not returned by cudaGraphExecDestroy
  // nor by cudaDeviceGraphMemTrim), so this reads the memory the graph newly took: 0 for graphs that fit in what
  // earlier, destroyed graphs left the driver.
  size_t free_before = 0;
  size_t free_after = 0;
  size_t total = 0;
  GR_CUDA_CHECK(cudaMemGetInfo(&free_before, &total));
  auto exec = std::make_shared<Executable>();
  GR_CUDA_CHECK(cudaGraphInstantiate(&exec->exec, graph_, 0));
  exec->loaded = id_;
  exec_ = std::move(exec);
  // Uploading now moves the one-time setup cost out of the first replay (and its memory into the reading).
  GR_CUDA_CHECK(cudaGraphUpload(exec_->exec, stream));
  GR_CUDA_CHECK(cudaStreamSynchronize(stream));
  GR_CUDA_CHECK(cudaMemGetInfo(&free_after, &total));
  exec_bytes_ = free_before > free_after ? free_before - free_after : 0;
  if (!keep_graph_) {
    GR_CUDA_CHECK(cudaGraphDestroy(graph_));
    graph_ = nullptr;
  }
}

bool Graph::share(Graph& owner) {
  if (capturing_ || graph_ == nullptr || exec_ != nullptr) {
    throw StateError("share() needs a graph captured with capture_end(instantiate=False) that has no executable "
                     "yet");
  }
  if (&owner == this || owner.exec_ == nullptr || owner.graph_ == nullptr) {
    throw StateError("share(owner): the owner must be another graph with an executable and its cudaGraph_t "
                     "(keep_graph=True)");
  }
  // Note [shared executables]: what never shares.
  if (owner.device_ != device_ || argument_node_ != nullptr || owner.argument_node_ != nullptr ||
      rng_.uses_rng() || owner.rng_.uses_rng()) {
    return false;
  }
  c10::cuda::CUDAGuard guard(device_);
  size_t free_before = 0;
  size_t free_after = 0;
  size_t total = 0;
  GR_CUDA_CHECK(cudaMemGetInfo(&free_before, &total));
  cudaGraphExecUpdateResultInfo info{};
  const cudaError_t err = cudaGraphExecUpdate(owner.exec_->exec, graph_, &info);
  if (err == cudaErrorGraphExecUpdateFailure) {
    (void)cudaGetLastError();
    // CUDA does not say what a refused update leaves loaded: whoever replays next loads its own parameters.
    owner.exec_->loaded = 0;
    return false;
  }
  if (err != cudaSuccess) {
    owner.exec_->loaded = 0;
    GR_CUDA_CHECK(err);
  }
  GR_CUDA_CHECK(cudaMemGetInfo(&free_after, &total));
  exec_ = owner.exec_;
  exec_->loaded = id_;
  exec_bytes_ = free_before > free_after ? free_before - free_after : 0;
  return true;
}

void Graph::load() {
  if (graph_ == nullptr) {
    throw StateError("a graph that shares its executable lost its cudaGraph_t; it cannot load its parameters");
  }
  cudaGraphExecUpdateResultInfo info{};
  const cudaError_t err = cudaGraphExecUpdate(exec_->exec, graph_, &info);
  if (err != cudaSuccess) {
    exec_->loaded = 0;  // what a failed update left loaded is unknown
    (void)cudaGetLastError();
    throw CudaError(std::string("cudaGraphExecUpdate failed with ") + cudaGetErrorName(err) + " (update result " +
                    std::to_string(static_cast<int>(info.result)) + ") while loading a shared segment's parameters "
                    "into its executable, which accepted them at capture");
  }
  exec_->loaded = id_;
}

std::string Graph::structure() const {
  require_graph("structure()");
  return graph_structure(graph_);
}

void Graph::abort_capture() noexcept {
  if (!capturing_) {
    return;
  }
  c10::cuda::CUDAGuard guard(device_);
  cudaGraph_t partial = nullptr;
  cudaStreamEndCapture(capture_stream_, &partial);
  if (partial != nullptr) {
    cudaGraphDestroy(partial);
  }
  (void)cudaGetLastError();
  end_footprint(capture_stream_);
  finish_capture();
  rng_.release();
  release_pool();
}

void Graph::finish_capture() noexcept {
  capturing_ = false;
  mark_capture(allocator::get(), device_, false);
  allocator::endAllocateToPool(device_, pool_);
  rng_.end();
}

void Graph::set_argument_node(cudaGraphNode_t node) {
  require_graph("set_argument_node()");
  if (shares_exec()) {
    throw StateError("set_argument_node(): this graph shares its executable with others, which the argument would "
                     "reach too (Note [shared executables])");
  }
  const auto get = driver().kernel_node_get_params;
  if (get == nullptr || driver().exec_kernel_node_set_params == nullptr) {
    throw CudaError("the CUDA driver gives out no cuGraphKernelNodeGetParams/cuGraphExecKernelNodeSetParams (CUDA "
                    "12.0+ drivers do): update the NVIDIA driver");
  }
  CUDA_KERNEL_NODE_PARAMS params{};
  if (get(node, &params) != CUDA_SUCCESS) {
    throw StateError("set_argument_node(): the node is not a kernel node of this graph");
  }
  // A captured node may name its kernel by a `func` that only the driver's own calls understand; its `kern`
  // handle is the stable name, used when `func` is null.
  if (params.kern != nullptr) {
    params.func = nullptr;
  }
  if (params.kernelParams == nullptr) {
    throw StateError("set_argument_node(): the node passes its parameters through `extra`, not kernelParams");
  }
  params.extra = nullptr;
  argument_node_ = node;
  argument_params_ = params;
  argument_set_ = false;
}

void Graph::set_argument(void* const* args) {
  CUDA_KERNEL_NODE_PARAMS params = argument_params_;
  params.kernelParams = const_cast<void**>(args);
  const CUresult err = driver().exec_kernel_node_set_params(exec_->exec, argument_node_, &params);
  if (err != CUDA_SUCCESS) {
    throw CudaError("cuGraphExecKernelNodeSetParams failed with CUresult " + std::to_string(static_cast<int>(err)) +
                    " while setting the staging node's argument");
  }
}

void Graph::replay_with(const void* arg) {
  if (exec_ == nullptr || argument_node_ == nullptr) {
    throw StateError("replay_with() needs a captured graph with an argument node");
  }
  launch_current(arg);
}

void Graph::replay() {
  if (exec_ == nullptr) {
    throw StateError(capturing_ ? "replay() during capture; call capture_end() first"
                     : graph_ != nullptr ? "replay() of a graph captured with capture_end(instantiate=False) that has "
                                           "no executable yet; call instantiate() or share() first"
                                         : "replay() before capture (or after reset()); capture the graph first");
  }
  launch_current(nullptr);
}

void Graph::launch_current(const void* arg) {
  // A serving thread replays with the graph's device current: no guard needed, and none built. Any other
  // thread (another device current, or no context yet) takes the runtime's path under a device guard, which
  // also makes the device's context current for the driver's calls.
  std::optional<c10::cuda::CUDAGuard> guard;
  if (context_ == nullptr || current_context() != context_) {
    guard.emplace(device_);
  }
  if (exec_->loaded != id_) {  // a shared executable holding another graph's parameters
    load();
  }
  // Every step's argument differs from the last (at least its step number), so it is set unconditionally.
  if (arg != nullptr) {
    void* args[1] = {const_cast<void*>(arg)};
    set_argument(args);
    argument_set_ = true;
  } else if (argument_set_) {
    // The node still holds the last step's argument: a bare replay would stage again from sources the caller
    // may have freed since. It gets the argument it was captured with back.
    set_argument(argument_params_.kernelParams);
    argument_set_ = false;
  }
  launch(c10::cuda::getCurrentCUDAStream(device_).stream());
}

void Graph::launch(cudaStream_t stream) {
  if (rng_.uses_rng()) {
    rng_.before_replay(stream);
  }
  // A driver failure retries through the runtime, which sets up a missing context or reports the error
  // in CUDA's own words.
  const auto graph_launch = driver().graph_launch;
  cudaGraphExec_t exec = exec_->exec;
  if (graph_launch == nullptr || graph_launch(exec, stream) != CUDA_SUCCESS) {
    GR_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  }
}

void Graph::reset() {
  if (capturing_) {
    throw StateError("reset() during capture; call capture_end() first");
  }
  if (exec_ != nullptr) {
    // A shared executable stays with the other graphs it serves; the last one to let go destroys it.
    std::shared_ptr<Executable> exec = std::move(exec_);  // exec_ is null from here
    if (exec.use_count() == 1) {
      cudaGraphExec_t handle = exec->exec;
      exec->exec = nullptr;
      GR_CUDA_CHECK(cudaGraphExecDestroy(handle));
    }
  }
  if (graph_ != nullptr) {
    GR_CUDA_CHECK(cudaGraphDestroy(graph_));
    graph_ = nullptr;
  }
  num_nodes_ = 0;
  exec_bytes_ = 0;
  id_ = 0;
  context_ = nullptr;
  argument_node_ = nullptr;
  argument_set_ = false;
  footprint_.clear();
  rng_.release();
  release_pool();
}

void Graph::release_pool() noexcept {
  // The pool's memory goes back to the allocator (at empty_cache) once no graph holds it and no
  // tensor allocated in it is alive.
  if (holds_pool_) {
    allocator::releasePool(device_, pool_);
    holds_pool_ = false;
  }
}

void Graph::require_graph(const char* what) const {
  if (graph_ == nullptr) {
    throw StateError(std::string(what) + " needs the cudaGraph_t: construct the graph with keep_graph=True and "
                     "capture it");
  }
}

std::vector<NodeWords> Graph::scan() const {
  require_graph("scan()");
  return scan_nodes(graph_);
}

void Graph::debug_dump(const std::string& path) const {
  require_graph("debug_dump()");
  GR_CUDA_CHECK(cudaGraphDebugDotPrint(graph_, path.c_str(), cudaGraphDebugDotFlagsVerbose));
}

}  // namespace graphrunner
