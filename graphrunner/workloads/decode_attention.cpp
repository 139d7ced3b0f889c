// The decode attention op's host side: checks every argument, raising ValueError (std::invalid_argument through
// pybind11) that names it, then launches the kernels of decode_attention_kernels.cu. attention.py wraps `forward`
// as the torch op graphrunner_workloads::decode_attention, with a fake, so torch.compile traces it as one call.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <sstream>
#include <stdexcept>

#include "decode_attention.h"

namespace graphrunner_workloads {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// Raises std::invalid_argument with the parts of the message joined.
template <typename... Parts>
void check(bool ok, const Parts&... parts) {
  if (!ok) {
    std::ostringstream message;
    message << "decode_attention: ";
    (message << ... << parts);
    throw std::invalid_argument(message.str());
  }
}

Dtype dtype_of(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return Dtype::kFloat;
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: check(false, "q's dtype must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  return Dtype::kFloat;
}

at::Tensor forward(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& seq_lens, const std::optional<at::Tensor>& page_table) {
  const bool paged = page_table.has_value();
  check(q.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && seq_lens.is_cuda(),
        "q, k_cache, v_cache and seq_lens must be CUDA tensors");
  check(q.dim() == 3, "q must be [rows, heads, dim], got ", q.sizes());
  check(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
        "k_cache and v_cache must be 4-d with one shape and layout, got ", k_cache.sizes(), " and ", v_cache.sizes());
  check(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
        "q, k_cache and v_cache must share a dtype");
  const Dtype dtype = dtype_of(q);
  check(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.is_contiguous(),
        "seq_lens must be a contiguous int32 [rows] tensor");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  check(dim == 32 || dim == 64 || dim == 128 || dim == 256, "head dim must be 32, 64, 128 or 256, got ", dim,
        "; use attention='sdpa'");
  check(seq_lens.size(0) == rows, "seq_lens has ", seq_lens.size(0), " rows, q has ", rows);
  // Layouts: contiguous [rows, heads, cache_len, dim]; paged [num_pages, page_size, heads, dim].
  const int head_index = paged ? 2 : 1, pos_index = paged ? 1 : 2;
  check(k_cache.size(head_index) == heads, "the cache has ", k_cache.size(head_index), " heads, q has ", heads);
  check(k_cache.size(3) == dim, "the cache's head dim is ", k_cache.size(3), ", q's ", dim);
  check(paged || k_cache.size(0) >= rows, "the contiguous cache has ", k_cache.size(0), " rows, q has ", rows);
  const int64_t vec = dim / 32, bytes = vec * q.element_size();
  for (const at::Tensor* t : {&q, &k_cache, &v_cache}) {
    check(t->stride(-1) == 1 && reinterpret_cast<uintptr_t>(t->data_ptr()) % bytes == 0,
          "q and the caches need a unit stride over the head dim and ", bytes, "-byte aligned heads");
    for (int64_t i = 0; i < t->dim() - 1; ++i) {
      check(t->stride(i) % vec == 0, "q's and the caches' strides must be multiples of ", vec, " elements");
    }
  }
  DecodeShape s{};
  s.rows = rows, s.heads = heads, s.dim = dim;
  s.q_row = q.stride(0), s.q_head = q.stride(1);
  s.c_outer = k_cache.stride(0), s.c_head = k_cache.stride(head_index), s.c_pos = k_cache.stride(pos_index);
  if (paged) {
    const at::Tensor& table = *page_table;
    check(table.is_cuda() && table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == rows &&
              table.stride(1) == 1,
          "page_table must be a CUDA int32 [rows, pages_per_seq] tensor with unit column stride, got ",
          table.sizes());
    s.page_table = table.data_ptr<int>();
    s.pt_row = table.stride(0);
    s.page_size = k_cache.size(1);
    s.cache_len = table.size(1) * s.page_size;
  } else {
    s.cache_len = k_cache.size(2);
  }
  s.splits = std::max<int64_t>(1, (s.cache_len + kChunk - 1) / kChunk);
  s.scale_log2 = kLog2e / std::sqrt(static_cast<float>(dim));

  at::Tensor out = at::empty({rows, heads, dim}, q.options());
  if (rows == 0) return out;
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor partials = at::empty({rows, heads, s.splits, 2 + dim}, q.options().dtype(at::kFloat));
  const cudaError_t err = launch_decode_attention(dtype, s, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                                  seq_lens.data_ptr<int>(), partials.data_ptr<float>(),
                                                  out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("decode_attention: kernel launch failed: ") + cudaGetErrorString(err));
  }
  return out;
}

}  // namespace
}  // namespace graphrunner_workloads

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &graphrunner_workloads::forward,
        "Decode attention: [rows, heads, dim] from each row's first seq_lens keys.", py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("seq_lens"), py::arg("page_table"));
}
