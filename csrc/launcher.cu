#include "launcher.h"

#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstddef>
#include <cstring>

#include "errors.h"

namespace graphrunner {
namespace {

// A step's rows are a few KB, so most threads of a block have nothing to copy: 64-thread blocks, and 32-bit
// byte offsets (InputChecker caps each input at kMaxInputBytes), make the staging kernel shorter than 256
// threads and 64-bit offsets (benchmarks/staging_cost.py measures it).
constexpr int kThreads = 64;

// Input blockIdx.y: units [0, batch) come from the step's source, units [batch, size) get the pad value (or,
// for an input that keeps its padding rows, are left as they are); a ragged runner's per-token input counts
// tokens instead. Everything it needs is in its parameter, so the copy starts at once: no descriptor to fetch,
// no counter to retire.
template <int N>
__global__ void stage_inputs(const __grid_constant__ StageParams<N> p) {
  if (p.batch < 0) {
    return;
  }
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
    *p.started = p.seq;  // this step has begun: the host may queue one more (Launcher::must_wait)
  }
  const int i = blockIdx.y;
  unsigned char* dst = p.dst[i];
  const unsigned char* src = p.src[i];
  const bool per_token = (p.per_token >> i) & 1;
  const long long units = per_token ? p.tokens : p.batch;
  const long long size_units = per_token ? p.size_tokens : p.size;
  const int copy_bytes = static_cast<int>(units * p.unit_bytes[i]);
  const int total = static_cast<int>(((p.pad_each_step >> i) & 1 ? size_units : units) * p.unit_bytes[i]);
  const bool src_aligned = (reinterpret_cast<uintptr_t>(src) & 15) == 0;
  const uint4 pad = p.pad[i];
  const unsigned char* pad_bytes = reinterpret_cast<const unsigned char*>(&p.pad[i]);
  for (int off = 16 * (blockIdx.x * blockDim.x + threadIdx.x); off < total; off += 16 * gridDim.x * blockDim.x) {
    if (off + 16 <= copy_bytes && src_aligned) {
      *reinterpret_cast<uint4*>(dst + off) = *reinterpret_cast<const uint4*>(src + off);
    } else if (off >= copy_bytes && off + 16 <= total) {
      *reinterpret_cast<uint4*>(dst + off) = pad;
    } else {
      // Static buffers start 16-byte aligned and element sizes divide 16, so byte j of the buffer's
      // padding is byte j % 16 of the pattern.
      for (int j = off; j < off + 16 && j < total; ++j) {
        dst[j] = j < copy_bytes ? src[j] : pad_bytes[j & 15];
      }
    }
  }
}

// The node the last call on a capturing stream added.
cudaGraphNode_t last_captured_node(cudaStream_t stream) {
  cudaStreamCaptureStatus status;
  const cudaGraphNode_t* deps = nullptr;
  size_t count = 0;
#if CUDART_VERSION >= 13000
  GR_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, nullptr, nullptr, &deps, nullptr, &count));
#else
  GR_CUDA_CHECK(cudaStreamGetCaptureInfo_v2(stream, &status, nullptr, nullptr, &deps, &count));
#endif
  if (status != cudaStreamCaptureStatusActive || count != 1) {
    throw StateError("stage() must be called inside the capture of its size, on the capturing stream");
  }
  return deps[0];
}

// Every N shares the head (batch, tokens, seq, size, size_tokens, src), which is all a launch writes.
static_assert(offsetof(StageParams<4>, src) == offsetof(StageParams<kMaxInputs>, src) &&
              offsetof(StageParams<8>, src) == offsetof(StageParams<kMaxInputs>, src));

// Records the staging kernel of `size` with no step (batch -1) on the capturing stream; returns its argument,
// which every launch of that size's graph starts from.
template <int N>
std::vector<unsigned char> record_staging(const std::vector<InputSpec>& specs, const std::vector<at::Tensor>& buffers,
                                          StepShape size, volatile long long* started, dim3 grid,
                                          cudaStream_t stream) {
  StageParams<N> p{};
  p.batch = -1;
  p.size = size.requests;
  p.size_tokens = size.tokens;
  p.started = started;
  for (size_t i = 0; i < specs.size(); ++i) {
    p.dst[i] = static_cast<unsigned char*>(buffers[i].data_ptr());
    p.unit_bytes[i] = specs[i].unit_bytes();
    std::memcpy(&p.pad[i], specs[i].pad_pattern.data(), 16);
    p.pad_each_step |= specs[i].pad_each_step ? 1u << i : 0u;
    p.per_token |= specs[i].per_token ? 1u << i : 0u;
  }
  stage_inputs<N><<<grid, kThreads, 0, stream>>>(p);
  const auto* bytes = reinterpret_cast<const unsigned char*>(&p);
  return std::vector<unsigned char>(bytes, bytes + sizeof(p));
}

}  // namespace

Launcher::Launcher(std::shared_ptr<InputChecker> checker, std::vector<at::Tensor> static_buffers, SizeTable sizes,
                   int max_lead)
    : checker_(std::move(checker)),
      static_buffers_(std::move(static_buffers)),
      sizes_(std::move(sizes)),
      max_lead_(max_lead) {
  if (checker_->split() >= 0 && max_lead_ < 1) {
    throw InputValueError("a ragged runner needs a bound on its lead (max_lead): its split slots are reused "
                          "max_lead + 2 steps later");
  }
  c10::cuda::CUDAGuard guard(checker_->device());
  void* stamp = nullptr;
  void* on_device = nullptr;
  GR_CUDA_CHECK(cudaHostAlloc(&stamp, sizeof(long long), cudaHostAllocMapped));
  started_ = static_cast<volatile long long*>(stamp);
  *started_ = 0;
  try {
    GR_CUDA_CHECK(cudaHostGetDevicePointer(&on_device, stamp, 0));
    started_on_device_ = static_cast<volatile long long*>(on_device);
    captured_for_size_.resize(sizes_.max_size() + 1);
    if (checker_->split() >= 0) {
      // Note [split slots]: the step numbered n copies its split into slot n % count. Before launching step n
      // the host has waited until step n - max_lead began (must_wait, re-checked after every wait), and steps of
      // one runner run in order on one stream (wait_for_lead refuses another), so step n - max_lead - 1, and
      // every step before it, has ended: slots of steps up to n - count, with count = max_lead + 2, are no
      // longer read.
      const InputSpec& split = checker_->specs()[checker_->split()];
      split_slot_bytes_ = (static_cast<size_t>(sizes_.max_requests() * split.unit_bytes()) + 15) / 16 * 16;
      split_slot_count_ = max_lead_ + 2;
      void* slots = nullptr;
      void* slots_on_device = nullptr;
      GR_CUDA_CHECK(cudaHostAlloc(&slots, split_slot_bytes_ * split_slot_count_, cudaHostAllocMapped));
      split_slots_ = static_cast<unsigned char*>(slots);
      GR_CUDA_CHECK(cudaHostGetDevicePointer(&slots_on_device, slots, 0));
      split_slots_on_device_ = static_cast<unsigned char*>(slots_on_device);
    }
  } catch (...) {  // the destructor does not run for a constructor that throws
    if (split_slots_ != nullptr) {
      cudaFreeHost(split_slots_);
    }
    cudaFreeHost(stamp);
    throw;
  }
  // Staged inputs are a few KB to a few MB: two blocks per SM (264 on an H100) already keep every SM's copy
  // busy, and a larger grid only takes longer to launch and retire.
  max_blocks_ = 2u * static_cast<unsigned>(at::cuda::getDeviceProperties(checker_->device())->multiProcessorCount);
  const size_t inputs = checker_->specs().size();
  inputs_bound_ = inputs <= 4 ? 4 : inputs <= 8 ? 8 : static_cast<int>(kMaxInputs);
}

Launcher::~Launcher() {
  // No queued staging kernel may write the stamp once it is freed: every launched step has begun when the
  // stamp shows the last one (steps of one runner run in order); otherwise wait for the device.
  if (*started_ != launched_) {
    cudaDeviceSynchronize();
  }
  cudaFreeHost(const_cast<long long*>(started_));
  if (split_slots_ != nullptr) {
    cudaFreeHost(split_slots_);
  }
}

std::vector<std::pair<uint64_t, size_t>> Launcher::owned_memory() const {
  std::vector<std::pair<uint64_t, size_t>> out{{reinterpret_cast<uint64_t>(started_on_device_), sizeof(long long)}};
  if (split_slots_on_device_ != nullptr) {
    out.emplace_back(reinterpret_cast<uint64_t>(split_slots_on_device_), split_slot_bytes_ * split_slot_count_);
  }
  return out;
}

void Launcher::wait_for_lead() const {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(checker_->device()).stream();
  for (unsigned spins = 1; must_wait(); ++spins) {
    // Now and then ask CUDA too: a failed step never stamps, and steps on another stream are not this
    // stream's to wait for (an idle stream ends the wait).
    if (spins % 4096 == 0) {
      const cudaError_t state = cudaStreamQuery(stream);
      if (state == cudaSuccess) {
        // Read the stamp again, a while: the GPU may have finished between the loop's read and the query, and
        // its last write to host-mapped memory may arrive just after.
        bool behind = must_wait();
        for (int reread = 0; behind && reread < (1 << 16); ++reread) {
          behind = must_wait();
        }
        if (split_slots_ != nullptr && behind) {  // Note [split slots] holds only for steps of one stream
          throw StateError("a ragged runner's steps must all run on one stream: the current stream is idle while "
                           "earlier steps have not begun, so they were queued on another; run every step of this "
                           "runner on one stream");
        }
        return;
      }
      if (state != cudaErrorNotReady) {
        GR_CUDA_CHECK(state);
      }
    }
  }
}

void Launcher::stage(int64_t size) {
  const StepShape units{sizes_.requests_of(size), size};
  long long largest = 0;
  for (const auto& spec : checker_->specs()) {
    largest = std::max<long long>(largest, (spec.per_token ? units.tokens : units.requests) * spec.unit_bytes());
  }
  const long long chunks = (largest + 15) / 16;
  dim3 grid(static_cast<unsigned>(std::clamp<long long>((chunks + kThreads - 1) / kThreads, 1, max_blocks_)),
            static_cast<unsigned>(checker_->specs().size()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(checker_->device()).stream();
  const auto& specs = checker_->specs();
  Staged staged;
  switch (inputs_bound_) {
    case 4:
      staged.params = record_staging<4>(specs, static_buffers_, units, started_on_device_, grid, stream);
      break;
    case 8:
      staged.params = record_staging<8>(specs, static_buffers_, units, started_on_device_, grid, stream);
      break;
    default:
      staged.params = record_staging<kMaxInputs>(specs, static_buffers_, units, started_on_device_, grid, stream);
  }
  GR_CUDA_CHECK(cudaGetLastError());
  staged.node = last_captured_node(stream);
  staged_[size] = std::move(staged);
}

void Launcher::add_graph(int64_t size, std::shared_ptr<Graph> graph) {
  auto staged = staged_.find(size);
  if (staged == staged_.end()) {
    throw StateError("add_graph(" + std::to_string(size) + ") without stage(" + std::to_string(size) +
                     ") in that size's capture");
  }
  graph->set_argument_node(staged->second.node);
  auto captured = std::make_shared<Captured>();
  captured->graph = std::move(graph);
  std::memcpy(captured->params, staged->second.params.data(), staged->second.params.size());
  staged_.erase(staged);
  captured_for_size_.at(size) = std::move(captured);
}

Launcher::Captured& Launcher::captured(int64_t size) const {
  if (size < 1 || size >= static_cast<int64_t>(captured_for_size_.size()) || !captured_for_size_[size]) {
    throw StateError("no graph of size " + std::to_string(size) + " is captured; run this step eagerly");
  }
  return *captured_for_size_[size];
}

void Launcher::add_segment(int64_t size, std::shared_ptr<Graph> graph) {
  if (!graph->executable()) {
    throw StateError("add_segment(" + std::to_string(size) + ") with a graph that has no executable (not captured, "
                     "or captured without instantiating)");
  }
  captured(size).segments.push_back(std::move(graph));
}

void Launcher::launch(int64_t size, StepShape shape, BorrowedInputs inputs) {
  Captured& c = captured(size);
  auto* step = reinterpret_cast<StageParams<kMaxInputs>*>(c.params);  // its head: counts and src
  // A non-contiguous input is staged from a contiguous copy made on the graph's stream: when the copy
  // is freed on return, the allocator reuses its memory only for work queued behind this graph. The usual
  // step has none, and then this vector never allocates.
  std::vector<at::Tensor> copies;
  const int split = checker_->split();
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& t = *inputs[i];
    if (static_cast<int>(i) == split) {  // checked contiguous, on the host
      const size_t slot = static_cast<size_t>((launched_ + 1) % split_slot_count_) * split_slot_bytes_;
      std::memcpy(split_slots_ + slot, t.const_data_ptr(), t.nbytes());
      step->src[i] = split_slots_on_device_ + slot;
    } else if (t.is_contiguous()) {
      step->src[i] = static_cast<const unsigned char*>(t.const_data_ptr());
    } else {
      copies.push_back(t.contiguous());
      step->src[i] = static_cast<const unsigned char*>(copies.back().const_data_ptr());
    }
  }
  step->batch = shape.requests;
  step->tokens = shape.tokens;
  step->seq = launched_ + 1;
  c.graph->replay_with(c.params);
  ++launched_;  // only once launched: a failed launch never stamps, and its number goes to the next step
}

}  // namespace graphrunner
