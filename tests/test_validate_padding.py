"""validate(eager_at="size") and validate(restore_state=True): the padding, row cutting and state snapshot
helpers, on CPU tensors (the replays themselves are GPU tests: tests/test_closures.py)."""
import pytest
import torch

import graphrunner as gr
from graphrunner.validate import _restore, _snapshot, padded_inputs, step_rows, validate


def test_each_input_is_padded_to_its_rows_at_the_size_with_its_pad_value():
    specs = {"ids": gr.StaticInput((), torch.long, pad=7), "pos": gr.StaticInput((2,), torch.int32, pad=-1),
             "tok": gr.StaticInput((), torch.long, pad=0, per_token=True)}
    inputs = {"ids": torch.tensor([1, 2]), "pos": torch.zeros(2, 2, dtype=torch.int32),
              "tok": torch.arange(6)}  # 3 tokens per request
    out = padded_inputs(inputs, specs, {"ids": 4, "pos": 4, "tok": 12})
    assert out["ids"].tolist() == [1, 2, 7, 7]
    assert out["pos"].tolist() == [[0, 0], [0, 0], [-1, -1], [-1, -1]] and out["pos"].dtype == torch.int32
    assert out["tok"].tolist() == [0, 1, 2, 3, 4, 5] + [0] * 6
    assert padded_inputs(inputs, specs, {"ids": 2, "pos": 2, "tok": 6})["ids"] is inputs["ids"]  # no padding


def test_the_padded_steps_outputs_are_cut_to_the_rows_the_replay_returned():
    padded = {"logits": torch.arange(8.0).view(4, 2), "tokens": torch.arange(12), "count": torch.tensor(4)}
    got = {"logits": torch.zeros(2, 2), "tokens": torch.zeros(6), "count": torch.tensor(4)}
    want = step_rows(padded, got)
    assert want["output['logits']"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert want["output['tokens']"].tolist() == list(range(6)) and want["output['count']"].item() == 4
    assert step_rows(torch.ones(4, 3), torch.ones(1, 3))["output"].shape == (1, 3)


def test_state_is_put_back_once_per_tensor():
    counter, cache = torch.zeros((), dtype=torch.long), torch.zeros(3)
    view = cache[1:]
    snap = _snapshot({"counter": counter, "cache": cache, "same": counter, "view": view})
    assert len(snap) == 3
    counter += 5
    cache.fill_(2.0)
    _restore(snap)
    assert counter.item() == 0 and cache.tolist() == [0.0, 0.0, 0.0]


def test_eager_at_takes_batch_or_size():
    with pytest.raises(ValueError, match="eager_at must be 'batch'.*or 'size'"):
        validate([], eager_at="padded")
