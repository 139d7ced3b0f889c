// Decode attention for the built-in decoder: one query per row over that row's first seq_len keys, read from a
// contiguous [rows, heads, cache_len, dim] or paged [num_pages, page_size, heads, dim] cache. Split over the keys
// (flash-decoding): each block reduces one chunk of CHUNK keys of one (row, head) to a partial softmax (max, sum,
// weighted values), and a second kernel merges a row's chunks. Only the keys a row has are read, so its cost
// follows the lengths, as a serving engine's decode kernel does (the masked SDPA it replaces reads the whole cache).
//
// attention.py registers `forward` as the op graphrunner_workloads::decode_attention, with a fake, so torch.compile
// traces it as one opaque call. Bad arguments raise ValueError (std::invalid_argument through pybind11). Both kernels write every element they own each call, so the
// partials buffer, taken from the caching allocator per call, carries no state between calls or replays.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <sstream>
#include <stdexcept>

namespace {

constexpr int kWarps = 4;
constexpr int kKeysPerWarp = 16;
constexpr int kChunk = kWarps * kKeysPerWarp;  // keys one block reduces
constexpr float kLog2e = 1.4426950408889634f;

struct Shape {
  int heads, splits, cache_len;  // cache_len: keys a row can hold (pages_per_seq * page_size when paged)
  int64_t q_row, q_head;         // q strides, in elements
  int64_t c_outer, c_head, c_pos;  // cache strides: of the row (contiguous) or page (paged), head, position
  const int* page_table;         // nullptr: contiguous
  int64_t pt_row;                // page table row stride
  int page_size;
  float scale_log2;              // softmax scale times log2(e): the kernels use exp2
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

// VEC consecutive elements, read in one load (the host checks the alignment).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  Vec<T, VEC> x = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(x.v[i]);
}

__device__ __forceinline__ int row_length(const int* seq_lens, int row, int cache_len) {
  return min(max(seq_lens[row], 0), cache_len);  // a bad length reads less, never outside the row
}

// Where key `pos` of (row, head) starts in either cache.
__device__ __forceinline__ int64_t key_offset(const Shape& s, int row, int head, int pos) {
  const int64_t at = head * s.c_head;
  if (s.page_table) {
    return at + int64_t(s.page_table[row * s.pt_row + pos / s.page_size]) * s.c_outer + (pos % s.page_size) * s.c_pos;
  }
  return at + row * s.c_outer + int64_t(pos) * s.c_pos;
}

// Grid (splits, heads, rows), kWarps warps. Lane l holds dims [l*VEC, (l+1)*VEC) of q and of the output.
// partials: [rows, heads, splits, 2 + dim] floats: max (log2 units), sum, then the unnormalised output.
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarps * 32)
    decode_partial(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const int* __restrict__ seq_lens, float* __restrict__ partials, Shape s) {
  constexpr int kDim = 32 * VEC;
  const int split = blockIdx.x, head = blockIdx.y, row = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int len = row_length(seq_lens, row, s.cache_len);
  const int first = split * kChunk + warp * kKeysPerWarp;

  float qf[VEC];
  load<T, VEC>(q + row * s.q_row + head * s.q_head + lane * VEC, qf);
  float score[kKeysPerWarp];
#pragma unroll
  for (int j = 0; j < kKeysPerWarp; ++j) {
    const int pos = first + j;
    score[j] = 0.f;
    if (pos < len) {
      float kf[VEC];
      load<T, VEC>(k + key_offset(s, row, head, pos) + lane * VEC, kf);
#pragma unroll
      for (int i = 0; i < VEC; ++i) score[j] += qf[i] * kf[i];
    }
  }
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < kKeysPerWarp; ++j) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) score[j] += __shfl_xor_sync(0xffffffffu, score[j], offset);
    score[j] *= s.scale_log2;
    if (first + j < len) m = fmaxf(m, score[j]);
  }
  float l = 0.f, acc[VEC] = {};
#pragma unroll
  for (int j = 0; j < kKeysPerWarp; ++j) {
    const int pos = first + j;
    if (pos < len) {
      const float p = exp2f(score[j] - m);
      float vf[VEC];
      load<T, VEC>(v + key_offset(s, row, head, pos) + lane * VEC, vf);
      l += p;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += p * vf[i];
    }
  }

  // Merge the block's warps; a warp with no keys has m = -inf and weight 0.
  __shared__ float warp_m[kWarps], warp_l[kWarps], warp_acc[kWarps][kDim];
  if (lane == 0) warp_m[warp] = m, warp_l[warp] = l;
#pragma unroll
  for (int i = 0; i < VEC; ++i) warp_acc[warp][lane * VEC + i] = acc[i];
  __syncthreads();
  float block_m = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) block_m = fmaxf(block_m, warp_m[w]);
  float* out = partials + ((int64_t(row) * s.heads + head) * s.splits + split) * (2 + kDim);
  for (int d = threadIdx.x; d < kDim; d += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (warp_m[w] > -INFINITY) sum += warp_acc[w][d] * exp2f(warp_m[w] - block_m);
    }
    out[2 + d] = sum;
  }
  if (threadIdx.x == 0) {
    float block_l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (warp_m[w] > -INFINITY) block_l += warp_l[w] * exp2f(warp_m[w] - block_m);
    }
    out[0] = block_m, out[1] = block_l;
  }
}

// Grid (heads, rows), one thread per dim: the row's chunks that hold keys, merged and normalised. A row with no
// keys (seq_len 0) gets zeros.
template <typename T>
__global__ void decode_merge(const float* __restrict__ partials, const int* __restrict__ seq_lens,
                             T* __restrict__ out, Shape s, int dim) {
  const int head = blockIdx.x, row = blockIdx.y, d = threadIdx.x;
  const int len = row_length(seq_lens, row, s.cache_len);
  const int used = (len + kChunk - 1) / kChunk;
  const float* p = partials + (int64_t(row) * s.heads + head) * s.splits * (2 + dim);
  float m = -INFINITY;
  for (int c = 0; c < used; ++c) m = fmaxf(m, p[c * (2 + dim)]);
  float l = 0.f, acc = 0.f;
  for (int c = 0; c < used; ++c) {
    const float w = exp2f(p[c * (2 + dim)] - m);
    l += p[c * (2 + dim) + 1] * w;
    acc += p[c * (2 + dim) + 2 + d] * w;
  }
  store(out + (int64_t(row) * s.heads + head) * dim + d, l > 0.f ? acc / l : 0.f);
}

template <typename T, int VEC>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seq_lens,
            at::Tensor& partials, at::Tensor& out, const Shape& s, cudaStream_t stream) {
  const int rows = q.size(0);
  decode_partial<T, VEC><<<dim3(s.splits, s.heads, rows), kWarps * 32, 0, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), seq_lens.data_ptr<int>(), partials.data_ptr<float>(), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  decode_merge<T><<<dim3(s.heads, rows), 32 * VEC, 0, stream>>>(partials.data_ptr<float>(), seq_lens.data_ptr<int>(),
                                                             reinterpret_cast<T*>(out.data_ptr()), s, 32 * VEC);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_dim(int dim, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seq_lens,
                  at::Tensor& partials, at::Tensor& out, const Shape& s, cudaStream_t stream) {
  switch (dim) {
    case 32: return launch<T, 1>(q, k, v, seq_lens, partials, out, s, stream);
    case 64: return launch<T, 2>(q, k, v, seq_lens, partials, out, s, stream);
    case 128: return launch<T, 4>(q, k, v, seq_lens, partials, out, s, stream);
    case 256: return launch<T, 8>(q, k, v, seq_lens, partials, out, s, stream);
  }
}

// Raises std::invalid_argument (ValueError in Python) with the parts of the message joined.
template <typename... Parts>
void check(bool ok, const Parts&... parts) {
  if (!ok) {
    std::ostringstream message;
    message << "";
    (message << ... << parts);
    throw std::invalid_argument(message.str());
  }
}

at::Tensor forward(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& seq_lens, const std::optional<at::Tensor>& page_table) {
  const bool paged = page_table.has_value();
  check(q.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && seq_lens.is_cuda(),
              "q, k_cache, v_cache and seq_lens must be CUDA tensors");
  check(q.dim() == 3, "q must be [rows, heads, dim], got ", q.sizes());
  check(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "k_cache and v_cache must be 4-d with one shape and layout, got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  check(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  check(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.is_contiguous(),
              "seq_lens must be a contiguous int32 [rows] tensor");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  check(dim == 32 || dim == 64 || dim == 128 || dim == 256,
              "head dim must be 32, 64, 128 or 256, got ", dim, "; use attention='sdpa'");
  check(seq_lens.size(0) == rows, "seq_lens has ", seq_lens.size(0), " rows, q has ", rows);
  // Layouts: contiguous [rows, heads, cache_len, dim]; paged [num_pages, page_size, heads, dim].
  const int head_index = paged ? 2 : 1, pos_index = paged ? 1 : 2;
  check(k_cache.size(head_index) == heads, "the cache has ", k_cache.size(head_index),
              " heads, q has ", heads);
  check(k_cache.size(3) == dim, "the cache's head dim is ", k_cache.size(3), ", q's ", dim);
  check(paged || k_cache.size(0) >= rows, "the contiguous cache has ",
              k_cache.size(0), " rows, q has ", rows);
  const int vec = dim / 32, bytes = vec * q.element_size();
  for (const at::Tensor* t : {&q, &k_cache, &v_cache}) {
    check(t->stride(-1) == 1 && reinterpret_cast<uintptr_t>(t->data_ptr()) % bytes == 0,
                "q and the caches need a unit stride and ", bytes, "-byte aligned rows of the head dim");
    for (int i = 0; i < t->dim() - 1; ++i) {
      check(t->stride(i) % vec == 0, "strides must be multiples of ", vec, " elements");
    }
  }
  Shape s{};
  s.heads = heads;
  s.q_row = q.stride(0), s.q_head = q.stride(1);
  s.c_outer = k_cache.stride(0), s.c_head = k_cache.stride(head_index), s.c_pos = k_cache.stride(pos_index);
  if (paged) {
    const at::Tensor& table = *page_table;
    check(table.is_cuda() && table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == rows &&
                    table.stride(1) == 1,
                "page_table must be a CUDA int32 [rows, pages_per_seq] tensor with unit column "
                "stride, got ", table.sizes());
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
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (q.scalar_type()) {
    case at::kFloat: dispatch_dim<float>(dim, q, k_cache, v_cache, seq_lens, partials, out, s, stream); break;
    case at::kHalf: dispatch_dim<__half>(dim, q, k_cache, v_cache, seq_lens, partials, out, s, stream); break;
    case at::kBFloat16:
      dispatch_dim<__nv_bfloat16>(dim, q, k_cache, v_cache, seq_lens, partials, out, s, stream);
      break;
    default: check(false, "dtype must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Decode attention: [rows, heads, dim] from each row's first seq_lens keys.", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("seq_lens"), py::arg("page_table"));
}
