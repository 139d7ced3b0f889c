"""The native per-step input checks; they need no GPU, so CI runs every message."""
import pytest
import torch

import graphrunner as gr
from graphrunner._native import _C

SPECS = {"input_ids": gr.StaticInput((), torch.long, pad=0),
         "hidden": gr.StaticInput((4,), torch.float32, pad=0.0),
         "seq_lens": gr.StaticInput((), torch.int32, pad=1)}


def checker(max_batch_size=8, fallback_eager=True, tokens_per_request=1):
    specs = [(n, list(s.shape), s.dtype, s.pad_bytes(), s.rows(1, tokens_per_request), s.padding == "each_step",
              False, False) for n, s in SPECS.items()]
    return _C.InputChecker(specs, _C.SizeTable([max_batch_size], max_batch_size), fallback_eager, 0)


def uniform(max_batch_size):
    return _C.SizeTable([max_batch_size], max_batch_size)


def inputs(batch=3, **override):
    out = {"input_ids": torch.randint(0, 100, (batch,)), "hidden": torch.randn(batch, 4),
           "seq_lens": torch.randint(1, 9, (batch,), dtype=torch.int32)}
    out.update(override)
    return out


def test_cpu_tensors_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"input 'input_ids' is on cpu, expected cuda:0; move it with \.to"):
        checker().check(inputs())


def test_wrong_dtype_names_input_and_fix():
    with pytest.raises(TypeError, match=r"input 'seq_lens' has dtype torch.int64, expected torch.int32; "
                                        r"convert it with \.to\(torch.int32\)"):
        checker().check(inputs(seq_lens=torch.ones(3, dtype=torch.long)))


def test_wrong_row_shape():
    with pytest.raises(ValueError, match=r"input 'hidden' has per-row shape \(5,\), expected per-row shape "
                                         r"\(4,\); pass a tensor of shape \(batch, 4\)"):
        checker().check(inputs(hidden=torch.randn(3, 5)))
    with pytest.raises(ValueError, match=r"input 'input_ids' has a 0-d tensor"):
        checker().check(inputs(input_ids=torch.tensor(3)))


def test_batches_must_agree():
    with pytest.raises(ValueError, match="inputs disagree on the batch size: 'input_ids' has 3 rows, 'hidden' has 2"):
        checker().check(inputs(hidden=torch.randn(2, 4)))


def test_batch_zero():
    with pytest.raises(ValueError, match="batch size 0"):
        checker().check(inputs(batch=0))


def test_missing_and_extra_names():
    given = inputs()
    given.pop("seq_lens")
    given["positions"] = torch.zeros(3, dtype=torch.long)
    with pytest.raises(TypeError, match="missing input\\(s\\) 'seq_lens'; unexpected input\\(s\\) 'positions'"):
        checker().check(given)
    with pytest.raises(TypeError, match="unexpected input\\(s\\) 'extra'"):
        checker().check(inputs(extra=torch.zeros(3)))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="input 'input_ids' is a list, expected a torch.Tensor"):
        checker().check(inputs(input_ids=[1, 2, 3]))


def test_pad_bytes_follow_dtype():
    assert gr.StaticInput((), torch.int32, pad=1).pad_bytes() == b"\x01\x00\x00\x00"
    assert list(gr.StaticInput((), torch.float16, pad=1.0).pad_bytes()) == torch.tensor([1.0], dtype=torch.float16) \
        .view(torch.uint8).tolist()


def test_input_count_is_bounded():
    """The staging argument holds up to 16 source pointers; more inputs are refused when the runner is built."""
    specs = [(f"x{i}", [], torch.long, b"\0", 1, True, False, False) for i in range(17)]
    with pytest.raises(ValueError, match="a runner takes 1 to 16 inputs, got 17"):
        _C.InputChecker(specs, uniform(8), True, 0)
    with pytest.raises(ValueError, match="a runner takes 1 to 16 inputs, got 17"):
        gr.GraphRunner(lambda **kw: kw["x0"], {f"x{i}": gr.StaticInput((), torch.long) for i in range(17)},
                       max_batch_size=8)


def test_static_buffer_size_is_bounded():
    """Staging addresses an input's bytes with 32-bit offsets: a buffer over 1 GiB is refused when the runner is
    built, naming the input and the fix; one of exactly 1 GiB is taken."""
    row = [(1 << 30) // (8192 * 4)]  # float32 elements: exactly 1 GiB at 8192 requests
    _C.InputChecker([("emb", row, torch.float32, b"\0" * 4, 1, True, False, False)], uniform(8192), True, 0)
    with pytest.raises(ValueError, match=r"input 'emb' has 131076 bytes a request: at 8192 rows its static "
                                         r"buffer would hold over the 1024 MiB a staged input may; capture smaller "
                                         r"sizes, or keep this data"):
        _C.InputChecker([("emb", [row[0] + 1], torch.float32, b"\0" * 4, 1, True, False, False)], uniform(8192),
                        True, 0)
    with pytest.raises(ValueError, match=r"input 'emb' has 131076 bytes a request"):
        gr.GraphRunner(lambda emb: emb, {"emb": gr.StaticInput((row[0] + 1,), torch.float32)}, max_batch_size=8192)


def test_per_token_inputs_count_requests():
    """A per-token input has tokens_per_request rows per request; the batch is counted in requests."""
    global SPECS
    saved = SPECS
    SPECS = dict(saved, input_ids=gr.StaticInput((), torch.long, per_token=True))
    try:
        c = checker(tokens_per_request=4)
        with pytest.raises(ValueError, match=r"input 'input_ids' has 6 rows, not a multiple of tokens_per_request "
                                             r"\(4\): it is a per-token input"):
            c.check(inputs(3, input_ids=torch.zeros(6, dtype=torch.long)))
        with pytest.raises(ValueError, match=r"inputs disagree on the batch size: 'input_ids' has 8 rows \(2 requests "
                                             r"of 4 tokens\), 'hidden' has 3 rows"):
            c.check(inputs(3, input_ids=torch.zeros(8, dtype=torch.long)))
        with pytest.raises(ValueError, match=r"input 'input_ids' is on cpu"):  # 12 rows = 3 requests: shapes agree
            c.check(inputs(3, input_ids=torch.zeros(12, dtype=torch.long)))
    finally:
        SPECS = saved
