#include "py_step.h"

#include <string>

#include "errors.h"

namespace py = pybind11;

namespace graphrunner {
namespace {

PyObject* cuda_error_type = nullptr;
PyObject* state_error_type = nullptr;

[[noreturn]] void throw_name_error(const InputChecker& checker, PyObject* given) {
  std::vector<std::string> keys;
  if (given != nullptr) {
    for (auto item : py::reinterpret_borrow<py::dict>(given)) {
      keys.push_back(py::str(item.first));
    }
  }
  checker.throw_name_error(keys);
}

// Sets the Python error for any C++ exception escaping the fast path, as pybind11 would have.
void set_any_python_error() {
  auto error = std::current_exception();
  if (set_python_error(error)) {
    return;
  }
  try {
    std::rethrow_exception(error);
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "unknown C++ exception in a graphrunner step");
  }
}

struct StepCallObject {
  PyObject_HEAD
  PyObject* step;           // the Python StepRunner while armed, else NULL
  PyObject* outputs;        // list: item b is what a step of batch b returns
  PyObject* before_replay;  // hook(batch, size) called before each step, or NULL
  PyObject* finish;         // finish(outputs) makes the returned value (cloned outputs), or NULL
  PyStepRunner* runner;     // step's C++ side
};

StepCallObject* as_step_call(PyObject* self) { return reinterpret_cast<StepCallObject*>(self); }

PyObject* call_method(PyObject* self, const char* name, PyObject* args, PyObject* kwargs) {
  PyObject* method = PyObject_GetAttrString(self, name);
  if (method == nullptr) {
    return nullptr;
  }
  PyObject* result = PyObject_Call(method, args, kwargs);
  Py_DECREF(method);
  return result;
}

// The step itself. The inputs are checked before anything else runs, so a bad call leaves nothing
// half-done; the hook runs after the checks and before the descriptor is written, so a hook that raises
// leaves the runner as it was.
PyObject* step_call(PyObject* self_obj, PyObject* args, PyObject* kwargs) {
  if (PyTuple_GET_SIZE(args) != 0) {
    PyErr_Format(PyExc_TypeError,
                 "a GraphRunner takes its inputs by name, e.g. runner(input_ids=ids), got %zd positional "
                 "argument(s)",
                 PyTuple_GET_SIZE(args));
    return nullptr;
  }
  StepCallObject* self = as_step_call(self_obj);
  if (self->runner == nullptr) {
    return call_method(self_obj, "_call_unarmed", args, kwargs);
  }
  try {
    BorrowedTensors slots;
    const StepTensors inputs = self->runner->inputs.borrow(kwargs, slots);
    StepRunner& runner = *self->runner->runner;
    const int64_t batch = runner.checker().check(inputs);
    const int64_t size = runner.size_for(batch);
    if (self->before_replay != nullptr) {
      // The hook is Python code: it could close the runner, so hold the step runner across it.
      py::object step = py::reinterpret_borrow<py::object>(self->step);
      PyObject* done = PyObject_CallFunction(self->before_replay, "LL", static_cast<long long>(batch),
                                             static_cast<long long>(size));
      if (done == nullptr) {
        return nullptr;
      }
      Py_DECREF(done);
      if (self->step != step.ptr()) {
        throw StateError("before_replay closed this GraphRunner during the step; close it after the step");
      }
    }
    if (size == 0) {
      py::tuple eager_args = py::make_tuple(py::reinterpret_borrow<py::dict>(kwargs));
      return call_method(self_obj, "_run_eager", eager_args.ptr(), nullptr);
    }
    runner.launch(batch, inputs);
    PyObject* out = PyList_GET_ITEM(self->outputs, batch);
    if (self->finish != nullptr) {
      return PyObject_CallOneArg(self->finish, out);
    }
    Py_INCREF(out);
    return out;
  } catch (...) {
    set_any_python_error();
    return nullptr;
  }
}

int step_call_clear(PyObject* self_obj) {
  StepCallObject* self = as_step_call(self_obj);
  self->runner = nullptr;
  Py_CLEAR(self->step);
  Py_CLEAR(self->outputs);
  Py_CLEAR(self->before_replay);
  Py_CLEAR(self->finish);
  return 0;
}

int step_call_traverse(PyObject* self_obj, visitproc visit, void* arg) {
  StepCallObject* self = as_step_call(self_obj);
  Py_VISIT(self->step);
  Py_VISIT(self->outputs);
  Py_VISIT(self->before_replay);
  Py_VISIT(self->finish);
  return 0;
}

void step_call_dealloc(PyObject* self) {
  PyObject_GC_UnTrack(self);
  step_call_clear(self);
  Py_TYPE(self)->tp_free(self);
}

PyObject* callable_or_null(PyObject* obj, const char* what) {
  if (obj == Py_None) {
    return nullptr;
  }
  if (!PyCallable_Check(obj)) {
    throw InputTypeError(std::string("_arm(): ") + what + " must be callable or None");
  }
  Py_INCREF(obj);
  return obj;
}

// _arm(step, outputs, before_replay, finish): every later call runs in C++ against `step`.
PyObject* step_call_arm(PyObject* self_obj, PyObject* args) {
  PyObject* step = nullptr;
  PyObject* outputs = nullptr;
  PyObject* before_replay = nullptr;
  PyObject* finish = nullptr;
  if (!PyArg_ParseTuple(args, "OO!OO", &step, &PyList_Type, &outputs, &before_replay, &finish)) {
    return nullptr;
  }
  try {
    PyStepRunner* runner = py::cast<PyStepRunner*>(py::handle(step));
    if (PyList_GET_SIZE(outputs) != runner->runner->checker().max_batch_size() + 1) {
      throw InputValueError("_arm() needs one output entry per batch 0..max_batch_size");
    }
    PyObject* hook = callable_or_null(before_replay, "before_replay");
    PyObject* finisher = nullptr;
    try {
      finisher = callable_or_null(finish, "finish");
    } catch (...) {
      Py_XDECREF(hook);
      throw;
    }
    step_call_clear(self_obj);
    StepCallObject* self = as_step_call(self_obj);
    Py_INCREF(step);
    Py_INCREF(outputs);
    self->step = step;
    self->outputs = outputs;
    self->before_replay = hook;
    self->finish = finisher;
    self->runner = runner;
  } catch (...) {
    set_any_python_error();
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* step_call_disarm(PyObject* self_obj, PyObject*) {
  step_call_clear(self_obj);
  Py_RETURN_NONE;
}

PyMethodDef step_call_methods[] = {
    {"_arm", step_call_arm, METH_VARARGS,
     "Run calls natively: _arm(step_runner, outputs, before_replay or None, finish or None)."},
    {"_disarm", step_call_disarm, METH_NOARGS, "Send every call to _call_unarmed()."},
    {nullptr, nullptr, 0, nullptr},
};

PyTypeObject make_step_call_type() {
  PyTypeObject type = {PyVarObject_HEAD_INIT(nullptr, 0)};
  type.tp_name = "graphrunner._C.StepCall";
  type.tp_doc = "Base of GraphRunner: calling an instance runs one step in native code.";
  type.tp_basicsize = sizeof(StepCallObject);
  type.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC;
  type.tp_new = PyType_GenericNew;
  type.tp_dealloc = step_call_dealloc;
  type.tp_traverse = step_call_traverse;
  type.tp_clear = step_call_clear;
  type.tp_call = step_call;
  type.tp_methods = step_call_methods;
  return type;
}

PyTypeObject step_call_type_object = make_step_call_type();

}  // namespace

StepTensors StepInputs::borrow(PyObject* given, BorrowedTensors& slots) const {
  const size_t count = checker->specs().size();
  if (given == nullptr || static_cast<size_t>(PyDict_GET_SIZE(given)) != count) {
    throw_name_error(*checker, given);
  }
  for (size_t i = 0; i < count; ++i) {
    PyObject* obj = PyDict_GetItem(given, names[i].ptr());
    if (obj == nullptr) {
      throw_name_error(*checker, given);
    }
    if (!THPVariable_Check(obj)) {
      throw InputTypeError("input '" + checker->specs()[i].name + "' is a " + Py_TYPE(obj)->tp_name +
                           ", expected a torch.Tensor");
    }
    slots[i] = &THPVariable_Unpack(obj);
  }
  return StepTensors(slots.data(), count);
}

void add_exception_types(py::module_& module) {
  cuda_error_type = PyErr_NewExceptionWithDoc("graphrunner._C.CudaError", "A CUDA runtime call failed.",
                                              PyExc_RuntimeError, nullptr);
  state_error_type = PyErr_NewExceptionWithDoc(
      "graphrunner._C.GraphStateError", "A graph or runner was used out of order.", PyExc_RuntimeError, nullptr);
  if (cuda_error_type == nullptr || state_error_type == nullptr) {
    throw py::error_already_set();
  }
  module.add_object("CudaError", py::reinterpret_borrow<py::object>(cuda_error_type));
  module.add_object("GraphStateError", py::reinterpret_borrow<py::object>(state_error_type));
}

bool set_python_error(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const CudaError& e) {
    PyErr_SetString(cuda_error_type, e.what());
  } catch (const StateError& e) {
    PyErr_SetString(state_error_type, e.what());
  } catch (const InputTypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what());
  } catch (const InputValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (...) {
    return false;
  }
  return true;
}

py::object step_call_type() {
  if (PyType_Ready(&step_call_type_object) < 0) {
    throw py::error_already_set();
  }
  return py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(&step_call_type_object));
}

}  // namespace graphrunner
