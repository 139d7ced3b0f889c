// The decode attention kernels' interface: decode_attention.cpp checks the arguments (returning what is wrong,
// not throwing), then calls launch_decode_attention, which only launches (decode_attention_kernels.cu) and
// reports CUDA's status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace graphrunner_workloads {

enum class Dtype { kFloat, kHalf, kBFloat16 };

// kChunk keys of one (row, head) per block of the first kernel.
constexpr int kChunk = 64;

struct DecodeShape {
  int rows, heads, dim, splits, cache_len;  // cache_len: keys a row can hold (pages_per_seq * page_size when paged)
  int64_t q_row, q_head;                    // q strides, in elements
  int64_t c_outer, c_head, c_pos;           // cache strides: of the row (contiguous) or page (paged), head, position
  const int* page_table;                    // nullptr: contiguous
  int64_t pt_row;                           // page table row stride
  int page_size;
  float scale_log2;  // softmax scale times log2(e): the kernels use exp2
};

// out [rows, heads, dim] from q [rows, heads, dim] (strided), the caches and seq_lens [rows]; partials holds
// rows * heads * splits * (2 + dim) floats. Returns the launches' status.
cudaError_t launch_decode_attention(Dtype dtype, const DecodeShape& shape, const void* q, const void* k_cache,
                                    const void* v_cache, const int* seq_lens, float* partials, void* out,
                                    cudaStream_t stream);

}  // namespace graphrunner_workloads
