#include "node_scan.h"

#include <algorithm>
#include <cstring>
#include <tuple>
#include <unordered_map>

#include "driver.h"
#include "errors.h"

namespace graphrunner {
namespace {

// Values below this are counts, strides and flags, never device addresses.
constexpr uint64_t kSmallestAddress = 1ull << 20;

void add_words(NodeWords& node, const void* bytes, size_t size, size_t base_offset, bool in_struct) {
  const auto* p = static_cast<const unsigned char*>(bytes);
  for (size_t off = 0; off + sizeof(uint64_t) <= size; off += sizeof(uint64_t)) {
    uint64_t value;
    std::memcpy(&value, p + off, sizeof(value));
    if (value >= kSmallestAddress) {
      node.words.push_back(Word{static_cast<uint32_t>(base_offset + off), value, in_struct});
    }
  }
}

std::string kernel_name(const CUDA_KERNEL_NODE_PARAMS& p) {
  const char* name = nullptr;
  const auto& d = driver();
  if (p.kern != nullptr && d.kernel_get_name != nullptr) {
    d.kernel_get_name(&name, p.kern);
  } else if (p.kern == nullptr && p.func != nullptr && d.func_get_name != nullptr) {
    d.func_get_name(&name, p.func);
  }
  return name != nullptr ? name : "(unnamed kernel)";
}

// The parameters passed one by one (kernelParams): the kernel's layout says where each one is.
void add_kernel_params(NodeWords& node, const CUDA_KERNEL_NODE_PARAMS& p) {
  const auto& d = driver();
  for (size_t i = 0;; ++i) {
    size_t offset = 0, size = 0;
    CUresult found = CUDA_ERROR_NOT_SUPPORTED;
    if (p.kern != nullptr && d.kernel_get_param_info != nullptr) {
      found = d.kernel_get_param_info(p.kern, i, &offset, &size);
    } else if (p.kern == nullptr && p.func != nullptr && d.func_get_param_info != nullptr) {
      found = d.func_get_param_info(p.func, i, &offset, &size);
    }
    if (found != CUDA_SUCCESS) {
      return;  // past the last parameter
    }
    add_words(node, p.kernelParams[i], size, offset, size > sizeof(uint64_t));
  }
}

// The parameters passed as one buffer (extra), as cuBLAS does with its ~1.7 KB argument struct.
void add_extra_buffer(NodeWords& node, void** extra) {
  const void* buffer = nullptr;
  size_t size = 0;
  for (size_t k = 0; extra[k] != CU_LAUNCH_PARAM_END; k += 2) {
    if (extra[k] == CU_LAUNCH_PARAM_BUFFER_POINTER) {
      buffer = extra[k + 1];
    } else if (extra[k] == CU_LAUNCH_PARAM_BUFFER_SIZE) {
      size = *static_cast<const size_t*>(extra[k + 1]);
    }
  }
  if (buffer != nullptr) {
    add_words(node, buffer, size, 0, true);
  }
}

void scan_into(cudaGraph_t graph, std::vector<NodeWords>& out) {
  size_t count = 0;
  GR_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &count));
  std::vector<cudaGraphNode_t> nodes(count);
  GR_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &count));
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type;
    GR_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
    if (type == cudaGraphNodeTypeKernel) {
      if (driver().kernel_node_get_params == nullptr) {
        throw StateError("this CUDA driver does not give out cuGraphKernelNodeGetParams; the audit needs it");
      }
      CUDA_KERNEL_NODE_PARAMS p{};
      if (driver().kernel_node_get_params(reinterpret_cast<CUgraphNode>(node), &p) != CUDA_SUCCESS) {
        throw CudaError("cuGraphKernelNodeGetParams failed on a captured kernel node");
      }
      NodeWords words{"kernel", kernel_name(p), {}};
      if (p.kernelParams != nullptr) {
        add_kernel_params(words, p);
      } else if (p.extra != nullptr) {
        add_extra_buffer(words, p.extra);
      }
      out.push_back(std::move(words));
    } else if (type == cudaGraphNodeTypeMemset) {
      cudaMemsetParams p{};
      GR_CUDA_CHECK(cudaGraphMemsetNodeGetParams(node, &p));
      NodeWords words{"memset", "memset", {}};
      add_words(words, &p.dst, sizeof(p.dst), 0, false);
      out.push_back(std::move(words));
    } else if (type == cudaGraphNodeTypeMemcpy) {
      cudaMemcpy3DParms p{};
      GR_CUDA_CHECK(cudaGraphMemcpyNodeGetParams(node, &p));
      NodeWords words{"memcpy", "memcpy", {}};
      add_words(words, &p.srcPtr.ptr, sizeof(void*), 0, false);
      add_words(words, &p.dstPtr.ptr, sizeof(void*), sizeof(void*), false);
      out.push_back(std::move(words));
    } else if (type == cudaGraphNodeTypeGraph) {
      cudaGraph_t child = nullptr;
      GR_CUDA_CHECK(cudaGraphChildGraphNodeGetGraph(node, &child));
      scan_into(child, out);
    }
  }
}

// Appends a value's bytes to a structure.
template <typename T>
void put(std::string& out, const T& value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(value));
}

void put_kernel(std::string& out, cudaGraphNode_t node) {
  if (driver().kernel_node_get_params == nullptr) {
    throw StateError("this CUDA driver does not give out cuGraphKernelNodeGetParams; a graph's structure needs it");
  }
  CUDA_KERNEL_NODE_PARAMS p{};
  if (driver().kernel_node_get_params(reinterpret_cast<CUgraphNode>(node), &p) != CUDA_SUCCESS) {
    throw CudaError("cuGraphKernelNodeGetParams failed on a captured kernel node");
  }
  // The kernel by its `kern` handle where the node has one (its `func` may then be a per-call sentinel), else
  // by `func`: one function, not one name (two kernels may share a name; sglang #37657).
  put(out, reinterpret_cast<uintptr_t>(p.kern != nullptr ? static_cast<void*>(p.kern) : static_cast<void*>(p.func)));
  put(out, reinterpret_cast<uintptr_t>(p.ctx));
  for (unsigned v : {p.gridDimX, p.gridDimY, p.gridDimZ, p.blockDimX, p.blockDimY, p.blockDimZ, p.sharedMemBytes}) {
    put(out, v);
  }
  put(out, static_cast<char>(p.kernelParams != nullptr ? 'p' : p.extra != nullptr ? 'e' : '-'));
  cudaLaunchAttributeValue value{};
  GR_CUDA_CHECK(cudaGraphKernelNodeGetAttribute(node, cudaLaunchAttributeCooperative, &value));
  put(out, value.cooperative);
  value = cudaLaunchAttributeValue{};
  GR_CUDA_CHECK(cudaGraphKernelNodeGetAttribute(node, cudaLaunchAttributeClusterDimension, &value));
  put(out, value.clusterDim.x);
  put(out, value.clusterDim.y);
  put(out, value.clusterDim.z);
}

void put_memcpy(std::string& out, cudaGraphNode_t node) {
  cudaMemcpy3DParms p{};
  GR_CUDA_CHECK(cudaGraphMemcpyNodeGetParams(node, &p));
  put(out, p.extent.width);
  put(out, p.extent.height);
  put(out, p.extent.depth);
  put(out, static_cast<int>(p.kind));
  for (const cudaPitchedPtr* ptr : {&p.srcPtr, &p.dstPtr}) {
    put(out, ptr->pitch);
    put(out, ptr->xsize);
    put(out, ptr->ysize);
    // An update cannot change an operand's memory type (device, host, ...).
    const std::string kind = address_kind(reinterpret_cast<uint64_t>(ptr->ptr));
    out += kind;
    out += '\0';
  }
  for (const cudaPos* pos : {&p.srcPos, &p.dstPos}) {
    put(out, pos->x);
    put(out, pos->y);
    put(out, pos->z);
  }
  put(out, static_cast<char>(p.srcArray != nullptr));
  put(out, static_cast<char>(p.dstArray != nullptr));
}

void structure_into(cudaGraph_t graph, std::string& out) {
  size_t count = 0;
  GR_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &count));
  std::vector<cudaGraphNode_t> nodes(count);
  GR_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &count));
  nodes.resize(count);
  put(out, static_cast<uint64_t>(count));
  std::unordered_map<cudaGraphNode_t, uint32_t> index;
  for (size_t i = 0; i < nodes.size(); ++i) {
    cudaGraphNode_t node = nodes[i];
    index[node] = static_cast<uint32_t>(i);
    cudaGraphNodeType type;
    GR_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
    put(out, static_cast<int>(type));
    if (type == cudaGraphNodeTypeKernel) {
      put_kernel(out, node);
    } else if (type == cudaGraphNodeTypeMemset) {
      cudaMemsetParams p{};
      GR_CUDA_CHECK(cudaGraphMemsetNodeGetParams(node, &p));
      put(out, p.elementSize);
      put(out, p.width);
      put(out, p.height);
      put(out, p.pitch);
    } else if (type == cudaGraphNodeTypeMemcpy) {
      put_memcpy(out, node);
    } else if (type == cudaGraphNodeTypeGraph) {
      cudaGraph_t child = nullptr;
      GR_CUDA_CHECK(cudaGraphChildGraphNodeGetGraph(node, &child));
      out += '{';
      structure_into(child, out);
      out += '}';
    }
  }
  size_t edges = 0;
#if CUDART_VERSION >= 13000
  GR_CUDA_CHECK(cudaGraphGetEdges(graph, nullptr, nullptr, nullptr, &edges));
#elif CUDART_VERSION >= 12030
  GR_CUDA_CHECK(cudaGraphGetEdges_v2(graph, nullptr, nullptr, nullptr, &edges));
#else
  GR_CUDA_CHECK(cudaGraphGetEdges(graph, nullptr, nullptr, &edges));
#endif
  std::vector<cudaGraphNode_t> from(edges), to(edges);
#if CUDART_VERSION >= 12030
  std::vector<cudaGraphEdgeData> data(edges);
#if CUDART_VERSION >= 13000
  GR_CUDA_CHECK(cudaGraphGetEdges(graph, from.data(), to.data(), data.data(), &edges));
#else
  GR_CUDA_CHECK(cudaGraphGetEdges_v2(graph, from.data(), to.data(), data.data(), &edges));
#endif
#else
  GR_CUDA_CHECK(cudaGraphGetEdges(graph, from.data(), to.data(), &edges));
#endif
  // (from, to, from port, to port, type)
  std::vector<std::tuple<uint32_t, uint32_t, int, int, int>> pairs;
  for (size_t e = 0; e < edges; ++e) {
    const auto f = index.find(from[e]);
    const auto t = index.find(to[e]);
    if (f == index.end() || t == index.end()) {
      throw StateError("cudaGraphGetEdges named a node cudaGraphGetNodes did not list");
    }
#if CUDART_VERSION >= 12030
    pairs.emplace_back(f->second, t->second, data[e].from_port, data[e].to_port, data[e].type);
#else
    pairs.emplace_back(f->second, t->second, 0, 0, 0);
#endif
  }
  std::sort(pairs.begin(), pairs.end());
  put(out, static_cast<uint64_t>(pairs.size()));
  for (const auto& [f, t, from_port, to_port, type] : pairs) {
    put(out, f);
    put(out, t);
    put(out, from_port);
    put(out, to_port);
    put(out, type);
  }
}

}  // namespace

std::string graph_structure(cudaGraph_t graph) {
  std::string out;
  structure_into(graph, out);
  return out;
}

std::vector<NodeWords> scan_nodes(cudaGraph_t graph) {
  std::vector<NodeWords> out;
  scan_into(graph, out);
  return out;
}

std::string address_kind(uint64_t address) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, reinterpret_cast<const void*>(address)) != cudaSuccess) {
    (void)cudaGetLastError();
    return "";
  }
  switch (attributes.type) {
    case cudaMemoryTypeDevice: return "device";
    case cudaMemoryTypeHost: return "host";
    case cudaMemoryTypeManaged: return "managed";
    default: return "";
  }
}

}  // namespace graphrunner
