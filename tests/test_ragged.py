"""Ragged runners (sizes count tokens), on the CPU: the keying, the padding rules, and every argument and input
error. The GPU side (staging, capture, replay against eager) is in tests/test_ragged_gpu.py."""
import re

import pytest
import torch

import graphrunner as gr
from graphrunner._native import _C

INPUTS = {"input_ids": gr.StaticInput((), torch.long, per_token=True),
          "positions": gr.StaticInput((), torch.long, per_token=True),
          "query_lens": gr.StaticInput((), torch.int32),
          "page_table": gr.StaticInput((4,), torch.int32, padding="keep")}


def step(query_lens, input_ids, positions, page_table):
    return page_table[:, 0]


def ragged(sizes=(16, 64, 256), max_requests=8, **kw):
    return gr.GraphRunner(step, INPUTS, capture_sizes=list(sizes), split="query_lens", max_requests=max_requests,
                          **kw)


def inputs(lens, pages=None, **override):
    tokens = sum(lens)
    out = {"input_ids": torch.zeros(tokens, dtype=torch.long), "positions": torch.zeros(tokens, dtype=torch.long),
           "query_lens": torch.tensor(lens, dtype=torch.int32),
           "page_table": torch.zeros(len(lens) if pages is None else pages, 4, dtype=torch.int32)}
    out.update(override)
    return out


def check(runner, given):
    """The native checks of one step, as the runner's own step makes them (its checker, its size table)."""
    return _C.InputChecker(runner.spec.checker_specs(), runner.sizes, runner.spec.fallback == "eager",
                           0).check(given)


def test_a_step_runs_at_the_smallest_size_holding_its_tokens_and_requests():
    r = ragged(sizes=(16, 64, 256), max_requests={16: 4, 64: 8, 256: 16})
    assert r.size_for(1, 1) == 16
    assert r.size_for(4, 16) == 16
    assert r.size_for(5, 16) == 64       # 16 tokens fit size 16, 5 requests do not
    assert r.size_for(9, 20) == 256
    assert r.size_for(16, 256) == 256
    assert r.size_for(17, 200) == 0      # more requests than any size holds: eager
    assert r.size_for(2, 257) == 0       # more tokens than any size holds: eager
    with pytest.raises(TypeError, match=r"needs the step's tokens"):
        r.size_for(2)


def test_requests_per_size_default_and_int():
    assert ragged(max_requests=None).spec.max_requests == {16: 16, 64: 64, 256: 256}
    assert ragged(max_requests=32).spec.max_requests == {16: 16, 64: 32, 256: 32}
    assert ragged().spec.rows("input_ids", 64) == 64
    assert ragged().spec.rows("page_table", 64) == 8


def test_output_slots_are_one_per_size_and_request_count():
    r = ragged(sizes=(4, 8), max_requests={4: 2, 8: 3})
    slots = [r.sizes.output_slot(size, n) for size, most in ((4, 2), (8, 3)) for n in range(1, most + 1)]
    assert slots == list(range(1, 6)) and r.sizes.output_slots == 6


def test_check_counts_tokens_and_requests():
    r = ragged()
    with pytest.raises(ValueError, match=r"input 'input_ids' is on cpu, expected cuda:0"):  # every count agreed
        check(r, inputs([3, 1, 12]))


@pytest.mark.parametrize("given, message", [
    (inputs([3, 1], input_ids=torch.zeros(5, dtype=torch.long)),
     "inputs disagree: 'input_ids' has 5 rows, 'positions' has 4 rows; per-token inputs need one row per token"),
    (inputs([3, 1], pages=3),
     "inputs disagree: 'query_lens' has 2 rows, 'page_table' has 3 rows; per-request inputs need one row per request"),
    (inputs([3, 1], query_lens=torch.tensor([3, 2], dtype=torch.int32)),
     re.escape("input 'query_lens' sums to 5 tokens, but the per-token inputs have 4 rows ('input_ids'); each "
               "request's token count must match its rows in the per-token inputs")),
    (inputs([3, 1], query_lens=torch.tensor([-1, 5], dtype=torch.int32)),
     "input 'query_lens' gives request 0 -1 tokens; each request of a step has 1..4 tokens"),
    (inputs([3, 1], query_lens=torch.tensor([0, 4], dtype=torch.int32)),
     "input 'query_lens' gives request 0 0 tokens; each request of a step has 1..4 tokens .* leave requests with no "
     "tokens out of the step"),
    (inputs([3, 1], query_lens=torch.tensor([9, 1], dtype=torch.int32)),
     "input 'query_lens' gives request 0 9 tokens; each request of a step has 1..4 tokens"),
    (inputs([3, 1], query_lens=torch.tensor([3, 1, 0, 0], dtype=torch.int32)[::2]),
     "input 'query_lens' \\(the split\\) is not contiguous; pass .contiguous\\(\\)"),
    (inputs([3, 1], query_lens=torch.tensor([3, 1], dtype=torch.long)),
     "input 'query_lens' has dtype torch.int64, expected torch.int32"),
    (inputs([], input_ids=torch.zeros(0, dtype=torch.long), positions=torch.zeros(0, dtype=torch.long)),
     "0 tokens: every per-token input has 0 rows; skip the step"),
])
def test_bad_steps_are_refused_naming_the_input_and_fix(given, message):
    error = TypeError if "dtype" in message else ValueError
    with pytest.raises(error, match=message):
        check(ragged(), given)


def test_steps_larger_than_every_size_raise_or_run_eagerly_per_fallback():
    big = inputs([1] * 9)  # 9 requests, 8 at most
    with pytest.raises(ValueError, match=re.escape("a step of 9 tokens over 9 requests is larger than every captured "
                                                   "size (at most 256 tokens, 8 requests); split it into smaller "
                                                   "steps, capture larger sizes, or use fallback='eager'")):
        check(ragged(fallback="error"), big)
    with pytest.raises(ValueError, match=r"a step of 300 tokens over 1 requests"):
        check(ragged(fallback="error"), inputs([300]))
    with pytest.raises(ValueError, match=r"is on cpu"):  # eager fallback: taken, then refused for its device
        check(ragged(fallback="eager"), big)


def test_the_split_must_be_on_the_host():
    # a tensor on another device than the CPU, without a GPU: the meta device
    given = inputs([3, 1], query_lens=torch.empty(2, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match=r"input 'query_lens' \(the split\) is on meta; pass each request's token "
                                         r"count as a CPU tensor"):
        check(ragged(), given)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(split="nope"), ValueError, r"split 'nope' is not an input; inputs are \['input_ids', 'page_table', "),
    (dict(split="input_ids"), ValueError, r"split input 'input_ids' must be one int32 or int64 value per request "
                                          r"with pad=0"),
    (dict(split="page_table"), ValueError, r"split input 'page_table' must be one int32 or int64 value per request"),
    (dict(max_requests=0), ValueError, r"max_requests must be a positive int or a dict of size -> requests, got 0"),
    (dict(max_requests={16: 4}), ValueError, r"max_requests must be an int or a dict with one entry per captured "
                                             r"size \[16, 64, 256\]"),
    (dict(max_requests={16: 17, 64: 8, 256: 8}), ValueError, r"max_requests\[T\] must be an int in 1..T"),
    (dict(max_requests={16: 8, 64: 4, 256: 8}), ValueError, r"max_requests must not fall as sizes grow"),
    (dict(tokens_per_request=2), ValueError, r"tokens_per_request is for uniform runners"),
    (dict(max_lead=None), ValueError, r"a ragged runner needs max_lead"),
])
def test_bad_arguments_are_refused_naming_them(kwargs, error, message):
    args = dict(capture_sizes=[16, 64, 256], split="query_lens", max_requests=8)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        gr.GraphRunner(step, INPUTS, **args)


def test_split_needs_pad_zero_and_per_token_inputs():
    with pytest.raises(ValueError, match=r"split input 'query_lens' must be .* with pad=0"):
        gr.GraphRunner(step, dict(INPUTS, query_lens=gr.StaticInput((), torch.int32, pad=1)), capture_sizes=[16],
                       split="query_lens")
    no_tokens = {"query_lens": gr.StaticInput((), torch.int32), "x": gr.StaticInput((), torch.long)}
    with pytest.raises(ValueError, match=r"a ragged runner needs per-token inputs"):
        gr.GraphRunner(lambda query_lens, x: x, no_tokens, capture_sizes=[16], split="query_lens")


def test_max_requests_belongs_to_ragged_runners():
    with pytest.raises(ValueError, match=r"max_requests is for a ragged runner: name its split input too"):
        gr.GraphRunner(step, INPUTS, capture_sizes=[16], max_requests=4)


def test_a_uniform_runner_refuses_per_token_and_split_in_the_native_checker():
    specs = [("x", [], torch.long, b"\0", 1, True, True, False)]
    with pytest.raises(ValueError, match=r"input 'x': per-token and split inputs are a ragged runner's"):
        _C.InputChecker(specs, _C.SizeTable([8], 8), True, 0)


def test_ragged_size_table_refuses_bad_request_counts():
    with pytest.raises(ValueError, match=r"size 4 tokens would hold 5 requests"):
        _C.SizeTable([4, 8], 8, [5, 8])
    with pytest.raises(ValueError, match=r"one request count per size"):
        _C.SizeTable([4, 8], 8, [4])


def test_unarmed_ragged_runner_refuses_steps():
    with pytest.raises(gr.GraphStateError, match=r"capture\(\) has not run yet"):
        ragged()(**inputs([3, 1]))


def test_dispatch_checks_its_runners():
    uniform = gr.GraphRunner(lambda input_ids, positions, page_table: positions,
                             {n: INPUTS[n] for n in ("input_ids", "positions", "page_table")}, capture_sizes=[8])
    gr.Dispatch(ragged(), uniform)
    with pytest.raises(TypeError, match=r"Dispatch\(ragged=...\) takes a ragged GraphRunner"):
        gr.Dispatch(uniform)
    with pytest.raises(TypeError, match=r"Dispatch\(uniform=...\) takes a uniform GraphRunner with "
                                        r"tokens_per_request=1"):
        gr.Dispatch(ragged(), ragged())
    extra = gr.GraphRunner(lambda input_ids, query_lens: input_ids,
                           {"input_ids": INPUTS["input_ids"], "query_lens": INPUTS["query_lens"]}, capture_sizes=[8])
    with pytest.raises(ValueError, match=r"the uniform runner's inputs must be the ragged runner's without the split "
                                         r"'query_lens'; it also takes \['query_lens'\]"):
        gr.Dispatch(ragged(), extra)


def test_dispatch_picks_by_the_steps_shape():
    uniform = gr.GraphRunner(lambda input_ids, positions, page_table: positions,
                             {n: INPUTS[n] for n in ("input_ids", "positions", "page_table")}, capture_sizes=[8])
    d = gr.Dispatch(ragged(), uniform)
    assert d.runner_for(3, 3) is uniform
    assert d.runner_for(3, 4) is d.ragged
    assert d.runner_for(9, 9) is d.ragged  # no uniform size holds 9 requests


@pytest.mark.parametrize("split, ones", [([1, 1, 1], True), ([1, 2, 0], False), ([1], True), ([], True)])
def test_all_ones_reads_the_split_on_the_host(split, ones):
    assert _C.all_ones(torch.tensor(split, dtype=torch.int32)) is ones
    assert _C.all_ones(torch.tensor(split, dtype=torch.int64)) is ones
    assert _C.all_ones(torch.tensor(split, dtype=torch.float32)) is False


def test_output_slots_outside_the_table_are_refused():
    ragged_table = _C.SizeTable([4, 8], 8, [2, 3])
    with pytest.raises(ValueError, match=r"6 tokens is not a captured size"):
        ragged_table.output_slot(6, 1)
    with pytest.raises(ValueError, match=r"no output slot for 3 requests at size 4"):
        ragged_table.output_slot(4, 3)
    uniform_table = _C.SizeTable([4, 8], 8)
    assert uniform_table.output_slot(8, 5) == 5 and uniform_table.max_size == 8 and ragged_table.max_size == 8
    with pytest.raises(ValueError, match=r"no output slot for 1 requests at size 6"):
        uniform_table.output_slot(6, 1)
