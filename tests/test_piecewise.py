"""Piecewise capture: graphs that break around ops that cannot be captured (an op that needs the step's
lengths on the host). Replays equal eager on fresh steps, with outputs poisoned; the break contract's errors
name the op and the fix."""
import gc
import random
import resource
import weakref

import pytest
import torch

import graphrunner as gr
from graphrunner.piecewise import tensors_in
from graphrunner.testing import poison
from conftest import gpu, segments, segments_since, settle

D = 8


@gr.breaking_op
def prefix_sums(x, *, lens=None, out, step):
    """Each request's running sum over its own tokens: a loop over host lengths, which no graph can hold.
    Replayed by a ragged runner, the lengths come from the step (the split on the host); otherwise (eagerly, at
    capture, or a uniform runner's step) from the device, which waits for them."""
    given = step.inputs if step is not None and step.inputs is not None else {}
    host = given["query_lens"].tolist() if "query_lens" in given else lens.tolist()
    start = 0
    out.zero_()
    for n in host:
        out[start:start + n] = x[start:start + n].cumsum(0)
        start += n
    return out


class Model(torch.nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(layers, D, D, device="cuda", dtype=torch.float64) / D ** 0.5)
        self.emb = torch.nn.Parameter(torch.randn(50, D, device="cuda", dtype=torch.float64))

    def forward(self, input_ids, query_lens):
        x = self.emb[input_ids]
        for w in self.w:
            h = torch.empty_like(x)
            prefix_sums(x @ w, lens=query_lens, out=h)
            x = torch.tanh(h) + x
        ends = query_lens.cumsum(0) - 1
        return x[ends.clamp(min=0)]


INPUTS = {"input_ids": gr.StaticInput((), torch.long, per_token=True, high=50),
          "query_lens": gr.StaticInput((), torch.int32)}


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(tokens, requests, rng):
    cuts = sorted(rng.sample(range(1, tokens), requests - 1))
    lens = [b - a for a, b in zip([0] + cuts, cuts + [tokens])]
    return {"input_ids": torch.randint(0, 50, (tokens,), device="cuda"),
            "query_lens": torch.tensor(lens, dtype=torch.int32)}


def eager(model, s):
    return model(**dict(s, query_lens=s["query_lens"].cuda()))


def test_breaking_op_needs_a_callable_and_runs_plainly_outside_capture():
    with pytest.raises(TypeError, match="breaking_op\\(\\) takes a callable, got int"):
        gr.breaking_op(3)
    seen = []
    op = gr.breaking_op(lambda x, out, step: seen.append(step) or out.copy_(x), name="copy")
    x = torch.arange(3.0)
    assert torch.equal(op(x, out=torch.empty(3)), x) and seen == [None] and op.name == "copy"
    with pytest.raises(TypeError, match=r"break op copy was called with step=...; graphrunner passes step itself"):
        op(x, out=torch.empty(3), step=1)


def test_finding_a_break_ops_tensors_holds_none_of_them_past_the_call():
    """A break op's arguments must be freed as soon as the model drops them, garbage collector or not: while a size
    is captured, a reference cycle holding them would keep their pool blocks from every later segment and size."""
    t, u = torch.zeros(3), torch.ones(2)
    refs = [weakref.ref(t), weakref.ref(u)]
    gc.disable()
    try:
        found = tensors_in((t, [1, {"k": u}]), {"out": t})
        assert [where for where, _ in found] == ["argument 0", "argument 1[1]['k']", "argument out="]
        del found, t, u
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


@pytest.fixture
def runner():
    r = gr.GraphRunner(Model(), INPUTS, capture_sizes=[8, 32], split="query_lens", max_requests=4)
    r.capture()
    yield r
    r.close()


@gpu
def test_segments_and_breaks_replay_like_eager(runner):
    entry = runner.record.entries[32]
    assert len(entry.segments) == 3 and [b.name for b in entry.breaks] == ["prefix_sums"] * 3
    rng = random.Random(0)
    for _ in range(20):
        tokens = rng.randint(2, 32)
        s = step(tokens, rng.randint(1, min(4, tokens)), rng)
        size = runner.size_for(s["query_lens"].shape[0], tokens)
        poison(runner.record.entries[size].outputs)
        torch.testing.assert_close(runner(**s), eager(runner.spec.fn, s), rtol=1e-9, atol=1e-9)


@gpu
def test_piecewise_runner_validates_and_audits(runner):
    assert not runner.audit().borrowed
    runner.validate(steps_per_size=3, scrub=True, guard=True)


@gpu
def test_uniform_and_ragged_piecewise_share_one_pool():
    model = Model()
    uniform = gr.GraphRunner(lambda input_ids: model(input_ids, torch.ones_like(input_ids, dtype=torch.int32)),
                             {"input_ids": INPUTS["input_ids"]}, capture_sizes=[4, 8], name="decode")
    ragged = gr.GraphRunner(model, INPUTS, capture_sizes=[16, 32], split="query_lens", max_requests=4, name="mixed")
    gr.capture_all(uniform, ragged)
    try:
        d = gr.Dispatch(ragged, uniform)
        rng = random.Random(1)
        for tokens, requests in ((5, 5), (20, 3), (8, 8), (31, 4)):
            s = step(tokens, requests, rng) if tokens > requests else \
                {"input_ids": torch.randint(0, 50, (tokens,), device="cuda"),
                 "query_lens": torch.ones(tokens, dtype=torch.int32)}
            torch.testing.assert_close(d(**s).clone(), eager(model, s), rtol=1e-9, atol=1e-9)
        gr.validate_all(uniform, ragged, scrub=True, guard=True)
    finally:
        uniform.close()
        ragged.close()


@gpu
def test_an_op_returning_fresh_memory_is_refused_at_capture():
    fresh = gr.breaking_op(lambda x, out, step: x * 2, name="doubles")
    r = gr.GraphRunner(lambda x: fresh(x + 1, out=torch.empty_like(x)) + 1, {"x": gr.StaticInput((4,), torch.float32)},
                       capture_sizes=[2])
    with pytest.raises(ValueError, match=r"break op doubles at size 2 returned \(2, 4\) in fresh memory instead of "
                                         r"writing its out= buffer \(2, 4\): the next segment reads the out= buffer"):
        r.capture()
    assert r.state is gr.RunnerState.UNARMED


@gpu
def test_an_op_without_out_or_with_step_is_refused():
    op = gr.breaking_op(lambda x, out=None, step=None: x, name="bare")
    r = gr.GraphRunner(lambda x: op(x), {"x": gr.StaticInput((4,), torch.float32)}, capture_sizes=[2])
    with pytest.raises(TypeError, match=r"break op bare was called without out=: a break op writes its result into a "
                                        r"boundary buffer"):
        r.capture()
    r = gr.GraphRunner(lambda x: op(x, out=x, step=1), {"x": gr.StaticInput((4,), torch.float32)}, capture_sizes=[2])
    with pytest.raises(TypeError, match=r"break op bare was called with step=...; graphrunner passes step itself"):
        r.capture()


@gpu
def test_a_tensor_the_capture_did_not_make_is_refused():
    op = gr.breaking_op(lambda x, host, out, step: out.copy_(x), name="takes_host")
    r = gr.GraphRunner(lambda x: op(x * 1, torch.ones(2), out=torch.empty_like(x)),
                       {"x": gr.StaticInput((4,), torch.float32)}, capture_sizes=[2])
    with pytest.raises(ValueError, match=r"break op takes_host at size 2 got argument 1, a tensor of \(2,\) at 0x[0-9a-f]+ "
                                         r"that neither this capture made nor the runner holds"):
        r.capture()


@gpu
def test_at_capture_the_op_runs_once_on_what_the_segment_before_it_computed():
    """Note [ops at capture]: the segment before a break is replayed before the op runs, so the op reads real data
    (here x + 1 over pad values 0: all ones), not uninitialised pool memory, and gets step=None."""
    seen = []

    def check(x, out, step):
        seen.append((step, bool(torch.all(x == 1)) if step is None else None))
        return out.copy_(x)

    op = gr.breaking_op(check, name="check")
    r = gr.GraphRunner(lambda x: op(x + 1, out=torch.empty_like(x)) * 2, {"x": gr.StaticInput((64,), torch.float32)},
                       capture_sizes=[4, 8], warmup=0)
    with r:
        r.capture()
        assert seen == [(None, True), (None, True)]
        x = torch.randn(3, 64, device="cuda")
        torch.testing.assert_close(r(x=x), (x + 1) * 2)
        assert seen[-1][0] is not None and seen[-1][0].padded_requests == 4


def test_an_op_that_raises_at_capture_is_named_with_its_shapes_and_the_fix():
    """run_at_capture is how a capture runs a break op once (Note [ops at capture]); it needs no GPU."""
    from graphrunner.piecewise import run_at_capture

    narrow = gr.breaking_op(lambda x, out, step: out.copy_(x[:, :2]), name="narrow")
    with pytest.raises(RuntimeError, match=r"break op narrow at size 4 raised when capture ran it once \(on what the "
                                           r"segment before it computed, step=None\), with out= \(4, 3\) "
                                           r"torch.float32 and argument 0 \(4, 8\) torch.float32: RuntimeError: .+ "
                                           r"\(a boundary buffer of the wrong shape\), allocate out= with the shape "
                                           r"the op writes") as info:
        run_at_capture(narrow, "size 4", (torch.ones(4, 8),), {"out": torch.empty(4, 3)})
    assert type(info.value.__cause__) is RuntimeError and "must match" in str(info.value.__cause__)

    def picky(x, *, scale, out, step):
        raise ValueError("scale must be positive")

    with pytest.raises(ValueError, match=r"break op picky at size 2 of runner 'r' raised .* with out= \(2,\) "
                                         r"torch.float32 and argument 0 \(2,\) torch.float32: ValueError: scale must "
                                         r"be positive") as info:
        run_at_capture(gr.breaking_op(picky, name="picky"), "size 2 of runner 'r'", (torch.ones(2),),
                       {"scale": -1, "out": torch.empty(2)})
    assert isinstance(info.value.__cause__, ValueError)

    class TwoArguments(Exception):
        def __init__(self, code, text):
            super().__init__(f"{code}: {text}")

    def odd(x, out, step):
        raise TwoArguments(7, "odd")

    with pytest.raises(RuntimeError, match=r"break op odd at size 1 raised .*: TwoArguments: 7: odd") as info:
        run_at_capture(gr.breaking_op(odd, name="odd"), "size 1", (torch.ones(1),), {"out": torch.empty(1)})
    assert isinstance(info.value.__cause__, TwoArguments)


@gpu
def test_an_op_that_raises_at_capture_fails_the_capture_naming_it():
    """With no warm-up the op first runs at capture, where a wrong boundary buffer shows."""
    narrow = gr.breaking_op(lambda x, out, step: out.copy_(x[:, :2]), name="narrow")
    r = gr.GraphRunner(lambda x: narrow(x + 1, out=torch.empty(x.shape[0], 3, device=x.device)) * 2,
                       {"x": gr.StaticInput((4,), torch.float32)}, capture_sizes=[2], warmup=0)
    with pytest.raises(RuntimeError, match=r"break op narrow at size 2 raised when capture ran it once .* with out= "
                                           r"\(2, 3\) torch.float32 and argument 0 \(2, 4\) torch.float32: "
                                           r"RuntimeError: .*allocate out= with the shape the op writes") as info:
        r.capture()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert r.state is gr.RunnerState.UNARMED


# -- shared segments (share_segments=True): the layers between breaks run on one executable -------------------

LAYERS = 6


def shared_runner(share=True, sizes=(8, 16, 32), **kw):
    return gr.GraphRunner(Model(LAYERS), INPUTS, capture_sizes=list(sizes), split="query_lens", max_requests=4,
                          share_segments=share, **kw)


def executables(entry):
    return len({g.exec_handle for g in entry.graphs})


def structures(entry):
    return len({g.structure() for g in entry.graphs})


@gpu
def test_shared_segments_replay_like_eager_interleaved_and_queued():
    """Every size interleaved at random (so the shared executables switch between segments, and between sizes, on
    almost every launch), max_lead 2 with no sync between steps: each step's clone is compared once all are done.
    Outputs are poisoned before each step, so a segment that ran with another's parameters shows."""
    with shared_runner(max_lead=2, clone_outputs=True) as runner:
        runner.capture()
        assert all(g.shares_exec for e in runner.record.entries.values() for g in e.segments[:-1])
        rng = random.Random(3)
        steps, got = [], []
        for _ in range(40):
            tokens = rng.randint(2, 32)
            s = step(tokens, rng.randint(1, min(4, tokens)), rng)
            poison(runner.record.entries[runner.size_for(s["query_lens"].shape[0], tokens)].outputs)
            got.append(runner(**s))
            steps.append(s)
        torch.cuda.synchronize()
        for s, out in zip(steps, got):
            torch.testing.assert_close(out, eager(runner.spec.fn, s), rtol=1e-9, atol=1e-9)


@gpu
def test_shared_segments_report_fewer_executables_than_graphs():
    with shared_runner() as shared, shared_runner(share=False) as unshared:
        report, plain = shared.capture(), unshared.capture()
        for size, entry in shared.record.entries.items():
            # segment 0 (staging), the layers between breaks (one structure), the last segment (the head)
            assert len(entry.graphs) == LAYERS + 1 and structures(entry) == 3, size
            assert executables(entry) <= structures(entry) < len(entry.graphs)
            line = next(r for r in report.sizes if r.size == size)
            assert (line.graphs, line.executables) == (len(entry.graphs), executables(entry))
            assert not entry.graph.shares_exec  # segment 0 has the staging node: never shared
        assert report.executables < report.graphs == plain.graphs == plain.executables
        assert report.exec_nodes < report.num_nodes == plain.num_nodes == plain.exec_nodes
        assert report.exec_bytes == sum(e.exec_bytes for e in shared.record.entries.values())
        assert " executables of " in report.summary() and " executables of " not in plain.summary()
        for entry in unshared.record.entries.values():
            assert executables(entry) == len(entry.graphs) and not any(g.shares_exec for g in entry.graphs)


@gpu
def test_shared_segments_validate_and_audit():
    with shared_runner() as runner:
        runner.capture()
        assert not runner.audit().borrowed
        runner.validate(steps_per_size=3, scrub=True, guard=True)


@gpu
def test_shared_segments_close_gives_everything_back(fresh_memory):
    def cycle():
        with shared_runner(sizes=(8, 16)) as r:
            r.capture()
            s = step(12, 3, random.Random(0))
            torch.testing.assert_close(r(**s), eager(r.spec.fn, s), rtol=1e-9, atol=1e-9)
            del s

    cycle()  # first-run costs (kernels, handles, allocator bookkeeping) before the baseline
    settle()
    start, before, rss = torch.cuda.memory_reserved(), segments(), rss_mib()
    free = torch.cuda.mem_get_info()[0]
    for _ in range(20):
        cycle()
    settle()
    assert torch.cuda.memory_reserved() == start, segments_since(before)
    assert rss_mib() - rss < 50, f"host RSS grew {rss_mib() - rss:.1f} MiB over 20 cycles"
    # Executables destroyed: the driver reuses their memory, so 20 cycles take no more than a few chunks.
    assert free - torch.cuda.mem_get_info()[0] <= 16 << 20
