// The Python face of the native core: conversions and exception mapping only.
#include <torch/extension.h>

#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "errors.h"
#include "graph.h"
#include "inputs.h"
#include "launch_floor.h"
#include "py_step.h"

namespace py = pybind11;
using namespace graphrunner;

namespace {

cudaStreamCaptureMode capture_mode(const std::string& mode) {
  if (mode == "global") return cudaStreamCaptureModeGlobal;
  if (mode == "thread_local") return cudaStreamCaptureModeThreadLocal;
  if (mode == "relaxed") return cudaStreamCaptureModeRelaxed;
  throw InputValueError("capture_error_mode must be 'global', 'thread_local' or 'relaxed', got '" + mode + "'");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "graphrunner native core: CUDA graph lifecycle and one-call step staging";

  add_exception_types(m);
  py::register_exception_translator([](std::exception_ptr p) {
    if (p && !set_python_error(p)) std::rethrow_exception(p);
  });

  py::class_<Graph, std::shared_ptr<Graph>>(m, "Graph")
      .def(py::init<bool>(), py::arg("keep_graph") = false)
      .def("capture_begin",
           [](Graph& g, PoolId pool, const std::string& mode) { g.capture_begin(pool, capture_mode(mode)); },
           py::arg("pool") = PoolId{0, 0}, py::arg("capture_error_mode") = "global")
      .def("capture_end", &Graph::capture_end)
      .def("abort_capture", &Graph::abort_capture)
      .def("replay", &Graph::replay)
      .def("reset", &Graph::reset)
      .def("debug_dump", &Graph::debug_dump, py::arg("path"))
      .def_property_readonly("captured", &Graph::captured)
      .def_property_readonly("capturing", &Graph::capturing)
      .def_property_readonly("pool", &Graph::pool)
      .def_property_readonly("device", [](const Graph& g) { return static_cast<int>(g.device()); })
      .def_property_readonly("num_nodes", &Graph::num_nodes)
      .def_property_readonly("uses_rng", &Graph::uses_rng)
      .def_property_readonly("footprint", &Graph::footprint);

  py::class_<StepInputs>(m, "StepInputs")
      .def(py::init([](const std::vector<std::tuple<std::string, std::vector<int64_t>, at::ScalarType, py::bytes>>&
                           specs,
                       int64_t max_batch_size, bool fallback_eager, int device) {
             StepInputs out;
             std::vector<InputSpec> parsed;
             for (const auto& [name, row_shape, dtype, pad] : specs) {
               std::string pattern = pad;
               InputSpec spec{name, row_shape, dtype, {}};
               for (size_t j = 0; j < 16; ++j) {
                 spec.pad_pattern[j] = static_cast<uint8_t>(pattern[j % pattern.size()]);
               }
               parsed.push_back(std::move(spec));
               out.names.push_back(py::str(name));
             }
             out.checker = std::make_shared<InputChecker>(std::move(parsed), max_batch_size, fallback_eager,
                                                          static_cast<c10::DeviceIndex>(device));
             return out;
           }),
           py::arg("specs"), py::arg("max_batch_size"), py::arg("fallback_eager"), py::arg("device"))
      .def("check", [](const StepInputs& s, const py::dict& given) {
        BorrowedTensors slots;
        return s.checker->check(s.borrow(given.ptr(), slots));
      });

  py::class_<PyStepRunner>(m, "StepRunner")
      .def(py::init([](const StepInputs& inputs, std::vector<at::Tensor> static_buffers,
                       std::vector<int64_t> capture_sizes) {
             auto runner = std::make_unique<StepRunner>(inputs.checker, std::move(static_buffers),
                                                        std::move(capture_sizes));
             return PyStepRunner{inputs, std::move(runner)};
           }),
           py::arg("inputs"), py::arg("static_buffers"), py::arg("capture_sizes"))
      .def("stage", [](PyStepRunner& s, int64_t size) { s.runner->stage(size); })
      .def("add_graph",
           [](PyStepRunner& s, int64_t size, std::shared_ptr<Graph> graph) { s.runner->add_graph(size, graph); })
      .def("size_for", [](const PyStepRunner& s, int64_t batch) { return s.runner->size_for(batch); });

  m.add_object("StepCall", step_call_type());

  m.def("launch_floor_us", &launch_floor_us, py::arg("graph"), py::arg("steps"));
  m.def(
      "step_loop_us",
      [](PyStepRunner& s, const py::dict& given, int steps) {
        BorrowedTensors slots;
        return step_loop_us(*s.runner, s.inputs.borrow(given.ptr(), slots), steps);
      },
      py::arg("step"), py::arg("inputs"), py::arg("steps"));
}
