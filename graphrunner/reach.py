"""What a step function keeps alive: the tensors reachable from it.

A runner holds its step function for as long as it lives, and the function holds what it refers to: a
closure's cells, its default arguments, the object a bound method belongs to, a functools.partial's function
and arguments, the globals its code names. Whatever tensor is reachable from there (a module's parameters and
buffers, a KV cache object's tensors) lives at least as long as the runner, unless code rebinds the name or the
attribute that holds it. The audit counts such memory as kept alive (RunnerSpec.declared), and guard watches
the non-parameter tensors among it as the runner's state (RunnerSpec.state_buffers).

What the walk does not follow, so memory reached only that way is still borrowed: weak references, whole Python
modules (`torch`, a library's module-level caches), classes, and the insides of torch's own objects other than
modules and tensors (torch.compile's wrapper is followed to the function it compiles, not into the compiler).
"""
from __future__ import annotations

import collections
import functools
import types
import weakref
from typing import Any, Dict, List, Set, Tuple

import torch

# Hops through plain objects and containers below fn (a module's submodules, parameters and buffers cost none):
# enough for a closure -> cache object -> list of layers -> layer -> tensor, and a few levels more.
MAX_DEPTH = 8
# Objects visited at most: a bound on the walk's time (a 32-layer model visits a few thousand).
MAX_OBJECTS = 200_000

_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), type(Ellipsis), range, slice,
          torch.dtype, torch.device, torch.Size, torch.layout, torch.memory_format)
_SKIP = (types.ModuleType, type, types.CodeType, types.FrameType, types.GeneratorType, types.CoroutineType,
         types.BuiltinFunctionType, types.MethodWrapperType, types.WrapperDescriptorType, types.GetSetDescriptorType,
         types.MemberDescriptorType, property, staticmethod, classmethod, weakref.ReferenceType, weakref.ProxyType,
         weakref.CallableProxyType)
# A module's own bookkeeping, walked through its registered parameters, buffers and submodules instead.
_MODULE_SLOTS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"})
_SEQUENCES = (list, tuple, set, frozenset, collections.deque)


def held_by(fn: Any, max_depth: int = MAX_DEPTH) -> List[Tuple[str, torch.Tensor]]:
    """Every tensor `fn` keeps alive, each with the path it was first reached by.

    Walks, from fn: an nn.Module's parameters, buffers and submodules (and attributes it holds without
    registering them, such as a tensor or a cache object); a bound method's `__self__` and function; a
    functools.partial's function, arguments and keywords; a function's `__wrapped__`, closure cells, default
    arguments, and the globals its code (and the code nested in it: lambdas, comprehensions) names; the items of
    lists, tuples, sets and dicts; and the attributes (`__dict__`, `__slots__`) of other objects. It follows no
    weak reference, Python module or class, and no object of torch's own but modules and tensors. Each object is
    visited once; plain objects and containers are walked `max_depth` hops deep at most.

    Args:
        fn: the step function: a function, a lambda, a bound method, a functools.partial, an nn.Module or any
            callable object.
        max_depth: the most hops through plain objects and containers (a module's submodules, parameters and
            buffers cost none).

    Returns:
        [(path, tensor)] in the order found (breadth first: a shortest path names each), one entry per tensor
        object, e.g.
        ("fn.__closure__[0] (model).model.embed_tokens.weight", tensor).
    """
    found: List[Tuple[str, torch.Tensor]] = []
    seen: Set[int] = set()
    queue = collections.deque([("fn", fn, 0)])
    visited = 0
    while queue and visited < MAX_OBJECTS:
        path, obj, depth = queue.popleft()
        if isinstance(obj, _ATOMS) or id(obj) in seen:
            continue
        seen.add(id(obj))
        visited += 1
        if isinstance(obj, torch.Tensor):
            found.append((path, obj))
            continue
        if depth >= max_depth and not isinstance(obj, torch.nn.Module):
            continue
        children = _children(obj, path, depth, root=depth == 0)
        if children:
            queue.extend(children)  # breadth first: each tensor is named by a shortest path to it
    return found


def _children(obj: Any, path: str, depth: int, root: bool) -> "List[Tuple[str, Any, int]] | None":
    """What `obj` refers to that the walk follows, as (path, object, depth) triples; None for nothing."""
    deeper = depth + 1
    if isinstance(obj, torch.nn.Module):
        out = [(f"{path}.{name}", t, depth) for name, t in obj._parameters.items() if t is not None]
        out += [(f"{path}.{name}", t, depth) for name, t in obj._buffers.items() if t is not None]
        out += [(f"{path}.{name}", m, depth) for name, m in obj._modules.items() if m is not None]
        out += [(f"{path}.{name}", v, deeper) for name, v in vars(obj).items() if name not in _MODULE_SLOTS]
        if root:  # the module's own forward: the globals it names
            out += _function_children(getattr(type(obj), "forward", None), f"type({path}).forward", deeper)
        return out
    if isinstance(obj, _SKIP) or isinstance(obj, (torch.Generator, torch.cuda.Stream, torch.cuda.Event)):
        return None
    if isinstance(obj, types.FunctionType):
        return _function_children(obj, path, deeper)
    if isinstance(obj, types.MethodType):
        return [(f"{path}.__self__", obj.__self__, deeper), (f"{path}.__func__", obj.__func__, deeper)]
    if isinstance(obj, functools.partial):
        return ([(f"{path}.func", obj.func, deeper)] + [(f"{path}.args[{i}]", a, deeper) for i, a in enumerate(obj.args)]
                + [(f"{path}.keywords[{k!r}]", v, deeper) for k, v in obj.keywords.items()])
    if isinstance(obj, dict):
        return [(f"{path}[{k!r}]", v, deeper) for k, v in obj.items()]
    if isinstance(obj, _SEQUENCES):
        return [(f"{path}[{i}]", v, deeper) for i, v in enumerate(obj)]
    if _is_torch_internal(type(obj)):  # the compiler's and autograd's objects: not the caller's memory
        return None
    out = [(f"{path}.{name}", v, deeper) for name, v in _attributes(obj).items()]
    if root:  # a callable object: the globals its __call__ names
        out += _function_children(getattr(type(obj), "__call__", None), f"type({path}).__call__", deeper)
    return out


def _function_children(fn: Any, path: str, depth: int) -> List[Tuple[str, Any, int]]:
    """A Python function's references: __wrapped__, closure cells, defaults, the globals its code names, and
    attributes set on it. torch's own functions (torch.compile's wrapper) are followed through their closure
    and __wrapped__ only, not into torch's globals."""
    if not isinstance(fn, types.FunctionType):
        return []
    out: List[Tuple[str, Any, int]] = []
    attrs = dict(getattr(fn, "__dict__", {}))
    if "__wrapped__" in attrs:
        out.append((f"{path}.__wrapped__", attrs.pop("__wrapped__"), depth))
    for i, (name, cell) in enumerate(zip(fn.__code__.co_freevars, fn.__closure__ or ())):
        try:
            out.append((f"{path}.__closure__[{i}] ({name})", cell.cell_contents, depth))
        except ValueError:  # an empty cell: a name not bound yet
            pass
    out += [(f"{path}.__defaults__[{i}]", v, depth) for i, v in enumerate(fn.__defaults__ or ())]
    out += [(f"{path}.__kwdefaults__[{k!r}]", v, depth) for k, v in (fn.__kwdefaults__ or {}).items()]
    if not _is_torch_module_name(getattr(fn, "__module__", None) or ""):
        names = _code_names(fn.__code__)
        out += [(f"{path}.__globals__[{name!r}]", fn.__globals__[name], depth)
                for name in names if name in fn.__globals__]
        out += [(f"{path}.{name}", v, depth) for name, v in attrs.items()]
    return out


def _code_names(code: types.CodeType) -> List[str]:
    """The global (and attribute) names a code object and the code nested in it use, first use first."""
    names: Dict[str, None] = {}
    todo = [code]
    while todo:
        c = todo.pop()
        names.update(dict.fromkeys(c.co_names))
        todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return list(names)


def _attributes(obj: Any) -> Dict[str, Any]:
    """An object's instance attributes: its __dict__ and its __slots__ that are set."""
    out = dict(vars(obj)) if hasattr(obj, "__dict__") and isinstance(getattr(obj, "__dict__", None), dict) else {}
    for cls in type(obj).__mro__:
        for name in cls.__dict__.get("__slots__", ()):
            if isinstance(name, str) and name not in out and name not in ("__dict__", "__weakref__"):
                try:
                    out[name] = object.__getattribute__(obj, name)
                except AttributeError:
                    pass
    return out


def _is_torch_module_name(name: str) -> bool:
    return name == "torch" or name.startswith("torch.")


def _is_torch_internal(cls: type) -> bool:
    return _is_torch_module_name(getattr(cls, "__module__", "") or "")
