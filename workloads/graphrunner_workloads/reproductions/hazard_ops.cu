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

// Draft-decode metadata: the flat KV slot of every request's token at each of `steps` positions from `start`,
// step-major (slots[k * rows + r]), written through the raw pointer however big `slots` is.
__global__ void write_kv_slots(const int64_t* start, const int* page_table, int64_t* slots, int rows, int pages,
                               int steps, int page_size) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * steps) return;
  int k = i / rows, r = i % rows;
  int64_t pos = start[r] + k;
  slots[i] = static_cast<int64_t>(page_table[r * pages + pos / page_size]) * page_size + pos % page_size;
}

void kv_slots_op(torch::Tensor start, torch::Tensor page_table, torch::Tensor slots, int64_t steps, int64_t page_size) {
  TORCH_CHECK(start.dtype() == torch::kLong && page_table.dtype() == torch::kInt && slots.dtype() == torch::kLong);
  int rows = start.size(0), pages = page_table.size(1);
  write_kv_slots<<<(rows * steps + 255) / 256, 256, 0, stream()>>>(
      start.data_ptr<int64_t>(), page_table.data_ptr<int>(), slots.data_ptr<int64_t>(), rows, pages, steps,
      page_size);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("planes_op", &planes_op);
  m.def("counter_op", &counter_op);
  m.def("kv_slots_op", &kv_slots_op);
}
