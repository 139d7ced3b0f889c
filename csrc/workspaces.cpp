#include "workspaces.h"

#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "errors.h"

namespace graphrunner {
namespace {

// torch 2.10-2.12 map to the DataPtr alone; 2.13 on to (DataPtr, bytes).
template <typename Value>
c10::DataPtr take_owner(Value& value, uint64_t& bytes, size_t default_bytes) {
  if constexpr (std::is_same_v<std::decay_t<Value>, c10::DataPtr>) {
    bytes = default_bytes;
    return std::move(value);
  } else {
    bytes = value.second;
    return std::move(value.first);
  }
}

template <typename Map>
size_t take_from(Map& cache, cudaStream_t stream, const char* library, size_t default_bytes,
                 std::vector<HeldWorkspace>& held, std::vector<c10::DataPtr>& owners) {
  std::unique_lock<std::shared_mutex> lock(cache.mutex);
  size_t taken = 0;
  for (auto it = cache.map.begin(); it != cache.map.end();) {
    if (std::get<1>(it->first) != static_cast<void*>(stream)) {
      ++it;
      continue;
    }
    uint64_t bytes = 0;
    c10::DataPtr owner = take_owner(it->second, bytes, default_bytes);
    held.push_back({library, reinterpret_cast<uint64_t>(owner.get()), bytes});
    owners.push_back(std::move(owner));
    it = cache.map.erase(it);
    ++taken;
  }
  return taken;
}

}  // namespace

size_t WorkspaceHold::take(cudaStream_t stream) {
  return take_from(at::cuda::cublas_handle_stream_to_workspace(), stream, "cublas", at::cuda::getChosenWorkspaceSize(),
                   held_, owners_) +
         take_from(at::cuda::cublaslt_handle_stream_to_workspace(), stream, "cublaslt",
                   at::cuda::getCUDABlasLtWorkspaceSize(), held_, owners_);
}

std::vector<HeldWorkspace> WorkspaceHold::held() const { return held_; }

cudaStream_t private_stream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::unordered_map<c10::DeviceIndex, cudaStream_t> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find(device);
  if (it != streams.end()) {
    return it->second;
  }
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = nullptr;
  // Never destroyed: graphs captured on it may be replayed until the process ends.
  GR_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  streams.emplace(device, stream);
  return stream;
}

}  // namespace graphrunner
