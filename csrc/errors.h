// Exception types of the native core. The bindings map each to a Python class, so callers can catch
// a CUDA failure apart from misuse of a graph or bad step inputs; the core itself needs no Python.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace graphrunner {

// A CUDA runtime call failed; the message carries the call and CUDA's own error text.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A graph or runner was used out of order (replay before capture, capture inside a capture, ...).
struct StateError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A step input has the wrong value: shape, device, batch size (Python ValueError).
struct InputValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A step input has the wrong kind: not a tensor, wrong dtype, unknown name (Python TypeError).
struct InputTypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);

}  // namespace graphrunner

#define GR_CUDA_CHECK(call)                                                 \
  do {                                                                      \
    cudaError_t gr_err_ = (call);                                           \
    if (gr_err_ != cudaSuccess) {                                           \
      ::graphrunner::throw_cuda_error(gr_err_, #call, __FILE__, __LINE__);  \
    }                                                                       \
  } while (0)
