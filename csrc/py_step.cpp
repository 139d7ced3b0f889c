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
  PyObject* launcher;       // the Python Launcher while armed, else NULL
  PyObject* outputs;        // list: item SizeTable::output_slot(size, requests) is what such a step returns
  PyObject* before_replay;  // hook(requests, tokens, size, inputs) called before each step, or NULL
  PyObject* finish;         // finish(outputs) makes the returned value (cloned outputs), or NULL
  PyObject* eager;          // eager(**inputs): a step no captured graph holds
  PyObject* unarmed;        // unarmed(**inputs): every call while not armed, or NULL before the first _disarm
  PyObject* pieces;         // list: item s is a piecewise size's breaks [(op, args, kwargs)], else None; or NULL
  PyObject* step_info;      // step_info(requests, tokens, size, inputs) -> the StepInfo breaks get, or NULL
  PyLauncher* native;       // launcher's C++ side; NULL = not armed
};

StepCallObject* as_step_call(PyObject* self) { return reinterpret_cast<StepCallObject*>(self); }

// Note [breaks]: a piecewise size runs its first graph (staging included), then for each break the op,
// eagerly, with the arguments recorded at capture (tensors at the addresses the graphs use) and the step's
// StepInfo as `step`, then the next graph. The op writes its result into the boundary buffer the next graph
// reads (capture refused an op that returned fresh memory). An op that raises ends the step there: later
// segments do not run, and the next step stages everything anew.
bool run_breaks(StepCallObject* self, PyObject* breaks, StepShape shape, int64_t size, PyObject* kwargs,
                Launcher& launcher) {
  static PyObject* step_key = PyUnicode_InternFromString("step");
  // The ops are Python: one could close the runner, which drops the launcher and the list of breaks.
  py::object held = py::reinterpret_borrow<py::object>(self->launcher);
  py::object held_breaks = py::reinterpret_borrow<py::object>(breaks);
  py::object info = py::reinterpret_steal<py::object>(
      PyObject_CallFunction(self->step_info, "LLLO", static_cast<long long>(shape.requests),
                            static_cast<long long>(shape.tokens), static_cast<long long>(size), kwargs));
  if (!info) {
    return false;
  }
  const Py_ssize_t count = PyList_GET_SIZE(breaks);
  for (Py_ssize_t k = 0; k < count; ++k) {
    PyObject* entry = PyList_GET_ITEM(breaks, k);  // (op, args, kwargs)
    PyObject* op_kwargs = PyTuple_GET_ITEM(entry, 2);
    if (PyDict_SetItem(op_kwargs, step_key, info.ptr()) < 0) {
      return false;
    }
    PyObject* done = PyObject_Call(PyTuple_GET_ITEM(entry, 0), PyTuple_GET_ITEM(entry, 1), op_kwargs);
    // The StepInfo holds the step's inputs: the recorded kwargs must not keep them past the call.
    if (PyDict_DelItem(op_kwargs, step_key) < 0) {
      Py_XDECREF(done);
      return false;
    }
    if (done == nullptr) {
      return false;
    }
    Py_DECREF(done);
    if (self->launcher != held.ptr()) {
      throw StateError("a break op closed this GraphRunner during the step; close it after the step");
    }
    launcher.launch_segment(size, static_cast<size_t>(k) + 1);
  }
  return true;
}

// The step itself. The inputs are checked before anything else runs, so a bad call leaves nothing
// half-done; the hook runs after the checks and before the staging argument is set, so a hook that raises
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
  if (self->native == nullptr) {
    if (self->unarmed == nullptr) {
      PyErr_SetString(state_error_type, "this runner was never set up: GraphRunner.__init__ did not run");
      return nullptr;
    }
    return PyObject_Call(self->unarmed, args, kwargs);
  }
  try {
    InputSlots slots;
    const BorrowedInputs inputs = self->native->inputs.borrow(kwargs, slots);
    Launcher& launcher = *self->native->launcher;
    const StepShape shape = launcher.checker().check(inputs);
    const int64_t size = launcher.sizes().size_for(shape);
    if (self->before_replay != nullptr) {
      // The hook is Python code: it could close the runner, so hold the launcher across it.
      py::object held = py::reinterpret_borrow<py::object>(self->launcher);
      PyObject* done = PyObject_CallFunction(self->before_replay, "LLLO", static_cast<long long>(shape.requests),
                                             static_cast<long long>(shape.tokens), static_cast<long long>(size),
                                             kwargs);
      if (done == nullptr) {
        return nullptr;
      }
      Py_DECREF(done);
      if (self->launcher != held.ptr()) {
        throw StateError("before_replay closed this GraphRunner during the step; close it after the step");
      }
    }
    if (size == 0) {
      return PyObject_Call(self->eager, args, kwargs);
    }
    // The host is max_lead steps ahead: wait without holding other threads up, and look again once the GIL is
    // back, since another thread may have launched meanwhile.
    while (launcher.must_wait()) {
      py::object held = py::reinterpret_borrow<py::object>(self->launcher);
      {
        py::gil_scoped_release released;
        launcher.wait_for_lead();
      }
      if (self->launcher != held.ptr()) {
        throw StateError("another thread closed this GraphRunner during the step; close it after the step");
      }
    }
    launcher.launch(size, shape, inputs);
    if (self->pieces != nullptr) {
      PyObject* breaks = PyList_GET_ITEM(self->pieces, size);
      if (breaks != Py_None && !run_breaks(self, breaks, shape, size, kwargs, launcher)) {
        return nullptr;
      }
    }
    PyObject* out = PyList_GET_ITEM(self->outputs, launcher.sizes().output_slot(size, shape.requests));
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

void clear_armed(StepCallObject* self) {
  self->native = nullptr;
  Py_CLEAR(self->launcher);
  Py_CLEAR(self->outputs);
  Py_CLEAR(self->before_replay);
  Py_CLEAR(self->finish);
  Py_CLEAR(self->eager);
  Py_CLEAR(self->pieces);
  Py_CLEAR(self->step_info);
}

int step_call_clear(PyObject* self_obj) {
  StepCallObject* self = as_step_call(self_obj);
  clear_armed(self);
  Py_CLEAR(self->unarmed);
  return 0;
}

int step_call_traverse(PyObject* self_obj, visitproc visit, void* arg) {
  StepCallObject* self = as_step_call(self_obj);
  Py_VISIT(self->launcher);
  Py_VISIT(self->outputs);
  Py_VISIT(self->before_replay);
  Py_VISIT(self->finish);
  Py_VISIT(self->eager);
  Py_VISIT(self->unarmed);
  Py_VISIT(self->pieces);
  Py_VISIT(self->step_info);
  return 0;
}

void step_call_dealloc(PyObject* self) {
  PyObject_GC_UnTrack(self);
  step_call_clear(self);
  Py_TYPE(self)->tp_free(self);
}

// A new reference to `obj`, or NULL for None when `optional`; raises TypeError naming `what` otherwise.
PyObject* callable_ref(PyObject* obj, const char* what, bool optional) {
  if (optional && obj == Py_None) {
    return nullptr;
  }
  if (!PyCallable_Check(obj)) {
    throw InputTypeError(std::string(what) + " must be callable" + (optional ? " or None" : ""));
  }
  Py_INCREF(obj);
  return obj;
}

// _arm(launcher, outputs, before_replay, finish, eager[, pieces, step_info]): every later call runs in C++
// against `launcher`.
PyObject* step_call_arm(PyObject* self_obj, PyObject* args) {
  PyObject* launcher = nullptr;
  PyObject* outputs = nullptr;
  PyObject* before_replay = nullptr;
  PyObject* finish = nullptr;
  PyObject* eager = nullptr;
  PyObject* pieces = Py_None;
  PyObject* step_info = Py_None;
  if (!PyArg_ParseTuple(args, "OO!OOO|OO", &launcher, &PyList_Type, &outputs, &before_replay, &finish, &eager,
                        &pieces, &step_info)) {
    return nullptr;
  }
  try {
    PyLauncher* native = py::cast<PyLauncher*>(py::handle(launcher));
    if (PyList_GET_SIZE(outputs) != native->launcher->sizes().output_slots()) {
      throw InputValueError("_arm() needs one output entry per slot of the size table (SizeTable.output_slots)");
    }
    if (pieces != Py_None) {
      if (!PyList_Check(pieces) || PyList_GET_SIZE(pieces) != native->launcher->sizes().max_size() + 1) {
        throw InputValueError("_arm() needs pieces as a list with one entry per size 0..the largest");
      }
      for (Py_ssize_t s = 0; s < PyList_GET_SIZE(pieces); ++s) {
        PyObject* breaks = PyList_GET_ITEM(pieces, s);
        if (breaks == Py_None) {
          continue;
        }
        if (!PyList_Check(breaks) || static_cast<size_t>(PyList_GET_SIZE(breaks)) != native->launcher->segments(s)) {
          throw InputValueError("_arm(): size " + std::to_string(s) + " needs one break per segment after its first");
        }
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(breaks); ++k) {
          PyObject* e = PyList_GET_ITEM(breaks, k);
          if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 3 || !PyCallable_Check(PyTuple_GET_ITEM(e, 0)) ||
              !PyTuple_Check(PyTuple_GET_ITEM(e, 1)) || !PyDict_Check(PyTuple_GET_ITEM(e, 2))) {
            throw InputTypeError("_arm(): each break is a tuple (op, args tuple, kwargs dict)");
          }
        }
      }
    }
    // Take every reference first, so a bad argument leaves the object as it was.
    py::object hook = py::reinterpret_steal<py::object>(callable_ref(before_replay, "before_replay", true));
    py::object finisher = py::reinterpret_steal<py::object>(callable_ref(finish, "finish", true));
    py::object eager_ref = py::reinterpret_steal<py::object>(callable_ref(eager, "eager", false));
    py::object info_ref = py::reinterpret_steal<py::object>(callable_ref(step_info, "step_info", true));
    if (pieces != Py_None && !info_ref) {
      throw InputTypeError("_arm(): a piecewise runner needs step_info");
    }
    StepCallObject* self = as_step_call(self_obj);
    clear_armed(self);
    if (pieces != Py_None) {
      Py_INCREF(pieces);
      self->pieces = pieces;
      self->step_info = info_ref.release().ptr();
    }
    Py_INCREF(launcher);
    Py_INCREF(outputs);
    self->launcher = launcher;
    self->outputs = outputs;
    self->before_replay = hook ? hook.release().ptr() : nullptr;
    self->finish = finisher ? finisher.release().ptr() : nullptr;
    self->eager = eager_ref.release().ptr();
    self->native = native;
  } catch (...) {
    set_any_python_error();
    return nullptr;
  }
  Py_RETURN_NONE;
}

// _disarm(unarmed): every later call goes to unarmed(**inputs).
PyObject* step_call_disarm(PyObject* self_obj, PyObject* unarmed) {
  try {
    PyObject* ref = callable_ref(unarmed, "unarmed", false);
    StepCallObject* self = as_step_call(self_obj);
    clear_armed(self);
    Py_XSETREF(self->unarmed, ref);
  } catch (...) {
    set_any_python_error();
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef step_call_methods[] = {
    {"_arm", step_call_arm, METH_VARARGS,
     "_arm(launcher, outputs, before_replay or None, finish or None, eager[, pieces, step_info]): run every call "
     "natively."},
    {"_disarm", step_call_disarm, METH_O, "_disarm(unarmed): send every call to unarmed(**inputs)."},
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

BorrowedInputs PyInputChecker::borrow(PyObject* given, InputSlots& slots) const {
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
  return BorrowedInputs(slots.data(), count);
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
