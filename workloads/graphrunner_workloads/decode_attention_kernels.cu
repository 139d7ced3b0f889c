// Decode attention for the built-in decoder: one query per row over that row's first seq_len keys, read from a
// contiguous [rows, heads, cache_len, dim] or paged [num_pages, page_size, heads, dim] cache. Split over the keys
// (flash-decoding): each block reduces kChunk keys of one (row, head) to a partial softmax (max, sum, weighted
// values), and a second kernel merges a row's chunks. Only the keys a row has are read, so its cost follows the
// lengths, as a serving engine's decode kernel does (the masked SDPA it replaces reads the whole cache).
//
// Both kernels write every element they own each call, so the partials buffer, taken from the caching allocator
// per call, carries no state between calls or graph replays. The checks are in decode_attention.cpp; this file
// only launches and returns CUDA's status.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "decode_attention.h"

namespace graphrunner_workloads {
namespace {

constexpr int kWarps = 4;
constexpr int kKeysPerWarp = kChunk / kWarps;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

// VEC consecutive elements, read in one load (decode_attention.cpp checks the alignment).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

__device__ __forceinline__ int row_length(const int* seq_lens, int row, int cache_len) {
  return min(max(seq_lens[row], 0), cache_len);  // a bad length reads less, never outside the row
}

// Where key `pos` of (row, head) starts in either cache.
__device__ __forceinline__ int64_t key_offset(const DecodeShape& s, int row, int head, int pos) {
  const int64_t at = head * s.c_head;
  if (s.page_table) {
    return at + int64_t(s.page_table[row * s.pt_row + pos / s.page_size]) * s.c_outer + (pos % s.page_size) * s.c_pos;
  }
  return at + row * s.c_outer + int64_t(pos) * s.c_pos;
}

// A warp's kKeysPerWarp rows of one cache, all loads issued before any is used (a load per key inside a branch
// would wait for each in turn). Keys past the row's length read its last key, and are masked by the caller.
template <typename T, int VEC>
__device__ __forceinline__ void load_keys(const T* cache, const DecodeShape& s, int row, int head, int first,
                                          int len, int lane, Vec<T, VEC> (&out)[kKeysPerWarp]) {
#pragma unroll
  for (int j = 0; j < kKeysPerWarp; ++j) {
    const int pos = min(first + j, len - 1);
    out[j] = *reinterpret_cast<const Vec<T, VEC>*>(cache + key_offset(s, row, head, pos) + lane * VEC);
  }
}

// Grid (splits, heads, rows), kWarps warps. Lane l holds dims [l*VEC, (l+1)*VEC) of q and of the output.
// partials: [rows, heads, splits, 2 + dim] floats: max (log2 units), sum, then the unnormalised output.
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarps * 32)
    decode_partial(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const int* __restrict__ seq_lens, float* __restrict__ partials, DecodeShape s) {
  constexpr int kDim = 32 * VEC;
  const int split = blockIdx.x, head = blockIdx.y, row = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int len = row_length(seq_lens, row, s.cache_len);
  const int first = split * kChunk + warp * kKeysPerWarp;
  const bool has_keys = first < len;  // uniform across the warp

  float m = -INFINITY, l = 0.f, acc[VEC] = {};
  if (has_keys) {
    const Vec<T, VEC> qv = *reinterpret_cast<const Vec<T, VEC>*>(q + row * s.q_row + head * s.q_head + lane * VEC);
    Vec<T, VEC> keys[kKeysPerWarp];
    load_keys<T, VEC>(k, s, row, head, first, len, lane, keys);
    float score[kKeysPerWarp];
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
      score[j] = 0.f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) score[j] += to_float(qv.v[i]) * to_float(keys[j].v[i]);
    }
    load_keys<T, VEC>(v, s, row, head, first, len, lane, keys);  // in flight while the scores reduce
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) score[j] += __shfl_xor_sync(0xffffffffu, score[j], offset);
      score[j] *= s.scale_log2;
      if (first + j < len) m = fmaxf(m, score[j]);
    }
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
      const float p = first + j < len ? exp2f(score[j] - m) : 0.f;
      l += p;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += p * to_float(keys[j].v[i]);
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
                             T* __restrict__ out, DecodeShape s) {
  const int head = blockIdx.x, row = blockIdx.y, d = threadIdx.x, stride = 2 + s.dim;
  const int len = row_length(seq_lens, row, s.cache_len);
  const int used = (len + kChunk - 1) / kChunk;
  const float* p = partials + (int64_t(row) * s.heads + head) * s.splits * stride;
  float m = -INFINITY;
  for (int c = 0; c < used; ++c) m = fmaxf(m, p[c * stride]);
  float l = 0.f, acc = 0.f;
  for (int c = 0; c < used; ++c) {
    const float w = exp2f(p[c * stride] - m);
    l += p[c * stride + 1] * w;
    acc += p[c * stride + 2 + d] * w;
  }
  store(out + (int64_t(row) * s.heads + head) * s.dim + d, l > 0.f ? acc / l : 0.f);
}

template <typename T, int VEC>
cudaError_t launch(const DecodeShape& s, const void* q, const void* k, const void* v, const int* seq_lens,
                   float* partials, void* out, cudaStream_t stream) {
  decode_partial<T, VEC><<<dim3(s.splits, s.heads, s.rows), kWarps * 32, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), seq_lens, partials, s);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  decode_merge<T><<<dim3(s.heads, s.rows), s.dim, 0, stream>>>(partials, seq_lens, static_cast<T*>(out), s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_dim(const DecodeShape& s, const void* q, const void* k, const void* v, const int* seq_lens,
                           float* partials, void* out, cudaStream_t stream) {
  switch (s.dim) {
    case 32: return launch<T, 1>(s, q, k, v, seq_lens, partials, out, stream);
    case 64: return launch<T, 2>(s, q, k, v, seq_lens, partials, out, stream);
    case 128: return launch<T, 4>(s, q, k, v, seq_lens, partials, out, stream);
    case 256: return launch<T, 8>(s, q, k, v, seq_lens, partials, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_decode_attention(Dtype dtype, const DecodeShape& s, const void* q, const void* k_cache,
                                    const void* v_cache, const int* seq_lens, float* partials, void* out,
                                    cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat: return launch_for_dim<float>(s, q, k_cache, v_cache, seq_lens, partials, out, stream);
    case Dtype::kHalf: return launch_for_dim<__half>(s, q, k_cache, v_cache, seq_lens, partials, out, stream);
    case Dtype::kBFloat16:
      return launch_for_dim<__nv_bfloat16>(s, q, k_cache, v_cache, seq_lens, partials, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace graphrunner_workloads
