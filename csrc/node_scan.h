// What each node of a captured graph hands the GPU, read back for the audit of borrowed memory.
//
// A kernel captured from a library bakes raw device addresses into its parameters: its inputs and
// outputs, and also memory the library cached outside the graph's pool (a cuBLAS workspace, say). If that
// memory is freed while the graph lives, replays read or write freed memory. The scan lists every
// 8-byte-aligned word of every node's parameters that could be an address, and whether it lies inside a
// parameter larger than a pointer (a functor or argument struct, whose unused slots may hold leftover host
// stack bytes); Python classifies them against the allocator's snapshot. What it cannot see: addresses a
// kernel reads indirectly, from a table in device memory.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

namespace graphrunner {

struct Word {
  uint32_t offset;  // byte offset in the node's parameters
  uint64_t value;
  bool in_struct;   // inside a parameter larger than a pointer (or cuBLAS's one argument buffer)
};

struct NodeWords {
  std::string kind;  // "kernel", "memset" or "memcpy"
  std::string name;  // the kernel's (mangled) name, or the node kind
  std::vector<Word> words;
};

// Every kernel, memset and memcpy node of `graph` (child graphs included), in node order.
std::vector<NodeWords> scan_nodes(cudaGraph_t graph);

// The structure of `graph` (Graph::structure()): per node in cudaGraphGetNodes order its type and shape (a
// kernel's function, grid, block, dynamic shared memory, cooperative flag and cluster; a memset's element size,
// width, height and pitch; a memcpy's extent, kind, pitches and the memory types of its operands; a child graph's
// own structure), then the edges as sorted (from, to) node index pairs with their ports and types. Addresses and
// values are left out: they are what cudaGraphExecUpdate carries from one graph of a structure to another.
std::string graph_structure(cudaGraph_t graph);

// What CUDA says an address is: "device", "host", "managed", or "" (not memory CUDA knows).
std::string address_kind(uint64_t address);

}  // namespace graphrunner
