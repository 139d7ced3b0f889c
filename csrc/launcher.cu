#include "launcher.h"

#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "errors.h"

namespace graphrunner {
namespace {

constexpr int kThreads = 256;

struct StaticTable {
  int num_inputs;
  unsigned char* dst[kMaxInputs];
  long long row_bytes[kMaxInputs];
  uint4 pad[kMaxInputs];
  bool pad_each_step[kMaxInputs];
};

// Input blockIdx.y: rows [0, batch) come from the step's source, rows [batch, size) get the pad value (or,
// for an input that keeps its padding rows, are left as they are).
// A replay with no fresh descriptor (a bare replay of the graph) leaves the static buffers as they are.
__global__ void stage_inputs(HostRing* ring, unsigned long long* control, StaticTable table, long long size) {
  // The descriptor lives in host memory: one thread per block reads it over PCIe (every thread reading it
  // cost tens of microseconds), the others take it from shared memory.
  __shared__ unsigned long long step;
  __shared__ bool fresh;
  __shared__ long long batch;
  __shared__ const unsigned char* src;
  volatile unsigned long long* consumed = control;
  if (threadIdx.x == 0) {
    step = *consumed;
    const volatile StepDescriptor* desc = &ring->slots[step % kRingSlots];
    fresh = desc->seq == step + 1;
    batch = fresh ? desc->batch : 0;
    src = fresh ? static_cast<const unsigned char*>(desc->src[blockIdx.y]) : nullptr;
  }
  __syncthreads();
  if (fresh) {
    const int i = blockIdx.y;
    unsigned char* dst = table.dst[i];
    const long long copy_bytes = batch * table.row_bytes[i];
    const long long total = (table.pad_each_step[i] ? size : batch) * table.row_bytes[i];
    const bool src_aligned = (reinterpret_cast<uintptr_t>(src) & 15) == 0;
    const uint4 pad = table.pad[i];
    const unsigned char* pad_bytes = reinterpret_cast<const unsigned char*>(&table.pad[i]);
    for (long long off = 16LL * (blockIdx.x * blockDim.x + threadIdx.x); off < total;
         off += 16LL * gridDim.x * blockDim.x) {
      if (off + 16 <= copy_bytes && src_aligned) {
        *reinterpret_cast<uint4*>(dst + off) = *reinterpret_cast<const uint4*>(src + off);
      } else if (off >= copy_bytes && off + 16 <= total) {
        *reinterpret_cast<uint4*>(dst + off) = pad;
      } else {
        // Static buffers start 16-byte aligned and element sizes divide 16, so byte j of the
        // buffer's padding is byte j % 16 of the pattern.
        for (long long j = off; j < off + 16 && j < total; ++j) {
          dst[j] = j < copy_bytes ? src[j] : pad_bytes[j & 15];
        }
      }
    }
  }
  // The last block to finish retires the descriptor, once every block has read it.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    unsigned int* blocks_done = reinterpret_cast<unsigned int*>(control + 1);
    if (atomicAdd(blocks_done, 1u) == gridDim.x * gridDim.y - 1) {
      *blocks_done = 0;
      if (fresh) {
        *consumed = step + 1;
        *reinterpret_cast<volatile unsigned long long*>(&ring->consumed) = step + 1;
      }
    }
  }
}

}  // namespace

Launcher::Launcher(std::shared_ptr<InputChecker> checker, std::vector<at::Tensor> static_buffers, SizeTable sizes)
    : checker_(std::move(checker)), static_buffers_(std::move(static_buffers)), sizes_(std::move(sizes)) {
  graph_for_batch_.resize(sizes_.max_batch_size() + 1);
  c10::cuda::CUDAGuard guard(checker_->device());
  // Each block reads the descriptor over PCIe once and retires through one atomic, so blocks are not free.
  // Staged inputs are a few KB to a few MB: two blocks per SM (264 on an H100) already keep every SM's
  // copy busy, and more would only add descriptor reads.
  max_blocks_ = 2u * static_cast<unsigned>(at::cuda::getDeviceProperties(checker_->device())->multiProcessorCount);
  void* host = nullptr;
  GR_CUDA_CHECK(cudaHostAlloc(&host, sizeof(HostRing), cudaHostAllocMapped));
  std::memset(host, 0, sizeof(HostRing));
  ring_ = static_cast<HostRing*>(host);
  GR_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ring_device_), host, 0));
  control_ = at::zeros({2}, at::TensorOptions().device(at::kCUDA, checker_->device()).dtype(at::kLong));
}

Launcher::~Launcher() {
  // Graphs that read the ring may still be running on the launcher's device: wait for them there (the
  // destructor may run on a thread whose current device is another) before freeing it.
  if (ring_ != nullptr) {
    c10::cuda::CUDAGuard guard(checker_->device());
    cudaDeviceSynchronize();
    cudaFreeHost(ring_);
  }
}

void Launcher::stage(int64_t size) {
  const auto& specs = checker_->specs();
  StaticTable table{};
  table.num_inputs = static_cast<int>(specs.size());
  long long largest = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    table.dst[i] = static_cast<unsigned char*>(static_buffers_[i].data_ptr());
    table.row_bytes[i] = specs[i].row_bytes();
    std::memcpy(&table.pad[i], specs[i].pad_pattern.data(), 16);
    table.pad_each_step[i] = specs[i].pad_each_step;
    largest = std::max(largest, size * table.row_bytes[i]);
  }
  const long long chunks = (largest + 15) / 16;
  dim3 grid(static_cast<unsigned>(std::clamp<long long>((chunks + kThreads - 1) / kThreads, 1, max_blocks_)),
            static_cast<unsigned>(specs.size()));
  auto stream = c10::cuda::getCurrentCUDAStream(checker_->device());
  stage_inputs<<<grid, kThreads, 0, stream.stream()>>>(
      ring_device_, reinterpret_cast<unsigned long long*>(control_.data_ptr()), table, size);
  GR_CUDA_CHECK(cudaGetLastError());
}

void Launcher::add_graph(int64_t size, std::shared_ptr<Graph> graph) {
  for (int64_t b = 1; b <= sizes_.max_batch_size(); ++b) {
    if (sizes_.size_for(b) == size) {
      graph_for_batch_[b] = graph;
    }
  }
}

void Launcher::launch(int64_t batch, BorrowedInputs inputs) {
  if (sizes_.size_for(batch) == 0 || !graph_for_batch_[batch]) {
    throw StateError("no captured graph holds batch " + std::to_string(batch) + "; run this step eagerly");
  }
  // A non-contiguous input is staged from a contiguous copy made on the graph's stream: when the copy
  // is freed on return, the allocator reuses its memory only for work queued behind this graph. The usual
  // step has none, and then this vector never allocates.
  std::vector<at::Tensor> copies;
  const void* src[kMaxInputs];
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& t = *inputs[i];
    if (t.is_contiguous()) {
      src[i] = t.const_data_ptr();
    } else {
      copies.push_back(t.contiguous());
      src[i] = copies.back().const_data_ptr();
    }
  }
  const unsigned long long step = issued_;
  // Back-pressure: never overwrite a descriptor the GPU has not consumed yet.
  while (step - *reinterpret_cast<volatile unsigned long long*>(&ring_->consumed) >= kRingSlots) {
  }
  StepDescriptor& desc = ring_->slots[step % kRingSlots];
  desc.batch = batch;
  std::memcpy(desc.src, src, inputs.size() * sizeof(const void*));
  std::atomic_thread_fence(std::memory_order_release);
  *reinterpret_cast<volatile unsigned long long*>(&desc.seq) = step + 1;
  try {
    graph_for_batch_[batch]->replay();
  } catch (...) {
    *reinterpret_cast<volatile unsigned long long*>(&desc.seq) = 0;
    throw;
  }
  issued_ = step + 1;
}

std::vector<std::tuple<uint64_t, uint64_t, std::string>> Launcher::owned_memory() const {
  return {{reinterpret_cast<uint64_t>(control_.data_ptr()), control_.nbytes(), "staging control words"},
          {reinterpret_cast<uint64_t>(ring_device_), sizeof(HostRing), "staging descriptor ring (mapped host)"}};
}

}  // namespace graphrunner
