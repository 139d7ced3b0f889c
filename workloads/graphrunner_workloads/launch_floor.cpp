// The benchmark's floor: the host time of a bare cudaGraphLaunch in a C++ loop, with no Python around it.
// Built only for the benchmark (graphrunner_workloads._launch_floor); the core does not link it.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

void check(cudaError_t err, const char* call) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string(call) + " failed: " + cudaGetErrorString(err));
  }
}

// Median host microseconds of one cudaGraphLaunch of `exec` on `stream`, each launch waited for.
double launch_floor_us(uintptr_t exec, uintptr_t stream, int steps) {
  if (steps < 1) {
    throw std::invalid_argument("steps must be at least 1, got " + std::to_string(steps));
  }
  auto* graph = reinterpret_cast<cudaGraphExec_t>(exec);
  auto* s = reinterpret_cast<cudaStream_t>(stream);
  std::vector<double> host_us(steps);
  for (int i = 0; i < steps; ++i) {
    auto start = std::chrono::steady_clock::now();
    check(cudaGraphLaunch(graph, s), "cudaGraphLaunch");
    auto stop = std::chrono::steady_clock::now();
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    host_us[i] = std::chrono::duration<double, std::micro>(stop - start).count();
  }
  std::nth_element(host_us.begin(), host_us.begin() + steps / 2, host_us.end());
  return host_us[steps / 2];
}

}  // namespace

PYBIND11_MODULE(_launch_floor, m) {
  m.doc() = "The benchmark's C++ launch loop.";
  m.def("launch_floor_us", &launch_floor_us, pybind11::arg("exec_handle"), pybind11::arg("stream"),
        pybind11::arg("steps"), "Median host us of cudaGraphLaunch(exec_handle, stream) over `steps` launches.");
}
