// Test-only CUDA ops behind the shared-pool hazard reproductions. Each is correct in eager mode.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>

namespace {

// Writes `planes` planes of `rows` entries (plane j, row r holds r) into meta, however big meta is.
__global__ void write_planes(int* meta, int rows, int planes) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < rows * planes) meta[i] = i % rows;
}

// out[r, c] = x[r, c] + meta[r]: only plane 0 is read.
__global__ void add_plane0(const float* x, const int* meta, float* out, int rows, int cols) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < rows * cols) out[i] = x[i] + static_cast<float>(meta[i / cols]);
}

// One block claims items through a counter that must be 0 on entry; the block resets it on exit.
__global__ void claim_and_double(const float* x, float* out, unsigned* counter, unsigned n) {
  for (unsigned t = atomicAdd(counter, 1u); t < n; t = atomicAdd(counter, 1u)) out[t] = 2.f * x[t];
  __syncthreads();
  if (threadIdx.x == 0) *counter = 0;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace

// Top-k style metadata: the kernel writes `planes` entries per row into `meta`; out = x + row index.
torch::Tensor planes_op(torch::Tensor x, torch::Tensor meta, int64_t planes) {
  TORCH_CHECK(x.is_cuda() && x.dtype() == torch::kFloat && meta.dtype() == torch::kInt);
  int rows = x.size(0), cols = x.size(1);
  auto out = torch::empty_like(x);  // allocated after meta, as the op's caller allocated meta first
  write_planes<<<(rows * planes + 255) / 256, 256, 0, stream()>>>(meta.data_ptr<int>(), rows, planes);
  add_plane0<<<(rows * cols + 255) / 256, 256, 0, stream()>>>(x.data_ptr<float>(), meta.data_ptr<int>(),
                                                              out.data_ptr<float>(), rows, cols);
  return out;
}

// out = 2 * x, with work claimed through counter[0] (uint32), which must be 0 on entry.
torch::Tensor counter_op(torch::Tensor x, torch::Tensor counter) {
  TORCH_CHECK(x.is_cuda() && x.dtype() == torch::kFloat && x.is_contiguous());
  auto out = torch::empty_like(x);
  claim_and_double<<<1, 256, 0, stream()>>>(x.data_ptr<float>(), out.data_ptr<float>(),
                                            reinterpret_cast<unsigned*>(counter.data_ptr()),
                                            static_cast<unsigned>(x.numel()));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("planes_op", &planes_op);
  m.def("counter_op", &counter_op);
}
