// Graph-safe RNG for graphs that are not at::cuda::CUDAGraph objects.
//
// Inside a capture, torch's Philox kernels read their seed and base offset through device pointers
// owned by the generator's capture state, and bake only an intra-graph offset into the graph. Before
// each replay someone must write the generator's current seed and offset there and advance the
// generator by the whole graph's increment. torch does this only for its own CUDAGraph class, so this
// class does the same for ours, for the device's default CUDA generator.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/TensorBase.h>
#include <c10/core/Allocator.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "footprint.h"

namespace graphrunner {

class GraphRng {
 public:
  // Before capture: makes the seed/offset tensors, outside any graph pool.
  void prepare(c10::DeviceIndex device);
  // Right after cudaStreamBeginCapture: routes this capture's RNG calls to our seed/offset tensors.
  void begin(c10::CaptureId_t capture_id);
  // Right after cudaStreamEndCapture (or an aborted capture): records the whole-graph increment.
  void end();
  // Before each replay: writes the generator's seed and offset for the graph, then advances it.
  // Costs one tiny kernel, and only for graphs that drew random numbers.
  void before_replay(cudaStream_t stream);
  bool uses_rng() const { return increment_ != 0; }
  // The seed and offset tensors the captured kernels read (address, bytes); empty before prepare().
  std::vector<AddressRange> owned_memory() const;
  void release();

 private:
  at::Generator generator_;
  at::TensorBase seed_;    // int64 on the device, read by the captured kernels
  at::TensorBase offset_;  // int64 on the device, read by the captured kernels
  c10::CaptureId_t capture_id_ = 0;
  uint64_t increment_ = 0;
  bool capturing_ = false;
};

}  // namespace graphrunner
