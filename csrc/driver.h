// The CUDA driver calls the core makes directly, looked up once through the runtime (no link against
// libcuda). Each is null where the installed driver does not give it out; callers fall back or say so.
#pragma once

#include <cuda.h>

namespace graphrunner {

struct DriverCalls {
  // The replay path: at a few microseconds a step, what the runtime adds over these two (a device guard,
  // cudaGraphLaunch's own checks) is a measurable part of it.
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*graph_launch)(CUgraphExec, CUstream) = nullptr;
  // Staging: each step's argument set on the executable graph's staging node.
  CUresult (*exec_kernel_node_set_params)(CUgraphExec, CUgraphNode, const CUDA_KERNEL_NODE_PARAMS*) = nullptr;
  // The capture audit: a kernel node's parameters, and the kernel's name and parameter layout. A node's
  // `func` can be a sentinel that function APIs crash on; its `kern` handle is the one to ask (CUDA 12.4+).
  CUresult (*kernel_node_get_params)(CUgraphNode, CUDA_KERNEL_NODE_PARAMS*) = nullptr;
  CUresult (*kernel_get_name)(const char**, CUkernel) = nullptr;
  CUresult (*kernel_get_param_info)(CUkernel, size_t, size_t*, size_t*) = nullptr;
  CUresult (*func_get_name)(const char**, CUfunction) = nullptr;
  CUresult (*func_get_param_info)(CUfunction, size_t, size_t*, size_t*) = nullptr;
};

const DriverCalls& driver();

// The calling thread's current context, or null.
CUcontext current_context();

}  // namespace graphrunner
