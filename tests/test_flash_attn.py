"""flash-attn inside captured graphs: the built-in decoder's paged decode at every captured size."""
import functools
import random

import pytest
import torch

import graphrunner as gr
from conftest import gpu
from graphrunner.checks import poison, relative_error
from graphrunner.workloads.decoder import DecoderConfig, Decoder, random_decode_inputs, decode_inputs
from graphrunner.workloads.reproductions import installed

pytestmark = gpu

SHAPE = dict(layers=2, hidden=256, heads=4, head_dim=64, intermediate=512, vocab=1000, cache_len=512,
             max_batch_size=64)


BACKENDS = [
    pytest.param(("flash-attn-4", 128), marks=pytest.mark.skipif(not installed("flash_attn.cute"),
                                                               reason="flash-attn 4 (flash_attn.cute) not installed")),
    pytest.param(("flash-attn", 256), marks=pytest.mark.skipif(not installed("flash_attn.flash_attn_interface"),
                                                             reason="flash-attn 2 not installed")),
]


@pytest.fixture
def paged_pair(request):
    """The flash backend's decoder and an SDPA decoder with the same weights, cache and page size."""
    backend, page_size = request.param
    cfg = DecoderConfig(**SHAPE, attention=backend, page_size=page_size)
    reference = DecoderConfig(**SHAPE, attention="sdpa", page_size=page_size)
    return cfg, Decoder(cfg), Decoder(reference)


@pytest.mark.parametrize("paged_pair", BACKENDS, indirect=True)
def test_outputs_equal_sdpa_at_every_size_interleaved(paged_pair):
    cfg, model, reference = paged_pair
    # strict: the capture guard raises if anything lazily made inside a capture stays alive in the pool
    with gr.GraphRunner(model, decode_inputs(cfg), max_batch_size=cfg.max_batch_size, strict=True) as runner:
        runner.capture()
        schedule = [s for s in runner.capture_sizes for _ in range(2)]
        random.Random(0).shuffle(schedule)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for size in schedule:
            smaller = [s for s in runner.capture_sizes if s < size]
            batch = random.Random(size).randint(smaller[-1] + 1 if smaller else 1, size)
            step = random_decode_inputs(cfg, batch, gen)
            with torch.no_grad():
                want = reference(**step).float()
            poison(runner.record.entries[size].outputs)
            got = runner(**step).float()
            assert runner.size_for(batch) == size and got.shape == want.shape
            err = relative_error(got, want)
            assert err < 2e-2, f"size {size}, batch {batch}: relative error {err:.3g} against SDPA"


@pytest.mark.parametrize("paged_pair", BACKENDS, indirect=True)
def test_validate_with_scrub_and_guard_passes(paged_pair):
    cfg, model, _ = paged_pair
    with gr.GraphRunner(model, decode_inputs(cfg), max_batch_size=cfg.max_batch_size) as runner:
        runner.capture()
        report = runner.validate(scrub=True, guard=True, make_inputs=functools.partial(random_decode_inputs, cfg))
        assert report.replays == 2 * len(runner.capture_sizes)
