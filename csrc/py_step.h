// The Python face of one serving step: inputs looked up by name, the step runner as Python holds it,
// and StepCall, the type whose instances Python calls once per step.
//
// GraphRunner (Python) subclasses StepCall, so `runner(**inputs)` enters C++ through the type's tp_call
// slot: no Python frame and no pybind11 dispatch on the hot path. Anything the fast path does not cover
// (hooks, cloned outputs, a runner not yet captured) goes to the Python method `_call_slow`.
#pragma once

#include <torch/extension.h>

#include <exception>
#include <memory>
#include <vector>

#include "inputs.h"
#include "step.h"

namespace graphrunner {

// pybind11 builds its module with hidden visibility; types holding Python objects must match it.
#define GR_PYTHON_FACING __attribute__((visibility("hidden")))

// The checker plus its input names as Python strings, so a step looks each input up by hash.
struct GR_PYTHON_FACING StepInputs {
  std::shared_ptr<InputChecker> checker;
  std::vector<pybind11::object> names;

  // The given inputs in spec order; raises TypeError naming a missing, extra or non-tensor input.
  std::vector<at::Tensor> tensors(PyObject* given) const;
};

struct GR_PYTHON_FACING PyStepRunner {
  StepInputs inputs;
  std::unique_ptr<StepRunner> runner;
};

// Creates graphrunner's Python exception types (CudaError, GraphStateError) in `module`.
void add_exception_types(pybind11::module_& module);

// Sets the Python error for one of the core's exceptions; false when `error` is not one of them.
bool set_python_error(const std::exception_ptr& error);

// The StepCall type, ready to add to the module.
pybind11::object step_call_type();

}  // namespace graphrunner
