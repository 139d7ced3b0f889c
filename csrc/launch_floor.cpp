#include "launch_floor.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "errors.h"

namespace graphrunner {
namespace {

template <typename Step>
double median_host_us(c10::DeviceIndex device, int steps, Step&& step) {
  if (steps < 1) {
    throw InputValueError("steps must be at least 1, got " + std::to_string(steps));
  }
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  std::vector<double> host_us(steps);
  for (int i = 0; i < steps; ++i) {
    auto start = std::chrono::steady_clock::now();
    step(stream);
    auto stop = std::chrono::steady_clock::now();
    GR_CUDA_CHECK(cudaStreamSynchronize(stream));
    host_us[i] = std::chrono::duration<double, std::micro>(stop - start).count();
  }
  std::nth_element(host_us.begin(), host_us.begin() + steps / 2, host_us.end());
  return host_us[steps / 2];
}

}  // namespace

double launch_floor_us(const Graph& graph, int steps) {
  if (!graph.captured()) {
    throw StateError("launch_floor_us() needs a captured graph");
  }
  return median_host_us(graph.device(), steps,
                        [&](cudaStream_t stream) { GR_CUDA_CHECK(cudaGraphLaunch(graph.exec(), stream)); });
}

double step_loop_us(StepRunner& runner, StepTensors inputs, int steps) {
  const int64_t batch = runner.checker().check(inputs);
  if (runner.size_for(batch) == 0) {
    throw InputValueError("step_loop_us() needs inputs whose batch fits a captured size");
  }
  return median_host_us(runner.checker().device(), steps, [&](cudaStream_t) {
    runner.launch(runner.checker().check(inputs), inputs);
  });
}

}  // namespace graphrunner
