"""What a step function keeps alive (graphrunner.reach.held_by), on CPU tensors: reachability needs no GPU."""
import functools
import time
import types
import weakref

import pytest
import torch

import graphrunner as gr
from graphrunner.reach import held_by

GLOBAL_WEIGHT = torch.ones(3)
CACHE_MODULE = types.ModuleType("cache_module")  # a module-level cache another module owns
CACHE_MODULE.table = {"w": torch.ones(4)}


class Cache:
    """A KV cache object as Hugging Face's StaticCache holds one: layers, each with plain tensor attributes."""

    def __init__(self, layers: int) -> None:
        self.layers = [types.SimpleNamespace(keys=torch.zeros(2, 4), values=torch.zeros(2, 4)) for _ in range(layers)]
        self.position = torch.zeros((), dtype=torch.long)


class Slotted:
    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def paths(fn, **kw):
    return {path: t for path, t in held_by(fn, **kw)}


def ids(fn):
    return {id(t) for _, t in held_by(fn)}


def test_a_closure_over_a_module_holds_its_parameters_buffers_and_plain_tensor_attributes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    model.extra = torch.zeros(2)  # a tensor the module holds without registering it (HF keeps some)

    def step(x):
        return model(x)

    found = paths(step)
    assert found["fn.__closure__[0] (model).0.weight"] is model[0].weight
    assert found["fn.__closure__[0] (model).1.running_mean"] is model[1].running_mean
    assert found["fn.__closure__[0] (model).extra"] is model.extra
    assert ids(step) == {id(t) for t in [*model.parameters(), *model.buffers(), model.extra]}


def test_lambda_partial_bound_method_and_defaults():
    lin = torch.nn.Linear(2, 2)
    bias = torch.zeros(2)

    def add(x, b=bias, *, scale=torch.ones(1)):
        return x + b * scale

    assert ids(lambda x: lin(x)) == {id(lin.weight), id(lin.bias)}
    assert set(paths(lin.forward)) == {"fn.__self__.weight", "fn.__self__.bias"}
    found = paths(add)
    assert found["fn.__defaults__[0]"] is bias and "fn.__kwdefaults__['scale']" in found
    extra, other = torch.zeros(5), torch.zeros(2)
    found = paths(functools.partial(add, extra, b=other))
    assert found["fn.args[0]"] is extra and found["fn.keywords['b']"] is other and found["fn.func.__defaults__[0]"] is bias


def test_globals_the_code_names_and_code_nested_in_it():
    direct = paths(lambda x: x * GLOBAL_WEIGHT)
    assert direct == {"fn.__globals__['GLOBAL_WEIGHT']": GLOBAL_WEIGHT}
    nested = paths(lambda xs: [x * GLOBAL_WEIGHT for x in xs])  # a comprehension (nested code before 3.12)
    assert list(nested.values()) == [GLOBAL_WEIGHT]
    assert held_by(lambda x: x * 2) == []  # names torch nowhere, holds nothing


def test_objects_containers_and_slots_are_walked():
    cache = Cache(layers=3)
    table = {"a": [torch.ones(1), (torch.ones(2),)]}
    slotted = Slotted(torch.ones(6))
    found = paths(lambda x: (cache, table, slotted))
    assert found["fn.__closure__[0] (cache).layers[2].values"] is cache.layers[2].values
    assert found["fn.__closure__[0] (cache).position"] is cache.position
    assert found["fn.__closure__[2] (table)['a'][1][0]"] is table["a"][1][0]
    assert found["fn.__closure__[1] (slotted).t"] is slotted.t
    assert len(found) == 3 * 2 + 1 + 2 + 1


def test_a_callable_object_and_the_globals_of_its_call():
    class Step:
        def __init__(self):
            self.w = torch.ones(2)

        def __call__(self, x):
            return x * self.w * GLOBAL_WEIGHT[0]

    step = Step()
    found = paths(step)
    assert found["fn.w"] is step.w and found["type(fn).__call__.__globals__['GLOBAL_WEIGHT']"] is GLOBAL_WEIGHT


def test_cycles_end_and_each_tensor_is_listed_once():
    a, b = types.SimpleNamespace(), types.SimpleNamespace()
    t = torch.ones(1)
    a.other, b.other, a.t, b.t = b, a, t, t
    lst = [t]
    lst.append(lst)
    assert [p for p, _ in held_by(lambda: (a, lst))] == ["fn.__closure__[0] (a).t"]


def test_weak_references_modules_and_depth_are_not_followed():
    borrowed = torch.ones(3)
    ref = weakref.ref(borrowed)
    assert held_by(lambda x: x @ ref()) == []  # a weak reference keeps nothing alive
    assert held_by(lambda x: x @ CACHE_MODULE.table["w"]) == []  # a module's cache: its owner may clear it
    deep = torch.ones(1)
    nest = deep
    for _ in range(10):
        nest = [nest]
    assert held_by(lambda: nest, max_depth=4) == []
    assert [t for _, t in held_by(lambda: nest, max_depth=12)] == [deep]


def test_torch_compile_is_followed_to_the_function_it_compiles():
    lin = torch.nn.Linear(2, 2)
    compiled = torch.compile(lambda x: lin(x))  # compiles nothing until called
    assert ids(compiled) == {id(lin.weight), id(lin.bias)}
    assert ids(torch.compile(lin)) == {id(lin.weight), id(lin.bias)}


def test_a_deep_model_is_walked_well_under_a_second():
    layers = torch.nn.ModuleList(
        torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8), "k": torch.nn.Linear(8, 8), "v": torch.nn.Linear(8, 8),
                             "o": torch.nn.Linear(8, 8), "up": torch.nn.Linear(8, 16), "down": torch.nn.Linear(16, 8),
                             "norm": torch.nn.LayerNorm(8)}) for _ in range(32))
    cache = Cache(layers=32)
    start = time.perf_counter()
    found = held_by(lambda x: (layers, cache))
    assert time.perf_counter() - start < 0.5
    assert len(found) == 32 * (6 * 2 + 2) + 32 * 2 + 1


def test_the_spec_declares_what_fn_holds_and_guards_its_state():
    """RunnerSpec.declared() and state_buffers() take what fn holds on the runner's GPU; on CPU tensors they
    take nothing from it (the audit and guard read device memory)."""
    model = torch.nn.Linear(2, 2)
    cache = Cache(layers=1)
    spec = gr.RunnerSpec(fn=lambda x: model(x) + cache.layers[0].keys[0, :2],
                         inputs={"x": gr.StaticInput((2,), torch.float32)}, max_batch_size=4, capture_sizes=(4,))
    assert {p for p, _ in spec.held()} == {"fn.__closure__[1] (model).weight", "fn.__closure__[1] (model).bias",
                                           "fn.__closure__[0] (cache).layers[0].keys",
                                           "fn.__closure__[0] (cache).layers[0].values",
                                           "fn.__closure__[0] (cache).position"}
    assert spec.declared() == [] and spec.state_buffers() == {}


def test_a_borrowed_reference_names_the_fixes_keep_and_holding_it_from_fn():
    from graphrunner.audit import classify

    live = (0x7F0001000000, 4096, "a live allocation of 4096 bytes in the general pool (block 0x7f0001000000)")
    report = classify([("the graph of size 8", [("kernel", "gemv", [(0, live[0], False)])])], [], [live],
                      lambda address: "")
    with pytest.raises(gr.GraphHazardError, match=r"uses memory nothing keeps alive for it.*keep=\[tensor or module"
                                                  r".*or hold it from fn.*in its closure.*reach\.held_by\(fn\)"):
        report.check()
