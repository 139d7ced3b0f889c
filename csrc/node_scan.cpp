#include "node_scan.h"

#include <cstring>

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

}  // namespace

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
