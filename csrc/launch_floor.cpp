#include "launch_floor.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <chrono>

#include "errors.h"

namespace graphrunner {

double launch_floor_us(const Graph& graph, int steps) {
  if (!graph.captured()) {
    throw StateError("launch_floor_us() needs a captured graph");
  }
  c10::cuda::CUDAGuard guard(graph.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(graph.device()).stream();
  std::vector<double> host_us(steps);
  for (int i = 0; i < steps; ++i) {
    auto start = std::chrono::steady_clock::now();
    GR_CUDA_CHECK(cudaGraphLaunch(graph.exec(), stream));
    auto stop = std::chrono::steady_clock::now();
    GR_CUDA_CHECK(cudaStreamSynchronize(stream));
    host_us[i] = std::chrono::duration<double, std::micro>(stop - start).count();
  }
  std::nth_element(host_us.begin(), host_us.begin() + steps / 2, host_us.end());
  return host_us[steps / 2];
}

}  // namespace graphrunner
