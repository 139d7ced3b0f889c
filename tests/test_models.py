"""The built-in decoder step: correct on CPU, and through GraphRunner on a GPU; the draft step's arguments."""
import importlib.util

import pytest
import torch

import graphrunner as gr
from conftest import gpu
from graphrunner.testing import relative_error
from graphrunner_workloads.decoder import DecoderConfig, Decoder, decode_inputs, kv_slot, random_decode_inputs
from graphrunner_workloads.spec_decode import DraftStep, SpecConfig
from graphrunner_workloads.traces import padded

SMALL = DecoderConfig(layers=2, hidden=256, heads=4, head_dim=64, intermediate=512, vocab=1000, cache_len=64,
                      max_batch_size=32)


def test_decoder_rows_are_independent_on_cpu():
    cfg = DecoderConfig(layers=2, hidden=64, heads=2, head_dim=32, intermediate=128, vocab=50, cache_len=16,
                        max_batch_size=8, dtype=torch.float32)
    model = Decoder(cfg, device="cpu")
    step = random_decode_inputs(cfg, 6, torch.Generator().manual_seed(0), device="cpu")
    full = model(**step)
    part = model(**{k: v[:3] for k, v in step.items()})
    torch.testing.assert_close(full[:3], part, rtol=1e-5, atol=1e-5)
    assert full.shape == (6, cfg.vocab) and torch.isfinite(full).all()


@pytest.mark.parametrize("page_size", [0, 16])
def test_padding_rows_leave_every_row_s_keys_alone_on_cpu(page_size):
    """A step padded as the runner pads it gives the real rows' results and changes no cache entry but the real
    rows' new ones and the scratch places."""
    cfg = DecoderConfig(layers=2, hidden=64, heads=2, head_dim=32, intermediate=128, vocab=50, cache_len=64,
                        max_batch_size=8, page_size=page_size, dtype=torch.float32)
    padded_model, model = Decoder(cfg, device="cpu"), Decoder(cfg, device="cpu")
    step = random_decode_inputs(cfg, 3, torch.Generator().manual_seed(0), device="cpu")
    torch.testing.assert_close(padded_model(**padded(cfg, step, 8))[:3], model(**step), rtol=1e-5, atol=1e-5)
    new = torch.zeros(model.k_cache.shape[:-1], dtype=torch.bool)  # the real rows' new entries, all layers
    if cfg.paged:
        slots = kv_slot(step["page_table"], step["positions"], cfg.page_size)
        new[:, slots // cfg.page_size, slots % cfg.page_size] = True
        scratch = (slice(None), 0)  # page 0
    else:
        new[:, torch.arange(3), :, step["positions"]] = True
        scratch = (Ellipsis, cfg.cache_len)  # every row's column past cache_len
    for mine, theirs in ((padded_model.k_cache, model.k_cache), (padded_model.v_cache, model.v_cache)):
        # The new entries of layers past the first follow the batch's GEMMs: equal to rounding.
        torch.testing.assert_close(mine[new], theirs[new], rtol=1e-4, atol=1e-5)
        old = ~new
        old[scratch] = False
        assert torch.equal(mine[old], theirs[old]), "a padding row wrote into a cache entry of another row"


def test_paged_cache_gives_the_contiguous_cache_results_on_cpu():
    tiny = dict(layers=2, hidden=64, heads=2, head_dim=32, intermediate=128, vocab=50, cache_len=64,
                max_batch_size=8, dtype=torch.float32)
    contiguous, paged = DecoderConfig(**tiny), DecoderConfig(**tiny, page_size=16)
    rows, pages = Decoder(contiguous, device="cpu"), Decoder(paged, device="cpu")
    step = random_decode_inputs(paged, 6, torch.Generator().manual_seed(0), device="cpu")
    table = step["page_table"].long()

    def as_pages(cache):  # [layers, row, heads, cache_len, dim] -> the paged model's [layers, page, slot, heads, dim]
        out = pages.k_cache.clone()
        by_page = cache[:, :6, :, :contiguous.cache_len].unflatten(3, (paged.pages_per_seq, paged.page_size))
        by_page = by_page.permute(0, 1, 3, 4, 2, 5)
        out[:, table] = by_page
        return out

    pages.k_cache.copy_(as_pages(rows.k_cache))
    pages.v_cache.copy_(as_pages(rows.v_cache))
    want = rows(**{k: v for k, v in step.items() if k != "page_table"})
    torch.testing.assert_close(pages(**step), want, rtol=1e-5, atol=1e-5)
    # The step's new keys and values landed in the same places of both layouts.
    torch.testing.assert_close(pages.k_cache, as_pages(rows.k_cache))
    torch.testing.assert_close(pages.v_cache, as_pages(rows.v_cache))


def test_attention_choices_are_checked():
    with pytest.raises(ValueError, match="attention must be one of"):
        DecoderConfig(attention="xformers")
    with pytest.raises(ValueError, match="needs a paged KV cache: set page_size, e.g. 128"):
        DecoderConfig(attention="flash-attn-4", page_size=0)
    with pytest.raises(ValueError, match="must be 0 or divide cache_len"):
        DecoderConfig(page_size=100)
    assert DecoderConfig(attention="flash-attn-4").page_size == 128
    assert DecoderConfig(attention="flash-attn").page_size == 256
    assert DecoderConfig(attention="decode").page_size == 0 and DecoderConfig(attention="decode", page_size=16).paged
    assert "page_table" in decode_inputs(DecoderConfig(page_size=128))
    assert "page_table" not in decode_inputs(DecoderConfig())


def test_decode_attention_on_the_cpu_names_the_fix():
    cfg = DecoderConfig(attention="decode", layers=1, hidden=64, heads=2, head_dim=32, intermediate=64, vocab=10,
                        max_batch_size=2)
    with pytest.raises(ValueError, match=r"attention 'decode' runs on CUDA devices only; use attention='sdpa' on cpu"):
        Decoder(cfg, device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_missing_flash_attn_names_the_extra():
    with pytest.raises(ImportError,
                       match=r"needs the package that provides flash_attn.cute: pip install .\[flash-attn-4\]"):
        Decoder(DecoderConfig(attention="flash-attn-4", layers=1, hidden=64, heads=2, head_dim=32,
                                  intermediate=64, vocab=10, max_batch_size=2), device="cpu")


def test_tensor_parallel_shards_need_divisible_heads():
    with pytest.raises(ValueError, match="must divide by tp_size"):
        Decoder(DecoderConfig(heads=6, hidden=64, head_dim=8, intermediate=96), device="cpu", tp_size=4)


@gpu
def test_decoder_through_runner_matches_eager():
    model = Decoder(SMALL)
    with gr.GraphRunner(model, decode_inputs(SMALL), max_batch_size=SMALL.max_batch_size) as runner:
        runner.capture()
        gen = torch.Generator(device="cuda").manual_seed(0)
        for batch in (1, 5, 17, 32):
            step = random_decode_inputs(SMALL, batch, gen)
            with torch.no_grad():
                want = model(**step)
            got = runner(**step)
            err = relative_error(got, want)
            assert err < 2e-2, f"batch {batch}: relative error {err}"
        report = runner.validate(scrub=True, guard=True)
        assert report.replays == 2 * len(runner.capture_sizes)


@pytest.mark.parametrize("metadata,slots,message", [
    ("bogus", False, r"metadata must be one of \('torch', 'kernel', 'kernel-seed-bug'\), got 'bogus'"),
    ("kernel", False, r"metadata 'kernel' takes a slots buffer \(make_steps\(\) makes the pair right\)"),
    ("torch", True, r"metadata 'torch' takes no slots buffer"),
])
def test_draft_step_metadata_and_slots_must_agree(metadata, slots, message):
    cfg = SpecConfig()
    draft = Decoder(cfg.draft, device="cpu")
    with pytest.raises(ValueError, match=message):
        DraftStep(draft, cfg.steps, metadata, torch.zeros(8, dtype=torch.long) if slots else None)
