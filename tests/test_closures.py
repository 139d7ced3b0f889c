"""Step functions that are closures, lambdas, partials and bound methods over a model (issue #32), on a GPU:
what fn holds counts as kept alive, what it does not hold is still named, and validate() compares steps that
run only at their captured sizes, or advance state of their own, from the padded batch and the same state."""
import functools
import types
import weakref

import pytest
import torch

import graphrunner as gr
from conftest import gpu

pytestmark = gpu

HIDDEN = 64
INPUTS = {"x": gr.StaticInput((HIDDEN,), torch.float32)}
CACHE_MODULE = types.ModuleType("cache_module")  # a module-level cache: another module owns what it holds


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(HIDDEN, 4 * HIDDEN), torch.nn.GELU(),
                               torch.nn.Linear(4 * HIDDEN, HIDDEN), torch.nn.LayerNorm(HIDDEN)).cuda()


def forward(model, x):
    return model(x)


class Holder:
    """A plain object whose method is the step (an engine, say)."""

    def __init__(self, model):
        self.model = model

    def step(self, x):
        return self.model(x)


def steps(model):
    def closure(x):
        return model(x)

    return {"lambda": lambda x: model(x), "closure": closure, "partial": functools.partial(forward, model),
            "bound method": Holder(model).step}


@pytest.mark.parametrize("how", ["lambda", "closure", "partial", "bound method"])
def test_a_step_over_a_module_keeps_its_weights_alive(how):
    model = mlp()
    with gr.GraphRunner(steps(model)[how], INPUTS, capture_sizes=[1, 2, 4, 8]) as runner:
        runner.capture()
        report = runner.audit()
        assert not report.borrowed and report.owned.get(
            "memory declared long-lived (parameters, buffers, keep=, gr.workspace)", 0) > 0, str(report)
        runner.validate(scrub=True, guard=True)


@pytest.mark.parametrize("reach", ["weak reference", "another module's cache"])
def test_memory_fn_does_not_hold_is_still_named_and_keep_fixes_it(reach):
    model = mlp()
    scale = torch.rand(HIDDEN, device="cuda") + 0.5
    if reach == "weak reference":
        ref = weakref.ref(scale)
        step = lambda x: model(x) * ref()  # noqa: E731
    else:
        CACHE_MODULE.table = {"scale": scale}
        step = lambda x: model(x) * CACHE_MODULE.table["scale"]  # noqa: E731
    with gr.GraphRunner(step, INPUTS, capture_sizes=[1, 2, 4]) as runner:
        runner.capture()
        borrowed = {r.memory.split("(block ")[-1] for r in runner.audit().borrowed}
        assert borrowed == {f"0x{scale.data_ptr():x})"}
        with pytest.raises(gr.GraphHazardError, match=r"uses memory nothing keeps alive for it.*keep=\[tensor or "
                                                      r"module.*or hold it from fn"):
            runner.validate()
    with gr.GraphRunner(step, INPUTS, capture_sizes=[1, 2, 4], keep=[scale]) as runner:
        runner.capture()
        runner.validate(scrub=True, guard=True)


class FixedBatch:
    """A step built for one batch, as HF's StaticCache is: it runs at its captured size only."""

    def __init__(self, batch):
        self.batch = batch
        self.model = mlp()

    def __call__(self, x):
        if x.shape[0] != self.batch:
            raise RuntimeError(f"built for batch {self.batch}, got {x.shape[0]}")
        return self.model(x)


def test_eager_at_size_compares_a_step_that_runs_only_at_its_captured_size():
    with gr.GraphRunner(FixedBatch(8), INPUTS, capture_sizes=[8]) as runner:
        runner.capture()
        with pytest.raises(RuntimeError, match=r"eager reference step failed at batch \d.*built for batch 8.*"
                                               r"validate\(eager_at='size'\)"):
            runner.validate(steps_per_size=6)
        report = runner.validate(steps_per_size=6, scrub=True, guard=True, eager_at="size")
        assert report.replays == 6


class Counting:
    """A step that advances a position counter of its own on each call, as HF's StaticCache layers do, and
    writes its input into a cache at that position."""

    def __init__(self):
        self.model = mlp()
        self.position = torch.zeros((), dtype=torch.long, device="cuda")
        self.cache = torch.zeros(64, HIDDEN, device="cuda")

    def __call__(self, x):
        self.cache.index_copy_(0, self.position.view(1), x[:1])  # as HF's StaticLayer.update writes its keys
        out = self.model(x) + self.position.float()
        self.position.add_(1)
        return out


def test_restore_state_runs_the_replay_from_the_state_the_eager_step_started_from():
    step = Counting()
    with gr.GraphRunner(lambda x: step(x), INPUTS, capture_sizes=[2, 4, 8]) as runner:
        runner.capture()
        assert step.position.item() == 1  # the warm-up ran the step once
        state = runner.record.state_buffers
        assert state["fn.__closure__[0] (step).position"] is step.position and \
            state["fn.__closure__[0] (step).cache"] is step.cache  # found through the closure
        with pytest.raises(gr.GraphHazardError, match=r"relative error.*validate\(restore_state=True\)"):
            runner.validate()
        step.position.zero_()
        report = runner.validate(scrub=True, guard=True, restore_state=True)
        assert step.position.item() == report.replays  # each checked step advanced it once, as documented
