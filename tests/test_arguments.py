"""Every constructor argument and StaticInput field is checked up front, naming the argument and the fix.
No GPU needed: CI runs all of it."""
import inspect

import pytest
import torch

import graphrunner as gr
from conftest import HAS_GPU

IDS = {"ids": gr.StaticInput((), torch.long)}


def echo(ids):
    return ids * 2


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(dtype="float32"), TypeError, r"dtype must be a torch.dtype, got str 'float32'; pass e.g. torch.float32"),
    (dict(dtype=float), TypeError, r"dtype must be a torch.dtype, got type"),
    (dict(shape=4), TypeError, r"shape must be a tuple of ints.*got int 4; pass \(\) for one value per row or \(4,\)"),
    (dict(shape=(-1,)), ValueError, r"shape must have sizes >= 0, got \(-1,\)"),
    (dict(shape=(2.0,)), TypeError, r"shape must be a tuple of ints"),
    (dict(pad="0"), TypeError, r"pad must be a number, got str '0'; pass e.g. pad=0"),
    (dict(dtype=torch.int8, pad=1000), ValueError, r"pad 1000 does not fit torch.int8 \(-128..127\)"),
    (dict(dtype=torch.long, pad=0.5), ValueError,
     r"pad 0.5 is not a whole number, but dtype torch.int64 holds integers"),
    (dict(dtype=torch.bool, pad=2), ValueError, r"pad for torch.bool must be True or False, got 2"),
    (dict(low="a"), TypeError, r"low must be a number, got str 'a'"),
    (dict(low=5, high=5), ValueError, r"high \(5\) must be above low \(5\)"),
])
def test_static_input_fields(kwargs, error, message):
    fields = dict(shape=(), dtype=torch.float32)
    fields.update(kwargs)
    with pytest.raises(error, match=message):
        gr.StaticInput(**fields)


def test_a_numpy_dtype_is_refused():
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype, got type"):
        gr.StaticInput((), np.float32)


def test_static_input_accepts_good_values():
    spec = gr.StaticInput([2, 3], torch.int8, pad=-128.0, low=-5, high=5)
    assert spec.shape == (2, 3) and spec.pad_bytes() == b"\x80"
    assert gr.StaticInput((), torch.bool, pad=True).pad_bytes() == b"\x01"


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(capture_sizes=8), TypeError, r"capture_sizes must be a list of ints, got int 8; pass e.g. \[8\]"),
    (dict(capture_sizes=[1, "2", 8]), TypeError, r"capture_sizes must hold ints only, got \['2'\]"),
    (dict(capture_sizes=[1, True]), TypeError, r"capture_sizes must hold ints only, got \[True\]"),
    (dict(capture_sizes=[]), ValueError, r"capture_sizes is empty"),
    (dict(max_batch_size=2 ** 40), ValueError, r"max_batch_size must be at most 8192, got 1099511627776: larger "
                                               r"batches are compute-bound"),
    (dict(max_batch_size=10 ** 6), ValueError, r"max_batch_size must be at most 8192"),
    (dict(max_batch_size=True), TypeError, r"max_batch_size must be an int, got bool True"),
    (dict(max_batch_size=0), ValueError, r"max_batch_size must be a positive int, got 0"),
    (dict(max_batch_size=8.0), TypeError, r"max_batch_size must be an int, got float"),
    (dict(max_batch_size=None), TypeError, r"pass max_batch_size \(the largest batch a step may have\), "
                                           r"capture_sizes, or both"),
    (dict(max_batch_size=8, capture_sizes=[1, 2, 4]), ValueError,
     r"max_batch_size \(8\) is above the largest of capture_sizes \(4\): batches 5..8 would have no graph. Leave "
     r"max_batch_size out"),
    (dict(capture_sizes=[4, 16], max_batch_size=8), ValueError, r"capture_sizes must be ints in 1..max_batch_size"),
    (dict(capture_error_mode="nope"), ValueError, r"capture_error_mode must be one of \('global', 'thread_local', "
                                                  r"'relaxed'\), got 'nope'"),
    (dict(pool="x"), TypeError, r"pool must be None, a pool id from torch.cuda.graph_pool_handle\(\), a "
                                r"torch.cuda.MemPool or a Graph; got str"),
    (dict(on_capture=3), TypeError, r"on_capture must be callable or None, got int 3"),
    (dict(before_replay="hook"), TypeError, r"before_replay must be callable or None, got str 'hook'"),
    (dict(collective_timeout_s=-1), ValueError, r"collective_timeout_s must be a positive number of seconds, got -1"),
    (dict(collective_timeout_s=float("inf")), ValueError, r"collective_timeout_s must be a positive number"),
    (dict(strict="yes"), TypeError, r"strict must be True or False, got str 'yes'"),
    (dict(debug=1), TypeError, r"debug must be True or False, got int 1"),
    (dict(clone_outputs=None), TypeError, r"clone_outputs must be True or False"),
    (dict(no_grad="no"), TypeError, r"no_grad must be True or False"),
    (dict(verbose="loud"), TypeError, r"verbose must be True or False"),
    (dict(fallback="skip"), ValueError, r"fallback must be 'eager' or 'error', got 'skip'"),
    (dict(warmup=-1), ValueError, r"warmup must be an int >= 0, got -1"),
    (dict(warmup=True), ValueError, r"warmup must be an int >= 0, got True"),
    (dict(device="cpu"), ValueError, r"device must be a CUDA device, got cpu"),
    (dict(device="gpu"), ValueError, r"device 'gpu' is not a device name; pass e.g. 'cuda:0' or 0"),
    (dict(device=1.5), TypeError, r"device must be an int, a str like 'cuda:0' or a torch.device, got float"),
    (dict(keep=torch.zeros(2)), TypeError, r"keep must be a list of tensors and modules, got Tensor"),
    (dict(keep=[3]), TypeError, r"keep must hold tensors and modules only, got int"),
    (dict(name=3), TypeError, r"name must be a str, got int"),
    (dict(max_lead=0), ValueError, r"max_lead must be None \(no bound\) or an int in 1..1024, got 0"),
    (dict(max_lead=True), ValueError, r"max_lead must be None \(no bound\) or an int in 1..1024, got True"),
    (dict(max_lead=2.0), ValueError, r"max_lead must be None"),
    (dict(share_segments="yes"), TypeError, r"share_segments must be True or False, got str 'yes'"),
    (dict(share_segments=1), TypeError, r"share_segments must be True or False, got int 1"),
])
def test_runner_arguments(kwargs, error, message):
    args = dict(max_batch_size=8)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        gr.GraphRunner(echo, IDS, **args)


def test_share_segments_is_off_by_default_and_kept_in_the_spec():
    assert gr.GraphRunner(echo, IDS, max_batch_size=8).spec.share_segments is False
    assert gr.GraphRunner(echo, IDS, max_batch_size=8, share_segments=True).spec.share_segments is True


def test_bad_fn_and_inputs():
    with pytest.raises(TypeError, match="fn must be callable"):
        gr.GraphRunner(3, IDS, max_batch_size=8)
    with pytest.raises(TypeError, match=r"inputs\['ids'\] must be a gr.StaticInput, got tuple"):
        gr.GraphRunner(echo, {"ids": (torch.long,)}, max_batch_size=8)
    with pytest.raises(TypeError, match="inputs must be a non-empty dict"):
        gr.GraphRunner(echo, {}, max_batch_size=8)
    with pytest.raises(TypeError, match="input names must be Python identifiers"):
        gr.GraphRunner(echo, {"input ids": gr.StaticInput((), torch.long)}, max_batch_size=8)


def test_max_batch_size_defaults_to_the_largest_capture_size():
    runner = gr.GraphRunner(echo, IDS, capture_sizes=[4, 1, 2])
    assert runner.spec.max_batch_size == 4 and runner.capture_sizes == [1, 2, 4]
    assert [runner.size_for(b) for b in range(6)] == [0, 1, 2, 4, 4, 0]


@pytest.mark.skipif(not HAS_GPU, reason="which devices exist is known only where CUDA is")
def test_a_device_that_does_not_exist():
    with pytest.raises(ValueError, match=r"device cuda:\d+ does not exist: this machine has \d+ GPU\(s\)"):
        gr.GraphRunner(echo, IDS, max_batch_size=8, device=torch.cuda.device_count())


@pytest.mark.skipif(HAS_GPU, reason="checks the errors raised where no CUDA device exists")
def test_gpu_only_parts_say_so_without_a_gpu():
    from graphrunner_workloads.decoder import Decoder, DecoderConfig

    for make in (lambda: gr.workspace("tests.no_gpu", 16), lambda: Decoder(DecoderConfig(layers=1))):
        with pytest.raises(RuntimeError, match="needs a CUDA device, and torch.cuda.is_available"):
            make()


def test_help_documents_every_argument():
    doc = inspect.getdoc(gr.GraphRunner)
    for name in inspect.signature(gr.GraphRunner.__init__).parameters:
        if name != "self":
            assert f"    {name}:" in doc, f"GraphRunner's docstring does not document {name}"
    doc = inspect.getdoc(gr.StaticInput)
    for name in ("shape", "dtype", "pad", "low", "high"):
        assert f"    {name}:" in doc
    for public in gr.__all__:
        assert inspect.getdoc(getattr(gr, public)), f"gr.{public} has no docstring"
