"""The engine-facing API: several runners in one pool, tokens per request, outputs the engine owns, padding
policies, capture-time inputs."""
import warnings

import pytest
import torch

import graphrunner as gr
from conftest import gpu
from graphrunner_workloads.reproductions import PLANES, ops

pytestmark = gpu

HIDDEN = 64


class Mix(torch.nn.Module):
    """Rows never mix; a matmul so cuBLAS runs inside the graphs."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=g) / 8)

    def forward(self, x, ids):
        return {"y": torch.tanh(x @ self.w) + ids[:, None], "count": (ids > 0).sum()}


INPUTS = {"x": gr.StaticInput((HIDDEN,), torch.float32), "ids": gr.StaticInput((), torch.long, high=5)}


def step(batch, rows=None, gen=None):
    rows = rows or batch
    return {"x": torch.randn(rows, HIDDEN, device="cuda", generator=gen),
            "ids": torch.randint(0, 5, (rows,), device="cuda", generator=gen)}


def check(runner, model, batch, rows=None):
    inputs = step(batch, rows)
    got, want = runner(**inputs), model(**inputs)
    torch.testing.assert_close(got["y"], want["y"], rtol=1e-4, atol=1e-4)
    assert got["count"].item() == want["count"].item()


@pytest.mark.parametrize("count", [2, 3])
def test_runners_in_one_pool_capture_together_and_replay_interleaved(count):
    models = [Mix(i).cuda() for i in range(count)]
    sizes = [[1, 8, 64], [2, 16], [4, 32, 48]][:count]
    runners = [gr.GraphRunner(m, INPUTS, capture_sizes=s, name=f"r{i}") for i, (m, s) in enumerate(zip(models, sizes))]
    reports = gr.capture_all(*runners)
    assert [r.name for r in reports] == [f"r{i}" for i in range(count)]
    assert len({tuple(r.record.pool) for r in runners}) == 1
    for batch in [1, 7, 64, 3, 16, 2, 40, 48, 5]:
        for runner, model in zip(runners, models):
            if batch <= runner.spec.max_batch_size:
                check(runner, model, batch)
    report = gr.validate_all(*runners, scrub=True, guard=True)
    assert len(report.max_error) == sum(len(s) for s in sizes)
    for r in runners:
        r.close()


def draft_step(x, ids, fixed=False):
    """The seed bug's shape: per-request metadata sized without the steps factor inside capture."""
    rows = x.shape[0] if (torch.cuda.is_current_stream_capturing() and not fixed) else x.shape[0] * PLANES
    meta = torch.empty(rows, dtype=torch.int32, device=x.device)
    return {"y": ops().planes_op(x, meta, PLANES), "count": (ids > 0).sum()}


def draft_fixed(x, ids):
    return draft_step(x, ids, fixed=True)


@pytest.mark.parametrize("fixed", [False, True])
def test_a_runner_writing_into_another_runners_memory_is_named(fixed):
    # One draft size, captured between the target's: any memory its overflow reaches belongs to the target.
    target = gr.GraphRunner(Mix(0).cuda(), INPUTS, capture_sizes=[8, 32, 64], name="target")
    draft = gr.GraphRunner(draft_fixed if fixed else draft_step, INPUTS, capture_sizes=[48], name="draft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gr.CaptureGuardWarning)
        gr.capture_all(target, draft)
    try:
        if fixed:
            gr.validate_all(target, draft, scrub=True, guard=True, steps_per_size=3)
        else:
            named = (r"the graph of size 48 of runner 'draft' \(batch \d+\) wrote out of bounds into "
                     r".*of size \d+ of runner 'target'")
            with pytest.raises(gr.GraphHazardError, match=named) as found:
                gr.validate_all(target, draft, scrub=True, guard=True, steps_per_size=3)
            print("named:", found.value)
            hazard = found.value
            assert (hazard.runner, hazard.size) == ("draft", 48) and hazard.buffer
            assert hazard.owner is not None and hazard.owner[0] == "target" and hazard.owner[1] in (8, 32, 64)
    finally:
        target.close()
        draft.close()


class Verify(torch.nn.Module):
    """A verify-shaped step: per-token ids and positions, one length per request; per-token and per-request outputs."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        g = torch.Generator().manual_seed(3)
        self.embed = torch.nn.Parameter(torch.randn(50, HIDDEN, generator=g))

    def forward(self, ids, positions, seq_lens):
        h = self.embed[ids] * positions[:, None].float().cos()
        per_request = h.view(-1, self.k, HIDDEN).sum(1) + seq_lens[:, None]
        return {"tokens": h, "requests": per_request}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_tokens_per_request(k):
    model = Verify(k).cuda()
    inputs = {"ids": gr.StaticInput((), torch.long, high=50, per_token=True),
              "positions": gr.StaticInput((), torch.long, high=100, per_token=True),
              "seq_lens": gr.StaticInput((), torch.int32, pad=1, low=1, high=100)}
    with gr.GraphRunner(model, inputs, capture_sizes=[1, 4, 8, 16], tokens_per_request=k) as runner:
        runner.capture()
        assert runner.record.static_inputs["ids"].shape[0] == 16 * k
        for batch in [1, 3, 4, 5, 16, 2]:
            step_inputs = {"ids": torch.randint(0, 50, (batch * k,), device="cuda"),
                           "positions": torch.randint(0, 100, (batch * k,), device="cuda"),
                           "seq_lens": torch.randint(1, 100, (batch,), device="cuda", dtype=torch.int32)}
            got, want = runner(**step_inputs), model(**step_inputs)
            assert got["tokens"].shape == (batch * k, HIDDEN) and got["requests"].shape == (batch, HIDDEN)
            torch.testing.assert_close(got["tokens"], want["tokens"])
            torch.testing.assert_close(got["requests"], want["requests"])
        if k > 1:
            with pytest.raises(ValueError, match=r"not a multiple of tokens_per_request"):
                runner(ids=step_inputs["ids"][:-1], positions=step_inputs["positions"][:-1],
                       seq_lens=step_inputs["seq_lens"])
        runner.validate(scrub=True, guard=True)


def test_hooks_get_the_counts_and_static_views():
    """A verify-shaped runner (2 tokens per request): on_capture sees each size's counts and views (a backend
    builds per-size state there); before_replay sees raw and padded counts, the views of the size it runs at and
    the step's inputs, and what it writes into a padding="keep" input's padding rows is what the graph reads."""
    k, captured, seen = 2, {}, []
    model = Verify(k).cuda()
    inputs = {"ids": gr.StaticInput((), torch.long, high=50, per_token=True),
              "positions": gr.StaticInput((), torch.long, high=100, per_token=True, padding="keep"),
              "seq_lens": gr.StaticInput((), torch.int32, pad=1, low=1, high=100)}

    def on_capture(info):
        captured[info.padded_requests] = info
        assert info.inputs is None and info.requests == info.padded_requests

    def before_replay(info):
        seen.append(info)
        if info.padded_requests:  # padding rows of the per-token positions, which staging leaves alone
            info.static["positions"][info.tokens:].fill_(7)

    with gr.GraphRunner(model, inputs, capture_sizes=[4, 8], tokens_per_request=k, on_capture=on_capture,
                        before_replay=before_replay) as runner:
        runner.capture()
        static = runner.record.static_inputs
        for size, info in captured.items():
            assert (info.tokens, info.padded_tokens) == (size * k, size * k)
            assert info.static["ids"].shape == (size * k,) and info.static["seq_lens"].shape == (size,)
            assert info.static["ids"].data_ptr() == static["ids"].data_ptr()
        for batch in (3, 8, 9):
            step_inputs = {"ids": torch.randint(0, 50, (batch * k,), device="cuda"),
                           "positions": torch.randint(0, 100, (batch * k,), device="cuda"),
                           "seq_lens": torch.randint(1, 100, (batch,), device="cuda", dtype=torch.int32)}
            got = runner(**step_inputs)
            torch.testing.assert_close(got["tokens"], model(**step_inputs)["tokens"])
            info = seen[-1]
            size = runner.size_for(batch)
            assert (info.requests, info.padded_requests, info.tokens, info.padded_tokens) == \
                (batch, size, batch * k, size * k)
            assert info.inputs["ids"] is step_inputs["ids"]
            if size:
                assert info.static["positions"].shape == (size * k,) and info.static["seq_lens"].shape == (size,)
                torch.cuda.synchronize()
                assert static["positions"][batch * k: size * k].tolist() == [7] * ((size - batch) * k)
            else:
                assert info.static == {}


def test_outputs_in_caller_buffers_survive_other_runners():
    a_model, b_model = Mix(0).cuda(), Mix(1).cuda()
    logits = torch.empty(64, HIDDEN, device="cuda")
    count = torch.empty(1, dtype=torch.long, device="cuda")
    a = gr.GraphRunner(a_model, INPUTS, capture_sizes=[8, 64], name="a", out={"y": logits, "count": count})
    b = gr.GraphRunner(b_model, INPUTS, capture_sizes=[8, 64], name="b")
    gr.capture_all(a, b)
    inputs = step(6)
    got = a(**inputs)
    assert got["y"].data_ptr() == logits.data_ptr()
    for _ in range(3):
        b(**step(64))
        b(**step(5))
    want = a_model(**inputs)
    torch.testing.assert_close(logits[:6], want["y"], rtol=1e-4, atol=1e-4)
    assert count[0].item() == want["count"].item()
    gr.validate_all(a, b, scrub=True, guard=True)
    a.close()
    b.close()
    with pytest.raises(ValueError, match=r"out buffer for output\['y'\] is \(4, 64\)"):
        bad = gr.GraphRunner(a_model, INPUTS, capture_sizes=[8], out={"y": torch.empty(4, HIDDEN, device="cuda")})
        bad.capture()


def test_padding_policies():
    def fn(ids, slot):
        return ids * 2 + slot

    inputs = {"ids": gr.StaticInput((), torch.long, pad=-1),
              "slot": gr.StaticInput((), torch.long, pad=7, padding="keep")}
    with gr.GraphRunner(fn, inputs, capture_sizes=[4, 8]) as runner:
        runner.capture()
        static = runner.record.static_inputs
        assert static["slot"].tolist() == [7] * 8  # valid before the first step
        runner(ids=torch.arange(8, device="cuda"), slot=torch.arange(100, 108, device="cuda"))
        got = runner(ids=torch.arange(3, device="cuda"), slot=torch.arange(3, device="cuda"))
        torch.testing.assert_close(got, torch.arange(3, device="cuda") * 3)
        torch.cuda.synchronize()
        # batch 3 ran at size 4: its one padding row got the sentinel, or kept the larger step's row
        assert static["ids"][3].item() == -1
        assert static["slot"][3].item() == 103


def test_capture_inputs_are_staged_for_warm_up_and_capture():
    seen = {}

    def fn(x, lens):
        if not torch.cuda.is_current_stream_capturing():
            seen.setdefault("warm-up", lens.tolist())
        return x * lens[:, None]

    inputs = {"x": gr.StaticInput((4,), torch.float32), "lens": gr.StaticInput((), torch.int32, pad=1)}
    runner = gr.GraphRunner(fn, inputs, capture_sizes=[2, 4],
                            capture_inputs=lambda size: {"lens": torch.full((size,), 9, dtype=torch.int32,
                                                                            device="cuda")})
    runner.capture()
    assert seen["warm-up"] == [9, 9, 9, 9]
    x = torch.randn(3, 4, device="cuda")
    lens = torch.tensor([1, 2, 3], dtype=torch.int32, device="cuda")
    torch.testing.assert_close(runner(x=x, lens=lens), x * lens[:, None])
    runner.close()
