#include "driver.h"

#include <cuda_runtime_api.h>

namespace graphrunner {
namespace {

template <typename Fn>
Fn entry_point(const char* symbol, int version) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found;
#if CUDART_VERSION >= 12050
  const cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, &fn, version, cudaEnableDefault, &found);
#else  // toolkits before 12.5 have only the unversioned lookup
  (void)version;
  const cudaError_t err = cudaGetDriverEntryPoint(symbol, &fn, cudaEnableDefault, &found);
#endif
  if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  return reinterpret_cast<Fn>(fn);
}

}  // namespace

const DriverCalls& driver() {
  static const DriverCalls calls{
      entry_point<decltype(DriverCalls::ctx_get_current)>("cuCtxGetCurrent", 12000),
      entry_point<decltype(DriverCalls::graph_launch)>("cuGraphLaunch", 12000),
      entry_point<decltype(DriverCalls::exec_kernel_node_set_params)>("cuGraphExecKernelNodeSetParams", 12000),
      // Version 12000 of this symbol is the one that fills CUDA_KERNEL_NODE_PARAMS_v2 (with `kern`).
      entry_point<decltype(DriverCalls::kernel_node_get_params)>("cuGraphKernelNodeGetParams", 12000),
      entry_point<decltype(DriverCalls::kernel_get_name)>("cuKernelGetName", 12030),
      entry_point<decltype(DriverCalls::kernel_get_param_info)>("cuKernelGetParamInfo", 12040),
      entry_point<decltype(DriverCalls::func_get_name)>("cuFuncGetName", 12030),
      entry_point<decltype(DriverCalls::func_get_param_info)>("cuFuncGetParamInfo", 12040),
  };
  return calls;
}

CUcontext current_context() {
  CUcontext ctx = nullptr;
  const auto get = driver().ctx_get_current;
  return get != nullptr && get(&ctx) == CUDA_SUCCESS ? ctx : nullptr;
}

}  // namespace graphrunner
