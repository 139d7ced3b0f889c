"""The built-in decoder step: correct on CPU, and through GraphRunner on a GPU."""
import pytest
import torch

import graphrunner as gr
from conftest import gpu
from graphrunner.models import DecoderConfig, DecoderStep, random_step, step_inputs

SMALL = DecoderConfig(layers=2, hidden=256, heads=4, head_dim=64, intermediate=512, vocab=1000, cache_len=64,
                      max_batch_size=32)


def test_decoder_rows_are_independent_on_cpu():
    cfg = DecoderConfig(layers=2, hidden=64, heads=2, head_dim=32, intermediate=128, vocab=50, cache_len=16,
                        max_batch_size=8, dtype=torch.float32)
    model = DecoderStep(cfg, device="cpu")
    step = random_step(cfg, 6, torch.Generator().manual_seed(0), device="cpu")
    full = model(**step)
    part = model(**{k: v[:3] for k, v in step.items()})
    torch.testing.assert_close(full[:3], part, rtol=1e-5, atol=1e-5)
    assert full.shape == (6, cfg.vocab) and torch.isfinite(full).all()


def test_tensor_parallel_shards_need_divisible_heads():
    with pytest.raises(ValueError, match="must divide by tp_size"):
        DecoderStep(DecoderConfig(heads=6, hidden=64, head_dim=8, intermediate=96), device="cpu", tp_size=4)


@gpu
def test_decoder_through_runner_matches_eager():
    model = DecoderStep(SMALL)
    with gr.GraphRunner(model, step_inputs(SMALL), max_batch_size=SMALL.max_batch_size) as runner:
        runner.capture()
        gen = torch.Generator(device="cuda").manual_seed(0)
        for batch in (1, 5, 17, 32):
            step = random_step(SMALL, batch, gen)
            with torch.no_grad():
                want = model(**step)
            got = runner(**step)
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < 2e-2, f"batch {batch}: relative error {err}"
        report = runner.validate(scrub=True, guard=True)
        assert report.replays == 2 * len(runner.capture_sizes)
