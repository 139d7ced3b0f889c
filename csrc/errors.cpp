#include "errors.h"

namespace graphrunner {

void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  // Clear the error if it is not sticky, so the process can keep using CUDA after the exception.
  (void)cudaGetLastError();
  throw CudaError(std::string("CUDA error ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err) +
                  " (from " + call + " at " + file + ":" + std::to_string(line) + ")");
}

}  // namespace graphrunner
