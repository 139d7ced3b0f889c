"""Ragged runners on the GPU: steps of mixed lengths staged and replayed in one call, against eager on the
unpadded step, with outputs poisoned before each replay; padding never reaches real rows; a queue of steps the
host never waits for keeps each step's split (the host slots are reused safely)."""
import random

import pytest
import torch

import graphrunner as gr
from graphrunner.testing import poison
from conftest import gpu

D = 16
SIZES = [8, 32, 128]
REQUESTS = {8: 4, 32: 6, 128: 6}
INPUTS = {"input_ids": gr.StaticInput((), torch.long, per_token=True, high=100),
          "positions": gr.StaticInput((), torch.long, per_token=True, high=512),
          "query_lens": gr.StaticInput((), torch.int32),
          "scale": gr.StaticInput((), torch.float64, pad=0.0)}


class Step(torch.nn.Module):
    """Each request's tokens summed, plus its last token's row, times its scale: every output row depends on
    exactly its own request's tokens, found on the device from the split. Float64, so the order index_add_
    sums in cannot move a result past the tolerance."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Parameter(torch.randn(100, D, device="cuda", dtype=torch.float64))

    def forward(self, input_ids, positions, query_lens, scale):
        tokens, requests = input_ids.shape[0], query_lens.shape[0]
        ends = query_lens.cumsum(0)
        owner = torch.searchsorted(ends, torch.arange(tokens, device=ends.device), right=True)
        x = self.emb[input_ids] * (positions + 1).double()[:, None]
        x = x * (owner < requests)[:, None]  # padding tokens belong to no request
        sums = torch.zeros(requests, D, device=x.device, dtype=x.dtype).index_add_(0, owner.clamp(max=requests - 1), x)
        return (sums + x[(ends - 1).clamp(min=0)]) * scale[:, None]


def draw(tokens_max, requests_max, rng):
    requests = rng.randint(1, requests_max)
    tokens = rng.randint(requests, tokens_max)
    cuts = sorted(rng.sample(range(1, tokens), requests - 1)) if requests > 1 else []
    lens = [b - a for a, b in zip([0] + cuts, cuts + [tokens])]
    return {"input_ids": torch.randint(0, 100, (tokens,), device="cuda"),
            "positions": torch.randint(0, 512, (tokens,), device="cuda"),
            "query_lens": torch.tensor(lens, dtype=torch.int32),
            "scale": torch.rand(requests, device="cuda", dtype=torch.float64) + 0.5}


def eager(model, step):
    return model(**dict(step, query_lens=step["query_lens"].cuda()))


@pytest.fixture
def runner():
    model = Step()
    r = gr.GraphRunner(model, INPUTS, capture_sizes=SIZES, split="query_lens", max_requests=REQUESTS)
    r.capture()
    yield r
    r.close()


@gpu
def test_mixed_steps_equal_eager_on_the_unpadded_step(runner):
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        step = draw(128, 6, rng)
        tokens, requests = step["input_ids"].shape[0], step["query_lens"].shape[0]
        size = runner.size_for(requests, tokens)
        seen.add(size)
        assert size == min(t for t in SIZES if t >= tokens and REQUESTS[t] >= requests)
        poison(runner.record.entries[size].outputs)
        got = runner(**step)
        assert got.shape == (requests, D)
        torch.testing.assert_close(got, eager(runner.spec.fn, step), rtol=1e-9, atol=1e-9)
    assert seen == set(SIZES)


@gpu
def test_steps_queued_without_waiting_keep_their_own_split(runner):
    """max_lead + 2 host slots carry the split: a hundred steps launched back to back, outputs cloned on the
    stream, all compared at the end."""
    rng = random.Random(1)
    steps = [draw(32, 6, rng) for _ in range(100)]
    outs = [runner(**s).clone() for s in steps]
    torch.cuda.synchronize()
    for s, out in zip(steps, outs):
        torch.testing.assert_close(out, eager(runner.spec.fn, s), rtol=1e-9, atol=1e-9)


@gpu
def test_padding_tokens_and_requests_get_their_pads(runner):
    step = {"input_ids": torch.tensor([5, 6, 7], device="cuda"), "positions": torch.tensor([1, 2, 3], device="cuda"),
            "query_lens": torch.tensor([2, 1], dtype=torch.int32),
            "scale": torch.ones(2, device="cuda", dtype=torch.float64)}
    runner(**step)
    torch.cuda.synchronize()
    static = runner.record.static_views(8)
    assert static["input_ids"].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert static["query_lens"].tolist() == [2, 1, 0, 0]
    assert static["scale"].tolist() == [1.0, 1.0, 0.0, 0.0]


@gpu
def test_hooks_see_tokens_and_requests():
    seen = []
    model = Step()
    r = gr.GraphRunner(model, INPUTS, capture_sizes=SIZES, split="query_lens", max_requests=REQUESTS,
                       on_capture=lambda info: seen.append(("capture", info.requests, info.tokens)),
                       before_replay=lambda info: seen.append(("step", info.requests, info.padded_requests,
                                                               info.tokens, info.padded_tokens,
                                                               info.inputs["query_lens"].device.type)))
    with r:
        r.capture()
        r(**draw(20, 3, random.Random(2)) | {"query_lens": torch.tensor([18, 1, 1], dtype=torch.int32),
                                            "input_ids": torch.zeros(20, dtype=torch.long, device="cuda"),
                                            "positions": torch.zeros(20, dtype=torch.long, device="cuda"),
                                            "scale": torch.ones(3, device="cuda", dtype=torch.float64)})
    assert seen[:3] == [("capture", 6, 128), ("capture", 6, 32), ("capture", 4, 8)]
    assert seen[3] == ("step", 3, 6, 20, 32, "cpu")


@gpu
def test_larger_steps_run_eagerly_or_raise():
    model = Step()
    for fallback in ("eager", "error"):
        with gr.GraphRunner(model, INPUTS, capture_sizes=[8, 32], split="query_lens", max_requests=4,
                            fallback=fallback) as r:
            r.capture()
            step = {"query_lens": torch.tensor([20, 20, 1, 1, 1, 1], dtype=torch.int32),
                    "input_ids": torch.randint(0, 100, (44,), device="cuda"),
                    "positions": torch.randint(0, 512, (44,), device="cuda"),
                    "scale": torch.rand(6, device="cuda", dtype=torch.float64)}
            if fallback == "eager":
                torch.testing.assert_close(r(**step), eager(model, step))
            else:
                with pytest.raises(ValueError, match="a step of 44 tokens over 6 requests is larger"):
                    r(**step)
            small = draw(8, 4, random.Random(4))  # the runner is still usable
            torch.testing.assert_close(r(**small), eager(model, small), rtol=1e-9, atol=1e-9)


@gpu
def test_a_bad_split_leaves_the_runner_usable(runner):
    step = draw(30, 4, random.Random(5))
    bad = dict(step, query_lens=step["query_lens"] + 1)
    with pytest.raises(ValueError, match=r"input 'query_lens' (sums to|gives request)"):
        runner(**bad)
    torch.testing.assert_close(runner(**step), eager(runner.spec.fn, step), rtol=1e-9, atol=1e-9)


@gpu
def test_outputs_of_a_ragged_runner_must_be_per_request():
    with pytest.raises(ValueError, match=r"a ragged runner's outputs need one row per request \(6 at this size\)"):
        gr.GraphRunner(lambda input_ids, positions, query_lens, scale: positions * 2, INPUTS, capture_sizes=[32],
                       split="query_lens", max_requests=6).capture()


@gpu
def test_validate_draws_ragged_mixtures_and_passes(runner):
    report = runner.validate(steps_per_size=4, scrub=True, guard=True)
    assert report.replays == 4 * len(SIZES) and set(report.max_error) == {("", s) for s in SIZES}

