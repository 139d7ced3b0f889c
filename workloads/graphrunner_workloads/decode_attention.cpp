// The decode attention op's host side: checks every argument, then launches the kernels of
// decode_attention_kernels.cu. attention.py wraps `forward` as the torch op graphrunner_workloads::decode_attention,
// with a fake, so torch.compile traces it as one call, and raises the errors `forward` returns.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cmath>
#include <string>
#include <utility>

#include "decode_attention.h"

namespace graphrunner_workloads {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// Message parts as text. Built with std::string alone: std::ostringstream crashed the process on the H100
// machine, whose toolchain's libstdc++ is newer than the one the process loads.
std::string text(const char* x) { return x; }
std::string text(int64_t x) { return std::to_string(x); }
std::string text(at::ScalarType x) { return c10::toString(x); }
std::string text(at::IntArrayRef x) {
  std::string out = "[";
  for (size_t i = 0; i < x.size(); ++i) out += (i ? ", " : "") + std::to_string(x[i]);
  return out + "]";
}

// The parts of a message, joined.
template <typename... Parts>
std::string join(const Parts&... parts) {
  return ("decode_attention: " + ... + text(parts));
}

// Why the arguments cannot be used, or "" when they can; fills `s` as it goes.
std::string argument_error(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& seq_lens, const std::optional<at::Tensor>& page_table,
                           const at::Tensor& out, DecodeShape& s) {
  const bool paged = page_table.has_value();
  if (!(q.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && seq_lens.is_cuda())) {
    return join("q, k_cache, v_cache and seq_lens must be CUDA tensors");
  }
  if (q.dim() != 3) return join("q must be [rows, heads, dim], got ", q.sizes());
  if (!(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides())) {
    return join("k_cache and v_cache must be 4-d with one shape and layout, got ", k_cache.sizes(), " and ",
                v_cache.sizes());
  }
  if (!(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type())) {
    return join("q, k_cache and v_cache must share a dtype");
  }
  if (!(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16)) {
    return join("q's dtype must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  if (!(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.is_contiguous())) {
    return join("seq_lens must be a contiguous int32 [rows] tensor");
  }
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  if (!(dim == 32 || dim == 64 || dim == 128 || dim == 256)) {
    return join("head dim must be 32, 64, 128 or 256, got ", dim, "; use attention='sdpa'");
  }
  if (seq_lens.size(0) != rows) return join("seq_lens has ", seq_lens.size(0), " rows, q has ", rows);
  // Layouts: contiguous [rows, heads, cache_len, dim]; paged [num_pages, page_size, heads, dim].
  const int head_index = paged ? 2 : 1, pos_index = paged ? 1 : 2;
  if (k_cache.size(head_index) != heads) {
    return join("the cache has ", k_cache.size(head_index), " heads, q has ", heads);
  }
  if (k_cache.size(3) != dim) return join("the cache's head dim is ", k_cache.size(3), ", q's ", dim);
  if (!paged && k_cache.size(0) < rows) {
    return join("the contiguous cache has ", k_cache.size(0), " rows, q has ", rows);
  }
  const int64_t vec = dim / 32, bytes = vec * q.element_size();
  for (const at::Tensor* t : {&q, &k_cache, &v_cache}) {
    if (!(t->stride(-1) == 1 && reinterpret_cast<uintptr_t>(t->data_ptr()) % bytes == 0)) {
      return join("q and the caches need a unit stride over the head dim and ", bytes, "-byte aligned heads");
    }
    for (int64_t i = 0; i < t->dim() - 1; ++i) {
      if (t->stride(i) % vec != 0) return join("q's and the caches' strides must be multiples of ", vec, " elements");
    }
  }
  if (!(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type())) {
    return join("out must be a contiguous tensor of q's shape and dtype");
  }
  s.rows = rows, s.heads = heads, s.dim = dim;
  s.q_row = q.stride(0), s.q_head = q.stride(1);
  s.c_outer = k_cache.stride(0), s.c_head = k_cache.stride(head_index), s.c_pos = k_cache.stride(pos_index);
  if (paged) {
    const at::Tensor& table = *page_table;
    if (!(table.is_cuda() && table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == rows &&
          table.stride(1) == 1)) {
      return join("page_table must be a CUDA int32 [rows, pages_per_seq] tensor with unit column stride, got ",
                  table.sizes());
    }
    s.page_table = table.data_ptr<int>();
    s.pt_row = table.stride(0);
    s.page_size = k_cache.size(1);
    s.cache_len = table.size(1) * s.page_size;
  } else {
    s.cache_len = k_cache.size(2);
  }
  s.splits = std::max<int64_t>(1, (s.cache_len + kChunk - 1) / kChunk);
  s.scale_log2 = kLog2e / std::sqrt(static_cast<float>(dim));
  return "";
}

Dtype dtype_of(const at::Tensor& q) {
  return q.scalar_type() == at::kFloat ? Dtype::kFloat : q.scalar_type() == at::kHalf ? Dtype::kHalf
                                                                                       : Dtype::kBFloat16;
}

// Writes the attention into `out`. Returns (0, "") when done, (1, why) for bad arguments, (2, why) when a launch
// failed; attention.py raises. (The first version threw, with messages from an ostringstream, and its error paths
// crashed the process on the H100 machine.)
std::pair<int, std::string> forward(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& seq_lens, const std::optional<at::Tensor>& page_table,
                                    at::Tensor& out) {
  DecodeShape s{};
  std::string why = argument_error(q, k_cache, v_cache, seq_lens, page_table, out, s);
  if (!why.empty()) return {1, why};
  if (s.rows == 0) return {0, ""};
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor partials = at::empty({s.rows, s.heads, s.splits, 2 + s.dim}, q.options().dtype(at::kFloat));
  const cudaError_t err = launch_decode_attention(dtype_of(q), s, q.data_ptr(), k_cache.data_ptr(),
                                                  v_cache.data_ptr(), seq_lens.data_ptr<int>(),
                                                  partials.data_ptr<float>(), out.data_ptr(),
                                                  c10::cuda::getCurrentCUDAStream());
  if (err != cudaSuccess) return {2, join("kernel launch failed: ", cudaGetErrorString(err))};
  return {0, ""};
}

}  // namespace
}  // namespace graphrunner_workloads

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &graphrunner_workloads::forward,
        "Decode attention into out [rows, heads, dim] from each row's first seq_lens keys; returns (status, why).",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("seq_lens"), py::arg("page_table"),
        py::arg("out"));
}
