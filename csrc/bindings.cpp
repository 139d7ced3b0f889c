// The Python face of the native core: conversions, docstrings and exception mapping only.
#include <torch/extension.h>
#include <torch/version.h>

#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <vector>

#include "errors.h"
#include "graph.h"
#include "inputs.h"
#include "launcher.h"
#include "node_scan.h"
#include "py_step.h"
#include "sizes.h"
#include "workspaces.h"

namespace py = pybind11;
using namespace graphrunner;

namespace {

cudaStreamCaptureMode capture_mode(const std::string& mode) {
  if (mode == "global") return cudaStreamCaptureModeGlobal;
  if (mode == "thread_local") return cudaStreamCaptureModeThreadLocal;
  if (mode == "relaxed") return cudaStreamCaptureModeRelaxed;
  throw InputValueError("capture_error_mode must be 'global', 'thread_local' or 'relaxed', got '" + mode + "'");
}

// (name, row shape, dtype, pad bytes, rows per request, pad each step, per token (ragged), split (ragged))
using SpecTuple =
    std::tuple<std::string, std::vector<int64_t>, at::ScalarType, py::bytes, int64_t, bool, bool, bool>;

PyInputChecker make_checker(const std::vector<SpecTuple>& specs, const SizeTable& sizes, bool fallback_eager,
                            int device, int64_t tokens_per_request) {
  PyInputChecker out;
  std::vector<InputSpec> parsed;
  for (const auto& [name, row_shape, dtype, pad, rows_per_request, pad_each_step, per_token, split] : specs) {
    std::string pattern = pad;
    if (pattern.empty()) {
      throw InputValueError("input '" + name + "': the pad pattern is empty");
    }
    if (rows_per_request < 1) {
      throw InputValueError("input '" + name + "': rows per request must be at least 1");
    }
    InputSpec spec{name, row_shape, dtype, {}, rows_per_request, pad_each_step, per_token, split};
    for (size_t j = 0; j < 16; ++j) {
      spec.pad_pattern[j] = static_cast<uint8_t>(pattern[j % pattern.size()]);
    }
    parsed.push_back(std::move(spec));
    out.names.push_back(py::str(name));
  }
  out.checker = std::make_shared<InputChecker>(std::move(parsed), sizes, fallback_eager,
                                               static_cast<c10::DeviceIndex>(device), tokens_per_request);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "graphrunner's native core: CUDA graph lifecycle, one-call step staging, capture audit";
  // The torch whose headers this module was compiled against: its C++ ABI is the only one it loads with.
  m.attr("TORCH_VERSION") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);

  add_exception_types(m);
  py::register_exception_translator([](std::exception_ptr p) {
    if (p && !set_python_error(p)) std::rethrow_exception(p);
  });

  py::class_<Graph, std::shared_ptr<Graph>>(m, "Graph", "One CUDA graph's life: capture, instantiate, replay, reset.")
      .def(py::init<bool>(), py::arg("keep_graph") = false)
      .def(
          "capture_begin",
          [](Graph& g, PoolId pool, const std::string& mode) { g.capture_begin(pool, capture_mode(mode)); },
          py::arg("pool") = PoolId{0, 0}, py::arg("capture_error_mode") = "global",
          "Starts capturing the current stream into `pool` ((0, 0): a new pool).")
      .def("capture_end", &Graph::capture_end, py::arg("instantiate") = true,
           "Ends the capture; with `instantiate`, instantiates and uploads the graph, else keeps the cudaGraph_t "
           "for instantiate() or share().")
      .def("instantiate", py::overload_cast<>(&Graph::instantiate),
           "After capture_end(instantiate=False): instantiates and uploads the graph's own executable.")
      .def("share", &Graph::share, py::arg("owner"),
           "After capture_end(instantiate=False): serves this graph through `owner`'s executable where "
           "cudaGraphExecUpdate accepts it (never with an argument node or RNG state); returns whether it shares. "
           "On False it has no executable yet: call instantiate().")
      .def(
          "structure", [](const Graph& g) { return py::bytes(g.structure()); },
          "The graph's structure as bytes: equal for graphs of the same nodes (type, kernel function, grid, block, "
          "shared memory; memset and memcpy shapes) and edges, whatever their addresses (needs the cudaGraph_t).")
      .def("abort_capture", &Graph::abort_capture, "Drops a capture that failed part-way; safe when not capturing.")
      .def("replay", &Graph::replay, "Launches the graph on the current stream of its device.")
      .def("reset", &Graph::reset, "Destroys the graph and gives back its hold on the pool.")
      .def("debug_dump", &Graph::debug_dump, py::arg("path"), "Writes the graph as DOT (needs keep_graph=True).")
      .def(
          "scan",
          [](const Graph& g) {
            py::list out;
            for (const auto& node : g.scan()) {
              py::list words;
              for (const auto& w : node.words) {
                words.append(py::make_tuple(w.offset, w.value, w.in_struct));
              }
              out.append(py::make_tuple(node.kind, node.name, words));
            }
            return out;
          },
          "Every kernel, memset and memcpy node as (kind, name, [(offset, word, in_struct), ...]) "
          "(needs keep_graph=True).")
      .def_property_readonly("captured", &Graph::captured)
      .def_property_readonly("executable", &Graph::executable,
                             "Whether the graph has an executable to launch, its own or a shared one.")
      .def_property_readonly("shares_exec", &Graph::shares_exec,
                             "Whether its executable serves other graphs too (Graph.share).")
      .def_property_readonly("capturing", &Graph::capturing)
      .def_property_readonly("pool", &Graph::pool)
      .def_property_readonly("device", [](const Graph& g) { return static_cast<int>(g.device()); })
      .def_property_readonly("num_nodes", &Graph::num_nodes)
      .def_property_readonly("exec_bytes", &Graph::exec_bytes,
                             "Device memory the driver took for the executable graph (instantiation and upload), "
                             "outside torch's allocator; coarse alone (the driver maps it in 2 MiB chunks), exact "
                             "summed over many graphs. 0 before capture and after reset().")
      .def_property_readonly("exec_handle", [](const Graph& g) { return reinterpret_cast<uintptr_t>(g.exec()); },
                             "The cudaGraphExec_t as an int (for benchmarks' own launch loops).")
      .def_property_readonly("footprint", &Graph::footprint, "What the capture allocated: [(address, bytes)].")
      .def_property_readonly("owned_memory", &Graph::owned_memory,
                             "Memory outside the pool the graph's machinery reads: [(address, bytes)].");

  py::class_<SizeTable>(m, "SizeTable", "Which captured size a step runs at.")
      .def(py::init<std::vector<int64_t>, int64_t>(), py::arg("capture_sizes"), py::arg("max_batch_size"),
           "A uniform table: sizes count requests.")
      .def(py::init<std::vector<int64_t>, int64_t, std::vector<int64_t>>(), py::arg("capture_sizes"),
           py::arg("max_tokens"), py::arg("requests_per_size"),
           "A ragged table: sizes count tokens, size i holds up to requests_per_size[i] requests.")
      .def("size_for", py::overload_cast<int64_t>(&SizeTable::size_for, py::const_), py::arg("batch"),
           "Uniform: the smallest captured size that holds `batch` requests; 0 when none does.")
      .def(
          "size_for_step", [](const SizeTable& t, int64_t requests, int64_t tokens) {
            return t.size_for(StepShape{requests, tokens});
          },
          py::arg("requests"), py::arg("tokens"), "The size a step runs at (either kind); 0 when none holds it.")
      .def("requests_of", &SizeTable::requests_of, py::arg("size"), "The requests a captured size holds.")
      .def("output_slot", &SizeTable::checked_output_slot, py::arg("size"), py::arg("requests"),
           "Where a step's outputs sit in the armed runner's list of output views.")
      .def_property_readonly("output_slots", &SizeTable::output_slots)
      .def_property_readonly("max_size", &SizeTable::max_size,
                             "The largest step the table covers: requests (uniform) or tokens (ragged).")
      .def_property_readonly("ragged", &SizeTable::ragged)
      .def_property_readonly("sizes", &SizeTable::sizes);

  py::class_<PyInputChecker>(m, "InputChecker", "Checks one step's inputs against the runner's specs.")
      .def(py::init(&make_checker), py::arg("specs"), py::arg("sizes"), py::arg("fallback_eager"), py::arg("device"),
           py::arg("tokens_per_request") = 1)
      .def(
          "check",
          [](const PyInputChecker& s, const py::dict& given) {
            InputSlots slots;
            const StepShape shape = s.checker->check(s.borrow(given.ptr(), slots));
            return std::make_pair(shape.requests, shape.tokens);
          },
          py::arg("inputs"), "(requests, tokens) of the dict `inputs`; raises naming the input and the fix.");

  py::class_<PyLauncher>(m, "Launcher", "Stages a step's inputs and launches the graph of its size.")
      .def(py::init([](const PyInputChecker& inputs, std::vector<at::Tensor> static_buffers, const SizeTable& sizes,
                       int max_lead) {
             return PyLauncher{inputs,
                               std::make_unique<Launcher>(inputs.checker, std::move(static_buffers), sizes, max_lead)};
           }),
           py::arg("inputs"), py::arg("static_buffers"), py::arg("sizes"), py::arg("max_lead") = 0)
      .def("stage", [](PyLauncher& s, int64_t size) { s.launcher->stage(size); }, py::arg("size"),
           "Inside the capture of `size`: records the staging kernel.")
      .def(
          "add_graph",
          [](PyLauncher& s, int64_t size, std::shared_ptr<Graph> graph) { s.launcher->add_graph(size, graph); },
          py::arg("size"), py::arg("graph"), "After that capture: `graph` serves the steps of `size`.")
      .def(
          "add_segment",
          [](PyLauncher& s, int64_t size, std::shared_ptr<Graph> graph) { s.launcher->add_segment(size, graph); },
          py::arg("size"), py::arg("graph"), "A piecewise size's next segment, launched after the break before it.")
      .def_property_readonly(
          "owned_memory", [](const PyLauncher& s) { return s.launcher->owned_memory(); },
          "[(address, bytes)] of host-mapped memory the staging kernels use (the step stamp, the split slots).");

  py::class_<WorkspaceHold, std::shared_ptr<WorkspaceHold>>(
      m, "WorkspaceHold", "Library workspaces taken over from torch's caches, kept alive as long as the hold.")
      .def(py::init<>())
      .def(
          "take", [](WorkspaceHold& h, uintptr_t stream) { return h.take(reinterpret_cast<cudaStream_t>(stream)); },
          py::arg("stream"), "Moves torch's cached cuBLAS/cuBLASLt workspaces of `stream` into the hold.")
      .def_property_readonly("held",
                             [](const WorkspaceHold& h) {
                               py::list out;
                               for (const auto& w : h.held()) out.append(py::make_tuple(w.library, w.address, w.bytes));
                               return out;
                             },
                             "[(library, address, bytes)]");

  m.add_object("StepCall", step_call_type());

  m.def(
      "private_stream", [](int device) { return reinterpret_cast<uintptr_t>(private_stream(device)); },
      py::arg("device"), "The raw stream graphrunner alone captures on for `device`, as an int.");
  m.def(
      "all_ones",
      [](const at::Tensor& split) {
        if (!split.device().is_cpu() || !split.is_contiguous() ||
            (split.scalar_type() != c10::kInt && split.scalar_type() != c10::kLong)) {
          return false;
        }
        const int64_t n = split.numel();
        if (split.scalar_type() == c10::kInt) {
          const int32_t* v = split.const_data_ptr<int32_t>();
          return std::all_of(v, v + n, [](int32_t x) { return x == 1; });
        }
        const int64_t* v = split.const_data_ptr<int64_t>();
        return std::all_of(v, v + n, [](int64_t x) { return x == 1; });
      },
      py::arg("split"),
      "Whether a ragged step's split (a contiguous CPU int32/int64 tensor) gives every request one token.");
  m.def("address_kind", &address_kind, py::arg("address"),
        "What CUDA says an address is: 'device', 'host', 'managed' or ''.");
}
