// The Python face of one serving step: inputs looked up by name, the launcher as Python holds it,
// and StepCall, the type whose instances Python calls once per step.
//
// GraphRunner (Python) subclasses StepCall, so `runner(**inputs)` enters C++ through the type's tp_call
// slot: no Python frame and no pybind11 dispatch on the hot path. Python runs only where the user asked
// for it (the before_replay hook, cloned outputs) or through the two callables the runner hands over:
// `eager(**inputs)` where no graph fits, and `unarmed(**inputs)` for every call while the runner is not
// armed (not captured yet, or closed).
#pragma once

#include <torch/extension.h>

#include <array>
#include <exception>
#include <memory>
#include <vector>

#include "inputs.h"
#include "launcher.h"

namespace graphrunner {

// pybind11 builds its module with hidden visibility; types holding Python objects must match it.
#define GR_PYTHON_FACING __attribute__((visibility("hidden")))

// Storage for one step's borrowed inputs.
using InputSlots = std::array<const at::Tensor*, kMaxInputs>;

// The checker plus its input names as Python strings, so a step looks each input up by hash.
struct GR_PYTHON_FACING PyInputChecker {
  std::shared_ptr<InputChecker> checker;
  std::vector<pybind11::object> names;

  // The tensors of the dict `given` in spec order, in `slots`; valid while `given` holds them. Raises
  // TypeError naming a missing, extra or non-tensor input.
  BorrowedInputs borrow(PyObject* given, InputSlots& slots) const;
};

struct GR_PYTHON_FACING PyLauncher {
  PyInputChecker inputs;
  std::unique_ptr<Launcher> launcher;
};

// Creates graphrunner's Python exception types (CudaError, GraphStateError) in `module`.
void add_exception_types(pybind11::module_& module);

// Sets the Python error for one of the core's exceptions; false when `error` is not one of them.
bool set_python_error(const std::exception_ptr& error);

// The StepCall type, ready to add to the module.
pybind11::object step_call_type();

}  // namespace graphrunner
