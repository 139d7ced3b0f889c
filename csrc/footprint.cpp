#include "footprint.h"

#include <c10/cuda/CUDACachingAllocator.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

namespace graphrunner {
namespace {

namespace allocator = c10::cuda::CUDACachingAllocator;

struct Recorder {
  std::mutex mutex;
  std::atomic<int> active{0};
  std::unordered_map<cudaStream_t, std::vector<AddressRange>> by_stream;
};

// The allocator cannot detach a trace tracker, so one is attached on first use and forwards to the
// recorder; outside a capture it costs one atomic load per allocation.
Recorder& recorder() {
  static Recorder* r = [] {
    auto* created = new Recorder();
    allocator::attachAllocatorTraceTracker([created](const allocator::TraceEntry& te) {
      if (created->active.load(std::memory_order_relaxed) == 0 || te.action_ != allocator::TraceEntry::ALLOC) {
        return;
      }
      std::lock_guard<std::mutex> lock(created->mutex);
      auto it = created->by_stream.find(static_cast<cudaStream_t>(te.stream_));
      if (it != created->by_stream.end()) {
        it->second.emplace_back(te.addr_, te.size_);
      }
    });
    return created;
  }();
  return *r;
}

}  // namespace

void begin_footprint(cudaStream_t stream) {
  Recorder& r = recorder();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (r.by_stream.emplace(stream, std::vector<AddressRange>{}).second) {
    r.active.fetch_add(1);
  }
}

std::vector<AddressRange> end_footprint(cudaStream_t stream) {
  Recorder& r = recorder();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.by_stream.find(stream);
  if (it == r.by_stream.end()) {
    return {};
  }
  std::vector<AddressRange> out = std::move(it->second);
  r.by_stream.erase(it);
  r.active.fetch_sub(1);
  return out;
}

}  // namespace graphrunner
